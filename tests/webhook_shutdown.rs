//! Graceful shutdown of the real HTTPS webhook: the review in flight is finished, idle
//! connections do not hold the server up, and new connections are refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common {
    pub mod answers;
    pub mod client;
    pub mod fixtures;
    pub mod injections;
    pub mod keyring;
    pub mod server;
    pub mod serving;
}

use agent_secrets::webhook::server::SHUTDOWN_GRACE;
use common::client::{HttpsClient, trusting};
use common::fixtures::{fixture, to_body};
use common::injections::secret_values;
use common::server::{Setup, TestServer};
use common::serving::{alice_values, assert_still_serving};
use std::time::{Duration, Instant};

#[tokio::test]
async fn shutdown_finishes_the_review_in_flight_then_refuses_connections() {
    let mut server = TestServer::start(Setup::default()).await;
    *server.writer.delay.lock().unwrap() = Some(Duration::from_millis(300));
    let (path, review) = fixture("pod_create_named.json");
    let mut client = server.client().await;
    let in_flight = tokio::spawn(async move { client.post(&path, to_body(&review)).await });

    // Shut down while the review waits on the Secret creation.
    tokio::time::timeout(Duration::from_secs(5), server.writer.entered.notified())
        .await
        .expect("the review reaches the Secret creation");
    let cancelled_at = Instant::now();
    server.stop.cancel();

    let (status, answer) = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("the in-flight review is answered")
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert_eq!(server.created().len(), 1);
    assert_eq!(secret_values(&server.created()[0]), alice_values());

    let result = tokio::time::timeout(Duration::from_secs(5), &mut server.task)
        .await
        .expect("the server stops once the review is answered")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert!(
        cancelled_at.elapsed() < SHUTDOWN_GRACE,
        "stopped without waiting out the grace period"
    );
    let refused = HttpsClient::connect(server.addr, trusting(&server.ca_der)).await;
    assert!(
        refused.is_err(),
        "new connections are refused after shutdown"
    );
}

#[tokio::test]
async fn idle_keep_alive_connections_do_not_hold_up_shutdown() {
    let mut server = TestServer::start(Setup::default()).await;
    assert_still_serving(&server, "start").await;
    let (path, review) = fixture("pod_update_label.json");
    let mut idle = server.client().await;
    let (status, _) = idle.post(&path, to_body(&review)).await;
    assert_eq!(status, 200);
    server.stop.cancel();
    let result = tokio::time::timeout(Duration::from_secs(5), &mut server.task)
        .await
        .expect("an idle connection is closed at shutdown")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert!(idle.try_post(&path, to_body(&review)).await.is_err());
}
