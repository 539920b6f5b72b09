//! Flags of `agentsecrets run`, and the admission policy flags it shares with the offline
//! `inject` preview. Parsing only: what the flags start is wired in the parent module.

use anyhow::Context as _;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::telemetry::LogFormat;
use crate::webhook::{OwnerBinding, Policy, Principal};

/// Flags of `agentsecrets run`. Every flag but the hidden benchmark switch has an environment
/// variable fallback (a stray variable must not turn a production replica into a benchmark).
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
    /// How long new sandboxes of one owner share a pod-scoped Secret of the same content; it
    /// is deleted once this window (plus 90 s for pods not stored yet) has ended and no pod
    /// names it. Bounds how long its plaintext outlives the owner's last sandbox.
    #[arg(
        long,
        alias = "pod-secret-grace",
        env = "AGENTSECRETS_POD_SECRET_REUSE_WINDOW",
        default_value = "5m",
        value_parser = parse_duration
    )]
    pub pod_secret_reuse_window: Duration,
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
    /// Most reconciles running at once, per controller; a re-wrap waiting for the rotation
    /// rate limit is requeued and holds no slot.
    #[arg(long, env = "AGENTSECRETS_MAX_CONCURRENT_RECONCILES", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_concurrent_reconciles: u16,
    /// Readiness drops when the AgentSecret watch has been failing for longer than this: a
    /// replica that cannot see deletions must not keep injecting.
    #[arg(long, env = "AGENTSECRETS_WATCH_FAILURE_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub watch_failure_grace: Duration,
    /// Namespaces of sandbox pods, comma-separated: pod-scoped Secrets and sandbox pods are
    /// watched in these only (RBAC then grants Secret and Pod rights only there). Empty:
    /// cluster-wide.
    #[arg(long, env = "AGENTSECRETS_SANDBOX_NAMESPACES", value_delimiter = ',')]
    pub sandbox_namespaces: Vec<String>,
    /// How often the keyring and TLS files are checked for changes.
    #[arg(long, env = "AGENTSECRETS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub reload_interval: Duration,
    #[command(flatten)]
    pub bootstrap: BootstrapArgs,
    #[cfg(feature = "bench")]
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
    /// Address of the HTTPS value feed of secretless pods' proxies (same serving certificate as
    /// the webhook, no client certificate), or `off`.
    #[arg(long, env = "AGENTSECRETS_FEED_LISTEN", default_value = crate::feed::DEFAULT_FEED_LISTEN, value_parser = crate::feed::parse_feed_listen)]
    pub feed_listen: crate::feed::FeedListen,
    /// Most feed streams open at once (one per running secretless pod); past it the feed
    /// answers 503 and the proxy retries.
    #[arg(long, env = "AGENTSECRETS_FEED_MAX_STREAMS", default_value_t = crate::feed::DEFAULT_MAX_STREAMS, value_parser = clap::value_parser!(u32).range(1..))]
    pub feed_max_streams: u32,
}

/// What the operator creates and keeps for itself at run time, in its own namespace
/// (`--lease-namespace`, from `POD_NAMESPACE`), so that no key material is ever rendered by Helm.
#[derive(Debug, Clone, Args)]
pub struct BootstrapArgs {
    /// Create this Secret holding a fresh keyring (key `keyring.yaml`) when it does not exist;
    /// an existing one is never changed. Mount it where `--keyring` reads.
    #[arg(long, env = "AGENTSECRETS_KEYRING_SECRET")]
    pub keyring_secret: Option<String>,
    /// Id of the first key of a keyring created by `--keyring-secret` [default:
    /// kek-YYYYMMDD-HHMMSS].
    #[arg(long, env = "AGENTSECRETS_INITIAL_KEY_ID", requires = "keyring_secret")]
    pub initial_key_id: Option<String>,
    /// Generate the webhook's CA and serving certificate into this Secret and renew them before
    /// they expire. Mount it where `--tls-cert`/`--tls-key` read.
    #[arg(long, env = "AGENTSECRETS_TLS_SECRET", requires = "webhook_service")]
    pub tls_secret: Option<String>,
    /// The webhook's Service, whose DNS names the generated serving certificate is for.
    #[arg(long, env = "AGENTSECRETS_WEBHOOK_SERVICE")]
    pub webhook_service: Option<String>,
    /// The MutatingWebhookConfiguration whose `caBundle` is kept set to the generated CA.
    #[arg(
        long,
        env = "AGENTSECRETS_WEBHOOK_CONFIGURATION",
        requires = "tls_secret"
    )]
    pub webhook_configuration: Option<String>,
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
    /// Most pod-scoped Secrets per namespace whose reuse window has not ended; beyond it a
    /// sandbox needing a new one is refused until the window turns (sandboxes given an
    /// existing one are not).
    #[arg(
        long,
        alias = "max-unadopted-pod-secrets",
        env = "AGENTSECRETS_MAX_POD_SECRETS_PER_WINDOW",
        default_value_t = crate::webhook::DEFAULT_MAX_POD_SECRETS_PER_WINDOW
    )]
    pub max_pod_secrets_per_window: usize,
    // Boxed, so that `inject`'s arguments stay small next to the other commands'.
    #[command(flatten)]
    pub secretless: Box<SecretlessArgs>,
}

/// Secretless sandboxes: which pods are secretless, and what their proxy sidecar runs and
/// talks to.
#[derive(Debug, Clone, Args)]
pub struct SecretlessArgs {
    /// Namespaces whose sandbox pods must be secretless (pod annotation
    /// `agentsecrets.io/mode: secretless` elsewhere), comma-separated; `*` for all.
    #[arg(
        long,
        env = "AGENTSECRETS_SECRETLESS_NAMESPACES",
        value_delimiter = ','
    )]
    pub secretless_namespaces: Vec<String>,
    /// What a secretless pod does with a selected secret that has no `allowedHosts`: refuse
    /// the pod, or inject that secret's value into the environment as in env mode.
    #[arg(
        long,
        env = "AGENTSECRETS_SECRETLESS_UNSCOPED",
        value_enum,
        default_value = "refuse"
    )]
    pub secretless_unscoped: crate::webhook::pod::Unscoped,
    /// Image of the egress proxy sidecar of secretless pods (the operator's own image); without
    /// it secretless pods are refused.
    #[arg(long, env = "AGENTSECRETS_PROXY_IMAGE")]
    pub proxy_image: Option<String>,
    /// `HOST` or `HOST:PORT` (default port 8444) of the operator's value feed, as the proxy
    /// sidecars reach it [default: <--webhook-service>.<POD_NAMESPACE>.svc].
    #[arg(long, env = "AGENTSECRETS_FEED_SERVICE_HOST")]
    pub feed_service_host: Option<String>,
    /// PEM CA certificate the proxy sidecars verify the feed with; re-read when it changes.
    #[arg(
        long,
        env = "AGENTSECRETS_FEED_CA_FILE",
        default_value = "/etc/agentsecrets/tls/ca.crt"
    )]
    pub feed_ca_file: PathBuf,
}

impl SecretlessArgs {
    /// The secretless policy these flags describe.
    pub fn policy(&self) -> crate::webhook::pod::SecretlessPolicy {
        let Self {
            secretless_namespaces,
            secretless_unscoped,
            proxy_image,
            feed_service_host,
            feed_ca_file,
        } = self;
        let host = feed_service_host
            .as_deref()
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
            .or_else(default_feed_host);
        crate::webhook::pod::SecretlessPolicy {
            namespaces: crate::webhook::pod::NamespaceSet::parse(trimmed(secretless_namespaces)),
            unscoped: *secretless_unscoped,
            proxy_image: proxy_image
                .as_deref()
                .map(str::trim)
                .filter(|i| !i.is_empty())
                .map(str::to_owned),
            feed_url: host.map(|h| crate::webhook::pod::secretless::feed_url(&h)),
            feed_ca: crate::webhook::pod::FeedCa::file(feed_ca_file.clone()),
        }
    }
}

/// The webhook Service's DNS name, which also serves the feed: from `--webhook-service`'s
/// variable and the downward API's `POD_NAMESPACE`.
fn default_feed_host() -> Option<String> {
    let service = std::env::var("AGENTSECRETS_WEBHOOK_SERVICE").ok()?;
    let namespace = std::env::var("POD_NAMESPACE").ok()?;
    Some(format!("{service}.{namespace}.svc"))
}

fn principals(flag: &str, entries: &[String]) -> anyhow::Result<Vec<Principal>> {
    entries
        .iter()
        .filter(|p| !p.trim().is_empty())
        .map(|p| Principal::parse(p).with_context(|| format!("--{flag}: invalid principal {p:?}")))
        .collect()
}

pub(crate) fn trimmed(entries: &[String]) -> impl Iterator<Item = String> + '_ {
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
            max_pod_secrets_per_window,
            secretless,
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
            max_pod_secrets_per_window: *max_pod_secrets_per_window,
            pod_secret_reuse_window: crate::webhook::DEFAULT_POD_SECRET_REUSE_WINDOW,
            secretless: secretless.policy(),
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
#[cfg(feature = "bench")]
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Command, FromArgMatches as _};

    fn run_args(args: &[&str]) -> RunArgs {
        let command = RunArgs::augment_args(Command::new("run"));
        let matches = command
            .try_get_matches_from(std::iter::once("run").chain(args.iter().copied()))
            .unwrap();
        RunArgs::from_arg_matches(&matches).unwrap()
    }

    #[test]
    fn every_flag_has_an_environment_fallback_except_the_benchmark_builds_switch() {
        let command = RunArgs::augment_args(Command::new("run"));
        let without: Vec<&str> = command
            .get_arguments()
            .filter(|arg| arg.get_env().is_none())
            .map(|arg| arg.get_id().as_str())
            .collect();
        let expected: &[&str] = if cfg!(feature = "bench") {
            &["bench_synthetic_cache"]
        } else {
            &[]
        };
        assert_eq!(without, expected);
    }

    #[test]
    fn controller_flags_have_safe_defaults_and_parse() {
        let defaults = run_args(&[]);
        assert_eq!(defaults.max_concurrent_reconciles, 4);
        assert_eq!(defaults.watch_failure_grace, Duration::from_secs(30));
        assert!(defaults.sandbox_namespaces.is_empty());
        let set = run_args(&[
            "--max-concurrent-reconciles",
            "8",
            "--watch-failure-grace",
            "1m",
            "--sandbox-namespaces",
            "team-a,team-b",
        ]);
        assert_eq!(set.max_concurrent_reconciles, 8);
        assert_eq!(set.watch_failure_grace, Duration::from_secs(60));
        assert_eq!(set.sandbox_namespaces, ["team-a", "team-b"]);
        let command = RunArgs::augment_args(Command::new("run"));
        assert!(
            command
                .try_get_matches_from(["run", "--max-concurrent-reconciles", "0"])
                .is_err(),
            "zero would mean unbounded to kube-runtime"
        );
    }

    #[test]
    fn secretless_flags_parse_into_the_policy() {
        let defaults = run_args(&["--feed-service-host", "feed.ops.svc"])
            .policy
            .secretless;
        let policy = defaults.policy();
        assert_eq!(policy.unscoped, crate::webhook::pod::Unscoped::Refuse);
        assert!(!policy.namespaces.contains("any"));
        assert_eq!(policy.proxy_image, None);
        assert_eq!(
            policy.feed_url.as_deref(),
            Some("https://feed.ops.svc:8444/v1/feed")
        );
        let set = run_args(&[
            "--secretless-namespaces",
            "team-a, team-b",
            "--secretless-unscoped",
            "env",
            "--proxy-image",
            "registry.example/agent-secrets:1",
            "--feed-service-host",
            "feed.ops.svc:9444",
        ])
        .policy
        .secretless
        .policy();
        assert!(set.namespaces.contains("team-b") && !set.namespaces.contains("team-c"));
        assert_eq!(set.unscoped, crate::webhook::pod::Unscoped::Env);
        assert_eq!(
            set.proxy_image.as_deref(),
            Some("registry.example/agent-secrets:1")
        );
        assert_eq!(
            set.feed_url.as_deref(),
            Some("https://feed.ops.svc:9444/v1/feed")
        );
        let all = run_args(&["--secretless-namespaces", "*"])
            .policy
            .secretless
            .policy();
        assert!(all.namespaces.contains("anything"));
        let command = RunArgs::augment_args(Command::new("run"));
        assert!(
            command
                .try_get_matches_from(["run", "--secretless-unscoped", "allow"])
                .is_err()
        );
    }

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

    #[test]
    fn the_feed_listens_on_8444_unless_off() {
        assert_eq!(
            run_args(&[]).feed_listen,
            crate::feed::FeedListen::On("0.0.0.0:8444".parse().unwrap())
        );
        assert_eq!(
            run_args(&["--feed-listen", "off"]).feed_listen,
            crate::feed::FeedListen::Off
        );
        assert_eq!(run_args(&["--feed-max-streams", "7"]).feed_max_streams, 7);
    }
}
