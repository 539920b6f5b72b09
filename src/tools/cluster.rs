//! The kubectl connection flags every cluster-facing command shares, and how they pick a
//! kubeconfig, a context, a namespace and an identity, with the meaning kubectl gives them.

use clap::Args;
use clap_complete::engine::{ArgValueCompleter, CompletionCandidate};
use kube::config::{Config, KubeConfigOptions, Kubeconfig, KubeconfigError};
use std::path::PathBuf;

use super::error::Error;

/// `--kubeconfig`, `--context`, `--cluster`, `--user`, `-n/--namespace`, `--as`, `--as-group`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Args)]
#[command(next_help_heading = "Cluster connection (as kubectl)")]
pub struct ClusterArgs {
    /// Path to the kubeconfig file [default: $KUBECONFIG (a list of files, merged), else
    /// ~/.kube/config, else the in-cluster service account].
    #[arg(long, value_name = "FILE", value_hint = clap::ValueHint::FilePath)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use [default: its current-context].
    #[arg(long, value_name = "NAME", add = ArgValueCompleter::new(kubeconfig_contexts))]
    pub context: Option<String>,
    /// The kubeconfig cluster to use [default: the context's].
    #[arg(long, value_name = "NAME")]
    pub cluster: Option<String>,
    /// The kubeconfig user to use [default: the context's].
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// Namespace [default: the context's namespace, else "default"].
    #[arg(short = 'n', long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// User to impersonate for the request (needs the `impersonate` verb).
    #[arg(long = "as", value_name = "USER")]
    pub impersonate: Option<String>,
    /// Group to impersonate; repeat for several. Needs --as, as in kubectl.
    #[arg(long = "as-group", value_name = "GROUP", requires = "impersonate")]
    pub impersonate_groups: Vec<String>,
}

/// The ids of the flags that choose a connection (all but the namespace): commands that can
/// also work offline declare them in conflict with their offline input.
pub const CONNECTION_FLAGS: [&str; 6] = [
    "kubeconfig",
    "context",
    "cluster",
    "user",
    "impersonate",
    "impersonate_groups",
];

/// A client and the namespace the command works in.
pub struct Connection {
    pub client: kube::Client,
    /// `-n`, else the context's namespace.
    pub namespace: String,
}

impl ClusterArgs {
    fn options(&self) -> KubeConfigOptions {
        KubeConfigOptions {
            context: self.context.clone(),
            cluster: self.cluster.clone(),
            user: self.user.clone(),
        }
    }

    fn selects_from_kubeconfig(&self) -> bool {
        self.kubeconfig.is_some()
            || self.context.is_some()
            || self.cluster.is_some()
            || self.user.is_some()
    }

    /// The client configuration these flags select, before any request is made.
    pub async fn config(&self) -> Result<Config, Error> {
        let kubeconfig = match &self.kubeconfig {
            // kubectl reads an explicit --kubeconfig alone, without merging $KUBECONFIG.
            Some(path) => Some(Kubeconfig::read_from(path).map_err(no_cluster)?),
            None => match Kubeconfig::from_env().map_err(no_cluster)? {
                Some(merged) => Some(merged),
                None => match Kubeconfig::read() {
                    Ok(config) => Some(config),
                    // No file at all: inside a pod the service account is the identity.
                    Err(_) if !self.selects_from_kubeconfig() => None,
                    Err(error) => return Err(no_cluster(error)),
                },
            },
        };
        let config = match kubeconfig {
            Some(kubeconfig) => Config::from_custom_kubeconfig(kubeconfig, &self.options())
                .await
                .map_err(no_cluster)?,
            None => Config::incluster().map_err(|_| Error::NoCluster {
                reason: "set KUBECONFIG, --kubeconfig or a current kubeconfig context".into(),
            })?,
        };
        Ok(self.apply(config))
    }

    /// Apply the namespace and identity flags to a loaded configuration: `-n` replaces the
    /// context's namespace, `--as`/`--as-group` replace any impersonation the kubeconfig
    /// user declares (as kubectl's flags do).
    pub fn apply(&self, mut config: Config) -> Config {
        if let Some(namespace) = &self.namespace {
            config.default_namespace = namespace.clone();
        }
        if let Some(user) = &self.impersonate {
            config.auth_info.impersonate = Some(user.clone());
            // The kubeconfig's uid and extras describe its own impersonated user, not this one.
            config.auth_info.impersonate_uid = None;
            config.auth_info.impersonate_user_extra = None;
            config.auth_info.impersonate_groups =
                (!self.impersonate_groups.is_empty()).then(|| self.impersonate_groups.clone());
        }
        config
    }

    /// Connect as these flags say.
    pub async fn connect(&self) -> Result<Connection, Error> {
        let config = self.config().await?;
        let namespace = config.default_namespace.clone();
        let client = kube::Client::try_from(config).map_err(|error| Error::NoCluster {
            reason: error.to_string(),
        })?;
        Ok(Connection { client, namespace })
    }
}

/// Completion of `--context`: the contexts of the kubeconfig kubectl would read ($KUBECONFIG,
/// else ~/.kube/config); none when it cannot be read.
fn kubeconfig_contexts(current: &std::ffi::OsStr) -> Vec<CompletionCandidate> {
    let Some(prefix) = current.to_str() else {
        return Vec::new();
    };
    let Ok(kubeconfig) = Kubeconfig::read() else {
        return Vec::new();
    };
    kubeconfig
        .contexts
        .into_iter()
        .filter(|c| c.name.starts_with(prefix))
        .map(|c| CompletionCandidate::new(c.name))
        .collect()
}

/// A kubeconfig failure as a person reads it. A parse error is not quoted: its text could
/// hold a token or key from the file.
fn no_cluster(error: KubeconfigError) -> Error {
    let reason = match error {
        KubeconfigError::Parse(_) => "the kubeconfig is not valid YAML".to_owned(),
        KubeconfigError::CurrentContextNotSet => {
            "the kubeconfig has no current-context: pass --context".to_owned()
        }
        KubeconfigError::LoadContext(name) => {
            format!("the kubeconfig has no context {name:?}")
        }
        KubeconfigError::LoadClusterOfContext(name) => {
            format!("the kubeconfig has no cluster {name:?}")
        }
        other => other.to_string(),
    };
    Error::NoCluster { reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBECONFIG: &str = r#"
apiVersion: v1
kind: Config
current-context: dev
clusters:
- name: dev-cluster
  cluster: {server: "https://dev.example:6443"}
- name: prod-cluster
  cluster: {server: "https://prod.example:6443"}
contexts:
- name: dev
  context: {cluster: dev-cluster, user: dev-user, namespace: sandboxes}
- name: prod
  context: {cluster: prod-cluster, user: prod-user}
users:
- name: dev-user
  user: {token: dev-token, as: kubeconfig-user, as-groups: [kubeconfig-group]}
- name: prod-user
  user: {token: prod-token}
"#;

    fn file() -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), KUBECONFIG).unwrap();
        file
    }

    fn args(flags: &[&str]) -> ClusterArgs {
        #[derive(clap::Parser)]
        struct Test {
            #[command(flatten)]
            cluster: ClusterArgs,
        }
        let mut argv = vec!["test"];
        argv.extend_from_slice(flags);
        <Test as clap::Parser>::try_parse_from(argv)
            .unwrap()
            .cluster
    }

    fn config(flags: &[&str], kubeconfig: &std::path::Path) -> Config {
        let mut args = args(flags);
        args.kubeconfig = Some(kubeconfig.to_owned());
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(args.config())
            .unwrap()
    }

    #[test]
    fn the_current_context_gives_cluster_user_and_namespace() {
        let file = file();
        let config = config(&[], file.path());
        assert_eq!(config.cluster_url.host(), Some("dev.example"));
        assert_eq!(config.default_namespace, "sandboxes");
        assert_eq!(
            config.auth_info.impersonate.as_deref(),
            Some("kubeconfig-user")
        );
    }

    #[test]
    fn context_selects_another_cluster_and_its_default_namespace() {
        let file = file();
        let config = config(&["--context", "prod"], file.path());
        assert_eq!(config.cluster_url.host(), Some("prod.example"));
        assert_eq!(config.default_namespace, "default");
        assert_eq!(config.auth_info.impersonate, None);
    }

    #[test]
    fn cluster_and_user_override_the_contexts() {
        let file = file();
        let config = config(
            &["--cluster", "prod-cluster", "--user", "prod-user"],
            file.path(),
        );
        assert_eq!(config.cluster_url.host(), Some("prod.example"));
        assert_eq!(config.default_namespace, "sandboxes");
        assert_eq!(config.auth_info.impersonate, None);
    }

    #[test]
    fn an_unknown_context_is_no_cluster_and_named() {
        let file = file();
        let mut args = args(&["--context", "staging"]);
        args.kubeconfig = Some(file.path().to_owned());
        let error = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(args.config())
            .unwrap_err();
        assert!(error.to_string().contains("\"staging\""), "{error}");
        assert_eq!(error.exit(), super::super::error::Exit::NoCluster);
    }

    #[test]
    fn a_kubeconfig_that_does_not_parse_is_not_quoted() {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            file.path(),
            "users: [{user: {token: canary-kubeconfig-token",
        )
        .unwrap();
        let args = ClusterArgs {
            kubeconfig: Some(file.path().to_owned()),
            ..ClusterArgs::default()
        };
        let error = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(args.config())
            .unwrap_err();
        assert!(!format!("{error} {error:?}").contains("canary"), "{error}");
    }

    #[test]
    fn namespace_flag_replaces_the_contexts_namespace() {
        let config = Config::new("https://x.example".parse().unwrap());
        let applied = args(&["-n", "team-a"]).apply(config.clone());
        assert_eq!(applied.default_namespace, "team-a");
        let untouched = args(&[]).apply(config);
        assert_eq!(untouched.default_namespace, "default");
    }

    #[test]
    fn as_and_as_group_replace_the_kubeconfigs_impersonation() {
        let mut config = Config::new("https://x.example".parse().unwrap());
        config.auth_info.impersonate = Some("from-kubeconfig".into());
        config.auth_info.impersonate_groups = Some(vec!["from-kubeconfig".into()]);

        let applied = args(&[
            "--as",
            "alice",
            "--as-group",
            "devs",
            "--as-group",
            "sandbox-admins",
        ])
        .apply(config.clone());
        assert_eq!(applied.auth_info.impersonate.as_deref(), Some("alice"));
        assert_eq!(
            applied.auth_info.impersonate_groups,
            Some(vec!["devs".to_owned(), "sandbox-admins".to_owned()])
        );

        let user_only = args(&["--as", "bob"]).apply(config.clone());
        assert_eq!(user_only.auth_info.impersonate.as_deref(), Some("bob"));
        assert_eq!(user_only.auth_info.impersonate_groups, None);

        let none = args(&[]).apply(config);
        assert_eq!(
            none.auth_info.impersonate.as_deref(),
            Some("from-kubeconfig")
        );
    }

    #[test]
    fn as_group_without_as_is_a_usage_error() {
        #[derive(Debug, clap::Parser)]
        struct Test {
            #[command(flatten)]
            cluster: ClusterArgs,
        }
        let error =
            <Test as clap::Parser>::try_parse_from(["test", "--as-group", "devs"]).unwrap_err();
        assert_eq!(
            error.kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
    }
}
