//! `agentsecrets ui`: the Secrets page. Each signed-in user lists, adds, edits and deletes
//! their own secrets in a browser (and through a small JSON API), behind the platform's
//! authenticating proxy, with every Kubernetes call made as that user (impersonation).

pub mod assets;
pub mod config;
pub mod csrf;
pub mod identity;
pub mod impersonate;
pub mod json;
pub mod naming;
pub mod pages;
pub mod secrets;
pub mod server;

use anyhow::Context as _;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::telemetry::LogFormat;
use crate::webhook::tls::{ClientCertificates, TlsFiles, watch_tls_files};
use config::{NamespaceRule, Settings};

/// Errors of the Secrets page.
#[derive(Debug, thiserror::Error)]
pub enum UiError {
    #[error(
        "your username {username:?} does not start with {prefix:?}, the prefix this cluster gives users who own secrets; ask your platform team"
    )]
    UsernamePrefix { username: String, prefix: String },
    #[error(
        "the owner name {0:?} is not a valid Kubernetes label value (at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit), so secrets cannot be stored for it; ask your platform team to map your account to such a name"
    )]
    OwnerName(String),
    #[error(
        "your secrets would live in namespace {namespace:?}, which is not a valid namespace name (derived from owner {owner:?}); ask your platform team"
    )]
    NamespaceName { owner: String, namespace: String },
    #[error(
        "{0:?} is a name Kubernetes reserves for its own components, not a person; the Secrets page does not act as it"
    )]
    SystemName(String),
    #[error("failed to set up CSRF protection: {0}")]
    CsrfKey(String),
    #[error("failed to configure the Secrets page: {0}")]
    Config(String),
}

/// Flags of `agentsecrets ui`. Every flag has an environment variable fallback.
#[derive(Debug, Clone, Args)]
pub struct UiArgs {
    /// Address to serve the page on (HTTPS with --tls-cert, else plain HTTP, e.g. behind a
    /// proxy sidecar on 127.0.0.1).
    #[arg(long, env = "AGENTSECRETS_UI_ADDR", default_value = "0.0.0.0:8080")]
    pub addr: SocketAddr,
    /// PEM certificate chain to serve HTTPS with.
    #[arg(long, env = "AGENTSECRETS_UI_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "AGENTSECRETS_UI_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA that signs the authenticating proxy's client certificate. Identity headers are
    /// then accepted only on connections presenting a certificate it signed. Needs --tls-cert.
    #[arg(long, env = "AGENTSECRETS_UI_PROXY_CLIENT_CA", requires = "tls_cert")]
    pub proxy_client_ca: Option<PathBuf>,
    /// Source addresses of the authenticating proxy (CIDRs or addresses, comma-separated).
    /// Identity headers from anywhere else are refused. With --proxy-client-ca as well, both
    /// must hold.
    #[arg(long, env = "AGENTSECRETS_UI_TRUSTED_PROXY_CIDRS", value_delimiter = ',', value_parser = config::parse_cidr)]
    pub trusted_proxy_cidrs: Vec<ipnet::IpNet>,
    /// Header holding the signed-in username.
    #[arg(
        long,
        env = "AGENTSECRETS_UI_USER_HEADER",
        default_value = "X-Forwarded-User"
    )]
    pub user_header: String,
    /// Header holding the user's groups, comma-separated.
    #[arg(
        long,
        env = "AGENTSECRETS_UI_GROUPS_HEADER",
        default_value = "X-Forwarded-Groups"
    )]
    pub groups_header: String,
    /// Prefix removed from the username to get the owner name; the same as the operator's
    /// owner binding (`run --owner-username-prefix`).
    #[arg(long, env = "AGENTSECRETS_OWNER_USERNAME_PREFIX", default_value = "")]
    pub owner_username_prefix: String,
    /// Namespace holding every user's secrets.
    #[arg(
        long,
        env = "AGENTSECRETS_UI_NAMESPACE",
        conflicts_with = "namespace_template",
        required_unless_present = "namespace_template"
    )]
    pub namespace: Option<String>,
    /// Namespace per user, `{user}` replaced by the owner name, e.g. `user-{user}`.
    #[arg(long, env = "AGENTSECRETS_UI_NAMESPACE_TEMPLATE")]
    pub namespace_template: Option<String>,
    /// Env names refused in addition to the built-in reserved ones, comma-separated (the same
    /// list as the webhook's `--reserved-env-names`).
    #[arg(long, env = "AGENTSECRETS_RESERVED_ENV_NAMES", value_delimiter = ',')]
    pub reserved_env_names: Vec<String>,
    /// File with at least 32 bytes of secret key material for CSRF tokens, shared by all
    /// replicas [default: a random key per process, fine for one replica].
    #[arg(long, env = "AGENTSECRETS_UI_CSRF_KEY_FILE")]
    pub csrf_key_file: Option<PathBuf>,
    /// How often --tls-cert, --tls-key and --proxy-client-ca are checked for changes; a
    /// changed set is served to new connections without a restart (cert-manager renews in
    /// place).
    #[arg(long, env = "AGENTSECRETS_UI_RELOAD_INTERVAL", default_value = "10s", value_parser = crate::run::parse_duration)]
    pub reload_interval: std::time::Duration,
    /// Log format.
    #[arg(
        long,
        env = "AGENTSECRETS_LOG_FORMAT",
        value_enum,
        default_value = "json"
    )]
    pub log_format: LogFormat,
}

impl UiArgs {
    /// The page's settings, checked.
    pub fn settings(&self) -> Result<Settings, UiError> {
        let Self {
            addr: _,
            tls_cert: _,
            tls_key: _,
            proxy_client_ca,
            trusted_proxy_cidrs,
            user_header,
            groups_header,
            owner_username_prefix,
            namespace,
            namespace_template,
            reserved_env_names,
            csrf_key_file: _,
            reload_interval: _,
            log_format: _,
        } = self;
        if trusted_proxy_cidrs.is_empty() && proxy_client_ca.is_none() {
            return Err(UiError::Config(
                "say how to recognise the authenticating proxy: --trusted-proxy-cidrs, --proxy-client-ca, or both".into(),
            ));
        }
        let header = |name: &str| {
            axum::http::HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| UiError::Config(format!("{name:?} is not a valid header name")))
        };
        let namespace = match (namespace, namespace_template) {
            (Some(ns), None) if config::is_dns_label(ns) => NamespaceRule::Fixed(ns.clone()),
            (Some(ns), None) => {
                return Err(UiError::Config(format!(
                    "--namespace {ns:?} is not a valid namespace name"
                )));
            }
            (None, Some(t)) if t.contains("{user}") => NamespaceRule::Template(t.clone()),
            _ => {
                return Err(UiError::Config(
                    "give --namespace NS, or --namespace-template containing {user}".into(),
                ));
            }
        };
        Ok(Settings {
            trusted_proxy_cidrs: trusted_proxy_cidrs.clone(),
            require_proxy_certificate: proxy_client_ca.is_some(),
            user_header: header(user_header)?,
            groups_header: header(groups_header)?,
            owner_username_prefix: owner_username_prefix.clone(),
            namespace,
            extra_reserved_env_names: reserved_env_names
                .iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
        })
    }
}

/// The page's log filter for a `RUST_LOG`-style `spec`, with `kube_client` capped at `info`
/// whatever the spec says. At `debug` it logs an unsuccessful API answer verbatim, and the
/// answer to a write of a value could quote the value; the page is the one component that
/// sends values to the API server.
pub fn log_filter(spec: &str) -> tracing_subscriber::EnvFilter {
    let filter = tracing_subscriber::EnvFilter::try_new(spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    ["kube_client=info", "kube_client::client=info"]
        .iter()
        .filter_map(|d| d.parse().ok())
        .fold(filter, |filter, directive| filter.add_directive(directive))
}

fn init_logging(format: LogFormat) {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let builder = tracing_subscriber::fmt().with_env_filter(log_filter(&spec));
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Run the page until SIGTERM or Ctrl-C.
pub async fn run(args: UiArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let settings = args.settings()?;
    let csrf = match &args.csrf_key_file {
        Some(path) => {
            let material = zeroize::Zeroizing::new(
                std::fs::read(path)
                    .with_context(|| format!("failed to read the CSRF key {}", path.display()))?,
            );
            csrf::CsrfKey::from_bytes(&material)?
        }
        None => csrf::CsrfKey::generate()?,
    };
    let client = kube::Client::try_default()
        .await
        .context("failed to configure the Kubernetes client (in-cluster or KUBECONFIG)")?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let files = tls_files(cert, key, args.proxy_client_ca.as_deref());
            let config = files.server_config()?;
            Some((files, config))
        }
        _ => None,
    };
    let state = server::UiState::new(server::Shared {
        settings,
        client,
        csrf,
        tls: tls.is_some(),
    });
    let app = server::router(state).into_make_service_with_connect_info::<SocketAddr>();
    tracing::info!(addr = %args.addr, tls = tls.is_some(), "serving the Secrets page");
    match tls {
        Some((files, config)) => {
            let handle = axum_server::Handle::new();
            let stopper = handle.clone();
            tokio::spawn(async move {
                crate::signal::termination().await;
                stopper.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
            });
            let rustls_config =
                axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(config));
            // The page exports no metrics: nothing to report the reloads to but the log.
            tokio::spawn(watch_tls_files(
                rustls_config.clone(),
                files,
                args.reload_interval,
                None,
                crate::signal::termination(),
            ));
            let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(rustls_config);
            axum_server::bind(args.addr)
                .acceptor(server::ProxyCertificateAcceptor::new(acceptor))
                .handle(handle)
                .serve(app)
                .await
                .with_context(|| format!("failed to serve on {}", args.addr))?;
        }
        None => {
            let listener = tokio::net::TcpListener::bind(args.addr)
                .await
                .with_context(|| format!("failed to listen on {}", args.addr))?;
            axum::serve(listener, app)
                .with_graceful_shutdown(crate::signal::termination())
                .await
                .context("failed to serve the Secrets page")?;
        }
    }
    Ok(())
}

/// The page's TLS files: with `client_ca`, client certificates it signed are verified (and
/// optional, so that probes and the refusal page still work without one).
pub fn tls_files(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: Option<&std::path::Path>,
) -> TlsFiles {
    TlsFiles {
        cert: cert.to_owned(),
        key: key.to_owned(),
        client_ca: client_ca.map(std::path::Path::to_owned),
        client_certificates: ClientCertificates::Optional,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn parse(args: &[&str]) -> Result<Settings, String> {
        let cli =
            crate::cli::Cli::try_parse_from(["agentsecrets", "ui"].iter().chain(args).copied())
                .map_err(|e| e.to_string())?;
        let crate::cli::Command::Ui(ui) = cli.command else {
            return Err("not the ui command".into());
        };
        ui.settings().map_err(|e| e.to_string())
    }

    #[test]
    fn the_flags_the_chart_renders_are_accepted() {
        let settings = parse(&[
            "--addr=127.0.0.1:8080",
            "--namespace-template=user-{user}",
            "--trusted-proxy-cidrs=127.0.0.1/32,10.0.0.0/8",
            "--user-header=X-Forwarded-User",
            "--groups-header=X-Forwarded-Groups",
            "--owner-username-prefix=oidc:",
            "--reserved-env-names=NODE_OPTIONS, ",
            "--csrf-key-file=/etc/agentsecrets/ui-csrf/key",
            "--log-format=json",
        ])
        .unwrap();
        assert_eq!(settings.trusted_proxy_cidrs.len(), 2);
        assert_eq!(settings.owner_username_prefix, "oidc:");
        assert_eq!(settings.extra_reserved_env_names, ["NODE_OPTIONS"]);
        assert_eq!(
            settings.namespace,
            NamespaceRule::Template("user-{user}".into())
        );
        assert!(!settings.require_proxy_certificate);
    }

    #[test]
    fn settings_that_cannot_identify_the_proxy_or_the_namespace_are_refused() {
        let no_trust = parse(&["--namespace=sandboxes"]).unwrap_err();
        assert!(no_trust.contains("--trusted-proxy-cidrs"), "{no_trust}");
        let both = parse(&[
            "--namespace=a",
            "--namespace-template=u-{user}",
            "--trusted-proxy-cidrs=127.0.0.1",
        ])
        .unwrap_err();
        assert!(both.contains("cannot be used with"), "{both}");
        let neither = parse(&["--trusted-proxy-cidrs=127.0.0.1"]).unwrap_err();
        assert!(neither.contains("--namespace"), "{neither}");
        let no_user = parse(&[
            "--namespace-template=users",
            "--trusted-proxy-cidrs=127.0.0.1",
        ])
        .unwrap_err();
        assert!(no_user.contains("{user}"), "{no_user}");
        let bad_ns = parse(&[
            "--namespace=Not_A_Namespace",
            "--trusted-proxy-cidrs=127.0.0.1",
        ])
        .unwrap_err();
        assert!(bad_ns.contains("not a valid namespace name"), "{bad_ns}");
        let ca_without_tls = parse(&["--namespace=a", "--proxy-client-ca=/ca.pem"]).unwrap_err();
        assert!(ca_without_tls.contains("--tls-cert"), "{ca_without_tls}");
        let bad_cidr = parse(&["--namespace=a", "--trusted-proxy-cidrs=proxy.local"]).unwrap_err();
        assert!(bad_cidr.contains("not a CIDR"), "{bad_cidr}");
    }
}
