//! Builders shared by unit tests, integration tests and benchmarks, in the style of
//! controller-rs' `Document::test()`: one place that knows how a realistic object is made.
//! Compiled for unit tests and with the `testing` feature (the integration tests and benches
//! enable it through the package's dev-dependency on itself); never in the product.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kube::api::ObjectMeta;

use crate::api::{AgentSecret, AgentSecretSpec, SealedValue};
use crate::crypto::{Keyring, SealContext};

/// A fixed seal time (2027-01-15T08:00:00Z), so sealed values and statuses are reproducible.
pub const SEALED_AT: i64 = 1_800_000_000;

/// A keyring with one freshly generated primary key `id`.
pub fn keyring(id: &str) -> Keyring {
    Keyring::generate(id).expect("a keyring is generated")
}

/// `value` sealed for `owner`'s `env_name` in `namespace`, in its stored form.
pub fn sealed(
    keyring: &Keyring,
    namespace: &str,
    owner: &str,
    env_name: &str,
    value: &str,
) -> SealedValue {
    let ctx = SealContext::new(namespace, owner, env_name);
    SealedValue::encode(
        &keyring
            .seal(value.as_bytes(), ctx, SEALED_AT)
            .expect("sealed"),
    )
}

/// A stored AgentSecret: `namespace/name` of `owner`, `env_name` holding `value` sealed under
/// `keyring`'s primary key, generation 1.
pub fn agent_secret(
    namespace: &str,
    name: &str,
    owner: &str,
    env_name: &str,
    keyring: &Keyring,
    value: &str,
) -> AgentSecret {
    AgentSecret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            generation: Some(1),
            ..ObjectMeta::default()
        },
        spec: AgentSecretSpec {
            owner: owner.into(),
            env_name: env_name.into(),
            description: None,
            value: None,
            sealed: Some(sealed(keyring, namespace, owner, env_name, value)),
        },
        status: None,
    }
}
