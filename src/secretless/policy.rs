//! The decision for one request: which placeholders it carries, where, towards which host, and
//! whether each may become its value. Pure: no I/O, so every rule is unit-tested here.

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, Uri};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str};
use std::fmt;
use zeroize::Zeroizing;

use super::snapshot::{Placement, Snapshot};

/// Characters left as they are when a value is written into a query parameter.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The scheme the sandbox used towards the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Through a `CONNECT` tunnel (TLS to the upstream).
    Https,
    /// An absolute-form `http://` request.
    Http,
}

/// Why a request is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// The secret is not allowed for this host.
    HostNotAllowed,
    /// The secret is allowed for this host but not in this place of the request.
    PlacementNotAllowed(String),
    /// The secret may only travel over TLS.
    PlainHttpNotAllowed,
    /// The value cannot be written in this place (e.g. a control character in a header).
    ValueNotEncodable(String),
    /// The pod's egress allow-list does not name this host.
    EgressNotAllowed,
    /// The proxy has no valid configuration.
    Unconfigured,
}

impl RefusalReason {
    /// A fixed vocabulary, for metric labels.
    pub fn label(&self) -> &'static str {
        match self {
            Self::HostNotAllowed => "host_not_allowed",
            Self::PlacementNotAllowed(_) => "placement_not_allowed",
            Self::PlainHttpNotAllowed => "plain_http_not_allowed",
            Self::ValueNotEncodable(_) => "value_not_encodable",
            Self::EgressNotAllowed => "egress_not_allowed",
            Self::Unconfigured => "unconfigured",
        }
    }
}

/// A refused request: what the sandbox is told (names and hosts, never values).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RefusalReason,
    /// The secret concerned, when one is.
    pub env_name: Option<String>,
    pub host: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            reason,
            env_name,
            host,
        } = self;
        let name = env_name.as_deref().unwrap_or("?");
        match reason {
            RefusalReason::HostNotAllowed => write!(
                f,
                "agent-secrets proxy refused the request: secret {name} is not allowed for host {host}; nothing was sent"
            ),
            RefusalReason::PlacementNotAllowed(place) => write!(
                f,
                "agent-secrets proxy refused the request: secret {name} may not be placed in {place} (host {host}); nothing was sent"
            ),
            RefusalReason::PlainHttpNotAllowed => write!(
                f,
                "agent-secrets proxy refused the request: secret {name} is only sent over HTTPS (host {host}); use https://"
            ),
            RefusalReason::ValueNotEncodable(place) => write!(
                f,
                "agent-secrets proxy refused the request: the value of secret {name} cannot be written in {place} (host {host})"
            ),
            RefusalReason::EgressNotAllowed => write!(
                f,
                "agent-secrets proxy refused the request: host {host} is not on this sandbox's egress allow-list"
            ),
            RefusalReason::Unconfigured => write!(
                f,
                "agent-secrets proxy has no valid secret configuration and refuses every request (host {host})"
            ),
        }
    }
}

/// What was substituted (entry indices into the snapshot), for logs and metrics.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Substituted(pub Vec<usize>);

/// A place in the request where a placeholder was found.
#[derive(Debug)]
enum Site {
    /// A header value (index into the header map's iteration order).
    Header { name: String, index: usize },
    /// The password of a Basic `Authorization` header.
    BasicPassword { index: usize },
    /// The user name of a Basic `Authorization` header: never a place for a value.
    BasicUser,
    /// The value of a query parameter.
    Query { name: String },
    /// The path, or a query parameter's name: never a place for a value.
    Elsewhere(&'static str),
}

impl Site {
    fn placement(&self) -> Result<Placement, String> {
        match self {
            Self::Header { name, .. } => Ok(Placement::Header(name.clone())),
            Self::BasicPassword { .. } => Ok(Placement::BasicAuthPassword),
            Self::Query { name } => Ok(Placement::Query(name.clone())),
            Self::BasicUser => Err("the basic-auth user name".to_owned()),
            Self::Elsewhere(place) => Err((*place).to_owned()),
        }
    }
}

/// Checks a request bound for `host` (normalised) and, when every placeholder in it is allowed
/// where it is, replaces them with their values in `headers` and `uri`. On refusal nothing is
/// changed and the request must not be sent.
pub fn substitute(
    snapshot: &Snapshot,
    scheme: Scheme,
    host: &str,
    uri: &mut Uri,
    headers: &mut HeaderMap,
) -> Result<Substituted, Refusal> {
    let refuse = |reason, env_name: Option<&str>| Refusal {
        reason,
        env_name: env_name.map(str::to_owned),
        host: host.to_owned(),
    };
    if snapshot.unusable_reason().is_some() {
        return Err(refuse(RefusalReason::Unconfigured, None));
    }
    if !snapshot.host_reachable(host) {
        return Err(refuse(RefusalReason::EgressNotAllowed, None));
    }
    let found = find(snapshot, uri, headers);
    if found.is_empty() {
        return Ok(Substituted::default());
    }
    let entries = snapshot.entries();
    for (entry_index, site) in &found {
        let entry = &entries[*entry_index];
        let name = Some(entry.env_name.as_str());
        if !entry.allows_host(host) {
            return Err(refuse(RefusalReason::HostNotAllowed, name));
        }
        let placement = site
            .placement()
            .map_err(|place| refuse(RefusalReason::PlacementNotAllowed(place), name))?;
        if !entry.allows_placement(&placement) {
            return Err(refuse(
                RefusalReason::PlacementNotAllowed(placement.to_string()),
                name,
            ));
        }
        if scheme == Scheme::Http && !entry.allow_plain_http {
            return Err(refuse(RefusalReason::PlainHttpNotAllowed, name));
        }
    }
    // Every occurrence is allowed: build the new request parts, then swap them in.
    let mut new_headers = HeaderMap::with_capacity(headers.len());
    for (index, (name, value)) in headers.iter().enumerate() {
        let here = |basic: bool| {
            found.iter().find(|(_, s)| match s {
                Site::Header { index: i, .. } => !basic && *i == index,
                Site::BasicPassword { index: i } => basic && *i == index,
                _ => false,
            })
        };
        let mut value = value.clone();
        if let Some((entry, _)) = here(false) {
            let replaced = replace_all(snapshot, value.as_bytes());
            value = HeaderValue::from_bytes(&replaced).map_err(|_| {
                refuse(
                    RefusalReason::ValueNotEncodable(format!("header:{name}")),
                    Some(entries[*entry].env_name.as_str()),
                )
            })?;
        }
        if let Some((entry, _)) = here(true) {
            value = rewrite_basic(snapshot, &value).ok_or_else(|| {
                refuse(
                    RefusalReason::ValueNotEncodable("basic-auth-password".into()),
                    Some(entries[*entry].env_name.as_str()),
                )
            })?;
        }
        new_headers.append(name.clone(), value);
    }
    let new_uri = match found.iter().find(|(_, s)| matches!(s, Site::Query { .. })) {
        Some((entry, _)) => rewrite_query(snapshot, uri).ok_or_else(|| {
            refuse(
                RefusalReason::ValueNotEncodable("the query".into()),
                Some(entries[*entry].env_name.as_str()),
            )
        })?,
        None => uri.clone(),
    };
    *headers = new_headers;
    *uri = new_uri;
    let mut used: Vec<usize> = found.iter().map(|(i, _)| *i).collect();
    used.sort_unstable();
    used.dedup();
    Ok(Substituted(used))
}

/// Every placeholder in the request with the place it is in.
fn find(snapshot: &Snapshot, uri: &Uri, headers: &HeaderMap) -> Vec<(usize, Site)> {
    let mut found = Vec::new();
    for (index, (name, value)) in headers.iter().enumerate() {
        for (_, _, entry) in snapshot.find_placeholders(value.as_bytes()) {
            found.push((
                entry,
                Site::Header {
                    name: name.as_str().to_owned(),
                    index,
                },
            ));
        }
        if name == http::header::AUTHORIZATION
            && let Some((user, password)) = decode_basic(value)
        {
            for (_, _, entry) in snapshot.find_placeholders(&password) {
                found.push((entry, Site::BasicPassword { index }));
            }
            for (_, _, entry) in snapshot.find_placeholders(&user) {
                found.push((entry, Site::BasicUser));
            }
        }
    }
    // The path as written and percent-decoded: a placeholder is letters and digits, but a
    // client may still encode them.
    let path = uri.path();
    let decoded_path: Vec<u8> = percent_decode_str(path).collect();
    for text in [path.as_bytes(), decoded_path.as_slice()] {
        if let Some((_, _, entry)) = snapshot.find_placeholders(text).first() {
            found.push((*entry, Site::Elsewhere("the URL path")));
        }
    }
    if let Some(query) = uri.query() {
        for pair in query.split('&') {
            let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = decode_query_component(raw_name);
            let value = decode_query_component(raw_value);
            for (_, _, entry) in snapshot.find_placeholders(name.as_bytes()) {
                found.push((entry, Site::Elsewhere("a query parameter name")));
            }
            for (_, _, entry) in snapshot.find_placeholders(value.as_bytes()) {
                found.push((entry, Site::Query { name: name.clone() }));
            }
        }
    }
    found
}

fn decode_query_component(raw: &str) -> String {
    let spaced = raw.replace('+', " ");
    percent_decode_str(&spaced).decode_utf8_lossy().into_owned()
}

/// `Authorization: Basic base64(user:password)` split into user and password.
fn decode_basic(value: &HeaderValue) -> Option<(Vec<u8>, Zeroizing<Vec<u8>>)> {
    let text = value.to_str().ok()?;
    let (scheme, token) = text.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(token.trim())
            .ok()?,
    );
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some((
        decoded[..colon].to_vec(),
        Zeroizing::new(decoded[colon + 1..].to_vec()),
    ))
}

fn rewrite_basic(snapshot: &Snapshot, value: &HeaderValue) -> Option<HeaderValue> {
    let (user, password) = decode_basic(value)?;
    let password = replace_all(snapshot, &password);
    let mut plain = Zeroizing::new(user);
    plain.push(b':');
    plain.extend_from_slice(&password);
    let encoded = Zeroizing::new(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(&*plain)
    ));
    HeaderValue::from_str(&encoded).ok()
}

/// The URI with placeholders in query values replaced by their percent-encoded values; every
/// other byte of the query is kept as the client wrote it.
fn rewrite_query(snapshot: &Snapshot, uri: &Uri) -> Option<Uri> {
    let query = uri.query()?;
    let mut out = Zeroizing::new(format!("{}?", uri.path()));
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((name, raw_value)) => {
                out.push_str(name);
                out.push('=');
                let value = Zeroizing::new(decode_query_component(raw_value));
                if snapshot.find_placeholders(value.as_bytes()).is_empty() {
                    out.push_str(raw_value);
                } else {
                    let replaced = replace_all(snapshot, value.as_bytes());
                    out.extend(
                        percent_encoding::percent_encode(&replaced, QUERY_VALUE)
                            .map(|s| s.to_owned()),
                    );
                }
            }
            None => out.push_str(pair),
        }
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(out.parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// `bytes` with every placeholder replaced by its value.
fn replace_all(snapshot: &Snapshot, bytes: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(bytes.len() + 64));
    let mut at = 0;
    for (start, end, entry) in snapshot.find_placeholders(bytes) {
        out.extend_from_slice(&bytes[at..start]);
        out.extend_from_slice(snapshot.entries()[entry].value.expose().as_bytes());
        at = end;
    }
    out.extend_from_slice(&bytes[at..]);
    out
}

/// Masks every value found in response headers back to its placeholder.
pub fn mask_headers(snapshot: &Snapshot, headers: &mut HeaderMap) {
    let Some((matcher, masked)) = snapshot.value_matcher() else {
        return;
    };
    for value in headers.values_mut() {
        if !matcher.is_match(value.as_bytes()) {
            continue;
        }
        let mut out = Vec::with_capacity(value.len());
        let mut at = 0;
        for m in matcher.find_iter(value.as_bytes()) {
            out.extend_from_slice(&value.as_bytes()[at..m.start()]);
            let entry = &snapshot.entries()[masked[m.pattern().as_usize()]];
            out.extend_from_slice(entry.placeholder.as_bytes());
            at = m.end();
        }
        out.extend_from_slice(&value.as_bytes()[at..]);
        // A placeholder is plain ASCII, so the masked text is a valid header value whenever the
        // original was; should it not be, drop the header's content rather than pass a value on.
        *value = HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static("<masked>"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secretless::snapshot::{EgressMode, Entry, HostPattern, Unusable};

    const PH_A: &str = "asec_ph_AAAAAAAAAAAAAAAAAAAA";
    const PH_B: &str = "asec_ph_BBBBBBBBBBBBBBBBBBBB";

    fn entry(name: &str, ph: &str, value: &str, hosts: &[&str], inject: &[&str]) -> Entry {
        Entry {
            env_name: name.into(),
            placeholder: ph.into(),
            value: value.to_owned().into(),
            allowed_hosts: hosts
                .iter()
                .map(|h| HostPattern::parse(h).unwrap())
                .collect(),
            inject_as: inject
                .iter()
                .map(|p| Placement::parse(p).unwrap())
                .collect(),
            allow_plain_http: false,
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot::new(
            vec![
                entry("A_TOKEN", PH_A, "value-a-123456", &["api.a.com"], &[]),
                entry(
                    "B_KEY",
                    PH_B,
                    "value b/+&=",
                    &["*.b.com"],
                    &["query:key", "header:x-api-key"],
                ),
            ],
            EgressMode::Open,
        )
        .unwrap()
    }

    fn run(
        snap: &Snapshot,
        scheme: Scheme,
        host: &str,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Result<(Uri, HeaderMap), Refusal> {
        let mut uri: Uri = uri.parse().unwrap();
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        substitute(snap, scheme, host, &mut uri, &mut map).map(|_| (uri, map))
    }

    fn bearer_a() -> String {
        format!("Bearer {PH_A}")
    }

    #[test]
    fn a_bearer_placeholder_becomes_the_value_for_an_allowed_host() {
        let (_, h) = run(
            &snapshot(),
            Scheme::Https,
            "api.a.com",
            "/v1",
            &[("authorization", &bearer_a())],
        )
        .unwrap();
        assert_eq!(h["authorization"], "Bearer value-a-123456");
    }

    #[test]
    fn a_placeholder_towards_another_host_is_refused_naming_the_secret_and_host() {
        let err = run(
            &snapshot(),
            Scheme::Https,
            "evil.com",
            "/",
            &[("authorization", &bearer_a())],
        )
        .unwrap_err();
        assert_eq!(err.reason, RefusalReason::HostNotAllowed);
        let text = err.to_string();
        assert!(
            text.contains("A_TOKEN") && text.contains("evil.com"),
            "{text}"
        );
        assert!(!text.contains("value-a"), "{text}");
    }

    #[test]
    fn a_placement_outside_inject_as_is_refused() {
        let err = run(
            &snapshot(),
            Scheme::Https,
            "x.b.com",
            "/",
            &[("authorization", PH_B)],
        )
        .unwrap_err();
        assert_eq!(
            err.reason,
            RefusalReason::PlacementNotAllowed("header:authorization".into())
        );
    }

    #[test]
    fn a_query_value_is_substituted_percent_encoded_and_the_rest_kept_verbatim() {
        let (uri, _) = run(
            &snapshot(),
            Scheme::Https,
            "x.b.com",
            &format!("/s?q=a%20b&key={PH_B}&z"),
            &[],
        )
        .unwrap();
        assert_eq!(uri.query(), Some("q=a%20b&key=value%20b%2F%2B%26%3D&z"));
    }

    #[test]
    fn a_placeholder_in_the_path_or_a_query_name_is_refused() {
        for uri in [format!("/u/{PH_A}"), format!("/u?{PH_A}=1")] {
            let err = run(&snapshot(), Scheme::Https, "api.a.com", &uri, &[]).unwrap_err();
            assert!(
                matches!(err.reason, RefusalReason::PlacementNotAllowed(_)),
                "{uri}: {err:?}"
            );
        }
    }

    #[test]
    fn a_basic_auth_password_is_substituted_and_the_user_name_refused() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let (_, h) = run(
            &snapshot(),
            Scheme::Https,
            "api.a.com",
            "/",
            &[(
                "authorization",
                &format!("Basic {}", b64(&format!("me:{PH_A}"))),
            )],
        )
        .unwrap();
        assert_eq!(
            h["authorization"],
            format!("Basic {}", b64("me:value-a-123456")).as_str()
        );
        let err = run(
            &snapshot(),
            Scheme::Https,
            "api.a.com",
            "/",
            &[(
                "authorization",
                &format!("Basic {}", b64(&format!("{PH_A}:x"))),
            )],
        )
        .unwrap_err();
        assert!(matches!(err.reason, RefusalReason::PlacementNotAllowed(_)));
    }

    #[test]
    fn plain_http_is_refused_unless_the_secret_allows_it() {
        let bearer = bearer_a();
        let headers = [("authorization", bearer.as_str())];
        let err = run(&snapshot(), Scheme::Http, "api.a.com", "/", &headers).unwrap_err();
        assert_eq!(err.reason, RefusalReason::PlainHttpNotAllowed);
        let mut e = entry("A_TOKEN", PH_A, "value-a-123456", &["api.a.com"], &[]);
        e.allow_plain_http = true;
        let snap = Snapshot::new(vec![e], EgressMode::Open).unwrap();
        assert!(run(&snap, Scheme::Http, "api.a.com", "/", &headers).is_ok());
    }

    #[test]
    fn the_allowlist_refuses_hosts_no_secret_names_and_requests_without_placeholders_pass() {
        assert!(run(&snapshot(), Scheme::Https, "other.org", "/", &[]).is_ok());
        let snap = Snapshot::new(
            vec![entry(
                "A_TOKEN",
                PH_A,
                "value-a-123456",
                &["api.a.com"],
                &[],
            )],
            EgressMode::Allowlist,
        )
        .unwrap();
        let err = run(&snap, Scheme::Https, "other.org", "/", &[]).unwrap_err();
        assert_eq!(err.reason, RefusalReason::EgressNotAllowed);
        assert!(run(&snap, Scheme::Https, "api.a.com", "/", &[]).is_ok());
    }

    #[test]
    fn an_unusable_configuration_refuses_everything() {
        let snap = Snapshot::unusable(Unusable::Invalid);
        let err = run(&snap, Scheme::Https, "api.a.com", "/", &[]).unwrap_err();
        assert_eq!(err.reason, RefusalReason::Unconfigured);
    }

    #[test]
    fn a_refused_request_is_left_unchanged() {
        let snap = snapshot();
        let mut uri: Uri = format!("/?key={PH_B}").parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_static(PH_B));
        headers.insert("x-other", HeaderValue::from_str(PH_A).unwrap());
        let before = (uri.clone(), headers.clone());
        assert!(substitute(&snap, Scheme::Https, "x.b.com", &mut uri, &mut headers).is_err());
        assert_eq!((uri, headers), before);
    }

    #[test]
    fn response_headers_have_values_masked_to_placeholders() {
        let mut h = HeaderMap::new();
        h.insert("x-echo", HeaderValue::from_static("got value-a-123456!"));
        mask_headers(&snapshot(), &mut h);
        assert_eq!(h["x-echo"], format!("got {PH_A}!").as_str());
    }
}
