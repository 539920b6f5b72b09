//! Mutating admission: seal AgentSecrets on the way in, inject sandbox pods.
//!
//! The decisions are pure functions ([`agentsecret::mutate`], [`pod::mutate`]) of the
//! request, the keyring, the cache and the [`Policy`]; the [`server`]'s handlers only convert
//! HTTP to AdmissionReviews ([`review`], [`response`]) and perform the one side effect
//! (creating the pod-scoped Secret, [`writer`]).

pub mod agentsecret;
mod handlers;
pub mod limits;
pub mod patch;
pub mod pod;
pub mod response;
pub mod review;
pub mod server;
pub mod tls;
pub mod writer;

use k8s_openapi::api::authentication::v1::UserInfo;
use kube::core::admission::Operation;
use std::collections::BTreeSet;

/// Who may create sandbox pods and write AgentSecrets, and what is never touched.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Principals allowed to create labelled pods; empty means anyone who may create pods.
    pub allowed_principals: Vec<Principal>,
    /// Env names refused in addition to the built-in reserved ones.
    pub extra_reserved_env_names: Vec<String>,
    /// Namespaces whose pods are never injected.
    pub excluded_namespaces: BTreeSet<String>,
    /// Who may write an owner's AgentSecrets.
    pub owner_binding: OwnerBinding,
    /// Most pod-scoped Secrets per namespace whose reuse window has not ended; beyond it new
    /// content is refused (sandboxes given an existing Secret are not), which bounds what
    /// forged admission traffic can make the operator create.
    pub max_pod_secrets_per_window: usize,
    /// How long new sandboxes of one owner share a pod-scoped Secret of the same content.
    pub pod_secret_reuse_window: std::time::Duration,
    /// Which pods are secretless, and what their proxy sidecar is made of.
    pub secretless: pod::SecretlessPolicy,
}

/// The default of `--max-pod-secrets-per-window`.
pub const DEFAULT_MAX_POD_SECRETS_PER_WINDOW: usize = 1000;
/// The default of `--pod-secret-reuse-window`.
pub const DEFAULT_POD_SECRET_REUSE_WINDOW: std::time::Duration =
    std::time::Duration::from_secs(300);

impl Default for Policy {
    fn default() -> Self {
        Self {
            allowed_principals: Vec::new(),
            extra_reserved_env_names: Vec::new(),
            excluded_namespaces: BTreeSet::new(),
            owner_binding: OwnerBinding::default(),
            max_pod_secrets_per_window: DEFAULT_MAX_POD_SECRETS_PER_WINDOW,
            pod_secret_reuse_window: DEFAULT_POD_SECRET_REUSE_WINDOW,
            secretless: pod::SecretlessPolicy::default(),
        }
    }
}

/// The default of `--owner-group-prefix`: members of `agentsecrets.io/owner:bob` act as bob.
pub const DEFAULT_OWNER_GROUP_PREFIX: &str = "agentsecrets.io/owner:";

/// Service accounts of the control plane that delete objects for the cluster (namespace
/// deletion, garbage collection); they must not be stopped by owner binding.
pub const CONTROL_PLANE_DELETERS: &[&str] = &[
    "system:serviceaccount:kube-system:namespace-controller",
    "system:serviceaccount:kube-system:generic-garbage-collector",
];

/// Binds an AgentSecret to the requester: only its owner (by username or group, see the
/// prefixes), a secret administrator or the operator itself may create, change or delete it.
#[derive(Debug, Clone)]
pub struct OwnerBinding {
    /// The owner `bob` is the user `<prefix>bob`.
    pub username_prefix: String,
    /// Members of the group `<prefix>bob` act as `bob`; empty disables group ownership.
    pub group_prefix: String,
    /// Principals that may write any owner's secrets (the platform's backend).
    pub administrators: Vec<Principal>,
    /// The operator's own username (it seals stray plaintext and re-wraps data keys).
    pub operator: Option<String>,
}

impl Default for OwnerBinding {
    fn default() -> Self {
        Self {
            username_prefix: String::new(),
            group_prefix: DEFAULT_OWNER_GROUP_PREFIX.to_owned(),
            administrators: Vec::new(),
            operator: None,
        }
    }
}

impl OwnerBinding {
    /// Whether `user` may perform `operation` on an AgentSecret of `owner`.
    pub fn permits(&self, user: &UserInfo, owner: &str, operation: &Operation) -> bool {
        let username = user.username.as_deref().unwrap_or_default();
        let is_owner = !owner.is_empty()
            && username.strip_prefix(self.username_prefix.as_str()) == Some(owner);
        let in_owner_group = !self.group_prefix.is_empty()
            && !owner.is_empty()
            && user
                .groups
                .iter()
                .flatten()
                .any(|group| group.strip_prefix(self.group_prefix.as_str()) == Some(owner));
        is_owner
            || in_owner_group
            || self.administrators.iter().any(|p| p.matches(user))
            || self.operator.as_deref().is_some_and(|op| op == username)
            || (*operation == Operation::Delete && CONTROL_PLANE_DELETERS.contains(&username))
    }
}

/// `text` quoted for a message shown to a requester, cut to a length that keeps the message
/// readable: names in messages come from the request, which may be arbitrarily long.
pub fn quoted(text: &str) -> String {
    const MAX_CHARS: usize = 64;
    if text.chars().count() <= MAX_CHARS {
        format!("{text:?}")
    } else {
        let cut: String = text.chars().take(MAX_CHARS).collect();
        format!("{cut:?}…")
    }
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

    fn user(name: &str, groups: &[&str]) -> UserInfo {
        UserInfo {
            username: Some(name.into()),
            groups: Some(groups.iter().map(|g| (*g).to_owned()).collect()),
            ..UserInfo::default()
        }
    }

    #[test]
    fn only_the_owner_may_write_their_secret() {
        let binding = OwnerBinding::default();
        assert!(binding.permits(&user("alice", &[]), "alice", &Operation::Create));
        for op in [Operation::Create, Operation::Update, Operation::Delete] {
            assert!(!binding.permits(&user("alice", &[]), "bob", &op), "{op:?}");
        }
        assert!(!binding.permits(&user("", &[]), "", &Operation::Create));
    }

    #[test]
    fn an_owner_may_be_named_by_a_username_prefix_or_a_group() {
        let binding = OwnerBinding {
            username_prefix: "oidc:".into(),
            ..OwnerBinding::default()
        };
        assert!(binding.permits(&user("oidc:bob", &[]), "bob", &Operation::Update));
        assert!(!binding.permits(&user("bob", &[]), "bob", &Operation::Update));
        assert!(binding.permits(
            &user("svc", &["agentsecrets.io/owner:bob"]),
            "bob",
            &Operation::Create
        ));
        assert!(!binding.permits(
            &user("svc", &["agentsecrets.io/owner:bobby"]),
            "bob",
            &Operation::Create
        ));
        let no_groups = OwnerBinding {
            group_prefix: String::new(),
            ..OwnerBinding::default()
        };
        assert!(!no_groups.permits(&user("svc", &["bob"]), "bob", &Operation::Create));
    }

    #[test]
    fn administrators_the_operator_and_control_plane_deleters_are_allowed() {
        let binding = OwnerBinding {
            administrators: vec![
                Principal::User("platform-backend".into()),
                Principal::Group("secret-admins".into()),
            ],
            operator: Some("system:serviceaccount:agent-secrets:agent-secrets".into()),
            ..OwnerBinding::default()
        };
        assert!(binding.permits(&user("platform-backend", &[]), "bob", &Operation::Create));
        assert!(binding.permits(&user("x", &["secret-admins"]), "bob", &Operation::Delete));
        assert!(binding.permits(
            &user("system:serviceaccount:agent-secrets:agent-secrets", &[]),
            "bob",
            &Operation::Update
        ));
        let gc = user(CONTROL_PLANE_DELETERS[0], &[]);
        assert!(binding.permits(&gc, "bob", &Operation::Delete));
        assert!(!binding.permits(&gc, "bob", &Operation::Update));
    }

    #[test]
    fn quoted_request_text_is_cut() {
        assert_eq!(quoted("bob"), "\"bob\"");
        let long = quoted(&"x".repeat(10_000));
        assert!(long.len() < 80, "{long}");
        assert!(long.ends_with('…'));
    }
}
