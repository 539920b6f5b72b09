//! Tests against a real Kubernetes API server (v1.30 or later: the CRD's CEL rules need it).
//! Every test is ignored by default; one command runs them all (this file and the controller
//! tests in `tests/cluster/controller.rs`):
//!
//! ```sh
//! export KUBECONFIG=$HOME/.kube/config
//! # Where the API server reaches this machine; the webhook is served from this test process
//! # on 0.0.0.0 and its certificate is issued for this host (an IP address or a DNS name):
//! #   a kube-apiserver running on this machine:  127.0.0.1
//! #   kind:      docker network inspect kind -f '{{(index .IPAM.Config 0).Gateway}}'
//! #   minikube:  minikube ssh -- getent hosts host.minikube.internal | cut -d' ' -f1
//! export AGENTSECRETS_TEST_WEBHOOK_HOST=172.18.0.1
//! # Optional: a fixed port for the webhook (default: a free port), e.g. to open a firewall.
//! # export AGENTSECRETS_TEST_WEBHOOK_PORT=9443
//! cargo test --test cluster -- --ignored --test-threads=1
//! ```
//!
//! Only the webhook tests need `AGENTSECRETS_TEST_WEBHOOK_HOST`; the CRD and controller tests
//! (`cargo test --test cluster -- --ignored --test-threads=1 crd controller::`) do not.
//!
//! The credentials need to: server-side apply the AgentSecret CRD (field manager
//! `agent-secrets-tests`; it is left installed), create and delete namespaces and
//! MutatingWebhookConfigurations, list AgentSecrets and Secrets in every namespace, and work
//! with AgentSecrets (and their status), pods, Secrets, ServiceAccounts, Leases and Events in
//! those namespaces (cluster-admin on a throwaway cluster is simplest).
//!
//! Each test works in namespaces of its own (`asec-test-…`) and deletes them, and the webhook
//! configuration it registered, when it ends, also on failure. The webhook configuration is
//! limited to the test's namespaces, so the rest of the cluster is never sent to it. The
//! agent-secrets operator itself must not be installed on the cluster: its webhook would seal
//! the plaintext the CRD tests expect the CRD to refuse. The sandbox pods created here select
//! a node label nobody has, so they stay Pending and nothing is pulled or run.
//!
//! The controller tests that run the controller do so in this process as the operator does,
//! over the whole cluster: they first check that no AgentSecret or pod-scoped Secret exists
//! outside test namespaces, and fail otherwise. A pod-scoped Secret is deleted with its pod by
//! the garbage collector, so that test needs a kube-controller-manager (kind, minikube and
//! real clusters have one; a bare kube-apiserver does not).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "cluster/controller.rs"]
mod controller;

use agent_secrets::api::{AgentSecret, AgentSecretSpec, SealedValue, SecretString};
use agent_secrets::cache::SecretIndex;
use agent_secrets::crypto::{Keyring, KeyringHandle};
use agent_secrets::telemetry::Metrics;
use agent_secrets::webhook::Policy;
use agent_secrets::webhook::server::{self, AppState, KubeSecretWriter};
use axum_server::tls_rustls::RustlsConfig;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Event, Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::core::Status;
use kube::runtime::wait::{await_condition, conditions};

use kube::{Client, ResourceExt as _};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const FIELD_MANAGER: &str = "agent-secrets-tests";
const HOST_ENV: &str = "AGENTSECRETS_TEST_WEBHOOK_HOST";
const PORT_ENV: &str = "AGENTSECRETS_TEST_WEBHOOK_PORT";
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

// ---------------------------------------------------------------------------------------
// Cluster plumbing

async fn client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::try_default().await.unwrap_or_else(|e| {
        panic!("cannot reach a Kubernetes API server (set KUBECONFIG to the test cluster's kubeconfig): {e}")
    })
}

/// A name unique to this run: lowercase hex of the clock and the process id.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{:x}{:x}",
        std::process::id(),
        nanos & 0xffff_ffff_ffff
    )
}

/// Poll `attempt` until it returns `Ok`, for at most `timeout`; panic with the last error.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(error) if Instant::now() >= deadline => {
                panic!("{what}: not within {timeout:?}; last: {error}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// The username the API server sees for the test's credentials.
async fn whoami(client: &Client) -> String {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    let review: SelfSubjectReview = Api::<SelfSubjectReview>::all(client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .unwrap_or_else(|e| panic!("SelfSubjectReview (Kubernetes 1.28+) failed: {e}"));
    review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .expect("the API server names the test's user")
}

/// Server-side apply the checked-in CRD and wait until it is Established.
async fn install_crd(client: &Client) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/agentsecrets.yaml"
    ))
    .unwrap();
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).unwrap();
    let name = crd.name_any();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .unwrap_or_else(|e| panic!("failed to apply the CRD {name}: {e}"));
    tokio::time::timeout(
        Duration::from_secs(60),
        await_condition(crds, &name, conditions::is_crd_established()),
    )
    .await
    .unwrap_or_else(|_| panic!("CRD {name} not Established within 60 s"))
    .unwrap();
}

/// Something to delete when a test ends.
enum Cleanup {
    Namespace(String),
    WebhookConfiguration(String),
}

/// Deletes what a test created when it is dropped, also when the test panics. Dropping may
/// happen while the test's runtime unwinds, so it uses a thread with a runtime and a client
/// of its own.
#[derive(Default)]
struct Guard {
    cleanups: Vec<Cleanup>,
    stop: CancellationToken,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop.cancel();
        let cleanups = std::mem::take(&mut self.cleanups);
        if cleanups.is_empty() {
            return;
        }
        let joined = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let client = client().await;
                // The webhook configuration first: nothing may call a stopped webhook.
                for cleanup in cleanups.iter().rev() {
                    let (what, result) = match cleanup {
                        Cleanup::Namespace(name) => (
                            format!("namespace {name}"),
                            Api::<Namespace>::all(client.clone())
                                .delete(name, &DeleteParams::background())
                                .await
                                .map(|_| ()),
                        ),
                        Cleanup::WebhookConfiguration(name) => (
                            format!("MutatingWebhookConfiguration {name}"),
                            Api::<MutatingWebhookConfiguration>::all(client.clone())
                                .delete(name, &DeleteParams::default())
                                .await
                                .map(|_| ()),
                        ),
                    };
                    match result {
                        Ok(()) => {}
                        Err(kube::Error::Api(status)) if status.code == 404 => {}
                        Err(e) => eprintln!("cleanup: failed to delete {what}: {e}"),
                    }
                }
            });
        })
        .join();
        if joined.is_err() {
            eprintln!("cleanup: the cleanup thread panicked");
        }
    }
}

impl Guard {
    /// Create a namespace of the test's own, deleted when the guard drops.
    async fn namespace(&mut self, client: &Client) -> String {
        let name = unique("asec-test");
        let namespace: Namespace = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "agent-secrets-tests"}}
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap_or_else(|e| panic!("failed to create namespace {name}: {e}"));
        self.cleanups.push(Cleanup::Namespace(name.clone()));
        name
    }
}

/// Feed `index` from a watch on every AgentSecret, as the operator does, until `stop`.
fn spawn_agentsecret_watch(client: &Client, index: &Arc<SecretIndex>, stop: &CancellationToken) {
    tokio::spawn(agent_secrets::run::watch_agentsecrets(
        client.clone(),
        index.clone(),
        stop.clone(),
    ));
}

fn api_error<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> Box<Status> {
    match result {
        Ok(object) => panic!("expected the API server to refuse, it stored {object:?}"),
        Err(kube::Error::Api(status)) => status,
        Err(e) => panic!("expected a refusal by the API server, got {e}"),
    }
}

/// The whole stored object as the API server returns it (annotations and managedFields
/// included), as JSON text.
async fn stored_json(client: &Client, namespace: &str, name: &str) -> String {
    let resource = ApiResource::erase::<AgentSecret>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    serde_json::to_string(&api.get(name).await.unwrap()).unwrap()
}

/// Fail clearly if another agent-secrets webhook is installed: it would seal what the CRD
/// tests expect the CRD to refuse.
async fn assert_no_foreign_agentsecret_webhook(client: &Client) {
    let configurations = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    for configuration in configurations {
        let name = configuration.name_any();
        if name.starts_with("agent-secrets-test-") {
            continue;
        }
        let serves_agentsecrets = configuration.webhooks.iter().flatten().any(|webhook| {
            webhook.rules.iter().flatten().any(|rule| {
                rule.api_groups
                    .iter()
                    .flatten()
                    .any(|g| g == "agentsecrets.io" || g == "*")
            })
        });
        assert!(
            !serves_agentsecrets,
            "MutatingWebhookConfiguration {name} sends AgentSecrets to a webhook; run these tests on a cluster without agent-secrets installed"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Objects

fn fake_sealed() -> SealedValue {
    // Syntactically valid base64 fields: the CRD checks shape, the webhook checks meaning.
    // Lengths as the CRD requires: a 40-byte wrapped key, a 12-byte nonce, a tag.
    SealedValue {
        key_id: "k1".into(),
        wrapped_key: format!("{}==", "A".repeat(54)),
        nonce: "A".repeat(16),
        ciphertext: format!("{}==", "A".repeat(22)),
        sealed_at: None,
        format: Some(2),
    }
}

fn agentsecret(namespace: &str, name: &str, owner: &str, env_name: &str) -> AgentSecret {
    let mut object = AgentSecret::new(
        name,
        AgentSecretSpec {
            owner: owner.into(),
            env_name: env_name.into(),
            description: None,
            value: None,
            sealed: None,
        },
    );
    object.metadata.namespace = Some(namespace.into());
    object
}

fn with_value(mut object: AgentSecret, value: &str) -> AgentSecret {
    object.spec.value = Some(SecretString::new(value.to_owned()));
    object
}

fn with_sealed(mut object: AgentSecret) -> AgentSecret {
    object.spec.sealed = Some(fake_sealed());
    object
}

// ---------------------------------------------------------------------------------------
// The CRD alone (no webhook)

#[tokio::test]
#[ignore = "needs cluster"]
async fn crd_installs_and_is_established() {
    let client = client().await;
    install_crd(&client).await;
    let crd = Api::<CustomResourceDefinition>::all(client)
        .get("agentsecrets.agentsecrets.io")
        .await
        .unwrap();
    let managers: Vec<String> = crd
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(managers.iter().any(|m| m == FIELD_MANAGER), "{managers:?}");
    let names = &crd.spec.names;
    assert_eq!(names.short_names.as_deref(), Some(&["asec".to_owned()][..]));
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn crd_refuses_a_plaintext_value_without_the_webhook() {
    let client = client().await;
    install_crd(&client).await;
    assert_no_foreign_agentsecret_webhook(&client).await;
    let mut guard = Guard::default();
    let ns = guard.namespace(&client).await;
    let api: Api<AgentSecret> = Api::namespaced(client.clone(), &ns);
    let value = unique("cluster-canary-crd-plaintext");

    let plaintext = with_value(agentsecret(&ns, "plain", "alice", "X_BEARER_TOKEN"), &value);
    let status = api_error(api.create(&PostParams::default(), &plaintext).await);
    assert_eq!(status.code, 422, "{status:?}");
    assert!(
        status.message.contains("must never be stored in plaintext"),
        "{}",
        status.message
    );
    assert!(!status.message.contains(&value), "{}", status.message);
    // Also next to a sealed value, and by server-side apply.
    let both = with_sealed(plaintext.clone());
    let status = api_error(api.create(&PostParams::default(), &both).await);
    assert!(
        status.message.contains("must never be stored in plaintext"),
        "{}",
        status.message
    );
    let status = api_error(
        api.patch(
            "plain",
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&plaintext),
        )
        .await,
    );
    assert!(
        status.message.contains("must never be stored in plaintext"),
        "{}",
        status.message
    );
    // Neither a value nor a sealed value.
    let empty = agentsecret(&ns, "empty", "alice", "X_BEARER_TOKEN");
    let status = api_error(api.create(&PostParams::default(), &empty).await);
    assert!(
        status.message.contains("spec.value is required"),
        "{}",
        status.message
    );
    assert!(
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "nothing was stored"
    );

    // A sealed value is stored; a later update adding plaintext is refused too.
    let sealed = with_sealed(agentsecret(&ns, "sealed", "alice", "X_BEARER_TOKEN"));
    api.create(&PostParams::default(), &sealed).await.unwrap();
    let status = api_error(
        api.patch(
            "sealed",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"value": value}})),
        )
        .await,
    );
    assert!(
        status.message.contains("must never be stored in plaintext"),
        "{}",
        status.message
    );
    assert!(!stored_json(&client, &ns, "sealed").await.contains(&value));
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn crd_refuses_invalid_and_reserved_env_names() {
    let client = client().await;
    install_crd(&client).await;
    let mut guard = Guard::default();
    let ns = guard.namespace(&client).await;
    let api: Api<AgentSecret> = Api::namespaced(client.clone(), &ns);
    for (env_name, needle) in [
        ("lower", "uppercase identifier"),
        ("1ABC", "uppercase identifier"),
        ("A-B", "uppercase identifier"),
        ("PATH", "reserved"),
        ("LD_PRELOAD", "reserved"),
        ("KUBERNETES_FOO", "reserved"),
    ] {
        let object = with_sealed(agentsecret(&ns, "env", "alice", env_name));
        let status = api_error(api.create(&PostParams::default(), &object).await);
        assert_eq!(status.code, 422, "{env_name}: {status:?}");
        assert!(
            status.message.contains("spec.envName") && status.message.contains(needle),
            "{env_name}: {}",
            status.message
        );
    }
    // At the limit it is accepted; one more is refused.
    let longest = with_sealed(agentsecret(&ns, "longest", "alice", &"A".repeat(255)));
    api.create(&PostParams::default(), &longest).await.unwrap();
    let too_long = with_sealed(agentsecret(&ns, "too-long", "alice", &"A".repeat(256)));
    let status = api_error(api.create(&PostParams::default(), &too_long).await);
    assert_eq!(status.code, 422, "{status:?}");
    assert!(
        status.message.contains("spec.envName") && status.message.contains("255"),
        "{}",
        status.message
    );
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn crd_refuses_an_owner_change_and_an_overlong_description() {
    let client = client().await;
    install_crd(&client).await;
    let mut guard = Guard::default();
    let ns = guard.namespace(&client).await;
    let api: Api<AgentSecret> = Api::namespaced(client.clone(), &ns);

    let mut object = with_sealed(agentsecret(
        &ns,
        "x-bearer-token",
        "alice",
        "X_BEARER_TOKEN",
    ));
    object.spec.description = Some("d".repeat(1024));
    let stored = api.create(&PostParams::default(), &object).await.unwrap();

    // By merge patch and by replace.
    let status = api_error(
        api.patch(
            "x-bearer-token",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"owner": "bob"}})),
        )
        .await,
    );
    assert_eq!(status.code, 422, "{status:?}");
    assert!(status.message.contains("immutable"), "{}", status.message);
    let mut moved = stored.clone();
    moved.spec.owner = "bob".into();
    let status = api_error(
        api.replace("x-bearer-token", &PostParams::default(), &moved)
            .await,
    );
    assert!(status.message.contains("immutable"), "{}", status.message);
    assert_eq!(api.get("x-bearer-token").await.unwrap().spec.owner, "alice");

    let mut long = with_sealed(agentsecret(&ns, "long", "alice", "LONG_DESCRIPTION"));
    long.spec.description = Some("d".repeat(1025));
    let status = api_error(api.create(&PostParams::default(), &long).await);
    assert_eq!(status.code, 422, "{status:?}");
    assert!(
        status.message.contains("spec.description") && status.message.contains("1024"),
        "{}",
        status.message
    );
    let status = api_error(
        api.patch(
            "x-bearer-token",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"description": "d".repeat(1025)}})),
        )
        .await,
    );
    assert!(status.message.contains("1024"), "{}", status.message);
}

// ---------------------------------------------------------------------------------------
// The webhook, served from this process and registered with the API server

struct TestCa {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

/// A CA and a serving certificate for `host` (an IP address or DNS name) signed by it.
fn issue_certificate(host: &str) -> TestCa {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "agent-secrets tests CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

    let mut params = CertificateParams::new(vec![host.to_owned()]).unwrap_or_else(|e| {
        panic!("{HOST_ENV}={host:?} is neither an IP address nor a DNS name: {e}")
    });
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params
        .distinguished_name
        .push(DnType::CommonName, "agent-secrets tests webhook");
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    TestCa {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// The webhook host the API server can reach, from the environment; fails (never skips)
/// when it is not set.
fn webhook_host() -> String {
    match std::env::var(HOST_ENV) {
        Ok(host) if !host.trim().is_empty() => host.trim().to_owned(),
        _ => panic!(
            "{HOST_ENV} is not set. The webhook tests serve the webhook from this process and \
             register it with the API server, which must be able to connect back: set {HOST_ENV} \
             to this machine's address as seen from the API server (127.0.0.1 for a local \
             kube-apiserver; for kind, the docker network gateway: \
             docker network inspect kind -f '{{{{(index .IPAM.Config 0).Gateway}}}}'). \
             Optionally set {PORT_ENV} to a fixed port. See the top of tests/cluster.rs."
        ),
    }
}

/// The webhook running in this process against the real API server, registered for the
/// test's namespaces only.
struct Webhook {
    client: Client,
    keyring: Arc<Keyring>,
    index: Arc<SecretIndex>,
    namespaces: Vec<String>,
    /// Stops the webhook and the watch, deletes the namespaces and the configuration.
    _guard: Guard,
}

impl Webhook {
    /// Install the CRD, create `namespaces` namespaces, start the cache and the webhook and
    /// register it; returns once the API server calls it.
    async fn start(namespaces: usize) -> Self {
        let host = webhook_host();
        let client = client().await;
        install_crd(&client).await;
        let mut guard = Guard::default();
        let mut names = Vec::new();
        for _ in 0..namespaces {
            let ns = guard.namespace(&client).await;
            ensure_default_service_account(&client, &ns).await;
            names.push(ns);
        }

        // The cache, fed by a watch on every AgentSecret as in production.
        let index = Arc::new(SecretIndex::default());
        spawn_agentsecret_watch(&client, &index, &guard.stop);

        let keyring_handle = KeyringHandle::new(Keyring::generate("cluster-test-kek").unwrap());
        let keyring = keyring_handle.current().unwrap();
        let certs = issue_certificate(&host);
        let tls = RustlsConfig::from_pem(certs.cert_pem.into_bytes(), certs.key_pem.into_bytes())
            .await
            .unwrap();
        let port: u16 = std::env::var(PORT_ENV)
            .ok()
            .map(|p| {
                p.parse()
                    .unwrap_or_else(|_| panic!("{PORT_ENV}={p:?} is not a port"))
            })
            .unwrap_or(0);
        let listener = server::bind(([0, 0, 0, 0], port).into())
            .unwrap_or_else(|e| panic!("failed to listen on 0.0.0.0:{port}: {e}"));
        let port = listener.local_addr().unwrap().port();
        // The tests write AgentSecrets of several owners as themselves: the webhook treats
        // the test's own identity as a secret administrator (owner binding has its own tests).
        let mut policy = Policy::default();
        policy.owner_binding.administrators = vec![agent_secrets::webhook::Principal::User(
            whoami(&client).await,
        )];
        let state = AppState {
            keyring: keyring_handle,
            index: index.clone(),
            policy: Arc::new(policy),
            pod_secrets: Arc::default(),
            writer: Arc::new(KubeSecretWriter {
                client: client.clone(),
            }),
            metrics: Arc::new(Metrics::default()),
        };
        tokio::spawn(server::serve_webhook(
            listener,
            tls,
            server::webhook_router(state.clone()),
            guard.stop.clone().cancelled_owned(),
        ));
        eventually(
            "the AgentSecret cache syncs",
            Duration::from_secs(30),
            || {
                let ready = state.not_ready_reason();
                async move { ready.map_or(Ok(()), |reason| Err(reason.to_owned())) }
            },
        )
        .await;

        let authority = match host.parse::<std::net::Ipv6Addr>() {
            Ok(_) => format!("[{host}]:{port}"),
            Err(_) => format!("{host}:{port}"),
        };
        let name = unique("agent-secrets-test");
        register_webhook(&client, &name, &authority, &certs.ca_pem, &names).await;
        guard.cleanups.push(Cleanup::WebhookConfiguration(name));

        let webhook = Self {
            client,
            keyring,
            index,
            namespaces: names,
            _guard: guard,
        };
        webhook.wait_until_called().await;
        webhook
    }

    fn ns(&self) -> &str {
        &self.namespaces[0]
    }

    fn agentsecrets(&self, ns: &str) -> Api<AgentSecret> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// The API server loads a new webhook configuration asynchronously: a server dry run of
    /// a plaintext AgentSecret is refused by the CRD until the webhook seals it.
    async fn wait_until_called(&self) {
        let api = self.agentsecrets(self.ns());
        let probe = with_value(
            agentsecret(self.ns(), "probe", "probe", "PROBE"),
            "cluster-probe-value",
        );
        let dry_run = PostParams {
            dry_run: true,
            field_manager: None,
        };
        let (api, probe, dry_run) = (&api, &probe, &dry_run);
        eventually(
            "the API server calls the webhook",
            Duration::from_secs(60),
            move || async move {
                match api.create(dry_run, probe).await {
                    Ok(object) if object.spec.value.is_none() && object.spec.sealed.is_some() => {
                        Ok(())
                    }
                    Ok(object) => Err(format!("not sealed: {:?}", object.spec)),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await;
    }

    /// Wait until the cache holds exactly `env_names` for `owner` in `ns`.
    async fn wait_for_cache(&self, ns: &str, owner: &str, env_names: &[&str]) {
        let mut expected: Vec<String> = env_names.iter().map(|s| (*s).to_owned()).collect();
        expected.sort();
        eventually(
            "the cache sees the AgentSecrets",
            Duration::from_secs(30),
            || {
                let mut cached: Vec<String> = self
                    .index
                    .owner_secrets(ns, owner)
                    .iter()
                    .map(|s| s.env_name.clone())
                    .collect();
                cached.sort();
                let result = if cached == expected {
                    Ok(())
                } else {
                    Err(format!("{ns}/{owner}: {cached:?}, expected {expected:?}"))
                };
                async move { result }
            },
        )
        .await;
    }

    /// The stored object, checked to hold no plaintext and a sealed value that opens to
    /// `value` for its namespace and owner.
    async fn assert_sealed(&self, ns: &str, name: &str, value: &str) -> AgentSecret {
        let text = stored_json(&self.client, ns, name).await;
        assert!(!text.contains(value), "plaintext stored in {text}");
        let object = self.agentsecrets(ns).get(name).await.unwrap();
        assert!(object.spec.value.is_none(), "{name}: spec.value stored");
        let sealed = object
            .spec
            .sealed
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: no spec.sealed"));
        assert_eq!(sealed.key_id, "cluster-test-kek");
        let plain = sealed
            .open(&self.keyring, object.spec.seal_context(ns))
            .unwrap();
        assert_eq!(plain.expose(), value.as_bytes(), "{name}");
        object
    }
}

/// Pods need the namespace's `default` ServiceAccount; create it when no controller does.
async fn ensure_default_service_account(client: &Client, ns: &str) {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap();
    match api.create(&PostParams::default(), &account).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(e) => panic!("failed to create the default ServiceAccount in {ns}: {e}"),
    }
}

/// Register the webhook the way the chart does (rules, failure policy, selectors), at `url`
/// instead of a Service, and for `namespaces` only.
async fn register_webhook(
    client: &Client,
    name: &str,
    authority: &str,
    ca_pem: &str,
    namespaces: &[String],
) {
    let configuration = webhook_configuration(name, authority, ca_pem, namespaces);
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &configuration)
        .await
        .unwrap_or_else(|e| panic!("failed to register the webhook configuration {name}: {e}"));
}

fn webhook_configuration(
    name: &str,
    authority: &str,
    ca_pem: &str,
    namespaces: &[String],
) -> MutatingWebhookConfiguration {
    use base64::Engine as _;
    let ca_bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let namespace_selector = json!({"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": namespaces}
    ]});
    serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "agent-secrets-tests"}},
        "webhooks": [
            {
                "name": "agentsecrets.agentsecrets.io",
                "admissionReviewVersions": ["v1"],
                "clientConfig": {"url": format!("https://{authority}/mutate/agentsecrets"), "caBundle": ca_bundle},
                "rules": [{
                    "apiGroups": ["agentsecrets.io"], "apiVersions": ["v1alpha1"],
                    "resources": ["agentsecrets"], "operations": ["CREATE", "UPDATE"],
                    "scope": "Namespaced"
                }],
                "matchPolicy": "Equivalent",
                "failurePolicy": "Fail",
                "sideEffects": "NoneOnDryRun",
                "reinvocationPolicy": "IfNeeded",
                "timeoutSeconds": 10,
                "namespaceSelector": namespace_selector
            },
            {
                "name": "pods.agentsecrets.io",
                "admissionReviewVersions": ["v1"],
                "clientConfig": {"url": format!("https://{authority}/mutate/pods"), "caBundle": ca_bundle},
                "rules": [{
                    "apiGroups": [""], "apiVersions": ["v1"],
                    "resources": ["pods"], "operations": ["CREATE"],
                    "scope": "Namespaced"
                }],
                "matchPolicy": "Equivalent",
                "failurePolicy": "Fail",
                "sideEffects": "NoneOnDryRun",
                "reinvocationPolicy": "IfNeeded",
                "timeoutSeconds": 10,
                "objectSelector": {"matchExpressions": [
                    {"key": "agentsecrets.io/owner", "operator": "Exists"}
                ]},
                "namespaceSelector": namespace_selector
            }
        ]
    }))
    .unwrap()
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn no_write_path_stores_a_plaintext_value() {
    let webhook = Webhook::start(1).await;
    let ns = webhook.ns().to_owned();
    let api = webhook.agentsecrets(&ns);
    let value = |what: &str| unique(&format!("cluster-canary-{what}"));

    // (a) Client-side apply: kubectl copies the manifest, value included, into an annotation.
    let csa_value = value("client-side-apply");
    let manifest = json!({
        "apiVersion": "agentsecrets.io/v1alpha1", "kind": "AgentSecret",
        "metadata": {"annotations": {}, "name": "x-bearer-token", "namespace": ns},
        "spec": {"owner": "alice", "envName": "X_BEARER_TOKEN",
                 "description": "X/Twitter API Bearer Token", "value": csa_value}
    });
    let mut object: AgentSecret = serde_json::from_value(manifest.clone()).unwrap();
    object.metadata.annotations = Some(BTreeMap::from([(
        LAST_APPLIED.to_owned(),
        format!("{manifest}\n"),
    )]));
    assert!(serde_json::to_string(&object).unwrap().contains(&csa_value));
    let params = PostParams {
        dry_run: false,
        field_manager: Some("kubectl-client-side-apply".into()),
    };
    api.create(&params, &object).await.unwrap();
    let stored = webhook
        .assert_sealed(&ns, "x-bearer-token", &csa_value)
        .await;
    let annotation = stored.annotations().get(LAST_APPLIED).unwrap();
    let applied: Value = serde_json::from_str(annotation).unwrap();
    assert!(applied["spec"].get("value").is_none(), "{annotation}");
    assert_eq!(applied["spec"]["envName"], "X_BEARER_TOKEN");

    // (b) Server-side apply; applying the same value again changes nothing.
    let ssa_value = value("server-side-apply");
    let applied = json!({
        "apiVersion": "agentsecrets.io/v1alpha1", "kind": "AgentSecret",
        "metadata": {"name": "notion-api-key", "namespace": ns},
        "spec": {"owner": "alice", "envName": "NOTION_API_KEY", "value": ssa_value}
    });
    let ssa = PatchParams::apply("kubectl");
    api.patch("notion-api-key", &ssa, &Patch::Apply(&applied))
        .await
        .unwrap();
    let first = webhook
        .assert_sealed(&ns, "notion-api-key", &ssa_value)
        .await;
    api.patch("notion-api-key", &ssa, &Patch::Apply(&applied))
        .await
        .unwrap();
    let again = webhook
        .assert_sealed(&ns, "notion-api-key", &ssa_value)
        .await;
    assert_eq!(
        again.spec.sealed, first.spec.sealed,
        "re-applying the same value keeps the sealed value"
    );

    // (c) Plain create.
    let create_value = value("create");
    let object = with_value(
        agentsecret(&ns, "postgres-password", "bob", "POSTGRES_PASSWORD"),
        &create_value,
    );
    api.create(&PostParams::default(), &object).await.unwrap();
    let created = webhook
        .assert_sealed(&ns, "postgres-password", &create_value)
        .await;

    // (d) Replace with a manifest without the value: the stored value is kept.
    let mut replacement = agentsecret(&ns, "postgres-password", "bob", "POSTGRES_PASSWORD");
    replacement.metadata.resource_version = created.metadata.resource_version.clone();
    replacement.spec.description = Some("DB password (rotated description)".into());
    api.replace("postgres-password", &PostParams::default(), &replacement)
        .await
        .unwrap();
    let replaced = webhook
        .assert_sealed(&ns, "postgres-password", &create_value)
        .await;
    assert_eq!(replaced.spec.sealed, created.spec.sealed);
    assert_eq!(
        replaced.spec.description.as_deref(),
        Some("DB password (rotated description)")
    );

    // A merge patch bringing a new value re-seals it.
    let new_value = value("merge-patch");
    api.patch(
        "postgres-password",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"value": new_value}})),
    )
    .await
    .unwrap();
    webhook
        .assert_sealed(&ns, "postgres-password", &new_value)
        .await;

    // A server dry run is sealed in the answer and stores nothing.
    let dry_value = value("dry-run");
    let dry = api
        .create(
            &PostParams {
                dry_run: true,
                field_manager: None,
            },
            &with_value(
                agentsecret(&ns, "dry-run", "alice", "DRY_RUN_TOKEN"),
                &dry_value,
            ),
        )
        .await
        .unwrap();
    assert!(dry.spec.value.is_none() && dry.spec.sealed.is_some());
    assert!(!serde_json::to_string(&dry).unwrap().contains(&dry_value));
    assert!(api.get_opt("dry-run").await.unwrap().is_none());

    // The webhook's own refusals reach the user: a second secret with the same envName (once
    // the cache has seen the first).
    webhook
        .wait_for_cache(&ns, "alice", &["NOTION_API_KEY", "X_BEARER_TOKEN"])
        .await;
    let duplicate_value = value("duplicate");
    let status = api_error(
        api.create(
            &PostParams::default(),
            &with_value(
                agentsecret(&ns, "duplicate", "alice", "X_BEARER_TOKEN"),
                &duplicate_value,
            ),
        )
        .await,
    );
    assert!(
        !status.message.contains(&duplicate_value),
        "{}",
        status.message
    );
    assert!(
        status
            .message
            .contains("already has a secret with envName X_BEARER_TOKEN")
            && status.message.contains("x-bearer-token"),
        "{}",
        status.message
    );

    // Nothing anywhere in the namespace holds any of the values: objects, list, events.
    let everything = format!(
        "{}{}",
        serde_json::to_string(&api.list(&ListParams::default()).await.unwrap()).unwrap(),
        serde_json::to_string(
            &Api::<Event>::namespaced(webhook.client.clone(), &ns)
                .list(&ListParams::default())
                .await
                .unwrap()
        )
        .unwrap()
    );
    for plaintext in [
        &csa_value,
        &ssa_value,
        &create_value,
        &new_value,
        &dry_value,
        &duplicate_value,
    ] {
        assert!(
            !everything.contains(plaintext.as_str()),
            "{plaintext} stored"
        );
    }
}

fn sandbox_pod(name: &str, owner: Option<&str>) -> Pod {
    let labels = owner.map_or(
        json!({"app": "agent-sandbox"}),
        |owner| json!({"app": "agent-sandbox", "agentsecrets.io/owner": owner}),
    );
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            // Never scheduled: nothing is pulled or run.
            "nodeSelector": {"agentsecrets.io/test-no-such-node": "true"},
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "sandbox",
                "image": "registry.k8s.io/pause:3.10",
                "env": [{"name": "LOG_LEVEL", "value": "debug"}]
            }]
        }
    }))
    .unwrap()
}

fn pod_annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// `(name, secretKeyRef secret name)` of each env entry of the pod's first container.
fn env_refs(pod: &Pod) -> Vec<(String, Option<String>)> {
    pod.spec.as_ref().unwrap().containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| {
            let secret = e
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
                .map(|r| r.name.clone());
            (e.name.clone(), secret)
        })
        .collect()
}

fn secret_data(secret: &Secret) -> BTreeMap<String, String> {
    secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8(v.0.clone()).unwrap()))
        .collect()
}

/// Check a pod injected with `expected` (env name → value) and return its Secret's name.
async fn assert_injected(
    webhook: &Webhook,
    ns: &str,
    pod: &Pod,
    owner: &str,
    expected: &BTreeMap<String, String>,
) -> String {
    let secret_name = pod_annotation(pod, "agentsecrets.io/secret-name")
        .unwrap_or_else(|| panic!("{} was not injected: {:?}", pod.name_any(), pod.metadata))
        .to_owned();
    let names: Vec<&str> = expected.keys().map(String::as_str).collect();
    assert_eq!(
        pod_annotation(pod, "agentsecrets.io/injected"),
        Some(names.join(",").as_str())
    );
    let mut wanted = vec![("LOG_LEVEL".to_owned(), None)];
    wanted.extend(
        expected
            .keys()
            .map(|k| (k.clone(), Some(secret_name.clone()))),
    );
    assert_eq!(env_refs(pod), wanted, "{}", pod.name_any());

    let secret = Api::<Secret>::namespaced(webhook.client.clone(), ns)
        .get(&secret_name)
        .await
        .unwrap();
    assert_eq!(secret.immutable, Some(true));
    let labels = secret.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("agentsecrets.io/owner").map(String::as_str),
        Some(owner)
    );
    assert_eq!(
        labels
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("agent-secrets")
    );
    assert_eq!(
        labels.get("agentsecrets.io/pod-scoped").map(String::as_str),
        Some("true")
    );
    assert_eq!(&secret_data(&secret), expected, "{secret_name}");
    secret_name
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn sandbox_pods_get_only_their_owners_secrets_by_reference() {
    let webhook = Webhook::start(2).await;
    let ns = webhook.ns().to_owned();
    let other_ns = webhook.namespaces[1].clone();
    let value = |what: &str| unique(&format!("cluster-canary-{what}"));
    let alice = BTreeMap::from([
        ("NOTION_API_KEY".to_owned(), value("alice-notion")),
        ("X_BEARER_TOKEN".to_owned(), value("alice-x")),
    ]);
    let bob = BTreeMap::from([
        ("POSTGRES_PASSWORD".to_owned(), value("bob-pg")),
        ("X_BEARER_TOKEN".to_owned(), value("bob-x")),
    ]);
    let alice_elsewhere = value("alice-other-namespace");
    let api = webhook.agentsecrets(&ns);
    for (owner, values) in [("alice", &alice), ("bob", &bob)] {
        for (env_name, plaintext) in values {
            let name = format!("{owner}-{}", env_name.to_lowercase().replace('_', "-"));
            let object = with_value(agentsecret(&ns, &name, owner, env_name), plaintext);
            api.create(&PostParams::default(), &object).await.unwrap();
        }
    }
    webhook
        .agentsecrets(&other_ns)
        .create(
            &PostParams::default(),
            &with_value(
                agentsecret(&other_ns, "alice-x", "alice", "X_BEARER_TOKEN"),
                &alice_elsewhere,
            ),
        )
        .await
        .unwrap();
    webhook
        .wait_for_cache(&ns, "alice", &["NOTION_API_KEY", "X_BEARER_TOKEN"])
        .await;
    webhook
        .wait_for_cache(&ns, "bob", &["POSTGRES_PASSWORD", "X_BEARER_TOKEN"])
        .await;
    webhook
        .wait_for_cache(&other_ns, "alice", &["X_BEARER_TOKEN"])
        .await;

    let pods: Api<Pod> = Api::namespaced(webhook.client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(webhook.client.clone(), &ns);
    let pod_scoped = ListParams::default().labels("agentsecrets.io/pod-scoped=true");

    let alice_pod = pods
        .create(
            &PostParams::default(),
            &sandbox_pod("sandbox-alice", Some("alice")),
        )
        .await
        .unwrap();
    let alice_secret = assert_injected(&webhook, &ns, &alice_pod, "alice", &alice).await;

    let bob_pod = pods
        .create(
            &PostParams::default(),
            &sandbox_pod("sandbox-bob", Some("bob")),
        )
        .await
        .unwrap();
    let bob_secret = assert_injected(&webhook, &ns, &bob_pod, "bob", &bob).await;
    assert_ne!(alice_secret, bob_secret);

    // An owner without secrets, and a pod without the label, are admitted unchanged.
    for (name, owner) in [("sandbox-carol", Some("carol")), ("plain", None)] {
        let pod = pods
            .create(&PostParams::default(), &sandbox_pod(name, owner))
            .await
            .unwrap();
        assert_eq!(
            env_refs(&pod),
            vec![("LOG_LEVEL".to_owned(), None)],
            "{name}"
        );
        assert_eq!(pod_annotation(&pod, "agentsecrets.io/secret-name"), None);
    }
    // A requested secret the owner lacks denies the pod, naming it.
    let mut subset = sandbox_pod("sandbox-alice-subset", Some("alice"));
    subset.metadata.annotations = Some(BTreeMap::from([(
        "agentsecrets.io/secrets".to_owned(),
        "X_BEARER_TOKEN,POSTGRES_PASSWORD".to_owned(),
    )]));
    let status = api_error(pods.create(&PostParams::default(), &subset).await);
    assert!(
        status.message.contains("POSTGRES_PASSWORD"),
        "{}",
        status.message
    );

    // A server dry run gets the injection in its answer but creates no Secret.
    let before = secrets.list(&pod_scoped).await.unwrap().items.len();
    assert_eq!(before, 2);
    let dry = pods
        .create(
            &PostParams {
                dry_run: true,
                field_manager: None,
            },
            &sandbox_pod("sandbox-alice-dry-run", Some("alice")),
        )
        .await
        .unwrap();
    let dry_secret = pod_annotation(&dry, "agentsecrets.io/secret-name")
        .unwrap()
        .to_owned();
    assert!(
        env_refs(&dry)
            .iter()
            .any(|(_, s)| s.as_deref() == Some(dry_secret.as_str()))
    );
    assert!(secrets.get_opt(&dry_secret).await.unwrap().is_none());
    assert_eq!(secrets.list(&pod_scoped).await.unwrap().items.len(), before);
    assert!(
        pods.get_opt("sandbox-alice-dry-run")
            .await
            .unwrap()
            .is_none()
    );

    // The stored pods hold references only: no value of anyone's.
    let stored_pods =
        serde_json::to_string(&pods.list(&ListParams::default()).await.unwrap()).unwrap();
    for plaintext in alice.values().chain(bob.values()).chain([&alice_elsewhere]) {
        assert!(
            !stored_pods.contains(plaintext.as_str()),
            "{plaintext} in a pod spec"
        );
    }
    // Every pod-scoped Secret holds only its own owner's values from this namespace.
    for secret in secrets.list(&pod_scoped).await.unwrap() {
        let data = secret_data(&secret);
        let owner = secret.labels()["agentsecrets.io/owner"].clone();
        let expected = if owner == "alice" { &alice } else { &bob };
        assert_eq!(&data, expected, "{}", secret.name_any());
        assert!(!data.values().any(|v| *v == alice_elsewhere));
    }
}
