//! The AdmissionReview request as the API server sends it, read into only what the decisions
//! need. Pods are read into [`PodView`]: a typed `Pod` would also build managed fields, status,
//! volumes and every other field just to drop them, which dominated the cost of an admission.

use axum::body::Body;
use axum::http::StatusCode;
use bytes::{Bytes, BytesMut};
use futures::StreamExt as _;
use k8s_openapi::api::authentication::v1::UserInfo;
use kube::core::GroupVersionKind;
pub use kube::core::admission::Operation;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::time::Duration;

use super::limits::{BodyCharge, Gates, MAX_BODY_BYTES};

/// The only AdmissionReview version the API server sends us (the webhook configurations ask
/// for `admissionReviewVersions: [v1]`).
pub const ADMISSION_API_VERSION: &str = "admission.k8s.io/v1";
pub const ADMISSION_REVIEW_KIND: &str = "AdmissionReview";

/// Why a review was not decided. The messages are shown to the requester through the API
/// server, so they quote no more of the request than its kind, cut short.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    #[error("failed to read the request body")]
    BodyUnreadable,
    #[error("AdmissionReview body exceeds the {} MiB limit", MAX_BODY_BYTES / (1024 * 1024))]
    TooLarge,
    #[error("failed to receive the request body within {0:?}")]
    BodyTimeout(Duration),
    #[error("failed to accept the request body: the webhook holds too many bodies; retry shortly")]
    BodiesOverBudget,
    #[error("failed to start the review: too many reviews are waiting; retry shortly")]
    Overloaded,
    #[error("request body is not valid JSON (line {line}, column {column})")]
    NotJson { line: usize, column: usize },
    #[error(
        "request body is not an AdmissionReview for kind {kind} (unexpected data at line {line}, column {column})"
    )]
    NotAReview {
        kind: &'static str,
        line: usize,
        column: usize,
    },
    #[error("expected an admission.k8s.io/v1 AdmissionReview, got {api_version}/{kind}")]
    NotV1 { api_version: String, kind: String },
    #[error("AdmissionReview carries no request")]
    NoRequest,
    #[error("this endpoint admits {expected} objects, not {group}/{kind}")]
    WrongKind {
        expected: &'static str,
        group: String,
        kind: String,
    },
}

impl ReviewError {
    /// The HTTP status of the answer when the review's uid is unknown.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::BodiesOverBudget | Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// Whether the server, not the review, is at fault: the answer then says so by its HTTP
    /// status, so that the API server reports a webhook failure rather than a denial.
    pub fn is_overload(&self) -> bool {
        matches!(self, Self::BodiesOverBudget | Self::Overloaded)
    }
}

/// A review that was not decided, with its request uid when that could be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub uid: Option<String>,
    pub error: ReviewError,
}

impl Rejected {
    fn new(uid: Option<String>, error: ReviewError) -> Self {
        Self { uid, error }
    }
}

/// A request body, with the bytes it holds charged against the server's body budget until it
/// is dropped.
#[derive(Debug)]
pub struct ReceivedBody<'a> {
    pub bytes: Bytes,
    _charge: BodyCharge<'a>,
}

/// Receive a whole request body within the limits of `gates`: at most [`MAX_BODY_BYTES`],
/// within the body read timeout, and while the bytes of every body held fit the budget.
pub(crate) async fn receive_body(gates: &Gates, body: Body) -> Result<ReceivedBody<'_>, Rejected> {
    let mut charge = BodyCharge::new(&gates.body_bytes);
    let mut received = Received::default();
    let read = read_chunks(body, &mut charge, &mut received);
    match tokio::time::timeout(gates.body_read_timeout, read).await {
        Ok(Ok(())) => Ok(ReceivedBody {
            bytes: received.into_bytes(),
            _charge: charge,
        }),
        Ok(Err(error)) => Err(Rejected::new(received.sniff_uid(), error)),
        Err(_) => Err(Rejected::new(
            received.sniff_uid(),
            ReviewError::BodyTimeout(gates.body_read_timeout),
        )),
    }
}

async fn read_chunks(
    body: Body,
    charge: &mut BodyCharge<'_>,
    received: &mut Received,
) -> Result<(), ReviewError> {
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| ReviewError::BodyUnreadable)?;
        if received.len() + chunk.len() > MAX_BODY_BYTES {
            received.keep_prefix_of(&chunk);
            return Err(ReviewError::TooLarge);
        }
        if !charge.add(chunk.len()) {
            return Err(ReviewError::BodiesOverBudget);
        }
        received.push(chunk);
    }
    Ok(())
}

/// The chunks of a body so far. A body that arrives in one chunk (a genuine review usually
/// does) is kept as that chunk, without a copy.
#[derive(Debug, Default)]
struct Received {
    first: Bytes,
    rest: Option<BytesMut>,
}

impl Received {
    fn len(&self) -> usize {
        self.rest.as_ref().map_or(self.first.len(), BytesMut::len)
    }

    fn push(&mut self, chunk: Bytes) {
        match &mut self.rest {
            Some(buffer) => buffer.extend_from_slice(&chunk),
            None if self.first.is_empty() => self.first = chunk,
            None => {
                let mut buffer = BytesMut::with_capacity(self.first.len() + chunk.len());
                buffer.extend_from_slice(&self.first);
                buffer.extend_from_slice(&chunk);
                self.first = Bytes::new();
                self.rest = Some(buffer);
            }
        }
    }

    /// Keep the start of an oversized first chunk, for its uid.
    fn keep_prefix_of(&mut self, chunk: &Bytes) {
        if self.len() == 0 {
            self.first = chunk.slice(..chunk.len().min(UID_SNIFF_BYTES));
        }
    }

    fn as_slice(&self) -> &[u8] {
        self.rest.as_deref().unwrap_or(&self.first)
    }

    fn into_bytes(self) -> Bytes {
        self.rest.map_or(self.first, BytesMut::freeze)
    }

    fn sniff_uid(&self) -> Option<String> {
        sniff_uid(self.as_slice())
    }
}

/// How much of a body is searched for the request uid.
const UID_SNIFF_BYTES: usize = 64 * 1024;

/// The AdmissionReview's request uid, from the start of a body too large or malformed to
/// parse. The API server writes `request.uid` first, so a prefix suffices.
pub fn sniff_uid(prefix: &[u8]) -> Option<String> {
    let prefix = &prefix[..prefix.len().min(UID_SNIFF_BYTES)];
    let text = String::from_utf8_lossy(prefix);
    let start = text.find("\"uid\":\"")? + "\"uid\":\"".len();
    let uid: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(64)
        .collect();
    (!uid.is_empty()).then_some(uid)
}

/// `text` from a request, cut short for a message.
fn cut(text: &str) -> String {
    const MAX_CHARS: usize = 64;
    text.chars().take(MAX_CHARS).collect()
}

/// Parse a review of objects of `kind` in `group`, reporting only the kind and position of a
/// problem: serde's own message can quote the offending input, which may be a secret value.
pub fn parse_review<T>(body: &[u8], kind: &'static str, group: &str) -> Result<Request<T>, Rejected>
where
    T: DeserializeOwned,
{
    let review: Review<T> = serde_json::from_slice(body).map_err(|e| {
        // A review of another kind fails to deserialize as `T`: name the kinds rather than
        // the position of the first field that differs.
        wrong_kind(body, kind, group).unwrap_or_else(|| {
            let (line, column) = (e.line(), e.column());
            let error = match e.classify() {
                serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                    ReviewError::NotJson { line, column }
                }
                _ => ReviewError::NotAReview { kind, line, column },
            };
            Rejected::new(sniff_uid(body), error)
        })
    })?;
    if review.api_version != ADMISSION_API_VERSION || review.kind != ADMISSION_REVIEW_KIND {
        let error = ReviewError::NotV1 {
            api_version: cut(&review.api_version),
            kind: cut(&review.kind),
        };
        return Err(Rejected::new(sniff_uid(body), error));
    }
    let request = review
        .request
        .ok_or_else(|| Rejected::new(sniff_uid(body), ReviewError::NoRequest))?;
    if request.kind.kind != kind || request.kind.group != group {
        let error = wrong_kind_error(kind, &request.kind);
        return Err(Rejected::new(Some(request.uid), error));
    }
    Ok(request)
}

fn wrong_kind_error(expected: &'static str, found: &GroupVersionKind) -> ReviewError {
    ReviewError::WrongKind {
        expected,
        group: cut(&found.group),
        kind: cut(&found.kind),
    }
}

/// The refusal of a well-formed review of another kind than `kind`, if `body` is one.
fn wrong_kind(body: &[u8], kind: &'static str, group: &str) -> Option<Rejected> {
    #[derive(Deserialize)]
    struct Review {
        request: Request,
    }
    #[derive(Deserialize)]
    struct Request {
        uid: String,
        kind: GroupVersionKind,
    }
    let request = serde_json::from_slice::<Review>(body).ok()?.request;
    (request.kind.kind != kind || request.kind.group != group).then(|| {
        let error = wrong_kind_error(kind, &request.kind);
        Rejected::new(Some(request.uid), error)
    })
}

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
    /// Read to recognise the secretless proxy sidecar of an earlier invocation.
    #[serde(default)]
    pub image: Option<String>,
    /// Only whether it is set matters: the proxy sidecar runs the image's own entrypoint.
    #[serde(default)]
    pub command: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    pub args: Option<Vec<String>>,
    #[serde(default)]
    pub restart_policy: Option<String>,
    #[serde(default)]
    pub volume_mounts: Option<Vec<VolumeMountView>>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMountView {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub mount_path: String,
    #[serde(default)]
    pub read_only: Option<bool>,
    #[serde(default)]
    pub sub_path: Option<String>,
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
    /// Only whether it is set matters (the proxy's CA volume is an emptyDir).
    #[serde(default)]
    pub empty_dir: Option<serde::de::IgnoredAny>,
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
#[serde(rename_all = "camelCase")]
pub struct ProjectionView {
    #[serde(default)]
    pub secret: Option<NamedRef>,
    #[serde(default)]
    pub service_account_token: Option<ServiceAccountTokenView>,
}

/// A projected service-account token: its audience decides who accepts it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountTokenView {
    #[serde(default)]
    pub audience: Option<String>,
    #[serde(default)]
    pub path: String,
}

#[derive(Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVarView {
    pub name: String,
    /// Read for the entries secretless mode writes (placeholders, proxy settings), which are
    /// never values. Anything but a string is not one of those and is skipped unread, so a
    /// malformed value never fails the review (whose error could quote it).
    #[serde(default, deserialize_with = "string_or_skip")]
    pub value: Option<String>,
    #[serde(default)]
    pub value_from: Option<EnvSourceView>,
}

/// A string, or `None` for any other JSON (consumed without being kept).
fn string_or_skip<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Lenient {
        Text(String),
        Other(serde::de::IgnoredAny),
    }
    Ok(match Lenient::deserialize(d)? {
        Lenient::Text(text) => Some(text),
        Lenient::Other(_) => None,
    })
}

/// A pod's own env values may be credentials: `Debug` names the entry only.
impl std::fmt::Debug for EnvVarView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvVarView")
            .field("name", &self.name)
            .field("value", &self.value.as_ref().map(|_| "<redacted>"))
            .field("value_from", &self.value_from)
            .finish()
    }
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
    fn sniffs_the_request_uid_from_a_prefix() {
        let body = br#"{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{"uid":"3eb22e8d-d92d-43a8-8188-5fbacd5c41bb","kind""#;
        assert_eq!(
            sniff_uid(body).as_deref(),
            Some("3eb22e8d-d92d-43a8-8188-5fbacd5c41bb")
        );
        assert_eq!(sniff_uid(b"garbage"), None);
        assert_eq!(sniff_uid(br#"{"uid":"<script>"}"#), None);
    }

    #[test]
    fn a_body_in_several_chunks_is_joined_in_order() {
        let mut received = Received::default();
        for chunk in ["ab", "cd", "e"] {
            received.push(Bytes::from(chunk));
        }
        assert_eq!(received.len(), 5);
        assert_eq!(received.into_bytes(), Bytes::from("abcde"));
        let mut single = Received::default();
        single.push(Bytes::from("whole"));
        assert_eq!(single.into_bytes(), Bytes::from("whole"));
    }

    #[test]
    fn kinds_quoted_from_a_request_are_cut_short() {
        let body = serde_json::json!({
            "apiVersion": "x".repeat(10_000), "kind": "AdmissionReview",
        });
        let rejected = parse_review::<PodView>(body.to_string().as_bytes(), "Pod", "").unwrap_err();
        assert!(rejected.error.to_string().len() < 200, "{}", rejected.error);
    }

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
