//! The controller: keeps every AgentSecret's status true, re-wraps data keys to the primary
//! KEK, and makes pod-scoped Secrets live no longer than their sandbox. Runs only on the
//! replica holding the leader Lease.

pub mod agentsecret;
pub mod lease;
pub mod podsecret;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Client;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use crate::api::{AgentSecret, MANAGED_BY_LABEL, MANAGED_BY_VALUE, OWNER_LABEL, POD_SCOPED_LABEL};
use crate::cache::SecretIndex;
use crate::crypto::KeyringHandle;
use crate::telemetry::{Metrics, ResultLabels};

/// Why a reconcile failed. API errors are transient and retried with backoff; decisions
/// about damaged data are not errors (they are reported in status).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[source] kube::Error),
}

/// Spaces writes evenly: at most `per_second` acquisitions per second, shared by all tasks.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    next: tokio::sync::Mutex<Instant>,
}

impl RateLimiter {
    pub fn per_second(per_second: u32) -> Self {
        Self {
            interval: Duration::from_secs(1) / per_second.max(1),
            next: tokio::sync::Mutex::new(Instant::now()),
        }
    }

    /// Wait for the next slot.
    pub async fn acquire(&self) {
        let slot = {
            let mut next = self.next.lock().await;
            let slot = (*next).max(Instant::now());
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub keyring: KeyringHandle,
    pub index: Arc<SecretIndex>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub rewrap_limiter: RateLimiter,
    pub pod_secret_grace: Duration,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        keyring: KeyringHandle,
        index: Arc<SecretIndex>,
        metrics: Arc<Metrics>,
        rewrap_per_second: u32,
        pod_secret_grace: Duration,
        reporter_instance: Option<String>,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: crate::api::FIELD_MANAGER.into(),
                instance: reporter_instance,
            },
        );
        Self {
            client,
            keyring,
            index,
            recorder,
            metrics,
            rewrap_limiter: RateLimiter::per_second(rewrap_per_second),
            pod_secret_grace,
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
}

fn object_key<K: kube::Resource>(kind: &str, object: &K) -> String {
    format!(
        "{kind}/{}/{}",
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

/// Run both controllers until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let agentsecrets = Controller::new(
        kube::Api::<AgentSecret>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .reconcile_all_on(keyring_changes(&ctx.keyring))
    .graceful_shutdown_on(shutdown.clone())
    .run(
        |object, ctx: Arc<Context>| async move {
            let key = object_key("AgentSecret", object.as_ref());
            let result = agentsecret::reconcile(object, ctx.clone()).await;
            if result.is_ok() {
                ctx.succeeded(&key);
                ctx.record("ok");
            }
            result
        },
        |object: Arc<AgentSecret>, error: &Error, ctx: Arc<Context>| {
            ctx.record("error");
            let key = object_key("AgentSecret", object.as_ref());
            tracing::warn!(object = key, %error, "AgentSecret reconcile failed; retrying");
            Action::requeue(ctx.backoff(key))
        },
        ctx.clone(),
    )
    .for_each(|_| futures::future::ready(()));

    let selector = format!("{POD_SCOPED_LABEL}=true,{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}");
    // Metadata only: a full watch would keep every running sandbox's values (the Secrets'
    // data) in this process's cache for the pod's lifetime.
    let (reader, writer) = reflector::store::<PartialObjectMeta<Secret>>();
    let secrets = reflector(
        writer,
        watcher(
            kube::Api::<PartialObjectMeta<Secret>>::all(ctx.client.clone()),
            watcher::Config::default().labels(&selector),
        )
        .default_backoff(),
    )
    .applied_objects();
    let pod_secrets = Controller::for_stream(secrets, reader)
    // A sandbox pod is stored after the webhook created its Secret: adopt it when it appears.
    .watches(
        kube::Api::<Pod>::all(ctx.client.clone()),
        watcher::Config::default().labels(OWNER_LABEL),
        |pod| podsecret::secret_of_pod(&pod),
    )
    .graceful_shutdown_on(shutdown)
    .run(
        |secret, ctx: Arc<Context>| async move {
            let key = object_key("Secret", secret.as_ref());
            let result = podsecret::reconcile(secret, ctx.clone()).await;
            if result.is_ok() {
                ctx.succeeded(&key);
            }
            result
        },
        |secret: Arc<PartialObjectMeta<Secret>>, error: &Error, ctx: Arc<Context>| {
            let key = object_key("Secret", secret.as_ref());
            tracing::warn!(object = key, %error, "pod-scoped Secret reconcile failed; retrying");
            Action::requeue(ctx.backoff(key))
        },
        ctx.clone(),
    )
    .for_each(|_| futures::future::ready(()));

    tokio::join!(agentsecrets, pod_secrets);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_spaces_acquisitions() {
        let limiter = RateLimiter::per_second(20);
        let start = Instant::now();
        for _ in 0..21 {
            limiter.acquire().await;
        }
        // 21 slots at 50 ms spacing: the last one is 1 s after the first.
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }
}
