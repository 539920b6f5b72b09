//! Creating the pod-scoped Secret: the one side effect of admission.

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::BTreeMap;

use crate::api::{FIELD_MANAGER, OWNER_LABEL, POD_SCOPED_LABEL, REUSE_UNTIL_ANNOTATION};

/// Why a pod-scoped Secret could not be created. The message is shown to the pod's creator,
/// so it never holds values.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The API server refused (RBAC, quota, validation); its message names the object and
    /// the reason, never its data.
    #[error("the API server refused: {0}")]
    Refused(String),
    /// A Secret of that name exists but is not the pod-scoped Secret of this owner and
    /// window, or is being deleted.
    #[error("a Secret of that name exists and is not this sandbox's, or is being deleted")]
    NameTaken,
    #[error("failed to reach the API server: {0}")]
    Unreachable(#[source] kube::Error),
}

/// How a pod-scoped Secret came to exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// Created now.
    New,
    /// It existed: another admission of the same owner, content and window (on this or
    /// another replica) created it.
    Existing,
}

/// Creates pod-scoped Secrets: the API server in production, a recorder in tests.
pub trait SecretWriter: Send + Sync + 'static {
    /// Create `secret`, or find the same one made by another admission.
    fn create(&self, secret: Secret) -> BoxFuture<'_, Result<Created, WriteError>>;
}

/// Creates Secrets through the Kubernetes API.
#[derive(Clone)]
pub struct KubeSecretWriter {
    pub client: kube::Client,
}

/// Whether `existing` is the Secret `wanted` describes. Its name is a hash of its namespace,
/// owner, window and content, and only the operator may write Secrets of such names, so the
/// same labels and window mean the same values.
pub fn same_pod_secret(existing: &ObjectMeta, wanted: &ObjectMeta) -> bool {
    fn get<'a>(map: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
        map.as_ref()?.get(key).map(String::as_str)
    }
    fn owner(meta: &ObjectMeta) -> Option<&str> {
        get(&meta.labels, OWNER_LABEL)
    }
    fn until(meta: &ObjectMeta) -> Option<&str> {
        get(&meta.annotations, REUSE_UNTIL_ANNOTATION)
    }
    existing.deletion_timestamp.is_none()
        && get(&existing.labels, POD_SCOPED_LABEL) == Some("true")
        && owner(existing).is_some()
        && owner(existing) == owner(wanted)
        && until(existing).is_some()
        && until(existing) == until(wanted)
}

impl SecretWriter for KubeSecretWriter {
    fn create(&self, secret: Secret) -> BoxFuture<'_, Result<Created, WriteError>> {
        Box::pin(async move {
            let namespace = secret.metadata.namespace.as_deref().unwrap_or_default();
            let api: kube::Api<Secret> = kube::Api::namespaced(self.client.clone(), namespace);
            let params = kube::api::PostParams {
                dry_run: false,
                field_manager: Some(FIELD_MANAGER.to_owned()),
            };
            match api.create(&params, &secret).await {
                Ok(_) => Ok(Created::New),
                // Another admission of the same owner and content (here or on another
                // replica, whose watch had not told this one yet) made it first.
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    let name = secret.metadata.name.as_deref().unwrap_or_default();
                    let existing = api
                        .get_metadata_opt(name)
                        .await
                        .map_err(WriteError::Unreachable)?;
                    match existing {
                        Some(existing) if same_pod_secret(&existing.metadata, &secret.metadata) => {
                            Ok(Created::Existing)
                        }
                        _ => Err(WriteError::NameTaken),
                    }
                }
                Err(kube::Error::Api(status)) => Err(WriteError::Refused(status.message)),
                Err(error) => Err(WriteError::Unreachable(error)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{expect, mock_client, verify};
    use http::Method;
    use serde_json::json;

    const PATH: &str = "/api/v1/namespaces/ns/secrets";

    fn wanted() -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("asec-pod-x".into()),
                namespace: Some("ns".into()),
                ..meta("alice", "2027-01-15T08:05:00Z")
            },
            ..Secret::default()
        }
    }

    fn conflict() -> crate::testing::Expect {
        expect(
            Method::POST,
            &format!("{PATH}?&fieldManager=agent-secrets"),
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "reason": "AlreadyExists", "code": 409,
                   "message": "secrets \"asec-pod-x\" already exists"}),
            |_| {},
        )
        .with_status(409)
    }

    /// The metadata GET after a conflict, answered with `existing`.
    fn found(existing: serde_json::Value) -> crate::testing::Expect {
        expect(Method::GET, &format!("{PATH}/asec-pod-x"), existing, |_| {})
    }

    fn existing(owner: &str, until: &str) -> serde_json::Value {
        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
               "metadata": {"name": "asec-pod-x", "namespace": "ns",
                            "labels": {POD_SCOPED_LABEL: "true", OWNER_LABEL: owner},
                            "annotations": {REUSE_UNTIL_ANNOTATION: until}}})
    }

    #[tokio::test]
    async fn a_conflict_with_the_same_secret_is_success_and_with_another_a_refusal() {
        for (answer, same) in [
            (existing("alice", "2027-01-15T08:05:00Z"), true),
            (existing("bob", "2027-01-15T08:05:00Z"), false),
            (existing("alice", "2027-01-15T08:00:00Z"), false),
        ] {
            let (client, handle) = mock_client();
            let verifier = tokio::spawn(verify(handle, vec![conflict(), found(answer)]));
            let result = KubeSecretWriter { client }.create(wanted()).await;
            verifier.await.unwrap();
            if same {
                assert!(matches!(result, Ok(Created::Existing)), "{result:?}");
            } else {
                assert!(matches!(result, Err(WriteError::NameTaken)), "{result:?}");
            }
        }
    }

    fn meta(owner: &str, until: &str) -> ObjectMeta {
        ObjectMeta {
            labels: Some(
                [
                    (POD_SCOPED_LABEL.to_owned(), "true".to_owned()),
                    (OWNER_LABEL.to_owned(), owner.to_owned()),
                ]
                .into(),
            ),
            annotations: Some([(REUSE_UNTIL_ANNOTATION.to_owned(), until.to_owned())].into()),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn an_existing_secret_is_the_same_only_with_the_same_owner_and_window() {
        let wanted = meta("alice", "2027-01-15T08:05:00Z");
        assert!(same_pod_secret(&wanted, &wanted));
        assert!(!same_pod_secret(
            &meta("bob", "2027-01-15T08:05:00Z"),
            &wanted
        ));
        assert!(!same_pod_secret(
            &meta("alice", "2027-01-15T08:00:00Z"),
            &wanted
        ));
        assert!(!same_pod_secret(&ObjectMeta::default(), &wanted));
        let mut deleting = wanted.clone();
        deleting.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert!(!same_pod_secret(&deleting, &wanted));
    }
}
