//! The checked-in CRD matches the Rust types, and its validation refuses what must never be
//! stored, with messages a user understands.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{Value, json};

fn schema() -> Value {
    let crd = agent_secrets::api::crd();
    let version = &crd.spec.versions[0];
    serde_json::to_value(
        version
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn checked_in_crd_matches_the_rust_types() {
    let generated = agent_secrets::api::crd_yaml().unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/agentsecrets.yaml");
    let checked_in = std::fs::read_to_string(path).unwrap();
    assert!(
        generated == checked_in,
        "crds/agentsecrets.yaml is out of date: run `cargo run -- crd > crds/agentsecrets.yaml`"
    );
}

fn sealed() -> Value {
    json!({"keyId": "k1", "wrappedKey": "AAAA", "nonce": "AAAA", "ciphertext": "AAAA"})
}

fn object(spec: Value) -> Value {
    json!({"apiVersion": "agentsecrets.io/v1alpha1", "kind": "AgentSecret",
           "metadata": {"name": "x", "namespace": "sandboxes"}, "spec": spec})
}

fn messages(new: &Value, old: Option<&Value>) -> Vec<String> {
    match kube_cel::validate(&schema(), new, old) {
        Ok(()) => vec![],
        Err(errors) => errors.iter().map(|e| e.to_string()).collect(),
    }
}

fn refused_with(new: Value, old: Option<Value>, needle: &str) {
    let got = messages(&new, old.as_ref());
    assert!(
        got.iter().any(|m| m.contains(needle)),
        "expected a refusal containing {needle:?}, got {got:?}"
    );
}

#[test]
fn a_sealed_secret_is_accepted() {
    let ok = object(json!({"owner": "alice", "envName": "X_BEARER_TOKEN", "sealed": sealed()}));
    assert_eq!(messages(&ok, None), Vec::<String>::new());
    assert_eq!(messages(&ok, Some(&ok)), Vec::<String>::new());
}

#[test]
fn invalid_env_names_are_refused() {
    for bad in ["lower", "1ABC", "A-B", "A B", "É"] {
        refused_with(
            object(json!({"owner": "alice", "envName": bad, "sealed": sealed()})),
            None,
            "must be an uppercase identifier",
        );
    }
}

#[test]
fn reserved_env_names_are_refused() {
    for reserved in [
        "PATH",
        "HOME",
        "USER",
        "SHELL",
        "PWD",
        "HOSTNAME",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "LD_AUDIT",
        "KUBERNETES_SERVICE_HOST",
    ] {
        refused_with(
            object(json!({"owner": "alice", "envName": reserved, "sealed": sealed()})),
            None,
            "is reserved",
        );
    }
}

#[test]
fn plaintext_value_is_refused_when_stored() {
    refused_with(
        object(json!({"owner": "alice", "envName": "A", "value": "p", "sealed": sealed()})),
        None,
        "must never be stored in plaintext",
    );
    let got = messages(
        &object(json!({"owner": "alice", "envName": "A", "value": "p"})),
        None,
    );
    assert_eq!(got.len(), 1, "one clear message, not two: {got:?}");
    assert!(got[0].contains("must never be stored in plaintext"));
}

#[test]
fn a_secret_without_sealed_value_is_refused() {
    refused_with(
        object(json!({"owner": "alice", "envName": "A"})),
        None,
        "spec.value is required",
    );
}

#[test]
fn owner_is_immutable_and_a_label_value() {
    let old = object(json!({"owner": "alice", "envName": "A", "sealed": sealed()}));
    let new = object(json!({"owner": "bob", "envName": "A", "sealed": sealed()}));
    refused_with(new, Some(old), "spec.owner is immutable");
    refused_with(
        object(json!({"owner": "not a label!", "envName": "A", "sealed": sealed()})),
        None,
        "must be a valid label value",
    );
}

/// Bounds the CEL evaluator does not check, read from the schema the API server enforces.
#[test]
fn schema_bounds_lengths() {
    let schema = schema();
    let spec = &schema["properties"]["spec"]["properties"];
    assert_eq!(spec["envName"]["maxLength"], 255);
    assert_eq!(spec["owner"]["minLength"], 1);
    assert_eq!(spec["owner"]["maxLength"], 63);
    assert_eq!(spec["description"]["maxLength"], 1024);
    let required = schema["properties"]["spec"]["required"].as_array().unwrap();
    assert!(required.contains(&json!("owner")) && required.contains(&json!("envName")));
}

#[test]
fn every_field_is_documented_for_kubectl_explain() {
    fn walk(path: &str, schema: &Value, missing: &mut Vec<String>) {
        if schema
            .get("description")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            missing.push(path.to_owned());
        }
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (name, child) in props {
                walk(&format!("{path}.{name}"), child, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let schema = schema();
    let mut missing = vec![];
    walk("spec", &schema["properties"]["spec"], &mut missing);
    walk("status", &schema["properties"]["status"], &mut missing);
    assert!(
        missing.is_empty(),
        "fields without description: {missing:?}"
    );
}

fn with_constraints(extra: Value) -> Value {
    let mut spec = json!({"owner": "alice", "envName": "X_BEARER_TOKEN", "sealed": sealed()});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    object(spec)
}

/// Host patterns the proxy's parser and the CRD's rule must judge alike.
const HOSTS: &[&str] = &[
    "api.x.com",
    "API.X.COM",
    "localhost",
    "10.0.0.1",
    "a-b.example.com",
    "*.example.com",
    "*.a.b.example.com",
    "*.com",
    "*",
    "*.",
    "api.*.com",
    "**.example.com",
    "https://api.x.com",
    "api.x.com:443",
    "api.x.com/path",
    "api.x.com.",
    ".api.x.com",
    "-api.x.com",
    "api-.x.com",
    "a..b",
    "a b.com",
    "héllo.com",
    "under_score.com",
    "",
];

/// Placements the proxy's parser and the CRD's rule must judge alike.
const PLACEMENTS: &[&str] = &[
    "header:Authorization",
    "header:x-api-key",
    "header:X_Custom!#$%&'*+.^`|~",
    "header:",
    "header:bad name",
    "header:bad:name",
    "header:bad\"quote",
    "basic-auth-password",
    "Basic-Auth-Password",
    "basic-auth",
    "query:key",
    "query:api key",
    "query:",
    "query:a&b",
    "query:a=b",
    "query:a#b",
    "cookie:session",
    "Authorization",
    "",
];

#[test]
fn allowed_hosts_are_judged_by_the_crd_as_by_the_proxy() {
    for host in HOSTS {
        let parsed = agent_secrets::secretless::HostPattern::parse(host).is_some();
        let got = messages(&with_constraints(json!({"allowedHosts": [host]})), None);
        let accepted = got.is_empty();
        assert_eq!(
            accepted, parsed,
            "{host:?}: proxy parser accepts={parsed}, CRD refusals {got:?}"
        );
        if !accepted {
            assert!(
                got.iter()
                    .any(|m| m.contains("spec.allowedHosts entries must be")),
                "{host:?}: {got:?}"
            );
        }
    }
    // The length bounds of a host name, which the regular expression alone cannot count.
    let label = "a".repeat(63);
    let long = format!("{label}.{label}.{label}.{}", "a".repeat(61));
    assert_eq!(long.len(), 253);
    for (host, parsed) in [
        (long.clone(), true),
        (format!("a{long}"), false),
        (format!("*.{long}"), true),
        (format!("{}.com", "a".repeat(64)), false),
    ] {
        assert_eq!(
            agent_secrets::secretless::HostPattern::parse(&host).is_some(),
            parsed,
            "{host}"
        );
        let got = messages(&with_constraints(json!({"allowedHosts": [host]})), None);
        assert_eq!(got.is_empty(), parsed, "{host}: {got:?}");
    }
}

#[test]
fn placements_are_judged_by_the_crd_as_by_the_proxy() {
    for placement in PLACEMENTS {
        let parsed = agent_secrets::secretless::Placement::parse(placement).is_some();
        let got = messages(
            &with_constraints(json!({"allowedHosts": ["api.x.com"], "injectAs": [placement]})),
            None,
        );
        let accepted = got.is_empty();
        assert_eq!(
            accepted, parsed,
            "{placement:?}: proxy parser accepts={parsed}, CRD refusals {got:?}"
        );
        if !accepted {
            assert!(
                got.iter()
                    .any(|m| m.contains("spec.injectAs entries must be")),
                "{placement:?}: {got:?}"
            );
        }
    }
}

#[test]
fn a_secretless_secret_with_every_constraint_is_accepted() {
    let ok = with_constraints(json!({
        "allowedHosts": ["api.x.com", "*.x.com"],
        "injectAs": ["header:Authorization", "query:key", "basic-auth-password"],
        "allowPlainHttp": true
    }));
    assert_eq!(messages(&ok, None), Vec::<String>::new());
    assert_eq!(messages(&ok, Some(&ok)), Vec::<String>::new());
}

#[test]
fn schema_bounds_the_constraint_lists() {
    let schema = schema();
    let spec = &schema["properties"]["spec"]["properties"];
    assert_eq!(spec["allowedHosts"]["maxItems"], 32);
    assert_eq!(spec["allowedHosts"]["items"]["maxLength"], 255);
    assert_eq!(spec["injectAs"]["maxItems"], 16);
    assert_eq!(spec["injectAs"]["items"]["maxLength"], 256);
    assert_eq!(spec["allowPlainHttp"]["type"], "boolean");
}

#[test]
fn allowed_hosts_show_in_the_wide_listing_only() {
    let crd = agent_secrets::api::crd();
    let columns = crd.spec.versions[0]
        .additional_printer_columns
        .as_ref()
        .unwrap();
    let hosts = columns
        .iter()
        .find(|c| c.name == "Allowed Hosts")
        .expect("an Allowed Hosts column");
    assert_eq!(hosts.json_path, ".spec.allowedHosts");
    assert_eq!(hosts.priority, Some(1), "shown by -o wide, not by default");
}
