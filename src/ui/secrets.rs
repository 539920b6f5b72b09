//! The signed-in user's secrets, read and written through the API server as that user.
//!
//! Every call goes through an impersonating client, so the cluster decides what the user may
//! do; on top of that the page only ever shows objects whose `spec.owner` is the user and only
//! writes objects with `spec.owner` set to the user. Values go to the API server (where the
//! webhook seals them, as for `kubectl apply`) and are never read back.

use axum::http::StatusCode;
use kube::ResourceExt as _;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::json;

use crate::api::{AgentSecret, AgentSecretSpec, FIELD_MANAGER, SecretString};
use crate::crypto::MAX_VALUE_BYTES;
use crate::tools::user::{Card, MASK, object_name};

/// Longest description the CRD accepts, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 1024;

/// How long one API call may take before the user is told to try again; far below the
/// client's own read timeout, which is sized for watches.
pub const API_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// `call` bounded by [`API_TIMEOUT`].
async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<Result<T, kube::Error>, Problem> {
    tokio::time::timeout(API_TIMEOUT, call)
        .await
        .map_err(|_| Problem {
            status: StatusCode::GATEWAY_TIMEOUT,
            field: None,
            message: "The Kubernetes API server did not answer in time. Try again in a moment."
                .into(),
        })
}

/// A form field a problem belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Field {
    EnvName,
    Value,
    Description,
}

/// Something the user should read: which field (if any), in words, and the HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub status: StatusCode,
    pub field: Option<Field>,
    pub message: String,
}

impl Problem {
    pub fn field(field: Field, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            field: Some(field),
            message: message.into(),
        }
    }

    fn not_found(env_name: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            field: None,
            message: format!("You have no secret named {env_name}."),
        }
    }
}

/// What the user typed into the add or edit form.
#[derive(Debug, Default)]
pub struct Input {
    pub env_name: String,
    /// Blank on edit keeps the current value.
    pub value: SecretString,
    /// `None` on edit keeps the current description; blank clears it.
    pub description: Option<String>,
}

/// The user's view of the AgentSecrets in their namespace.
pub struct UserSecrets {
    api: Api<AgentSecret>,
    owner: String,
    namespace: String,
    extra_reserved: Vec<String>,
}

impl UserSecrets {
    /// `client` must already act as the user (see `impersonate::client_as`).
    pub fn new(
        client: kube::Client,
        owner: &str,
        namespace: &str,
        extra_reserved: &[String],
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            owner: owner.to_owned(),
            namespace: namespace.to_owned(),
            extra_reserved: extra_reserved.to_vec(),
        }
    }

    /// The user's objects, by env name.
    async fn objects(&self, value: Option<&SecretString>) -> Result<Vec<AgentSecret>, Problem> {
        let list = bounded(self.api.list(&ListParams::default()))
            .await?
            .map_err(|e| self.explain(e, value))?;
        let mut mine: Vec<AgentSecret> = list
            .items
            .into_iter()
            .filter(|s| s.spec.owner == self.owner)
            .collect();
        mine.sort_by(|a, b| a.spec.env_name.cmp(&b.spec.env_name));
        Ok(mine)
    }

    /// The user's cards (values masked; nothing else of the object leaves this function).
    pub async fn cards(&self) -> Result<Vec<Card>, Problem> {
        Ok(self
            .objects(None)
            .await?
            .iter()
            .map(Card::from_object)
            .collect())
    }

    /// The user's secret named `env_name`.
    pub async fn find(&self, env_name: &str) -> Result<AgentSecret, Problem> {
        self.find_with(env_name, None).await
    }

    async fn find_with(
        &self,
        env_name: &str,
        value: Option<&SecretString>,
    ) -> Result<AgentSecret, Problem> {
        let mut matches: Vec<AgentSecret> = self
            .objects(value)
            .await?
            .into_iter()
            .filter(|s| s.spec.env_name == env_name)
            .collect();
        match matches.len() {
            0 => Err(Problem::not_found(env_name)),
            1 => Ok(matches.remove(0)),
            _ => Err(Problem {
                status: StatusCode::CONFLICT,
                field: None,
                message: format!(
                    "You have {} secrets named {env_name}, so sandboxes get none of them; ask your platform team to delete the extra ones ({}).",
                    matches.len(),
                    matches
                        .iter()
                        .map(|m| m.name_any())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        }
    }

    /// Check what the page can check itself, before asking the API server.
    pub fn check(&self, input: &Input, creating: bool) -> Vec<Problem> {
        let mut problems = Vec::new();
        if creating
            && let Some(problem) = super::naming::problem(&input.env_name, &self.extra_reserved)
        {
            problems.push(Problem::field(Field::EnvName, problem));
        }
        if creating && input.value.expose().is_empty() {
            problems.push(Problem::field(
                Field::Value,
                "Enter the value of the secret.",
            ));
        }
        if input.value.expose().len() > MAX_VALUE_BYTES {
            problems.push(Problem::field(
                Field::Value,
                format!("The value is longer than {} KiB.", MAX_VALUE_BYTES / 1024),
            ));
        }
        if input
            .description
            .as_ref()
            .is_some_and(|d| d.trim().chars().count() > MAX_DESCRIPTION_CHARS)
        {
            problems.push(Problem::field(
                Field::Description,
                format!("The description is longer than {MAX_DESCRIPTION_CHARS} characters."),
            ));
        }
        problems
    }

    /// Add a secret.
    pub async fn create(&self, input: &Input) -> Result<Card, Vec<Problem>> {
        let problems = self.check(input, true);
        if !problems.is_empty() {
            return Err(problems);
        }
        let existing = self
            .objects(Some(&input.value))
            .await
            .map_err(|p| vec![p])?;
        if existing.iter().any(|s| s.spec.env_name == input.env_name) {
            return Err(vec![Problem {
                status: StatusCode::CONFLICT,
                ..Problem::field(
                    Field::EnvName,
                    format!(
                        "You already have a secret named {}: edit it, or choose another name.",
                        input.env_name
                    ),
                )
            }]);
        }
        let mut object = AgentSecret::new(
            "",
            AgentSecretSpec {
                owner: self.owner.clone(),
                env_name: input.env_name.clone(),
                description: input.description.as_deref().and_then(non_empty),
                value: Some(input.value.clone()),
                sealed: None,
                ..Default::default()
            },
        );
        // generateName: `<owner>-<env-name>` alone can collide across owners (`a-b`+`C` and
        // `a`+`B_C`); the random suffix cannot, and the page finds secrets by env name anyway.
        object.metadata.name = None;
        let prefix: String = object_name(&self.owner, &input.env_name)
            .chars()
            .take(200)
            .collect();
        // A cut may leave `-` or `.` at the end; `.-` would start a DNS label with `-`.
        object.metadata.generate_name = Some(format!("{}-", prefix.trim_end_matches(['-', '.'])));
        let params = PostParams {
            dry_run: false,
            field_manager: Some(FIELD_MANAGER.into()),
        };
        let created = bounded(self.api.create(&params, &object))
            .await
            .map_err(|p| vec![p])?
            .map_err(|e| vec![self.explain(e, Some(&input.value))])?;
        Ok(Card::from_object(&created))
    }

    /// Change the value (when one is given) and the description of `env_name`.
    pub async fn update(&self, env_name: &str, input: &Input) -> Result<Card, Vec<Problem>> {
        let problems = self.check(input, false);
        if !problems.is_empty() {
            return Err(problems);
        }
        let object = self
            .find_with(env_name, Some(&input.value))
            .await
            .map_err(|p| vec![p])?;
        let mut spec = serde_json::Map::new();
        // A blank value is left out of the patch: the webhook then keeps the sealed value.
        if !input.value.expose().is_empty() {
            spec.insert("value".into(), json!(input.value.expose()));
        }
        if let Some(description) = &input.description {
            // null in a merge patch removes the field.
            spec.insert(
                "description".into(),
                non_empty(description).map_or(serde_json::Value::Null, |d| json!(d)),
            );
        }
        // resourceVersion: a concurrent change (or a replaced object of the same name) makes
        // the API server refuse instead of overwriting what the user did not see.
        let patch = json!({
            "metadata": {"resourceVersion": object.resource_version()},
            "spec": spec,
        });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        let updated = bounded(
            self.api
                .patch(&object.name_any(), &params, &Patch::Merge(&patch)),
        )
        .await
        .map_err(|p| vec![p])?
        .map_err(|e| vec![self.explain(e, Some(&input.value))])?;
        Ok(Card::from_object(&updated))
    }

    /// Delete `env_name`.
    pub async fn delete(&self, env_name: &str) -> Result<(), Problem> {
        let object = self.find(env_name).await?;
        // The uid precondition deletes exactly the object checked above, never a newer one
        // that took its name.
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: object.uid(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        bounded(self.api.delete(&object.name_any(), &params))
            .await?
            .map_err(|e| self.explain(e, None))?;
        Ok(())
    }

    /// An API error in words, next to the field it concerns. Anything quoted from the API
    /// server has the typed value masked, in case a message ever echoes it.
    fn explain(&self, error: kube::Error, value: Option<&SecretString>) -> Problem {
        let namespace = &self.namespace;
        let kube::Error::Api(status) = &error else {
            tracing::warn!(error = %error, "request to the API server failed");
            return Problem {
                status: StatusCode::BAD_GATEWAY,
                field: None,
                message: "The Kubernetes API server could not be reached. Try again in a moment."
                    .into(),
            };
        };
        let message = redact(&status.message, value);
        let code = StatusCode::from_u16(status.code).unwrap_or(StatusCode::BAD_GATEWAY);
        let webhook = message.contains("admission webhook")
            || message.contains("ValidatingAdmissionPolicy")
            || message.contains("denied request");
        let field = if let Some(cause) = status
            .details
            .as_ref()
            .and_then(|d| d.causes.first())
            .map(|c| c.field.as_str())
        {
            field_named(cause)
        } else {
            field_mentioned(&message)
        };
        let text = match status.code {
            409 if status.reason == "AlreadyExists" => {
                "A secret with this name already exists.".to_owned()
            }
            409 => "The secret changed while you were editing it: reload and try again.".into(),
            404 if status.message.contains("the server could not find the requested resource") => {
                "agent-secrets is not installed in this cluster (the AgentSecret resource is unknown). Ask your platform team.".into()
            }
            404 => format!(
                "Namespace {namespace} or the secret does not exist. Ask your platform team."
            ),
            403 if !webhook => format!(
                "You are not allowed to do this in namespace {namespace}: the cluster said \"{message}\". Ask your platform team for access."
            ),
            _ if webhook => format!("The cluster refused it: {}", sentence(&message)),
            422 => format!("The cluster refused it: {}", sentence(&message)),
            _ => format!("The cluster refused it ({}): {}", status.code, sentence(&message)),
        };
        Problem {
            status: if code.is_client_error() {
                code
            } else {
                StatusCode::BAD_GATEWAY
            },
            field,
            message: text,
        }
    }
}

fn non_empty(text: &str) -> Option<String> {
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// `spec.envName` style field paths to the form's fields.
fn field_named(path: &str) -> Option<Field> {
    match path.trim_start_matches("spec.") {
        p if p.starts_with("envName") => Some(Field::EnvName),
        p if p.starts_with("value") || p.starts_with("sealed") => Some(Field::Value),
        p if p.starts_with("description") => Some(Field::Description),
        _ => None,
    }
}

fn field_mentioned(message: &str) -> Option<Field> {
    if message.contains("envName") {
        Some(Field::EnvName)
    } else if message.contains("spec.value") || message.contains("spec.sealed") {
        Some(Field::Value)
    } else if message.contains("description") {
        Some(Field::Description)
    } else {
        None
    }
}

/// Capitalised, ending with a full stop.
fn sentence(text: &str) -> String {
    let text = text.trim();
    let mut chars = text.chars();
    let mut out: String = chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default();
    if !out.ends_with(['.', '!', '?']) {
        out.push('.');
    }
    out
}

/// `message` with every occurrence of the typed value masked. Values too short to mask
/// without garbling the message (under 4 bytes) hide the whole message instead.
pub fn redact(message: &str, value: Option<&SecretString>) -> String {
    match value.map(SecretString::expose) {
        Some(v) if !v.is_empty() && v.len() < 4 && message.contains(v) => {
            "the request was refused (details withheld because they may quote the value)".into()
        }
        Some(v) if !v.is_empty() => message.replace(v, MASK),
        _ => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_api_messages_never_carry_the_value() {
        let value = SecretString::new("canary-value-123".into());
        assert_eq!(
            redact(
                "spec.value: Invalid value: \"canary-value-123\"",
                Some(&value)
            ),
            format!("spec.value: Invalid value: \"{MASK}\"")
        );
        let short = SecretString::new("ab".into());
        assert!(!redact("x ab y", Some(&short)).contains("ab"));
        assert_eq!(redact("x ab y", None), "x ab y");
    }

    #[test]
    fn api_field_paths_map_to_form_fields() {
        assert_eq!(field_named("spec.envName"), Some(Field::EnvName));
        assert_eq!(field_named("spec.value"), Some(Field::Value));
        assert_eq!(field_named("spec.description"), Some(Field::Description));
        assert_eq!(field_named("metadata.name"), None);
        assert_eq!(
            field_mentioned("owner \"alice\" already has a secret with envName X"),
            Some(Field::EnvName)
        );
        assert_eq!(sentence("env name is empty"), "Env name is empty.");
    }
}
