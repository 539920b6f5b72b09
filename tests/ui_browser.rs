//! The Secrets page in a real headless Chromium, driven over WebDriver (fantoccini against
//! Debian's chromedriver): add, reveal toggle, live validation, a refusal next to its field,
//! edit with a blank value, delete with confirmation, in light and dark mode and on a narrow
//! screen.
//!
//! The page runs in this process against a small fake API server (AgentSecret list, create,
//! merge patch, delete; it seals values the way the webhook does, refuses another owner's
//! writes and records every impersonation header), behind a fake identity proxy on the
//! loopback address that signs every request in as `alice`.
//!
//! Needs `chromium` and `chromedriver` (`bash hack/install-browser.sh`); without them the
//! test fails. Screenshots go to `target/ui-screenshots/`; with
//! `AGENTSECRETS_UPDATE_SCREENSHOTS=1` also to `docs/screenshots/` (checked in).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use agent_secrets::ui::config::{NamespaceRule, Settings};
use agent_secrets::ui::csrf::CsrfKey;
use agent_secrets::ui::server::{Shared, UiState, router};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{any, get, patch};
use axum::{Json, Router};
use fantoccini::{Client, ClientBuilder, Locator};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NS: &str = "sandboxes";
const USER: &str = "alice";
/// A made-up value typed into the form; it must never come back from the server.
const TYPED_VALUE: &str = "example-value-typed-in-browser-41d7";
const INSTALL_HINT: &str = "install them with `bash hack/install-browser.sh` (Debian packages chromium and chromium-driver)";

// ---------------------------------------------------------------------------------------
// Fake API server

#[derive(Default)]
struct FakeApi {
    objects: BTreeMap<String, Value>,
    /// Plaintext each object was last sealed from (what a sandbox would receive).
    plaintexts: BTreeMap<String, String>,
    calls: Vec<ApiCall>,
    counter: u32,
}

/// One call the fake API server received.
struct ApiCall {
    method: String,
    path: String,
    impersonate_user: Option<String>,
    impersonate_groups: Vec<String>,
    had_value: bool,
}

type Fake = Arc<Mutex<FakeApi>>;

fn status(code: u16, reason: &str, message: &str) -> (StatusCode, Json<Value>) {
    (
        StatusCode::from_u16(code).unwrap(),
        Json(
            json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code,
                    "reason": reason, "message": message, "metadata": {}}),
        ),
    )
}

fn record(
    fake: &Fake,
    method: &str,
    path: String,
    headers: &HeaderMap,
    body: &Value,
) -> Option<String> {
    let user = headers
        .get("impersonate-user")
        .map(|v| v.to_str().unwrap().to_owned());
    let groups = headers
        .get_all("impersonate-group")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let had_value = body["spec"].get("value").is_some();
    fake.lock().unwrap().calls.push(ApiCall {
        method: method.into(),
        path,
        impersonate_user: user.clone(),
        impersonate_groups: groups,
        had_value,
    });
    user
}

async fn fake_list(
    State(fake): State<Fake>,
    Path(ns): Path<String>,
    headers: HeaderMap,
) -> Json<Value> {
    record(&fake, "LIST", ns, &headers, &Value::Null);
    let items: Vec<Value> = fake.lock().unwrap().objects.values().cloned().collect();
    Json(
        json!({"apiVersion": "agentsecrets.io/v1alpha1", "kind": "AgentSecretList",
                "metadata": {"resourceVersion": "7"}, "items": items}),
    )
}

/// What the webhook and the owner-binding policy do, in short: seal (drop) the value, refuse
/// writes for another owner, invalid names and a second secret of the same name.
async fn fake_create(
    State(fake): State<Fake>,
    Path(ns): Path<String>,
    headers: HeaderMap,
    Json(mut body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let user = record(&fake, "CREATE", ns.clone(), &headers, &body);
    let owner = body["spec"]["owner"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let env_name = body["spec"]["envName"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if user.as_deref() != Some(owner.as_str()) {
        return status(
            403,
            "Forbidden",
            "admission webhook \"agentsecrets.agentsecrets.io\" denied the request: only the owner may write",
        );
    }
    if let Err(e) = agent_secrets::api::validate_env_name(&env_name, &[]) {
        return status(
            422,
            "Invalid",
            &format!("AgentSecret.agentsecrets.io is invalid: spec.envName: {e}"),
        );
    }
    let mut fake = fake.lock().unwrap();
    if fake
        .objects
        .values()
        .any(|o| o["spec"]["owner"] == owner && o["spec"]["envName"] == env_name)
    {
        return status(
            400,
            "BadRequest",
            &format!(
                "admission webhook \"agentsecrets.agentsecrets.io\" denied the request: owner \"{owner}\" already has a secret with envName {env_name}"
            ),
        );
    }
    fake.counter += 1;
    let name = format!(
        "{}{:05}",
        body["metadata"]["generateName"].as_str().unwrap_or("x-"),
        fake.counter
    );
    let plaintext = body["spec"]["value"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    seal(&mut body);
    body["metadata"] = json!({"name": name, "namespace": ns, "uid": format!("uid-{}", fake.counter),
        "resourceVersion": "1", "creationTimestamp": "2026-11-29T15:52:49Z"});
    body["status"] = json!({"conditions": [{"type": "Ready", "status": "True", "reason": "Sealed",
        "message": "", "lastTransitionTime": "2026-11-29T15:52:49Z"}]});
    fake.plaintexts.insert(name.clone(), plaintext);
    fake.objects.insert(name, body.clone());
    (StatusCode::CREATED, Json(body))
}

fn seal(object: &mut Value) {
    if let Some(spec) = object["spec"].as_object_mut() {
        spec.remove("value");
        spec.insert(
            "sealed".into(),
            json!({"keyId": "k1", "wrappedKey": "d3JhcA", "nonce": "bm9uY2U", "ciphertext": "Y2lwaGVy"}),
        );
    }
}

async fn fake_patch(
    State(fake): State<Fake>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let user = record(&fake, "PATCH", format!("{ns}/{name}"), &headers, &body);
    let mut fake = fake.lock().unwrap();
    let Some(mut object) = fake.objects.get(&name).cloned() else {
        return status(
            404,
            "NotFound",
            &format!("agentsecrets.agentsecrets.io \"{name}\" not found"),
        );
    };
    if user.as_deref() != object["spec"]["owner"].as_str() {
        return status(
            403,
            "Forbidden",
            "admission webhook denied the request: only the owner may write",
        );
    }
    if let Some(value) = body["spec"].get("value").and_then(Value::as_str) {
        fake.plaintexts.insert(name.clone(), value.to_owned());
    }
    match body["spec"].get("description") {
        Some(Value::Null) => {
            object["spec"]
                .as_object_mut()
                .unwrap()
                .remove("description");
        }
        Some(d) => object["spec"]["description"] = d.clone(),
        None => {}
    }
    seal(&mut object);
    fake.objects.insert(name, object.clone());
    (StatusCode::OK, Json(object))
}

async fn fake_delete(
    State(fake): State<Fake>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> (StatusCode, Json<Value>) {
    record(
        &fake,
        "DELETE",
        format!("{ns}/{name}"),
        &headers,
        &Value::Null,
    );
    let mut fake = fake.lock().unwrap();
    fake.plaintexts.remove(&name);
    match fake.objects.remove(&name) {
        Some(_) => (
            StatusCode::OK,
            Json(
                json!({"apiVersion": "v1", "kind": "Status", "status": "Success", "metadata": {}}),
            ),
        ),
        None => status(404, "NotFound", "not found"),
    }
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap()
    });
    addr
}

/// The fake API server, the page against it, and the identity proxy in front: the URL the
/// browser opens.
async fn start_stack(fake: Fake) -> String {
    let base = "/apis/agentsecrets.io/v1alpha1/namespaces/{ns}/agentsecrets";
    let api = Router::new()
        .route(base, get(fake_list).post(fake_create))
        .route(
            &format!("{base}/{{name}}"),
            patch(fake_patch).delete(fake_delete),
        )
        .with_state(fake);
    let api_addr = serve(api).await;
    let config = kube::Config::new(format!("http://{api_addr}").parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let state = UiState::new(Shared {
        settings: Settings::for_loopback_proxy(NamespaceRule::Fixed(NS.into())),
        client,
        csrf: CsrfKey::generate().unwrap(),
        tls: false,
    });
    let page_addr = serve(router(state)).await;
    let proxy = Router::new()
        .route("/", any(identity_proxy))
        .route("/{*path}", any(identity_proxy))
        .with_state(page_addr);
    let proxy_addr = serve(proxy).await;
    // `localhost` is a secure context, so the browser keeps the page's Secure cookie.
    format!("http://localhost:{}", proxy_addr.port())
}

/// The authenticating proxy: whatever the browser sends, the page hears that `alice` (group
/// `research`) is signed in.
async fn identity_proxy(
    State(target): State<SocketAddr>,
    request: axum::extract::Request,
) -> axum::response::Response {
    let (mut parts, body) = request.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    parts.headers.remove("x-forwarded-user");
    parts.headers.remove("x-forwarded-groups");
    parts
        .headers
        .insert("x-forwarded-user", USER.parse().unwrap());
    parts
        .headers
        .insert("x-forwarded-groups", "research".parse().unwrap());
    let stream = tokio::net::TcpStream::connect(target).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let response = sender
        .send_request(http::Request::from_parts(parts, Full::new(bytes)))
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    axum::response::Response::from_parts(parts, axum::body::Body::from(bytes))
}

// ---------------------------------------------------------------------------------------
// Browser

/// chromedriver, stopped when dropped.
struct Driver {
    child: std::process::Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

fn chromium_binary() -> PathBuf {
    // Debian's /usr/bin/chromium is a launcher script; the browser itself lives here.
    let direct = PathBuf::from("/usr/lib/chromium/chromium");
    if direct.is_file() {
        return direct;
    }
    find_program(&["chromium", "chromium-browser", "google-chrome"])
        .unwrap_or_else(|| panic!("chromium is not installed: {INSTALL_HINT}"))
}

async fn start_driver() -> Driver {
    let driver = find_program(&["chromedriver"])
        .unwrap_or_else(|| panic!("chromedriver is not installed: {INSTALL_HINT}"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("failed to start chromedriver ({e}): {INSTALL_HINT}"));
    let driver = Driver { child, port };
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "chromedriver did not start listening"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    driver
}

async fn browser(driver: &Driver, dark: bool, profile: &std::path::Path) -> Client {
    let mut args = vec![
        "--headless=new".to_owned(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--disable-quic".into(),
        "--no-first-run".into(),
        "--disable-background-networking".into(),
        "--disable-component-update".into(),
        "--disable-sync".into(),
        "--disable-dev-shm-usage".into(),
        "--hide-scrollbars".into(),
        "--force-device-scale-factor=1".into(),
        format!("--user-data-dir={}", profile.display()),
    ];
    if dark {
        args.push("--force-dark-mode".into());
        args.push("--blink-settings=preferredColorScheme=0".into());
    }
    let mut caps = serde_json::Map::new();
    caps.insert("browserName".into(), json!("chrome"));
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"binary": chromium_binary(), "args": args}),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .unwrap_or_else(|e| panic!("chromedriver could not start chromium ({e}): {INSTALL_HINT}"))
}

/// Poll `check` for up to 5 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within 5 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn screenshot(client: &Client, name: &str) {
    let png = client.screenshot().await.unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = root.join("target/ui-screenshots");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join(name), &png).unwrap();
    if std::env::var_os("AGENTSECRETS_UPDATE_SCREENSHOTS").is_some() {
        let docs = root.join("docs/screenshots");
        std::fs::create_dir_all(&docs).unwrap();
        std::fs::write(docs.join(name), &png).unwrap();
    }
}

/// Text of the element, or empty while the page is changing under it (a stale element is
/// normal right after a navigation).
async fn text_of(client: &Client, css: &str) -> String {
    match client.find(Locator::Css(css)).await {
        Ok(element) => element.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn source(client: &Client) -> String {
    client.source().await.unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// The test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_adds_reveals_edits_and_deletes_a_secret_in_a_real_browser() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fake: Fake = Arc::default();
    let url = start_stack(fake.clone()).await;
    let driver = start_driver().await;
    let profile = tempfile::tempdir().unwrap();
    let c = browser(&driver, false, profile.path()).await;
    c.set_window_size(1200, 860).await.unwrap();

    // Empty state.
    c.goto(&url).await.unwrap();
    let page = source(&c).await;
    assert!(page.contains("No secrets yet"));
    assert!(page.contains("process.env.NAME") && page.contains("os.environ[\"NAME\"]"));
    screenshot(&c, "01-empty.png").await;

    // Add: live validation states the rule while typing.
    c.find(Locator::LinkText("Add your first secret"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let name = c.find(Locator::Id("env_name")).await.unwrap();
    name.send_keys("github_token").await.unwrap();
    eventually("the live validation message", || async {
        text_of(&c, "#env_name-error").await == "Use uppercase letters: GITHUB_TOKEN."
    })
    .await;
    assert_eq!(
        name.attr("aria-invalid").await.unwrap().as_deref(),
        Some("true")
    );
    screenshot(&c, "02-live-validation.png").await;
    name.clear().await.unwrap();
    name.send_keys("PATH").await.unwrap();
    eventually("the reserved-name message", || async {
        text_of(&c, "#env_name-error")
            .await
            .contains("PATH is reserved")
    })
    .await;
    name.clear().await.unwrap();
    name.send_keys("GITHUB_API_KEY").await.unwrap();
    eventually("the message to clear", || async {
        text_of(&c, "#env_name-error").await.is_empty()
    })
    .await;

    // Reveal toggle: hidden by default, shown while pressed, hidden again.
    let value = c.find(Locator::Id("value")).await.unwrap();
    value.send_keys(TYPED_VALUE).await.unwrap();
    assert_eq!(
        value.attr("type").await.unwrap().as_deref(),
        Some("password")
    );
    let eye = c.find(Locator::Css("button.reveal")).await.unwrap();
    assert!(
        eye.is_displayed().await.unwrap(),
        "the eye toggle shows with JavaScript on"
    );
    eye.click().await.unwrap();
    assert_eq!(value.attr("type").await.unwrap().as_deref(), Some("text"));
    assert_eq!(
        eye.attr("aria-pressed").await.unwrap().as_deref(),
        Some("true")
    );
    assert_eq!(text_of(&c, ".reveal-label").await, "Hide value");
    c.find(Locator::Id("description"))
        .await
        .unwrap()
        .send_keys("GitHub, for the research agent")
        .await
        .unwrap();
    screenshot(&c, "03-add-revealed.png").await;
    eye.click().await.unwrap();
    assert_eq!(
        value.attr("type").await.unwrap().as_deref(),
        Some("password")
    );
    c.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

    // The card.
    eventually("the new card", || async {
        source(&c).await.contains("Added GITHUB_API_KEY")
    })
    .await;
    let page = source(&c).await;
    assert!(page.contains("GitHub, for the research agent"));
    assert!(page.contains("••••••••"));
    assert!(page.contains("Ready for sandboxes"));

    // A second secret, then the same name again: the refusal sits next to the name field and
    // what was typed stays in the form.
    for (env_name, description) in [
        ("DB_PASSWORD", "Postgres of the analytics agent"),
        ("GITHUB_API_KEY", "again"),
    ] {
        c.goto(&format!("{url}/secrets/new")).await.unwrap();
        c.find(Locator::Id("env_name"))
            .await
            .unwrap()
            .send_keys(env_name)
            .await
            .unwrap();
        c.find(Locator::Id("value"))
            .await
            .unwrap()
            .send_keys(TYPED_VALUE)
            .await
            .unwrap();
        c.find(Locator::Id("description"))
            .await
            .unwrap()
            .send_keys(description)
            .await
            .unwrap();
        c.find(Locator::Css("button[type=submit]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        if env_name == "DB_PASSWORD" {
            eventually("the second card", || async {
                source(&c).await.contains("Added DB_PASSWORD")
            })
            .await;
        }
    }
    eventually("the duplicate-name refusal", || async {
        text_of(&c, "#env_name-error")
            .await
            .contains("You already have a secret named GITHUB_API_KEY")
    })
    .await;
    let kept = c
        .find(Locator::Id("value"))
        .await
        .unwrap()
        .prop("value")
        .await
        .unwrap();
    assert_eq!(
        kept.as_deref(),
        Some(TYPED_VALUE),
        "the typed value is kept"
    );
    let focused = c
        .execute(
            "return document.activeElement && document.activeElement.id",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        focused,
        json!("error-summary"),
        "focus moves to the problems"
    );
    screenshot(&c, "04-refused-duplicate.png").await;

    // The list with two cards.
    c.goto(&url).await.unwrap();
    let page = source(&c).await;
    assert!(page.contains("DB_PASSWORD") && page.contains("GITHUB_API_KEY"));
    screenshot(&c, "05-cards.png").await;

    // Edit with a blank value: the form says it keeps the value, and it does.
    c.find(Locator::Css("a[aria-label='Edit GITHUB_API_KEY']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let value = c.find(Locator::Id("value")).await.unwrap();
    assert_eq!(value.prop("value").await.unwrap().as_deref(), Some(""));
    assert!(
        source(&c)
            .await
            .contains("Leave blank to keep the current value")
    );
    let description = c.find(Locator::Id("description")).await.unwrap();
    description.clear().await.unwrap();
    description
        .send_keys("GitHub, read-only token")
        .await
        .unwrap();
    screenshot(&c, "06-edit-blank-value.png").await;
    c.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    eventually("the saved notice", || async {
        source(&c).await.contains("Saved GITHUB_API_KEY")
    })
    .await;
    assert!(source(&c).await.contains("GitHub, read-only token"));
    {
        let fake = fake.lock().unwrap();
        let patch = fake
            .calls
            .iter()
            .find(|call| call.method == "PATCH")
            .expect("a PATCH");
        assert!(!patch.had_value, "a blank value is not sent");
        let name = fake
            .objects
            .iter()
            .find(|(_, o)| o["spec"]["envName"] == "GITHUB_API_KEY")
            .map(|(n, _)| n.clone())
            .unwrap();
        assert_eq!(fake.plaintexts[&name], TYPED_VALUE, "the value is kept");
    }

    // Delete with confirmation naming the secret.
    c.find(Locator::Css("a[aria-label='Delete DB_PASSWORD']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let page = source(&c).await;
    assert!(page.contains("Delete <code>DB_PASSWORD</code>?"));
    assert!(page.contains("will no longer get <code>DB_PASSWORD</code>"));
    screenshot(&c, "07-delete-confirm.png").await;
    c.find(Locator::Css("button.danger"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    eventually("the deleted notice", || async {
        source(&c).await.contains("Deleted DB_PASSWORD")
    })
    .await;
    let page = source(&c).await;
    assert!(!page.contains("aria-label=\"Edit DB_PASSWORD\""));
    screenshot(&c, "08-after-delete.png").await;
    assert!(!page.contains(TYPED_VALUE), "the value is never sent back");
    c.close().await.unwrap();

    // Dark mode on a narrow screen.
    let dark_profile = tempfile::tempdir().unwrap();
    let d = browser(&driver, true, dark_profile.path()).await;
    d.set_window_size(400, 860).await.unwrap();
    d.goto(&url).await.unwrap();
    let background = d
        .execute(
            "return getComputedStyle(document.body).backgroundColor",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(background, json!("rgb(15, 17, 21)"), "dark theme");
    let overflow = d
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        overflow,
        json!(true),
        "no horizontal scrolling on a narrow screen"
    );
    screenshot(&d, "09-dark-narrow.png").await;
    d.goto(&format!("{url}/secrets/new")).await.unwrap();
    screenshot(&d, "10-dark-narrow-add.png").await;
    d.close().await.unwrap();

    // Every API call was made as alice, in group research.
    let fake = fake.lock().unwrap();
    assert!(!fake.calls.is_empty());
    for call in &fake.calls {
        let what = format!("{} {}", call.method, call.path);
        assert_eq!(call.impersonate_user.as_deref(), Some(USER), "{what}");
        assert_eq!(call.impersonate_groups, ["research"], "{what}");
    }
}
