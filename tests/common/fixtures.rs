//! The AdmissionReviews recorded from a real API server, and what they run against: the
//! policy they were recorded under and a cache of secrets whose values are unique canaries.

use agent_secrets::api::AgentSecret;
use agent_secrets::crypto::Keyring;
use agent_secrets::testing::agent_secret;
use agent_secrets::webhook::{Policy, Principal};
use serde_json::Value;
use std::path::Path;

pub const NAMESPACE: &str = "sandboxes";

/// Plaintexts the harness puts in the cache. Each is unique, so a leak is easy to spot.
pub const ALICE_X: &str = "canary-alice-x-bearer-9f2c";
pub const ALICE_NOTION: &str = "canary-alice-notion-41ab";
pub const ALICE_OPENAI: &str = "canary-alice-openai-77de";
pub const BOB_X: &str = "canary-bob-x-bearer-c3d0";
pub const BOB_PG: &str = "canary-bob-postgres-5e61";
pub const ALICE_OTHER_NS: &str = "canary-alice-other-namespace-0a9b";

/// The cache the fixtures run against, `(namespace, name, owner, envName, value)`: alice and
/// bob in `sandboxes`, alice in `other`.
pub const STANDARD_SECRETS: [(&str, &str, &str, &str, &str); 6] = [
    (
        NAMESPACE,
        "x-bearer-token",
        "alice",
        "X_BEARER_TOKEN",
        ALICE_X,
    ),
    (
        NAMESPACE,
        "notion-api-key",
        "alice",
        "NOTION_API_KEY",
        ALICE_NOTION,
    ),
    (
        NAMESPACE,
        "openai-api-key",
        "alice",
        "OPENAI_API_KEY",
        ALICE_OPENAI,
    ),
    (
        NAMESPACE,
        "bob-x-bearer-token",
        "bob",
        "X_BEARER_TOKEN",
        BOB_X,
    ),
    (
        NAMESPACE,
        "postgres-password",
        "bob",
        "POSTGRES_PASSWORD",
        BOB_PG,
    ),
    (
        "other",
        "x-bearer-token",
        "alice",
        "X_BEARER_TOKEN",
        ALICE_OTHER_NS,
    ),
];

/// [`STANDARD_SECRETS`] sealed under `keyring`.
pub fn standard_secrets(keyring: &Keyring) -> Vec<AgentSecret> {
    STANDARD_SECRETS
        .iter()
        .map(|(namespace, name, owner, env_name, value)| {
            agent_secret(namespace, name, owner, env_name, keyring, value)
        })
        .collect()
}

/// A fixture recorded from a real API server: `(path, review)`.
pub fn fixture(name: &str) -> (String, Value) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/admission")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let value: Value = serde_json::from_str(&text).unwrap();
    let url = value["path"].as_str().unwrap();
    // The API server appends ?timeout=…; the route is the path.
    let route = url.split('?').next().unwrap().to_owned();
    (route, value["review"].clone())
}

/// The policy the recorded fixtures run under: they were recorded as the cluster's admin
/// (group `system:masters`), made a secret administrator here so that owner binding lets the
/// admin write alice's and bob's secrets; owner binding has tests of its own. The tests run
/// on the real clock: a day-long reuse window keeps an owner's sandboxes on one Secret even
/// when a test runs across a 5-minute boundary (window boundaries have unit tests).
pub fn fixture_policy() -> Policy {
    let mut policy = Policy {
        pod_secret_reuse_window: std::time::Duration::from_secs(86_400),
        ..Policy::default()
    };
    policy.owner_binding.administrators = vec![Principal::Group("system:masters".into())];
    policy
}

/// A review as the request body the API server sends.
pub fn to_body(review: &Value) -> Vec<u8> {
    serde_json::to_vec(review).unwrap()
}
