//! In-process costs: envelope encryption, and the two admission decisions with a cache of
//! 100 000 AgentSecrets. Run with `cargo bench --bench admission`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use agent_secrets::api::{AgentSecret, AgentSecretSpec, SecretString};
use agent_secrets::cache::{PodSecretIndex, SecretIndex};
use agent_secrets::crypto::{Keyring, SealContext};
use agent_secrets::testing::synthetic;
use agent_secrets::webhook::review::{PodView, Request, Review};
use agent_secrets::webhook::{Policy, agentsecret, pod};
use criterion::{BenchmarkId, Criterion, black_box, criterion_group, criterion_main};
use serde_json::json;

const CTX: SealContext<'static> = SealContext {
    namespace: "bench",
    owner: "user-0",
    env_name: "SECRET_0",
    constraints: "",
};
const NOW: i64 = agent_secrets::testing::SEALED_AT;

fn crypto(c: &mut Criterion) {
    let mut keyring = Keyring::generate("old").unwrap();
    let mut group = c.benchmark_group("envelope");
    for size in [64usize, 4096] {
        let value = vec![0x5a; size];
        let sealed = keyring.seal(&value, CTX, NOW).unwrap();
        group.bench_with_input(BenchmarkId::new("seal", size), &value, |b, v| {
            b.iter(|| keyring.seal(black_box(v), CTX, NOW).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("open", size), &sealed, |b, s| {
            b.iter(|| keyring.open(black_box(s), CTX).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("seal+open", size), &value, |b, v| {
            b.iter(|| {
                let sealed = keyring.seal(black_box(v), CTX, NOW).unwrap();
                keyring.open(&sealed, CTX).unwrap()
            })
        });
    }
    keyring.add_primary("new").unwrap();
    for size in [64usize, 4096] {
        let mut old = Keyring::from_yaml(&keyring.to_yaml().unwrap()).unwrap();
        old.set_primary("old").unwrap();
        let sealed = old.seal(&vec![0x5a; size], CTX, NOW).unwrap();
        group.bench_with_input(BenchmarkId::new("rewrap", size), &sealed, |b, s| {
            b.iter(|| keyring.rewrap(black_box(s)).unwrap())
        });
    }
    group.finish();
}

/// 100 000 AgentSecrets: 5 000 owners × 20, plus owners with 1 and 100 secrets.
fn index(keyring: &Keyring) -> SecretIndex {
    let index = SecretIndex::default();
    let mut secrets = synthetic(keyring, "bench", 5_000, 20).unwrap();
    for (owner, count) in [("one", 1), ("hundred", 100)] {
        for mut secret in synthetic(keyring, "bench", 1, count).unwrap() {
            let ctx = SealContext::new("bench", owner, &secret.env_name);
            let sealed = keyring.seal(b"value", ctx, NOW).unwrap();
            secret.owner = owner.to_owned();
            secret.name = format!("{owner}-{}", secret.name);
            secret.sealed = Some(Ok(sealed));
            secrets.push(secret);
        }
    }
    index.replace_all(secrets);
    index
}

fn pod_request(owner: &str) -> Request<PodView> {
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "b3f1c2d4-0000-4000-8000-000000000000",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "bench", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:bench:orchestrator"},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": "sandbox-", "namespace": "bench",
                             "labels": {"agentsecrets.io/owner": owner}},
                "spec": {"containers": [
                    {"name": "sandbox", "image": "agent:1", "env": [{"name": "LOG_LEVEL", "value": "info"}]},
                    {"name": "browser", "image": "browser:1"}
                ]}
            },
            "dryRun": false
        }
    });
    let review: Review<PodView> = serde_json::from_value(review).unwrap();
    review.request.unwrap()
}

/// The pod review a real API server sent (tests/fixtures), for owner `user-42` in `bench`.
fn recorded_pod_review() -> Vec<u8> {
    let fixture: serde_json::Value = serde_json::from_str(include_str!(
        "../tests/fixtures/admission/pod_create_by_service_account.json"
    ))
    .unwrap();
    let mut review = fixture["review"].clone();
    review["request"]["namespace"] = json!("bench");
    review["request"]["object"]["metadata"]["namespace"] = json!("bench");
    review["request"]["object"]["metadata"]["labels"]["agentsecrets.io/owner"] = json!("user-42");
    serde_json::to_vec(&review).unwrap()
}

/// Record in `warm` the pod-scoped Secret a cold admission of `request` would create.
fn warm_up(warm: &PodSecretIndex, request: &Request<PodView>, cold: pod::Inputs<'_>) {
    let pod::Decision::Inject(injection) = pod::mutate(request, cold) else {
        panic!("the pod is injected");
    };
    let Some(pod::PodSecretUse::Create(secret)) = injection.secret else {
        panic!("a cold admission creates the Secret");
    };
    warm.created(&secret.namespace, &secret.name, secret.reuse_until);
}

fn admission(c: &mut Criterion) {
    let keyring = Keyring::generate("k").unwrap();
    let index = index(&keyring);
    assert_eq!(index.len(), 100_101);
    let policy = Policy::default();
    let empty = PodSecretIndex::default();
    let inputs = |pod_secrets| pod::Inputs {
        keyring: Some(&keyring),
        index: &index,
        pod_secrets,
        policy: &policy,
        now: NOW,
    };
    // Warm: the owner's pod-scoped Secret of this content and window exists, as for every
    // sandbox but the first of a reuse window.
    let warm = PodSecretIndex::default();
    let mut group = c.benchmark_group("pod_mutation");
    for (owner, count) in [("one", 1), ("user-42", 20), ("hundred", 100)] {
        let request = pod_request(owner);
        warm_up(&warm, &request, inputs(&empty));
        group.bench_function(BenchmarkId::new("secrets", count), |b| {
            b.iter(|| {
                let decision = pod::mutate(black_box(&request), inputs(&empty));
                assert!(matches!(decision, pod::Decision::Inject(_)));
                decision
            })
        });
        group.bench_function(BenchmarkId::new("secrets_warm", count), |b| {
            b.iter(|| {
                let decision = pod::mutate(black_box(&request), inputs(&warm));
                assert!(matches!(&decision, pod::Decision::Inject(i)
                    if matches!(i.secret, Some(pod::PodSecretUse::Reuse { .. }))));
                decision
            })
        });
    }
    group.finish();

    // What a request costs in-process: read the recorded 3 kB review, decide, encode the patch.
    let body = recorded_pod_review();
    let recorded: Review<PodView> = serde_json::from_slice(&body).unwrap();
    warm_up(&warm, recorded.request.as_ref().unwrap(), inputs(&empty));
    for (name, pod_secrets) in [("", &empty), ("_warm", &warm)] {
        c.bench_function(&format!("pod_review/parse+mutate+encode/20{name}"), |b| {
            b.iter(|| {
                let review: Review<PodView> = serde_json::from_slice(black_box(&body)).unwrap();
                let request = review.request.unwrap();
                match pod::mutate(&request, inputs(pod_secrets)) {
                    pod::Decision::Inject(injection) => {
                        use base64::Engine as _;
                        base64::engine::general_purpose::STANDARD.encode(&injection.patch)
                    }
                    other => panic!("{other:?}"),
                }
            })
        });
    }

    let mut object = AgentSecret::new(
        "user-0-new",
        AgentSecretSpec {
            owner: "user-0".into(),
            env_name: "NEW_API_KEY".into(),
            description: None,
            value: Some(SecretString::new(
                "sk-live-0123456789abcdef0123456789abcdef".into(),
            )),
            sealed: None,
            ..Default::default()
        },
    );
    object.metadata.namespace = Some("bench".into());
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "b3f1c2d4-0000-4000-8000-000000000001",
            "kind": {"group": "agentsecrets.io", "version": "v1alpha1", "kind": "AgentSecret"},
            "resource": {"group": "agentsecrets.io", "version": "v1alpha1", "resource": "agentsecrets"},
            "namespace": "bench", "name": "user-0-new", "operation": "CREATE",
            // Written by its owner, as owner binding requires.
            "userInfo": {"username": "user-0"}, "object": object, "dryRun": false
        }
    });
    let review: Review<AgentSecret> = serde_json::from_value(review).unwrap();
    let request: Request<AgentSecret> = review.request.unwrap();
    c.bench_function("agentsecret_mutation/seal", |b| {
        b.iter(|| {
            let decision =
                agentsecret::mutate(black_box(&request), Some(&keyring), &index, &policy, NOW);
            assert!(matches!(decision, agentsecret::Decision::Patch { .. }));
            decision
        })
    });
}

criterion_group!(benches, crypto, admission);
criterion_main!(benches);
