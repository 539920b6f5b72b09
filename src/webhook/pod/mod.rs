//! Pod CREATE: give a sandbox pod its owner's secrets as `secretKeyRef` env entries pointing at
//! a pod-scoped Secret, never as plaintext in the pod spec.
//!
//! [`mutate`] authorises the request and picks the secrets ([`select`]), opens them, and writes
//! the patch ([`references`]); the Secret to create is a [`PodSecret`].

mod references;
mod secret;
mod select;

pub use secret::{PodSecret, pod_secret_name};

use std::collections::BTreeMap;

use crate::api::{
    INIT_CONTAINERS_ANNOTATION, INJECTED_ANNOTATION, SECRET_NAME_ANNOTATION, SKIPPED_ANNOTATION,
};
use crate::cache::SecretIndex;
use crate::crypto::{Keyring, Plaintext};

use super::Policy;
use super::patch::{PatchWriter, write_annotations};
use super::review::{PodView, Request};
use references::{ReferenceWriter, Written, stale_reference};

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
    let secret_name = pod_secret_name(&request.uid);
    let sandbox = match select::authorise(request, policy, &secret_name) {
        Ok(Some(sandbox)) => sandbox,
        Ok(None) => return Decision::Allow,
        Err(message) => return Decision::Deny(message),
    };
    let selected = match select::select(index, &sandbox) {
        Ok(selected) if selected.is_empty() => return Decision::Allow,
        Ok(selected) => selected,
        Err(message) => return Decision::Deny(message),
    };
    let Some(keyring) = keyring else {
        return Decision::Deny(
            "agent-secrets has no keyring loaded, so the sandbox's secrets cannot be opened".into(),
        );
    };
    let opened = match select::open_all(keyring, sandbox.namespace, &selected) {
        Ok(opened) => opened,
        Err(message) => return Decision::Deny(message),
    };
    // Sorted by env name (the map's order), so patches and annotations are deterministic.
    let names: Vec<&str> = opened.iter().map(|(name, _)| name.as_str()).collect();
    let pod = sandbox.pod;
    // A reinvoked admission has the same uid and so names the same Secret; a reference to it
    // under a key not injected now (the owner label changed in between, or a secret was
    // deleted) would keep a value this pod must not have.
    if let Some(stale) = stale_reference(pod, &secret_name, &names) {
        return Decision::Deny(format!(
            "env {stale} refers to the pod-scoped Secret of an earlier injection, for a secret owner {} does not have now; recreate the pod",
            super::quoted(sandbox.owner)
        ));
    }
    let annotations = pod.metadata.annotations.as_ref();
    let include_init = annotations
        .and_then(|a| a.get(INIT_CONTAINERS_ANNOTATION))
        .is_some_and(|v| v == "true");
    let references = ReferenceWriter {
        names: &names,
        secret_name: &secret_name,
    };
    let mut writer = PatchWriter::default();
    let mut written = Written::default();
    let spec = pod.spec.as_ref();
    references.containers(
        &mut writer,
        "containers",
        spec.map(|s| s.containers.as_slice()).unwrap_or_default(),
        &mut written,
    );
    if include_init {
        references.containers(
            &mut writer,
            "initContainers",
            spec.and_then(|s| s.init_containers.as_deref())
                .unwrap_or_default(),
            &mut written,
        );
    }
    let values: BTreeMap<String, Plaintext> = opened
        .into_iter()
        .zip(&written.received)
        .filter(|(_, received)| **received)
        .map(|(opened, _)| opened)
        .collect();
    let injected: Vec<String> = values.keys().cloned().collect();

    let mut entries = vec![
        (INJECTED_ANNOTATION, injected.join(",")),
        (SKIPPED_ANNOTATION, written.skipped.join(",")),
    ];
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
    Decision::Inject(Box::new(Injection {
        patch: writer.finish(),
        secret,
        owner: sandbox.owner.to_owned(),
        injected,
        skipped: written.skipped,
    }))
}
