//! `/api/v1/secrets`: the same operations as the pages, as JSON for the platform's own front
//! end. Same identity, impersonation and CSRF rules; answers never hold a value.
//!
//! - `GET /api/v1/secrets` → `{"owner", "namespace", "items": [card]}`; the response's
//!   `X-CSRF-Token` header (with its cookie) is the token for writes.
//! - `POST /api/v1/secrets` `{"envName", "value", "description"?}` → 201 card
//! - `PATCH /api/v1/secrets/{envName}` `{"value"?, "description"?}` → 200 card (no value keeps
//!   the stored one)
//! - `DELETE /api/v1/secrets/{envName}?confirm=true` → 204
//! - `GET /api/v1/env-names/check?name=X` → `{"valid", "message"}`
//!
//! Writes need `Content-Type: application/json` and `X-CSRF-Token`. Errors are
//! `{"errors": [{"field"?, "message"}]}`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::identity::Identity;
use super::pages::{csrf_ok, csrf_token, secrets_of};
use super::secrets::{Field, Input, Problem};
use super::server::UiState;
use crate::api::SecretString;

/// An error answer.
pub fn error_response(status: StatusCode, field: Option<Field>, message: &str) -> Response {
    (
        status,
        Json(json!({"errors": [{"field": field, "message": message}]})),
    )
        .into_response()
}

fn problems_response(problems: &[Problem]) -> Response {
    let status = problems
        .first()
        .map_or(StatusCode::UNPROCESSABLE_ENTITY, |p| p.status);
    let errors: Vec<_> = problems
        .iter()
        .map(|p| json!({"field": p.field, "message": p.message}))
        .collect();
    (status, Json(json!({ "errors": errors }))).into_response()
}

/// The checks every write passes first: JSON content type (a cross-site HTML form cannot
/// send it without a CORS preflight) and the CSRF token. `Some` is the refusal.
fn write_refused(state: &UiState, identity: &Identity, headers: &HeaderMap) -> Option<Response> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    if !json {
        return Some(error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            None,
            "send the body as Content-Type: application/json",
        ));
    }
    let token = headers
        .get(super::csrf::HEADER)
        .and_then(|v| v.to_str().ok());
    if !csrf_ok(state, identity, token) {
        return Some(error_response(
            StatusCode::FORBIDDEN,
            None,
            "missing or invalid CSRF token: send the X-CSRF-Token header from GET /api/v1/secrets, with its cookie",
        ));
    }
    None
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateBody {
    env_name: String,
    value: SecretString,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct UpdateBody {
    #[serde(default)]
    value: Option<SecretString>,
    #[serde(default)]
    description: Option<String>,
}

/// Parse a JSON body without ever echoing the parser's text (it can quote the value).
fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Option<T> {
    serde_json::from_slice(body).ok()
}

fn not_shaped(shape: &str) -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        None,
        &format!("the body must be a JSON object {shape}"),
    )
}

/// `GET /api/v1/secrets`.
pub async fn list(State(state): State<UiState>, identity: Identity) -> Response {
    let (token, cookie) = csrf_token(&state, &identity);
    let mut response = match secrets_of(&state, &identity).cards().await {
        Ok(cards) => Json(json!({
            "owner": identity.owner,
            "namespace": identity.namespace,
            "items": cards,
        }))
        .into_response(),
        Err(problem) => problems_response(&[problem]),
    };
    if let Ok(token) = HeaderValue::from_str(&token) {
        response.headers_mut().insert(super::csrf::HEADER, token);
    }
    if let Some(cookie) = cookie {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
}

/// `POST /api/v1/secrets`.
pub async fn create(
    State(state): State<UiState>,
    identity: Identity,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = write_refused(&state, &identity, &headers) {
        return refused;
    }
    let Some(body) = parse::<CreateBody>(&body) else {
        return not_shaped("{\"envName\", \"value\", \"description\"?}");
    };
    let input = Input {
        env_name: body.env_name.trim().to_owned(),
        value: body.value,
        description: body.description,
    };
    match secrets_of(&state, &identity).create(&input).await {
        Ok(card) => {
            tracing::info!(user = %identity.username, namespace = %identity.namespace, env_name = %card.env_name, object = %card.name, "secret added");
            (StatusCode::CREATED, Json(card)).into_response()
        }
        Err(problems) => problems_response(&problems),
    }
}

/// `PATCH /api/v1/secrets/{env_name}`.
pub async fn update(
    State(state): State<UiState>,
    identity: Identity,
    Path(env_name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = write_refused(&state, &identity, &headers) {
        return refused;
    }
    let Some(body) = parse::<UpdateBody>(&body) else {
        return not_shaped("{\"value\"?, \"description\"?}");
    };
    let input = Input {
        env_name: env_name.clone(),
        value: body.value.unwrap_or_default(),
        description: body.description,
    };
    match secrets_of(&state, &identity)
        .update(&env_name, &input)
        .await
    {
        Ok(card) => {
            tracing::info!(user = %identity.username, namespace = %identity.namespace, env_name = %card.env_name, value_changed = !input.value.expose().is_empty(), "secret updated");
            Json(card).into_response()
        }
        Err(problems) => problems_response(&problems),
    }
}

/// `DELETE /api/v1/secrets/{env_name}?confirm=true`.
pub async fn delete(
    State(state): State<UiState>,
    identity: Identity,
    Path(env_name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let token = headers
        .get(super::csrf::HEADER)
        .and_then(|v| v.to_str().ok());
    if !csrf_ok(&state, &identity, token) {
        return error_response(
            StatusCode::FORBIDDEN,
            None,
            "missing or invalid CSRF token: send the X-CSRF-Token header from GET /api/v1/secrets, with its cookie",
        );
    }
    let confirmed = query.as_deref().is_some_and(|q| {
        form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "confirm" && v == "true")
    });
    if !confirmed {
        return error_response(
            StatusCode::BAD_REQUEST,
            None,
            &format!(
                "deleting {env_name} needs ?confirm=true: sandboxes started afterwards will no longer get it"
            ),
        );
    }
    match secrets_of(&state, &identity).delete(&env_name).await {
        Ok(()) => {
            tracing::info!(user = %identity.username, namespace = %identity.namespace, env_name = %env_name, "secret deleted");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(problem) => problems_response(&[problem]),
    }
}

/// `GET /api/v1/env-names/check?name=X`: the live validation behind the name field.
pub async fn check_env_name(
    State(state): State<UiState>,
    _identity: Identity,
    RawQuery(query): RawQuery,
) -> Response {
    let name = query
        .as_deref()
        .and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "name")
                .map(|(_, v)| v.into_owned())
        })
        .unwrap_or_default();
    let message = super::naming::problem(&name, &state.settings.extra_reserved_env_names);
    Json(json!({"valid": message.is_none(), "message": message})).into_response()
}
