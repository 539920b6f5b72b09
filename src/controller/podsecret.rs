//! Pod-scoped Secrets live no longer than their sandbox: once the pod exists its Secret gets an
//! ownerReference (garbage collection deletes it with the pod); one whose pod never appeared
//! is deleted after a grace period.

use k8s_openapi::api::core::v1::{ObjectReference, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt as _};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

use super::{Context, Error};
use crate::api::{OWNER_LABEL, SECRET_NAME_ANNOTATION};

/// What a pod-scoped Secret needs.
#[derive(Debug, Clone, PartialEq)]
pub enum SecretAction {
    /// Already owned by its pod: garbage collection takes care of it.
    Done,
    /// Its pod exists: make the pod its owner.
    Adopt(OwnerReference),
    /// No pod appeared within the grace period: delete the plaintext copy.
    Delete,
    /// No pod yet: look again after this long.
    Wait(Duration),
}

/// Decide for one pod-scoped Secret given the labelled pods of its namespace.
pub fn secret_action<S: Resource>(
    secret: &S,
    pods: &[Pod],
    now: Timestamp,
    grace: Duration,
) -> SecretAction {
    if !secret.owner_references().is_empty() {
        return SecretAction::Done;
    }
    let name = secret.name_any();
    let owner = secret.labels().get(OWNER_LABEL);
    // The pod names its Secret in an annotation; the owner labels must agree, so a pod that
    // merely claims someone else's Secret does not adopt it.
    let pod = pods.iter().find(|pod| {
        pod.annotations().get(SECRET_NAME_ANNOTATION) == Some(&name)
            && pod.labels().get(OWNER_LABEL) == owner
            && pod.metadata.deletion_timestamp.is_none()
    });
    if let Some(pod) = pod
        && let Some(uid) = pod.uid()
    {
        return SecretAction::Adopt(OwnerReference {
            api_version: "v1".into(),
            kind: "Pod".into(),
            name: pod.name_any(),
            uid,
            // Not a controller reference, and no blockOwnerDeletion: that would need
            // update on pods/finalizers, which the operator is not granted.
            controller: None,
            block_owner_deletion: None,
        });
    }
    let created = secret
        .meta()
        .creation_timestamp
        .as_ref()
        .map_or(now, |t| t.0);
    let grace = SignedDuration::try_from(grace).unwrap_or(SignedDuration::MAX);
    let deadline = created.checked_add(grace).unwrap_or(Timestamp::MAX);
    if now >= deadline {
        SecretAction::Delete
    } else {
        let left = now.duration_until(deadline);
        SecretAction::Wait(
            Duration::try_from(left)
                .unwrap_or(Duration::from_secs(1))
                .max(Duration::from_secs(1)),
        )
    }
}

/// The pod-scoped Secret a sandbox pod names. The webhook creates the Secret before the pod
/// is stored, so the Secret's own reconcile usually finds no pod yet; the pod appearing must
/// prompt the adoption, or it would wait until the Secret's grace period ends.
pub fn secret_of_pod<S: Resource<DynamicType = ()>>(pod: &impl Resource) -> Option<ObjectRef<S>> {
    let name = pod.annotations().get(SECRET_NAME_ANNOTATION)?;
    let namespace = pod.namespace()?;
    Some(ObjectRef::new(name).within(&namespace))
}

/// The event on a pod-scoped Secret its pod (in `namespace`) adopted.
pub fn adopted_event(namespace: &str, pod: &OwnerReference) -> Event {
    Event {
        type_: EventType::Normal,
        reason: "Adopted".into(),
        note: Some(format!(
            "owned by its sandbox pod {:?} now: deleted with it by garbage collection",
            pod.name
        )),
        action: "Adopt".into(),
        secondary: Some(ObjectReference {
            api_version: Some(pod.api_version.clone()),
            kind: Some(pod.kind.clone()),
            name: Some(pod.name.clone()),
            namespace: Some(namespace.to_owned()),
            uid: Some(pod.uid.clone()),
            ..ObjectReference::default()
        }),
    }
}

/// The event on a pod-scoped Secret deleted because no pod claimed it within `grace` (its pod
/// was refused or failed after admission).
pub fn collected_event(grace: Duration) -> Event {
    Event {
        type_: EventType::Normal,
        reason: "Collected".into(),
        note: Some(format!(
            "deleted: no sandbox pod claimed this pod-scoped Secret within {}s of its creation",
            grace.as_secs()
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

/// Reconcile one pod-scoped Secret. Only its metadata is needed (the controller watches
/// metadata only, so the values are never held in its cache).
pub async fn reconcile<S: Resource<DynamicType = ()>>(
    secret: Arc<S>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let namespace = secret.namespace().unwrap_or_default();
    let name = secret.name_any();
    if !secret.owner_references().is_empty() {
        return Ok(Action::await_change());
    }
    let owner = secret
        .labels()
        .get(OWNER_LABEL)
        .cloned()
        .unwrap_or_default();
    let pods_api: kube::Api<Pod> = kube::Api::namespaced(ctx.client.clone(), &namespace);
    let pods = pods_api
        .list(&ListParams::default().labels(&format!("{OWNER_LABEL}={owner}")))
        .await
        .map_err(Error::Kube)?;
    let secrets: kube::Api<Secret> = kube::Api::namespaced(ctx.client.clone(), &namespace);
    match secret_action(
        secret.as_ref(),
        &pods.items,
        Timestamp::now(),
        ctx.pod_secret_reuse_window,
    ) {
        SecretAction::Done => Ok(Action::await_change()),
        SecretAction::Adopt(reference) => {
            let patch = json!({"metadata": {"ownerReferences": [reference]}});
            secrets
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(Error::Kube)?;
            tracing::info!(namespace, secret = name, pod = %reference.name, "pod-scoped Secret adopted by its pod");
            record(&ctx, secret.as_ref(), adopted_event(&namespace, &reference)).await;
            Ok(Action::await_change())
        }
        SecretAction::Delete => {
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: secret.uid(),
                    resource_version: secret.resource_version(),
                }),
                ..DeleteParams::default()
            };
            match secrets.delete(&name, &params).await {
                Ok(_) => {}
                // Deleted meanwhile (with its pod, or by hand): nothing was collected.
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    return Ok(Action::await_change());
                }
                Err(e) => return Err(Error::Kube(e)),
            }
            tracing::info!(
                namespace,
                secret = name,
                "deleted pod-scoped Secret whose pod never appeared"
            );
            record(
                &ctx,
                secret.as_ref(),
                collected_event(ctx.pod_secret_reuse_window),
            )
            .await;
            Ok(Action::await_change())
        }
        SecretAction::Wait(after) => Ok(Action::requeue(after)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::api::ObjectMeta;

    const GRACE: Duration = Duration::from_secs(300);

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn secret(owner_refs: bool) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("sandbox-asec-abc".into()),
                namespace: Some("ns".into()),
                labels: Some([(OWNER_LABEL.to_owned(), "alice".to_owned())].into()),
                creation_timestamp: Some(Time(at(0))),
                owner_references: owner_refs.then(|| vec![OwnerReference::default()]),
                ..ObjectMeta::default()
            },
            ..Secret::default()
        }
    }

    fn pod(owner: &str, secret: &str, uid: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("sandbox-x1".into()),
                namespace: Some("ns".into()),
                uid: uid.map(Into::into),
                labels: Some([(OWNER_LABEL.to_owned(), owner.to_owned())].into()),
                annotations: Some([(SECRET_NAME_ANNOTATION.to_owned(), secret.to_owned())].into()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    #[test]
    fn an_owned_secret_is_left_to_garbage_collection() {
        assert_eq!(
            secret_action(&secret(true), &[], at(10_000), GRACE),
            SecretAction::Done
        );
    }

    #[test]
    fn the_pod_naming_the_secret_adopts_it() {
        let pods = [
            pod("alice", "other", Some("u0")),
            pod("alice", "sandbox-asec-abc", Some("u1")),
        ];
        let SecretAction::Adopt(reference) = secret_action(&secret(false), &pods, at(1), GRACE)
        else {
            panic!("expected adoption");
        };
        assert_eq!(reference.uid, "u1");
        assert_eq!(
            (reference.api_version.as_str(), reference.kind.as_str()),
            ("v1", "Pod")
        );
        assert_eq!(reference.name, "sandbox-x1");
        assert_eq!(reference.block_owner_deletion, None);
    }

    #[test]
    fn a_pod_of_another_owner_claiming_the_secret_does_not_adopt_it() {
        let pods = [pod("mallory", "sandbox-asec-abc", Some("u1"))];
        assert_eq!(
            secret_action(&secret(false), &pods, at(1), GRACE),
            SecretAction::Wait(Duration::from_secs(299))
        );
    }

    #[test]
    fn a_pod_prompts_a_look_at_the_secret_it_names() {
        let reference =
            secret_of_pod::<Secret>(&pod("alice", "sandbox-asec-abc", Some("u1"))).unwrap();
        assert_eq!(reference, ObjectRef::new("sandbox-asec-abc").within("ns"));
        let mut unnamed = pod("alice", "sandbox-asec-abc", Some("u1"));
        unnamed.metadata.annotations = None;
        assert_eq!(secret_of_pod::<Secret>(&unnamed), None);
    }

    #[test]
    fn an_orphan_waits_out_the_grace_period_then_is_deleted() {
        assert_eq!(
            secret_action(&secret(false), &[], at(60), GRACE),
            SecretAction::Wait(Duration::from_secs(240))
        );
        assert_eq!(
            secret_action(&secret(false), &[], at(300), GRACE),
            SecretAction::Delete
        );
        assert_eq!(
            secret_action(&secret(false), &[], at(9_999), GRACE),
            SecretAction::Delete
        );
    }
}
