//! Secretless sandboxes over the real HTTPS server with the recorded pod reviews: the proxy
//! runs as a native sidecar holding the placeholders, the sandbox containers get placeholders
//! (never values, never a `secretKeyRef`) and trust the proxy's CA read-only, no pod-scoped
//! Secret is written for them, and what the pod holds under agent-secrets' reserved names is
//! refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common {
    pub mod answers;
    pub mod client;
    pub mod fixtures;
    pub mod keyring;
    pub mod server;
}

use agent_secrets::api::{
    INJECTED_ANNOTATION, MODE_ANNOTATION, PROXY_CONTAINER_NAME, PROXY_PLACEHOLDERS_ENV,
    SECRET_NAME_ANNOTATION, SECRETLESS_ANNOTATION,
};
use agent_secrets::crypto::Keyring;
use agent_secrets::testing::{agent_secret, secretless_agent_secret};
use agent_secrets::webhook::Policy;
use agent_secrets::webhook::pod::secretless::{SANDBOX_ENV, feed_url};
use agent_secrets::webhook::pod::{FeedCa, NamespaceSet, SecretlessPolicy, Unscoped};
use common::answers::patched;
use common::fixtures::{
    ALICE_NOTION, ALICE_OPENAI, ALICE_X, BOB_PG, BOB_X, NAMESPACE, fixture, fixture_policy,
};
use common::server::{Setup, TestServer};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

const FEED_CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBfeedca\n-----END CERTIFICATE-----\n";
const PROXY_IMAGE: &str = "registry.example/agent-secrets:1.2.3";

/// alice's X and Notion secrets are bound to hosts; her OpenAI key is not.
fn secrets(keyring: &Keyring) -> Vec<agent_secrets::api::AgentSecret> {
    vec![
        secretless_agent_secret(
            NAMESPACE,
            "x-bearer-token",
            "alice",
            "X_BEARER_TOKEN",
            keyring,
            ALICE_X,
            &["api.x.com"],
        ),
        secretless_agent_secret(
            NAMESPACE,
            "notion-api-key",
            "alice",
            "NOTION_API_KEY",
            keyring,
            ALICE_NOTION,
            &["api.notion.com"],
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
    ]
}

fn secretless_policy() -> Policy {
    let mut policy = fixture_policy();
    policy.secretless = SecretlessPolicy {
        proxy_image: Some(PROXY_IMAGE.into()),
        feed_url: Some(feed_url("agent-secrets.agent-secrets.svc")),
        feed_ca: FeedCa::Pem(Arc::from(FEED_CA)),
        ..SecretlessPolicy::default()
    };
    policy
}

async fn serve(policy: Policy) -> TestServer {
    let keyring = Keyring::generate("test-kek").unwrap();
    TestServer::start(Setup {
        policy,
        secrets: Some(secrets(&keyring)),
        keyring,
        ..Setup::default()
    })
    .await
}

/// The multi-container review (sandbox + browser, an init container, asking for alice's X and
/// Notion secrets), annotated secretless.
fn secretless_review() -> (String, Value) {
    let (path, mut review) = fixture("pod_create_generate_name_multi_container_subset.json");
    review["request"]["object"]["metadata"]["annotations"][MODE_ANNOTATION] = json!("secretless");
    (path, review)
}

fn allowed(answer: &Value) {
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
}

fn denied_with(answer: &Value, needle: &str) {
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains(needle), "{message}");
}

fn env_of(container: &Value) -> BTreeMap<String, Value> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e.clone()))
        .collect()
}

fn sidecar_placeholders(pod: &Value) -> BTreeMap<String, String> {
    let proxy = &pod["spec"]["initContainers"][0];
    assert_eq!(proxy["name"], PROXY_CONTAINER_NAME);
    let env = env_of(proxy);
    serde_json::from_str(env[PROXY_PLACEHOLDERS_ENV]["value"].as_str().unwrap()).unwrap()
}

fn assert_no_canary(text: &str) {
    for canary in [ALICE_X, ALICE_NOTION, ALICE_OPENAI, BOB_X, BOB_PG] {
        assert!(!text.contains(canary), "a value leaked: {canary}");
    }
}

#[tokio::test]
async fn a_secretless_pod_gets_the_proxy_sidecar_and_placeholders_only() {
    let server = serve(secretless_policy()).await;
    let (path, review) = secretless_review();
    let answer = server.review(&path, &review).await;
    allowed(&answer);
    assert_no_canary(&answer.to_string());
    let pod = patched(&review["request"]["object"], &answer);
    assert_no_canary(&pod.to_string());

    // The proxy: a native sidecar, first among the init containers, fed by the operator.
    let init = pod["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(init.len(), 2);
    let proxy = &init[0];
    assert_eq!(proxy["name"], PROXY_CONTAINER_NAME);
    assert_eq!(init[1]["name"], "fetch-workspace");
    assert_eq!(proxy["image"], PROXY_IMAGE);
    assert_eq!(proxy["restartPolicy"], "Always");
    assert_eq!(
        proxy["args"],
        json!([
            "proxy",
            "--listen=127.0.0.1:15080",
            "--admin-listen=0.0.0.0:15081",
            "--ca-bundle=/var/run/agentsecrets/ca/ca-bundle.pem",
            "--feed-url=https://agent-secrets.agent-secrets.svc:8444/v1/feed",
            "--feed-token-file=/var/run/agentsecrets/feed-token/token"
        ])
    );
    let proxy_env = env_of(proxy);
    assert_eq!(proxy_env["AGENTSECRETS_PROXY_FEED_CA"]["value"], FEED_CA);
    assert_eq!(proxy_env["AGENTSECRETS_PROXY_EGRESS"]["value"], "open");
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(proxy["startupProbe"]["httpGet"]["port"], 15081);
    assert_eq!(proxy["startupProbe"]["periodSeconds"], 1);
    assert_eq!(proxy["startupProbe"]["failureThreshold"], 60);
    assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(proxy["securityContext"]["runAsNonRoot"], true);
    assert_eq!(proxy["securityContext"]["readOnlyRootFilesystem"], true);

    let placeholders = sidecar_placeholders(&pod);
    assert_eq!(
        placeholders.keys().collect::<Vec<_>>(),
        ["NOTION_API_KEY", "X_BEARER_TOKEN"]
    );
    for placeholder in placeholders.values() {
        assert!(placeholder.starts_with("asec_ph_") && placeholder.len() == 40);
    }

    // Every sandbox container: the placeholders as plain values, the proxy, the CA read-only.
    for container in pod["spec"]["containers"].as_array().unwrap() {
        let env = env_of(container);
        for (name, placeholder) in &placeholders {
            // The recorded sandbox container sets X_BEARER_TOKEN itself, which wins.
            if container["name"] == "sandbox" && name == "X_BEARER_TOKEN" {
                assert_eq!(env[name]["value"], "set-by-pod-spec");
                continue;
            }
            assert_eq!(env[name], json!({"name": name, "value": placeholder}));
        }
        for (name, value) in SANDBOX_ENV {
            assert_eq!(env[*name]["value"], *value, "{name}");
        }
        assert!(
            !container.to_string().contains("secretKeyRef"),
            "{container}"
        );
        let mounts = container["volumeMounts"].as_array().unwrap();
        assert!(mounts.contains(&json!({
            "name": "agentsecrets-ca", "mountPath": "/var/run/agentsecrets/ca", "readOnly": true
        })));
        assert!(!container.to_string().contains("agentsecrets-feed-token"));
    }
    // Init containers are left alone without the inject-init-containers annotation.
    assert!(!init[1].to_string().contains("asec_ph_"));
    let volumes: Vec<&str> = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(volumes.contains(&"agentsecrets-ca") && volumes.contains(&"agentsecrets-feed-token"));

    // No value left the webhook: no pod-scoped Secret, and none named.
    assert!(server.created().is_empty());
    let annotations = &pod["metadata"]["annotations"];
    assert!(annotations.get(SECRET_NAME_ANNOTATION).is_none());
    assert_eq!(
        annotations[INJECTED_ANNOTATION],
        "NOTION_API_KEY,X_BEARER_TOKEN"
    );
    assert_eq!(
        annotations[SECRETLESS_ANNOTATION],
        "NOTION_API_KEY,X_BEARER_TOKEN"
    );
    assert_eq!(
        annotations["agentsecrets.io/skipped"],
        "sandbox/X_BEARER_TOKEN"
    );
    assert_eq!(server.state.metrics.injected_secrets.get(), 2);
}

#[tokio::test]
async fn placeholders_differ_per_pod() {
    let server = serve(secretless_policy()).await;
    let (path, first) = secretless_review();
    let mut second = first.clone();
    second["request"]["uid"] = json!("00000000-0000-0000-0000-000000000002");
    let a = patched(
        &first["request"]["object"],
        &server.review(&path, &first).await,
    );
    let b = patched(
        &second["request"]["object"],
        &server.review(&path, &second).await,
    );
    let (a, b) = (sidecar_placeholders(&a), sidecar_placeholders(&b));
    for name in a.keys() {
        assert_ne!(a[name], b[name], "{name}");
    }
}

#[tokio::test]
async fn a_reinvocation_keeps_the_shape_of_the_first_call() {
    let server = serve(secretless_policy()).await;
    let (path, review) = secretless_review();
    let first = patched(
        &review["request"]["object"],
        &server.review(&path, &review).await,
    );
    // A later webhook adds a container; the API server calls again with the same uid.
    let mut again = review.clone();
    let mut object = first.clone();
    object["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "late", "image": "sidecar:1"}));
    again["request"]["object"] = object.clone();
    let answer = server.review(&path, &again).await;
    allowed(&answer);
    let second = patched(&object, &answer);
    assert_eq!(sidecar_placeholders(&second), sidecar_placeholders(&first));
    assert_eq!(
        second["spec"]["initContainers"],
        first["spec"]["initContainers"]
    );
    assert_eq!(second["spec"]["volumes"], first["spec"]["volumes"]);
    for i in 0..2 {
        assert_eq!(
            second["spec"]["containers"][i], first["spec"]["containers"][i],
            "unchanged"
        );
    }
    // The late container gets the same placeholders.
    let late = env_of(&second["spec"]["containers"][2]);
    for (name, placeholder) in sidecar_placeholders(&first) {
        assert_eq!(late[&name]["value"], placeholder.as_str());
    }
    assert!(server.created().is_empty());
}

#[tokio::test]
async fn a_secret_without_allowed_hosts_refuses_the_pod_by_default() {
    let server = serve(secretless_policy()).await;
    let (path, mut review) = secretless_review();
    review["request"]["object"]["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("agentsecrets.io/secrets");
    let answer = server.review(&path, &review).await;
    denied_with(&answer, "\"openai-api-key\" (OPENAI_API_KEY)");
    denied_with(&answer, "no spec.allowedHosts");
    assert!(server.created().is_empty());
}

#[tokio::test]
async fn with_unscoped_env_a_secret_without_allowed_hosts_keeps_the_env_path() {
    let mut policy = secretless_policy();
    policy.secretless.unscoped = Unscoped::Env;
    let server = serve(policy).await;
    let (path, mut review) = secretless_review();
    review["request"]["object"]["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove("agentsecrets.io/secrets");
    let answer = server.review(&path, &review).await;
    allowed(&answer);
    let pod = patched(&review["request"]["object"], &answer);
    let placeholders = sidecar_placeholders(&pod);
    assert_eq!(
        placeholders.keys().collect::<Vec<_>>(),
        ["NOTION_API_KEY", "X_BEARER_TOKEN"]
    );
    let browser = env_of(&pod["spec"]["containers"][1]);
    assert!(browser["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"].is_object());
    assert_eq!(
        browser["X_BEARER_TOKEN"]["value"],
        placeholders["X_BEARER_TOKEN"].as_str()
    );
    // The pod-scoped Secret holds the unscoped value only.
    let created = server.created();
    assert_eq!(created.len(), 1);
    let keys: Vec<&String> = created[0].data.as_ref().unwrap().keys().collect();
    assert_eq!(keys, ["OPENAI_API_KEY"]);
    assert_eq!(
        pod["metadata"]["annotations"][INJECTED_ANNOTATION],
        "NOTION_API_KEY,OPENAI_API_KEY,X_BEARER_TOKEN"
    );
}

#[tokio::test]
async fn reserved_volumes_mounts_and_containers_are_refused() {
    let server = serve(secretless_policy()).await;
    let (path, review) = secretless_review();
    let cases: [(&str, Value, &str); 3] = [
        (
            "/spec/volumes/-",
            json!({"name": "agentsecrets-ca", "emptyDir": {}}),
            "volume \"agentsecrets-ca\" uses a name reserved",
        ),
        (
            "/spec/containers/0/volumeMounts/-",
            json!({"name": "agentsecrets-feed-token", "mountPath": "/t"}),
            "mounts volume \"agentsecrets-feed-token\"",
        ),
        (
            "/spec/initContainers/-",
            json!({"name": "agentsecrets-proxy", "image": "attacker/image"}),
            "container agentsecrets-proxy is reserved",
        ),
    ];
    for (at, value, needle) in cases {
        for secretless in [true, false] {
            let mut forged = review.clone();
            if !secretless {
                forged["request"]["object"]["metadata"]["annotations"]
                    .as_object_mut()
                    .unwrap()
                    .remove(MODE_ANNOTATION);
            }
            let patch: json_patch::Patch = serde_json::from_value(json!([
                {"op": "add", "path": format!("/request/object{at}"), "value": value}
            ]))
            .unwrap();
            json_patch::patch(&mut forged, &patch).unwrap();
            denied_with(&server.review(&path, &forged).await, needle);
        }
    }
    assert!(server.created().is_empty());
}

#[tokio::test]
async fn secretless_namespaces_make_the_mode_mandatory() {
    let mut policy = secretless_policy();
    policy.secretless.namespaces = NamespaceSet::parse([NAMESPACE.to_owned()]);
    let server = serve(policy).await;
    // No annotation: secretless all the same.
    let (path, mut review) = fixture("pod_create_generate_name_multi_container_subset.json");
    let pod = patched(
        &review["request"]["object"],
        &server.review(&path, &review).await,
    );
    assert_eq!(sidecar_placeholders(&pod).len(), 2);
    review["request"]["object"]["metadata"]["annotations"][MODE_ANNOTATION] = json!("env");
    denied_with(
        &server.review(&path, &review).await,
        "requires secretless sandboxes",
    );
}

#[tokio::test]
async fn without_a_readable_feed_ca_secretless_pods_are_refused_clearly() {
    let mut policy = secretless_policy();
    policy.secretless.feed_ca = FeedCa::file("/nonexistent/agentsecrets/ca.crt".into());
    let server = serve(policy).await;
    let (path, review) = secretless_review();
    let answer = server.review(&path, &review).await;
    denied_with(&answer, "secretless sandboxes cannot be admitted");
    denied_with(&answer, "/nonexistent/agentsecrets/ca.crt cannot be read");
    // Env-mode pods are not affected.
    let (path, review) = fixture("pod_create_named.json");
    allowed(&server.review(&path, &review).await);
}

#[tokio::test]
async fn init_containers_get_placeholders_only_when_asked_and_the_proxy_never_does() {
    let server = serve(secretless_policy()).await;
    let (path, mut review) = secretless_review();
    review["request"]["object"]["metadata"]["annotations"]["agentsecrets.io/inject-init-containers"] =
        json!("true");
    let answer = server.review(&path, &review).await;
    allowed(&answer);
    let pod = patched(&review["request"]["object"], &answer);
    let placeholders = sidecar_placeholders(&pod);
    let fetch = &pod["spec"]["initContainers"][1];
    assert_eq!(fetch["name"], "fetch-workspace");
    let env = env_of(fetch);
    for (name, placeholder) in &placeholders {
        assert_eq!(env[name]["value"], placeholder.as_str());
    }
    assert_eq!(env["HTTPS_PROXY"]["value"], "http://127.0.0.1:15080");
    let proxy_env = env_of(&pod["spec"]["initContainers"][0]);
    let names: Vec<&str> = proxy_env.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "AGENTSECRETS_PROXY_EGRESS",
            "AGENTSECRETS_PROXY_FEED_CA",
            "AGENTSECRETS_PROXY_OWNER",
            "AGENTSECRETS_PROXY_PLACEHOLDERS"
        ],
        "the proxy gets its own env only, none of the sandbox's"
    );
    assert_eq!(proxy_env["AGENTSECRETS_PROXY_OWNER"]["value"], "alice");
    // Called again with the first call's result, the shape stands.
    let mut again = review.clone();
    again["request"]["object"] = pod.clone();
    let second = patched(&pod, &server.review(&path, &again).await);
    assert_eq!(second, pod);
}

#[tokio::test]
async fn a_secretless_pod_without_placeholder_secrets_needs_no_proxy_configuration() {
    let mut policy = secretless_policy();
    policy.secretless.unscoped = Unscoped::Env;
    policy.secretless.proxy_image = None;
    policy.secretless.feed_ca = FeedCa::file("/nonexistent/agentsecrets/ca.crt".into());
    let server = serve(policy).await;
    // bob's only secret has no allowedHosts: it goes by env, and no sidecar is added.
    let (path, mut review) = fixture("pod_create_named.json");
    let object = &mut review["request"]["object"];
    object["metadata"]["labels"]["agentsecrets.io/owner"] = json!("bob");
    object["metadata"]["annotations"][MODE_ANNOTATION] = json!("secretless");
    let answer = server.review(&path, &review).await;
    allowed(&answer);
    let pod = patched(&review["request"]["object"], &answer);
    assert!(pod["spec"].get("initContainers").is_none(), "{pod}");
    assert!(
        env_of(&pod["spec"]["containers"][0])["X_BEARER_TOKEN"]["valueFrom"]["secretKeyRef"]
            .is_object()
    );
    assert_eq!(server.created().len(), 1);
}

#[tokio::test]
async fn binding_a_secret_to_hosts_reseals_its_value_for_them() {
    let server = serve(secretless_policy()).await;
    let (path, mut review) = fixture("agentsecret_update_replace_without_value.json");
    // The stored object: bob's POSTGRES_PASSWORD, sealed without constraints.
    let keyring = common::keyring::keyring(&server);
    let stored = agent_secrets::testing::sealed(
        &keyring,
        NAMESPACE,
        "bob",
        "POSTGRES_PASSWORD",
        "the-password",
    );
    let old = &mut review["request"]["oldObject"]["spec"];
    old.as_object_mut().unwrap().remove("value");
    old["sealed"] = serde_json::to_value(&stored).unwrap();
    // The update binds it to a host and a header, and gives no value.
    let spec = &mut review["request"]["object"]["spec"];
    spec["allowedHosts"] = json!(["db.example.com"]);
    spec["injectAs"] = json!(["header:X-Db-Password"]);
    let answer = server.review(&path, &review).await;
    allowed(&answer);
    let updated: agent_secrets::api::AgentSecret =
        serde_json::from_value(patched(&review["request"]["object"], &answer)).unwrap();
    let resealed = updated.spec.sealed.clone().unwrap();
    assert_ne!(resealed, stored);
    let constraints = updated.spec.constraints();
    let bound = updated.spec.seal_context(NAMESPACE, &constraints);
    assert_eq!(
        resealed.open(&keyring, bound).unwrap().expose(),
        b"the-password"
    );
    assert!(
        resealed
            .open(&keyring, updated.spec.seal_context(NAMESPACE, ""))
            .is_err(),
        "bound to the hosts"
    );

    // A host the proxy could not parse is refused, as the CRD would.
    review["request"]["object"]["spec"]["allowedHosts"] = json!(["https://db.example.com/"]);
    let answer = server.review(&path, &review).await;
    denied_with(
        &answer,
        "spec.allowedHosts entry \"https://db.example.com/\"",
    );
}
