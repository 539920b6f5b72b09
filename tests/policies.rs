//! The three ValidatingAdmissionPolicies shipped in `manifests/agent-secrets.yaml` (rendered
//! from the chart by `python3 hack/helm.py render`), compiled and evaluated locally with
//! kube-cel against objects of the shape a real API server sends (the recorded AdmissionReviews
//! in `tests/fixtures/admission/`, changed per case). The text under test is the shipped text:
//! a typo in a field name, a variable or a function of a policy fails a test here.
//!
//! What this cannot check: the API server's own type checking against the OpenAPI schemas and
//! its cost accounting; `tests/cluster/policies.rs` runs the same policies on a real one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use agent_secrets::api::{
    OWNER_LABEL, POD_SCOPED_LABEL, POD_SECRET_NAME_PREFIX, SECRET_NAME_ANNOTATION,
};
use kube_cel::{
    AdmissionRequest, GroupVersionKind, GroupVersionResource, VapEvaluator, VapExpression,
};
use serde::Deserialize as _;
use serde_json::{Value, json};
use std::path::Path;

/// The reserved name prefix of pod-scoped Secrets, as the operator names them: every case
/// below uses it, so the policies and the operator cannot drift apart.
const PREFIX: &str = POD_SECRET_NAME_PREFIX;
/// The operator's username in the rendered manifests: release namespace and ServiceAccount
/// `agent-secrets`.
const OPERATOR: &str = "system:serviceaccount:agent-secrets:agent-secrets";
const NAMESPACE_CONTROLLER: &str = "system:serviceaccount:kube-system:namespace-controller";
const GARBAGE_COLLECTOR: &str = "system:serviceaccount:kube-system:generic-garbage-collector";

// ---------------------------------------------------------------------------------------
// The policies as shipped

/// One ValidatingAdmissionPolicy, its `variables` already substituted into every expression.
struct Policy {
    name: String,
    match_conditions: Vec<VapExpression>,
    validations: Vec<VapExpression>,
}

/// What the API server would do with a request.
#[derive(Debug, PartialEq)]
enum Decision {
    /// A matchCondition is false: the policy does not apply.
    NotEvaluated,
    Allowed,
    /// Every failed validation's message.
    Refused(Vec<String>),
}

impl Decision {
    fn refusal(&self) -> String {
        match self {
            Decision::Refused(messages) => messages.join("\n"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

fn manifests() -> Vec<Value> {
    documents("manifests/agent-secrets.yaml")
}

/// The YAML documents of the file at `path`.
fn documents(path: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(&read(path))
        .map(|document| serde_yaml::Value::deserialize(document).unwrap())
        .filter(|v| !v.is_null())
        .map(|v| serde_json::to_value(v).unwrap())
        .collect()
}

/// Replace every `variables.NAME` in `expression` with `(EXPRESSION OF NAME)`. kube-cel has no
/// `variables` support, so the policy's variables are inlined textually (the API server
/// evaluates each lazily once; inlining gives the same value, only more often). An unknown
/// variable is a typo in the policy and fails the test.
fn substitute(expression: &str, variables: &[(String, String)], policy: &str) -> String {
    const MARK: &str = "variables.";
    let mut out = String::with_capacity(expression.len());
    let mut rest = expression;
    while let Some(at) = rest.find(MARK) {
        let before = &rest[..at];
        let ident_before = before
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        out.push_str(before);
        let after = &rest[at + MARK.len()..];
        if ident_before {
            out.push_str(MARK);
            rest = after;
            continue;
        }
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..end];
        let (_, value) = variables
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("policy {policy} uses undefined variables.{name}"));
        out.push('(');
        out.push_str(value);
        out.push(')');
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// kube-cel escapes every object key the way Kubernetes escapes declared property names
/// (`.` as `__dot__`, `/` as `__slash__`, `-` as `__dash__`, `_` as `__`), map keys such as
/// label and annotation keys included, which the API server leaves as they are. So that
/// `'agentsecrets.io/owner' in object.metadata.labels` finds the label here as it does there,
/// the label and annotation keys the policies look up are written in that escaped form before
/// evaluation. A misspelt key in a policy stays misspelt and fails the tests.
fn as_kube_cel_sees_map_keys(expression: &str) -> String {
    let escape = |key: &str| {
        key.replace('_', "__")
            .replace('.', "__dot__")
            .replace('-', "__dash__")
            .replace('/', "__slash__")
    };
    let mut out = expression.to_owned();
    for key in [OWNER_LABEL, SECRET_NAME_ANNOTATION, POD_SCOPED_LABEL] {
        out = out.replace(&format!("'{key}'"), &format!("'{}'", escape(key)));
    }
    // The narrowed webhook selector's label keys, which the chart writes as JSON strings.
    for key in NARROWED_LABEL_KEYS {
        out = out.replace(&format!("\"{key}\""), &format!("\"{}\"", escape(key)));
    }
    out
}

/// The shipped policy whose name ends with `suffix`, with `overrides` replacing the
/// expressions of some variables (e.g. a list of administrators the manifests leave empty).
fn policy_with(suffix: &str, overrides: &[(&str, &str)]) -> Policy {
    policy_in(&manifests(), suffix, overrides)
}

/// The policy whose name ends with `suffix` among `docs`, as [`policy_with`].
fn policy_in(docs: &[Value], suffix: &str, overrides: &[(&str, &str)]) -> Policy {
    let object = docs
        .iter()
        .find(|d| {
            d["kind"] == "ValidatingAdmissionPolicy"
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(suffix))
        })
        .unwrap_or_else(|| panic!("no ValidatingAdmissionPolicy *{suffix}"));
    let name = object["metadata"]["name"].as_str().unwrap().to_owned();
    let spec = &object["spec"];
    let mut variables: Vec<(String, String)> = Vec::new();
    for variable in spec["variables"].as_array().into_iter().flatten() {
        let var_name = variable["name"].as_str().unwrap().to_owned();
        let expression = overrides
            .iter()
            .find(|(n, _)| *n == var_name)
            .map_or_else(|| variable["expression"].as_str().unwrap(), |(_, e)| *e);
        // A variable may use the ones declared before it.
        let inlined = substitute(expression, &variables, &name);
        variables.push((var_name, inlined));
    }
    for (overridden, _) in overrides {
        assert!(
            variables.iter().any(|(n, _)| n == overridden),
            "policy {name} has no variable {overridden} to override"
        );
    }
    let expression = |v: &Value, key: &str| {
        v[key]
            .as_str()
            .map(|e| as_kube_cel_sees_map_keys(&substitute(e, &variables, &name)))
    };
    let match_conditions = spec["matchConditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| VapExpression {
            expression: expression(c, "expression").unwrap(),
            message: None,
            message_expression: None,
        })
        .collect();
    let validations = spec["validations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| VapExpression {
            expression: expression(v, "expression").unwrap(),
            message: v["message"].as_str().map(str::to_owned),
            message_expression: expression(v, "messageExpression"),
        })
        .collect();
    Policy {
        name,
        match_conditions,
        validations,
    }
}

fn policy(suffix: &str) -> Policy {
    policy_with(suffix, &[])
}

fn pods_policy() -> Policy {
    policy("-pod-secret-references")
}

/// The label keys of the webhook.objectSelector `tests/rendered/narrowed-webhook-policies.yaml`
/// was rendered with (`NARROWED_VALUES` in hack/helm.py).
const NARROWED_LABEL_KEYS: [&str; 5] = [
    "sandbox.example.com/runtime",
    "sandbox.example.com/tier",
    "sandbox.example.com/legacy",
    "sandbox.example.com/pool",
    "sandbox.example.com/excluded",
];

const NARROWED: &str = "tests/rendered/narrowed-webhook-policies.yaml";

/// The pod reference policy as rendered with a narrowed webhook.objectSelector.
fn narrowed_pods_policy() -> Policy {
    policy_in(&documents(NARROWED), "-pod-secret-references", &[])
}

#[test]
fn the_narrowed_rendering_looks_up_exactly_the_label_keys_these_tests_escape() {
    // kube-cel sees label keys escaped; a key of the rendering missing here would be looked
    // up unescaped, never found, and quietly change what the tests below check.
    const LOOKUP: &str = " in object.metadata.labels";
    let text = read(NARROWED);
    let mut keys: Vec<&str> = text
        .match_indices(LOOKUP)
        .filter_map(|(at, _)| {
            let before = text[..at].strip_suffix('"')?;
            let start = before.rfind('"')?;
            Some(&before[start + 1..])
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut expected = NARROWED_LABEL_KEYS.to_vec();
    expected.sort_unstable();
    assert_eq!(keys, expected);
}

fn secrets_policy() -> Policy {
    policy("-pod-scoped-secrets")
}

fn owners_policy() -> Policy {
    policy("-agentsecret-owners")
}

/// kube-cel reports an expression that cannot be evaluated as a failed result with one of
/// these messages; the API server would refuse the request (failurePolicy Fail). In a test it
/// is a broken policy, never a decision.
fn assert_evaluated(policy: &Policy, result: &kube_cel::VapResult, has_message: bool) {
    if let Some(message) = &result.message {
        for broken in [
            "evaluation error:",
            "expression returned non-boolean",
            "failed to compile",
        ] {
            assert!(
                !message.starts_with(broken),
                "policy {}: {message}\nin: {}",
                policy.name,
                result.expression
            );
        }
        assert!(
            !has_message || !message.starts_with("validation expression '"),
            "policy {}: the messageExpression of a failed validation did not evaluate to a string\nin: {}",
            policy.name,
            result.expression
        );
    }
}

impl Policy {
    fn decide(
        &self,
        request: AdmissionRequest,
        object: Value,
        old_object: Option<Value>,
    ) -> Decision {
        let mut builder = VapEvaluator::builder().request(request).object(object);
        if let Some(old) = old_object {
            builder = builder.old_object(old);
        }
        let evaluator = builder.build();
        for result in evaluator.evaluate(&self.match_conditions) {
            assert_evaluated(self, &result, false);
            if !result.passed {
                return Decision::NotEvaluated;
            }
        }
        let mut refusals = Vec::new();
        for result in evaluator.evaluate(&self.validations) {
            assert_evaluated(self, &result, true);
            if !result.passed {
                refusals.push(result.message.unwrap());
            }
        }
        if refusals.is_empty() {
            Decision::Allowed
        } else {
            Decision::Refused(refusals)
        }
    }
}

// ---------------------------------------------------------------------------------------
// Recorded objects, changed per case

fn fixture(name: &str) -> Value {
    let text = read(&format!("tests/fixtures/admission/{name}.json"));
    let recorded: Value = serde_json::from_str(&text).unwrap();
    recorded["review"]["request"].clone()
}

/// The request as the policy sees it, from a recorded AdmissionReview request, with another
/// operation and requester.
fn request_as(
    recorded: &Value,
    operation: &str,
    username: &str,
    groups: &[&str],
) -> AdmissionRequest {
    let gvk = &recorded["kind"];
    let gvr = &recorded["resource"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    AdmissionRequest {
        operation: operation.to_owned(),
        username: username.to_owned(),
        uid: "1001".into(),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        name: text(&recorded["name"]),
        namespace: text(&recorded["namespace"]),
        dry_run: false,
        kind: GroupVersionKind {
            group: text(&gvk["group"]),
            version: text(&gvk["version"]),
            kind: text(&gvk["kind"]),
        },
        resource: GroupVersionResource {
            group: text(&gvr["group"]),
            version: text(&gvr["version"]),
            resource: text(&gvr["resource"]),
        },
    }
}

/// The request exactly as recorded (operation and userInfo included).
fn recorded_request(recorded: &Value) -> AdmissionRequest {
    let user = &recorded["userInfo"];
    let groups: Vec<&str> = user["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| g.as_str().unwrap())
        .collect();
    request_as(
        recorded,
        recorded["operation"].as_str().unwrap(),
        user["username"].as_str().unwrap(),
        &groups,
    )
}

/// The recorded sandbox pod created by an ordinary user (`dev`, group `dev-team`).
fn recorded_pod() -> (Value, Value) {
    let recorded = fixture("pod_create_by_non_admin_user");
    let pod = recorded["object"].clone();
    (recorded, pod)
}

fn pod_request(recorded: &Value, operation: &str) -> AdmissionRequest {
    request_as(recorded, operation, "mallory", &["system:authenticated"])
}

fn unlabelled(mut pod: Value) -> Value {
    pod["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove(OWNER_LABEL);
    pod
}

fn annotated(mut pod: Value, secret: &str) -> Value {
    pod["metadata"]["annotations"] = json!({ SECRET_NAME_ANNOTATION: secret });
    pod
}

fn env_secret_key_ref(secret: &str) -> Value {
    json!({"name": "X_BEARER_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "X_BEARER_TOKEN"}}})
}

fn with_env(mut pod: Value, env: Value) -> Value {
    pod["spec"]["containers"][0]["env"] = json!([{"name": "LOG_LEVEL", "value": "debug"}, env]);
    pod
}

fn with_env_from(mut pod: Value, secret: &str) -> Value {
    pod["spec"]["containers"][0]["envFrom"] = json!([{"secretRef": {"name": secret}}]);
    pod
}

fn with_volume(mut pod: Value, volume: Value) -> Value {
    pod["spec"]["volumes"].as_array_mut().unwrap().push(volume);
    pod
}

fn with_init_container(mut pod: Value, env: Value) -> Value {
    pod["spec"]["initContainers"] = json!([{"name": "setup", "image": "busybox", "env": [env]}]);
    pod
}

fn with_ephemeral_container(mut pod: Value, env: Value) -> Value {
    pod["spec"]["ephemeralContainers"] = json!([{"name": "debugger", "image": "busybox", "targetContainerName": "sandbox", "env": [env]}]);
    pod
}

fn pod_secret(suffix: &str) -> String {
    format!("{PREFIX}{suffix}")
}

/// A Secret of the shape the webhook creates (or a forger would).
fn secret(name: &str, labelled: bool) -> Value {
    let mut labels = json!({"app.kubernetes.io/managed-by": "agent-secrets", OWNER_LABEL: "bob"});
    if labelled {
        labels[POD_SCOPED_LABEL] = json!("true");
    }
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": "sandboxes", "labels": labels},
        "immutable": true,
        "type": "Opaque",
        "data": {"X_BEARER_TOKEN": "Zm9yZ2Vk"}
    })
}

fn secret_request(operation: &str, name: &str, username: &str) -> AdmissionRequest {
    let recorded = json!({
        "name": name, "namespace": "sandboxes",
        "kind": {"group": "", "version": "v1", "kind": "Secret"},
        "resource": {"group": "", "version": "v1", "resource": "secrets"}
    });
    request_as(&recorded, operation, username, &["system:authenticated"])
}

/// The recorded AgentSecret (`kubectl create`, owner bob) with the given owner, sealed as
/// stored.
fn agentsecret(owner: &str) -> (Value, Value) {
    let recorded = fixture("agentsecret_create_kubectl_create");
    let mut object = recorded["object"].clone();
    object["spec"]["owner"] = json!(owner);
    let spec = object["spec"].as_object_mut().unwrap();
    spec.remove("value");
    spec.insert(
        "sealed".into(),
        json!({"keyId": "k1", "wrappedKey": "AAAA", "nonce": "AAAA", "ciphertext": "AAAA"}),
    );
    (recorded, object)
}

fn owners_request(
    recorded: &Value,
    operation: &str,
    username: &str,
    groups: &[&str],
) -> AdmissionRequest {
    request_as(recorded, operation, username, groups)
}

// ---------------------------------------------------------------------------------------
// Every expression compiles

#[test]
fn every_shipped_expression_compiles() {
    let docs = manifests();
    let policies: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ValidatingAdmissionPolicy")
        .collect();
    assert_eq!(
        policies.len(),
        3,
        "expected three admission policies in manifests/"
    );
    let evaluator = VapEvaluator::builder().build();
    let mut count = 0;
    for policy in policies {
        let spec = &policy["spec"];
        let mut expressions = Vec::new();
        for key in ["variables", "matchConditions"] {
            for item in spec[key].as_array().into_iter().flatten() {
                expressions.push(item["expression"].as_str().unwrap().to_owned());
            }
        }
        for validation in spec["validations"].as_array().unwrap() {
            expressions.push(validation["expression"].as_str().unwrap().to_owned());
            if let Some(message) = validation["messageExpression"].as_str() {
                expressions.push(message.to_owned());
            }
        }
        let compiled = evaluator.compile_expressions(
            &expressions
                .iter()
                .map(|e| VapExpression {
                    expression: e.clone(),
                    message: None,
                    message_expression: None,
                })
                .collect::<Vec<_>>(),
        );
        for result in compiled {
            if let Err(error) = result {
                panic!("{}: {error}", policy["metadata"]["name"]);
            }
            count += 1;
        }
    }
    assert!(count > 15, "only {count} expressions found");
}

#[test]
fn every_policy_is_bound_with_deny_and_fails_closed() {
    let docs = manifests();
    for policy in docs
        .iter()
        .filter(|d| d["kind"] == "ValidatingAdmissionPolicy")
    {
        let name = &policy["metadata"]["name"];
        assert_eq!(policy["spec"]["failurePolicy"], "Fail", "{name}");
        let binding = docs
            .iter()
            .find(|d| {
                d["kind"] == "ValidatingAdmissionPolicyBinding" && d["spec"]["policyName"] == *name
            })
            .unwrap_or_else(|| panic!("no binding for {name}"));
        assert_eq!(
            binding["spec"]["validationActions"],
            json!(["Deny"]),
            "{name}"
        );
        assert!(
            binding["spec"].get("matchResources").is_none(),
            "{name} must be bound cluster-wide"
        );
    }
}

#[test]
fn shipped_policies_use_only_fields_of_the_admissionregistration_v1_api() {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    // A misspelt field would be dropped by the typed round trip (and ignored by the API server).
    fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(document: &Value) -> Value {
        serde_json::to_value(serde_json::from_value::<T>(document.clone()).unwrap()).unwrap()
    }
    let mut checked = 0;
    for document in manifests() {
        let typed = match document["kind"].as_str() {
            Some("ValidatingAdmissionPolicy") => round_trip::<ValidatingAdmissionPolicy>(&document),
            Some("ValidatingAdmissionPolicyBinding") => {
                round_trip::<ValidatingAdmissionPolicyBinding>(&document)
            }
            _ => continue,
        };
        assert_eq!(typed, document, "{}", document["metadata"]["name"]);
        // matchCondition names are qualified names: at most 63 characters, [-a-z0-9.] inside.
        for condition in document["spec"]["matchConditions"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let name = condition["name"].as_str().unwrap();
            assert!(
                name.len() <= 63
                    && name.chars().all(|c| c.is_ascii_lowercase()
                        || c.is_ascii_digit()
                        || c == '-'
                        || c == '.'),
                "matchCondition name {name:?}"
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 6, "three policies and three bindings");
}

// ---------------------------------------------------------------------------------------
// Pods: pod-scoped Secret references

#[test]
fn recorded_pods_are_allowed() {
    let policy = pods_policy();
    for name in [
        "pod_create_by_non_admin_user",
        "pod_create_by_replicaset_controller",
        "pod_create_by_service_account",
        "pod_create_generate_name_multi_container_subset",
        "pod_create_named",
        "pod_create_server_dry_run",
    ] {
        let recorded = fixture(name);
        let decision = policy.decide(
            recorded_request(&recorded),
            recorded["object"].clone(),
            None,
        );
        assert_eq!(decision, Decision::Allowed, "{name}");
    }
}

#[test]
fn unlabelled_pod_using_a_pod_scoped_secret_through_env_secret_key_ref_is_refused() {
    let (recorded, pod) = recorded_pod();
    let pod = with_env(unlabelled(pod), env_secret_key_ref(&pod_secret("x")));
    let decision = pods_policy().decide(pod_request(&recorded, "CREATE"), pod, None);
    assert!(decision.refusal().contains("asec-pod-x"), "{decision:?}");
}

#[test]
fn unlabelled_pod_using_a_pod_scoped_secret_through_env_from_is_refused() {
    let (recorded, pod) = recorded_pod();
    let pod = with_env_from(unlabelled(pod), &pod_secret("x"));
    let decision = pods_policy().decide(pod_request(&recorded, "CREATE"), pod, None);
    assert!(decision.refusal().contains("asec-pod-x"), "{decision:?}");
}

#[test]
fn unlabelled_pod_mounting_a_pod_scoped_secret_volume_is_refused() {
    let (recorded, pod) = recorded_pod();
    let volume = json!({"name": "stolen", "secret": {"secretName": pod_secret("x")}});
    let pod = with_volume(unlabelled(pod), volume);
    let decision = pods_policy().decide(pod_request(&recorded, "CREATE"), pod, None);
    assert!(
        decision
            .refusal()
            .contains(r#"volume "stolen" uses Secret asec-pod-x"#),
        "{decision:?}"
    );
}

#[test]
fn unlabelled_pod_mounting_a_pod_scoped_secret_through_a_projected_volume_is_refused() {
    let (recorded, pod) = recorded_pod();
    let volume = json!({"name": "bundle", "projected": {"sources": [
        {"configMap": {"name": "settings"}},
        {"secret": {"name": pod_secret("x"), "items": [{"key": "X_BEARER_TOKEN", "path": "token"}]}}
    ]}});
    let pod = with_volume(unlabelled(pod), volume);
    let decision = pods_policy().decide(pod_request(&recorded, "CREATE"), pod, None);
    assert!(
        decision
            .refusal()
            .contains(r#"volume "bundle" uses Secret asec-pod-x"#),
        "{decision:?}"
    );
}

#[test]
fn unlabelled_pod_using_a_pod_scoped_secret_in_an_init_container_is_refused() {
    let (recorded, pod) = recorded_pod();
    let pod = with_init_container(unlabelled(pod), env_secret_key_ref(&pod_secret("x")));
    let decision = pods_policy().decide(pod_request(&recorded, "CREATE"), pod, None);
    assert!(
        decision
            .refusal()
            .contains(r#"init container "setup" uses Secret asec-pod-x"#),
        "{decision:?}"
    );
}

#[test]
fn every_env_reference_kind_in_every_container_kind_is_refused_naming_the_container() {
    let (recorded, pod) = recorded_pod();
    let policy = pods_policy();
    let secret = pod_secret("x");
    let container = |reference: &str| {
        let mut c = json!({"name": "c1", "image": "busybox"});
        match reference {
            "env" => c["env"] = json!([env_secret_key_ref(&secret)]),
            _ => c["envFrom"] = json!([{"prefix": "A_", "secretRef": {"name": secret}}]),
        }
        c
    };
    for (field, kind) in [
        ("containers", "container"),
        ("initContainers", "init container"),
        ("ephemeralContainers", "ephemeral container"),
    ] {
        for reference in ["env", "envFrom"] {
            let mut forged = unlabelled(pod.clone());
            if field == "containers" {
                forged["spec"]["containers"]
                    .as_array_mut()
                    .unwrap()
                    .push(container(reference));
            } else {
                forged["spec"][field] = json!([container(reference)]);
            }
            let message = policy
                .decide(pod_request(&recorded, "CREATE"), forged, None)
                .refusal();
            assert!(
                message.starts_with(&format!(r#"{kind} "c1" uses Secret asec-pod-x. "#)),
                "{field} {reference}: {message}"
            );
        }
    }
}

#[test]
fn refusal_names_the_container_and_the_secret_and_states_the_rule() {
    let (recorded, pod) = recorded_pod();
    let pod = with_env(unlabelled(pod), env_secret_key_ref(&pod_secret("x")));
    let message = pods_policy()
        .decide(pod_request(&recorded, "CREATE"), pod, None)
        .refusal();
    assert!(
        message.starts_with(r#"container "sandbox" uses Secret asec-pod-x. "#),
        "{message}"
    );
    assert!(
        message.contains(OWNER_LABEL) && message.contains(SECRET_NAME_ANNOTATION),
        "{message}"
    );
}

#[test]
fn labelled_pod_annotated_with_the_secret_it_uses_is_allowed() {
    let (recorded, pod) = recorded_pod();
    let name = pod_secret("k3j5abcdefghijklmnopqrstuv");
    let pod = with_env(annotated(pod, &name), env_secret_key_ref(&name));
    let pod = with_volume(pod, json!({"name": "own", "secret": {"secretName": name}}));
    let decision = pods_policy().decide(pod_request(&recorded, "CREATE"), pod, None);
    assert_eq!(decision, Decision::Allowed);
}

/// A labelled sandbox pod annotated with and using its pod-scoped Secret, with `labels` added.
fn own_secret_pod_labelled(labels: &[(&str, &str)]) -> (Value, Value, String) {
    let (recorded, mut pod) = recorded_pod();
    for (key, value) in labels {
        pod["metadata"]["labels"][*key] = json!(value);
    }
    let name = pod_secret("k3j5abcdefghijklmnopqrstuv");
    let pod = with_env(annotated(pod, &name), env_secret_key_ref(&name));
    (recorded, pod, name)
}

/// Labels that match the narrowed selector: its label, an allowed tier, a pool.
const CALLED: [(&str, &str); 3] = [
    ("sandbox.example.com/runtime", "gvisor"),
    ("sandbox.example.com/tier", "agents"),
    ("sandbox.example.com/pool", "p1"),
];

#[test]
fn with_a_narrowed_webhook_selector_a_pod_it_selects_uses_its_secret() {
    let (recorded, pod, _) = own_secret_pod_labelled(&CALLED);
    let decision = narrowed_pods_policy().decide(pod_request(&recorded, "CREATE"), pod, None);
    assert_eq!(decision, Decision::Allowed);
    // NotIn matches another value as it matches no value.
    let mut labels = CALLED.to_vec();
    labels.push(("sandbox.example.com/legacy", "false"));
    let (recorded, pod, _) = own_secret_pod_labelled(&labels);
    let decision = narrowed_pods_policy().decide(pod_request(&recorded, "CREATE"), pod, None);
    assert_eq!(decision, Decision::Allowed);
}

#[test]
fn with_a_narrowed_webhook_selector_a_pod_the_webhook_never_sees_uses_no_pod_scoped_secret() {
    // Each way of falling outside the selector: the webhook never checked that the annotated
    // name is the owner's, so the name could be another owner's, copied from a sibling pod.
    let without = |key: &str| -> Vec<(&str, &str)> {
        CALLED.iter().copied().filter(|(k, _)| *k != key).collect()
    };
    let with = |key: &'static str, value: &'static str| -> Vec<(&str, &str)> {
        let mut labels: Vec<(&str, &str)> =
            CALLED.iter().copied().filter(|(k, _)| *k != key).collect();
        labels.push((key, value));
        labels
    };
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "matchLabels key missing",
            without("sandbox.example.com/runtime"),
        ),
        (
            "matchLabels value differs",
            with("sandbox.example.com/runtime", "runc"),
        ),
        ("In: key missing", without("sandbox.example.com/tier")),
        (
            "In: value not listed",
            with("sandbox.example.com/tier", "system"),
        ),
        (
            "NotIn: value listed",
            with("sandbox.example.com/legacy", "true"),
        ),
        ("Exists: key missing", without("sandbox.example.com/pool")),
        (
            "DoesNotExist: key present",
            with("sandbox.example.com/excluded", ""),
        ),
    ];
    for (case, labels) in cases {
        let (recorded, pod, name) = own_secret_pod_labelled(&labels);
        let decision = narrowed_pods_policy().decide(pod_request(&recorded, "CREATE"), pod, None);
        let refusal = decision.refusal();
        assert!(refusal.contains(&name), "{case}: {refusal}");
        assert!(
            refusal.contains("matches the pod selector of the agent-secrets webhook"),
            "{case}: {refusal}"
        );
    }
}

#[test]
fn with_a_narrowed_webhook_selector_only_a_pod_it_selects_may_carry_the_proxy_sidecar() {
    let (recorded, pod, _) = own_secret_pod_labelled(&[]);
    let refusal = narrowed_pods_policy()
        .decide(
            pod_request(&recorded, "CREATE"),
            with_proxy_sidecar(pod),
            None,
        )
        .refusal();
    assert!(
        refusal.contains("Only a pod the agent-secrets webhook is called for"),
        "{refusal}"
    );
    let (recorded, pod, _) = own_secret_pod_labelled(&CALLED);
    let decision = narrowed_pods_policy().decide(
        pod_request(&recorded, "CREATE"),
        with_proxy_sidecar(pod),
        None,
    );
    assert_eq!(decision, Decision::Allowed);
}

#[test]
fn with_a_narrowed_webhook_selector_a_pod_given_a_secret_cannot_be_relabelled_across_it() {
    let (recorded, outside, name) = own_secret_pod_labelled(&[]);
    let (_, inside, _) = own_secret_pod_labelled(&CALLED);
    let policy = narrowed_pods_policy();
    // Into the selector: a pod the webhook never saw, annotated with a name it copied, would
    // then be granted that Secret (here through an ephemeral container added at once).
    let claimed = with_ephemeral_container(inside.clone(), env_secret_key_ref(&name));
    for after in [inside.clone(), claimed] {
        let refusal = policy
            .decide(
                pod_request(&recorded, "UPDATE"),
                after,
                Some(outside.clone()),
            )
            .refusal();
        assert!(
            refusal.contains("cannot be relabelled into or out of"),
            "{refusal}"
        );
    }
    // Out of it.
    let refusal = policy
        .decide(
            pod_request(&recorded, "UPDATE"),
            outside.clone(),
            Some(inside.clone()),
        )
        .refusal();
    assert!(
        refusal.contains("cannot be relabelled into or out of"),
        "{refusal}"
    );
    // Labels that leave the selector's verdict alone are not looked at.
    let mut relabelled = inside.clone();
    relabelled["metadata"]["labels"]["extra"] = json!("1");
    assert_eq!(
        policy.decide(pod_request(&recorded, "UPDATE"), relabelled, Some(inside)),
        Decision::NotEvaluated
    );
    // A status update of a sidecar pod inside the selector (the kubelet's) is not looked at.
    let (_, sidecar_pod, _) = own_secret_pod_labelled(&CALLED);
    let sidecar_pod = with_proxy_sidecar(sidecar_pod);
    let mut reported = sidecar_pod.clone();
    reported["status"] = json!({"phase": "Running"});
    assert_eq!(
        policy.decide(
            pod_request(&recorded, "UPDATE"),
            reported,
            Some(sidecar_pod)
        ),
        Decision::NotEvaluated
    );
    // A pod with neither a Secret nor a sidecar may move freely.
    let (recorded, plain_outside) = recorded_pod();
    let mut plain_inside = plain_outside.clone();
    for (key, value) in CALLED {
        plain_inside["metadata"]["labels"][key] = json!(value);
    }
    assert_eq!(
        policy.decide(
            pod_request(&recorded, "UPDATE"),
            plain_inside,
            Some(plain_outside)
        ),
        Decision::NotEvaluated
    );
}

#[test]
fn labelled_pod_annotated_with_another_secret_name_is_refused() {
    let (recorded, pod) = recorded_pod();
    let pod = with_env(
        annotated(pod, &pod_secret("mine")),
        env_secret_key_ref(&pod_secret("bobs")),
    );
    let refusal = pods_policy()
        .decide(pod_request(&recorded, "CREATE"), pod, None)
        .refusal();
    assert!(refusal.contains("asec-pod-bobs"), "{refusal}");
    // The shipped webhook selects every labelled pod: the rule names no selector.
    assert!(
        refusal.contains("labelled agentsecrets.io/owner and annotated"),
        "{refusal}"
    );
    assert!(!refusal.contains("selector"), "{refusal}");
}

#[test]
fn annotated_pod_without_the_owner_label_is_refused() {
    let (recorded, pod) = recorded_pod();
    let name = pod_secret("x");
    let pod = with_env(annotated(unlabelled(pod), &name), env_secret_key_ref(&name));
    let decision = pods_policy().decide(pod_request(&recorded, "CREATE"), pod, None);
    assert!(decision.refusal().contains("asec-pod-x"), "{decision:?}");
}

#[test]
fn labelled_pod_using_its_own_and_a_second_pod_scoped_secret_is_refused() {
    let (recorded, pod) = recorded_pod();
    let own = pod_secret("mine");
    let pod = with_env(annotated(pod, &own), env_secret_key_ref(&own));
    let pod = with_env_from(pod, &pod_secret("bobs"));
    let message = pods_policy()
        .decide(pod_request(&recorded, "CREATE"), pod, None)
        .refusal();
    assert!(
        message.contains("asec-pod-bobs") && !message.contains("asec-pod-mine"),
        "{message}"
    );
}

#[test]
fn pod_using_ordinary_secrets_is_allowed() {
    let (recorded, pod) = recorded_pod();
    let pod = with_env(unlabelled(pod), env_secret_key_ref("database-credentials"));
    let pod = with_env_from(pod, "api-keys");
    let pod = with_volume(
        pod,
        json!({"name": "tls", "secret": {"secretName": "asec-podcast-tls"}}),
    );
    let decision = pods_policy().decide(pod_request(&recorded, "CREATE"), pod, None);
    assert_eq!(decision, Decision::Allowed);
}

#[test]
fn ephemeral_container_using_a_pod_scoped_secret_added_to_a_running_pod_is_refused() {
    let (recorded, pod) = recorded_pod();
    let running = annotated(pod, &pod_secret("mine"));
    let updated =
        with_ephemeral_container(running.clone(), env_secret_key_ref(&pod_secret("bobs")));
    let decision = pods_policy().decide(pod_request(&recorded, "UPDATE"), updated, Some(running));
    assert!(
        decision
            .refusal()
            .contains(r#"ephemeral container "debugger" uses Secret asec-pod-bobs"#),
        "{decision:?}"
    );
}

#[test]
fn ephemeral_container_using_the_pods_own_secret_is_allowed() {
    let (recorded, pod) = recorded_pod();
    let own = pod_secret("mine");
    let running = annotated(pod, &own);
    let updated = with_ephemeral_container(running.clone(), env_secret_key_ref(&own));
    let decision = pods_policy().decide(pod_request(&recorded, "UPDATE"), updated, Some(running));
    assert_eq!(decision, Decision::Allowed);
}

#[test]
fn changing_the_secret_name_annotation_of_a_running_pod_is_refused() {
    let (recorded, pod) = recorded_pod();
    let running = annotated(pod, &pod_secret("mine"));
    let updated = annotated(running.clone(), &pod_secret("bobs"));
    let message = pods_policy()
        .decide(pod_request(&recorded, "UPDATE"), updated, Some(running))
        .refusal();
    assert!(
        message.contains("cannot be added, changed or removed"),
        "{message}"
    );
}

#[test]
fn adding_the_secret_name_annotation_to_a_running_pod_is_refused() {
    let (recorded, running) = recorded_pod();
    let updated = annotated(running.clone(), &pod_secret("bobs"));
    let decision = pods_policy().decide(pod_request(&recorded, "UPDATE"), updated, Some(running));
    assert!(matches!(decision, Decision::Refused(_)), "{decision:?}");
}

#[test]
fn ordinary_pod_updates_are_not_evaluated() {
    let recorded = fixture("pod_update_label");
    let decision = pods_policy().decide(
        recorded_request(&recorded),
        recorded["object"].clone(),
        Some(recorded["oldObject"].clone()),
    );
    assert_eq!(decision, Decision::NotEvaluated);
}

// ---------------------------------------------------------------------------------------
// Secretless pods: only the proxy sidecar holds the feed token, and its pod keeps its owner

/// `pod` with the secretless proxy sidecar and its feed-token volume, as the webhook adds them.
fn with_proxy_sidecar(mut pod: Value) -> Value {
    pod["spec"]["initContainers"] = json!([{
        "name": "agentsecrets-proxy", "image": "agent-secrets:1", "restartPolicy": "Always",
        "volumeMounts": [{"name": "agentsecrets-feed-token", "mountPath": "/var/run/agentsecrets/feed-token", "readOnly": true}]
    }]);
    pod["spec"]["volumes"].as_array_mut().unwrap().push(json!({
        "name": "agentsecrets-feed-token",
        "projected": {"sources": [{"serviceAccountToken": {"audience": "agentsecrets.io/feed", "path": "token"}}]}
    }));
    pod
}

fn mounting_feed_token(mut container: Value) -> Value {
    container["volumeMounts"] =
        json!([{"name": "agentsecrets-feed-token", "mountPath": "/t", "readOnly": true}]);
    container
}

#[test]
fn a_secretless_pod_whose_sidecar_alone_mounts_the_feed_token_is_allowed() {
    let (recorded, pod) = recorded_pod();
    let decision = pods_policy().decide(
        pod_request(&recorded, "CREATE"),
        with_proxy_sidecar(pod),
        None,
    );
    assert_eq!(decision, Decision::Allowed);
}

#[test]
fn any_other_container_mounting_the_feed_token_is_refused() {
    let (recorded, pod) = recorded_pod();
    let pod = with_proxy_sidecar(pod);
    let mut sandbox = pod.clone();
    sandbox["spec"]["containers"][0] =
        mounting_feed_token(sandbox["spec"]["containers"][0].clone());
    let mut init = pod.clone();
    init["spec"]["initContainers"]
        .as_array_mut()
        .unwrap()
        .push(mounting_feed_token(
            json!({"name": "setup", "image": "busybox"}),
        ));
    for (what, candidate) in [("sandbox container", sandbox), ("init container", init)] {
        let message = pods_policy()
            .decide(pod_request(&recorded, "CREATE"), candidate, None)
            .refusal();
        assert!(
            message.contains("Only the agent-secrets proxy sidecar"),
            "{what}: {message}"
        );
    }
    // Added later, as a debugging container of the running pod.
    let mut debugged = pod.clone();
    debugged["spec"]["ephemeralContainers"] = json!([mounting_feed_token(
        json!({"name": "debugger", "image": "busybox", "targetContainerName": "sandbox"})
    )]);
    let message = pods_policy()
        .decide(pod_request(&recorded, "UPDATE"), debugged, Some(pod))
        .refusal();
    assert!(message.contains("may mount"), "{message}");
}

#[test]
fn a_pod_with_the_proxy_sidecar_cannot_gain_or_change_its_owner_label() {
    let (recorded, pod) = recorded_pod();
    let created_unlabelled = with_proxy_sidecar(unlabelled(pod.clone()));
    let labelled = with_proxy_sidecar(pod);
    let mut other_owner = labelled.clone();
    other_owner["metadata"]["labels"][OWNER_LABEL] = json!("bob");
    for (before, after) in [
        (created_unlabelled.clone(), labelled.clone()),
        (labelled.clone(), other_owner),
        (labelled.clone(), created_unlabelled),
    ] {
        let message = pods_policy()
            .decide(pod_request(&recorded, "UPDATE"), after, Some(before))
            .refusal();
        assert!(
            message.contains("agentsecrets.io/owner cannot be added, changed or removed"),
            "{message}"
        );
    }
    // Other label changes of a sidecar pod are not looked at.
    let mut relabelled = labelled.clone();
    relabelled["metadata"]["labels"]["extra"] = json!("1");
    let decision =
        pods_policy().decide(pod_request(&recorded, "UPDATE"), relabelled, Some(labelled));
    assert_eq!(decision, Decision::NotEvaluated);
}

#[test]
fn a_pod_given_a_pod_scoped_secret_cannot_change_or_lose_its_owner_label() {
    let (recorded, pod) = recorded_pod();
    let mut given = pod;
    given["metadata"]["annotations"] = json!({SECRET_NAME_ANNOTATION: pod_secret("alice")});
    let mut other_owner = given.clone();
    other_owner["metadata"]["labels"][OWNER_LABEL] = json!("bob");
    let unlabelled = unlabelled(given.clone());
    for after in [other_owner, unlabelled] {
        let message = pods_policy()
            .decide(pod_request(&recorded, "UPDATE"), after, Some(given.clone()))
            .refusal();
        assert!(
            message.contains("agentsecrets.io/owner cannot be added, changed or removed"),
            "{message}"
        );
    }
    // Other label changes are not looked at.
    let mut relabelled = given.clone();
    relabelled["metadata"]["labels"]["extra"] = json!("1");
    let decision = pods_policy().decide(pod_request(&recorded, "UPDATE"), relabelled, Some(given));
    assert_eq!(decision, Decision::NotEvaluated);
}

// ---------------------------------------------------------------------------------------
// Secrets: only the operator writes pod-scoped ones

#[test]
fn user_creating_a_secret_named_with_the_pod_scoped_prefix_is_refused() {
    let name = pod_secret("x");
    let decision = secrets_policy().decide(
        secret_request("CREATE", &name, "mallory"),
        secret(&name, false),
        None,
    );
    let message = decision.refusal();
    assert!(
        message.contains(r#"Secret "asec-pod-x" is pod-scoped"#) && message.contains(OPERATOR),
        "{message}"
    );
}

#[test]
fn user_creating_a_secret_with_a_generate_name_in_the_pod_scoped_prefix_is_refused() {
    let mut object = secret("", false);
    object["metadata"] = json!({"generateName": PREFIX, "namespace": "sandboxes"});
    let decision = secrets_policy().decide(secret_request("CREATE", "", "mallory"), object, None);
    assert!(
        decision.refusal().contains(r#"Secret "asec-pod-*""#),
        "{decision:?}"
    );
}

#[test]
fn user_creating_a_secret_labelled_pod_scoped_is_refused() {
    let decision = secrets_policy().decide(
        secret_request("CREATE", "innocent", "mallory"),
        secret("innocent", true),
        None,
    );
    assert!(matches!(decision, Decision::Refused(_)), "{decision:?}");
}

#[test]
fn user_removing_the_pod_scoped_label_is_refused() {
    let stored = secret("innocent", true);
    let decision = secrets_policy().decide(
        secret_request("UPDATE", "innocent", "mallory"),
        secret("innocent", false),
        Some(stored),
    );
    assert!(matches!(decision, Decision::Refused(_)), "{decision:?}");
}

#[test]
fn user_deleting_a_pod_scoped_secret_is_refused() {
    let name = pod_secret("x");
    let decision = secrets_policy().decide(
        secret_request("DELETE", &name, "mallory"),
        Value::Null,
        Some(secret(&name, true)),
    );
    assert!(
        decision.refusal().contains("may DELETE it, not mallory"),
        "{decision:?}"
    );
}

#[test]
fn operator_creating_a_pod_scoped_secret_is_allowed() {
    let name = pod_secret("x");
    let decision = secrets_policy().decide(
        secret_request("CREATE", &name, OPERATOR),
        secret(&name, true),
        None,
    );
    assert_eq!(decision, Decision::Allowed);
}

#[test]
fn operator_updating_and_deleting_a_pod_scoped_secret_is_allowed() {
    let name = pod_secret("x");
    let stored = secret(&name, true);
    let mut adopted = stored.clone();
    adopted["metadata"]["ownerReferences"] =
        json!([{"apiVersion": "v1", "kind": "Pod", "name": "sandbox", "uid": "u"}]);
    let policy = secrets_policy();
    let update = policy.decide(
        secret_request("UPDATE", &name, OPERATOR),
        adopted,
        Some(stored.clone()),
    );
    let delete = policy.decide(
        secret_request("DELETE", &name, OPERATOR),
        Value::Null,
        Some(stored),
    );
    assert_eq!((update, delete), (Decision::Allowed, Decision::Allowed));
}

#[test]
fn namespace_controller_deleting_a_pod_scoped_secret_is_allowed() {
    let name = pod_secret("x");
    let decision = secrets_policy().decide(
        secret_request("DELETE", &name, NAMESPACE_CONTROLLER),
        Value::Null,
        Some(secret(&name, true)),
    );
    assert_eq!(decision, Decision::Allowed);
}

#[test]
fn garbage_collector_deleting_a_pod_scoped_secret_is_allowed() {
    let name = pod_secret("x");
    let decision = secrets_policy().decide(
        secret_request("DELETE", &name, GARBAGE_COLLECTOR),
        Value::Null,
        Some(secret(&name, true)),
    );
    assert_eq!(decision, Decision::Allowed);
}

#[test]
fn system_controllers_creating_a_pod_scoped_secret_are_refused() {
    let name = pod_secret("x");
    let policy = secrets_policy();
    for username in [NAMESPACE_CONTROLLER, GARBAGE_COLLECTOR] {
        let decision = policy.decide(
            secret_request("CREATE", &name, username),
            secret(&name, true),
            None,
        );
        assert!(
            matches!(decision, Decision::Refused(_)),
            "{username}: {decision:?}"
        );
    }
}

#[test]
fn namespace_controller_updating_a_pod_scoped_secret_is_refused() {
    let name = pod_secret("x");
    let stored = secret(&name, true);
    let decision = secrets_policy().decide(
        secret_request("UPDATE", &name, NAMESPACE_CONTROLLER),
        stored.clone(),
        Some(stored),
    );
    assert!(matches!(decision, Decision::Refused(_)), "{decision:?}");
}

#[test]
fn ordinary_secrets_are_not_evaluated() {
    let decision = secrets_policy().decide(
        secret_request("CREATE", "database-credentials", "mallory"),
        secret("database-credentials", false),
        None,
    );
    assert_eq!(decision, Decision::NotEvaluated);
}

// ---------------------------------------------------------------------------------------
// AgentSecrets: owner binding

#[test]
fn alice_creating_an_agentsecret_owned_by_bob_is_refused() {
    let (recorded, object) = agentsecret("bob");
    let decision = owners_policy().decide(
        owners_request(&recorded, "CREATE", "alice", &["system:authenticated"]),
        object,
        None,
    );
    let message = decision.refusal();
    assert!(
        message.starts_with(r#"alice may not CREATE an AgentSecret of owner "bob""#),
        "{message}"
    );
}

#[test]
fn alice_creating_her_own_agentsecret_is_allowed() {
    let (recorded, object) = agentsecret("alice");
    let decision = owners_policy().decide(
        owners_request(&recorded, "CREATE", "alice", &["system:authenticated"]),
        object,
        None,
    );
    assert_eq!(decision, Decision::Allowed);
}

#[test]
fn member_of_the_owners_group_is_allowed() {
    let (recorded, object) = agentsecret("bob");
    let decision = owners_policy().decide(
        owners_request(
            &recorded,
            "CREATE",
            "bobs-laptop",
            &["agentsecrets.io/owner:bob", "system:authenticated"],
        ),
        object,
        None,
    );
    assert_eq!(decision, Decision::Allowed);
}

#[test]
fn member_of_another_owners_group_is_refused() {
    let (recorded, object) = agentsecret("bob");
    let decision = owners_policy().decide(
        owners_request(
            &recorded,
            "CREATE",
            "alice",
            &["agentsecrets.io/owner:alice", "bob"],
        ),
        object,
        None,
    );
    assert!(matches!(decision, Decision::Refused(_)), "{decision:?}");
}

#[test]
fn secret_administrator_by_username_is_allowed() {
    let policy = policy_with(
        "-agentsecret-owners",
        &[(
            "administratorUsernames",
            r#"["system:serviceaccount:platform:secrets-api"]"#,
        )],
    );
    let (recorded, object) = agentsecret("bob");
    let admin = owners_request(
        &recorded,
        "CREATE",
        "system:serviceaccount:platform:secrets-api",
        &[],
    );
    let other = owners_request(
        &recorded,
        "CREATE",
        "system:serviceaccount:platform:other",
        &[],
    );
    assert_eq!(
        policy.decide(admin, object.clone(), None),
        Decision::Allowed
    );
    assert!(matches!(
        policy.decide(other, object, None),
        Decision::Refused(_)
    ));
}

#[test]
fn secret_administrator_by_group_is_allowed() {
    let policy = policy_with(
        "-agentsecret-owners",
        &[("administratorGroups", r#"["platform-admins"]"#)],
    );
    let (recorded, object) = agentsecret("bob");
    let decision = policy.decide(
        owners_request(
            &recorded,
            "DELETE",
            "carol",
            &["platform-admins", "system:authenticated"],
        ),
        Value::Null,
        Some(object),
    );
    assert_eq!(decision, Decision::Allowed);
}

#[test]
fn alice_deleting_bobs_agentsecret_is_refused() {
    let recorded = fixture("agentsecret_delete");
    let mut stored = recorded["oldObject"].clone();
    stored["spec"]["owner"] = json!("bob");
    let decision = owners_policy().decide(
        owners_request(&recorded, "DELETE", "alice", &["system:authenticated"]),
        Value::Null,
        Some(stored),
    );
    assert!(
        decision
            .refusal()
            .starts_with(r#"alice may not DELETE an AgentSecret of owner "bob""#),
        "{decision:?}"
    );
}

#[test]
fn alice_deleting_her_own_agentsecret_is_allowed() {
    // The recorded DELETE of an AgentSecret owned by alice.
    let recorded = fixture("agentsecret_delete");
    assert_eq!(recorded["oldObject"]["spec"]["owner"], "alice");
    let decision = owners_policy().decide(
        owners_request(&recorded, "DELETE", "alice", &["system:authenticated"]),
        Value::Null,
        Some(recorded["oldObject"].clone()),
    );
    assert_eq!(decision, Decision::Allowed);
}

#[test]
fn alice_updating_bobs_agentsecret_is_refused() {
    let (recorded, stored) = agentsecret("bob");
    let mut updated = stored.clone();
    updated["spec"]["envName"] = json!("NODE_OPTIONS_X");
    let decision = owners_policy().decide(
        owners_request(&recorded, "UPDATE", "alice", &["system:authenticated"]),
        updated,
        Some(stored),
    );
    assert!(matches!(decision, Decision::Refused(_)), "{decision:?}");
}

#[test]
fn alice_taking_over_bobs_agentsecret_by_changing_its_owner_is_refused() {
    let (recorded, stored) = agentsecret("bob");
    let (_, taken) = agentsecret("alice");
    let decision = owners_policy().decide(
        owners_request(&recorded, "UPDATE", "alice", &["system:authenticated"]),
        taken,
        Some(stored),
    );
    assert!(
        decision.refusal().contains(r#"owner "alice", "bob""#),
        "{decision:?}"
    );
}

#[test]
fn operator_updating_any_agentsecret_is_allowed() {
    let (recorded, stored) = agentsecret("bob");
    let mut rewrapped = stored.clone();
    rewrapped["spec"]["sealed"]["keyId"] = json!("k2");
    let decision = owners_policy().decide(
        owners_request(&recorded, "UPDATE", OPERATOR, &["system:serviceaccounts"]),
        rewrapped,
        Some(stored),
    );
    assert_eq!(decision, Decision::Allowed);
}

#[test]
fn namespace_controller_and_garbage_collector_deleting_an_agentsecret_are_allowed() {
    let (recorded, stored) = agentsecret("bob");
    let policy = owners_policy();
    for username in [NAMESPACE_CONTROLLER, GARBAGE_COLLECTOR] {
        let decision = policy.decide(
            owners_request(&recorded, "DELETE", username, &["system:serviceaccounts"]),
            Value::Null,
            Some(stored.clone()),
        );
        assert_eq!(decision, Decision::Allowed, "{username}");
    }
}

#[test]
fn namespace_controller_creating_an_agentsecret_is_refused() {
    let (recorded, object) = agentsecret("bob");
    let decision = owners_policy().decide(
        owners_request(
            &recorded,
            "CREATE",
            NAMESPACE_CONTROLLER,
            &["system:serviceaccounts"],
        ),
        object,
        None,
    );
    assert!(matches!(decision, Decision::Refused(_)), "{decision:?}");
}

#[test]
fn username_prefix_maps_the_owner_to_the_prefixed_username() {
    let policy = policy_with("-agentsecret-owners", &[("usernamePrefix", r#""oidc:""#)]);
    let (recorded, object) = agentsecret("alice");
    let prefixed = owners_request(&recorded, "CREATE", "oidc:alice", &[]);
    let bare = owners_request(&recorded, "CREATE", "alice", &[]);
    assert_eq!(
        policy.decide(prefixed, object.clone(), None),
        Decision::Allowed
    );
    assert!(
        policy
            .decide(bare, object, None)
            .refusal()
            .contains("(user oidc:alice,")
    );
}

#[test]
fn agentsecret_without_an_owner_is_refused() {
    let (recorded, mut object) = agentsecret("alice");
    object["spec"].as_object_mut().unwrap().remove("owner");
    // Even for a user whose name is exactly the username prefix plus nothing.
    let decision =
        owners_policy().decide(owners_request(&recorded, "CREATE", "", &[]), object, None);
    assert!(matches!(decision, Decision::Refused(_)), "{decision:?}");
}
