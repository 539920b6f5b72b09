//! The proxy's side of the operator feed (`--feed-url`): a [`ValueSource`] streaming the pod's
//! snapshot from the operator over HTTPS, authenticated with the pod's projected token.
//!
//! It publishes [`Snapshot::unusable`] until the first snapshot, applies each snapshot line as
//! it comes, takes heartbeat lines (`{}`) as confirmation that the last one still holds, and
//! reconnects with backoff, reading the token file afresh each time (the kubelet rotates it).
//! When no line at all arrived for [`STALE_AFTER`] it fails closed: every request is refused
//! until a stream confirms the secrets again, so a deletion the proxy may have missed is never
//! acted on as if it had not happened.

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use super::snapshot::{Snapshot, Unusable};
use super::source::ValueSource;
pub use crate::feed::STALE_AFTER;

/// Longest snapshot line accepted (a snapshot of many secrets of up to 64 KiB each).
pub const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;
/// First wait before reconnecting after a failure; it doubles up to the configured maximum.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(200);

/// Where and how to reach the feed.
#[derive(Debug, Clone)]
pub struct FeedConfig {
    /// `https://HOST:PORT/v1/feed`.
    pub url: Uri,
    /// The projected service-account token, read afresh at each connection.
    pub token_file: PathBuf,
    /// CAs trusted for the feed's certificate (only these: not the public roots).
    pub ca: Vec<CertificateDer<'static>>,
    /// Fail closed when no line arrived for this long.
    pub stale_after: Duration,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
}

impl FeedConfig {
    pub fn new(url: Uri, token_file: PathBuf, ca: Vec<CertificateDer<'static>>) -> Self {
        Self {
            url,
            token_file,
            ca,
            stale_after: STALE_AFTER,
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// Why the feed client cannot start. Never shows a token or a value.
#[derive(Debug, thiserror::Error)]
pub enum FeedClientError {
    #[error("failed to use the feed URL {0}: it must be https://HOST[:PORT]/PATH")]
    Url(String),
    #[error("failed to parse the feed's CA: malformed PEM")]
    CaPem,
    #[error("failed to find a certificate in the feed's CA")]
    NoCa,
    #[error("failed to build the feed's TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Parses the feed URL: HTTPS only, the token must never travel in clear.
pub fn parse_url(text: &str) -> Result<Uri, FeedClientError> {
    let url: Uri = text
        .parse()
        .map_err(|_| FeedClientError::Url(text.to_owned()))?;
    if url.scheme_str() != Some("https") || url.host().is_none() {
        return Err(FeedClientError::Url(text.to_owned()));
    }
    Ok(url)
}

/// Certificates of a PEM bundle (the feed's CA).
pub fn parse_ca(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, FeedClientError> {
    use rustls::pki_types::pem::PemObject as _;
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| FeedClientError::CaPem)?;
    if certs.is_empty() {
        return Err(FeedClientError::NoCa);
    }
    Ok(certs)
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The operator feed as a value source.
#[derive(Debug)]
pub struct FeedSource {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    sender: watch::Sender<Arc<Snapshot>>,
    /// When the last line (snapshot or heartbeat) arrived; `None` before the first.
    last_line: Mutex<Option<Instant>>,
}

impl Shared {
    fn last_line(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.last_line.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A snapshot line: in force from now.
    fn apply(&self, snapshot: Arc<Snapshot>) {
        let mut last = self.last_line();
        *last = Some(Instant::now());
        self.sender.send_replace(snapshot);
    }

    /// A heartbeat: the stream's last snapshot still holds. If the proxy had meanwhile failed
    /// closed (the heartbeat was late), that snapshot is confirmed again.
    fn confirm(&self, current: &Arc<Snapshot>) {
        let mut last = self.last_line();
        *last = Some(Instant::now());
        if self.sender.borrow().unusable_reason() == Some(Unusable::Unconfirmed) {
            tracing::info!("secretless feed confirmed the secrets again");
            self.sender.send_replace(current.clone());
        }
    }

    /// Fail closed when the last line is older than `stale_after`.
    fn expire(&self, stale_after: Duration) {
        let last = self.last_line();
        let stale = last.is_none_or(|at| at.elapsed() > stale_after);
        if stale && self.sender.borrow().unusable_reason().is_none() {
            tracing::error!(
                seconds = stale_after.as_secs(),
                "secretless feed silent: refusing every request until it confirms the secrets"
            );
            self.sender
                .send_replace(Arc::new(Snapshot::unusable(Unusable::Unconfirmed)));
        }
    }
}

impl FeedSource {
    /// Starts streaming from the feed until `stop` is cancelled; unusable until the first
    /// snapshot arrives.
    pub fn spawn(
        config: FeedConfig,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, FeedClientError> {
        let client = https_client(&config.ca)?;
        let shared = Arc::new(Shared {
            sender: watch::Sender::new(Arc::new(Snapshot::unusable(Unusable::Unconfirmed))),
            last_line: Mutex::new(None),
        });
        tokio::spawn(watchdog(shared.clone(), config.stale_after, stop.clone()));
        tokio::spawn(follow(config, client, shared.clone(), stop));
        Ok(Arc::new(Self { shared }))
    }
}

impl ValueSource for FeedSource {
    fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.shared.sender.subscribe()
    }
}

fn https_client(ca: &[CertificateDer<'static>]) -> Result<HttpsClient, FeedClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(ca.iter().cloned());
    if added == 0 {
        return Err(FeedClientError::NoCa);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector))
}

async fn watchdog(shared: Arc<Shared>, stale_after: Duration, stop: CancellationToken) {
    let period = (stale_after / 16).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(period) => shared.expire(stale_after),
        }
    }
}

/// How one stream ended.
enum Outcome {
    /// The server ended it after delivering lines (the token's time is up): reconnect at once.
    Ended,
    Failed(String),
}

async fn follow(
    config: FeedConfig,
    client: HttpsClient,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut backoff = INITIAL_BACKOFF;
    loop {
        let outcome = tokio::select! {
            () = stop.cancelled() => return,
            outcome = stream_once(&config, &client, &shared) => outcome,
        };
        let wait = match outcome {
            Outcome::Ended => {
                tracing::debug!("secretless feed stream ended; reconnecting");
                backoff = INITIAL_BACKOFF;
                continue;
            }
            Outcome::Failed(reason) => {
                tracing::warn!(
                    reason,
                    retry_ms = backoff.as_millis() as u64,
                    "secretless feed stream failed"
                );
                let wait = with_jitter(backoff);
                backoff = (backoff * 2).min(config.max_backoff);
                wait
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Up to a quarter more, so that the pods of a node do not all reconnect at the same instant
/// after an operator restart.
fn with_jitter(wait: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let spread = getrandom::fill(&mut byte).map_or(0, |()| u32::from(byte[0]));
    wait + wait / 4 * spread / 255
}

async fn stream_once(config: &FeedConfig, client: &HttpsClient, shared: &Shared) -> Outcome {
    let token = match std::fs::read_to_string(&config.token_file) {
        Ok(token) => Zeroizing::new(token),
        Err(e) => {
            return Outcome::Failed(format!(
                "failed to read the token file {}: {e}",
                config.token_file.display()
            ));
        }
    };
    let authorization = Zeroizing::new(format!("Bearer {}", token.trim()));
    let Ok(mut authorization) = header::HeaderValue::from_str(&authorization) else {
        return Outcome::Failed("failed to use the token: it is not a valid header value".into());
    };
    authorization.set_sensitive(true);
    let request = Request::get(config.url.clone())
        .header(header::AUTHORIZATION, authorization)
        .header(header::ACCEPT, "application/x-ndjson")
        .body(Empty::new());
    let request = match request {
        Ok(request) => request,
        Err(e) => return Outcome::Failed(format!("failed to build the request: {e}")),
    };
    let response = match tokio::time::timeout(config.stale_after, client.request(request)).await {
        Err(_) => return Outcome::Failed("failed to get an answer in time".into()),
        Ok(Err(e)) => return Outcome::Failed(format!("failed to connect: {}", error_chain(&e))),
        Ok(Ok(response)) => response,
    };
    let status = response.status();
    if status != StatusCode::OK {
        // The operator's refusals name the pod and the reason, nothing secret.
        let body = tokio::time::timeout(
            Duration::from_secs(2),
            Limited::new(response.into_body(), 1024).collect(),
        )
        .await;
        let text = match body {
            Ok(Ok(collected)) => String::from_utf8_lossy(&collected.to_bytes())
                .trim()
                .to_owned(),
            _ => String::new(),
        };
        return Outcome::Failed(format!("the feed answered {status}: {text}"));
    }
    let mut body = response.into_body();
    let mut buffer = Zeroizing::new(Vec::<u8>::new());
    let mut current: Option<Arc<Snapshot>> = None;
    loop {
        let frame = match tokio::time::timeout(config.stale_after, body.frame()).await {
            Err(_) => return Outcome::Failed("no line from the feed in time".into()),
            Ok(None) if current.is_some() => return Outcome::Ended,
            Ok(None) => return Outcome::Failed("the stream ended before a snapshot".into()),
            Ok(Some(Err(e))) => {
                return Outcome::Failed(format!("the stream broke: {}", error_chain(&e)));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buffer.extend_from_slice(&data);
        while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let line = &buffer[..end];
            let outcome = apply_line(line, shared, &mut current);
            buffer.drain(..=end);
            if let Some(failure) = outcome {
                return failure;
            }
        }
        if buffer.len() > MAX_LINE_BYTES {
            return Outcome::Failed(format!("a line is longer than {MAX_LINE_BYTES} bytes"));
        }
    }
}

/// Applies one line; `Some` ends the stream.
fn apply_line(
    line: &[u8],
    shared: &Shared,
    current: &mut Option<Arc<Snapshot>>,
) -> Option<Outcome> {
    let line = line.trim_ascii();
    if line.is_empty() {
        return None;
    }
    if line == b"{}" {
        return match current {
            Some(snapshot) => {
                shared.confirm(snapshot);
                None
            }
            None => Some(Outcome::Failed(
                "a heartbeat came before any snapshot".into(),
            )),
        };
    }
    match Snapshot::from_json(line) {
        Ok(snapshot) => {
            tracing::info!(
                secrets = snapshot.entries().len(),
                "secretless values received from the feed"
            );
            let snapshot = Arc::new(snapshot);
            shared.apply(snapshot.clone());
            *current = Some(snapshot);
            None
        }
        Err(e) => {
            // The error names a position or a secret, never a value.
            tracing::error!(error = %e, "secretless feed sent an invalid snapshot: refusing every request");
            shared
                .sender
                .send_replace(Arc::new(Snapshot::unusable(Unusable::Invalid)));
            Some(Outcome::Failed("invalid snapshot".into()))
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared {
            sender: watch::Sender::new(Arc::new(Snapshot::unusable(Unusable::Unconfirmed))),
            last_line: Mutex::new(None),
        }
    }

    const LINE: &[u8] = br#"{"egress":"open","secrets":[{"envName":"A","placeholder":"asec_ph_0123456789abcdefXY","value":"canary-value-123","allowedHosts":["a.com"],"injectAs":[],"allowPlainHttp":false}]}"#;

    #[test]
    fn urls_must_be_https_with_a_host() {
        assert!(parse_url("https://feed.agent-secrets.svc:8444/v1/feed").is_ok());
        assert!(matches!(
            parse_url("http://feed:8444/v1/feed"),
            Err(FeedClientError::Url(_))
        ));
        assert!(parse_url("/v1/feed").is_err());
    }

    #[test]
    fn a_ca_without_certificates_is_refused() {
        assert!(matches!(
            parse_ca(b"no pem here"),
            Err(FeedClientError::NoCa)
        ));
        assert!(matches!(
            parse_ca(b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n"),
            Err(FeedClientError::CaPem)
        ));
    }

    #[tokio::test]
    async fn a_heartbeat_before_any_snapshot_ends_the_stream_and_confirms_nothing() {
        let shared = shared();
        let mut current = None;
        assert!(matches!(
            apply_line(b"{}", &shared, &mut current),
            Some(Outcome::Failed(_))
        ));
        assert_eq!(
            shared.sender.borrow().unusable_reason(),
            Some(Unusable::Unconfirmed)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn silence_fails_closed_and_a_later_heartbeat_restores_the_streams_snapshot() {
        let shared = shared();
        let mut current = None;
        assert!(apply_line(LINE, &shared, &mut current).is_none());
        assert_eq!(shared.sender.borrow().entries().len(), 1);
        tokio::time::advance(Duration::from_secs(7)).await;
        shared.expire(Duration::from_secs(8));
        assert!(
            shared.sender.borrow().unusable_reason().is_none(),
            "still fresh at 7 s"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        shared.expire(Duration::from_secs(8));
        assert_eq!(
            shared.sender.borrow().unusable_reason(),
            Some(Unusable::Unconfirmed)
        );
        assert!(apply_line(b"{}\r", &shared, &mut current).is_none());
        assert_eq!(shared.sender.borrow().entries().len(), 1);
    }

    #[tokio::test]
    async fn an_invalid_line_fails_closed_without_quoting_it() {
        let shared = shared();
        let mut current = None;
        assert!(apply_line(LINE, &shared, &mut current).is_none());
        let bad = br#"{"secrets":[{"envName":"A","value":"canary-value-123" "x"}]}"#;
        assert!(
            matches!(apply_line(bad, &shared, &mut current), Some(Outcome::Failed(ref r)) if !r.contains("canary"))
        );
        assert_eq!(
            shared.sender.borrow().unusable_reason(),
            Some(Unusable::Invalid)
        );
    }

    #[test]
    fn jitter_adds_at_most_a_quarter() {
        for _ in 0..50 {
            let wait = with_jitter(Duration::from_millis(400));
            assert!(
                (Duration::from_millis(400)..=Duration::from_millis(500)).contains(&wait),
                "{wait:?}"
            );
        }
    }
}
