//! In-memory cache of AgentSecrets, fed by a kube-runtime watcher and indexed by
//! (namespace, owner), so a pod admission looks up its owner's secrets without scanning the
//! cluster's whole set or calling the API server.
//!
//! Only what admission needs is kept (names, env name, the decoded sealed value): managed
//! fields and annotations, which client-side apply fills with a copy of the manifest, are not.

mod pod_secrets;
mod watch;

pub use pod_secrets::PodSecretIndex;
pub use watch::{
    WatchScope, pod_scoped_selector, sandbox_scopes, watch_agentsecrets, watch_pod_secrets,
};

use kube::ResourceExt as _;
use kube::runtime::watcher;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;

use crate::api::{AgentSecret, AgentSecretStatus, SealedError};
use crate::crypto::Envelope;

/// What admission knows about one AgentSecret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedSecret {
    pub namespace: String,
    pub name: String,
    pub owner: String,
    pub env_name: String,
    /// The sealed value decoded from base64; `None` when the object holds no sealed value
    /// (plaintext that slipped past the webhook, not yet sealed by the controller).
    pub sealed: Option<Result<Envelope, SealedError>>,
    /// `spec.allowedHosts`: non-empty when a secretless sandbox may get it as a placeholder.
    pub allowed_hosts: Vec<String>,
    /// `spec.injectAs`: where the proxy may put the value (empty: any header).
    pub inject_as: Vec<String>,
    /// `spec.allowPlainHttp`.
    pub allow_plain_http: bool,
    /// The canonical constraints the sealed value is bound to ([`crate::api::constraints_of`]),
    /// kept so that opening it on each admission does not rebuild the text.
    pub constraints: String,
    /// Which version of the object this is, and what the controller needs of it.
    pub revision: Revision,
}

/// Which version of its object a cache entry describes, and what the controller needs to tell
/// that the object is settled without reading it again (see
/// [`crate::controller::agentsecret::settled`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revision {
    pub resource_version: Option<String>,
    pub generation: Option<i64>,
    /// Whether `spec.value` holds plaintext (only that it does: the value is not kept).
    pub plaintext: bool,
    /// [`crate::api::AgentSecretStatus::digest`] of its status; `None` without a status.
    pub status_digest: Option<u64>,
}

impl CachedSecret {
    /// Whether a secretless sandbox may receive it as a placeholder.
    pub fn is_secretless_capable(&self) -> bool {
        !self.allowed_hosts.is_empty()
    }

    /// What its sealed value is bound to, in its namespace.
    pub fn seal_context(&self) -> crate::crypto::SealContext<'_> {
        crate::crypto::SealContext {
            constraints: &self.constraints,
            ..crate::crypto::SealContext::new(&self.namespace, &self.owner, &self.env_name)
        }
    }
}

impl CachedSecret {
    /// The cache's view of an AgentSecret; `None` for an object without a namespace, or one
    /// being deleted (a finalizer may hold it, but `kubectl delete` promised that sandboxes
    /// started afterwards no longer get it).
    pub fn from_object(object: &AgentSecret) -> Option<Self> {
        if object.metadata.deletion_timestamp.is_some() {
            return None;
        }
        Some(Self {
            namespace: object.namespace()?,
            name: object.name_any(),
            owner: object.spec.owner.clone(),
            env_name: object.spec.env_name.clone(),
            sealed: object.spec.sealed.as_ref().map(|s| s.decode()),
            allowed_hosts: object.spec.allowed_hosts.clone().unwrap_or_default(),
            inject_as: object.spec.inject_as.clone().unwrap_or_default(),
            allow_plain_http: object.spec.allow_plain_http.unwrap_or(false),
            constraints: object.spec.constraints(),
            revision: Revision {
                resource_version: object.metadata.resource_version.clone(),
                generation: object.metadata.generation,
                plaintext: object.spec.value.is_some(),
                status_digest: object.status.as_ref().map(AgentSecretStatus::digest),
            },
        })
    }
}

type OwnerKey = (String, String);
type Entries = HashMap<OwnerKey, BTreeMap<String, Arc<CachedSecret>>>;

#[derive(Default)]
struct State {
    /// (namespace, owner) → name → secret.
    by_owner: Entries,
    /// (namespace, name) → owner, to find an object's old entry when it changes or goes.
    owner_of: HashMap<(String, String), String>,
    /// Objects listed since the watcher's last `Init`, swapped in at `InitDone`.
    relist: Option<Vec<CachedSecret>>,
}

impl State {
    fn remove(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(owner) = self.owner_of.remove(&key) {
            let owner_key = (key.0, owner);
            if let Some(entries) = self.by_owner.get_mut(&owner_key) {
                entries.remove(name);
                if entries.is_empty() {
                    self.by_owner.remove(&owner_key);
                }
            }
        }
    }

    fn insert(&mut self, secret: CachedSecret) {
        self.remove(&secret.namespace, &secret.name);
        self.owner_of.insert(
            (secret.namespace.clone(), secret.name.clone()),
            secret.owner.clone(),
        );
        self.by_owner
            .entry((secret.namespace.clone(), secret.owner.clone()))
            .or_default()
            .insert(secret.name.clone(), Arc::new(secret));
    }
}

/// How long the AgentSecret watch may fail before the replica stops being ready, unless
/// configured otherwise.
pub const DEFAULT_WATCH_FAILURE_GRACE: Duration = Duration::from_secs(30);

/// Why admission must not be served from the cache yet.
pub const NOT_SYNCED: &str = "AgentSecret cache has not synced";
/// Why admission must no longer be served from the cache: deletions may be missed.
pub const WATCH_FAILING: &str =
    "AgentSecret watch has been failing for longer than its grace period";

/// The AgentSecret cache. Cheap to share behind an `Arc`.
pub struct SecretIndex {
    state: RwLock<State>,
    synced: AtomicBool,
    /// Monotonic time of the first watch failure since the watch last listed; `None` while
    /// the watch is healthy.
    failing_since: Mutex<Option<Instant>>,
    watch_failure_grace: Duration,
}

impl Default for SecretIndex {
    fn default() -> Self {
        Self::with_watch_failure_grace(DEFAULT_WATCH_FAILURE_GRACE)
    }
}

impl std::fmt::Debug for SecretIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretIndex")
            .field("len", &self.len())
            .field("synced", &self.is_synced())
            .finish()
    }
}

impl SecretIndex {
    /// An empty cache whose readiness drops once its watch has been failing for `grace`.
    pub fn with_watch_failure_grace(grace: Duration) -> Self {
        Self {
            state: RwLock::default(),
            synced: AtomicBool::new(false),
            failing_since: Mutex::new(None),
            watch_failure_grace: grace,
        }
    }

    /// Whether the initial list has completed: before that, a missing secret may just not be
    /// loaded yet, so the server is not ready.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Why admission must not rely on this cache now, if it must not: the initial list has not
    /// completed, or the watch has been failing for longer than the grace period (a replica
    /// that cannot see deletions must not keep injecting deleted secrets).
    pub fn unready_reason(&self) -> Option<&'static str> {
        self.unready_within(self.watch_failure_grace)
    }

    /// As [`SecretIndex::unready_reason`], with `grace` instead of the configured grace
    /// period: the value feed holds running sandboxes to a tighter deadline than admission.
    pub fn unready_within(&self, grace: Duration) -> Option<&'static str> {
        if !self.is_synced() {
            return Some(NOT_SYNCED);
        }
        let failing_since = *self.failing_since();
        match failing_since {
            Some(since) if since.elapsed() > grace => Some(WATCH_FAILING),
            _ => None,
        }
    }

    /// Record that the watch failed (the first failure of an outage starts its clock).
    pub fn watch_failed(&self) {
        self.failing_since().get_or_insert_with(Instant::now);
    }

    /// Record that the watch listed or delivered a change: it sees the cluster again.
    pub fn watch_recovered(&self) {
        *self.failing_since() = None;
    }

    fn failing_since(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.failing_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Apply one watcher event.
    pub fn apply(&self, event: watcher::Event<AgentSecret>) {
        let mut state = self.write();
        match event {
            watcher::Event::Apply(object) => match CachedSecret::from_object(&object) {
                Some(secret) => state.insert(secret),
                None => {
                    if let Some(namespace) = object.namespace() {
                        state.remove(&namespace, &object.name_any());
                    }
                }
            },
            watcher::Event::Delete(object) => {
                if let Some(namespace) = object.namespace() {
                    state.remove(&namespace, &object.name_any());
                }
            }
            watcher::Event::Init => state.relist = Some(Vec::new()),
            watcher::Event::InitApply(object) => {
                if let Some(secret) = CachedSecret::from_object(&object) {
                    state.relist.get_or_insert_with(Vec::new).push(secret);
                }
            }
            watcher::Event::InitDone => {
                let listed = state.relist.take().unwrap_or_default();
                state.by_owner.clear();
                state.owner_of.clear();
                for secret in listed {
                    state.insert(secret);
                }
                drop(state);
                self.synced.store(true, Ordering::Release);
            }
        }
    }

    /// Replace the whole content (tests, benchmarks, the offline preview) and mark it synced.
    pub fn replace_all(&self, secrets: impl IntoIterator<Item = CachedSecret>) {
        self.apply(watcher::Event::Init);
        {
            let mut state = self.write();
            let relist = state.relist.get_or_insert_with(Vec::new);
            relist.extend(secrets);
        }
        self.apply(watcher::Event::InitDone);
    }

    /// Every secret of `owner` in `namespace`, ordered by object name.
    pub fn owner_secrets(&self, namespace: &str, owner: &str) -> Vec<Arc<CachedSecret>> {
        let state = self.read();
        // A tuple of owned strings is the key, so the lookup copies both parts: two short
        // allocations, negligible next to the admission's decryption.
        state
            .by_owner
            .get(&(namespace.to_owned(), owner.to_owned()))
            .map(|entries| entries.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The AgentSecret `name` in `namespace`, unless it is not cached (absent, or being deleted).
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<CachedSecret>> {
        let state = self.read();
        let owner = state
            .owner_of
            .get(&(namespace.to_owned(), name.to_owned()))?;
        state
            .by_owner
            .get(&(namespace.to_owned(), owner.clone()))?
            .get(name)
            .cloned()
    }

    /// Another AgentSecret (not named `name`) of `owner` in `namespace` with `env_name`.
    pub fn env_name_taken_by(
        &self,
        namespace: &str,
        owner: &str,
        env_name: &str,
        name: &str,
    ) -> Option<String> {
        self.owner_secrets(namespace, owner)
            .into_iter()
            .find(|s| s.env_name == env_name && s.name != name)
            .map(|s| s.name.clone())
    }

    /// Number of cached AgentSecrets.
    pub fn len(&self) -> usize {
        self.read().owner_of.len()
    }

    /// Whether the cache holds no AgentSecret.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Count of cached AgentSecrets per key id (secrets without a decodable sealed value are
    /// not counted).
    pub fn count_by_key_id(&self) -> BTreeMap<String, usize> {
        let state = self.read();
        let mut counts = BTreeMap::new();
        for secret in state.by_owner.values().flat_map(BTreeMap::values) {
            if let Some(Ok(envelope)) = &secret.sealed {
                *counts.entry(envelope.key_id.clone()).or_insert(0) += 1;
            }
        }
        counts
    }

    // A poisoned lock means a panic while holding it; the maps are still consistent (every
    // mutation is a single insert/remove), so keep serving rather than propagate the panic.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AgentSecretSpec, SealedValue};

    fn object(ns: &str, name: &str, owner: &str, env: &str) -> AgentSecret {
        let mut object = AgentSecret::new(
            name,
            AgentSecretSpec {
                owner: owner.into(),
                env_name: env.into(),
                description: None,
                value: None,
                sealed: Some(SealedValue {
                    key_id: "k".into(),
                    wrapped_key: "AAAA".into(),
                    nonce: "AAAA".into(),
                    ciphertext: "AAAA".into(),
                    sealed_at: None,
                    format: None,
                }),
                ..Default::default()
            },
        );
        object.metadata.namespace = Some(ns.into());
        object
    }

    fn names(index: &SecretIndex, ns: &str, owner: &str) -> Vec<String> {
        index
            .owner_secrets(ns, owner)
            .iter()
            .map(|s| s.name.clone())
            .collect()
    }

    #[test]
    fn indexes_by_namespace_and_owner() {
        let index = SecretIndex::default();
        assert!(!index.is_synced());
        index.apply(watcher::Event::Init);
        index.apply(watcher::Event::InitApply(object("ns", "a", "alice", "A")));
        index.apply(watcher::Event::InitApply(object("ns", "b", "bob", "B")));
        index.apply(watcher::Event::InitApply(object(
            "other", "c", "alice", "C",
        )));
        assert!(
            index.is_empty(),
            "listed objects are held back until InitDone"
        );
        index.apply(watcher::Event::InitDone);
        assert!(index.is_synced());
        assert_eq!(index.len(), 3);
        assert_eq!(names(&index, "ns", "alice"), ["a"]);
        assert_eq!(names(&index, "ns", "bob"), ["b"]);
        assert_eq!(names(&index, "other", "alice"), ["c"]);
        assert!(names(&index, "other", "bob").is_empty());
    }

    #[test]
    fn updates_and_deletes_move_entries() {
        let index = SecretIndex::default();
        index.replace_all([]);
        index.apply(watcher::Event::Apply(object("ns", "a", "alice", "A")));
        index.apply(watcher::Event::Apply(object("ns", "a", "alice", "A2")));
        assert_eq!(index.owner_secrets("ns", "alice")[0].env_name, "A2");
        // An owner change (only possible without the CRD's rule) moves the entry.
        index.apply(watcher::Event::Apply(object("ns", "a", "bob", "A2")));
        assert!(names(&index, "ns", "alice").is_empty());
        assert_eq!(names(&index, "ns", "bob"), ["a"]);
        index.apply(watcher::Event::Delete(object("ns", "a", "bob", "A2")));
        assert!(index.is_empty());
    }

    #[test]
    fn an_object_being_deleted_leaves_the_cache() {
        let index = SecretIndex::default();
        index.replace_all([]);
        let mut object = object("ns", "a", "alice", "A");
        index.apply(watcher::Event::Apply(object.clone()));
        assert_eq!(index.len(), 1);
        object.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        index.apply(watcher::Event::Apply(object));
        assert!(index.owner_secrets("ns", "alice").is_empty());
    }

    #[test]
    fn an_object_is_found_by_name_with_the_revision_it_was_cached_at() {
        let index = SecretIndex::default();
        index.replace_all([]);
        let mut stored = object("ns", "a", "alice", "A");
        stored.metadata.resource_version = Some("41".into());
        stored.metadata.generation = Some(3);
        let status = crate::api::AgentSecretStatus {
            key_id: Some("k".into()),
            ..Default::default()
        };
        stored.status = Some(status.clone());
        index.apply(watcher::Event::Apply(stored.clone()));
        let found = index.get("ns", "a").unwrap();
        assert_eq!(
            found.revision,
            Revision {
                resource_version: Some("41".into()),
                generation: Some(3),
                plaintext: false,
                status_digest: Some(status.digest()),
            }
        );
        assert!(index.get("ns", "b").is_none());
        assert!(index.get("other", "a").is_none(), "names are per namespace");

        // Stored plaintext is noted, not kept.
        let mut plaintext = stored.clone();
        plaintext.spec.value = Some(crate::api::SecretString::new("canary-plaintext".into()));
        index.apply(watcher::Event::Apply(plaintext));
        let found = index.get("ns", "a").unwrap();
        assert!(found.revision.plaintext);
        assert!(!format!("{found:?}").contains("canary-plaintext"));

        index.apply(watcher::Event::Delete(stored));
        assert!(index.get("ns", "a").is_none());
    }

    #[test]
    fn a_relist_replaces_everything_atomically() {
        let index = SecretIndex::default();
        index
            .replace_all([CachedSecret::from_object(&object("ns", "gone", "alice", "A")).unwrap()]);
        index.apply(watcher::Event::Init);
        index.apply(watcher::Event::InitApply(object("ns", "new", "alice", "A")));
        assert_eq!(
            names(&index, "ns", "alice"),
            ["gone"],
            "old content serves until InitDone"
        );
        index.apply(watcher::Event::InitDone);
        assert_eq!(names(&index, "ns", "alice"), ["new"]);
    }

    #[test]
    fn finds_env_name_conflicts_but_not_the_object_itself() {
        let index = SecretIndex::default();
        index.replace_all(
            [
                object("ns", "a", "alice", "TOKEN"),
                object("ns", "b", "bob", "TOKEN"),
            ]
            .iter()
            .filter_map(CachedSecret::from_object),
        );
        assert_eq!(index.env_name_taken_by("ns", "alice", "TOKEN", "a"), None);
        assert_eq!(
            index.env_name_taken_by("ns", "alice", "TOKEN", "new"),
            Some("a".into())
        );
        assert_eq!(index.env_name_taken_by("ns", "carol", "TOKEN", "new"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_waits_for_the_initial_list() {
        let index = SecretIndex::default();
        assert_eq!(index.unready_reason(), Some(NOT_SYNCED));
        index.apply(watcher::Event::Init);
        assert_eq!(index.unready_reason(), Some(NOT_SYNCED));
        index.apply(watcher::Event::InitDone);
        assert_eq!(index.unready_reason(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_drops_once_the_watch_fails_for_longer_than_the_grace() {
        let index = SecretIndex::with_watch_failure_grace(Duration::from_secs(30));
        index.replace_all([]);
        index.watch_failed();
        tokio::time::advance(Duration::from_secs(20)).await;
        // Retries failing again do not restart the outage's clock.
        index.watch_failed();
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            index.unready_reason(),
            None,
            "still within the grace period"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(index.unready_reason(), Some(WATCH_FAILING));
        index.watch_recovered();
        assert_eq!(
            index.unready_reason(),
            None,
            "ready again once the watch lists"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_outage_gets_a_whole_grace_period() {
        let index = SecretIndex::with_watch_failure_grace(Duration::from_secs(30));
        index.replace_all([]);
        index.watch_failed();
        tokio::time::advance(Duration::from_secs(25)).await;
        index.watch_recovered();
        index.watch_failed();
        tokio::time::advance(Duration::from_secs(25)).await;
        assert_eq!(index.unready_reason(), None);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(index.unready_reason(), Some(WATCH_FAILING));
    }

    #[test]
    fn damaged_sealed_values_are_cached_as_errors() {
        let index = SecretIndex::default();
        let mut bad = object("ns", "a", "alice", "A");
        if let Some(sealed) = bad.spec.sealed.as_mut() {
            sealed.wrapped_key = "A".repeat(54) + "==";
            sealed.nonce = "!!".into();
        }
        index.replace_all(CachedSecret::from_object(&bad));
        assert!(matches!(
            index.owner_secrets("ns", "alice")[0].sealed,
            Some(Err(SealedError::InvalidBase64 { field: "nonce" }))
        ));
    }
}
