//! `agentsecrets set | list | delete`: the product's Secrets page on the command line, with
//! kubectl's connection flags. Values are read from a hidden prompt or stdin, so they never
//! land in shell history or an apply annotation, and are never printed.

use kube::ResourceExt as _;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde::Serialize;
use serde_json::json;
use std::io::{BufRead as _, Write as _};

use super::cluster::Connection;
use super::error::Error;
use super::output::{Format, serialised, table};
use super::prompt::{Purpose, ValueReader, read_value};
use crate::api::{AgentSecret, AgentSecretSpec, FIELD_MANAGER, validate_env_name};
use crate::cli::{DeleteArgs, ListArgs, SetArgs};

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

/// One secret as the CLI prints it: the card, and for `-o wide|json|yaml` the key it is
/// wrapped under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    #[serde(flatten)]
    pub card: Card,
    /// The key-encryption key the value is wrapped under; empty while unsealed.
    pub key_id: String,
    /// Hosts a secretless sandbox's proxy may send the value to (`spec.allowedHosts`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<String>,
}

impl Entry {
    pub fn from_object(object: &AgentSecret) -> Self {
        Self {
            card: Card::from_object(object),
            key_id: object
                .spec
                .sealed
                .as_ref()
                .map(|s| s.key_id.clone())
                .unwrap_or_default(),
            allowed_hosts: object.spec.allowed_hosts.clone().unwrap_or_default(),
        }
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

/// The secret of `owner` named `env_name` in the connection's namespace, if any.
async fn find(
    api: &Api<AgentSecret>,
    owner: &str,
    env_name: &str,
    namespace: &str,
) -> Result<Option<AgentSecret>, Error> {
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::from_api("list AgentSecrets", e, namespace))?;
    Ok(list
        .items
        .into_iter()
        .find(|s| s.spec.owner == owner && s.spec.env_name == env_name))
}

fn valid_name(env_name: &str) -> Result<(), Error> {
    validate_env_name(env_name, &[]).map_err(|e| Error::InvalidArgument(e.to_string()))
}

/// `set`: create, or update (empty input keeps the value).
pub async fn set(args: SetArgs, reader: &mut dyn ValueReader) -> anyhow::Result<()> {
    let SetArgs {
        env_name,
        owner,
        description,
        cluster,
        output,
    } = args;
    valid_name(&env_name)?;
    if owner.is_empty() {
        return Err(Error::InvalidArgument("--owner must name a user".into()).into());
    }
    let Connection { client, namespace } = cluster.connect().await?;
    let api: Api<AgentSecret> = Api::namespaced(client, &namespace);
    let existing = find(&api, &owner, &env_name, &namespace).await?;
    let purpose = match existing {
        Some(_) => Purpose::Update,
        None => Purpose::Create,
    };
    let value = read_value(reader, &env_name, purpose)?;
    let value = (!value.expose().is_empty()).then_some(value);
    let (object, message) = match existing {
        Some(object) => {
            let mut spec = serde_json::Map::new();
            if let Some(value) = &value {
                spec.insert("value".into(), json!(value.expose()));
            }
            if let Some(description) = &description {
                spec.insert("description".into(), json!(description));
            }
            if spec.is_empty() {
                let message =
                    format!("{env_name} of {owner} unchanged (empty value keeps the current one)");
                (object, message)
            } else {
                let patch = json!({"spec": spec});
                let name = object.name_any();
                let params = PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..PatchParams::default()
                };
                let updated = api
                    .patch(&name, &params, &Patch::Merge(&patch))
                    .await
                    .map_err(|e| {
                        Error::from_api("update the AgentSecret", e, &namespace)
                            .redacting(value.as_ref().map_or("", |v| v.expose()))
                    })?;
                let message = format!("updated {env_name} of {owner} in {namespace} ({name})");
                (updated, message)
            }
        }
        None => {
            let Some(value) = value else {
                return Err(Error::InvalidArgument(
                    "a new secret needs a value: none was given".into(),
                )
                .into());
            };
            let name = object_name(&owner, &env_name);
            let object = AgentSecret::new(
                &name,
                AgentSecretSpec {
                    owner: owner.clone(),
                    env_name: env_name.clone(),
                    description,
                    value: Some(value),
                    sealed: None,
                    ..Default::default()
                },
            );
            let params = PostParams {
                dry_run: false,
                field_manager: Some(FIELD_MANAGER.into()),
            };
            let written = object.spec.value.as_ref().map_or("", |v| v.expose());
            let created = api.create(&params, &object).await.map_err(|e| {
                Error::from_api("create the AgentSecret", e, &namespace).redacting(written)
            })?;
            let message = format!("created {env_name} of {owner} in {namespace} ({name})");
            (created, message)
        }
    };
    print!(
        "{}",
        render_result(&Entry::from_object(&object), output.output, &message)?
    );
    Ok(())
}

/// What `set` prints: its message, or the resulting secret in the format asked for.
pub fn render_result(
    entry: &Entry,
    format: Option<Format>,
    message: &str,
) -> anyhow::Result<String> {
    Ok(match format {
        None => format!("{message}\n"),
        Some(Format::Wide) => wide_table(std::slice::from_ref(entry)),
        Some(format) => serialised(entry, Some(format))?.unwrap_or_default(),
    })
}

/// The columns of `-o wide`: every field of the card, one secret per line.
pub const WIDE_COLUMNS: [&str; 11] = [
    "NAMESPACE",
    "NAME",
    "OWNER",
    "ENV NAME",
    "VALUE",
    "READY",
    "REASON",
    "KEY ID",
    "CREATED",
    "DESCRIPTION",
    "ALLOWED HOSTS",
];

fn wide_table(entries: &[Entry]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(
            |Entry {
                 card: c,
                 key_id,
                 allowed_hosts,
             }| {
                vec![
                    c.namespace.clone(),
                    c.name.clone(),
                    c.owner.clone(),
                    c.env_name.clone(),
                    c.value.to_owned(),
                    c.ready.clone(),
                    c.reason.clone(),
                    key_id.clone(),
                    c.created.clone(),
                    c.description.clone(),
                    allowed_hosts.join(","),
                ]
            },
        )
        .collect();
    table(&WIDE_COLUMNS, &rows)
}

/// Render secrets: as cards without `-o`, else as a wide table, JSON or YAML.
pub fn render_cards(entries: &[Entry], format: Option<Format>) -> anyhow::Result<String> {
    Ok(match format {
        None if entries.is_empty() => "no secrets\n".to_owned(),
        None => entries
            .iter()
            .map(|e| e.card.render())
            .collect::<Vec<_>>()
            .join("\n"),
        Some(Format::Wide) => wide_table(entries),
        Some(format) => serialised(entries, Some(format))?.unwrap_or_default(),
    })
}

/// `list`.
pub async fn list(args: ListArgs) -> anyhow::Result<()> {
    let ListArgs {
        owner,
        all_namespaces,
        cluster,
        output,
    } = args;
    let Connection { client, namespace } = cluster.connect().await?;
    let (api, scope): (Api<AgentSecret>, &str) = if all_namespaces {
        (Api::all(client), "<all>")
    } else {
        (Api::namespaced(client, &namespace), &namespace)
    };
    let items = api
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::from_api("list AgentSecrets", e, scope))?
        .items;
    let mut entries: Vec<Entry> = items
        .iter()
        .filter(|s| owner.as_deref().is_none_or(|o| s.spec.owner == o))
        .map(Entry::from_object)
        .collect();
    entries.sort_by(|a, b| {
        let (a, b) = (&a.card, &b.card);
        (&a.namespace, &a.owner, &a.env_name).cmp(&(&b.namespace, &b.owner, &b.env_name))
    });
    print!("{}", render_cards(&entries, output.output)?);
    Ok(())
}

/// `delete`.
pub async fn delete(args: DeleteArgs) -> anyhow::Result<()> {
    let DeleteArgs {
        env_name,
        owner,
        yes,
        cluster,
    } = args;
    valid_name(&env_name)?;
    let Connection { client, namespace } = cluster.connect().await?;
    let api: Api<AgentSecret> = Api::namespaced(client, &namespace);
    let Some(object) = find(&api, &owner, &env_name, &namespace).await? else {
        return Err(Error::NotFound {
            what: format!("secret {env_name} of {owner} in namespace {namespace}"),
        }
        .into());
    };
    if !yes {
        // The question goes to stderr so that stdout holds only the result.
        eprint!(
            "Delete {env_name} of {owner} in {namespace}? Sandboxes started afterwards will not get it; running ones keep their environment. [y/N] "
        );
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Err(
                Error::Declined("not deleted (pass --yes to skip the question)".into()).into(),
            );
        }
    }
    api.delete(&object.name_any(), &DeleteParams::default())
        .await
        .map_err(|e| Error::from_api("delete the AgentSecret", e, &namespace))?;
    println!("deleted {env_name} of {owner} in {namespace}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AgentSecretStatus, SecretString};
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
                ..Default::default()
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
        let card = Entry::from_object(&object);
        let text = render_cards(std::slice::from_ref(&card), None).unwrap();
        assert!(
            text.contains("X_BEARER_TOKEN  (owner alice, sandboxes/alice-x)"),
            "{text}"
        );
        assert!(text.contains("X API"));
        assert!(text.contains("created 2027-01-15 08:00 UTC"), "{text}");
        assert!(text.contains(&format!("value {MASK}")));
        assert!(text.contains("ready True (Sealed)"));
        for format in [
            None,
            Some(Format::Json),
            Some(Format::Yaml),
            Some(Format::Wide),
        ] {
            let out = render_cards(std::slice::from_ref(&card), format).unwrap();
            assert!(!out.contains("canary-card"), "{out}");
        }
        assert_eq!(render_cards(&[], None).unwrap(), "no secrets\n");
    }

    fn recorded_list() -> Vec<AgentSecret> {
        let text = include_str!("../../tests/fixtures/api/agentsecrets_list.json");
        let list: kube::core::ObjectList<AgentSecret> = serde_json::from_str(text).unwrap();
        list.items
    }

    #[test]
    fn the_recorded_list_renders_as_cards_by_default() {
        let cards: Vec<Entry> = recorded_list().iter().map(Entry::from_object).collect();
        let text = render_cards(&cards, None).unwrap();
        assert_eq!(text.matches(MASK).count(), 12, "{text}");
        assert!(
            text.starts_with(
                "SERVICE_0_API_KEY  (owner alice, sandboxes/alice-service-0)\n  Key 0 for the alice research agent\n  created 2026-11-29 15:52 UTC   value ••••••••   ready True (Sealed)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn wide_shows_the_allowed_hosts_of_secretless_secrets() {
        let mut objects = recorded_list();
        objects[0].spec.allowed_hosts = Some(vec!["api.x.com".into(), "*.x.com".into()]);
        let cards: Vec<Entry> = objects.iter().map(Entry::from_object).collect();
        let text = render_cards(&cards, Some(Format::Wide)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].ends_with("ALLOWED HOSTS"), "{}", lines[0]);
        assert!(lines[1].ends_with("api.x.com,*.x.com"), "{}", lines[1]);
        let json = render_cards(&cards[..2], Some(Format::Json)).unwrap();
        assert!(json.contains(r#""allowedHosts": ["#), "{json}");
        assert_eq!(json.matches("allowedHosts").count(), 1, "{json}");
    }

    #[test]
    fn wide_adds_key_id_reason_and_description_columns() {
        let cards: Vec<Entry> = recorded_list().iter().map(Entry::from_object).collect();
        let text = render_cards(&cards, Some(Format::Wide)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 13, "a header and one line per secret: {text}");
        let header: Vec<&str> = lines[0]
            .split("  ")
            .filter(|c| !c.is_empty())
            .map(str::trim)
            .collect();
        assert_eq!(header, WIDE_COLUMNS);
        assert!(
            lines[1].starts_with("sandboxes  alice-service-0   alice  SERVICE_0_API_KEY   ••••••••  True   Sealed  k1      2026-11-29 15:52 UTC  Key 0 for the alice research agent"),
            "{}",
            lines[1]
        );
    }

    #[test]
    fn json_and_yaml_carry_the_card_fields_and_no_sealed_material() {
        let objects = recorded_list();
        let cards: Vec<Entry> = objects.iter().map(Entry::from_object).collect();
        let json: serde_json::Value =
            serde_json::from_str(&render_cards(&cards, Some(Format::Json)).unwrap()).unwrap();
        assert_eq!(json.as_array().unwrap().len(), 12);
        assert_eq!(
            json[0],
            serde_json::json!({
                "name": "alice-service-0", "namespace": "sandboxes",
                "envName": "SERVICE_0_API_KEY", "owner": "alice",
                "description": "Key 0 for the alice research agent",
                "created": "2026-11-29 15:52 UTC", "value": MASK,
                "ready": "True", "reason": "Sealed", "keyId": "k1"
            })
        );
        let yaml: serde_json::Value =
            serde_yaml::from_str(&render_cards(&cards, Some(Format::Yaml)).unwrap()).unwrap();
        assert_eq!(yaml, json);
        let ciphertext = &objects[0].spec.sealed.as_ref().unwrap().ciphertext;
        for format in [
            None,
            Some(Format::Json),
            Some(Format::Yaml),
            Some(Format::Wide),
        ] {
            let text = render_cards(&cards, format).unwrap();
            assert!(!text.contains(ciphertext.as_str()), "{format:?}: {text}");
        }
    }

    #[test]
    fn set_prints_its_message_or_the_secret_in_the_format_asked() {
        let card = Entry::from_object(&recorded_list()[0]);
        assert_eq!(
            render_result(&card, None, "created X").unwrap(),
            "created X\n"
        );
        let json: serde_json::Value =
            serde_json::from_str(&render_result(&card, Some(Format::Json), "created X").unwrap())
                .unwrap();
        assert_eq!(json["envName"], "SERVICE_0_API_KEY");
        let wide = render_result(&card, Some(Format::Wide), "created X").unwrap();
        assert_eq!(wide.lines().count(), 2, "{wide}");
        assert!(wide.starts_with("NAMESPACE"), "{wide}");
    }
}
