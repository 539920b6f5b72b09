//! What the proxy knows at one moment: each secret's placeholder, value, allowed hosts and
//! placements, and the pod's egress mode. Immutable once built; a change is a new snapshot.

use aho_corasick::{AhoCorasick, MatchKind};
use serde::Deserialize;
use std::collections::HashSet;
use std::fmt;

use crate::crypto::SecretString;

/// Every placeholder starts with this, so a leaked one is recognisable in logs and code.
pub const PLACEHOLDER_PREFIX: &str = "asec_ph_";
/// Random characters after the prefix, at least: a placeholder must not be guessable.
pub const PLACEHOLDER_MIN_RANDOM: usize = 16;
/// Values shorter than this are substituted but not masked in responses: masking every
/// occurrence of a 3-byte string would corrupt ordinary response bodies.
pub const MIN_MASKED_VALUE_LEN: usize = 8;

/// Failures to build a snapshot. They name secrets and hosts, never values.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("failed to parse the secretless values: invalid JSON at line {line}, column {column}")]
    Json { line: usize, column: usize },
    #[error(
        "failed to accept secret {env_name}: its placeholder must be {PLACEHOLDER_PREFIX} followed by at least {PLACEHOLDER_MIN_RANDOM} letters or digits"
    )]
    Placeholder { env_name: String },
    #[error("failed to accept secret {env_name}: its value is empty")]
    EmptyValue { env_name: String },
    #[error("failed to accept secret {env_name}: invalid allowed host {pattern:?}")]
    Host { env_name: String, pattern: String },
    #[error("failed to accept secret {env_name}: it has no allowed hosts")]
    NoHosts { env_name: String },
    #[error(
        "failed to accept secret {env_name}: invalid placement {placement:?} (header:NAME, basic-auth-password or query:NAME)"
    )]
    Placement { env_name: String, placement: String },
    #[error("failed to accept secret {env_name}: its env name or placeholder is used twice")]
    Duplicate { env_name: String },
    #[error("failed to build the placeholder matcher")]
    Matcher,
}

/// Whether the pod may reach hosts that no secret mentions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EgressMode {
    /// Hosts no secret mentions pass through (placeholders towards them are still refused).
    #[default]
    Open,
    /// Only hosts matched by some secret's `allowedHosts` are reachable (pod annotation
    /// `agentsecrets.io/egress: allowlist`).
    Allowlist,
}

/// An allowed destination host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// Exactly this host (lowercase, no trailing dot).
    Exact(String),
    /// `*.example.com`: any subdomain of `example.com`, at any depth, but not `example.com`
    /// itself (list the apex separately when it is wanted). Holds `.example.com`.
    Subdomains(String),
}

impl HostPattern {
    /// Parses `api.example.com` or `*.example.com`. Ports are not part of a pattern: the
    /// secret is bound to the host name on every port.
    pub fn parse(pattern: &str) -> Option<Self> {
        let lower = pattern.to_ascii_lowercase();
        if let Some(rest) = lower.strip_prefix("*.") {
            // A wildcard needs at least two labels below it: `*.com` would bind a secret to a
            // whole top-level domain.
            (valid_host(rest) && rest.contains('.')).then(|| Self::Subdomains(format!(".{rest}")))
        } else {
            valid_host(&lower).then_some(Self::Exact(lower))
        }
    }

    /// Whether `host` (already normalised by [`normalise_host`]) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(exact) => host == exact,
            Self::Subdomains(suffix) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(host) => f.write_str(host),
            Self::Subdomains(suffix) => write!(f, "*{suffix}"),
        }
    }
}

/// DNS names (labels of letters, digits and inner hyphens) and IPv4 literals.
fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// Lowercase, without a trailing dot or IPv6 brackets: the form hosts are compared in.
pub fn normalise_host(host: &str) -> String {
    let host = host.trim_end_matches('.');
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.to_ascii_lowercase()
}

/// Where in a request a value may be placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The whole or part of this header's value (`header:Authorization` covers
    /// `Authorization: Bearer <placeholder>`). Name kept lowercase.
    Header(String),
    /// The password of `Authorization: Basic base64(user:password)`.
    BasicAuthPassword,
    /// The value of this query parameter (name as written, compared after percent-decoding).
    Query(String),
}

impl Placement {
    pub fn parse(text: &str) -> Option<Self> {
        if text == "basic-auth-password" {
            return Some(Self::BasicAuthPassword);
        }
        if let Some(name) = text.strip_prefix("header:") {
            return http::HeaderName::from_bytes(name.as_bytes())
                .ok()
                .map(|n| Self::Header(n.as_str().to_owned()));
        }
        if let Some(name) = text.strip_prefix("query:") {
            return (!name.is_empty() && !name.contains(['&', '=', '#']))
                .then(|| Self::Query(name.to_owned()));
        }
        None
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Header(name) => write!(f, "header:{name}"),
            Self::BasicAuthPassword => f.write_str("basic-auth-password"),
            Self::Query(name) => write!(f, "query:{name}"),
        }
    }
}

/// One secret as the proxy sees it.
#[derive(Clone)]
pub struct Entry {
    pub env_name: String,
    pub placeholder: String,
    pub value: SecretString,
    pub allowed_hosts: Vec<HostPattern>,
    /// Empty: any header, including the Basic auth password (which travels in a header).
    pub inject_as: Vec<Placement>,
    pub allow_plain_http: bool,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("env_name", &self.env_name)
            .field("placeholder", &self.placeholder)
            .field("value", &self.value)
            .field("allowed_hosts", &self.allowed_hosts)
            .field("inject_as", &self.inject_as)
            .field("allow_plain_http", &self.allow_plain_http)
            .finish()
    }
}

impl Entry {
    pub fn allows_host(&self, host: &str) -> bool {
        self.allowed_hosts.iter().any(|p| p.matches(host))
    }

    pub fn allows_placement(&self, placement: &Placement) -> bool {
        if self.inject_as.is_empty() {
            return matches!(
                placement,
                Placement::Header(_) | Placement::BasicAuthPassword
            );
        }
        self.inject_as.contains(placement)
    }
}

/// Why the proxy holds no usable configuration: it then refuses every request (fail closed),
/// so a broken or removed values file never leaves a deleted secret usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unusable {
    Unreadable,
    Invalid,
    /// The operator feed has not confirmed the current secrets (no snapshot yet, or no line
    /// for longer than the feed's budget).
    Unconfirmed,
}

/// The proxy's whole configuration at one moment.
pub struct Snapshot {
    entries: Vec<Entry>,
    egress: EgressMode,
    unusable: Option<Unusable>,
    placeholders: Option<AhoCorasick>,
    /// Values to mask in responses, pattern i is `masked[i]`'s value.
    values: Option<AhoCorasick>,
    masked: Vec<usize>,
    max_masked_len: usize,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("entries", &self.entries)
            .field("egress", &self.egress)
            .field("unusable", &self.unusable)
            .finish_non_exhaustive()
    }
}

impl Snapshot {
    /// Builds a snapshot, checking every entry.
    pub fn new(entries: Vec<Entry>, egress: EgressMode) -> Result<Self, SnapshotError> {
        let mut seen = HashSet::new();
        for entry in &entries {
            let env_name = entry.env_name.clone();
            let random = entry
                .placeholder
                .strip_prefix(PLACEHOLDER_PREFIX)
                .unwrap_or_default();
            if random.len() < PLACEHOLDER_MIN_RANDOM
                || !random.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                return Err(SnapshotError::Placeholder { env_name });
            }
            if entry.value.expose().is_empty() {
                return Err(SnapshotError::EmptyValue { env_name });
            }
            if entry.allowed_hosts.is_empty() {
                return Err(SnapshotError::NoHosts { env_name });
            }
            if !seen.insert(entry.env_name.clone()) || !seen.insert(entry.placeholder.clone()) {
                return Err(SnapshotError::Duplicate { env_name });
            }
        }
        let placeholders = if entries.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(entries.iter().map(|e| e.placeholder.as_bytes()))
                    .map_err(|_| SnapshotError::Matcher)?,
            )
        };
        let masked: Vec<usize> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.value.expose().len() >= MIN_MASKED_VALUE_LEN)
            .map(|(i, _)| i)
            .collect();
        let values = if masked.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(masked.iter().map(|&i| entries[i].value.expose().as_bytes()))
                    .map_err(|_| SnapshotError::Matcher)?,
            )
        };
        let max_masked_len = masked
            .iter()
            .map(|&i| entries[i].value.expose().len())
            .max()
            .unwrap_or(0);
        Ok(Self {
            entries,
            egress,
            unusable: None,
            placeholders,
            values,
            masked,
            max_masked_len,
        })
    }

    /// A snapshot that refuses every request.
    pub fn unusable(why: Unusable) -> Self {
        Self {
            entries: Vec::new(),
            egress: EgressMode::Allowlist,
            unusable: Some(why),
            placeholders: None,
            values: None,
            masked: Vec::new(),
            max_masked_len: 0,
        }
    }

    /// Parses the JSON document of the values file (see docs/secretless.md).
    pub fn from_json(bytes: &[u8]) -> Result<Self, SnapshotError> {
        // serde's message can quote the input, which holds values: keep only the position.
        let doc: ValuesDocument =
            serde_json::from_slice(bytes).map_err(|e| SnapshotError::Json {
                line: e.line(),
                column: e.column(),
            })?;
        let mut entries = Vec::with_capacity(doc.secrets.len());
        for raw in doc.secrets {
            let RawEntry {
                env_name,
                placeholder,
                value,
                allowed_hosts,
                inject_as,
                allow_plain_http,
            } = raw;
            let hosts = allowed_hosts
                .iter()
                .map(|p| {
                    HostPattern::parse(p).ok_or_else(|| SnapshotError::Host {
                        env_name: env_name.clone(),
                        pattern: p.clone(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let placements = inject_as
                .iter()
                .map(|p| {
                    Placement::parse(p).ok_or_else(|| SnapshotError::Placement {
                        env_name: env_name.clone(),
                        placement: p.clone(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            entries.push(Entry {
                env_name,
                placeholder,
                value,
                allowed_hosts: hosts,
                inject_as: placements,
                allow_plain_http,
            });
        }
        Self::new(entries, doc.egress)
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn egress(&self) -> EgressMode {
        self.egress
    }

    pub fn unusable_reason(&self) -> Option<Unusable> {
        self.unusable
    }

    /// Whether some secret names this host (the egress allow-list).
    pub fn host_mentioned(&self, host: &str) -> bool {
        self.entries.iter().any(|e| e.allows_host(host))
    }

    /// Whether a connection to `host` may be opened at all.
    pub fn host_reachable(&self, host: &str) -> bool {
        self.unusable.is_none() && (self.egress == EgressMode::Open || self.host_mentioned(host))
    }

    /// Occurrences of placeholders in `haystack`: (start, end, entry index).
    pub fn find_placeholders(&self, haystack: &[u8]) -> Vec<(usize, usize, usize)> {
        match &self.placeholders {
            None => Vec::new(),
            Some(ac) => ac
                .find_iter(haystack)
                .map(|m| (m.start(), m.end(), m.pattern().as_usize()))
                .collect(),
        }
    }

    /// The matcher of masked values, with the entry index of each pattern.
    pub(crate) fn value_matcher(&self) -> Option<(&AhoCorasick, &[usize])> {
        self.values.as_ref().map(|ac| (ac, self.masked.as_slice()))
    }

    /// Longest masked value: a streaming masker holds back one byte fewer than this.
    pub fn max_masked_len(&self) -> usize {
        self.max_masked_len
    }

    /// Whether responses need scanning at all.
    pub fn masks_anything(&self) -> bool {
        self.values.is_some()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ValuesDocument {
    #[serde(default)]
    egress: EgressMode,
    #[serde(default)]
    secrets: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawEntry {
    env_name: String,
    placeholder: String,
    value: SecretString,
    allowed_hosts: Vec<String>,
    #[serde(default)]
    inject_as: Vec<String>,
    #[serde(default)]
    allow_plain_http: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap()
    }

    #[test]
    fn a_wildcard_matches_subdomains_at_any_depth_but_not_the_apex() {
        let w = p("*.Example.com");
        assert!(w.matches("api.example.com"));
        assert!(w.matches("eu.api.example.com"));
        assert!(!w.matches("example.com"));
        assert!(!w.matches("badexample.com"));
        assert!(!w.matches("example.com.evil.net"));
    }

    #[test]
    fn an_exact_host_matches_only_itself_case_insensitively() {
        let e = p("API.example.com");
        assert!(e.matches(&normalise_host("api.EXAMPLE.com.")));
        assert!(!e.matches("v2.api.example.com"));
    }

    #[test]
    fn malformed_and_too_broad_patterns_are_refused() {
        for bad in [
            "",
            "*.com",
            "*",
            "a..b",
            "-a.com",
            "a.com:443",
            "https://a.com",
            "*.*.a.com",
            "a b",
        ] {
            assert!(HostPattern::parse(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn placements_parse_and_print_back() {
        for text in ["header:authorization", "basic-auth-password", "query:key"] {
            assert_eq!(Placement::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(
            Placement::parse("header:X-Api-Key"),
            Some(Placement::Header("x-api-key".into()))
        );
        assert!(Placement::parse("body").is_none());
        assert!(Placement::parse("header:bad header").is_none());
    }

    #[test]
    fn a_parse_error_names_the_position_but_never_the_input() {
        let doc = br#"{"secrets":[{"envName":"A","value":"canary-value-123" "x"}]}"#;
        let err = Snapshot::from_json(doc).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
        assert!(!err.contains("canary"), "{err}");
    }

    #[test]
    fn short_or_foreign_placeholders_and_duplicates_are_refused() {
        let doc = |ph1: &str, ph2: &str| {
            format!(
                r#"{{"secrets":[
                {{"envName":"A","placeholder":"{ph1}","value":"v1-long-value","allowedHosts":["a.com"]}},
                {{"envName":"B","placeholder":"{ph2}","value":"v2-long-value","allowedHosts":["a.com"]}}]}}"#
            )
        };
        let good = "asec_ph_0123456789abcdefXY";
        assert!(Snapshot::from_json(doc(good, "asec_ph_zzzzzzzzzzzzzzzz1").as_bytes()).is_ok());
        assert!(matches!(
            Snapshot::from_json(doc("asec_ph_short", good).as_bytes()),
            Err(SnapshotError::Placeholder { .. })
        ));
        assert!(matches!(
            Snapshot::from_json(doc(good, good).as_bytes()),
            Err(SnapshotError::Duplicate { .. })
        ));
    }

    #[test]
    fn debug_of_a_snapshot_never_shows_a_value() {
        let doc = br#"{"secrets":[{"envName":"A","placeholder":"asec_ph_0123456789abcdefXY","value":"canary-value-123","allowedHosts":["a.com"]}]}"#;
        let snap = Snapshot::from_json(doc).unwrap();
        let text = format!("{snap:?}");
        assert!(!text.contains("canary"), "{text}");
        assert!(text.contains("asec_ph_0123456789abcdefXY"));
    }
}
