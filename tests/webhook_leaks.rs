//! Canaries: no plaintext value leaves the process except in the pod-scoped Secret. Every
//! kind of review, good and bad, is sent with unique values, and the answers, patches, TRACE
//! logs and metrics are swept for them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common {
    pub mod admin;
    pub mod answers;
    pub mod client;
    pub mod fixtures;
    pub mod injections;
    pub mod keyring;
    pub mod logs;
    pub mod refusals;
    pub mod sealing;
    pub mod server;
}

use agent_secrets::crypto::Keyring;
use agent_secrets::testing::agent_secret;
use agent_secrets::webhook::{Policy, Principal};
use common::admin::admin_get;
use common::answers::{patch_text, patched};
use common::fixtures::{
    NAMESPACE, STANDARD_SECRETS, fixture, fixture_policy, standard_secrets, to_body,
};
use common::injections::{annotation, secret_values};
use common::keyring::keyring as served_keyring;
use common::logs::{capture_logs, captured_logs};
use common::refusals::{assert_invalid_with_uid, message};
use common::sealing::seal_old_object;
use common::server::{Setup, TestServer};
use serde_json::{Value, json};
use std::collections::BTreeMap;

const LEAK_CAROL_A: &str = "canary-leak-carol-a-6d1f0e";
const LEAK_CAROL_B: &str = "canary-leak-carol-b-93ab27";
const LEAK_CREATE: &str = "canary-leak-kubectl-create-5c08";
const LEAK_CSA: &str = "canary-leak-client-side-apply-e4d2";
const LEAK_SSA: &str = "canary-leak-server-side-apply-7a31";
const LEAK_DRY_RUN: &str = "canary-leak-dry-run-0fb6";
const LEAK_SAME: &str = "canary-leak-same-value-28c9";
const LEAK_NEW: &str = "canary-leak-new-value-b75e";
const LEAK_OLD: &str = "canary-leak-old-value-41d3";
const LEAK_DUPLICATE: &str = "canary-leak-duplicate-env-9e62";
const LEAK_RESERVED: &str = "canary-leak-reserved-env-3a7c";
const LEAK_INVALID_NAME: &str = "canary-leak-invalid-env-d810";
const LEAK_NO_KEYRING: &str = "canary-leak-no-keyring-5b94";
const LEAK_POD_ENV: &str = "canary-leak-pod-spec-env-c2e7";
const LEAK_WRONG_TYPE: &str = "canary-leak-wrong-type-71fa";
const LEAK_SYNTAX: &str = "canary-leak-syntax-error-0d5b";
/// Where a string is expected, a number: serde's own message would print it.
const LEAK_NUMBER: &str = "7350918264017735";

fn leak_canaries() -> Vec<&'static str> {
    let mut all = vec![
        LEAK_CAROL_A,
        LEAK_CAROL_B,
        LEAK_CREATE,
        LEAK_CSA,
        LEAK_SSA,
        LEAK_DRY_RUN,
        LEAK_SAME,
        LEAK_NEW,
        LEAK_OLD,
        LEAK_DUPLICATE,
        LEAK_RESERVED,
        LEAK_INVALID_NAME,
        LEAK_NO_KEYRING,
        LEAK_POD_ENV,
        LEAK_WRONG_TYPE,
        LEAK_SYNTAX,
        LEAK_NUMBER,
    ];
    all.extend(STANDARD_SECRETS.iter().map(|secret| secret.4));
    all
}

/// `review` with its plaintext value (wherever it occurs: spec and last-applied annotation)
/// replaced by `canary`.
fn with_value(review: &Value, canary: &str) -> Value {
    let plaintext = review["request"]["object"]["spec"]["value"]
        .as_str()
        .unwrap()
        .to_owned();
    let text = serde_json::to_string(review)
        .unwrap()
        .replace(&plaintext, canary);
    serde_json::from_str(&text).unwrap()
}

/// Everything a review's answer exposes: the raw body and the decoded patch.
#[derive(Default)]
struct Exposed(Vec<String>);

impl Exposed {
    fn record(&mut self, answer: &Value) {
        self.0.push(answer.to_string());
        if let Some(patch) = patch_text(answer) {
            self.0.push(patch);
        }
    }

    async fn review(&mut self, server: &TestServer, path: &str, review: &Value) -> Value {
        let answer = server.review(path, review).await;
        self.record(&answer);
        answer
    }

    async fn post(
        &mut self,
        server: &TestServer,
        path: &str,
        body: impl Into<bytes::Bytes>,
    ) -> (u16, Value) {
        let (status, answer) = server.post(path, body).await;
        self.record(&answer);
        (status, answer)
    }
}

#[tokio::test]
async fn no_canary_value_leaks_into_answers_patches_logs_or_metrics() {
    capture_logs();
    let keyring = Keyring::generate("test-kek").unwrap();
    let mut secrets = standard_secrets(&keyring);
    secrets.push(agent_secret(
        NAMESPACE,
        "carol-a",
        "carol",
        "CAROL_A",
        &keyring,
        LEAK_CAROL_A,
    ));
    secrets.push(agent_secret(
        NAMESPACE,
        "carol-b",
        "carol",
        "CAROL_B",
        &keyring,
        LEAK_CAROL_B,
    ));
    let server = TestServer::start(Setup {
        keyring,
        secrets: Some(secrets),
        ..Setup::default()
    })
    .await;
    let mut exposed = Exposed::default();

    // AgentSecret writes of every shape, each with its own canary.
    for (file, canary) in [
        ("agentsecret_create_kubectl_create.json", LEAK_CREATE),
        ("agentsecret_create_client_side_apply.json", LEAK_CSA),
        ("agentsecret_create_server_side_apply.json", LEAK_SSA),
        ("agentsecret_create_server_dry_run.json", LEAK_DRY_RUN),
    ] {
        let (path, review) = fixture(file);
        let review = with_value(&review, canary);
        assert!(review.to_string().contains(canary));
        let answer = exposed.review(&server, &path, &review).await;
        assert_eq!(answer["response"]["allowed"], true, "{file}: {answer}");
        let stored = patched(&review["request"]["object"], &answer);
        assert!(!stored.to_string().contains(canary), "{file}: {stored}");
        assert!(stored["spec"]["sealed"].is_object(), "{file}");
    }
    // Re-apply of the same value, and an update to a new one.
    let (path, review) = fixture("agentsecret_update_client_side_apply_same_value.json");
    let mut review = with_value(&review, LEAK_SAME);
    seal_old_object(&mut review, &served_keyring(&server), Some(LEAK_SAME));
    let answer = exposed.review(&server, &path, &review).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert!(
        !patched(&review["request"]["object"], &answer)
            .to_string()
            .contains(LEAK_SAME)
    );
    let (path, review) = fixture("agentsecret_update_merge_patch_new_value.json");
    let mut review = with_value(&review, LEAK_NEW);
    seal_old_object(&mut review, &served_keyring(&server), Some(LEAK_OLD));
    let answer = exposed.review(&server, &path, &review).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");

    // Denials of a write that carries a value: the message names the problem, not the value.
    let (path, review) = fixture("agentsecret_create_kubectl_create.json");
    let mut duplicate = with_value(&review, LEAK_DUPLICATE);
    duplicate["request"]["object"]["spec"]["envName"] = json!("X_BEARER_TOKEN");
    let answer = exposed.review(&server, &path, &duplicate).await;
    assert_eq!(answer["response"]["allowed"], false);
    assert!(message(&answer).contains("already has a secret with envName X_BEARER_TOKEN"));
    let mut reserved = with_value(&review, LEAK_RESERVED);
    reserved["request"]["object"]["spec"]["envName"] = json!("LD_PRELOAD");
    let answer = exposed.review(&server, &path, &reserved).await;
    assert_eq!(answer["response"]["allowed"], false);
    assert!(message(&answer).contains("reserved"), "{answer}");
    let mut invalid = with_value(&review, LEAK_INVALID_NAME);
    invalid["request"]["object"]["spec"]["envName"] = json!("lower-case");
    let answer = exposed.review(&server, &path, &invalid).await;
    assert_eq!(answer["response"]["allowed"], false);
    assert!(
        message(&answer).contains("uppercase identifier"),
        "{answer}"
    );
    let keyring = served_keyring(&server);
    server.state.keyring.clear();
    let answer = exposed
        .review(&server, &path, &with_value(&review, LEAK_NO_KEYRING))
        .await;
    assert_eq!(answer["response"]["allowed"], false);
    assert!(message(&answer).contains("no keyring"), "{answer}");
    server
        .state
        .keyring
        .replace(Keyring::from_yaml(&keyring.to_yaml().unwrap()).unwrap());

    // Malformed reviews holding a canary in a wrongly typed field: the message gives only the
    // position, never serde's quote of the input.
    let mut number = review.clone();
    number["request"]["object"]["spec"]["value"] = json!(LEAK_NUMBER.parse::<u64>().unwrap());
    let mut generation = with_value(&review, LEAK_CREATE);
    generation["request"]["object"]["metadata"]["generation"] = json!(LEAK_WRONG_TYPE);
    let mut description = with_value(&review, LEAK_CREATE);
    description["request"]["object"]["spec"]["description"] = json!([LEAK_WRONG_TYPE]);
    let mut dry_run = with_value(&review, LEAK_CREATE);
    dry_run["request"]["dryRun"] = json!(LEAK_WRONG_TYPE);
    for (what, bad) in [
        ("a number as spec.value", number),
        ("a string as metadata.generation", generation),
        ("an array as spec.description", description),
        ("a string as request.dryRun", dry_run),
    ] {
        let (status, answer) = exposed.post(&server, &path, to_body(&bad)).await;
        assert_invalid_with_uid(
            status,
            &answer,
            &review["request"]["uid"],
            "request body is not an AdmissionReview for kind AgentSecret (unexpected data at line 1, column",
        );
        assert!(
            !answer.to_string().contains(LEAK_NUMBER),
            "{what}: {answer}"
        );
    }
    let (pod_path, pod_review) = fixture("pod_create_named.json");
    let mut containers = pod_review.clone();
    containers["request"]["object"]["spec"]["containers"] = json!(LEAK_WRONG_TYPE);
    let mut env = pod_review.clone();
    env["request"]["object"]["spec"]["containers"][0]["env"] =
        json!([{"name": "TOKEN", "value": LEAK_NUMBER.parse::<u64>().unwrap()}]);
    let (status, answer) = exposed.post(&server, &pod_path, to_body(&containers)).await;
    assert_invalid_with_uid(
        status,
        &answer,
        &pod_review["request"]["uid"],
        "request body is not an AdmissionReview for kind Pod",
    );
    // Pod admission reads env values only as the strings secretless mode writes, so a wrongly
    // typed value is skipped unread: admitted, and not echoed.
    let (status, answer) = exposed.post(&server, &pod_path, to_body(&env)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert!(!answer.to_string().contains(LEAK_NUMBER), "{answer}");
    // Invalid JSON whose error position is inside a value.
    let text = to_body(&with_value(&review, LEAK_SYNTAX));
    let cut = String::from_utf8(text).unwrap();
    let cut = cut.replace(LEAK_SYNTAX, &format!("{LEAK_SYNTAX}\\q"));
    let (status, answer) = exposed.post(&server, &path, cut).await;
    assert_invalid_with_uid(status, &answer, &review["request"]["uid"], "not valid JSON");

    // Sandbox pods: carol's canaries reach only her pod-scoped Secret.
    let mut carol = pod_review.clone();
    carol["request"]["uid"] = json!("c0a1c0a1-0000-4000-8000-00000000ca01");
    carol["request"]["object"]["metadata"]["labels"]["agentsecrets.io/owner"] = json!("carol");
    carol["request"]["object"]["spec"]["containers"][0]["env"] =
        json!([{"name": "OWN_SETTING", "value": LEAK_POD_ENV}]);
    let answer = exposed.review(&server, &pod_path, &carol).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    let pod = patched(&carol["request"]["object"], &answer);
    let secret_name = annotation(&pod, "agentsecrets.io/secret-name");
    let created = server.created();
    let secret = created
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(secret_name))
        .unwrap();
    assert_eq!(
        secret_values(secret),
        BTreeMap::from([
            ("CAROL_A".to_owned(), LEAK_CAROL_A.to_owned()),
            ("CAROL_B".to_owned(), LEAK_CAROL_B.to_owned()),
        ])
    );
    // The same pod asking for a secret carol does not have, and created by someone not on
    // the allow-list: denied, naming neither her values nor the pod's own env.
    let mut missing = carol.clone();
    missing["request"]["object"]["metadata"]["annotations"] =
        json!({"agentsecrets.io/secrets": "CAROL_A,NOPE"});
    let answer = exposed.review(&server, &pod_path, &missing).await;
    assert_eq!(answer["response"]["allowed"], false);
    assert!(message(&answer).ends_with("\"NOPE\""), "{answer}");
    let strict = TestServer::start(Setup {
        policy: Policy {
            allowed_principals: vec![Principal::parse("group:sandbox-orchestrators").unwrap()],
            ..fixture_policy()
        },
        keyring: Keyring::from_yaml(&served_keyring(&server).to_yaml().unwrap()).unwrap(),
        secrets: Some(vec![agent_secret(
            NAMESPACE,
            "carol-a",
            "carol",
            "CAROL_A",
            &served_keyring(&server),
            LEAK_CAROL_A,
        )]),
        ..Setup::default()
    })
    .await;
    let answer = exposed.review(&strict, &pod_path, &carol).await;
    assert_eq!(answer["response"]["allowed"], false);
    let answer = exposed
        .review(
            &server,
            &pod_path,
            &fixture("pod_create_server_dry_run.json").1,
        )
        .await;
    assert_eq!(answer["response"]["allowed"], true);
    let answer = exposed.review(&server, &pod_path, &pod_review).await;
    assert_eq!(answer["response"]["allowed"], true);
    // A failing Secret creation (new content: carol's Secret of both values exists).
    *server.writer.fail_with.lock().unwrap() = Some("secrets \"x\" is forbidden".into());
    let mut carol_a = carol.clone();
    carol_a["request"]["object"]["metadata"]["annotations"] =
        json!({"agentsecrets.io/secrets": "CAROL_A"});
    let answer = exposed.review(&server, &pod_path, &carol_a).await;
    assert_eq!(answer["response"]["allowed"], false);
    *server.writer.fail_with.lock().unwrap() = None;

    let (status, _, metrics) = admin_get(&server.state, "/metrics").await;
    assert_eq!(status, 200);
    let (_, _, strict_metrics) = admin_get(&strict.state, "/metrics").await;
    exposed.0.push(metrics);
    exposed.0.push(strict_metrics);

    let logs = captured_logs();
    // The capture works: it holds this test's admission lines and the audit line of carol's
    // injection (names only).
    assert!(
        logs.contains("c0a1c0a1-0000-4000-8000-00000000ca01"),
        "{logs}"
    );
    assert!(logs.contains("injected=CAROL_A,CAROL_B"), "{logs}");
    for canary in leak_canaries() {
        for text in &exposed.0 {
            assert!(!text.contains(canary), "{canary} exposed in {text}");
        }
        assert!(!logs.contains(canary), "{canary} in the logs:\n{logs}");
    }
}
