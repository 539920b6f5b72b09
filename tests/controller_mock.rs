//! Controller reconciles against a mocked API server (tower-test): each scenario asserts the
//! exact requests the reconcile makes, in order, and answers them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use agent_secrets::api::{AgentSecret, POD_SECRET_IN_FLIGHT, SecretString};
use agent_secrets::controller::{Context, Settings, agentsecret, podsecret};
use agent_secrets::crypto::{Keyring, SealContext};
use agent_secrets::testing::{
    ApiServerHandle, Expect, context, context_with, expect, test_settings, verify, verify_within,
};
use http::Method;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::{reflector, watcher};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

fn event_expectation(reason: &'static str, event_type: &'static str) -> Expect {
    expect(
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/ns/events?",
        json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"}, "eventTime": "2026-01-01T00:00:00.000000Z"}),
        move |body| {
            assert_eq!(body["reason"], reason);
            assert_eq!(body["type"], event_type);
            assert_eq!(body["regarding"]["name"], "token");
        },
    )
}

/// The API server's answer to a failed request.
fn failure(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": reason, "reason": reason, "code": code})
}

const OBJECT_PATH: &str = "/apis/agentsecrets.io/v1alpha1/namespaces/ns/agentsecrets/token?";
const STATUS_PATH: &str = "/apis/agentsecrets.io/v1alpha1/namespaces/ns/agentsecrets/token/status?&force=true&fieldManager=agent-secrets";

const CTX: SealContext<'static> = SealContext {
    namespace: "ns",
    owner: "alice",
    env_name: "TOKEN",
    constraints: "",
};

fn agent_secret(keyring: &Keyring) -> AgentSecret {
    let mut object =
        agent_secrets::testing::agent_secret("ns", "token", "alice", "TOKEN", keyring, "v");
    object.metadata.generation = Some(2);
    object.metadata.resource_version = Some("41".into());
    object
}

/// Await `call` while the mocked API server serves and checks `expected`.
async fn verified<T>(
    handle: ApiServerHandle,
    expected: Vec<Expect>,
    call: impl std::future::Future<Output = T>,
) -> T {
    let verifier = tokio::spawn(verify(handle, expected));
    let result = call.await;
    verifier.await.unwrap();
    result
}

async fn run_reconcile(
    object: AgentSecret,
    ctx: Arc<Context>,
    handle: ApiServerHandle,
    expected: Vec<Expect>,
) -> Action {
    verified(
        handle,
        expected,
        agentsecret::reconcile_object(Arc::new(object), ctx),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn stray_plaintext_is_sealed_then_status_and_a_warning_event_are_written() {
    let keyring = Keyring::generate("k1").unwrap();
    let check_ring = Keyring::from_yaml(&keyring.to_yaml().unwrap()).unwrap();
    let mut object = agent_secret(&keyring);
    object.spec.sealed = None;
    object.spec.value = Some(SecretString::new("canary-stray-value".into()));
    let (ctx, handle) = context(keyring);
    let reply = serde_json::to_value(&object).unwrap();
    let expected = vec![
        expect(Method::PATCH, OBJECT_PATH, reply.clone(), move |body| {
            assert_eq!(body["metadata"]["resourceVersion"], "41");
            assert!(
                body["spec"]["value"].is_null(),
                "merge patch removes the plaintext"
            );
            let sealed: agent_secrets::api::SealedValue =
                serde_json::from_value(body["spec"]["sealed"].clone()).unwrap();
            let opened = sealed.open(&check_ring, CTX).unwrap();
            assert_eq!(opened.expose(), b"canary-stray-value");
            assert!(!body.to_string().contains("canary-stray-value"));
        }),
        expect(Method::PATCH, STATUS_PATH, reply, |body| {
            let ready = &body["status"]["conditions"][0];
            assert_eq!(ready["type"], "Ready");
            assert_eq!(ready["status"], "False");
            assert_eq!(ready["reason"], "PlaintextFound");
            assert!(!body.to_string().contains("canary-stray-value"));
        }),
        event_expectation("PlaintextSealed", "Warning"),
    ];
    let action = run_reconcile(object, ctx, handle, expected).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
}

#[tokio::test]
async fn a_rotation_rewraps_under_the_primary_key() {
    let mut keyring = Keyring::generate("k1").unwrap();
    let object = agent_secret(&keyring);
    keyring.add_primary("k2").unwrap();
    let check_ring = Keyring::from_yaml(&keyring.to_yaml().unwrap()).unwrap();
    let old = object.spec.sealed.clone().unwrap();
    let (ctx, handle) = context(keyring);
    let reply = serde_json::to_value(&object).unwrap();
    let expected = vec![
        expect(Method::PATCH, OBJECT_PATH, reply.clone(), move |body| {
            let sealed: agent_secrets::api::SealedValue =
                serde_json::from_value(body["spec"]["sealed"].clone()).unwrap();
            assert_eq!(sealed.key_id, "k2");
            assert_eq!(sealed.ciphertext, old.ciphertext, "no data re-encryption");
            assert_eq!(sealed.open(&check_ring, CTX).unwrap().expose(), b"v");
        }),
        expect(Method::PATCH, STATUS_PATH, reply, |body| {
            assert_eq!(body["status"]["conditions"][0]["reason"], "Sealed");
            // Status reports the key the stored object is wrapped under until the re-wrapped
            // object is reconciled.
            assert_eq!(body["status"]["keyId"], "k1");
        }),
        // The first observation's event; the re-wrap itself has none (a rotation round is
        // summarised once, on the Lease).
        event_expectation("Sealed", "Normal"),
    ];
    run_reconcile(object, ctx, handle, expected).await;
}

#[tokio::test(start_paused = true)]
async fn a_rewrap_without_a_free_rate_limit_slot_is_requeued_without_writing() {
    let mut keyring = Keyring::generate("k1").unwrap();
    let first = agent_secret(&keyring);
    let mut second = agent_secret(&keyring);
    second.metadata.name = Some("token-2".into());
    keyring.add_primary("k2").unwrap();
    let (ctx, handle) = context_with(
        keyring,
        Settings {
            rewrap_per_second: 2,
            ..test_settings()
        },
    );
    // The first re-wrap takes the only slot of this half second.
    let reply = serde_json::to_value(&first).unwrap();
    let expected = vec![
        expect(Method::PATCH, OBJECT_PATH, reply.clone(), |_| {}),
        expect(Method::PATCH, STATUS_PATH, reply, |_| {}),
        event_expectation("Sealed", "Normal"),
    ];
    let verifier = tokio::spawn(verify(handle, expected));
    let started = tokio::time::Instant::now();
    agentsecret::reconcile_object(Arc::new(first), ctx.clone())
        .await
        .unwrap();
    // The second finds no slot: nothing is written, and it comes back when its slot does.
    let action = agentsecret::reconcile_object(Arc::new(second.clone()), ctx.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_millis(500)));
    // The verifier also asserts that nothing more was requested.
    verifier.await.unwrap();
    // Asking again early gets the rest of the wait for the same slot, still without writing
    // (the API server mock is gone: a request would fail the reconcile).
    let slot = started + Duration::from_millis(500);
    let now = tokio::time::Instant::now();
    assert!(
        now < slot,
        "the verifier's wait for extra requests ends before the slot"
    );
    let action = agentsecret::reconcile_object(Arc::new(second), ctx)
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(slot - now));
}

#[tokio::test(start_paused = true)]
async fn a_rotation_of_many_agentsecrets_posts_one_summary_event_on_the_lease() {
    use agent_secrets::controller::rotation::{ROTATION_QUIET, lease_reference, report_rotations};
    const N: usize = 3;
    let mut keyring = Keyring::generate("k1").unwrap();
    let objects: Vec<AgentSecret> = (0..N)
        .map(|i| {
            let mut object = agent_secrets::testing::agent_secret(
                "ns",
                &format!("token-{i}"),
                "alice",
                "TOKEN",
                &keyring,
                &format!("canary-rotation-value-{i}"),
            );
            object.metadata.resource_version = Some("41".into());
            object
        })
        .collect();
    keyring.add_primary("k2").unwrap();
    // Statuses up to date: each reconcile writes its re-wrap and nothing else.
    let objects: Vec<AgentSecret> = objects
        .into_iter()
        .map(|mut object| {
            let plan = agentsecret::plan(
                &object,
                Some(&keyring),
                None,
                k8s_openapi::jiff::Timestamp::now(),
            );
            object.status = Some(plan.status);
            object
        })
        .collect();
    // Two re-wraps a second: the later ones wait for their slots, as in a real rotation.
    let (ctx, handle) = context_with(
        keyring,
        Settings {
            rewrap_per_second: 2,
            ..test_settings()
        },
    );

    let posted_at = Arc::new(std::sync::Mutex::new(None));
    let posted = posted_at.clone();
    let mut expected: Vec<Expect> = objects
        .iter()
        .enumerate()
        .map(|(i, object)| {
            expect(
                Method::PATCH,
                &format!("/apis/agentsecrets.io/v1alpha1/namespaces/ns/agentsecrets/token-{i}?"),
                serde_json::to_value(object).unwrap(),
                |body| assert_eq!(body["spec"]["sealed"]["keyId"], "k2"),
            )
        })
        .collect();
    expected.push(expect(
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/agent-secrets/events?",
        json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"}, "eventTime": "2026-01-01T00:00:00.000000Z"}),
        move |body| {
            *posted.lock().unwrap() = Some(tokio::time::Instant::now());
            assert_eq!(body["reason"], "Rewrapped");
            assert_eq!(body["type"], "Normal");
            assert_eq!(body["action"], "Rewrap");
            assert_eq!(
                body["regarding"],
                json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "namespace": "agent-secrets", "name": "agent-secrets-controller"})
            );
            assert_eq!(
                body["note"],
                "key rotation: 3 data keys re-wrapped under the primary key \"k2\" (3), from \"k1\" (3)"
            );
            assert!(!body.to_string().contains("canary"), "{body}");
        },
    ));
    // Generous: the summary waits for the rotation to have been quiet.
    let verifier = tokio::spawn(verify_within(handle, expected, Duration::from_secs(60)));
    let reporter = tokio::spawn(report_rotations(
        ctx.clone(),
        lease_reference(Some("agent-secrets"), "agent-secrets-controller"),
    ));
    for object in objects.into_iter().map(Arc::new) {
        // Until its re-wrap is written (requeued meanwhile, as the controller would).
        while agentsecret::reconcile_object(object.clone(), ctx.clone())
            .await
            .unwrap()
            != Action::await_change()
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let rotated = tokio::time::Instant::now();
    // The verifier also asserts that no second event follows.
    verifier.await.unwrap();
    reporter.abort();
    let posted_at = posted_at.lock().unwrap().expect("the summary was posted");
    assert!(
        posted_at >= rotated + ROTATION_QUIET,
        "posted {:?} after the last re-wrap, before the rotation was quiet",
        posted_at - rotated
    );
}

#[tokio::test]
async fn a_healthy_secret_gets_its_status_by_server_side_apply() {
    let keyring = Keyring::generate("k1").unwrap();
    let object = agent_secret(&keyring);
    let (ctx, handle) = context(keyring);
    let reply = serde_json::to_value(&object).unwrap();
    let expected = vec![
        expect(Method::PATCH, STATUS_PATH, reply, |body| {
            assert_eq!(body["apiVersion"], "agentsecrets.io/v1alpha1");
            assert_eq!(body["kind"], "AgentSecret");
            assert_eq!(body["status"]["observedGeneration"], 2);
            assert_eq!(body["status"]["keyId"], "k1");
            assert_eq!(body["status"]["conditions"][0]["status"], "True");
            assert!(
                body.get("spec").is_none(),
                "status apply touches only status"
            );
        }),
        event_expectation("Sealed", "Normal"),
    ];
    let action = run_reconcile(object, ctx, handle, expected).await;
    // Healthy: nothing to look at until the object or the keyring changes.
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn an_up_to_date_secret_causes_no_writes() {
    let keyring = Keyring::generate("k1").unwrap();
    let mut object = agent_secret(&keyring);
    let plan = agentsecret::plan(
        &object,
        Some(&keyring),
        None,
        k8s_openapi::jiff::Timestamp::now(),
    );
    object.status = Some(plan.status);
    let (ctx, handle) = context(keyring);
    run_reconcile(object, ctx, handle, vec![]).await;
}

#[tokio::test]
async fn a_transient_api_error_fails_the_reconcile_for_a_retry() {
    let keyring = Keyring::generate("k1").unwrap();
    let object = agent_secret(&keyring);
    let (ctx, handle) = context(keyring);
    let failing =
        expect(Method::PATCH, STATUS_PATH, failure(504, "Timeout"), |_| {}).with_status(504);
    let result = verified(
        handle,
        vec![failing],
        agentsecret::reconcile_object(Arc::new(object), ctx),
    )
    .await;
    assert!(result.is_err());
}

// ---------------------------------------------------------------------------------------
// Reconciles from metadata: the controller stores only metadata, and decides from the
// webhook's cache when it holds the same version of the object.

/// A read of the object not older than the version the watch delivered (41), which the API
/// server answers from its watch cache.
const GET_PATH: &str =
    "/apis/agentsecrets.io/v1alpha1/namespaces/ns/agentsecrets/token?&resourceVersion=41";

/// `object` as the controller's metadata store keeps it.
fn stored_metadata(object: &AgentSecret) -> Arc<PartialObjectMeta<AgentSecret>> {
    let mut metadata: PartialObjectMeta<AgentSecret> =
        serde_json::from_value(serde_json::to_value(object).unwrap()).unwrap();
    agent_secrets::controller::strip_for_store(&mut metadata);
    Arc::new(metadata)
}

/// `object` with the status a reconcile under `keyring` writes for it.
fn settled(mut object: AgentSecret, keyring: &Keyring) -> AgentSecret {
    let plan = agentsecret::plan(&object, Some(keyring), None, Timestamp::now());
    object.status = Some(plan.status);
    object
}

/// Reconcile `listed` from its stored metadata, with `cached` in the webhook's cache,
/// asserting the requests made.
async fn reconcile_metadata(
    listed: &AgentSecret,
    cached: Option<&AgentSecret>,
    ctx: Arc<Context>,
    handle: ApiServerHandle,
    expected: Vec<Expect>,
) -> Action {
    ctx.index
        .replace_all(cached.and_then(agent_secrets::cache::CachedSecret::from_object));
    verified(
        handle,
        expected,
        agentsecret::reconcile(stored_metadata(listed), ctx),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_settled_secret_the_cache_holds_is_reconciled_without_any_request() {
    let keyring = Keyring::generate("k1").unwrap();
    let object = settled(agent_secret(&keyring), &keyring);
    let (ctx, handle) = context(keyring);
    let action = reconcile_metadata(&object, Some(&object), ctx, handle, vec![]).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_cache_holding_another_version_sends_the_reconcile_to_the_object() {
    let keyring = Keyring::generate("k1").unwrap();
    let object = settled(agent_secret(&keyring), &keyring);
    let mut older = object.clone();
    older.metadata.resource_version = Some("40".into());
    let (ctx, handle) = context(keyring);
    // Read, found settled: nothing written.
    let expected = vec![expect(
        Method::GET,
        GET_PATH,
        serde_json::to_value(&object).unwrap(),
        |_| {},
    )];
    reconcile_metadata(&object, Some(&older), ctx, handle, expected).await;
}

#[tokio::test]
async fn a_secret_missing_from_the_cache_is_read_and_its_status_written() {
    let keyring = Keyring::generate("k1").unwrap();
    let object = agent_secret(&keyring);
    let (ctx, handle) = context(keyring);
    let reply = serde_json::to_value(&object).unwrap();
    let expected = vec![
        expect(Method::GET, GET_PATH, reply.clone(), |_| {}),
        expect(Method::PATCH, STATUS_PATH, reply, |body| {
            assert_eq!(body["status"]["conditions"][0]["reason"], "Sealed");
        }),
        event_expectation("Sealed", "Normal"),
    ];
    let action = reconcile_metadata(&object, None, ctx, handle, expected).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_secret_deleted_before_it_is_read_is_left_to_the_watch() {
    let keyring = Keyring::generate("k1").unwrap();
    let object = agent_secret(&keyring);
    let (ctx, handle) = context(keyring);
    let gone = expect(Method::GET, GET_PATH, failure(404, "NotFound"), |_| {}).with_status(404);
    let action = reconcile_metadata(&object, Some(&object), ctx, handle, vec![gone]).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_watch_cache_behind_the_watched_version_is_read_around() {
    let keyring = Keyring::generate("k1").unwrap();
    let object = settled(agent_secret(&keyring), &keyring);
    for code in [504, 429] {
        let (ctx, handle) = context(Keyring::from_yaml(&keyring.to_yaml().unwrap()).unwrap());
        let behind = expect(
            Method::GET,
            GET_PATH,
            failure(code, "Too large resource version"),
            |_| {},
        )
        .with_status(code);
        // The latest version instead, with no resourceVersion.
        let latest = expect(
            Method::GET,
            "/apis/agentsecrets.io/v1alpha1/namespaces/ns/agentsecrets/token",
            serde_json::to_value(&object).unwrap(),
            |_| {},
        );
        let action = reconcile_metadata(&object, None, ctx, handle, vec![behind, latest]).await;
        assert_eq!(action, Action::await_change(), "after a {code}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_rewrap_waits_for_its_rate_limit_slot_before_reading_and_then_takes_no_second_one() {
    let mut keyring = Keyring::generate("k1").unwrap();
    let object = settled(agent_secret(&keyring), &keyring);
    keyring.add_primary("k2").unwrap();
    let (ctx, handle) = context_with(
        keyring,
        Settings {
            rewrap_per_second: 1,
            ..test_settings()
        },
    );
    ctx.index
        .replace_all(agent_secrets::cache::CachedSecret::from_object(&object));
    let reply = serde_json::to_value(&object).unwrap();
    let expected = vec![
        expect(Method::GET, GET_PATH, reply.clone(), |_| {}),
        expect(Method::PATCH, OBJECT_PATH, reply, |body| {
            assert_eq!(body["spec"]["sealed"]["keyId"], "k2");
        }),
    ];
    let verifier = tokio::spawn(verify_within(handle, expected, Duration::from_secs(10)));
    // Another re-wrap took this second's slot: the reconcile is requeued without a request
    // (the verifier would see it as an early GET).
    assert_eq!(ctx.rewrap_limiter.try_acquire("other"), Ok(()));
    let metadata = stored_metadata(&object);
    let action = agentsecret::reconcile(metadata.clone(), ctx.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(1)));
    // At its slot it reads and re-wraps; with a limit of one per second, taking a second
    // slot after the read would have requeued it again instead of writing.
    tokio::time::advance(Duration::from_secs(1)).await;
    let action = agentsecret::reconcile(metadata, ctx).await.unwrap();
    verifier.await.unwrap();
    assert_eq!(action, Action::await_change());
}

// ---------------------------------------------------------------------------------------
// Pod-scoped Secrets

const POD_SECRET: &str = "asec-pod-abc";
const SECRET_PATH: &str = "/api/v1/namespaces/ns/secrets/asec-pod-abc?";

/// The reuse-until annotation of a window ending `seconds` from now (negative: ended that
/// long ago), in whole seconds as the webhook writes it.
fn reuse_until(seconds: i64) -> String {
    Timestamp::from_second(Timestamp::now().as_second() + seconds)
        .unwrap()
        .to_string()
}

/// A shared pod-scoped Secret of alice in `namespace` (metadata only, as the controller
/// watches it), created a while ago and reused until `until`.
fn pod_secret_in(namespace: &str, until: &str) -> PartialObjectMeta<Secret> {
    serde_json::from_value(json!({
        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
        "metadata": {
            "name": POD_SECRET, "namespace": namespace, "uid": "s-uid", "resourceVersion": "7",
            "labels": {"agentsecrets.io/owner": "alice", "agentsecrets.io/pod-scoped": "true",
                       "app.kubernetes.io/managed-by": "agent-secrets"},
            "annotations": {"agentsecrets.io/reuse-until": until},
            "creationTimestamp": reuse_until(-3600),
        },
    }))
    .unwrap()
}

fn pod_secret(until: &str) -> PartialObjectMeta<Secret> {
    pod_secret_in("ns", until)
}

/// A sandbox pod of `owner` in `namespace` naming the Secret `secret`, as the metadata watch
/// delivers it (managed fields and other annotations included).
fn sandbox_pod(namespace: &str, name: &str, owner: &str, secret: &str, terminating: bool) -> Value {
    let mut pod = json!({
        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
        "metadata": {
            "name": name, "namespace": namespace, "uid": format!("{name}-uid"),
            "resourceVersion": "5",
            "labels": {"agentsecrets.io/owner": owner, "app": "agent-sandbox"},
            "annotations": {"agentsecrets.io/secret-name": secret,
                            "agentsecrets.io/injected": "TOKEN"},
            "managedFields": [{"manager": "orchestrator", "operation": "Update",
                               "apiVersion": "v1", "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:metadata": {}}}]
        }
    });
    if terminating {
        pod["metadata"]["deletionTimestamp"] = json!(reuse_until(-5));
    }
    pod
}

/// [`POD_SECRET_IN_FLIGHT`] in seconds.
const IN_FLIGHT: i64 = POD_SECRET_IN_FLIGHT.as_secs() as i64;

/// A pod store that has listed `pods`, as the controller's pod watch fills it.
fn pod_store(pods: &[Value]) -> podsecret::PodStore {
    let (store, mut writer) = reflector::store::<PartialObjectMeta<Pod>>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for pod in pods {
        let mut pod: PartialObjectMeta<Pod> = serde_json::from_value(pod.clone()).unwrap();
        podsecret::strip_pod_for_store(&mut pod);
        writer.apply_watcher_event(&watcher::Event::InitApply(pod));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    store
}

/// How long `action` requeues after (kube-runtime keeps it private but prints it).
fn requeue_after(action: &Action) -> Option<Duration> {
    let text = format!("{action:?}");
    let seconds = text
        .split("requeue_after: Some(")
        .nth(1)?
        .split("s)")
        .next()?;
    Some(Duration::from_secs_f64(seconds.parse().ok()?))
}

/// A `Collected` event on the pod-scoped Secret in `namespace`, whose window ended at `until`.
fn collected_event(namespace: &'static str, until: String) -> Expect {
    expect(
        Method::POST,
        &format!("/apis/events.k8s.io/v1/namespaces/{namespace}/events?"),
        json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"}, "eventTime": "2026-01-01T00:00:00.000000Z"}),
        move |body| {
            assert_eq!(body["reason"], "Collected");
            assert_eq!(body["type"], "Normal");
            assert_eq!(body["action"], "Delete");
            assert_eq!(
                body["regarding"],
                json!({"apiVersion": "v1", "kind": "Secret", "namespace": namespace,
                       "name": POD_SECRET, "uid": "s-uid"})
            );
            assert_eq!(
                body["note"],
                format!(
                    "deleted: no sandbox pod names this pod-scoped Secret and its reuse window ended at {until}"
                )
            );
            assert!(body.get("related").is_none(), "{body}");
        },
    )
}

/// The metadata LIST of alice's pods in `namespace` the collector makes right before deleting,
/// answered with `pods`.
fn pod_listing(namespace: &str, pods: Vec<Value>) -> Expect {
    let items: Vec<Value> = pods
        .into_iter()
        .map(|mut pod| {
            pod["apiVersion"] = json!("meta.k8s.io/v1");
            pod["kind"] = json!("PartialObjectMetadata");
            pod
        })
        .collect();
    expect(
        Method::GET,
        &format!(
            // Unfinished pods only: a finished sandbox keeps no Secret.
            "/api/v1/namespaces/{namespace}/pods?&fieldSelector=status.phase%21%3DSucceeded%2Cstatus.phase%21%3DFailed&labelSelector=agentsecrets.io%2Fowner%3Dalice"
        ),
        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
               "metadata": {"resourceVersion": "20"}, "items": items}),
        |_| {},
    )
}

/// The precondition-guarded deletion of the pod-scoped Secret in `namespace`.
fn secret_deletion(namespace: &str) -> Expect {
    expect(
        Method::DELETE,
        &format!("/api/v1/namespaces/{namespace}/secrets/{POD_SECRET}?"),
        json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        |body| {
            assert_eq!(
                body["preconditions"],
                json!({"uid": "s-uid", "resourceVersion": "7"})
            );
        },
    )
}

/// Reconcile alice's pod-scoped Secret reused until `until` against a store of `pods`, with
/// the API server expecting exactly `expected`.
async fn collect(until: &str, pods: &[Value], expected: Vec<Expect>) -> Action {
    let (ctx, handle) = context(Keyring::generate("k1").unwrap());
    let store = pod_store(pods);
    verified(
        handle,
        expected,
        podsecret::reconcile(Arc::new(pod_secret(until)), ctx, &store),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_secret_named_by_a_live_pod_is_kept_without_any_write() {
    // Its window and the in-flight margin long past: only the pod keeps it. The verifier
    // asserts that no request at all was made: no deletion, no patch.
    let pods = [
        sandbox_pod("ns", "sandbox-1", "alice", "asec-pod-other", false),
        sandbox_pod("ns", "sandbox-2", "alice", POD_SECRET, false),
    ];
    let action = collect(&reuse_until(-3000), &pods, vec![]).await;
    assert_eq!(action, Action::requeue(podsecret::KEPT_RECHECK));
}

#[tokio::test]
async fn an_unnamed_secret_past_its_window_and_the_in_flight_margin_is_deleted_with_preconditions()
{
    let until = reuse_until(-(IN_FLIGHT + 1));
    // Pods that do not keep it: terminating, naming another Secret, of another owner.
    let pods = [
        sandbox_pod("ns", "sandbox-1", "alice", POD_SECRET, true),
        sandbox_pod("ns", "sandbox-2", "alice", "asec-pod-other", false),
        sandbox_pod("ns", "sandbox-3", "mallory", POD_SECRET, false),
    ];
    let expected = vec![
        pod_listing("ns", vec![]),
        secret_deletion("ns"),
        collected_event("ns", until.clone()),
    ];
    let action = collect(&until, &pods, expected).await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_pod_the_store_has_not_seen_yet_keeps_the_secret() {
    // The store lags: the API server already holds a pod naming the Secret; the verifier
    // asserts that no deletion followed.
    let listed = sandbox_pod("ns", "sandbox-late", "alice", POD_SECRET, false);
    let action = collect(
        &reuse_until(-600),
        &[],
        vec![pod_listing("ns", vec![listed])],
    )
    .await;
    assert_eq!(action, Action::requeue(podsecret::KEPT_RECHECK));
}

#[tokio::test]
async fn a_secret_deleted_meanwhile_is_not_reported_collected() {
    let gone = expect(
        Method::DELETE,
        SECRET_PATH,
        failure(404, "NotFound"),
        |_| {},
    )
    .with_status(404);
    // The verifier asserts that no event followed.
    let action = collect(
        &reuse_until(-600),
        &[],
        vec![pod_listing("ns", vec![]), gone],
    )
    .await;
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_secret_in_its_window_is_looked_at_again_when_the_in_flight_margin_ends() {
    let action = collect(&reuse_until(60), &[], vec![]).await;
    // The window ends in 60 s (less the part of this second gone), the margin after it.
    let after = requeue_after(&action).unwrap_or_else(|| panic!("not requeued: {action:?}"));
    let deadline = Duration::from_secs(60) + POD_SECRET_IN_FLIGHT;
    assert!(
        after > deadline - Duration::from_secs(2) && after <= deadline,
        "{after:?}"
    );
    // Not yet deletable a second into the margin either.
    let action = collect(&reuse_until(-1), &[], vec![]).await;
    let after = requeue_after(&action).unwrap_or_else(|| panic!("not requeued: {action:?}"));
    let left = POD_SECRET_IN_FLIGHT - Duration::from_secs(1);
    assert!(
        after > left - Duration::from_secs(2) && after <= left,
        "{after:?}"
    );
}

type Responder = tower_test::mock::SendResponse<http::Response<kube::client::Body>>;

fn respond(send: Responder, body: Vec<u8>) {
    send.send_response(
        http::Response::builder()
            .body(kube::client::Body::from(body))
            .unwrap(),
    );
}

fn list_of(items: Vec<Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "List",
        "metadata": {"resourceVersion": "10"}, "items": items}))
    .unwrap()
}

async fn next_request(
    handle: &mut ApiServerHandle,
) -> (http::Request<kube::client::Body>, Responder) {
    tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("a request")
        .expect("the client is alive")
}

fn is_watch(request: &http::Request<kube::client::Body>) -> bool {
    request
        .uri()
        .query()
        .unwrap_or_default()
        .contains("watch=true")
}

#[tokio::test]
async fn deleting_the_last_pod_naming_a_secret_past_its_window_gets_it_collected_at_once() {
    use agent_secrets::cache::WatchScope;
    const PODS: &str = "/api/v1/namespaces/team-a/pods";
    const SECRETS: &str = "/api/v1/namespaces/team-a/secrets";
    let (ctx, mut handle) = context_with(
        Keyring::generate("k1").unwrap(),
        Settings {
            sandbox_scopes: vec![WatchScope::Namespace("team-a".into())],
            ..test_settings()
        },
    );
    let running = tokio::spawn(agent_secrets::controller::run_controllers(
        ctx,
        std::future::pending(),
    ));
    let until = reuse_until(-600);
    let pod = sandbox_pod("team-a", "sandbox-1", "alice", POD_SECRET, false);
    let mut open_watches = Vec::new();

    // The pods are listed first; the Secrets only once the pod watch has started (so the
    // pods' list is in the store when the Secret is first looked at).
    let (mut secrets_list, mut pod_watch) = (None, None);
    while secrets_list.is_none() || pod_watch.is_none() {
        let (request, send) = next_request(&mut handle).await;
        match (request.uri().path(), is_watch(&request)) {
            (PODS, false) => respond(send, list_of(vec![pod.clone()])),
            (PODS, true) => pod_watch = Some(send),
            (SECRETS, false) => secrets_list = Some(send),
            (_, true) => open_watches.push(send),
            // The AgentSecrets: none.
            (_, false) => respond(send, list_of(vec![])),
        }
    }
    let secret = serde_json::to_value(pod_secret_in("team-a", &until)).unwrap();
    respond(secrets_list.unwrap(), list_of(vec![secret]));

    // Long past its window, but a live pod names it: nothing is written.
    let quiet = tokio::time::Instant::now() + Duration::from_secs(1);
    while let Ok(request) = tokio::time::timeout_at(quiet, handle.next_request()).await {
        let (request, send) = request.expect("the client is alive");
        assert!(
            is_watch(&request),
            "unexpected {} {} while a pod names the Secret",
            request.method(),
            request.uri()
        );
        open_watches.push(send);
    }

    // The pod is deleted: its Secret is deleted at once, not at a periodic look.
    let mut deleted = pod.clone();
    deleted["metadata"]["resourceVersion"] = json!("11");
    let event = serde_json::to_vec(&json!({"type": "DELETED", "object": deleted})).unwrap();
    respond(pod_watch.unwrap(), event);
    let deleted_at = tokio::time::Instant::now();
    let mut expected = vec![
        pod_listing("team-a", vec![]),
        secret_deletion("team-a"),
        collected_event("team-a", until),
    ]
    .into_iter();
    let mut current = expected.next();
    while let Some(expect) = current.take() {
        let (request, send) = next_request(&mut handle).await;
        if is_watch(&request) {
            open_watches.push(send);
            current = Some(expect);
            continue;
        }
        assert_eq!(
            (
                request.method(),
                request.uri().path_and_query().unwrap().as_str()
            ),
            (&expect.method, expect.path_and_query.as_str())
        );
        let body = http_body_util::BodyExt::collect(request.into_body())
            .await
            .unwrap()
            .to_bytes();
        let body = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap()
        };
        (expect.check)(&body);
        respond(send, serde_json::to_vec(&expect.reply).unwrap());
        current = expected.next();
    }
    assert!(
        deleted_at.elapsed() < podsecret::POD_STORE_UNSYNCED_RETRY,
        "prompted by the pod's deletion, not by a later look: {:?}",
        deleted_at.elapsed()
    );
    running.abort();
    let _ = running.await;
    drop(open_watches);
}

// ---------------------------------------------------------------------------------------
// Sandbox namespaces

/// One request the controllers made while starting their watches.
struct Seen {
    path: String,
    query: String,
    accept: String,
}

/// Answer every list with an empty one and keep every watch open, until `done` holds of the
/// requests seen or `wait` passes without a request; returns the requests and the open
/// watches (dropping them ends the watches).
async fn serve_watches(
    handle: &mut ApiServerHandle,
    seen: &mut Vec<Seen>,
    wait: Duration,
    done: impl Fn(&[Seen]) -> bool,
) -> Vec<Responder> {
    let mut open_watches = Vec::new();
    while !done(seen) {
        let Ok(next) = tokio::time::timeout(wait, handle.next_request()).await else {
            break;
        };
        let (request, send) = next.unwrap();
        seen.push(Seen {
            path: request.uri().path().to_owned(),
            query: request.uri().query().unwrap_or_default().to_owned(),
            accept: request
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
        });
        if request
            .uri()
            .query()
            .unwrap_or_default()
            .contains("watch=true")
        {
            open_watches.push(send);
        } else {
            let list = json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": []});
            respond(send, serde_json::to_vec(&list).unwrap());
        }
    }
    open_watches
}

const AGENTSECRETS_PATH: &str = "/apis/agentsecrets.io/v1alpha1/agentsecrets";

#[tokio::test(start_paused = true)]
async fn with_sandbox_namespaces_secrets_and_pods_are_watched_only_there() {
    use agent_secrets::cache::WatchScope;
    let (ctx, mut handle) = context_with(
        Keyring::generate("k1").unwrap(),
        Settings {
            sandbox_scopes: vec![
                WatchScope::Namespace("team-a".into()),
                WatchScope::Namespace("team-b".into()),
            ],
            ..test_settings()
        },
    );
    ctx.index.replace_all([]);
    let running = tokio::spawn(agent_secrets::controller::run_controllers(
        ctx,
        std::future::pending(),
    ));
    let wanted = [
        AGENTSECRETS_PATH,
        "/api/v1/namespaces/team-a/secrets",
        "/api/v1/namespaces/team-b/secrets",
        "/api/v1/namespaces/team-a/pods",
        "/api/v1/namespaces/team-b/pods",
    ];
    let mut seen = Vec::new();
    let open_watches = serve_watches(&mut handle, &mut seen, Duration::from_secs(10), |seen| {
        wanted.iter().all(|w| seen.iter().any(|s| s.path == *w))
    })
    .await;
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert!(
        wanted.iter().all(|w| paths.contains(w)),
        "not every watch started; requests: {paths:?}"
    );
    assert!(
        !paths.contains(&"/api/v1/secrets") && !paths.contains(&"/api/v1/pods"),
        "Secrets or pods watched cluster-wide: {paths:?}"
    );
    // Finished pods leave the pod watch, as deleted ones do.
    for pods in seen.iter().filter(|s| s.path.ends_with("/pods")) {
        assert!(
            pods.query
                .contains("fieldSelector=status.phase%21%3DSucceeded%2Cstatus.phase%21%3DFailed"),
            "pods watched without the unfinished-phase selector: {}",
            pods.query
        );
    }
    // Graceful shutdown is not what this checks: stop at once.
    running.abort();
    let _ = running.await;
    drop(open_watches);
}

#[tokio::test(start_paused = true)]
async fn agentsecrets_are_watched_for_metadata_only_once_the_cache_has_listed() {
    let (ctx, mut handle) = context(Keyring::generate("k1").unwrap());
    let running = tokio::spawn(agent_secrets::controller::run_controllers(
        ctx.clone(),
        std::future::pending(),
    ));
    // Until the webhook's cache has listed, every reconcile would read its object: the
    // controller does not start.
    let mut seen = Vec::new();
    let mut open_watches =
        serve_watches(&mut handle, &mut seen, Duration::from_secs(5), |_| false).await;
    assert!(
        !seen.iter().any(|s| s.path == AGENTSECRETS_PATH),
        "AgentSecrets listed before the cache synced"
    );
    assert!(
        !seen.is_empty(),
        "the pod-scoped Secret watches start meanwhile"
    );
    ctx.index.replace_all([]);
    open_watches.extend(
        serve_watches(&mut handle, &mut seen, Duration::from_secs(5), |seen| {
            seen.iter().any(|s| s.path == AGENTSECRETS_PATH)
        })
        .await,
    );
    let agentsecrets: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.path == AGENTSECRETS_PATH)
        .collect();
    assert!(!agentsecrets.is_empty(), "AgentSecrets never listed");
    for request in agentsecrets {
        assert!(
            request.accept.contains("as=PartialObjectMetadata"),
            "AgentSecrets requested whole: Accept {:?}",
            request.accept
        );
    }
    running.abort();
    let _ = running.await;
    drop(open_watches);
}
