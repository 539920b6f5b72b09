//! The HTML pages: list, add, edit, delete with confirmation. They work without JavaScript;
//! `app.js` only adds the eye toggle and live name validation.

use askama::Template;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use std::time::SystemTime;

use super::identity::{Identity, Refused};
use super::impersonate::client_as;
use super::secrets::{Field, Input, Problem, UserSecrets};
use super::server::UiState;
use super::{csrf, naming};
use crate::api::SecretString;
use crate::tools::user::Card;

/// Who is signed in, shown in the header.
pub struct Chrome {
    pub username: String,
    pub namespace: String,
}

impl Chrome {
    fn of(identity: &Identity) -> Option<Self> {
        Some(Self {
            username: identity.username.clone(),
            namespace: identity.namespace.clone(),
        })
    }
}

/// A card as the page shows it: the value is the mask, readiness is in words.
pub struct CardView {
    pub env_name: String,
    pub description: String,
    pub created: String,
    pub mask: &'static str,
    pub state_class: &'static str,
    pub state_text: String,
}

impl CardView {
    fn from_card(card: &Card) -> Self {
        let (state_class, state_text) = readiness(card);
        Self {
            env_name: card.env_name.clone(),
            description: card.description.clone(),
            created: card.created.clone(),
            mask: card.value,
            state_class,
            state_text,
        }
    }
}

/// The `Ready` condition in words a user can act on.
pub fn readiness(card: &Card) -> (&'static str, String) {
    let words = |s: &str| s.to_owned();
    match (card.ready.as_str(), card.reason.as_str()) {
        ("True", _) => ("ready", words("Ready for sandboxes")),
        (_, "") => ("pending", words("Being checked: ready in a moment")),
        (_, "PlaintextFound") => ("pending", words("Being sealed: ready in a moment")),
        (_, "NoKeyring") => (
            "pending",
            words(
                "Not checked yet: agent-secrets has no encryption key loaded. Ask your platform team.",
            ),
        ),
        (_, "NotSealed") => (
            "problem",
            words("Not ready: it has no stored value. Edit it and enter the value again."),
        ),
        (_, "KeyMissing") => (
            "problem",
            words(
                "Not ready: the key that encrypts it is missing. Enter the value again, or ask your platform team.",
            ),
        ),
        (_, "Damaged") => (
            "problem",
            words(
                "Not ready: the stored value cannot be opened. Edit it and enter the value again.",
            ),
        ),
        (_, "DuplicateEnvName") => (
            "problem",
            words("Not ready: another of your secrets has the same name. Delete one of them."),
        ),
        (_, other) => ("problem", format!("Not ready ({other})")),
    }
}

#[derive(Template)]
#[template(path = "index.html")]
struct IndexPage {
    chrome: Option<Chrome>,
    cards: Vec<CardView>,
    notice: Option<String>,
    problem: Option<String>,
}

/// One problem in the form's summary, linking to its field.
pub struct ErrorItem {
    pub anchor: Option<&'static str>,
    pub message: String,
}

/// Problems of a submitted form, by field.
#[derive(Default)]
pub struct FormErrors {
    pub env_name: Option<String>,
    pub value: Option<String>,
    pub description: Option<String>,
    pub all: Vec<ErrorItem>,
}

impl FormErrors {
    fn from_problems(problems: &[Problem], editing: bool) -> Self {
        let mut errors = Self::default();
        for problem in problems {
            let (slot, anchor) = match problem.field {
                Some(Field::EnvName) if !editing => (Some(&mut errors.env_name), Some("env_name")),
                Some(Field::Value) => (Some(&mut errors.value), Some("value")),
                Some(Field::Description) => (Some(&mut errors.description), Some("description")),
                _ => (None, None),
            };
            if let Some(slot) = slot
                && slot.is_none()
            {
                *slot = Some(problem.message.clone());
            }
            errors.all.push(ErrorItem {
                anchor,
                message: problem.message.clone(),
            });
        }
        errors
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}

#[derive(Template)]
#[template(path = "form.html")]
struct FormPage<'a> {
    chrome: Option<Chrome>,
    editing: bool,
    action: String,
    env_name: String,
    description: String,
    /// Only ever the value typed into the very POST this page answers (so a refused form
    /// keeps it); never a stored value.
    value: &'a str,
    csrf_token: String,
    errors: FormErrors,
    rule: String,
    conventions: &'static [(&'static str, &'static str)],
}

#[derive(Template)]
#[template(path = "delete.html")]
struct DeletePage {
    chrome: Option<Chrome>,
    env_name: String,
    description: String,
    csrf_token: String,
    problem: Option<String>,
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    chrome: Option<Chrome>,
    title: String,
    message: String,
    show_back: bool,
}

/// Render a template, or a plain 500 if rendering fails (it cannot with checked templates,
/// but nothing here may panic).
fn html(status: StatusCode, template: &impl Template) -> Response {
    match template.render() {
        Ok(body) => (status, Html(body)).into_response(),
        Err(error) => {
            tracing::error!(error = %error, "failed to render a page");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "failed to render the page\n",
            )
                .into_response()
        }
    }
}

fn error_page(
    status: StatusCode,
    chrome: Option<Chrome>,
    title: &str,
    message: &str,
    show_back: bool,
) -> Response {
    html(
        status,
        &ErrorPage {
            chrome,
            title: title.to_owned(),
            message: message.to_owned(),
            show_back,
        },
    )
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        if self.json {
            return super::json::error_response(self.status, None, &self.message);
        }
        error_page(self.status, None, self.title, &self.message, false)
    }
}

/// Unknown paths.
pub async fn not_found() -> Response {
    error_page(
        StatusCode::NOT_FOUND,
        None,
        "Page not found",
        "There is no page at this address.",
        true,
    )
}

/// The user's secrets, acting as the user.
pub fn secrets_of(state: &UiState, identity: &Identity) -> UserSecrets {
    let client = client_as(
        &state.client,
        identity.principal.clone(),
        &identity.namespace,
    );
    UserSecrets::new(
        client,
        &identity.owner,
        &identity.namespace,
        &state.settings.extra_reserved_env_names,
    )
}

/// A CSRF token for this user, and the cookie to set when the browser has none yet.
pub fn csrf_token(state: &UiState, identity: &Identity) -> (String, Option<HeaderValue>) {
    let (nonce, cookie) = match &identity.csrf_nonce {
        Some(nonce) => (nonce.clone(), None),
        None => match state.csrf.new_nonce() {
            Ok(nonce) => {
                let cookie = HeaderValue::from_str(&csrf::set_cookie(&nonce)).ok();
                (nonce, cookie)
            }
            Err(error) => {
                tracing::error!(error = %error, "failed to issue a CSRF nonce");
                (String::new(), None)
            }
        },
    };
    (
        state
            .csrf
            .token(&identity.username, &nonce, SystemTime::now()),
        cookie,
    )
}

/// Check the token of a write; log why a refused one failed (never the token).
pub fn csrf_ok(state: &UiState, identity: &Identity, token: Option<&str>) -> bool {
    match state.csrf.verify(
        &identity.username,
        identity.csrf_nonce.as_deref(),
        token,
        SystemTime::now(),
    ) {
        Ok(()) => true,
        Err(refusal) => {
            tracing::warn!(?refusal, user = %identity.username, "refused a write without a valid CSRF token");
            false
        }
    }
}

fn csrf_refused(identity: &Identity) -> Response {
    error_page(
        StatusCode::FORBIDDEN,
        Chrome::of(identity),
        "This form has expired",
        "Nothing was changed: the form was too old, or was not sent from this page. Go back, reload the page and try again.",
        true,
    )
}

fn with_cookie(mut response: Response, cookie: Option<HeaderValue>) -> Response {
    if let Some(cookie) = cookie {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
}

/// Parsed form fields; the value goes straight into a zeroised string.
struct FormFields {
    input: Input,
    csrf_token: Option<String>,
    confirm: Option<String>,
}

fn parse_form(body: &Bytes) -> FormFields {
    let mut fields = FormFields {
        input: Input::default(),
        csrf_token: None,
        confirm: None,
    };
    for (key, value) in form_urlencoded::parse(body) {
        match key.as_ref() {
            "env_name" => fields.input.env_name = value.trim().to_owned(),
            "value" => fields.input.value = SecretString::new(value.into_owned()),
            "description" => fields.input.description = Some(value.into_owned()),
            "csrf_token" => fields.csrf_token = Some(value.into_owned()),
            "confirm" => fields.confirm = Some(value.into_owned()),
            _ => {}
        }
    }
    fields
}

/// `GET /`: the cards.
pub async fn index(
    State(state): State<UiState>,
    identity: Identity,
    RawQuery(query): RawQuery,
) -> Response {
    let notice = query.as_deref().and_then(notice_from_query);
    let (cards, problem, status) = match secrets_of(&state, &identity).cards().await {
        Ok(cards) => (cards, None, StatusCode::OK),
        Err(problem) => (Vec::new(), Some(problem.message), problem.status),
    };
    html(
        status,
        &IndexPage {
            chrome: Chrome::of(&identity),
            cards: cards.iter().map(CardView::from_card).collect(),
            notice,
            problem,
        },
    )
}

/// `?added=NAME` after a redirect: a confirmation in words (only for valid env names, so
/// nobody can make the page say something else).
fn notice_from_query(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes()).find_map(|(key, name)| {
        let verb = match key.as_ref() {
            "added" => "Added",
            "updated" => "Saved",
            "deleted" => "Deleted",
            _ => return None,
        };
        crate::api::validate_env_name(&name, &[]).ok()?;
        Some(match key.as_ref() {
            "deleted" => format!("{verb} {name}. Sandboxes started from now on will not get it."),
            "updated" => {
                format!("{verb} {name}. Sandboxes started from now on get the new version.")
            }
            _ => format!("{verb} {name}. Sandboxes started from now on get it."),
        })
    })
}

fn form_page(
    identity: &Identity,
    state: &UiState,
    editing: bool,
    env_name: &str,
    description: &str,
    value: &str,
    errors: FormErrors,
) -> (String, Option<HeaderValue>) {
    let (token, cookie) = csrf_token(state, identity);
    let page = FormPage {
        chrome: Chrome::of(identity),
        editing,
        action: if editing {
            format!("/secrets/{env_name}")
        } else {
            "/secrets".into()
        },
        env_name: env_name.to_owned(),
        description: description.to_owned(),
        value,
        csrf_token: token,
        errors,
        rule: naming::rule(&state.settings.extra_reserved_env_names),
        conventions: naming::CONVENTIONS,
    };
    let body = page.render().unwrap_or_else(|error| {
        tracing::error!(error = %error, "failed to render the form");
        String::new()
    });
    (body, cookie)
}

fn form_response(status: StatusCode, rendered: (String, Option<HeaderValue>)) -> Response {
    let (body, cookie) = rendered;
    if body.is_empty() {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "failed to render the page\n",
        )
            .into_response();
    }
    with_cookie((status, Html(body)).into_response(), cookie)
}

/// `GET /secrets/new`.
pub async fn new_form(State(state): State<UiState>, identity: Identity) -> Response {
    let rendered = form_page(&identity, &state, false, "", "", "", FormErrors::default());
    form_response(StatusCode::OK, rendered)
}

/// `POST /secrets`: add; on a refusal the form comes back with the problems next to their
/// fields and what was typed (the value too, in this one response only).
pub async fn create(State(state): State<UiState>, identity: Identity, body: Bytes) -> Response {
    let fields = parse_form(&body);
    if !csrf_ok(&state, &identity, fields.csrf_token.as_deref()) {
        return csrf_refused(&identity);
    }
    let input = fields.input;
    match secrets_of(&state, &identity).create(&input).await {
        Ok(card) => {
            tracing::info!(user = %identity.username, namespace = %identity.namespace, env_name = %card.env_name, object = %card.name, "secret added");
            Redirect::to(&format!("/?added={}", card.env_name)).into_response()
        }
        Err(problems) => {
            let status = problems
                .first()
                .map_or(StatusCode::UNPROCESSABLE_ENTITY, |p| p.status);
            let rendered = form_page(
                &identity,
                &state,
                false,
                &input.env_name,
                input.description.as_deref().unwrap_or_default(),
                input.value.expose(),
                FormErrors::from_problems(&problems, false),
            );
            form_response(status, rendered)
        }
    }
}

/// `GET /secrets/{env_name}/edit`: description pre-filled, value blank.
pub async fn edit_form(
    State(state): State<UiState>,
    identity: Identity,
    Path(env_name): Path<String>,
) -> Response {
    match secrets_of(&state, &identity).find(&env_name).await {
        Ok(object) => {
            let description = object.spec.description.clone().unwrap_or_default();
            let rendered = form_page(
                &identity,
                &state,
                true,
                &object.spec.env_name,
                &description,
                "",
                FormErrors::default(),
            );
            form_response(StatusCode::OK, rendered)
        }
        Err(problem) => problem_page(&identity, &problem),
    }
}

fn problem_page(identity: &Identity, problem: &Problem) -> Response {
    let title = if problem.status == StatusCode::NOT_FOUND {
        "Secret not found"
    } else {
        "Something went wrong"
    };
    error_page(
        problem.status,
        Chrome::of(identity),
        title,
        &problem.message,
        true,
    )
}

/// `POST /secrets/{env_name}`: save; a blank value keeps the stored one.
pub async fn update(
    State(state): State<UiState>,
    identity: Identity,
    Path(env_name): Path<String>,
    body: Bytes,
) -> Response {
    let fields = parse_form(&body);
    if !csrf_ok(&state, &identity, fields.csrf_token.as_deref()) {
        return csrf_refused(&identity);
    }
    let mut input = fields.input;
    input.env_name = env_name.clone();
    // The form always sends the description; an emptied field clears it.
    if input.description.is_none() {
        input.description = Some(String::new());
    }
    match secrets_of(&state, &identity)
        .update(&env_name, &input)
        .await
    {
        Ok(card) => {
            tracing::info!(user = %identity.username, namespace = %identity.namespace, env_name = %card.env_name, value_changed = !input.value.expose().is_empty(), "secret updated");
            Redirect::to(&format!("/?updated={}", card.env_name)).into_response()
        }
        Err(problems) if problems.iter().any(|p| p.status == StatusCode::NOT_FOUND) => {
            problem_page(&identity, &problems[0])
        }
        Err(problems) => {
            let status = problems
                .first()
                .map_or(StatusCode::UNPROCESSABLE_ENTITY, |p| p.status);
            let rendered = form_page(
                &identity,
                &state,
                true,
                &env_name,
                input.description.as_deref().unwrap_or_default(),
                input.value.expose(),
                FormErrors::from_problems(&problems, true),
            );
            form_response(status, rendered)
        }
    }
}

fn delete_page(
    state: &UiState,
    identity: &Identity,
    status: StatusCode,
    env_name: &str,
    description: &str,
    problem: Option<String>,
) -> Response {
    let (token, cookie) = csrf_token(state, identity);
    let response = html(
        status,
        &DeletePage {
            chrome: Chrome::of(identity),
            env_name: env_name.to_owned(),
            description: description.to_owned(),
            csrf_token: token,
            problem,
        },
    );
    with_cookie(response, cookie)
}

/// `GET /secrets/{env_name}/delete`: the confirmation, naming the secret and what deleting
/// it means for sandboxes.
pub async fn delete_form(
    State(state): State<UiState>,
    identity: Identity,
    Path(env_name): Path<String>,
) -> Response {
    match secrets_of(&state, &identity).find(&env_name).await {
        Ok(object) => delete_page(
            &state,
            &identity,
            StatusCode::OK,
            &object.spec.env_name,
            object.spec.description.as_deref().unwrap_or_default(),
            None,
        ),
        Err(problem) => problem_page(&identity, &problem),
    }
}

/// `POST /secrets/{env_name}/delete`: deletes only with `confirm` naming the secret (sent by
/// the confirmation page); anything else shows the confirmation again.
pub async fn delete(
    State(state): State<UiState>,
    identity: Identity,
    Path(env_name): Path<String>,
    body: Bytes,
) -> Response {
    let fields = parse_form(&body);
    if !csrf_ok(&state, &identity, fields.csrf_token.as_deref()) {
        return csrf_refused(&identity);
    }
    if fields.confirm.as_deref() != Some(env_name.as_str()) {
        return delete_page(
            &state,
            &identity,
            StatusCode::BAD_REQUEST,
            &env_name,
            "",
            Some(format!(
                "Nothing was deleted yet: confirm by pressing \"Delete {env_name}\"."
            )),
        );
    }
    match secrets_of(&state, &identity).delete(&env_name).await {
        Ok(()) => {
            tracing::info!(user = %identity.username, namespace = %identity.namespace, env_name = %env_name, "secret deleted");
            Redirect::to(&format!("/?deleted={env_name}")).into_response()
        }
        Err(problem) if problem.status == StatusCode::NOT_FOUND => {
            problem_page(&identity, &problem)
        }
        Err(problem) => delete_page(
            &state,
            &identity,
            problem.status,
            &env_name,
            "",
            Some(problem.message),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(ready: &str, reason: &str) -> Card {
        Card {
            name: "n".into(),
            namespace: "ns".into(),
            env_name: "X".into(),
            owner: "alice".into(),
            description: String::new(),
            created: String::new(),
            value: crate::tools::user::MASK,
            ready: ready.into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn readiness_is_said_in_words() {
        assert_eq!(readiness(&card("True", "Sealed")).1, "Ready for sandboxes");
        assert_eq!(readiness(&card("Unknown", "")).0, "pending");
        let (class, text) = readiness(&card("False", "KeyMissing"));
        assert_eq!(class, "problem");
        assert!(text.contains("key that encrypts it is missing"), "{text}");
        assert!(readiness(&card("False", "Odd")).1.contains("Odd"));
    }

    #[test]
    fn notices_only_name_valid_env_names() {
        assert_eq!(
            notice_from_query("added=X_TOKEN").as_deref(),
            Some("Added X_TOKEN. Sandboxes started from now on get it.")
        );
        assert_eq!(notice_from_query("added=%3Cb%3Ehi"), None);
        assert_eq!(notice_from_query("other=X"), None);
    }
}
