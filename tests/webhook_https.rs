//! Every AdmissionReview recorded from a real API server, driven through the real HTTPS
//! server, with the exact answer asserted: allowed or denied, and what the patch does.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common {
    pub mod answers;
    pub mod client;
    pub mod fixtures;
    pub mod injections;
    pub mod keyring;
    pub mod sealing;
    pub mod serve;
    pub mod server;
}

use agent_secrets::api::SealedValue;
use agent_secrets::crypto::{Keyring, SealContext};
use agent_secrets::testing::agent_secret;
use agent_secrets::webhook::{Policy, Principal};
use common::answers::patched;
use common::fixtures::*;
use common::injections::{annotation, secret_values};
use common::keyring::keyring;
use common::sealing::seal_old_object;
use common::serve::serve;
use common::server::{Setup, TestServer};
use serde_json::{Value, json};
use std::collections::BTreeMap;

fn sealed_of(object: &Value) -> SealedValue {
    serde_json::from_value(object["spec"]["sealed"].clone()).unwrap()
}

fn env_name_of(object: &Value) -> &str {
    object["spec"]["envName"].as_str().unwrap()
}

fn opens_to(keyring: &Keyring, object: &Value, owner: &str) -> String {
    let ctx = SealContext::new(NAMESPACE, owner, env_name_of(object));
    let plain = sealed_of(object).open(keyring, ctx).unwrap();
    String::from_utf8(plain.expose().to_vec()).unwrap()
}

fn assert_no_fixture_plaintext(value: &Value) {
    let text = value.to_string();
    assert!(
        !text.contains("fixture-plaintext"),
        "plaintext left in {text}"
    );
}

fn assert_allowed_unchanged(answer: &Value) {
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert!(answer["response"].get("patch").is_none(), "{answer}");
}

fn last_applied(object: &Value) -> Value {
    let text =
        object["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .as_str()
            .unwrap();
    serde_json::from_str(text).unwrap()
}

#[tokio::test]
async fn client_side_apply_create_is_sealed_and_scrubbed_from_last_applied() {
    let server = serve(fixture_policy()).await;
    let (path, review) = fixture("agentsecret_create_client_side_apply.json");
    let answer = server.review(&path, &review).await;
    let response = &answer["response"];
    assert_eq!(response["allowed"], true);
    assert_eq!(response["uid"], review["request"]["uid"]);
    assert_eq!(response["patchType"], "JSONPatch");

    let original = &review["request"]["object"];
    let stored = patched(original, &answer);
    assert_no_fixture_plaintext(&stored);
    assert!(stored["spec"].get("value").is_none());
    assert_eq!(
        opens_to(&keyring(&server), &stored, "alice"),
        "fixture-plaintext-AAAAXXXX"
    );
    assert_eq!(stored["spec"]["sealed"]["keyId"], "test-kek");
    // Everything else is as the user wrote it.
    assert_eq!(stored["spec"]["envName"], "X_BEARER_TOKEN");
    assert_eq!(
        stored["spec"]["description"],
        original["spec"]["description"]
    );
    assert_eq!(
        stored["metadata"]["managedFields"],
        original["metadata"]["managedFields"]
    );
    // The annotation stays valid JSON without the value, so the next apply still merges.
    let mut expected = last_applied(original);
    expected["spec"].as_object_mut().unwrap().remove("value");
    assert_eq!(last_applied(&stored), expected);
    assert!(
        stored["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .as_str()
            .unwrap()
            .ends_with('\n')
    );
}

#[tokio::test]
async fn kubectl_create_and_server_side_apply_are_sealed() {
    let server = serve(fixture_policy()).await;
    for (file, owner, plaintext) in [
        (
            "agentsecret_create_kubectl_create.json",
            "bob",
            "fixture-plaintext-pg",
        ),
        (
            "agentsecret_create_server_side_apply.json",
            "alice",
            "fixture-plaintext-notion",
        ),
    ] {
        let (path, mut review) = fixture(file);
        // The cache already holds an object of this name with this env name: it is this
        // object, not a duplicate.
        review["request"]["object"]["spec"]["value"] = json!(plaintext);
        let answer = server.review(&path, &review).await;
        assert_eq!(answer["response"]["allowed"], true, "{file}: {answer}");
        let stored = patched(&review["request"]["object"], &answer);
        assert_no_fixture_plaintext(&stored);
        assert!(stored["spec"].get("value").is_none());
        assert_eq!(
            opens_to(&keyring(&server), &stored, owner),
            plaintext,
            "{file}"
        );
        // Bound to its owner and env name: it opens for nobody and nothing else.
        for (who, env_name) in [("mallory", env_name_of(&stored)), (owner, "OTHER_NAME")] {
            let ctx = SealContext::new(NAMESPACE, who, env_name);
            assert!(sealed_of(&stored).open(&keyring(&server), ctx).is_err());
        }
    }
}

#[tokio::test]
async fn server_dry_run_create_gets_the_same_sealing_patch() {
    let server = serve(fixture_policy()).await;
    let (path, review) = fixture("agentsecret_create_server_dry_run.json");
    assert_eq!(review["request"]["dryRun"], true);
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], true);
    let stored = patched(&review["request"]["object"], &answer);
    assert_no_fixture_plaintext(&stored);
    assert!(stored["spec"]["sealed"].is_object());
    assert!(server.created().is_empty());
}

#[tokio::test]
async fn reapplying_the_same_value_keeps_the_stored_sealed_value() {
    let server = serve(fixture_policy()).await;
    let (path, mut review) = fixture("agentsecret_update_client_side_apply_same_value.json");
    let old_value = seal_old_object(&mut review, &keyring(&server), None);
    assert_eq!(
        review["request"]["object"]["spec"]["value"].as_str(),
        Some(old_value.as_str())
    );
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], true);
    let stored = patched(&review["request"]["object"], &answer);
    assert_no_fixture_plaintext(&stored);
    assert_eq!(
        stored["spec"]["sealed"], review["request"]["oldObject"]["spec"]["sealed"],
        "same value: the stored sealed value is kept byte for byte"
    );
    assert_eq!(
        stored["spec"]["description"],
        "X/Twitter API Bearer Token for search"
    );
    assert!(last_applied(&stored)["spec"].get("value").is_none());
}

#[tokio::test]
async fn merge_patch_with_a_new_value_reseals() {
    let server = serve(fixture_policy()).await;
    let (path, mut review) = fixture("agentsecret_update_merge_patch_new_value.json");
    let new_value = review["request"]["object"]["spec"]["value"]
        .as_str()
        .unwrap()
        .to_owned();
    let old_value = seal_old_object(&mut review, &keyring(&server), None);
    assert_ne!(new_value, old_value);
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], true);
    let stored = patched(&review["request"]["object"], &answer);
    assert_no_fixture_plaintext(&stored);
    assert_ne!(
        stored["spec"]["sealed"],
        review["request"]["oldObject"]["spec"]["sealed"]
    );
    assert_eq!(opens_to(&keyring(&server), &stored, "bob"), new_value);
}

#[tokio::test]
async fn replace_without_value_keeps_the_stored_sealed_value() {
    let server = serve(fixture_policy()).await;
    let (path, mut review) = fixture("agentsecret_update_replace_without_value.json");
    assert!(review["request"]["object"]["spec"].get("value").is_none());
    assert!(review["request"]["object"]["spec"].get("sealed").is_none());
    let old_value = seal_old_object(&mut review, &keyring(&server), None);
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], true);
    let stored = patched(&review["request"]["object"], &answer);
    assert_eq!(
        stored["spec"]["sealed"],
        review["request"]["oldObject"]["spec"]["sealed"]
    );
    assert_eq!(opens_to(&keyring(&server), &stored, "bob"), old_value);
    assert_eq!(
        stored["spec"]["description"],
        "DB password (rotated description)"
    );
}

#[tokio::test]
async fn agentsecret_delete_passes_untouched() {
    let server = serve(fixture_policy()).await;
    let (path, review) = fixture("agentsecret_delete.json");
    assert!(review["request"]["object"].is_null());
    let answer = server.review(&path, &review).await;
    assert_allowed_unchanged(&answer);
}

#[tokio::test]
async fn a_sealed_value_that_does_not_open_is_denied() {
    let server = serve(fixture_policy()).await;
    let (path, mut review) = fixture("agentsecret_create_kubectl_create.json");
    // A blob sealed for alice, pasted into bob's object.
    let env_name = env_name_of(&review["request"]["object"]).to_owned();
    let foreign =
        agent_secrets::testing::sealed(&keyring(&server), NAMESPACE, "alice", &env_name, "stolen");
    let spec = review["request"]["object"]["spec"].as_object_mut().unwrap();
    spec.remove("value");
    spec.insert("sealed".into(), serde_json::to_value(&foreign).unwrap());
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("spec.sealed does not open"), "{message}");
    assert!(message.contains("\"bob\""), "{message}");

    // The same for an unknown key id.
    let mut unknown = foreign.clone();
    unknown.key_id = "retired-kek".into();
    review["request"]["object"]["spec"]["sealed"] = serde_json::to_value(&unknown).unwrap();
    let answer = server.review(&path, &review).await;
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("\"retired-kek\" is not in the keyring"),
        "{message}"
    );
}

#[tokio::test]
async fn a_duplicate_env_name_for_the_owner_is_denied_naming_the_other_secret() {
    let server = serve(fixture_policy()).await;
    let (path, mut review) = fixture("agentsecret_create_kubectl_create.json");
    // bob already has X_BEARER_TOKEN as "bob-x-bearer-token".
    review["request"]["object"]["spec"]["envName"] = json!("X_BEARER_TOKEN");
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("X_BEARER_TOKEN") && message.contains("bob-x-bearer-token"),
        "{message}"
    );
    assert!(!message.contains("fixture-plaintext"));
}

#[tokio::test]
async fn an_update_keeping_its_env_name_is_not_refused_as_a_duplicate() {
    let server = serve(fixture_policy()).await;
    // bob already has X_BEARER_TOKEN as "bob-x-bearer-token"; suppose a second one raced in.
    let (path, mut review) = fixture("agentsecret_update_replace_without_value.json");
    seal_old_object(&mut review, &keyring(&server), None);
    for object in ["object", "oldObject"] {
        review["request"][object]["spec"]["envName"] = json!("X_BEARER_TOKEN");
    }
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    // Renaming onto a taken name is still refused.
    review["request"]["oldObject"]["spec"]["envName"] = json!("POSTGRES_PASSWORD");
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
}

#[tokio::test]
async fn configured_reserved_env_names_are_denied() {
    let policy = Policy {
        extra_reserved_env_names: vec!["NODE_OPTIONS".into()],
        ..fixture_policy()
    };
    let server = serve(policy).await;
    let (path, mut review) = fixture("agentsecret_create_kubectl_create.json");
    review["request"]["object"]["spec"]["envName"] = json!("NODE_OPTIONS");
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], false);
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("reserved")
    );
}

#[tokio::test]
async fn create_without_any_value_is_denied() {
    let server = serve(fixture_policy()).await;
    let (path, mut review) = fixture("agentsecret_create_kubectl_create.json");
    review["request"]["object"]["spec"]["value"] = json!("");
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], false);
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("spec.value is required")
    );
}

// ---------------------------------------------------------------------------------------
// Pods

fn env_of(pod: &Value, container: &str) -> Vec<Value> {
    pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == container)
        .unwrap()["env"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn secret_ref(name: &str, secret: &str) -> Value {
    json!({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": name}}})
}

#[tokio::test]
async fn a_named_sandbox_pod_gets_its_owners_secrets_by_reference() {
    let server = serve(fixture_policy()).await;
    let (path, review) = fixture("pod_create_named.json");
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    let pod = patched(&review["request"]["object"], &answer);

    let created = server.created();
    assert_eq!(created.len(), 1);
    let secret = &created[0];
    let secret_name = secret.metadata.name.clone().unwrap();
    // Named from its owner, content and window, under the prefix only the operator may use.
    assert!(secret_name.starts_with("asec-pod-"), "{secret_name}");
    assert_eq!(secret.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(secret.immutable, Some(true));
    let labels = secret.metadata.labels.as_ref().unwrap();
    assert_eq!(labels["agentsecrets.io/owner"], "alice");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "agent-secrets");
    assert_eq!(labels["agentsecrets.io/pod-scoped"], "true");
    // Reused by alice's next sandboxes until the end of the current window.
    let annotations = secret.metadata.annotations.as_ref().unwrap();
    let until: k8s_openapi::jiff::Timestamp =
        annotations["agentsecrets.io/reuse-until"].parse().unwrap();
    let now = k8s_openapi::jiff::Timestamp::now();
    assert!(until > now, "{until}");
    let window = fixture_policy().pod_secret_reuse_window;
    assert!(
        until <= now + k8s_openapi::jiff::SignedDuration::try_from(window).unwrap(),
        "{until}"
    );
    // Exactly alice's secrets in this namespace: not bob's, not alice's in "other".
    assert_eq!(
        secret_values(secret),
        BTreeMap::from([
            ("NOTION_API_KEY".to_owned(), ALICE_NOTION.to_owned()),
            ("OPENAI_API_KEY".to_owned(), ALICE_OPENAI.to_owned()),
            ("X_BEARER_TOKEN".to_owned(), ALICE_X.to_owned()),
        ])
    );

    assert_eq!(
        env_of(&pod, "sandbox"),
        vec![
            secret_ref("NOTION_API_KEY", &secret_name),
            secret_ref("OPENAI_API_KEY", &secret_name),
            secret_ref("X_BEARER_TOKEN", &secret_name),
        ]
    );
    assert_eq!(
        annotation(&pod, "agentsecrets.io/injected"),
        "NOTION_API_KEY,OPENAI_API_KEY,X_BEARER_TOKEN"
    );
    assert_eq!(annotation(&pod, "agentsecrets.io/secret-name"), secret_name);
    assert_eq!(annotation(&pod, "agentsecrets.io/skipped"), "");
    // The rest of the pod is untouched.
    let mut rest = pod.clone();
    rest["spec"]["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("env");
    rest["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    assert_eq!(rest, review["request"]["object"]);
    for (.., canary) in STANDARD_SECRETS {
        assert!(!answer.to_string().contains(canary));
    }
}

#[tokio::test]
async fn a_generate_name_pod_gets_the_requested_subset_and_its_own_env_wins() {
    let server = serve(fixture_policy()).await;
    let (path, review) = fixture("pod_create_generate_name_multi_container_subset.json");
    assert!(review["request"].get("name").is_none());
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    let pod = patched(&review["request"]["object"], &answer);

    let created = server.created();
    assert_eq!(created.len(), 1);
    let secret_name = created[0].metadata.name.clone().unwrap();
    assert!(secret_name.starts_with("asec-pod-"), "{secret_name}");
    assert_eq!(
        secret_values(&created[0]),
        BTreeMap::from([
            ("NOTION_API_KEY".to_owned(), ALICE_NOTION.to_owned()),
            ("X_BEARER_TOKEN".to_owned(), ALICE_X.to_owned()),
        ]),
        "only the requested subset"
    );
    // The pod spec set X_BEARER_TOKEN in "sandbox": it wins and is reported.
    assert_eq!(
        env_of(&pod, "sandbox"),
        vec![
            json!({"name": "X_BEARER_TOKEN", "value": "set-by-pod-spec"}),
            json!({"name": "LOG_LEVEL", "value": "debug"}),
            secret_ref("NOTION_API_KEY", &secret_name),
        ]
    );
    assert_eq!(
        env_of(&pod, "browser"),
        vec![
            secret_ref("NOTION_API_KEY", &secret_name),
            secret_ref("X_BEARER_TOKEN", &secret_name),
        ]
    );
    assert_eq!(
        annotation(&pod, "agentsecrets.io/skipped"),
        "sandbox/X_BEARER_TOKEN"
    );
    assert_eq!(
        annotation(&pod, "agentsecrets.io/injected"),
        "NOTION_API_KEY,X_BEARER_TOKEN"
    );
    assert_eq!(
        annotation(&pod, "agentsecrets.io/secrets"),
        "X_BEARER_TOKEN,NOTION_API_KEY"
    );
    // Init containers are not injected unless asked; envFrom is left alone.
    assert_eq!(
        pod["spec"]["initContainers"],
        review["request"]["object"]["spec"]["initContainers"]
    );
    assert_eq!(
        pod["spec"]["containers"][0]["envFrom"],
        review["request"]["object"]["spec"]["containers"][0]["envFrom"]
    );
}

#[tokio::test]
async fn init_containers_are_injected_when_the_pod_asks() {
    let server = serve(fixture_policy()).await;
    let (path, mut review) = fixture("pod_create_generate_name_multi_container_subset.json");
    review["request"]["object"]["metadata"]["annotations"]["agentsecrets.io/inject-init-containers"] =
        json!("true");
    let answer = server.review(&path, &review).await;
    let pod = patched(&review["request"]["object"], &answer);
    let secret_name = annotation(&pod, "agentsecrets.io/secret-name").to_owned();
    assert_eq!(
        pod["spec"]["initContainers"][0]["env"],
        json!([
            secret_ref("NOTION_API_KEY", &secret_name),
            secret_ref("X_BEARER_TOKEN", &secret_name)
        ])
    );
}

#[tokio::test]
async fn reinvocation_reuses_the_first_secret_and_adds_no_duplicate_env_entries() {
    let server = serve(fixture_policy()).await;
    let (path, review) = fixture("pod_create_generate_name_multi_container_subset.json");
    let first = server.review(&path, &review).await;
    let once = patched(&review["request"]["object"], &first);

    // Another webhook changed the pod; the API server calls us again with the result, under
    // the same request uid.
    let mut again = review.clone();
    again["request"]["object"] = once.clone();
    let second = server.review(&path, &again).await;
    assert_eq!(second["response"]["allowed"], true);
    let twice = patched(&once, &second);

    let secret = annotation(&twice, "agentsecrets.io/secret-name").to_owned();
    assert_eq!(secret, annotation(&once, "agentsecrets.io/secret-name"));
    for container in ["sandbox", "browser"] {
        let env = env_of(&twice, container);
        let names: Vec<&str> = env.iter().map(|e| e["name"].as_str().unwrap()).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(names.len(), unique.len(), "{container}: {names:?}");
        assert_eq!(env, env_of(&once, container), "{container}");
    }
    assert_eq!(
        annotation(&twice, "agentsecrets.io/skipped"),
        "sandbox/X_BEARER_TOKEN"
    );
    // One Secret for the pod: the second invocation found the first one's.
    let created = server.created();
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].metadata.name.as_deref(), Some(secret.as_str()));
    let metrics = server.state.metrics.encode();
    assert!(
        metrics.contains("agentsecrets_pod_secrets_created_total{result=\"reused\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn reinvocation_after_an_owner_change_never_keeps_the_first_owners_secret() {
    let server = serve(fixture_policy()).await;
    let (path, review) = fixture("pod_create_named.json");
    let first = server.review(&path, &review).await;
    let once = patched(&review["request"]["object"], &first);
    // A later webhook relabels the pod for bob; bob has X_BEARER_TOKEN but not alice's
    // NOTION_API_KEY or OPENAI_API_KEY, whose entries still point at alice's Secret.
    let mut again = review.clone();
    again["request"]["object"] = once;
    again["request"]["object"]["metadata"]["labels"]["agentsecrets.io/owner"] = json!("bob");
    let second = server.review(&path, &again).await;
    assert_eq!(second["response"]["allowed"], false, "{second}");
    let message = second["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("sandbox/NOTION_API_KEY"), "{message}");
    assert_eq!(
        server.created().len(),
        1,
        "no Secret for the refused invocation"
    );
}

/// A pod of `owner` named `name`, as `pod_create_named.json` records it, under a new uid.
fn sandbox_review(name: &str, uid: u32) -> (String, Value) {
    let (path, mut review) = fixture("pod_create_named.json");
    review["request"]["uid"] = json!(format!("5a5a5a5a-0000-4000-8000-{uid:012}"));
    review["request"]["name"] = json!(name);
    review["request"]["object"]["metadata"]["name"] = json!(name);
    (path, review)
}

#[tokio::test]
async fn sandboxes_of_one_owner_share_one_secret_and_a_warm_admission_writes_nothing() {
    let server = serve(fixture_policy()).await;
    let mut names = Vec::new();
    for i in 0..3 {
        let (path, review) = sandbox_review(&format!("sandbox-alice-{i}"), i);
        let answer = server.review(&path, &review).await;
        assert_eq!(answer["response"]["allowed"], true, "{answer}");
        let pod = patched(&review["request"]["object"], &answer);
        let name = annotation(&pod, "agentsecrets.io/secret-name").to_owned();
        assert_eq!(
            env_of(&pod, "sandbox")[0],
            secret_ref("NOTION_API_KEY", &name)
        );
        names.push(name);
    }
    assert!(names.iter().all(|n| *n == names[0]), "{names:?}");
    assert_eq!(server.created().len(), 1, "one write for three sandboxes");
    let metrics = server.state.metrics.encode();
    assert!(
        metrics.contains("agentsecrets_pod_secrets_created_total{result=\"created\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("agentsecrets_pod_secrets_created_total{result=\"reused\"} 2"),
        "{metrics}"
    );
    // Another owner never gets it.
    let (path, mut review) = sandbox_review("sandbox-bob-1", 9);
    review["request"]["object"]["metadata"]["labels"]["agentsecrets.io/owner"] = json!("bob");
    let answer = server.review(&path, &review).await;
    let pod = patched(&review["request"]["object"], &answer);
    assert_ne!(annotation(&pod, "agentsecrets.io/secret-name"), names[0]);
    assert_eq!(server.created().len(), 2);
}

#[tokio::test]
async fn a_warm_owner_starts_sandboxes_while_no_keyring_is_loaded() {
    let server = serve(fixture_policy()).await;
    let (path, review) = sandbox_review("sandbox-alice-1", 1);
    let first = server.review(&path, &review).await;
    assert_eq!(first["response"]["allowed"], true, "{first}");
    server.state.keyring.clear();
    // The values were opened when the shared Secret was made; nothing is opened now.
    let (path, review) = sandbox_review("sandbox-alice-2", 2);
    let second = server.review(&path, &review).await;
    assert_eq!(second["response"]["allowed"], true, "{second}");
    assert_eq!(server.created().len(), 1);
    // New content still needs the keyring.
    let (path, mut review) = sandbox_review("sandbox-alice-3", 3);
    review["request"]["object"]["metadata"]["annotations"] =
        json!({"agentsecrets.io/secrets": "X_BEARER_TOKEN"});
    let third = server.review(&path, &review).await;
    assert_eq!(third["response"]["allowed"], false, "{third}");
    assert!(
        third["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("no keyring")
    );
}

#[tokio::test]
async fn an_edited_or_deleted_secret_gives_the_next_sandbox_a_new_secret_without_the_old_value() {
    let server = serve(fixture_policy()).await;
    let keyring = keyring(&server);
    let (path, review) = sandbox_review("sandbox-alice-1", 1);
    let first = server.review(&path, &review).await;
    let first_name = annotation(
        &patched(&review["request"]["object"], &first),
        "agentsecrets.io/secret-name",
    )
    .to_owned();

    // alice edits her X token: the next sandbox gets the new value in a new Secret.
    let edited = agent_secret(
        NAMESPACE,
        "x-bearer-token",
        "alice",
        "X_BEARER_TOKEN",
        &keyring,
        "x-new",
    );
    server
        .state
        .index
        .apply(kube::runtime::watcher::Event::Apply(edited.clone()));
    let (path, review) = sandbox_review("sandbox-alice-2", 2);
    let second = server.review(&path, &review).await;
    let second_name = annotation(
        &patched(&review["request"]["object"], &second),
        "agentsecrets.io/secret-name",
    )
    .to_owned();
    assert_ne!(second_name, first_name);
    let created = server.created();
    assert_eq!(created.len(), 2);
    assert_eq!(secret_values(&created[1])["X_BEARER_TOKEN"], "x-new");

    // She deletes it: the next sandbox's Secret does not hold it at all.
    server
        .state
        .index
        .apply(kube::runtime::watcher::Event::Delete(edited));
    let (path, review) = sandbox_review("sandbox-alice-3", 3);
    let third = server.review(&path, &review).await;
    let pod = patched(&review["request"]["object"], &third);
    assert!(
        env_of(&pod, "sandbox")
            .iter()
            .all(|e| e["name"] != "X_BEARER_TOKEN")
    );
    let created = server.created();
    assert_eq!(created.len(), 3);
    assert!(!secret_values(&created[2]).contains_key("X_BEARER_TOKEN"));
    assert!(
        [&first_name, &second_name]
            .iter()
            .all(|n| annotation(&pod, "agentsecrets.io/secret-name") != n.as_str())
    );
}

#[tokio::test]
async fn a_spoofed_secret_name_annotation_is_refused() {
    let server = serve(fixture_policy()).await;
    let (path, mut review) = fixture("pod_create_named.json");
    // The pod claims an earlier injection pointing at bob's pod-scoped Secret.
    review["request"]["object"]["metadata"]["annotations"] =
        json!({"agentsecrets.io/secret-name": "asec-pod-bobs"});
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("set by agent-secrets only"), "{message}");
    assert!(server.created().is_empty());
}

#[tokio::test]
async fn a_pod_presetting_its_owners_current_secret_name_is_refused() {
    let server = serve(fixture_policy()).await;
    let (path, review) = sandbox_review("sandbox-alice-1", 1);
    let first = server.review(&path, &review).await;
    let name = annotation(
        &patched(&review["request"]["object"], &first),
        "agentsecrets.io/secret-name",
    )
    .to_owned();
    // The very name alice's next sandbox would get: still not the pod's to set.
    let (path, mut review) = sandbox_review("sandbox-alice-2", 2);
    review["request"]["object"]["metadata"]["annotations"] =
        json!({"agentsecrets.io/secret-name": name});
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("set by agent-secrets only"), "{message}");
}

/// Forged input (issue: any pod creator could name a running sandbox's Secret): a pod that
/// refers to another pod's Secret is refused, labelled or not, whatever the reference kind.
#[tokio::test]
async fn a_pod_referring_to_another_pods_secret_is_refused() {
    let server = serve(fixture_policy()).await;
    for (file, labelled) in [
        ("pod_create_named.json", true),
        ("pod_create_named.json", false),
    ] {
        for (field, value) in [
            (
                "env",
                json!([secret_ref("X_BEARER_TOKEN", "asec-pod-bobs")]),
            ),
            ("envFrom", json!([{"secretRef": {"name": "asec-pod-bobs"}}])),
        ] {
            let (path, mut review) = fixture(file);
            if !labelled {
                review["request"]["object"]["metadata"]["labels"] = json!({});
            }
            review["request"]["object"]["spec"]["containers"][0][field] = value;
            let answer = server.review(&path, &review).await;
            assert_eq!(answer["response"]["allowed"], false, "{field} {answer}");
            let message = answer["response"]["status"]["message"].as_str().unwrap();
            assert!(message.contains("\"asec-pod-bobs\""), "{message}");
            assert!(message.contains("this pod is not given"), "{message}");
        }
        let (path, mut review) = fixture(file);
        review["request"]["object"]["spec"]["volumes"] =
            json!([{"name": "stolen", "secret": {"secretName": "asec-pod-bobs"}}]);
        let answer = server.review(&path, &review).await;
        assert_eq!(answer["response"]["allowed"], false, "volume {answer}");
    }
    assert!(server.created().is_empty());
}

#[tokio::test]
async fn server_dry_run_pod_gets_the_patch_but_no_secret_is_created() {
    let server = serve(fixture_policy()).await;
    let (path, review) = fixture("pod_create_server_dry_run.json");
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], true);
    let pod = patched(&review["request"]["object"], &answer);
    assert_eq!(env_of(&pod, "sandbox").len(), 3);
    assert!(server.created().is_empty(), "dryRun must create nothing");
}

#[tokio::test]
async fn pod_update_is_allowed_untouched() {
    let server = serve(fixture_policy()).await;
    let (path, review) = fixture("pod_update_label.json");
    let answer = server.review(&path, &review).await;
    assert_allowed_unchanged(&answer);
    assert!(server.created().is_empty());
}

#[tokio::test]
async fn an_owner_without_secrets_gets_the_pod_unchanged() {
    let server = serve(fixture_policy()).await;
    let (path, review) = fixture("pod_create_by_replicaset_controller.json");
    let answer = server.review(&path, &review).await;
    assert_allowed_unchanged(&answer);
    assert!(server.created().is_empty());
}

fn orchestrator_only() -> Policy {
    Policy {
        allowed_principals: vec![
            Principal::parse("system:serviceaccount:sandboxes:sandbox-orchestrator").unwrap(),
        ],
        ..fixture_policy()
    }
}

#[tokio::test]
async fn the_allow_listed_orchestrator_creates_sandbox_pods() {
    let server = serve(orchestrator_only()).await;
    let (path, review) = fixture("pod_create_by_service_account.json");
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    let created = server.created();
    assert_eq!(
        secret_values(&created[0]),
        BTreeMap::from([
            ("POSTGRES_PASSWORD".to_owned(), BOB_PG.to_owned()),
            ("X_BEARER_TOKEN".to_owned(), BOB_X.to_owned()),
        ])
    );
}

#[tokio::test]
async fn anyone_else_is_denied_when_an_allow_list_is_set() {
    let server = serve(orchestrator_only()).await;
    let (path, review) = fixture("pod_create_by_non_admin_user.json");
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(answer["response"]["status"]["code"], 403);
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("system:serviceaccount:sandboxes:sandbox-orchestrator"),
        "{message}"
    );
    assert!(message.contains("\"dev\" is not one of them"), "{message}");
    assert!(server.created().is_empty());

    // A group entry admits members of the group.
    let by_group = serve(Policy {
        allowed_principals: vec![Principal::parse("group:dev-team").unwrap()],
        ..fixture_policy()
    })
    .await;
    let answer = by_group.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
}

#[tokio::test]
async fn without_an_allow_list_any_pod_creator_is_served() {
    let server = serve(fixture_policy()).await;
    let (path, review) = fixture("pod_create_by_non_admin_user.json");
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(server.created().len(), 1);
}

#[tokio::test]
async fn a_requested_secret_that_does_not_exist_denies_the_pod_naming_it() {
    let server = serve(fixture_policy()).await;
    let (path, mut review) = fixture("pod_create_generate_name_multi_container_subset.json");
    // POSTGRES_PASSWORD exists, but for bob: alice must not get it, and is told it is missing.
    review["request"]["object"]["metadata"]["annotations"]["agentsecrets.io/secrets"] =
        json!("X_BEARER_TOKEN, GITHUB_TOKEN,POSTGRES_PASSWORD");
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.ends_with("\"GITHUB_TOKEN\", \"POSTGRES_PASSWORD\""),
        "{message}"
    );
    assert!(server.created().is_empty());
}

#[tokio::test]
async fn a_secret_that_cannot_be_opened_denies_the_pod() {
    let keyring = Keyring::generate("test-kek").unwrap();
    let mut secrets = standard_secrets(&keyring);
    // Sealed under a key this server does not have.
    let other = Keyring::generate("retired-kek").unwrap();
    secrets.push(agent_secret(
        NAMESPACE,
        "lost",
        "alice",
        "LOST_API_KEY",
        &other,
        "x",
    ));
    let server = TestServer::start(Setup {
        keyring,
        secrets: Some(secrets),
        ..Setup::default()
    })
    .await;
    let (path, review) = fixture("pod_create_named.json");
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("LOST_API_KEY") && message.contains("retired-kek"),
        "{message}"
    );
    assert!(server.created().is_empty(), "no partial set");
}

#[tokio::test]
async fn a_failed_secret_creation_denies_the_pod() {
    let server = serve(fixture_policy()).await;
    *server.writer.fail_with.lock().unwrap() = Some("secrets is forbidden".into());
    let (path, review) = fixture("pod_create_named.json");
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("secrets is forbidden"), "{message}");
}

#[tokio::test]
async fn excluded_namespaces_are_never_injected() {
    let server = serve(Policy {
        excluded_namespaces: [NAMESPACE.to_owned()].into(),
        ..fixture_policy()
    })
    .await;
    let (path, review) = fixture("pod_create_named.json");
    assert_allowed_unchanged(&server.review(&path, &review).await);
}

#[tokio::test]
async fn without_a_keyring_a_pod_with_secrets_is_denied() {
    let server = serve(fixture_policy()).await;
    server.state.keyring.clear();
    let (path, review) = fixture("pod_create_named.json");
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], false);
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("no keyring")
    );
}
