//! What the page is configured with, and the pure rules that turn a proxy's headers into the
//! user the page acts as: owner name and namespace.

use ipnet::IpNet;
use std::net::IpAddr;

use super::UiError;
use axum::http;

/// Where each user's secrets live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceRule {
    /// One namespace for every user.
    Fixed(String),
    /// A template with `{user}` replaced by the owner name, e.g. `user-{user}`.
    Template(String),
}

impl NamespaceRule {
    /// The namespace of `owner`. A template that yields no valid namespace name (a DNS label)
    /// refuses the user rather than guessing a different one.
    pub fn namespace_for(&self, owner: &str) -> Result<String, UiError> {
        let namespace = match self {
            Self::Fixed(namespace) => return Ok(namespace.clone()),
            Self::Template(template) => template.replace("{user}", owner),
        };
        if is_dns_label(&namespace) {
            Ok(namespace)
        } else {
            Err(UiError::NamespaceName {
                owner: owner.to_owned(),
                namespace,
            })
        }
    }
}

/// Checked settings of the page (from `agentsecrets ui` flags).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Source networks whose requests may carry identity headers.
    pub trusted_proxy_cidrs: Vec<IpNet>,
    /// Whether a verified proxy client certificate is required on the connection.
    pub require_proxy_certificate: bool,
    /// Header with the signed-in username, e.g. `X-Forwarded-User`.
    pub user_header: http::HeaderName,
    /// Header with the user's groups, comma-separated, e.g. `X-Forwarded-Groups`.
    pub groups_header: http::HeaderName,
    /// Removed from the username to get the owner name (as the cluster's owner binding does).
    pub owner_username_prefix: String,
    pub namespace: NamespaceRule,
    /// Env names refused in addition to the built-in ones (as configured for the webhook).
    pub extra_reserved_env_names: Vec<String>,
}

impl Settings {
    /// Settings for tests and examples: proxy at 127.0.0.1, oauth2-proxy header names.
    pub fn for_loopback_proxy(namespace: NamespaceRule) -> Self {
        Self {
            trusted_proxy_cidrs: vec![IpNet::from(IpAddr::from([127, 0, 0, 1]))],
            require_proxy_certificate: false,
            user_header: http::HeaderName::from_static("x-forwarded-user"),
            groups_header: http::HeaderName::from_static("x-forwarded-groups"),
            owner_username_prefix: String::new(),
            namespace,
            extra_reserved_env_names: Vec::new(),
        }
    }

    /// Whether a connection from `peer` (with or without a verified proxy certificate) may
    /// assert an identity. Every configured check must pass.
    pub fn trusts(&self, peer: Option<IpAddr>, verified_certificate: bool) -> bool {
        if self.require_proxy_certificate && !verified_certificate {
            return false;
        }
        if self.trusted_proxy_cidrs.is_empty() {
            // Configuration guarantees a certificate is required when no CIDR is given.
            return self.require_proxy_certificate;
        }
        let Some(peer) = peer else {
            return false;
        };
        let peer = canonical(peer);
        self.trusted_proxy_cidrs
            .iter()
            .any(|net| net.contains(&peer))
    }

    /// The owner name of `username`: the username without the owner prefix, which must be a
    /// valid label value (that is what `spec.owner` and the pods' owner label hold).
    pub fn owner_of(&self, username: &str) -> Result<String, UiError> {
        let owner = username
            .strip_prefix(self.owner_username_prefix.as_str())
            .ok_or_else(|| UiError::UsernamePrefix {
                username: username.to_owned(),
                prefix: self.owner_username_prefix.clone(),
            })?;
        if is_label_value(owner) && !owner.is_empty() {
            Ok(owner.to_owned())
        } else {
            Err(UiError::OwnerName(owner.to_owned()))
        }
    }
}

/// An IPv4 address seen as IPv4-mapped IPv6 (a dual-stack listener) matches IPv4 networks.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// A Kubernetes label value: at most 63 characters, alphanumerics, `-`, `_`, `.`, starting
/// and ending with an alphanumeric (empty is a valid label value, but not a valid owner).
pub fn is_label_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    if bytes.len() > 63 {
        return false;
    }
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return true;
    };
    first.is_ascii_alphanumeric()
        && last.is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// An RFC 1123 label (a namespace name).
pub fn is_dns_label(value: &str) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_lowercase() | bytes[0].is_ascii_digit()
        && bytes[bytes.len() - 1] != b'-'
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// Parse `10.0.0.0/8,127.0.0.1` (a bare address is a single-host network).
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{text:?} is not a CIDR (e.g. 10.0.0.0/8) or an IP address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings::for_loopback_proxy(NamespaceRule::Template("user-{user}".into()))
    }

    #[test]
    fn only_sources_in_the_trusted_networks_may_assert_an_identity() {
        let mut s = settings();
        assert!(s.trusts(Some([127, 0, 0, 1].into()), false));
        assert!(!s.trusts(Some([10, 0, 0, 1].into()), false));
        assert!(!s.trusts(None, false));
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(s.trusts(Some(mapped), false));
        s.require_proxy_certificate = true;
        assert!(
            !s.trusts(Some([127, 0, 0, 1].into()), false),
            "both checks apply"
        );
        assert!(s.trusts(Some([127, 0, 0, 1].into()), true));
        s.trusted_proxy_cidrs.clear();
        assert!(s.trusts(Some([10, 0, 0, 1].into()), true));
        assert!(!s.trusts(Some([10, 0, 0, 1].into()), false));
    }

    #[test]
    fn the_owner_is_the_username_without_the_prefix_and_must_be_a_label_value() {
        let mut s = settings();
        assert_eq!(s.owner_of("alice").unwrap(), "alice");
        assert!(matches!(
            s.owner_of("alice@example.com"),
            Err(UiError::OwnerName(_))
        ));
        assert!(matches!(s.owner_of(""), Err(UiError::OwnerName(_))));
        assert!(matches!(
            s.owner_of(&"a".repeat(64)),
            Err(UiError::OwnerName(_))
        ));
        s.owner_username_prefix = "oidc:".into();
        assert_eq!(s.owner_of("oidc:bob.smith").unwrap(), "bob.smith");
        assert!(matches!(
            s.owner_of("bob"),
            Err(UiError::UsernamePrefix { .. })
        ));
    }

    #[test]
    fn namespace_templates_yield_valid_namespace_names_or_refuse() {
        let rule = NamespaceRule::Template("user-{user}".into());
        assert_eq!(rule.namespace_for("alice").unwrap(), "user-alice");
        assert!(matches!(
            rule.namespace_for("Alice_B"),
            Err(UiError::NamespaceName { .. })
        ));
        let fixed = NamespaceRule::Fixed("sandboxes".into());
        assert_eq!(fixed.namespace_for("Alice_B").unwrap(), "sandboxes");
    }

    #[test]
    fn cidrs_and_bare_addresses_parse() {
        assert_eq!(parse_cidr("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(
            parse_cidr(" 127.0.0.1 ").unwrap().to_string(),
            "127.0.0.1/32"
        );
        assert!(parse_cidr("localhost").is_err());
    }
}
