//! Stored AgentSecrets as the webhook leaves them: sealed.

use agent_secrets::crypto::Keyring;
use serde_json::Value;

use super::fixtures::NAMESPACE;

/// Seal an UPDATE fixture's `oldObject` (the recording webhook stored the plaintext) as the
/// webhook would have: from `value`, or else from the plaintext it holds. Returns the value.
pub fn seal_old_object(review: &mut Value, keyring: &Keyring, value: Option<&str>) -> String {
    let old = &mut review["request"]["oldObject"];
    let owner = old["spec"]["owner"].as_str().unwrap().to_owned();
    let env_name = old["spec"]["envName"].as_str().unwrap().to_owned();
    let spec = old["spec"].as_object_mut().unwrap();
    let stored = spec.remove("value").map(|v| v.as_str().unwrap().to_owned());
    let value = value
        .map(str::to_owned)
        .or(stored)
        .unwrap_or_else(|| "fixture-plaintext-previous".to_owned());
    let sealed = agent_secrets::testing::sealed(keyring, NAMESPACE, &owner, &env_name, &value);
    spec.insert("sealed".into(), serde_json::to_value(sealed).unwrap());
    value
}
