//! The HTTPS admission server and the plain-HTTP admin server: routes, shared state, and
//! serving with the [`Limits`] until shutdown.
//!
//! Body reading and review parsing live in [`super::review`], the handlers in
//! [`super::handlers`], answers in [`super::response`], the Secret writer in
//! [`super::writer`] and TLS loading in [`super::tls`].

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use hyper_util::rt::TokioTimer;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::Policy;
use super::handlers::{self, WebhookState};
use super::limits::{ConnectionLimit, Gates};
use super::review::PodView;
use crate::api::AgentSecret;
use crate::cache::{PodSecretIndex, SecretIndex};
use crate::crypto::KeyringHandle;
use crate::telemetry::Metrics;

pub use super::limits::{Limits, MAX_BODY_BYTES};
pub use super::tls::watch_tls_files;
pub use super::writer::{Created, KubeSecretWriter, SecretWriter, WriteError, same_pod_secret};

/// How long graceful shutdown waits for in-flight reviews. The API server's webhook timeout
/// is at most 30 s, and the chart sets 10 s.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

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
            return Some("no keyring loaded");
        }
        // Not synced yet, or its watch failing for too long: a replica that cannot see
        // deletions must not inject.
        self.index.unready_reason()
    }
}

/// Routes of the TLS webhook port, with the default [`Limits`].
pub fn webhook_router(state: AppState) -> Router {
    webhook_router_with(state, &Limits::default())
}

/// Routes of the TLS webhook port, holding bodies and reviews within `limits`.
pub fn webhook_router_with(state: AppState, limits: &Limits) -> Router {
    let state = Arc::new(WebhookState {
        app: state,
        gates: Gates::new(limits),
    });
    Router::new()
        .route(
            "/mutate/agentsecrets",
            post(handlers::review::<AgentSecret>),
        )
        .route("/mutate/pods", post(handlers::review::<PodView>))
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
    // Rotation progress: AgentSecrets per key id, as the cache sees them now (leader only).
    state
        .metrics
        .set_key_usage(|| state.index.count_by_key_id());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// Serve the webhook over TLS on `listener` with the default [`Limits`] until `shutdown`
/// resolves, then finish in-flight reviews (up to [`SHUTDOWN_GRACE`]).
pub async fn serve_webhook(
    listener: std::net::TcpListener,
    tls: RustlsConfig,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_webhook_with(listener, tls, router, &Limits::default(), shutdown).await
}

/// [`serve_webhook`] holding connections, handshakes and headers within `limits` (the router
/// holds bodies and reviews: build it with the same limits, [`webhook_router_with`]).
pub async fn serve_webhook_with(
    listener: std::net::TcpListener,
    tls: RustlsConfig,
    router: Router,
    limits: &Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopper.graceful_shutdown(Some(SHUTDOWN_GRACE));
    });
    listener.set_nonblocking(true)?;
    let acceptor = RustlsAcceptor::new(tls)
        .handshake_timeout(limits.tls_handshake_timeout)
        .acceptor(ConnectionLimit::new(limits.max_connections));
    let mut server = axum_server::from_tcp(listener)?
        .acceptor(acceptor)
        .handle(handle);
    let header_bytes = u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX);
    let builder = server.http_builder();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // At least hyper's minimum read buffer.
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_header_list_size(header_bytes)
        .initial_connection_window_size(limits.http2_window_bytes)
        .initial_stream_window_size(limits.http2_window_bytes)
        .keep_alive_interval(limits.http2_keep_alive_interval)
        .keep_alive_timeout(limits.http2_keep_alive_timeout);
    server.serve(router.into_make_service()).await
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
