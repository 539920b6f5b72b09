//! The AdmissionReview request as the API server sends it, read into only what the decisions
//! need. Pods are read into [`PodView`]: a typed `Pod` would also build managed fields, status,
//! volumes and every other field just to drop them, which dominated the cost of an admission.

use k8s_openapi::api::authentication::v1::UserInfo;
use kube::core::GroupVersionKind;
pub use kube::core::admission::Operation;
use serde::Deserialize;
use std::collections::BTreeMap;

/// `admission.k8s.io/v1` AdmissionReview carrying objects of type `T`.
#[derive(Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Review<T> {
    pub api_version: String,
    pub kind: String,
    #[serde(default = "Option::default")]
    pub request: Option<Request<T>>,
}

/// One admission request. Its `Debug` names the request only: the objects can carry a
/// plaintext value (in `spec.value` or the last-applied annotation).
#[derive(Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request<T> {
    pub uid: String,
    pub kind: GroupVersionKind,
    #[serde(default)]
    pub sub_resource: Option<String>,
    /// Empty on CREATE when the server generates the name.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    pub operation: Operation,
    pub user_info: UserInfo,
    #[serde(default = "Option::default")]
    pub object: Option<T>,
    #[serde(default = "Option::default")]
    pub old_object: Option<T>,
    #[serde(default)]
    pub dry_run: bool,
}

impl<T> std::fmt::Debug for Request<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("uid", &self.uid)
            .field("kind", &self.kind.kind)
            .field("operation", &self.operation)
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("dry_run", &self.dry_run)
            .finish_non_exhaustive()
    }
}

impl<T> std::fmt::Debug for Review<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Review")
            .field("request", &self.request)
            .finish_non_exhaustive()
    }
}

impl<T> Request<T> {
    /// The requester's username, for messages and audit lines.
    pub fn requester(&self) -> &str {
        self.user_info.username.as_deref().unwrap_or("<unknown>")
    }
}

/// What pod admission reads of a pod.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodView {
    #[serde(default)]
    pub metadata: PodMeta,
    #[serde(default)]
    pub spec: Option<PodSpecView>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodMeta {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub generate_name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpecView {
    #[serde(default)]
    pub containers: Vec<ContainerView>,
    #[serde(default)]
    pub init_containers: Option<Vec<ContainerView>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerView {
    pub name: String,
    #[serde(default)]
    pub env: Option<Vec<EnvVarView>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVarView {
    pub name: String,
    #[serde(default)]
    pub value_from: Option<EnvSourceView>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvSourceView {
    #[serde(default)]
    pub secret_key_ref: Option<SecretKeyRefView>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct SecretKeyRefView {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub key: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AgentSecret;

    #[test]
    fn debug_of_a_request_holds_no_object_content() {
        let review: Review<AgentSecret> = serde_json::from_value(serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u-1", "kind": {"group": "agentsecrets.io", "version": "v1alpha1", "kind": "AgentSecret"},
                "operation": "CREATE", "userInfo": {"username": "alice"}, "namespace": "ns", "name": "x",
                "object": {"apiVersion": "agentsecrets.io/v1alpha1", "kind": "AgentSecret",
                    "metadata": {"name": "x", "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "canary-debug-annotation"}},
                    "spec": {"owner": "alice", "envName": "X", "value": "canary-debug-value"}}
            }
        }))
        .unwrap();
        let text = format!("{review:?}");
        assert!(text.contains("u-1"), "{text}");
        assert!(!text.contains("canary-debug"), "{text}");
    }
}
