//! `agentsecrets keys status`: how many AgentSecrets are wrapped under each key, and when an
//! old key may leave the keyring.

use kube::ResourceExt as _;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::output::{Format, serialised, table};
use crate::api::AgentSecret;
use crate::crypto::Keyring;

/// Usage of one key id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyUsage {
    pub key_id: String,
    pub secrets: usize,
    /// `None` when no keyring was given to compare with.
    pub in_keyring: Option<bool>,
    pub primary: bool,
    /// Namespaces holding secrets wrapped under this key.
    pub namespaces: BTreeSet<String>,
}

/// The whole picture of a rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyReport {
    pub keys: Vec<KeyUsage>,
    /// AgentSecrets without a sealed value (plaintext awaiting the controller, or broken).
    pub unsealed: usize,
    /// The one namespace counted, if the count is not cluster-wide: then no key is said to
    /// be removable, since other namespaces may still use it.
    pub namespace: Option<String>,
}

/// Count AgentSecrets per key id, and compare with the keyring if given.
pub fn key_report(
    secrets: &[AgentSecret],
    keyring: Option<&Keyring>,
    namespace: Option<&str>,
) -> KeyReport {
    let mut counts: BTreeMap<String, (usize, BTreeSet<String>)> = BTreeMap::new();
    let mut unsealed = 0;
    for secret in secrets {
        match &secret.spec.sealed {
            Some(sealed) => {
                let (count, namespaces) = counts.entry(sealed.key_id.clone()).or_default();
                *count += 1;
                namespaces.insert(secret.namespace().unwrap_or_default());
            }
            None => unsealed += 1,
        }
    }
    if let Some(keyring) = keyring {
        for id in keyring.key_ids() {
            counts.entry(id.to_owned()).or_default();
        }
    }
    let keys = counts
        .into_iter()
        .map(|(key_id, (secrets, namespaces))| KeyUsage {
            in_keyring: keyring.map(|k| k.contains(&key_id)),
            primary: keyring.is_some_and(|k| k.primary_id() == key_id),
            key_id,
            secrets,
            namespaces,
        })
        .collect();
    KeyReport {
        keys,
        unsealed,
        namespace: namespace.map(str::to_owned),
    }
}

impl KeyUsage {
    /// What to do about this key. Counted in one namespace only, no key is called
    /// removable: other namespaces may still use it.
    pub fn note(&self, cluster_wide: bool) -> &'static str {
        match (self.in_keyring, self.primary, self.secrets) {
            (_, true, _) => "new values are sealed under this key",
            (Some(true), false, 0) if !cluster_wide => "unused in this namespace",
            (Some(false), _, n) if n > 0 => {
                "MISSING: these secrets cannot be opened; restore this key"
            }
            (Some(true), false, 0) => "unused: may be removed from the keyring",
            (_, false, n) if n > 0 => "in use: keep it until the controller has re-wrapped these",
            _ => "",
        }
    }
}

/// The JSON/YAML shape of `keys status`: the report with each key's note and the verdict.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReportView<'a> {
    keys: Vec<KeyView<'a>>,
    unsealed: usize,
    namespace: Option<&'a str>,
    verdict: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KeyView<'a> {
    #[serde(flatten)]
    usage: &'a KeyUsage,
    note: &'static str,
}

impl KeyReport {
    fn cluster_wide(&self) -> bool {
        self.namespace.is_none()
    }

    /// `keys status` in `format`: a table and a verdict for people (`wide` adds the
    /// namespaces using each key), or JSON/YAML.
    pub fn render_as(&self, format: Option<Format>) -> anyhow::Result<String> {
        let view = ReportView {
            keys: self
                .keys
                .iter()
                .map(|usage| KeyView {
                    usage,
                    note: usage.note(self.cluster_wide()),
                })
                .collect(),
            unsealed: self.unsealed,
            namespace: self.namespace.as_deref(),
            verdict: self.verdict(),
        };
        if let Some(text) = serialised(&view, format)? {
            return Ok(text);
        }
        let wide = format == Some(Format::Wide);
        let mut header = vec!["KEY ID", "SECRETS", "IN KEYRING", "PRIMARY"];
        if wide {
            header.push("NAMESPACES");
        }
        header.push("NOTE");
        let rows: Vec<Vec<String>> = view
            .keys
            .iter()
            .map(|k| {
                let in_keyring = match k.usage.in_keyring {
                    Some(true) => "yes",
                    Some(false) => "no",
                    None => "?",
                };
                let primary = if k.usage.primary { "yes" } else { "no" };
                let mut row = vec![
                    k.usage.key_id.clone(),
                    k.usage.secrets.to_string(),
                    in_keyring.to_owned(),
                    primary.to_owned(),
                ];
                if wide {
                    let namespaces: Vec<&str> =
                        k.usage.namespaces.iter().map(String::as_str).collect();
                    row.push(namespaces.join(","));
                }
                row.push(k.note.to_owned());
                row
            })
            .collect();
        let mut out = table(&header, &rows);
        if self.unsealed > 0 {
            let _ = writeln!(
                out,
                "\n{} AgentSecret(s) have no sealed value yet.",
                self.unsealed
            );
        }
        let _ = writeln!(out, "\n{}", view.verdict);
        Ok(out)
    }

    /// The default rendering: a table and a verdict for people.
    pub fn render(&self) -> String {
        self.render_as(None).unwrap_or_default()
    }

    /// The one-line conclusion: whether old keys may leave the keyring.
    pub fn verdict(&self) -> String {
        if let Some(namespace) = &self.namespace {
            return format!(
                "Counts cover namespace {namespace} only: run with -A (all namespaces) before removing a key from the keyring."
            );
        }
        let remaining: usize = self
            .keys
            .iter()
            .filter(|k| !k.primary)
            .map(|k| k.secrets)
            .sum();
        let known_primary = self.keys.iter().any(|k| k.primary);
        match (known_primary, remaining) {
            (false, _) => "Pass --keyring to compare with the keyring in force.".to_owned(),
            (true, 0) => "Rotation complete: every AgentSecret is wrapped under the primary key; unused keys may be removed.".to_owned(),
            (true, n) => format!(
                "{n} AgentSecret(s) remain on older keys: keep those keys in the keyring until this reaches 0."
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed_under(keyring: &Keyring) -> AgentSecret {
        crate::testing::agent_secret("ns", "s", "alice", "A", keyring, "v")
    }

    #[test]
    fn reports_remaining_secrets_per_key_and_removable_keys() {
        let mut keyring = Keyring::generate("old").unwrap();
        let secrets = vec![sealed_under(&keyring), sealed_under(&keyring)];
        keyring.add_primary("new").unwrap();
        let mut unsealed = sealed_under(&keyring);
        unsealed.spec.sealed = None;
        let mut all = secrets.clone();
        all.push(sealed_under(&keyring));
        all.push(unsealed);

        let report = key_report(&all, Some(&keyring), None);
        assert_eq!(report.unsealed, 1);
        assert_eq!(
            report.keys,
            vec![
                KeyUsage {
                    key_id: "new".into(),
                    secrets: 1,
                    in_keyring: Some(true),
                    primary: true,
                    namespaces: ["ns".to_owned()].into(),
                },
                KeyUsage {
                    key_id: "old".into(),
                    secrets: 2,
                    in_keyring: Some(true),
                    primary: false,
                    namespaces: ["ns".to_owned()].into(),
                },
            ]
        );
        let text = report.render();
        assert!(
            text.contains("2 AgentSecret(s) remain on older keys"),
            "{text}"
        );
        assert!(text.contains("keep it until"), "{text}");

        let done = key_report(&[sealed_under(&keyring)], Some(&keyring), None);
        let text = done.render();
        assert!(text.contains("Rotation complete"), "{text}");
        assert!(text.contains("unused: may be removed"), "{text}");

        // Counted in one namespace only, nothing is declared removable.
        let text =
            key_report(&[sealed_under(&keyring)], Some(&keyring), Some("sandboxes")).render();
        assert!(
            !text.contains("may be removed") && !text.contains("Rotation complete"),
            "{text}"
        );
        assert!(text.contains("namespace sandboxes only"), "{text}");
    }

    #[test]
    fn a_key_missing_from_the_keyring_is_flagged() {
        let lost = Keyring::generate("lost").unwrap();
        let current = Keyring::generate("current").unwrap();
        let report = key_report(&[sealed_under(&lost)], Some(&current), None);
        assert!(report.render().contains("MISSING"));
        assert_eq!(report.keys[1].in_keyring, Some(false));
    }

    #[test]
    fn json_carries_notes_and_verdict_and_wide_adds_namespaces() {
        let mut keyring = Keyring::generate("old").unwrap();
        let other = crate::testing::agent_secret("team-b", "s", "bob", "B", &keyring, "v");
        let old = vec![sealed_under(&keyring), other];
        keyring.add_primary("new").unwrap();
        let report = key_report(&old, Some(&keyring), None);

        let json: serde_json::Value =
            serde_json::from_str(&report.render_as(Some(Format::Json)).unwrap()).unwrap();
        assert_eq!(json["keys"][1]["keyId"], "old");
        assert_eq!(json["keys"][1]["secrets"], 2);
        assert_eq!(
            json["keys"][1]["namespaces"],
            serde_json::json!(["ns", "team-b"])
        );
        assert_eq!(
            json["keys"][1]["note"],
            "in use: keep it until the controller has re-wrapped these"
        );
        assert_eq!(json["keys"][0]["primary"], true);
        assert!(
            json["verdict"]
                .as_str()
                .unwrap()
                .starts_with("2 AgentSecret(s) remain")
        );
        let yaml: serde_json::Value =
            serde_yaml::from_str(&report.render_as(Some(Format::Yaml)).unwrap()).unwrap();
        assert_eq!(yaml, json);

        let plain = report.render();
        assert!(
            !plain.contains("NAMESPACES") && !plain.contains("team-b"),
            "{plain}"
        );
        let wide = report.render_as(Some(Format::Wide)).unwrap();
        let header = wide.lines().next().unwrap();
        assert!(header.contains("PRIMARY  NAMESPACES  NOTE"), "{wide}");
        assert!(wide.contains("ns,team-b"), "{wide}");
    }
}
