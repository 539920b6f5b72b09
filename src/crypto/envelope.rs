//! Envelope encryption of secret values.
//!
//! Each value gets a fresh random 256-bit data key (DEK); the value is encrypted with
//! AES-256-GCM under it, with associated data binding the ciphertext to everything its meaning
//! depends on: namespace, owner, env name, the time it was sealed, and any constraints on its
//! use. The DEK is wrapped with AES key wrap (RFC 3394) under a KEK from the keyring.
//!
//! This module knows no Kubernetes type: callers convert their stored form to an [`Envelope`].

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use std::fmt;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::keyring::Keyring;

/// Length of a data key (AES-256).
pub const DEK_LEN: usize = 32;
/// Length of a wrapped data key: RFC 3394 adds one 64-bit block.
pub const WRAPPED_DEK_LEN: usize = DEK_LEN + 8;
/// Length of an AES-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Length of the AES-GCM authentication tag appended to the ciphertext.
pub const TAG_LEN: usize = 16;
/// Longest accepted plaintext value, in bytes. Credentials are small; the bound keeps the
/// stored object far below the API server's object size limit.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// Associated data of the first format: namespace and owner only.
const AAD_DOMAIN_V1: &[u8] = b"agentsecrets.io/v1alpha1/AgentSecret\0";
/// Associated data of the current format: namespace, owner, env name, seal time, constraints.
const AAD_DOMAIN_V2: &[u8] = b"agentsecrets.io/sealed/v2\0";

/// How a sealed value binds its associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Bound to namespace and owner only: still opened, never written; the controller
    /// re-seals such values in the current format.
    V1,
    /// Bound to namespace, owner, env name, seal time and constraints.
    V2,
}

impl Format {
    /// The number stored with a sealed value (`None` for the first format, which stored none).
    pub fn number(self) -> Option<u32> {
        match self {
            Self::V1 => None,
            Self::V2 => Some(2),
        }
    }

    /// The format a stored number names; `None` for a number this version does not know.
    pub fn from_number(number: Option<u32>) -> Option<Self> {
        match number {
            None | Some(1) => Some(Self::V1),
            Some(2) => Some(Self::V2),
            Some(_) => None,
        }
    }
}

/// What a sealed value is bound to: a copy under another namespace, owner, env name or
/// constraints does not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealContext<'a> {
    pub namespace: &'a str,
    pub owner: &'a str,
    pub env_name: &'a str,
    /// Canonical text of any restriction on where the value may be used (empty when none).
    pub constraints: &'a str,
}

impl<'a> SealContext<'a> {
    pub fn new(namespace: &'a str, owner: &'a str, env_name: &'a str) -> Self {
        Self {
            namespace,
            owner,
            env_name,
            constraints: "",
        }
    }

    /// Length-prefixed fields, so no two different contexts produce the same bytes.
    fn associated_data(&self, format: Format, sealed_at: Option<i64>) -> Vec<u8> {
        let push = |aad: &mut Vec<u8>, field: &[u8]| {
            // Fields are bounded far below 4 GiB (Kubernetes names and a 64 KiB value).
            let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
            aad.extend_from_slice(&len.to_be_bytes());
            aad.extend_from_slice(field);
        };
        let mut aad = Vec::with_capacity(
            64 + self.namespace.len()
                + self.owner.len()
                + self.env_name.len()
                + self.constraints.len(),
        );
        match format {
            Format::V1 => {
                aad.extend_from_slice(AAD_DOMAIN_V1);
                push(&mut aad, self.namespace.as_bytes());
                push(&mut aad, self.owner.as_bytes());
            }
            Format::V2 => {
                aad.extend_from_slice(AAD_DOMAIN_V2);
                push(&mut aad, self.namespace.as_bytes());
                push(&mut aad, self.owner.as_bytes());
                push(&mut aad, self.env_name.as_bytes());
                push(&mut aad, &sealed_at.unwrap_or(i64::MIN).to_be_bytes());
                push(&mut aad, self.constraints.as_bytes());
            }
        }
        aad
    }
}

/// Why a value could not be sealed, opened or re-wrapped. Never carries secret material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("key-encryption key {0:?} is not in the keyring")]
    UnknownKeyId(String),
    #[error(
        "failed to unwrap the data key with key-encryption key {key_id:?}: the wrapped key is damaged or was wrapped under a different key"
    )]
    UnwrapFailed { key_id: String },
    #[error(
        "failed to decrypt the value: the ciphertext or nonce is damaged, or it was sealed for another namespace, owner, env name or seal time"
    )]
    DecryptFailed,
    #[error("the sealed value carries no seal time, which its format binds")]
    MissingSealTime,
    #[error("value is {actual} bytes; at most {MAX_VALUE_BYTES} bytes are accepted")]
    ValueTooLarge { actual: usize },
    #[error("failed to seal the value: the operating system's random source failed")]
    Random,
    #[error("failed to seal the value: encryption failed")]
    EncryptFailed,
}

/// A decrypted value: zeroised on drop, redacted in `Debug`.
#[derive(Clone)]
pub struct Plaintext(Zeroizing<Vec<u8>>);

impl Plaintext {
    /// The plaintext bytes. Callers must not log or display them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Constant-time comparison with another value.
    pub fn ct_eq(&self, other: &[u8]) -> bool {
        // Length is not secret-dependent in a way that matters here: it is visible from the
        // ciphertext length anyway.
        self.0.len() == other.len() && bool::from(self.0.as_slice().ct_eq(other))
    }
}

impl fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A sealed value with its fields decoded.
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    pub format: Format,
    pub key_id: String,
    pub wrapped_key: [u8; WRAPPED_DEK_LEN],
    pub nonce: [u8; NONCE_LEN],
    /// AES-256-GCM ciphertext with its tag.
    pub ciphertext: Vec<u8>,
    /// When the plaintext was sealed, in Unix seconds (bound into the associated data of the
    /// current format; re-wrapping keeps it).
    pub sealed_at: Option<i64>,
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("format", &self.format)
            .field("key_id", &self.key_id)
            .field("ciphertext_len", &self.ciphertext.len())
            .field("sealed_at", &self.sealed_at)
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// Seal `plaintext` for `ctx` under the primary KEK, recording `sealed_at` (Unix seconds).
    pub fn seal(
        &self,
        plaintext: &[u8],
        ctx: SealContext<'_>,
        sealed_at: i64,
    ) -> Result<Envelope, CryptoError> {
        if plaintext.len() > MAX_VALUE_BYTES {
            return Err(CryptoError::ValueTooLarge {
                actual: plaintext.len(),
            });
        }
        let kek = self
            .primary_kek()
            .ok_or_else(|| CryptoError::UnknownKeyId(self.primary_id().to_owned()))?;
        let mut dek = Zeroizing::new([0u8; DEK_LEN]);
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(dek.as_mut_slice()).map_err(|_| CryptoError::Random)?;
        getrandom::fill(&mut nonce).map_err(|_| CryptoError::Random)?;

        let cipher = Aes256Gcm::new(&(*dek).into());
        let aad = ctx.associated_data(Format::V2, Some(sealed_at));
        let ciphertext = cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::EncryptFailed)?;

        let mut wrapped_key = [0u8; WRAPPED_DEK_LEN];
        kek.wrap
            .wrap_key(dek.as_slice(), &mut wrapped_key)
            .map_err(|_| CryptoError::EncryptFailed)?;
        Ok(Envelope {
            format: Format::V2,
            key_id: self.primary_id().to_owned(),
            wrapped_key,
            nonce,
            ciphertext,
            sealed_at: Some(sealed_at),
        })
    }

    /// Open a sealed value for `ctx`.
    pub fn open(
        &self,
        envelope: &Envelope,
        ctx: SealContext<'_>,
    ) -> Result<Plaintext, CryptoError> {
        if envelope.format == Format::V2 && envelope.sealed_at.is_none() {
            return Err(CryptoError::MissingSealTime);
        }
        let dek = self.unwrap_dek(envelope)?;
        let cipher = Aes256Gcm::new(&(*dek).into());
        let aad = ctx.associated_data(envelope.format, envelope.sealed_at);
        cipher
            .decrypt(
                &Nonce::from(envelope.nonce),
                Payload {
                    msg: &envelope.ciphertext,
                    aad: &aad,
                },
            )
            .map(|plain| Plaintext(Zeroizing::new(plain)))
            .map_err(|_| CryptoError::DecryptFailed)
    }

    /// Open a value sealed for `from` and seal it again for `to` in the current format under
    /// the primary KEK, keeping its seal time (a rename, or an upgrade of the first format).
    pub fn reseal(
        &self,
        envelope: &Envelope,
        from: SealContext<'_>,
        to: SealContext<'_>,
        now: i64,
    ) -> Result<Envelope, CryptoError> {
        let plaintext = self.open(envelope, from)?;
        self.seal(plaintext.expose(), to, envelope.sealed_at.unwrap_or(now))
    }

    /// Re-wrap the data key under the current primary KEK. The ciphertext, nonce and seal
    /// time are unchanged: no data is re-encrypted.
    pub fn rewrap(&self, envelope: &Envelope) -> Result<Envelope, CryptoError> {
        let dek = self.unwrap_dek(envelope)?;
        let kek = self
            .primary_kek()
            .ok_or_else(|| CryptoError::UnknownKeyId(self.primary_id().to_owned()))?;
        let mut wrapped_key = [0u8; WRAPPED_DEK_LEN];
        kek.wrap
            .wrap_key(dek.as_slice(), &mut wrapped_key)
            .map_err(|_| CryptoError::EncryptFailed)?;
        Ok(Envelope {
            key_id: self.primary_id().to_owned(),
            wrapped_key,
            ..envelope.clone()
        })
    }

    fn unwrap_dek(&self, envelope: &Envelope) -> Result<Zeroizing<[u8; DEK_LEN]>, CryptoError> {
        let kek = self
            .kek(&envelope.key_id)
            .ok_or_else(|| CryptoError::UnknownKeyId(envelope.key_id.clone()))?;
        let mut dek = Zeroizing::new([0u8; DEK_LEN]);
        kek.wrap
            .unwrap_key(&envelope.wrapped_key, dek.as_mut_slice())
            .map_err(|_| CryptoError::UnwrapFailed {
                key_id: envelope.key_id.clone(),
            })?;
        Ok(dek)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes_kw::KwAes256;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn ring(primary: &str, ids: &[&str]) -> Keyring {
        let mut ring = Keyring::generate(ids[0]).unwrap();
        for id in &ids[1..] {
            ring.add_primary(id).unwrap();
        }
        ring.set_primary(primary).unwrap();
        ring
    }

    const CTX: SealContext<'static> = SealContext {
        namespace: "sandboxes",
        owner: "alice",
        env_name: "DB_PASSWORD",
        constraints: "",
    };
    const NOW: i64 = 1_800_000_000;

    /// RFC 3394 §4.6: wrap 256 bits of key data with a 256-bit KEK, through our keyring.
    #[test]
    fn rfc3394_section_4_6_known_answer() {
        let kek = hex("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F");
        let key_data = hex("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F");
        let expected =
            hex("28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21");
        let text = format!(
            "primary: rfc\nkeys:\n- id: rfc\n  key: {}\n",
            BASE64.encode(&kek)
        );
        let keyring = Keyring::from_yaml(&text).unwrap();
        let kek = keyring.kek("rfc").unwrap();
        let mut out = [0u8; WRAPPED_DEK_LEN];
        kek.wrap.wrap_key(&key_data, &mut out).unwrap();
        assert_eq!(out.to_vec(), expected);
        let mut back = [0u8; DEK_LEN];
        kek.wrap.unwrap_key(&expected, &mut back).unwrap();
        assert_eq!(back.to_vec(), key_data);
        // And the same through the crate directly, so the wrapper adds nothing.
        let direct = KwAes256::new_from_slice(&hex(
            "000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F",
        ))
        .unwrap();
        let mut out2 = [0u8; WRAPPED_DEK_LEN];
        direct.wrap_key(&key_data, &mut out2).unwrap();
        assert_eq!(out2, out);
    }

    #[test]
    fn seal_then_open_round_trips() {
        let keyring = ring("a", &["a"]);
        let sealed = keyring.seal(b"sk-live-123", CTX, NOW).unwrap();
        assert_eq!(sealed.key_id, "a");
        assert_eq!(sealed.format, Format::V2);
        assert_eq!(sealed.sealed_at, Some(NOW));
        assert_eq!(keyring.open(&sealed, CTX).unwrap().expose(), b"sk-live-123");
        let empty = keyring.seal(b"", CTX, NOW).unwrap();
        assert_eq!(keyring.open(&empty, CTX).unwrap().expose(), b"");
    }

    #[test]
    fn every_seal_uses_a_fresh_data_key_and_nonce() {
        let keyring = ring("a", &["a"]);
        let one = keyring.seal(b"same", CTX, NOW).unwrap();
        let two = keyring.seal(b"same", CTX, NOW).unwrap();
        assert_ne!(one.wrapped_key, two.wrapped_key);
        assert_ne!(one.nonce, two.nonce);
        assert_ne!(one.ciphertext, two.ciphertext);
    }

    #[test]
    fn every_single_field_tamper_is_rejected() {
        let keyring = ring("a", &["a", "b"]);
        let sealed = keyring.seal(b"value", CTX, NOW).unwrap();

        let mut t = sealed.clone();
        t.key_id = "b".into();
        assert_eq!(
            keyring.open(&t, CTX).unwrap_err(),
            CryptoError::UnwrapFailed { key_id: "b".into() }
        );
        t.key_id = "gone".into();
        assert_eq!(
            keyring.open(&t, CTX).unwrap_err(),
            CryptoError::UnknownKeyId("gone".into())
        );

        let mut t = sealed.clone();
        t.wrapped_key[0] ^= 1;
        assert!(matches!(
            keyring.open(&t, CTX).unwrap_err(),
            CryptoError::UnwrapFailed { .. }
        ));

        let mut t = sealed.clone();
        t.nonce[0] ^= 1;
        assert_eq!(
            keyring.open(&t, CTX).unwrap_err(),
            CryptoError::DecryptFailed
        );

        let mut t = sealed.clone();
        t.ciphertext[0] ^= 1;
        assert_eq!(
            keyring.open(&t, CTX).unwrap_err(),
            CryptoError::DecryptFailed
        );

        // The tag sits at the end of the ciphertext.
        let mut t = sealed.clone();
        let last = t.ciphertext.len() - 1;
        t.ciphertext[last] ^= 0x80;
        assert_eq!(
            keyring.open(&t, CTX).unwrap_err(),
            CryptoError::DecryptFailed
        );

        // The seal time shown to users is bound: changing it breaks the value.
        let mut t = sealed.clone();
        t.sealed_at = Some(NOW + 1);
        assert_eq!(
            keyring.open(&t, CTX).unwrap_err(),
            CryptoError::DecryptFailed
        );
        t.sealed_at = None;
        assert_eq!(
            keyring.open(&t, CTX).unwrap_err(),
            CryptoError::MissingSealTime
        );

        // Declaring the current format's value as the first format does not open it either.
        let mut t = sealed;
        t.format = Format::V1;
        assert_eq!(
            keyring.open(&t, CTX).unwrap_err(),
            CryptoError::DecryptFailed
        );
    }

    #[test]
    fn a_value_copied_to_another_namespace_owner_env_name_or_constraint_does_not_open() {
        let keyring = ring("a", &["a"]);
        let sealed = keyring.seal(b"value", CTX, NOW).unwrap();
        for ctx in [
            SealContext::new("other", "alice", "DB_PASSWORD"),
            SealContext::new("sandboxes", "bob", "DB_PASSWORD"),
            SealContext::new("sandboxes", "alice", "OTHER"),
            SealContext {
                constraints: "hosts=evil.example",
                ..CTX
            },
            // Length prefixes keep field boundaries: these must not collide.
            SealContext::new("sandboxesa", "lice", "DB_PASSWORD"),
            SealContext::new("sandboxes", "aliceD", "B_PASSWORD"),
        ] {
            assert_eq!(
                keyring.open(&sealed, ctx).unwrap_err(),
                CryptoError::DecryptFailed,
                "{ctx:?}"
            );
        }
    }

    /// A value of the first format (bound to namespace and owner only) still opens, under
    /// any env name, so that an upgrade loses nothing; `reseal` moves it to the current one.
    #[test]
    fn a_first_format_value_opens_and_reseals_into_the_current_format() {
        let keyring = ring("a", &["a"]);
        let legacy = legacy_seal(&keyring, b"old value", "sandboxes", "alice");
        assert_eq!(keyring.open(&legacy, CTX).unwrap().expose(), b"old value");
        assert!(
            keyring
                .open(&legacy, SealContext::new("sandboxes", "bob", "DB_PASSWORD"))
                .is_err()
        );
        let upgraded = keyring.reseal(&legacy, CTX, CTX, NOW).unwrap();
        assert_eq!(upgraded.format, Format::V2);
        assert_eq!(upgraded.sealed_at, Some(NOW));
        assert_eq!(keyring.open(&upgraded, CTX).unwrap().expose(), b"old value");
        let renamed = SealContext::new("sandboxes", "alice", "RENAMED");
        assert!(keyring.open(&upgraded, renamed).is_err());
        let moved = keyring.reseal(&upgraded, CTX, renamed, NOW + 50).unwrap();
        assert_eq!(moved.sealed_at, Some(NOW), "a rename keeps the seal time");
        assert_eq!(
            keyring.open(&moved, renamed).unwrap().expose(),
            b"old value"
        );
    }

    /// Seal the way the first format did, for the upgrade tests.
    fn legacy_seal(keyring: &Keyring, plaintext: &[u8], namespace: &str, owner: &str) -> Envelope {
        let ctx = SealContext::new(namespace, owner, "");
        let mut envelope = keyring.seal(plaintext, ctx, NOW).unwrap();
        let dek = keyring.unwrap_dek(&envelope).unwrap();
        let cipher = Aes256Gcm::new(&(*dek).into());
        envelope.ciphertext = cipher
            .encrypt(
                &Nonce::from(envelope.nonce),
                Payload {
                    msg: plaintext,
                    aad: &ctx.associated_data(Format::V1, None),
                },
            )
            .unwrap();
        envelope.format = Format::V1;
        envelope.sealed_at = None;
        envelope
    }

    #[test]
    fn rewrap_moves_the_data_key_to_the_primary_without_reencrypting() {
        let mut new = ring("a", &["a", "b"]);
        let sealed = new.seal(b"rotate me", CTX, NOW).unwrap();
        new.set_primary("b").unwrap();
        let rewrapped = new.rewrap(&sealed).unwrap();
        assert_eq!(rewrapped.key_id, "b");
        assert_eq!(rewrapped.ciphertext, sealed.ciphertext);
        assert_eq!(rewrapped.nonce, sealed.nonce);
        assert_eq!(rewrapped.sealed_at, sealed.sealed_at);
        assert_eq!(rewrapped.format, sealed.format);
        assert_ne!(rewrapped.wrapped_key, sealed.wrapped_key);
        assert_eq!(new.open(&rewrapped, CTX).unwrap().expose(), b"rotate me");
    }

    #[test]
    fn a_value_too_large_is_refused() {
        let keyring = ring("a", &["a"]);
        let big = vec![b'x'; MAX_VALUE_BYTES + 1];
        assert_eq!(
            keyring.seal(&big, CTX, NOW).unwrap_err(),
            CryptoError::ValueTooLarge {
                actual: MAX_VALUE_BYTES + 1
            }
        );
    }

    #[test]
    fn stored_format_numbers_round_trip_and_unknown_ones_are_refused() {
        for format in [Format::V1, Format::V2] {
            assert_eq!(Format::from_number(format.number()), Some(format));
        }
        assert_eq!(Format::from_number(Some(1)), Some(Format::V1));
        assert_eq!(Format::from_number(Some(3)), None);
    }

    #[test]
    fn debug_strings_never_hold_plaintext_or_keys() {
        let keyring = ring("a", &["a"]);
        let canary = b"canary-7f3e9c-plaintext";
        let sealed = keyring.seal(canary, CTX, NOW).unwrap();
        let plain = keyring.open(&sealed, CTX).unwrap();
        let yaml = keyring.to_yaml().unwrap();
        let key_b64 = yaml
            .lines()
            .find_map(|l| l.trim().strip_prefix("key: "))
            .unwrap()
            .to_owned();
        let texts = [
            format!("{plain:?}"),
            format!("{keyring:?}"),
            format!("{sealed:?}"),
            format!(
                "{:?}",
                keyring.open(&sealed, SealContext::new("x", "y", "Z"))
            ),
        ];
        for text in texts {
            assert!(!text.contains("canary"), "{text}");
            assert!(!text.contains(&key_b64), "{text}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn arbitrary_plaintexts_round_trip(
            value in proptest::collection::vec(any::<u8>(), 0..=MAX_VALUE_BYTES),
            namespace in "[a-z0-9-]{1,63}",
            owner in "[A-Za-z0-9._-]{1,63}",
            env_name in "[A-Z_][A-Z0-9_]{0,40}",
        ) {
            let keyring = ring("a", &["a", "b"]);
            let ctx = SealContext::new(&namespace, &owner, &env_name);
            let sealed = keyring.seal(&value, ctx, NOW).unwrap();
            prop_assert_eq!(keyring.open(&sealed, ctx).unwrap().expose().to_vec(), value.clone());
            let rewrapped = keyring.rewrap(&sealed).unwrap();
            prop_assert_eq!(keyring.open(&rewrapped, ctx).unwrap().expose().to_vec(), value);
            let other_owner = format!("{owner}x");
            prop_assert!(keyring.open(&sealed, SealContext::new(&namespace, &other_owner, &env_name)).is_err());
            let other_env = format!("{env_name}X");
            prop_assert!(keyring.open(&sealed, SealContext::new(&namespace, &owner, &other_env)).is_err());
        }
    }
}
