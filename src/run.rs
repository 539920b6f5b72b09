//! `agentsecrets run`: wire the keyring, the AgentSecret cache, the webhook and admin servers
//! and the controller together, and shut them all down on SIGTERM.

use anyhow::Context as _;
use clap::Args;
use futures::StreamExt as _;
use kube::runtime::{WatchStreamExt as _, watcher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::api::AgentSecret;
use crate::cache::SecretIndex;
use crate::controller::Context;
use crate::controller::lease::Elector;
use crate::crypto::KeyringHandle;
use crate::telemetry::{LogFormat, Metrics};
use crate::webhook::server::{AppState, KubeSecretWriter};
use crate::webhook::{OwnerBinding, Policy, Principal, server};

/// Flags of `agentsecrets run`. Every flag has an environment variable fallback.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Address of the HTTPS admission webhook.
    #[arg(
        long,
        env = "AGENTSECRETS_WEBHOOK_ADDR",
        default_value = "0.0.0.0:8443"
    )]
    pub webhook_addr: SocketAddr,
    /// Address of the plain-HTTP admin server (/healthz, /readyz, /metrics).
    #[arg(long, env = "AGENTSECRETS_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,
    /// PEM certificate chain of the webhook; reloaded when the file changes.
    #[arg(
        long,
        env = "AGENTSECRETS_TLS_CERT",
        default_value = "/etc/agentsecrets/tls/tls.crt"
    )]
    pub tls_cert: PathBuf,
    /// PEM private key of the webhook; reloaded when the file changes.
    #[arg(
        long,
        env = "AGENTSECRETS_TLS_KEY",
        default_value = "/etc/agentsecrets/tls/tls.key"
    )]
    pub tls_key: PathBuf,
    /// PEM CA bundle; when set, the webhook requires a client certificate issued by it (the
    /// API server's, from its AdmissionConfiguration kubeConfigFile). Reloaded with the
    /// certificate.
    #[arg(long, env = "AGENTSECRETS_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// Keyring file (`primary: <id>`, `keys: [{id, key}]`); reloaded when it changes.
    #[arg(
        long,
        env = "AGENTSECRETS_KEYRING",
        default_value = "/etc/agentsecrets/keyring/keyring.yaml"
    )]
    pub keyring: PathBuf,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Delete a pod-scoped Secret whose pod has not appeared after this long.
    #[arg(long, env = "AGENTSECRETS_POD_SECRET_GRACE", default_value = "5m", value_parser = parse_duration)]
    pub pod_secret_grace: Duration,
    /// Most AgentSecret re-wraps written per second during a key rotation.
    #[arg(long, env = "AGENTSECRETS_ROTATION_RATE", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub rotation_rate: u32,
    /// Name of the Lease that elects the replica running the controller.
    #[arg(
        long,
        env = "AGENTSECRETS_LEASE_NAME",
        default_value = "agent-secrets-controller"
    )]
    pub lease_name: String,
    /// Namespace of the Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "agent-secrets")]
    pub lease_namespace: String,
    /// How long a Lease holder stays leader without renewing; a crashed leader is replaced
    /// within this time.
    #[arg(long, env = "AGENTSECRETS_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// This replica's identity in the Lease [default: the host name].
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How often the keyring and TLS files are checked for changes.
    #[arg(long, env = "AGENTSECRETS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub reload_interval: Duration,
    /// Benchmark mode, without a cluster: fill the cache with OWNERSxSECRETS synthetic
    /// AgentSecrets (owners `user-N`, namespace `bench`) sealed under the keyring's primary, and
    /// discard pod-scoped Secrets instead of creating them. Nothing is watched or reconciled.
    #[arg(long, hide = true, value_name = "OWNERSxSECRETS", value_parser = parse_synthetic)]
    pub bench_synthetic_cache: Option<(usize, usize)>,
    /// Log format.
    #[arg(
        long,
        env = "AGENTSECRETS_LOG_FORMAT",
        value_enum,
        default_value = "json"
    )]
    pub log_format: LogFormat,
}

/// The admission policy's flags, shared by `run` and the offline `inject` preview so that both
/// decide alike.
#[derive(Debug, Clone, Args)]
pub struct PolicyArgs {
    /// Principals allowed to create sandbox pods: usernames (e.g.
    /// `system:serviceaccount:sandboxes:orchestrator`) or `group:NAME`, comma-separated.
    /// Empty: anyone who may create pods in the namespace. Set it for shared namespaces.
    #[arg(long, env = "AGENTSECRETS_ALLOWED_PRINCIPALS", value_delimiter = ',')]
    pub allowed_principals: Vec<String>,
    /// Env names refused in addition to the built-in reserved ones, comma-separated.
    #[arg(long, env = "AGENTSECRETS_RESERVED_ENV_NAMES", value_delimiter = ',')]
    pub reserved_env_names: Vec<String>,
    /// Namespaces whose pods are never injected, comma-separated.
    #[arg(
        long,
        env = "AGENTSECRETS_EXCLUDED_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system"
    )]
    pub excluded_namespaces: Vec<String>,
    /// The AgentSecret owner `bob` is the user `<prefix>bob` (e.g. `oidc:` when the API server
    /// prefixes usernames).
    #[arg(long, env = "AGENTSECRETS_OWNER_USERNAME_PREFIX", default_value = "")]
    pub owner_username_prefix: String,
    /// Members of the group `<prefix>bob` act as the owner `bob`; empty: no group ownership.
    #[arg(
        long,
        env = "AGENTSECRETS_OWNER_GROUP_PREFIX",
        default_value = crate::webhook::DEFAULT_OWNER_GROUP_PREFIX
    )]
    pub owner_group_prefix: String,
    /// Principals that may write any owner's AgentSecrets (the platform's backend acting for
    /// users): usernames or `group:NAME`, comma-separated.
    #[arg(
        long,
        env = "AGENTSECRETS_SECRET_ADMINISTRATORS",
        value_delimiter = ','
    )]
    pub secret_administrators: Vec<String>,
    /// Most pod-scoped Secrets per namespace that may wait for their pod; beyond it sandbox
    /// pods are refused until pods adopt theirs.
    #[arg(
        long,
        env = "AGENTSECRETS_MAX_UNADOPTED_POD_SECRETS",
        default_value_t = crate::webhook::DEFAULT_MAX_UNADOPTED_POD_SECRETS
    )]
    pub max_unadopted_pod_secrets: usize,
}

fn principals(flag: &str, entries: &[String]) -> anyhow::Result<Vec<Principal>> {
    entries
        .iter()
        .filter(|p| !p.trim().is_empty())
        .map(|p| Principal::parse(p).with_context(|| format!("--{flag}: invalid principal {p:?}")))
        .collect()
}

fn trimmed(entries: &[String]) -> impl Iterator<Item = String> + '_ {
    entries
        .iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

impl PolicyArgs {
    /// The admission policy these flags describe; `operator` is the operator's own username.
    pub fn policy(&self, operator: Option<String>) -> anyhow::Result<Policy> {
        let Self {
            allowed_principals,
            reserved_env_names,
            excluded_namespaces,
            owner_username_prefix,
            owner_group_prefix,
            secret_administrators,
            max_unadopted_pod_secrets,
        } = self;
        Ok(Policy {
            allowed_principals: principals("allowed-principals", allowed_principals)?,
            extra_reserved_env_names: trimmed(reserved_env_names).collect(),
            excluded_namespaces: trimmed(excluded_namespaces).collect(),
            owner_binding: OwnerBinding {
                username_prefix: owner_username_prefix.clone(),
                group_prefix: owner_group_prefix.clone(),
                administrators: principals("secret-administrators", secret_administrators)?,
                operator,
            },
            max_unadopted_pod_secrets: *max_unadopted_pod_secrets,
        })
    }
}

/// The operator's own username, from the downward API (`POD_NAMESPACE`, and
/// `POD_SERVICE_ACCOUNT` from `spec.serviceAccountName`).
pub fn operator_username() -> Option<String> {
    let namespace = std::env::var("POD_NAMESPACE").ok()?;
    let account = std::env::var("POD_SERVICE_ACCOUNT").ok()?;
    Some(format!("system:serviceaccount:{namespace}:{account}"))
}

/// Parse `300ms`, `15s`, `5m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit: use ms, s, m or h"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let millis = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(format!(
                "{text:?} has unknown unit {unit:?}: use ms, s, m or h"
            ));
        }
    };
    Ok(Duration::from_millis(number.saturating_mul(millis)))
}

/// Parse `OWNERSxSECRETS`, e.g. `5000x20`.
pub fn parse_synthetic(text: &str) -> Result<(usize, usize), String> {
    let (owners, secrets) = text
        .split_once('x')
        .ok_or_else(|| format!("{text:?} is not OWNERSxSECRETS, e.g. 5000x20"))?;
    let parse = |n: &str| {
        n.parse::<usize>()
            .map_err(|_| format!("{text:?} is not OWNERSxSECRETS, e.g. 5000x20"))
    };
    Ok((parse(owners)?, parse(secrets)?))
}

/// Resolve on SIGTERM or Ctrl-C.
async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Feed the cache from a watch on every AgentSecret until `stop` is cancelled.
pub async fn watch_agentsecrets(
    client: kube::Client,
    index: Arc<SecretIndex>,
    stop: CancellationToken,
) {
    let api = kube::Api::<AgentSecret>::all(client);
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    tokio::pin!(stream);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            event = stream.next() => match event {
                Some(Ok(event)) => index.apply(event),
                // The backoff retries; the error names the API call, not object contents.
                Some(Err(error)) => tracing::warn!(%error, "AgentSecret watch failed; retrying"),
                None => return,
            },
        }
    }
}

/// Feed the pod-scoped Secret index from a metadata-only watch (values are never read) until
/// `stop` is cancelled.
pub async fn watch_pod_secrets(
    client: kube::Client,
    index: Arc<crate::cache::PodSecretIndex>,
    stop: CancellationToken,
) {
    use crate::api::{MANAGED_BY_LABEL, MANAGED_BY_VALUE, POD_SCOPED_LABEL};
    let selector = format!("{POD_SCOPED_LABEL}=true,{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}");
    let api =
        kube::Api::<kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Secret>>::all(client);
    let stream = watcher(api, watcher::Config::default().labels(&selector)).default_backoff();
    tokio::pin!(stream);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            event = stream.next() => match event {
                Some(Ok(event)) => index.apply(event),
                Some(Err(error)) => tracing::warn!(%error, "pod-scoped Secret watch failed; retrying"),
                None => return,
            },
        }
    }
}

/// Wait for leadership, then run the controllers until shutdown or until leadership is lost
/// (the elector then fails, which stops the process).
async fn run_controller_while_leader(
    ctx: Arc<Context>,
    mut leader: tokio::sync::watch::Receiver<bool>,
    stop: CancellationToken,
) {
    tokio::select! {
        () = stop.cancelled() => return,
        became = leader.wait_for(|leading| *leading) => if became.is_err() { return },
    }
    tracing::info!("starting the controller");
    let lost = async move {
        let _ = leader.wait_for(|leading| !*leading).await;
    };
    let shutdown = async move {
        tokio::select! {
            () = stop.cancelled() => {}
            () = lost => {}
        }
    };
    crate::controller::run(ctx, shutdown).await;
    tracing::info!("controller stopped");
}

/// Run the operator until SIGTERM.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let RunArgs {
        webhook_addr,
        admin_addr,
        tls_cert,
        tls_key,
        client_ca,
        keyring,
        policy,
        pod_secret_grace,
        rotation_rate,
        lease_name,
        lease_namespace,
        lease_duration,
        identity,
        reload_interval,
        bench_synthetic_cache,
        log_format,
    } = args.clone();
    let identity = identity
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("agentsecrets-{}", std::process::id()));
    crate::telemetry::init_logging(log_format);
    let policy = Arc::new(policy.policy(operator_username())?);
    if policy.allowed_principals.is_empty() {
        tracing::warn!(
            "no --allowed-principals: anyone who may create pods can label one for any owner in their namespace"
        );
    }

    let client = match bench_synthetic_cache {
        Some(_) => None,
        None => Some(
            kube::Client::try_default()
                .await
                .context("failed to configure the Kubernetes client (in-cluster or KUBECONFIG)")?,
        ),
    };
    let tls = crate::webhook::tls::load(&tls_cert, &tls_key, client_ca.as_deref()).with_context(
        || {
            format!(
                "failed to load the webhook certificate {} and key {}",
                tls_cert.display(),
                tls_key.display()
            )
        },
    )?;
    let webhook_listener = server::bind(webhook_addr)
        .with_context(|| format!("failed to listen on {webhook_addr}"))?;
    let admin_listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("failed to listen on {admin_addr}"))?;

    let stop = CancellationToken::new();
    let keyring_handle = KeyringHandle::default();
    let index = Arc::new(SecretIndex::default());
    let metrics = Arc::new(Metrics::default());
    let pod_secrets = Arc::new(crate::cache::PodSecretIndex::default());
    if let Some((owners, per_owner)) = bench_synthetic_cache {
        let ring = crate::crypto::Keyring::load(&keyring)?;
        index.replace_all(crate::cache::synthetic(&ring, "bench", owners, per_owner)?);
        keyring_handle.replace(ring);
        tracing::warn!(
            secrets = index.len(),
            "benchmark mode: synthetic cache, no cluster, pod-scoped Secrets are discarded"
        );
    }
    let writer: Arc<dyn server::SecretWriter> = match &client {
        Some(client) => Arc::new(KubeSecretWriter {
            client: client.clone(),
        }),
        None => Arc::new(server::DiscardingWriter),
    };
    let state = AppState {
        keyring: keyring_handle.clone(),
        index: index.clone(),
        policy,
        writer,
        metrics,
        pod_secrets: pod_secrets.clone(),
    };

    let mut tasks = tokio::task::JoinSet::new();
    {
        let stop = stop.clone();
        tasks.spawn(async move {
            keyring_handle
                .watch_file(keyring, reload_interval, stop.cancelled_owned())
                .await;
            Ok(())
        });
    }
    {
        let stop = stop.clone();
        let tls = tls.clone();
        tasks.spawn(async move {
            server::watch_tls_files(
                tls,
                tls_cert,
                tls_key,
                client_ca,
                reload_interval,
                stop.cancelled_owned(),
            )
            .await;
            Ok(())
        });
    }
    if let Some(client) = client.clone() {
        let stop = stop.clone();
        tasks.spawn(async move {
            watch_agentsecrets(client, index, stop).await;
            Ok(())
        });
    }
    if let Some(client) = client.clone() {
        let stop = stop.clone();
        tasks.spawn(async move {
            watch_pod_secrets(client, pod_secrets, stop).await;
            Ok(())
        });
    }
    {
        let stop = stop.clone();
        let router = server::webhook_router(state.clone());
        tasks.spawn(async move {
            server::serve_webhook(webhook_listener, tls, router, stop.cancelled_owned())
                .await
                .context("webhook server failed")
        });
    }
    {
        let stop = stop.clone();
        let router = server::admin_router(state.clone());
        tasks.spawn(async move {
            server::serve_admin(admin_listener, router, stop.cancelled_owned())
                .await
                .context("admin server failed")
        });
    }
    // Only the Lease holder reconciles and writes; every replica serves admission.
    if let Some(client) = client {
        let (leader_tx, leader_rx) = tokio::sync::watch::channel(false);
        let elector = Elector {
            api: kube::Api::namespaced(client.clone(), &lease_namespace),
            name: lease_name,
            identity: identity.clone(),
            duration: lease_duration,
        };
        let elector_stop = stop.clone();
        tasks.spawn(async move {
            elector
                .run(leader_tx, elector_stop)
                .await
                .context("leader election stopped")
        });
        let ctx = Arc::new(Context::new(
            client,
            state.keyring.clone(),
            state.index.clone(),
            state.metrics.clone(),
            rotation_rate,
            pod_secret_grace,
            Some(identity),
        ));
        let stop = stop.clone();
        tasks.spawn(async move {
            run_controller_while_leader(ctx, leader_rx, stop).await;
            Ok(())
        });
    }
    tracing::info!(%webhook_addr, %admin_addr, "agent-secrets started");

    let mut result = Ok(());
    tokio::select! {
        () = termination_signal() => tracing::info!("termination signal received; shutting down"),
        Some(joined) = tasks.join_next() => {
            // A task ended before shutdown: that is a failure of the whole process.
            result = match joined {
                Ok(Ok(())) => Err(anyhow::anyhow!("a background task stopped unexpectedly")),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(anyhow::anyhow!("a background task panicked: {e}")),
            };
        }
    }
    stop.cancel();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "task failed during shutdown");
                if result.is_ok() {
                    result = Err(e);
                }
            }
            Err(e) => tracing::error!(error = %e, "task panicked during shutdown"),
        }
    }
    tracing::info!("agent-secrets stopped");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("15").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
