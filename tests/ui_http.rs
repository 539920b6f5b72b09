//! The Secrets page over HTTP: the real axum router on a loopback port, requests carrying a
//! fake identity proxy's headers, and the Kubernetes API mocked with tower-test. Each test
//! lists the API calls it expects, in order; each is asserted (impersonation headers
//! included), and any further call fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use agent_secrets::ui::config::{NamespaceRule, Settings};
use agent_secrets::ui::csrf::CsrfKey;
use agent_secrets::ui::server::{BODY_LIMIT, Shared, UiState, router};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use kube::client::Body;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const NS: &str = "sandboxes";
const LIST_PATH: &str = "/apis/agentsecrets.io/v1alpha1/namespaces/sandboxes/agentsecrets";
const CANARY: &str = "canary-ui-value-5b1f9e";
const CANARY_EDIT: &str = "canary-ui-edit-value-77c2";

fn object_path(name: &str) -> String {
    format!("{LIST_PATH}/{name}")
}

/// The AgentSecret list recorded from a real API server: alice, bob and carol in `sandboxes`.
fn recorded_list() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/api/agentsecrets_list.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn list_of(items: Vec<Value>) -> Value {
    json!({"apiVersion": "agentsecrets.io/v1alpha1", "kind": "AgentSecretList",
           "metadata": {"resourceVersion": "100"}, "items": items})
}

/// A stored (sealed) AgentSecret as the API server returns it.
fn stored(name: &str, owner: &str, env_name: &str, description: Option<&str>) -> Value {
    let mut spec = json!({"owner": owner, "envName": env_name,
        "sealed": {"keyId": "k1", "wrappedKey": "d3JhcHBlZA", "nonce": "bm9uY2U", "ciphertext": "Y2lwaGVy"}});
    if let Some(d) = description {
        spec["description"] = json!(d);
    }
    json!({"apiVersion": "agentsecrets.io/v1alpha1", "kind": "AgentSecret",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"),
                     "resourceVersion": "42", "creationTimestamp": "2026-11-29T15:52:49Z"},
        "spec": spec,
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Sealed", "message": "",
            "lastTransitionTime": "2026-11-29T15:52:49Z"}]}})
}

fn status_failure(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code,
           "reason": reason, "message": message, "metadata": {}})
}

// ---------------------------------------------------------------------------------------
// Mocked API server

/// Checks one request's headers, query and JSON body.
type Check = Box<dyn FnOnce(&http::HeaderMap, &str, &Value) + Send>;

/// One expected API call: method, path, and a check of its headers and JSON body.
struct Expect {
    method: Method,
    path: String,
    check: Check,
    status: u16,
    reply: Value,
}

fn expect(method: Method, path: &str, reply: Value) -> Expect {
    Expect {
        method,
        path: path.to_owned(),
        check: Box::new(|_, _, _| {}),
        status: 200,
        reply,
    }
}

impl Expect {
    fn check(
        mut self,
        check: impl FnOnce(&http::HeaderMap, &str, &Value) + Send + 'static,
    ) -> Self {
        self.check = Box::new(check);
        self
    }

    fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }
}

/// Who the calls must be made as.
#[derive(Clone)]
struct As {
    user: &'static str,
    groups: Vec<&'static str>,
}

fn alice() -> As {
    As {
        user: "alice",
        groups: vec![],
    }
}

/// Serves `expected` in order, asserting each call and its impersonation headers; records any
/// call beyond them.
struct Verifier {
    served: Arc<Mutex<usize>>,
    extra: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
    expected: usize,
}

fn verify(mut handle: Handle, who: As, expected: Vec<Expect>) -> Verifier {
    let served = Arc::new(Mutex::new(0));
    let extra = Arc::new(Mutex::new(Vec::new()));
    let count = expected.len();
    let (served_in, extra_in) = (served.clone(), extra.clone());
    let task = tokio::spawn(async move {
        for expect in expected {
            let (request, send) =
                tokio::time::timeout(Duration::from_secs(5), handle.next_request())
                    .await
                    .unwrap_or_else(|_| {
                        panic!("timed out waiting for {} {}", expect.method, expect.path)
                    })
                    .expect("service not called");
            assert_eq!(request.method(), expect.method, "{}", request.uri());
            assert_eq!(request.uri().path(), expect.path);
            let headers = request.headers().clone();
            let users: Vec<_> = headers.get_all("impersonate-user").iter().collect();
            assert_eq!(
                users,
                vec![who.user],
                "Impersonate-User on {} {}",
                expect.method,
                expect.path
            );
            let groups: Vec<_> = headers
                .get_all("impersonate-group")
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect();
            assert_eq!(
                groups, who.groups,
                "Impersonate-Group on {} {}",
                expect.method, expect.path
            );
            let query = request.uri().query().unwrap_or_default().to_owned();
            let bytes = request.into_body().collect().await.unwrap().to_bytes();
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            (expect.check)(&headers, &query, &body);
            send.send_response(
                Response::builder()
                    .status(expect.status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&expect.reply).unwrap()))
                    .unwrap(),
            );
            *served_in.lock().unwrap() += 1;
        }
        while let Some((request, send)) = handle.next_request().await {
            extra_in
                .lock()
                .unwrap()
                .push(format!("{} {}", request.method(), request.uri()));
            send.send_response(Response::builder().status(500).body(Body::empty()).unwrap());
        }
    });
    Verifier {
        served,
        extra,
        task,
        expected: count,
    }
}

impl Verifier {
    /// Every expected call was made, and nothing else.
    async fn finish(self) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if self.task.is_finished() {
            if let Err(e) = self.task.await {
                std::panic::resume_unwind(e.into_panic());
            }
        } else {
            self.task.abort();
        }
        assert_eq!(
            *self.served.lock().unwrap(),
            self.expected,
            "expected API calls not made"
        );
        let extra = self.extra.lock().unwrap();
        assert!(extra.is_empty(), "unexpected API calls: {extra:?}");
    }
}

// ---------------------------------------------------------------------------------------
// The page, and a client standing in for the identity proxy

struct Page {
    addr: SocketAddr,
    handle: Option<Handle>,
    /// Every response body the page sent, to sweep for values.
    bodies: Arc<Mutex<Vec<String>>>,
}

fn settings() -> Settings {
    Settings::for_loopback_proxy(NamespaceRule::Fixed(NS.into()))
}

async fn start(settings: Settings) -> Page {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let state = UiState::new(Shared {
        settings,
        client,
        csrf: CsrfKey::generate().unwrap(),
        tls: false,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Page {
        addr,
        handle: Some(handle),
        bodies: Arc::default(),
    }
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.body))
    }

    /// The CSRF token of a rendered form.
    fn form_token(&self) -> String {
        let marker = "name=\"csrf_token\" value=\"";
        let start = self.body.find(marker).expect("a form with a CSRF token") + marker.len();
        let end = self.body[start..].find('"').unwrap();
        self.body[start..start + end].to_owned()
    }

    /// `name=value` of the Set-Cookie the page sent.
    fn cookie(&self) -> String {
        let set = self
            .headers
            .get("set-cookie")
            .expect("a cookie")
            .to_str()
            .unwrap();
        set.split(';').next().unwrap().to_owned()
    }
}

/// A request from the identity proxy: `user` (and `groups`) in oauth2-proxy's headers.
struct Call<'a> {
    method: Method,
    path: &'a str,
    user: Option<&'a str>,
    groups: Option<&'a str>,
    cookie: Option<&'a str>,
    csrf_header: Option<&'a str>,
    content_type: Option<&'a str>,
    body: Vec<u8>,
}

fn call(method: Method, path: &str) -> Call<'_> {
    Call {
        method,
        path,
        user: Some("alice"),
        groups: None,
        cookie: None,
        csrf_header: None,
        content_type: None,
        body: Vec::new(),
    }
}

impl<'a> Call<'a> {
    fn form(mut self, fields: &[(&str, &str)]) -> Self {
        self.body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish()
            .into_bytes();
        self.content_type = Some("application/x-www-form-urlencoded");
        self
    }

    fn json(mut self, body: Value) -> Self {
        self.body = serde_json::to_vec(&body).unwrap();
        self.content_type = Some("application/json");
        self
    }
}

impl Page {
    async fn send(&self, call: Call<'_>) -> Reply {
        let stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(call.method)
            .uri(call.path)
            .header("host", "secrets.example");
        if let Some(user) = call.user {
            request = request.header("x-forwarded-user", user);
        }
        if let Some(groups) = call.groups {
            request = request.header("x-forwarded-groups", groups);
        }
        if let Some(cookie) = call.cookie {
            request = request.header("cookie", cookie);
        }
        if let Some(token) = call.csrf_header {
            request = request.header("x-csrf-token", token);
        }
        if let Some(content_type) = call.content_type {
            request = request.header("content-type", content_type);
        }
        let request = request.body(Full::new(Bytes::from(call.body))).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
            .await
            .expect("the page did not answer")
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = String::from_utf8(
            response
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap();
        self.bodies.lock().unwrap().push(body.clone());
        Reply {
            status,
            headers,
            body,
        }
    }

    fn verify(&mut self, who: As, expected: Vec<Expect>) -> Verifier {
        verify(
            self.handle.take().expect("one verifier per page"),
            who,
            expected,
        )
    }

    /// A CSRF cookie and token for alice, from the add form (which makes no API call).
    async fn csrf(&self) -> (String, String) {
        let form = self.send(call(Method::GET, "/secrets/new")).await;
        assert_eq!(form.status, StatusCode::OK, "{}", form.body);
        (form.cookie(), form.form_token())
    }

    /// No response body so far held any of `values`.
    fn assert_no_response_holds(&self, values: &[&str]) {
        for body in self.bodies.lock().unwrap().iter() {
            for value in values {
                assert!(!body.contains(value), "a response holds {value}: {body}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn only_the_signed_in_users_secrets_are_listed() {
    let mut page = start(settings()).await;
    let verifier = page.verify(
        alice(),
        vec![
            expect(Method::GET, LIST_PATH, recorded_list()),
            expect(Method::GET, LIST_PATH, recorded_list()),
        ],
    );
    let html = page.send(call(Method::GET, "/")).await;
    assert_eq!(html.status, StatusCode::OK);
    for mine in [
        "SERVICE_0_API_KEY",
        "SERVICE_3_API_KEY",
        "SERVICE_6_API_KEY",
        "SERVICE_9_API_KEY",
    ] {
        assert!(html.body.contains(mine), "{mine} missing");
    }
    for theirs in [
        "SERVICE_1_API_KEY",
        "SERVICE_2_API_KEY",
        "SERVICE_10_API_KEY",
        "bob research",
        "carol research",
    ] {
        assert!(!html.body.contains(theirs), "{theirs} shown to alice");
    }
    assert!(html.body.contains("Key 0 for the alice research agent"));
    assert!(html.body.contains("••••••••"));
    assert!(html.body.contains("Ready for sandboxes"));
    assert!(html.body.contains("Signed in as <strong>alice</strong>"));

    let api = page.send(call(Method::GET, "/api/v1/secrets")).await;
    assert_eq!(api.status, StatusCode::OK);
    let items = api.json()["items"].as_array().unwrap().clone();
    let names: Vec<&str> = items
        .iter()
        .map(|i| i["envName"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "SERVICE_0_API_KEY",
            "SERVICE_3_API_KEY",
            "SERVICE_6_API_KEY",
            "SERVICE_9_API_KEY"
        ]
    );
    assert!(
        items
            .iter()
            .all(|i| i["owner"] == "alice" && i["value"] == "••••••••")
    );
    assert!(api.headers.contains_key("x-csrf-token"));
    verifier.finish().await;
}

#[tokio::test]
async fn every_api_call_is_made_as_the_user_with_their_groups() {
    let mut page = start(settings()).await;
    let who = As {
        user: "alice",
        groups: vec!["team-a", "platform users"],
    };
    let verifier = page.verify(
        who,
        vec![
            expect(Method::GET, LIST_PATH, recorded_list()),
            expect(Method::GET, LIST_PATH, recorded_list()),
            expect(Method::GET, LIST_PATH, recorded_list()),
        ],
    );
    for path in ["/", "/api/v1/secrets", "/secrets/SERVICE_0_API_KEY/edit"] {
        let mut c = call(Method::GET, path);
        // A system: group is never impersonated (system:masters is cluster-admin).
        c.groups = Some("team-a, system:masters, platform users");
        assert_eq!(page.send(c).await.status, StatusCode::OK, "{path}");
    }
    verifier.finish().await;
}

#[tokio::test]
async fn a_missing_or_untrusted_identity_is_refused_before_any_api_call() {
    // Loopback is not a trusted proxy here.
    let mut untrusted = settings();
    untrusted.trusted_proxy_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
    let mut page = start(untrusted).await;
    let verifier = page.verify(alice(), vec![]);
    for path in ["/", "/secrets/new", "/api/v1/secrets"] {
        let reply = page.send(call(Method::GET, path)).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{path}");
        assert!(reply.body.contains("sign-in proxy"), "{}", reply.body);
    }
    verifier.finish().await;

    let mut page = start(settings()).await;
    let verifier = page.verify(alice(), vec![]);
    let mut anonymous = call(Method::GET, "/");
    anonymous.user = None;
    let reply = page.send(anonymous).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(
        reply.body.contains("did not say who you are"),
        "{}",
        reply.body
    );
    let mut anonymous = call(Method::GET, "/api/v1/secrets");
    anonymous.user = None;
    let reply = page.send(anonymous).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let message = reply.json()["errors"][0]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("no x-forwarded-user header"), "{message}");
    // Kubernetes' own names are never acted as.
    let mut system = call(Method::GET, "/");
    system.user = Some("system:kube-scheduler");
    let reply = page.send(system).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(
        reply.body.contains("reserves for its own components"),
        "{}",
        reply.body
    );
    // A username that is no valid owner name is refused in words.
    let mut odd = call(Method::GET, "/");
    odd.user = Some("alice@example.com");
    let reply = page.send(odd).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(
        reply.body.contains("not a valid Kubernetes label value"),
        "{}",
        reply.body
    );
    verifier.finish().await;
}

#[tokio::test]
async fn the_owner_prefix_is_stripped_and_required() {
    let mut prefixed = settings();
    prefixed.owner_username_prefix = "oidc:".into();
    let mut page = start(prefixed).await;
    let verifier = page.verify(
        As {
            user: "oidc:alice",
            groups: vec![],
        },
        vec![expect(Method::GET, LIST_PATH, recorded_list())],
    );
    let mut c = call(Method::GET, "/api/v1/secrets");
    c.user = Some("oidc:alice");
    let reply = page.send(c).await;
    assert_eq!(reply.json()["owner"], "alice");
    assert_eq!(reply.json()["items"].as_array().unwrap().len(), 4);
    let reply = page.send(call(Method::GET, "/")).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(reply.body.contains("does not start with"), "{}", reply.body);
    verifier.finish().await;
}

#[tokio::test]
async fn writes_without_a_valid_csrf_token_are_refused_before_any_api_call() {
    let mut page = start(settings()).await;
    let verifier = page.verify(alice(), vec![]);
    let (cookie, token) = page.csrf().await;
    let fields = |token: &'static str| {
        vec![
            ("env_name", "GITHUB_API_KEY"),
            ("value", CANARY),
            ("csrf_token", token),
        ]
    };
    // No token at all.
    let mut c = call(Method::POST, "/secrets").form(&fields(""));
    c.cookie = Some(&cookie);
    assert_eq!(page.send(c).await.status, StatusCode::FORBIDDEN);
    // A token without its cookie.
    let token: &'static str = Box::leak(token.into_boxed_str());
    let reply = page
        .send(call(Method::POST, "/secrets").form(&fields(token)))
        .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(reply.body.contains("Nothing was changed"), "{}", reply.body);
    // Alice's token and cookie presented for bob.
    let mut c = call(Method::POST, "/secrets").form(&fields(token));
    c.cookie = Some(&cookie);
    c.user = Some("bob");
    assert_eq!(page.send(c).await.status, StatusCode::FORBIDDEN);
    // Edit and delete need it too.
    for path in [
        "/secrets/SERVICE_0_API_KEY",
        "/secrets/SERVICE_0_API_KEY/delete",
    ] {
        let mut c = call(Method::POST, path)
            .form(&[("confirm", "SERVICE_0_API_KEY"), ("description", "x")]);
        c.cookie = Some(&cookie);
        assert_eq!(page.send(c).await.status, StatusCode::FORBIDDEN, "{path}");
    }
    // The JSON API: cookie without header, and a form-encoded body.
    let mut c = call(Method::POST, "/api/v1/secrets")
        .json(json!({"envName": "GITHUB_API_KEY", "value": CANARY}));
    c.cookie = Some(&cookie);
    assert_eq!(page.send(c).await.status, StatusCode::FORBIDDEN);
    let mut c = call(Method::POST, "/api/v1/secrets").form(&[("envName", "A"), ("value", CANARY)]);
    c.cookie = Some(&cookie);
    c.csrf_header = Some(token);
    assert_eq!(
        page.send(c).await.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let mut c = call(
        Method::DELETE,
        "/api/v1/secrets/SERVICE_0_API_KEY?confirm=true",
    );
    c.cookie = Some(&cookie);
    assert_eq!(page.send(c).await.status, StatusCode::FORBIDDEN);
    verifier.finish().await;
    page.assert_no_response_holds(&[CANARY]);
}

#[tokio::test]
async fn adding_a_secret_sends_the_value_once_as_the_user_and_never_returns_it() {
    let mut page = start(settings()).await;
    let created = stored(
        "alice-github-api-key-x7k2p",
        "alice",
        "GITHUB_API_KEY",
        Some("GitHub"),
    );
    let mut after = recorded_list();
    after["items"].as_array_mut().unwrap().push(created.clone());
    let verifier = page.verify(
        alice(),
        vec![
            expect(Method::GET, LIST_PATH, recorded_list()),
            expect(Method::POST, LIST_PATH, created.clone())
                .status(201)
                .check(|_, query, body| {
                    assert!(query.contains("fieldManager=agent-secrets"), "{query}");
                    assert_eq!(body["spec"]["owner"], "alice");
                    assert_eq!(body["spec"]["envName"], "GITHUB_API_KEY");
                    assert_eq!(body["spec"]["description"], "GitHub");
                    assert_eq!(body["spec"]["value"], CANARY);
                    assert_eq!(body["metadata"]["generateName"], "alice-github-api-key-");
                    assert!(body["metadata"].get("name").is_none());
                }),
            expect(Method::GET, LIST_PATH, after.clone()),
            expect(Method::GET, LIST_PATH, after),
        ],
    );
    let (cookie, token) = page.csrf().await;
    let mut c = call(Method::POST, "/secrets").form(&[
        ("env_name", "GITHUB_API_KEY"),
        ("value", CANARY),
        ("description", "GitHub"),
        ("csrf_token", &token),
    ]);
    c.cookie = Some(&cookie);
    let reply = page.send(c).await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", reply.body);
    assert_eq!(reply.headers["location"], "/?added=GITHUB_API_KEY");
    let list = page.send(call(Method::GET, "/?added=GITHUB_API_KEY")).await;
    assert!(list.body.contains("Added GITHUB_API_KEY"));
    assert!(list.body.contains("GITHUB_API_KEY"));
    let api = page.send(call(Method::GET, "/api/v1/secrets")).await;
    assert_eq!(api.json()["items"].as_array().unwrap().len(), 5);
    verifier.finish().await;
    page.assert_no_response_holds(&[CANARY]);
}

#[tokio::test]
async fn a_refused_add_shows_the_reason_next_to_the_field_and_keeps_what_was_typed() {
    let mut page = start(settings()).await;
    let denial = "admission webhook \"agentsecrets.agentsecrets.io\" denied the request: owner \"alice\" already has a secret with envName GITHUB_API_KEY in namespace \"sandboxes\": AgentSecret \"alice-gh\"; edit that one or choose another name";
    let verifier = page.verify(
        alice(),
        vec![
            expect(Method::GET, LIST_PATH, recorded_list()),
            expect(
                Method::POST,
                LIST_PATH,
                status_failure(400, "BadRequest", denial),
            )
            .status(400),
        ],
    );
    let (cookie, token) = page.csrf().await;
    // A reserved name is refused by the page itself: no API call.
    let mut c = call(Method::POST, "/secrets").form(&[
        ("env_name", "PATH"),
        ("value", CANARY),
        ("csrf_token", &token),
    ]);
    c.cookie = Some(&cookie);
    let reply = page.send(c).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    let error = field_error(&reply.body, "env_name");
    assert!(error.contains("PATH is reserved"), "{error}");
    // The webhook's refusal, next to the name field, in words; the typed fields are kept.
    let mut c = call(Method::POST, "/secrets").form(&[
        ("env_name", "GITHUB_API_KEY"),
        ("value", CANARY),
        ("description", "typed description"),
        ("csrf_token", &token),
    ]);
    c.cookie = Some(&cookie);
    let reply = page.send(c).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let error = field_error(&reply.body, "env_name");
    assert!(
        error.contains("already has a secret with envName GITHUB_API_KEY"),
        "{error}"
    );
    assert!(reply.body.contains("id=\"error-summary\" role=\"alert\""));
    assert!(reply.body.contains("value=\"GITHUB_API_KEY\""));
    assert!(reply.body.contains("value=\"typed description\""));
    // The value comes back only inside the password field of this one answer.
    assert_eq!(reply.body.matches(CANARY).count(), 1);
    assert!(
        reply
            .body
            .contains(&format!("type=\"password\" value=\"{CANARY}\""))
    );
    verifier.finish().await;
}

/// Text of the `<p id="FIELD-error">` next to a field.
fn field_error(body: &str, field: &str) -> String {
    let marker = format!("id=\"{field}-error\" aria-live=\"polite\">");
    let start = body
        .find(&marker)
        .unwrap_or_else(|| panic!("no {field} error slot"))
        + marker.len();
    let end = body[start..].find("</p>").unwrap();
    body[start..start + end].to_owned()
}

#[tokio::test]
async fn the_edit_form_never_holds_the_value_and_a_blank_value_keeps_it() {
    let mut page = start(settings()).await;
    let verifier = page.verify(
        alice(),
        vec![
            expect(Method::GET, LIST_PATH, recorded_list()),
            expect(Method::GET, LIST_PATH, recorded_list()),
            expect(
                Method::PATCH,
                &object_path("alice-service-0"),
                stored(
                    "alice-service-0",
                    "alice",
                    "SERVICE_0_API_KEY",
                    Some("new words"),
                ),
            )
            .check(|headers, query, body| {
                assert_eq!(headers["content-type"], "application/merge-patch+json");
                assert!(query.contains("fieldManager=agent-secrets"), "{query}");
                assert!(
                    body["spec"].get("value").is_none(),
                    "a blank value must not be sent: {body}"
                );
                assert_eq!(body["spec"]["description"], "new words");
                assert_eq!(body["metadata"]["resourceVersion"], "67466");
                assert!(body["spec"].get("owner").is_none());
            }),
        ],
    );
    let form = page
        .send(call(Method::GET, "/secrets/SERVICE_0_API_KEY/edit"))
        .await;
    assert_eq!(form.status, StatusCode::OK);
    assert!(form.body.contains("Leave blank to keep the current value"));
    assert!(form.body.contains("type=\"password\" value=\"\""));
    assert!(
        form.body
            .contains("value=\"Key 0 for the alice research agent\"")
    );
    let mut c = call(Method::POST, "/secrets/SERVICE_0_API_KEY").form(&[
        ("value", ""),
        ("description", "new words"),
        ("csrf_token", &form.form_token()),
    ]);
    let cookie = form.cookie();
    c.cookie = Some(&cookie);
    let reply = page.send(c).await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", reply.body);
    assert_eq!(reply.headers["location"], "/?updated=SERVICE_0_API_KEY");
    verifier.finish().await;
}

#[tokio::test]
async fn an_edited_value_is_sent_once_and_never_returned() {
    let mut page = start(settings()).await;
    let verifier = page.verify(
        alice(),
        vec![
            expect(Method::GET, LIST_PATH, recorded_list()),
            expect(
                Method::PATCH,
                &object_path("alice-service-3"),
                stored("alice-service-3", "alice", "SERVICE_3_API_KEY", None),
            )
            .check(|_, _, body| {
                assert_eq!(body["spec"]["value"], CANARY_EDIT);
                assert!(
                    body["spec"].get("description").is_none(),
                    "JSON without description keeps it"
                );
            }),
        ],
    );
    let api = page.send(call(Method::GET, "/secrets/new")).await;
    let (cookie, token) = (api.cookie(), api.form_token());
    let mut c = call(Method::PATCH, "/api/v1/secrets/SERVICE_3_API_KEY")
        .json(json!({"value": CANARY_EDIT}));
    c.cookie = Some(&cookie);
    c.csrf_header = Some(&token);
    let reply = page.send(c).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.json()["envName"], "SERVICE_3_API_KEY");
    assert_eq!(reply.json()["value"], "••••••••");
    verifier.finish().await;
    page.assert_no_response_holds(&[CANARY_EDIT]);
}

#[tokio::test]
async fn another_users_secret_cannot_be_opened_edited_or_deleted() {
    let mut page = start(settings()).await;
    let verifier = page.verify(
        alice(),
        vec![
            expect(Method::GET, LIST_PATH, recorded_list()),
            expect(Method::GET, LIST_PATH, recorded_list()),
            expect(Method::GET, LIST_PATH, recorded_list()),
        ],
    );
    // SERVICE_1_API_KEY is bob's.
    let reply = page
        .send(call(Method::GET, "/secrets/SERVICE_1_API_KEY/edit"))
        .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(
        reply
            .body
            .contains("You have no secret named SERVICE_1_API_KEY")
    );
    let (cookie, token) = page.csrf().await;
    let mut c = call(Method::POST, "/secrets/SERVICE_1_API_KEY")
        .form(&[("value", CANARY), ("csrf_token", &token)]);
    c.cookie = Some(&cookie);
    assert_eq!(page.send(c).await.status, StatusCode::NOT_FOUND);
    let mut c = call(Method::POST, "/secrets/SERVICE_1_API_KEY/delete")
        .form(&[("confirm", "SERVICE_1_API_KEY"), ("csrf_token", &token)]);
    c.cookie = Some(&cookie);
    assert_eq!(page.send(c).await.status, StatusCode::NOT_FOUND);
    verifier.finish().await;
    page.assert_no_response_holds(&[CANARY]);
}

#[tokio::test]
async fn delete_needs_confirmation_naming_the_secret() {
    let mut page = start(settings()).await;
    let verifier = page.verify(
        alice(),
        vec![
            expect(Method::GET, LIST_PATH, recorded_list()),
            expect(Method::GET, LIST_PATH, recorded_list()),
            expect(
                Method::DELETE,
                &object_path("alice-service-6"),
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
            )
            .check(|_, _, body| {
                assert_eq!(
                    body["preconditions"]["uid"],
                    "7b316875-1238-4a96-bb23-4671209799b6"
                );
            }),
        ],
    );
    let confirm = page
        .send(call(Method::GET, "/secrets/SERVICE_6_API_KEY/delete"))
        .await;
    assert_eq!(confirm.status, StatusCode::OK);
    assert!(
        confirm
            .body
            .contains("Delete <code>SERVICE_6_API_KEY</code>?")
    );
    assert!(confirm.body.contains(
        "Sandboxes started after you delete it will no longer get <code>SERVICE_6_API_KEY</code>"
    ));
    let (cookie, token) = (confirm.cookie(), confirm.form_token());
    // Without the confirmation field: the question again, nothing deleted.
    let mut c =
        call(Method::POST, "/secrets/SERVICE_6_API_KEY/delete").form(&[("csrf_token", &token)]);
    c.cookie = Some(&cookie);
    let reply = page.send(c).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.body.contains("Nothing was deleted yet"));
    // Confirming another name does not delete this one.
    let mut c = call(Method::POST, "/secrets/SERVICE_6_API_KEY/delete")
        .form(&[("csrf_token", &token), ("confirm", "SERVICE_0_API_KEY")]);
    c.cookie = Some(&cookie);
    assert_eq!(page.send(c).await.status, StatusCode::BAD_REQUEST);
    // The JSON API needs ?confirm=true.
    let mut c = call(Method::DELETE, "/api/v1/secrets/SERVICE_6_API_KEY");
    c.cookie = Some(&cookie);
    c.csrf_header = Some(&token);
    let reply = page.send(c).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.body.contains("confirm=true"));
    // Confirmed.
    let mut c = call(Method::POST, "/secrets/SERVICE_6_API_KEY/delete")
        .form(&[("csrf_token", &token), ("confirm", "SERVICE_6_API_KEY")]);
    c.cookie = Some(&cookie);
    let reply = page.send(c).await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", reply.body);
    assert_eq!(reply.headers["location"], "/?deleted=SERVICE_6_API_KEY");
    verifier.finish().await;
}

#[tokio::test]
async fn the_json_api_adds_and_deletes_without_returning_values() {
    let mut page = start(settings()).await;
    let created = stored("alice-db-password-abcde", "alice", "DB_PASSWORD", None);
    let mut after = recorded_list();
    after["items"].as_array_mut().unwrap().push(created.clone());
    let verifier = page.verify(
        alice(),
        vec![
            expect(Method::GET, LIST_PATH, recorded_list()),
            expect(Method::GET, LIST_PATH, recorded_list()),
            expect(Method::POST, LIST_PATH, created)
                .status(201)
                .check(|_, _, body| {
                    assert_eq!(body["spec"]["owner"], "alice");
                    assert_eq!(body["spec"]["value"], CANARY);
                }),
            expect(Method::GET, LIST_PATH, after),
            expect(
                Method::DELETE,
                &object_path("alice-db-password-abcde"),
                json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}),
            ),
        ],
    );
    let list = page.send(call(Method::GET, "/api/v1/secrets")).await;
    let token = list.headers["x-csrf-token"].to_str().unwrap().to_owned();
    let cookie = list.cookie();
    // A body that is not the expected shape is refused without quoting it.
    let mut c = call(Method::POST, "/api/v1/secrets")
        .json(json!({"envName": "DB_PASSWORD", "value": CANARY, "owner": "bob"}));
    c.cookie = Some(&cookie);
    c.csrf_header = Some(&token);
    let reply = page.send(c).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let mut c = call(Method::POST, "/api/v1/secrets")
        .json(json!({"envName": "DB_PASSWORD", "value": CANARY}));
    c.cookie = Some(&cookie);
    c.csrf_header = Some(&token);
    let reply = page.send(c).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(reply.json()["envName"], "DB_PASSWORD");
    let mut c = call(Method::DELETE, "/api/v1/secrets/DB_PASSWORD?confirm=true");
    c.cookie = Some(&cookie);
    c.csrf_header = Some(&token);
    assert_eq!(page.send(c).await.status, StatusCode::NO_CONTENT);
    verifier.finish().await;
    page.assert_no_response_holds(&[CANARY]);
}

#[tokio::test]
async fn api_server_refusals_are_explained_and_never_quote_the_value() {
    let mut page = start(settings()).await;
    let forbidden = "agentsecrets.agentsecrets.io is forbidden: User \"alice\" cannot create resource \"agentsecrets\" in API group \"agentsecrets.io\" in the namespace \"sandboxes\"";
    let echoed = format!(
        "AgentSecret.agentsecrets.io \"x\" is invalid: spec.value: Invalid value: \"{CANARY}\": too odd"
    );
    let verifier = page.verify(
        alice(),
        vec![
            expect(Method::GET, LIST_PATH, list_of(vec![])),
            expect(
                Method::POST,
                LIST_PATH,
                status_failure(403, "Forbidden", forbidden),
            )
            .status(403),
            expect(Method::GET, LIST_PATH, list_of(vec![])),
            expect(
                Method::POST,
                LIST_PATH,
                status_failure(422, "Invalid", &echoed),
            )
            .status(422),
        ],
    );
    let list = page.send(call(Method::GET, "/secrets/new")).await;
    let (cookie, token) = (list.cookie(), list.form_token());
    let mut c = call(Method::POST, "/api/v1/secrets")
        .json(json!({"envName": "DB_PASSWORD", "value": CANARY}));
    c.cookie = Some(&cookie);
    c.csrf_header = Some(&token);
    let reply = page.send(c).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let message = reply.json()["errors"][0]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("You are not allowed to do this in namespace sandboxes"),
        "{message}"
    );
    let mut c = call(Method::POST, "/api/v1/secrets")
        .json(json!({"envName": "DB_PASSWORD", "value": CANARY}));
    c.cookie = Some(&cookie);
    c.csrf_header = Some(&token);
    let reply = page.send(c).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reply.json()["errors"][0]["field"], "value");
    assert!(reply.body.contains("••••••••"), "{}", reply.body);
    verifier.finish().await;
    page.assert_no_response_holds(&[CANARY]);
}

#[tokio::test]
async fn every_answer_carries_the_security_headers_and_oversized_bodies_are_refused() {
    let mut page = start(settings()).await;
    let verifier = page.verify(
        alice(),
        vec![expect(Method::GET, LIST_PATH, recorded_list())],
    );
    let mut anonymous = call(Method::GET, "/");
    anonymous.user = None;
    for reply in [
        page.send(call(Method::GET, "/")).await,
        page.send(call(Method::GET, "/secrets/new")).await,
        page.send(anonymous).await,
        page.send(call(Method::GET, "/static/app.js")).await,
        page.send(call(Method::GET, "/nowhere")).await,
    ] {
        let h = &reply.headers;
        assert_eq!(h["cache-control"], "no-store");
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("default-src 'self'")
                && csp.contains("script-src 'self'")
                && !csp.contains("unsafe-inline"),
            "{csp}"
        );
        assert!(csp.contains("frame-ancestors 'none'"));
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["referrer-policy"], "no-referrer");
    }
    let form = page.send(call(Method::GET, "/secrets/new")).await;
    let cookie = form.headers["set-cookie"].to_str().unwrap();
    assert!(cookie.starts_with("__Host-agentsecrets-csrf="), "{cookie}");
    for attribute in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    // No inline script anywhere: only the embedded file.
    assert!(!form.body.contains("<script>"));
    assert!(
        form.body
            .contains("<script src=\"/static/app.js\" defer></script>")
    );
    let (cookie, token) = (form.cookie(), form.form_token());
    let huge = "x".repeat(BODY_LIMIT + 1);
    let mut c = call(Method::POST, "/secrets").form(&[
        ("env_name", "BIG"),
        ("value", &huge),
        ("csrf_token", &token),
    ]);
    c.cookie = Some(&cookie);
    assert_eq!(page.send(c).await.status, StatusCode::PAYLOAD_TOO_LARGE);
    verifier.finish().await;
}

#[tokio::test]
async fn live_validation_uses_the_servers_rule() {
    let mut page = start(settings()).await;
    let verifier = page.verify(alice(), vec![]);
    let check = |name: &'static str| {
        page.send(call(
            Method::GET,
            Box::leak(format!("/api/v1/env-names/check?name={name}").into_boxed_str()),
        ))
    };
    let ok = check("GITHUB_API_KEY").await.json();
    assert_eq!(ok, json!({"valid": true, "message": null}));
    let reserved = check("LD_PRELOAD").await.json();
    assert_eq!(reserved["valid"], false);
    assert!(reserved["message"].as_str().unwrap().contains("reserved"));
    let lower = check("github_token").await.json();
    assert_eq!(lower["message"], "Use uppercase letters: GITHUB_TOKEN.");
    let form = page.send(call(Method::GET, "/secrets/new")).await;
    assert!(form.body.contains("not starting with a digit"));
    assert!(form.body.contains("PATH"));
    verifier.finish().await;
}

/// Collects everything logged on this thread.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn values_never_reach_the_logs_even_at_trace_level() {
    // SAFETY of the test: RUST_LOG must not narrow what is captured.
    assert!(
        std::env::var_os("RUST_LOG").is_none(),
        "run this test without RUST_LOG"
    );
    // A current-thread runtime: the page, the client and this test all log on this thread.
    let logs = LogBuffer::default();
    let writer = logs.clone();
    // The page's own filter, asked for everything.
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(agent_secrets::ui::log_filter("trace"))
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut page = start(settings()).await;
    let created = stored("alice-db-password-x1", "alice", "DB_PASSWORD", None);
    let denial = format!(
        "AgentSecret.agentsecrets.io \"x\" is invalid: spec.value: Invalid value: \"{CANARY_EDIT}\""
    );
    let verifier = page.verify(
        alice(),
        vec![
            expect(Method::GET, LIST_PATH, recorded_list()),
            expect(Method::POST, LIST_PATH, created.clone()).status(201),
            expect(Method::GET, LIST_PATH, list_of(vec![created.clone()])),
            expect(
                Method::PATCH,
                &object_path("alice-db-password-x1"),
                status_failure(422, "Invalid", &denial),
            )
            .status(422),
        ],
    );
    let (cookie, token) = page.csrf().await;
    let mut c = call(Method::POST, "/secrets").form(&[
        ("env_name", "DB_PASSWORD"),
        ("value", CANARY),
        ("csrf_token", &token),
    ]);
    c.cookie = Some(&cookie);
    assert_eq!(page.send(c).await.status, StatusCode::SEE_OTHER);
    let mut c = call(Method::POST, "/secrets/DB_PASSWORD").form(&[
        ("value", CANARY_EDIT),
        ("description", ""),
        ("csrf_token", &token),
    ]);
    c.cookie = Some(&cookie);
    assert_eq!(page.send(c).await.status, StatusCode::UNPROCESSABLE_ENTITY);
    verifier.finish().await;

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("secret added"), "the page logged: {text}");
    assert!(text.contains("DB_PASSWORD"));
    for value in [CANARY, CANARY_EDIT] {
        assert!(
            !text.contains(value),
            "{value} in the logs: {}",
            text.lines()
                .filter(|l| l.contains(value))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
