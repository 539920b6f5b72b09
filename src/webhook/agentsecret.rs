//! AgentSecret CREATE/UPDATE: seal `spec.value` before the API server stores it.

use kube::ResourceExt as _;
use serde_json::Value;

use crate::api::{
    AgentSecret, LAST_APPLIED_ANNOTATION, SealedError, SealedValue, validate_env_name,
};
use crate::cache::SecretIndex;
use crate::crypto::{Format, Keyring};

use super::patch::{add, remove, replace};
use super::review::{Operation, Request};
use super::{Policy, quoted};

/// What to do with an AgentSecret write.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Admit unchanged.
    Allow,
    /// Refuse, with a message for the requester (never the value).
    Deny(String),
    /// Admit with this patch; `action` says what was done, for logs.
    Patch {
        patch: json_patch::Patch,
        action: Action,
    },
}

/// What the patch does with the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A new value was sealed.
    Sealed,
    /// The value equals the stored one: the stored sealed value is kept.
    Unchanged,
    /// No value given on update: the stored sealed value is kept.
    Kept,
    /// Only the plaintext copy in the last-applied annotation was removed.
    Scrubbed,
    /// The envName or the constraints (allowed hosts, placements, plain HTTP) changed: the
    /// stored value was opened and sealed for the new binding.
    Resealed,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sealed => "sealed",
            Self::Unchanged => "unchanged",
            Self::Kept => "kept",
            Self::Scrubbed => "scrubbed",
            Self::Resealed => "resealed",
        }
    }
}

/// Decide what to do with an AgentSecret admission request.
pub fn mutate(
    request: &Request<AgentSecret>,
    keyring: Option<&Keyring>,
    index: &SecretIndex,
    policy: &Policy,
    now: i64,
) -> Decision {
    if request.sub_resource.is_some() {
        return Decision::Allow;
    }
    // Second line behind the owner-binding ValidatingAdmissionPolicy: nobody writes or deletes
    // another owner's secret. The owner is immutable, so the stored one decides an update too.
    let owned_by = match request.operation {
        Operation::Delete => request.old_object.as_ref(),
        Operation::Create | Operation::Update => request.object.as_ref(),
        Operation::Connect => return Decision::Allow,
    };
    let Some(object) = owned_by else {
        return Decision::Deny("AgentSecret review carries no object".into());
    };
    if !policy
        .owner_binding
        .permits(&request.user_info, &object.spec.owner, &request.operation)
    {
        return Decision::Deny(format!(
            "{} may not {} AgentSecrets of owner {}: only the owner or a secret administrator may",
            quoted(request.requester()),
            verb(&request.operation),
            quoted(&object.spec.owner),
        ));
    }
    if request.operation == Operation::Delete {
        return Decision::Allow;
    }
    let spec = &object.spec;
    let namespace = request
        .namespace
        .clone()
        .or_else(|| object.namespace())
        .unwrap_or_default();
    let name = if request.name.is_empty() {
        object.name_any()
    } else {
        request.name.clone()
    };
    if let Err(e) = validate_env_name(&spec.env_name, &policy.extra_reserved_env_names) {
        return Decision::Deny(format!("spec.envName: {e}"));
    }
    if let Err(e) = spec.validate_constraints() {
        return Decision::Deny(e.to_string());
    }
    let old = request
        .old_object
        .as_ref()
        .filter(|_| request.operation == Operation::Update);
    // Checked when the name is claimed (create, or an envName change): an update of one of two
    // duplicates that raced past this check must still go through, or neither could be
    // repaired, re-wrapped or have its value changed.
    let claims_name = old.map(|old| old.spec.env_name.as_str()) != Some(spec.env_name.as_str());
    if let Some(other) = claims_name
        .then(|| index.env_name_taken_by(&namespace, &spec.owner, &spec.env_name, &name))
        .flatten()
    {
        return Decision::Deny(format!(
            "owner {} already has a secret with envName {} in namespace {}: AgentSecret {}; edit that one or choose another name",
            quoted(&spec.owner),
            spec.env_name,
            quoted(&namespace),
            quoted(&other)
        ));
    }

    let constraints = spec.constraints();
    let ctx = spec.seal_context(&namespace, &constraints);
    let old_sealed = old.and_then(|old| old.spec.sealed.as_ref().map(|s| (old, s)));
    // What the stored value is bound to besides namespace and owner: a change of either
    // (a rename, or other allowed hosts, placements or schemes) needs the value re-sealed.
    let binding_changed = |old: &AgentSecret| {
        old.spec.env_name != spec.env_name || old.spec.constraints() != constraints
    };
    let value = spec
        .value
        .as_ref()
        .map(|v| v.expose())
        .filter(|v| !v.is_empty());
    let no_keyring = |what: &str| {
        Decision::Deny(format!(
            "agent-secrets has no keyring loaded, so {what}; try again once the operator is ready"
        ))
    };

    let action;
    let target_sealed: Option<SealedValue> = match value {
        Some(plaintext) => {
            let Some(keyring) = keyring else {
                return no_keyring("the value cannot be sealed");
            };
            // Re-applying the same value keeps the stored sealed value, so the apply is a
            // no-op. The comparison runs in constant time.
            let same = old_sealed.filter(|(old, sealed)| {
                !binding_changed(old)
                    && sealed
                        .open(keyring, ctx)
                        .is_ok_and(|stored| stored.ct_eq(plaintext.as_bytes()))
            });
            match same {
                Some((_, sealed)) => {
                    action = Action::Unchanged;
                    Some(sealed.clone())
                }
                None => match keyring.seal(plaintext.as_bytes(), ctx, now) {
                    Ok(sealed) => {
                        action = Action::Sealed;
                        Some(SealedValue::encode(&sealed))
                    }
                    Err(e) => return Decision::Deny(format!("failed to seal spec.value: {e}")),
                },
            }
        }
        None => match (&spec.sealed, old_sealed) {
            // Unchanged sealed value and env name (metadata or description edit): nothing to
            // check.
            (Some(new), Some((old, stored))) if new == stored && !binding_changed(old) => {
                action = Action::Kept;
                None
            }
            // A rename, or a change of allowed hosts, placements or schemes, keeps the value:
            // open it for the old binding, seal it for the new one.
            (None, Some((old, stored))) | (Some(_), Some((old, stored)))
                if binding_changed(old) && spec.sealed.as_ref().is_none_or(|new| new == stored) =>
            {
                let Some(keyring) = keyring else {
                    return no_keyring(
                        "the value cannot be re-sealed for the new envName or constraints",
                    );
                };
                let old_constraints = old.spec.constraints();
                let resealed = stored.decode().and_then(|envelope| {
                    let from = old.spec.seal_context(&namespace, &old_constraints);
                    Ok(keyring.reseal(&envelope, from, ctx, now)?)
                });
                match resealed {
                    Ok(sealed) => {
                        action = Action::Resealed;
                        Some(SealedValue::encode(&sealed))
                    }
                    Err(e) => {
                        return Decision::Deny(format!(
                            "the stored value cannot be re-sealed for envName {} and its allowed hosts: {e}; set spec.value again",
                            spec.env_name
                        ));
                    }
                }
            }
            // A sealed value supplied by the client (a restore, or the controller's re-wrap)
            // must open for exactly this namespace, owner and env name, in the current format.
            (Some(new), _) => {
                let Some(keyring) = keyring else {
                    return no_keyring("spec.sealed cannot be verified");
                };
                let opened = new.decode().and_then(|envelope| {
                    if envelope.format != Format::V2 {
                        return Err(SealedError::UnknownFormat(
                            envelope.format.number().unwrap_or(1),
                        ));
                    }
                    Ok(keyring.open(&envelope, ctx)?)
                });
                if let Err(e) = opened {
                    return Decision::Deny(format!(
                        "spec.sealed does not open for owner {} and envName {} in namespace {}: {e}",
                        quoted(&spec.owner),
                        spec.env_name,
                        quoted(&namespace)
                    ));
                }
                action = Action::Kept;
                None
            }
            // `kubectl replace` of a manifest without the value keeps the stored one.
            (None, Some((_, stored))) => {
                action = Action::Kept;
                Some(stored.clone())
            }
            (None, None) => {
                return Decision::Deny(
                    "spec.value is required when creating an AgentSecret".into(),
                );
            }
        },
    };

    let mut ops = Vec::new();
    if spec.value.is_some() {
        ops.push(remove(&["spec", "value"]));
    }
    if let Some(sealed) = target_sealed.filter(|t| spec.sealed.as_ref() != Some(t)) {
        let value = match serde_json::to_value(&sealed) {
            Ok(value) => value,
            Err(e) => return Decision::Deny(format!("failed to encode spec.sealed: {e}")),
        };
        // `add` replaces an existing member, so it serves both cases.
        ops.push(add(&["spec", "sealed"], value));
    }
    let scrubbed = scrub_last_applied(object, &mut ops);
    if ops.is_empty() {
        return Decision::Allow;
    }
    let action = if action == Action::Kept && scrubbed && spec.value.is_none() {
        Action::Scrubbed
    } else {
        action
    };
    Decision::Patch {
        patch: json_patch::Patch(ops),
        action,
    }
}

fn verb(operation: &Operation) -> &'static str {
    match operation {
        Operation::Create => "create",
        Operation::Update => "change",
        Operation::Delete => "delete",
        Operation::Connect => "connect to",
    }
}

/// Remove `spec.value` from the client-side-apply annotation, keeping the rest valid JSON so
/// the next `kubectl apply` still merges. An annotation that is not JSON is removed whole: it
/// may hold the value and cannot be cleaned. Returns whether an operation was added.
fn scrub_last_applied(object: &AgentSecret, ops: &mut Vec<json_patch::PatchOperation>) -> bool {
    let Some(text) = object.annotations().get(LAST_APPLIED_ANNOTATION) else {
        return false;
    };
    let path = ["metadata", "annotations", LAST_APPLIED_ANNOTATION];
    match serde_json::from_str::<Value>(text) {
        Ok(mut applied) => {
            let removed = applied
                .get_mut("spec")
                .and_then(Value::as_object_mut)
                .and_then(|spec| spec.remove("value"));
            if removed.is_none() {
                return false;
            }
            // kubectl writes the JSON followed by a newline.
            let cleaned = format!("{applied}\n");
            ops.push(replace(&path, Value::String(cleaned)));
            true
        }
        Err(_) => {
            ops.push(remove(&path));
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use serde_json::json;

    const NOW: i64 = testing::SEALED_AT + 60;

    fn update(old: &AgentSecret, new: &AgentSecret) -> Request<AgentSecret> {
        serde_json::from_value(json!({
            "uid": "u1", "kind": {"group": "agentsecrets.io", "version": "v1alpha1", "kind": "AgentSecret"},
            "operation": "UPDATE", "namespace": "ns", "name": "token", "userInfo": {"username": "alice"},
            "object": new, "oldObject": old
        }))
        .unwrap()
    }

    /// The decision on `old` updated to `new`, under `keyring` and the default policy.
    fn update_decided(keyring: &Keyring, old: &AgentSecret, new: &AgentSecret) -> Decision {
        mutate(
            &update(old, new),
            Some(keyring),
            &SecretIndex::default(),
            &Policy::default(),
            NOW,
        )
    }

    fn patched_sealed(decision: Decision) -> (SealedValue, Action) {
        let Decision::Patch { patch, action } = decision else {
            panic!("expected a patch, got {decision:?}");
        };
        let mut doc = json!({"spec": {}});
        json_patch::patch(&mut doc, &patch).unwrap();
        (
            serde_json::from_value(doc["spec"]["sealed"].clone()).unwrap(),
            action,
        )
    }

    #[test]
    fn changing_allowed_hosts_reseals_the_value_for_the_new_hosts() {
        let keyring = testing::keyring("k1");
        let old = testing::agent_secret("ns", "token", "alice", "TOKEN", &keyring, "v");
        let mut new = old.clone();
        new.spec.allowed_hosts = Some(vec!["api.x.com".into()]);
        let decision = update_decided(&keyring, &old, &new);
        let (sealed, action) = patched_sealed(decision);
        assert_eq!(action, Action::Resealed);
        let constraints = new.spec.constraints();
        assert!(!constraints.is_empty());
        let opened = sealed
            .open(&keyring, new.spec.seal_context("ns", &constraints))
            .unwrap();
        assert_eq!(opened.expose(), b"v");
        // Bound to the hosts: the same ciphertext under other (or no) constraints does not open.
        assert!(
            sealed
                .open(&keyring, new.spec.seal_context("ns", ""))
                .is_err()
        );
        let mut wider = new.spec.clone();
        wider.allowed_hosts = Some(vec!["api.x.com".into(), "evil.example".into()]);
        let wider_constraints = wider.constraints();
        assert!(
            sealed
                .open(&keyring, wider.seal_context("ns", &wider_constraints))
                .is_err()
        );
    }

    #[test]
    fn a_client_supplied_sealed_value_must_open_for_the_new_constraints() {
        let keyring = testing::keyring("k1");
        let old = testing::agent_secret("ns", "token", "alice", "TOKEN", &keyring, "v");
        // A sealed value from elsewhere, sealed without constraints, submitted with hosts:
        // widening what the value may be used for goes through a re-seal, never a copy.
        let mut new = old.clone();
        new.spec.allowed_hosts = Some(vec!["api.x.com".into()]);
        new.spec.sealed = Some(testing::sealed(&keyring, "ns", "alice", "TOKEN", "other"));
        let decision = update_decided(&keyring, &old, &new);
        let Decision::Deny(message) = decision else {
            panic!("expected a denial, got {decision:?}");
        };
        assert!(message.contains("does not open"), "{message}");
    }

    #[test]
    fn reordering_allowed_hosts_keeps_the_stored_value() {
        let keyring = testing::keyring("k1");
        let old = testing::secretless_agent_secret(
            "ns",
            "token",
            "alice",
            "TOKEN",
            &keyring,
            "v",
            &["a.x.com", "b.x.com"],
        );
        let mut new = old.clone();
        new.spec.allowed_hosts = Some(vec!["B.x.com".into(), "a.x.com".into()]);
        let decision = update_decided(&keyring, &old, &new);
        assert_eq!(decision, Decision::Allow);
    }

    #[test]
    fn invalid_allowed_hosts_and_placements_are_refused() {
        let keyring = testing::keyring("k1");
        let old = testing::agent_secret("ns", "token", "alice", "TOKEN", &keyring, "v");
        for (hosts, inject_as, needle) in [
            (vec!["https://api.x.com"], vec![], "spec.allowedHosts entry"),
            (vec!["*.com"], vec![], "spec.allowedHosts entry"),
            (vec!["api.x.com"], vec!["cookie:x"], "spec.injectAs entry"),
        ] {
            let mut new = old.clone();
            new.spec.allowed_hosts = Some(hosts.iter().map(|h| (*h).to_owned()).collect());
            new.spec.inject_as = Some(inject_as.iter().map(|h| (*h).to_owned()).collect());
            let decision = update_decided(&keyring, &old, &new);
            let Decision::Deny(message) = decision else {
                panic!("expected a denial, got {decision:?}");
            };
            assert!(message.contains(needle), "{message}");
        }
        let mut many = old.clone();
        many.spec.allowed_hosts = Some((0..33).map(|i| format!("h{i}.x.com")).collect());
        let decision = update_decided(&keyring, &old, &many);
        assert!(matches!(decision, Decision::Deny(m) if m.contains("at most 32")));
    }
}
