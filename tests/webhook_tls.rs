//! TLS of the real webhook: certificate rotation without dropping open connections, and
//! mutual TLS (`--client-ca`): only clients with a certificate from the configured CA get past
//! the handshake, and the CA is reloaded with the certificate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common {
    pub mod answers;
    pub mod client;
    pub mod fixtures;
    pub mod injections;
    pub mod keyring;
    pub mod logs;
    pub mod server;
    pub mod serving;
}

use agent_secrets::webhook::tls;
use common::client::{HttpsClient, trusting};
use common::fixtures::{fixture, to_body};
use common::logs::{capture_logs, captured_logs};
use common::server::{Cert, Setup, TestServer, install_crypto_provider, self_signed};
use common::serving::assert_still_serving;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Write `text` to `path` beside and rename it, as the kubelet's atomic writer swaps a
/// mounted Secret.
fn write_atomically(path: &Path, text: &str) {
    let staging = path.with_extension("new");
    std::fs::File::create(&staging)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    std::fs::rename(&staging, path).unwrap();
}

fn write_cert(dir: &Path, cert: &Cert) -> (PathBuf, PathBuf) {
    let cert_path = dir.join("tls.crt");
    let key_path = dir.join("tls.key");
    write_atomically(&cert_path, &cert.cert_pem);
    write_atomically(&key_path, &cert.key_pem);
    (cert_path, key_path)
}

/// Serve the webhook from the files in `dir` (and the client CA file, if any), watching them
/// every 50 ms.
async fn serve_files(
    dir: &Path,
    client_ca: Option<PathBuf>,
    trusted: &[u8],
) -> (TestServer, tokio::task::JoinHandle<()>) {
    install_crypto_provider();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let config = tls::load(&cert, &key, client_ca.as_deref()).unwrap();
    let server = TestServer::start(Setup {
        tls: Some((config.clone(), trusted.to_vec())),
        ..Setup::default()
    })
    .await;
    let files = tls::TlsFiles {
        cert,
        key,
        client_ca,
        client_certificates: tls::ClientCertificates::Required,
    };
    let watcher = tokio::spawn(tls::watch_tls_files(
        config,
        files,
        Duration::from_millis(50),
        Some(std::sync::Arc::new(
            agent_secrets::telemetry::Metrics::default(),
        )),
        server.stop.clone().cancelled_owned(),
    ));
    (server, watcher)
}

/// Connect with `config` and send a genuine pod review: its HTTP status, or why the
/// connection failed (with TLS 1.3 a refused client certificate shows on the first request).
async fn pod_review_over(addr: SocketAddr, config: rustls::ClientConfig) -> Result<u16, String> {
    let (path, review) = fixture("pod_create_named.json");
    let mut client = HttpsClient::connect(addr, config).await?;
    let (status, _) = client.try_post(&path, to_body(&review)).await?;
    Ok(status)
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_dropping_open_connections() {
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let cert_a = self_signed();
    let cert_b = self_signed();
    let (cert_path, _) = write_cert(dir.path(), &cert_a);
    let (server, watcher) = serve_files(dir.path(), None, &cert_a.der).await;

    assert_still_serving(&server, "serving certificate A").await;
    let (path, review) = fixture("pod_create_named.json");
    let mut old = server.client().await;
    let (status, answer) = old.post(&path, to_body(&review)).await;
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], true);

    write_cert(dir.path(), &cert_b);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut fresh = loop {
        match HttpsClient::connect(server.addr, trusting(&cert_b.der)).await {
            Ok(client) => break client,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(error) => panic!("certificate B not served within 5 s: {error}"),
        }
    };
    let (status, answer) = fresh.post(&path, to_body(&review)).await;
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], true);

    // The connection opened under A keeps its session and answers on.
    let (status, answer) = old.post(&path, to_body(&review)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["uid"], review["request"]["uid"]);

    // New connections are served B only.
    let refused = HttpsClient::connect(server.addr, trusting(&cert_a.der)).await;
    let error = refused
        .err()
        .expect("a client trusting only A must fail now");
    assert!(error.to_lowercase().contains("certificate"), "{error}");

    // A half-written or broken file is not loaded: B stays in force.
    std::fs::write(&cert_path, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = HttpsClient::connect(server.addr, trusting(&cert_b.der))
        .await
        .unwrap();
    let (status, _) = again.post(&path, to_body(&review)).await;
    assert_eq!(status, 200);
    assert!(captured_logs().contains("TLS certificate reloaded"));

    server.stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .expect("the watcher stops with the shutdown signal")
        .unwrap();
}

// ---------------------------------------------------------------------------------------
// Mutual TLS

/// A certificate authority of its own.
fn certificate_authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A client certificate issued by `ca`, as the API server's `kubeConfigFile` would hold.
fn client_identity(
    ca: &CertifiedIssuer<'static, KeyPair>,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver-webhook-client");
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    (vec![cert.der().clone()], key)
}

fn client_with_certificate(
    server_der: &[u8],
    ca: &CertifiedIssuer<'static, KeyPair>,
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(server_der.to_vec()))
        .unwrap();
    let (chain, key) = client_identity(ca);
    rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap()
}

/// A server requiring client certificates from `ca`, with its certificate in `dir`.
async fn serve_requiring(
    dir: &Path,
    ca: &CertifiedIssuer<'static, KeyPair>,
) -> (TestServer, Cert, PathBuf) {
    install_crypto_provider();
    let cert = self_signed();
    write_cert(dir, &cert);
    let ca_path = dir.join("client-ca.crt");
    write_atomically(&ca_path, &ca.pem());
    let (server, _watcher) = serve_files(dir, Some(ca_path.clone()), &cert.der).await;
    (server, cert, ca_path)
}

#[tokio::test]
async fn with_a_client_ca_a_client_certificate_it_issued_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let ca = certificate_authority("API server client CA");
    let (server, cert, _) = serve_requiring(dir.path(), &ca).await;
    let status = pod_review_over(server.addr, client_with_certificate(&cert.der, &ca)).await;
    assert_eq!(status, Ok(200));
}

/// Serve requiring certificates from a client CA, and send a review with the client
/// configuration `client` makes (given the server certificate and someone else's CA): it must
/// fail before reaching a handler.
async fn assert_refused(
    client: impl FnOnce(&[u8], &CertifiedIssuer<'static, KeyPair>) -> rustls::ClientConfig,
) {
    let dir = tempfile::tempdir().unwrap();
    let ca = certificate_authority("API server client CA");
    let other = certificate_authority("someone else's CA");
    let (server, cert, _) = serve_requiring(dir.path(), &ca).await;
    let refused = pod_review_over(server.addr, client(&cert.der, &other)).await;
    let error = refused.expect_err("the client must not be served");
    assert!(server.created().is_empty(), "{error}");
    let metrics = server.state.metrics.encode();
    assert!(
        !metrics.contains("agentsecrets_admission_requests_total{"),
        "{error}: {metrics}"
    );
}

#[tokio::test]
async fn with_a_client_ca_a_client_without_a_certificate_is_refused() {
    assert_refused(|server_der, _| trusting(server_der)).await;
}

#[tokio::test]
async fn with_a_client_ca_a_certificate_from_another_ca_is_refused() {
    assert_refused(client_with_certificate).await;
}

#[tokio::test]
async fn a_replaced_client_ca_is_reloaded_with_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = certificate_authority("old client CA");
    let new_ca = certificate_authority("new client CA");
    let (server, cert, ca_path) = serve_requiring(dir.path(), &old_ca).await;
    write_atomically(&ca_path, &new_ca.pem());
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(error) =
        pod_review_over(server.addr, client_with_certificate(&cert.der, &new_ca)).await
    {
        assert!(
            Instant::now() < deadline,
            "{error}: the new client CA is not in force within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let refused = pod_review_over(server.addr, client_with_certificate(&cert.der, &old_ca)).await;
    assert!(refused.is_err(), "the old CA's clients are refused now");
}
