//! AgentSecret CREATE/UPDATE: seal `spec.value` before the API server stores it.

use kube::ResourceExt as _;
use serde_json::Value;

use crate::api::{AgentSecret, LAST_APPLIED_ANNOTATION, SealedValue, validate_env_name};
use crate::cache::SecretIndex;
use crate::crypto::{Keyring, SealContext};

use super::Policy;
use super::patch::{add, remove, replace};
use super::review::{Operation, Request};

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
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sealed => "sealed",
            Self::Unchanged => "unchanged",
            Self::Kept => "kept",
            Self::Scrubbed => "scrubbed",
        }
    }
}

/// Decide what to do with an AgentSecret admission request.
pub fn mutate(
    request: &Request<AgentSecret>,
    keyring: Option<&Keyring>,
    index: &SecretIndex,
    policy: &Policy,
) -> Decision {
    if !matches!(request.operation, Operation::Create | Operation::Update)
        || request.sub_resource.is_some()
    {
        return Decision::Allow;
    }
    let Some(object) = request.object.as_ref() else {
        return Decision::Deny("AgentSecret review carries no object".into());
    };
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
    // Checked when the name is claimed (create, or an envName change): an update of one of two
    // duplicates that raced past this check must still go through, or neither could be
    // repaired, re-wrapped or have its value changed.
    let old_env_name = request
        .old_object
        .as_ref()
        .filter(|_| request.operation == Operation::Update)
        .map(|old| old.spec.env_name.as_str());
    let claims_name = old_env_name != Some(spec.env_name.as_str());
    if let Some(other) = claims_name
        .then(|| index.env_name_taken_by(&namespace, &spec.owner, &spec.env_name, &name))
        .flatten()
    {
        return Decision::Deny(format!(
            "owner {:?} already has a secret with envName {} in namespace {namespace:?}: AgentSecret {other:?}; edit that one or choose another name",
            spec.owner, spec.env_name
        ));
    }

    let old_sealed = request
        .old_object
        .as_ref()
        .filter(|_| request.operation == Operation::Update)
        .and_then(|old| old.spec.sealed.as_ref());
    let ctx = SealContext::new(&namespace, &spec.owner);
    let value = spec
        .value
        .as_ref()
        .map(|v| v.expose())
        .filter(|v| !v.is_empty());

    let mut ops = Vec::new();
    let action;
    let target_sealed: Option<SealedValue> = match value {
        Some(plaintext) => {
            let Some(keyring) = keyring else {
                return Decision::Deny(
                    "agent-secrets has no keyring loaded, so the value cannot be sealed; try again once the operator is ready".into(),
                );
            };
            // Re-applying the same value keeps the stored sealed value, so the apply is a
            // no-op. The comparison runs in constant time.
            let same = old_sealed.filter(|old| {
                keyring
                    .open(old, ctx)
                    .is_ok_and(|stored| stored.ct_eq(plaintext.as_bytes()))
            });
            match same {
                Some(old) => {
                    action = Action::Unchanged;
                    Some(old.clone())
                }
                None => match keyring.seal(plaintext.as_bytes(), ctx) {
                    Ok(sealed) => {
                        action = Action::Sealed;
                        Some(sealed)
                    }
                    Err(e) => return Decision::Deny(format!("failed to seal spec.value: {e}")),
                },
            }
        }
        None => match (&spec.sealed, old_sealed) {
            // Unchanged sealed value (metadata or description edit): nothing to check.
            (Some(new), Some(old)) if new == old => {
                action = Action::Kept;
                None
            }
            // A sealed value supplied by the client (a restore, or the controller's re-wrap)
            // must open for this namespace and owner.
            (Some(new), _) => {
                let Some(keyring) = keyring else {
                    return Decision::Deny(
                        "agent-secrets has no keyring loaded, so spec.sealed cannot be verified"
                            .into(),
                    );
                };
                if let Err(e) = keyring.open(new, ctx) {
                    return Decision::Deny(format!(
                        "spec.sealed does not open for owner {:?} in namespace {namespace:?}: {e}",
                        spec.owner
                    ));
                }
                action = Action::Kept;
                None
            }
            // `kubectl replace` of a manifest without the value keeps the stored one.
            (None, Some(old)) => {
                action = Action::Kept;
                Some(old.clone())
            }
            (None, None) => {
                return Decision::Deny(
                    "spec.value is required when creating an AgentSecret".into(),
                );
            }
        },
    };

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
