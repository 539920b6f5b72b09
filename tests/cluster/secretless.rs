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
}
