//! Pod CREATE: give a sandbox pod its owner's secrets as `secretKeyRef` env entries pointing at
//! a pod-scoped Secret, never as plaintext in the pod spec.
//!
//! [`mutate`] authorises the request and picks the secrets ([`select`]), opens them, and writes
//! the patch ([`references`]); the Secret to create is a [`PodSecret`].

mod references;
mod secret;
pub mod secretless;
mod select;

pub use secret::{PodSecret, pod_secret_name};
pub use secretless::{FeedCa, NamespaceSet, SecretlessPolicy, Unscoped};

use std::collections::BTreeMap;

use crate::api::{
    INIT_CONTAINERS_ANNOTATION, INJECTED_ANNOTATION, SECRET_NAME_ANNOTATION, SECRETLESS_ANNOTATION,
    SECRETS_ANNOTATION, SKIPPED_ANNOTATION,
};
use crate::cache::SecretIndex;
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
    /// The Secret to create first; `None` when every secret was already set by the pod spec.
    pub secret: Option<PodSecret>,
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

/// Decide what to do with a pod admission request.
pub fn mutate(
    request: &Request<PodView>,
    keyring: Option<&Keyring>,
    index: &SecretIndex,
    policy: &Policy,
) -> Decision {
    match decide(request, keyring, index, policy) {
        Ok(decision) => decision,
        Err(message) => Decision::Deny(message),
    }
}

fn decide(
    request: &Request<PodView>,
    keyring: Option<&Keyring>,
    index: &SecretIndex,
    policy: &Policy,
) -> Result<Decision, String> {
    let secret_name = pod_secret_name(&request.uid);
    let Some(sandbox) = select::authorise(request, policy, &secret_name)? else {
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
    if placeholder_secrets.is_empty() && env_secrets.is_empty() {
        return Ok(Decision::Allow);
    }
    let Some(keyring) = keyring else {
        return Err(
            "agent-secrets has no keyring loaded, so the sandbox's secrets cannot be opened".into(),
        );
    };
    let opened = select::open_all(keyring, sandbox.namespace, &env_secrets)?;
    // A placeholder secret must open too: a sandbox never starts with a partial set, and the
    // feed would not deliver a value that does not open.
    drop(select::open_all(
        keyring,
        sandbox.namespace,
        &placeholder_secrets,
    )?);

    // Sorted by env name (the map's order), so patches and annotations are deterministic.
    let names: Vec<&str> = opened.iter().map(|(name, _)| name.as_str()).collect();
    // A reinvoked admission has the same uid and so names the same Secret; a reference to it
    // under a key not injected now (the owner label changed in between, or a secret was
    // deleted) would keep a value this pod must not have.
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
    let values: BTreeMap<String, Plaintext> = opened
        .into_iter()
        .zip(&written.received)
        .filter(|(_, received)| **received)
        .map(|(opened, _)| opened)
        .collect();
    let mut injected: Vec<String> = values.keys().cloned().collect();
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
    let secret = if values.is_empty() {
        None
    } else {
        entries.push((SECRET_NAME_ANNOTATION, secret_name.clone()));
        Some(PodSecret {
            name: secret_name,
            namespace: sandbox.namespace.to_owned(),
            owner: sandbox.owner.to_owned(),
            pod: pod_hint(pod).to_owned(),
            request_uid: request.uid.clone(),
            values,
        })
    };
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
