//! The webhook serving the standard secrets under a policy of the test's choosing.

use agent_secrets::webhook::Policy;

use super::server::{Setup, TestServer};

/// The webhook serving the standard secrets under `policy`.
pub async fn serve(policy: Policy) -> TestServer {
    TestServer::start(Setup {
        policy,
        ..Setup::default()
    })
    .await
}
