//! The README's "Quick start on a cluster", followed line by line where no cluster is needed.
//! Every `agentsecrets` command in it parses with the binary's own CLI; its offline preview runs
//! exactly as written and admits alice's pod for the principal that creates the pod in the next
//! line (and denies it to the installing admin); the pod is created by the principal the
//! `helm install` allows; and the AgentSecrets it applies, sealed as the webhook seals them,
//! pass the CRD's own validation (its CEL rules, evaluated locally), while unsealed they are
//! refused. The Helm half (the `helm install` with its exact `--set` flags, the image, the
//! RBAC lines, the files) is followed by `python3 hack/helm.py lint`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use agent_secrets::crypto::Keyring;
use clap::Parser as _;
use serde::Deserialize as _;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// What `kubectl auth whoami` prints for kind's (kubeadm's) admin kubeconfig: the quick start's
/// command substitution, resolved offline.
const SAMPLE_ADMIN: &str = "kubernetes-admin";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Split one shell command line into words: blanks separate, '…' and "…" quote, a backslash
/// escapes the next character outside single quotes. (The quick start uses nothing else.)
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => word.extend(chars.next()),
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '\\') => {
                word.extend(chars.next());
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    assert!(quote.is_none(), "unterminated quote in {line:?}");
    if in_word {
        words.push(word);
    }
    words
}

/// The quick start's commands as argv lists: its fenced `sh` blocks, continuation lines joined,
/// comment lines dropped, `$(kubectl auth whoami …)` resolved to a sample username.
fn quickstart_commands() -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = readme
        .split("\n## Quick start on a cluster\n")
        .nth(1)
        .expect("README.md has a \"Quick start on a cluster\" section")
        .split("\n## ")
        .next()
        .unwrap();
    let mut commands = Vec::new();
    for block in section.split("```sh\n").skip(1) {
        let block = block.split("```").next().unwrap().replace("\\\n", " ");
        for line in block.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = match line.find("$(kubectl auth whoami") {
                Some(start) => {
                    let end = start + line[start..].find(')').unwrap() + 1;
                    format!("{}{SAMPLE_ADMIN}{}", &line[..start], &line[end..])
                }
                None => line.to_owned(),
            };
            commands.push(shell_words(&line));
        }
    }
    assert!(!commands.is_empty(), "no commands in the quick start");
    commands
}

/// Every value of `name` in `argv`, given as `NAME VALUE` or `NAME=VALUE`.
fn option(argv: &[String], name: &str) -> Vec<String> {
    let mut values = Vec::new();
    for (i, arg) in argv.iter().enumerate() {
        if arg == name {
            values.extend(argv.get(i + 1).cloned());
        } else if let Some(value) = arg.strip_prefix(&format!("{name}=")) {
            values.push(value.to_owned());
        }
    }
    values
}

fn find<'a>(
    commands: &'a [Vec<String>],
    what: &str,
    pred: impl Fn(&[String]) -> bool,
) -> &'a [String] {
    commands
        .iter()
        .find(|argv| pred(argv))
        .unwrap_or_else(|| panic!("the quick start has no {what}"))
}

/// The principals `helm install --set 'allowedPrincipals={…}'` allows.
fn installed_allowed_principals(commands: &[Vec<String>]) -> Vec<String> {
    let install = find(commands, "`helm install`", |a| {
        a[0] == "helm" && a[1] == "install"
    });
    let set = option(install, "--set")
        .into_iter()
        .find_map(|s| s.strip_prefix("allowedPrincipals=").map(str::to_owned))
        .expect("the install sets allowedPrincipals");
    set.trim_start_matches('{')
        .trim_end_matches('}')
        .split(',')
        .map(str::to_owned)
        .collect()
}

fn run_binary(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agentsecrets"))
        .args(args)
        .current_dir(repo())
        // No cluster: the preview must not need one.
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("AGENTSECRETS_ALLOWED_PRINCIPALS")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn inject_command(commands: &[Vec<String>]) -> Vec<String> {
    find(commands, "`agentsecrets inject`", |a| {
        a[0] == "agentsecrets" && a[1] == "inject"
    })[1..]
        .to_vec()
}

#[test]
fn every_agentsecrets_command_of_the_quick_start_parses() {
    let commands = quickstart_commands();
    let ours: Vec<_> = commands.iter().filter(|a| a[0] == "agentsecrets").collect();
    let subcommands: Vec<&str> = ours.iter().map(|a| a[1].as_str()).collect();
    for wanted in ["set", "list", "inject"] {
        assert!(
            subcommands.contains(&wanted),
            "no `agentsecrets {wanted}` in {subcommands:?}"
        );
    }
    for argv in ours {
        agent_secrets::cli::Cli::try_parse_from(argv).unwrap_or_else(|e| {
            panic!("the binary rejects the README's `{}`: {e}", argv.join(" "))
        });
    }
}

#[test]
fn the_preview_admits_alices_pod_for_the_principal_that_creates_it() {
    let commands = quickstart_commands();
    let inject = inject_command(&commands);
    let create = find(
        &commands,
        "`kubectl create -f examples/sandbox-pod.yaml`",
        |a| {
            a[0] == "kubectl"
                && a.contains(&"create".to_owned())
                && option(a, "-f") == ["examples/sandbox-pod.yaml"]
        },
    );
    let creator = option(create, "--as");
    assert_eq!(
        creator.len(),
        1,
        "the sandbox pod is created as the orchestrator: {create:?}"
    );
    assert_eq!(
        option(&inject, "--requester"),
        creator,
        "the preview is for whoever creates the pod"
    );
    let allowed = installed_allowed_principals(&commands);
    assert!(
        allowed.contains(&creator[0]),
        "{} is not in the installed allowedPrincipals {allowed:?}",
        creator[0]
    );
    assert_eq!(
        option(&inject, "--allowed-principals")
            .join(",")
            .split(',')
            .collect::<Vec<_>>(),
        allowed.iter().map(String::as_str).collect::<Vec<_>>(),
        "the preview uses the installed policy"
    );

    let output = run_binary(&inject);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the README's preview fails: {stderr}"
    );
    let pod: Value = serde_yaml::from_slice(&output.stdout).unwrap();
    let env: Vec<&str> = pod["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["valueFrom"]["secretKeyRef"].is_object())
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        env.contains(&"X_BEARER_TOKEN") && env.contains(&"NOTION_API_KEY"),
        "alice's secrets: {env:?}"
    );
    assert!(
        !env.contains(&"DB_PASSWORD"),
        "bob's secret reached alice's pod: {env:?}"
    );
}

#[test]
fn the_same_pod_created_by_the_installing_admin_is_denied() {
    let commands = quickstart_commands();
    let mut inject = inject_command(&commands);
    let at = inject.iter().position(|a| a == "--requester").unwrap();
    inject[at + 1] = SAMPLE_ADMIN.to_owned();
    let output = run_binary(&inject);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "a pod created as the admin must be denied"
    );
    assert!(stderr.contains("may only be created by"), "{stderr}");
}

fn crd_schema() -> Value {
    let crd = agent_secrets::api::crd();
    let version = &crd.spec.versions[0];
    serde_json::to_value(
        version
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

fn crd_errors(schema: &Value, object: &Value) -> Vec<String> {
    match kube_cel::validate(schema, object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn the_applied_agentsecrets_pass_the_crd_once_sealed_and_not_before() {
    let commands = quickstart_commands();
    let schema = crd_schema();
    let files: Vec<String> = commands
        .iter()
        .filter(|a| {
            a[0] == "kubectl"
                && (a.contains(&"apply".to_owned()) || a.contains(&"create".to_owned()))
        })
        .flat_map(|a| option(a, "-f"))
        .collect();
    let mut checked = 0;
    for file in files {
        let path = repo().join(&file);
        assert!(
            path.exists(),
            "the quick start applies {file}, which does not exist"
        );
        let mut secrets =
            agent_secrets::tools::inject::read_agentsecrets(Path::new(&path)).unwrap();
        if secrets.is_empty() {
            continue;
        }
        // As written (a plaintext value, nothing sealed): only the webhook makes it storable.
        let text = std::fs::read_to_string(&path).unwrap();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let raw: Value = serde::Deserialize::deserialize(document).unwrap();
            if raw["kind"] == "AgentSecret" {
                assert!(
                    raw["spec"]["value"].is_string(),
                    "{file}: the example carries a sample value"
                );
                assert!(
                    !crd_errors(&schema, &raw).is_empty(),
                    "{file}: the CRD accepts a plaintext value"
                );
            }
        }
        // What the webhook stores: value sealed under the keyring's primary key and removed.
        let keyring = Keyring::generate("kek-initial").unwrap();
        agent_secrets::tools::inject::prepare(&mut secrets, &keyring, "default").unwrap();
        for secret in &secrets {
            let sealed = serde_json::to_value(secret).unwrap();
            assert_eq!(
                crd_errors(&schema, &sealed),
                Vec::<String>::new(),
                "{file}: {}",
                sealed["metadata"]["name"]
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "the quick start applies no AgentSecret");
}

#[test]
fn the_secretless_preview_shows_a_placeholder_and_the_sidecar_and_never_the_value() {
    let commands = quickstart_commands();
    let inject = find(
        &commands,
        "`agentsecrets inject -f examples/secretless-pod.yaml`",
        |a| a[0] == "agentsecrets" && option(a, "-f") == ["examples/secretless-pod.yaml"],
    )[1..]
        .to_vec();
    let create = find(
        &commands,
        "`kubectl create -f examples/secretless-pod.yaml`",
        |a| a[0] == "kubectl" && option(a, "-f") == ["examples/secretless-pod.yaml"],
    );
    assert_eq!(
        option(&inject, "--requester"),
        option(create, "--as"),
        "the preview is for whoever creates the pod"
    );
    let output = run_binary(&inject);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the secretless preview fails: {stderr}"
    );
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        !text.contains("sample-x-bearer-token"),
        "a value in the preview"
    );
    let pod: Value = serde_yaml::from_slice(&output.stdout).unwrap();
    let sandbox_env = pod["spec"]["containers"][0]["env"].as_array().unwrap();
    let token = sandbox_env
        .iter()
        .find(|e| e["name"] == "X_BEARER_TOKEN")
        .expect("alice's X token, as a placeholder");
    assert!(
        token["value"].as_str().unwrap().starts_with("asec_ph_"),
        "{token}"
    );
    assert!(
        sandbox_env.iter().all(|e| e.get("valueFrom").is_none()),
        "no reference to a value from the sandbox: {sandbox_env:?}"
    );
    assert_eq!(
        pod["spec"]["initContainers"][0]["name"],
        agent_secrets::api::PROXY_CONTAINER_NAME
    );

    // The walkthrough's deletion names the secret the sample file binds to api.x.com.
    let delete = find(&commands, "`kubectl delete agentsecret`", |a| {
        a[0] == "kubectl"
            && a.contains(&"delete".to_owned())
            && a.contains(&"agentsecret".to_owned())
    });
    let name = delete.last().unwrap();
    let samples = std::fs::read_to_string(repo().join("examples/agentsecrets.yaml")).unwrap();
    let bound = serde_yaml::Deserializer::from_str(&samples)
        .map(|doc| Value::deserialize(doc).unwrap())
        .find(|doc| doc["metadata"]["name"] == name.as_str())
        .unwrap_or_else(|| panic!("no sample AgentSecret {name}"));
    assert_eq!(bound["spec"]["envName"], "X_BEARER_TOKEN");
    assert_eq!(
        bound["spec"]["allowedHosts"],
        serde_json::json!(["api.x.com"])
    );
}
