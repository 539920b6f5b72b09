//! In-memory cache of AgentSecrets, fed by a kube-runtime watcher and indexed by
//! (namespace, owner), so a pod admission looks up its owner's secrets without scanning the
//! cluster's whole set or calling the API server.
//!
//! Only what admission needs is kept (names, env name, the decoded sealed value): managed
//! fields and annotations, which client-side apply fills with a copy of the manifest, are not.

use kube::ResourceExt as _;
use kube::runtime::watcher;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use crate::api::{AgentSecret, SealedError};
use crate::crypto::{CryptoError, Envelope};

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

/// The AgentSecret cache. Cheap to share behind an `Arc`.
#[derive(Default)]
pub struct SecretIndex {
    state: RwLock<State>,
    synced: AtomicBool,
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
    /// Whether the initial list has completed: before that, a missing secret may just not be
    /// loaded yet, so the server is not ready.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
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
        // Look up without allocating a key: the map is small per namespace/owner pair.
        state
            .by_owner
            .get(&(namespace.to_owned(), owner.to_owned()))
            .map(|entries| entries.values().cloned().collect())
            .unwrap_or_default()
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

/// The pod-scoped Secrets that exist, per namespace, and which of them wait for their pod (no
/// ownerReference yet), fed by a metadata-only watch (values are never held). Bounds what
/// forged admission reviews can make the operator create.
#[derive(Debug, Default)]
pub struct PodSecretIndex {
    /// namespace → Secret name → adopted by its pod.
    state: RwLock<HashMap<String, HashMap<String, bool>>>,
}

impl PodSecretIndex {
    /// Apply one event of the watch on pod-scoped Secrets.
    pub fn apply<K: kube::Resource>(&self, event: watcher::Event<K>) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let key = |object: &K| {
            Some((
                object.meta().namespace.clone()?,
                object.meta().name.clone()?,
            ))
        };
        match event {
            watcher::Event::Apply(object) | watcher::Event::InitApply(object) => {
                if let Some((namespace, name)) = key(&object) {
                    let adopted = !object
                        .meta()
                        .owner_references
                        .as_deref()
                        .unwrap_or_default()
                        .is_empty();
                    state.entry(namespace).or_default().insert(name, adopted);
                }
            }
            watcher::Event::Delete(object) => {
                if let Some((namespace, name)) = key(&object)
                    && let Some(names) = state.get_mut(&namespace)
                {
                    names.remove(&name);
                    if names.is_empty() {
                        state.remove(&namespace);
                    }
                }
            }
            // A relist re-applies everything; entries of Secrets deleted meanwhile would be
            // stale, so start over (the count only bounds new creations).
            watcher::Event::Init => state.clear(),
            watcher::Event::InitDone => {}
        }
    }

    /// Record a Secret this replica just created, before the watch reports it.
    pub fn created(&self, namespace: &str, name: &str) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        state
            .entry(namespace.to_owned())
            .or_default()
            .entry(name.to_owned())
            .or_insert(false);
    }

    /// Whether the Secret exists (as far as this replica knows).
    pub fn contains(&self, namespace: &str, name: &str) -> bool {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state
            .get(namespace)
            .is_some_and(|names| names.contains_key(name))
    }

    /// Pod-scoped Secrets in `namespace` not yet adopted by their pod.
    pub fn unadopted(&self, namespace: &str) -> usize {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.get(namespace).map_or(0, |names| {
            names.values().filter(|adopted| !**adopted).count()
        })
    }
}

/// `owners` × `per_owner` AgentSecrets in `namespace` sealed under `keyring`'s primary:
/// owners `user-0`…, env names `SECRET_0`…. For benchmarks and load tests.
pub fn synthetic(
    keyring: &crate::crypto::Keyring,
    namespace: &str,
    owners: usize,
    per_owner: usize,
) -> Result<Vec<CachedSecret>, CryptoError> {
    let mut secrets = Vec::with_capacity(owners.saturating_mul(per_owner));
    for o in 0..owners {
        let owner = format!("user-{o}");
        for s in 0..per_owner {
            let value = format!("synthetic-value-{o}-{s}");
            let env_name = format!("SECRET_{s}");
            let ctx = crate::crypto::SealContext::new(namespace, &owner, &env_name);
            let sealed = keyring.seal(value.as_bytes(), ctx, crate::api::now_seconds())?;
            secrets.push(CachedSecret {
                namespace: namespace.to_owned(),
                name: format!("{owner}-secret-{s}"),
                owner: owner.clone(),
                env_name,
                sealed: Some(Ok(sealed)),
            });
        }
    }
    Ok(secrets)
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

    type SecretMeta = kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Secret>;

    fn pod_secret(name: &str, adopted: bool) -> SecretMeta {
        let mut meta = kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            ..Default::default()
        };
        if adopted {
            meta.owner_references = Some(vec![Default::default()]);
        }
        kube::core::PartialObjectMeta {
            types: None,
            metadata: meta,
            _phantom: Default::default(),
        }
    }

    #[test]
    fn pod_secrets_waiting_for_their_pod_are_counted_per_namespace() {
        let index = PodSecretIndex::default();
        index.apply(watcher::Event::<SecretMeta>::Init);
        index.apply(watcher::Event::InitApply(pod_secret("a", false)));
        index.apply(watcher::Event::InitApply(pod_secret("b", true)));
        index.apply(watcher::Event::<SecretMeta>::InitDone);
        assert_eq!(index.unadopted("ns"), 1);
        index.created("ns", "c");
        assert_eq!(index.unadopted("ns"), 2);
        assert!(index.contains("ns", "c"));
        index.apply(watcher::Event::Apply(pod_secret("a", true)));
        index.apply(watcher::Event::Delete(pod_secret("c", false)));
        assert_eq!(index.unadopted("ns"), 0);
        assert_eq!(index.unadopted("other"), 0);
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
