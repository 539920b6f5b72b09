//! Deciding whether a pod is ours and who may create it, which of its owner's secrets it gets,
//! and opening them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::api::{OWNER_LABEL, POD_SECRET_NAME_PREFIX, SECRET_NAME_ANNOTATION, SECRETS_ANNOTATION};
use crate::cache::{CachedSecret, SecretIndex};
use crate::crypto::{Keyring, Plaintext, SealContext};

use super::super::review::{Operation, PodView, Request};
use super::super::{Policy, quoted};

/// A sandbox pod this webhook must inject.
#[derive(Debug)]
pub(super) struct Sandbox<'a> {
    pub pod: &'a PodView,
    pub namespace: &'a str,
    pub owner: &'a str,
}

/// Whether `request` is a sandbox pod CREATE we inject (`Ok(None)`: admit unchanged), or why
/// it is refused. A pod that is not ours may refer to no pod-scoped Secret at all; a sandbox's
/// references are checked by [`check_claims`] once its Secret's name is known.
pub(super) fn authorise<'a>(
    request: &'a Request<PodView>,
    policy: &Policy,
) -> Result<Option<Sandbox<'a>>, String> {
    // Only CREATE is ours: an UPDATE or DELETE of a pod is never refused.
    if request.operation != Operation::Create || request.sub_resource.is_some() {
        return Ok(None);
    }
    let Some(pod) = request.object.as_ref() else {
        return Err("pod CREATE review carries no object".into());
    };
    let sandbox = sandbox(request, pod, policy);
    if let Ok(None) = sandbox {
        check_claims(pod, None)?;
    }
    sandbox
}

fn sandbox<'a>(
    request: &'a Request<PodView>,
    pod: &'a PodView,
    policy: &Policy,
) -> Result<Option<Sandbox<'a>>, String> {
    let Some(owner) = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(OWNER_LABEL))
    else {
        return Ok(None);
    };
    let namespace = request
        .namespace
        .as_deref()
        .or(pod.metadata.namespace.as_deref())
        .unwrap_or_default();
    if policy.excluded_namespaces.contains(namespace) {
        return Ok(None);
    }
    if !policy.allows_requester(&request.user_info) {
        let allowed: Vec<String> = policy
            .allowed_principals
            .iter()
            .map(ToString::to_string)
            .collect();
        return Err(format!(
            "pods labelled {OWNER_LABEL} may only be created by {}; {} is not one of them",
            allowed.join(", "),
            quoted(request.requester())
        ));
    }
    if owner.is_empty() {
        return Err(format!(
            "label {OWNER_LABEL} is empty: it must name the sandbox's user"
        ));
    }
    Ok(Some(Sandbox {
        pod,
        namespace,
        owner,
    }))
}

/// Second line behind the ValidatingAdmissionPolicy: a pod may refer to no pod-scoped Secret
/// but `own`, the one this admission gives it (another one could hand it someone else's
/// values), and only agent-secrets names it in [`SECRET_NAME_ANNOTATION`].
pub(super) fn check_claims(pod: &PodView, own: Option<&str>) -> Result<(), String> {
    let mut refers_to_own = false;
    if let Some(spec) = pod.spec.as_ref() {
        for (place, name) in spec.secret_references() {
            if !name.starts_with(POD_SECRET_NAME_PREFIX) {
                continue;
            }
            if Some(name) != own {
                return Err(format!(
                    "{} refers to the pod-scoped Secret {}, which this pod is not given; Secrets named {POD_SECRET_NAME_PREFIX}* are created and referenced by agent-secrets only",
                    quoted(&place),
                    quoted(name)
                ));
            }
            refers_to_own = true;
        }
    }
    let annotations = pod.metadata.annotations.as_ref();
    // The annotation is ours only on a reinvocation, whose pod carries the references the
    // first invocation wrote along with it.
    if let Some(claimed) = annotations.and_then(|a| a.get(SECRET_NAME_ANNOTATION))
        && (Some(claimed.as_str()) != own || !refers_to_own)
    {
        return Err(format!(
            "annotation {SECRET_NAME_ANNOTATION} is set by agent-secrets only; remove it (it names {})",
            quoted(claimed)
        ));
    }
    Ok(())
}

/// The owner's secrets the sandbox gets, keyed by env name: all of them, or the subset the pod
/// asks for in [`SECRETS_ANNOTATION`] (a requested name the owner lacks refuses the pod).
pub(super) fn select(
    index: &SecretIndex,
    sandbox: &Sandbox<'_>,
) -> Result<BTreeMap<String, Arc<CachedSecret>>, String> {
    let Sandbox {
        pod,
        namespace,
        owner,
    } = sandbox;
    let mut selected = index.owner_secrets(namespace, owner);
    let requested = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SECRETS_ANNOTATION));
    if let Some(requested) = requested {
        let requested: BTreeSet<&str> = requested
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let missing: Vec<String> = requested
            .iter()
            .filter(|name| !selected.iter().any(|s| s.env_name == **name))
            .map(|name| quoted(name))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "{SECRETS_ANNOTATION} requests secrets that owner {} does not have in namespace {}: {}",
                quoted(owner),
                quoted(namespace),
                missing.join(", ")
            ));
        }
        selected.retain(|s| requested.contains(s.env_name.as_str()));
    }
    // Two AgentSecrets with one env name make the set ambiguous, and a sandbox never starts
    // with a guessed value.
    let mut by_env: BTreeMap<String, Arc<CachedSecret>> = BTreeMap::new();
    for secret in selected {
        if let Some(first) = by_env.get(&secret.env_name) {
            return Err(format!(
                "owner {} has two AgentSecrets with envName {}: {} and {}; delete one",
                quoted(owner),
                secret.env_name,
                quoted(&first.name),
                quoted(&secret.name)
            ));
        }
        by_env.insert(secret.env_name.clone(), secret);
    }
    Ok(by_env)
}

/// Open every selected secret; one that does not open refuses the pod, so a sandbox never
/// starts with a partial set.
pub(super) fn open_all(
    keyring: &Keyring,
    namespace: &str,
    selected: &BTreeMap<String, Arc<CachedSecret>>,
) -> Result<Vec<(String, Plaintext)>, String> {
    let mut opened = Vec::with_capacity(selected.len());
    for (env_name, secret) in selected {
        let ctx = SealContext {
            constraints: &secret.constraints,
            ..SealContext::new(namespace, &secret.owner, env_name)
        };
        let result = match &secret.sealed {
            None => Err("it has not been sealed yet".to_owned()),
            Some(Err(e)) => Err(e.to_string()),
            Some(Ok(envelope)) => keyring.open(envelope, ctx).map_err(|e| e.to_string()),
        };
        match result {
            Ok(plain) => opened.push((env_name.clone(), plain)),
            Err(reason) => {
                return Err(format!(
                    "the sandbox's secrets cannot be opened, so it must not start without them: AgentSecret {} ({env_name}): {reason}",
                    quoted(&secret.name)
                ));
            }
        }
    }
    Ok(opened)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::Principal;
    use serde_json::json;

    fn request(pod: serde_json::Value, user: &str) -> Request<PodView> {
        serde_json::from_value(json!({
            "uid": "u1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE", "namespace": "ns", "userInfo": {"username": user},
            "object": pod
        }))
        .unwrap()
    }

    fn labelled(extra: serde_json::Value) -> serde_json::Value {
        let mut pod = json!({"metadata": {"name": "p", "labels": {OWNER_LABEL: "alice"}},
                             "spec": {"containers": [{"name": "c"}]}});
        if let (Some(pod), Some(extra)) = (pod.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                pod.insert(k.clone(), v.clone());
            }
        }
        pod
    }

    #[test]
    fn unlabelled_pods_and_other_operations_are_not_ours() {
        let policy = Policy::default();
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}});
        assert!(authorise(&request(pod, "dev"), &policy).unwrap().is_none());
        let mut update = request(labelled(json!({})), "dev");
        update.operation = Operation::Update;
        assert!(authorise(&update, &policy).unwrap().is_none());
    }

    #[test]
    fn a_reference_to_another_pods_secret_is_refused_even_unlabelled() {
        let policy = Policy::default();
        for spec in [
            json!({"containers": [{"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "asec-pod-bobs", "key": "X"}}}]}]}),
            json!({"containers": [{"name": "c", "envFrom": [{"secretRef": {"name": "asec-pod-bobs"}}]}]}),
            json!({"containers": [{"name": "c"}], "volumes": [{"name": "v", "secret": {"secretName": "asec-pod-bobs"}}]}),
            json!({"containers": [{"name": "c"}], "volumes": [{"name": "v", "projected": {"sources": [{"secret": {"name": "asec-pod-bobs"}}]}}]}),
        ] {
            let pod = json!({"metadata": {"name": "p"}, "spec": spec});
            let error = authorise(&request(pod.clone(), "mallory"), &policy).unwrap_err();
            assert!(error.contains("asec-pod-bobs"), "{error}");
            let labelled = request(labelled(json!({"spec": pod["spec"].clone()})), "dev");
            let pod = labelled.object.as_ref().unwrap();
            let error = check_claims(pod, Some("asec-pod-own")).unwrap_err();
            assert!(error.contains("asec-pod-bobs"), "{error}");
        }
        let own = request(
            labelled(json!({"spec": {"containers": [{"name": "c", "env": [
            {"name": "X", "valueFrom": {"secretKeyRef": {"name": "asec-pod-own", "key": "X"}}}]}]}})),
            "dev",
        );
        let pod = own.object.as_ref().unwrap();
        assert!(check_claims(pod, Some("asec-pod-own")).is_ok());
        assert!(
            check_claims(pod, None).is_err(),
            "a pod given no Secret refers to none"
        );
    }

    #[test]
    fn a_client_supplied_secret_name_annotation_is_refused() {
        let pod = labelled(
            json!({"metadata": {"name": "p", "labels": {OWNER_LABEL: "alice"},
            "annotations": {SECRET_NAME_ANNOTATION: "asec-pod-bobs"}}}),
        );
        let request = request(pod, "dev");
        let pod = request.object.as_ref().unwrap();
        let error = check_claims(pod, Some("asec-pod-own")).unwrap_err();
        assert!(error.contains("set by agent-secrets only"), "{error}");
        // Even naming the Secret this admission would give it: without the references an
        // earlier invocation wrote along with it, the pod set it itself.
        let error = check_claims(pod, Some("asec-pod-bobs")).unwrap_err();
        assert!(error.contains("set by agent-secrets only"), "{error}");
        let reinvoked = self::request(
            labelled(
                json!({"metadata": {"name": "p", "labels": {OWNER_LABEL: "alice"},
                "annotations": {SECRET_NAME_ANNOTATION: "asec-pod-bobs"}},
                "spec": {"containers": [{"name": "c", "env": [{"name": "X",
                    "valueFrom": {"secretKeyRef": {"name": "asec-pod-bobs", "key": "X"}}}]}]}}),
            ),
            "dev",
        );
        assert!(check_claims(reinvoked.object.as_ref().unwrap(), Some("asec-pod-bobs")).is_ok());
        let unlabelled = json!({"metadata": {"name": "p",
            "annotations": {SECRET_NAME_ANNOTATION: "asec-pod-bobs"}}});
        let error = authorise(&self::request(unlabelled, "dev"), &Policy::default()).unwrap_err();
        assert!(error.contains("set by agent-secrets only"), "{error}");
    }

    #[test]
    fn only_allowed_principals_create_sandbox_pods() {
        let policy = Policy {
            allowed_principals: vec![Principal::User("orchestrator".into())],
            ..Policy::default()
        };
        let error = authorise(&request(labelled(json!({})), "dev"), &policy).unwrap_err();
        assert!(
            error.contains("may only be created by orchestrator"),
            "{error}"
        );
        let orchestrator = request(labelled(json!({})), "orchestrator");
        let allowed = authorise(&orchestrator, &policy);
        assert_eq!(allowed.unwrap().unwrap().owner, "alice");
    }

    #[test]
    fn long_requesters_are_cut_in_messages() {
        let policy = Policy {
            allowed_principals: vec![Principal::User("orchestrator".into())],
            ..Policy::default()
        };
        let long = "m".repeat(5000);
        let error = authorise(&request(labelled(json!({})), &long), &policy).unwrap_err();
        assert!(error.len() < 300, "{error}");
    }
}
