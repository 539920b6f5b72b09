//! The packaged artefacts agree with the binary: the chart's CRD copy is the generated CRD,
//! the manifests' container args are flags the binary accepts, the operator is told to own the
//! very Secrets and webhook configuration the manifests mount and ship (with the rights for it),
//! the `helm test` review is one the webhook admits, and no static file carries key material.
//! (The chart itself is linted and rendered with real Helm by `hack/helm.py`.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common {
    pub mod client;
    pub mod fixtures;
    pub mod serve;
    pub mod server;
}

use agent_secrets::bootstrap::{CA_CRT, KEYRING_KEY, TLS_CRT, TLS_KEY};
use clap::Parser as _;
use serde::Deserialize as _;
use serde_yaml::Value;
use std::path::Path;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(Value::deserialize)
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn chart_crd_copy_matches_the_generated_crd() {
    assert!(
        read("charts/agent-secrets/crds/agentsecrets.yaml") == read("crds/agentsecrets.yaml"),
        "charts/agent-secrets/crds/agentsecrets.yaml is stale: copy crds/agentsecrets.yaml there and run `python3 hack/helm.py render`"
    );
    let manifests = documents(&read("manifests/crds.yaml"));
    let generated = documents(&read("crds/agentsecrets.yaml"));
    assert_eq!(manifests, generated, "manifests/crds.yaml is stale");
}

#[test]
fn manifest_container_args_are_accepted_by_the_binary() {
    let docs = documents(&read("manifests/agent-secrets.yaml"));
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let cli = agent_secrets::cli::Cli::try_parse_from(
        std::iter::once("agentsecrets".to_owned()).chain(args.clone()),
    )
    .unwrap_or_else(|e| panic!("the binary rejects the manifests' args {args:?}: {e}"));
    let agent_secrets::cli::Command::Run(run) = cli.command else {
        panic!("the container does not run `agentsecrets run`");
    };
    assert_eq!(run.webhook_addr.port(), 8443);
    assert_eq!(run.admin_addr.port(), 8080);
    assert!(
        run.policy
            .excluded_namespaces
            .contains(&"kube-system".to_owned())
    );
    // Probes hit the admin port the binary serves them on.
    let probe_port = &container["readinessProbe"]["httpGet"]["port"];
    let ports = container["ports"].as_sequence().unwrap();
    let admin = ports
        .iter()
        .find(|p| &p["name"] == probe_port || &p["containerPort"] == probe_port)
        .expect("the readiness probe names a container port");
    assert_eq!(admin["containerPort"], 8080);
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
}

#[test]
fn webhooks_call_the_paths_the_server_serves() {
    let docs = documents(&read("manifests/agent-secrets.yaml"));
    let config = docs
        .iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .unwrap();
    let mut paths: Vec<&str> = config["webhooks"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|w| w["clientConfig"]["service"]["path"].as_str().unwrap())
        .collect();
    paths.sort_unstable();
    assert_eq!(paths, ["/mutate/agentsecrets", "/mutate/pods"]);
    for webhook in config["webhooks"].as_sequence().unwrap() {
        assert_eq!(webhook["failurePolicy"], "Fail");
        assert_eq!(webhook["sideEffects"], "NoneOnDryRun");
        let pods = webhook["clientConfig"]["service"]["path"] == "/mutate/pods";
        if pods {
            assert_eq!(
                webhook["rules"][0]["operations"],
                Value::from(vec!["CREATE"])
            );
            assert_eq!(
                webhook["objectSelector"]["matchExpressions"][0]["key"],
                "agentsecrets.io/owner"
            );
        }
    }
}

#[test]
fn static_files_carry_no_key_material() {
    for path in ["manifests/agent-secrets.yaml", "manifests/crds.yaml"] {
        let text = read(path);
        assert!(!text.contains("PRIVATE KEY"), "{path} embeds a private key");
        assert!(!text.contains("keyring.yaml:"), "{path} embeds a keyring");
        for doc in documents(&text) {
            assert_ne!(doc["kind"], "Secret", "{path} ships a Secret");
            let api = doc["apiVersion"].as_str().unwrap();
            assert!(
                !api.starts_with("cert-manager.io/"),
                "{path} needs cert-manager: {api}"
            );
        }
    }
}

fn flag(args: &[String], name: &str) -> Option<String> {
    let prefix = format!("--{name}=");
    args.iter()
        .find_map(|a| a.strip_prefix(&prefix).map(str::to_owned))
}

fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the manifests"))
}

/// The Deployment's args name the keyring Secret, the TLS Secret, the Service and the webhook
/// configuration the operator must own, and those are exactly the objects the manifests mount
/// and ship; the mounts take the keys the operator writes; the webhook configuration leaves
/// its caBundle to the operator; RBAC grants the bootstrap calls and nothing wider.
#[test]
fn the_operator_owns_the_keyring_and_certificate_the_manifests_mount() {
    let docs = documents(&read("manifests/agent-secrets.yaml"));
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    let args: Vec<String> = pod["containers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let keyring_secret = flag(&args, "keyring-secret").expect("--keyring-secret");
    let tls_secret = flag(&args, "tls-secret").expect("--tls-secret");
    let service = flag(&args, "webhook-service").expect("--webhook-service");
    let configuration = flag(&args, "webhook-configuration").expect("--webhook-configuration");
    assert!(flag(&args, "initial-key-id").is_some_and(|id| !id.is_empty()));

    let volume = |secret: &str| {
        pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["secret"]["secretName"] == secret)
            .unwrap_or_else(|| panic!("Secret {secret} is not mounted"))
            .clone()
    };
    let keys = |v: &Value| -> Vec<String> {
        v["secret"]["items"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|i| i["key"].as_str().unwrap().to_owned())
            .collect()
    };
    let keyring_volume = volume(&keyring_secret);
    let tls_volume = volume(&tls_secret);
    // Both are written after the pod starts: a required volume would keep it from starting.
    assert_eq!(keyring_volume["secret"]["optional"], true);
    assert_eq!(tls_volume["secret"]["optional"], true);
    assert_eq!(keys(&keyring_volume), [KEYRING_KEY]);
    assert_eq!(keys(&tls_volume), [TLS_CRT, TLS_KEY, CA_CRT]);
    assert_eq!(
        flag(&args, "keyring"),
        Some(format!("/etc/agentsecrets/keyring/{KEYRING_KEY}"))
    );

    named(&docs, "Service", &service);
    let webhooks = named(&docs, "MutatingWebhookConfiguration", &configuration);
    for webhook in webhooks["webhooks"].as_sequence().unwrap() {
        assert!(
            webhook["clientConfig"].get("caBundle").is_none(),
            "a rendered caBundle would be applied over the operator's"
        );
        assert_eq!(webhook["clientConfig"]["service"]["name"], service.as_str());
    }

    let bootstrap = docs
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["name"] == "agent-secrets-bootstrap")
        .expect("the bootstrap Role");
    let rules: Vec<(Vec<String>, Vec<String>)> = bootstrap["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["resources"], Value::from(vec!["secrets"]));
            let strings = |v: &Value| -> Vec<String> {
                v.as_sequence()
                    .map(|s| s.iter().map(|x| x.as_str().unwrap().to_owned()).collect())
                    .unwrap_or_default()
            };
            (strings(&r["verbs"]), strings(&r["resourceNames"]))
        })
        .collect();
    assert_eq!(
        rules,
        [
            (vec!["create".to_owned()], vec![]),
            (
                vec!["get".to_owned()],
                vec![keyring_secret.clone(), tls_secret.clone()]
            ),
            (vec!["update".to_owned()], vec![tls_secret.clone()]),
        ]
    );
    let cluster_role = named(&docs, "ClusterRole", "agent-secrets");
    let webhook_rules: Vec<&Value> = cluster_role["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|r| r["resources"] == Value::from(vec!["mutatingwebhookconfigurations"]))
        .collect();
    assert_eq!(webhook_rules.len(), 1);
    assert_eq!(
        webhook_rules[0]["resourceNames"],
        Value::from(vec![configuration])
    );
    assert_eq!(webhook_rules[0]["verbs"], Value::from(vec!["get", "patch"]));
}

/// The secretless value feed: the binary listens where the container port `feed` is, the
/// Service exposes it as `feed` 8444, and RBAC grants what the feed calls (TokenReview create,
/// pod get) and nothing wider.
#[test]
fn the_feed_port_and_its_rbac_match_what_the_binary_serves_and_calls() {
    let docs = documents(&read("manifests/agent-secrets.yaml"));
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let cli = agent_secrets::cli::Cli::try_parse_from(
        std::iter::once("agentsecrets".to_owned()).chain(args),
    )
    .unwrap();
    let agent_secrets::cli::Command::Run(run) = cli.command else {
        panic!("the container does not run `agentsecrets run`");
    };
    let agent_secrets::feed::FeedListen::On(listen) = run.feed_listen else {
        panic!("the manifests turn the feed off");
    };
    let port = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "feed")
        .expect("a container port named feed");
    assert_eq!(port["containerPort"], u64::from(listen.port()));
    let service = docs.iter().find(|d| d["kind"] == "Service").unwrap();
    let exposed = service["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "feed")
        .expect("a Service port named feed");
    assert_eq!(exposed["port"], 8444);
    assert_eq!(exposed["targetPort"], "feed");

    let granted = |group, resource| cluster_role_verbs(&docs, group, resource);
    assert_eq!(granted("authentication.k8s.io", "tokenreviews"), ["create"]);
    assert_eq!(granted("", "pods"), ["list", "watch", "get"]);
}

/// The verbs the operator's ClusterRole grants on `resource` of `group`.
fn cluster_role_verbs(docs: &[Value], group: &str, resource: &str) -> Vec<String> {
    let cluster_role = named(docs, "ClusterRole", "agent-secrets");
    cluster_role["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|r| {
            r["apiGroups"] == Value::from(vec![group])
                && r["resources"] == Value::from(vec![resource])
        })
        .flat_map(|r| r["verbs"].as_sequence().unwrap().iter())
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// The controller reads an AgentSecret its cache cannot vouch for (get), watches them all and
/// patches re-wrapped or sealed values and statuses; users own their AgentSecrets, so nothing
/// creates, updates or deletes one.
#[test]
fn the_operator_may_read_watch_and_patch_agentsecrets_only() {
    let docs = documents(&read("manifests/agent-secrets.yaml"));
    assert_eq!(
        cluster_role_verbs(&docs, "agentsecrets.io", "agentsecrets"),
        ["get", "list", "watch", "patch"]
    );
    assert_eq!(
        cluster_role_verbs(&docs, "agentsecrets.io", "agentsecrets/status"),
        ["patch"]
    );
}

/// `helm test` posts charts/agent-secrets/files/helm-test-review.json to /mutate/pods over TLS
/// and passes when the answer allows it under the same uid: the real webhook server does.
#[tokio::test]
async fn the_helm_test_review_is_admitted_by_the_webhook_over_tls() {
    let body = read("charts/agent-secrets/files/helm-test-review.json");
    let review: serde_json::Value = serde_json::from_str(&body).unwrap();
    let uid = review["request"]["uid"].as_str().unwrap();
    let server = common::serve::serve(common::fixtures::fixture_policy()).await;
    // Shaped as the API server sends a dry-run pod review.
    let (path, recorded) = common::fixtures::fixture("pod_create_server_dry_run.json");
    assert_eq!(path, "/mutate/pods");
    assert_eq!(review["apiVersion"], recorded["apiVersion"]);
    assert_eq!(review["request"]["kind"], recorded["request"]["kind"]);
    assert_eq!(review["request"]["dryRun"], recorded["request"]["dryRun"]);
    let answer = server.review(&path, &review).await;
    assert_eq!(answer["response"]["uid"], uid);
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
    assert!(
        answer["response"].get("patch").is_none(),
        "nothing is injected: {answer}"
    );
    assert!(server.created().is_empty(), "a dry run creates nothing");
    let metrics = server.state.metrics.encode();
    assert!(
        metrics.contains(
            r#"agentsecrets_admission_requests_total{kind="pod",operation="CREATE",decision="allowed"} 1"#
        ),
        "{metrics}"
    );
    // The test pod matches the answer as text: it must be compact JSON with these fields.
    let text = serde_json::to_string(&answer).unwrap();
    assert!(text.contains(&format!("\"uid\":\"{uid}\"")) && text.contains("\"allowed\":true"));
    let template = read("charts/agent-secrets/templates/tests/webhook-test.yaml");
    assert!(
        template.contains(&format!("'\"uid\":\"{uid}\"'")),
        "the test pod expects this uid"
    );
}
