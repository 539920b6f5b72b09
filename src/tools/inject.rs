//! `agentsecrets inject`: an offline preview of what admission does to a pod, like
//! `istioctl kube-inject`. It runs the webhook's own decision on the pod and prints the mutated
//! pod: references only, never values.

use anyhow::{Context as _, bail};
use kube::ResourceExt as _;
use serde::Deserialize as _;
use serde_json::json;
use std::path::{Path, PathBuf};

use crate::api::PROXY_CONTAINER_NAME;
use crate::api::{AgentSecret, SealedValue};
use crate::cache::{CachedSecret, PodSecretIndex, SecretIndex};
use crate::crypto::Keyring;
use crate::webhook::Policy;
use crate::webhook::pod::secretless::feed_url;
use crate::webhook::pod::{self, Decision, FeedCa};
use crate::webhook::review::{PodView, Request, Review};
use std::sync::Arc;

/// What the preview produced.
#[derive(Debug)]
pub struct Preview {
    /// The pod after admission, as YAML.
    pub pod_yaml: String,
    /// A summary for people: what was injected, skipped, and which Secret would hold it.
    pub summary: String,
}

/// Every AgentSecret in `path` (a YAML file, possibly multi-document, or a directory of them).
pub fn read_agentsecrets(path: &Path) -> anyhow::Result<Vec<AgentSecret>> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("failed to read directory {}", path.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    let mut secrets = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("failed to read {}", file.display()))?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document)
                .with_context(|| format!("{} is not valid YAML", file.display()))?;
            if value.is_null() || value.get("kind").and_then(|k| k.as_str()) != Some("AgentSecret")
            {
                continue;
            }
            let secret: AgentSecret = serde_yaml::from_value(value).map_err(|_| {
                // serde's message could quote a value: name the file only.
                anyhow::anyhow!(
                    "{} holds an AgentSecret that does not match the schema",
                    file.display()
                )
            })?;
            secrets.push(secret);
        }
    }
    Ok(secrets)
}

/// Seal any sample plaintext with `keyring` so the preview takes the real path, and place
/// objects without a namespace in `namespace`.
pub fn prepare(
    secrets: &mut [AgentSecret],
    keyring: &Keyring,
    namespace: &str,
) -> anyhow::Result<()> {
    for secret in secrets.iter_mut() {
        if secret.metadata.namespace.is_none() {
            secret.metadata.namespace = Some(namespace.to_owned());
        }
        if let Some(value) = secret.spec.value.take() {
            let ns = secret.namespace().unwrap_or_default();
            let constraints = secret.spec.constraints();
            let sealed = keyring
                .seal(
                    value.expose().as_bytes(),
                    secret.spec.seal_context(&ns, &constraints),
                    crate::api::now_seconds(),
                )
                .with_context(|| {
                    format!("failed to seal the sample value of {}", secret.name_any())
                })?;
            secret.spec.sealed = Some(SealedValue::encode(&sealed));
        }
    }
    Ok(())
}

/// Run the pod admission decision on `pod` as `requester` would see it.
pub fn preview(
    pod: serde_json::Value,
    secrets: &[AgentSecret],
    keyring: &Keyring,
    policy: &Policy,
    requester: &str,
) -> anyhow::Result<Preview> {
    let namespace = pod["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_owned();
    if pod["kind"] != "Pod" {
        bail!("inject previews a Pod manifest; got kind {}", pod["kind"]);
    }
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "00000000-0000-0000-0000-000000000000",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": requester},
            "object": &pod,
            "dryRun": true,
        }
    });
    let policy = &preview_policy(policy);
    let request: Request<PodView> = serde_json::from_value::<Review<PodView>>(review)
        .ok()
        .and_then(|review| review.request)
        .ok_or_else(|| anyhow::anyhow!("the manifest is not a valid Pod"))?;
    let index = SecretIndex::default();
    index.replace_all(secrets.iter().filter_map(CachedSecret::from_object));
    // The patch applies to the manifest as written, every field kept.
    let mut object = pod;
    // As a cold admission: the pod-scoped Secret it would share does not exist yet.
    let pod_secrets = PodSecretIndex::default();
    let inputs = pod::Inputs {
        keyring: Some(keyring),
        index: &index,
        pod_secrets: &pod_secrets,
        policy,
        now: crate::api::now_seconds(),
    };
    let summary = match pod::mutate(&request, inputs) {
        Decision::Allow => {
            "admitted unchanged: not a labelled pod, or its owner has no secrets here".to_owned()
        }
        Decision::Deny(message) => bail!("admission would deny this pod: {message}"),
        Decision::Inject(injection) => {
            let patch: json_patch::Patch = serde_json::from_slice(&injection.patch)
                .context("failed to read the admission patch")?;
            json_patch::patch(&mut object, &patch)
                .context("failed to apply the admission patch")?;
            let mut lines = vec![format!(
                "injected for owner {:?}: {}",
                injection.owner,
                if injection.injected.is_empty() {
                    "(none)".to_owned()
                } else {
                    injection.injected.join(", ")
                }
            )];
            if !injection.skipped.is_empty() {
                lines.push(format!(
                    "already set by the pod spec (kept): {}",
                    injection.skipped.join(", ")
                ));
            }
            if !injection.secretless.is_empty() {
                lines.push(format!(
                    "secretless: the sandbox holds placeholders for {}; their values stay in the {PROXY_CONTAINER_NAME} sidecar, which the operator feeds",
                    injection.secretless.join(", ")
                ));
            }
            if let Some(pod::PodSecretUse::Create(secret)) = &injection.secret {
                lines.push(format!(
                    "admission would create Secret {}/{} holding: {} (shared by this owner's sandboxes with the same secrets until {}; later ones write nothing)",
                    secret.namespace,
                    secret.name,
                    secret.keys().collect::<Vec<_>>().join(", "),
                    crate::api::reuse_until_text(secret.reuse_until)
                ));
            }
            lines.join("\n")
        }
    };
    let pod_yaml = serde_yaml::to_string(&object).context("failed to render the pod")?;
    Ok(Preview { pod_yaml, summary })
}

/// `policy` with stand-ins for what only the running operator knows (its image, its feed's
/// address and CA), so that a secretless pod is previewed rather than refused for them.
fn preview_policy(policy: &Policy) -> Policy {
    let mut policy = policy.clone();
    let secretless = &mut policy.secretless;
    secretless
        .proxy_image
        .get_or_insert_with(|| "<--proxy-image>".to_owned());
    secretless
        .feed_url
        .get_or_insert_with(|| feed_url("<--feed-service-host>"));
    if secretless.feed_ca.pem().is_err() {
        secretless.feed_ca = FeedCa::Pem(Arc::from("<PEM of --feed-ca-file>"));
    }
    policy
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SECRET_NAME_ANNOTATION;

    const SECRETS: &str = r#"
apiVersion: agentsecrets.io/v1alpha1
kind: AgentSecret
metadata: {name: x-bearer-token, namespace: sandboxes}
spec: {owner: alice, envName: X_BEARER_TOKEN, value: canary-inject-x}
---
apiVersion: agentsecrets.io/v1alpha1
kind: AgentSecret
metadata: {name: bob-token, namespace: sandboxes}
spec: {owner: bob, envName: BOB_TOKEN, value: canary-inject-bob}
"#;

    fn pod(owner: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "sandbox-1", "namespace": "sandboxes", "labels": {"agentsecrets.io/owner": owner}},
               "spec": {"containers": [{"name": "sandbox", "image": "agent:1"}]}})
    }

    fn secrets(keyring: &Keyring) -> Vec<AgentSecret> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secrets.yaml"), SECRETS).unwrap();
        let mut secrets = read_agentsecrets(dir.path()).unwrap();
        prepare(&mut secrets, keyring, "default").unwrap();
        secrets
    }

    #[test]
    fn preview_injects_references_to_the_owners_secrets_only() {
        let keyring = Keyring::generate("preview").unwrap();
        let secrets = secrets(&keyring);
        assert!(
            secrets
                .iter()
                .all(|s| s.spec.value.is_none() && s.spec.sealed.is_some())
        );
        let preview = preview(pod("alice"), &secrets, &keyring, &Policy::default(), "me").unwrap();
        assert!(preview.pod_yaml.contains("secretKeyRef"));
        assert!(preview.pod_yaml.contains("X_BEARER_TOKEN"));
        assert!(preview.pod_yaml.contains(SECRET_NAME_ANNOTATION));
        assert!(!preview.pod_yaml.contains("BOB_TOKEN"));
        assert!(
            preview.summary.contains("holding: X_BEARER_TOKEN"),
            "{}",
            preview.summary
        );
        for text in [&preview.pod_yaml, &preview.summary] {
            assert!(!text.contains("canary-inject"), "{text}");
        }
    }

    #[test]
    fn preview_reports_a_denial() {
        let keyring = Keyring::generate("preview").unwrap();
        let secrets = secrets(&keyring);
        let mut asking = pod("alice");
        asking["metadata"]["annotations"] = json!({"agentsecrets.io/secrets": "MISSING_KEY"});
        let error = preview(asking, &secrets, &keyring, &Policy::default(), "me").unwrap_err();
        assert!(error.to_string().contains("MISSING_KEY"), "{error}");
    }

    #[test]
    fn an_owner_without_secrets_is_admitted_unchanged() {
        let keyring = Keyring::generate("preview").unwrap();
        let preview = preview(
            pod("carol"),
            &secrets(&keyring),
            &keyring,
            &Policy::default(),
            "me",
        )
        .unwrap();
        assert!(preview.summary.contains("unchanged"));
        assert!(!preview.pod_yaml.contains("secretKeyRef"));
    }

    const SECRETLESS: &str = r#"
apiVersion: agentsecrets.io/v1alpha1
kind: AgentSecret
metadata: {name: x-bearer-token, namespace: sandboxes}
spec: {owner: alice, envName: X_BEARER_TOKEN, value: canary-inject-x, allowedHosts: [api.x.com]}
"#;

    #[test]
    fn preview_of_a_secretless_pod_shows_placeholders_and_the_proxy_never_values() {
        let keyring = Keyring::generate("preview").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secrets.yaml"), SECRETLESS).unwrap();
        let mut secrets = read_agentsecrets(dir.path()).unwrap();
        prepare(&mut secrets, &keyring, "default").unwrap();
        let mut asking = pod("alice");
        asking["metadata"]["annotations"] = json!({"agentsecrets.io/mode": "secretless"});
        let preview = preview(asking, &secrets, &keyring, &Policy::default(), "me").unwrap();
        let shown: serde_json::Value = serde_yaml::from_str(&preview.pod_yaml).unwrap();
        let proxy = &shown["spec"]["initContainers"][0];
        assert_eq!(proxy["name"], PROXY_CONTAINER_NAME);
        assert_eq!(proxy["image"], "<--proxy-image>");
        let sandbox_env = shown["spec"]["containers"][0]["env"].as_array().unwrap();
        let x = sandbox_env
            .iter()
            .find(|e| e["name"] == "X_BEARER_TOKEN")
            .unwrap();
        assert!(x["value"].as_str().unwrap().starts_with("asec_ph_"), "{x}");
        assert!(!preview.pod_yaml.contains("secretKeyRef"));
        assert!(
            preview
                .summary
                .contains("secretless: the sandbox holds placeholders for X_BEARER_TOKEN"),
            "{}",
            preview.summary
        );
        assert!(!preview.summary.contains("would create Secret"));
        for text in [&preview.pod_yaml, &preview.summary] {
            assert!(!text.contains("canary-inject"), "{text}");
        }
    }
}
