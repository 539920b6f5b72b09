//! The real webhook server over HTTPS (rcgen certificates), an in-memory AgentSecret cache,
//! and a recorder standing in for the API server's Secret creation.

use agent_secrets::api::AgentSecret;
use agent_secrets::cache::{CachedSecret, PodSecretIndex, SecretIndex};
use agent_secrets::crypto::{Keyring, KeyringHandle};
use agent_secrets::telemetry::Metrics;
use agent_secrets::webhook::Policy;
use agent_secrets::webhook::server::{
    self, AppState, Created, Limits, SecretWriter, WriteError, same_pod_secret,
};
use axum_server::tls_rustls::RustlsConfig;
use bytes::Bytes;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use super::client::{HttpsClient, trusting};
use super::fixtures::{fixture_policy, standard_secrets, to_body};

pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub struct Cert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

/// A self-signed server certificate for `localhost`.
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
            // checks the Secret found is the same one.
            if let Some(existing) = created
                .iter()
                .find(|s| s.metadata.name == secret.metadata.name)
            {
                return if same_pod_secret(&existing.metadata, &secret.metadata) {
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

/// What a [`TestServer`] serves with. The default: the fixtures' policy, the standard
/// secrets under a fresh keyring, a self-signed certificate and the default limits.
pub struct Setup {
    pub policy: Policy,
    pub keyring: Keyring,
    /// The cache's content; `None`: the standard secrets sealed under `keyring`.
    pub secrets: Option<Vec<AgentSecret>>,
    /// The TLS configuration and the certificate a client trusts; `None`: self-signed.
    pub tls: Option<(RustlsConfig, Vec<u8>)>,
    pub limits: Limits,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            policy: fixture_policy(),
            keyring: Keyring::generate("test-kek").unwrap(),
            secrets: None,
            tls: None,
            limits: Limits::default(),
        }
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    /// The certificate clients trust.
    pub ca_der: Vec<u8>,
    pub writer: Arc<RecordingWriter>,
    /// The handlers' state: keyring handle, cache, metrics.
    pub state: AppState,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub async fn start(setup: Setup) -> Self {
        install_crypto_provider();
        let Setup {
            policy,
            keyring,
            secrets,
            tls,
            limits,
        } = setup;
        let secrets = secrets.unwrap_or_else(|| standard_secrets(&keyring));
        let (tls, ca_der) = match tls {
            Some(tls) => tls,
            None => {
                let cert = self_signed();
                let tls =
                    RustlsConfig::from_pem(cert.cert_pem.into_bytes(), cert.key_pem.into_bytes())
                        .await
                        .unwrap();
                (tls, cert.der)
            }
        };
        let index = Arc::new(SecretIndex::default());
        index.replace_all(secrets.iter().filter_map(CachedSecret::from_object));
        let writer = Arc::new(RecordingWriter::default());
        let state = AppState {
            keyring: KeyringHandle::new(keyring),
            index,
            policy: Arc::new(policy),
            writer: writer.clone(),
            metrics: Arc::new(Metrics::default()),
            pod_secrets: Arc::new(PodSecretIndex::default()),
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let router = server::webhook_router_with(state.clone(), &limits);
        let shutdown = stop.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            server::serve_webhook_with(listener, tls, router, &limits, shutdown).await
        });
        Self {
            addr,
            ca_der,
            writer,
            state,
            stop,
            task,
        }
    }

    /// A new connection trusting the server's certificate.
    pub async fn client(&self) -> HttpsClient {
        HttpsClient::connect(self.addr, trusting(&self.ca_der))
            .await
            .unwrap()
    }

    /// POST `body` on a fresh connection.
    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> (u16, Value) {
        let mut client = self.client().await;
        client.post(path, body).await
    }

    /// The answer to `review`, which must come with HTTP 200.
    pub async fn review(&self, path: &str, review: &Value) -> Value {
        let (status, body) = self.post(path, to_body(review)).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The pod-scoped Secrets created so far.
    pub fn created(&self) -> Vec<Secret> {
        self.writer.created.lock().unwrap().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}
