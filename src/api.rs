//! The `AgentSecret` resource and the names (labels, annotations, field manager) the project
//! shares with the cluster.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

/// The plaintext type of `spec.value`.
pub use crate::crypto::SecretString;
use crate::crypto::{
    CryptoError, Envelope, Format, Keyring, NONCE_LEN, Plaintext, SealContext, TAG_LEN,
    WRAPPED_DEK_LEN,
};
use crate::secretless::{HostPattern, Placement};

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

/// Every pod-scoped Secret's name starts with this prefix, and nobody but the operator may
/// create, change or delete a Secret named so (a ValidatingAdmissionPolicy enforces it): a pod
/// may reference such a Secret only when it carries the owner label and names exactly that
/// Secret in [`SECRET_NAME_ANNOTATION`].
pub const POD_SECRET_NAME_PREFIX: &str = "asec-pod-";

/// Label on pod-scoped Secrets: who manages them.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`] on everything this project creates.
pub const MANAGED_BY_VALUE: &str = "agent-secrets";
/// Label on pod-scoped Secrets marking them as such (value `"true"`).
pub const POD_SCOPED_LABEL: &str = "agentsecrets.io/pod-scoped";
/// Annotation on pod-scoped Secrets: the end of the reuse window (RFC 3339, whole seconds)
/// during which new sandboxes of the same owner and content are given this Secret. Once it has
/// passed, plus [`POD_SECRET_IN_FLIGHT`], the Secret is deleted as soon as no pod names it.
pub const REUSE_UNTIL_ANNOTATION: &str = "agentsecrets.io/reuse-until";

/// [`REUSE_UNTIL_ANNOTATION`]'s text for the end of a window, in Unix seconds.
pub fn reuse_until_text(unix_seconds: i64) -> String {
    Timestamp::from_second(unix_seconds)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// The end of a pod-scoped Secret's reuse window, from its [`REUSE_UNTIL_ANNOTATION`];
/// `None` when absent or unreadable.
pub fn reuse_until(meta: &kube::api::ObjectMeta) -> Option<Timestamp> {
    meta.annotations
        .as_ref()?
        .get(REUSE_UNTIL_ANNOTATION)?
        .parse()
        .ok()
}
/// How long after the admission that named a pod-scoped Secret its pod may still be stored:
/// the API server's default request timeout, which bounds the pod's CREATE with every
/// webhook it calls (and a reinvocation of ours).
pub const POD_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// How long after a reuse window ends its Secret is kept for pods not stored yet: the request
/// timeout, plus 30 s for clock differences between the replicas that admit and the one that
/// collects. The collector also asks the API server for the owner's pods before it deletes.
pub const POD_SECRET_IN_FLIGHT: std::time::Duration = std::time::Duration::from_secs(90);
/// Annotation on pod-scoped Secrets: the admission request that created it.
pub const REQUEST_UID_ANNOTATION: &str = "agentsecrets.io/request-uid";
/// Annotation on pod-scoped Secrets: the pod's name, or its `generateName` prefix.
pub const POD_ANNOTATION: &str = "agentsecrets.io/pod";

/// Pod annotation choosing how a sandbox receives its secrets: `secretless` (placeholders in its
/// environment, the values only in the egress proxy sidecar) or `env` (the values themselves).
pub const MODE_ANNOTATION: &str = "agentsecrets.io/mode";
/// Pod annotation of secretless pods: `open` (default) lets the sandbox reach hosts no secret
/// mentions, `allowlist` only those some secret's `allowedHosts` match.
pub const EGRESS_ANNOTATION: &str = "agentsecrets.io/egress";
/// Pod annotation listing the env names injected as placeholders (informational, never trusted).
pub const SECRETLESS_ANNOTATION: &str = "agentsecrets.io/secretless";
/// Name of the egress proxy sidecar of a secretless pod.
pub const PROXY_CONTAINER_NAME: &str = "agentsecrets-proxy";
/// Env of the proxy sidecar only: `{"ENV_NAME": "placeholder"}` of the pod's secretless secrets.
pub const PROXY_PLACEHOLDERS_ENV: &str = "AGENTSECRETS_PROXY_PLACEHOLDERS";
/// Env of the proxy sidecar only: the feed's CA certificate (PEM).
pub const PROXY_FEED_CA_ENV: &str = "AGENTSECRETS_PROXY_FEED_CA";
/// Env of the proxy sidecar only: the pod's egress mode, `open` or `allowlist`.
pub const PROXY_EGRESS_ENV: &str = "AGENTSECRETS_PROXY_EGRESS";
/// Env of the proxy sidecar only: the owner the pod was admitted for. The feed refuses a pod
/// whose owner label no longer says the same.
pub const PROXY_OWNER_ENV: &str = "AGENTSECRETS_PROXY_OWNER";
/// Audience of the projected service-account token the proxy presents to the value feed.
pub const FEED_AUDIENCE: &str = "agentsecrets.io/feed";
/// Volume of the proxy's feed token.
pub const FEED_TOKEN_VOLUME: &str = "agentsecrets-feed-token";
/// Volume holding the proxy's CA bundle, mounted read-only into the sandbox containers.
pub const PROXY_CA_VOLUME: &str = "agentsecrets-ca";
/// Path of the operator's value feed.
pub const FEED_PATH: &str = "/v1/feed";

/// Client-side apply copies the whole manifest (value included) into this annotation.
pub const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Env names that would let a secret hijack the sandbox: its shell and process environment,
/// the language runtimes' code-loading and option variables, its proxy and TLS-trust settings
/// (which only the webhook sets, for secretless sandboxes), and dynamic loader variables.
/// The CRD's CEL rule and the webhook are both built from this one list; operators can extend
/// it for the webhook (`--reserved-env-names`).
pub const RESERVED_ENV_NAMES: &[&str] = &[
    // Shell and process environment.
    "PATH",
    "HOME",
    "USER",
    "SHELL",
    "PWD",
    "HOSTNAME",
    "IFS",
    "ENV",
    "BASH_ENV",
    "PROMPT_COMMAND",
    "PS4",
    // Runtimes that load code or options from the environment.
    "NODE_OPTIONS",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "PYTHONHOME",
    "PERL5OPT",
    "PERL5LIB",
    "RUBYOPT",
    "RUBYLIB",
    "JAVA_TOOL_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "_JAVA_OPTIONS",
    "GIT_SSH_COMMAND",
    "GCONV_PATH",
    // Egress and TLS trust.
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "NODE_EXTRA_CA_CERTS",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_USE_ENV_PROXY",
];
/// Env names starting with one of these are reserved: dynamic loader variables (`LD_PRELOAD`,
/// `DYLD_INSERT_LIBRARIES`, ...) and Kubernetes' service discovery variables.
pub const RESERVED_ENV_PREFIXES: &[&str] = &["LD_", "DYLD_", "KUBERNETES_"];

const ENV_NAME_RULE: &str = "self.matches('^[A-Z_][A-Z0-9_]*$')";

/// The CRD's CEL rule refusing [`RESERVED_ENV_NAMES`] and [`RESERVED_ENV_PREFIXES`].
pub fn env_name_reserved_rule() -> String {
    let names: Vec<String> = RESERVED_ENV_NAMES
        .iter()
        .map(|n| format!("'{n}'"))
        .collect();
    let mut rule = format!("!(self in [{}])", names.join(", "));
    for prefix in RESERVED_ENV_PREFIXES {
        rule.push_str(&format!(" && !self.startsWith('{prefix}')"));
    }
    rule
}

/// The refusal message for a reserved env name, naming the whole list.
pub fn env_name_reserved_message() -> String {
    let prefixes: Vec<String> = RESERVED_ENV_PREFIXES
        .iter()
        .map(|p| format!("{p}*"))
        .collect();
    format!(
        "spec.envName is reserved: it would hijack the sandbox runtime, its proxy or its TLS trust ({}, {})",
        RESERVED_ENV_NAMES.join(", "),
        prefixes.join(", ")
    )
}

/// A user's credential, stored sealed and handed to that user's sandbox pods as an env var.
// Each `printcolumn(..)` repeats `type_ = ".."`, which clippy mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "agentsecrets.io",
    version = "v1alpha1",
    kind = "AgentSecret",
    plural = "agentsecrets",
    singular = "agentsecret",
    shortname = "asec",
    category = "agent-secrets",
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
        name = "Allowed Hosts",
        type_ = "string",
        json_path = ".spec.allowedHosts",
        priority = "1",
        description = "Hosts a secretless sandbox's proxy may send the value to"
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
    /// `_`, not starting with a digit; names that would hijack the sandbox runtime (`PATH`,
    /// `NODE_OPTIONS`, `HTTPS_PROXY`, `LD_*`, `KUBERNETES_*`, ...) are refused. Part of what the
    /// sealed value is bound to: a rename re-seals it.
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new(ENV_NAME_RULE).message("spec.envName must be an uppercase identifier: only A-Z, 0-9 and _, not starting with a digit (e.g. SERVICE_API_KEY)"))]
    #[x_kube(validation = Rule::new(env_name_reserved_rule()).message(kube::core::Message::Message(env_name_reserved_message())))]
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

    /// Hosts a secretless sandbox's egress proxy may send the value to: `api.example.com`
    /// (exactly that host, any port) or `*.example.com` (any subdomain, not the apex). At most
    /// 32. A secret with allowed hosts is injected into secretless pods as a placeholder; part
    /// of what the sealed value is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[schemars(extend("items" = {
        "type": "string",
        "minLength": 1,
        "maxLength": 255,
        "description": "A host name, an IPv4 address, or `*.` followed by a domain of at least two labels; no scheme, port or path.",
        "x-kubernetes-validations": [{"rule": host_pattern_rule(), "message": HOST_PATTERN_MESSAGE}]
    }))]
    pub allowed_hosts: Option<Vec<String>>,

    /// Where in a request the proxy may put the value: `header:NAME`, `basic-auth-password` or
    /// `query:NAME`. Empty: any header (including the Basic auth password), never the query.
    /// At most 16. Part of what the sealed value is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[schemars(extend("items" = {
        "type": "string",
        "minLength": 1,
        "maxLength": 256,
        "description": "`header:NAME` (an HTTP header name), `basic-auth-password`, or `query:NAME` (a query parameter name without &, = or #).",
        "x-kubernetes-validations": [{"rule": placement_rule(), "message": PLACEMENT_MESSAGE}]
    }))]
    pub inject_as: Option<Vec<String>>,

    /// Whether the proxy may put the value into plain-HTTP requests (default: HTTPS only). Part
    /// of what the sealed value is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_plain_http: Option<bool>,
}

/// One DNS label, as [`HostPattern::parse`](crate::secretless::HostPattern::parse) accepts it
/// (any case; the proxy compares lowercase).
const HOST_LABEL: &str = "[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?";

/// The CEL rule of an `allowedHosts` item: the grammar of
/// [`HostPattern::parse`](crate::secretless::HostPattern::parse). Character classes instead of
/// backslash escapes keep the rule readable through Rust, CEL and YAML quoting.
pub fn host_pattern_rule() -> String {
    let l = HOST_LABEL;
    format!(
        "self.size() <= (self.startsWith('*.') ? 255 : 253) && self.matches('^([*][.]{l}([.]{l})+|{l}([.]{l})*)$')"
    )
}
const HOST_PATTERN_MESSAGE: &str = "spec.allowedHosts entries must be a host name (api.example.com), an IPv4 address, or *. followed by a domain of at least two labels (*.example.com); no scheme, port, path or trailing dot";

/// HTTP header name characters (RFC 9110 `tchar`), as `http::HeaderName` accepts them.
const HEADER_NAME_CHARS: &str = "-!#$%&'*+.^_`|~0-9A-Za-z";

/// The CEL rule of an `injectAs` item: the grammar of
/// [`Placement::parse`](crate::secretless::Placement::parse).
pub fn placement_rule() -> String {
    format!(
        "self == 'basic-auth-password' || self.matches(\"^header:[{HEADER_NAME_CHARS}]+$\") || self.matches('^query:[^&=#]+$')"
    )
}
const PLACEMENT_MESSAGE: &str = "spec.injectAs entries must be header:NAME (an HTTP header name), basic-auth-password, or query:NAME (a parameter name without &, = or #)";

/// An envelope-encrypted value: AES-256-GCM ciphertext under a random data key, the data key
/// wrapped (RFC 3394) under the key-encryption key `keyId`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SealedValue {
    /// Key-encryption key (KEK) in the keyring that wraps the data key.
    #[schemars(length(min = 1, max = 63))]
    pub key_id: String,
    /// The 256-bit data key wrapped with AES key wrap (RFC 3394), base64 (40 bytes).
    #[schemars(length(min = 56, max = 56))]
    pub wrapped_key: String,
    /// The 96-bit AES-GCM nonce, base64 (12 bytes).
    #[schemars(length(min = 16, max = 16))]
    pub nonce: String,
    /// AES-256-GCM ciphertext with its tag, bound to the namespace, owner, env name and seal
    /// time, base64.
    #[schemars(length(min = 24, max = 87404))]
    pub ciphertext: String,
    /// When this value was sealed from plaintext (re-wrapping keeps it). Bound into the
    /// ciphertext: it cannot be changed without breaking the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_at: Option<Time>,
    /// Format of the associated data: 2 binds namespace, owner, env name and seal time. Absent
    /// on values sealed by the first release (namespace and owner only), which the controller
    /// re-seals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2))]
    pub format: Option<u32>,
}

/// Why a stored sealed value cannot be used. Never carries secret material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealedError {
    #[error("sealed.{field} is not valid base64")]
    InvalidBase64 { field: &'static str },
    #[error("sealed.{field} has {actual} bytes, expected {expected}")]
    InvalidLength {
        field: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("sealed.format {0} is not known to this version of agent-secrets")]
    UnknownFormat(u32),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

fn decode_field<const N: usize>(field: &'static str, text: &str) -> Result<[u8; N], SealedError> {
    let bytes = BASE64
        .decode(text)
        .map_err(|_| SealedError::InvalidBase64 { field })?;
    let actual = bytes.len();
    bytes.try_into().map_err(|_| SealedError::InvalidLength {
        field,
        expected: N,
        actual,
    })
}

impl SealedValue {
    /// Decode and length-check the stored fields.
    pub fn decode(&self) -> Result<Envelope, SealedError> {
        let format = Format::from_number(self.format)
            .ok_or(SealedError::UnknownFormat(self.format.unwrap_or_default()))?;
        let wrapped_key = decode_field::<WRAPPED_DEK_LEN>("wrappedKey", &self.wrapped_key)?;
        let nonce = decode_field::<NONCE_LEN>("nonce", &self.nonce)?;
        let ciphertext =
            BASE64
                .decode(&self.ciphertext)
                .map_err(|_| SealedError::InvalidBase64 {
                    field: "ciphertext",
                })?;
        if ciphertext.len() < TAG_LEN {
            return Err(SealedError::InvalidLength {
                field: "ciphertext",
                expected: TAG_LEN,
                actual: ciphertext.len(),
            });
        }
        Ok(Envelope {
            format,
            key_id: self.key_id.clone(),
            wrapped_key,
            nonce,
            ciphertext,
            sealed_at: self.sealed_at.as_ref().map(|t| t.0.as_second()),
        })
    }

    /// The stored form of `envelope`.
    pub fn encode(envelope: &Envelope) -> Self {
        Self {
            key_id: envelope.key_id.clone(),
            wrapped_key: BASE64.encode(envelope.wrapped_key),
            nonce: BASE64.encode(envelope.nonce),
            ciphertext: BASE64.encode(&envelope.ciphertext),
            sealed_at: envelope
                .sealed_at
                .and_then(|s| Timestamp::from_second(s).ok())
                .map(Time),
            format: envelope.format.number(),
        }
    }

    /// Decode and open for `ctx`.
    pub fn open(&self, keyring: &Keyring, ctx: SealContext<'_>) -> Result<Plaintext, SealedError> {
        Ok(keyring.open(&self.decode()?, ctx)?)
    }
}

impl AgentSecretSpec {
    /// What this secret's sealed value is bound to, in `namespace`, with `constraints` from
    /// [`AgentSecretSpec::constraints`] (the caller keeps the string).
    pub fn seal_context<'a>(&'a self, namespace: &'a str, constraints: &'a str) -> SealContext<'a> {
        SealContext {
            constraints,
            ..SealContext::new(namespace, &self.owner, &self.env_name)
        }
    }

    /// The canonical text of where the value may be used, bound into the sealed value so that
    /// widening `allowedHosts` (or `injectAs`, or allowing plain HTTP) goes through the webhook,
    /// which re-seals. See [`constraints_of`].
    pub fn constraints(&self) -> String {
        constraints_of(
            self.allowed_hosts.as_deref().unwrap_or_default(),
            self.inject_as.as_deref().unwrap_or_default(),
            self.allow_plain_http.unwrap_or(false),
        )
    }

    /// Check `allowedHosts` and `injectAs` as the CRD's rules do, with the proxy's own parsers.
    pub fn validate_constraints(&self) -> Result<(), ConstraintError> {
        let hosts = self.allowed_hosts.as_deref().unwrap_or_default();
        if hosts.len() > MAX_ALLOWED_HOSTS {
            return Err(ConstraintError::TooManyHosts(hosts.len()));
        }
        if let Some(bad) = hosts.iter().find(|h| HostPattern::parse(h).is_none()) {
            return Err(ConstraintError::Host(bad.chars().take(64).collect()));
        }
        let placements = self.inject_as.as_deref().unwrap_or_default();
        if placements.len() > MAX_INJECT_AS {
            return Err(ConstraintError::TooManyPlacements(placements.len()));
        }
        if let Some(bad) = placements
            .iter()
            .find(|p| p.len() > 256 || Placement::parse(p).is_none())
        {
            return Err(ConstraintError::Placement(bad.chars().take(64).collect()));
        }
        Ok(())
    }

    /// Whether a secretless sandbox may receive this secret as a placeholder.
    pub fn is_secretless_capable(&self) -> bool {
        self.allowed_hosts.as_ref().is_some_and(|h| !h.is_empty())
    }
}

/// Most `allowedHosts` entries.
pub const MAX_ALLOWED_HOSTS: usize = 32;
/// Most `injectAs` entries.
pub const MAX_INJECT_AS: usize = 16;

/// Why `allowedHosts` or `injectAs` is refused. Hosts and placements are not secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintError {
    #[error("spec.allowedHosts has {0} entries; at most {MAX_ALLOWED_HOSTS} are allowed")]
    TooManyHosts(usize),
    #[error(
        "spec.allowedHosts entry {0:?} is not a host name, an IPv4 address or *. followed by a domain of at least two labels"
    )]
    Host(String),
    #[error("spec.injectAs has {0} entries; at most {MAX_INJECT_AS} are allowed")]
    TooManyPlacements(usize),
    #[error("spec.injectAs entry {0:?} is not header:NAME, basic-auth-password or query:NAME")]
    Placement(String),
}

/// The canonical constraints text: empty when nothing restricts the value (so values sealed
/// before these fields existed still open), else `allowedHosts=<JSON array>;injectAs=<JSON
/// array>;allowPlainHttp=true` with the parts that are set. Hosts and placements are in the
/// proxy's normal form (lowercase), sorted and without duplicates, so a reordering or a change
/// of case is not a change of what the value is bound to.
pub fn constraints_of(
    allowed_hosts: &[String],
    inject_as: &[String],
    allow_plain_http: bool,
) -> String {
    fn canonical<T: std::fmt::Display>(
        items: &[String],
        parse: impl Fn(&str) -> Option<T>,
    ) -> Vec<String> {
        let set: std::collections::BTreeSet<String> = items
            .iter()
            .map(|item| parse(item).map_or_else(|| item.clone(), |parsed| parsed.to_string()))
            .collect();
        set.into_iter().collect()
    }
    let mut parts = Vec::new();
    let hosts = canonical(allowed_hosts, HostPattern::parse);
    if !hosts.is_empty() {
        parts.push(format!("allowedHosts={}", serde_json::Value::from(hosts)));
    }
    let placements = canonical(inject_as, Placement::parse);
    if !placements.is_empty() {
        parts.push(format!("injectAs={}", serde_json::Value::from(placements)));
    }
    if allow_plain_http {
        parts.push("allowPlainHttp=true".to_owned());
    }
    parts.join(";")
}

/// Seconds since the Unix epoch now: the seal time recorded with a new value. Whole seconds,
/// because that is what the API server stores and the ciphertext binds.
pub fn now_seconds() -> i64 {
    Timestamp::now().as_second()
}

/// Observed state of an AgentSecret, written by the controller.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentSecretStatus {
    /// Current conditions. `Ready` says whether the sealed value opens and is injectable; its
    /// reason says why not. A map keyed by type, so server-side apply merges conditions by type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
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

impl AgentSecretStatus {
    /// A digest of everything but the conditions' transition times, which a reconcile keeps
    /// as they are: two statuses with the same digest need no write to turn one into the
    /// other. Lets the controller's cache tell a settled object from a stale one without
    /// keeping its status.
    pub fn digest(&self) -> u64 {
        use std::hash::{Hash as _, Hasher as _};
        // SipHash with fixed keys: the digest is compared within one process only.
        let mut hasher = std::hash::DefaultHasher::new();
        // Destructured, so a field added to the status or a condition cannot be left out of
        // the digest unnoticed (an object differing only there would never be rewritten).
        let Self {
            conditions,
            key_id,
            observed_generation,
            value_changed_at,
        } = self;
        conditions.len().hash(&mut hasher);
        for condition in conditions {
            let Condition {
                type_,
                status,
                reason,
                message,
                observed_generation,
                last_transition_time: _,
            } = condition;
            (type_, status, reason, message, observed_generation).hash(&mut hasher);
        }
        key_id.hash(&mut hasher);
        observed_generation.hash(&mut hasher);
        value_changed_at
            .as_ref()
            .map(|t| (t.0.as_second(), t.0.subsec_nanosecond()))
            .hash(&mut hasher);
        hasher.finish()
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
        || RESERVED_ENV_PREFIXES.iter().any(|p| name.starts_with(p))
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

    /// The names a security review found would let a secret hijack a sandbox: each must stay
    /// refused, by the webhook's check and by the CRD's rule built from the same list.
    #[test]
    fn every_runtime_hijacking_env_name_is_reserved() {
        let rule = env_name_reserved_rule();
        for name in [
            "NODE_OPTIONS",
            "NODE_EXTRA_CA_CERTS",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "NO_PROXY",
            "BASH_ENV",
            "ENV",
            "PYTHONPATH",
            "PYTHONSTARTUP",
            "PYTHONHOME",
            "PERL5OPT",
            "PERL5LIB",
            "RUBYOPT",
            "RUBYLIB",
            "JAVA_TOOL_OPTIONS",
            "JDK_JAVA_OPTIONS",
            "_JAVA_OPTIONS",
            "GIT_SSH_COMMAND",
            "SSL_CERT_FILE",
            "SSL_CERT_DIR",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "GCONV_PATH",
            "PROMPT_COMMAND",
            "PS4",
            "IFS",
            "PATH",
            "HOME",
            "USER",
            "SHELL",
            "PWD",
            "HOSTNAME",
        ] {
            assert_eq!(
                validate_env_name(name, &[]),
                Err(EnvNameError::Reserved(name.into())),
                "{name}"
            );
            assert!(
                rule.contains(&format!("'{name}'")),
                "{name} missing from the CEL rule"
            );
        }
        for name in [
            "LD_PRELOAD",
            "LD_ANYTHING",
            "DYLD_INSERT_LIBRARIES",
            "KUBERNETES_PORT",
        ] {
            assert_eq!(
                validate_env_name(name, &[]),
                Err(EnvNameError::Reserved(name.into())),
                "{name}"
            );
        }
        for prefix in ["LD_", "DYLD_", "KUBERNETES_"] {
            assert!(
                rule.contains(&format!("!self.startsWith('{prefix}')")),
                "{prefix}"
            );
        }
    }

    #[test]
    fn spec_debug_is_redacted() {
        let spec = AgentSecretSpec {
            owner: "alice".into(),
            env_name: "X".into(),
            description: None,
            value: Some(SecretString::new("canary-plaintext-123".into())),
            sealed: None,
            ..Default::default()
        };
        assert!(!format!("{spec:?}").contains("canary-plaintext-123"));
    }

    fn sealed(keyring: &Keyring) -> SealedValue {
        let envelope = keyring
            .seal(
                b"value",
                SealContext::new("ns", "alice", "A"),
                1_800_000_000,
            )
            .unwrap();
        SealedValue::encode(&envelope)
    }

    #[test]
    fn a_sealed_value_survives_the_stored_form() {
        let keyring = Keyring::generate("k").unwrap();
        let stored = sealed(&keyring);
        assert_eq!(stored.format, Some(2));
        let text = serde_json::to_string(&stored).unwrap();
        assert!(
            text.contains("\"sealedAt\":\"2027-01-15T08:00:00Z\""),
            "{text}"
        );
        let back: SealedValue = serde_json::from_str(&text).unwrap();
        let opened = back
            .open(&keyring, SealContext::new("ns", "alice", "A"))
            .unwrap();
        assert_eq!(opened.expose(), b"value");
    }

    #[test]
    fn malformed_stored_fields_get_distinct_errors() {
        let keyring = Keyring::generate("k").unwrap();
        let good = sealed(&keyring);
        let mut t = good.clone();
        t.nonce = "***".into();
        assert_eq!(
            t.decode().unwrap_err(),
            SealedError::InvalidBase64 { field: "nonce" }
        );
        let mut t = good.clone();
        t.wrapped_key = BASE64.encode([0u8; 16]);
        assert_eq!(
            t.decode().unwrap_err(),
            SealedError::InvalidLength {
                field: "wrappedKey",
                expected: WRAPPED_DEK_LEN,
                actual: 16
            }
        );
        let mut t = good.clone();
        t.ciphertext = BASE64.encode([0u8; 4]);
        assert!(matches!(
            t.decode().unwrap_err(),
            SealedError::InvalidLength {
                field: "ciphertext",
                ..
            }
        ));
        let mut t = good.clone();
        t.ciphertext = "not base64!".into();
        assert_eq!(
            t.decode().unwrap_err(),
            SealedError::InvalidBase64 {
                field: "ciphertext"
            }
        );
        let mut t = good;
        t.format = Some(9);
        assert_eq!(t.decode().unwrap_err(), SealedError::UnknownFormat(9));
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn constraints_are_empty_when_none_are_set_so_existing_values_open() {
        assert_eq!(constraints_of(&[], &[], false), "");
        assert_eq!(AgentSecretSpec::default().constraints(), "");
        let spec = AgentSecretSpec {
            allowed_hosts: Some(vec![]),
            inject_as: Some(vec![]),
            allow_plain_http: Some(false),
            ..AgentSecretSpec::default()
        };
        assert_eq!(spec.constraints(), "");
    }

    #[test]
    fn constraints_are_canonical_and_tell_every_field_apart() {
        let hosts = constraints_of(&strings(&["b.x.com", "A.x.com", "a.x.com"]), &[], false);
        assert_eq!(hosts, r#"allowedHosts=["a.x.com","b.x.com"]"#);
        assert_eq!(
            constraints_of(
                &strings(&["a.x.com"]),
                &strings(&["header:X-Key", "query:k"]),
                true
            ),
            r#"allowedHosts=["a.x.com"];injectAs=["header:x-key","query:k"];allowPlainHttp=true"#
        );
        // A host and a placement of the same text, or a comma inside an item, never collide.
        let distinct = [
            constraints_of(&strings(&["a.com"]), &[], false),
            constraints_of(&[], &strings(&["query:a.com"]), false),
            constraints_of(&strings(&["a.com", "b.com"]), &[], false),
            constraints_of(&strings(&["a.com,b.com"]), &[], false),
            constraints_of(&strings(&["a.com"]), &[], true),
        ];
        let set: std::collections::BTreeSet<&String> = distinct.iter().collect();
        assert_eq!(set.len(), distinct.len(), "{distinct:?}");
    }

    #[test]
    fn the_header_rule_admits_exactly_the_characters_the_proxy_accepts() {
        for byte in 0u8..128 {
            let c = char::from(byte);
            let parsed = Placement::parse(&format!("header:{c}")).is_some();
            let in_rule = c.is_ascii_alphanumeric() || "-!#$%&'*+.^_`|~".contains(c);
            assert_eq!(parsed, in_rule, "{c:?}");
        }
        assert!(placement_rule().contains(HEADER_NAME_CHARS));
    }

    /// The CRD's size bounds follow from the crypto constants: a maximal value must fit, and
    /// nothing larger than the webhook accepts may be stored.
    #[test]
    fn crd_size_bounds_follow_the_crypto_constants() {
        let schema = serde_json::to_value(crd()).unwrap();
        let spec = &schema["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"];
        let b64 = |n: usize| n.div_ceil(3) as u64 * 4;
        let bounds =
            |field: &serde_json::Value| (field["minLength"].clone(), field["maxLength"].clone());
        assert_eq!(
            spec["value"]["maxLength"],
            crate::crypto::MAX_VALUE_BYTES as u64
        );
        let sealed = &spec["sealed"]["properties"];
        assert_eq!(
            bounds(&sealed["ciphertext"]),
            (
                b64(TAG_LEN).into(),
                b64(crate::crypto::MAX_VALUE_BYTES + TAG_LEN).into()
            )
        );
        assert_eq!(
            bounds(&sealed["wrappedKey"]),
            (b64(WRAPPED_DEK_LEN).into(), b64(WRAPPED_DEK_LEN).into())
        );
        assert_eq!(
            bounds(&sealed["nonce"]),
            (b64(NONCE_LEN).into(), b64(NONCE_LEN).into())
        );
    }

    #[test]
    fn a_status_digest_ignores_transition_times_only() {
        fn at(seconds: i64) -> Time {
            Time(Timestamp::from_second(seconds).unwrap())
        }
        let status = AgentSecretStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "Sealed".into(),
                message: "opens".into(),
                observed_generation: Some(2),
                last_transition_time: at(1),
            }],
            key_id: Some("k1".into()),
            observed_generation: Some(2),
            value_changed_at: Some(at(5)),
        };
        let mut moved = status.clone();
        moved.conditions[0].last_transition_time = at(9);
        assert_eq!(moved.digest(), status.digest());

        let variants: Vec<fn(&mut AgentSecretStatus)> = vec![
            |s| s.conditions[0].status = "False".into(),
            |s| s.conditions[0].reason = "KeyMissing".into(),
            |s| s.conditions[0].message = "does not open".into(),
            |s| s.conditions[0].observed_generation = Some(3),
            |s| s.conditions[0].type_ = "Other".into(),
            |s| s.conditions.clear(),
            |s| s.key_id = Some("k2".into()),
            |s| s.key_id = None,
            |s| s.observed_generation = Some(3),
            |s| s.value_changed_at = Some(at(6)),
            |s| s.value_changed_at = None,
        ];
        for (i, change) in variants.into_iter().enumerate() {
            let mut changed = status.clone();
            change(&mut changed);
            assert_ne!(changed.digest(), status.digest(), "variant {i}");
        }
    }
}
