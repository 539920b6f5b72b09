//! `agentsecrets set | list | delete`: the product's Secrets page on the command line, against
//! the current kubeconfig context. Values are read from a hidden prompt or stdin, so they never
//! land in shell history or an apply annotation, and are never printed.

use anyhow::{Context as _, bail};
use kube::ResourceExt as _;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde::Serialize;
use serde_json::json;
use std::io::{BufRead as _, IsTerminal as _, Read as _, Write as _};

use crate::api::{AgentSecret, AgentSecretSpec, FIELD_MANAGER, SecretString, validate_env_name};

/// The masked value every listing shows.
pub const MASK: &str = "••••••••";

/// What a person sees of one secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Card {
    pub name: String,
    pub namespace: String,
    pub env_name: String,
    pub owner: String,
    pub description: String,
    pub created: String,
    pub value: &'static str,
    pub ready: String,
    pub reason: String,
}

impl Card {
    pub fn from_object(object: &AgentSecret) -> Self {
        let ready = object
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
        Self {
            name: object.name_any(),
            namespace: object.namespace().unwrap_or_default(),
            env_name: object.spec.env_name.clone(),
            owner: object.spec.owner.clone(),
            description: object.spec.description.clone().unwrap_or_default(),
            created: object
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.strftime("%Y-%m-%d %H:%M UTC").to_string())
                .unwrap_or_default(),
            value: MASK,
            ready: ready.map_or("Unknown".into(), |c| c.status.clone()),
            reason: ready.map_or(String::new(), |c| c.reason.clone()),
        }
    }

    /// The card as text.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{}  (owner {}, {}/{})\n",
            self.env_name, self.owner, self.namespace, self.name
        );
        if !self.description.is_empty() {
            out.push_str(&format!("  {}\n", self.description));
        }
        let reason = if self.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.reason)
        };
        out.push_str(&format!(
            "  created {}   value {}   ready {}{reason}\n",
            self.created, self.value, self.ready
        ));
        out
    }
}

/// The object name `set` gives a new secret: `<owner>-<env-name>` as a DNS name.
pub fn object_name(owner: &str, env_name: &str) -> String {
    let raw = format!("{owner}-{env_name}").to_ascii_lowercase();
    let name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = name.trim_matches(|c| c == '-' || c == '.');
    name.chars().take(253).collect()
}

/// Turn an API error into one a person can act on.
pub fn explain(error: kube::Error, namespace: &str) -> anyhow::Error {
    match &error {
        kube::Error::Api(status)
            if status.code == 404
                && status
                    .message
                    .contains("the server could not find the requested resource") =>
        {
            anyhow::anyhow!(
                "the AgentSecret CRD is not installed in this cluster: install agent-secrets (helm install, or kubectl apply -f crds/)"
            )
        }
        kube::Error::Api(status) if status.code == 403 => anyhow::anyhow!(
            "forbidden by RBAC in namespace {namespace:?}: {}; ask for a Role allowing agentsecrets.agentsecrets.io",
            status.message
        ),
        kube::Error::Api(status) => anyhow::anyhow!("the API server refused: {}", status.message),
        kube::Error::HyperError(_) | kube::Error::Service(_) => {
            anyhow::anyhow!("no cluster reachable with the current kubeconfig context: {error}")
        }
        _ => anyhow::anyhow!("request to the API server failed: {error}"),
    }
}

async fn client() -> anyhow::Result<kube::Client> {
    kube::Client::try_default()
        .await
        .context("no cluster configured: set KUBECONFIG or a current kubeconfig context")
}

async fn namespace_of(client: &kube::Client, namespace: Option<String>) -> String {
    namespace.unwrap_or_else(|| client.default_namespace().to_owned())
}

async fn find(
    api: &Api<AgentSecret>,
    owner: &str,
    env_name: &str,
    namespace: &str,
) -> anyhow::Result<Option<AgentSecret>> {
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| explain(e, namespace))?;
    Ok(list
        .items
        .into_iter()
        .find(|s| s.spec.owner == owner && s.spec.env_name == env_name))
}

/// Read the value: a hidden prompt on a terminal, else the whole of stdin (one trailing
/// newline removed).
fn read_value(env_name: &str) -> anyhow::Result<SecretString> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        let value = rpassword::prompt_password(format!(
            "Value for {env_name} (hidden; empty keeps the current value): "
        ))
        .context("failed to read the value from the terminal")?;
        return Ok(SecretString::new(value));
    }
    let mut value = String::new();
    stdin
        .lock()
        .read_to_string(&mut value)
        .context("failed to read the value from stdin")?;
    let trimmed = value
        .strip_suffix("\r\n")
        .or_else(|| value.strip_suffix('\n'))
        .unwrap_or(&value)
        .to_owned();
    zeroize::Zeroize::zeroize(&mut value);
    Ok(SecretString::new(trimmed))
}

/// `set`: create, or update (empty input keeps the value).
pub async fn set(
    env_name: &str,
    owner: &str,
    description: Option<String>,
    namespace: Option<String>,
) -> anyhow::Result<()> {
    validate_env_name(env_name, &[]).map_err(|e| anyhow::anyhow!("{e}"))?;
    if owner.is_empty() {
        bail!("--owner must name a user");
    }
    let client = client().await?;
    let namespace = namespace_of(&client, namespace).await;
    let api: Api<AgentSecret> = Api::namespaced(client, &namespace);
    let existing = find(&api, owner, env_name, &namespace).await?;
    let value = read_value(env_name)?;
    let value = (!value.expose().is_empty()).then_some(value);
    match existing {
        Some(object) => {
            let mut spec = serde_json::Map::new();
            if let Some(value) = &value {
                spec.insert("value".into(), json!(value.expose()));
            }
            if let Some(description) = &description {
                spec.insert("description".into(), json!(description));
            }
            if spec.is_empty() {
                println!("{env_name} of {owner} unchanged (empty value keeps the current one)");
                return Ok(());
            }
            let patch = json!({"spec": spec});
            api.patch(
                &object.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| explain(e, &namespace))?;
            println!(
                "updated {env_name} of {owner} in {namespace} ({})",
                object.name_any()
            );
        }
        None => {
            let Some(value) = value else {
                bail!("a new secret needs a value: none was given");
            };
            let name = object_name(owner, env_name);
            let object = AgentSecret::new(
                &name,
                AgentSecretSpec {
                    owner: owner.to_owned(),
                    env_name: env_name.to_owned(),
                    description,
                    value: Some(value),
                    sealed: None,
                },
            );
            let params = PostParams {
                dry_run: false,
                field_manager: Some(FIELD_MANAGER.into()),
            };
            api.create(&params, &object)
                .await
                .map_err(|e| explain(e, &namespace))?;
            println!("created {env_name} of {owner} in {namespace} ({name})");
        }
    }
    Ok(())
}

/// Output format of `list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ListFormat {
    Cards,
    Json,
    Yaml,
}

/// Render cards in `format`.
pub fn render_cards(cards: &[Card], format: ListFormat) -> anyhow::Result<String> {
    Ok(match format {
        ListFormat::Cards if cards.is_empty() => "no secrets\n".to_owned(),
        ListFormat::Cards => cards
            .iter()
            .map(Card::render)
            .collect::<Vec<_>>()
            .join("\n"),
        ListFormat::Json => serde_json::to_string_pretty(cards)? + "\n",
        ListFormat::Yaml => serde_yaml::to_string(cards)?,
    })
}

/// `list`.
pub async fn list(
    owner: Option<String>,
    namespace: Option<String>,
    format: ListFormat,
) -> anyhow::Result<()> {
    let client = client().await?;
    let namespace = namespace_of(&client, namespace).await;
    let api: Api<AgentSecret> = Api::namespaced(client, &namespace);
    let items = api
        .list(&ListParams::default())
        .await
        .map_err(|e| explain(e, &namespace))?
        .items;
    let mut cards: Vec<Card> = items
        .iter()
        .filter(|s| owner.as_deref().is_none_or(|o| s.spec.owner == o))
        .map(Card::from_object)
        .collect();
    cards.sort_by(|a, b| (&a.owner, &a.env_name).cmp(&(&b.owner, &b.env_name)));
    print!("{}", render_cards(&cards, format)?);
    Ok(())
}

/// `delete`.
pub async fn delete(
    env_name: &str,
    owner: &str,
    namespace: Option<String>,
    yes: bool,
) -> anyhow::Result<()> {
    validate_env_name(env_name, &[]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let client = client().await?;
    let namespace = namespace_of(&client, namespace).await;
    let api: Api<AgentSecret> = Api::namespaced(client, &namespace);
    let Some(object) = find(&api, owner, env_name, &namespace).await? else {
        bail!("{owner} has no secret {env_name} in namespace {namespace}");
    };
    if !yes {
        print!(
            "Delete {env_name} of {owner} in {namespace}? Sandboxes started afterwards will not get it; running ones keep their environment. [y/N] "
        );
        std::io::stdout().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            bail!("not deleted");
        }
    }
    api.delete(&object.name_any(), &DeleteParams::default())
        .await
        .map_err(|e| explain(e, &namespace))?;
    println!("deleted {env_name} of {owner} in {namespace}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AgentSecretStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    #[test]
    fn object_names_are_dns_names() {
        assert_eq!(
            object_name("alice", "X_BEARER_TOKEN"),
            "alice-x-bearer-token"
        );
        assert_eq!(
            object_name("Bob.Smith", "DB_PASSWORD"),
            "bob.smith-db-password"
        );
        assert_eq!(object_name("_x_", "A"), "x--a");
    }

    #[test]
    fn cards_mask_the_value_and_show_readiness() {
        let mut object = AgentSecret::new(
            "alice-x",
            AgentSecretSpec {
                owner: "alice".into(),
                env_name: "X_BEARER_TOKEN".into(),
                description: Some("X API".into()),
                value: Some(SecretString::new("canary-card".into())),
                sealed: None,
            },
        );
        object.metadata.namespace = Some("sandboxes".into());
        object.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap(),
        ));
        object.status = Some(AgentSecretStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "Sealed".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(k8s_openapi::jiff::Timestamp::from_second(0).unwrap()),
            }],
            ..AgentSecretStatus::default()
        });
        let card = Card::from_object(&object);
        let text = render_cards(std::slice::from_ref(&card), ListFormat::Cards).unwrap();
        assert!(
            text.contains("X_BEARER_TOKEN  (owner alice, sandboxes/alice-x)"),
            "{text}"
        );
        assert!(text.contains("X API"));
        assert!(text.contains("created 2027-01-15 08:00 UTC"), "{text}");
        assert!(text.contains(&format!("value {MASK}")));
        assert!(text.contains("ready True (Sealed)"));
        for format in [ListFormat::Cards, ListFormat::Json, ListFormat::Yaml] {
            let out = render_cards(std::slice::from_ref(&card), format).unwrap();
            assert!(!out.contains("canary-card"), "{out}");
        }
        assert_eq!(
            render_cards(&[], ListFormat::Cards).unwrap(),
            "no secrets\n"
        );
    }

    #[test]
    fn api_errors_are_explained() {
        let status = |code, message: &str| {
            let mut status = kube::core::Status::failure(message, "");
            status.code = code;
            kube::Error::Api(Box::new(status))
        };
        let missing = explain(
            status(404, "the server could not find the requested resource"),
            "ns",
        );
        assert!(missing.to_string().contains("CRD is not installed"));
        let forbidden = explain(
            status(403, "agentsecrets is forbidden: User \"dev\" cannot list"),
            "ns",
        );
        assert!(forbidden.to_string().contains("forbidden by RBAC"));
    }
}
