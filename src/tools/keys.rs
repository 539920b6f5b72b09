//! `agentsecrets keys status`: how many AgentSecrets are wrapped under each key, and when an
//! old key may leave the keyring.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::api::AgentSecret;
use crate::crypto::Keyring;

/// Usage of one key id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUsage {
    pub key_id: String,
    pub secrets: usize,
    /// `None` when no keyring was given to compare with.
    pub in_keyring: Option<bool>,
    pub primary: bool,
}

/// The whole picture of a rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut unsealed = 0;
    for secret in secrets {
        match &secret.spec.sealed {
            Some(sealed) => *counts.entry(sealed.key_id.clone()).or_default() += 1,
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
        .map(|(key_id, secrets)| KeyUsage {
            in_keyring: keyring.map(|k| k.contains(&key_id)),
            primary: keyring.is_some_and(|k| k.primary_id() == key_id),
            key_id,
            secrets,
        })
        .collect();
    KeyReport {
        keys,
        unsealed,
        namespace: namespace.map(str::to_owned),
    }
}

impl KeyReport {
    /// A table and a verdict for people.
    pub fn render(&self) -> String {
        let width = self
            .keys
            .iter()
            .map(|k| k.key_id.len())
            .max()
            .unwrap_or(0)
            .max("KEY ID".len());
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<width$}  {:>8}  {:<10}  {:<7}  NOTE",
            "KEY ID", "SECRETS", "IN KEYRING", "PRIMARY"
        );
        for key in &self.keys {
            let in_keyring = match key.in_keyring {
                Some(true) => "yes",
                Some(false) => "no",
                None => "?",
            };
            let cluster_wide = self.namespace.is_none();
            let note = match (key.in_keyring, key.primary, key.secrets) {
                (_, true, _) => "new values are sealed under this key",
                (Some(true), false, 0) if !cluster_wide => "unused in this namespace",
                (Some(false), _, n) if n > 0 => {
                    "MISSING: these secrets cannot be opened; restore this key"
                }
                (Some(true), false, 0) => "unused: may be removed from the keyring",
                (_, false, n) if n > 0 => {
                    "in use: keep it until the controller has re-wrapped these"
                }
                _ => "",
            };
            let primary = if key.primary { "yes" } else { "no" };
            let _ = writeln!(
                out,
                "{:<width$}  {:>8}  {:<10}  {:<7}  {note}",
                key.key_id, key.secrets, in_keyring, primary
            );
        }
        if self.unsealed > 0 {
            let _ = writeln!(
                out,
                "\n{} AgentSecret(s) have no sealed value yet.",
                self.unsealed
            );
        }
        let remaining: usize = self
            .keys
            .iter()
            .filter(|k| !k.primary)
            .map(|k| k.secrets)
            .sum();
        let known_primary = self.keys.iter().any(|k| k.primary);
        if let Some(namespace) = &self.namespace {
            let _ = writeln!(
                out,
                "\nCounts cover namespace {namespace} only: run without -n before removing a key from the keyring."
            );
            return out;
        }
        let _ = match (known_primary, remaining) {
            (false, _) => writeln!(
                out,
                "\nPass --keyring to compare with the keyring in force."
            ),
            (true, 0) => writeln!(
                out,
                "\nRotation complete: every AgentSecret is wrapped under the primary key; unused keys may be removed."
            ),
            (true, n) => writeln!(
                out,
                "\n{n} AgentSecret(s) remain on older keys: keep those keys in the keyring until this reaches 0."
            ),
        };
        out
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
                    primary: true
                },
                KeyUsage {
                    key_id: "old".into(),
                    secrets: 2,
                    in_keyring: Some(true),
                    primary: false
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
}
