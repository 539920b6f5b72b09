//! Mutating admission: seal AgentSecrets on the way in, inject sandbox pods.
//!
//! The decisions are pure functions ([`agentsecret::mutate`], [`pod::mutate`]) of the
//! request, the keyring, the cache and the [`Policy`]; [`server`] only converts HTTP to
//! AdmissionReviews and performs the one side effect (creating the pod-scoped Secret).

pub mod agentsecret;
pub mod patch;
pub mod pod;
pub mod review;
pub mod server;

use k8s_openapi::api::authentication::v1::UserInfo;
use std::collections::BTreeSet;

/// Who may create sandbox pods, and what is never touched.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Principals allowed to create labelled pods; empty means anyone who may create pods.
    pub allowed_principals: Vec<Principal>,
    /// Env names refused in addition to the built-in reserved ones.
    pub extra_reserved_env_names: Vec<String>,
    /// Namespaces whose pods are never injected.
    pub excluded_namespaces: BTreeSet<String>,
}

/// An entry of the sandbox-creator allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Exact username, e.g. `system:serviceaccount:sandboxes:sandbox-orchestrator`.
    User(String),
    /// Any member of a group, written `group:NAME`.
    Group(String),
}

impl Principal {
    /// Parse `NAME` or `group:NAME`.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        match text.strip_prefix("group:") {
            Some("") => None,
            Some(group) => Some(Self::Group(group.to_owned())),
            None if text.is_empty() => None,
            None => Some(Self::User(text.to_owned())),
        }
    }

    fn matches(&self, user: &UserInfo) -> bool {
        match self {
            Self::User(name) => user.username.as_deref() == Some(name.as_str()),
            Self::Group(group) => user.groups.iter().flatten().any(|g| g == group),
        }
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::User(name) => f.write_str(name),
            Self::Group(group) => write!(f, "group:{group}"),
        }
    }
}

impl Policy {
    /// Whether `request`'s user may create sandbox pods.
    pub fn allows_requester(&self, user: &UserInfo) -> bool {
        self.allowed_principals.is_empty()
            || self.allowed_principals.iter().any(|p| p.matches(user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_parse_users_and_groups() {
        assert_eq!(
            Principal::parse(" alice "),
            Some(Principal::User("alice".into()))
        );
        assert_eq!(
            Principal::parse("group:sandbox-creators"),
            Some(Principal::Group("sandbox-creators".into()))
        );
        assert_eq!(Principal::parse(""), None);
        assert_eq!(Principal::parse("group:"), None);
        assert_eq!(Principal::Group("g".into()).to_string(), "group:g");
    }
}
