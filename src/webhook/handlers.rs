//! The review handlers: receive the body within the limits, wait for a slot, parse, decide,
//! and answer. Both kinds go through [`review`], so a request is logged and counted in one
//! place: by its uid, kind, operation, namespace, name and decision (and, for an injection,
//! the audit line of names), never by its content.

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use super::limits::Gates;
use super::response::ReviewResponse;
use super::review::{
    Operation, PodView, Rejected, Request, ReviewError, parse_review, receive_body,
};
use super::server::AppState;
use super::writer::Created;
use super::{agentsecret, pod};
use crate::api::AgentSecret;
use crate::telemetry::{AdmissionLabels, KindLabels, ResultLabels};

/// What the review routes share: the handlers' state and the limits' gates.
pub(super) struct WebhookState {
    pub app: AppState,
    pub gates: Gates,
}

/// A kind of object the webhook reviews.
pub(super) trait Reviewed: serde::de::DeserializeOwned + Send + Sync + 'static {
    const KIND: &'static str;
    const GROUP: &'static str;
    /// The `kind` label of metrics.
    const LABEL: &'static str;

    /// The object's name for logs.
    fn log_name(request: &Request<Self>) -> &str;

    /// Decide the request, performing its side effects.
    fn decide(state: &AppState, request: &Request<Self>) -> impl Future<Output = Verdict> + Send;
}

/// What a review decided.
pub(super) enum Verdict {
    Allow,
    /// Refuse with a message for the requester; `warn` when the operator should look.
    Deny {
        message: String,
        warn: bool,
    },
    /// Admit an AgentSecret with a patch; `action` says what it does with the value.
    Patch {
        patch: Vec<u8>,
        action: &'static str,
    },
    /// Admit a sandbox pod with its injection.
    Inject(Box<pod::Injection>),
}

impl Verdict {
    fn deny(message: String) -> Self {
        Self::Deny {
            message,
            warn: false,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::Allow => "allowed",
            Self::Deny { .. } => "denied",
            Self::Patch { .. } | Self::Inject(_) => "patched",
        }
    }

    fn into_response(self, uid: &str) -> ReviewResponse {
        match self {
            Self::Allow => ReviewResponse::allow(uid),
            Self::Deny { message, .. } => ReviewResponse::deny(uid, message),
            Self::Patch { patch, .. } => ReviewResponse::with_patch(uid, &patch),
            Self::Inject(injection) => ReviewResponse::with_patch(uid, &injection.patch),
        }
    }
}

fn operation_label(operation: &Operation) -> &'static str {
    match operation {
        Operation::Create => "CREATE",
        Operation::Update => "UPDATE",
        Operation::Delete => "DELETE",
        Operation::Connect => "CONNECT",
    }
}

/// The handler of the route reviewing `T`.
pub(super) async fn review<T: Reviewed>(
    State(state): State<Arc<WebhookState>>,
    body: Body,
) -> Response {
    let started = Instant::now();
    let (response, operation, decision) = match decide::<T>(&state, body).await {
        Ok((response, operation, decision)) => (response.into_response(), operation, decision),
        Err(rejected) => {
            let decision = if rejected.error.is_overload() {
                "overloaded"
            } else {
                "invalid"
            };
            tracing::warn!(
                uid = rejected.uid.as_deref().unwrap_or("<unknown>"),
                kind = T::LABEL,
                error = %rejected.error,
                "admission review not decided"
            );
            (rejected.into_response(), "UNKNOWN", decision)
        }
    };
    let metrics = &state.app.metrics;
    let labels = AdmissionLabels {
        kind: T::LABEL,
        operation,
        decision,
    };
    metrics.admission_requests.get_or_create(&labels).inc();
    metrics
        .admission_duration
        .get_or_create(&KindLabels { kind: T::LABEL })
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn decide<T: Reviewed>(
    state: &WebhookState,
    body: Body,
) -> Result<(ReviewResponse, &'static str, &'static str), Rejected> {
    let body = receive_body(&state.gates, body).await?;
    // Only a complete body waits for a slot, so slow uploads never hold one.
    let _slot = state.gates.decide_slot().await.ok_or(Rejected {
        uid: None,
        error: ReviewError::Overloaded,
    })?;
    let request = parse_review::<T>(&body.bytes, T::KIND, T::GROUP)?;
    let operation = operation_label(&request.operation);
    let verdict = T::decide(&state.app, &request).await;
    let decision = verdict.label();
    log_verdict(
        &request,
        T::KIND,
        operation,
        T::log_name(&request),
        &verdict,
    );
    Ok((verdict.into_response(&request.uid), operation, decision))
}

/// Names joined by commas, for a log field, without building the string.
struct Joined<'a>(&'a [String]);

impl fmt::Display for Joined<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, name) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(name)?;
        }
        Ok(())
    }
}

fn log_verdict<T>(
    request: &Request<T>,
    kind: &'static str,
    operation: &'static str,
    name: &str,
    verdict: &Verdict,
) {
    let uid = request.uid.as_str();
    let namespace = request.namespace.as_deref().unwrap_or_default();
    match verdict {
        Verdict::Allow => tracing::debug!(
            uid = %uid,
            kind,
            operation,
            namespace,
            name = %name,
            decision = "allowed",
            "admission"
        ),
        Verdict::Deny { message, warn } if *warn => tracing::warn!(
            uid = %uid,
            kind,
            operation,
            namespace,
            name = %name,
            decision = "denied",
            reason = %message,
            "admission"
        ),
        Verdict::Deny { message, .. } => tracing::info!(
            uid = %uid,
            kind,
            operation,
            namespace,
            name = %name,
            decision = "denied",
            reason = %message,
            "admission"
        ),
        Verdict::Patch { action, .. } => tracing::info!(
            uid = %uid,
            kind,
            operation,
            namespace,
            name = %name,
            decision = "patched",
            action,
            dry_run = request.dry_run,
            "admission"
        ),
        Verdict::Inject(injection) => {
            tracing::info!(
                target: "agentsecrets::audit",
                uid = %uid,
                namespace,
                pod = %name,
                owner = %injection.owner,
                requester = request.requester(),
                injected = %Joined(&injection.injected),
                secretless = %Joined(&injection.secretless),
                skipped = %Joined(&injection.skipped),
                secret = injection.secret.as_ref().map_or("", |s| s.name()),
                secret_created = matches!(injection.secret, Some(pod::PodSecretUse::Create(_))),
                dry_run = request.dry_run,
                "injected secrets into sandbox pod"
            );
        }
    }
}

impl Reviewed for AgentSecret {
    const KIND: &'static str = "AgentSecret";
    const GROUP: &'static str = crate::api::GROUP;
    const LABEL: &'static str = "agentsecret";

    fn log_name(request: &Request<Self>) -> &str {
        &request.name
    }

    fn decide(state: &AppState, request: &Request<Self>) -> impl Future<Output = Verdict> + Send {
        let keyring = state.keyring.current();
        let now = crate::api::now_seconds();
        let decision = agentsecret::mutate(
            request,
            keyring.as_deref(),
            &state.index,
            &state.policy,
            now,
        );
        std::future::ready(match decision {
            agentsecret::Decision::Allow => Verdict::Allow,
            agentsecret::Decision::Deny(message) => Verdict::deny(message),
            agentsecret::Decision::Patch { patch, action } => match serde_json::to_vec(&patch) {
                Ok(patch) => Verdict::Patch {
                    patch,
                    action: action.as_str(),
                },
                Err(_) => Verdict::deny("failed to encode the admission patch".into()),
            },
        })
    }
}

impl Reviewed for PodView {
    const KIND: &'static str = "Pod";
    const GROUP: &'static str = "";
    const LABEL: &'static str = "pod";

    fn log_name(request: &Request<Self>) -> &str {
        request.object.as_ref().map_or("<unnamed>", pod::pod_hint)
    }

    async fn decide(state: &AppState, request: &Request<Self>) -> Verdict {
        let keyring = state.keyring.current();
        let now = crate::api::now_seconds();
        let inputs = pod::Inputs {
            keyring: keyring.as_deref(),
            index: &state.index,
            pod_secrets: &state.pod_secrets,
            policy: &state.policy,
            now,
        };
        let injection = match pod::mutate(request, inputs) {
            pod::Decision::Allow => return Verdict::Allow,
            pod::Decision::Deny(message) => return Verdict::deny(message),
            pod::Decision::Inject(injection) => injection,
        };
        if let Some(pod::PodSecretUse::Create(secret)) =
            injection.secret.as_ref().filter(|_| !request.dry_run)
            && let Err(message) = create_pod_secret(state, secret, now).await
        {
            return Verdict::Deny {
                message,
                warn: true,
            };
        }
        if !request.dry_run {
            let injected = injection.injected.len() as u64;
            state.metrics.injected_secrets.inc_by(injected);
            if let Some(pod::PodSecretUse::Reuse { .. }) = injection.secret {
                count_pod_secret(state, "reused");
            }
        }
        Verdict::Inject(injection)
    }
}

/// Count a pod-scoped Secret a sandbox was given, by how (`result`).
fn count_pod_secret(state: &AppState, result: &'static str) {
    let labels = ResultLabels { result };
    state
        .metrics
        .pod_secrets_created
        .get_or_create(&labels)
        .inc();
}

/// Create the pod-scoped Secret, unless the namespace already has too many in their reuse
/// window; the error is the message for the pod's creator.
async fn create_pod_secret(
    state: &AppState,
    secret: &pod::PodSecret,
    now: i64,
) -> Result<(), String> {
    let count = |result| count_pod_secret(state, result);
    // Forged reviews must not make the operator fill a namespace with Secrets: past the
    // bound, only sandboxes given an existing Secret start until the window turns.
    let reusable = state.pod_secrets.reusable(&secret.namespace, now);
    let limit = state.policy.max_pod_secrets_per_window;
    if reusable >= limit {
        count("limited");
        return Err(format!(
            "namespace {:?} already has {reusable} pod-scoped Secrets in their reuse window (at most {limit}); retry after {}",
            secret.namespace,
            crate::api::reuse_until_text(secret.reuse_until)
        ));
    }
    match state.writer.create(secret.to_secret()).await {
        Ok(created) => {
            count(match created {
                Created::New => "created",
                Created::Existing => "reused",
            });
            state
                .pod_secrets
                .created(&secret.namespace, &secret.name, secret.reuse_until);
            Ok(())
        }
        Err(error) => {
            count("failed");
            Err(format!(
                "failed to create the pod-scoped Secret {:?} holding the sandbox's secrets: {error}",
                secret.name
            ))
        }
    }
}
