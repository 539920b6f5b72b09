//! Reconciling AgentSecrets: status, sealing stray plaintext, re-wrapping to the primary KEK.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource as _, ResourceExt as _};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

use super::{Context, Error};
use crate::api::{AgentSecret, AgentSecretStatus, FIELD_MANAGER, SealedError, SealedValue};
use crate::crypto::{CryptoError, Format, Keyring};

/// Type of the condition that says whether a secret is injectable.
pub const READY: &str = "Ready";

/// Why an AgentSecret is or is not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// The sealed value opens: sandboxes get it.
    Ready,
    /// No keyring is loaded, so nothing can be checked.
    NoKeyring,
    /// Plaintext was stored (the webhook was bypassed); it is being sealed.
    PlaintextFound,
    /// There is no sealed value.
    NotSealed,
    /// The value is wrapped under a key that is not in the keyring.
    KeyMissing(String),
    /// The sealed value is damaged or belongs elsewhere.
    Damaged(String),
    /// Another AgentSecret of the owner uses the same env name.
    DuplicateEnvName(String),
}

impl Readiness {
    fn status(&self) -> &'static str {
        match self {
            Self::Ready => "True",
            Self::NoKeyring => "Unknown",
            _ => "False",
        }
    }

    /// CamelCase reason of the condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Ready => "Sealed",
            Self::NoKeyring => "NoKeyring",
            Self::PlaintextFound => "PlaintextFound",
            Self::NotSealed => "NotSealed",
            Self::KeyMissing(_) => "KeyMissing",
            Self::Damaged(_) => "Damaged",
            Self::DuplicateEnvName(_) => "DuplicateEnvName",
        }
    }

    fn message(&self) -> String {
        match self {
            Self::Ready => "the sealed value opens; sandbox pods of the owner receive it".into(),
            Self::NoKeyring => "agent-secrets has no keyring loaded".into(),
            Self::PlaintextFound => {
                "spec.value was stored in plaintext (the webhook was bypassed); sealing it".into()
            }
            Self::NotSealed => "spec.sealed is missing: set spec.value again".into(),
            Self::KeyMissing(id) => format!(
                "key-encryption key {id:?} is not in the keyring: add it back, or set spec.value again"
            ),
            Self::Damaged(reason) => {
                format!("the sealed value does not open: {reason}; set spec.value again")
            }
            Self::DuplicateEnvName(other) => format!(
                "AgentSecret {other:?} of the same owner uses the same envName; sandbox pods of the owner are refused until one is deleted"
            ),
        }
    }
}

/// A change to the spec the controller makes.
#[derive(Debug, Clone, PartialEq)]
pub enum SpecChange {
    /// Replace stored plaintext with this sealed value.
    SealPlaintext(SealedValue),
    /// Re-wrapped data key under the primary KEK (same ciphertext).
    Rewrap { from: String, sealed: SealedValue },
    /// A value of the first sealed format (bound to namespace and owner only) sealed again in
    /// the current one, which binds its env name and seal time too.
    Reseal(SealedValue),
}

/// What a reconcile of one AgentSecret does.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub readiness: Readiness,
    pub spec_change: Option<SpecChange>,
    pub status: AgentSecretStatus,
}

/// Decide what an AgentSecret needs: pure, so every reason is unit-tested.
pub fn plan(
    object: &AgentSecret,
    keyring: Option<&Keyring>,
    duplicate_of: Option<String>,
    now: Timestamp,
) -> Plan {
    let namespace = object.namespace().unwrap_or_default();
    let spec = &object.spec;
    let constraints = spec.constraints();
    let ctx = spec.seal_context(&namespace, &constraints);
    let mut spec_change = None;

    let readiness = match keyring {
        None => Readiness::NoKeyring,
        Some(keyring) => match (&spec.value, &spec.sealed) {
            (Some(value), _) => {
                match keyring.seal(value.expose().as_bytes(), ctx, now.as_second()) {
                    Ok(sealed) => {
                        spec_change = Some(SpecChange::SealPlaintext(SealedValue::encode(&sealed)));
                        Readiness::PlaintextFound
                    }
                    Err(e) => Readiness::Damaged(e.to_string()),
                }
            }
            (None, None) => Readiness::NotSealed,
            (None, Some(sealed)) => match sealed.decode() {
                Err(e) => Readiness::Damaged(e.to_string()),
                Ok(envelope) => match keyring.open(&envelope, ctx) {
                    Err(CryptoError::UnknownKeyId(id)) => Readiness::KeyMissing(id),
                    Err(e) => Readiness::Damaged(SealedError::from(e).to_string()),
                    Ok(_) => {
                        if envelope.format == Format::V1 {
                            if let Ok(resealed) =
                                keyring.reseal(&envelope, ctx, ctx, now.as_second())
                            {
                                spec_change =
                                    Some(SpecChange::Reseal(SealedValue::encode(&resealed)));
                            }
                        } else if envelope.key_id != keyring.primary_id()
                            && let Ok(rewrapped) = keyring.rewrap(&envelope)
                        {
                            spec_change = Some(SpecChange::Rewrap {
                                from: envelope.key_id.clone(),
                                sealed: SealedValue::encode(&rewrapped),
                            });
                        }
                        match duplicate_of {
                            Some(other) => Readiness::DuplicateEnvName(other),
                            None => Readiness::Ready,
                        }
                    }
                },
            },
        },
    };

    let previous = object
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == READY));
    let generation = object.metadata.generation;
    let transition = match previous {
        Some(c) if c.status == readiness.status() => c.last_transition_time.clone(),
        _ => Time(now),
    };
    let condition = Condition {
        type_: READY.into(),
        status: readiness.status().into(),
        reason: readiness.reason().into(),
        message: readiness.message(),
        observed_generation: generation,
        last_transition_time: transition,
    };
    let status = AgentSecretStatus {
        conditions: vec![condition],
        key_id: spec.sealed.as_ref().map(|s| s.key_id.clone()),
        observed_generation: generation,
        value_changed_at: spec.sealed.as_ref().and_then(|s| s.sealed_at.clone()),
    };
    Plan {
        readiness,
        spec_change,
        status,
    }
}

/// The event worth recording for a plan, if any: a spec change, or a move of the Ready
/// condition to a new reason (so a damaged secret is reported once, not on every resync).
/// A re-wrap is no event of its own: a rotation re-wraps every AgentSecret, and is summarised
/// in one event per round (see [`super::rotation`]).
pub fn event_for(object: &AgentSecret, plan: &Plan) -> Option<Event> {
    let (type_, reason, note) = match &plan.spec_change {
        Some(SpecChange::SealPlaintext(_)) => (
            EventType::Warning,
            "PlaintextSealed",
            "spec.value was stored in plaintext (the webhook was bypassed or installed later); it has been sealed".to_owned(),
        ),
        Some(SpecChange::Reseal(sealed)) => (
            EventType::Normal,
            "Resealed",
            format!(
                "value re-sealed in the current format (bound to its env name and seal time) under key {:?}",
                sealed.key_id
            ),
        ),
        Some(SpecChange::Rewrap { .. }) | None => {
            let previous_reason = object
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == READY))
                .map(|c| c.reason.as_str());
            if previous_reason == Some(plan.readiness.reason()) {
                return None;
            }
            let type_ = if plan.readiness == Readiness::Ready {
                EventType::Normal
            } else {
                EventType::Warning
            };
            (type_, plan.readiness.reason(), plan.readiness.message())
        }
    };
    Some(Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    })
}

/// When to look again after a successful reconcile.
///
/// Only states that something outside this object resolves are requeued. Everything else
/// waits for a change: an edit of the object triggers its reconcile, a keyring change
/// triggers every object's, and a relist of the watch triggers them all again. A periodic
/// requeue would keep a scheduler entry per object alive for as long as it exists.
fn next_action(readiness: &Readiness) -> Action {
    match readiness {
        Readiness::Ready
        | Readiness::KeyMissing(_)
        | Readiness::Damaged(_)
        | Readiness::NotSealed => Action::await_change(),
        // Resolved by deleting the *other* object, which does not trigger this one: look
        // again soon so the status clears within a minute.
        Readiness::DuplicateEnvName(_) => Action::requeue(Duration::from_secs(60)),
        // Waiting for a keyring file the kubelet has not projected yet, or for a retry.
        Readiness::NoKeyring | Readiness::PlaintextFound => {
            Action::requeue(Duration::from_secs(30))
        }
    }
}

/// Reconcile one AgentSecret.
pub async fn reconcile(object: Arc<AgentSecret>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = object.namespace().unwrap_or_default();
    let name = object.name_any();
    let keyring = ctx.keyring.current();
    let duplicate_of =
        ctx.index
            .env_name_taken_by(&namespace, &object.spec.owner, &object.spec.env_name, &name);
    let plan = plan(&object, keyring.as_deref(), duplicate_of, Timestamp::now());
    let api: kube::Api<AgentSecret> = kube::Api::namespaced(ctx.client.clone(), &namespace);

    // A rotation re-wraps every secret: the rate limit spaces those writes, and a reconcile
    // waiting for its turn is requeued rather than sleeping in a reconcile slot. Nothing is
    // written meanwhile, so the object is seen afresh when its slot comes.
    if let Some(SpecChange::Rewrap { .. }) = &plan.spec_change
        && let Err(wait) = ctx
            .rewrap_limiter
            .try_acquire(&super::object_key(object.as_ref()))
    {
        tracing::debug!(
            namespace,
            name,
            ?wait,
            "re-wrap waits for the rotation rate limit"
        );
        return Ok(Action::requeue(wait));
    }

    if let Some(change) = &plan.spec_change {
        let sealed = match change {
            SpecChange::SealPlaintext(sealed)
            | SpecChange::Reseal(sealed)
            | SpecChange::Rewrap { sealed, .. } => sealed,
        };
        // The resourceVersion makes the write conditional: a user's concurrent edit wins and
        // this reconcile is retried on the new object.
        let patch = json!({
            "metadata": {"resourceVersion": object.resource_version()},
            "spec": {"value": null, "sealed": sealed},
        });
        let result = api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
        if let SpecChange::Rewrap { from, sealed } = change {
            ctx.rotation.record(from, &sealed.key_id, result.is_ok());
            let result_label = if result.is_ok() { "ok" } else { "error" };
            ctx.metrics
                .rewraps
                .get_or_create(&crate::telemetry::ResultLabels {
                    result: result_label,
                })
                .inc();
        }
        result.map_err(Error::Kube)?;
    }

    if object.status.as_ref() != Some(&plan.status) {
        let patch = json!({
            "apiVersion": AgentSecret::api_version(&()),
            "kind": AgentSecret::kind(&()),
            "status": plan.status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::Kube)?;
    }

    if let Some(event) = event_for(&object, &plan) {
        let reference = object.object_ref(&());
        // An event that cannot be recorded is not worth failing the reconcile for.
        if let Err(error) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(%error, namespace, name, "failed to record event");
        }
    }
    tracing::debug!(
        namespace,
        name,
        reason = plan.readiness.reason(),
        "reconciled AgentSecret"
    );
    Ok(next_action(&plan.readiness))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SecretString;
    use crate::crypto::SealContext;
    use crate::testing::{self, SEALED_AT};

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(SEALED_AT + seconds).unwrap()
    }

    const CTX: SealContext<'static> = SealContext {
        namespace: "ns",
        owner: "alice",
        env_name: "TOKEN",
        constraints: "",
    };

    fn object(keyring: &Keyring) -> AgentSecret {
        let mut object = testing::agent_secret("ns", "token", "alice", "TOKEN", keyring, "v");
        object.metadata.generation = Some(4);
        object
    }

    fn keyring() -> Keyring {
        Keyring::generate("k1").unwrap()
    }

    #[test]
    fn a_healthy_secret_is_ready_with_its_key_and_generation() {
        let keyring = keyring();
        let object = object(&keyring);
        let plan = plan(&object, Some(&keyring), None, at(0));
        assert_eq!(plan.readiness, Readiness::Ready);
        assert_eq!(plan.spec_change, None);
        assert_eq!(plan.status.key_id.as_deref(), Some("k1"));
        assert_eq!(plan.status.observed_generation, Some(4));
        assert!(plan.status.value_changed_at.is_some());
        let ready = &plan.status.conditions[0];
        assert_eq!(
            (
                ready.type_.as_str(),
                ready.status.as_str(),
                ready.reason.as_str()
            ),
            (READY, "True", "Sealed")
        );
        assert_eq!(ready.observed_generation, Some(4));
    }

    #[test]
    fn stray_plaintext_is_sealed_and_never_echoed() {
        let keyring = keyring();
        let mut object = object(&keyring);
        object.spec.sealed = None;
        object.spec.value = Some(SecretString::new("canary-stray-plaintext".into()));
        let plan = plan(&object, Some(&keyring), None, at(0));
        assert_eq!(plan.readiness, Readiness::PlaintextFound);
        let Some(SpecChange::SealPlaintext(sealed)) = &plan.spec_change else {
            panic!("expected sealing, got {:?}", plan.spec_change);
        };
        let opened = sealed.open(&keyring, CTX).unwrap();
        assert_eq!(opened.expose(), b"canary-stray-plaintext");
        let event = event_for(&object, &plan).unwrap();
        assert_eq!(event.type_, EventType::Warning);
        assert_eq!(event.reason, "PlaintextSealed");
        let everything = format!(
            "{plan:?} {:?} {}",
            event.note,
            serde_json::to_string(&plan.status).unwrap()
        );
        assert!(!everything.contains("canary-stray-plaintext"));
    }

    #[test]
    fn a_value_under_an_old_key_is_rewrapped_to_the_primary() {
        let mut keyring = keyring();
        let object = object(&keyring);
        keyring.add_primary("k2").unwrap();
        let plan = plan(&object, Some(&keyring), None, at(0));
        assert_eq!(plan.readiness, Readiness::Ready);
        let Some(SpecChange::Rewrap { from, sealed }) = &plan.spec_change else {
            panic!("expected a re-wrap, got {:?}", plan.spec_change);
        };
        assert_eq!(from, "k1");
        assert_eq!(sealed.key_id, "k2");
        let old = object.spec.sealed.as_ref().unwrap();
        assert_eq!(
            (&sealed.ciphertext, &sealed.nonce),
            (&old.ciphertext, &old.nonce)
        );
        assert_eq!(sealed.open(&keyring, CTX).unwrap().expose(), b"v");
    }

    #[test]
    fn a_rewrap_records_no_event_of_its_own() {
        let mut keyring = keyring();
        let mut object = object(&keyring);
        object.status = Some(plan(&object, Some(&keyring), None, at(0)).status);
        keyring.add_primary("k2").unwrap();
        let plan = plan(&object, Some(&keyring), None, at(10));
        assert!(matches!(plan.spec_change, Some(SpecChange::Rewrap { .. })));
        assert!(event_for(&object, &plan).is_none());
        // A change of readiness still is one.
        object.status = None;
        assert_eq!(event_for(&object, &plan).unwrap().reason, "Sealed");
    }

    #[test]
    fn a_missing_key_is_reported_not_guessed_around() {
        let old = Keyring::generate("retired").unwrap();
        let object = object(&old);
        let plan = plan(&object, Some(&keyring()), None, at(0));
        assert_eq!(plan.readiness, Readiness::KeyMissing("retired".into()));
        assert_eq!(plan.spec_change, None);
        let ready = &plan.status.conditions[0];
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "KeyMissing")
        );
        assert!(ready.message.contains("\"retired\""));
    }

    #[test]
    fn damaged_data_is_reported() {
        let keyring = keyring();
        let mut object = object(&keyring);
        // Sealed for another namespace: does not open here.
        object.spec.sealed = Some(testing::sealed(
            &keyring,
            "elsewhere",
            "alice",
            "TOKEN",
            "v",
        ));
        let plan = plan(&object, Some(&keyring), None, at(0));
        assert!(
            matches!(plan.readiness, Readiness::Damaged(_)),
            "{:?}",
            plan.readiness
        );
        assert_eq!(plan.status.conditions[0].reason, "Damaged");
    }

    #[test]
    fn a_value_copied_from_another_env_name_of_the_owner_is_damaged() {
        let keyring = keyring();
        let mut object = object(&keyring);
        object.spec.sealed = Some(testing::sealed(&keyring, "ns", "alice", "DB_PASSWORD", "v"));
        let plan = plan(&object, Some(&keyring), None, at(0));
        assert!(
            matches!(plan.readiness, Readiness::Damaged(_)),
            "{:?}",
            plan.readiness
        );
        assert_eq!(plan.spec_change, None);
    }

    #[test]
    fn a_value_of_the_first_format_is_resealed_in_the_current_one() {
        let keyring = keyring();
        let mut object = object(&keyring);
        object.spec.sealed = Some(first_format_sealed(&keyring));
        let plan = plan(&object, Some(&keyring), None, at(30));
        assert_eq!(plan.readiness, Readiness::Ready);
        let Some(SpecChange::Reseal(sealed)) = &plan.spec_change else {
            panic!("expected a re-seal, got {:?}", plan.spec_change);
        };
        assert_eq!(sealed.format, Some(2));
        assert_eq!(sealed.open(&keyring, CTX).unwrap().expose(), b"legacy");
        assert_eq!(event_for(&object, &plan).unwrap().reason, "Resealed");
    }

    /// A value as the first release sealed it: associated data of namespace and owner only.
    fn first_format_sealed(keyring: &Keyring) -> crate::api::SealedValue {
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        // Seal a throwaway value to get a data key wrapped under the keyring's primary, then
        // replace the ciphertext with one made under the first format's associated data.
        let mut envelope = keyring.seal(b"x", CTX, SEALED_AT).unwrap();
        let mut dek = [0u8; 32];
        let kek = keyring.kek(keyring.primary_id()).unwrap();
        kek.wrap
            .unwrap_key(&envelope.wrapped_key, &mut dek)
            .unwrap();
        let mut aad = b"agentsecrets.io/v1alpha1/AgentSecret\0".to_vec();
        for field in ["ns", "alice"] {
            aad.extend_from_slice(&(field.len() as u32).to_be_bytes());
            aad.extend_from_slice(field.as_bytes());
        }
        let cipher = aes_gcm::Aes256Gcm::new(&dek.into());
        envelope.ciphertext = cipher
            .encrypt(
                &envelope.nonce.into(),
                Payload {
                    msg: b"legacy",
                    aad: &aad,
                },
            )
            .unwrap();
        envelope.format = crate::crypto::Format::V1;
        envelope.sealed_at = None;
        crate::api::SealedValue::encode(&envelope)
    }

    #[test]
    fn a_duplicate_env_name_is_reported_naming_the_other() {
        let keyring = keyring();
        let object = object(&keyring);
        let plan = plan(&object, Some(&keyring), Some("token-2".into()), at(0));
        assert_eq!(
            plan.readiness,
            Readiness::DuplicateEnvName("token-2".into())
        );
        assert!(plan.status.conditions[0].message.contains("token-2"));
    }

    #[test]
    fn no_keyring_and_no_sealed_value_have_their_own_reasons() {
        let keyring = keyring();
        let object_ = object(&keyring);
        assert_eq!(
            plan(&object_, None, None, at(0)).status.conditions[0].status,
            "Unknown"
        );
        let mut unsealed = object_.clone();
        unsealed.spec.sealed = None;
        assert_eq!(
            plan(&unsealed, Some(&keyring), None, at(0)).readiness,
            Readiness::NotSealed
        );
    }

    #[test]
    fn transition_time_moves_only_when_the_status_changes_and_events_fire_once() {
        let keyring = keyring();
        let mut object = object(&keyring);
        let first = plan(&object, Some(&keyring), None, at(0));
        assert!(
            event_for(&object, &first).is_some(),
            "first observation is recorded"
        );
        object.status = Some(first.status.clone());
        let second = plan(&object, Some(&keyring), None, at(100));
        assert_eq!(second.status, first.status, "nothing to write on a resync");
        assert!(event_for(&object, &second).is_none(), "no repeated event");
        let damaged = plan(
            &object,
            Some(&Keyring::generate("other").unwrap()),
            None,
            at(200),
        );
        assert_eq!(
            damaged.status.conditions[0].last_transition_time,
            Time(at(200))
        );
    }

    #[test]
    fn only_states_resolved_elsewhere_are_requeued() {
        assert_eq!(next_action(&Readiness::Ready), Action::await_change());
        assert_eq!(next_action(&Readiness::NotSealed), Action::await_change());
        assert_eq!(
            next_action(&Readiness::DuplicateEnvName("other".into())),
            Action::requeue(Duration::from_secs(60))
        );
        assert_eq!(
            next_action(&Readiness::NoKeyring),
            Action::requeue(Duration::from_secs(30))
        );
    }
}
