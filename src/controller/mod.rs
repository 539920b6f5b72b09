//! The controller: keeps every AgentSecret's status true, re-wraps data keys to the primary
//! KEK, and deletes pod-scoped Secrets once no sandbox uses them or may be handed them. Runs
//! only on the replica holding the leader Lease.

pub mod agentsecret;
pub mod lease;
pub mod podsecret;
pub mod rotation;

use futures::StreamExt as _;
use futures::future::{BoxFuture, Shared};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::api::{AgentSecret, OWNER_LABEL};
use crate::cache::{SecretIndex, WatchScope, pod_scoped_selector};
use crate::crypto::KeyringHandle;
use crate::telemetry::{KindLabels, Metrics, ResultLabels};
use lease::{Elector, LeaseError};

/// Why a reconcile failed. API errors are transient and retried with backoff; decisions
/// about damaged data are not errors (they are reported in status).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[source] kube::Error),
}

/// Spaces writes evenly: at most `per_second` grants per second, shared by every reconcile.
/// A caller that finds no slot free is given the next one and told how long to wait for it, so
/// it can requeue instead of sleeping in a reconcile slot; waiting callers come back spread
/// out rather than all at once.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    state: Mutex<LimiterState>,
}

#[derive(Debug)]
struct LimiterState {
    /// The earliest time not yet granted or promised.
    next_free: Instant,
    /// Slots promised to callers that were told to come back, by key.
    promised: HashMap<String, Instant>,
    /// When to forget promises whose callers never came back (e.g. their object was deleted).
    next_cleanup: Instant,
}

/// A promise older than this is forgotten: its caller stopped asking.
const PROMISE_EXPIRY: Duration = Duration::from_secs(60);

impl RateLimiter {
    pub fn per_second(per_second: u32) -> Self {
        let now = Instant::now();
        Self {
            interval: Duration::from_secs(1) / per_second.max(1),
            state: Mutex::new(LimiterState {
                next_free: now,
                promised: HashMap::new(),
                next_cleanup: now + PROMISE_EXPIRY,
            }),
        }
    }

    /// Take a slot now for `key`, or learn how long to wait for the slot promised to it.
    pub fn try_acquire(&self, key: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if now >= state.next_cleanup {
            state
                .promised
                .retain(|_, slot| *slot + PROMISE_EXPIRY > now);
            state.next_cleanup = now + PROMISE_EXPIRY;
        }
        if let Some(&slot) = state.promised.get(key) {
            if slot <= now {
                state.promised.remove(key);
                return Ok(());
            }
            return Err(slot - now);
        }
        if state.next_free <= now {
            state.next_free = now + self.interval;
            return Ok(());
        }
        let slot = state.next_free;
        state.next_free = slot + self.interval;
        state.promised.insert(key.to_owned(), slot);
        Err(slot - now)
    }

    /// Whether a caller was promised a slot it has not claimed yet (and may still claim).
    pub fn has_promises(&self) -> bool {
        let now = Instant::now();
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .promised
            .values()
            .any(|slot| *slot + PROMISE_EXPIRY > now)
    }
}

/// How the controllers run; [`Settings::default`] matches the flags' defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Most re-wraps written per second during a key rotation.
    pub rewrap_per_second: u32,
    /// How long new sandboxes of one owner share a pod-scoped Secret of the same content.
    pub pod_secret_reuse_window: Duration,
    /// Most reconciles running at once, per controller.
    pub max_concurrent_reconciles: u16,
    /// Where pod-scoped Secrets and sandbox pods are watched.
    pub sandbox_scopes: Vec<WatchScope>,
    /// This replica's name in the events it records.
    pub reporter_instance: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            rewrap_per_second: 20,
            pod_secret_reuse_window: crate::webhook::DEFAULT_POD_SECRET_REUSE_WINDOW,
            max_concurrent_reconciles: 4,
            sandbox_scopes: vec![WatchScope::Cluster],
            reporter_instance: None,
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub keyring: KeyringHandle,
    pub index: Arc<SecretIndex>,
    pub recorder: Recorder,
    /// Who records events, for recorders other than `recorder`.
    pub reporter: Reporter,
    pub metrics: Arc<Metrics>,
    /// Re-wraps of the key rotation round in progress.
    pub rotation: rotation::RotationTracker,
    pub rewrap_limiter: RateLimiter,
    pub pod_secret_reuse_window: Duration,
    pub max_concurrent_reconciles: u16,
    pub sandbox_scopes: Vec<WatchScope>,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        keyring: KeyringHandle,
        index: Arc<SecretIndex>,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Self {
        let Settings {
            rewrap_per_second,
            pod_secret_reuse_window,
            max_concurrent_reconciles,
            sandbox_scopes,
            reporter_instance,
        } = settings;
        let reporter = Reporter {
            controller: crate::api::FIELD_MANAGER.into(),
            instance: reporter_instance,
        };
        let recorder = Recorder::new(client.clone(), reporter.clone());
        Self {
            client,
            keyring,
            index,
            recorder,
            reporter,
            metrics,
            rotation: rotation::RotationTracker::default(),
            rewrap_limiter: RateLimiter::per_second(rewrap_per_second),
            pod_secret_reuse_window,
            max_concurrent_reconciles,
            sandbox_scopes,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Exponential backoff per object: 1 s, 2 s, 4 s … capped at 5 minutes.
    fn backoff(&self, key: String) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let count = failures.entry(key).or_insert(0);
        *count = count.saturating_add(1);
        Duration::from_secs(1u64 << (*count - 1).min(8)).min(Duration::from_secs(300))
    }

    fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    fn record(&self, result: &'static str) {
        self.metrics
            .reconciliations
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    fn controller_config(&self) -> controller::Config {
        controller::Config::default().concurrency(self.max_concurrent_reconciles)
    }
}

/// Await `reconcile`, observing how long it took (whatever its result) in the reconcile
/// duration histogram of `kind`.
pub async fn timed<T>(
    metrics: &Metrics,
    kind: &'static str,
    reconcile: impl std::future::Future<Output = T>,
) -> T {
    let started = Instant::now();
    let result = reconcile.await;
    metrics
        .reconcile_duration
        .get_or_create(&KindLabels { kind })
        .observe(started.elapsed().as_secs_f64());
    result
}

/// `Kind/namespace/name`, for logs and the per-object backoff.
pub(crate) fn object_key<K: kube::Resource<DynamicType = ()>>(object: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        object.meta().namespace.as_deref().unwrap_or_default(),
        object.meta().name.as_deref().unwrap_or_default()
    )
}

/// Stream that yields once each time the keyring in force changes (rotation starts at once).
fn keyring_changes(keyring: &KeyringHandle) -> impl futures::Stream<Item = ()> + Send + 'static {
    futures::stream::unfold(keyring.subscribe(), |mut rx| async move {
        rx.changed().await.ok().map(|()| ((), rx))
    })
}

/// What the controllers stop gracefully on.
type Shutdown = Shared<BoxFuture<'static, ()>>;

/// Run the AgentSecret controller and one pod-scoped Secret controller per sandbox scope until
/// `shutdown` resolves; reconciles in flight then finish.
pub async fn run_controllers(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let shutdown: Shutdown = futures::FutureExt::shared(futures::FutureExt::boxed(shutdown));
    let agentsecrets = agentsecret_controller(ctx.clone(), shutdown.clone());
    let pod_secrets = futures::future::join_all(
        ctx.sandbox_scopes
            .iter()
            .map(|scope| pod_secret_controller(ctx.clone(), scope, shutdown.clone())),
    );
    tokio::join!(agentsecrets, pod_secrets);
}

/// Keep only what the AgentSecret controller reads of an object's metadata: its name,
/// namespace and resourceVersion (to tell whether the webhook's cache holds the same
/// version; an object being deleted is not in that cache, so it is read whole). The store
/// holds one per AgentSecret in the cluster, so managed fields, annotations (client-side
/// apply's copy of the manifest), labels and the rest are dropped before it keeps them.
pub fn strip_for_store(object: &mut PartialObjectMeta<AgentSecret>) {
    object.types = None;
    let metadata = std::mem::take(&mut object.metadata);
    object.metadata = ObjectMeta {
        name: metadata.name,
        namespace: metadata.namespace,
        resource_version: metadata.resource_version,
        ..ObjectMeta::default()
    };
}

async fn agentsecret_controller(ctx: Arc<Context>, shutdown: Shutdown) {
    // Reconciles decide from the webhook's cache: until it has listed, every reconcile would
    // read its object from the API server instead.
    let synced = async {
        let started = Instant::now();
        let mut warned = Duration::ZERO;
        while !ctx.index.is_synced() {
            tokio::time::sleep(INDEX_SYNC_POLL).await;
            if started.elapsed() >= warned + INDEX_SYNC_WARNING {
                warned = started.elapsed();
                tracing::warn!(
                    waited = ?warned,
                    "the AgentSecret controller waits for the AgentSecret cache to list"
                );
            }
        }
    };
    tokio::select! {
        () = synced => {}
        () = shutdown.clone() => return,
    }
    // Metadata only: the spec and status are in the webhook's cache, which every replica
    // keeps anyway; a second, full copy of every AgentSecret is what the leader used to hold.
    let (reader, writer) = reflector::store::<PartialObjectMeta<AgentSecret>>();
    let objects = reflector(
        writer,
        watcher(
            kube::Api::<PartialObjectMeta<AgentSecret>>::all(ctx.client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(strip_for_store),
    )
    .applied_objects();
    Controller::for_stream(objects, reader)
        .with_config(ctx.controller_config())
        .reconcile_all_on(keyring_changes(&ctx.keyring))
        .graceful_shutdown_on(shutdown)
        .run(
            |object, ctx: Arc<Context>| async move {
                let key = object_key(object.as_ref());
                let result = timed(
                    &ctx.metrics,
                    "AgentSecret",
                    agentsecret::reconcile(object, ctx.clone()),
                )
                .await;
                if result.is_ok() {
                    ctx.succeeded(&key);
                    ctx.record("ok");
                }
                result
            },
            |object: Arc<PartialObjectMeta<AgentSecret>>, error: &Error, ctx: Arc<Context>| {
                ctx.record("error");
                let key = object_key(object.as_ref());
                tracing::warn!(object = key, %error, "AgentSecret reconcile failed; retrying");
                Action::requeue(ctx.backoff(key))
            },
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// How often the AgentSecret controller looks whether the webhook's cache has listed.
const INDEX_SYNC_POLL: Duration = Duration::from_millis(100);
/// How often it says that it is still waiting.
const INDEX_SYNC_WARNING: Duration = Duration::from_secs(30);

async fn pod_secret_controller(ctx: Arc<Context>, scope: &WatchScope, shutdown: Shutdown) {
    // Metadata only (`Api<PartialObjectMeta<_>>` asks for nothing else): a full watch would
    // transfer every running sandbox's values (the Secrets' data) to this process.
    let (reader, writer) = reflector::store::<PartialObjectMeta<Secret>>();
    let secrets = reflector(
        writer,
        watcher(
            scope.api::<PartialObjectMeta<Secret>>(ctx.client.clone()),
            watcher::Config::default().labels(&pod_scoped_selector()),
        )
        .default_backoff(),
    )
    .applied_objects();
    // Which unfinished sandbox pods name which Secret, from the same metadata-only watch that
    // prompts the reconciles, reduced to what the collector reads before it is stored.
    let (pod_store, pod_writer) = reflector::store::<PartialObjectMeta<Pod>>();
    let pods = reflector(
        pod_writer,
        watcher(
            scope.api::<PartialObjectMeta<Pod>>(ctx.client.clone()),
            watcher::Config::default()
                .labels(OWNER_LABEL)
                .fields(podsecret::UNFINISHED_PODS),
        )
        .default_backoff()
        .modify(podsecret::strip_pod_for_store),
    )
    .touched_objects();
    Controller::for_stream(secrets, reader)
        .with_config(ctx.controller_config())
        // A pod's deletion (or its deletion starting) may leave the Secret it names unused:
        // look at it then rather than at the next periodic check.
        .watches_stream(pods, |pod| podsecret::secret_of_pod(&pod))
        .graceful_shutdown_on(shutdown)
        .run(
            move |secret, ctx: Arc<Context>| {
                let pod_store = pod_store.clone();
                async move {
                    let key = object_key(secret.as_ref());
                    let result = timed(
                        &ctx.metrics,
                        "Secret",
                        podsecret::reconcile(secret, ctx.clone(), &pod_store),
                    )
                    .await;
                    if result.is_ok() {
                        ctx.succeeded(&key);
                    }
                    result
                }
            },
            |secret: Arc<PartialObjectMeta<Secret>>, error: &Error, ctx: Arc<Context>| {
                let key = object_key(secret.as_ref());
                tracing::warn!(object = key, %error, "pod-scoped Secret reconcile failed; retrying");
                Action::requeue(ctx.backoff(key))
            },
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// Wait for leadership, then run the controllers until `stop` (gracefully) or until
/// leadership is lost (at once). The Lease is released only once the controllers have stopped,
/// so no replica takes over while this one may still write. Returns the elector's error when
/// leadership was lost, so the process exits and restarts clean.
pub async fn run_controller_while_leader(
    ctx: Arc<Context>,
    elector: Elector,
    stop: CancellationToken,
) -> Result<(), LeaseError> {
    let stopped = stop.clone();
    let metrics = ctx.metrics.clone();
    // Operator-wide events (a rotation round's summary) are recorded on the leader Lease.
    let lease = rotation::lease_reference(elector.api.namespace(), &elector.name);
    elector
        .lead_reporting(
            stop,
            move |leading| {
                metrics.leader.set(i64::from(leading));
            },
            |shutdown| async move {
                tracing::info!("starting the controllers");
                // kube-runtime's graceful shutdown waits for reconciles in flight, and its runner
                // waits for its cache to have synced (which a sandbox namespace without RBAC never
                // does): bound it, so a stuck controller neither blocks the process's exit nor
                // holds the Lease until SIGKILL.
                let overdue = async {
                    stopped.cancelled().await;
                    tokio::time::sleep(CONTROLLER_SHUTDOWN_GRACE).await;
                };
                let controllers = async {
                    tokio::select! {
                        () = run_controllers(ctx.clone(), shutdown) => {}
                        () = rotation::report_rotations(ctx.clone(), lease.clone()) => {}
                    }
                    rotation::report_unfinished_rotation(&ctx, &lease).await;
                };
                tokio::select! {
                    () = controllers => tracing::info!("controllers stopped"),
                    () = overdue => tracing::warn!(
                        grace = ?CONTROLLER_SHUTDOWN_GRACE,
                        "controllers did not stop gracefully in time; stopped at once"
                    ),
                }
            },
        )
        .await
}

/// How long the controllers may take to stop gracefully on shutdown before they are dropped
/// (within the pod's default 30 s termination grace, next to the webhook's own drain).
pub const CONTROLLER_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt as _;

    /// The annotation client-side apply fills with a copy of the whole manifest.
    const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn stored_agentsecret_metadata_keeps_only_what_a_reconcile_reads() {
        let list: serde_json::Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/api/agentsecrets_list.json"
        ))
        .unwrap();
        let listed: PartialObjectMeta<AgentSecret> =
            serde_json::from_value(list["items"][0].clone()).unwrap();
        assert!(listed.metadata.managed_fields.is_some());
        assert!(listed.annotations().contains_key(LAST_APPLIED_ANNOTATION));
        assert!(listed.metadata.uid.is_some() && listed.metadata.generation.is_some());

        let mut stored = listed.clone();
        strip_for_store(&mut stored);
        assert_eq!(
            stored.metadata,
            ObjectMeta {
                name: listed.metadata.name.clone(),
                namespace: listed.metadata.namespace.clone(),
                resource_version: listed.metadata.resource_version.clone(),
                ..ObjectMeta::default()
            }
        );
        assert!(stored.metadata.name.is_some() && stored.metadata.resource_version.is_some());
        assert_eq!(stored.types, None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_grants_one_slot_per_interval_and_promises_the_next_ones() {
        let limiter = RateLimiter::per_second(20);
        assert_eq!(limiter.try_acquire("a"), Ok(()));
        assert_eq!(limiter.try_acquire("b"), Err(50 * MS));
        assert_eq!(limiter.try_acquire("c"), Err(100 * MS));
        // Asking again before its slot does not take another one.
        tokio::time::advance(20 * MS).await;
        assert_eq!(limiter.try_acquire("b"), Err(30 * MS));
        assert_eq!(limiter.try_acquire("d"), Err(130 * MS));
        tokio::time::advance(30 * MS).await;
        assert_eq!(limiter.try_acquire("b"), Ok(()));
        assert_eq!(limiter.try_acquire("c"), Err(50 * MS));
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_holds_over_a_second_of_requeues() {
        let limiter = RateLimiter::per_second(20);
        let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
        let mut granted = 0;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(1) {
            for key in &keys {
                granted += usize::from(limiter.try_acquire(key).is_ok());
            }
            tokio::time::advance(10 * MS).await;
        }
        assert_eq!(granted, 20, "20 per second, however often callers ask");
    }

    #[tokio::test(start_paused = true)]
    async fn reconcile_durations_are_observed_per_kind_whatever_the_result() {
        let metrics = Metrics::default();
        let ok: Result<(), ()> = timed(&metrics, "AgentSecret", async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok(())
        })
        .await;
        assert_eq!(ok, Ok(()));
        let failed: Result<(), ()> = timed(&metrics, "AgentSecret", async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Err(())
        })
        .await;
        assert_eq!(failed, Err(()));
        timed(&metrics, "Secret", async {}).await;
        let text = metrics.encode();
        for line in [
            "agentsecrets_reconcile_duration_seconds_sum{kind=\"AgentSecret\"} 3.5",
            "agentsecrets_reconcile_duration_seconds_count{kind=\"AgentSecret\"} 2",
            // 3 s falls in the 4.096 s bucket, 0.5 s in the 0.512 s one.
            "agentsecrets_reconcile_duration_seconds_bucket{le=\"0.512\",kind=\"AgentSecret\"} 1",
            "agentsecrets_reconcile_duration_seconds_bucket{le=\"4.096\",kind=\"AgentSecret\"} 2",
            "agentsecrets_reconcile_duration_seconds_count{kind=\"Secret\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn promises_are_pending_until_claimed_or_expired() {
        let limiter = RateLimiter::per_second(1);
        assert!(!limiter.has_promises());
        assert_eq!(limiter.try_acquire("a"), Ok(()));
        assert!(
            !limiter.has_promises(),
            "a slot taken at once is no promise"
        );
        assert!(limiter.try_acquire("b").is_err());
        assert!(limiter.try_acquire("gone").is_err());
        assert!(limiter.has_promises());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(limiter.try_acquire("b"), Ok(()));
        assert!(limiter.has_promises(), "\"gone\" may still come back");
        tokio::time::advance(PROMISE_EXPIRY + Duration::from_secs(2)).await;
        assert!(!limiter.has_promises());
    }

    #[tokio::test(start_paused = true)]
    async fn a_promise_nobody_claims_is_forgotten() {
        let limiter = RateLimiter::per_second(1);
        assert_eq!(limiter.try_acquire("a"), Ok(()));
        assert_eq!(limiter.try_acquire("gone"), Err(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(120)).await;
        assert_eq!(limiter.try_acquire("b"), Ok(()));
        // The promise expired: asking again is a new request.
        assert_eq!(limiter.try_acquire("gone"), Err(Duration::from_secs(1)));
    }
}
