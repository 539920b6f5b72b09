//! Envelope encryption: AES-256-GCM data keys wrapped (RFC 3394) under rotating
//! key-encryption keys from a keyring file.
//!
//! Knows no Kubernetes type (a test keeps it so): the API layer converts its stored form to
//! and from [`Envelope`].

mod envelope;
mod keyring;
mod reloading;
mod secret_string;

pub use envelope::{
    CryptoError, DEK_LEN, Envelope, Format, MAX_VALUE_BYTES, NONCE_LEN, Plaintext, SealContext,
    TAG_LEN, WRAPPED_DEK_LEN,
};
pub use keyring::{KEK_LEN, Keyring, KeyringError, valid_key_id};
pub use reloading::KeyringHandle;
pub use secret_string::SecretString;

#[cfg(test)]
mod tests {
    /// The crypto core must stay free of Kubernetes types, so that the dependency points one
    /// way (API → crypto) and the core can be reviewed on its own.
    #[test]
    fn crypto_imports_no_kubernetes_or_api_type() {
        // Assembled at run time so that this file does not name them itself.
        let forbidden = [
            ["crate", "::api"].concat(),
            ["kube", "::"].concat(),
            ["k8s", "_openapi"].concat(),
        ];
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/crypto");
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            for name in &forbidden {
                assert!(
                    !text.contains(name.as_str()),
                    "{} uses {name}",
                    path.display()
                );
            }
        }
    }
}
