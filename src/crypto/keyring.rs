//! Key-encryption keys (KEKs): the keyring file, its validation, and generating new keys.

use aes_kw::{KeyInit, KwAes256};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use zeroize::Zeroizing;

use super::SecretString;

/// Length of a KEK in bytes (AES-256).
pub const KEK_LEN: usize = 32;

/// Why a keyring could not be loaded. Messages name the problem, never key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("failed to read keyring file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("keyring is empty: expected `primary: <id>` and `keys: [{{id, key}}]`")]
    Empty,
    // serde_yaml's own message can quote the offending input (key material), so only the
    // location is reported.
    #[error(
        "keyring is not valid YAML of the form `primary: <id>`, `keys: [{{id, key}}]` (problem at line {line}, column {column})"
    )]
    Malformed { line: usize, column: usize },
    #[error("keyring names no primary key: set `primary: <id>`")]
    MissingPrimary,
    #[error("keyring has no keys")]
    NoKeys,
    // Neither the primary nor an invalid id is echoed: a file whose id and key were swapped
    // would otherwise print a key.
    #[error("the keyring's primary is not among its keys (key ids: {known})")]
    UnknownPrimary { known: String },
    /// A key named on the command line (not read from a file, so safe to echo).
    #[error("keyring key {id:?} is not among its keys (key ids: {known})")]
    NoSuchKey { id: String, known: String },
    #[error("keyring lists key id {0:?} more than once")]
    DuplicateId(String),
    #[error(
        "keyring key id #{position} is invalid: use 1-63 characters of A-Z, a-z, 0-9, '.', '_' and '-' (are the id and the key swapped?)"
    )]
    InvalidId { position: usize },
    #[error("keyring key {id:?} is not valid base64")]
    InvalidKeyEncoding { id: String },
    #[error(
        "keyring key {id:?} is {actual} bytes long; a KEK must be exactly {KEK_LEN} bytes (AES-256)"
    )]
    WrongKeyLength { id: String, actual: usize },
    #[error("failed to generate a key: the operating system's random source failed")]
    Random,
    #[error("failed to serialise the keyring")]
    Serialize,
}

/// One key-encryption key. The key schedule is built once; all material is zeroised on drop.
pub(crate) struct Kek {
    pub(crate) wrap: KwAes256,
    material: Zeroizing<[u8; KEK_LEN]>,
}

/// A set of KEKs with one primary that wraps new data keys.
pub struct Keyring {
    primary: String,
    keys: BTreeMap<String, Kek>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("primary", &self.primary)
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .field("keys", &"<redacted>")
            .finish()
    }
}

/// The keyring file as written to disk or a Kubernetes Secret.
#[derive(Deserialize, Serialize)]
struct KeyringFile {
    #[serde(default)]
    primary: Option<String>,
    #[serde(default)]
    keys: Vec<KeyEntry>,
}

#[derive(Deserialize, Serialize)]
struct KeyEntry {
    id: String,
    key: SecretString,
}

/// Whether `id` may name a key: 1-63 characters of A-Z, a-z, 0-9, `.`, `_` and `-`.
pub fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Keyring {
    /// Parse and validate a keyring file's contents.
    pub fn from_yaml(text: &str) -> Result<Self, KeyringError> {
        if text.trim().is_empty() {
            return Err(KeyringError::Empty);
        }
        let file: KeyringFile = serde_yaml::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map(|l| (l.line(), l.column()))
                .unwrap_or((0, 0));
            KeyringError::Malformed { line, column }
        })?;
        let primary = file.primary.ok_or(KeyringError::MissingPrimary)?;
        if file.keys.is_empty() {
            return Err(KeyringError::NoKeys);
        }
        let mut keys = BTreeMap::new();
        for (i, entry) in file.keys.iter().enumerate() {
            if !valid_key_id(&entry.id) {
                return Err(KeyringError::InvalidId { position: i + 1 });
            }
            if keys.contains_key(&entry.id) {
                return Err(KeyringError::DuplicateId(entry.id.clone()));
            }
            let decoded =
                Zeroizing::new(BASE64.decode(entry.key.expose().trim()).map_err(|_| {
                    KeyringError::InvalidKeyEncoding {
                        id: entry.id.clone(),
                    }
                })?);
            let material: [u8; KEK_LEN] =
                decoded
                    .as_slice()
                    .try_into()
                    .map_err(|_| KeyringError::WrongKeyLength {
                        id: entry.id.clone(),
                        actual: decoded.len(),
                    })?;
            keys.insert(entry.id.clone(), Kek::new(Zeroizing::new(material)));
        }
        if !keys.contains_key(&primary) {
            return Err(KeyringError::UnknownPrimary {
                known: keys.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        }
        Ok(Self { primary, keys })
    }

    /// Read and validate a keyring file.
    pub fn load(path: &Path) -> Result<Self, KeyringError> {
        let text =
            Zeroizing::new(
                std::fs::read_to_string(path).map_err(|source| KeyringError::Read {
                    path: path.display().to_string(),
                    source,
                })?,
            );
        Self::from_yaml(&text)
    }

    /// A keyring holding one freshly generated primary key.
    pub fn generate(id: &str) -> Result<Self, KeyringError> {
        let mut ring = Self {
            primary: String::new(),
            keys: BTreeMap::new(),
        };
        ring.add_primary(id)?;
        Ok(ring)
    }

    /// Add a freshly generated key and make it the primary; existing keys are kept so that
    /// values wrapped under them still open until the controller re-wraps them.
    pub fn add_primary(&mut self, id: &str) -> Result<(), KeyringError> {
        self.add_key(id)?;
        self.primary = id.to_owned();
        Ok(())
    }

    /// Add a freshly generated key without making it the primary: the first phase of a
    /// rotation, so that every replica can open values wrapped under it before any is.
    pub fn add_key(&mut self, id: &str) -> Result<(), KeyringError> {
        if !valid_key_id(id) {
            return Err(KeyringError::InvalidId {
                position: self.keys.len() + 1,
            });
        }
        if self.keys.contains_key(id) {
            return Err(KeyringError::DuplicateId(id.to_owned()));
        }
        let mut material = Zeroizing::new([0u8; KEK_LEN]);
        getrandom::fill(material.as_mut_slice()).map_err(|_| KeyringError::Random)?;
        self.keys.insert(id.to_owned(), Kek::new(material));
        Ok(())
    }

    /// Make an existing key the primary.
    pub fn set_primary(&mut self, id: &str) -> Result<(), KeyringError> {
        if !self.keys.contains_key(id) {
            return Err(KeyringError::NoSuchKey {
                id: id.to_owned(),
                known: self.keys.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        }
        self.primary = id.to_owned();
        Ok(())
    }

    /// The keyring file's text. It contains key material: write it only to a protected place.
    pub fn to_yaml(&self) -> Result<Zeroizing<String>, KeyringError> {
        let file = KeyringFile {
            primary: Some(self.primary.clone()),
            keys: self
                .keys
                .iter()
                .map(|(id, kek)| KeyEntry {
                    id: id.clone(),
                    key: SecretString::new(BASE64.encode(kek.material.as_slice())),
                })
                .collect(),
        };
        serde_yaml::to_string(&file)
            .map(Zeroizing::new)
            .map_err(|_| KeyringError::Serialize)
    }

    /// Id of the key that wraps new data keys.
    pub fn primary_id(&self) -> &str {
        &self.primary
    }

    /// Ids of every key in the ring, sorted.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Whether the ring holds key `id`.
    pub fn contains(&self, id: &str) -> bool {
        self.keys.contains_key(id)
    }

    pub(crate) fn primary_kek(&self) -> Option<&Kek> {
        self.keys.get(&self.primary)
    }

    pub(crate) fn kek(&self, id: &str) -> Option<&Kek> {
        self.keys.get(id)
    }
}

impl Kek {
    fn new(material: Zeroizing<[u8; KEK_LEN]>) -> Self {
        let wrap = KwAes256::new(&(*material).into());
        Self { wrap, material }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="; // 32 bytes
    const K2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="; // 32 bytes

    fn err(text: &str) -> KeyringError {
        match Keyring::from_yaml(text) {
            Ok(_) => unreachable!("keyring unexpectedly loaded: {text}"),
            Err(e) => e,
        }
    }

    #[test]
    fn loads_a_valid_keyring() {
        let ring = Keyring::from_yaml(&format!(
            "primary: b\nkeys:\n- id: a\n  key: {K1}\n- id: b\n  key: {K2}\n"
        ))
        .unwrap();
        assert_eq!(ring.primary_id(), "b");
        assert_eq!(ring.key_ids().collect::<Vec<_>>(), ["a", "b"]);
        assert!(ring.contains("a") && !ring.contains("c"));
    }

    #[test]
    fn refuses_broken_keyrings_naming_the_problem() {
        assert!(matches!(err(""), KeyringError::Empty));
        assert!(matches!(err("   \n"), KeyringError::Empty));
        assert!(matches!(
            err(&format!("keys:\n- id: a\n  key: {K1}\n")),
            KeyringError::MissingPrimary
        ));
        assert!(matches!(
            err("primary: a\nkeys: []\n"),
            KeyringError::NoKeys
        ));
        assert!(
            matches!(err(&format!("primary: z\nkeys:\n- id: a\n  key: {K1}\n")), KeyringError::UnknownPrimary { known } if known == "a")
        );
        assert!(matches!(
            err(&format!("primary: a\nkeys:\n- id: a\n  key: {K1}\n- id: a\n  key: {K2}\n")),
            KeyringError::DuplicateId(id) if id == "a"
        ));
        assert!(matches!(
            err("primary: a\nkeys:\n- id: a\n  key: AAEC\n"),
            KeyringError::WrongKeyLength { id, actual: 3 } if id == "a"
        ));
        assert!(matches!(
            err("primary: a\nkeys:\n- id: a\n  key: '!!not base64'\n"),
            KeyringError::InvalidKeyEncoding { id } if id == "a"
        ));
        assert!(matches!(
            err(&format!(
                "primary: 'a b'\nkeys:\n- id: 'a b'\n  key: {K1}\n"
            )),
            KeyringError::InvalidId { .. }
        ));
    }

    #[test]
    fn a_keyring_with_id_and_key_swapped_does_not_print_the_key() {
        for text in [
            format!("primary: a\nkeys:\n- id: {K1}\n  key: a\n"),
            format!("primary: {K1}\nkeys:\n- id: a\n  key: {K2}\n"),
        ] {
            let message = err(&text).to_string();
            assert!(!message.contains(K1), "{message}");
            assert!(!message.contains(&K1[..12]), "{message}");
        }
    }

    #[test]
    fn malformed_yaml_error_does_not_echo_key_material() {
        let e = err("primary: a\nkeys: \"c2VjcmV0LWtleS1tYXRlcmlhbA==\"\n");
        assert!(matches!(e, KeyringError::Malformed { .. }));
        assert!(!e.to_string().contains("c2VjcmV0"), "{e}");
    }

    #[test]
    fn generated_keyring_round_trips_and_add_primary_keeps_old_keys() {
        let mut ring = Keyring::generate("one").unwrap();
        ring.add_primary("two").unwrap();
        assert!(matches!(
            ring.add_primary("one"),
            Err(KeyringError::DuplicateId(_))
        ));
        let text = ring.to_yaml().unwrap();
        let back = Keyring::from_yaml(&text).unwrap();
        assert_eq!(back.primary_id(), "two");
        assert_eq!(back.key_ids().collect::<Vec<_>>(), ["one", "two"]);
        let one = ring.kek("one").map(|k| *k.material).unwrap();
        let two = ring.kek("two").map(|k| *k.material).unwrap();
        assert_ne!(one, two, "each key is freshly random");
        assert_eq!(back.kek("one").map(|k| *k.material), Some(one));
    }

    #[test]
    fn debug_of_a_keyring_shows_ids_but_no_material() {
        let ring =
            Keyring::from_yaml(&format!("primary: a\nkeys:\n- id: a\n  key: {K1}\n")).unwrap();
        let text = format!("{ring:?}");
        assert!(text.contains("\"a\"") && text.contains("<redacted>"));
        assert!(!text.contains(K1) && !text.contains("AAECAwQF"));
    }
}
