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
    let output = agentsecrets(&["run", "--pod-secret-grace", "5 minutes"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("--pod-secret-grace"),
        "{}",
        stderr(&output)
    );
    let output = agentsecrets(&["run", "--rotation-rate", "0"]);
    assert!(!output.status.success());
}
