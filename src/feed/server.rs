//! The feed's HTTPS endpoint: authenticate the token (TokenReview), read the pod, then stream
//! its snapshot lines and heartbeats until the token expires, the stream's time is up, the
//! cache can no longer vouch for its content, or the operator stops.

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum_server::tls_rustls::RustlsConfig;
use bytes::Bytes;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::decide::{self, Admitted, PodIdentity, Refusal};
use super::{
    FEED_AUDIENCE, FEED_PATH, HEARTBEAT_INTERVAL, HEARTBEAT_LINE, MAX_STREAM, POLL_INTERVAL,
    WATCH_FAILURE_GRACE,
};
use crate::cache::{CachedSecret, SecretIndex};
use crate::crypto::{Keyring, KeyringHandle};
use crate::telemetry::{Metrics, ResultLabels};
use crate::webhook::server::{Limits, serve_webhook_with};

/// Failures of the feed's calls to the API server: the stream cannot be authorised now (503),
/// which is not the client's fault. Never carries the token.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("failed to review the token with the API server: {0}")]
    TokenReview(#[source] kube::Error),
    #[error("failed to read pod {namespace}/{pod}: {source}")]
    ReadPod {
        namespace: String,
        pod: String,
        source: kube::Error,
    },
}

/// Tunables of the feed; the defaults are the product's, tests shorten them.
#[derive(Debug, Clone)]
pub struct FeedSettings {
    /// Streams served at once; one past it is answered 503 at once.
    pub max_streams: usize,
    pub heartbeat: Duration,
    pub poll: Duration,
    pub max_stream: Duration,
    /// A client that does not take a line for this long loses its stream.
    pub send_timeout: Duration,
    /// How long the AgentSecret watch may fail before the feed stops vouching for what it
    /// serves (streams end, new ones get 503). With the proxy's [`STALE_AFTER`](super::STALE_AFTER) this keeps
    /// the product's 10-second promise during a watch outage: a deletion the operator cannot
    /// see stops being substituted within 2 + 8 seconds.
    pub watch_failure_grace: Duration,
    /// Where the webhook injects pods: a pod elsewhere is refused.
    pub namespaces: decide::Namespaces,
}

impl Default for FeedSettings {
    fn default() -> Self {
        Self {
            max_streams: super::DEFAULT_MAX_STREAMS as usize,
            heartbeat: HEARTBEAT_INTERVAL,
            poll: POLL_INTERVAL,
            max_stream: MAX_STREAM,
            send_timeout: Duration::from_secs(10),
            watch_failure_grace: WATCH_FAILURE_GRACE,
            namespaces: decide::Namespaces::default(),
        }
    }
}

/// What the feed's handler shares.
#[derive(Clone)]
pub struct FeedState {
    client: kube::Client,
    index: Arc<SecretIndex>,
    keyring: KeyringHandle,
    settings: Arc<FeedSettings>,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
    metrics: Arc<Metrics>,
}

impl FeedState {
    /// `stop` ends every open stream (shutdown).
    pub fn new(
        client: kube::Client,
        index: Arc<SecretIndex>,
        keyring: KeyringHandle,
        settings: FeedSettings,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> Self {
        Self {
            client,
            index,
            keyring,
            permits: Arc::new(Semaphore::new(
                settings.max_streams.min(Semaphore::MAX_PERMITS),
            )),
            settings: Arc::new(settings),
            stop,
            metrics,
        }
    }

    /// Why the feed cannot vouch for what it would serve, if it cannot.
    fn not_ready_reason(&self) -> Option<&'static str> {
        if self.keyring.current().is_none() {
            return Some("no keyring loaded");
        }
        self.index.unready_within(self.settings.watch_failure_grace)
    }
}

/// The feed's routes.
pub fn feed_router(state: FeedState) -> Router {
    Router::new().route(FEED_PATH, get(feed)).with_state(state)
}

/// Serve the feed over TLS on `listener` until `shutdown` resolves, with the webhook's
/// connection limits except for the number of connections (each stream holds one).
pub async fn serve_feed(
    listener: std::net::TcpListener,
    tls: RustlsConfig,
    state: FeedState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = Limits {
        max_connections: state.settings.max_streams.saturating_add(64),
        ..Limits::default()
    };
    serve_webhook_with(listener, tls, feed_router(state), &limits, shutdown).await
}

fn text(status: StatusCode, message: impl Into<String>) -> Response {
    let mut message = message.into();
    message.push('\n');
    (status, [(header::CACHE_CONTROL, "no-store")], message).into_response()
}

fn refused(refusal: &Refusal) -> Response {
    let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::FORBIDDEN);
    let mut response = text(status, refusal.to_string());
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

async fn review(
    client: &kube::Client,
    token: &str,
) -> Result<Result<PodIdentity, Refusal>, FeedError> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![FEED_AUDIENCE.to_owned()]),
        },
        ..TokenReview::default()
    };
    let answer = kube::Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(FeedError::TokenReview)?;
    Ok(decide::identity_of(answer.status.as_ref()))
}

async fn read_pod(client: &kube::Client, identity: &PodIdentity) -> Result<Option<Pod>, FeedError> {
    kube::Api::<Pod>::namespaced(client.clone(), &identity.namespace)
        .get_opt(&identity.pod_name)
        .await
        .map_err(|source| FeedError::ReadPod {
            namespace: identity.namespace.clone(),
            pod: identity.pod_name.clone(),
            source,
        })
}

async fn feed(State(state): State<FeedState>, headers: HeaderMap) -> Response {
    let metrics = state.metrics.clone();
    let response = open_stream(state, headers).await;
    let result = match response.status() {
        StatusCode::OK => "opened",
        StatusCode::UNAUTHORIZED => "unauthenticated",
        StatusCode::FORBIDDEN => "forbidden",
        _ => "unavailable",
    };
    metrics
        .feed_requests
        .get_or_create(&ResultLabels { result })
        .inc();
    response
}

async fn open_stream(state: FeedState, headers: HeaderMap) -> Response {
    let Ok(permit) = state.permits.clone().try_acquire_owned() else {
        tracing::warn!("feed stream refused: too many open streams");
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many feed streams; retry later",
        );
    };
    if let Some(reason) = state.not_ready_reason() {
        return text(StatusCode::SERVICE_UNAVAILABLE, reason);
    }
    let Some(token) = bearer(&headers) else {
        return refused(&Refusal::NoToken);
    };
    let identity = match review(&state.client, token).await {
        Ok(Ok(identity)) => identity,
        Ok(Err(refusal)) => {
            tracing::warn!(error = %refusal, "feed stream refused");
            return refused(&refusal);
        }
        Err(error) => {
            tracing::warn!(%error, "feed stream not authorised");
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "failed to review the token; retry later",
            );
        }
    };
    if let Err(refusal) = decide::namespace_served(&identity, &state.settings.namespaces) {
        tracing::warn!(error = %refusal, "feed stream refused");
        return refused(&refusal);
    }
    let pod = match read_pod(&state.client, &identity).await {
        Ok(Some(pod)) => pod,
        Ok(None) => {
            let refusal = Refusal::Pod {
                namespace: identity.namespace.clone(),
                pod: identity.pod_name.clone(),
                reason: "the pod does not exist",
            };
            tracing::warn!(error = %refusal, "feed stream refused");
            return refused(&refusal);
        }
        Err(error) => {
            tracing::warn!(%error, "feed stream not authorised");
            return text(StatusCode::SERVICE_UNAVAILABLE, error.to_string());
        }
    };
    let admitted = match decide::admitted(&pod, &identity) {
        Ok(admitted) => admitted,
        Err(refusal) => {
            tracing::warn!(error = %refusal, "feed stream refused");
            return refused(&refusal);
        }
    };
    let lifetime = decide::stream_lifetime(
        crate::api::now_seconds(),
        decide::token_expiry(token),
        state.settings.max_stream,
    );
    tracing::info!(
        namespace = %identity.namespace,
        pod = %identity.pod_name,
        owner = %admitted.owner,
        placeholders = admitted.placeholders.len(),
        lifetime_seconds = lifetime.as_secs(),
        "feed stream opened"
    );
    let (sender, receiver) = mpsc::channel::<Bytes>(2);
    tokio::spawn(stream_pod(
        state,
        identity,
        admitted,
        Instant::now() + lifetime,
        sender,
        permit,
    ));
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver
            .recv()
            .await
            .map(|line| (Ok::<_, Infallible>(line), receiver))
    });
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// A rendered line as a body chunk's owner, so the values are zeroised when the chunk goes.
struct ZeroizedLine(zeroize::Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for ZeroizedLine {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Counts a stream in `feed_streams` for as long as it lives.
struct OpenStream(Arc<Metrics>);

impl OpenStream {
    fn new(metrics: &Arc<Metrics>) -> Self {
        metrics.feed_streams.inc();
        Self(metrics.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.feed_streams.dec();
    }
}

/// What the last line was rendered from: while the same objects (held, so their addresses are
/// not reused) and the same keyring are in force, the line is the same and is not rendered.
struct Rendered {
    secrets: Vec<Arc<CachedSecret>>,
    keyring: Arc<Keyring>,
    digest: ring::digest::Digest,
}

fn unchanged(
    last: Option<&Rendered>,
    secrets: &[Arc<CachedSecret>],
    keyring: &Arc<Keyring>,
) -> bool {
    last.is_some_and(|last| {
        Arc::ptr_eq(&last.keyring, keyring)
            && last.secrets.len() == secrets.len()
            && last
                .secrets
                .iter()
                .zip(secrets)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    })
}

/// Produces one pod's lines until the stream ends; `_permit` holds its slot meanwhile.
async fn stream_pod(
    state: FeedState,
    identity: PodIdentity,
    admitted: Admitted,
    deadline: Instant,
    sender: mpsc::Sender<Bytes>,
    _permit: OwnedSemaphorePermit,
) {
    let settings = state.settings.clone();
    let _open = OpenStream::new(&state.metrics);
    let mut poll = tokio::time::interval(settings.poll);
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut heartbeat =
        tokio::time::interval_at(Instant::now() + settings.heartbeat, settings.heartbeat);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last: Option<Rendered> = None;
    let (namespace, pod) = (identity.namespace.as_str(), identity.pod_name.as_str());
    let why = loop {
        let line = tokio::select! {
            // In this order: a stream past its time sends nothing more, and a change goes out
            // before a heartbeat that would otherwise confirm the old snapshot.
            biased;
            () = state.stop.cancelled() => break "the operator is stopping",
            () = tokio::time::sleep_until(deadline) => break "the token expired or the stream's time is up",
            () = sender.closed() => break "the client went away",
            _ = poll.tick() => {
                // A cache that cannot see deletions, or no keyring: stop vouching, so the
                // proxy fails closed rather than keep serving what may have been deleted.
                let (Some(keyring), None) = (state.keyring.current(), state.index.unready_within(settings.watch_failure_grace)) else {
                    break "the operator cannot vouch for the secrets now";
                };
                let secrets = state.index.owner_secrets(namespace, &admitted.owner);
                if unchanged(last.as_ref(), &secrets, &keyring) {
                    continue;
                }
                let rendered = decide::render_snapshot(&admitted, namespace, &secrets, &keyring);
                let digest = ring::digest::digest(&ring::digest::SHA256, &rendered.line);
                let same = last.as_ref().is_some_and(|l| l.digest.as_ref() == digest.as_ref());
                last = Some(Rendered { secrets, keyring, digest });
                if same {
                    continue;
                }
                for skipped in &rendered.skipped {
                    tracing::warn!(namespace, pod, secret = %skipped.name, reason = skipped.reason, "secret left out of the pod's feed");
                }
                tracing::info!(namespace, pod, secrets = ?rendered.served, "feed snapshot sent");
                // The body chunk owns the zeroising buffer: the values are wiped when hyper
                // drops the chunk after writing it (rustls' own plaintext buffers excepted).
                Bytes::from_owner(ZeroizedLine(rendered.line))
            }
            _ = heartbeat.tick() => Bytes::from_static(HEARTBEAT_LINE),
        };
        match sender.send_timeout(line, settings.send_timeout).await {
            Ok(()) => {}
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => break "the client does not read",
            Err(mpsc::error::SendTimeoutError::Closed(_)) => break "the client went away",
        }
    };
    tracing::info!(namespace, pod, reason = why, "feed stream closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_bearer_authorization_yields_a_token() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value.parse().unwrap());
            headers
        };
        assert_eq!(bearer(&with("Bearer abc.def")), Some("abc.def"));
        assert_eq!(bearer(&with("bearer  abc")), Some("abc"));
        assert_eq!(bearer(&with("Basic YTpi")), None);
        assert_eq!(bearer(&with("Bearer ")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }
}
