//! HTTPS admission server and the plain-HTTP admin server.
//!
//! Handlers only convert between HTTP and AdmissionReviews, call the pure decisions, and
//! create the pod-scoped Secret; everything they log is the request's uid, kind, operation,
//! namespace, name and decision (and, for injections, the audit line of names).

use super::review::{Operation, PodView, Request, Review};
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum_server::tls_rustls::RustlsConfig;
use bytes::{Bytes, BytesMut};
use futures::StreamExt as _;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use serde::de::DeserializeOwned;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::AgentSecret;
use crate::cache::{PodSecretIndex, SecretIndex};
use crate::crypto::KeyringHandle;
use crate::telemetry::{AdmissionLabels, KindLabels, Metrics, ResultLabels};

use super::{Policy, agentsecret, pod};

/// Largest AdmissionReview body accepted. The API server accepts request bodies up to 3 MiB,
/// and an UPDATE review carries that object plus the stored one (at most 1.5 MiB in etcd),
/// JSON-escaped inside the review: 8 MiB admits every genuine review with margin while
/// bounding the memory one request can take.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// How long graceful shutdown waits for in-flight reviews. The API server's webhook timeout
/// is at most 30 s, and the chart sets 10 s.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

/// Why a pod-scoped Secret could not be created. The message is shown to the pod's creator,
/// so it never holds values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The API server refused (RBAC, quota, validation); its message names the object and
    /// the reason, never its data.
    #[error("the API server refused: {0}")]
    Refused(String),
    /// A Secret of that name exists but was not made for this admission.
    #[error("a Secret of that name exists and was not made for this admission")]
    NameTaken,
    #[error("request to the API server failed: {0}")]
    Unreachable(String),
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

/// Creates nothing: the benchmark mode of `run`, where no cluster exists.
#[derive(Debug, Clone, Copy)]
pub struct DiscardingWriter;

impl SecretWriter for DiscardingWriter {
    fn create(&self, secret: Secret) -> BoxFuture<'_, Result<Created, WriteError>> {
        drop(secret);
        Box::pin(std::future::ready(Ok(Created::New)))
    }
}

/// Creates Secrets through the Kubernetes API.
#[derive(Clone)]
pub struct KubeSecretWriter {
    pub client: kube::Client,
}

impl SecretWriter for KubeSecretWriter {
    fn create(&self, secret: Secret) -> BoxFuture<'_, Result<Created, WriteError>> {
        Box::pin(async move {
            let namespace = secret.metadata.namespace.clone().unwrap_or_default();
            let name = secret.metadata.name.clone().unwrap_or_default();
            let uid = secret
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(crate::api::REQUEST_UID_ANNOTATION))
                .cloned();
            let api: kube::Api<Secret> = kube::Api::namespaced(self.client.clone(), &namespace);
            let params = kube::api::PostParams {
                dry_run: false,
                field_manager: Some(crate::api::FIELD_MANAGER.to_owned()),
            };
            match api.create(&params, &secret).await {
                Ok(_) => Ok(Created::New),
                // A reinvoked admission names the same Secret: reuse it if it was made for
                // this request (only the operator may create Secrets of that name).
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    let existing = api
                        .get_metadata_opt(&name)
                        .await
                        .map_err(|e| WriteError::Unreachable(e.to_string()))?;
                    let made_for = existing.as_ref().and_then(|m| {
                        m.metadata
                            .annotations
                            .as_ref()?
                            .get(crate::api::REQUEST_UID_ANNOTATION)
                            .cloned()
                    });
                    if made_for.is_some() && made_for == uid {
                        Ok(Created::Existing)
                    } else {
                        Err(WriteError::NameTaken)
                    }
                }
                Err(kube::Error::Api(status)) => Err(WriteError::Refused(status.message)),
                Err(e) => Err(WriteError::Unreachable(e.to_string())),
            }
        })
    }
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub keyring: KeyringHandle,
    pub index: Arc<SecretIndex>,
    pub policy: Arc<Policy>,
    pub writer: Arc<dyn SecretWriter>,
    pub metrics: Arc<Metrics>,
    /// Pod-scoped Secrets that exist, to bound how many wait for their pod.
    pub pod_secrets: Arc<PodSecretIndex>,
}

impl AppState {
    /// Why the server is not ready, if it is not.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if self.keyring.current().is_none() {
            Some("no keyring loaded")
        } else {
            self.index.unready_reason()
        }
    }
}

/// Routes of the TLS webhook port.
pub fn webhook_router(state: AppState) -> Router {
    Router::new()
        .route("/mutate/agentsecrets", post(agentsecrets_handler))
        .route("/mutate/pods", post(pods_handler))
        .with_state(state)
}

/// Routes of the admin port: probes and metrics.
pub fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.not_ready_reason() {
        None => "ok".into_response(),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
    }
}

async fn metrics_handler(State(state): State<AppState>) -> Response {
    let keys = state
        .keyring
        .current()
        .map_or(0, |k| k.key_ids().count() as i64);
    state.metrics.keyring_keys.set(keys);
    // Rotation progress: AgentSecrets per key id, as the cache sees them now.
    state.metrics.agentsecrets_by_key.clear();
    for (key_id, count) in state.index.count_by_key_id() {
        state
            .metrics
            .agentsecrets_by_key
            .get_or_create(&crate::telemetry::KeyLabels { key_id })
            .set(count as i64);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// The answer to an AdmissionReview, serialised the way the API server's Go types expect
/// (`patch` as base64, a `metav1.Status` on denial).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReviewResponse {
    uid: String,
    allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<ResponseStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patch_type: Option<&'static str>,
}

#[derive(Debug, Clone, serde::Serialize)]
struct ResponseStatus {
    status: &'static str,
    code: u16,
    reason: &'static str,
    message: String,
}

impl ReviewResponse {
    fn allow(uid: &str) -> Self {
        Self {
            uid: uid.to_owned(),
            allowed: true,
            status: None,
            patch: None,
            patch_type: None,
        }
    }

    fn refuse(uid: &str, code: u16, reason: &'static str, message: String) -> Self {
        Self {
            uid: uid.to_owned(),
            allowed: false,
            status: Some(ResponseStatus {
                status: "Failure",
                code,
                reason,
                message,
            }),
            patch: None,
            patch_type: None,
        }
    }

    /// A policy refusal, shown to the requester.
    fn deny(uid: &str, message: String) -> Self {
        Self::refuse(uid, 403, "Forbidden", message)
    }

    /// Allow with `patch`, a serialised JSON patch.
    fn with_patch(uid: &str, patch: &[u8]) -> Self {
        use base64::Engine as _;
        Self {
            patch: Some(base64::engine::general_purpose::STANDARD.encode(patch)),
            patch_type: Some("JSONPatch"),
            ..Self::allow(uid)
        }
    }

    fn with_patch_ops(uid: &str, patch: &json_patch::Patch) -> Self {
        match serde_json::to_vec(patch) {
            Ok(bytes) => Self::with_patch(uid, &bytes),
            Err(_) => Self::deny(uid, "failed to encode the admission patch".into()),
        }
    }

    fn into_http(self, status: StatusCode) -> Response {
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Review {
            api_version: &'static str,
            kind: &'static str,
            response: ReviewResponse,
        }
        let review = Review {
            api_version: "admission.k8s.io/v1",
            kind: "AdmissionReview",
            response: self,
        };
        (status, axum::Json(review)).into_response()
    }
}

/// A review we could not read.
struct Invalid {
    uid: Option<String>,
    status: StatusCode,
    message: String,
}

impl Invalid {
    fn into_response(self) -> Response {
        match self.uid {
            // With the uid the API server accepts the answer and shows the message.
            Some(uid) => ReviewResponse::refuse(&uid, 400, "BadRequest", self.message)
                .into_http(StatusCode::OK),
            None => ReviewResponse::refuse("", self.status.as_u16(), "BadRequest", self.message)
                .into_http(self.status),
        }
    }
}

/// The AdmissionReview's request uid, from the start of a body too large or malformed to
/// parse. The API server writes `request.uid` first, so a prefix suffices.
fn sniff_uid(prefix: &[u8]) -> Option<String> {
    let prefix = &prefix[..prefix.len().min(64 * 1024)];
    let text = String::from_utf8_lossy(prefix);
    let start = text.find("\"uid\":\"")? + "\"uid\":\"".len();
    let uid: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(64)
        .collect();
    (!uid.is_empty()).then_some(uid)
}

async fn read_body(body: Body) -> Result<Bytes, Invalid> {
    let mut stream = body.into_data_stream();
    let mut buffer = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| Invalid {
            uid: sniff_uid(&buffer),
            status: StatusCode::BAD_REQUEST,
            message: "failed to read the request body".into(),
        })?;
        if buffer.len() + chunk.len() > MAX_BODY_BYTES {
            if buffer.is_empty() {
                buffer.extend_from_slice(&chunk[..chunk.len().min(64 * 1024)]);
            }
            return Err(Invalid {
                uid: sniff_uid(&buffer),
                status: StatusCode::PAYLOAD_TOO_LARGE,
                message: format!(
                    "AdmissionReview body exceeds the {} MiB limit",
                    MAX_BODY_BYTES / (1024 * 1024)
                ),
            });
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(buffer.freeze())
}

/// Parse a review, reporting only the kind and position of a problem: serde's own message
/// can quote the offending input, which may be a secret value.
fn parse_review<T>(body: &[u8], kind: &str, group: &str) -> Result<Request<T>, Invalid>
where
    T: DeserializeOwned,
{
    let invalid = |message: String| Invalid {
        uid: sniff_uid(body),
        status: StatusCode::BAD_REQUEST,
        message,
    };
    let review: Review<T> = serde_json::from_slice(body).map_err(|e| {
        // A review of another kind fails to deserialize as `T`: name the kinds rather than
        // the position of the first field that differs.
        wrong_kind(body, kind, group).unwrap_or_else(|| invalid(match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                format!("request body is not valid JSON (line {}, column {})", e.line(), e.column())
            }
            _ => format!(
                "request body is not an AdmissionReview for kind {kind} (unexpected data at line {}, column {})",
                e.line(),
                e.column()
            ),
        }))
    })?;
    if review.api_version != "admission.k8s.io/v1" || review.kind != "AdmissionReview" {
        return Err(invalid(format!(
            "expected an admission.k8s.io/v1 AdmissionReview, got {}/{}",
            review.api_version, review.kind
        )));
    }
    let request = review
        .request
        .ok_or_else(|| invalid("AdmissionReview carries no request".into()))?;
    if request.kind.kind != kind || request.kind.group != group {
        let mut invalid = invalid(format!(
            "this endpoint admits {kind} objects, not {}/{}",
            request.kind.group, request.kind.kind
        ));
        invalid.uid = Some(request.uid.clone());
        return Err(invalid);
    }
    Ok(request)
}

/// The refusal of a well-formed review of another kind than `kind`, if `body` is one.
fn wrong_kind(body: &[u8], kind: &str, group: &str) -> Option<Invalid> {
    #[derive(serde::Deserialize)]
    struct Review {
        request: Request,
    }
    #[derive(serde::Deserialize)]
    struct Request {
        uid: String,
        kind: kube::core::GroupVersionKind,
    }
    let request = serde_json::from_slice::<Review>(body).ok()?.request;
    (request.kind.kind != kind || request.kind.group != group).then(|| Invalid {
        uid: Some(request.uid),
        status: StatusCode::BAD_REQUEST,
        message: format!(
            "this endpoint admits {kind} objects, not {}/{}",
            request.kind.group, request.kind.kind
        ),
    })
}

fn operation_label(operation: &Operation) -> &'static str {
    match operation {
        Operation::Create => "CREATE",
        Operation::Update => "UPDATE",
        Operation::Delete => "DELETE",
        Operation::Connect => "CONNECT",
    }
}

struct Answer {
    response: ReviewResponse,
    decision: &'static str,
}

async fn answer<T, F, Fut>(
    state: &AppState,
    body: Body,
    kind: &'static str,
    group: &str,
    decide: F,
) -> Response
where
    T: DeserializeOwned,
    F: FnOnce(Request<T>) -> Fut,
    Fut: Future<Output = Answer>,
{
    let started = Instant::now();
    let label = if kind == "Pod" { "pod" } else { "agentsecret" };
    let parsed = match read_body(body).await {
        Ok(body) => parse_review::<T>(&body, kind, group),
        Err(invalid) => Err(invalid),
    };
    let (response, operation, decision) = match parsed {
        Ok(request) => {
            let operation = operation_label(&request.operation);
            let answer = decide(request).await;
            (
                answer.response.into_http(StatusCode::OK),
                operation,
                answer.decision,
            )
        }
        Err(invalid) => {
            tracing::warn!(
                uid = invalid.uid.as_deref().unwrap_or("<unknown>"),
                kind = label,
                error = %invalid.message,
                "invalid admission review"
            );
            (invalid.into_response(), "UNKNOWN", "invalid")
        }
    };
    state
        .metrics
        .admission_requests
        .get_or_create(&AdmissionLabels {
            kind: label,
            operation,
            decision,
        })
        .inc();
    state
        .metrics
        .admission_duration
        .get_or_create(&KindLabels { kind: label })
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn agentsecrets_handler(State(state): State<AppState>, body: Body) -> Response {
    answer::<AgentSecret, _, _>(&state, body, "AgentSecret", crate::api::GROUP, |request| {
        let keyring = state.keyring.current();
        let decision = agentsecret::mutate(&request, keyring.as_deref(), &state.index, &state.policy, crate::api::now_seconds());
        let uid = request.uid.as_str();
        let namespace = request.namespace.as_deref().unwrap_or_default();
        let operation = operation_label(&request.operation);
        let answer = match decision {
            agentsecret::Decision::Allow => {
                tracing::debug!(uid = %request.uid, kind = "AgentSecret", operation, namespace, name = %request.name, decision = "allowed", "admission");
                Answer { response: ReviewResponse::allow(uid), decision: "allowed" }
            }
            agentsecret::Decision::Deny(message) => {
                tracing::info!(uid = %request.uid, kind = "AgentSecret", operation, namespace, name = %request.name, decision = "denied", reason = %message, "admission");
                Answer { response: ReviewResponse::deny(uid, message), decision: "denied" }
            }
            agentsecret::Decision::Patch { patch, action } => {
                tracing::info!(uid = %request.uid, kind = "AgentSecret", operation, namespace, name = %request.name, decision = "patched", action = action.as_str(), dry_run = request.dry_run, "admission");
                Answer { response: ReviewResponse::with_patch_ops(uid, &patch), decision: "patched" }
            }
        };
        std::future::ready(answer)
    })
    .await
}

async fn pods_handler(State(state): State<AppState>, body: Body) -> Response {
    let st = state.clone();
    answer::<PodView, _, _>(&state, body, "Pod", "", |request| async move {
        let state = st;
        let keyring = state.keyring.current();
        let hint = request.object.as_ref().map(pod::pod_hint).unwrap_or("<unnamed>").to_owned();
        let decision = pod::mutate(&request, keyring.as_deref(), &state.index, &state.policy);
        let uid = request.uid.as_str();
        let namespace = request.namespace.as_deref().unwrap_or_default();
        let operation = operation_label(&request.operation);
        match decision {
            pod::Decision::Allow => {
                tracing::debug!(uid = %request.uid, kind = "Pod", operation, namespace, name = %hint, decision = "allowed", "admission");
                Answer { response: ReviewResponse::allow(uid), decision: "allowed" }
            }
            pod::Decision::Deny(message) => {
                tracing::info!(uid = %request.uid, kind = "Pod", operation, namespace, name = %hint, decision = "denied", reason = %message, "admission");
                Answer { response: ReviewResponse::deny(uid, message), decision: "denied" }
            }
            pod::Decision::Inject(injection) => {
                if let Some(secret) = injection.secret.as_ref().filter(|_| !request.dry_run) {
                    // Forged reviews must not make the operator fill a namespace with Secrets:
                    // past the bound, sandboxes wait until their pods adopt what exists.
                    let waiting = state.pod_secrets.unadopted(&secret.namespace);
                    if waiting >= state.policy.max_unadopted_pod_secrets && !state.pod_secrets.contains(&secret.namespace, &secret.name) {
                        state.metrics.pod_secrets_created.get_or_create(&ResultLabels { result: "limited" }).inc();
                        let message = format!("namespace {namespace:?} already has {waiting} pod-scoped Secrets whose pods have not appeared (at most {} may wait); retry shortly", state.policy.max_unadopted_pod_secrets);
                        tracing::warn!(uid = %request.uid, kind = "Pod", operation, namespace, name = %hint, decision = "denied", reason = %message, "admission");
                        return Answer { response: ReviewResponse::deny(uid, message), decision: "denied" };
                    }
                    let created = state.writer.create(secret.to_secret()).await;
                    let result = match created {
                        Ok(Created::New) => "created",
                        Ok(Created::Existing) => "reused",
                        Err(_) => "failed",
                    };
                    state.metrics.pod_secrets_created.get_or_create(&ResultLabels { result }).inc();
                    if created.is_ok() {
                        state.pod_secrets.created(&secret.namespace, &secret.name);
                    }
                    if let Err(error) = created {
                        let message = format!("failed to create the pod-scoped Secret {:?} holding the sandbox's secrets: {error}", secret.name);
                        tracing::warn!(uid = %request.uid, kind = "Pod", operation, namespace, name = %hint, decision = "denied", reason = %message, "admission");
                        return Answer { response: ReviewResponse::deny(uid, message), decision: "denied" };
                    }
                }
                if !request.dry_run {
                    state.metrics.injected_secrets.inc_by(injection.injected.len() as u64);
                }
                tracing::info!(
                    target: "agentsecrets::audit",
                    uid = %request.uid,
                    namespace,
                    pod = %hint,
                    owner = %injection.owner,
                    requester = request.requester(),
                    injected = %injection.injected.join(","),
                    skipped = %injection.skipped.join(","),
                    secret = injection.secret.as_ref().map(|s| s.name.as_str()).unwrap_or(""),
                    dry_run = request.dry_run,
                    "injected secrets into sandbox pod"
                );
                Answer { response: ReviewResponse::with_patch(uid, &injection.patch), decision: "patched" }
            }
        }
    })
    .await
}

/// Serve the webhook over TLS on `listener` until `shutdown` resolves, then finish in-flight
/// reviews (up to [`SHUTDOWN_GRACE`]).
pub async fn serve_webhook(
    listener: std::net::TcpListener,
    tls: RustlsConfig,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopper.graceful_shutdown(Some(SHUTDOWN_GRACE));
    });
    listener.set_nonblocking(true)?;
    axum_server::from_tcp_rustls(listener, tls)?
        .handle(handle)
        .serve(router.into_make_service())
        .await
}

/// Serve the admin routes over plain HTTP until `shutdown` resolves.
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Bind a listener for the webhook.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr)
}

/// Reload the TLS certificate and key when either file changes (cert-manager rotates them in
/// place); open connections keep their session, new ones get the new certificate.
pub async fn watch_tls_files(
    tls: RustlsConfig,
    cert: PathBuf,
    key: PathBuf,
    interval: Duration,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut last = (std::fs::read(&cert).ok(), std::fs::read(&key).ok());
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(interval) => {}
        }
        let current = (std::fs::read(&cert).ok(), std::fs::read(&key).ok());
        if current == last || current.0.is_none() || current.1.is_none() {
            continue;
        }
        match tls.reload_from_pem_file(&cert, &key).await {
            Ok(()) => {
                tracing::info!(cert = %cert.display(), "TLS certificate reloaded");
                last = current;
            }
            // A half-written pair fails to parse; the next tick retries.
            Err(error) => tracing::warn!(%error, "TLS certificate not reloaded"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
