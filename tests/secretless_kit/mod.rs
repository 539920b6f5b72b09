//! Test kit for the secretless proxy: real HTTPS upstream servers on loopback (hyper + rustls,
//! certificates from their own rcgen CA) that record what they receive, the proxy itself
//! in-process, and a sandbox-side client speaking CONNECT + TLS + HTTP/1.1 or HTTP/2.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use agent_secrets::secretless::{
    CertAuthority, EgressMode, Entry, HostPattern, Placement, Proxy, ProxyMetrics, Snapshot,
    StaticSource, UpstreamOptions,
};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Host names the tests use; the proxy resolves them all to 127.0.0.1.
pub const ALLOWED: &str = "api.allowed.test";
pub const WILD_SUB: &str = "eu.wild.test";
pub const WILD_APEX: &str = "wild.test";
pub const EVIL: &str = "evil.test";
pub const ALL_HOSTS: [&str; 4] = [ALLOWED, WILD_SUB, WILD_APEX, EVIL];

/// Secrets of the standard snapshot. Values are canaries: unique and easy to spot.
pub const BEARER_ENV: &str = "X_BEARER_TOKEN";
pub const BEARER_PH: &str = "asec_ph_bearer0123456789abcdef";
pub const BEARER_VALUE: &str = "canary-bearer-value-7f3a9c";
pub const KEY_ENV: &str = "WILD_API_KEY";
pub const KEY_PH: &str = "asec_ph_wildkey0123456789abcd";
pub const KEY_VALUE: &str = "canary-wild-key-2b8e41";
pub const DB_ENV: &str = "DB_PASSWORD";
pub const DB_PH: &str = "asec_ph_dbpass0123456789abcde";
pub const DB_VALUE: &str = "canary-db-password-5c17";

pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn entry(
    env: &str,
    placeholder: &str,
    value: &str,
    hosts: &[&str],
    inject_as: &[&str],
) -> Entry {
    Entry {
        env_name: env.into(),
        placeholder: placeholder.into(),
        value: value.to_owned().into(),
        allowed_hosts: hosts
            .iter()
            .map(|h| HostPattern::parse(h).unwrap())
            .collect(),
        inject_as: inject_as
            .iter()
            .map(|p| Placement::parse(p).unwrap())
            .collect(),
        allow_plain_http: false,
    }
}

/// The bearer token for api.allowed.test (any header), a key for *.wild.test (X-Api-Key or
/// query `key` only), a database password for api.allowed.test (basic auth password only).
pub fn standard_entries() -> Vec<Entry> {
    vec![
        entry(BEARER_ENV, BEARER_PH, BEARER_VALUE, &[ALLOWED], &[]),
        entry(
            KEY_ENV,
            KEY_PH,
            KEY_VALUE,
            &["*.wild.test"],
            &["header:X-Api-Key", "query:key"],
        ),
        entry(
            DB_ENV,
            DB_PH,
            DB_VALUE,
            &[ALLOWED],
            &["basic-auth-password"],
        ),
    ]
}

pub fn standard_snapshot() -> Snapshot {
    Snapshot::new(standard_entries(), EgressMode::Open).unwrap()
}

/// The upstream servers' own CA and a certificate for every test host.
#[derive(Clone)]
pub struct UpstreamPki {
    pub ca_der: CertificateDer<'static>,
    pub ca_pem: String,
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key_der: Vec<u8>,
}

impl UpstreamPki {
    pub fn new() -> Self {
        install_crypto_provider();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "upstream test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut names: Vec<String> = ALL_HOSTS.iter().map(|h| (*h).to_owned()).collect();
        names.push("127.0.0.1".into());
        let params = CertificateParams::new(names).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        Self {
            ca_der: ca_cert.der().clone(),
            ca_pem: ca_cert.pem(),
            cert_chain: vec![cert.der().clone()],
            key_der: key.serialize_der(),
        }
    }

    fn server_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                self.cert_chain.clone(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone())),
            )
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// One request as an upstream received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub version: http::Version,
    pub method: http::Method,
    pub uri: http::Uri,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Everything received, as text, to search for leaks.
    pub fn all_text(&self) -> String {
        format!(
            "{} {} {:?} {}",
            self.method,
            self.uri,
            self.headers,
            String::from_utf8_lossy(&self.body)
        )
    }
}

/// A real HTTPS server on 127.0.0.1 that records every request.
///
/// Routes: `/echo` answers with the received `Authorization` header in a response header
/// and, split into 3-byte frames, in the body; `/upload` reports each body chunk as it
/// arrives (see [`Upstream::chunks`]); `/bytes?n=N` answers N bytes; `/ws` accepts a WebSocket handshake and then echoes
/// raw bytes; anything else answers `ok`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    pub connections: Arc<AtomicUsize>,
    /// Upload chunks as they arrive, for the streaming test.
    pub chunks: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
    stop: CancellationToken,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type UpBody = BoxBody<Bytes, hyper::Error>;

fn full(text: impl Into<Bytes>) -> UpBody {
    Full::new(text.into()).map_err(|n| match n {}).boxed()
}

impl Upstream {
    /// `http2`: offer h2 over ALPN (and http/1.1); otherwise http/1.1 only.
    pub async fn start(pki: &UpstreamPki, http2: bool) -> Self {
        let alpn: &[&[u8]] = if http2 {
            &[b"h2", b"http/1.1"]
        } else {
            &[b"http/1.1"]
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(alpn));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (chunk_tx, chunks) = tokio::sync::mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let (reqs, conns, stop2) = (requests.clone(), connections.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    () = stop2.cancelled() => return,
                    a = listener.accept() => a.unwrap(),
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let reqs = reqs.clone();
                let chunk_tx = chunk_tx.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req| {
                        let reqs = reqs.clone();
                        let chunk_tx = chunk_tx.clone();
                        async move { Ok::<_, hyper::Error>(handle(req, reqs, chunk_tx).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            requests,
            connections,
            chunks,
            stop,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    pub fn last(&self) -> Recorded {
        self.recorded()
            .last()
            .cloned()
            .expect("upstream received no request")
    }
}

async fn handle(
    mut req: Request<Incoming>,
    reqs: Arc<Mutex<Vec<Recorded>>>,
    chunk_tx: tokio::sync::mpsc::UnboundedSender<Bytes>,
) -> Response<UpBody> {
    let path = req.uri().path().to_owned();
    let mut record = Recorded {
        version: req.version(),
        method: req.method().clone(),
        uri: req.uri().clone(),
        headers: req.headers().clone(),
        body: Bytes::new(),
    };
    if path == "/ws" {
        let key = req
            .headers()
            .get("sec-websocket-key")
            .map(|k| k.as_bytes().to_vec())
            .unwrap_or_default();
        reqs.lock().unwrap().push(record);
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut input = key;
        input.extend_from_slice(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
        use base64::Engine as _;
        let accept = base64::engine::general_purpose::STANDARD.encode(digest.as_ref());
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .body(full(""))
            .unwrap();
    }
    if path == "/upload" {
        let mut body = req.into_body();
        let mut all = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Ok(data) = frame.into_data() {
                let _ = chunk_tx.send(data.clone());
                all.extend_from_slice(&data);
            }
        }
        record.body = Bytes::from(all);
        let n = record.body.len();
        reqs.lock().unwrap().push(record);
        return Response::new(full(format!("received {n} bytes")));
    }
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    record.body = body.unwrap_or_default();
    let auth = record.header("authorization").unwrap_or("").to_owned();
    let api_key = record.header("x-api-key").unwrap_or("").to_owned();
    let query = record.uri.query().unwrap_or("").to_owned();
    reqs.lock().unwrap().push(record);
    if path == "/echo" {
        let text = format!("authorization={auth};x-api-key={api_key};query={query};end");
        let frames: Vec<Result<Frame<Bytes>, hyper::Error>> = text
            .as_bytes()
            .chunks(3)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        return Response::builder()
            .header("x-echo-authorization", auth)
            .header("content-length", text.len())
            .body(StreamBody::new(futures::stream::iter(frames)).boxed())
            .unwrap();
    }
    if path == "/bytes" {
        let n: usize = query
            .strip_prefix("n=")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        return Response::new(full(vec![b'x'; n]));
    }
    Response::new(full("ok"))
}

/// The proxy running in-process on 127.0.0.1.
pub struct RunningProxy {
    pub addr: SocketAddr,
    pub source: Arc<StaticSource>,
    pub ca: Arc<CertAuthority>,
    pub metrics: Arc<ProxyMetrics>,
    pub bundle: tempfile::NamedTempFile,
    stop: CancellationToken,
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub fn resolve_all_to_loopback() -> HashMap<String, IpAddr> {
    ALL_HOSTS
        .iter()
        .map(|h| ((*h).to_owned(), IpAddr::from([127, 0, 0, 1])))
        .collect()
}

impl RunningProxy {
    pub async fn start(pki: &UpstreamPki, snapshot: Snapshot) -> Self {
        install_crypto_provider();
        let source = Arc::new(StaticSource::new(snapshot));
        let ca = Arc::new(CertAuthority::generate().unwrap());
        let bundle = tempfile::NamedTempFile::new().unwrap();
        ca.write_bundle(bundle.path()).unwrap();
        let metrics = Arc::new(ProxyMetrics::default());
        let proxy = Arc::new(
            Proxy::new(
                source.as_ref(),
                ca.clone(),
                UpstreamOptions {
                    roots: Some(vec![pki.ca_der.clone()]),
                    resolve: resolve_all_to_loopback(),
                },
                metrics.clone(),
            )
            .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(proxy.serve(listener, stop.clone()));
        Self {
            addr,
            source,
            ca,
            metrics,
            bundle,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A sandbox-side HTTPS client to `host:port` through this proxy.
    pub async fn tunnel(&self, host: &str, port: u16, http2: bool) -> SandboxClient {
        SandboxClient::connect(self.addr, &self.ca, host, port, http2).await
    }
}

/// Opens a CONNECT tunnel; returns the raw stream after a 200, or the proxy's answer.
pub async fn open_tunnel(proxy: SocketAddr, host: &str, port: u16) -> Result<TcpStream, String> {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(
        format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    if text.starts_with("HTTP/1.1 200") {
        Ok(tcp)
    } else {
        // Read the rest of the refusal (its body) too.
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_millis(300), tcp.read_to_end(&mut rest)).await;
        Err(format!("{text}{}", String::from_utf8_lossy(&rest)))
    }
}

/// TLS to the proxy's leaf for `host`, trusting only the per-pod CA.
pub async fn tls_through(
    tcp: TcpStream,
    ca: &CertAuthority,
    host: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(host.to_owned()).unwrap(), tcp)
        .await
        .unwrap()
}

pub type ClientBody = BoxBody<Bytes, std::convert::Infallible>;

pub fn body(bytes: impl Into<Bytes>) -> ClientBody {
    Full::new(bytes.into()).boxed()
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<ClientBody>),
    H2(hyper::client::conn::http2::SendRequest<ClientBody>),
}

/// A client inside the sandbox: CONNECT, TLS with the per-pod CA, then HTTP/1.1 or HTTP/2.
pub struct SandboxClient {
    sender: Sender,
    pub host: String,
    pub port: u16,
}

/// A response as the sandbox saw it.
#[derive(Debug)]
pub struct Seen {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl SandboxClient {
    pub async fn connect(
        proxy: SocketAddr,
        ca: &CertAuthority,
        host: &str,
        port: u16,
        http2: bool,
    ) -> Self {
        let tcp = open_tunnel(proxy, host, port).await.unwrap();
        let alpn: &[&[u8]] = if http2 { &[b"h2"] } else { &[b"http/1.1"] };
        let tls = tls_through(tcp, ca, host, alpn).await;
        let io = TokioIo::new(tls);
        let sender = if http2 {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            Sender::H2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn.with_upgrades());
            Sender::H1(sender)
        };
        Self {
            sender,
            host: host.to_owned(),
            port,
        }
    }

    /// A request builder with the right target for this tunnel.
    pub fn request(&self, path: &str) -> http::request::Builder {
        match self.sender {
            Sender::H1(_) => Request::builder()
                .uri(path)
                .header("host", format!("{}:{}", self.host, self.port)),
            Sender::H2(_) => Request::builder()
                .version(http::Version::HTTP_2)
                .uri(format!("https://{}:{}{path}", self.host, self.port)),
        }
    }

    pub async fn send_raw(&mut self, req: Request<ClientBody>) -> Response<Incoming> {
        match &mut self.sender {
            Sender::H1(s) => {
                // HTTP/1.1: the connection is ready for the next request only once the
                // previous response is fully read and the connection idle again.
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
            Sender::H2(s) => {
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
        }
    }

    pub async fn send(&mut self, req: Request<ClientBody>) -> Seen {
        let response = self.send_raw(req).await;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        Seen {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    /// GET `path` with extra headers.
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Seen {
        let mut builder = self.request(path);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        self.send(builder.body(body("")).unwrap()).await
    }
}

pub fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}
