//! The keyring a test server's cache is sealed under.

use agent_secrets::crypto::Keyring;
use std::sync::Arc;

use super::server::TestServer;

/// The keyring `server` holds now.
pub fn keyring(server: &TestServer) -> Arc<Keyring> {
    server.state.keyring.current().unwrap()
}
