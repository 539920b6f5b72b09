//! Creating the pod-scoped Secret: the one side effect of admission.

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;

use crate::api::{FIELD_MANAGER, REQUEST_UID_ANNOTATION};

/// Why a pod-scoped Secret could not be created. The message is shown to the pod's creator,
/// so it never holds values.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The API server refused (RBAC, quota, validation); its message names the object and
    /// the reason, never its data.
    #[error("the API server refused: {0}")]
    Refused(String),
    /// A Secret of that name exists but was not made for this admission.
    #[error("a Secret of that name exists and was not made for this admission")]
    NameTaken,
    #[error("failed to reach the API server: {0}")]
    Unreachable(#[source] kube::Error),
}

/// How a pod-scoped Secret came to exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// Created now.
    New,
    /// An earlier invocation of the same admission (same request uid) created it.
    Existing,
}

/// Creates pod-scoped Secrets: the API server in production, a recorder in tests.
pub trait SecretWriter: Send + Sync + 'static {
    /// Create `secret`, or find the one an earlier invocation of the same admission made.
    fn create(&self, secret: Secret) -> BoxFuture<'_, Result<Created, WriteError>>;
}

/// Creates Secrets through the Kubernetes API.
#[derive(Clone)]
pub struct KubeSecretWriter {
    pub client: kube::Client,
}

fn request_uid(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<&str> {
    meta.annotations
        .as_ref()?
        .get(REQUEST_UID_ANNOTATION)
        .map(String::as_str)
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
                // A reinvoked admission names the same Secret: reuse it if it was made for
                // this request (only the operator may create Secrets of that name).
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    let name = secret.metadata.name.as_deref().unwrap_or_default();
                    let existing = api
                        .get_metadata_opt(name)
                        .await
                        .map_err(WriteError::Unreachable)?;
                    let made_for = existing.as_ref().and_then(|m| request_uid(&m.metadata));
                    match (made_for, request_uid(&secret.metadata)) {
                        (Some(made_for), Some(uid)) if made_for == uid => Ok(Created::Existing),
                        _ => Err(WriteError::NameTaken),
                    }
                }
                Err(kube::Error::Api(status)) => Err(WriteError::Refused(status.message)),
                Err(error) => Err(WriteError::Unreachable(error)),
            }
        })
    }
}
