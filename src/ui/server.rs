//! The page's HTTP server: routes, security headers, body limits, and the optional TLS
//! listener that tells handlers whether the proxy's client certificate verified.

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, Request, Response, header};
use axum::middleware::{self, Next};
use axum::routing::get;
use axum_server::accept::Accept;
use axum_server::tls_rustls::RustlsAcceptor;
use futures::future::BoxFuture;
use std::ops::Deref;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::config::Settings;
use super::csrf::CsrfKey;
use super::identity::ProxyCertificate;
use super::{assets, json, pages};

/// Largest request body: a value of `MAX_VALUE_BYTES`, form-encoded (up to 3x), plus the
/// other fields.
pub const BODY_LIMIT: usize = 3 * crate::crypto::MAX_VALUE_BYTES + 16 * 1024;

/// `Content-Security-Policy`: only this origin's own script and style, no inline script, no
/// framing, forms post only here.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// What every handler shares.
pub struct Shared {
    pub settings: Settings,
    /// The page's own client (service account allowed only to impersonate). Handlers use it
    /// only through `impersonate::client_as`.
    pub client: kube::Client,
    pub csrf: CsrfKey,
    /// Served over TLS: add `Strict-Transport-Security`.
    pub tls: bool,
}

/// Cheap to clone handle on [`Shared`].
#[derive(Clone)]
pub struct UiState(Arc<Shared>);

impl UiState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl Deref for UiState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The page's router. Serve it with `into_make_service_with_connect_info::<SocketAddr>()`:
/// the source address decides whether identity headers are trusted.
pub fn router(state: UiState) -> Router {
    let tls = state.tls;
    Router::new()
        .route("/", get(pages::index))
        .route("/secrets/new", get(pages::new_form))
        .route("/secrets", axum::routing::post(pages::create))
        .route("/secrets/{env_name}", axum::routing::post(pages::update))
        .route("/secrets/{env_name}/edit", get(pages::edit_form))
        .route(
            "/secrets/{env_name}/delete",
            get(pages::delete_form).post(pages::delete),
        )
        .route("/api/v1/secrets", get(json::list).post(json::create))
        .route(
            "/api/v1/secrets/{env_name}",
            axum::routing::patch(json::update).delete(json::delete),
        )
        .route("/api/v1/env-names/check", get(json::check_env_name))
        .route("/static/app.js", get(assets::script))
        .route("/static/app.css", get(assets::stylesheet))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(pages::not_found)
        .with_state(state)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(move |request, next| {
            security_headers(request, next, tls)
        }))
}

async fn security_headers(
    request: Request<axum::body::Body>,
    next: Next,
    tls: bool,
) -> Response<axum::body::Body> {
    // The path only: queries carry nothing needed here, and bodies (values) are never logged.
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let mut response = next.run(request).await;
    tracing::info!(%method, %path, status = response.status().as_u16(), "request");
    let headers = response.headers_mut();
    let set = |headers: &mut axum::http::HeaderMap, name, value: &'static str| {
        headers.insert(name, HeaderValue::from_static(value));
    };
    // Pages show who is signed in and which secrets exist: never keep them in any cache.
    set(headers, header::CACHE_CONTROL, "no-store");
    set(headers, header::PRAGMA, "no-cache");
    set(headers, header::CONTENT_SECURITY_POLICY, CSP);
    set(headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(headers, header::X_FRAME_OPTIONS, "DENY");
    set(headers, header::REFERRER_POLICY, "no-referrer");
    set(
        headers,
        header::HeaderName::from_static("cross-origin-opener-policy"),
        "same-origin",
    );
    set(
        headers,
        header::HeaderName::from_static("cross-origin-resource-policy"),
        "same-origin",
    );
    set(
        headers,
        header::HeaderName::from_static("permissions-policy"),
        "camera=(), microphone=(), geolocation=(), interest-cohort=()",
    );
    if tls {
        set(
            headers,
            header::STRICT_TRANSPORT_SECURITY,
            "max-age=31536000",
        );
    }
    response
}

/// TLS acceptor that marks each request of a connection whose client certificate verified.
///
/// The verifier allows connections without a certificate (so probes and a clear refusal page
/// work); a certificate that does not verify fails the handshake.
#[derive(Clone)]
pub struct ProxyCertificateAcceptor {
    inner: RustlsAcceptor,
}

impl ProxyCertificateAcceptor {
    pub fn new(inner: RustlsAcceptor) -> Self {
        Self { inner }
    }
}

impl<I, S> Accept<I, S> for ProxyCertificateAcceptor
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Send + 'static,
{
    type Stream = <RustlsAcceptor as Accept<I, S>>::Stream;
    type Service = MarkProxyCertificate<S>;
    type Future = BoxFuture<'static, std::io::Result<(Self::Stream, Self::Service)>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let accepting = self.inner.accept(stream, service);
        Box::pin(async move {
            let (stream, service) = accepting.await?;
            let verified = stream
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|chain| !chain.is_empty());
            Ok((
                stream,
                MarkProxyCertificate {
                    inner: service,
                    verified,
                },
            ))
        })
    }
}

/// Adds [`ProxyCertificate`] to each request when the connection's certificate verified.
#[derive(Clone)]
pub struct MarkProxyCertificate<S> {
    inner: S,
    verified: bool,
}

impl<S, B> tower::Service<Request<B>> for MarkProxyCertificate<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if self.verified {
            request.extensions_mut().insert(ProxyCertificate);
        }
        self.inner.call(request)
    }
}
