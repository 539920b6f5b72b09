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
    #[serde(default)]
    pub ephemeral_containers: Option<Vec<ContainerView>>,
    #[serde(default)]
    pub volumes: Option<Vec<VolumeView>>,
}

impl PodSpecView {
    /// Every container of the pod: regular, init and ephemeral.
    pub fn all_containers(&self) -> impl Iterator<Item = &ContainerView> {
        self.containers
            .iter()
            .chain(self.init_containers.iter().flatten())
            .chain(self.ephemeral_containers.iter().flatten())
    }

    /// Every Secret the pod refers to, with where (`container/ENV`, `container/envFrom`,
    /// `volume/NAME`): env entries, envFrom, secret volumes and projected volume sources.
    pub fn secret_references(&self) -> Vec<(String, &str)> {
        let mut found = Vec::new();
        for container in self.all_containers() {
            for entry in container.env.iter().flatten() {
                if let Some(reference) = entry
                    .value_from
                    .as_ref()
                    .and_then(|v| v.secret_key_ref.as_ref())
                {
                    found.push((
                        format!("{}/{}", container.name, entry.name),
                        reference.name.as_str(),
                    ));
                }
            }
            for source in container.env_from.iter().flatten() {
                if let Some(reference) = &source.secret_ref {
                    found.push((
                        format!("{}/envFrom", container.name),
                        reference.name.as_str(),
                    ));
                }
            }
        }
        for volume in self.volumes.iter().flatten() {
            if let Some(secret) = &volume.secret {
                found.push((
                    format!("volume/{}", volume.name),
                    secret.secret_name.as_str(),
                ));
            }
            let projected = volume
                .projected
                .iter()
                .flat_map(|p| p.sources.iter().flatten());
            for source in projected {
                if let Some(secret) = &source.secret {
                    found.push((format!("volume/{}", volume.name), secret.name.as_str()));
                }
            }
        }
        found
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerView {
    pub name: String,
    #[serde(default)]
    pub env: Option<Vec<EnvVarView>>,
    #[serde(default)]
    pub env_from: Option<Vec<EnvFromView>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvFromView {
    #[serde(default)]
    pub secret_ref: Option<NamedRef>,
}

/// `{name: ...}` of a Secret reference (envFrom, projected source).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NamedRef {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeView {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub secret: Option<SecretVolumeView>,
    #[serde(default)]
    pub projected: Option<ProjectedView>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretVolumeView {
    #[serde(default)]
    pub secret_name: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ProjectedView {
    #[serde(default)]
    pub sources: Option<Vec<ProjectionView>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ProjectionView {
    #[serde(default)]
    pub secret: Option<NamedRef>,
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
    fn every_kind_of_secret_reference_is_found() {
        let spec: PodSpecView = serde_json::from_value(serde_json::json!({
            "containers": [{"name": "c", "env": [
                {"name": "A", "valueFrom": {"secretKeyRef": {"name": "s1", "key": "A"}}},
                {"name": "B", "value": "plain"}],
                "envFrom": [{"secretRef": {"name": "s2"}}, {"configMapRef": {"name": "cm"}}]}],
            "initContainers": [{"name": "i", "envFrom": [{"secretRef": {"name": "s3"}}]}],
            "ephemeralContainers": [{"name": "e", "env": [
                {"name": "C", "valueFrom": {"secretKeyRef": {"name": "s4", "key": "C"}}}]}],
            "volumes": [
                {"name": "v1", "secret": {"secretName": "s5"}},
                {"name": "v2", "projected": {"sources": [{"secret": {"name": "s6"}}, {"configMap": {"name": "x"}}]}},
                {"name": "v3", "emptyDir": {}}]
        }))
        .unwrap();
        let found: Vec<(String, &str)> = spec.secret_references();
        let names: Vec<&str> = found.iter().map(|(_, n)| *n).collect();
        assert_eq!(names, ["s1", "s2", "s3", "s4", "s5", "s6"]);
        assert_eq!(found[0].0, "c/A");
        assert_eq!(found[1].0, "c/envFrom");
        assert_eq!(found[5].0, "volume/v2");
    }

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
