//! Bad input to the real HTTPS webhook, one case per test: each is answered clearly (never a
//! panic, never serde's quote of the input), and the server keeps serving genuine reviews.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common {
    pub mod answers;
    pub mod client;
    pub mod fixtures;
    pub mod injections;
    pub mod keyring;
    pub mod refusals;
    pub mod sealing;
    pub mod server;
    pub mod serving;
}

use agent_secrets::webhook::server::MAX_BODY_BYTES;
use common::fixtures::{fixture, to_body};
use common::injections::secret_values;
use common::keyring::keyring;
use common::refusals::{assert_invalid_with_uid, message};
use common::sealing::seal_old_object;
use common::server::{Setup, TestServer};
use common::serving::{alice_values, assert_still_serving};
use serde_json::{Value, json};

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

const PATHS: [&str; 2] = ["/mutate/pods", "/mutate/agentsecrets"];

#[tokio::test]
async fn a_body_that_is_not_json_is_refused_as_such() {
    let server = TestServer::start(Setup::default()).await;
    assert_still_serving(&server, "start").await;
    for path in PATHS {
        let (status, answer) = server.post(path, "this is {not json").await;
        assert_unreadable(status, &answer, 400, "request body is not valid JSON");
        let (status, answer) = server.post(path, "").await;
        assert_unreadable(status, &answer, 400, "request body is not valid JSON");
    }
    assert_still_serving(&server, "a body that is not JSON").await;
}

#[tokio::test]
async fn json_that_is_not_an_admission_review_is_refused_naming_the_expected_kind() {
    let server = TestServer::start(Setup::default()).await;
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
    assert_still_serving(&server, "JSON that is not an AdmissionReview").await;
}

#[tokio::test]
async fn a_bare_object_instead_of_a_review_is_refused() {
    let server = TestServer::start(Setup::default()).await;
    for path in PATHS {
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
    assert_still_serving(&server, "a bare object").await;
}

/// The v1beta1 AdmissionReview: refused with the uid, so the API server shows why.
#[tokio::test]
async fn a_v1beta1_review_is_refused_with_its_uid() {
    let server = TestServer::start(Setup::default()).await;
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
}

#[tokio::test]
async fn a_review_without_a_request_is_refused() {
    let server = TestServer::start(Setup::default()).await;
    for path in PATHS {
        let (status, answer) = server
            .post(
                path,
                r#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}"#,
            )
            .await;
        assert_unreadable(status, &answer, 400, "AdmissionReview carries no request");
    }
    assert_still_serving(&server, "a review without a request").await;
}

/// The wrong kind for the endpoint: denied with the uid and a message naming the kinds.
#[tokio::test]
async fn a_review_of_the_wrong_kind_is_refused_naming_both_kinds() {
    let server = TestServer::start(Setup::default()).await;
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
    assert!(server.created().is_empty());
    assert_still_serving(&server, "a review of the wrong kind").await;
    assert!(
        server
            .created()
            .iter()
            .all(|s| secret_values(s) == alice_values())
    );
}

#[tokio::test]
async fn a_pod_whose_containers_are_a_string_is_refused_and_creates_nothing() {
    let server = TestServer::start(Setup::default()).await;
    let (path, mut review) = fixture("pod_create_named.json");
    review["request"]["object"]["spec"]["containers"] = json!("sandbox");
    let (status, answer) = server.post(&path, to_body(&review)).await;
    assert_invalid_with_uid(
        status,
        &answer,
        &review["request"]["uid"],
        "request body is not an AdmissionReview for kind Pod",
    );
    assert!(server.created().is_empty(), "nothing created");
    assert_still_serving(&server, "a pod with containers as a string").await;
}

/// An AgentSecret UPDATE whose sealed value is not base64: denied, the stored value kept.
#[tokio::test]
async fn a_sealed_value_that_is_not_base64_is_denied_naming_the_field() {
    let server = TestServer::start(Setup::default()).await;
    let (path, mut review) = fixture("agentsecret_update_replace_without_value.json");
    seal_old_object(&mut review, &keyring(&server), Some("fixture-plaintext-pg"));
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

const OVERSIZED_UID: &str = "0b6f3c58-5b1e-4d8e-9a61-9a0d0f3b2c11";

#[tokio::test]
async fn an_oversized_body_is_refused_with_its_uid() {
    let server = TestServer::start(Setup::default()).await;
    for path in PATHS {
        let (status, answer) = server.post(path, oversized_body(Some(OVERSIZED_UID))).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["response"]["uid"], OVERSIZED_UID);
        assert_eq!(answer["response"]["allowed"], false);
        assert_eq!(answer["response"]["status"]["code"], 400);
        assert_eq!(
            message(&answer),
            "AdmissionReview body exceeds the 3 MiB limit"
        );
    }
    assert!(server.created().is_empty());
    assert_still_serving(&server, "an oversized body").await;
}

#[tokio::test]
async fn an_oversized_body_without_a_uid_is_refused_with_http_413() {
    let server = TestServer::start(Setup::default()).await;
    for path in PATHS {
        let (status, answer) = server.post(path, oversized_body(None)).await;
        assert_unreadable(
            status,
            &answer,
            413,
            "AdmissionReview body exceeds the 3 MiB limit",
        );
    }
    assert!(server.created().is_empty());
    assert_still_serving(&server, "an oversized body without a uid").await;
}

/// A body just under the limit is read (and refused for what it is, not for its size).
#[tokio::test]
async fn a_body_just_under_the_limit_is_read() {
    let server = TestServer::start(Setup::default()).await;
    let mut body = oversized_body(Some(OVERSIZED_UID));
    body.truncate(MAX_BODY_BYTES - 16);
    let (status, answer) = server.post("/mutate/pods", body).await;
    assert_invalid_with_uid(status, &answer, &json!(OVERSIZED_UID), "not valid JSON");
}
