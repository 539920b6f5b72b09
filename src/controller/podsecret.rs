//! Pod-scoped Secrets are shared: the webhook hands one Secret to every sandbox of an owner
//! started within its reuse window with the same content. Such a Secret is never adopted (an
//! ownerReference would cost the API server a write per pod); it is deleted once its window
//! and the admissions still in flight after it have passed and no live sandbox pod names it.
//! Which pods name it is read from a store fed by the pod watch, not listed per reconcile.

use futures::FutureExt as _;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, ListParams, Preconditions};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt as _};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::{Context, Error};
use crate::api::{OWNER_LABEL, POD_SECRET_IN_FLIGHT, SECRET_NAME_ANNOTATION};

/// The sandbox pods of one watch scope, as much of their metadata as the collector reads.
pub type PodStore = Store<PartialObjectMeta<Pod>>;

/// Field selector of the pods that may still use their Secret: a pod that has finished
/// (Succeeded or Failed, terminal phases: its containers never start again) leaves the pod
/// watch as if deleted, so a finished sandbox that nobody deletes does not keep its owner's
/// plaintext in the namespace.
pub const UNFINISHED_PODS: &str = "status.phase!=Succeeded,status.phase!=Failed";

/// What a pod-scoped Secret needs.
#[derive(Debug, Clone, PartialEq)]
pub enum SecretAction {
    /// Owned by its pod (made by an older version, one per pod): garbage collection takes
    /// care of it.
    Done,
    /// A live sandbox pod names it: nothing to do until that changes (a pod's deletion
    /// prompts a look at the Secret it names).
    Keep,
    /// No live pod names it and its reuse window (plus the admissions in flight after it)
    /// has passed: delete the plaintext copy. `reuse_ended` is when the window ended.
    Delete { reuse_ended: Timestamp },
    /// No live pod names it but new pods may still be handed it: look again after this long.
    Wait(Duration),
}

/// Whether `pod` is a live sandbox pod naming `secret`. The owner labels must agree, so a pod
/// that merely claims someone else's Secret does not keep it; a terminating pod's containers
/// have all started, so it needs the Secret no more.
pub fn names_secret(pod: &impl Resource, secret: &impl Resource) -> bool {
    let (pod_meta, secret_meta) = (pod.meta(), secret.meta());
    pod_meta.deletion_timestamp.is_none()
        && secret_meta.name.is_some()
        && pod_meta.namespace == secret_meta.namespace
        && pod.annotations().get(SECRET_NAME_ANNOTATION) == secret_meta.name.as_ref()
        && secret
            .labels()
            .get(OWNER_LABEL)
            .is_some_and(|owner| pod.labels().get(OWNER_LABEL) == Some(owner))
}

/// When new pods stop being handed `secret`: its reuse-until annotation, or, without a
/// readable one (a Secret made by an older version), its creation plus `window`.
pub fn reuse_ends(secret: &impl Resource, now: Timestamp, window: Duration) -> Timestamp {
    if let Some(until) = crate::api::reuse_until(secret.meta()) {
        return until;
    }
    let created = secret
        .meta()
        .creation_timestamp
        .as_ref()
        .map_or(now, |t| t.0);
    after(created, window)
}

fn after(time: Timestamp, duration: Duration) -> Timestamp {
    SignedDuration::try_from(duration)
        .ok()
        .and_then(|d| time.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

/// Decide for one pod-scoped Secret, given pods that may name it (any others are ignored).
pub fn secret_action<'a, S, P>(
    secret: &S,
    pods: impl IntoIterator<Item = &'a P>,
    now: Timestamp,
    window: Duration,
) -> SecretAction
where
    S: Resource,
    P: Resource + 'a,
{
    if !secret.owner_references().is_empty() {
        return SecretAction::Done;
    }
    if pods.into_iter().any(|pod| names_secret(pod, secret)) {
        return SecretAction::Keep;
    }
    let reuse_ended = reuse_ends(secret, now, window);
    let deadline = after(reuse_ended, POD_SECRET_IN_FLIGHT);
    if now >= deadline {
        SecretAction::Delete { reuse_ended }
    } else {
        let left = now.duration_until(deadline);
        SecretAction::Wait(
            Duration::try_from(left)
                .unwrap_or(Duration::from_secs(1))
                .max(Duration::from_secs(1)),
        )
    }
}

/// The pod-scoped Secret a sandbox pod names: a pod's deletion (or its deletion starting), or
/// its finish, may leave that Secret to collect.
pub fn secret_of_pod<S: Resource<DynamicType = ()>>(pod: &impl Resource) -> Option<ObjectRef<S>> {
    let name = pod.annotations().get(SECRET_NAME_ANNOTATION)?;
    let namespace = pod.namespace()?;
    Some(ObjectRef::new(name).within(&namespace))
}

/// Keep only what the collector reads of a sandbox pod before it is stored: the store holds
/// every sandbox pod of its scope, and a pod's metadata as listed is mostly managed fields
/// and annotations nobody here reads.
pub fn strip_pod_for_store(pod: &mut PartialObjectMeta<Pod>) {
    let ObjectMeta {
        name,
        namespace,
        uid,
        labels,
        annotations,
        deletion_timestamp,
        ..
    } = std::mem::take(&mut pod.metadata);
    pod.metadata = ObjectMeta {
        name,
        namespace,
        uid,
        labels: only(labels, OWNER_LABEL),
        annotations: only(annotations, SECRET_NAME_ANNOTATION),
        deletion_timestamp,
        ..ObjectMeta::default()
    };
}

fn only(map: Option<BTreeMap<String, String>>, key: &str) -> Option<BTreeMap<String, String>> {
    let (key, value) = map?.remove_entry(key)?;
    Some(BTreeMap::from([(key, value)]))
}

/// The event on a pod-scoped Secret deleted because no sandbox pod names it any more and new
/// pods are no longer handed it (its window ended at `reuse_ended`).
pub fn collected_event(reuse_ended: Timestamp) -> Event {
    // Whole seconds, as the annotation and the API server's timestamps are written.
    let ended = Timestamp::from_second(reuse_ended.as_second()).unwrap_or(reuse_ended);
    Event {
        type_: EventType::Normal,
        reason: "Collected".into(),
        note: Some(format!(
            "deleted: no sandbox pod names this pod-scoped Secret and its reuse window ended at {ended}"
        )),
        action: "Delete".into(),
        secondary: None,
    }
}

/// Record `event` on `secret`: a failure is logged, not worth failing the reconcile for.
async fn record<S: Resource<DynamicType = ()>>(ctx: &Context, secret: &S, event: Event) {
    if let Err(error) = ctx.recorder.publish(&event, &secret.object_ref(&())).await {
        tracing::warn!(%error, secret = %secret.name_any(), "failed to record event");
    }
}

/// How soon a reconcile that found the pod store not yet listed looks again.
pub const POD_STORE_UNSYNCED_RETRY: Duration = Duration::from_secs(2);

/// How often a Secret some pod names is looked at again even without a pod event: a pod
/// deleted while the pod watch was re-listing yields no event of its own.
pub const KEPT_RECHECK: Duration = Duration::from_secs(600);

/// Reconcile one pod-scoped Secret. Only its metadata is needed (the controller watches
/// metadata only, so the values are never held in its cache); which pods name it is read
/// from `pods`, the sandbox pods of its watch scope.
pub async fn reconcile<S: Resource<DynamicType = ()>>(
    secret: Arc<S>,
    ctx: Arc<Context>,
    pods: &PodStore,
) -> Result<Action, Error> {
    if !secret.owner_references().is_empty() {
        return Ok(Action::await_change());
    }
    // Before its first list the store lacks pods that exist: deciding then could delete a
    // Secret a running sandbox still names.
    if !matches!(pods.wait_until_ready().now_or_never(), Some(Ok(()))) {
        return Ok(Action::requeue(POD_STORE_UNSYNCED_RETRY));
    }
    let namer = pods.find(|pod| names_secret(pod, secret.as_ref()));
    let action = secret_action(
        secret.as_ref(),
        namer.as_deref(),
        Timestamp::now(),
        ctx.pod_secret_reuse_window,
    );
    let reuse_ended = match action {
        SecretAction::Done => return Ok(Action::await_change()),
        SecretAction::Keep => return Ok(Action::requeue(KEPT_RECHECK)),
        SecretAction::Wait(after) => return Ok(Action::requeue(after)),
        SecretAction::Delete { reuse_ended } => reuse_ended,
    };
    let namespace = secret.namespace().unwrap_or_default();
    let name = secret.name_any();
    // The store may lag the API server (a relist in progress, a watch backing off, a pod
    // stored just now): before deleting, ask it. One metadata LIST per Secret per window.
    if let Some(owner) = secret.labels().get(OWNER_LABEL) {
        let pods: kube::Api<Pod> = kube::Api::namespaced(ctx.client.clone(), &namespace);
        let listed = pods
            .list_metadata(
                &ListParams::default()
                    .labels(&format!("{OWNER_LABEL}={owner}"))
                    .fields(UNFINISHED_PODS),
            )
            .await
            .map_err(Error::Kube)?;
        if listed
            .items
            .iter()
            .any(|pod| names_secret(pod, secret.as_ref()))
        {
            return Ok(Action::requeue(KEPT_RECHECK));
        }
    }
    let secrets: kube::Api<Secret> = kube::Api::namespaced(ctx.client.clone(), &namespace);
    // Deletes exactly the version decided on: a Secret recreated under the same name, or
    // changed since, is left for its own reconcile.
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: secret.uid(),
            resource_version: secret.resource_version(),
        }),
        ..DeleteParams::default()
    };
    match secrets.delete(&name, &params).await {
        Ok(_) => {}
        // Deleted meanwhile (by hand, or with its pod by an older version): nothing collected.
        Err(kube::Error::Api(status)) if status.code == 404 => {
            return Ok(Action::await_change());
        }
        Err(e) => return Err(Error::Kube(e)),
    }
    tracing::info!(
        namespace,
        secret = name,
        "deleted pod-scoped Secret: no sandbox pod names it and its reuse window has ended"
    );
    record(&ctx, secret.as_ref(), collected_event(reuse_ended)).await;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::REUSE_UNTIL_ANNOTATION;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
    use kube::runtime::reflector;

    const WINDOW: Duration = Duration::from_secs(300);
    const NAME: &str = "asec-pod-abc";

    /// `seconds` after the test's epoch (a whole second, as the API server writes times).
    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    /// A shared pod-scoped Secret of alice created at `at(0)`, reused until `reuse_until`
    /// (the annotation's text) if given.
    fn secret(reuse_until: Option<&str>) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(NAME.into()),
                namespace: Some("ns".into()),
                labels: Some([(OWNER_LABEL.to_owned(), "alice".to_owned())].into()),
                annotations: reuse_until
                    .map(|t| [(REUSE_UNTIL_ANNOTATION.to_owned(), t.to_owned())].into()),
                creation_timestamp: Some(Time(at(0))),
                ..ObjectMeta::default()
            },
            ..Secret::default()
        }
    }

    /// The annotation text of `at(seconds)`, as the webhook writes it.
    fn until(seconds: i64) -> String {
        at(seconds).to_string()
    }

    fn pod(owner: &str, secret: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("sandbox-x1".into()),
                namespace: Some("ns".into()),
                uid: Some("u1".into()),
                labels: Some([(OWNER_LABEL.to_owned(), owner.to_owned())].into()),
                annotations: Some([(SECRET_NAME_ANNOTATION.to_owned(), secret.to_owned())].into()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    const IN_FLIGHT: i64 = POD_SECRET_IN_FLIGHT.as_secs() as i64;
    const IN_FLIGHT_SECS: u64 = POD_SECRET_IN_FLIGHT.as_secs();

    #[test]
    fn the_reuse_until_annotation_is_read_as_an_rfc_3339_time() {
        let now = at(0);
        for text in ["2027-01-15T08:02:00Z", "2027-01-15T09:02:00+01:00"] {
            assert_eq!(
                reuse_ends(&secret(Some(text)), now, WINDOW),
                at(120),
                "{text}"
            );
        }
        assert_eq!(until(120), "2027-01-15T08:02:00Z");
    }

    #[test]
    fn an_owned_secret_is_left_to_garbage_collection() {
        let mut owned = secret(None);
        owned.metadata.owner_references = Some(vec![OwnerReference::default()]);
        assert_eq!(
            secret_action(&owned, &[] as &[Pod], at(10_000), WINDOW),
            SecretAction::Done
        );
    }

    #[test]
    fn a_live_pod_naming_the_secret_keeps_it_past_its_window() {
        let pods = [pod("alice", "other"), pod("alice", NAME)];
        let expired = secret(Some(&until(60)));
        assert_eq!(
            secret_action(&expired, &pods, at(10_000), WINDOW),
            SecretAction::Keep
        );
        assert_eq!(
            secret_action(&expired, &pods[..1], at(10_000), WINDOW),
            SecretAction::Delete {
                reuse_ended: at(60)
            },
            "a pod naming another Secret does not keep it"
        );
    }

    #[test]
    fn a_pod_of_another_owner_naming_the_secret_does_not_keep_it() {
        let pods = [pod("mallory", NAME)];
        assert_eq!(
            secret_action(&secret(Some(&until(60))), &pods, at(10_000), WINDOW),
            SecretAction::Delete {
                reuse_ended: at(60)
            }
        );
    }

    #[test]
    fn a_pod_of_another_namespace_naming_the_secret_does_not_keep_it() {
        let mut elsewhere = pod("alice", NAME);
        elsewhere.metadata.namespace = Some("other".into());
        assert!(!names_secret(&elsewhere, &secret(None)));
        assert!(names_secret(&pod("alice", NAME), &secret(None)));
    }

    #[test]
    fn a_terminating_pod_does_not_keep_the_secret() {
        let mut terminating = pod("alice", NAME);
        terminating.metadata.deletion_timestamp = Some(Time(at(9_000)));
        assert_eq!(
            secret_action(
                &secret(Some(&until(60))),
                [&terminating],
                at(10_000),
                WINDOW
            ),
            SecretAction::Delete {
                reuse_ended: at(60)
            }
        );
    }

    #[test]
    fn an_unnamed_secret_waits_out_its_window_and_the_admissions_in_flight_then_is_deleted() {
        let shared = secret(Some(&until(120)));
        let none: &[Pod] = &[];
        assert_eq!(
            secret_action(&shared, none, at(20), WINDOW),
            SecretAction::Wait(Duration::from_secs(100 + IN_FLIGHT_SECS))
        );
        // Past the window, admissions handed its name may still be in flight.
        assert_eq!(
            secret_action(&shared, none, at(120), WINDOW),
            SecretAction::Wait(POD_SECRET_IN_FLIGHT)
        );
        assert_eq!(
            secret_action(&shared, none, at(120 + IN_FLIGHT - 1), WINDOW),
            SecretAction::Wait(Duration::from_secs(1))
        );
        // Exactly at the window's end plus the margin: deleted.
        assert_eq!(
            secret_action(&shared, none, at(120 + IN_FLIGHT), WINDOW),
            SecretAction::Delete {
                reuse_ended: at(120)
            }
        );
    }

    #[test]
    fn a_wait_of_under_a_second_is_rounded_up_to_one() {
        let almost = at(120 + IN_FLIGHT)
            .checked_sub(SignedDuration::from_millis(10))
            .unwrap();
        assert_eq!(
            secret_action(&secret(Some(&until(120))), &[] as &[Pod], almost, WINDOW),
            SecretAction::Wait(Duration::from_secs(1))
        );
    }

    #[test]
    fn without_the_annotation_the_window_runs_from_creation() {
        let none: &[Pod] = &[];
        let window_end = 300;
        assert_eq!(
            secret_action(&secret(None), none, at(60), WINDOW),
            SecretAction::Wait(Duration::from_secs(240 + IN_FLIGHT_SECS))
        );
        assert_eq!(
            secret_action(&secret(None), none, at(window_end + IN_FLIGHT - 1), WINDOW),
            SecretAction::Wait(Duration::from_secs(1))
        );
        assert_eq!(
            secret_action(&secret(None), none, at(window_end + IN_FLIGHT), WINDOW),
            SecretAction::Delete {
                reuse_ended: at(window_end)
            }
        );
    }

    #[test]
    fn an_unreadable_annotation_counts_as_absent() {
        let none: &[Pod] = &[];
        for text in ["", "soon", "2027-01-15 08:00:00", "1800000120"] {
            assert_eq!(
                secret_action(&secret(Some(text)), none, at(60), WINDOW),
                SecretAction::Wait(Duration::from_secs(240 + IN_FLIGHT_SECS)),
                "{text:?}"
            );
        }
    }

    #[test]
    fn without_a_creation_time_a_whole_window_is_waited() {
        let mut unstamped = secret(None);
        unstamped.metadata.creation_timestamp = None;
        assert_eq!(
            secret_action(&unstamped, &[] as &[Pod], at(10_000), WINDOW),
            SecretAction::Wait(WINDOW + POD_SECRET_IN_FLIGHT)
        );
    }

    #[test]
    fn a_pod_prompts_a_look_at_the_secret_it_names() {
        let reference = secret_of_pod::<Secret>(&pod("alice", NAME)).unwrap();
        assert_eq!(reference, ObjectRef::new(NAME).within("ns"));
        let mut unnamed = pod("alice", NAME);
        unnamed.metadata.annotations = None;
        assert_eq!(secret_of_pod::<Secret>(&unnamed), None);
    }

    #[test]
    fn stored_pods_keep_only_what_the_collector_reads() {
        let listed: PartialObjectMeta<Pod> = serde_json::from_value(serde_json::json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {
                "name": "sandbox-x1", "namespace": "ns", "uid": "u1",
                "resourceVersion": "42", "generateName": "sandbox-",
                "creationTimestamp": "2027-01-15T08:00:00Z",
                "deletionTimestamp": "2027-01-15T09:00:00Z",
                "labels": {OWNER_LABEL: "alice", "app": "agent-sandbox"},
                "annotations": {SECRET_NAME_ANNOTATION: NAME, "agentsecrets.io/injected": "TOKEN",
                                "kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": "n", "uid": "x"}],
                "managedFields": [{"manager": "kubectl", "operation": "Apply",
                                   "apiVersion": "v1", "fieldsType": "FieldsV1",
                                   "fieldsV1": {"f:metadata": {}}}]
            }
        }))
        .unwrap();
        let mut stored = listed.clone();
        strip_pod_for_store(&mut stored);
        assert_eq!(
            stored.metadata,
            ObjectMeta {
                name: Some("sandbox-x1".into()),
                namespace: Some("ns".into()),
                uid: Some("u1".into()),
                labels: Some([(OWNER_LABEL.to_owned(), "alice".to_owned())].into()),
                annotations: Some([(SECRET_NAME_ANNOTATION.to_owned(), NAME.to_owned())].into()),
                deletion_timestamp: listed.metadata.deletion_timestamp.clone(),
                ..ObjectMeta::default()
            }
        );
        assert_eq!(stored.types, listed.types);
        assert_eq!(secret_of_pod::<Secret>(&stored), secret_of_pod(&listed));

        let mut unnamed = listed;
        unnamed.metadata.annotations = None;
        strip_pod_for_store(&mut unnamed);
        assert_eq!(unnamed.metadata.annotations, None);
    }

    #[test]
    fn the_collected_event_says_when_the_window_ended_in_whole_seconds() {
        let ended = at(120)
            .checked_add(SignedDuration::from_millis(250))
            .unwrap();
        let event = collected_event(ended);
        assert_eq!(event.reason, "Collected");
        assert_eq!(
            event.note.as_deref(),
            Some(
                "deleted: no sandbox pod names this pod-scoped Secret and its reuse window ended at 2027-01-15T08:02:00Z"
            )
        );
    }

    #[tokio::test]
    async fn nothing_is_decided_before_the_pod_store_has_listed() {
        let (ctx, mut handle) =
            crate::testing::context(crate::crypto::Keyring::generate("k1").unwrap());
        // Listing, not yet listed: the writer is alive but has seen no InitDone.
        let (store, _writer) = reflector::store::<PartialObjectMeta<Pod>>();
        let expired = Arc::new(secret(Some("2020-01-01T00:00:00Z")));
        let action = reconcile(expired, ctx.clone(), &store).await.unwrap();
        assert_eq!(action, Action::requeue(POD_STORE_UNSYNCED_RETRY));
        // The client is still alive (`ctx`): a request would arrive here.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), handle.next_request())
                .await
                .is_err(),
            "no request may be made: nothing is known of the pods"
        );
        drop(ctx);
    }
}
