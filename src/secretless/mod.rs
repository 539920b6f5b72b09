//! Secretless mode: the sandbox holds only placeholders; this egress proxy, running beside it
//! as a native sidecar (`agentsecrets proxy`), swaps each placeholder for its value in outbound
//! requests towards the hosts that secret is allowed for, and refuses it everywhere else.
//! See docs/secretless.md for the design, the threat model and the contract with the webhook.

pub mod ca;
pub mod feed_client;
pub mod mask;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod snapshot;
pub mod source;

use anyhow::Context as _;
use clap::Args;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub use ca::CertAuthority;
pub use feed_client::{FeedConfig, FeedSource};
pub use metrics::ProxyMetrics;
pub use proxy::{Proxy, UpstreamOptions};
pub use snapshot::{EgressMode, Entry, HostPattern, Placement, Snapshot};
pub use source::{FileSource, StaticSource, ValueSource};

/// Default listen address: loopback, shared by every container of the pod.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:15080";

/// Flags of `agentsecrets proxy`.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Address the proxy listens on. Loopback only unless --allow-non-loopback: anyone who can
    /// reach the proxy can have placeholders turned into values.
    #[arg(long, env = "AGENTSECRETS_PROXY_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Accept a non-loopback --listen address.
    #[arg(long)]
    pub allow_non_loopback: bool,
    /// JSON file of placeholders, values, allowed hosts and placements (reloaded within a
    /// second of a change; see docs/secretless.md). For tests and manual use; exactly one of
    /// --values-file and --feed-url.
    #[arg(
        long,
        env = "AGENTSECRETS_PROXY_VALUES_FILE",
        value_name = "FILE",
        required_unless_present = "feed_url",
        conflicts_with = "feed_url"
    )]
    pub values_file: Option<PathBuf>,
    /// The operator's feed, `https://HOST:PORT/v1/feed`, streaming this pod's values.
    #[arg(
        long,
        env = "AGENTSECRETS_PROXY_FEED_URL",
        value_name = "URL",
        requires = "feed_token_file"
    )]
    pub feed_url: Option<String>,
    /// The pod's projected service-account token for the feed (audience agentsecrets.io/feed),
    /// read afresh at every connection.
    #[arg(long, env = "AGENTSECRETS_PROXY_FEED_TOKEN_FILE", value_name = "FILE")]
    pub feed_token_file: Option<PathBuf>,
    /// The feed's CA certificate as PEM text (the webhook sets it in the sidecar's env).
    #[arg(
        long,
        env = "AGENTSECRETS_PROXY_FEED_CA",
        value_name = "PEM",
        hide_env_values = true,
        conflicts_with = "feed_ca_file"
    )]
    pub feed_ca: Option<String>,
    /// The feed's CA certificate, a PEM file.
    #[arg(long, env = "AGENTSECRETS_PROXY_FEED_CA_FILE", value_name = "FILE")]
    pub feed_ca_file: Option<PathBuf>,
    /// Where to write the CA bundle the sandbox trusts (the per-pod CA, then the Mozilla
    /// roots). Written before the proxy accepts connections.
    #[arg(long, env = "AGENTSECRETS_PROXY_CA_BUNDLE", value_name = "FILE")]
    pub ca_bundle: PathBuf,
    /// PEM bundle of CAs trusted for upstream TLS instead of the Mozilla roots.
    #[arg(long, env = "AGENTSECRETS_PROXY_UPSTREAM_CA", value_name = "FILE")]
    pub upstream_ca: Option<PathBuf>,
    /// Resolve HOST to IP instead of asking DNS (repeatable), like curl's --resolve.
    #[arg(long, value_name = "HOST=IP", value_parser = parse_resolve)]
    pub resolve: Vec<(String, IpAddr)>,
    /// Address of the admin server (/healthz, /readyz, /metrics); it never proxies. Probes come
    /// from the kubelet, so this is usually the pod's address, e.g. 0.0.0.0:15081.
    #[arg(long, env = "AGENTSECRETS_PROXY_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Log format.
    #[arg(
        long,
        env = "AGENTSECRETS_LOG_FORMAT",
        value_enum,
        default_value = "json"
    )]
    pub log_format: crate::telemetry::LogFormat,
}

fn parse_resolve(text: &str) -> Result<(String, IpAddr), String> {
    let (host, ip) = text
        .split_once('=')
        .ok_or_else(|| format!("expected HOST=IP, got {text:?}"))?;
    let ip = ip
        .parse()
        .map_err(|_| format!("{ip:?} is not an IP address"))?;
    Ok((host.to_owned(), ip))
}

/// Reads a PEM bundle of certificates.
pub fn read_pem_certificates(
    path: &std::path::Path,
) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .with_context(|| format!("failed to read {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("failed to parse certificates in {}", path.display()))
}

/// `agentsecrets proxy`: run until SIGTERM or Ctrl-C.
pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    let ProxyArgs {
        listen,
        allow_non_loopback,
        values_file,
        feed_url,
        feed_token_file,
        feed_ca,
        feed_ca_file,
        ca_bundle,
        upstream_ca,
        resolve,
        admin_listen,
        log_format,
    } = args;
    crate::telemetry::init_logging(log_format);
    if !listen.ip().is_loopback() && !allow_non_loopback {
        anyhow::bail!(
            "refusing to listen on {listen}: the proxy turns placeholders into values for whoever reaches it; use a loopback address or pass --allow-non-loopback"
        );
    }
    let stop = CancellationToken::new();
    let source: Arc<dyn ValueSource> = match (values_file, feed_url) {
        (Some(path), None) => FileSource::spawn(path, stop.clone())?,
        (None, Some(url)) => {
            let config = feed_config(&url, feed_token_file, feed_ca, feed_ca_file)?;
            tracing::info!(url = %config.url, "secretless values from the operator feed");
            FeedSource::spawn(config, stop.clone())?
        }
        _ => anyhow::bail!("exactly one of --values-file and --feed-url is required"),
    };
    let ca = Arc::new(CertAuthority::generate()?);
    ca.write_bundle(&ca_bundle)?;
    let roots = upstream_ca
        .map(|path| read_pem_certificates(&path))
        .transpose()?;
    let metrics = Arc::new(ProxyMetrics::default());
    let proxy = Arc::new(Proxy::new(
        source.as_ref(),
        ca,
        UpstreamOptions {
            roots,
            resolve: resolve.into_iter().collect(),
        },
        metrics.clone(),
    )?);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("failed to listen on {listen}"))?;
    tracing::info!(%listen, bundle = %ca_bundle.display(), "secretless egress proxy ready");
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(admin) = admin_listen {
        let listener = tokio::net::TcpListener::bind(admin)
            .await
            .with_context(|| format!("failed to listen on {admin}"))?;
        let router = admin_router(source.watch(), metrics);
        let stop = stop.clone();
        tasks.spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .context("admin server failed")
        });
    }
    tasks.spawn({
        let stop = stop.clone();
        async move {
            proxy.serve(listener, stop).await;
            Ok(())
        }
    });
    tasks.spawn({
        let stop = stop.clone();
        async move {
            crate::signal::termination().await;
            stop.cancel();
            Ok(())
        }
    });
    // Any task ending ends the process: a proxy without its admin server is not ready either.
    let first = tasks.join_next().await;
    stop.cancel();
    match first {
        Some(Ok(result)) => result,
        Some(Err(e)) => Err(anyhow::anyhow!("proxy task failed: {e}")),
        None => Ok(()),
    }
}

/// The feed client's configuration from its flags.
fn feed_config(
    url: &str,
    token_file: Option<PathBuf>,
    ca: Option<String>,
    ca_file: Option<PathBuf>,
) -> anyhow::Result<FeedConfig> {
    let url = feed_client::parse_url(url)?;
    let token_file = token_file.context("--feed-url needs --feed-token-file")?;
    let ca = match (ca, ca_file) {
        (Some(pem), None) => feed_client::parse_ca(pem.as_bytes())
            .context("failed to use AGENTSECRETS_PROXY_FEED_CA (--feed-ca)")?,
        (None, Some(path)) => {
            let pem = std::fs::read(&path)
                .with_context(|| format!("failed to read {}", path.display()))?;
            feed_client::parse_ca(&pem)
                .with_context(|| format!("failed to use the feed CA {}", path.display()))?
        }
        _ => anyhow::bail!(
            "--feed-url needs the feed's CA: --feed-ca (AGENTSECRETS_PROXY_FEED_CA, PEM text) or --feed-ca-file"
        ),
    };
    Ok(FeedConfig::new(url, token_file, ca))
}

fn admin_router(
    snapshot: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    metrics: Arc<ProxyMetrics>,
) -> axum::Router {
    use axum::http::StatusCode;
    use axum::routing::get;
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = snapshot.borrow().unusable_reason().is_none();
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "no valid secret configuration",
                        )
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = metrics.encode();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Command, FromArgMatches as _};

    fn parse(args: &[&str]) -> Result<ProxyArgs, clap::Error> {
        let command = ProxyArgs::augment_args(Command::new("proxy"));
        let matches = command.try_get_matches_from(
            ["proxy", "--ca-bundle", "/tmp/b.pem"]
                .into_iter()
                .chain(args.iter().copied()),
        )?;
        ProxyArgs::from_arg_matches(&matches)
    }

    #[test]
    fn exactly_one_of_the_values_file_and_the_feed_is_required() {
        assert!(parse(&["--values-file", "/v.json"]).is_ok());
        let feed = parse(&[
            "--feed-url",
            "https://feed.agent-secrets.svc:8444/v1/feed",
            "--feed-token-file",
            "/t",
            "--feed-ca-file",
            "/ca.pem",
        ])
        .unwrap();
        assert!(feed.values_file.is_none() && feed.feed_url.is_some());
        assert!(parse(&[]).is_err(), "neither");
        assert!(
            parse(&[
                "--values-file",
                "/v.json",
                "--feed-url",
                "https://f/v1/feed",
                "--feed-token-file",
                "/t"
            ])
            .is_err(),
            "both"
        );
        assert!(
            parse(&["--feed-url", "https://f/v1/feed"]).is_err(),
            "the feed needs its token"
        );
    }

    #[test]
    fn the_feed_needs_its_ca_as_text_or_file_and_an_https_url() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        let missing = feed_config("https://f:8444/v1/feed", Some(token.clone()), None, None)
            .unwrap_err()
            .to_string();
        assert!(missing.contains("AGENTSECRETS_PROXY_FEED_CA"), "{missing}");
        let ca = rcgen::generate_simple_self_signed(vec!["f".to_owned()])
            .unwrap()
            .cert
            .pem();
        let config = feed_config(
            "https://f:8444/v1/feed",
            Some(token.clone()),
            Some(ca),
            None,
        )
        .unwrap();
        assert_eq!(config.ca.len(), 1);
        assert_eq!(config.token_file, token);
        assert!(feed_config("http://f:8444/v1/feed", Some(token), None, None).is_err());
    }
}
