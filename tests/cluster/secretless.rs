//! Secretless sandboxes on a real API server: an owner, impersonated as an ordinary user,
//! stores a secret bound to a host and creates a secretless sandbox pod; the stored pod runs
//! the proxy as a native sidecar and holds placeholders only. Needs Kubernetes 1.29+ (native
//! sidecars) and the rights of the other webhook tests plus impersonation of users.

use super::webhook::Webhook;
use super::{agentsecret, eventually, sandbox_pod, unique, with_value};
use agent_secrets::api::{
    INJECTED_ANNOTATION, MODE_ANNOTATION, PROXY_CONTAINER_NAME, PROXY_PLACEHOLDERS_ENV,
    SECRET_NAME_ANNOTATION, SECRETLESS_ANNOTATION,
};
use agent_secrets::webhook::pod::secretless::feed_url;
use agent_secrets::webhook::pod::{FeedCa, SecretlessPolicy};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt as _};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const FEED_CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBclustertest\n-----END CERTIFICATE-----\n";

/// A client acting as the ordinary user `user`.
async fn as_user(user: &str) -> Client {
    let mut config = kube::Config::infer().await.unwrap();
    config.auth_info.impersonate = Some(user.to_owned());
    config.auth_info.impersonate_groups = Some(vec!["system:authenticated".to_owned()]);
    Client::try_from(config).unwrap()
}

/// `user` may work with pods and AgentSecrets in `ns`.
async fn grant(admin: &Client, ns: &str, user: &str) {
    let verbs = json!([
        "get", "list", "watch", "create", "update", "patch", "delete"
    ]);
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "secretless-users"},
        "rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": verbs},
            {"apiGroups": ["agentsecrets.io"], "resources": ["agentsecrets"], "verbs": verbs}
        ]
    }))
    .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "secretless-users"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "secretless-users"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
    }))
    .unwrap();
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
}

fn env_of(container: &Value) -> BTreeMap<String, Value> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e.clone()))
        .collect()
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn a_users_secretless_pod_is_stored_with_the_proxy_sidecar_and_placeholders_only() {
    let webhook = Webhook::start_with(1, |policy| {
        policy.secretless = SecretlessPolicy {
            proxy_image: Some("registry.k8s.io/pause:3.10".into()),
            feed_url: Some(feed_url("agent-secrets.agent-secrets.svc")),
            feed_ca: FeedCa::Pem(Arc::from(FEED_CA)),
            ..SecretlessPolicy::default()
        };
    })
    .await;
    let ns = webhook.ns().to_owned();
    grant(&webhook.client, &ns, "alice").await;
    let alice = as_user("alice").await;
    let value = unique("cluster-canary-secretless");

    // alice stores her token, bound to api.x.com; the webhook seals it for those hosts.
    let mut object = with_value(
        agentsecret(&ns, "x-token", "alice", "X_BEARER_TOKEN"),
        &value,
    );
    object.spec.allowed_hosts = Some(vec!["api.x.com".into()]);
    object.spec.inject_as = Some(vec!["header:Authorization".into()]);
    let agentsecrets = Api::namespaced(alice.clone(), &ns);
    let rbac_ready = eventually(
        "alice may create AgentSecrets",
        Duration::from_secs(30),
        || {
            let (agentsecrets, object) = (agentsecrets.clone(), object.clone());
            async move {
                agentsecrets
                    .create(&PostParams::default(), &object)
                    .await
                    .map_err(|e| e.to_string())
            }
        },
    )
    .await;
    assert_eq!(
        rbac_ready.spec.allowed_hosts.as_deref(),
        Some(&["api.x.com".to_owned()][..])
    );
    webhook.assert_sealed(&ns, "x-token", &value).await;
    webhook
        .wait_for_cache(&ns, "alice", &["X_BEARER_TOKEN"])
        .await;

    // alice creates a secretless sandbox.
    let mut pod = sandbox_pod("sandbox-secretless", Some("alice"));
    pod.metadata.annotations = Some(BTreeMap::from([(
        MODE_ANNOTATION.to_owned(),
        "secretless".to_owned(),
    )]));
    let pods: Api<Pod> = Api::namespaced(alice, &ns);
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let stored = Api::<Pod>::namespaced(webhook.client.clone(), &ns)
        .get("sandbox-secretless")
        .await
        .unwrap();
    let text = serde_json::to_string(&stored).unwrap();
    assert!(!text.contains(&value), "the value is in the stored pod");
    assert!(!text.contains("secretKeyRef"), "{text}");
    let stored = serde_json::to_value(&stored).unwrap();

    let proxy = &stored["spec"]["initContainers"][0];
    assert_eq!(proxy["name"], PROXY_CONTAINER_NAME);
    assert_eq!(proxy["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(proxy["args"][0], "proxy");
    assert_eq!(
        proxy["args"][4],
        "--feed-url=https://agent-secrets.agent-secrets.svc:8444/v1/feed"
    );
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/readyz");
    let placeholders: BTreeMap<String, String> = serde_json::from_str(
        env_of(proxy)[PROXY_PLACEHOLDERS_ENV]["value"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let placeholder = &placeholders["X_BEARER_TOKEN"];
    assert!(placeholder.starts_with("asec_ph_"), "{placeholder}");

    let sandbox = &stored["spec"]["containers"][0];
    let env = env_of(sandbox);
    assert_eq!(env["X_BEARER_TOKEN"]["value"], placeholder.as_str());
    assert_eq!(env["HTTPS_PROXY"]["value"], "http://127.0.0.1:15080");
    assert_eq!(
        env["SSL_CERT_FILE"]["value"],
        "/var/run/agentsecrets/ca/ca-bundle.pem"
    );
    let mounts = sandbox["volumeMounts"].as_array().unwrap();
    assert!(mounts.iter().any(|m| m["name"] == "agentsecrets-ca"
        && m["readOnly"] == true
        && m["mountPath"] == "/var/run/agentsecrets/ca"));
    let volumes = stored["spec"]["volumes"].as_array().unwrap();
    let token = volumes
        .iter()
        .find(|v| v["name"] == "agentsecrets-feed-token")
        .unwrap();
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "agentsecrets.io/feed"
    );

    let annotations = &stored["metadata"]["annotations"];
    assert_eq!(annotations[INJECTED_ANNOTATION], "X_BEARER_TOKEN");
    assert_eq!(annotations[SECRETLESS_ANNOTATION], "X_BEARER_TOKEN");
    assert!(annotations.get(SECRET_NAME_ANNOTATION).is_none());
    // No value was written anywhere: no pod-scoped Secret exists.
    let pod_scoped = Api::<Secret>::namespaced(webhook.client.clone(), &ns)
        .list(&ListParams::default().labels("agentsecrets.io/pod-scoped=true"))
        .await
        .unwrap();
    assert!(
        pod_scoped.items.is_empty(),
        "{:?}",
        pod_scoped
            .items
            .iter()
            .map(|s| s.name_any())
            .collect::<Vec<_>>()
    );

    // The operator's value feed, in this process, against the real API server: a token the
    // API server issues for the stored pod (as the kubelet would project it) is reviewed by
    // it, the pod is read back, and alice's value reaches the proxy's source; deleting the
    // AgentSecret takes it away again.
    let dir = tempfile::tempdir().unwrap();
    let tls = crate::feed_kit::feed_tls(dir.path());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let feed_addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let state = agent_secrets::feed::FeedState::new(
        webhook.client.clone(),
        webhook.index.clone(),
        agent_secrets::crypto::KeyringHandle::new(
            agent_secrets::crypto::Keyring::from_yaml(&webhook.keyring.to_yaml().unwrap()).unwrap(),
        ),
        agent_secrets::feed::FeedSettings::default(),
        Arc::new(agent_secrets::telemetry::Metrics::default()),
        stop.clone(),
    );
    tokio::spawn(agent_secrets::feed::serve_feed(
        listener,
        agent_secrets::webhook::tls::load(&tls.cert, &tls.key, None).unwrap(),
        state,
        stop.clone().cancelled_owned(),
    ));
    let token_request = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": [agent_secrets::api::FEED_AUDIENCE],
            "expirationSeconds": 600,
            "boundObjectRef": {
                "apiVersion": "v1", "kind": "Pod",
                "name": "sandbox-secretless", "uid": stored["metadata"]["uid"]
            }
        }
    });
    let issued: Value =
        Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(webhook.client.clone(), &ns)
            .create_subresource(
                "token",
                stored["spec"]["serviceAccountName"]
                    .as_str()
                    .unwrap_or("default"),
                &PostParams::default(),
                &token_request,
            )
            .await
            .unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, issued["status"]["token"].as_str().unwrap()).unwrap();
    let config = agent_secrets::secretless::FeedConfig::new(
        agent_secrets::secretless::feed_client::parse_url(&format!(
            "https://{feed_addr}{}",
            agent_secrets::api::FEED_PATH
        ))
        .unwrap(),
        token_file,
        agent_secrets::secretless::feed_client::parse_ca(tls.ca_pem.as_bytes()).unwrap(),
    );
    let source_stop = tokio_util::sync::CancellationToken::new();
    let source = agent_secrets::secretless::FeedSource::spawn(config, source_stop.clone()).unwrap();
    let mut snapshots = agent_secrets::secretless::ValueSource::watch(source.as_ref());
    let holds_value = |snapshot: &agent_secrets::secretless::Snapshot, value: &str| {
        snapshot
            .entries()
            .iter()
            .any(|e| e.placeholder == *placeholder && e.value.expose() == value)
    };
    tokio::time::timeout(
        Duration::from_secs(10),
        snapshots.wait_for(|s| holds_value(s, &value)),
    )
    .await
    .expect("the feed did not serve alice's value to her pod's proxy within 10 s")
    .unwrap();

    Api::<agent_secrets::api::AgentSecret>::namespaced(webhook.client.clone(), &ns)
        .delete("x-token", &Default::default())
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        snapshots.wait_for(|s| s.unusable_reason().is_none() && !holds_value(s, &value)),
    )
    .await
    .expect("the deleted secret is still served after 10 s")
    .unwrap();
    source_stop.cancel();
    stop.cancel();
}
