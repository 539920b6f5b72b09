//! The egress proxy: an HTTP/1.1 forward proxy on loopback. `CONNECT host:port` tunnels are
//! intercepted (TLS terminated with a leaf minted for that host, requests served over HTTP/1.1
//! or HTTP/2); absolute-form `http://` requests are forwarded. Every request goes through
//! [`policy::substitute`] and then to the upstream over the proxy's own verified TLS.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::CertificateDer;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::ca::CertAuthority;
use super::mask::MaskedBody;
use super::metrics::{KindLabels, ProxyMetrics, ReasonLabels};
use super::policy::{self, Refusal, RefusalReason, Scheme};
use super::snapshot::{Snapshot, normalise_host};
use super::source::ValueSource;

/// Body of every response the proxy gives the sandbox.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;
type Connector = HttpsConnector<HttpConnector<Resolver>>;

/// Errors building the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("failed to build the upstream TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("failed to use the upstream CA bundle: it holds no usable certificate")]
    NoRoots,
}

/// How the proxy reaches upstreams.
#[derive(Debug, Default, Clone)]
pub struct UpstreamOptions {
    /// Trust anchors for upstream TLS; `None`: the Mozilla roots (webpki-root-certs).
    pub roots: Option<Vec<CertificateDer<'static>>>,
    /// Host names resolved to fixed addresses instead of DNS (`--resolve`).
    pub resolve: HashMap<String, IpAddr>,
}

/// DNS for upstream connections, with fixed overrides.
#[derive(Clone, Debug, Default)]
pub struct Resolver {
    overrides: Arc<HashMap<String, IpAddr>>,
}

impl tower::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let fixed = self.overrides.get(&normalise_host(name.as_str())).copied();
        Box::pin(async move {
            if let Some(ip) = fixed {
                return Ok(vec![SocketAddr::new(ip, 0)].into_iter());
            }
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            Ok(found.into_iter())
        })
    }
}

/// Where a request goes, as the proxy (not the request's own headers) decided it.
#[derive(Clone, Debug)]
struct Destination {
    scheme: Scheme,
    /// Normalised host name, what policies match.
    host: String,
    /// `host:port` as the URI authority to dial.
    authority: http::uri::Authority,
}

/// The egress proxy.
pub struct Proxy {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    ca: Arc<CertAuthority>,
    client: Client<Connector, Incoming>,
    /// HTTP/1.1 only: WebSocket handshakes need an HTTP/1.1 upgrade upstream.
    upgrade_client: Client<Connector, Incoming>,
    metrics: Arc<ProxyMetrics>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Proxy")
    }
}

impl Proxy {
    pub fn new(
        source: &dyn ValueSource,
        ca: Arc<CertAuthority>,
        upstream: UpstreamOptions,
        metrics: Arc<ProxyMetrics>,
    ) -> Result<Self, ProxyError> {
        let UpstreamOptions { roots, resolve } = upstream;
        let mut store = rustls::RootCertStore::empty();
        let (added, _) = match roots {
            Some(roots) => store.add_parsable_certificates(roots),
            None => store.add_parsable_certificates(
                webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned(),
            ),
        };
        if added == 0 {
            return Err(ProxyError::NoRoots);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(store)
            .with_no_client_auth();
        let resolver = Resolver {
            overrides: Arc::new(
                resolve
                    .into_iter()
                    .map(|(h, ip)| (normalise_host(&h), ip))
                    .collect(),
            ),
        };
        let http = || {
            let mut http = HttpConnector::new_with_resolver(resolver.clone());
            http.enforce_http(false);
            http.set_nodelay(true);
            http.set_connect_timeout(Some(Duration::from_secs(10)));
            http
        };
        let both = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http());
        let h1 = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http());
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(both);
        let upgrade_client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(h1);
        Ok(Self {
            snapshot: source.watch(),
            ca,
            client,
            upgrade_client,
            metrics,
        })
    }

    pub fn metrics(&self) -> &Arc<ProxyMetrics> {
        &self.metrics
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Serves connections from `listener` until `stop` is cancelled.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => {
                    let this = self.clone();
                    tokio::spawn(async move { this.serve_client(stream).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn serve_client(self: Arc<Self>, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let this = self.clone();
        let service = service_fn(move |req| this.clone().outer(req));
        if let Err(e) = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades()
            .await
        {
            tracing::debug!(error = %e, "sandbox connection ended with an error");
        }
    }

    /// A request on the proxy connection itself: `CONNECT` or an absolute-form `http://`.
    async fn outer(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        if req.method() == Method::CONNECT {
            return Ok(self.connect(req));
        }
        let authority = match (req.uri().scheme_str(), req.uri().authority()) {
            (Some("http"), Some(authority)) => authority.clone(),
            _ => {
                return Ok(text(
                    StatusCode::BAD_REQUEST,
                    "agent-secrets proxy: send CONNECT host:port for https, or an absolute http:// URL\n",
                ));
            }
        };
        self.metrics
            .requests
            .get_or_create(&KindLabels { kind: "http" })
            .inc();
        let authority = with_port(&authority, 80);
        let destination = Destination {
            scheme: Scheme::Http,
            host: normalise_host(authority.host()),
            authority,
        };
        Ok(self.forward(destination, req).await)
    }

    fn connect(self: Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        self.metrics
            .requests
            .get_or_create(&KindLabels { kind: "connect" })
            .inc();
        let Some(authority) = req.uri().authority().cloned() else {
            return text(StatusCode::BAD_REQUEST, "CONNECT needs host:port\n");
        };
        let authority = with_port(&authority, 443);
        let host = normalise_host(authority.host());
        let snapshot = self.snapshot();
        if !snapshot.host_reachable(&host) {
            let reason = if snapshot.unusable_reason().is_some() {
                RefusalReason::Unconfigured
            } else {
                RefusalReason::EgressNotAllowed
            };
            return self.refuse(&Refusal {
                reason,
                env_name: None,
                host,
            });
        }
        let config = match self.ca.server_config(&host) {
            Ok(config) => config,
            Err(e) => {
                tracing::error!(error = %e, host = %host, "failed to mint a certificate");
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "agent-secrets proxy: failed to mint a certificate\n",
                );
            }
        };
        let destination = Destination {
            scheme: Scheme::Https,
            host,
            authority,
        };
        tokio::spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => self.serve_tunnel(upgraded, destination, config).await,
                Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
            }
        });
        Response::new(empty())
    }

    async fn serve_tunnel(
        self: Arc<Self>,
        upgraded: hyper::upgrade::Upgraded,
        destination: Destination,
        config: Arc<rustls::ServerConfig>,
    ) {
        let tls = match tokio_rustls::TlsAcceptor::from(config)
            .accept(TokioIo::new(upgraded))
            .await
        {
            Ok(tls) => tls,
            Err(e) => {
                // Typically a client that does not trust the per-pod CA.
                tracing::info!(host = %destination.host, error = %e, "TLS from the sandbox failed");
                return;
            }
        };
        let this = self.clone();
        let service = service_fn(move |req| this.clone().tunnelled(req, destination.clone()));
        if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(TokioIo::new(tls), service)
            .await
        {
            tracing::debug!(error = %e, "tunnelled connection ended with an error");
        }
    }

    /// A request inside a tunnel: it must be for the host the tunnel was opened to, or a shared
    /// front end could route the value to another virtual host than the one it is allowed for.
    async fn tunnelled(
        self: Arc<Self>,
        req: Request<Incoming>,
        destination: Destination,
    ) -> Result<Response<ProxyBody>, Infallible> {
        self.metrics
            .requests
            .get_or_create(&KindLabels { kind: "tunnelled" })
            .inc();
        let claimed = req.uri().authority().cloned().or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.parse::<http::uri::Authority>().ok())
        });
        let matches = claimed.is_some_and(|c| {
            normalise_host(c.host()) == destination.host
                && c.port_u16().unwrap_or(443) == destination.authority.port_u16().unwrap_or(443)
        });
        if !matches {
            return Ok(text(
                StatusCode::MISDIRECTED_REQUEST,
                &format!(
                    "agent-secrets proxy: this tunnel is to {}; the request names another host\n",
                    destination.authority
                ),
            ));
        }
        Ok(self.forward(destination, req).await)
    }

    async fn forward(
        &self,
        destination: Destination,
        mut req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let snapshot = self.snapshot();
        let upgrade = is_upgrade(req.headers()) && req.version() == Version::HTTP_11;
        let sandbox_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let method = req.method().clone();
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        parts.headers.remove(header::HOST);
        let scheme = match destination.scheme {
            Scheme::Https => "https",
            Scheme::Http => "http",
        };
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let Ok(mut uri) = format!("{scheme}://{}{path}", destination.authority).parse::<Uri>()
        else {
            return text(
                StatusCode::BAD_REQUEST,
                "agent-secrets proxy: invalid request target\n",
            );
        };
        match policy::substitute(
            &snapshot,
            destination.scheme,
            &destination.host,
            &mut uri,
            &mut parts.headers,
        ) {
            Err(refusal) => return self.refuse(&refusal),
            Ok(substituted) if !substituted.0.is_empty() => {
                self.metrics
                    .substitutions
                    .inc_by(substituted.0.len() as u64);
                let names: Vec<&str> = substituted
                    .0
                    .iter()
                    .map(|&i| snapshot.entries()[i].env_name.as_str())
                    .collect();
                tracing::debug!(host = %destination.host, secrets = ?names, "substituted");
                // The upstream that now holds a value is the one that may echo it: ask for an
                // uncompressed response, which the masker can scan.
                parts.headers.insert(
                    header::ACCEPT_ENCODING,
                    HeaderValue::from_static("identity"),
                );
            }
            Ok(_) => {}
        }
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        let client = if upgrade {
            &self.upgrade_client
        } else {
            &self.client
        };
        let mut response = match client.request(Request::from_parts(parts, body)).await {
            Ok(response) => response,
            Err(e) => {
                self.metrics.upstream_errors.inc();
                tracing::info!(host = %destination.host, error = %e, "upstream request failed");
                return text(
                    StatusCode::BAD_GATEWAY,
                    &format!(
                        "agent-secrets proxy: failed to reach {}: {}\n",
                        destination.authority,
                        error_chain(&e)
                    ),
                );
            }
        };
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        if let (true, Some(sandbox_upgrade)) = (switching, sandbox_upgrade) {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                let (Ok(sandbox), Ok(upstream)) = (sandbox_upgrade.await, upstream_upgrade.await)
                else {
                    tracing::debug!("upgrade failed on one side");
                    return;
                };
                let _ = tokio::io::copy_bidirectional(
                    &mut TokioIo::new(sandbox),
                    &mut TokioIo::new(upstream),
                )
                .await;
            });
        }
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers, switching);
        policy::mask_headers(&snapshot, &mut parts.headers);
        let body = if masks_body(&snapshot, &method, parts.status, &parts.headers) {
            self.metrics.masked_bodies.inc();
            // The length changes when a value becomes its placeholder.
            parts.headers.remove(header::CONTENT_LENGTH);
            MaskedBody::new(body, snapshot).boxed()
        } else {
            body.boxed()
        };
        Response::from_parts(parts, body)
    }

    fn refuse(&self, refusal: &Refusal) -> Response<ProxyBody> {
        let label = refusal.reason.label();
        self.metrics
            .refused
            .get_or_create(&ReasonLabels { reason: label })
            .inc();
        tracing::warn!(
            secret = refusal.env_name.as_deref().unwrap_or(""),
            host = %refusal.host,
            reason = label,
            "refused a request"
        );
        let status = if refusal.reason == RefusalReason::Unconfigured {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::FORBIDDEN
        };
        let mut response = text(status, &format!("{refusal}\n"));
        response.headers_mut().insert(
            HeaderName::from_static("x-agentsecrets-refused"),
            HeaderValue::from_static(label),
        );
        response
    }
}

/// Whether the response body is scanned for values: when there are values to mask and the body
/// is not content-encoded (compressed bytes cannot be scanned without decoding them).
fn masks_body(
    snapshot: &Snapshot,
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
) -> bool {
    let identity = headers
        .get(header::CONTENT_ENCODING)
        .is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"identity"));
    snapshot.masks_anything()
        && identity
        && method != Method::HEAD
        && !status.is_informational()
        && status != StatusCode::NO_CONTENT
        && status != StatusCode::NOT_MODIFIED
}

fn with_port(authority: &http::uri::Authority, default: u16) -> http::uri::Authority {
    if authority.port().is_some() {
        return authority.clone();
    }
    format!("{}:{default}", authority.host())
        .parse()
        .unwrap_or_else(|_| authority.clone())
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes headers that belong to one hop (RFC 9110 §7.6.1), keeping `Connection: upgrade` and
/// `Upgrade` on a WebSocket handshake.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    // `TE: trailers` is the one TE an HTTP/2 upstream accepts, and gRPC requires it.
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in [
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
    ] {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn empty() -> ProxyBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

fn text(status: StatusCode, body: &str) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_owned()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_by_connection_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic eA=="),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("x-end", "kept"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-end"]);
    }

    #[test]
    fn a_websocket_handshake_keeps_its_upgrade_headers() {
        let mut h = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        let mut h = headers(&[("connection", "Upgrade"), ("upgrade", "h2c")]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty());
    }
}
