//! The controller against a real API server: key rotation at scale, pod-scoped Secrets deleted
//! once their window has passed and no sandbox names them, leader election, and the CRD refusing plaintext whoever
//! writes it. None of them needs the webhook. Run with the rest of `tests/cluster.rs`.

use super::{
    Guard, agentsecret, api_error, assert_no_foreign_agentsecret_webhook, client,
    ensure_default_service_account, eventually, install_crd, sandbox_pod, spawn_agentsecret_watch,
    unique, with_sealed, with_value,
};
use agent_secrets::api::{
    AgentSecret, FIELD_MANAGER as CONTROLLER_FIELD_MANAGER, POD_SECRET_IN_FLIGHT,
    REUSE_UNTIL_ANNOTATION, SealedValue,
};
use agent_secrets::cache::SecretIndex;
use agent_secrets::controller::lease::{Elector, LeaseError};
use agent_secrets::controller::{self, Context, Settings};
use agent_secrets::crypto::{Keyring, KeyringHandle};
use agent_secrets::telemetry::{Metrics, ResultLabels};
use futures::StreamExt as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::{Client, ResourceExt as _};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const TEST_NAMESPACE_PREFIX: &str = "asec-test-";
const POD_SCOPED_SELECTOR: &str =
    "agentsecrets.io/pod-scoped=true,app.kubernetes.io/managed-by=agent-secrets";

// ---------------------------------------------------------------------------------------
// Harness

/// The controller watches the whole cluster, as in production: refuse to run it where it
/// would write to anything but test namespaces (another agent-secrets, or real users' data).
async fn assert_controller_may_run(client: &Client) {
    assert_no_foreign_agentsecret_webhook(client).await;
    let foreign =
        |namespace: Option<String>| namespace.filter(|ns| !ns.starts_with(TEST_NAMESPACE_PREFIX));
    let agentsecrets = Api::<AgentSecret>::all(client.clone())
        .list_metadata(&ListParams::default())
        .await
        .unwrap();
    if let Some(object) = agentsecrets
        .items
        .iter()
        .find(|o| foreign(o.namespace()).is_some())
    {
        panic!(
            "AgentSecret {}/{} exists outside test namespaces; the controller tests run the \
             controller over the whole cluster and would write its status: use a cluster \
             without agent-secrets data",
            object.namespace().unwrap_or_default(),
            object.name_any()
        );
    }
    let secrets = Api::<Secret>::all(client.clone())
        .list_metadata(&ListParams::default().labels(POD_SCOPED_SELECTOR))
        .await
        .unwrap();
    if let Some(secret) = secrets
        .items
        .iter()
        .find(|o| foreign(o.namespace()).is_some())
    {
        panic!(
            "pod-scoped Secret {}/{} exists outside test namespaces; the controller tests run \
             the controller over the whole cluster and may delete it: use a cluster without \
             agent-secrets data",
            secret.namespace().unwrap_or_default(),
            secret.name_any()
        );
    }
}

/// A client, and a test namespace (deleted when the guard drops) on a cluster where the
/// controller may run.
async fn controller_namespace() -> (Client, Guard, String) {
    let client = client().await;
    install_crd(&client).await;
    assert_controller_may_run(&client).await;
    let mut guard = Guard::default();
    let ns = guard.namespace(&client).await;
    (client, guard, ns)
}

/// Start the controller in this process as `agentsecrets run` does once leader (the cache fed
/// by a watch), until the guard drops.
fn start_controller(
    client: &Client,
    guard: &Guard,
    keyring: KeyringHandle,
    rewrap_per_second: u32,
    pod_secret_reuse_window: Duration,
) -> Arc<Context> {
    let index = Arc::new(SecretIndex::default());
    spawn_agentsecret_watch(client, &index, &guard.stop);
    let ctx = Arc::new(Context::new(
        client.clone(),
        keyring,
        index,
        Arc::new(Metrics::default()),
        Settings {
            rewrap_per_second,
            pod_secret_reuse_window,
            reporter_instance: Some(unique("cluster-test-controller")),
            ..Settings::default()
        },
    ));
    tokio::spawn(controller::run_controllers(
        ctx.clone(),
        guard.stop.clone().cancelled_owned(),
    ));
    ctx
}

/// A shared pod-scoped Secret as the webhook creates it for `owner`, handed to new pods until
/// `reuse_until` (no annotation when `None`, as an older version created them).
fn pod_scoped_secret(
    name: &str,
    owner: &str,
    reuse_until: Option<Timestamp>,
    value: &str,
) -> Secret {
    let mut secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {
            "name": name,
            "labels": {
                "app.kubernetes.io/managed-by": "agent-secrets",
                "agentsecrets.io/pod-scoped": "true",
                "agentsecrets.io/owner": owner
            }
        },
        "immutable": true,
        "type": "Opaque"
    }))
    .unwrap();
    if let Some(until) = reuse_until {
        secret.annotations_mut().insert(
            REUSE_UNTIL_ANNOTATION.to_owned(),
            agent_secrets::api::reuse_until_text(until.as_second()),
        );
    }
    secret.data = Some(BTreeMap::from([(
        "X_BEARER_TOKEN".to_owned(),
        ByteString(value.as_bytes().to_vec()),
    )]));
    secret
}

/// `seconds` from now (in the past when negative), in whole seconds.
fn seconds_from_now(seconds: i64) -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second() + seconds).unwrap()
}

/// A sandbox pod of `owner` (never scheduled) naming its pod-scoped Secret, as the webhook
/// leaves it.
fn sandbox_pod_naming(name: &str, owner: &str, secret: &str) -> Pod {
    let mut pod = sandbox_pod(name, Some(owner));
    pod.metadata.annotations = Some(BTreeMap::from([(
        "agentsecrets.io/secret-name".to_owned(),
        secret.to_owned(),
    )]));
    pod
}

/// The Secret's lifecycle state, for failure messages.
fn describe_secret(secret: Option<&Secret>) -> String {
    let Some(secret) = secret else {
        return "gone".into();
    };
    let owners: Vec<String> = secret
        .owner_references()
        .iter()
        .map(|r| format!("{}/{} uid={}", r.kind, r.name, r.uid))
        .collect();
    format!(
        "ownerReferences={owners:?} deletionTimestamp={:?}",
        secret.metadata.deletion_timestamp
    )
}

async fn create_secret(api: &Api<Secret>, secret: &Secret) -> Secret {
    api.create(&PostParams::default(), secret)
        .await
        .unwrap_or_else(|e| panic!("failed to create Secret {}: {e}", secret.name_any()))
}

async fn create_pod(api: &Api<Pod>, pod: &Pod) -> Pod {
    api.create(&PostParams::default(), pod)
        .await
        .unwrap_or_else(|e| panic!("failed to create pod {}: {e}", pod.name_any()))
}

async fn wait_until_gone(api: &Api<Secret>, name: &str, timeout: Duration) {
    eventually(&format!("Secret {name} deleted"), timeout, || async {
        match api.get_opt(name).await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(secret) => Err(describe_secret(Some(&secret))),
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Key rotation

const ROTATED: usize = 300;
const OLD_KEY: &str = "rotation-old";
const NEW_KEY: &str = "rotation-new";

/// Check every object is Ready with its value wrapped under `key_id` and a status that has
/// observed the current generation; otherwise say how far along it is.
fn all_ready_under(objects: &[AgentSecret], key_id: &str) -> Result<(), String> {
    let mut on_key = 0;
    let mut stale = Vec::new();
    for object in objects {
        let sealed_key = object.spec.sealed.as_ref().map(|s| s.key_id.as_str());
        if sealed_key == Some(key_id) {
            on_key += 1;
        }
        let status = object.status.as_ref();
        let ready = status.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
        let generation = object.metadata.generation;
        let fine = sealed_key == Some(key_id)
            && status.and_then(|s| s.key_id.as_deref()) == Some(key_id)
            && status.and_then(|s| s.observed_generation) == generation
            && ready.is_some_and(|c| {
                c.status == "True" && c.reason == "Sealed" && c.observed_generation == generation
            });
        if !fine {
            stale.push(format!(
                "{}: spec.sealed.keyId={sealed_key:?} generation={generation:?} status={:?}",
                object.name_any(),
                status.map(|s| (
                    s.key_id.clone(),
                    s.observed_generation,
                    s.conditions
                        .iter()
                        .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
                        .collect::<Vec<_>>()
                ))
            ));
        }
    }
    if objects.len() == ROTATED && stale.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} objects, {on_key} sealed under {key_id:?}, {} not Ready under it, e.g. {:?}",
            objects.len(),
            stale.len(),
            stale.first()
        ))
    }
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn a_new_primary_key_rewraps_hundreds_of_agentsecrets() {
    let (client, guard, ns) = controller_namespace().await;
    let api: Api<AgentSecret> = Api::namespaced(client.clone(), &ns);

    // Sealed under the old key as the webhook would have; the CRD stores them without it.
    let old = Keyring::generate(OLD_KEY).unwrap();
    let canary = unique("cluster-canary-rotation");
    let mut originals: BTreeMap<String, (String, String, SealedValue)> = BTreeMap::new();
    let mut objects = Vec::new();
    for i in 0..ROTATED {
        let owner = format!("user-{}", i % 7);
        let name = format!("secret-{i:03}");
        let value = format!("{canary}-{i}");
        let mut object = agentsecret(&ns, &name, &owner, &format!("SECRET_{i:03}"));
        // Whole seconds, as the API server stores sealedAt.
        let sealed =
            agent_secrets::testing::sealed(&old, &ns, &owner, &object.spec.env_name, &value);
        object.spec.sealed = Some(sealed.clone());
        originals.insert(name, (owner, value, sealed));
        objects.push(object);
    }
    let created: Vec<Result<(), String>> = futures::stream::iter(objects)
        .map(|object| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &object)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("{}: {e}", object.name_any()))
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for result in created {
        result.unwrap_or_else(|e| panic!("failed to create an AgentSecret: {e}"));
    }

    // The controller with the old key only: everything becomes Ready under it.
    let old_yaml = old.to_yaml().unwrap();
    let handle = KeyringHandle::new(Keyring::from_yaml(&old_yaml).unwrap());
    let ctx = start_controller(
        &client,
        &guard,
        handle.clone(),
        200,
        Duration::from_secs(300),
    );
    // As the leader does: a rotation round is summarised on the Lease (which need not exist
    // for its events to be recorded).
    let reporter = tokio::spawn(agent_secrets::controller::rotation::report_rotations(
        ctx.clone(),
        agent_secrets::controller::rotation::lease_reference(Some(&ns), "rotation-test"),
    ));
    let list = || async {
        api.list(&ListParams::default())
            .await
            .map(|l| l.items)
            .map_err(|e| e.to_string())
    };
    eventually(
        "every AgentSecret Ready under the old key",
        Duration::from_secs(120),
        || async { all_ready_under(&list().await?, OLD_KEY) },
    )
    .await;
    let rewraps = |result: &'static str| {
        ctx.metrics
            .rewraps
            .get_or_create(&ResultLabels { result })
            .get()
    };
    assert_eq!(rewraps("ok"), 0, "nothing to re-wrap yet");

    // A new primary key is put in force (as a reloaded keyring file would be): the controller
    // re-wraps every data key under it without waiting for its periodic pass.
    let mut rotated = Keyring::from_yaml(&old_yaml).unwrap();
    rotated.add_primary(NEW_KEY).unwrap();
    handle.replace(rotated);
    let keyring = handle.current().unwrap();
    let started = Instant::now();
    let stored = eventually(
        "every AgentSecret re-wrapped and Ready under the new key",
        Duration::from_secs(120),
        || async {
            let objects = list().await?;
            all_ready_under(&objects, NEW_KEY).map(|()| objects)
        },
    )
    .await;
    eprintln!(
        "{ROTATED} AgentSecrets re-wrapped in {:?}",
        started.elapsed()
    );

    assert_eq!(stored.len(), ROTATED);
    let left_on_old: Vec<String> = stored
        .iter()
        .filter(|o| o.spec.sealed.as_ref().unwrap().key_id != NEW_KEY)
        .map(|o| o.name_any())
        .collect();
    assert!(
        left_on_old.is_empty(),
        "left on the old key: {left_on_old:?}"
    );
    for object in &stored {
        let name = object.name_any();
        let (_owner, value, original) = &originals[&name];
        let sealed = object.spec.sealed.as_ref().unwrap();
        assert!(object.spec.value.is_none(), "{name}");
        // Only the data key is re-wrapped: the data is not re-encrypted.
        assert_eq!(
            (&sealed.nonce, &sealed.ciphertext, &sealed.sealed_at),
            (&original.nonce, &original.ciphertext, &original.sealed_at),
            "{name}"
        );
        assert_ne!(sealed.wrapped_key, original.wrapped_key, "{name}");
        let opened = sealed
            .open(
                &keyring,
                object.spec.seal_context(&ns, &object.spec.constraints()),
            )
            .unwrap_or_else(|e| panic!("{name} does not open after the rotation: {e}"));
        assert_eq!(opened.expose(), value.as_bytes(), "{name}");
    }
    assert!(
        rewraps("ok") >= u64::try_from(ROTATED).unwrap(),
        "rewraps ok={} error={}",
        rewraps("ok"),
        rewraps("error")
    );

    // The cache admission reads from sees the new key too.
    eventually(
        "the cache sees every value under the new key",
        Duration::from_secs(30),
        || {
            let on_new = (0..7)
                .flat_map(|i| ctx.index.owner_secrets(&ns, &format!("user-{i}")))
                .filter(|s| matches!(&s.sealed, Some(Ok(e)) if e.key_id == NEW_KEY))
                .count();
            async move {
                if on_new == ROTATED {
                    Ok(())
                } else {
                    Err(format!("{on_new} of {ROTATED} under {NEW_KEY}"))
                }
            }
        },
    )
    .await;

    // The rotation is summarised in an event on the Lease once it has been quiet, not in one
    // event per AgentSecret.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let rewrapped = eventually("a Rewrapped event", Duration::from_secs(60), || async {
        let all = events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let reasons: Vec<Option<String>> = all.items.iter().map(|e| e.reason.clone()).collect();
        all.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("Rewrapped"))
            .ok_or_else(|| format!("event reasons: {reasons:?}"))
    })
    .await;
    reporter.abort();
    let regarding = rewrapped.regarding.clone().unwrap_or_default();
    assert_eq!(
        (regarding.kind.as_deref(), regarding.name.as_deref()),
        (Some("Lease"), Some("rotation-test"))
    );
    let note = rewrapped.note.clone().unwrap_or_default();
    assert!(note.contains(OLD_KEY) && note.contains(NEW_KEY), "{note}");
    let per_object: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some("Rewrapped")
                && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) != Some("Lease")
        })
        .map(|e| format!("{:?}", e.regarding))
        .collect();
    assert!(per_object.is_empty(), "per-object events: {per_object:?}");

    // No plaintext in the stored objects or the events.
    let everything = format!(
        "{}{}",
        serde_json::to_string(&api.list(&ListParams::default()).await.unwrap()).unwrap(),
        serde_json::to_string(&events.list(&ListParams::default()).await.unwrap()).unwrap()
    );
    assert!(
        !everything.contains(&canary),
        "a plaintext value was stored"
    );
}

// ---------------------------------------------------------------------------------------
// Reconciles decided from the webhook's index

/// The Ready condition's (status, reason) and the resourceVersion of `name`.
async fn ready_state(api: &Api<AgentSecret>, name: &str) -> (Option<(String, String)>, String) {
    let object = api.get(name).await.unwrap();
    let ready = object
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| (c.status.clone(), c.reason.clone()));
    (ready, object.resource_version().unwrap_or_default())
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn a_settled_agentsecret_is_not_written_again_and_a_stale_status_is_restored() {
    let (client, guard, ns) = controller_namespace().await;
    let api: Api<AgentSecret> = Api::namespaced(client.clone(), &ns);
    let keyring = Keyring::generate("settled").unwrap();
    let mut object = agentsecret(&ns, "token", "alice", "X_BEARER_TOKEN");
    object.spec.sealed = Some(agent_secrets::testing::sealed(
        &keyring,
        &ns,
        "alice",
        "X_BEARER_TOKEN",
        &unique("cluster-canary-settled"),
    ));
    api.create(&PostParams::default(), &object).await.unwrap();
    start_controller(
        &client,
        &guard,
        KeyringHandle::new(keyring),
        20,
        Duration::from_secs(300),
    );
    let sealed = Some(("True".to_owned(), "Sealed".to_owned()));
    eventually("the AgentSecret Ready", Duration::from_secs(60), || async {
        match ready_state(&api, "token").await {
            (ready, _) if ready == sealed => Ok(()),
            (ready, _) => Err(format!("Ready condition: {ready:?}")),
        }
    })
    .await;

    // Settled: nothing is written while nothing changes, nor when an edit that changes no
    // decision (an annotation) prompts a reconcile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, settled_version) = ready_state(&api, "token").await;
    let annotated = api
        .patch(
            "token",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"example.com/note": "x"}}})),
        )
        .await
        .unwrap();
    let annotated_version = annotated.resource_version().unwrap();
    assert_ne!(annotated_version, settled_version);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        ready_state(&api, "token").await,
        (sealed.clone(), annotated_version),
        "the controller wrote to a settled AgentSecret"
    );

    // A status somebody else wrote is not what the controller would write: restored.
    api.patch_status(
        "token",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"conditions": [{
            "type": "Ready", "status": "False", "reason": "Tampered", "message": "not so",
            "lastTransitionTime": "2026-01-01T00:00:00Z"
        }]}})),
    )
    .await
    .unwrap();
    eventually("the status restored", Duration::from_secs(30), || async {
        match ready_state(&api, "token").await {
            (ready, _) if ready == sealed => Ok(()),
            (ready, _) => Err(format!("Ready condition: {ready:?}")),
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Pod-scoped Secrets

/// `created` is still there with the same resourceVersion and ownerReferences: nothing was
/// written to it.
async fn assert_untouched(api: &Api<Secret>, created: &Secret) {
    let now = api.get(&created.name_any()).await.unwrap();
    assert_eq!(
        (&now.metadata.resource_version, now.owner_references()),
        (
            &created.metadata.resource_version,
            created.owner_references()
        ),
        "{} was written to: {}",
        created.name_any(),
        describe_secret(Some(&now))
    );
    assert!(now.metadata.deletion_timestamp.is_none());
}

/// The reasons of the events recorded on the object named `name`.
async fn event_reasons(client: &Client, ns: &str, name: &str) -> Vec<String> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter_map(|e| e.reason)
        .collect()
}

const DELETE_NOW: DeleteParams = DeleteParams {
    dry_run: false,
    grace_period_seconds: Some(0),
    propagation_policy: Some(PropagationPolicy::Background),
    preconditions: None,
};

/// Two sandboxes of alice (`sandbox-alice-1` and `-2`) naming one shared Secret whose window
/// and in-flight margin ended long ago, in a test namespace of their own, with the controller
/// running; torn down when dropped.
struct SharedSecret {
    client: Client,
    ns: String,
    secrets: Api<Secret>,
    pods: Api<Pod>,
    name: &'static str,
    /// The plaintext value it holds (a canary).
    value: String,
    /// The Secret as created.
    created: Secret,
    _guard: Guard,
}

const SHARING_PODS: [&str; 2] = ["sandbox-alice-1", "sandbox-alice-2"];

impl SharedSecret {
    async fn set_up(name: &'static str) -> Self {
        let (client, guard, ns) = controller_namespace().await;
        ensure_default_service_account(&client, &ns).await;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let value = unique("cluster-canary-shared");
        let created = create_secret(
            &secrets,
            &pod_scoped_secret(name, "alice", Some(seconds_from_now(-600)), &value),
        )
        .await;
        for pod in SHARING_PODS {
            create_pod(&pods, &sandbox_pod_naming(pod, "alice", name)).await;
        }
        start_controller(
            &client,
            &guard,
            KeyringHandle::new(Keyring::generate("shared-test").unwrap()),
            20,
            Duration::from_secs(300),
        );
        Self {
            client,
            ns,
            secrets,
            pods,
            name,
            value,
            created,
            _guard: guard,
        }
    }

    /// Wait a little, then check the Secret is there with nothing written to it.
    async fn assert_kept(&self) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_untouched(&self.secrets, &self.created).await;
    }
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn a_shared_secret_outlives_its_window_until_the_last_pod_naming_it_is_deleted() {
    let scene = SharedSecret::set_up("asec-pod-shared-1").await;
    // Kept while pods name it, and never adopted nor otherwise written to.
    scene.assert_kept().await;
    scene
        .pods
        .delete(SHARING_PODS[0], &DELETE_NOW)
        .await
        .unwrap();
    scene.assert_kept().await;

    // The last pod naming it goes: the Secret goes at once (not at a periodic look).
    scene
        .pods
        .delete(SHARING_PODS[1], &DELETE_NOW)
        .await
        .unwrap();
    wait_until_gone(&scene.secrets, scene.name, Duration::from_secs(20)).await;
    eventually(
        "a Collected event on the Secret",
        Duration::from_secs(10),
        || async {
            let reasons = event_reasons(&scene.client, &scene.ns, scene.name).await;
            if reasons == ["Collected"] {
                Ok(())
            } else {
                Err(format!("event reasons: {reasons:?}"))
            }
        },
    )
    .await;
    assert_no_value_in_events(&scene.client, &scene.ns, &scene.value).await;
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn a_finished_sandbox_nobody_deletes_does_not_keep_its_secret() {
    let scene = SharedSecret::set_up("asec-pod-finished-1").await;
    scene.assert_kept().await;
    // The sandboxes finish (as the kubelet reports it) and stay. While one has not, the Secret
    // stays; once both have, in either terminal phase, it goes.
    let finish = |pod: &'static str, phase: &'static str| {
        let pods = scene.pods.clone();
        async move {
            pods.patch_status(
                pod,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": phase}})),
            )
            .await
            .unwrap();
        }
    };
    finish(SHARING_PODS[0], "Succeeded").await;
    scene.assert_kept().await;
    finish(SHARING_PODS[1], "Failed").await;
    wait_until_gone(&scene.secrets, scene.name, Duration::from_secs(20)).await;
    for pod in SHARING_PODS {
        assert!(
            scene.pods.get_opt(pod).await.unwrap().is_some(),
            "the finished pod {pod} itself is left alone"
        );
    }
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn pod_scoped_secrets_no_live_pod_names_are_deleted_once_their_window_and_margin_pass() {
    const WINDOW: Duration = Duration::from_secs(3);
    let (client, guard, ns) = controller_namespace().await;
    ensure_default_service_account(&client, &ns).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let value = unique("cluster-canary-collect");
    let past = Some(seconds_from_now(-60));

    // Past their window and margin: one no pod names, one only a pod of another owner names
    // (it must not keep it).
    create_secret(
        &secrets,
        &pod_scoped_secret("asec-pod-unnamed", "alice", past, &value),
    )
    .await;
    create_secret(
        &secrets,
        &pod_scoped_secret("asec-pod-claimed", "alice", past, &value),
    )
    .await;
    // Past too, but named by a live pod of alice's: kept.
    let kept = create_secret(
        &secrets,
        &pod_scoped_secret("asec-pod-kept", "alice", past, &value),
    )
    .await;
    // Still handed to new pods for a few seconds: kept until its window and margin pass.
    let in_window_until = seconds_from_now(5);
    create_secret(
        &secrets,
        &pod_scoped_secret("asec-pod-in-window", "alice", Some(in_window_until), &value),
    )
    .await;
    // Made by an older version: without the annotation the window runs from its creation.
    let legacy = create_secret(
        &secrets,
        &pod_scoped_secret("asec-pod-legacy", "alice", None, &value),
    )
    .await;
    let mut own: Secret = serde_json::from_value(json!({
        "metadata": {"name": "alice-own", "labels": {"agentsecrets.io/owner": "alice"}},
        "stringData": {"NOTE": "not pod-scoped"}
    }))
    .unwrap();
    own = create_secret(&secrets, &own).await;
    let alice_pod = create_pod(
        &pods,
        &sandbox_pod_naming("sandbox-alice", "alice", "asec-pod-kept"),
    )
    .await;
    let mallory_pod = create_pod(
        &pods,
        &sandbox_pod_naming("sandbox-mallory", "mallory", "asec-pod-claimed"),
    )
    .await;
    // Made by an older version and owned by its pod (which names no Secret): left to the
    // garbage collector.
    let old_pod = create_pod(&pods, &sandbox_pod("sandbox-old", Some("alice"))).await;
    let mut owned = pod_scoped_secret("asec-pod-owned", "alice", None, &value);
    owned.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name: old_pod.name_any(),
        uid: old_pod.uid().unwrap(),
        ..OwnerReference::default()
    }]);
    let owned = create_secret(&secrets, &owned).await;

    start_controller(
        &client,
        &guard,
        KeyringHandle::new(Keyring::generate("collect-test").unwrap()),
        20,
        WINDOW,
    );
    wait_until_gone(&secrets, "asec-pod-unnamed", Duration::from_secs(30)).await;
    wait_until_gone(&secrets, "asec-pod-claimed", Duration::from_secs(30)).await;

    // Its window ends in seconds, the in-flight margin after it: it is there until then.
    let in_window_deadline =
        in_window_until + SignedDuration::try_from(POD_SECRET_IN_FLIGHT).unwrap();
    let still_there = secrets
        .get_opt("asec-pod-in-window")
        .await
        .unwrap()
        .is_some();
    if Timestamp::now() < in_window_deadline {
        assert!(still_there, "deleted before {in_window_deadline}");
    }
    wait_until_gone(
        &secrets,
        "asec-pod-in-window",
        POD_SECRET_IN_FLIGHT + Duration::from_secs(40),
    )
    .await;
    assert!(
        Timestamp::now() >= in_window_deadline,
        "deleted before {in_window_deadline}"
    );
    let legacy_deadline = legacy.metadata.creation_timestamp.clone().unwrap().0
        + SignedDuration::try_from(WINDOW + POD_SECRET_IN_FLIGHT).unwrap();
    wait_until_gone(
        &secrets,
        "asec-pod-legacy",
        WINDOW + POD_SECRET_IN_FLIGHT + Duration::from_secs(40),
    )
    .await;
    assert!(
        Timestamp::now() >= legacy_deadline,
        "deleted before {legacy_deadline}"
    );

    // Well past their windows, the Secret a live pod names, the owned one, the user's own
    // Secret and the pods are untouched.
    assert_untouched(&secrets, &kept).await;
    assert_untouched(&secrets, &owned).await;
    let own_now = secrets.get("alice-own").await.unwrap();
    assert_eq!(
        own_now.metadata.resource_version,
        own.metadata.resource_version
    );
    for pod in [&alice_pod, &mallory_pod, &old_pod] {
        let now = pods.get(&pod.name_any()).await.unwrap();
        assert_eq!(now.uid(), pod.uid());
        assert!(now.metadata.deletion_timestamp.is_none());
    }

    // The collections are recorded on the Secrets, without their values.
    for name in [
        "asec-pod-unnamed",
        "asec-pod-claimed",
        "asec-pod-in-window",
        "asec-pod-legacy",
    ] {
        assert_eq!(
            event_reasons(&client, &ns, name).await,
            ["Collected"],
            "{name}"
        );
    }
    for name in ["asec-pod-kept", "asec-pod-owned"] {
        assert_eq!(
            event_reasons(&client, &ns, name).await,
            Vec::<String>::new(),
            "{name}"
        );
    }
    assert_no_value_in_events(&client, &ns, &value).await;
}

// ---------------------------------------------------------------------------------------
// Leader election

const LEASE_DURATION: Duration = Duration::from_secs(4);

struct Replica {
    identity: String,
    leader: watch::Receiver<bool>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), LeaseError>>,
}

impl Replica {
    fn start(leases: &Api<Lease>, guard: &Guard, identity: &str) -> Self {
        let elector = Elector {
            api: leases.clone(),
            name: "agent-secrets-controller".into(),
            identity: identity.into(),
            duration: LEASE_DURATION,
        };
        let (leader_tx, leader) = watch::channel(false);
        let stop = guard.stop.child_token();
        let task = tokio::spawn(elector.hold(leader_tx, stop.clone()));
        Self {
            identity: identity.into(),
            leader,
            stop,
            task,
        }
    }

    fn leads(&self) -> bool {
        *self.leader.borrow()
    }
}

async fn lease_spec(leases: &Api<Lease>) -> k8s_openapi::api::coordination::v1::LeaseSpec {
    leases
        .get("agent-secrets-controller")
        .await
        .unwrap()
        .spec
        .unwrap_or_default()
}

fn describe_replicas(replicas: &[&Replica]) -> String {
    replicas
        .iter()
        .map(|r| {
            format!(
                "{} leads={} finished={}",
                r.identity,
                r.leads(),
                r.task.is_finished()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn time_of(time: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime>) -> Timestamp {
    time.unwrap_or_else(|| panic!("the Lease has no time set"))
        .0
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn two_replicas_elect_one_leader_and_fail_over() {
    let client = client().await;
    let mut guard = Guard::default();
    let ns = guard.namespace(&client).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let lease_duration = SignedDuration::try_from(LEASE_DURATION).unwrap();

    let a = Replica::start(&leases, &guard, "replica-a");
    let b = Replica::start(&leases, &guard, "replica-b");
    let first = eventually("one replica leads", Duration::from_secs(15), || {
        let state = describe_replicas(&[&a, &b]);
        let result = match (a.leads(), b.leads()) {
            (true, true) => panic!("two leaders: {state}"),
            (false, false) => Err(state),
            (true, false) => Ok("replica-a"),
            (false, true) => Ok("replica-b"),
        };
        async move { result }
    })
    .await;
    let (leader, follower) = if first == "replica-a" { (a, b) } else { (b, a) };

    // Leadership holds over several lease durations: the leader renews, the follower waits.
    let hold_until = Instant::now() + LEASE_DURATION * 2;
    while Instant::now() < hold_until {
        assert!(
            leader.leads() && !follower.leads(),
            "{}",
            describe_replicas(&[&leader, &follower])
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let spec = lease_spec(&leases).await;
    assert_eq!(
        spec.holder_identity.as_deref(),
        Some(leader.identity.as_str())
    );
    assert_eq!(spec.lease_duration_seconds, Some(4));

    // The leader crashes: its task is gone without releasing the Lease. The follower takes
    // over once the Lease expires, not before.
    leader.task.abort();
    let crashed = Instant::now();
    assert!(leader.task.await.unwrap_err().is_cancelled());
    // Let a renewal that was already on the wire land before reading the last one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spec = lease_spec(&leases).await;
    assert_eq!(
        spec.holder_identity.as_deref(),
        Some(leader.identity.as_str()),
        "a crashed leader releases nothing"
    );
    let last_renewal = time_of(spec.renew_time.as_ref());
    eventually(
        "the follower takes over from the crashed leader",
        LEASE_DURATION + Duration::from_secs(4),
        || {
            let result = if follower.leads() {
                Ok(())
            } else {
                Err(describe_replicas(&[&follower]))
            };
            async move { result }
        },
    )
    .await;
    eprintln!("took over from a crashed leader in {:?}", crashed.elapsed());
    let spec = lease_spec(&leases).await;
    assert_eq!(
        spec.holder_identity.as_deref(),
        Some(follower.identity.as_str())
    );
    let acquired = time_of(spec.acquire_time.as_ref());
    assert!(
        acquired >= last_renewal + lease_duration,
        "taken over at {acquired}, before the crashed leader's Lease (renewed {last_renewal}) expired"
    );
    assert_eq!(spec.lease_transitions, Some(1));

    // A third replica waits; the new leader stops gracefully and releases the Lease, so the
    // third takes over at once rather than when the Lease would have expired.
    let third = Replica::start(&leases, &guard, "replica-c");
    tokio::time::sleep(LEASE_DURATION / 2).await;
    assert!(
        follower.leads() && !third.leads(),
        "{}",
        describe_replicas(&[&follower, &third])
    );
    let renewed_before_stop = time_of(lease_spec(&leases).await.renew_time.as_ref());
    follower.stop.cancel();
    let stopped = Instant::now();
    follower
        .task
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("a graceful stop ends leader election cleanly: {e}"));
    assert!(!*follower.leader.borrow(), "leadership given up on stop");
    eventually(
        "the third replica takes over from the released Lease",
        LEASE_DURATION,
        || {
            let result = if third.leads() {
                Ok(())
            } else {
                Err(describe_replicas(&[&third]))
            };
            async move { result }
        },
    )
    .await;
    let handover = stopped.elapsed();
    eprintln!("took over a released Lease in {handover:?}");
    let spec = lease_spec(&leases).await;
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-c"));
    let acquired = time_of(spec.acquire_time.as_ref());
    // The stopped leader renewed at `renewed_before_stop` or later, so its Lease would not
    // have expired before this: the takeover came from the release.
    assert!(
        acquired < renewed_before_stop + lease_duration,
        "taken over at {acquired}, not before the Lease (renewed {renewed_before_stop}) expired"
    );
    assert!(handover < LEASE_DURATION, "{handover:?}");
    assert_eq!(spec.lease_transitions, Some(2));
}

/// A Lease held by `holder` whose clock runs an hour behind this machine's.
fn skewed_lease(holder: &str) -> Lease {
    let an_hour_ago = Timestamp::now() - SignedDuration::from_hours(1);
    Lease {
        metadata: kube::api::ObjectMeta {
            name: Some("agent-secrets-controller".into()),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(i32::try_from(LEASE_DURATION.as_secs()).unwrap()),
            acquire_time: Some(MicroTime(an_hour_ago)),
            renew_time: Some(MicroTime(an_hour_ago)),
            lease_transitions: Some(0),
            ..Default::default()
        }),
    }
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn a_follower_judges_expiry_by_its_own_clock_not_the_holders_renew_time() {
    let client = client().await;
    let mut guard = Guard::default();
    let ns = guard.namespace(&client).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    leases
        .create(&PostParams::default(), &skewed_lease("skewed-holder"))
        .await
        .unwrap();
    // The holder keeps renewing with its slow clock: every renewTime it writes looks an hour
    // old here, yet the record changes, so it is alive.
    let renewer = {
        let leases = leases.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let mut lease = leases.get("agent-secrets-controller").await.unwrap();
                let spec = lease.spec.as_mut().unwrap();
                spec.renew_time = Some(MicroTime(Timestamp::now() - SignedDuration::from_hours(1)));
                leases
                    .replace("agent-secrets-controller", &PostParams::default(), &lease)
                    .await
                    .unwrap();
            }
        })
    };
    let follower = Replica::start(&leases, &guard, "replica-a");
    let hold_until = Instant::now() + LEASE_DURATION * 2;
    while Instant::now() < hold_until {
        assert!(
            !follower.leads(),
            "took over a live Lease whose renewTime is an hour old: {}",
            describe_replicas(&[&follower])
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The holder stops renewing: the follower takes over once the record has not changed for
    // a whole duration by its own clock.
    renewer.abort();
    let _ = renewer.await;
    let last_change = Instant::now();
    eventually(
        "the follower takes over once the record stops changing",
        LEASE_DURATION + Duration::from_secs(4),
        || {
            let result = if follower.leads() {
                Ok(())
            } else {
                Err(describe_replicas(&[&follower]))
            };
            async move { result }
        },
    )
    .await;
    let waited = last_change.elapsed();
    eprintln!("took over {waited:?} after the last renewal");
    assert!(
        waited >= LEASE_DURATION - Duration::from_millis(500),
        "took over {waited:?} after the last renewal, before a whole duration"
    );
    let spec = lease_spec(&leases).await;
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-a"));
    assert_eq!(spec.lease_transitions, Some(1));
}

#[tokio::test]
#[ignore = "needs cluster"]
async fn the_lease_is_released_only_after_the_guarded_work_has_stopped() {
    let client = client().await;
    let mut guard = Guard::default();
    let ns = guard.namespace(&client).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let stop = guard.stop.child_token();
    let ended: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let recorded = ended.clone();
    let leader = Elector {
        api: leases.clone(),
        name: "agent-secrets-controller".into(),
        identity: "replica-a".into(),
        duration: LEASE_DURATION,
    };
    let leading = tokio::spawn(leader.lead(stop.clone(), |shutdown| async move {
        shutdown.await;
        // A graceful stop longer than the Lease duration, as a slow final reconcile.
        tokio::time::sleep(LEASE_DURATION * 2).await;
        *recorded.lock().unwrap() = Some(Instant::now());
    }));
    eventually("replica-a leads", Duration::from_secs(15), || {
        let leases = leases.clone();
        async move {
            match leases.get_opt("agent-secrets-controller").await.unwrap() {
                Some(lease)
                    if lease
                        .spec
                        .as_ref()
                        .and_then(|s| s.holder_identity.as_deref())
                        == Some("replica-a") =>
                {
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    let follower = Replica::start(&leases, &guard, "replica-b");
    stop.cancel();
    let stopped = Instant::now();
    // While the work stops, the Lease stays held and renewed: the follower does not lead.
    let renewed_at_stop = time_of(lease_spec(&leases).await.renew_time.as_ref());
    while stopped.elapsed() < LEASE_DURATION * 3 / 2 {
        assert!(
            !follower.leads(),
            "a replica took over while the leader's work was still stopping"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let spec = lease_spec(&leases).await;
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-a"));
    assert!(
        time_of(spec.renew_time.as_ref()) > renewed_at_stop,
        "the Lease is renewed while the work stops"
    );
    leading
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("a graceful stop ends leader election cleanly: {e}"));
    let ended = ended.lock().unwrap().expect("the work ran and ended");
    eventually(
        "the follower takes over from the released Lease",
        LEASE_DURATION,
        || {
            let result = if follower.leads() {
                Ok(())
            } else {
                Err(describe_replicas(&[&follower]))
            };
            async move { result }
        },
    )
    .await;
    assert!(
        ended.elapsed() < LEASE_DURATION,
        "taken over from the release, not by expiry"
    );
}

// ---------------------------------------------------------------------------------------
// Stray plaintext

/// The controller seals plaintext that slipped past the webhook (unit and mock tests cover
/// that path), but with this CRD nothing can store plaintext in the first place, the
/// controller's own field manager included; so here the refusal is what is checked.
#[tokio::test]
#[ignore = "needs cluster"]
async fn the_crd_refuses_plaintext_even_from_the_controllers_field_manager() {
    let client = client().await;
    install_crd(&client).await;
    assert_no_foreign_agentsecret_webhook(&client).await;
    let mut guard = Guard::default();
    let ns = guard.namespace(&client).await;
    let api: Api<AgentSecret> = Api::namespaced(client.clone(), &ns);
    let value = unique("cluster-canary-controller-plaintext");
    let as_controller = PostParams {
        dry_run: false,
        field_manager: Some(CONTROLLER_FIELD_MANAGER.into()),
    };
    let refused = |status: Box<kube::core::Status>| {
        assert_eq!(status.code, 422, "{status:?}");
        assert!(
            status.message.contains("must never be stored in plaintext"),
            "{}",
            status.message
        );
        assert!(!status.message.contains(&value), "{}", status.message);
    };

    let plaintext = with_value(agentsecret(&ns, "stray", "alice", "X_BEARER_TOKEN"), &value);
    refused(api_error(api.create(&as_controller, &plaintext).await));
    refused(api_error(
        api.create(&as_controller, &with_sealed(plaintext.clone()))
            .await,
    ));
    refused(api_error(
        api.patch(
            "stray",
            &PatchParams::apply(CONTROLLER_FIELD_MANAGER).force(),
            &Patch::Apply(&plaintext),
        )
        .await,
    ));
    assert!(api.get_opt("stray").await.unwrap().is_none());

    // Adding a value to a stored sealed object, by merge patch and by apply.
    let sealed = with_sealed(agentsecret(&ns, "sealed", "alice", "X_BEARER_TOKEN"));
    api.create(&as_controller, &sealed).await.unwrap();
    refused(api_error(
        api.patch(
            "sealed",
            &PatchParams {
                field_manager: Some(CONTROLLER_FIELD_MANAGER.into()),
                ..PatchParams::default()
            },
            &Patch::Merge(json!({"spec": {"value": value}})),
        )
        .await,
    ));
    refused(api_error(
        api.patch(
            "sealed",
            &PatchParams::apply(CONTROLLER_FIELD_MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "agentsecrets.io/v1alpha1", "kind": "AgentSecret",
                "metadata": {"name": "sealed"},
                "spec": {"owner": "alice", "envName": "X_BEARER_TOKEN", "value": value}
            })),
        )
        .await,
    ));
    let stored = serde_json::to_string(&api.get("sealed").await.unwrap()).unwrap();
    assert!(!stored.contains(&value), "{stored}");
}

/// No event in `ns` holds `value`.
async fn assert_no_value_in_events(client: &kube::Client, ns: &str, value: &str) {
    let events = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(
        !serde_json::to_string(&events).unwrap().contains(value),
        "a value in an event"
    );
}
