//! The `AgentSecret` resource and the names (labels, annotations, field manager) the project
//! shares with the cluster.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};
use std::fmt;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// API group of every resource this project defines.
pub const GROUP: &str = "agentsecrets.io";
/// Field manager used for every write this project makes (server-side apply and patches).
pub const FIELD_MANAGER: &str = "agent-secrets";

/// Pod label naming the user whose secrets the sandbox receives.
pub const OWNER_LABEL: &str = "agentsecrets.io/owner";
/// Pod annotation asking for a subset of the owner's secrets: `A,B`.
pub const SECRETS_ANNOTATION: &str = "agentsecrets.io/secrets";
/// Pod annotation (`"true"`) asking for injection into init containers as well.
pub const INIT_CONTAINERS_ANNOTATION: &str = "agentsecrets.io/inject-init-containers";
/// Pod annotation recording the env names injected (names only, never values).
pub const INJECTED_ANNOTATION: &str = "agentsecrets.io/injected";
/// Pod annotation recording `container/NAME` entries the pod spec already set, which win.
pub const SKIPPED_ANNOTATION: &str = "agentsecrets.io/skipped";
/// Pod annotation naming the pod-scoped Secret that holds the injected values.
pub const SECRET_NAME_ANNOTATION: &str = "agentsecrets.io/secret-name";

/// Label on pod-scoped Secrets: who manages them.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`] on everything this project creates.
pub const MANAGED_BY_VALUE: &str = "agent-secrets";
/// Label on pod-scoped Secrets marking them as such (value `"true"`).
pub const POD_SCOPED_LABEL: &str = "agentsecrets.io/pod-scoped";
/// Annotation on pod-scoped Secrets: the admission request that created it.
pub const REQUEST_UID_ANNOTATION: &str = "agentsecrets.io/request-uid";
/// Annotation on pod-scoped Secrets: the pod's name, or its `generateName` prefix.
pub const POD_ANNOTATION: &str = "agentsecrets.io/pod";

/// Client-side apply copies the whole manifest (value included) into this annotation.
pub const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Longest accepted plaintext value, in bytes. Credentials are small; the bound keeps the
/// stored object far below the API server's object size limit.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// Env names that would let a secret hijack the sandbox runtime. `KUBERNETES_*` is refused too.
/// Operators can extend this list for the webhook (`--reserved-env-names`).
pub const RESERVED_ENV_NAMES: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "SHELL",
    "PWD",
    "HOSTNAME",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "LD_AUDIT",
];
/// Env names starting with this prefix are reserved (service discovery variables).
pub const RESERVED_ENV_PREFIX: &str = "KUBERNETES_";

const ENV_NAME_RULE: &str = "self.matches('^[A-Z_][A-Z0-9_]*$')";
const ENV_NAME_RESERVED_RULE: &str = "!(self in ['PATH', 'HOME', 'USER', 'SHELL', 'PWD', 'HOSTNAME', 'LD_PRELOAD', 'LD_LIBRARY_PATH', 'LD_AUDIT']) && !self.startsWith('KUBERNETES_')";

/// A user's credential, stored sealed and handed to that user's sandbox pods as an env var.
// Each `printcolumn(..)` repeats `type_ = ".."`, which clippy mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentsecrets.io",
    version = "v1alpha1",
    kind = "AgentSecret",
    plural = "agentsecrets",
    singular = "agentsecret",
    shortname = "asec",
    category = "agentsecrets",
    namespaced,
    status = "AgentSecretStatus",
    derive = "PartialEq",
    doc = "A user's credential (API key, bearer token, password) that the user's sandbox pods receive as an environment variable. The value is write-only: the agent-secrets webhook seals it (envelope encryption) before it is stored.",
    printcolumn(
        name = "Env Name",
        type_ = "string",
        json_path = ".spec.envName",
        description = "Environment variable the sandbox receives"
    ),
    printcolumn(
        name = "Owner",
        type_ = "string",
        json_path = ".spec.owner",
        description = "User whose sandboxes receive it"
    ),
    printcolumn(
        name = "Key ID",
        type_ = "string",
        json_path = ".spec.sealed.keyId",
        description = "Key-encryption key the value's data key is wrapped under"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the sealed value opens and the secret is injectable"
    ),
    printcolumn(
        name = "Description",
        type_ = "string",
        json_path = ".spec.description",
        priority = "1",
        description = "What the credential is for"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!has(self.value)").message("spec.value must never be stored in plaintext: the agent-secrets webhook seals it on the way in; is the webhook installed and reachable?"))]
#[x_kube(validation = Rule::new("has(self.sealed) || has(self.value)").message("spec.value is required: give the secret a value (the webhook seals it into spec.sealed)"))]
#[serde(rename_all = "camelCase")]
pub struct AgentSecretSpec {
    /// The user this secret belongs to. Sandbox pods labelled `agentsecrets.io/owner: <owner>` in
    /// this namespace receive it. A valid label value (at most 63 characters); immutable.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.owner is immutable: delete the secret and create it for the other owner"))]
    #[x_kube(validation = Rule::new("self.matches('^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$')").message("spec.owner must be a valid label value: letters, digits, '-', '_' and '.', starting and ending with a letter or digit"))]
    pub owner: String,

    /// Name of the environment variable inside the sandbox, e.g. `SERVICE_API_KEY`,
    /// `SERVICE_BEARER_TOKEN`, `SERVICE_SECRET`, `DB_PASSWORD`. Uppercase letters, digits and
    /// `_`, not starting with a digit; names the sandbox runtime depends on (`PATH`, `HOME`,
    /// `LD_PRELOAD`, `KUBERNETES_*`, ...) are refused.
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new(ENV_NAME_RULE).message("spec.envName must be an uppercase identifier: only A-Z, 0-9 and _, not starting with a digit (e.g. SERVICE_API_KEY)"))]
    #[x_kube(validation = Rule::new(ENV_NAME_RESERVED_RULE).message("spec.envName is reserved: PATH, HOME, USER, SHELL, PWD, HOSTNAME, LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT and KUBERNETES_* would hijack the sandbox runtime"))]
    pub env_name: String,

    /// What the credential is for, shown in listings. At most 1024 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,

    /// Write-only input: the plaintext value. The agent-secrets webhook seals it into
    /// `spec.sealed` and removes it before the object is stored; it is never returned. Leave it
    /// out on update to keep the current value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub value: Option<SecretString>,

    /// The value, encrypted. Written by agent-secrets only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<SealedValue>,
}

/// An envelope-encrypted value: AES-256-GCM ciphertext under a random data key, the data key
/// wrapped (RFC 3394) under the key-encryption key `keyId`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SealedValue {
    /// Key-encryption key (KEK) in the keyring that wraps the data key.
    #[schemars(length(min = 1, max = 63))]
    pub key_id: String,
    /// The 256-bit data key wrapped with AES key wrap (RFC 3394), base64.
    #[schemars(length(min = 1, max = 64))]
    pub wrapped_key: String,
    /// The 96-bit AES-GCM nonce, base64.
    #[schemars(length(min = 1, max = 24))]
    pub nonce: String,
    /// AES-256-GCM ciphertext with its tag, bound to the namespace and owner, base64.
    #[schemars(length(min = 1, max = 87424))]
    pub ciphertext: String,
    /// When this value was sealed from plaintext (re-wrapping keeps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_at: Option<Time>,
}

/// Observed state of an AgentSecret, written by the controller.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentSecretStatus {
    /// Current conditions. `Ready` says whether the sealed value opens and is injectable; its
    /// reason says why not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Key-encryption key the value is currently wrapped under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the value last changed (it was last sealed from plaintext).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_changed_at: Option<Time>,
}

/// A plaintext string that is zeroised on drop and never printed.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize, Zeroize, ZeroizeOnDrop)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The plaintext. Callers must not log or display it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretString {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl schemars::JsonSchema for SecretString {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SecretString".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        String::json_schema(generator)
    }

    fn inline_schema() -> bool {
        true
    }
}

/// Why an env name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvNameError {
    #[error("env name is empty")]
    Empty,
    #[error("env name {0:?} is longer than 255 characters")]
    TooLong(String),
    #[error(
        "env name {0:?} must be an uppercase identifier: only A-Z, 0-9 and _, not starting with a digit"
    )]
    Invalid(String),
    #[error("env name {0:?} is reserved: it would hijack the sandbox runtime")]
    Reserved(String),
}

/// Check an env name the way the CRD does, plus `extra_reserved` names from configuration.
pub fn validate_env_name(name: &str, extra_reserved: &[String]) -> Result<(), EnvNameError> {
    let mut chars = name.chars();
    match chars.next() {
        None => return Err(EnvNameError::Empty),
        Some(first) if !(first.is_ascii_uppercase() || first == '_') => {
            return Err(EnvNameError::Invalid(name.to_owned()));
        }
        Some(_) => {}
    }
    if name.len() > 255 {
        return Err(EnvNameError::TooLong(name.chars().take(32).collect()));
    }
    if !chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_') {
        return Err(EnvNameError::Invalid(name.to_owned()));
    }
    if RESERVED_ENV_NAMES.contains(&name)
        || name.starts_with(RESERVED_ENV_PREFIX)
        || extra_reserved.iter().any(|r| r == name)
    {
        return Err(EnvNameError::Reserved(name.to_owned()));
    }
    Ok(())
}

/// The AgentSecret CRD.
///
/// Optional fields are not marked `nullable`: the API server then prunes an explicit `null`
/// instead of storing it, so `has(self.value)` in the CEL rules sees exactly what is stored.
pub fn crd() -> CustomResourceDefinition {
    let mut crd = AgentSecret::crd();
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            strip_nullable(schema);
        }
    }
    crd
}

fn strip_nullable(schema: &mut JSONSchemaProps) {
    schema.nullable = None;
    for child in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        strip_nullable(child);
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = schema.items.as_mut() {
        strip_nullable(items);
    }
}

/// The CRD as YAML, exactly as checked in under `crds/`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&crd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_follow_the_product_rules() {
        for ok in [
            "SERVICE_API_KEY",
            "X_BEARER_TOKEN",
            "_PRIVATE",
            "DB_PASSWORD",
            "A1",
        ] {
            assert_eq!(validate_env_name(ok, &[]), Ok(()), "{ok}");
        }
        assert_eq!(validate_env_name("", &[]), Err(EnvNameError::Empty));
        assert!(matches!(
            validate_env_name("1ABC", &[]),
            Err(EnvNameError::Invalid(_))
        ));
        assert!(matches!(
            validate_env_name("lower", &[]),
            Err(EnvNameError::Invalid(_))
        ));
        assert!(matches!(
            validate_env_name("A-B", &[]),
            Err(EnvNameError::Invalid(_))
        ));
        assert!(matches!(
            validate_env_name(&"A".repeat(256), &[]),
            Err(EnvNameError::TooLong(_))
        ));
        assert_eq!(validate_env_name(&"A".repeat(255), &[]), Ok(()));
        for reserved in ["PATH", "LD_PRELOAD", "KUBERNETES_SERVICE_HOST", "HOME"] {
            assert!(matches!(
                validate_env_name(reserved, &[]),
                Err(EnvNameError::Reserved(_))
            ));
        }
        let extra = vec!["NODE_OPTIONS".to_owned()];
        assert!(matches!(
            validate_env_name("NODE_OPTIONS", &extra),
            Err(EnvNameError::Reserved(_))
        ));
    }

    #[test]
    fn reserved_cel_rule_names_every_reserved_env_name() {
        for name in RESERVED_ENV_NAMES {
            assert!(
                ENV_NAME_RESERVED_RULE.contains(&format!("'{name}'")),
                "{name} missing from CEL rule"
            );
        }
        assert!(ENV_NAME_RESERVED_RULE.contains(&format!("startsWith('{RESERVED_ENV_PREFIX}')")));
    }

    #[test]
    fn secret_string_debug_is_redacted() {
        let value = SecretString::new("canary-plaintext-123".into());
        assert_eq!(format!("{value:?}"), "<redacted>");
        let spec = AgentSecretSpec {
            owner: "alice".into(),
            env_name: "X".into(),
            description: None,
            value: Some(value),
            sealed: None,
        };
        assert!(!format!("{spec:?}").contains("canary-plaintext-123"));
    }
}
