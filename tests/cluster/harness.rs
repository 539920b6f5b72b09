//! Cluster plumbing shared by the cluster tests: the client, unique names, waiting,
//! cleanup guards, and the objects the tests write.

use super::*;

pub(crate) const FIELD_MANAGER: &str = "agent-secrets-tests";
pub(crate) const HOST_ENV: &str = "AGENTSECRETS_TEST_WEBHOOK_HOST";
pub(crate) const PORT_ENV: &str = "AGENTSECRETS_TEST_WEBHOOK_PORT";
pub(crate) const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

// ---------------------------------------------------------------------------------------
// Cluster plumbing

pub(crate) async fn client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::try_default().await.unwrap_or_else(|e| {
        panic!("cannot reach a Kubernetes API server (set KUBECONFIG to the test cluster's kubeconfig): {e}")
    })
}

/// A name unique to this run: lowercase hex of the clock and the process id.
pub(crate) fn unique(prefix: &str) -> String {
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
pub(crate) async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut attempt: F) -> T
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
pub(crate) async fn whoami(client: &Client) -> String {
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
pub(crate) async fn install_crd(client: &Client) {
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
pub(crate) enum Cleanup {
    Namespace(String),
    WebhookConfiguration(String),
}

/// Deletes what a test created when it is dropped, also when the test panics. Dropping may
/// happen while the test's runtime unwinds, so it uses a thread with a runtime and a client
/// of its own.
#[derive(Default)]
pub(crate) struct Guard {
    pub(crate) cleanups: Vec<Cleanup>,
    pub(crate) stop: CancellationToken,
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
    pub(crate) async fn namespace(&mut self, client: &Client) -> String {
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
pub(crate) fn spawn_agentsecret_watch(
    client: &Client,
    index: &Arc<SecretIndex>,
    stop: &CancellationToken,
) {
    tokio::spawn(agent_secrets::cache::watch_agentsecrets(
        client.clone(),
        index.clone(),
        stop.clone(),
    ));
}

pub(crate) fn api_error<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> Box<Status> {
    match result {
        Ok(object) => panic!("expected the API server to refuse, it stored {object:?}"),
        Err(kube::Error::Api(status)) => status,
        Err(e) => panic!("expected a refusal by the API server, got {e}"),
    }
}

/// The whole stored object as the API server returns it (annotations and managedFields
/// included), as JSON text.
pub(crate) async fn stored_json(client: &Client, namespace: &str, name: &str) -> String {
    let resource = ApiResource::erase::<AgentSecret>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    serde_json::to_string(&api.get(name).await.unwrap()).unwrap()
}

/// Fail clearly if another agent-secrets webhook is installed: it would seal what the CRD
/// tests expect the CRD to refuse.
pub(crate) async fn assert_no_foreign_agentsecret_webhook(client: &Client) {
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

pub(crate) fn fake_sealed() -> SealedValue {
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

pub(crate) fn agentsecret(namespace: &str, name: &str, owner: &str, env_name: &str) -> AgentSecret {
    let mut object = AgentSecret::new(
        name,
        AgentSecretSpec {
            owner: owner.into(),
            env_name: env_name.into(),
            description: None,
            value: None,
            sealed: None,
            ..Default::default()
        },
    );
    object.metadata.namespace = Some(namespace.into());
    object
}

pub(crate) fn with_value(mut object: AgentSecret, value: &str) -> AgentSecret {
    object.spec.value = Some(SecretString::new(value.to_owned()));
    object
}

pub(crate) fn with_sealed(mut object: AgentSecret) -> AgentSecret {
    object.spec.sealed = Some(fake_sealed());
    object
}

/// Pods need the namespace's `default` ServiceAccount; create it when no controller does.
pub(crate) async fn ensure_default_service_account(client: &Client, ns: &str) {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap();
    match api.create(&PostParams::default(), &account).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(e) => panic!("failed to create the default ServiceAccount in {ns}: {e}"),
    }
}

pub(crate) fn sandbox_pod(name: &str, owner: Option<&str>) -> Pod {
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
