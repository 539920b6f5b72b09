//! Command-line interface: one binary, one subcommand per job.

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use std::io::Write as _;
use std::path::PathBuf;

use crate::crypto::Keyring;

/// File name of the keyring inside its Kubernetes Secret (and so inside the mounted volume).
pub const KEYRING_SECRET_KEY: &str = "keyring.yaml";

/// agent-secrets: users' credentials for AI-agent sandbox pods, sealed at rest with envelope
/// encryption and injected into each labelled sandbox pod as environment variables.
#[derive(Debug, Parser)]
#[command(
    name = "agentsecrets",
    version,
    propagate_version = true,
    after_help = crate::tools::error::EXIT_CODES_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the operator: the admission webhook (HTTPS), the admin server (probes, metrics)
    /// and the controller.
    Run(Box<crate::run::RunArgs>),
    /// Print the AgentSecret CustomResourceDefinition (YAML), as installed from crds/.
    Crd,
    /// Manage key-encryption keys (KEKs): generate keyrings, add a new primary key, report
    /// which keys are in use.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Preview offline what admission does to a pod (references only, never values).
    ///
    /// Reads AgentSecrets from --secrets (files or a directory; sample `value`s are sealed in
    /// memory) or, without it, from the cluster, and prints the mutated pod.
    Inject(InjectArgs),
    /// Create or update a secret. The value is read from a hidden prompt (asked twice, to
    /// catch a typo), or from stdin when piped, so it never lands in shell history; empty input
    /// keeps the current value.
    Set(SetArgs),
    /// List secrets as cards: name, description, created, masked value, readiness.
    List(ListArgs),
    /// Delete a secret; sandboxes started afterwards no longer get it.
    Delete(DeleteArgs),
    /// Serve the Secrets page (and its JSON API) behind an authenticating proxy: each user
    /// manages their own secrets, every Kubernetes call made as that user (impersonation).
    Ui(Box<crate::ui::UiArgs>),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    ///
    /// bash: `source <(agentsecrets completion bash)`; zsh: `agentsecrets completion zsh >
    /// "${fpath[1]}/_agentsecrets"`; fish: `agentsecrets completion fish | source`. For
    /// `kubectl agentsecrets`, link the binary as `kubectl_complete-agentsecrets` on the PATH
    /// (kubectl 1.26+ asks it; see docs/cli.md).
    Completion(CompletionArgs),
    /// Run the secretless egress proxy beside a sandbox: it swaps placeholders for values in
    /// requests to each secret's allowed hosts and refuses them elsewhere.
    Proxy(Box<crate::secretless::ProxyArgs>),
}

#[derive(Debug, Args)]
pub struct CompletionArgs {
    /// The shell to complete in.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct InjectArgs {
    /// Pod manifest (YAML or JSON); `-` reads stdin.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,
    /// AgentSecret manifests (a file or a directory of .yaml files) instead of the cluster.
    #[arg(long, value_name = "FILE|DIR", conflicts_with_all = crate::tools::cluster::CONNECTION_FLAGS)]
    pub secrets: Option<PathBuf>,
    /// Keyring to open sealed values with [default: a throwaway key for sample values].
    #[arg(long, env = "AGENTSECRETS_KEYRING", value_name = "FILE")]
    pub keyring: Option<PathBuf>,
    /// The requester to preview as (matters with --allowed-principals).
    #[arg(long, default_value = "preview-user")]
    pub requester: String,
    /// The admission policy, as for `run` (the same flags and environment variables).
    #[command(flatten)]
    pub policy: crate::run::PolicyArgs,
    // Last, so that its help heading covers its flags only. Read from without --secrets; -n is
    // the namespace of a pod that names none [default: the pod's, else the context's].
    #[command(flatten)]
    pub cluster: crate::tools::cluster::ClusterArgs,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// Env name inside the sandbox, e.g. SERVICE_API_KEY.
    pub env_name: String,
    /// User the secret belongs to.
    #[arg(long)]
    pub owner: String,
    /// What the secret is for.
    #[arg(long)]
    pub description: Option<String>,
    #[command(flatten)]
    pub cluster: crate::tools::cluster::ClusterArgs,
    // Without -o: a line saying what was done; with -o: the secret as `list` shows it.
    #[command(flatten)]
    pub output: crate::tools::output::OutputArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this user's secrets.
    #[arg(long)]
    pub owner: Option<String>,
    /// List the secrets of every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
    #[command(flatten)]
    pub cluster: crate::tools::cluster::ClusterArgs,
    // Without -o: cards; wide: one line per secret with every column.
    #[command(flatten)]
    pub output: crate::tools::output::OutputArgs,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Env name of the secret.
    pub env_name: String,
    /// User the secret belongs to.
    #[arg(long)]
    pub owner: String,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
    #[command(flatten)]
    pub cluster: crate::tools::cluster::ClusterArgs,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print a keyring with a freshly generated 256-bit primary key.
    ///
    /// With --add-to, print that keyring with a new primary key added (old keys are kept so
    /// existing values still open until the controller re-wraps them). With --secret, print
    /// it as a Kubernetes Secret manifest to `kubectl apply -f -`. The output contains key
    /// material: redirect it to a protected place, never to a shared log.
    Generate(GenerateArgs),
    /// Print a keyring with key ID made the primary (the second phase of a rotation).
    Promote(PromoteArgs),
    /// Report how many AgentSecrets are wrapped under each key, and (with -A, counting every
    /// namespace) whether an old key may be removed from the keyring.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// Id of the key to make the primary; it must be in the keyring.
    pub id: String,
    /// The keyring file.
    #[arg(long, env = "AGENTSECRETS_KEYRING", value_name = "FILE")]
    pub keyring: PathBuf,
    #[command(flatten)]
    pub output: KeyringOutput,
}

/// How `keys generate` and `keys promote` print the keyring.
#[derive(Debug, Args)]
pub struct KeyringOutput {
    /// Print a Secret manifest with this name instead of the bare keyring file.
    #[arg(long, value_name = "NAME")]
    pub secret: Option<String>,
    /// Namespace of the Secret manifest.
    #[arg(
        short = 'n',
        long,
        requires = "secret",
        default_value = "agent-secrets"
    )]
    pub namespace: String,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Keyring in force, to compare with [recommended].
    #[arg(long, env = "AGENTSECRETS_KEYRING", value_name = "FILE")]
    pub keyring: Option<PathBuf>,
    /// Count every namespace: only then may a key be called removable.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
    #[command(flatten)]
    pub cluster: crate::tools::cluster::ClusterArgs,
    // Without -o: a table and a verdict; wide adds the namespaces using each key.
    #[command(flatten)]
    pub output: crate::tools::output::OutputArgs,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Id of the new key [default: kek-YYYYMMDD-HHMMSS].
    #[arg(long, env = "AGENTSECRETS_KEY_ID")]
    pub id: Option<String>,
    /// Existing keyring file to add the new primary key to.
    #[arg(long, value_name = "FILE", env = "AGENTSECRETS_KEYRING_ADD_TO")]
    pub add_to: Option<PathBuf>,
    /// With --add-to: add the key without making it the primary. Rotate in two phases: add,
    /// wait until every replica has loaded the keyring, then `keys promote`; a replica that
    /// has not reloaded yet could otherwise not open values sealed under the new key.
    #[arg(long, requires = "add_to")]
    pub no_promote: bool,
    #[command(flatten)]
    pub output: KeyringOutput,
}

/// A default id for a new key: `kek-YYYYMMDD-HHMMSS` (UTC), sortable by creation time.
pub fn default_key_id() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("kek-%Y%m%d-%H%M%S")
        .to_string()
}

/// Run the parsed command.
pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => crate::run::run_operator(*args).await,
        Command::Crd => {
            print!(
                "{}",
                crate::api::crd_yaml().context("failed to render the CRD")?
            );
            Ok(())
        }
        Command::Keys(KeysCommand::Status(args)) => keys_status(args).await,
        Command::Keys(KeysCommand::Promote(args)) => {
            let PromoteArgs {
                id,
                keyring,
                output,
            } = args;
            let mut keyring = Keyring::load(&keyring)?;
            keyring.set_primary(&id)?;
            let out = output.render(&keyring)?;
            std::io::stdout()
                .write_all(out.as_bytes())
                .context("failed to write the keyring")?;
            Ok(())
        }
        Command::Inject(args) => inject(args).await,
        Command::Set(args) => crate::tools::user::set(args, &mut crate::tools::prompt::Stdin).await,
        Command::List(args) => crate::tools::user::list(args).await,
        Command::Delete(args) => crate::tools::user::delete(args).await,
        Command::Ui(args) => crate::ui::run(*args).await,
        Command::Completion(CompletionArgs { shell }) => std::io::stdout()
            .write_all(&crate::tools::completion::script(shell, "agentsecrets"))
            .context("failed to write the completion script"),
        Command::Proxy(args) => crate::secretless::run(*args).await,
        Command::Keys(KeysCommand::Generate(args)) => {
            let out = generate_keyring(&args)?;
            std::io::stdout()
                .write_all(out.as_bytes())
                .context("failed to write the keyring")?;
            Ok(())
        }
    }
}

/// The text `keys generate` prints (keyring or Secret manifest).
pub fn generate_keyring(args: &GenerateArgs) -> anyhow::Result<zeroize::Zeroizing<String>> {
    let GenerateArgs {
        id,
        add_to,
        no_promote,
        output,
    } = args;
    let id = id.clone().unwrap_or_else(default_key_id);
    let keyring = match add_to {
        Some(path) => {
            let mut keyring = Keyring::load(path)?;
            if *no_promote {
                keyring.add_key(&id)?;
            } else {
                keyring.add_primary(&id)?;
            }
            keyring
        }
        None => Keyring::generate(&id)?,
    };
    output.render(&keyring)
}

impl KeyringOutput {
    /// The keyring file's text, or a Secret manifest named `--secret` holding it.
    fn render(&self, keyring: &Keyring) -> anyhow::Result<zeroize::Zeroizing<String>> {
        let Self { secret, namespace } = self;
        let text = keyring.to_yaml()?;
        let Some(name) = secret else {
            return Ok(text);
        };
        let manifest = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(
                    [(
                        crate::api::MANAGED_BY_LABEL.to_owned(),
                        crate::api::MANAGED_BY_VALUE.to_owned(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(
                [(
                    KEYRING_SECRET_KEY.to_owned(),
                    ByteString(text.as_bytes().to_vec()),
                )]
                .into(),
            ),
            ..Secret::default()
        };
        let yaml = serde_yaml::to_string(&manifest).context("failed to render the Secret")?;
        Ok(zeroize::Zeroizing::new(yaml))
    }
}

async fn keys_status(args: StatusArgs) -> anyhow::Result<()> {
    let StatusArgs {
        keyring,
        all_namespaces,
        cluster,
        output,
    } = args;
    let keyring = keyring.map(|p| Keyring::load(&p)).transpose()?;
    let connection = cluster.connect().await?;
    let (api, namespace) = if all_namespaces {
        (kube::Api::all(connection.client), None)
    } else {
        (
            kube::Api::namespaced(connection.client, &connection.namespace),
            Some(connection.namespace),
        )
    };
    let items: Vec<crate::api::AgentSecret> = api
        .list(&kube::api::ListParams::default())
        .await
        .map_err(|e| {
            crate::tools::error::Error::from_api(
                "list AgentSecrets",
                e,
                namespace.as_deref().unwrap_or("<all>"),
            )
        })?
        .items;
    let report = crate::tools::keys::key_report(&items, keyring.as_ref(), namespace.as_deref());
    print!("{}", report.render_as(output.output)?);
    Ok(())
}

async fn inject(args: InjectArgs) -> anyhow::Result<()> {
    let InjectArgs {
        file,
        secrets,
        keyring,
        cluster,
        requester,
        policy,
    } = args;
    let text = if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
        text
    } else {
        std::fs::read_to_string(&file)
            .with_context(|| format!("failed to read {}", file.display()))?
    };
    let mut pod: serde_json::Value = serde_yaml::from_str(&text)
        .map_err(|_| anyhow::anyhow!("{} is not a YAML or JSON manifest", file.display()))?;
    if !pod.is_object() || !pod["metadata"].is_object() {
        anyhow::bail!("{} is not a Pod manifest (no metadata)", file.display());
    }
    let named = cluster
        .namespace
        .clone()
        .or_else(|| pod["metadata"]["namespace"].as_str().map(str::to_owned));
    let (namespace, mut objects) = match secrets {
        Some(path) => (
            named.unwrap_or_else(|| "default".to_owned()),
            crate::tools::inject::read_agentsecrets(&path)?,
        ),
        None => {
            let connection = cluster.connect().await?;
            // Only with a cluster is there a context namespace to fall back to.
            let namespace = named.unwrap_or(connection.namespace);
            let items =
                kube::Api::<crate::api::AgentSecret>::namespaced(connection.client, &namespace)
                    .list(&kube::api::ListParams::default())
                    .await
                    .map_err(|e| {
                        crate::tools::error::Error::from_api("list AgentSecrets", e, &namespace)
                    })?
                    .items;
            (namespace, items)
        }
    };
    pod["metadata"]["namespace"] = serde_json::Value::String(namespace.clone());
    let keyring = match keyring {
        Some(path) => Keyring::load(&path)?,
        None => Keyring::generate("preview")?,
    };
    crate::tools::inject::prepare(&mut objects, &keyring, &namespace)?;
    let policy = policy.policy(None)?;
    let preview = crate::tools::inject::preview(pod, &objects, &keyring, &policy, &requester)?;
    eprintln!("{}", preview.summary);
    print!("{}", preview.pod_yaml);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_key_ids_are_valid() {
        assert!(crate::crypto::valid_key_id(&super::default_key_id()));
    }
}
