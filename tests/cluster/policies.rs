//! The three ValidatingAdmissionPolicies of `manifests/agent-secrets.yaml` on a real API server,
//! acting as ordinary users through impersonation (`Impersonate-User`, as `kubectl --as`):
//! alice, bob and mallory get edit rights on pods, Secrets and AgentSecrets in the test
//! namespace, and a ServiceAccount of the test's own stands in for the operator. No webhook
//! runs: whatever is refused here is refused by the API server itself.
//!
//! The credentials must also be allowed to impersonate users, groups and ServiceAccounts and to
//! create and delete ValidatingAdmissionPolicies and their bindings (cluster-admin is simplest).
//! The policies are created under names of the test's own and bound to the test's namespace
//! only (the shipped bindings are cluster-wide), and deleted when the test ends, also on
//! failure. Run with the rest of `tests/cluster.rs`.

use super::{
    Guard, agentsecret, assert_no_foreign_agentsecret_webhook, client,
    ensure_default_service_account, eventually, install_crd, sandbox_pod, unique, with_sealed,
};
use agent_secrets::api::{
    AgentSecret, FEED_TOKEN_VOLUME, OWNER_LABEL, POD_SCOPED_LABEL, POD_SECRET_NAME_PREFIX,
    PROXY_CA_VOLUME, PROXY_CONTAINER_NAME, SECRET_NAME_ANNOTATION,
};
use agent_secrets::webhook::pod::secretless::{self, Egress, Sidecar, feed_url};
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt as _};
use serde::Deserialize as _;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

/// The reserved name prefix of pod-scoped Secrets, as the operator names them.
const PREFIX: &str = POD_SECRET_NAME_PREFIX;
/// The operator's username in the rendered manifests, replaced by the test's own.
const SHIPPED_OPERATOR: &str = "system:serviceaccount:agent-secrets:agent-secrets";
const OPERATOR_ACCOUNT: &str = "operator";
/// The policies as shipped.
const SHIPPED: &str = "manifests/agent-secrets.yaml";
/// The policies as rendered with a narrowed webhook.objectSelector (see hack/helm.py).
const NARROWED: &str = "tests/rendered/narrowed-webhook-policies.yaml";

// ---------------------------------------------------------------------------------------
// Harness

/// Deletes the cluster-scoped policies and bindings a test created when it is dropped, also
/// when the test panics (on a thread with a runtime and client of its own, like `Guard`).
#[derive(Default)]
struct PolicyGuard {
    policies: Vec<String>,
    bindings: Vec<String>,
}

impl Drop for PolicyGuard {
    fn drop(&mut self) {
        let bindings = std::mem::take(&mut self.bindings);
        let policies = std::mem::take(&mut self.policies);
        if bindings.is_empty() && policies.is_empty() {
            return;
        }
        let joined = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let client = client().await;
                let binding_api: Api<ValidatingAdmissionPolicyBinding> = Api::all(client.clone());
                let policy_api: Api<ValidatingAdmissionPolicy> = Api::all(client);
                // Bindings first, then the policies they name.
                for name in &bindings {
                    report(
                        &format!("ValidatingAdmissionPolicyBinding {name}"),
                        binding_api
                            .delete(name, &DeleteParams::default())
                            .await
                            .map(|_| ()),
                    );
                }
                for name in &policies {
                    report(
                        &format!("ValidatingAdmissionPolicy {name}"),
                        policy_api
                            .delete(name, &DeleteParams::default())
                            .await
                            .map(|_| ()),
                    );
                }
            });
        })
        .join();
        if joined.is_err() {
            eprintln!("cleanup: the policy cleanup thread panicked");
        }
    }
}

fn report(what: &str, result: Result<(), kube::Error>) {
    match result {
        Ok(()) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(e) => eprintln!("cleanup: failed to delete {what}: {e}"),
    }
}

/// A namespace with the shipped policies bound to it, users with edit rights in it and the
/// test's stand-in for the operator's ServiceAccount.
struct Tenancy {
    ns: String,
    admin: Client,
    /// Policy name suffix (as shipped, e.g. `-pod-scoped-secrets`) to the name created here.
    policy_names: Vec<(String, String)>,
}

impl Tenancy {
    async fn set_up(guard: &mut Guard, policies: &mut PolicyGuard) -> Self {
        Self::set_up_from(SHIPPED, guard, policies).await
    }

    /// As [`Tenancy::set_up`], with the policies of `rendered` (a path in the repository).
    async fn set_up_from(rendered: &str, guard: &mut Guard, policies: &mut PolicyGuard) -> Self {
        let admin = client().await;
        install_crd(&admin).await;
        assert_no_foreign_agentsecret_webhook(&admin).await;
        let ns = guard.namespace(&admin).await;
        ensure_default_service_account(&admin, &ns).await;
        let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), &ns);
        accounts
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": OPERATOR_ACCOUNT}})).unwrap(),
            )
            .await
            .unwrap();
        grant_edit_rights(&admin, &ns).await;
        let policy_names = apply_policies(&admin, &ns, rendered, policies).await;
        let tenancy = Self {
            ns,
            admin,
            policy_names,
        };
        tenancy.wait_until_enforced().await;
        tenancy
    }

    fn operator_username(&self) -> String {
        format!("system:serviceaccount:{}:{OPERATOR_ACCOUNT}", self.ns)
    }

    /// A client that authenticates as the test's credentials and acts as `user`.
    async fn as_user(&self, user: &str) -> Client {
        let mut config = kube::Config::infer().await.unwrap();
        config.auth_info.impersonate = Some(user.to_owned());
        config.auth_info.impersonate_groups = Some(vec!["system:authenticated".to_owned()]);
        Client::try_from(config).unwrap()
    }

    async fn as_operator(&self) -> Client {
        let mut config = kube::Config::infer().await.unwrap();
        config.auth_info.impersonate = Some(self.operator_username());
        config.auth_info.impersonate_groups = Some(vec![
            "system:serviceaccounts".to_owned(),
            format!("system:serviceaccounts:{}", self.ns),
            "system:authenticated".to_owned(),
        ]);
        Client::try_from(config).unwrap()
    }

    fn policy(&self, suffix: &str) -> &str {
        &self
            .policy_names
            .iter()
            .find(|(shipped, _)| shipped.ends_with(suffix))
            .unwrap()
            .1
    }

    /// A newly bound policy takes effect once the API server's informer has seen it: probe each
    /// with a dry run that it refuses.
    async fn wait_until_enforced(&self) {
        let mallory = self.as_user("mallory").await;
        let dry_run = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        let secrets: Api<Secret> = Api::namespaced(mallory.clone(), &self.ns);
        let pods: Api<Pod> = Api::namespaced(mallory.clone(), &self.ns);
        let agentsecrets: Api<AgentSecret> = Api::namespaced(mallory, &self.ns);
        let probe_secret = secret(&format!("{PREFIX}probe"), false);
        let probe_pod = with_env_ref(sandbox_pod("probe", None), &format!("{PREFIX}probe"));
        let probe_agentsecret = with_sealed(agentsecret(&self.ns, "probe", "bob", "PROBE_TOKEN"));
        for (suffix, what) in [
            ("-pod-scoped-secrets", "a pod-scoped Secret"),
            ("-pod-secret-references", "a pod reference"),
            ("-agentsecret-owners", "an AgentSecret owner"),
        ] {
            let name = self.policy(suffix).to_owned();
            eventually(
                &format!("the policy on {what} is enforced"),
                Duration::from_secs(60),
                || async {
                    let result = match suffix {
                        "-pod-scoped-secrets" => {
                            secrets.create(&dry_run, &probe_secret).await.map(|_| ())
                        }
                        "-pod-secret-references" => {
                            pods.create(&dry_run, &probe_pod).await.map(|_| ())
                        }
                        _ => agentsecrets
                            .create(&dry_run, &probe_agentsecret)
                            .await
                            .map(|_| ()),
                    };
                    match result {
                        Err(kube::Error::Api(status)) if status.message.contains(&name) => Ok(()),
                        other => Err(format!("{other:?}")),
                    }
                },
            )
            .await;
        }
    }
}

/// Role and RoleBinding: alice, bob and mallory may do everything with pods, Secrets and
/// AgentSecrets in `ns`, as the built-in `edit` role allows; so may the operator's stand-in.
async fn grant_edit_rights(admin: &Client, ns: &str) {
    let verbs = json!([
        "get", "list", "watch", "create", "update", "patch", "delete"
    ]);
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "sandbox-users"},
        "rules": [
            {"apiGroups": [""], "resources": ["pods", "secrets"], "verbs": verbs},
            {"apiGroups": ["agentsecrets.io"], "resources": ["agentsecrets"], "verbs": verbs}
        ]
    }))
    .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "sandbox-users"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sandbox-users"},
        "subjects": [
            {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"},
            {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "bob"},
            {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "mallory"},
            {"kind": "ServiceAccount", "name": OPERATOR_ACCOUNT, "namespace": ns}
        ]
    }))
    .unwrap();
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
}

/// Create the shipped policies and bindings under names unique to this test, with the test's
/// operator username, each binding limited to `ns`. Returns (shipped name, created name).
async fn apply_policies(
    admin: &Client,
    ns: &str,
    rendered: &str,
    guard: &mut PolicyGuard,
) -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rendered))
            .unwrap();
    assert!(
        text.contains(SHIPPED_OPERATOR),
        "{rendered} no longer names the operator {SHIPPED_OPERATOR}"
    );
    let operator = format!("system:serviceaccount:{ns}:{OPERATOR_ACCOUNT}");
    let text = text.replace(SHIPPED_OPERATOR, &operator);
    let documents: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
        .filter(|v| !v.is_null())
        .collect();
    let suffix = unique("t");
    let renamed = |name: &str| format!("{name}-{suffix}");
    let policy_api: Api<ValidatingAdmissionPolicy> = Api::all(admin.clone());
    let binding_api: Api<ValidatingAdmissionPolicyBinding> = Api::all(admin.clone());
    let mut names = Vec::new();
    for document in &documents {
        let shipped = document["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match document["kind"].as_str() {
            Some("ValidatingAdmissionPolicy") => {
                let mut object = document.clone();
                object["metadata"] = json!({"name": renamed(&shipped)});
                let policy: ValidatingAdmissionPolicy = serde_json::from_value(object).unwrap();
                guard.policies.push(renamed(&shipped));
                policy_api
                    .create(&PostParams::default(), &policy)
                    .await
                    .unwrap_or_else(|e| panic!("the API server refuses policy {shipped}: {e}"));
                names.push((shipped.clone(), renamed(&shipped)));
            }
            Some("ValidatingAdmissionPolicyBinding") => {
                let mut object = document.clone();
                let policy = object["spec"]["policyName"].as_str().unwrap().to_owned();
                object["metadata"] = json!({"name": renamed(&shipped)});
                object["spec"]["policyName"] = json!(renamed(&policy));
                object["spec"]["matchResources"] = json!({"namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": ns}
                }});
                let binding: ValidatingAdmissionPolicyBinding =
                    serde_json::from_value(object).unwrap();
                guard.bindings.push(renamed(&shipped));
                binding_api
                    .create(&PostParams::default(), &binding)
                    .await
                    .unwrap_or_else(|e| panic!("the API server refuses binding {shipped}: {e}"));
            }
            _ => {}
        }
    }
    assert_eq!(names.len(), 3, "expected three policies in {rendered}");
    names
}

/// The refusal of `result` by the policy `policy`, as the API server words it.
fn refused_by<T: std::fmt::Debug>(result: Result<T, kube::Error>, policy: &str) -> String {
    match result {
        Ok(object) => {
            panic!("expected policy {policy} to refuse, the API server accepted {object:?}")
        }
        Err(kube::Error::Api(status)) => {
            assert!(
                status.message.contains(policy),
                "refused, but not by policy {policy}: {status:?}"
            );
            assert_eq!(status.code, 403, "{status:?}");
            status.message
        }
        Err(e) => panic!("expected a refusal by the API server, got {e}"),
    }
}

fn secret(name: &str, labelled: bool) -> Secret {
    let mut labels = json!({"app.kubernetes.io/managed-by": "agent-secrets", OWNER_LABEL: "bob"});
    if labelled {
        labels[POD_SCOPED_LABEL] = json!("true");
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "immutable": true,
        "stringData": {"X_BEARER_TOKEN": "planted-value"}
    }))
    .unwrap()
}

fn pod_json(pod: Pod) -> Value {
    serde_json::to_value(pod).unwrap()
}

fn with_env_ref(pod: Pod, secret: &str) -> Pod {
    let mut value = pod_json(pod);
    value["spec"]["containers"][0]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "STOLEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "X_BEARER_TOKEN"}}}));
    serde_json::from_value(value).unwrap()
}

/// `pod` using `secret` in one of the ways a pod can use a Secret.
fn referencing(pod: Pod, how: &str, secret: &str) -> Pod {
    if how == "env secretKeyRef" {
        return with_env_ref(pod, secret);
    }
    let mut value = pod_json(pod);
    let spec = &mut value["spec"];
    match how {
        "envFrom secretRef" => {
            spec["containers"][0]["envFrom"] = json!([{"secretRef": {"name": secret}}]);
        }
        "secret volume" => {
            spec["volumes"] = json!([{"name": "stolen", "secret": {"secretName": secret}}]);
        }
        "projected volume" => {
            spec["volumes"] = json!([{"name": "stolen", "projected": {"sources": [{"secret": {"name": secret}}]}}]);
        }
        "init container env" => {
            spec["initContainers"] = json!([{
                "name": "setup", "image": "registry.k8s.io/pause:3.10",
                "env": [{"name": "STOLEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "X_BEARER_TOKEN"}}}]
            }]);
        }
        other => panic!("unknown reference kind {other}"),
    }
    serde_json::from_value(value).unwrap()
}

// ---------------------------------------------------------------------------------------
// AgentSecrets: owner binding

#[tokio::test]
#[ignore = "needs cluster"]
async fn alice_cannot_create_change_or_delete_an_agentsecret_owned_by_bob() {
    let mut guard = Guard::default();
    let mut policies = PolicyGuard::default();
    let tenancy = Tenancy::set_up(&mut guard, &mut policies).await;
    let ns = &tenancy.ns;
    let policy = tenancy.policy("-agentsecret-owners").to_owned();
    let as_bob: Api<AgentSecret> = Api::namespaced(tenancy.as_user("bob").await, ns);
    let as_alice: Api<AgentSecret> = Api::namespaced(tenancy.as_user("alice").await, ns);

    // Bob's own secret: allowed.
    as_bob
        .create(
            &PostParams::default(),
            &with_sealed(agentsecret(ns, "bob-db", "bob", "DB_PASSWORD")),
        )
        .await
        .unwrap();

    let planted = with_sealed(agentsecret(ns, "planted", "bob", "SERVICE_API_KEY"));
    let message = refused_by(
        as_alice.create(&PostParams::default(), &planted).await,
        &policy,
    );
    assert!(
        message.contains(r#"alice may not CREATE an AgentSecret of owner "bob""#),
        "{message}"
    );

    let patch = json!({"spec": {"description": "changed by alice"}});
    refused_by(
        as_alice
            .patch("bob-db", &PatchParams::default(), &Patch::Merge(&patch))
            .await,
        &policy,
    );
    refused_by(
        as_alice.delete("bob-db", &DeleteParams::default()).await,
        &policy,
    );

    let stored = Api::<AgentSecret>::namespaced(tenancy.admin.clone(), ns)
        .get("bob-db")
        .await
        .unwrap();
    assert_eq!(stored.spec.description, None, "alice's change was stored");
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn alice_can_create_change_and_delete_her_own_agentsecret() {
    let mut guard = Guard::default();
    let mut policies = PolicyGuard::default();
    let tenancy = Tenancy::set_up(&mut guard, &mut policies).await;
    let ns = &tenancy.ns;
    let as_alice: Api<AgentSecret> = Api::namespaced(tenancy.as_user("alice").await, ns);
    as_alice
        .create(
            &PostParams::default(),
            &with_sealed(agentsecret(ns, "alice-x", "alice", "X_BEARER_TOKEN")),
        )
        .await
        .unwrap();
    let patch = json!({"spec": {"description": "X API bearer token"}});
    let changed = as_alice
        .patch("alice-x", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(
        changed.spec.description.as_deref(),
        Some("X API bearer token")
    );
    as_alice
        .delete("alice-x", &DeleteParams::default())
        .await
        .unwrap();
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn operator_service_account_can_change_any_owners_agentsecret() {
    let mut guard = Guard::default();
    let mut policies = PolicyGuard::default();
    let tenancy = Tenancy::set_up(&mut guard, &mut policies).await;
    let ns = &tenancy.ns;
    Api::<AgentSecret>::namespaced(tenancy.as_user("bob").await, ns)
        .create(
            &PostParams::default(),
            &with_sealed(agentsecret(ns, "bob-db", "bob", "DB_PASSWORD")),
        )
        .await
        .unwrap();
    let as_operator: Api<AgentSecret> = Api::namespaced(tenancy.as_operator().await, ns);
    let patch = json!({"spec": {"sealed": {"keyId": "k2"}}});
    let rewrapped = as_operator
        .patch("bob-db", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(rewrapped.spec.sealed.unwrap().key_id, "k2");
}

// ---------------------------------------------------------------------------------------
// Pods: pod-scoped Secret references

#[tokio::test]
#[ignore = "needs cluster"]
async fn mallorys_unlabelled_pod_using_a_pod_scoped_secret_is_refused_for_every_reference_kind() {
    let mut guard = Guard::default();
    let mut policies = PolicyGuard::default();
    let tenancy = Tenancy::set_up(&mut guard, &mut policies).await;
    let ns = &tenancy.ns;
    let policy = tenancy.policy("-pod-secret-references").to_owned();
    let as_mallory: Api<Pod> = Api::namespaced(tenancy.as_user("mallory").await, ns);
    let target = format!("{PREFIX}k3j5abcdefghijklmnopqrstuv");
    for how in [
        "env secretKeyRef",
        "envFrom secretRef",
        "secret volume",
        "projected volume",
        "init container env",
    ] {
        let pod = referencing(sandbox_pod(&unique("thief"), None), how, &target);
        let message = refused_by(
            as_mallory.create(&PostParams::default(), &pod).await,
            &policy,
        );
        assert!(message.contains(&target), "{how}: {message}");
    }
    // The same pod using an ordinary Secret is admitted: the refusals above are the policy's.
    let pod = referencing(
        sandbox_pod("ordinary", None),
        "envFrom secretRef",
        "database-credentials",
    );
    as_mallory
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn pod_labelled_and_annotated_for_another_pods_secret_is_refused() {
    let mut guard = Guard::default();
    let mut policies = PolicyGuard::default();
    let tenancy = Tenancy::set_up(&mut guard, &mut policies).await;
    let ns = &tenancy.ns;
    let policy = tenancy.policy("-pod-secret-references").to_owned();
    let as_mallory: Api<Pod> = Api::namespaced(tenancy.as_user("mallory").await, ns);
    let mine = format!("{PREFIX}mine");
    let mut pod = referencing(
        sandbox_pod("mallorys", Some("mallory")),
        "env secretKeyRef",
        &format!("{PREFIX}bobs"),
    );
    pod.annotations_mut()
        .insert(SECRET_NAME_ANNOTATION.to_owned(), mine.clone());
    let message = refused_by(
        as_mallory.create(&PostParams::default(), &pod).await,
        &policy,
    );
    assert!(message.contains(&format!("{PREFIX}bobs")), "{message}");

    // Labelled and annotated with exactly the Secret it uses: admitted (no webhook runs here).
    let mut own = referencing(
        sandbox_pod("own", Some("mallory")),
        "env secretKeyRef",
        &mine,
    );
    own.annotations_mut()
        .insert(SECRET_NAME_ANNOTATION.to_owned(), mine);
    as_mallory
        .create(&PostParams::default(), &own)
        .await
        .unwrap();
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn with_a_narrowed_webhook_selector_a_pod_outside_it_uses_no_pod_scoped_secret() {
    let mut guard = Guard::default();
    let mut policies = PolicyGuard::default();
    let tenancy = Tenancy::set_up_from(NARROWED, &mut guard, &mut policies).await;
    let ns = &tenancy.ns;
    let policy = tenancy.policy("-pod-secret-references").to_owned();
    let as_mallory: Api<Pod> = Api::namespaced(tenancy.as_user("mallory").await, ns);
    let name = format!("{PREFIX}copied");
    let annotated_pod = |pod_name: &str, labels: &[(&str, &str)]| {
        let mut pod = referencing(
            sandbox_pod(pod_name, Some("mallory")),
            "env secretKeyRef",
            &name,
        );
        pod.annotations_mut()
            .insert(SECRET_NAME_ANNOTATION.to_owned(), name.clone());
        for (key, value) in labels {
            pod.labels_mut()
                .insert((*key).to_owned(), (*value).to_owned());
        }
        pod
    };
    // Labelled and annotated with the name it uses, but not selected by the webhook (no
    // runtime label): the webhook never checked its claim, so it may use no such Secret.
    let message = refused_by(
        as_mallory
            .create(&PostParams::default(), &annotated_pod("unseen", &[]))
            .await,
        &policy,
    );
    assert!(message.contains(&name), "{message}");
    // Selected by the webhook's selector: admitted (no webhook runs here).
    let selected = [
        ("sandbox.example.com/runtime", "gvisor"),
        ("sandbox.example.com/tier", "agents"),
        ("sandbox.example.com/pool", "p1"),
    ];
    as_mallory
        .create(&PostParams::default(), &annotated_pod("seen", &selected))
        .await
        .unwrap();
    // Relabelled out of the selector: refused; a label the selector does not use: admitted.
    let message = refused_by(
        as_mallory
            .patch(
                "seen",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"sandbox.example.com/pool": null}}})),
            )
            .await,
        &policy,
    );
    assert!(
        message.contains("cannot be relabelled into or out of"),
        "{message}"
    );
    as_mallory
        .patch(
            "seen",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"example.com/note": "x"}}})),
        )
        .await
        .unwrap();

    // Nor may a pod outside it carry a proxy sidecar of its own making, which the value feed
    // would serve with its label's owner's values.
    let message = refused_by(
        as_mallory
            .create(
                &PostParams::default(),
                &with_proxy_sidecar(sandbox_pod("unseen-secretless", Some("alice")), "alice"),
            )
            .await,
        &policy,
    );
    assert!(
        message.contains("Only a pod the agent-secrets webhook is called for"),
        "{message}"
    );
}

// ---------------------------------------------------------------------------------------
// Secrets: only the operator writes pod-scoped ones

#[tokio::test]
#[ignore = "needs cluster"]
async fn mallory_cannot_create_change_or_delete_pod_scoped_secrets_but_the_operator_can() {
    let mut guard = Guard::default();
    let mut policies = PolicyGuard::default();
    let tenancy = Tenancy::set_up(&mut guard, &mut policies).await;
    let ns = &tenancy.ns;
    let policy = tenancy.policy("-pod-scoped-secrets").to_owned();
    let as_mallory: Api<Secret> = Api::namespaced(tenancy.as_user("mallory").await, ns);
    let as_operator: Api<Secret> = Api::namespaced(tenancy.as_operator().await, ns);

    let planted = format!("{PREFIX}planted");
    let message = refused_by(
        as_mallory
            .create(&PostParams::default(), &secret(&planted, false))
            .await,
        &policy,
    );
    assert!(
        message.contains(&planted) && message.contains(&tenancy.operator_username()),
        "{message}"
    );
    // Label only, any name.
    refused_by(
        as_mallory
            .create(&PostParams::default(), &secret("innocent-looking", true))
            .await,
        &policy,
    );

    let real = format!("{PREFIX}real");
    as_operator
        .create(&PostParams::default(), &secret(&real, true))
        .await
        .unwrap();
    let strip = json!({"metadata": {"labels": {POD_SCOPED_LABEL: null}}});
    refused_by(
        as_mallory
            .patch(&real, &PatchParams::default(), &Patch::Merge(&strip))
            .await,
        &policy,
    );
    refused_by(
        as_mallory.delete(&real, &DeleteParams::default()).await,
        &policy,
    );

    let adopt = json!({"metadata": {"annotations": {"agentsecrets.io/pod": "sandbox"}}});
    as_operator
        .patch(&real, &PatchParams::default(), &Patch::Merge(&adopt))
        .await
        .unwrap();
    as_operator
        .delete(&real, &DeleteParams::default())
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------
// Pods: the secretless proxy sidecar's feed token and owner label

/// `pod` shaped as the webhook makes a secretless pod of `owner`: the proxy sidecar first among
/// the init containers, its CA and feed-token volumes, the sandbox mounting the CA read-only.
fn with_proxy_sidecar(pod: Pod, owner: &str) -> Pod {
    let sidecar = Sidecar {
        image: "registry.k8s.io/pause:3.10".into(),
        feed_url: feed_url("agent-secrets.agent-secrets.svc"),
        feed_ca: "-----BEGIN CERTIFICATE-----\nMIIBpolicytest\n-----END CERTIFICATE-----\n".into(),
        egress: Egress::Open,
        owner: owner.to_owned(),
    };
    let placeholders = BTreeMap::from([(
        "X_BEARER_TOKEN".to_owned(),
        format!("asec_ph_{}", "a".repeat(32)),
    )]);
    let mut value = pod_json(pod);
    let spec = &mut value["spec"];
    spec["initContainers"] = json!([sidecar.container(&placeholders)]);
    spec["volumes"] = json!(secretless::volumes());
    spec["containers"][0]["volumeMounts"] = json!([
        {"name": PROXY_CA_VOLUME, "mountPath": secretless::CA_DIR, "readOnly": true}
    ]);
    serde_json::from_value(value).unwrap()
}

/// `pod` with a feed-token volume as the webhook writes it, mounted by the container `how`
/// names instead of the proxy sidecar.
fn mounting_feed_token(pod: Pod, how: &str) -> Pod {
    let mount = json!({"name": FEED_TOKEN_VOLUME, "mountPath": secretless::FEED_TOKEN_DIR, "readOnly": true});
    let mut value = pod_json(pod);
    let spec = &mut value["spec"];
    spec["volumes"] = json!(secretless::volumes());
    let container = |name: &str, sidecar: bool| {
        let mut container = json!({
            "name": name, "image": "registry.k8s.io/pause:3.10", "volumeMounts": [mount]
        });
        if sidecar {
            container["restartPolicy"] = json!("Always");
        }
        container
    };
    match how {
        "sandbox container" => spec["containers"][0]["volumeMounts"] = json!([mount]),
        "second container" => spec["containers"]
            .as_array_mut()
            .unwrap()
            .push(container("helper", false)),
        "init container" => spec["initContainers"] = json!([container("setup", false)]),
        "sidecar of another name" => spec["initContainers"] = json!([container("proxy", true)]),
        other => panic!("unknown mount kind {other}"),
    }
    serde_json::from_value(value).unwrap()
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn only_the_proxy_sidecar_may_mount_the_feed_token_volume() {
    let mut guard = Guard::default();
    let mut policies = PolicyGuard::default();
    let tenancy = Tenancy::set_up(&mut guard, &mut policies).await;
    let ns = &tenancy.ns;
    let policy = tenancy.policy("-pod-secret-references").to_owned();
    let as_mallory: Api<Pod> = Api::namespaced(tenancy.as_user("mallory").await, ns);
    for how in [
        "sandbox container",
        "second container",
        "init container",
        "sidecar of another name",
    ] {
        for owner in [None, Some("mallory")] {
            let pod = mounting_feed_token(sandbox_pod(&unique("token-thief"), owner), how);
            let message = refused_by(
                as_mallory.create(&PostParams::default(), &pod).await,
                &policy,
            );
            assert!(
                message.contains("may mount the volume agentsecrets-feed-token"),
                "{how}, owner {owner:?}: {message}"
            );
        }
    }
    // The same volume mounted by the sidecar the webhook writes is admitted (no webhook runs
    // here, so this is the policy's answer alone).
    let pod = with_proxy_sidecar(sandbox_pod("secretless", Some("mallory")), "mallory");
    let stored = as_mallory
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    let init = stored.spec.unwrap().init_containers.unwrap();
    assert_eq!(init[0].name, PROXY_CONTAINER_NAME);
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn a_pod_with_the_proxy_sidecar_cannot_gain_change_or_lose_its_owner_label() {
    let mut guard = Guard::default();
    let mut policies = PolicyGuard::default();
    let tenancy = Tenancy::set_up(&mut guard, &mut policies).await;
    let ns = &tenancy.ns;
    let policy = tenancy.policy("-pod-secret-references").to_owned();
    let as_mallory: Api<Pod> = Api::namespaced(tenancy.as_user("mallory").await, ns);
    let as_admin: Api<Pod> = Api::namespaced(tenancy.admin.clone(), ns);
    let owner_of = |pod: Pod| pod.labels().get(OWNER_LABEL).cloned();
    let relabel = |owner: Option<&str>| json!({"metadata": {"labels": {OWNER_LABEL: owner}}});

    let labelled = with_proxy_sidecar(sandbox_pod("labelled", Some("mallory")), "mallory");
    as_mallory
        .create(&PostParams::default(), &labelled)
        .await
        .unwrap();
    for (change, patch) in [
        ("changed", relabel(Some("bob"))),
        ("removed", relabel(None)),
    ] {
        let message = refused_by(
            as_mallory
                .patch("labelled", &PatchParams::default(), &Patch::Merge(&patch))
                .await,
            &policy,
        );
        assert!(
            message.contains("label agentsecrets.io/owner cannot be added, changed or removed"),
            "{change}: {message}"
        );
    }
    assert_eq!(
        owner_of(as_admin.get("labelled").await.unwrap()).as_deref(),
        Some("mallory"),
        "a refused relabel was stored"
    );
    // Its other labels stay the pod creator's to change.
    let other = json!({"metadata": {"labels": {"app": "renamed"}}});
    let patched = as_mallory
        .patch("labelled", &PatchParams::default(), &Patch::Merge(&other))
        .await
        .unwrap();
    assert_eq!(patched.labels()["app"], "renamed");

    // Created with a sidecar but without the label (so the webhook never saw it): it cannot
    // gain one.
    let unlabelled = with_proxy_sidecar(sandbox_pod("unlabelled", None), "bob");
    as_mallory
        .create(&PostParams::default(), &unlabelled)
        .await
        .unwrap();
    refused_by(
        as_mallory
            .patch(
                "unlabelled",
                &PatchParams::default(),
                &Patch::Merge(&relabel(Some("bob"))),
            )
            .await,
        &policy,
    );
    assert_eq!(owner_of(as_admin.get("unlabelled").await.unwrap()), None);

    // A pod without the sidecar is not the feed's business: its owner label may change.
    as_mallory
        .create(
            &PostParams::default(),
            &sandbox_pod("plain", Some("mallory")),
        )
        .await
        .unwrap();
    let moved = as_mallory
        .patch(
            "plain",
            &PatchParams::default(),
            &Patch::Merge(&relabel(Some("bob"))),
        )
        .await
        .unwrap();
    assert_eq!(owner_of(moved).as_deref(), Some("bob"));

    // A pod given a pod-scoped Secret keeps its owner too: the operator keeps that Secret
    // while pods of its owner name it.
    let mut given = sandbox_pod("given", Some("mallory"));
    given.metadata.annotations = Some(
        [(
            SECRET_NAME_ANNOTATION.to_owned(),
            format!("{POD_SECRET_NAME_PREFIX}given"),
        )]
        .into(),
    );
    as_mallory
        .create(&PostParams::default(), &given)
        .await
        .unwrap();
    let message = refused_by(
        as_mallory
            .patch(
                "given",
                &PatchParams::default(),
                &Patch::Merge(&relabel(Some("bob"))),
            )
            .await,
        &policy,
    );
    assert!(
        message.contains("agentsecrets.io/secret-name, whose Secret is kept"),
        "{message}"
    );
}
