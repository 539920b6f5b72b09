//! The binary's commands as a user runs them, without a cluster.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use agent_secrets::crypto::Keyring;
use std::process::{Command, Output, Stdio};

fn agentsecrets(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agentsecrets"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        // No cluster: commands that need one must say so, not hang.
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

#[test]
fn inject_previews_the_sample_pod_with_references_only() {
    let output = agentsecrets(&[
        "inject",
        "-f",
        "examples/sandbox-pod.yaml",
        "--secrets",
        "examples/agentsecrets.yaml",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let pod = stdout(&output);
    assert!(pod.contains("secretKeyRef"), "{pod}");
    assert!(pod.contains("name: X_BEARER_TOKEN") && pod.contains("name: NOTION_API_KEY"));
    assert!(
        !pod.contains("DB_PASSWORD"),
        "bob's secret must not reach alice's pod"
    );
    let all = format!("{pod}{}", stderr(&output));
    assert!(!all.contains("sample-"), "no sample value printed: {all}");
    assert!(stderr(&output).contains("admission would create Secret sandboxes/asec-pod-"));
}

#[test]
fn inject_reports_a_denied_pod_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let pod = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/sandbox-pod.yaml"
    ))
    .unwrap()
    .replace(
        "  labels:\n",
        "  annotations:\n    agentsecrets.io/secrets: GITHUB_TOKEN\n  labels:\n",
    );
    let path = dir.path().join("pod.yaml");
    std::fs::write(&path, pod).unwrap();
    let output = agentsecrets(&[
        "inject",
        "-f",
        path.to_str().unwrap(),
        "--secrets",
        "examples",
    ]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("GITHUB_TOKEN"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn crd_prints_the_checked_in_crd() {
    let output = agentsecrets(&["crd"]);
    assert!(output.status.success());
    let checked_in = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/agentsecrets.yaml"
    ))
    .unwrap();
    assert_eq!(stdout(&output), checked_in);
}

#[test]
fn keys_generate_prints_a_loadable_keyring_and_adds_primaries() {
    let output = agentsecrets(&["keys", "generate", "--id", "first"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let keyring = Keyring::from_yaml(&stdout(&output)).unwrap();
    assert_eq!(keyring.primary_id(), "first");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring.yaml");
    std::fs::write(&path, stdout(&output)).unwrap();
    let output = agentsecrets(&[
        "keys",
        "generate",
        "--id",
        "second",
        "--add-to",
        path.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let rotated = Keyring::from_yaml(&stdout(&output)).unwrap();
    assert_eq!(rotated.primary_id(), "second");
    assert_eq!(rotated.key_ids().collect::<Vec<_>>(), ["first", "second"]);

    let output = agentsecrets(&[
        "keys",
        "generate",
        "--id",
        "first",
        "--add-to",
        path.to_str().unwrap(),
    ]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("more than once"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn rotation_in_two_phases_adds_then_promotes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring.yaml");
    std::fs::write(
        &path,
        stdout(&agentsecrets(&["keys", "generate", "--id", "old"])),
    )
    .unwrap();
    let added = agentsecrets(&[
        "keys",
        "generate",
        "--id",
        "new",
        "--add-to",
        path.to_str().unwrap(),
        "--no-promote",
    ]);
    assert!(added.status.success(), "{}", stderr(&added));
    let keyring = Keyring::from_yaml(&stdout(&added)).unwrap();
    assert_eq!(keyring.primary_id(), "old", "phase 1 keeps the primary");
    assert!(keyring.contains("new"));

    std::fs::write(&path, stdout(&added)).unwrap();
    let promoted = agentsecrets(&[
        "keys",
        "promote",
        "new",
        "--keyring",
        path.to_str().unwrap(),
    ]);
    assert!(promoted.status.success(), "{}", stderr(&promoted));
    let keyring = Keyring::from_yaml(&stdout(&promoted)).unwrap();
    assert_eq!(keyring.primary_id(), "new");
    assert_eq!(keyring.key_ids().collect::<Vec<_>>(), ["new", "old"]);

    let unknown = agentsecrets(&[
        "keys",
        "promote",
        "nope",
        "--keyring",
        path.to_str().unwrap(),
    ]);
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("\"nope\" is not among its keys"),
        "{}",
        stderr(&unknown)
    );
}

#[test]
fn keys_generate_as_a_secret_manifest() {
    let output = agentsecrets(&[
        "keys",
        "generate",
        "--id",
        "k",
        "--secret",
        "agent-secrets-keyring",
        "-n",
        "ops",
    ]);
    assert!(output.status.success());
    let secret: k8s_openapi::api::core::v1::Secret =
        serde_yaml::from_str(&stdout(&output)).unwrap();
    assert_eq!(
        secret.metadata.name.as_deref(),
        Some("agent-secrets-keyring")
    );
    assert_eq!(secret.metadata.namespace.as_deref(), Some("ops"));
    let data = &secret.data.unwrap()["keyring.yaml"];
    let keyring = Keyring::from_yaml(std::str::from_utf8(&data.0).unwrap()).unwrap();
    assert_eq!(keyring.primary_id(), "k");
}

#[test]
fn every_command_explains_itself() {
    for (args, needle) in [
        (vec!["--help"], "sandbox"),
        (vec!["run", "--help"], "--allowed-principals"),
        (vec!["crd", "--help"], "CustomResourceDefinition"),
        (vec!["keys", "generate", "--help"], "--add-to"),
        (vec!["keys", "status", "--help"], "removed from the keyring"),
        (
            vec!["keys", "promote", "--help"],
            "second phase of a rotation",
        ),
        (vec!["inject", "--help"], "never values"),
        (vec!["set", "--help"], "hidden prompt"),
        (vec!["list", "--help"], "masked value"),
        (vec!["delete", "--help"], "no longer get it"),
        (
            vec!["completion", "--help"],
            "kubectl_complete-agentsecrets",
        ),
        (vec!["list", "--help"], "--all-namespaces"),
        (vec!["list", "--help"], "Cluster connection"),
        (vec!["set", "--help"], "asked twice"),
    ] {
        let output = agentsecrets(&args);
        assert!(output.status.success(), "{args:?}");
        assert!(
            stdout(&output).contains(needle),
            "{args:?} help lacks {needle:?}:\n{}",
            stdout(&output)
        );
    }
}

#[test]
fn set_refuses_an_invalid_name_before_contacting_a_cluster() {
    let output = agentsecrets(&["set", "lower_case", "--owner", "alice"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("uppercase identifier"),
        "{}",
        stderr(&output)
    );
    let output = agentsecrets(&["set", "PATH", "--owner", "alice"]);
    assert!(stderr(&output).contains("reserved"), "{}", stderr(&output));
}

#[test]
fn commands_needing_a_cluster_say_none_is_configured() {
    let output = agentsecrets(&["list"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("no cluster configured"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn run_refuses_bad_flags_clearly() {
    let output = agentsecrets(&["run", "--pod-secret-reuse-window", "5 minutes"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("--pod-secret-reuse-window"),
        "{}",
        stderr(&output)
    );
    let output = agentsecrets(&["run", "--rotation-rate", "0"]);
    assert!(!output.status.success());
    let output = agentsecrets(&["run", "--pod-secret-reuse-window", "10s"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("--pod-secret-reuse-window must be at least 60s"),
        "{}",
        stderr(&output)
    );
}

// ---------------------------------------------------------------------------------------------
// kubectl habits: connection flags, output formats, exit codes, completion, krew.
// ---------------------------------------------------------------------------------------------

use agent_secrets::cli::{Cli, Command as Sub, KeysCommand};
use agent_secrets::tools::cluster::ClusterArgs;
use agent_secrets::tools::output::Format;
use clap::Parser as _;
use std::io::Write as _;
use std::sync::{Arc, Mutex};

/// The binary with an environment of the test's choosing and `input` on stdin.
fn agentsecrets_with(args: &[&str], env: &[(&str, &str)], input: &str) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_agentsecrets"));
    command
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn code(output: &Output) -> i32 {
    output.status.code().unwrap()
}

/// The connection flags of every command that talks to a cluster, after parsing `flags`.
fn cluster_args_of_every_command(flags: &[&str]) -> Vec<(String, ClusterArgs)> {
    let commands: [&[&str]; 5] = [
        &["set", "X_TOKEN", "--owner", "alice"],
        &["list"],
        &["delete", "X_TOKEN", "--owner", "alice"],
        &["keys", "status"],
        &["inject", "-f", "pod.yaml"],
    ];
    commands
        .iter()
        .map(|command| {
            let mut argv = vec!["agentsecrets"];
            argv.extend_from_slice(command);
            argv.extend_from_slice(flags);
            let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            let cluster = match cli.command {
                Sub::Set(args) => args.cluster,
                Sub::List(args) => args.cluster,
                Sub::Delete(args) => args.cluster,
                Sub::Keys(KeysCommand::Status(args)) => args.cluster,
                Sub::Inject(args) => args.cluster,
                other => panic!("unexpected {other:?}"),
            };
            (command.join(" "), cluster)
        })
        .collect()
}

#[test]
fn connection_flags_mean_the_same_in_every_command() {
    let expected = ClusterArgs {
        kubeconfig: Some("/tmp/kc".into()),
        context: Some("prod".into()),
        cluster: Some("prod-cluster".into()),
        user: Some("prod-admin".into()),
        namespace: Some("sandboxes".into()),
        impersonate: Some("alice".into()),
        impersonate_groups: vec!["devs".into(), "ops".into()],
    };
    for flags in [
        vec![
            "--kubeconfig",
            "/tmp/kc",
            "--context",
            "prod",
            "--cluster",
            "prod-cluster",
            "--user",
            "prod-admin",
            "-n",
            "sandboxes",
            "--as",
            "alice",
            "--as-group",
            "devs",
            "--as-group",
            "ops",
        ],
        vec![
            "--kubeconfig=/tmp/kc",
            "--context=prod",
            "--cluster=prod-cluster",
            "--user=prod-admin",
            "--namespace=sandboxes",
            "--as=alice",
            "--as-group=devs",
            "--as-group=ops",
        ],
    ] {
        for (command, cluster) in cluster_args_of_every_command(&flags) {
            assert_eq!(cluster, expected, "{command} {flags:?}");
        }
    }
    for (command, cluster) in cluster_args_of_every_command(&[]) {
        assert_eq!(cluster, ClusterArgs::default(), "{command}");
    }
}

#[test]
fn all_namespaces_and_output_parse_where_they_apply() {
    let cli = Cli::try_parse_from(["agentsecrets", "list", "-A", "-o", "wide"]).unwrap();
    let Sub::List(list) = cli.command else {
        panic!()
    };
    assert!(list.all_namespaces);
    assert_eq!(list.output.output, Some(Format::Wide));

    let cli = Cli::try_parse_from([
        "agentsecrets",
        "keys",
        "status",
        "--all-namespaces",
        "--output",
        "json",
    ])
    .unwrap();
    let Sub::Keys(KeysCommand::Status(status)) = cli.command else {
        panic!()
    };
    assert!(status.all_namespaces);
    assert_eq!(status.output.output, Some(Format::Json));

    let cli =
        Cli::try_parse_from(["agentsecrets", "set", "X", "--owner", "a", "-o", "yaml"]).unwrap();
    let Sub::Set(set) = cli.command else { panic!() };
    assert_eq!(set.output.output, Some(Format::Yaml));

    for argv in [
        vec!["agentsecrets", "list", "-A", "-n", "x"],
        vec!["agentsecrets", "keys", "status", "-A", "-n", "x"],
        vec!["agentsecrets", "delete", "X", "--owner", "a", "-A"],
        vec!["agentsecrets", "delete", "X", "--owner", "a", "-o", "json"],
        vec!["agentsecrets", "list", "-o", "table"],
        vec!["agentsecrets", "list", "--as-group", "devs"],
        vec![
            "agentsecrets",
            "inject",
            "-f",
            "pod.yaml",
            "--secrets",
            "examples",
            "--context",
            "prod",
        ],
    ] {
        assert!(
            Cli::try_parse_from(&argv).is_err(),
            "{argv:?} must be refused"
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        vec!["list", "--no-such-flag"],
        vec!["list", "-A", "-n", "x"],
        vec!["list", "--as-group", "devs"],
        vec!["set", "X_TOKEN"],
        vec![
            "inject",
            "-f",
            "examples/sandbox-pod.yaml",
            "--secrets",
            "examples",
            "--kubeconfig",
            "/tmp/kc",
        ],
        // An invalid name is refused by our own check, before any cluster is contacted.
        vec!["set", "lower_case", "--owner", "alice"],
        vec!["delete", "PATH", "--owner", "alice", "--yes"],
    ] {
        let output = agentsecrets(&args);
        assert_eq!(code(&output), 2, "{args:?}: {}", stderr(&output));
    }
}

#[test]
fn no_cluster_exits_5_for_every_cluster_command() {
    for args in [
        vec!["list"],
        vec!["list", "-A"],
        vec!["keys", "status"],
        vec!["delete", "X_TOKEN", "--owner", "alice", "--yes"],
        vec!["set", "X_TOKEN", "--owner", "alice"],
        vec!["inject", "-f", "examples/sandbox-pod.yaml"],
    ] {
        let output = agentsecrets(&args);
        assert_eq!(code(&output), 5, "{args:?}: {}", stderr(&output));
        assert!(
            stderr(&output).starts_with("error: failed to load a cluster configuration"),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn help_documents_the_exit_codes() {
    let output = agentsecrets(&["--help"]);
    assert_eq!(code(&output), 0);
    assert!(
        stdout(&output).contains(agent_secrets::tools::error::EXIT_CODES_HELP),
        "{}",
        stdout(&output)
    );
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/cli.md")).unwrap();
    for line in agent_secrets::tools::error::EXIT_CODES_HELP.lines().skip(1) {
        let (number, meaning) = line.trim().split_once("  ").unwrap();
        assert!(
            docs.contains(&format!("| {number} | {}", meaning.trim())),
            "docs/cli.md lacks exit code {number}: {meaning}"
        );
    }
}

// A stand-in for the API server: records every request and answers from a script. Plain
// HTTP, on a port of its own, so the binary runs unmodified against a kubeconfig.

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    impersonate_user: Option<String>,
    impersonate_groups: Vec<String>,
    body: String,
}

type Answer = Arc<dyn Fn(&Recorded) -> (u16, serde_json::Value) + Send + Sync>;

struct FakeApi {
    kubeconfig: tempfile::NamedTempFile,
    requests: Arc<Mutex<Vec<Recorded>>>,
}

impl FakeApi {
    fn start(
        answer: impl Fn(&Recorded) -> (u16, serde_json::Value) + Send + Sync + 'static,
    ) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let answer: Answer = Arc::new(answer);
        let recorded = requests.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let app = axum::Router::new().fallback(
                    move |method: http::Method,
                          uri: http::Uri,
                          headers: http::HeaderMap,
                          body: bytes::Bytes| {
                        let answer = answer.clone();
                        let recorded = recorded.clone();
                        async move {
                            let request = Recorded {
                                method: method.to_string(),
                                path: uri.path().to_owned(),
                                impersonate_user: headers
                                    .get("impersonate-user")
                                    .map(|v| v.to_str().unwrap().to_owned()),
                                impersonate_groups: headers
                                    .get_all("impersonate-group")
                                    .iter()
                                    .map(|v| v.to_str().unwrap().to_owned())
                                    .collect(),
                                body: String::from_utf8(body.to_vec()).unwrap(),
                            };
                            let (status, json) = answer(&request);
                            recorded.lock().unwrap().push(request);
                            (
                                http::StatusCode::from_u16(status).unwrap(),
                                axum::Json(json),
                            )
                        }
                    },
                );
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        let kubeconfig = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            kubeconfig.path(),
            format!(
                r#"apiVersion: v1
kind: Config
current-context: fake
clusters:
- name: fake
  cluster: {{server: "http://127.0.0.1:{port}"}}
contexts:
- name: fake
  context: {{cluster: fake, user: tester, namespace: from-context}}
- name: other
  context: {{cluster: fake, user: tester, namespace: other-context}}
users:
- name: tester
  user: {{token: not-a-real-token}}
"#
            ),
        )
        .unwrap();
        Self {
            kubeconfig,
            requests,
        }
    }

    fn kubeconfig(&self) -> &str {
        self.kubeconfig.path().to_str().unwrap()
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// Run the binary against this server, chosen by `$KUBECONFIG` as kubectl would.
    fn run(&self, args: &[&str], input: &str) -> Output {
        agentsecrets_with(args, &[("KUBECONFIG", self.kubeconfig())], input)
    }
}

const COLLECTION: &str = "/apis/agentsecrets.io/v1alpha1";

fn recorded_list() -> serde_json::Value {
    serde_json::from_str(include_str!("fixtures/api/agentsecrets_list.json")).unwrap()
}

/// The recorded list for namespace `sandboxes` and for all namespaces, empty lists elsewhere,
/// creations and patches answered as the webhook would leave them (sealed, no value).
fn recorded_cluster(request: &Recorded) -> (u16, serde_json::Value) {
    let list = recorded_list();
    let stored = |mut object: serde_json::Value| {
        object["spec"].as_object_mut().unwrap().remove("value");
        object["spec"]["sealed"] = list["items"][0]["spec"]["sealed"].clone();
        object["metadata"]["namespace"] = "sandboxes".into();
        object["metadata"]["creationTimestamp"] = "2026-11-29T16:00:00Z".into();
        object
    };
    match (request.method.as_str(), request.path.as_str()) {
        ("GET", path) if path == format!("{COLLECTION}/agentsecrets") => (200, list),
        ("GET", path) if path == format!("{COLLECTION}/namespaces/sandboxes/agentsecrets") => {
            (200, list)
        }
        ("GET", _) => (
            200,
            serde_json::json!({"apiVersion": "agentsecrets.io/v1alpha1", "kind": "AgentSecretList", "metadata": {}, "items": []}),
        ),
        ("POST", _) => (201, stored(serde_json::from_str(&request.body).unwrap())),
        ("PATCH", _) => {
            let mut object = list["items"][0].clone();
            let patch: serde_json::Value = serde_json::from_str(&request.body).unwrap();
            if let Some(description) = patch["spec"].get("description") {
                object["spec"]["description"] = description.clone();
            }
            (200, object)
        }
        ("DELETE", _) => (200, list["items"][0].clone()),
        _ => (405, serde_json::json!({})),
    }
}

fn status(code: u16, reason: &str, message: &str) -> serde_json::Value {
    serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": message, "reason": reason, "code": code})
}

#[test]
fn the_namespace_is_the_flag_else_the_contexts_and_all_with_a() {
    let api = FakeApi::start(recorded_cluster);
    let kubeconfig = api.kubeconfig().to_owned();
    for (args, path) in [
        (vec!["list"], "namespaces/from-context/agentsecrets"),
        (
            vec!["list", "--context", "other"],
            "namespaces/other-context/agentsecrets",
        ),
        (
            vec!["list", "-n", "sandboxes"],
            "namespaces/sandboxes/agentsecrets",
        ),
        (vec!["list", "-A"], "agentsecrets"),
        (
            vec!["keys", "status"],
            "namespaces/from-context/agentsecrets",
        ),
        (vec!["keys", "status", "--all-namespaces"], "agentsecrets"),
        (
            vec!["list", "--kubeconfig", &kubeconfig, "--context", "other"],
            "namespaces/other-context/agentsecrets",
        ),
    ] {
        let before = api.requests().len();
        // --kubeconfig wins over a $KUBECONFIG that does not even exist.
        let output = if args.contains(&"--kubeconfig") {
            agentsecrets(&args)
        } else {
            api.run(&args, "")
        };
        assert_eq!(code(&output), 0, "{args:?}: {}", stderr(&output));
        let requests = api.requests();
        assert_eq!(requests.len(), before + 1, "{args:?}");
        assert_eq!(
            requests[before].path,
            format!("{COLLECTION}/{path}"),
            "{args:?}"
        );
    }
}

#[test]
fn impersonation_flags_become_headers_in_every_command() {
    let api = FakeApi::start(recorded_cluster);
    let identity = ["--as", "alice", "--as-group", "devs", "--as-group", "ops"];
    let commands: [&[&str]; 4] = [
        &["list", "-n", "sandboxes"],
        &["keys", "status", "-A"],
        &[
            "delete",
            "SERVICE_0_API_KEY",
            "--owner",
            "alice",
            "-n",
            "sandboxes",
            "--yes",
        ],
        &["inject", "-f", "examples/sandbox-pod.yaml"],
    ];
    for command in commands {
        let before = api.requests().len();
        let mut args = command.to_vec();
        args.extend_from_slice(&identity);
        let output = api.run(&args, "");
        // inject lists the recorded secrets, sealed under a key this test does not hold:
        // only its request matters here.
        if command[0] != "inject" {
            assert_eq!(code(&output), 0, "{args:?}: {}", stderr(&output));
        }
        let requests = api.requests();
        assert!(requests.len() > before, "{args:?}: {}", stderr(&output));
        for request in &requests[before..] {
            assert_eq!(
                request.impersonate_user.as_deref(),
                Some("alice"),
                "{args:?}"
            );
            assert_eq!(request.impersonate_groups, ["devs", "ops"], "{args:?}");
        }
    }
    let plain = api.run(&["list"], "");
    assert_eq!(code(&plain), 0);
    let last = api.requests().pop().unwrap();
    assert_eq!(last.impersonate_user, None);
    assert!(last.impersonate_groups.is_empty());
}

#[test]
fn list_prints_cards_json_yaml_and_wide() {
    let api = FakeApi::start(recorded_cluster);
    let cards = api.run(&["list", "-n", "sandboxes", "--owner", "bob"], "");
    assert_eq!(code(&cards), 0, "{}", stderr(&cards));
    assert_eq!(stdout(&cards).matches("(owner bob, sandboxes/").count(), 4);

    let json = api.run(&["list", "-n", "sandboxes", "-o", "json"], "");
    let json: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 12);
    assert_eq!(json[0]["keyId"], "k1");

    let yaml = api.run(&["list", "-n", "sandboxes", "-o", "yaml"], "");
    let yaml: serde_json::Value = serde_yaml::from_str(&stdout(&yaml)).unwrap();
    assert_eq!(yaml, json);

    let wide = api.run(&["list", "-A", "-o", "wide"], "");
    let text = stdout(&wide);
    assert_eq!(text.lines().count(), 13, "{text}");
    assert!(text.starts_with("NAMESPACE"), "{text}");
    assert!(
        text.contains("KEY ID") && text.contains("DESCRIPTION"),
        "{text}"
    );

    let keys = api.run(&["keys", "status", "-A", "-o", "json"], "");
    let keys: serde_json::Value = serde_json::from_str(&stdout(&keys)).unwrap();
    assert_eq!(keys["keys"][0]["keyId"], "k1");
    assert_eq!(keys["keys"][0]["secrets"], 12);
}

#[test]
fn set_reads_a_piped_value_and_never_prints_it() {
    let api = FakeApi::start(recorded_cluster);
    let output = api.run(
        &[
            "set",
            "NEW_API_KEY",
            "--owner",
            "alice",
            "-n",
            "sandboxes",
            "--description",
            "New",
        ],
        "canary-piped-value\n",
    );
    assert_eq!(code(&output), 0, "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "created NEW_API_KEY of alice in sandboxes (alice-new-api-key)\n"
    );
    let post = api
        .requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&post.body).unwrap();
    assert_eq!(
        body["spec"]["value"], "canary-piped-value",
        "one trailing newline removed"
    );
    assert_eq!(body["spec"]["envName"], "NEW_API_KEY");
    assert!(!format!("{}{}", stdout(&output), stderr(&output)).contains("canary"));

    let json = api.run(
        &[
            "set",
            "OTHER_API_KEY",
            "--owner",
            "alice",
            "-n",
            "sandboxes",
            "-o",
            "json",
        ],
        "canary-piped-value",
    );
    assert_eq!(code(&json), 0, "{}", stderr(&json));
    let card: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(card["envName"], "OTHER_API_KEY");
    assert_eq!(card["value"], agent_secrets::tools::user::MASK);
    assert!(!stdout(&json).contains("canary"));
}

#[test]
fn set_with_empty_stdin_keeps_an_existing_value_and_refuses_a_new_secret() {
    let api = FakeApi::start(recorded_cluster);
    let update = api.run(
        &[
            "set",
            "SERVICE_0_API_KEY",
            "--owner",
            "alice",
            "-n",
            "sandboxes",
            "--description",
            "Renamed",
        ],
        "",
    );
    assert_eq!(code(&update), 0, "{}", stderr(&update));
    let patch = api
        .requests()
        .into_iter()
        .find(|r| r.method == "PATCH")
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&patch.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"spec": {"description": "Renamed"}})
    );

    let create = api.run(
        &[
            "set",
            "BRAND_NEW_KEY",
            "--owner",
            "alice",
            "-n",
            "sandboxes",
        ],
        "",
    );
    assert_eq!(code(&create), 2, "{}", stderr(&create));
    assert!(
        stderr(&create).contains("needs a value"),
        "{}",
        stderr(&create)
    );
    assert!(
        !api.requests().iter().any(|r| r.method == "POST"),
        "nothing written"
    );
}

#[test]
fn a_missing_secret_exits_3_and_deletes_nothing() {
    let api = FakeApi::start(recorded_cluster);
    let output = api.run(
        &[
            "delete",
            "NO_SUCH_KEY",
            "--owner",
            "alice",
            "-n",
            "sandboxes",
            "--yes",
        ],
        "",
    );
    assert_eq!(code(&output), 3, "{}", stderr(&output));
    assert!(
        stderr(&output).contains("NO_SUCH_KEY of alice in namespace sandboxes"),
        "{}",
        stderr(&output)
    );
    assert!(!api.requests().iter().any(|r| r.method == "DELETE"));
}

#[test]
fn a_declined_deletion_exits_1_and_deletes_nothing() {
    let api = FakeApi::start(recorded_cluster);
    let output = api.run(
        &[
            "delete",
            "SERVICE_0_API_KEY",
            "--owner",
            "alice",
            "-n",
            "sandboxes",
        ],
        "n\n",
    );
    assert_eq!(code(&output), 1, "{}", stderr(&output));
    assert!(stdout(&output).is_empty(), "the question goes to stderr");
    assert!(!api.requests().iter().any(|r| r.method == "DELETE"));

    let confirmed = api.run(
        &[
            "delete",
            "SERVICE_0_API_KEY",
            "--owner",
            "alice",
            "-n",
            "sandboxes",
        ],
        "y\n",
    );
    assert_eq!(code(&confirmed), 0, "{}", stderr(&confirmed));
    let delete = api
        .requests()
        .into_iter()
        .find(|r| r.method == "DELETE")
        .unwrap();
    assert_eq!(
        delete.path,
        format!("{COLLECTION}/namespaces/sandboxes/agentsecrets/alice-service-0")
    );
}

#[test]
fn refusals_by_the_api_server_exit_4() {
    let forbidden = FakeApi::start(|_| {
        (
            403,
            status(
                403,
                "Forbidden",
                "agentsecrets.agentsecrets.io is forbidden: User \"dev\" cannot list resource \"agentsecrets\" in API group \"agentsecrets.io\"",
            ),
        )
    });
    let output = forbidden.run(&["list"], "");
    assert_eq!(code(&output), 4, "{}", stderr(&output));
    assert!(
        stderr(&output).contains("ask for a Role"),
        "{}",
        stderr(&output)
    );

    let denied = FakeApi::start(|request| match request.method.as_str() {
        "POST" => (
            403,
            status(
                403,
                "Forbidden",
                "admission webhook \"agentsecrets.agentsecrets.io\" denied the request: alice already has NEW_API_KEY",
            ),
        ),
        _ => recorded_cluster(request),
    });
    let output = denied.run(
        &["set", "NEW_API_KEY", "--owner", "alice"],
        "canary-denied\n",
    );
    assert_eq!(code(&output), 4, "{}", stderr(&output));
    assert!(
        stderr(&output).contains("denied the request"),
        "{}",
        stderr(&output)
    );
    assert!(!stderr(&output).contains("canary"));

    // A validation message quoting the refused field must not carry the value to the terminal.
    let invalid = FakeApi::start(|request| match request.method.as_str() {
        "POST" => {
            let body: serde_json::Value = serde_json::from_str(&request.body).unwrap();
            let message = format!(
                "AgentSecret.agentsecrets.io \"x\" is invalid: spec.value: Invalid value: {}",
                body["spec"]["value"]
            );
            (422, status(422, "Invalid", &message))
        }
        _ => recorded_cluster(request),
    });
    let output = invalid.run(
        &["set", "NEW_API_KEY", "--owner", "alice"],
        "canary-quoted\n",
    );
    assert_eq!(code(&output), 4, "{}", stderr(&output));
    assert!(
        stderr(&output).contains("<redacted>"),
        "{}",
        stderr(&output)
    );
    assert!(!stderr(&output).contains("canary"), "{}", stderr(&output));

    let unauthenticated = FakeApi::start(|_| (401, status(401, "Unauthorized", "Unauthorized")));
    assert_eq!(code(&unauthenticated.run(&["keys", "status"], "")), 4);
}

#[test]
fn an_unreachable_api_server_exits_5() {
    // A port that was free a moment ago and has no listener: connection refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let kubeconfig = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        kubeconfig.path(),
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters: [{{name: c, cluster: {{server: \"http://127.0.0.1:{closed_port}\"}}}}]\ncontexts: [{{name: c, context: {{cluster: c, user: u}}}}]\nusers: [{{name: u, user: {{token: t}}}}]\n"
        ),
    )
    .unwrap();
    let output = agentsecrets(&["list", "--kubeconfig", kubeconfig.path().to_str().unwrap()]);
    assert_eq!(code(&output), 5, "{}", stderr(&output));
    assert!(
        stderr(&output).contains("failed to reach the API server"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn completion_scripts_name_the_commands() {
    for (shell, needle) in [
        ("bash", "_agentsecrets()"),
        ("zsh", "#compdef agentsecrets"),
        ("fish", "complete -c agentsecrets"),
    ] {
        let output = agentsecrets(&["completion", shell]);
        assert_eq!(code(&output), 0, "{shell}");
        let script = stdout(&output);
        assert!(script.contains(needle), "{shell}");
        assert!(
            script.contains("all-namespaces") && script.contains("kubeconfig"),
            "{shell}"
        );
    }
    assert_eq!(code(&agentsecrets(&["completion", "tcsh"])), 2);
}

#[cfg(unix)]
#[test]
fn linked_as_kubectl_complete_the_binary_answers_kubectls_plugin_completion() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("kubectl_complete-agentsecrets");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_agentsecrets"), &link).unwrap();
    // kubectl passes the words after `kubectl agentsecrets`, the last one being completed.
    let run = |words: &[&str]| {
        let output = Command::new(&link).args(words).output().unwrap();
        assert!(output.status.success());
        stdout(&output)
    };
    let subcommands = run(&["l"]);
    assert_eq!(
        subcommands.lines().collect::<Vec<_>>(),
        [
            "list\tList secrets as cards: name, description, created, masked value, readiness",
            ":4"
        ]
    );
    let flags = run(&["list", "--all-n"]);
    assert_eq!(
        flags.lines().next().unwrap().split('\t').next(),
        Some("--all-namespaces")
    );
    let formats = run(&["keys", "status", "-o", ""]);
    let values: Vec<&str> = formats
        .lines()
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert_eq!(values, ["json", "yaml", "wide", ":4"]);

    // Contexts complete from the kubeconfig kubectl would read.
    let api = FakeApi::start(recorded_cluster);
    let contexts = Command::new(&link)
        .args(["list", "--context", ""])
        .env("KUBECONFIG", api.kubeconfig())
        .output()
        .unwrap();
    assert_eq!(stdout(&contexts), "fake\nother\n:4\n");
    let prefixed = Command::new(&link)
        .args(["set", "X", "--context", "ot"])
        .env("KUBECONFIG", api.kubeconfig())
        .output()
        .unwrap();
    assert_eq!(stdout(&prefixed), "other\n:4\n");

    // Run under the plugin name, the binary is the CLI itself.
    let plugin = dir.path().join("kubectl-agentsecrets");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_agentsecrets"), &plugin).unwrap();
    let output = Command::new(&plugin).arg("crd").output().unwrap();
    assert!(output.status.success());
    assert!(stdout(&output).contains("kind: CustomResourceDefinition"));
}

#[test]
fn the_krew_manifest_parses_and_installs_this_binary() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/krew/agentsecrets.yaml"
    ))
    .unwrap();
    let manifest: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(
        manifest["apiVersion"].as_str(),
        Some("krew.googlecontainertools.github.com/v1alpha2")
    );
    assert_eq!(manifest["kind"].as_str(), Some("Plugin"));
    // `kubectl agentsecrets` is the plugin krew links as kubectl-agentsecrets.
    assert_eq!(manifest["metadata"]["name"].as_str(), Some("agentsecrets"));
    let spec = &manifest["spec"];
    assert_eq!(
        spec["version"].as_str(),
        Some(format!("v{}", env!("CARGO_PKG_VERSION")).as_str())
    );
    assert!(
        spec["shortDescription"]
            .as_str()
            .is_some_and(|d| !d.is_empty())
    );
    let platforms = spec["platforms"].as_sequence().unwrap();
    let mut selected: Vec<(String, String)> = Vec::new();
    for platform in platforms {
        let labels = &platform["selector"]["matchLabels"];
        let os = labels["os"].as_str().unwrap().to_owned();
        let arch = labels["arch"].as_str().unwrap().to_owned();
        let bin = platform["bin"].as_str().unwrap();
        let built = std::path::Path::new(env!("CARGO_BIN_EXE_agentsecrets"));
        assert_eq!(
            Some(bin),
            built.file_stem().and_then(|s| s.to_str()),
            "{os}/{arch}"
        );
        let files = platform["files"].as_sequence().unwrap();
        assert!(
            files.iter().any(|f| f["from"].as_str() == Some(bin)),
            "{os}/{arch}: the archive's binary is installed"
        );
        let uri = platform["uri"].as_str().unwrap();
        assert!(uri.starts_with("https://"), "{uri}");
        assert!(
            uri.contains(&format!("/v{}/", env!("CARGO_PKG_VERSION"))),
            "{uri}"
        );
        let sha256 = platform["sha256"].as_str().unwrap();
        let real = sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit());
        assert!(
            real || sha256 == "RELEASE-FILLS-IN-SHA256",
            "{os}/{arch}: a sha256 or the release placeholder"
        );
        selected.push((os, arch));
    }
    selected.sort();
    selected.dedup();
    assert_eq!(selected.len(), platforms.len(), "one entry per platform");
    assert!(selected.contains(&("linux".into(), "amd64".into())));
}

#[test]
fn the_product_binary_has_no_benchmark_mode() {
    // `--bench-synthetic-cache` exists only in builds with the `bench` feature (bench/run.sh).
    let output = agentsecrets(&["run", "--bench-synthetic-cache", "1x1"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("unexpected argument '--bench-synthetic-cache'"),
        "{}",
        stderr(&output)
    );
}
