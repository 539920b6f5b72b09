//! Who is asking: the identity the authenticating proxy asserts in its headers, accepted only
//! on a connection the page trusts to come from that proxy.

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use std::net::SocketAddr;

use super::UiError;
use super::impersonate::Principal;
use super::server::UiState;

/// Inserted into each request's extensions on a TLS connection whose client certificate
/// verified against `--proxy-client-ca`.
#[derive(Debug, Clone, Copy)]
pub struct ProxyCertificate;

/// The signed-in user, as the page acts for them.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The username the proxy asserted; the page impersonates it.
    pub username: String,
    /// `spec.owner` of the user's secrets.
    pub owner: String,
    pub namespace: String,
    pub principal: Principal,
    /// The CSRF nonce cookie the browser sent, if any.
    pub csrf_nonce: Option<String>,
}

/// Why a request gets no identity.
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    pub title: &'static str,
    pub message: String,
    /// Answer in JSON (an `/api/` request) rather than with a page.
    pub json: bool,
}

impl FromRequestParts<UiState> for Identity {
    type Rejection = Refused;

    async fn from_request_parts(parts: &mut Parts, state: &UiState) -> Result<Self, Refused> {
        let settings = &state.settings;
        let json = parts.uri.path().starts_with("/api/");
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let verified = parts.extensions.get::<ProxyCertificate>().is_some();
        if !settings.trusts(peer, verified) {
            tracing::warn!(
                peer = ?peer,
                client_certificate = verified,
                "refused a request that did not come through the trusted proxy"
            );
            return Err(Refused {
                status: StatusCode::FORBIDDEN,
                title: "Open this page through your platform's sign-in",
                json,
                message: "This request did not come through the sign-in proxy this page trusts, so it cannot tell who you are. Open the Secrets page from your platform's usual address.".into(),
            });
        }
        let mut users = parts.headers.get_all(&settings.user_header).iter();
        let username = match (users.next(), users.next()) {
            (Some(value), None) => value.to_str().ok().map(str::trim).unwrap_or_default(),
            _ => "",
        };
        if username.is_empty() {
            tracing::warn!(
                header = %settings.user_header,
                "the trusted proxy sent no single username header"
            );
            return Err(Refused {
                status: StatusCode::FORBIDDEN,
                title: "You are not signed in",
                json,
                message: format!(
                    "The sign-in proxy did not say who you are (no {} header). Sign in again; if this persists, the proxy is misconfigured: ask your platform team.",
                    settings.user_header
                ),
            });
        }
        // `system:` names belong to Kubernetes itself (nodes, controllers, service accounts):
        // acting as one could borrow its permissions, so no proxy may assert one.
        if username.starts_with("system:") {
            tracing::warn!("refused a system: username from the proxy");
            return Err(refusal(UiError::SystemName(username.to_owned()), json));
        }
        let owner = settings.owner_of(username).map_err(|e| refusal(e, json))?;
        let namespace = settings
            .namespace
            .namespace_for(&owner)
            .map_err(|e| refusal(e, json))?;
        let groups = parts
            .headers
            .get_all(&settings.groups_header)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|g| !g.is_empty())
            // Never act as a `system:` group (system:masters is cluster-admin): an identity
            // provider has no business asserting one.
            .filter(|g| !g.starts_with("system:"))
            .filter_map(|g| HeaderValue::from_str(g).ok())
            .collect();
        let principal = Principal {
            username: HeaderValue::from_str(username)
                .map_err(|_| refusal(UiError::OwnerName(username.to_owned()), json))?,
            groups,
        };
        Ok(Self {
            username: username.to_owned(),
            owner,
            namespace,
            principal,
            csrf_nonce: super::csrf::cookie_nonce(&parts.headers),
        })
    }
}

fn refusal(error: UiError, json: bool) -> Refused {
    Refused {
        json,
        status: StatusCode::FORBIDDEN,
        title: "Your account cannot have secrets here",
        message: error.to_string(),
    }
}
