//! What a sandbox pod received: the annotations on it and the values of its pod-scoped
//! Secret.

use k8s_openapi::api::core::v1::Secret;
use serde_json::Value;
use std::collections::BTreeMap;

/// The values a pod-scoped Secret holds, by env name.
pub fn secret_values(secret: &Secret) -> BTreeMap<String, String> {
    secret
        .data
        .as_ref()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), String::from_utf8(v.0.clone()).unwrap()))
        .collect()
}

/// An annotation of `object`, or "".
pub fn annotation<'a>(object: &'a Value, key: &str) -> &'a str {
    object["metadata"]["annotations"][key]
        .as_str()
        .unwrap_or_default()
}
