//! The packaged artefacts agree with the binary: the chart's CRD copy is the generated CRD,
//! the manifests' container args are flags the binary accepts, and no static file carries key
//! material. (The chart itself is linted and rendered with real Helm by `hack/helm.py`.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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
    }
}
