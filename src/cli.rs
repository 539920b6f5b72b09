//! Command-line interface: one binary, one subcommand per job.

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use std::io::Write as _;
use std::path::PathBuf;

use crate::crypto::{Keyring, default_key_id};

/// File name of the keyring inside its Kubernetes Secret (and so inside the mounted volume).
pub const KEYRING_SECRET_KEY: &str = "keyring.yaml";

/// agent-secrets: users' credentials for AI-agent sandbox pods, sealed at rest with envelope
/// encryption and injected into each labelled sandbox pod as environment variables.
#[derive(Debug, Parser)]
#[command(name = "agentsecrets", version, propagate_version = true)]
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
    /// Manage key-encryption keys (KEKs): generate keyrings, add a new primary key.
    #[command(subcommand)]
    Keys(KeysCommand),
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
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Id of the new key [default: kek-YYYYMMDD-HHMMSS].
    #[arg(long, env = "AGENTSECRETS_KEY_ID")]
    pub id: Option<String>,
    /// Existing keyring file to add the new primary key to.
    #[arg(long, value_name = "FILE", env = "AGENTSECRETS_KEYRING_ADD_TO")]
    pub add_to: Option<PathBuf>,
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

/// Run the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => crate::run::run(*args).await,
        Command::Crd => {
            print!(
                "{}",
                crate::api::crd_yaml().context("failed to render the CRD")?
            );
            Ok(())
        }
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
        secret,
        namespace,
    } = args;
    let id = id.clone().unwrap_or_else(default_key_id);
    let keyring = match add_to {
        Some(path) => {
            let mut keyring = Keyring::load(path)?;
            keyring.add_primary(&id)?;
            keyring
        }
        None => Keyring::generate(&id)?,
    };
    let text = keyring.to_yaml()?;
    let Some(name) = secret else {
        return Ok(text);
    };
    let manifest = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.clone()),
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
