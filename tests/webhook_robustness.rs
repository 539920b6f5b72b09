//! The real HTTPS webhook under bad input, secret canaries, certificate rotation, shutdown,
//! probes and concurrent load: it never panics, never echoes a value, and keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use agent_secrets::api::AgentSecret;
use agent_secrets::cache::SecretIndex;
use agent_secrets::crypto::{Keyring, KeyringHandle, SealContext};
use agent_secrets::telemetry::Metrics;
use agent_secrets::webhook::server::{self, AppState, MAX_BODY_BYTES};
use agent_secrets::webhook::{Policy, Principal};
use axum_server::tls_rustls::RustlsConfig;
use common::*;
use k8s_openapi::api::core::v1::Secret;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// Log capture: one global subscriber at TRACE for this whole test binary.

#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Everything any test of this binary logged so far (tracing events at every level, and `log`
/// records of dependencies such as rustls).
fn captured_logs() -> String {
    String::from_utf8_lossy(&capture_logs().0.lock().unwrap()).into_owned()
}

/// Install the capturing subscriber (once); every test calls it first so that all of the
/// binary's log output lands in the buffer.
fn capture_logs() -> &'static LogBuffer {
    static BUFFER: OnceLock<LogBuffer> = OnceLock::new();
    BUFFER.get_or_init(|| {
        let buffer = LogBuffer::default();
        let writer = buffer.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init()
            .expect("this test binary installs the only global subscriber");
        buffer
    })
}

// ---------------------------------------------------------------------------------------
// Helpers

fn message(answer: &Value) -> &str {
    answer["response"]["status"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no status message in {answer}"))
}

fn secret_values(secret: &Secret) -> BTreeMap<String, String> {
    secret
        .data
        .as_ref()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), String::from_utf8(v.0.clone()).unwrap()))
        .collect()
}

fn annotation<'a>(object: &'a Value, key: &str) -> &'a str {
    object["metadata"]["annotations"][key]
        .as_str()
        .unwrap_or_default()
}

fn alice_values() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("NOTION_API_KEY".to_owned(), ALICE_NOTION.to_owned()),
        ("OPENAI_API_KEY".to_owned(), ALICE_OPENAI.to_owned()),
        ("X_BEARER_TOKEN".to_owned(), ALICE_X.to_owned()),
    ])
}

/// Put a sealed spec into an UPDATE fixture's `oldObject` (the recording webhook stored the
/// plaintext), sealed from `value`.
fn seal_old_object(review: &mut Value, keyring: &Keyring, value: &str) {
    let old = &mut review["request"]["oldObject"];
    let owner = old["spec"]["owner"].as_str().unwrap().to_owned();
    let env_name = old["spec"]["envName"].as_str().unwrap().to_owned();
    let spec = old["spec"].as_object_mut().unwrap();
    spec.remove("value");
    let sealed = agent_secrets::testing::sealed(keyring, NAMESPACE, &owner, &env_name, value);
    spec.insert("sealed".into(), serde_json::to_value(sealed).unwrap());
}

/// The server still answers genuine reviews correctly: a sandbox pod gets exactly alice's
/// secrets, and an AgentSecret create is sealed.
async fn assert_still_serving(server: &TestServer, after: &str) {
    // A new admission each time (a new uid), so each makes its own pod-scoped Secret.
    static ADMISSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = ADMISSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (path, mut review) = fixture("pod_create_named.json");
    review["request"]["uid"] = json!(format!("5e0e0e0e-0000-4000-8000-{n:012}"));
    let before = server.created().len();
    let answer = server.review(&path, &review).await;
    assert_eq!(
        answer["response"]["allowed"], true,
        "after {after}: {answer}"
    );
    assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
    let pod = patched(&review["request"]["object"], &answer);
    let created = server.created();
    assert_eq!(created.len(), before + 1, "after {after}");
    let secret = created.last().unwrap();
    assert_eq!(
        secret.metadata.name.as_deref(),
        Some(annotation(&pod, "agentsecrets.io/secret-name"))
    );
    assert_eq!(secret_values(secret), alice_values(), "after {after}");

    let (path, review) = fixture("agentsecret_create_kubectl_create.json");
    let answer = server.review(&path, &review).await;
    assert_eq!(
        answer["response"]["allowed"], true,
        "after {after}: {answer}"
    );
    assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
    let stored = patched(&review["request"]["object"], &answer);
    assert!(stored["spec"].get("value").is_none(), "after {after}");
    let sealed: agent_secrets::api::SealedValue =
        serde_json::from_value(stored["spec"]["sealed"].clone()).unwrap();
    let env_name = stored["spec"]["envName"].as_str().unwrap();
    let plain = sealed
        .open(
            &server.keyring,
            SealContext::new(NAMESPACE, "bob", env_name),
        )
        .unwrap();
    assert_eq!(plain.expose(), b"fixture-plaintext-pg", "after {after}");
}

/// An answer to a review that could not be read, sent without a usable uid: the HTTP status
/// carries the error, and so does the response.
fn assert_unreadable(status: u16, answer: &Value, expected_status: u16, needle: &str) {
    assert_eq!(status, expected_status, "{answer}");
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1", "{answer}");
    assert_eq!(answer["kind"], "AdmissionReview", "{answer}");
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    assert_eq!(answer["response"]["uid"], "", "{answer}");
    assert_eq!(answer["response"]["status"]["code"], expected_status);
    assert!(message(answer).contains(needle), "{answer}");
}

/// An answer to a review that could not be read but whose uid was found: HTTP 200, so that
/// the API server shows the message to the requester.
fn assert_invalid_with_uid(status: u16, answer: &Value, uid: &Value, needle: &str) {
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    assert_eq!(&answer["response"]["uid"], uid, "{answer}");
    assert_eq!(answer["response"]["status"]["code"], 400, "{answer}");
    assert_eq!(answer["response"]["status"]["reason"], "BadRequest");
    assert!(message(answer).contains(needle), "{answer}");
}

fn to_body(review: &Value) -> Vec<u8> {
    serde_json::to_vec(review).unwrap()
}

// ---------------------------------------------------------------------------------------
// 1. Bad input

#[tokio::test]
async fn bad_input_is_answered_clearly_and_the_server_keeps_serving() {
    capture_logs();
    let server = TestServer::start(fixture_policy()).await;
    assert_still_serving(&server, "start").await;

    // Not JSON at all.
    for path in ["/mutate/pods", "/mutate/agentsecrets"] {
        let (status, answer) = server.post(path, "this is {not json").await;
        assert_unreadable(status, &answer, 400, "request body is not valid JSON");
        let (status, answer) = server.post(path, "").await;
        assert_unreadable(status, &answer, 400, "request body is not valid JSON");
    }
    assert_still_serving(&server, "a body that is not JSON").await;

    // JSON, but not an AdmissionReview.
    for body in [r#"{"hello": "world"}"#, "[1, 2, 3]", "null", "42"] {
        let (status, answer) = server.post("/mutate/pods", body).await;
        assert_unreadable(
            status,
            &answer,
            400,
            "request body is not an AdmissionReview for kind Pod",
        );
        let (status, answer) = server.post("/mutate/agentsecrets", body).await;
        assert_unreadable(
            status,
            &answer,
            400,
            "request body is not an AdmissionReview for kind AgentSecret",
        );
    }
    // A bare object instead of a review.
    for path in ["/mutate/pods", "/mutate/agentsecrets"] {
        let (status, answer) = server
            .post(
                path,
                r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}"#,
            )
            .await;
        assert_unreadable(
            status,
            &answer,
            400,
            "expected an admission.k8s.io/v1 AdmissionReview, got v1/Pod",
        );
    }
    assert_still_serving(&server, "JSON that is not an AdmissionReview").await;

    // The v1beta1 AdmissionReview: refused with the uid, so the API server shows why.
    for file in [
        "pod_create_named.json",
        "agentsecret_create_kubectl_create.json",
    ] {
        let (path, mut review) = fixture(file);
        review["apiVersion"] = json!("admission.k8s.io/v1beta1");
        let (status, answer) = server.post(&path, to_body(&review)).await;
        assert_invalid_with_uid(
            status,
            &answer,
            &review["request"]["uid"],
            "expected an admission.k8s.io/v1 AdmissionReview, got admission.k8s.io/v1beta1/AdmissionReview",
        );
    }
    assert_still_serving(&server, "a v1beta1 review").await;

    // A review without a request.
    for path in ["/mutate/pods", "/mutate/agentsecrets"] {
        let (status, answer) = server
            .post(
                path,
                r#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}"#,
            )
            .await;
        assert_unreadable(status, &answer, 400, "AdmissionReview carries no request");
    }
    assert_still_serving(&server, "a review without a request").await;

    // The wrong kind for the endpoint: denied with the uid and a message naming the kinds.
    let (_, agentsecret_review) = fixture("agentsecret_create_kubectl_create.json");
    let (status, answer) = server
        .post("/mutate/pods", to_body(&agentsecret_review))
        .await;
    assert_invalid_with_uid(
        status,
        &answer,
        &agentsecret_review["request"]["uid"],
        "this endpoint admits Pod objects, not agentsecrets.io/AgentSecret",
    );
    let (_, pod_review) = fixture("pod_create_named.json");
    let (status, answer) = server
        .post("/mutate/agentsecrets", to_body(&pod_review))
        .await;
    assert_invalid_with_uid(
        status,
        &answer,
        &pod_review["request"]["uid"],
        "this endpoint admits AgentSecret objects, not /Pod",
    );
    // A DELETE carries no object; the kind alone tells.
    let (_, delete_review) = fixture("agentsecret_delete.json");
    let (status, answer) = server.post("/mutate/pods", to_body(&delete_review)).await;
    assert_invalid_with_uid(
        status,
        &answer,
        &delete_review["request"]["uid"],
        "this endpoint admits Pod objects, not agentsecrets.io/AgentSecret",
    );
    assert!(
        server
            .created()
            .iter()
            .all(|s| secret_values(s) == alice_values())
    );
    assert_still_serving(&server, "a review of the wrong kind").await;

    // A pod whose spec.containers is a string.
    let (path, mut review) = fixture("pod_create_named.json");
    review["request"]["object"]["spec"]["containers"] = json!("sandbox");
    let created = server.created().len();
    let (status, answer) = server.post(&path, to_body(&review)).await;
    assert_invalid_with_uid(
        status,
        &answer,
        &review["request"]["uid"],
        "request body is not an AdmissionReview for kind Pod",
    );
    assert_eq!(server.created().len(), created, "nothing created");
    assert_still_serving(&server, "a pod with containers as a string").await;

    // An AgentSecret UPDATE whose sealed value is not base64: denied, the stored value kept.
    let (path, mut review) = fixture("agentsecret_update_replace_without_value.json");
    seal_old_object(&mut review, &server.keyring, "fixture-plaintext-pg");
    let mut sealed = review["request"]["oldObject"]["spec"]["sealed"].clone();
    sealed["nonce"] = json!("!!not*base64!!");
    review["request"]["object"]["spec"]["sealed"] = sealed;
    let (status, answer) = server.post(&path, to_body(&review)).await;
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
    assert_eq!(answer["response"]["status"]["code"], 403);
    assert_eq!(answer["response"]["status"]["reason"], "Forbidden");
    assert!(answer["response"].get("patch").is_none());
    let text = message(&answer);
    assert!(
        text.contains("spec.sealed does not open")
            && text.contains("sealed.nonce is not valid base64"),
        "{text}"
    );
    // The same for the other fields.
    for (field, bad) in [("wrappedKey", "%%%"), ("ciphertext", "@@@@")] {
        let mut review = review.clone();
        review["request"]["object"]["spec"]["sealed"] =
            review["request"]["oldObject"]["spec"]["sealed"].clone();
        review["request"]["object"]["spec"]["sealed"][field] = json!(bad);
        let answer = server.review(&path, &review).await;
        assert_eq!(answer["response"]["allowed"], false, "{answer}");
        assert!(
            message(&answer).contains(&format!("sealed.{field} is not valid base64")),
            "{answer}"
        );
    }
    assert_still_serving(&server, "a sealed value that is not base64").await;
}

fn oversized_body(uid: Option<&str>) -> Vec<u8> {
    let uid = uid.map(|u| format!(r#""uid":"{u}","#)).unwrap_or_default();
    let head = format!(
        r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{{{uid}"kind":{{"group":"","version":"v1","kind":"Pod"}},"object":{{"metadata":{{"annotations":{{"padding":""#
    );
    let mut body = head.into_bytes();
    body.resize(MAX_BODY_BYTES + 1024 * 1024, b'a');
    body.extend_from_slice(br#""}}}}}"#);
    body
}

#[tokio::test]
async fn an_oversized_body_is_refused_with_its_uid_and_the_server_keeps_serving() {
    capture_logs();
    let server = TestServer::start(fixture_policy()).await;
    let uid = "0b6f3c58-5b1e-4d8e-9a61-9a0d0f3b2c11";
    for path in ["/mutate/pods", "/mutate/agentsecrets"] {
        let (status, answer) = server.post(path, oversized_body(Some(uid))).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["response"]["uid"], uid);
        assert_eq!(answer["response"]["allowed"], false);
        assert_eq!(answer["response"]["status"]["code"], 400);
        assert_eq!(
            message(&answer),
            "AdmissionReview body exceeds the 8 MiB limit"
        );

        let (status, answer) = server.post(path, oversized_body(None)).await;
        assert_unreadable(
            status,
            &answer,
            413,
            "AdmissionReview body exceeds the 8 MiB limit",
        );
    }
    assert!(server.created().is_empty());
    assert_still_serving(&server, "an oversized body").await;

    // A body just under the limit is read (and refused for what it is, not for its size).
    let mut body = oversized_body(Some(uid));
    body.truncate(MAX_BODY_BYTES - 16);
    let (status, answer) = server.post("/mutate/pods", body).await;
    assert_invalid_with_uid(status, &answer, &json!(uid), "not valid JSON");
}

// ---------------------------------------------------------------------------------------
// 2. Canaries: no plaintext value leaves the process except in the pod-scoped Secret

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
    all.extend(all_canaries());
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
        let (status, answer) = server.post(path, to_body(review)).await;
        self.record(&answer);
        assert_eq!(status, 200, "{answer}");
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
    let server = TestServer::start_with(fixture_policy(), keyring, secrets).await;
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
    seal_old_object(&mut review, &server.keyring, LEAK_SAME);
    let answer = exposed.review(&server, &path, &review).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert!(
        !patched(&review["request"]["object"], &answer)
            .to_string()
            .contains(LEAK_SAME)
    );
    let (path, review) = fixture("agentsecret_update_merge_patch_new_value.json");
    let mut review = with_value(&review, LEAK_NEW);
    seal_old_object(&mut review, &server.keyring, LEAK_OLD);
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
    server.keyring_handle.clear();
    let answer = exposed
        .review(&server, &path, &with_value(&review, LEAK_NO_KEYRING))
        .await;
    assert_eq!(answer["response"]["allowed"], false);
    assert!(message(&answer).contains("no keyring"), "{answer}");
    server
        .keyring_handle
        .replace(Keyring::from_yaml(&server.keyring.to_yaml().unwrap()).unwrap());

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
    // Pod admission never reads env values (only names and references), so a wrongly typed
    // value is not even looked at: admitted, and not echoed.
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
    let strict = TestServer::start_with(
        Policy {
            allowed_principals: vec![Principal::parse("group:sandbox-orchestrators").unwrap()],
            ..fixture_policy()
        },
        Keyring::from_yaml(&server.keyring.to_yaml().unwrap()).unwrap(),
        vec![agent_secret(
            NAMESPACE,
            "carol-a",
            "carol",
            "CAROL_A",
            &server.keyring,
            LEAK_CAROL_A,
        )],
    )
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
    // A failing Secret creation.
    *server.writer.fail_with.lock().unwrap() = Some("secrets \"x\" is forbidden".into());
    let answer = exposed.review(&server, &pod_path, &carol).await;
    assert_eq!(answer["response"]["allowed"], false);
    *server.writer.fail_with.lock().unwrap() = None;

    let (status, _, metrics) = server.admin_get("/metrics").await;
    assert_eq!(status, 200);
    let (_, _, strict_metrics) = strict.admin_get("/metrics").await;
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

// ---------------------------------------------------------------------------------------
// 3. Certificate rotation

fn write_cert(dir: &std::path::Path, cert: &Cert) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert_path = dir.join("tls.crt");
    let key_path = dir.join("tls.key");
    // Written beside and renamed, as the kubelet's atomic writer swaps a mounted Secret.
    for (path, text) in [(&cert_path, &cert.cert_pem), (&key_path, &cert.key_pem)] {
        let staging = path.with_extension("new");
        std::fs::File::create(&staging)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        std::fs::rename(&staging, path).unwrap();
    }
    (cert_path, key_path)
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_dropping_open_connections() {
    capture_logs();
    install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let cert_a = self_signed();
    let cert_b = self_signed();
    let (cert_path, key_path) = write_cert(dir.path(), &cert_a);
    let tls = RustlsConfig::from_pem_file(&cert_path, &key_path)
        .await
        .unwrap();
    let keyring = Keyring::generate("test-kek").unwrap();
    let secrets = standard_secrets(&keyring);
    let server = TestServer::start_with_tls(
        fixture_policy(),
        keyring,
        secrets,
        tls.clone(),
        cert_a.der.clone(),
    )
    .await;
    let watcher = tokio::spawn(server::watch_tls_files(
        tls,
        cert_path.clone(),
        key_path.clone(),
        Duration::from_millis(50),
        server.stop.clone().cancelled_owned(),
    ));

    let (path, review) = fixture("pod_create_named.json");
    let mut old = HttpsClient::connect(server.addr, &cert_a.der)
        .await
        .unwrap();
    let (status, answer) = old.post(&path, to_body(&review)).await;
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], true);

    write_cert(dir.path(), &cert_b);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut fresh = loop {
        match HttpsClient::connect(server.addr, &cert_b.der).await {
            Ok(client) => break client,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(error) => panic!("certificate B not served within 5 s: {error}"),
        }
    };
    let (status, answer) = fresh.post(&path, to_body(&review)).await;
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], true);

    // The connection opened under A keeps its session and answers on.
    let (status, answer) = old.post(&path, to_body(&review)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["uid"], review["request"]["uid"]);

    // New connections are served B only.
    let refused = HttpsClient::connect(server.addr, &cert_a.der).await;
    let error = refused
        .err()
        .expect("a client trusting only A must fail now");
    assert!(error.to_lowercase().contains("certificate"), "{error}");

    // A half-written or broken file is not loaded: B stays in force.
    std::fs::write(&cert_path, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = HttpsClient::connect(server.addr, &cert_b.der)
        .await
        .unwrap();
    let (status, _) = again.post(&path, to_body(&review)).await;
    assert_eq!(status, 200);
    assert!(captured_logs().contains("TLS certificate reloaded"));

    server.stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .expect("the watcher stops with the shutdown signal")
        .unwrap();
}

// ---------------------------------------------------------------------------------------
// 4. Graceful shutdown

#[tokio::test]
async fn shutdown_finishes_the_review_in_flight_then_refuses_connections() {
    capture_logs();
    let server = TestServer::start(fixture_policy()).await;
    *server.writer.delay.lock().unwrap() = Some(Duration::from_millis(300));
    let (path, review) = fixture("pod_create_named.json");
    let mut client = server.client().await;
    let in_flight = tokio::spawn(async move { client.post(&path, to_body(&review)).await });

    // Shut down while the review waits on the Secret creation.
    tokio::time::timeout(Duration::from_secs(5), server.writer.entered.notified())
        .await
        .expect("the review reaches the Secret creation");
    let cancelled_at = Instant::now();
    server.stop.cancel();

    let (status, answer) = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("the in-flight review is answered")
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert_eq!(server.created().len(), 1);
    assert_eq!(secret_values(&server.created()[0]), alice_values());

    let TestServer {
        task, addr, ca_der, ..
    } = server;
    let result = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the server stops once the review is answered")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert!(
        cancelled_at.elapsed() < server::SHUTDOWN_GRACE,
        "stopped without waiting out the grace period"
    );
    let refused = HttpsClient::connect(addr, &ca_der).await;
    assert!(
        refused.is_err(),
        "new connections are refused after shutdown"
    );
}

#[tokio::test]
async fn idle_keep_alive_connections_do_not_hold_up_shutdown() {
    capture_logs();
    let server = TestServer::start(fixture_policy()).await;
    let (path, review) = fixture("pod_update_label.json");
    let mut idle = server.client().await;
    let (status, _) = idle.post(&path, to_body(&review)).await;
    assert_eq!(status, 200);
    server.stop.cancel();
    let result = tokio::time::timeout(Duration::from_secs(5), server.task)
        .await
        .expect("an idle connection is closed at shutdown")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert!(idle.try_post(&path, to_body(&review)).await.is_err());
}

// ---------------------------------------------------------------------------------------
// 5. Admin port

fn admin_state(keyring: KeyringHandle, index: Arc<SecretIndex>) -> AppState {
    AppState {
        keyring,
        index,
        policy: Arc::new(fixture_policy()),
        writer: Arc::new(RecordingWriter::default()),
        metrics: Arc::new(Metrics::default()),
        pod_secrets: Arc::default(),
    }
}

#[tokio::test]
async fn readiness_needs_a_synced_cache_and_a_keyring() {
    capture_logs();
    let keyring = KeyringHandle::default();
    let index = Arc::new(SecretIndex::default());
    let state = admin_state(keyring.clone(), index.clone());

    assert_eq!(admin_get(&state, "/healthz").await.0, 200);
    assert_eq!(
        admin_get(&state, "/readyz").await,
        (
            503,
            "text/plain; charset=utf-8".to_owned(),
            "no keyring loaded".to_owned()
        )
    );
    keyring.replace(Keyring::generate("k1").unwrap());
    let (status, _, reason) = admin_get(&state, "/readyz").await;
    assert_eq!(
        (status, reason.as_str()),
        (503, "AgentSecret cache has not synced")
    );
    // Listed, not yet done: still not ready.
    index.apply(kube::runtime::watcher::Event::Init);
    assert_eq!(admin_get(&state, "/readyz").await.0, 503);
    index.apply(kube::runtime::watcher::Event::<AgentSecret>::InitDone);
    assert_eq!(
        admin_get(&state, "/readyz").await,
        (200, "text/plain; charset=utf-8".to_owned(), "ok".to_owned())
    );
    // Losing the keyring makes it unready again; liveness is unaffected.
    keyring.clear();
    let (status, _, reason) = admin_get(&state, "/readyz").await;
    assert_eq!((status, reason.as_str()), (503, "no keyring loaded"));
    assert_eq!(
        admin_get(&state, "/healthz").await,
        (200, "text/plain; charset=utf-8".to_owned(), "ok".to_owned())
    );
}

#[tokio::test]
async fn metrics_count_reviews_by_kind_operation_and_decision() {
    capture_logs();
    let server = TestServer::start(fixture_policy()).await;
    for file in [
        "pod_create_named.json",
        "pod_create_server_dry_run.json",
        "pod_update_label.json",
        "agentsecret_create_kubectl_create.json",
        "agentsecret_delete.json",
    ] {
        let (path, review) = fixture(file);
        server.review(&path, &review).await;
    }
    let (path, mut review) = fixture("pod_create_named.json");
    review["request"]["object"]["metadata"]["annotations"] =
        json!({"agentsecrets.io/secrets": "NOPE"});
    server.review(&path, &review).await;
    server.post("/mutate/pods", "garbage").await;

    let (status, content_type, text) = server.admin_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    for line in [
        "# TYPE agentsecrets_admission_requests counter",
        r#"agentsecrets_admission_requests_total{kind="pod",operation="CREATE",decision="patched"} 2"#,
        r#"agentsecrets_admission_requests_total{kind="pod",operation="CREATE",decision="denied"} 1"#,
        r#"agentsecrets_admission_requests_total{kind="pod",operation="UPDATE",decision="allowed"} 1"#,
        r#"agentsecrets_admission_requests_total{kind="pod",operation="UNKNOWN",decision="invalid"} 1"#,
        r#"agentsecrets_admission_requests_total{kind="agentsecret",operation="CREATE",decision="patched"} 1"#,
        r#"agentsecrets_admission_requests_total{kind="agentsecret",operation="DELETE",decision="allowed"} 1"#,
        "# TYPE agentsecrets_admission_duration_seconds histogram",
        r#"agentsecrets_admission_duration_seconds_count{kind="pod"} 5"#,
        r#"agentsecrets_admission_duration_seconds_count{kind="agentsecret"} 2"#,
        r#"agentsecrets_admission_duration_seconds_bucket{le="+Inf",kind="pod"} 5"#,
        // One real Secret created (the dry run creates none), three names injected.
        r#"agentsecrets_pod_secrets_created_total{result="created"} 1"#,
        "agentsecrets_injected_secrets_total 3",
        "agentsecrets_keyring_keys 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[tokio::test]
async fn the_admin_server_serves_probes_over_http_and_stops_on_shutdown() {
    capture_logs();
    let index = Arc::new(SecretIndex::default());
    index.replace_all([]);
    let state = admin_state(KeyringHandle::new(Keyring::generate("k1").unwrap()), index);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(server::serve_admin(
        listener,
        server::admin_router(state),
        stop.clone().cancelled_owned(),
    ));
    for (path, expected) in [
        ("/healthz", 200),
        ("/readyz", 200),
        ("/metrics", 200),
        ("/nope", 404),
    ] {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let request = hyper::Request::get(path)
            .header("host", "localhost")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status().as_u16(), expected, "{path}");
    }
    stop.cancel();
    let result = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_ok());
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

// ---------------------------------------------------------------------------------------
// 6. Concurrency

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pod_reviews_get_independent_answers() {
    capture_logs();
    const PODS: usize = 32;
    let keyring = Keyring::generate("test-kek").unwrap();
    let value = |i: usize, which: &str| format!("canary-user-{i:02}-{which}-{:04x}", i * 7919);
    let mut secrets = standard_secrets(&keyring);
    for i in 0..PODS {
        let owner = format!("user-{i:02}");
        secrets.push(agent_secret(
            NAMESPACE,
            &format!("{owner}-api"),
            &owner,
            "SERVICE_API_KEY",
            &keyring,
            &value(i, "api"),
        ));
        secrets.push(agent_secret(
            NAMESPACE,
            &format!("{owner}-db"),
            &owner,
            "DB_PASSWORD",
            &keyring,
            &value(i, "db"),
        ));
    }
    let server = Arc::new(TestServer::start_with(fixture_policy(), keyring, secrets).await);
    // Each review waits on its Secret creation, so they overlap.
    *server.writer.delay.lock().unwrap() = Some(Duration::from_millis(50));

    let (path, template) = fixture("pod_create_named.json");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..PODS {
        let mut review = template.clone();
        review["request"]["uid"] = json!(format!("00000000-0000-4000-8000-{i:012}"));
        review["request"]["name"] = json!(format!("sandbox-user-{i:02}"));
        review["request"]["object"]["metadata"]["name"] = json!(format!("sandbox-user-{i:02}"));
        review["request"]["object"]["metadata"]["labels"]["agentsecrets.io/owner"] =
            json!(format!("user-{i:02}"));
        let server = server.clone();
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let answer = server.review(&path, &review).await;
            (i, review, answer)
        }));
    }
    let answers = futures::future::join_all(tasks).await;
    let elapsed = started.elapsed();
    let created = server.created();
    let mut names = std::collections::BTreeSet::new();
    for joined in answers {
        let (i, review, answer) = joined.unwrap();
        assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
        assert_eq!(answer["response"]["allowed"], true, "{answer}");
        let pod = patched(&review["request"]["object"], &answer);
        let secret_name = annotation(&pod, "agentsecrets.io/secret-name").to_owned();
        assert_eq!(
            secret_name,
            agent_secrets::webhook::pod::pod_secret_name(
                review["request"]["uid"].as_str().unwrap()
            ),
            "pod {i}"
        );
        assert!(
            names.insert(secret_name.clone()),
            "Secret name {secret_name} reused"
        );
        for entry in pod["spec"]["containers"][0]["env"].as_array().unwrap() {
            assert_eq!(
                entry["valueFrom"]["secretKeyRef"]["name"],
                secret_name.as_str()
            );
        }
        let secret = created
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(secret_name.as_str()))
            .unwrap();
        assert_eq!(
            secret_values(secret),
            BTreeMap::from([
                ("DB_PASSWORD".to_owned(), value(i, "db")),
                ("SERVICE_API_KEY".to_owned(), value(i, "api")),
            ]),
            "pod {i}"
        );
        let owner = format!("user-{i:02}");
        assert_eq!(
            secret.metadata.labels.as_ref().unwrap()["agentsecrets.io/owner"],
            owner
        );
        let annotations = secret.metadata.annotations.as_ref().unwrap();
        assert_eq!(
            annotations["agentsecrets.io/request-uid"],
            review["request"]["uid"].as_str().unwrap()
        );
        assert_eq!(
            annotations["agentsecrets.io/pod"],
            format!("sandbox-user-{i:02}")
        );
    }
    assert_eq!(created.len(), PODS);
    // The reviews did overlap: done in far less than 32 x 50 ms.
    assert!(
        elapsed < Duration::from_millis(50 * PODS as u64),
        "{elapsed:?}"
    );
}
