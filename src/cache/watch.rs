//! The watches that feed the caches: every AgentSecret, and the metadata of pod-scoped
//! Secrets, cluster-wide or per sandbox namespace.

use futures::{Stream, StreamExt as _};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::utils::Backoff as _;
use kube::runtime::watcher::{self, DefaultBackoff};
use kube::{Api, Client, Resource};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use super::{PodSecretIndex, SecretIndex};
use crate::api::{AgentSecret, MANAGED_BY_LABEL, MANAGED_BY_VALUE, POD_SCOPED_LABEL};

/// Where namespaced objects are watched: the whole cluster, or one namespace (when RBAC grants
/// rights only there).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum WatchScope {
    Cluster,
    Namespace(String),
}

impl WatchScope {
    /// The API over `K` in this scope.
    pub fn api<K>(&self, client: Client) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match self {
            Self::Cluster => Api::all(client),
            Self::Namespace(namespace) => Api::namespaced(client, namespace),
        }
    }
}

/// The scopes sandbox pods and their pod-scoped Secrets are watched in, from
/// `--sandbox-namespaces`: one per listed namespace (blank entries and repeats ignored), or the
/// whole cluster when none is listed.
pub fn sandbox_scopes(namespaces: &[String]) -> Vec<WatchScope> {
    let listed: std::collections::BTreeSet<&str> = namespaces
        .iter()
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
        .collect();
    if listed.is_empty() {
        vec![WatchScope::Cluster]
    } else {
        listed
            .into_iter()
            .map(|n| WatchScope::Namespace(n.to_owned()))
            .collect()
    }
}

/// Label selector of the pod-scoped Secrets the operator made.
pub fn pod_scoped_selector() -> String {
    format!("{POD_SCOPED_LABEL}=true,{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}")
}

/// Feed the AgentSecret cache from a watch on every AgentSecret until `stop` is cancelled,
/// recording in it when the watch fails and when it has listed again (readiness depends on
/// both).
pub async fn watch_agentsecrets(client: Client, index: Arc<SecretIndex>, stop: CancellationToken) {
    let api = Api::<AgentSecret>::all(client);
    feed(
        "AgentSecret",
        || watcher::watcher(api.clone(), watcher::Config::default()),
        |event| index.apply(event),
        |health| match health {
            Health::Failed => index.watch_failed(),
            Health::Listed => index.watch_recovered(),
        },
        &stop,
    )
    .await;
}

/// Feed the pod-scoped Secret index from a metadata-only watch in `scope` (values are never
/// transferred) until `stop` is cancelled.
pub async fn watch_pod_secrets(
    client: Client,
    scope: WatchScope,
    index: Arc<PodSecretIndex>,
    stop: CancellationToken,
) {
    // `Api<PartialObjectMeta<_>>` asks for metadata only.
    let api = scope.api::<PartialObjectMeta<Secret>>(client);
    let config = watcher::Config::default().labels(&pod_scoped_selector());
    feed(
        "pod-scoped Secret",
        || watcher::watcher(api.clone(), config.clone()),
        |event| index.apply(&scope, event),
        |_| {},
        &stop,
    )
    .await;
}

/// What the watch loop tells its cache about the watch itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    /// A list or watch request failed.
    Failed,
    /// The watch delivered a complete list or a change: it sees the cluster again.
    Listed,
}

/// Whether an event proves the watch sees the cluster: a completed list or a change. `Init`
/// comes before the list request, and a list may still fail on a later page.
fn proves_alive<K>(event: &watcher::Event<K>) -> bool {
    !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_))
}

/// Run watches from `start` until `stop`, each until it fails; then back off and start a new one.
/// A new watch lists again, which is what proves recovery: kube's watcher resumes a failed
/// watch silently, so a recovery without a relist would look like an outage that never ended.
async fn feed<K, S>(
    what: &'static str,
    start: impl Fn() -> S,
    on_event: impl Fn(watcher::Event<K>),
    on_health: impl Fn(Health),
    stop: &CancellationToken,
) where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut backoff = DefaultBackoff::default();
    loop {
        let stream = start();
        tokio::pin!(stream);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                event = stream.next() => match event {
                    Some(Ok(event)) => {
                        let alive = proves_alive(&event);
                        on_event(event);
                        if alive {
                            on_health(Health::Listed);
                            backoff.reset();
                        }
                    }
                    Some(Err(error)) => {
                        // The error names the API call, not object contents.
                        tracing::warn!(%error, kind = what, "watch failed; listing again after a backoff");
                        on_health(Health::Failed);
                        break;
                    }
                    None => break,
                },
            }
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(30));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    fn names(namespaces: &[&str]) -> Vec<String> {
        namespaces.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn no_sandbox_namespaces_means_one_cluster_wide_scope() {
        assert_eq!(sandbox_scopes(&[]), [WatchScope::Cluster]);
        assert_eq!(sandbox_scopes(&names(&["", " "])), [WatchScope::Cluster]);
    }

    #[test]
    fn each_listed_sandbox_namespace_is_its_own_scope_once() {
        assert_eq!(
            sandbox_scopes(&names(&["team-b", " team-a", "team-b", ""])),
            [
                WatchScope::Namespace("team-a".into()),
                WatchScope::Namespace("team-b".into())
            ]
        );
    }

    #[tokio::test]
    async fn a_namespace_scope_addresses_only_that_namespace() {
        let (service, _handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = Client::new(service, "default");
        let scoped = WatchScope::Namespace("team-a".into());
        assert_eq!(
            scoped.api::<Secret>(client.clone()).resource_url(),
            "/api/v1/namespaces/team-a/secrets"
        );
        assert_eq!(
            scoped.api::<Pod>(client.clone()).resource_url(),
            "/api/v1/namespaces/team-a/pods"
        );
        assert_eq!(
            WatchScope::Cluster.api::<Secret>(client).resource_url(),
            "/api/v1/secrets"
        );
    }

    #[test]
    fn only_a_completed_list_or_a_change_proves_the_watch_alive() {
        type Event = watcher::Event<Secret>;
        assert!(!proves_alive(&Event::Init));
        assert!(!proves_alive(&Event::InitApply(Secret::default())));
        assert!(proves_alive(&Event::InitDone));
        assert!(proves_alive(&Event::Apply(Secret::default())));
        assert!(proves_alive(&Event::Delete(Secret::default())));
    }

    /// A fake API server for AgentSecrets: while healthy, lists answer (empty) and watches
    /// stay open; while failing, everything answers 500 and open watches are cut.
    struct FakeAgentSecrets {
        healthy: bool,
        open_watches: Vec<tower_test::mock::SendResponse<http::Response<kube::client::Body>>>,
    }

    async fn serve(
        mut handle: crate::testing::ApiServerHandle,
        state: Arc<std::sync::Mutex<FakeAgentSecrets>>,
    ) {
        while let Some((request, send)) = handle.next_request().await {
            let watch = request
                .uri()
                .query()
                .unwrap_or_default()
                .contains("watch=true");
            let mut state = state.lock().unwrap();
            if !state.healthy {
                let status = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500, "reason": "InternalError", "message": "down"});
                send.send_response(
                    http::Response::builder()
                        .status(500)
                        .body(kube::client::Body::from(
                            serde_json::to_vec(&status).unwrap(),
                        ))
                        .unwrap(),
                );
            } else if watch {
                state.open_watches.push(send);
            } else {
                let list = serde_json::json!({"apiVersion": "agentsecrets.io/v1alpha1", "kind": "AgentSecretList", "metadata": {"resourceVersion": "1"}, "items": []});
                send.send_response(http::Response::new(kube::client::Body::from(
                    serde_json::to_vec(&list).unwrap(),
                )));
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_follows_the_agentsecret_watch_through_an_outage() {
        let state = Arc::new(std::sync::Mutex::new(FakeAgentSecrets {
            healthy: true,
            open_watches: Vec::new(),
        }));
        let (client, handle) = crate::testing::mock_client();
        tokio::spawn(serve(handle, state.clone()));
        let index = Arc::new(SecretIndex::with_watch_failure_grace(Duration::from_secs(
            30,
        )));
        let stop = CancellationToken::new();
        let watching = tokio::spawn(watch_agentsecrets(client, index.clone(), stop.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(index.unready_reason(), None, "listed, watching");

        // The API server goes away: the open watch is cut and every retry fails.
        {
            let mut state = state.lock().unwrap();
            state.healthy = false;
            state.open_watches.clear();
        }
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert_eq!(index.unready_reason(), None, "within the grace period");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(index.unready_reason(), Some(super::super::WATCH_FAILING));

        // It comes back: the next retry lists again, which proves the watch sees the cluster.
        state.lock().unwrap().healthy = true;
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(index.unready_reason(), None, "ready again after a relist");
        assert!(
            !state.lock().unwrap().open_watches.is_empty(),
            "watching again"
        );
        stop.cancel();
        watching.await.unwrap();
    }
}
