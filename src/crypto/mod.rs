//! Envelope encryption: AES-256-GCM data keys wrapped (RFC 3394) under rotating
//! key-encryption keys from a keyring file.

mod envelope;
mod keyring;
mod reloading;

pub use envelope::{
    CryptoError, DEK_LEN, Envelope, NONCE_LEN, Plaintext, SealContext, TAG_LEN, WRAPPED_DEK_LEN,
    open, rewrap, seal,
};
pub use keyring::{KEK_LEN, Keyring, KeyringError, default_key_id};
pub use reloading::KeyringHandle;
