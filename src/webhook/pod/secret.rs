//! The pod-scoped Secret: the values one sandbox pod receives, as of its admission.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;
use ring::digest;
use std::collections::BTreeMap;
use std::fmt;

use crate::api::{
    MANAGED_BY_LABEL, MANAGED_BY_VALUE, OWNER_LABEL, POD_ANNOTATION, POD_SCOPED_LABEL,
    POD_SECRET_NAME_PREFIX, REQUEST_UID_ANNOTATION,
};
use crate::crypto::Plaintext;

/// The name of the pod-scoped Secret for the admission request `uid`:
/// [`POD_SECRET_NAME_PREFIX`] and 26 base32 characters (130 bits) of a hash of the uid.
///
/// A reinvoked admission of the same pod has the same uid, so it names (and reuses) the Secret
/// the first invocation made, and a pod never has two. The name is a valid label value too.
pub fn pod_secret_name(uid: &str) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut input = b"agentsecrets.io/pod-secret\0".to_vec();
    input.extend_from_slice(uid.as_bytes());
    let hash = digest::digest(&digest::SHA256, &input);
    let mut name = String::with_capacity(POD_SECRET_NAME_PREFIX.len() + 26);
    name.push_str(POD_SECRET_NAME_PREFIX);
    // 5 bits per character, read from the hash's bits in order.
    let bits = hash.as_ref();
    for i in 0..26 {
        let bit = i * 5;
        let (byte, offset) = (bit / 8, bit % 8);
        let pair = u16::from(bits[byte]) << 8 | u16::from(bits[byte + 1]);
        let index = (pair >> (11 - offset)) & 0x1f;
        name.push(char::from(ALPHABET[usize::from(index)]));
    }
    name
}

/// The pod-scoped Secret holding the injected values as of admission.
pub struct PodSecret {
    pub name: String,
    pub namespace: String,
    pub owner: String,
    /// The pod's name, or its `generateName` prefix when the server names it.
    pub pod: String,
    pub request_uid: String,
    pub(super) values: BTreeMap<String, Plaintext>,
}

impl fmt::Debug for PodSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodSecret")
            .field("name", &self.name)
            .field("namespace", &self.namespace)
            .field("owner", &self.owner)
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
                    [
                        (POD_ANNOTATION.to_owned(), self.pod.clone()),
                        (REQUEST_UID_ANNOTATION.to_owned(), self.request_uid.clone()),
                    ]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_is_derived_from_the_request_uid_and_carries_the_reserved_prefix() {
        let a = pod_secret_name("3eb22e8d-d92d-43a8-8188-5fbacd5c41bb");
        assert_eq!(a, pod_secret_name("3eb22e8d-d92d-43a8-8188-5fbacd5c41bb"));
        assert_ne!(a, pod_secret_name("3eb22e8d-d92d-43a8-8188-5fbacd5c41bc"));
        assert!(a.starts_with(POD_SECRET_NAME_PREFIX), "{a}");
        assert_eq!(a.len(), POD_SECRET_NAME_PREFIX.len() + 26);
        assert!(a.len() <= 63, "a valid label value");
        let suffix = &a[POD_SECRET_NAME_PREFIX.len()..];
        assert!(
            suffix
                .bytes()
                .all(|c| c.is_ascii_lowercase() || (b'2'..=b'7').contains(&c))
        );
        // Whatever a forged review puts in its uid, the name stays a valid DNS label.
        let odd = pod_secret_name("../../\"<script>\n");
        assert!(
            odd.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        );
    }

    #[test]
    fn the_secret_is_immutable_labelled_and_holds_exactly_its_values() {
        let secret = PodSecret {
            name: "asec-pod-x".into(),
            namespace: "ns".into(),
            owner: "alice".into(),
            pod: "sandbox-".into(),
            request_uid: "u1".into(),
            values: BTreeMap::new(),
        }
        .to_secret();
        assert_eq!(secret.immutable, Some(true));
        let labels = secret.metadata.labels.unwrap();
        assert_eq!(labels[POD_SCOPED_LABEL], "true");
        assert_eq!(labels[OWNER_LABEL], "alice");
        assert_eq!(
            secret.metadata.annotations.unwrap()[REQUEST_UID_ANNOTATION],
            "u1"
        );
        assert_eq!(secret.data, Some(BTreeMap::new()));
    }
}
