//! Builders shared by unit tests, integration tests and benchmarks, in the style of
//! controller-rs' `Document::test()`: one place that knows how a realistic object is made.
//! Compiled for unit tests and with the `testing` feature (the integration tests and benches
//! enable it through the package's dev-dependency on itself); never in the product.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use http::{Method, Request, Response};
use http_body_util::BodyExt as _;
use kube::api::ObjectMeta;
use kube::client::Body;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{AgentSecret, AgentSecretSpec, SealedValue};
use crate::cache::{CachedSecret, SecretIndex};
use crate::controller::{Context, Settings};
use crate::crypto::{Keyring, KeyringHandle, SealContext};
use crate::telemetry::Metrics;
use crate::webhook::server::{Created, SecretWriter, WriteError};

/// A fixed seal time (2027-01-15T08:00:00Z), so sealed values and statuses are reproducible.
pub const SEALED_AT: i64 = 1_800_000_000;

/// A keyring with one freshly generated primary key `id`.
pub fn keyring(id: &str) -> Keyring {
    Keyring::generate(id).expect("a keyring is generated")
}

/// `value` sealed for `owner`'s `env_name` in `namespace`, in its stored form.
pub fn sealed(
    keyring: &Keyring,
    namespace: &str,
    owner: &str,
    env_name: &str,
    value: &str,
) -> SealedValue {
    let ctx = SealContext::new(namespace, owner, env_name);
    SealedValue::encode(
        &keyring
            .seal(value.as_bytes(), ctx, SEALED_AT)
            .expect("sealed"),
    )
}

/// A stored AgentSecret: `namespace/name` of `owner`, `env_name` holding `value` sealed under
/// `keyring`'s primary key, generation 1.
pub fn agent_secret(
    namespace: &str,
    name: &str,
    owner: &str,
    env_name: &str,
    keyring: &Keyring,
    value: &str,
) -> AgentSecret {
    AgentSecret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            generation: Some(1),
            ..ObjectMeta::default()
        },
        spec: AgentSecretSpec {
            owner: owner.into(),
            env_name: env_name.into(),
            description: None,
            value: None,
            sealed: Some(sealed(keyring, namespace, owner, env_name, value)),
            ..Default::default()
        },
        status: None,
    }
}

/// [`agent_secret`] for secretless sandboxes: allowed for `hosts`, its value sealed with
/// those constraints.
pub fn secretless_agent_secret(
    namespace: &str,
    name: &str,
    owner: &str,
    env_name: &str,
    keyring: &Keyring,
    value: &str,
    hosts: &[&str],
) -> AgentSecret {
    let mut object = agent_secret(namespace, name, owner, env_name, keyring, value);
    object.spec.allowed_hosts = Some(hosts.iter().map(|h| (*h).to_owned()).collect());
    let constraints = object.spec.constraints();
    let ctx = object.spec.seal_context(namespace, &constraints);
    let sealed = keyring
        .seal(value.as_bytes(), ctx, SEALED_AT)
        .expect("sealed");
    object.spec.sealed = Some(SealedValue::encode(&sealed));
    object
}

// ---------------------------------------------------------------------------------------
// Controller context over a mocked API server (tower-test), and its verifier

/// The test's side of a mocked API server: each request the client makes arrives here.
pub type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// A Kubernetes client whose every request goes to the returned handle.
pub fn mock_client() -> (kube::Client, ApiServerHandle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), handle)
}

/// A controller context over a mocked API server with `keyring` loaded: events recorded as
/// instance `test`, re-wraps limited to 1000 per second (no test waits for a slot unless it
/// asks for a lower rate with [`context_with`]).
pub fn context(keyring: Keyring) -> (Arc<Context>, ApiServerHandle) {
    context_with(
        keyring,
        Settings {
            rewrap_per_second: 1000,
            ..test_settings()
        },
    )
}

/// The settings of [`context`], to adjust.
pub fn test_settings() -> Settings {
    Settings {
        reporter_instance: Some("test".into()),
        ..Settings::default()
    }
}

/// A controller context over a mocked API server with `keyring` loaded and `settings`.
pub fn context_with(keyring: Keyring, settings: Settings) -> (Arc<Context>, ApiServerHandle) {
    let (client, handle) = mock_client();
    let ctx = Context::new(
        client,
        KeyringHandle::new(keyring),
        Arc::new(SecretIndex::default()),
        Arc::new(Metrics::default()),
        settings,
    );
    (Arc::new(ctx), handle)
}

/// One expected request: method, path (with query), and a check of its JSON body; the
/// answer is `reply` with HTTP `status`.
pub struct Expect {
    pub method: Method,
    pub path_and_query: String,
    pub check: Box<dyn FnOnce(&Value) + Send>,
    pub reply: Value,
    pub status: u16,
}

impl Expect {
    /// The same expectation answered with HTTP `status` (an error status, typically).
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }
}

/// Expect `method path_and_query`, check its body with `check`, answer `reply` (200).
pub fn expect(
    method: Method,
    path_and_query: &str,
    reply: Value,
    check: impl FnOnce(&Value) + Send + 'static,
) -> Expect {
    Expect {
        method,
        path_and_query: path_and_query.into(),
        check: Box::new(check),
        reply,
        status: 200,
    }
}

/// Serve `expected` in order, each within 1 s, then assert no further request arrives within
/// 200 ms.
pub async fn verify(handle: ApiServerHandle, expected: Vec<Expect>) {
    verify_within(handle, expected, Duration::from_secs(1)).await;
}

/// [`verify`], waiting up to `wait` for each request (for requests made on a timer).
pub async fn verify_within(mut handle: ApiServerHandle, expected: Vec<Expect>, wait: Duration) {
    for expect in expected {
        let (request, send) = tokio::time::timeout(wait, handle.next_request())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out waiting for {} {}",
                    expect.method, expect.path_and_query
                )
            })
            .expect("service not called");
        assert_eq!(request.method(), expect.method);
        assert_eq!(
            request.uri().path_and_query().unwrap().as_str(),
            expect.path_and_query
        );
        let bytes = request.into_body().collect().await.unwrap().to_bytes();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (expect.check)(&body);
        send.send_response(
            Response::builder()
                .status(expect.status)
                .body(Body::from(serde_json::to_vec(&expect.reply).unwrap()))
                .unwrap(),
        );
    }
    let extra = tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await;
    if let Ok(Some((request, _))) = extra {
        panic!("unexpected request {} {}", request.method(), request.uri());
    }
}

/// `owners` × `per_owner` AgentSecrets in `namespace` sealed under `keyring`'s primary:
/// owners `user-0`…, env names `SECRET_0`…. For benchmarks and load tests, and the benchmark mode of `run` (`bench` feature).
pub fn synthetic(
    keyring: &crate::crypto::Keyring,
    namespace: &str,
    owners: usize,
    per_owner: usize,
) -> Result<Vec<CachedSecret>, crate::crypto::CryptoError> {
    let mut secrets = Vec::with_capacity(owners.saturating_mul(per_owner));
    for o in 0..owners {
        let owner = format!("user-{o}");
        for s in 0..per_owner {
            let value = format!("synthetic-value-{o}-{s}");
            let env_name = format!("SECRET_{s}");
            let ctx = crate::crypto::SealContext::new(namespace, &owner, &env_name);
            let sealed = keyring.seal(value.as_bytes(), ctx, crate::api::now_seconds())?;
            secrets.push(CachedSecret {
                namespace: namespace.to_owned(),
                name: format!("{owner}-secret-{s}"),
                owner: owner.clone(),
                env_name,
                sealed: Some(Ok(sealed)),
                allowed_hosts: Vec::new(),
                inject_as: Vec::new(),
                allow_plain_http: false,
                constraints: String::new(),
                revision: Default::default(),
            });
        }
    }
    Ok(secrets)
}

/// Creates nothing: the benchmark mode of `run` (`bench` feature), where no cluster exists.
#[derive(Debug, Clone, Copy)]
pub struct DiscardingWriter;

impl SecretWriter for DiscardingWriter {
    fn create(
        &self,
        secret: k8s_openapi::api::core::v1::Secret,
    ) -> futures::future::BoxFuture<'_, Result<Created, WriteError>> {
        drop(secret);
        Box::pin(std::future::ready(Ok(Created::New)))
    }
}
