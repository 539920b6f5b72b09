//! Pod CREATE: give a sandbox pod its owner's secrets as `secretKeyRef` env entries pointing at
//! a pod-scoped Secret, never as plaintext in the pod spec.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use crate::api::{
    INIT_CONTAINERS_ANNOTATION, INJECTED_ANNOTATION, MANAGED_BY_LABEL, MANAGED_BY_VALUE,
    OWNER_LABEL, POD_ANNOTATION, POD_SCOPED_LABEL, REQUEST_UID_ANNOTATION, SECRET_NAME_ANNOTATION,
    SECRETS_ANNOTATION, SKIPPED_ANNOTATION,
};
use crate::cache::{CachedSecret, SecretIndex};
use crate::crypto::{Keyring, Plaintext, SealContext};

use super::Policy;
use super::patch::{PatchWriter, write_annotations, write_str};
use super::review::{ContainerView, Operation, PodView, Request};

/// What to do with a pod.
#[derive(Debug)]
pub enum Decision {
    /// Admit unchanged (not a labelled pod CREATE, or the owner has no secrets).
    Allow,
    /// Refuse, with a message for the requester (names only, never values).
    Deny(String),
    /// Admit with a patch, once the pod-scoped Secret exists.
    Inject(Box<Injection>),
}

/// The mutation of one pod.
#[derive(Debug)]
pub struct Injection {
    /// The JSON patch (RFC 6902), serialised.
    pub patch: Vec<u8>,
    /// The Secret to create first; `None` when every secret was already set by the pod spec.
    pub secret: Option<PodSecret>,
    pub owner: String,
    /// Env names injected into at least one container, sorted.
    pub injected: Vec<String>,
    /// `container/NAME` entries the pod spec already set, which win.
    pub skipped: Vec<String>,
}

/// The pod-scoped Secret holding the injected values as of admission.
pub struct PodSecret {
    pub name: String,
    pub namespace: String,
    pub owner: String,
    /// The pod's name, or its `generateName` prefix when the server names it.
    pub pod: String,
    pub request_uid: String,
    values: BTreeMap<String, Plaintext>,
}

impl fmt::Debug for PodSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodSecret")
            .field("name", &self.name)
            .field("namespace", &self.namespace)
            .field("owner", &self.owner)
            .field("keys", &self.values.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl PodSecret {
    /// Env names held.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }

    /// The Secret object to create. It holds plaintext: send it to the API server and drop it.
    pub fn to_secret(&self) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(
                    [
                        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned()),
                        (POD_SCOPED_LABEL.to_owned(), "true".to_owned()),
                        (OWNER_LABEL.to_owned(), self.owner.clone()),
                    ]
                    .into(),
                ),
                annotations: Some(
                    [
                        (POD_ANNOTATION.to_owned(), self.pod.clone()),
                        (REQUEST_UID_ANNOTATION.to_owned(), self.request_uid.clone()),
                    ]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            // The kubelet stops watching immutable Secrets, and nobody can swap the values
            // under a running sandbox.
            immutable: Some(true),
            type_: Some("Opaque".into()),
            data: Some(
                self.values
                    .iter()
                    .map(|(k, v)| (k.clone(), ByteString(v.expose().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }
}

/// A name for a new pod-scoped Secret: `<pod or generateName>-asec-<random>`, at most 63
/// characters so it is also a valid label value.
pub fn new_secret_name(pod_hint: &str) -> String {
    let suffix = random_suffix();
    let prefix: String = pod_hint
        .trim_end_matches('-')
        .chars()
        .take(63 - "-asec-".len() - suffix.len())
        .collect();
    let prefix = prefix.trim_end_matches(['-', '.']);
    if prefix.is_empty() {
        format!("asec-{suffix}")
    } else {
        format!("{prefix}-asec-{suffix}")
    }
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut bytes = [0u8; 10];
    // Only uniqueness matters here; fall back to the clock if the OS source fails.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        bytes.copy_from_slice(&nanos.to_le_bytes()[..10]);
    }
    bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

/// The pod's name, or its `generateName` prefix, or `<unnamed>`.
pub fn pod_hint(pod: &PodView) -> &str {
    pod.metadata
        .name
        .as_deref()
        .or(pod.metadata.generate_name.as_deref())
        .unwrap_or("<unnamed>")
}

/// Decide what to do with a pod admission request.
///
/// `secret_name` names the pod-scoped Secret should one be needed (the caller draws it, so
/// this stays deterministic).
pub fn mutate(
    request: &Request<PodView>,
    keyring: Option<&Keyring>,
    index: &SecretIndex,
    policy: &Policy,
    secret_name: &str,
) -> Decision {
    // Only CREATE is ours: an UPDATE or DELETE of a pod is never refused.
    if request.operation != Operation::Create || request.sub_resource.is_some() {
        return Decision::Allow;
    }
    let Some(pod) = request.object.as_ref() else {
        return Decision::Deny("pod CREATE review carries no object".into());
    };
    let Some(owner) = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(OWNER_LABEL))
    else {
        return Decision::Allow;
    };
    let namespace = request
        .namespace
        .as_deref()
        .or(pod.metadata.namespace.as_deref())
        .unwrap_or_default();
    if policy.excluded_namespaces.contains(namespace) {
        return Decision::Allow;
    }
    if !policy.allows_requester(&request.user_info) {
        let allowed: Vec<String> = policy
            .allowed_principals
            .iter()
            .map(ToString::to_string)
            .collect();
        return Decision::Deny(format!(
            "pods labelled {OWNER_LABEL} may only be created by {}; {} is not one of them",
            allowed.join(", "),
            request.requester()
        ));
    }
    if owner.is_empty() {
        return Decision::Deny(format!(
            "label {OWNER_LABEL} is empty: it must name the sandbox's user"
        ));
    }

    let annotations = pod.metadata.annotations.as_ref();
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);

    let mut selected = index.owner_secrets(namespace, owner);
    if let Some(requested) = annotation(SECRETS_ANNOTATION) {
        let requested: BTreeSet<&str> = requested
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let missing: Vec<&str> = requested
            .iter()
            .copied()
            .filter(|name| !selected.iter().any(|s| s.env_name == *name))
            .collect();
        if !missing.is_empty() {
            return Decision::Deny(format!(
                "{SECRETS_ANNOTATION} requests secrets that owner {owner:?} does not have in namespace {namespace:?}: {}",
                missing.join(", ")
            ));
        }
        selected.retain(|s| requested.contains(s.env_name.as_str()));
    }
    if selected.is_empty() {
        return Decision::Allow;
    }
    let by_env = match unique_by_env_name(&selected, owner) {
        Ok(by_env) => by_env,
        Err(message) => return Decision::Deny(message),
    };
    let Some(keyring) = keyring else {
        return Decision::Deny(
            "agent-secrets has no keyring loaded, so the sandbox's secrets cannot be opened".into(),
        );
    };
    let ctx = SealContext::new(namespace, owner);
    // Sorted by env name (the map's order), so patches and annotations are deterministic.
    let mut opened: Vec<(&str, Plaintext)> = Vec::with_capacity(by_env.len());
    for (env_name, secret) in &by_env {
        let result = match &secret.sealed {
            None => Err(format!(
                "AgentSecret {:?} ({env_name}) has not been sealed yet",
                secret.name
            )),
            Some(Err(e)) => Err(format!("AgentSecret {:?} ({env_name}): {e}", secret.name)),
            Some(Ok(envelope)) => keyring
                .open_envelope(envelope, ctx)
                .map_err(|e| format!("AgentSecret {:?} ({env_name}): {e}", secret.name)),
        };
        match result {
            Ok(plain) => opened.push((env_name, plain)),
            Err(reason) => {
                return Decision::Deny(format!(
                    "the sandbox's secrets cannot be opened, so it must not start without them: {reason}"
                ));
            }
        }
    }

    let names: Vec<&str> = opened.iter().map(|(name, _)| *name).collect();
    let include_init = annotation(INIT_CONTAINERS_ANNOTATION) == Some("true");
    let previous_secret = annotation(SECRET_NAME_ANNOTATION);
    // On reinvocation every reference to the earlier Secret is repointed to this one; a
    // reference to a key not injected now (the owner label changed in between, or a secret
    // was deleted) would keep a value this pod must not have.
    if let Some(stale) = stale_reference(pod, previous_secret, &names) {
        return Decision::Deny(format!(
            "env {stale} refers to the pod-scoped Secret of an earlier injection, for a secret owner {owner:?} does not have now; recreate the pod"
        ));
    }
    let injection = Injector {
        names: &names,
        secret_name,
        previous_secret,
    };
    let spec = pod.spec.as_ref();
    let mut writer = PatchWriter::default();
    let mut injected = vec![false; names.len()];
    let mut skipped = Vec::new();
    let mut groups = vec![(
        "containers",
        spec.map(|s| s.containers.as_slice()).unwrap_or_default(),
    )];
    if include_init {
        groups.push((
            "initContainers",
            spec.and_then(|s| s.init_containers.as_deref())
                .unwrap_or_default(),
        ));
    }
    for (field, containers) in groups {
        for (i, container) in containers.iter().enumerate() {
            injection.container(
                &mut writer,
                field,
                i,
                container,
                &mut injected,
                &mut skipped,
            );
        }
    }
    let values: BTreeMap<String, Plaintext> = opened
        .into_iter()
        .zip(&injected)
        .filter(|(_, injected)| **injected)
        .map(|((name, plain), _)| (name.to_owned(), plain))
        .collect();
    let injected: Vec<String> = values.keys().cloned().collect();

    let mut entries = vec![
        (INJECTED_ANNOTATION, injected.join(",")),
        (SKIPPED_ANNOTATION, skipped.join(",")),
    ];
    let secret = if values.is_empty() {
        None
    } else {
        entries.push((SECRET_NAME_ANNOTATION, secret_name.to_owned()));
        Some(PodSecret {
            name: secret_name.to_owned(),
            namespace: namespace.to_owned(),
            owner: owner.clone(),
            pod: pod_hint(pod).to_owned(),
            request_uid: request.uid.clone(),
            values,
        })
    };
    write_annotations(&mut writer, annotations, &entries);
    Decision::Inject(Box::new(Injection {
        patch: writer.finish(),
        secret,
        owner: owner.clone(),
        injected,
        skipped,
    }))
}

/// The selected secrets keyed by env name; two AgentSecrets with one env name make the set
/// ambiguous, and a sandbox never starts with a guessed value.
fn unique_by_env_name<'a>(
    selected: &'a [Arc<CachedSecret>],
    owner: &str,
) -> Result<BTreeMap<&'a str, &'a CachedSecret>, String> {
    let mut by_env: BTreeMap<&str, &CachedSecret> = BTreeMap::new();
    for secret in selected {
        if let Some(first) = by_env.insert(&secret.env_name, secret) {
            return Err(format!(
                "owner {owner:?} has two AgentSecrets with envName {}: {:?} and {:?}; delete one",
                secret.env_name, first.name, secret.name
            ));
        }
    }
    Ok(by_env)
}

/// `container/NAME` of an env entry (in any container) that refers to `previous_secret` under a
/// key not in `names`.
fn stale_reference(pod: &PodView, previous_secret: Option<&str>, names: &[&str]) -> Option<String> {
    let previous = previous_secret?;
    let spec = pod.spec.as_ref()?;
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    for container in containers {
        for entry in container.env.iter().flatten() {
            let reference = entry
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref());
            if let Some(reference) = reference
                && reference.name == previous
                && !names.contains(&reference.key.as_str())
            {
                return Some(format!("{}/{}", container.name, entry.name));
            }
        }
    }
    None
}

/// Writes the env entries of one pod's injection.
struct Injector<'a> {
    /// Env names to inject, sorted.
    names: &'a [&'a str],
    secret_name: &'a str,
    /// The Secret an earlier invocation of this webhook named in the pod's annotation.
    previous_secret: Option<&'a str>,
}

impl Injector<'_> {
    /// `{"name": N, "valueFrom": {"secretKeyRef": {"name": <secret>, "key": N}}}`
    fn reference(&self, buf: &mut Vec<u8>, name: &str) {
        buf.extend_from_slice(b"{\"name\":");
        write_str(buf, name);
        buf.extend_from_slice(b",\"valueFrom\":{\"secretKeyRef\":{\"name\":");
        write_str(buf, self.secret_name);
        buf.extend_from_slice(b",\"key\":");
        write_str(buf, name);
        buf.extend_from_slice(b"}}}");
    }

    fn container(
        &self,
        writer: &mut PatchWriter,
        field: &str,
        index: usize,
        container: &ContainerView,
        injected: &mut [bool],
        skipped: &mut Vec<String>,
    ) {
        let i = index.to_string();
        let Some(env) = container.env.as_ref() else {
            writer.op("add", &["spec", field, &i, "env"], |buf| {
                buf.push(b'[');
                for (n, name) in self.names.iter().enumerate() {
                    if n > 0 {
                        buf.push(b',');
                    }
                    self.reference(buf, name);
                }
                buf.push(b']');
            });
            injected.iter_mut().for_each(|done| *done = true);
            return;
        };
        for (n, name) in self.names.iter().enumerate() {
            match env.iter().position(|e| e.name == *name) {
                None => {
                    writer.op("add", &["spec", field, &i, "env", "-"], |buf| {
                        self.reference(buf, name);
                    });
                    injected[n] = true;
                }
                Some(j) => {
                    // Our own entry from an earlier invocation (reinvocation after another
                    // webhook changed the pod): point it at this invocation's Secret.
                    let ours = env[j]
                        .value_from
                        .as_ref()
                        .and_then(|v| v.secret_key_ref.as_ref())
                        .is_some_and(|r| {
                            Some(r.name.as_str()) == self.previous_secret && r.key == *name
                        });
                    if ours {
                        let j = j.to_string();
                        writer.add_str(
                            &[
                                "spec",
                                field,
                                &i,
                                "env",
                                &j,
                                "valueFrom",
                                "secretKeyRef",
                                "name",
                            ],
                            self.secret_name,
                        );
                        injected[n] = true;
                    } else {
                        skipped.push(format!("{}/{name}", container.name));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_are_short_valid_and_unique() {
        let a = new_secret_name("sandbox-alice-");
        let b = new_secret_name("sandbox-alice-");
        assert_ne!(a, b);
        assert!(a.starts_with("sandbox-alice-asec-"), "{a}");
        let long = new_secret_name(&"x".repeat(300));
        assert!(long.len() <= 63, "{long}");
        assert!(new_secret_name("").starts_with("asec-"));
        assert!(new_secret_name("---").starts_with("asec-"));
        for name in [a, long] {
            assert!(
                name.bytes().all(|c| c.is_ascii_lowercase()
                    || c.is_ascii_digit()
                    || c == b'-'
                    || c == b'x')
            );
        }
    }
}
