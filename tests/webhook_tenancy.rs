//! Tenancy holds against the inputs an attacker controls, over the real HTTPS server with the
//! recorded reviews: AgentSecret writes are bound to their owner, a sealed value opens only
//! for the secret it was sealed for, runtime-hijacking names are refused, and forged pod
//! reviews cannot make the operator fill a namespace with Secrets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common {
    pub mod answers;
    pub mod client;
    pub mod fixtures;
    pub mod keyring;
    pub mod serve;
    pub mod server;
}

use agent_secrets::api::SealedValue;
use agent_secrets::crypto::SealContext;
use agent_secrets::webhook::{CONTROL_PLANE_DELETERS, Policy, Principal};
use common::answers::patched;
use common::fixtures::{BOB_PG, NAMESPACE, fixture, fixture_policy};
use common::keyring::keyring;
use common::serve::serve;
use serde_json::{Value, json};

fn as_user(review: &mut Value, username: &str, groups: &[&str]) {
    review["request"]["userInfo"] = json!({"username": username, "groups": groups});
}

fn denied_with(answer: &Value, needle: &str) {
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains(needle), "{message}");
}

fn sealed_in(object: &Value) -> SealedValue {
    serde_json::from_value(object["spec"]["sealed"].clone()).unwrap()
}

#[tokio::test]
async fn a_user_cannot_create_a_secret_for_another_owner() {
    let server = serve(Policy::default()).await;
    // bob's secret, written by alice (and, as recorded, by the cluster admin).
    let (path, mut review) = fixture("agentsecret_create_kubectl_create.json");
    for (user, groups) in [
        ("alice", vec![]),
        ("kubernetes-admin", vec!["system:masters"]),
    ] {
        as_user(&mut review, user, &groups);
        let answer = server.review(&path, &review).await;
        denied_with(
            &answer,
            &format!("\"{user}\" may not create AgentSecrets of owner \"bob\""),
        );
        assert!(answer["response"].get("patch").is_none());
    }
    // bob himself may, and his value is sealed.
    as_user(&mut review, "bob", &[]);
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    let stored = patched(&review["request"]["object"], &answer);
    let ctx = SealContext::new(NAMESPACE, "bob", "POSTGRES_PASSWORD");
    let plain = sealed_in(&stored).open(&keyring(&server), ctx).unwrap();
    assert_eq!(plain.expose(), b"fixture-plaintext-pg");
}

#[tokio::test]
async fn an_owner_may_be_named_by_a_prefixed_username_or_a_group() {
    let mut policy = Policy::default();
    policy.owner_binding.username_prefix = "oidc:".into();
    let server = serve(policy).await;
    let (path, mut review) = fixture("agentsecret_create_kubectl_create.json");
    as_user(&mut review, "oidc:bob", &[]);
    assert_eq!(
        server.review(&path, &review).await["response"]["allowed"],
        true
    );
    as_user(&mut review, "bob", &[]);
    denied_with(&server.review(&path, &review).await, "may not create");
    as_user(
        &mut review,
        "platform-backend",
        &["agentsecrets.io/owner:bob"],
    );
    assert_eq!(
        server.review(&path, &review).await["response"]["allowed"],
        true
    );
}

#[tokio::test]
async fn a_secret_administrator_writes_for_any_owner() {
    let mut policy = Policy::default();
    policy.owner_binding.administrators = vec![Principal::parse("group:secret-admins").unwrap()];
    let server = serve(policy).await;
    let (path, mut review) = fixture("agentsecret_create_kubectl_create.json");
    as_user(&mut review, "platform-backend", &["secret-admins"]);
    assert_eq!(
        server.review(&path, &review).await["response"]["allowed"],
        true
    );
}

#[tokio::test]
async fn nobody_deletes_another_owners_secret() {
    let server = serve(Policy::default()).await;
    // alice's NOTION_API_KEY.
    let (path, mut review) = fixture("agentsecret_delete.json");
    as_user(&mut review, "mallory", &[]);
    denied_with(
        &server.review(&path, &review).await,
        "\"mallory\" may not delete AgentSecrets of owner \"alice\"",
    );
    as_user(&mut review, "alice", &[]);
    assert_eq!(
        server.review(&path, &review).await["response"]["allowed"],
        true
    );
    // Namespace deletion and garbage collection are never blocked.
    for deleter in CONTROL_PLANE_DELETERS {
        as_user(&mut review, deleter, &[]);
        assert_eq!(
            server.review(&path, &review).await["response"]["allowed"],
            true
        );
    }
}

#[tokio::test]
async fn a_sealed_value_copied_to_another_secret_of_the_same_owner_is_refused() {
    let server = serve(fixture_policy()).await;
    // bob's POSTGRES_PASSWORD, sealed, pasted into a new secret of bob named OTHER_SECRET.
    let stolen = agent_secrets::testing::sealed(
        &keyring(&server),
        NAMESPACE,
        "bob",
        "POSTGRES_PASSWORD",
        BOB_PG,
    );
    let (path, mut review) = fixture("agentsecret_create_kubectl_create.json");
    let object = &mut review["request"]["object"];
    object["metadata"]["name"] = json!("other-secret");
    object["spec"]["envName"] = json!("OTHER_SECRET");
    object["spec"].as_object_mut().unwrap().remove("value");
    object["spec"]["sealed"] = serde_json::to_value(&stolen).unwrap();
    review["request"]["name"] = json!("other-secret");
    denied_with(
        &server.review(&path, &review).await,
        "spec.sealed does not open for owner \"bob\" and envName OTHER_SECRET",
    );
}

#[tokio::test]
async fn renaming_a_secret_reseals_its_value_for_the_new_name() {
    let server = serve(fixture_policy()).await;
    let (path, mut review) = fixture("agentsecret_update_replace_without_value.json");
    // The stored object: bob's POSTGRES_PASSWORD, sealed.
    let stored = agent_secrets::testing::sealed(
        &keyring(&server),
        NAMESPACE,
        "bob",
        "POSTGRES_PASSWORD",
        "the-password",
    );
    let old = &mut review["request"]["oldObject"]["spec"];
    old.as_object_mut().unwrap().remove("value");
    old["sealed"] = serde_json::to_value(&stored).unwrap();
    // The update renames it and gives no value.
    review["request"]["object"]["spec"]["envName"] = json!("DB_PASSWORD");
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    let updated = patched(&review["request"]["object"], &answer);
    let resealed = sealed_in(&updated);
    assert_ne!(resealed, stored);
    let renamed = SealContext::new(NAMESPACE, "bob", "DB_PASSWORD");
    let plain = resealed.open(&keyring(&server), renamed).unwrap();
    assert_eq!(plain.expose(), b"the-password");
    assert_eq!(
        resealed.sealed_at, stored.sealed_at,
        "the seal time is kept"
    );
    let old_name = SealContext::new(NAMESPACE, "bob", "POSTGRES_PASSWORD");
    assert!(resealed.open(&keyring(&server), old_name).is_err());
}

#[tokio::test]
async fn env_names_that_hijack_a_runtime_are_refused() {
    let server = serve(fixture_policy()).await;
    for name in [
        "NODE_OPTIONS",
        "HTTPS_PROXY",
        "PYTHONPATH",
        "LD_PRELOAD",
        "DYLD_INSERT_LIBRARIES",
        "SSL_CERT_FILE",
        "BASH_ENV",
    ] {
        let (path, mut review) = fixture("agentsecret_create_kubectl_create.json");
        review["request"]["object"]["spec"]["envName"] = json!(name);
        denied_with(&server.review(&path, &review).await, "is reserved");
    }
}

#[tokio::test]
async fn forged_pod_reviews_stop_creating_secrets_past_the_per_namespace_bound() {
    let policy = Policy {
        max_pod_secrets_per_window: 2,
        ..fixture_policy()
    };
    let server = serve(policy).await;
    let (path, template) = fixture("pod_create_named.json");
    // Each asks for other content, so each would need a new Secret.
    let review_of = |i: usize, secrets: &str| {
        let mut review = template.clone();
        review["request"]["uid"] = json!(format!("f0f0f0f0-0000-4000-8000-{i:012}"));
        review["request"]["object"]["metadata"]["annotations"] =
            json!({"agentsecrets.io/secrets": secrets});
        review
    };
    let mut answers = Vec::new();
    for (i, secrets) in ["X_BEARER_TOKEN", "NOTION_API_KEY", "OPENAI_API_KEY"]
        .into_iter()
        .enumerate()
    {
        answers.push(server.review(&path, &review_of(i, secrets)).await);
    }
    assert_eq!(answers[0]["response"]["allowed"], true);
    assert_eq!(answers[1]["response"]["allowed"], true);
    denied_with(
        &answers[2],
        "already has 2 pod-scoped Secrets in their reuse window",
    );
    assert_eq!(server.created().len(), 2);
    let metrics = server.state.metrics.encode();
    assert!(
        metrics.contains("agentsecrets_pod_secrets_created_total{result=\"limited\"} 1"),
        "{metrics}"
    );
    // A sandbox given a Secret that exists still starts: it writes nothing.
    let again = server.review(&path, &review_of(7, "X_BEARER_TOKEN")).await;
    assert_eq!(again["response"]["allowed"], true, "{again}");
    assert_eq!(server.created().len(), 2);
}
