//! Whether the server still answers genuine reviews correctly, after whatever a test threw at
//! it.

use agent_secrets::crypto::SealContext;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::answers::patched;
use super::fixtures::{ALICE_NOTION, ALICE_OPENAI, ALICE_X, NAMESPACE, fixture};
use super::injections::{annotation, secret_values};
use super::keyring::keyring;
use super::server::TestServer;

/// What alice's sandbox pod in the fixtures' namespace receives.
pub fn alice_values() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("NOTION_API_KEY".to_owned(), ALICE_NOTION.to_owned()),
        ("OPENAI_API_KEY".to_owned(), ALICE_OPENAI.to_owned()),
        ("X_BEARER_TOKEN".to_owned(), ALICE_X.to_owned()),
    ])
}

/// The server still answers genuine reviews correctly: a sandbox pod gets exactly alice's
/// secrets, and an AgentSecret create is sealed.
pub async fn assert_still_serving(server: &TestServer, after: &str) {
    // A new admission each time (a new uid); alice's sandboxes share one pod-scoped Secret.
    static ADMISSIONS: AtomicU64 = AtomicU64::new(0);
    let n = ADMISSIONS.fetch_add(1, Ordering::Relaxed);
    let (path, mut review) = fixture("pod_create_named.json");
    review["request"]["uid"] = json!(format!("5e0e0e0e-0000-4000-8000-{n:012}"));
    let answer = server.review(&path, &review).await;
    assert_eq!(
        answer["response"]["allowed"], true,
        "after {after}: {answer}"
    );
    assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
    let pod = patched(&review["request"]["object"], &answer);
    let created = server.created();
    let name = annotation(&pod, "agentsecrets.io/secret-name");
    let secret = created
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("after {after}: the Secret {name} the pod refers to exists"));
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
            &keyring(server),
            SealContext::new(NAMESPACE, "bob", env_name),
        )
        .unwrap();
    assert_eq!(plain.expose(), b"fixture-plaintext-pg", "after {after}");
}
