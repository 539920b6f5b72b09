//! The admin port: liveness, readiness (a synced cache and a keyring), Prometheus metrics of
//! the reviews, and its own plain-HTTP server's shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common {
    pub mod admin;
    pub mod client;
    pub mod fixtures;
    pub mod keyring;
    pub mod server;
}

use agent_secrets::api::AgentSecret;
use agent_secrets::cache::SecretIndex;
use agent_secrets::crypto::{Keyring, KeyringHandle};
use agent_secrets::telemetry::Metrics;
use agent_secrets::webhook::server::{self, AppState};
use common::admin::admin_get;
use common::fixtures::{fixture, fixture_policy};
use common::keyring::keyring;
use common::server::{RecordingWriter, Setup, TestServer};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

fn admin_state(keyring: KeyringHandle, index: Arc<SecretIndex>) -> AppState {
    AppState {
        keyring,
        index,
        policy: Arc::new(fixture_policy()),
        writer: Arc::new(RecordingWriter::default()),
        metrics: Arc::new(Metrics::default()),
        pod_secrets: Arc::default(),
    }
}

#[tokio::test]
async fn readiness_needs_a_synced_cache_and_a_keyring() {
    let keyring = KeyringHandle::default();
    let index = Arc::new(SecretIndex::default());
    let state = admin_state(keyring.clone(), index.clone());

    assert_eq!(admin_get(&state, "/healthz").await.0, 200);
    assert_eq!(
        admin_get(&state, "/readyz").await,
        (
            503,
            "text/plain; charset=utf-8".to_owned(),
            "no keyring loaded".to_owned()
        )
    );
    keyring.replace(Keyring::generate("k1").unwrap());
    let (status, _, reason) = admin_get(&state, "/readyz").await;
    assert_eq!(
        (status, reason.as_str()),
        (503, "AgentSecret cache has not synced")
    );
    // Listed, not yet done: still not ready.
    index.apply(kube::runtime::watcher::Event::Init);
    assert_eq!(admin_get(&state, "/readyz").await.0, 503);
    index.apply(kube::runtime::watcher::Event::<AgentSecret>::InitDone);
    assert_eq!(
        admin_get(&state, "/readyz").await,
        (200, "text/plain; charset=utf-8".to_owned(), "ok".to_owned())
    );
    // Losing the keyring makes it unready again; liveness is unaffected.
    keyring.clear();
    let (status, _, reason) = admin_get(&state, "/readyz").await;
    assert_eq!((status, reason.as_str()), (503, "no keyring loaded"));
    assert_eq!(
        admin_get(&state, "/healthz").await,
        (200, "text/plain; charset=utf-8".to_owned(), "ok".to_owned())
    );
}

#[tokio::test]
async fn agentsecrets_per_key_are_exported_only_while_this_replica_leads() {
    use kube::runtime::watcher::Event;
    let mut ring = Keyring::generate("k1").unwrap();
    let index = Arc::new(SecretIndex::default());
    for name in ["a", "b"] {
        index.apply(Event::Apply(agent_secrets::testing::agent_secret(
            "ns", name, "alice", "TOKEN", &ring, "v",
        )));
    }
    ring.add_primary("k2").unwrap();
    index.apply(Event::Apply(agent_secrets::testing::agent_secret(
        "ns", "c", "alice", "OTHER", &ring, "v",
    )));
    let state = admin_state(KeyringHandle::new(ring), index);
    // Sorted: a family's series come in no particular order.
    let per_key = |text: &str| -> Vec<String> {
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("agentsecrets_agentsecrets{"))
            .map(str::to_owned)
            .collect();
        lines.sort();
        lines
    };

    let (_, _, follower) = admin_get(&state, "/metrics").await;
    assert!(follower.lines().any(|l| l == "agentsecrets_leader 0"));
    assert_eq!(per_key(&follower), Vec::<String>::new());

    state.metrics.leader.set(1);
    let (_, _, leader) = admin_get(&state, "/metrics").await;
    assert_eq!(
        per_key(&leader),
        [
            r#"agentsecrets_agentsecrets{key_id="k1"} 2"#,
            r#"agentsecrets_agentsecrets{key_id="k2"} 1"#
        ]
    );

    state.metrics.leader.set(0);
    let (_, _, stepped_down) = admin_get(&state, "/metrics").await;
    assert_eq!(per_key(&stepped_down), Vec::<String>::new());
}

#[tokio::test]
async fn metrics_count_reviews_by_kind_operation_and_decision() {
    let server = TestServer::start(Setup::default()).await;
    for file in [
        "pod_create_named.json",
        "pod_create_server_dry_run.json",
        "pod_update_label.json",
        "agentsecret_create_kubectl_create.json",
        "agentsecret_delete.json",
    ] {
        let (path, review) = fixture(file);
        server.review(&path, &review).await;
    }
    let (path, mut review) = fixture("pod_create_named.json");
    review["request"]["object"]["metadata"]["annotations"] =
        json!({"agentsecrets.io/secrets": "NOPE"});
    server.review(&path, &review).await;
    server.post("/mutate/pods", "garbage").await;

    let (status, content_type, text) = admin_get(&server.state, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    for line in [
        "# TYPE agentsecrets_admission_requests counter",
        r#"agentsecrets_admission_requests_total{kind="pod",operation="CREATE",decision="patched"} 2"#,
        r#"agentsecrets_admission_requests_total{kind="pod",operation="CREATE",decision="denied"} 1"#,
        r#"agentsecrets_admission_requests_total{kind="pod",operation="UPDATE",decision="allowed"} 1"#,
        r#"agentsecrets_admission_requests_total{kind="pod",operation="UNKNOWN",decision="invalid"} 1"#,
        r#"agentsecrets_admission_requests_total{kind="agentsecret",operation="CREATE",decision="patched"} 1"#,
        r#"agentsecrets_admission_requests_total{kind="agentsecret",operation="DELETE",decision="allowed"} 1"#,
        "# TYPE agentsecrets_admission_duration_seconds histogram",
        r#"agentsecrets_admission_duration_seconds_count{kind="pod"} 5"#,
        r#"agentsecrets_admission_duration_seconds_count{kind="agentsecret"} 2"#,
        r#"agentsecrets_admission_duration_seconds_bucket{le="+Inf",kind="pod"} 5"#,
        // One real Secret created (the dry run creates none), three names injected.
        r#"agentsecrets_pod_secrets_created_total{result="created"} 1"#,
        "agentsecrets_injected_secrets_total 3",
        "agentsecrets_keyring_keys 1",
        "agentsecrets_leader 0",
        "# TYPE agentsecrets_build_info gauge",
        "# TYPE agentsecrets_tls_certificate_not_after_seconds gauge",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert_eq!(server.created().len(), 1);
    assert_eq!(keyring(&server).key_ids().count(), 1);
}

#[tokio::test]
async fn the_admin_server_serves_probes_over_http_and_stops_on_shutdown() {
    let index = Arc::new(SecretIndex::default());
    index.replace_all([]);
    let state = admin_state(KeyringHandle::new(Keyring::generate("k1").unwrap()), index);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(server::serve_admin(
        listener,
        server::admin_router(state),
        stop.clone().cancelled_owned(),
    ));
    for (path, expected) in [
        ("/healthz", 200),
        ("/readyz", 200),
        ("/metrics", 200),
        ("/nope", 404),
    ] {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let request = hyper::Request::get(path)
            .header("host", "localhost")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status().as_u16(), expected, "{path}");
    }
    stop.cancel();
    let result = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_ok());
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
