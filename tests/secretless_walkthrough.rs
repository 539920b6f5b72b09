//! The README's secretless walkthrough, end to end on loopback: the webhook (over HTTPS, with a
//! recorded pod review) turns a sandbox pod secretless; the operator's feed (over HTTPS, the
//! API server mocked for TokenReview and the pod read) serves that pod's values; the real
//! `agentsecrets proxy` binary runs with exactly the sidecar's arguments and environment from
//! the admitted pod; and curl runs with exactly the sandbox container's environment. In the
//! sandbox `$X_BEARER_TOKEN` is a placeholder; the call to the allowed host carries the value;
//! the same header sent to another host is refused and never leaves the proxy; and once the
//! AgentSecret is deleted the running proxy stops substituting it within 10 seconds.
//! Needs curl (`bash hack/install-proxy-test-clients.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common {
    pub mod answers;
    pub mod client;
    pub mod feed;
    pub mod fixtures;
    pub mod keyring;
    pub mod server;
    pub mod token_review;
}
mod secretless_kit;

use agent_secrets::api::{AgentSecret, MODE_ANNOTATION, PROXY_CONTAINER_NAME};
use agent_secrets::cache::{CachedSecret, SecretIndex};
use agent_secrets::crypto::{Keyring, KeyringHandle};
use agent_secrets::feed::{self, FeedSettings, FeedState};
use agent_secrets::testing::secretless_agent_secret;
use agent_secrets::webhook::pod::secretless::{CA_BUNDLE, PROXY_URL};
use agent_secrets::webhook::pod::{FeedCa, SecretlessPolicy};
use bytes::Bytes;
use common::answers::patched;
use common::fixtures::{ALICE_NOTION, ALICE_X, NAMESPACE, fixture, fixture_policy};
use common::server::{Setup, TestServer};
use http::{Method, Request, Response};
use http_body_util::{BodyExt as _, Full};
use secretless_kit::{ALL_HOSTS, ALLOWED, EVIL, Upstream, UpstreamPki};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const POD_NAME: &str = "sandbox-alice-7x2kq";
const POD_UID: &str = "5f0c2a8e-3b1d-4e6f-9a7c-1d2e3f4a5b6c";
const TOKEN: &str = "projected-token-of-the-sidecar";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// alice's X token may go to the test's allowed host only; her Notion key to Notion.
fn secrets(keyring: &Keyring) -> Vec<AgentSecret> {
    vec![
        secretless_agent_secret(
            NAMESPACE,
            "x-bearer-token",
            "alice",
            "X_BEARER_TOKEN",
            keyring,
            ALICE_X,
            &[ALLOWED],
        ),
        secretless_agent_secret(
            NAMESPACE,
            "notion-api-key",
            "alice",
            "NOTION_API_KEY",
            keyring,
            ALICE_NOTION,
            &["api.notion.com"],
        ),
    ]
}

/// The API server as the feed sees it: the sidecar's token is bound to the admitted pod, and
/// the pod reads back as admitted.
fn api_server(pod: Value) -> kube::Client {
    let pod = Arc::new(pod);
    let service = tower::service_fn(move |request: Request<kube::client::Body>| {
        let pod = pod.clone();
        async move {
            let (method, path) = (request.method().clone(), request.uri().path().to_owned());
            let body = request.into_body().collect().await.unwrap().to_bytes();
            let reply = if method == Method::POST
                && path == "/apis/authentication.k8s.io/v1/tokenreviews"
            {
                let review: Value = serde_json::from_slice(&body).unwrap();
                let good = review["spec"]["token"] == TOKEN
                    && review["spec"]["audiences"] == json!([feed::FEED_AUDIENCE]);
                let status = if good {
                    common::token_review::bound_to_pod(NAMESPACE, POD_NAME, POD_UID)
                } else {
                    json!({"authenticated": false, "error": "invalid bearer token"})
                };
                json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                       "metadata": {}, "spec": review["spec"], "status": status})
            } else if method == Method::GET
                && path == format!("/api/v1/namespaces/{NAMESPACE}/pods/{POD_NAME}")
            {
                (*pod).clone()
            } else {
                panic!("unexpected API request {method} {path}");
            };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(serde_json::to_vec(&reply).unwrap())))
                    .unwrap(),
            )
        }
    });
    kube::Client::new(service, "default")
}

/// The proxy sidecar, run from the admitted pod's own container: its arguments and
/// environment, with the in-pod paths and ports moved to this test's.
struct Sidecar {
    child: Child,
    port: u16,
    bundle: PathBuf,
    log: PathBuf,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_sidecar(container: &Value, dir: &Path, upstream_ca: &str) -> Sidecar {
    assert_eq!(container["name"], PROXY_CONTAINER_NAME);
    assert_eq!(container["restartPolicy"], "Always", "a native sidecar");
    let (port, admin) = (free_port(), free_port());
    let bundle = dir.join("ca-bundle.pem");
    let token = dir.join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let upstream_ca_file = dir.join("upstream-ca.pem");
    std::fs::write(&upstream_ca_file, upstream_ca).unwrap();
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap();
            match a.split_once('=') {
                Some(("--listen", _)) => format!("--listen=127.0.0.1:{port}"),
                Some(("--admin-listen", _)) => format!("--admin-listen=127.0.0.1:{admin}"),
                Some(("--ca-bundle", _)) => format!("--ca-bundle={}", bundle.display()),
                Some(("--feed-token-file", _)) => format!("--feed-token-file={}", token.display()),
                _ => a.to_owned(),
            }
        })
        .collect();
    assert_eq!(args[0], "proxy");
    let log = dir.join("proxy.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentsecrets"));
    cmd.env_clear()
        .args(&args)
        .arg("--upstream-ca")
        .arg(&upstream_ca_file)
        .args(["--log-format", "text"])
        .env("RUST_LOG", "debug")
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file);
    for host in ALL_HOSTS {
        cmd.arg("--resolve").arg(format!("{host}=127.0.0.1"));
    }
    for entry in container["env"].as_array().unwrap() {
        let value = entry["value"]
            .as_str()
            .expect("the sidecar's env is literal");
        cmd.env(entry["name"].as_str().unwrap(), value);
    }
    let child = cmd.spawn().unwrap();
    let sidecar = Sidecar {
        child,
        port,
        bundle,
        log,
    };
    // The startup probe: the sandbox starts once /readyz answers 200.
    let started = Instant::now();
    loop {
        let status = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://127.0.0.1:{admin}/readyz"))
            .output()
            .unwrap();
        if status.stdout == b"200" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the proxy did not become ready from the feed: {}",
            std::fs::read_to_string(&sidecar.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    sidecar
}

/// A shell in the sandbox container: exactly its environment from the admitted pod (plus
/// PATH), with the in-pod CA path and proxy port moved to this test's.
fn sandbox_shell(container: &Value, sidecar: &Sidecar, script: &str, dir: &Path) -> String {
    let mut cmd = Command::new("sh");
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .stderr(Stdio::piped());
    let proxy_url = format!("http://127.0.0.1:{}", sidecar.port);
    for entry in container["env"].as_array().unwrap() {
        let Some(value) = entry["value"].as_str() else {
            continue;
        };
        let value = match value {
            CA_BUNDLE => sidecar.bundle.to_str().unwrap(),
            PROXY_URL => &proxy_url,
            other => other,
        };
        cmd.env(entry["name"].as_str().unwrap(), value);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `curl` with the README's header to `url`: (status, body).
fn curl_with_token(container: &Value, sidecar: &Sidecar, url: &str, dir: &Path) -> (u16, String) {
    let script = format!(
        r#"curl -sS -o body.out -w '%{{http_code}}' -H "Authorization: Bearer $X_BEARER_TOKEN" {url}; echo; cat body.out"#
    );
    let out = sandbox_shell(container, sidecar, &script, dir);
    let (status, body) = out.split_once('\n').unwrap();
    (status.trim().parse().unwrap(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_holds_a_placeholder_its_value_reaches_only_the_allowed_host_and_a_deletion_applies_while_it_runs()
 {
    let available = Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        available,
        "curl is not available: run `bash hack/install-proxy-test-clients.sh`"
    );
    let pki = UpstreamPki::new();
    let upstream = Upstream::start(&pki, false).await;
    let dir = tempfile::tempdir().unwrap();
    let feed_pki = common::feed::feed_tls(dir.path());
    let feed_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let feed_addr = feed_listener.local_addr().unwrap();

    // 1. The webhook admits alice's sandbox pod, annotated secretless.
    let keyring = Keyring::generate("test-kek").unwrap();
    let objects = secrets(&keyring);
    let mut policy = fixture_policy();
    policy.secretless = SecretlessPolicy {
        proxy_image: Some("registry.example/agent-secrets:1.2.3".into()),
        feed_url: Some(format!("https://{feed_addr}{}", feed::FEED_PATH)),
        feed_ca: FeedCa::Pem(Arc::from(feed_pki.ca_pem.as_str())),
        ..SecretlessPolicy::default()
    };
    let webhook = TestServer::start(Setup {
        policy,
        secrets: Some(objects.clone()),
        keyring,
        ..Setup::default()
    })
    .await;
    let (path, mut review) = fixture("pod_create_named.json");
    review["request"]["object"]["metadata"]["annotations"][MODE_ANNOTATION] = json!("secretless");
    let answer = webhook.review(&path, &review).await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert!(
        webhook.created().is_empty(),
        "a secretless pod needs no pod-scoped Secret"
    );
    let mut pod = patched(&review["request"]["object"], &answer);
    // What the API server adds when it stores the pod.
    pod["metadata"]["name"] = json!(POD_NAME);
    pod["metadata"]["uid"] = json!(POD_UID);
    let sandbox = pod["spec"]["containers"][0].clone();
    let sidecar_spec = pod["spec"]["initContainers"][0].clone();
    let pod_text = pod.to_string();
    assert!(
        !pod_text.contains(ALICE_X) && !pod_text.contains(ALICE_NOTION),
        "no value in the pod"
    );
    let token_env = sandbox["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "X_BEARER_TOKEN")
        .unwrap();
    assert!(token_env.get("valueFrom").is_none(), "{token_env}");

    // 2. The operator's feed, on the webhook's certificate, serves the admitted pod.
    let index = Arc::new(SecretIndex::default());
    index.replace_all(objects.iter().filter_map(CachedSecret::from_object));
    let stop = CancellationToken::new();
    let state = FeedState::new(
        api_server(pod.clone()),
        index.clone(),
        // The operator's keyring: the one the webhook runs with.
        KeyringHandle::new(
            Keyring::from_yaml(&common::keyring::keyring(&webhook).to_yaml().unwrap()).unwrap(),
        ),
        FeedSettings::default(),
        Arc::new(agent_secrets::telemetry::Metrics::default()),
        stop.clone(),
    );
    let tls = agent_secrets::webhook::tls::load(&feed_pki.cert, &feed_pki.key, None).unwrap();
    tokio::spawn(feed::serve_feed(
        feed_listener,
        tls,
        state,
        stop.clone().cancelled_owned(),
    ));

    // 3. The sidecar as admitted, then the sandbox as admitted.
    let work = dir.path().to_owned();
    let sidecar = tokio::task::spawn_blocking({
        let (spec, work, ca) = (sidecar_spec.clone(), work.clone(), pki.ca_pem.clone());
        move || run_sidecar(&spec, &work, &ca)
    })
    .await
    .unwrap();
    let sidecar = Arc::new(sidecar);
    let shell = {
        let (sandbox, sidecar, work) = (sandbox.clone(), sidecar.clone(), work.clone());
        move |script: &'static str| {
            let (sandbox, sidecar, work) = (sandbox.clone(), sidecar.clone(), work.clone());
            tokio::task::spawn_blocking(move || sandbox_shell(&sandbox, &sidecar, script, &work))
        }
    };
    let curl = {
        let (sandbox, sidecar, work) = (sandbox.clone(), sidecar.clone(), work.clone());
        move |url: String| {
            let (sandbox, sidecar, work) = (sandbox.clone(), sidecar.clone(), work.clone());
            tokio::task::spawn_blocking(move || curl_with_token(&sandbox, &sidecar, &url, &work))
        }
    };

    // `echo $X_BEARER_TOKEN` prints a placeholder.
    let echoed = shell(r#"echo "$X_BEARER_TOKEN""#).await.unwrap();
    let placeholder = echoed.trim().to_owned();
    assert!(placeholder.starts_with("asec_ph_"), "{echoed}");
    assert_ne!(placeholder, ALICE_X);
    let environment = shell("env").await.unwrap();
    assert!(
        !environment.contains(ALICE_X) && !environment.contains(ALICE_NOTION),
        "no value anywhere in the sandbox's environment"
    );

    // The call to the allowed host succeeds, carrying the value.
    let allowed = format!("https://{ALLOWED}:{}/", upstream.port());
    let (status, body) = curl(allowed.clone()).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        upstream.last().header("authorization"),
        Some(format!("Bearer {ALICE_X}").as_str())
    );

    // The same header to another host is refused, and never leaves the proxy.
    let received = upstream.recorded().len();
    let (status, body) = curl(format!("https://{EVIL}:{}/", upstream.port()))
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("X_BEARER_TOKEN"), "{body}");
    assert!(body.contains(EVIL), "{body}");
    assert!(!body.contains(ALICE_X), "{body}");
    assert_eq!(
        upstream.recorded().len(),
        received,
        "nothing reached the host"
    );

    // 4. alice deletes the secret: the running sandbox loses it within 10 seconds.
    let deleted_at = Instant::now();
    index.replace_all(
        objects
            .iter()
            .filter(|o| o.spec.env_name != "X_BEARER_TOKEN")
            .filter_map(CachedSecret::from_object),
    );
    loop {
        let (status, body) = curl(allowed.clone()).await.unwrap();
        assert_eq!(status, 200, "{body}");
        let sent = upstream.last().header("authorization").map(str::to_owned);
        if sent == Some(format!("Bearer {placeholder}")) {
            break;
        }
        assert_eq!(sent, Some(format!("Bearer {ALICE_X}")));
        assert!(
            deleted_at.elapsed() < Duration::from_secs(10),
            "the deleted secret is still substituted after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let log = std::fs::read_to_string(&sidecar.log).unwrap();
    assert!(
        !log.contains(ALICE_X) && !log.contains(ALICE_NOTION) && !log.contains(TOKEN),
        "the proxy's log holds no value or token"
    );
    stop.cancel();
}
