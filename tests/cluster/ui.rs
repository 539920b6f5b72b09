//! The Secrets page against a real API server, with the webhook of this process sealing
//! values: two users, each impersonated by the page, neither sees nor changes the other's
//! secrets, and a user without RBAC is refused by the API server itself (which shows that the
//! page acts as the user, not as its own credentials). Run with the rest of
//! `tests/cluster.rs` (needs `AGENTSECRETS_TEST_WEBHOOK_HOST`).

use super::unique;
use super::webhook::Webhook;
use agent_secrets::api::AgentSecret;
use agent_secrets::ui::config::{NamespaceRule, Settings};
use agent_secrets::ui::csrf::CsrfKey;
use agent_secrets::ui::server::{Shared, UiState, router};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};
use std::net::SocketAddr;

/// The page, served on a loopback port with the test's own (cluster-admin) credentials as
/// its shared client; every call it makes is impersonated.
async fn start_page(client: kube::Client, namespace: &str) -> SocketAddr {
    let state = UiState::new(Shared {
        settings: Settings::for_loopback_proxy(NamespaceRule::Fixed(namespace.to_owned())),
        client,
        csrf: CsrfKey::generate().unwrap(),
        tls: false,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A signed-in user of the page: their CSRF cookie and token, as a browser would hold them.
struct User {
    addr: SocketAddr,
    name: &'static str,
    cookie: String,
    token: String,
}

impl User {
    async fn sign_in(addr: SocketAddr, name: &'static str) -> Self {
        let mut user = Self {
            addr,
            name,
            cookie: String::new(),
            token: String::new(),
        };
        let (status, headers, _) = user.send("GET", "/api/v1/secrets", None).await;
        assert_eq!(status, 200, "{name} signs in");
        user.token = headers["x-csrf-token"].to_str().unwrap().to_owned();
        user.cookie = headers["set-cookie"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        user
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, http::HeaderMap, String) {
        let stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "secrets.test")
            .header("x-forwarded-user", self.name)
            .header("x-forwarded-groups", "sandbox-users");
        if !self.cookie.is_empty() {
            request = request
                .header("cookie", &self.cookie)
                .header("x-csrf-token", &self.token);
        }
        let bytes = match body {
            Some(body) => {
                request = request.header("content-type", "application/json");
                serde_json::to_vec(&body).unwrap()
            }
            None => Vec::new(),
        };
        let response = sender
            .send_request(request.body(Full::new(Bytes::from(bytes))).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    async fn env_names(&self) -> Vec<String> {
        let (status, _, body) = self.send("GET", "/api/v1/secrets", None).await;
        assert_eq!(status, 200, "{body}");
        let list: Value = serde_json::from_str(&body).unwrap();
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                assert_eq!(i["owner"], self.name, "{} sees only their own", self.name);
                i["envName"].as_str().unwrap().to_owned()
            })
            .collect()
    }
}

/// RBAC for `users` on AgentSecrets in `ns` (what a platform grants its users).
async fn grant_agentsecrets(client: &kube::Client, ns: &str, users: &[&str]) {
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "secrets-page-users"},
        "rules": [{"apiGroups": ["agentsecrets.io"], "resources": ["agentsecrets"],
                   "verbs": ["get", "list", "watch", "create", "patch", "delete"]}]
    }))
    .unwrap();
    Api::<Role>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let subjects: Vec<Value> = users
        .iter()
        .map(|u| json!({"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": u}))
        .collect();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "secrets-page-users"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "secrets-page-users"},
        "subjects": subjects,
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn two_users_of_the_page_neither_see_nor_change_each_others_secrets() {
    let webhook = Webhook::start(1).await;
    let ns = webhook.ns().to_owned();
    grant_agentsecrets(&webhook.client, &ns, &["alice", "bob"]).await;
    let addr = start_page(webhook.client.clone(), &ns).await;
    let alice = User::sign_in(addr, "alice").await;
    let bob = User::sign_in(addr, "bob").await;
    let alice_value = unique("cluster-ui-canary-alice");
    let bob_value = unique("cluster-ui-canary-bob");
    let mut bodies = Vec::new();

    // Both add a secret of the same name; each is stored sealed, for its own owner.
    for (user, value) in [(&alice, &alice_value), (&bob, &bob_value)] {
        let (status, _, body) = user
            .send(
                "POST",
                "/api/v1/secrets",
                Some(json!({"envName": "X_BEARER_TOKEN", "value": value, "description": "X API"})),
            )
            .await;
        assert_eq!(status, 201, "{}: {body}", user.name);
        bodies.push(body);
    }
    let stored = Api::<AgentSecret>::namespaced(webhook.client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    let probe = stored.iter().filter(|s| s.spec.owner == "probe").count();
    assert_eq!(stored.len() - probe, 2);
    for (owner, value) in [("alice", &alice_value), ("bob", &bob_value)] {
        let object = stored.iter().find(|s| s.spec.owner == owner).unwrap();
        webhook
            .assert_sealed(&ns, &object.metadata.name.clone().unwrap(), value)
            .await;
    }

    // Each lists only their own.
    assert_eq!(alice.env_names().await, ["X_BEARER_TOKEN"]);
    assert_eq!(bob.env_names().await, ["X_BEARER_TOKEN"]);

    // Bob edits and deletes only his own; alice's is untouched.
    let (status, _, body) = bob
        .send(
            "PATCH",
            "/api/v1/secrets/X_BEARER_TOKEN",
            Some(json!({"description": "bob's"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = bob
        .send(
            "DELETE",
            "/api/v1/secrets/X_BEARER_TOKEN?confirm=true",
            None,
        )
        .await;
    assert_eq!(status, 204, "{body}");
    assert!(bob.env_names().await.is_empty());
    let (status, _, body) = bob
        .send(
            "PATCH",
            "/api/v1/secrets/X_BEARER_TOKEN",
            Some(json!({"value": "bob-overwrite"})),
        )
        .await;
    assert_eq!(status, 404, "bob cannot reach alice's secret: {body}");
    let alice_object = Api::<AgentSecret>::namespaced(webhook.client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|s| s.spec.owner == "alice")
        .expect("alice's secret survives bob's deletes");
    assert_eq!(alice_object.spec.description.as_deref(), Some("X API"));
    webhook
        .assert_sealed(
            &ns,
            &alice_object.metadata.name.clone().unwrap(),
            &alice_value,
        )
        .await;
    assert_eq!(alice.env_names().await, ["X_BEARER_TOKEN"]);

    // Carol has no RBAC here: the API server refuses her, although the page's own
    // credentials could do anything.
    let carol = User {
        addr,
        name: "carol",
        cookie: String::new(),
        token: String::new(),
    };
    let (status, _, body) = carol.send("GET", "/api/v1/secrets", None).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not allowed"), "{body}");
    bodies.push(body);

    for body in bodies {
        assert!(
            !body.contains(&alice_value) && !body.contains(&bob_value),
            "{body}"
        );
    }
}
