//! Reconciling AgentSecrets: status, sealing stray plaintext, re-wrapping to the primary KEK.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{GetParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource as _, ResourceExt as _};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

use super::{Context, Error};
use crate::api::{AgentSecret, AgentSecretStatus, FIELD_MANAGER, SealedError, SealedValue};
use crate::cache::CachedSecret;
use crate::crypto::{CryptoError, Envelope, Format, Keyring, SealContext, SecretString};

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
    let decoded = spec.sealed.as_ref().map(SealedValue::decode);
    let (readiness, spec_change) = decide(
        spec.value.as_ref(),
        decoded.as_ref().map(Result::as_ref),
        spec.seal_context(&namespace, &constraints),
        keyring,
        duplicate_of,
        now,
    );
    let previous = object
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == READY));
    let status = status_for(
        &readiness,
        object.metadata.generation,
        spec.sealed.as_ref().map(|s| s.key_id.clone()),
        spec.sealed.as_ref().and_then(|s| s.sealed_at.clone()),
        previous,
        now,
    );
    Plan {
        readiness,
        spec_change,
        status,
    }
}

/// The readiness of a value, and the change to its spec it needs, from the spec's stored
/// plaintext (if any) and sealed value (decoded, if any).
fn decide(
    value: Option<&SecretString>,
    sealed: Option<Result<&Envelope, &SealedError>>,
    ctx: SealContext<'_>,
    keyring: Option<&Keyring>,
    duplicate_of: Option<String>,
    now: Timestamp,
) -> (Readiness, Option<SpecChange>) {
    let Some(keyring) = keyring else {
        return (Readiness::NoKeyring, None);
    };
    if let Some(value) = value {
        return match keyring.seal(value.expose().as_bytes(), ctx, now.as_second()) {
            Ok(sealed) => (
                Readiness::PlaintextFound,
                Some(SpecChange::SealPlaintext(SealedValue::encode(&sealed))),
            ),
            Err(e) => (Readiness::Damaged(e.to_string()), None),
        };
    }
    let envelope = match sealed {
        None => return (Readiness::NotSealed, None),
        Some(Err(e)) => return (Readiness::Damaged(e.to_string()), None),
        Some(Ok(envelope)) => envelope,
    };
    match keyring.open(envelope, ctx) {
        Err(CryptoError::UnknownKeyId(id)) => (Readiness::KeyMissing(id), None),
        Err(e) => (Readiness::Damaged(SealedError::from(e).to_string()), None),
        Ok(_) => {
            let spec_change = if envelope.format == Format::V1 {
                keyring
                    .reseal(envelope, ctx, ctx, now.as_second())
                    .ok()
                    .map(|resealed| SpecChange::Reseal(SealedValue::encode(&resealed)))
            } else if envelope.key_id != keyring.primary_id() {
                keyring
                    .rewrap(envelope)
                    .ok()
                    .map(|rewrapped| SpecChange::Rewrap {
                        from: envelope.key_id.clone(),
                        sealed: SealedValue::encode(&rewrapped),
                    })
            } else {
                None
            };
            let readiness = match duplicate_of {
                Some(other) => Readiness::DuplicateEnvName(other),
                None => Readiness::Ready,
            };
            (readiness, spec_change)
        }
    }
}

/// The status that reports `readiness` of an object at `generation` whose sealed value is
/// wrapped under `key_id` and was sealed at `value_changed_at`. The Ready condition keeps
/// `previous`'s transition time while its status stays the same.
fn status_for(
    readiness: &Readiness,
    generation: Option<i64>,
    key_id: Option<String>,
    value_changed_at: Option<Time>,
    previous: Option<&Condition>,
    now: Timestamp,
) -> AgentSecretStatus {
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
    AgentSecretStatus {
        conditions: vec![condition],
        key_id,
        observed_generation: generation,
        value_changed_at,
    }
}

/// What the cache tells a reconcile about an AgentSecret, without reading the object.
#[derive(Debug, Clone, PartialEq)]
pub enum Cached {
    /// Its spec and status already are what a reconcile would write: nothing to do.
    Settled(Readiness),
    /// A reconcile would re-wrap its data key: it waits for the rotation rate limit before it
    /// reads the object.
    NeedsRewrap,
    /// A reconcile would write, or the cache cannot tell: the object must be read.
    Unknown,
}

/// Whether the AgentSecret `cached` describes needs a reconcile to read it: `Settled` only
/// when [`plan`] on the object would change neither its spec nor its status (transition
/// times aside). Where the cache does not keep what `plan` reads (stored plaintext, an
/// undecodable sealed value) the answer is `Unknown`.
pub fn settled(
    cached: &CachedSecret,
    keyring: Option<&Keyring>,
    duplicate_of: Option<String>,
) -> Cached {
    let sealed = match &cached.sealed {
        _ if cached.revision.plaintext => return Cached::Unknown,
        Some(Err(_)) => return Cached::Unknown,
        Some(Ok(envelope)) => Some(envelope),
        None => None,
    };
    // Only a change to the spec uses the time, and a change is never `Settled`.
    let now = Timestamp::UNIX_EPOCH;
    let (readiness, spec_change) = decide(
        None,
        sealed.map(Ok),
        cached.seal_context(),
        keyring,
        duplicate_of,
        now,
    );
    match spec_change {
        Some(SpecChange::Rewrap { .. }) => return Cached::NeedsRewrap,
        Some(_) => return Cached::Unknown,
        None => {}
    }
    let value_changed_at = sealed
        .and_then(|e| e.sealed_at)
        .and_then(|s| Timestamp::from_second(s).ok())
        .map(Time);
    let expected = status_for(
        &readiness,
        cached.revision.generation,
        sealed.map(|e| e.key_id.clone()),
        value_changed_at,
        None,
        now,
    );
    if cached.revision.status_digest == Some(expected.digest()) {
        Cached::Settled(readiness)
    } else {
        Cached::Unknown
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

/// Reconcile one AgentSecret, known by its metadata.
///
/// The controller keeps only metadata: the spec and status it decides on come from the
/// webhook's cache when that holds the same version of the object and shows it settled
/// (the usual case: no API call at all), and from a GET otherwise.
pub async fn reconcile(
    object: Arc<PartialObjectMeta<AgentSecret>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let namespace = object.namespace().unwrap_or_default();
    let name = object.name_any();
    let mut rewrap_slot = RewrapSlot::NotTaken;
    if let Some(cached) = ctx.index.get(&namespace, &name)
        && cached.revision.resource_version.is_some()
        && cached.revision.resource_version == object.metadata.resource_version
    {
        let keyring = ctx.keyring.current();
        let duplicate_of =
            ctx.index
                .env_name_taken_by(&namespace, &cached.owner, &cached.env_name, &name);
        match settled(&cached, keyring.as_deref(), duplicate_of) {
            Cached::Settled(readiness) => return Ok(next_action(&readiness)),
            // Wait for the rate limit before reading, so a rotation's queued re-wraps do
            // not read every object twice.
            Cached::NeedsRewrap => {
                if let Err(wait) = ctx
                    .rewrap_limiter
                    .try_acquire(&super::object_key(object.as_ref()))
                {
                    return Ok(Action::requeue(wait));
                }
                rewrap_slot = RewrapSlot::Taken;
            }
            Cached::Unknown => {}
        }
    }
    let api: kube::Api<AgentSecret> = kube::Api::namespaced(ctx.client.clone(), &namespace);
    // Not older than the version the watch delivered: the API server answers from its watch
    // cache instead of a quorum read of etcd, and a newer version prompts its own reconcile.
    let params = object
        .metadata
        .resource_version
        .as_deref()
        .map(GetParams::at)
        .unwrap_or_default();
    let read = match api.get_with(&name, &params).await {
        // A watch cache behind that version (another API server of the cluster, or one
        // re-initialising) answers 504 or 429: read the latest version instead.
        Err(kube::Error::Api(status)) if status.code == 504 || status.code == 429 => {
            api.get(&name).await
        }
        read => read,
    };
    match read {
        Ok(full) => reconcile_with(Arc::new(full), ctx, rewrap_slot).await,
        // Deleted meanwhile: the watch reports it.
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(Action::await_change()),
        Err(e) => Err(Error::Kube(e)),
    }
}

/// Whether this reconcile already took a slot of the rotation rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RewrapSlot {
    NotTaken,
    Taken,
}

/// Reconcile one AgentSecret as read from the API server.
pub async fn reconcile_object(
    object: Arc<AgentSecret>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    reconcile_with(object, ctx, RewrapSlot::NotTaken).await
}

async fn reconcile_with(
    object: Arc<AgentSecret>,
    ctx: Arc<Context>,
    rewrap_slot: RewrapSlot,
) -> Result<Action, Error> {
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
        && rewrap_slot == RewrapSlot::NotTaken
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

    /// `object` with the status a reconcile under `keyring` (with `duplicate_of`) writes.
    fn written(
        mut object: AgentSecret,
        keyring: Option<&Keyring>,
        duplicate_of: Option<&str>,
    ) -> AgentSecret {
        object.status = Some(plan(&object, keyring, duplicate_of.map(Into::into), at(0)).status);
        object
    }

    /// What the cache says of `object`, checked against what `plan` would do with it: a
    /// settled verdict only where the plan writes nothing, with the plan's readiness.
    fn verdict(
        object: &AgentSecret,
        keyring: Option<&Keyring>,
        duplicate_of: Option<&str>,
    ) -> Cached {
        let duplicate_of = duplicate_of.map(String::from);
        let cached = CachedSecret::from_object(object).unwrap();
        let verdict = settled(&cached, keyring, duplicate_of.clone());
        let plan = plan(object, keyring, duplicate_of, at(500));
        let writes_status =
            object.status.as_ref().map(AgentSecretStatus::digest) != Some(plan.status.digest());
        match &verdict {
            Cached::Settled(readiness) => {
                assert_eq!(readiness, &plan.readiness);
                assert_eq!(
                    plan.spec_change, None,
                    "settled, yet the plan changes the spec"
                );
                assert!(!writes_status, "settled, yet the plan writes a status");
                // The whole status, not only its digest: what the full reconcile compares.
                assert_eq!(object.status.as_ref(), Some(&plan.status));
            }
            Cached::NeedsRewrap => {
                assert!(matches!(plan.spec_change, Some(SpecChange::Rewrap { .. })));
            }
            Cached::Unknown => {}
        }
        verdict
    }

    #[test]
    fn the_cache_shows_an_object_settled_exactly_when_a_reconcile_would_write_nothing() {
        let keyring = keyring();
        let healthy = written(object(&keyring), Some(&keyring), None);
        assert_eq!(
            verdict(&healthy, Some(&keyring), None),
            Cached::Settled(Readiness::Ready)
        );
        // No status yet, or one describing an earlier generation or another readiness.
        assert_eq!(
            verdict(&object(&keyring), Some(&keyring), None),
            Cached::Unknown
        );
        let mut edited = healthy.clone();
        edited.metadata.generation = Some(5);
        assert_eq!(verdict(&edited, Some(&keyring), None), Cached::Unknown);
        assert_eq!(
            verdict(&healthy, Some(&keyring), Some("token-2")),
            Cached::Unknown
        );
        assert_eq!(verdict(&healthy, None, None), Cached::Unknown);
        // A value sealed again (new seal time, same key) moves valueChangedAt.
        let mut resealed = healthy.clone();
        let mut envelope = resealed.spec.sealed.as_ref().unwrap().decode().unwrap();
        envelope = keyring
            .seal(b"v2", CTX, envelope.sealed_at.unwrap() + 60)
            .unwrap();
        resealed.spec.sealed = Some(SealedValue::encode(&envelope));
        assert_eq!(verdict(&resealed, Some(&keyring), None), Cached::Unknown);

        // Settled in states other than Ready, once their status is written.
        let duplicate = written(object(&keyring), Some(&keyring), Some("token-2"));
        assert_eq!(
            verdict(&duplicate, Some(&keyring), Some("token-2")),
            Cached::Settled(Readiness::DuplicateEnvName("token-2".into()))
        );
        let other = Keyring::generate("other").unwrap();
        let missing = written(object(&other), Some(&keyring), None);
        assert_eq!(
            verdict(&missing, Some(&keyring), None),
            Cached::Settled(Readiness::KeyMissing("other".into()))
        );
        let without_keyring = written(object(&keyring), None, None);
        assert_eq!(
            verdict(&without_keyring, None, None),
            Cached::Settled(Readiness::NoKeyring)
        );
        let mut unsealed = object(&keyring);
        unsealed.spec.sealed = None;
        let unsealed = written(unsealed, Some(&keyring), None);
        assert_eq!(
            verdict(&unsealed, Some(&keyring), None),
            Cached::Settled(Readiness::NotSealed)
        );
    }

    #[test]
    fn what_the_cache_does_not_keep_sends_a_reconcile_to_the_object() {
        let keyring = keyring();
        // Stored plaintext next to a sealed value, with the status of the sealed value alone:
        // only the cache's plaintext flag tells it from a settled object (the value itself is
        // not kept).
        let sealed = written(object(&keyring), Some(&keyring), None);
        let mut plaintext = sealed.clone();
        plaintext.spec.value = Some(SecretString::new("stray".into()));
        assert_eq!(
            verdict(&sealed, Some(&keyring), None),
            Cached::Settled(Readiness::Ready)
        );
        assert_eq!(verdict(&plaintext, Some(&keyring), None), Cached::Unknown);
        // An undecodable sealed value, even with the status a reconcile wrote for it.
        let mut undecodable = object(&keyring);
        undecodable.spec.sealed.as_mut().unwrap().nonce = "not base64!".into();
        let undecodable = written(undecodable, Some(&keyring), None);
        assert_eq!(verdict(&undecodable, Some(&keyring), None), Cached::Unknown);
        // A value of the first format is re-sealed.
        let mut first = object(&keyring);
        first.spec.sealed = Some(first_format_sealed(&keyring));
        let first = written(first, Some(&keyring), None);
        assert_eq!(verdict(&first, Some(&keyring), None), Cached::Unknown);
    }

    #[test]
    fn a_value_under_an_old_key_waits_for_a_rewrap_even_when_its_status_is_written() {
        let mut keyring = keyring();
        let healthy = written(object(&keyring), Some(&keyring), None);
        keyring.add_primary("k2").unwrap();
        assert_eq!(verdict(&healthy, Some(&keyring), None), Cached::NeedsRewrap);
    }
}
