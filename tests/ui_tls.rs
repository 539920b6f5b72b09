//! The Secrets page over real TLS with `--proxy-client-ca`: identity headers are accepted only
//! on connections presenting a client certificate signed by the proxy's CA; without one the
//! page refuses, and a certificate from another CA fails the handshake.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use agent_secrets::ui::config::{NamespaceRule, Settings};
use agent_secrets::ui::csrf::CsrfKey;
use agent_secrets::ui::server::{ProxyCertificateAcceptor, Shared, UiState, router};
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::net::SocketAddr;
use std::sync::Arc;

fn ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// `(certificate PEM, key PEM)` for `name`, signed by `issuer`.
fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    name: &str,
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

struct Pki {
    server_ca: String,
    proxy: (String, String),
    rogue: (String, String),
    _dir: tempfile::TempDir,
    /// Requests in this test make no Kubernetes call; the mock is never answered.
    _api: tower_test::mock::Handle<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >,
    addr: SocketAddr,
}

/// The page over TLS, trusting only the proxy's client certificate (no CIDR).
async fn start() -> Pki {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let server_ca = ca();
    let proxy_ca = ca();
    let rogue_ca = ca();
    let (cert, key) = leaf(&server_ca, "localhost", ExtendedKeyUsagePurpose::ServerAuth);
    let proxy = leaf(
        &proxy_ca,
        "oauth2-proxy",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let rogue = leaf(
        &rogue_ca,
        "oauth2-proxy",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let config = agent_secrets::ui::tls_files(
        &path("tls.crt", &cert),
        &path("tls.key", &key),
        Some(&path("proxy-ca.crt", &proxy_ca.pem())),
    )
    .server_config()
    .unwrap();

    let mut settings = Settings::for_loopback_proxy(NamespaceRule::Fixed("sandboxes".into()));
    settings.trusted_proxy_cidrs.clear();
    settings.require_proxy_certificate = true;
    let (service, api) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    let state = UiState::new(Shared {
        settings,
        client: kube::Client::new(service, "default"),
        csrf: CsrfKey::generate().unwrap(),
        tls: true,
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = ProxyCertificateAcceptor::new(RustlsAcceptor::new(RustlsConfig::from_config(
        Arc::new(config),
    )));
    let server = axum_server::from_tcp(listener).unwrap().acceptor(acceptor);
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { server.serve(app).await.unwrap() });
    Pki {
        server_ca: server_ca.pem(),
        proxy,
        rogue,
        _dir: dir,
        _api: api,
        addr,
    }
}

/// GET `path` as alice over TLS, with `client` as the client certificate (or none).
async fn get(
    pki: &Pki,
    client: Option<&(String, String)>,
    path: &str,
) -> Result<(u16, http::HeaderMap, String), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.server_ca.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(pki.addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("http: {e}"))?;
    tokio::spawn(connection);
    let request = http::Request::builder()
        .uri(path)
        .header("host", "localhost")
        .header("x-forwarded-user", "alice")
        .body(Full::new(Bytes::new()))
        .unwrap();
    // TLS 1.3 reports a refused client certificate only when the server's alert arrives,
    // i.e. on the first read.
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?;
    Ok((
        status,
        headers,
        String::from_utf8(body.to_bytes().to_vec()).unwrap(),
    ))
}

#[tokio::test]
async fn identity_is_accepted_only_with_the_proxys_client_certificate() {
    let pki = start().await;
    let check = "/api/v1/env-names/check?name=GITHUB_API_KEY";

    let (status, headers, body) = get(&pki, Some(&pki.proxy), check).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer, serde_json::json!({"valid": true, "message": null}));
    assert_eq!(headers["strict-transport-security"], "max-age=31536000");

    let (status, _, body) = get(&pki, None, check).await.unwrap();
    assert_eq!(status, 403, "no client certificate: {body}");
    assert!(body.contains("sign-in proxy"), "{body}");
    let (status, _, _) = get(&pki, None, "/healthz").await.unwrap();
    assert_eq!(status, 200, "probes work without a certificate");

    let refused = get(&pki, Some(&pki.rogue), check).await;
    assert!(
        refused.is_err(),
        "a certificate from another CA is refused: {refused:?}"
    );
}

/// The certificate a TLS server at `addr` presents, trusting any of `cas`.
async fn served_certificate(addr: SocketAddr, cas: &[&str]) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots
            .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
            .unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn a_renewed_certificate_is_served_to_new_connections_without_a_restart() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (first_ca, renewed_ca) = (ca(), ca());
    let first = leaf(&first_ca, "localhost", ExtendedKeyUsagePurpose::ServerAuth);
    let renewed = leaf(
        &renewed_ca,
        "localhost",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let dir = tempfile::tempdir().unwrap();
    let files = agent_secrets::ui::tls_files(
        &dir.path().join("tls.crt"),
        &dir.path().join("tls.key"),
        None,
    );
    std::fs::write(&files.cert, &first.0).unwrap();
    std::fs::write(&files.key, &first.1).unwrap();
    let config = RustlsConfig::from_config(Arc::new(files.server_config().unwrap()));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = axum_server::from_tcp(listener)
        .unwrap()
        .acceptor(RustlsAcceptor::new(config.clone()));
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
    tokio::spawn(async move { server.serve(app.into_make_service()).await.unwrap() });
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(agent_secrets::webhook::tls::watch_tls_files(
        config,
        files.clone(),
        std::time::Duration::from_millis(50),
        None,
        stop.clone().cancelled_owned(),
    ));
    let cas = [first_ca.pem(), renewed_ca.pem()];
    let cas: Vec<&str> = cas.iter().map(String::as_str).collect();
    let first_der = CertificateDer::from_pem_slice(first.0.as_bytes()).unwrap();
    assert_eq!(served_certificate(addr, &cas).await, first_der.to_vec());

    // A half-written renewal (new certificate, old key) is not served; the old one stays.
    std::fs::write(&files.cert, &renewed.0).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(served_certificate(addr, &cas).await, first_der.to_vec());

    std::fs::write(&files.key, &renewed.1).unwrap();
    let renewed_der = CertificateDer::from_pem_slice(renewed.0.as_bytes()).unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if served_certificate(addr, &cas).await == renewed_der.to_vec() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewed certificate is not served after 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    stop.cancel();
}
