//! The pod-scoped Secret: the values an owner's sandbox pods receive, shared by the sandboxes
//! of one owner started within one reuse window with the same secrets.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use ring::digest;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{
    MANAGED_BY_LABEL, MANAGED_BY_VALUE, OWNER_LABEL, POD_SCOPED_LABEL, POD_SECRET_NAME_PREFIX,
    REUSE_UNTIL_ANNOTATION, reuse_until_text,
};
use crate::cache::CachedSecret;
use crate::crypto::Plaintext;

/// A reuse window: new sandboxes admitted within it share the Secret of their content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Windows since the Unix epoch.
    index: i64,
    seconds: i64,
}

impl Window {
    /// The window `now` (Unix seconds) falls in, for windows of `length` (at least 1 s).
    pub fn at(now: i64, length: Duration) -> Self {
        let seconds = i64::try_from(length.as_secs()).unwrap_or(i64::MAX).max(1);
        Self {
            index: now.div_euclid(seconds),
            seconds,
        }
    }

    /// The window before this one.
    pub fn previous(self) -> Self {
        Self {
            index: self.index.saturating_sub(1),
            ..self
        }
    }

    /// When it ends, in Unix seconds.
    pub fn end(self) -> i64 {
        self.index.saturating_add(1).saturating_mul(self.seconds)
    }
}

/// The name of the pod-scoped Secret holding `secrets` (keyed by env name) for `owner`'s
/// sandboxes in `namespace` admitted within `window`: [`POD_SECRET_NAME_PREFIX`] and 26
/// base32 characters (130 bits) of a hash of all of these and of each sealed value's nonce and
/// ciphertext. `None` when one of them holds no readable sealed value (it cannot be shared:
/// opening it refuses the pod).
///
/// Content-addressed, so a secret edited, added or deleted gives a new name and a new sandbox
/// never gets a stale or partial set, while a key rotation (which re-wraps only the data key)
/// keeps it. A reinvoked admission computes the same name. The name is a valid label value.
pub fn pod_secret_name(
    namespace: &str,
    owner: &str,
    window: Window,
    secrets: &BTreeMap<String, Arc<CachedSecret>>,
) -> Option<String> {
    let mut hash = digest::Context::new(&digest::SHA256);
    let mut field = |bytes: &[u8]| {
        // Length-prefixed, so no two different inputs hash the same bytes.
        hash.update(&(bytes.len() as u64).to_be_bytes());
        hash.update(bytes);
    };
    field(b"agentsecrets.io/pod-secret/2");
    field(namespace.as_bytes());
    field(owner.as_bytes());
    field(&window.index.to_be_bytes());
    field(&window.seconds.to_be_bytes());
    for (env_name, secret) in secrets {
        let Some(Ok(envelope)) = &secret.sealed else {
            return None;
        };
        field(env_name.as_bytes());
        field(&envelope.nonce);
        field(&envelope.ciphertext);
    }
    Some(encode_name(hash.finish().as_ref()))
}

fn encode_name(hash: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut name = String::with_capacity(POD_SECRET_NAME_PREFIX.len() + 26);
    name.push_str(POD_SECRET_NAME_PREFIX);
    // 5 bits per character, read from the hash's bits in order.
    for i in 0..26 {
        let bit = i * 5;
        let (byte, offset) = (bit / 8, bit % 8);
        let pair = u16::from(hash[byte]) << 8 | u16::from(hash[byte + 1]);
        let index = (pair >> (11 - offset)) & 0x1f;
        name.push(char::from(ALPHABET[usize::from(index)]));
    }
    name
}

/// The pod-scoped Secret to create, holding the owner's values as of admission.
pub struct PodSecret {
    pub name: String,
    pub namespace: String,
    pub owner: String,
    /// End of its reuse window, in Unix seconds.
    pub reuse_until: i64,
    pub(super) values: BTreeMap<String, Plaintext>,
}

impl fmt::Debug for PodSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodSecret")
            .field("name", &self.name)
            .field("namespace", &self.namespace)
            .field("owner", &self.owner)
            .field("reuse_until", &self.reuse_until)
            .field("keys", &self.values.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl PodSecret {
    /// Env names held.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }

    /// The Secret object to create. It holds plaintext: send it to the API server and drop it.
    pub fn to_secret(&self) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(
                    [
                        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned()),
                        (POD_SCOPED_LABEL.to_owned(), "true".to_owned()),
                        (OWNER_LABEL.to_owned(), self.owner.clone()),
                    ]
                    .into(),
                ),
                annotations: Some(
                    [(
                        REUSE_UNTIL_ANNOTATION.to_owned(),
                        reuse_until_text(self.reuse_until),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            // The kubelet stops watching immutable Secrets, and nobody can swap the values
            // under a running sandbox.
            immutable: Some(true),
            type_: Some("Opaque".into()),
            data: Some(
                self.values
                    .iter()
                    .map(|(k, v)| (k.clone(), ByteString(v.expose().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }
}

/// How an injected pod gets its pod-scoped Secret.
#[derive(Debug)]
pub enum PodSecretUse {
    /// The Secret of this content and window exists: refer to it, write nothing.
    Reuse { name: String, namespace: String },
    /// Create it first.
    Create(PodSecret),
}

impl PodSecretUse {
    pub fn name(&self) -> &str {
        match self {
            Self::Reuse { name, .. } => name,
            Self::Create(secret) => &secret.name,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{agent_secret, keyring};

    const WINDOW: Duration = Duration::from_secs(300);

    fn secrets(values: &[(&str, &str)]) -> BTreeMap<String, Arc<CachedSecret>> {
        let keyring = keyring("k1");
        values
            .iter()
            .map(|(env, value)| {
                let object = agent_secret("ns", &env.to_lowercase(), "alice", env, &keyring, value);
                let cached = CachedSecret::from_object(&object).expect("cached");
                ((*env).to_owned(), Arc::new(cached))
            })
            .collect()
    }

    fn name(
        namespace: &str,
        owner: &str,
        now: i64,
        s: &BTreeMap<String, Arc<CachedSecret>>,
    ) -> String {
        pod_secret_name(namespace, owner, Window::at(now, WINDOW), s).expect("named")
    }

    #[test]
    fn the_same_owner_content_and_window_give_the_same_name() {
        let set = secrets(&[("A", "1"), ("B", "2")]);
        let a = name("ns", "alice", 1_000, &set);
        assert_eq!(a, name("ns", "alice", 1_000, &set));
        assert_eq!(a, name("ns", "alice", 1_199, &set), "same window");
        assert!(a.starts_with(POD_SECRET_NAME_PREFIX), "{a}");
        assert_eq!(a.len(), POD_SECRET_NAME_PREFIX.len() + 26);
        let suffix = &a[POD_SECRET_NAME_PREFIX.len()..];
        assert!(
            suffix
                .bytes()
                .all(|c| c.is_ascii_lowercase() || (b'2'..=b'7').contains(&c))
        );
    }

    #[test]
    fn another_window_owner_namespace_or_content_gives_another_name() {
        let set = secrets(&[("A", "1"), ("B", "2")]);
        let a = name("ns", "alice", 1_000, &set);
        assert_ne!(a, name("ns", "alice", 1_200, &set), "next window");
        assert_ne!(a, name("ns", "bob", 1_000, &set));
        assert_ne!(a, name("other", "alice", 1_000, &set));
        let mut fewer = set.clone();
        fewer.remove("B");
        assert_ne!(a, name("ns", "alice", 1_000, &fewer), "a secret deleted");
        // The same value sealed again is another ciphertext: an edit always changes the name.
        assert_ne!(
            a,
            name("ns", "alice", 1_000, &secrets(&[("A", "1"), ("B", "2")]))
        );
        let mut renamed = set.clone();
        let b = renamed.remove("B").expect("B");
        renamed.insert("C".into(), b);
        assert_ne!(
            a,
            name("ns", "alice", 1_000, &renamed),
            "an env name changed"
        );
    }

    #[test]
    fn a_rewrapped_data_key_keeps_the_name() {
        let set = secrets(&[("A", "1")]);
        let a = name("ns", "alice", 1_000, &set);
        let mut rewrapped = (*set["A"]).clone();
        if let Some(Ok(envelope)) = rewrapped.sealed.as_mut() {
            envelope.key_id = "k2".into();
            envelope.wrapped_key = [7; crate::crypto::WRAPPED_DEK_LEN];
        }
        let rewrapped = BTreeMap::from([("A".to_owned(), Arc::new(rewrapped))]);
        assert_eq!(a, name("ns", "alice", 1_000, &rewrapped));
    }

    #[test]
    fn an_unsealed_secret_gives_no_name() {
        let set = secrets(&[("A", "1")]);
        let mut unsealed = (*set["A"]).clone();
        unsealed.sealed = None;
        let set = BTreeMap::from([("A".to_owned(), Arc::new(unsealed))]);
        assert_eq!(
            pod_secret_name("ns", "alice", Window::at(0, WINDOW), &set),
            None
        );
    }

    #[test]
    fn windows_are_aligned_and_end_where_the_next_begins() {
        let window = Window::at(1_000, WINDOW);
        assert_eq!(window.end(), 1_200);
        assert_eq!(window.previous().end(), 900);
        assert_eq!(Window::at(1_200, WINDOW).previous(), window);
        assert_eq!(
            Window::at(5, Duration::ZERO).end(),
            6,
            "at least one second"
        );
        assert_eq!(reuse_until_text(1_200), "1970-01-01T00:20:00Z");
    }

    #[test]
    fn the_secret_is_immutable_labelled_and_holds_exactly_its_values() {
        let keyring = keyring("k1");
        let object = agent_secret("ns", "a", "alice", "A", &keyring, "value-of-a");
        let cached = CachedSecret::from_object(&object).expect("cached");
        let Some(Ok(envelope)) = &cached.sealed else {
            panic!("sealed");
        };
        let plain = keyring
            .open(envelope, cached.seal_context())
            .expect("opens");
        let secret = PodSecret {
            name: "asec-pod-x".into(),
            namespace: "ns".into(),
            owner: "alice".into(),
            reuse_until: 1_800_000_300,
            values: BTreeMap::from([("A".to_owned(), plain)]),
        };
        assert!(!format!("{secret:?}").contains("value-of-a"));
        let secret = secret.to_secret();
        assert_eq!(secret.immutable, Some(true));
        let labels = secret.metadata.labels.unwrap();
        assert_eq!(labels[POD_SCOPED_LABEL], "true");
        assert_eq!(labels[OWNER_LABEL], "alice");
        assert_eq!(
            secret.metadata.annotations.unwrap()[REUSE_UNTIL_ANNOTATION],
            "2027-01-15T08:05:00Z"
        );
        assert_eq!(
            secret.data,
            Some(BTreeMap::from([(
                "A".to_owned(),
                ByteString(b"value-of-a".to_vec())
            )]))
        );
    }
}
