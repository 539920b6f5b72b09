//! Test harness: the real webhook server over HTTPS (rcgen certificates), an in-memory
//! AgentSecret cache, and a recorder standing in for the API server's Secret creation.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use agent_secrets::api::AgentSecret;
use agent_secrets::cache::{CachedSecret, PodSecretIndex, SecretIndex};
use agent_secrets::crypto::{Keyring, KeyringHandle};
use agent_secrets::telemetry::Metrics;
use agent_secrets::webhook::Policy;
use agent_secrets::webhook::server::{self, AppState, Created, SecretWriter, WriteError};
use axum_server::tls_rustls::RustlsConfig;
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Secret;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub const NAMESPACE: &str = "sandboxes";

/// Plaintexts the harness puts in the cache. Each is unique, so a leak is easy to spot.
pub const ALICE_X: &str = "canary-alice-x-bearer-9f2c";
pub const ALICE_NOTION: &str = "canary-alice-notion-41ab";
pub const ALICE_OPENAI: &str = "canary-alice-openai-77de";
pub const BOB_X: &str = "canary-bob-x-bearer-c3d0";
pub const BOB_PG: &str = "canary-bob-postgres-5e61";
pub const ALICE_OTHER_NS: &str = "canary-alice-other-namespace-0a9b";

pub fn all_canaries() -> [&'static str; 6] {
    [
        ALICE_X,
        ALICE_NOTION,
        ALICE_OPENAI,
        BOB_X,
        BOB_PG,
        ALICE_OTHER_NS,
    ]
}

pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A fixture recorded from a real API server: `(path, review)`.
pub fn fixture(name: &str) -> (String, Value) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/admission")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let value: Value = serde_json::from_str(&text).unwrap();
    let url = value["path"].as_str().unwrap();
    // The API server appends ?timeout=…; the route is the path.
    let route = url.split('?').next().unwrap().to_owned();
    (route, value["review"].clone())
}

pub use agent_secrets::testing::agent_secret;

/// The policy the recorded fixtures run under: they were recorded as the cluster's admin
/// (group `system:masters`), made a secret administrator here so that owner binding lets the
/// admin write alice's and bob's secrets; owner binding has tests of its own.
pub fn fixture_policy() -> Policy {
    let mut policy = Policy::default();
    policy.owner_binding.administrators = vec![agent_secrets::webhook::Principal::Group(
        "system:masters".into(),
    )];
    policy
}

/// The cache the fixtures run against: alice and bob in `sandboxes`, alice in `other`.
pub fn standard_secrets(keyring: &Keyring) -> Vec<AgentSecret> {
    vec![
        agent_secret(
            NAMESPACE,
            "x-bearer-token",
            "alice",
            "X_BEARER_TOKEN",
            keyring,
            ALICE_X,
        ),
        agent_secret(
            NAMESPACE,
            "notion-api-key",
            "alice",
            "NOTION_API_KEY",
            keyring,
            ALICE_NOTION,
        ),
        agent_secret(
            NAMESPACE,
            "openai-api-key",
            "alice",
            "OPENAI_API_KEY",
            keyring,
            ALICE_OPENAI,
        ),
        agent_secret(
            NAMESPACE,
            "bob-x-bearer-token",
            "bob",
            "X_BEARER_TOKEN",
            keyring,
            BOB_X,
        ),
        agent_secret(
            NAMESPACE,
            "postgres-password",
            "bob",
            "POSTGRES_PASSWORD",
            keyring,
            BOB_PG,
        ),
        agent_secret(
            "other",
            "x-bearer-token",
            "alice",
            "X_BEARER_TOKEN",
            keyring,
            ALICE_OTHER_NS,
        ),
    ]
}

/// Records created Secrets instead of calling an API server; can be told to fail, or to take
/// its time (as an API server round trip does).
#[derive(Default)]
pub struct RecordingWriter {
    pub created: Mutex<Vec<Secret>>,
    pub fail_with: Mutex<Option<String>>,
    /// How long each `create` waits before recording.
    pub delay: Mutex<Option<Duration>>,
    /// Notified when a `create` starts, i.e. while a pod review is in flight.
    pub entered: tokio::sync::Notify,
}

impl SecretWriter for RecordingWriter {
    fn create(&self, secret: Secret) -> BoxFuture<'_, Result<Created, WriteError>> {
        Box::pin(async move {
            self.entered.notify_one();
            let delay = *self.delay.lock().unwrap();
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            if let Some(message) = self.fail_with.lock().unwrap().clone() {
                return Err(WriteError::Refused(message));
            }
            let mut created = self.created.lock().unwrap();
            // As the API server: a second create of a name answers 409, and the writer then
            // finds the Secret the same admission made.
            if let Some(existing) = created
                .iter()
                .find(|s| s.metadata.name == secret.metadata.name)
            {
                let uid = |s: &Secret| {
                    s.metadata
                        .annotations
                        .as_ref()?
                        .get(agent_secrets::api::REQUEST_UID_ANNOTATION)
                        .cloned()
                };
                return if uid(existing) == uid(&secret) {
                    Ok(Created::Existing)
                } else {
                    Err(WriteError::NameTaken)
                };
            }
            created.push(secret);
            Ok(Created::New)
        })
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub ca_der: Vec<u8>,
    pub keyring: Arc<Keyring>,
    pub keyring_handle: KeyringHandle,
    pub index: Arc<SecretIndex>,
    pub writer: Arc<RecordingWriter>,
    pub metrics: Arc<Metrics>,
    /// The handlers' state, e.g. for the admin router.
    pub state: AppState,
    pub tls: RustlsConfig,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

pub struct Cert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

pub fn self_signed() -> Cert {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    Cert {
        cert_pem: certified.cert.pem(),
        key_pem: certified.signing_key.serialize_pem(),
        der: certified.cert.der().to_vec(),
    }
}

impl TestServer {
    pub async fn start(policy: Policy) -> Self {
        let keyring = Keyring::generate("test-kek").unwrap();
        let secrets = standard_secrets(&keyring);
        Self::start_with(policy, keyring, secrets).await
    }

    pub async fn start_with(policy: Policy, keyring: Keyring, secrets: Vec<AgentSecret>) -> Self {
        install_crypto_provider();
        let cert = self_signed();
        let tls = RustlsConfig::from_pem(cert.cert_pem.into_bytes(), cert.key_pem.into_bytes())
            .await
            .unwrap();
        Self::start_with_tls(policy, keyring, secrets, tls, cert.der).await
    }

    /// Serve with the given TLS configuration; `ca_der` is what [`Self::client`] trusts.
    pub async fn start_with_tls(
        policy: Policy,
        keyring: Keyring,
        secrets: Vec<AgentSecret>,
        tls: RustlsConfig,
        ca_der: Vec<u8>,
    ) -> Self {
        install_crypto_provider();
        let index = Arc::new(SecretIndex::default());
        index.replace_all(secrets.iter().filter_map(CachedSecret::from_object));
        let keyring_handle = KeyringHandle::new(keyring);
        let keyring = keyring_handle.current().unwrap();
        let writer = Arc::new(RecordingWriter::default());
        let metrics = Arc::new(Metrics::default());
        let state = AppState {
            keyring: keyring_handle.clone(),
            index: index.clone(),
            policy: Arc::new(policy),
            writer: writer.clone(),
            metrics: metrics.clone(),
            pod_secrets: Arc::new(PodSecretIndex::default()),
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(server::serve_webhook(
            listener,
            tls.clone(),
            server::webhook_router(state.clone()),
            stop.clone().cancelled_owned(),
        ));
        Self {
            addr,
            ca_der,
            keyring,
            keyring_handle,
            index,
            writer,
            metrics,
            state,
            tls,
            stop,
            task,
        }
    }

    pub async fn client(&self) -> HttpsClient {
        HttpsClient::connect(self.addr, &self.ca_der).await.unwrap()
    }

    /// POST `body` on a fresh connection.
    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> (u16, Value) {
        let mut client = self.client().await;
        client.post(path, body).await
    }

    pub async fn review(&self, path: &str, review: &Value) -> Value {
        let (status, body) = self.post(path, serde_json::to_vec(review).unwrap()).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    pub fn created(&self) -> Vec<Secret> {
        self.writer.created.lock().unwrap().clone()
    }

    /// GET `path` from the admin router (probes, metrics): `(status, content type, body)`.
    pub async fn admin_get(&self, path: &str) -> (u16, String, String) {
        admin_get(&self.state, path).await
    }
}

/// GET `path` from the admin router over `state`: `(status, content type, body)`.
pub async fn admin_get(state: &AppState, path: &str) -> (u16, String, String) {
    use tower::ServiceExt as _;
    let request = hyper::Request::get(path)
        .body(axum::body::Body::empty())
        .unwrap();
    let response = server::admin_router(state.clone())
        .oneshot(request)
        .await
        .unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        content_type,
        String::from_utf8(bytes.to_vec()).unwrap(),
    )
}

pub struct HttpsClient {
    sender: SendRequest<Full<Bytes>>,
}

impl HttpsClient {
    pub async fn connect(addr: SocketAddr, ca_der: &[u8]) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))
            .map_err(|e| e.to_string())?;
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(Self { sender })
    }

    pub async fn post(&mut self, path: &str, body: impl Into<Bytes>) -> (u16, Value) {
        self.try_post(path, body).await.unwrap()
    }

    /// POST `body`; an error when the connection fails. The answer is JSON, or the body as a
    /// JSON string when it is not JSON.
    pub async fn try_post(
        &mut self,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Result<(u16, Value), String> {
        let request = hyper::Request::post(path)
            .header("content-type", "application/json")
            .header("host", "localhost")
            .body(Full::new(body.into()))
            .unwrap();
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, value))
    }
}

/// The response part of a review answer.
pub fn response(answer: &Value) -> &Value {
    &answer["response"]
}

/// Apply the answer's JSON patch (if any) to `object`.
pub fn patched(object: &Value, answer: &Value) -> Value {
    let mut object = object.clone();
    if let Some(patch) = answer["response"].get("patch") {
        // The API server's Go types decode `patch` ([]byte) from a base64 string.
        let patch = patch.as_str().expect("patch is a base64 string");
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        json_patch::patch(&mut object, &patch).unwrap();
    }
    object
}

/// The decoded JSON patch of an answer, or `None`.
pub fn patch_text(answer: &Value) -> Option<String> {
    use base64::Engine as _;
    answer["response"]["patch"].as_str().map(|p| {
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(p).unwrap()).unwrap()
    })
}
