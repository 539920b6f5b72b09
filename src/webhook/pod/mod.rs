//! Pod CREATE: give a sandbox pod its owner's secrets as `secretKeyRef` env entries pointing at
//! a pod-scoped Secret, never as plaintext in the pod spec.
//!
//! [`mutate`] authorises the request and picks the secrets ([`select`]), names the Secret that
//! holds them ([`pod_secret_name`]: one per owner, content and reuse window, shared by that
//! owner's sandboxes), opens them only when that Secret does not exist yet, and writes the
//! patch ([`references`]); the Secret to create is a [`PodSecret`].

mod references;
mod secret;
pub mod secretless;
mod select;

pub use secret::{PodSecret, PodSecretUse, Window, pod_secret_name};
pub use secretless::{FeedCa, NamespaceSet, SecretlessPolicy, Unscoped};

use std::collections::BTreeMap;

use crate::api::{
    INIT_CONTAINERS_ANNOTATION, INJECTED_ANNOTATION, SECRET_NAME_ANNOTATION, SECRETLESS_ANNOTATION,
    SECRETS_ANNOTATION, SKIPPED_ANNOTATION,
};
use crate::cache::{PodSecretIndex, SecretIndex};
use crate::crypto::{Keyring, Plaintext};

use super::patch::{PatchWriter, write_annotations};
use super::review::{PodView, Request};
use super::{Policy, quoted};
use references::{ReferenceWriter, Written, stale_reference};
use secretless::{Mode, Placed, SecretlessWriter};

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
    /// The pod-scoped Secret the pod refers to, and whether it must be created first; `None`
    /// when it refers to none (every secret set by the pod spec, or secretless only).
    pub secret: Option<PodSecretUse>,
    pub owner: String,
    /// Env names injected into at least one container, sorted.
    pub injected: Vec<String>,
    /// `container/NAME` entries the pod spec already set, which win.
    pub skipped: Vec<String>,
    /// Env names injected as placeholders (secretless), sorted; also in `injected`.
    pub secretless: Vec<String>,
}

/// The pod's name, or its `generateName` prefix, or `<unnamed>`.
pub fn pod_hint(pod: &PodView) -> &str {
    pod.metadata
        .name
        .as_deref()
        .or(pod.metadata.generate_name.as_deref())
        .unwrap_or("<unnamed>")
}

/// What a pod admission is decided against.
#[derive(Clone, Copy)]
pub struct Inputs<'a> {
    /// `None` while no keyring is loaded: only sandboxes whose Secret exists can start.
    pub keyring: Option<&'a Keyring>,
    pub index: &'a SecretIndex,
    pub pod_secrets: &'a PodSecretIndex,
    pub policy: &'a Policy,
    /// Unix seconds.
    pub now: i64,
}

/// Decide what to do with a pod admission request.
pub fn mutate(request: &Request<PodView>, inputs: Inputs<'_>) -> Decision {
    match decide(request, inputs) {
        Ok(decision) => decision,
        Err(message) => Decision::Deny(message),
    }
}

const NO_KEYRING: &str =
    "agent-secrets has no keyring loaded, so the sandbox's secrets cannot be opened";

fn decide(request: &Request<PodView>, inputs: Inputs<'_>) -> Result<Decision, String> {
    let Inputs {
        keyring,
        index,
        pod_secrets,
        policy,
        now,
    } = inputs;
    let Some(sandbox) = select::authorise(request, policy)? else {
        return Ok(Decision::Allow);
    };
    let pod = sandbox.pod;
    let egress = match secretless::mode(pod, sandbox.namespace, &policy.secretless)? {
        Mode::Env => None,
        Mode::Secretless(egress) => Some(egress),
    };
    // What the sidecar is made of is needed only when there is one to write or to recognise,
    // so a misconfigured or briefly unreadable feed CA refuses only the pods that need it.
    let has_proxy = pod
        .spec
        .iter()
        .flat_map(|s| s.init_containers.iter().flatten())
        .any(|c| c.name == crate::api::PROXY_CONTAINER_NAME);
    let mut sidecar = match egress {
        Some(egress) if has_proxy => Some(policy.secretless.sidecar(egress, sandbox.owner)?),
        _ => None,
    };
    // Checked before anything else, whether or not the owner has secrets: a proxy sidecar or
    // feed token this webhook did not write could receive the values from the feed.
    let earlier_placeholders = secretless::check_reserved(pod, sidecar.as_ref())?;
    let selected = select::select(index, &sandbox)?;
    // Secretless pods get placeholders for secrets bound to hosts; the others follow
    // `--secretless-unscoped`.
    let (placeholder_secrets, env_secrets): (BTreeMap<_, _>, BTreeMap<_, _>) = match egress {
        None => (BTreeMap::new(), selected),
        Some(_) => selected
            .into_iter()
            .partition(|(_, secret)| secret.is_secretless_capable()),
    };
    if let Some(egress) = egress
        && sidecar.is_none()
        && !placeholder_secrets.is_empty()
    {
        sidecar = Some(policy.secretless.sidecar(egress, sandbox.owner)?);
    }
    if egress.is_some() && !env_secrets.is_empty() && policy.secretless.unscoped == Unscoped::Refuse
    {
        let names: Vec<String> = env_secrets
            .values()
            .map(|s| format!("{} ({})", quoted(&s.name), s.env_name))
            .collect();
        return Err(format!(
            "this sandbox is secretless, and these secrets have no spec.allowedHosts to bind them to: {}; set their allowedHosts, or ask for them with {SECRETS_ANNOTATION} leaving them out",
            names.join(", ")
        ));
    }
    let secretless_names: Vec<&str> = placeholder_secrets.keys().map(String::as_str).collect();
    if let Some(earlier) = &earlier_placeholders
        && !earlier
            .keys()
            .map(String::as_str)
            .eq(secretless_names.iter().copied())
    {
        return Err(
            "the proxy sidecar of an earlier injection holds placeholders for other secrets than the owner has now; recreate the pod".into(),
        );
    }
    let (secret_name, window) = match choose_name(&sandbox, &env_secrets, policy, now) {
        Ok(chosen) => chosen.unzip(),
        // A secret with no readable sealed value: opening it says why the pod is refused.
        Err(Unnamed) => {
            select::open_all(keyring.ok_or(NO_KEYRING)?, sandbox.namespace, &env_secrets)?;
            return Err("the sandbox's secrets cannot be opened".into());
        }
    };
    select::check_claims(pod, secret_name.as_deref())?;
    if placeholder_secrets.is_empty() && env_secrets.is_empty() {
        return Ok(Decision::Allow);
    }
    // A warm owner's Secret exists: its values were opened when it was made, and nothing is
    // opened or written now.
    let existing = secret_name
        .as_deref()
        .is_some_and(|name| pod_secrets.contains(sandbox.namespace, name));
    let opened = if existing || env_secrets.is_empty() {
        Vec::new()
    } else {
        select::open_all(keyring.ok_or(NO_KEYRING)?, sandbox.namespace, &env_secrets)?
    };
    if !placeholder_secrets.is_empty() {
        // A placeholder secret must open too: a sandbox never starts with a partial set, and
        // the feed would not deliver a value that does not open.
        drop(select::open_all(
            keyring.ok_or(NO_KEYRING)?,
            sandbox.namespace,
            &placeholder_secrets,
        )?);
    }

    // Sorted by env name (the map's order), so patches and annotations are deterministic.
    let names: Vec<&str> = env_secrets.keys().map(String::as_str).collect();
    let secret_name = secret_name.unwrap_or_default();
    // A reinvoked admission names the same Secret; a reference to it under a key not injected
    // now would keep a value this pod must not have.
    if let Some(stale) = stale_reference(pod, &secret_name, &names) {
        return Err(format!(
            "env {stale} refers to the pod-scoped Secret of an earlier injection, for a secret owner {} does not have now; recreate the pod",
            quoted(sandbox.owner)
        ));
    }
    let placeholders = match (earlier_placeholders, secretless_names.is_empty()) {
        (Some(earlier), _) => earlier,
        (None, true) => BTreeMap::new(),
        (None, false) => {
            secretless::placeholders_for(&secretless_names).map_err(|e| e.to_string())?
        }
    };
    let annotations = pod.metadata.annotations.as_ref();
    let include_init = annotations
        .and_then(|a| a.get(INIT_CONTAINERS_ANNOTATION))
        .is_some_and(|v| v == "true");
    let spec = pod.spec.as_ref();
    let containers = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
    let init_containers = spec
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or_default();
    let mut writer = PatchWriter::default();
    let mut written = Written::default();
    if !names.is_empty() {
        let references = ReferenceWriter {
            names: &names,
            secret_name: &secret_name,
        };
        references.containers(&mut writer, "containers", containers, &mut written);
        if include_init {
            references.containers(&mut writer, "initContainers", init_containers, &mut written);
        }
    }
    let mut placed = Placed::default();
    if let Some(sidecar) = sidecar.as_ref().filter(|_| !placeholders.is_empty()) {
        let writer_of = SecretlessWriter {
            placeholders: &placeholders,
            env_created: !names.is_empty(),
        };
        writer_of.containers(&mut writer, "containers", containers, &mut placed)?;
        if include_init {
            writer_of.containers(&mut writer, "initContainers", init_containers, &mut placed)?;
        }
        // After every operation addressing init containers by index: the sidecar goes first.
        if !has_proxy {
            if spec.is_none() {
                return Err("pod CREATE review carries a pod without spec".into());
            }
            secretless::write_sidecar(&mut writer, pod, sidecar, &placeholders);
        }
    }
    let mut injected: Vec<String> = names
        .iter()
        .zip(&written.received)
        .filter(|(_, received)| **received)
        .map(|(name, _)| (*name).to_owned())
        .collect();
    let refers = !injected.is_empty();
    injected.extend(placed.received.iter().cloned());
    injected.sort();
    let mut skipped = written.skipped;
    skipped.extend(placed.skipped);
    skipped.sort();
    let secretless: Vec<String> = placed.received.into_iter().collect();

    let mut entries = vec![
        (INJECTED_ANNOTATION, injected.join(",")),
        (SKIPPED_ANNOTATION, skipped.join(",")),
    ];
    if !placeholders.is_empty() {
        entries.push((SECRETLESS_ANNOTATION, secretless.join(",")));
    }
    let secret = match (refers, window) {
        (false, _) | (true, None) => None,
        (true, Some(_)) if existing => Some(PodSecretUse::Reuse {
            name: secret_name.clone(),
            namespace: sandbox.namespace.to_owned(),
        }),
        // The whole content the name stands for, also a value this pod's spec set itself:
        // the Secret is shared by the owner's sandboxes, which may differ in that.
        (true, Some(window)) => Some(PodSecretUse::Create(PodSecret {
            name: secret_name.clone(),
            namespace: sandbox.namespace.to_owned(),
            owner: sandbox.owner.to_owned(),
            reuse_until: window.end(),
            values: opened.into_iter().collect::<BTreeMap<String, Plaintext>>(),
        })),
    };
    if secret.is_some() {
        entries.push((SECRET_NAME_ANNOTATION, secret_name));
    }
    write_annotations(&mut writer, annotations, &entries);
    Ok(Decision::Inject(Box::new(Injection {
        patch: writer.finish(),
        secret,
        owner: sandbox.owner.to_owned(),
        injected,
        skipped,
        secretless,
    })))
}

fn request_timeout() -> i64 {
    i64::try_from(crate::api::POD_REQUEST_TIMEOUT.as_secs()).unwrap_or(i64::MAX)
}

/// A selected secret holds no readable sealed value, so no Secret can be named for the set.
struct Unnamed;

/// The pod-scoped Secret for `secrets` (`None` when there are none) and its reuse window: the
/// current window's, or, for a reinvoked admission that was given the previous window's
/// Secret of the same content just before the window turned, that one. Whether it exists is
/// not asked here: the first call may have run on another replica, whose Secret this one's
/// watch has not seen yet, and creating it again finds it.
fn choose_name(
    sandbox: &select::Sandbox<'_>,
    secrets: &BTreeMap<String, std::sync::Arc<crate::cache::CachedSecret>>,
    policy: &Policy,
    now: i64,
) -> Result<Option<(String, Window)>, Unnamed> {
    if secrets.is_empty() {
        return Ok(None);
    }
    let (namespace, owner) = (sandbox.namespace, sandbox.owner);
    let window = Window::at(now, policy.pod_secret_reuse_window);
    let current = pod_secret_name(namespace, owner, window, secrets).ok_or(Unnamed)?;
    let claimed = sandbox
        .pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SECRET_NAME_ANNOTATION));
    // Only within the request that named it: past the API server's request timeout the
    // pod is stored or refused, and the collector may delete the Secret soon after.
    let in_request = now < window.previous().end().saturating_add(request_timeout());
    if let Some(claimed) = claimed
        && *claimed != current
        && in_request
        && pod_secret_name(namespace, owner, window.previous(), secrets).as_ref() == Some(claimed)
    {
        return Ok(Some((claimed.clone(), window.previous())));
    }
    Ok(Some((current, window)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CachedSecret;
    use crate::testing::{agent_secret, keyring};
    use serde_json::{Value, json};

    const NAMESPACE: &str = "sandboxes";
    /// The end of a 5-minute window.
    const WINDOW_END: i64 = 1_800_000_300;

    /// The recorded review of a named pod's CREATE.
    fn recorded_request() -> Value {
        let mut recorded: Value = serde_json::from_str(include_str!(
            "../../../tests/fixtures/admission/pod_create_named.json"
        ))
        .unwrap();
        recorded["review"]["request"].take()
    }

    /// `object` reviewed as the recorded named pod's CREATE (`Null`: the recorded pod).
    fn request(object: Value) -> Request<PodView> {
        let mut request = recorded_request();
        if !object.is_null() {
            request["object"] = object;
        }
        serde_json::from_value(request).unwrap()
    }

    fn recorded_pod() -> Value {
        recorded_request()["object"].take()
    }

    struct World {
        keyring: Keyring,
        index: SecretIndex,
        pod_secrets: PodSecretIndex,
        policy: Policy,
    }

    impl World {
        fn new() -> Self {
            let keyring = keyring("k1");
            let index = SecretIndex::default();
            index.replace_all(
                [("a", "A_TOKEN", "value-a"), ("b", "B_TOKEN", "value-b")]
                    .into_iter()
                    .filter_map(|(name, env, value)| {
                        CachedSecret::from_object(&agent_secret(
                            NAMESPACE, name, "alice", env, &keyring, value,
                        ))
                    }),
            );
            Self {
                keyring,
                index,
                pod_secrets: PodSecretIndex::default(),
                policy: Policy::default(),
            }
        }

        fn admit(&self, object: Value, now: i64) -> Decision {
            self.admit_with(object, now, Some(&self.keyring), &self.pod_secrets)
        }

        /// The first sandbox of the window, admitted at `now`, once the Secret it was given
        /// is in the index; and that Secret's name.
        fn first_sandbox_seen(&self, now: i64) -> (Box<Injection>, String) {
            let first = injected(self.admit(Value::Null, now));
            let name = first.secret.as_ref().unwrap().name().to_owned();
            self.pod_secrets.created(NAMESPACE, &name, WINDOW_END);
            (first, name)
        }

        fn admit_with(
            &self,
            object: Value,
            now: i64,
            keyring: Option<&Keyring>,
            pod_secrets: &PodSecretIndex,
        ) -> Decision {
            mutate(
                &request(object),
                Inputs {
                    keyring,
                    index: &self.index,
                    pod_secrets,
                    policy: &self.policy,
                    now,
                },
            )
        }
    }

    fn injected(decision: Decision) -> Box<Injection> {
        match decision {
            Decision::Inject(injection) => injection,
            other => panic!("expected an injection, got {other:?}"),
        }
    }

    fn patched(object: &Value, injection: &Injection) -> Value {
        let patch: json_patch::Patch = serde_json::from_slice(&injection.patch).unwrap();
        let mut object = object.clone();
        json_patch::patch(&mut object, &patch).unwrap();
        object
    }

    #[test]
    fn a_reinvocation_across_a_window_boundary_keeps_the_secret_it_was_given() {
        let world = World::new();
        let first = injected(world.admit(Value::Null, WINDOW_END - 1));
        let Some(PodSecretUse::Create(secret)) = &first.secret else {
            panic!("the first sandbox of the window creates its Secret");
        };
        assert_eq!(secret.reuse_until, WINDOW_END);
        world
            .pod_secrets
            .created(NAMESPACE, &secret.name, secret.reuse_until);
        let once = patched(&recorded_pod(), &first);

        // The API server calls again, with the patched pod, after the window turned.
        let again = injected(world.admit(once.clone(), WINDOW_END + 1));
        assert!(
            matches!(&again.secret, Some(PodSecretUse::Reuse { name, .. }) if *name == secret.name),
            "{:?}",
            again.secret
        );
        assert_eq!(patched(&once, &again), once, "nothing added twice");

        // A new sandbox of the new window gets the new window's Secret.
        let fresh = injected(world.admit(Value::Null, WINDOW_END + 1));
        let Some(PodSecretUse::Create(new)) = &fresh.secret else {
            panic!("a new window's first sandbox creates its Secret");
        };
        assert_ne!(new.name, secret.name);
        assert_eq!(new.reuse_until, WINDOW_END + 300);
    }

    #[test]
    fn an_earlier_windows_name_is_kept_only_for_the_previous_window_within_the_request() {
        let world = World::new();
        let first = injected(world.admit(Value::Null, WINDOW_END - 1));
        let name = first.secret.as_ref().unwrap().name().to_owned();
        let once = patched(&recorded_pod(), &first);
        // The first call ran on another replica, whose Secret this one has not seen: the
        // same Secret is created again (the API server answers that it exists).
        let again = injected(world.admit(once.clone(), WINDOW_END + 1));
        let Some(PodSecretUse::Create(secret)) = &again.secret else {
            panic!("created again: {:?}", again.secret);
        };
        assert_eq!(
            (secret.name.as_str(), secret.reuse_until),
            (name.as_str(), WINDOW_END)
        );
        // Two windows old: refused.
        world.pod_secrets.created(NAMESPACE, &name, WINDOW_END);
        assert!(matches!(
            world.admit(once.clone(), WINDOW_END + 301),
            Decision::Deny(_)
        ));
        assert!(matches!(
            world.admit(once.clone(), WINDOW_END + 1),
            Decision::Inject(_)
        ));
        // Past the request that named it, not even the previous window's is handed out.
        assert!(matches!(
            world.admit(once, WINDOW_END + 60),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn another_owners_pod_claiming_the_secret_is_refused() {
        let world = World::new();
        let (first, name) = world.first_sandbox_seen(WINDOW_END - 1);
        let mut copied = patched(&recorded_pod(), &first);
        copied["metadata"]["labels"]["agentsecrets.io/owner"] = json!("bob");
        let Decision::Deny(message) = world.admit(copied, WINDOW_END - 1) else {
            panic!("refused");
        };
        assert!(message.contains(&name), "{message}");
    }

    #[test]
    fn a_warm_admission_opens_nothing_and_a_cold_one_needs_every_value_to_open() {
        let world = World::new();
        let (_, name) = world.first_sandbox_seen(WINDOW_END - 10);
        // Warm: decided without a keyring.
        let warm = world.admit_with(Value::Null, WINDOW_END - 5, None, &world.pod_secrets);
        assert!(
            matches!(&injected(warm).secret, Some(PodSecretUse::Reuse { name: n, .. }) if *n == name)
        );
        // Cold, under a keyring that cannot open the values: refused, nothing to create.
        let other = keyring("k2");
        let cold = world.admit_with(
            Value::Null,
            WINDOW_END - 5,
            Some(&other),
            &PodSecretIndex::default(),
        );
        assert!(matches!(cold, Decision::Deny(m) if m.contains("cannot be opened")));
    }
}
