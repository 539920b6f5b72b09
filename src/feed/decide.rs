//! The feed's decisions, free of I/O: who a reviewed token is, whether its pod is a secretless
//! sandbox and of which owner, and the snapshot line that pod gets.

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

use super::{
    EGRESS_ANNOTATION, FEED_AUDIENCE, PROXY_CONTAINER_NAME, PROXY_EGRESS_ENV, PROXY_OWNER_ENV,
    PROXY_PLACEHOLDERS_ENV,
};
use crate::api::OWNER_LABEL;
use crate::cache::CachedSecret;
use crate::crypto::Keyring;
use crate::secretless::snapshot::{
    EgressMode, HostPattern, PLACEHOLDER_MIN_RANDOM, PLACEHOLDER_PREFIX, Placement,
};

/// Extra of a pod-bound service-account token: the pod's name.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// Extra of a pod-bound service-account token: the pod's uid.
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// Why a stream is refused. Names the pod and namespace at most: never a token, a value or a
/// placeholder.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("failed to authenticate: no bearer token")]
    NoToken,
    #[error("failed to authenticate: the token is not valid")]
    NotAuthenticated,
    #[error("failed to authenticate: the token is not for the audience {FEED_AUDIENCE}")]
    WrongAudience,
    #[error("failed to authenticate: the token is not a service account's")]
    NotServiceAccount,
    #[error("failed to authenticate: the token is not bound to a pod")]
    NotPodBound,
    #[error("failed to authorise the feed for pod {namespace}/{pod}: {reason}")]
    Pod {
        namespace: String,
        pod: String,
        reason: &'static str,
    },
}

impl Refusal {
    /// The HTTP status: 401 for the token, 403 for the pod.
    pub fn status(&self) -> u16 {
        match self {
            Self::Pod { .. } => 403,
            _ => 401,
        }
    }
}

/// The pod a token was issued for, as the API server vouches for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
}

impl PodIdentity {
    fn refuse(&self, reason: &'static str) -> Refusal {
        Refusal::Pod {
            namespace: self.namespace.clone(),
            pod: self.pod_name.clone(),
            reason,
        }
    }
}

/// The namespaces agent-secrets injects pods in: every one but `excluded`, and only those
/// of `only` when it is not empty (`--excluded-namespaces`, `--sandbox-namespaces`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Namespaces {
    pub excluded: BTreeSet<String>,
    pub only: BTreeSet<String>,
}

impl Namespaces {
    /// Whether pods of `namespace` may be served: the webhook admits none elsewhere, so a
    /// sidecar pod there was made by someone else.
    pub fn serves(&self, namespace: &str) -> bool {
        !self.excluded.contains(namespace)
            && (self.only.is_empty() || self.only.contains(namespace))
    }
}

/// Refuse a pod in a namespace agent-secrets does not inject.
pub fn namespace_served(identity: &PodIdentity, namespaces: &Namespaces) -> Result<(), Refusal> {
    if namespaces.serves(&identity.namespace) {
        Ok(())
    } else {
        Err(identity.refuse("agent-secrets does not inject pods of this namespace"))
    }
}

/// The identity in a TokenReview's answer: authenticated, for the feed's audience, a service
/// account's, bound to a pod (name and uid in the user's extra).
pub fn identity_of(status: Option<&TokenReviewStatus>) -> Result<PodIdentity, Refusal> {
    let status = status.ok_or(Refusal::NotAuthenticated)?;
    if status.authenticated != Some(true) {
        return Err(Refusal::NotAuthenticated);
    }
    // The API server answers the audiences the token is valid for among those asked; a token
    // of another audience is not authenticated at all, this is the second check.
    if !status
        .audiences
        .as_deref()
        .is_some_and(|a| a.iter().any(|a| a == FEED_AUDIENCE))
    {
        return Err(Refusal::WrongAudience);
    }
    let user = status.user.as_ref().ok_or(Refusal::NotAuthenticated)?;
    let (namespace, service_account) = user
        .username
        .as_deref()
        .and_then(|u| u.strip_prefix(SERVICE_ACCOUNT_PREFIX))
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
        .ok_or(Refusal::NotServiceAccount)?;
    let single = |key: &str| -> Option<String> {
        match user.extra.as_ref()?.get(key)?.as_slice() {
            [one] if !one.is_empty() => Some(one.clone()),
            _ => None,
        }
    };
    let (Some(pod_name), Some(pod_uid)) = (single(POD_NAME_EXTRA), single(POD_UID_EXTRA)) else {
        return Err(Refusal::NotPodBound);
    };
    Ok(PodIdentity {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        pod_name,
        pod_uid,
    })
}

/// The `exp` claim of a JWT, read without verifying it: only to end the stream when the token
/// expires, after the API server has verified the token. `None` when it is not readable.
pub fn token_expiry(token: &str) -> Option<i64> {
    #[derive(Deserialize)]
    struct Claims {
        exp: i64,
    }
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<Claims>(&bytes).ok().map(|c| c.exp)
}

/// How long a stream may last: until the token expires, and at most `max`.
pub fn stream_lifetime(now: i64, expiry: Option<i64>, max: Duration) -> Duration {
    match expiry {
        Some(exp) => {
            let left = u64::try_from(exp.saturating_sub(now)).unwrap_or(0);
            max.min(Duration::from_secs(left))
        }
        None => max,
    }
}

/// A secretless sandbox pod as the webhook admitted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub owner: String,
    /// Env name → placeholder.
    pub placeholders: BTreeMap<String, String>,
    pub egress: EgressMode,
}

/// Whether `pod` is the pod of `identity` and a secretless sandbox the webhook admitted: the
/// uid matches (not a later pod of the same name), it is labelled with its owner, and its proxy
/// sidecar carries the placeholders. The pod spec is immutable, so the sidecar's env is what
/// the webhook admitted.
pub fn admitted(pod: &Pod, identity: &PodIdentity) -> Result<Admitted, Refusal> {
    let meta = &pod.metadata;
    if meta.uid.as_deref() != Some(identity.pod_uid.as_str())
        || meta.name.as_deref() != Some(identity.pod_name.as_str())
    {
        return Err(identity.refuse("the pod is not the one the token was issued for"));
    }
    let owner = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(OWNER_LABEL))
        .filter(|o| !o.is_empty())
        .ok_or_else(|| identity.refuse("the pod has no agentsecrets.io/owner label"))?;
    let sidecar = pod
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .and_then(|c| c.iter().find(|c| c.name == PROXY_CONTAINER_NAME))
        .ok_or_else(|| identity.refuse("the pod has no agentsecrets-proxy sidecar"))?;
    let env = |name: &str| -> Option<&str> {
        sidecar
            .env
            .as_ref()?
            .iter()
            .find(|e| e.name == name)?
            .value
            .as_deref()
    };
    // The webhook pins the owner in the sidecar's env (immutable); labels can change.
    let pinned = env(PROXY_OWNER_ENV)
        .ok_or_else(|| identity.refuse("the proxy sidecar does not name the pod's owner"))?;
    if pinned != owner {
        return Err(
            identity.refuse("the pod's owner label differs from the owner it was admitted for")
        );
    }
    let text = env(PROXY_PLACEHOLDERS_ENV)
        .ok_or_else(|| identity.refuse("the proxy sidecar has no placeholders"))?;
    let placeholders: BTreeMap<String, String> = serde_json::from_str(text)
        .map_err(|_| identity.refuse("the proxy sidecar's placeholders are not a JSON object"))?;
    let mut seen = BTreeSet::new();
    for placeholder in placeholders.values() {
        if !valid_placeholder(placeholder) || !seen.insert(placeholder.as_str()) {
            return Err(identity.refuse("the proxy sidecar's placeholders are malformed"));
        }
    }
    let from_env = match env(PROXY_EGRESS_ENV) {
        None | Some("open") => EgressMode::Open,
        Some("allowlist") => EgressMode::Allowlist,
        Some(_) => return Err(identity.refuse("the proxy sidecar's egress mode is unknown")),
    };
    // The annotation can be changed after admission, so it may only tighten what the spec says.
    let annotated = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(EGRESS_ANNOTATION))
        .is_some_and(|v| v == "allowlist");
    let egress = if annotated {
        EgressMode::Allowlist
    } else {
        from_env
    };
    Ok(Admitted {
        owner: owner.clone(),
        placeholders,
        egress,
    })
}

fn valid_placeholder(placeholder: &str) -> bool {
    placeholder
        .strip_prefix(PLACEHOLDER_PREFIX)
        .is_some_and(|r| {
            r.len() >= PLACEHOLDER_MIN_RANDOM && r.bytes().all(|b| b.is_ascii_alphanumeric())
        })
}

/// Why a secret of the owner is left out of a pod's snapshot although the pod has its
/// placeholder. Names only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub name: String,
    pub reason: &'static str,
}

/// One rendered snapshot line (JSON and a newline).
pub struct Rendered {
    /// Holds values: zeroised when dropped.
    pub line: Zeroizing<Vec<u8>>,
    /// Env names served, in order.
    pub served: Vec<String>,
    pub skipped: Vec<Skipped>,
}

impl std::fmt::Debug for Rendered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rendered")
            .field("line", &"<redacted>")
            .field("served", &self.served)
            .field("skipped", &self.skipped)
            .finish()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Line<'a> {
    egress: &'static str,
    secrets: Vec<LineEntry<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LineEntry<'a> {
    env_name: &'a str,
    placeholder: &'a str,
    value: &'a str,
    allowed_hosts: &'a [String],
    inject_as: &'a [String],
    allow_plain_http: bool,
}

/// The snapshot line of a pod: the secrets of its owner in its namespace whose env name it
/// has a placeholder for, that are secretless-capable (allowed hosts set) and whose value
/// opens, in env-name order. A secret that cannot be served is left out (and reported) rather
/// than failing the whole snapshot: the proxy then refuses its placeholder, nothing else.
pub fn render_snapshot(
    pod: &Admitted,
    namespace: &str,
    secrets: &[Arc<CachedSecret>],
    keyring: &Keyring,
) -> Rendered {
    let mut by_env: BTreeMap<&str, Vec<&CachedSecret>> = BTreeMap::new();
    for secret in secrets {
        if secret.namespace == namespace
            && secret.owner == pod.owner
            && pod.placeholders.contains_key(&secret.env_name)
            && secret.is_secretless_capable()
        {
            by_env.entry(&secret.env_name).or_default().push(secret);
        }
    }
    let mut skipped = Vec::new();
    let mut opened = Vec::with_capacity(by_env.len());
    for (env_name, candidates) in by_env {
        let [secret] = candidates.as_slice() else {
            for secret in candidates {
                skipped.push(Skipped {
                    name: secret.name.to_owned(),
                    reason: "another AgentSecret of the owner has the same env name",
                });
            }
            continue;
        };
        match open(secret, keyring) {
            Ok(value) => opened.push((env_name, *secret, value)),
            Err(reason) => skipped.push(Skipped {
                name: secret.name.to_owned(),
                reason,
            }),
        }
    }
    let mut entries = Vec::with_capacity(opened.len());
    let mut served = Vec::with_capacity(opened.len());
    for (env_name, secret, value) in &opened {
        let Some(placeholder) = pod.placeholders.get(*env_name) else {
            continue;
        };
        served.push((*env_name).to_owned());
        entries.push(LineEntry {
            env_name,
            placeholder,
            value,
            allowed_hosts: &secret.allowed_hosts,
            inject_as: &secret.inject_as,
            allow_plain_http: secret.allow_plain_http,
        });
    }
    let line = Line {
        egress: match pod.egress {
            EgressMode::Open => "open",
            EgressMode::Allowlist => "allowlist",
        },
        secrets: entries,
    };
    // Sized up front so the buffer holding values is not reallocated (and left in freed
    // memory) while it is written.
    let capacity = 64
        + opened
            .iter()
            .map(|(env, s, v)| {
                128 + env.len()
                    + 2 * v.len()
                    + s.allowed_hosts
                        .iter()
                        .chain(&s.inject_as)
                        .map(|h| h.len() + 4)
                        .sum::<usize>()
            })
            .sum::<usize>()
            * 2;
    let mut bytes = Zeroizing::new(Vec::with_capacity(capacity));
    // Serialising borrowed strings into a Vec cannot fail.
    if serde_json::to_writer(&mut *bytes, &line).is_err() {
        bytes.clear();
    }
    bytes.push(b'\n');
    Rendered {
        line: bytes,
        served,
        skipped,
    }
}

/// The secret's value, when it is servable: hosts and placements well-formed (the proxy would
/// refuse the whole snapshot otherwise), sealed, opening for its namespace, owner, env name and
/// constraints, and text.
fn open(secret: &CachedSecret, keyring: &Keyring) -> Result<Zeroizing<String>, &'static str> {
    if secret
        .allowed_hosts
        .iter()
        .any(|h| HostPattern::parse(h).is_none())
    {
        return Err("an allowed host is malformed");
    }
    if secret
        .inject_as
        .iter()
        .any(|p| Placement::parse(p).is_none())
    {
        return Err("an injectAs placement is malformed");
    }
    let envelope = match &secret.sealed {
        None => return Err("it has not been sealed yet"),
        Some(Err(_)) => return Err("its sealed value is malformed"),
        Some(Ok(envelope)) => envelope,
    };
    let plain = keyring
        .open(envelope, secret.seal_context())
        .map_err(|_| "its value does not open with the keyring")?;
    let text = std::str::from_utf8(plain.expose()).map_err(|_| "its value is not text")?;
    if text.is_empty() {
        return Err("its value is empty");
    }
    Ok(Zeroizing::new(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SealContext;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use serde_json::json;

    const UID: &str = "0c6a1b1e-2b5e-4b7a-9f51-7d0e4d1a2b3c";
    const PH_A: &str = "asec_ph_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const PH_B: &str = "asec_ph_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    /// A TokenReview status shaped as kube-apiserver answers for a projected, pod-bound token.
    fn reviewed() -> TokenReviewStatus {
        serde_json::from_value(json!({
            "authenticated": true,
            "audiences": [FEED_AUDIENCE],
            "user": {
                "username": "system:serviceaccount:sandboxes:default",
                "uid": "5d0f4c1e-0000-4000-8000-000000000001",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:sandboxes", "system:authenticated"],
                "extra": {
                    "authentication.kubernetes.io/credential-id": ["JTI=7f0c1d2e-aaaa-bbbb-cccc-0123456789ab"],
                    "authentication.kubernetes.io/node-name": ["worker-1"],
                    "authentication.kubernetes.io/node-uid": ["1e2d3c4b-0000-4000-8000-000000000002"],
                    "authentication.kubernetes.io/pod-name": ["agent-1"],
                    "authentication.kubernetes.io/pod-uid": [UID]
                }
            }
        }))
        .unwrap()
    }

    fn identity() -> PodIdentity {
        identity_of(Some(&reviewed())).unwrap()
    }

    #[test]
    fn a_pod_bound_service_account_token_for_the_feed_names_its_pod() {
        assert_eq!(
            identity(),
            PodIdentity {
                namespace: "sandboxes".into(),
                service_account: "default".into(),
                pod_name: "agent-1".into(),
                pod_uid: UID.into(),
            }
        );
    }

    #[test]
    fn tokens_that_are_invalid_for_another_audience_not_a_service_accounts_or_unbound_are_refused()
    {
        let mut status = reviewed();
        status.authenticated = Some(false);
        assert_eq!(identity_of(Some(&status)), Err(Refusal::NotAuthenticated));
        assert_eq!(identity_of(None), Err(Refusal::NotAuthenticated));

        let mut status = reviewed();
        status.audiences = Some(vec!["https://kubernetes.default.svc".into()]);
        assert_eq!(identity_of(Some(&status)), Err(Refusal::WrongAudience));
        status.audiences = None;
        assert_eq!(identity_of(Some(&status)), Err(Refusal::WrongAudience));

        for username in [
            "alice",
            "system:serviceaccount:ns",
            "system:serviceaccount::sa",
            "system:node:worker-1",
        ] {
            let mut status = reviewed();
            status.user.as_mut().unwrap().username = Some(username.into());
            assert_eq!(
                identity_of(Some(&status)),
                Err(Refusal::NotServiceAccount),
                "{username}"
            );
        }

        let mut status = reviewed();
        status.user = Some(UserInfo {
            username: Some("system:serviceaccount:sandboxes:default".into()),
            ..UserInfo::default()
        });
        assert_eq!(identity_of(Some(&status)), Err(Refusal::NotPodBound));
        let mut status = reviewed();
        let extra = status.user.as_mut().unwrap().extra.as_mut().unwrap();
        extra.insert(POD_UID_EXTRA.into(), vec![UID.into(), "other".into()]);
        assert_eq!(identity_of(Some(&status)), Err(Refusal::NotPodBound));
    }

    #[test]
    fn the_expiry_of_a_jwt_is_read_and_bounds_the_stream() {
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let token = format!(
            "{}.{}.c2lnbmF0dXJl",
            b64(json!({"alg": "RS256"})),
            b64(json!({"aud": [FEED_AUDIENCE], "exp": 1_800_000_300, "iat": 1_800_000_000}))
        );
        assert_eq!(token_expiry(&token), Some(1_800_000_300));
        assert_eq!(token_expiry("opaque-token"), None);
        assert_eq!(token_expiry("a.!!!.c"), None);
        let max = Duration::from_secs(600);
        assert_eq!(
            stream_lifetime(1_800_000_000, Some(1_800_000_300), max),
            Duration::from_secs(300)
        );
        assert_eq!(
            stream_lifetime(1_800_000_000, Some(1_900_000_000), max),
            max
        );
        assert_eq!(
            stream_lifetime(1_800_000_000, Some(1_700_000_000), max),
            Duration::ZERO
        );
        assert_eq!(stream_lifetime(1_800_000_000, None, max), max);
    }

    /// A pod as the webhook shapes a secretless sandbox.
    /// The env of `pod`'s proxy sidecar (its first init container).
    fn sidecar_env(pod: &mut Pod) -> &mut Vec<k8s_openapi::api::core::v1::EnvVar> {
        pod.spec.as_mut().unwrap().init_containers.as_mut().unwrap()[0]
            .env
            .as_mut()
            .unwrap()
    }

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": "agent-1", "namespace": "sandboxes", "uid": UID,
                "labels": {OWNER_LABEL: "alice"},
                "annotations": {"agentsecrets.io/mode": "secretless"}
            },
            "spec": {
                "initContainers": [{
                    "name": PROXY_CONTAINER_NAME, "image": "agentsecrets", "restartPolicy": "Always",
                    "env": [
                        {"name": PROXY_PLACEHOLDERS_ENV, "value": json!({"A_TOKEN": PH_A, "B_KEY": PH_B}).to_string()},
                        {"name": PROXY_EGRESS_ENV, "value": "open"},
                        {"name": PROXY_OWNER_ENV, "value": "alice"}
                    ]
                }],
                "containers": [{"name": "agent", "image": "agent"}]
            }
        }))
        .unwrap()
    }

    fn refusal(pod: &Pod) -> &'static str {
        match admitted(pod, &identity()) {
            Err(Refusal::Pod { reason, .. }) => reason,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_secretless_sandbox_is_admitted_with_its_owner_placeholders_and_egress() {
        let admitted = admitted(&pod(), &identity()).unwrap();
        assert_eq!(admitted.owner, "alice");
        assert_eq!(
            admitted.placeholders,
            BTreeMap::from([
                ("A_TOKEN".into(), PH_A.into()),
                ("B_KEY".into(), PH_B.into())
            ])
        );
        assert_eq!(admitted.egress, EgressMode::Open);
    }

    #[test]
    fn the_egress_annotation_may_tighten_but_never_loosen_the_admitted_mode() {
        let mut tightened = pod();
        tightened
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(EGRESS_ANNOTATION.into(), "allowlist".into());
        assert_eq!(
            admitted(&tightened, &identity()).unwrap().egress,
            EgressMode::Allowlist
        );

        let mut loosened = pod();
        let env = sidecar_env(&mut loosened);
        env[1].value = Some("allowlist".into());
        loosened
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(EGRESS_ANNOTATION.into(), "open".into());
        assert_eq!(
            admitted(&loosened, &identity()).unwrap().egress,
            EgressMode::Allowlist
        );
    }

    #[test]
    fn another_pod_an_unlabelled_pod_or_a_pod_without_the_sidecar_is_refused() {
        let mut other = pod();
        other.metadata.uid = Some("another-uid".into());
        assert_eq!(
            refusal(&other),
            "the pod is not the one the token was issued for"
        );

        let mut unlabelled = pod();
        unlabelled.metadata.labels = None;
        assert_eq!(
            refusal(&unlabelled),
            "the pod has no agentsecrets.io/owner label"
        );

        let mut plain = pod();
        plain.spec.as_mut().unwrap().init_containers = None;
        assert_eq!(refusal(&plain), "the pod has no agentsecrets-proxy sidecar");

        // A container of that name among the ordinary containers is not the admitted sidecar.
        let mut lookalike = pod();
        let spec = lookalike.spec.as_mut().unwrap();
        let mut sidecar = spec.init_containers.take().unwrap().remove(0);
        sidecar.restart_policy = None;
        spec.containers.push(sidecar);
        assert_eq!(
            refusal(&lookalike),
            "the pod has no agentsecrets-proxy sidecar"
        );

        let mut no_placeholders = pod();
        sidecar_env(&mut no_placeholders).retain(|e| e.name != PROXY_PLACEHOLDERS_ENV);
        assert_eq!(
            refusal(&no_placeholders),
            "the proxy sidecar has no placeholders"
        );
    }

    #[test]
    fn malformed_placeholders_or_egress_refuse_the_pod() {
        let with_env = |name: &str, value: &str| {
            let mut pod = pod();
            let env = sidecar_env(&mut pod);
            env.iter_mut().find(|e| e.name == name).unwrap().value = Some(value.into());
            pod
        };
        for bad in [
            "not json",
            "[]",
            r#"{"A":"asec_ph_short"}"#,
            &json!({"A": PH_A, "B": PH_A}).to_string(),
        ] {
            assert_eq!(
                refusal(&with_env(PROXY_PLACEHOLDERS_ENV, bad)),
                if bad.starts_with('{') {
                    "the proxy sidecar's placeholders are malformed"
                } else {
                    "the proxy sidecar's placeholders are not a JSON object"
                },
                "{bad}"
            );
        }
        assert_eq!(
            refusal(&with_env(PROXY_EGRESS_ENV, "everything")),
            "the proxy sidecar's egress mode is unknown"
        );
    }

    #[test]
    fn a_relabelled_pod_or_a_sidecar_naming_no_owner_is_refused() {
        let mut unpinned = pod();
        sidecar_env(&mut unpinned).retain(|e| e.name != PROXY_OWNER_ENV);
        assert_eq!(
            refusal(&unpinned),
            "the proxy sidecar does not name the pod's owner"
        );
        let mut pod = pod();
        assert!(admitted(&pod, &identity()).is_ok());
        pod.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(OWNER_LABEL.into(), "bob".into());
        assert_eq!(
            refusal(&pod),
            "the pod's owner label differs from the owner it was admitted for"
        );
    }

    /// alice's (or `owner`'s) AgentSecret in `sandboxes` as the cache holds it: bound to
    /// `allowed` hosts (sealed with them, as the webhook seals), or env-only when none.
    fn stored(
        keyring: &Keyring,
        name: &str,
        owner: &str,
        env: &str,
        value: &str,
        allowed: &[&str],
    ) -> CachedSecret {
        let object = if allowed.is_empty() {
            crate::testing::agent_secret("sandboxes", name, owner, env, keyring, value)
        } else {
            crate::testing::secretless_agent_secret(
                "sandboxes",
                name,
                owner,
                env,
                keyring,
                value,
                allowed,
            )
        };
        CachedSecret::from_object(&object).unwrap()
    }

    fn render(secrets: Vec<CachedSecret>, keyring: &Keyring) -> Rendered {
        let secrets: Vec<Arc<CachedSecret>> = secrets.into_iter().map(Arc::new).collect();
        render_snapshot(&admitted_alice(), "sandboxes", &secrets, keyring)
    }

    fn admitted_alice() -> Admitted {
        admitted(&pod(), &identity()).unwrap()
    }

    #[test]
    fn the_snapshot_holds_the_owners_secretless_secrets_the_pod_has_placeholders_for() {
        let keyring = crate::testing::keyring("k1");
        let secrets = [
            stored(
                &keyring,
                "a",
                "alice",
                "A_TOKEN",
                "canary-a-value",
                &["api.a.test"],
            ),
            stored(
                &keyring,
                "b",
                "alice",
                "B_KEY",
                "canary-b-value",
                &["*.b.test"],
            ),
            // Not in the pod, not secretless-capable, another owner's.
            stored(
                &keyring,
                "c",
                "alice",
                "C_OTHER",
                "canary-c-value",
                &["c.test"],
            ),
            stored(
                &keyring,
                "bob-a",
                "bob",
                "A_TOKEN",
                "canary-bob-value",
                &["api.a.test"],
            ),
        ];
        let env_only = stored(&keyring, "b2", "alice", "B_KEY", "x", &[]);
        let mut all = secrets.to_vec();
        all.push(env_only);
        let rendered = render(all, &keyring);
        assert_eq!(rendered.served, ["A_TOKEN", "B_KEY"]);
        assert!(rendered.skipped.is_empty(), "{:?}", rendered.skipped);
        assert_eq!(rendered.line.last(), Some(&b'\n'));
        let snapshot = crate::secretless::Snapshot::from_json(&rendered.line).unwrap();
        let entries = snapshot.entries();
        assert_eq!(entries.len(), 2);
        assert_eq!(
            (entries[0].placeholder.as_str(), entries[0].value.expose()),
            (PH_A, "canary-a-value")
        );
        assert_eq!(
            (entries[1].placeholder.as_str(), entries[1].value.expose()),
            (PH_B, "canary-b-value")
        );
        assert_eq!(entries[1].allowed_hosts[0].to_string(), "*.b.test");
        assert_eq!(snapshot.egress(), EgressMode::Open);
        assert!(!String::from_utf8_lossy(&rendered.line).contains("canary-bob-value"));
        assert!(!String::from_utf8_lossy(&rendered.line).contains("canary-c-value"));
        assert!(!format!("{rendered:?}").contains("canary"));
    }

    #[test]
    fn a_secret_that_cannot_be_served_is_left_out_with_its_reason_and_the_rest_still_served() {
        let keyring = crate::testing::keyring("k1");
        let other_ring = crate::testing::keyring("k1");
        let good = stored(
            &keyring,
            "a",
            "alice",
            "A_TOKEN",
            "canary-a-value",
            &["api.a.test"],
        );
        let foreign = stored(
            &other_ring,
            "b",
            "alice",
            "B_KEY",
            "canary-b-value",
            &["b.test"],
        );
        let rendered = render(vec![good.clone(), foreign], &keyring);
        assert_eq!(rendered.served, ["A_TOKEN"]);
        assert_eq!(
            rendered.skipped,
            [Skipped {
                name: "b".into(),
                reason: "its value does not open with the keyring"
            }]
        );

        let mut bad_host = stored(
            &keyring,
            "b",
            "alice",
            "B_KEY",
            "canary-b-value",
            &["b.test"],
        );
        // The CRD refuses such a host; an object stored before the rule must not break the line.
        bad_host.allowed_hosts = vec!["*.com".into()];
        let rendered = render(vec![good.clone(), bad_host.clone()], &keyring);
        assert_eq!(rendered.skipped[0].reason, "an allowed host is malformed");
        bad_host.allowed_hosts = vec!["b.test".into()];
        bad_host.sealed = None;
        let rendered = render(vec![good.clone(), bad_host], &keyring);
        assert_eq!(rendered.skipped[0].reason, "it has not been sealed yet");

        let twin = stored(
            &keyring,
            "a2",
            "alice",
            "A_TOKEN",
            "canary-twin",
            &["api.a.test"],
        );
        let rendered = render(vec![good, twin], &keyring);
        assert!(rendered.served.is_empty());
        assert_eq!(rendered.skipped.len(), 2);
        assert!(
            crate::secretless::Snapshot::from_json(&rendered.line)
                .unwrap()
                .entries()
                .is_empty()
        );
    }

    #[test]
    fn a_value_sealed_with_constraints_opens_only_with_the_same_constraints() {
        let keyring = crate::testing::keyring("k1");
        let ctx = SealContext {
            constraints: "hosts=api.a.test",
            ..SealContext::new("sandboxes", "alice", "A_TOKEN")
        };
        let sealed = keyring
            .seal(b"canary-a-value", ctx, crate::testing::SEALED_AT)
            .unwrap();
        let mut secret = stored(&keyring, "a", "alice", "A_TOKEN", "unused", &["api.a.test"]);
        secret.sealed = Some(Ok(sealed));
        assert!(render(vec![secret.clone()], &keyring).served.is_empty());
        secret.constraints = "hosts=api.a.test".into();
        assert_eq!(render(vec![secret], &keyring).served, ["A_TOKEN"]);
    }

    #[test]
    fn pods_are_served_only_where_the_webhook_injects_them() {
        let set = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect();
        let everywhere = Namespaces::default();
        assert!(everywhere.serves("sandboxes"));
        let excluding = Namespaces {
            excluded: set(&["kube-system", "agent-secrets"]),
            only: set(&[]),
        };
        assert!(excluding.serves("sandboxes"));
        assert!(!excluding.serves("kube-system") && !excluding.serves("agent-secrets"));
        let listed = Namespaces {
            excluded: set(&["kube-system"]),
            only: set(&["team-a", "kube-system"]),
        };
        assert!(listed.serves("team-a"));
        assert!(!listed.serves("team-b"));
        assert!(!listed.serves("kube-system"), "excluded wins");
    }
}
