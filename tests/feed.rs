//! The operator's value feed end to end over real HTTPS on loopback: the feed server (TLS from
//! PEM files as the operator loads them) in front of a mocked API server answering TokenReview
//! and pod reads with objects shaped as kube-apiserver returns them, and the proxy's
//! `FeedSource` connected to it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/feed.rs"]
mod feed_kit;
#[path = "common/logs.rs"]
mod logs;
#[path = "common/token_review.rs"]
mod token_review;

use agent_secrets::api::{AgentSecret, OWNER_LABEL};
use agent_secrets::cache::{CachedSecret, SecretIndex};
use agent_secrets::crypto::{Keyring, KeyringHandle};
use agent_secrets::feed::{self, FeedSettings, FeedState};
use agent_secrets::secretless::feed_client::parse_ca;
use agent_secrets::secretless::{FeedConfig, FeedSource, Snapshot, ValueSource};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use kube::runtime::watcher;
use logs::{capture_logs, captured_logs};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const NS: &str = "sandboxes";
/// The budget the product promises for a change to reach running sandboxes.
const BUDGET: Duration = Duration::from_secs(10);

const PH_A: &str = "asec_ph_Aa0123456789abcdefghijklmnopqr";
const PH_B: &str = "asec_ph_Bb0123456789abcdefghijklmnopqr";
const PH_BOB: &str = "asec_ph_Cc0123456789abcdefghijklmnopqr";
const VALUE_A: &str = "canary-feed-value-a-1f2e9d";
const VALUE_A_EDITED: &str = "canary-feed-value-a-edited-77c1";
const VALUE_B: &str = "canary-feed-value-b-4410aa";
const VALUE_BOB: &str = "canary-feed-value-bob-90ab3";

const TOKEN_AGENT: &str = "canary-token-agent-1.x.sig";
const TOKEN_BOB: &str = "canary-token-agent-bob.x.sig";
const TOKEN_PLAIN: &str = "canary-token-plain-pod.x.sig";
const TOKEN_UNBOUND: &str = "canary-token-unbound.x.sig";
const TOKEN_OTHER_AUDIENCE: &str = "canary-token-other-audience.x.sig";
const TOKEN_GARBAGE: &str = "canary-token-garbage";

const UID_AGENT: &str = "6f1c9e2a-7d4b-4c1e-9a0f-2b3c4d5e6f70";
const UID_BOB: &str = "6f1c9e2a-7d4b-4c1e-9a0f-2b3c4d5e6f71";
const UID_PLAIN: &str = "6f1c9e2a-7d4b-4c1e-9a0f-2b3c4d5e6f72";

fn canaries() -> [&'static str; 10] {
    [
        VALUE_A,
        VALUE_A_EDITED,
        VALUE_B,
        VALUE_BOB,
        TOKEN_AGENT,
        TOKEN_BOB,
        TOKEN_PLAIN,
        TOKEN_UNBOUND,
        TOKEN_OTHER_AUDIENCE,
        TOKEN_GARBAGE,
    ]
}

// ---------------------------------------------------------------------------------------
// The mocked API server

/// The TokenReview answer for a projected token bound to a pod.
fn bound(pod: &str, uid: &str) -> Value {
    token_review::bound_to_pod(NS, pod, uid)
}

fn review_status(token: &str, audiences: &Value) -> Value {
    if audiences != &json!([feed::FEED_AUDIENCE]) {
        return json!({"user": {}, "error": "the feed asked for another audience"});
    }
    match token {
        TOKEN_AGENT => bound("agent-1", UID_AGENT),
        TOKEN_BOB => bound("agent-bob", UID_BOB),
        TOKEN_PLAIN => bound("plain-1", UID_PLAIN),
        // A TokenRequest without a bound object: a service account's, valid, no pod.
        TOKEN_UNBOUND => json!({
            "authenticated": true,
            "audiences": [feed::FEED_AUDIENCE],
            "user": {
                "username": format!("system:serviceaccount:{NS}:default"),
                "uid": "b7a1c0de-0000-4000-8000-00000000aa01",
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{NS}"), "system:authenticated"],
                "extra": {"authentication.kubernetes.io/credential-id": ["JTI=1c7d4a8f-2e3b-4c6d-9e0f-1a2b3c4d5e6f"]}
            }
        }),
        TOKEN_OTHER_AUDIENCE => json!({
            "user": {},
            "error": "[invalid bearer token, token audiences [\"https://kubernetes.default.svc.cluster.local\"] is invalid for the target audiences [\"agentsecrets.io/feed\"]]"
        }),
        _ => {
            json!({"user": {}, "error": "[invalid bearer token, square/go-jose: compact JWS format must have three parts]"})
        }
    }
}

/// A sandbox pod as the webhook admits it in secretless mode (trimmed of status).
fn sandbox_pod(name: &str, uid: &str, owner: &str, placeholders: Value) -> Value {
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name, "namespace": NS, "uid": uid, "resourceVersion": "48213",
            "creationTimestamp": "2026-11-29T18:00:00Z",
            "labels": {OWNER_LABEL: owner},
            "annotations": {
                "agentsecrets.io/mode": "secretless",
                "agentsecrets.io/injected": "A_TOKEN,B_KEY",
                "agentsecrets.io/secretless": "A_TOKEN,B_KEY"
            }
        },
        "spec": {
            "serviceAccountName": "default",
            "initContainers": [{
                "name": feed::PROXY_CONTAINER_NAME,
                "image": "ghcr.io/agent-secrets/agent-secrets:0.1.0",
                "restartPolicy": "Always",
                "args": ["proxy", "--listen=127.0.0.1:15080"],
                "env": [
                    {"name": feed::PROXY_PLACEHOLDERS_ENV, "value": placeholders.to_string()},
                    {"name": feed::PROXY_FEED_CA_ENV, "value": "-----BEGIN CERTIFICATE-----\n...\n"},
                    {"name": feed::PROXY_EGRESS_ENV, "value": "open"},
                    {"name": feed::PROXY_OWNER_ENV, "value": owner}
                ]
            }],
            "containers": [{
                "name": "agent", "image": "python:3.13-slim",
                "env": [{"name": "A_TOKEN", "value": PH_A}, {"name": "B_KEY", "value": PH_B}]
            }]
        }
    })
}

fn pod(name: &str) -> Option<Value> {
    match name {
        "agent-1" => Some(sandbox_pod(
            "agent-1",
            UID_AGENT,
            "alice",
            json!({"A_TOKEN": PH_A, "B_KEY": PH_B}),
        )),
        "agent-bob" => Some(sandbox_pod(
            "agent-bob",
            UID_BOB,
            "bob",
            json!({"A_TOKEN": PH_BOB}),
        )),
        // Labelled (so env-mode injected) but without the proxy sidecar.
        "plain-1" => {
            let mut pod = sandbox_pod("plain-1", UID_PLAIN, "alice", json!({}));
            pod["spec"]["initContainers"] = json!([]);
            Some(pod)
        }
        _ => None,
    }
}

#[derive(Default)]
struct ApiServer {
    reviews: AtomicUsize,
}

impl ApiServer {
    async fn answer(&self, request: Request<kube::client::Body>) -> Response<Full<Bytes>> {
        let (method, path) = (request.method().clone(), request.uri().path().to_owned());
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let (status, reply) =
            if method == Method::POST && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
                self.reviews.fetch_add(1, Ordering::SeqCst);
                let review: Value = serde_json::from_slice(&body).unwrap();
                let token = review["spec"]["token"].as_str().unwrap_or_default();
                let status = review_status(token, &review["spec"]["audiences"]);
                (
                    200,
                    json!({
                        "kind": "TokenReview",
                        "apiVersion": "authentication.k8s.io/v1",
                        "metadata": {"creationTimestamp": null},
                        "spec": review["spec"],
                        "status": status
                    }),
                )
            } else if let Some(name) = path
                .strip_prefix(&format!("/api/v1/namespaces/{NS}/pods/"))
                .filter(|_| method == Method::GET)
            {
                match pod(name) {
                    Some(pod) => (200, pod),
                    None => (404, not_found(name)),
                }
            } else {
                (404, not_found(&path))
            };
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(&reply).unwrap())))
            .unwrap()
    }
}

fn not_found(name: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("pods \"{name}\" not found"), "reason": "NotFound",
        "details": {"name": name, "kind": "pods"}, "code": 404
    })
}

fn mock_client(api: Arc<ApiServer>) -> kube::Client {
    let service = tower::service_fn(move |request| {
        let api = api.clone();
        async move { Ok::<_, Infallible>(api.answer(request).await) }
    });
    kube::Client::new(service, "default")
}

// ---------------------------------------------------------------------------------------
// The feed server and its client

struct Feed {
    addr: SocketAddr,
    ca_pem: String,
    keyring: Keyring,
    index: Arc<SecretIndex>,
    api: Arc<ApiServer>,
    metrics: Arc<agent_secrets::telemetry::Metrics>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    dir: tempfile::TempDir,
}

fn secret(keyring: &Keyring, name: &str, owner: &str, env: &str, value: &str) -> AgentSecret {
    agent_secrets::testing::secretless_agent_secret(
        NS,
        name,
        owner,
        env,
        keyring,
        value,
        &["api.example.test"],
    )
}

impl Feed {
    async fn start(settings: FeedSettings) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let pki = feed_kit::feed_tls(dir.path());
        let tls = agent_secrets::webhook::tls::load(&pki.cert, &pki.key, None).unwrap();

        let keyring = agent_secrets::testing::keyring("k1");
        let index = Arc::new(SecretIndex::default());
        index.replace_all(
            [
                secret(&keyring, "a", "alice", "A_TOKEN", VALUE_A),
                secret(&keyring, "b", "alice", "B_KEY", VALUE_B),
                secret(&keyring, "bob-a", "bob", "A_TOKEN", VALUE_BOB),
            ]
            .iter()
            .filter_map(CachedSecret::from_object),
        );
        let api = Arc::new(ApiServer::default());
        let stop = CancellationToken::new();
        let metrics = Arc::new(agent_secrets::telemetry::Metrics::default());
        let state = FeedState::new(
            mock_client(api.clone()),
            index.clone(),
            KeyringHandle::new(Keyring::from_yaml(&keyring.to_yaml().unwrap()).unwrap()),
            settings,
            metrics.clone(),
            stop.clone(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(feed::serve_feed(
            listener,
            tls,
            state,
            stop.clone().cancelled_owned(),
        ));
        Self {
            addr,
            ca_pem: pki.ca_pem,
            keyring,
            index,
            api,
            metrics,
            stop,
            server,
            dir,
        }
    }

    fn url(&self) -> String {
        format!("https://{}{}", self.addr, feed::FEED_PATH)
    }

    fn source(&self, token: &str, stale_after: Duration) -> (Arc<FeedSource>, CancellationToken) {
        self.source_with_file(token, stale_after).0
    }

    fn source_with_file(
        &self,
        token: &str,
        stale_after: Duration,
    ) -> ((Arc<FeedSource>, CancellationToken), std::path::PathBuf) {
        let token_file = self.dir.path().join(format!("token-{}", rand_suffix()));
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        let mut config = FeedConfig::new(
            agent_secrets::secretless::feed_client::parse_url(&self.url()).unwrap(),
            token_file,
            parse_ca(self.ca_pem.as_bytes()).unwrap(),
        );
        config.stale_after = stale_after;
        config.max_backoff = Duration::from_millis(500);
        let stop = CancellationToken::new();
        let path = config.token_file.clone();
        (
            (FeedSource::spawn(config, stop.clone()).unwrap(), stop),
            path,
        )
    }

    /// One request to the feed: status and its first line (or what came before an end).
    async fn get(&self, token: Option<&str>) -> (StatusCode, String) {
        let response = self.open(token).await;
        let status = response.status();
        (status, first_line(response).await)
    }

    /// One request to the feed, its stream left open.
    async fn open(&self, token: Option<&str>) -> Response<hyper::body::Incoming> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(parse_ca(self.ca_pem.as_bytes()).unwrap());
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build::<_, Empty<Bytes>>(connector);
        let mut request = Request::get(self.url());
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        client
            .request(request.body(Empty::new()).unwrap())
            .await
            .unwrap()
    }
}

async fn first_line(response: Response<hyper::body::Incoming>) -> String {
    let mut body = response.into_body();
    let mut text = Vec::new();
    // A stream never ends by itself: its first line is enough.
    while !text.contains(&b'\n') {
        match tokio::time::timeout(Duration::from_secs(5), body.frame()).await {
            Ok(Some(Ok(frame))) => text.extend_from_slice(&frame.into_data().unwrap_or_default()),
            _ => break,
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

fn rand_suffix() -> u64 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::SeqCst) as u64
}

/// Waits (bounded) until the source's snapshot satisfies `ok`.
async fn within(
    rx: &mut watch::Receiver<Arc<Snapshot>>,
    limit: Duration,
    ok: impl Fn(&Snapshot) -> bool,
) -> bool {
    tokio::time::timeout(limit, rx.wait_for(|s| ok(s)))
        .await
        .is_ok_and(|r| r.is_ok())
}

fn value_of(snapshot: &Snapshot, placeholder: &str) -> Option<String> {
    snapshot
        .entries()
        .iter()
        .find(|e| e.placeholder == placeholder)
        .map(|e| e.value.expose().to_owned())
}

fn assert_logs_hold_no_secret() {
    let logs = captured_logs();
    for canary in canaries() {
        assert!(!logs.contains(canary), "the logs hold {canary}");
    }
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_sandbox_gets_its_owners_values_and_sees_an_edit_and_a_deletion_within_the_budget() {
    capture_logs();
    let feed = Feed::start(FeedSettings::default()).await;
    let (source, stop) = feed.source(TOKEN_AGENT, feed::STALE_AFTER);
    let mut rx = source.watch();
    assert!(
        rx.borrow().unusable_reason().is_some(),
        "unusable before the first snapshot"
    );
    assert!(
        within(&mut rx, BUDGET, |s| s.unusable_reason().is_none()).await,
        "no first snapshot"
    );
    {
        let snapshot = rx.borrow_and_update();
        assert_eq!(value_of(&snapshot, PH_A).as_deref(), Some(VALUE_A));
        assert_eq!(value_of(&snapshot, PH_B).as_deref(), Some(VALUE_B));
        assert_eq!(snapshot.entries().len(), 2, "only the pod's placeholders");
        assert!(value_of(&snapshot, PH_BOB).is_none());
        assert!(snapshot.host_mentioned("api.example.test"));
    }

    let mut edited = secret(&feed.keyring, "a", "alice", "A_TOKEN", VALUE_A_EDITED);
    edited.metadata.generation = Some(2);
    feed.index.apply(watcher::Event::Apply(edited));
    assert!(
        within(&mut rx, BUDGET, |s| value_of(s, PH_A).as_deref()
            == Some(VALUE_A_EDITED))
        .await,
        "the edit did not arrive within {BUDGET:?}"
    );

    let deleted = secret(&feed.keyring, "b", "alice", "B_KEY", VALUE_B);
    feed.index.apply(watcher::Event::Delete(deleted));
    assert!(
        within(&mut rx, BUDGET, |s| s.unusable_reason().is_none()
            && value_of(s, PH_B).is_none())
        .await,
        "the deletion did not arrive within {BUDGET:?}"
    );
    assert_eq!(
        value_of(&rx.borrow(), PH_A).as_deref(),
        Some(VALUE_A_EDITED),
        "the other secret stays"
    );
    stop.cancel();
    feed.stop.cancel();
    assert_logs_hold_no_secret();
}

#[tokio::test]
async fn each_pod_gets_only_its_own_owners_secrets() {
    capture_logs();
    let feed = Feed::start(FeedSettings::default()).await;
    let (status, line) = feed.get(Some(TOKEN_BOB)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(line.contains(VALUE_BOB), "bob's pod gets bob's value");
    assert!(
        !line.contains(VALUE_A) && !line.contains(VALUE_B),
        "and no one else's"
    );
    let (status, line) = feed.get(Some(TOKEN_AGENT)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        line.contains(VALUE_A) && !line.contains(VALUE_BOB),
        "{status} {line}"
    );
    feed.stop.cancel();
    assert_logs_hold_no_secret();
}

#[tokio::test]
async fn tokens_of_another_audience_unbound_or_invalid_are_refused_with_401() {
    capture_logs();
    let feed = Feed::start(FeedSettings::default()).await;
    for token in [
        Some(TOKEN_OTHER_AUDIENCE),
        Some(TOKEN_UNBOUND),
        Some(TOKEN_GARBAGE),
        None,
    ] {
        let (status, body) = feed.get(token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}: {body}");
        assert!(body.starts_with("failed to authenticate"), "{body}");
        for canary in canaries() {
            assert!(!body.contains(canary), "{body}");
        }
    }
    assert_eq!(
        feed.api.reviews.load(Ordering::SeqCst),
        3,
        "no review without a token"
    );
    let metrics = feed.metrics.encode();
    assert!(
        metrics
            .lines()
            .any(|l| l == "agentsecrets_feed_requests_total{result=\"unauthenticated\"} 4"),
        "{metrics}"
    );
    assert!(!metrics.contains("canary"), "no token in the metrics");
    feed.stop.cancel();
    assert_logs_hold_no_secret();
}

#[tokio::test]
async fn a_pod_of_a_namespace_the_webhook_does_not_inject_is_refused_with_403() {
    capture_logs();
    let namespaces = [
        // Excluded (--excluded-namespaces), or outside the sandbox namespaces.
        feed::Namespaces {
            excluded: [NS.to_owned()].into(),
            only: Default::default(),
        },
        feed::Namespaces {
            excluded: Default::default(),
            only: ["other".to_owned()].into(),
        },
    ];
    for namespaces in namespaces {
        let feed = Feed::start(FeedSettings {
            namespaces: namespaces.clone(),
            ..FeedSettings::default()
        })
        .await;
        let (status, body) = feed.get(Some(TOKEN_AGENT)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{namespaces:?}");
        assert!(
            body.trim_end()
                .ends_with("agent-secrets does not inject pods of this namespace"),
            "{body}"
        );
        assert!(!body.contains(VALUE_A), "{body}");
        feed.stop.cancel();
    }
    // Where it does inject, the same pod is served.
    let feed = Feed::start(FeedSettings {
        namespaces: feed::Namespaces {
            excluded: ["kube-system".to_owned()].into(),
            only: [NS.to_owned()].into(),
        },
        ..FeedSettings::default()
    })
    .await;
    let (status, line) = feed.get(Some(TOKEN_AGENT)).await;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert!(line.contains(VALUE_A));
    feed.stop.cancel();
    assert_logs_hold_no_secret();
}

#[tokio::test]
async fn a_pod_without_the_proxy_sidecar_is_refused_with_403_and_its_source_stays_unusable() {
    capture_logs();
    let feed = Feed::start(FeedSettings::default()).await;
    let (status, body) = feed.get(Some(TOKEN_PLAIN)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        body.trim(),
        "failed to authorise the feed for pod sandboxes/plain-1: the pod has no agentsecrets-proxy sidecar"
    );
    let (source, stop) = feed.source(TOKEN_PLAIN, feed::STALE_AFTER);
    let mut rx = source.watch();
    assert!(
        !within(&mut rx, Duration::from_millis(1500), |s| s
            .unusable_reason()
            .is_none())
        .await,
        "a refused pod's proxy must never become usable"
    );
    assert!(
        feed.api.reviews.load(Ordering::SeqCst) >= 2,
        "it keeps retrying"
    );
    stop.cancel();
    feed.stop.cancel();
    assert_logs_hold_no_secret();
}

#[tokio::test]
async fn the_source_reconnects_with_the_token_file_as_it_is_now_and_fails_closed_when_refused_or_stopped()
 {
    capture_logs();
    let settings = FeedSettings {
        heartbeat: Duration::from_millis(300),
        poll: Duration::from_millis(200),
        // Streams end quickly: the client must reconnect (re-reading its token) seamlessly.
        max_stream: Duration::from_millis(1500),
        ..FeedSettings::default()
    };
    let stale_after = Duration::from_secs(2);
    let feed = Feed::start(settings).await;
    let ((source, stop), token_file) = feed.source_with_file(TOKEN_AGENT, stale_after);
    let mut rx = source.watch();
    assert!(within(&mut rx, BUDGET, |s| s.unusable_reason().is_none()).await);

    // Across several stream ends the snapshot stays usable: each reconnection delivers a
    // snapshot before the previous one goes stale.
    let reviews = feed.api.reviews.load(Ordering::SeqCst);
    let mut usable_throughout = true;
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < until {
        usable_throughout &= rx.borrow().unusable_reason().is_none();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        usable_throughout,
        "the snapshot went unusable across a planned reconnection"
    );
    assert!(
        feed.api.reviews.load(Ordering::SeqCst) >= reviews + 2,
        "streams were renewed"
    );

    // The token is read at each connection: a token the feed refuses fails closed once the
    // current stream's time is up, the rotated good one recovers.
    std::fs::write(&token_file, TOKEN_GARBAGE).unwrap();
    assert!(
        within(&mut rx, stale_after * 4, |s| s.unusable_reason().is_some()).await,
        "still usable although the feed refuses the token"
    );
    std::fs::write(&token_file, TOKEN_AGENT).unwrap();
    assert!(
        within(&mut rx, BUDGET, |s| value_of(s, PH_A).as_deref()
            == Some(VALUE_A))
        .await,
        "did not recover with the good token"
    );

    feed.stop.cancel();
    let _ = feed.server.await;
    assert!(
        within(&mut rx, stale_after * 3, |s| s.unusable_reason().is_some()).await,
        "still usable after the feed stopped"
    );
    stop.cancel();
    assert_logs_hold_no_secret();
}

#[tokio::test]
async fn a_failing_agentsecret_watch_ends_the_feeds_vouching_within_its_grace_and_the_proxy_fails_closed()
 {
    capture_logs();
    let grace = Duration::from_millis(300);
    let feed = Feed::start(FeedSettings {
        watch_failure_grace: grace,
        ..FeedSettings::default()
    })
    .await;
    let stale_after = Duration::from_millis(800);
    let (source, stop) = feed.source(TOKEN_AGENT, stale_after);
    let mut rx = source.watch();
    assert!(
        within(&mut rx, BUDGET, |s| value_of(s, PH_A).as_deref()
            == Some(VALUE_A))
        .await,
        "no first snapshot"
    );

    // A failure shorter than the grace goes unnoticed.
    feed.index.watch_failed();
    assert_eq!(feed.get(Some(TOKEN_AGENT)).await.0, StatusCode::OK);
    // Past it: new streams are refused, the open one ends, the proxy fails closed.
    tokio::time::sleep(grace * 2).await;
    let (status, body) = feed.get(Some(TOKEN_AGENT)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        within(&mut rx, grace + stale_after * 3, |s| s
            .unusable_reason()
            .is_some())
        .await,
        "the proxy still substitutes while the operator cannot see deletions"
    );
    // The watch lists again: the feed vouches again and the proxy recovers.
    feed.index.watch_recovered();
    assert!(
        within(&mut rx, BUDGET, |s| value_of(s, PH_A).as_deref()
            == Some(VALUE_A))
        .await,
        "did not recover once the watch listed again"
    );
    stop.cancel();
    feed.stop.cancel();
    assert_logs_hold_no_secret();
}

#[tokio::test]
async fn streams_past_the_cap_are_refused_with_503_until_one_ends() {
    capture_logs();
    let feed = Feed::start(FeedSettings {
        max_streams: 1,
        ..FeedSettings::default()
    })
    .await;
    let held = feed.open(Some(TOKEN_AGENT)).await;
    assert_eq!(held.status(), StatusCode::OK);
    let (status, body) = feed.get(Some(TOKEN_BOB)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let (status, _) = feed.get(Some(TOKEN_GARBAGE)).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the cap comes first"
    );
    let metrics = feed.metrics.encode();
    for line in [
        "agentsecrets_feed_streams 1",
        "agentsecrets_feed_requests_total{result=\"opened\"} 1",
        "agentsecrets_feed_requests_total{result=\"unavailable\"} 2",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line} in\n{metrics}"
        );
    }
    drop(held);
    // The slot is freed once the server notices the client left (its next line at the latest).
    let mut admitted = false;
    for _ in 0..40 {
        let (status, _) = feed.get(Some(TOKEN_BOB)).await;
        if status == StatusCode::OK {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(admitted, "the slot was never freed");
    // The held stream ended; the admitted probe's stream may still be counted.
    let metrics = feed.metrics.encode();
    assert!(
        metrics
            .lines()
            .any(|l| l == "agentsecrets_feed_streams 0" || l == "agentsecrets_feed_streams 1"),
        "{metrics}"
    );
    feed.stop.cancel();
    assert_logs_hold_no_secret();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn readyz(port: u16) -> Option<u16> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.ok()?;
    answer.split(' ').nth(1)?.parse().ok()
}

#[tokio::test]
async fn the_proxy_binary_becomes_ready_from_the_feed_with_its_ca_given_as_text() {
    let feed = Feed::start(FeedSettings::default()).await;
    let token_file = feed.dir.path().join("binary-token");
    std::fs::write(&token_file, TOKEN_AGENT).unwrap();
    let admin = free_port();
    let log_path = feed.dir.path().join("proxy.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_agentsecrets"))
        .args(["proxy", "--listen=127.0.0.1:0", "--log-format=text"])
        .arg(format!("--admin-listen=127.0.0.1:{admin}"))
        .arg(format!(
            "--ca-bundle={}",
            feed.dir.path().join("bundle.pem").display()
        ))
        .arg(format!("--feed-url={}", feed.url()))
        .arg(format!("--feed-token-file={}", token_file.display()))
        .env("AGENTSECRETS_PROXY_FEED_CA", &feed.ca_pem)
        .env("RUST_LOG", "debug")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut ready = false;
    let until = tokio::time::Instant::now() + BUDGET;
    while tokio::time::Instant::now() < until {
        if readyz(admin).await == Some(200) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(ready, "the proxy never became ready:\n{logs}");
    assert!(
        logs.contains("secretless values received from the feed"),
        "{logs}"
    );
    for canary in canaries() {
        assert!(!logs.contains(canary), "the proxy logged {canary}:\n{logs}");
    }
    feed.stop.cancel();
}

#[test]
fn the_proxy_binary_refuses_a_feed_without_a_ca_or_over_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_agentsecrets"))
            .args(["proxy", "--listen=127.0.0.1:0"])
            .arg(format!(
                "--ca-bundle={}",
                dir.path().join("bundle.pem").display()
            ))
            .args(["--feed-token-file", "/nonexistent/token"])
            .args(extra)
            .env_remove("AGENTSECRETS_PROXY_FEED_CA")
            .output()
            .unwrap()
    };
    let out = run(&["--feed-url", "https://127.0.0.1:1/v1/feed"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("AGENTSECRETS_PROXY_FEED_CA"), "{stderr}");
    let out = run(&[
        "--feed-url",
        "http://127.0.0.1:1/v1/feed",
        "--feed-ca=-----BEGIN CERTIFICATE-----",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("must be https"), "{stderr}");
}
