//! The pod-scoped Secrets that exist, per namespace, and which of them wait for their pod.

use kube::runtime::watcher;
use std::collections::HashMap;
use std::sync::RwLock;

use super::WatchScope;

/// The pod-scoped Secrets that exist, per namespace, and which of them wait for their pod (no
/// ownerReference yet), fed by metadata-only watches (values are never transferred). Bounds
/// what forged admission reviews can make the operator create.
#[derive(Debug, Default)]
pub struct PodSecretIndex {
    /// namespace → Secret name → adopted by its pod.
    state: RwLock<HashMap<String, HashMap<String, bool>>>,
}

impl PodSecretIndex {
    /// Apply one event of the watch on pod-scoped Secrets in `scope`.
    pub fn apply<K: kube::Resource>(&self, scope: &WatchScope, event: watcher::Event<K>) {
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
            // stale, so start over (the count only bounds new creations). Only the relisting
            // watch's own scope: per-namespace watches relist independently.
            watcher::Event::Init => match scope {
                WatchScope::Cluster => state.clear(),
                WatchScope::Namespace(namespace) => {
                    state.remove(namespace);
                }
            },
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

#[cfg(test)]
mod tests {
    use super::*;

    type SecretMeta = kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Secret>;

    fn pod_secret(namespace: &str, name: &str, adopted: bool) -> SecretMeta {
        let mut meta = kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
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
        let all = WatchScope::Cluster;
        index.apply(&all, watcher::Event::<SecretMeta>::Init);
        index.apply(
            &all,
            watcher::Event::InitApply(pod_secret("ns", "a", false)),
        );
        index.apply(&all, watcher::Event::InitApply(pod_secret("ns", "b", true)));
        index.apply(&all, watcher::Event::<SecretMeta>::InitDone);
        assert_eq!(index.unadopted("ns"), 1);
        index.created("ns", "c");
        assert_eq!(index.unadopted("ns"), 2);
        assert!(index.contains("ns", "c"));
        index.apply(&all, watcher::Event::Apply(pod_secret("ns", "a", true)));
        index.apply(&all, watcher::Event::Delete(pod_secret("ns", "c", false)));
        assert_eq!(index.unadopted("ns"), 0);
        assert_eq!(index.unadopted("other"), 0);
    }

    #[test]
    fn a_relist_of_one_namespace_keeps_the_other_namespaces_counts() {
        let index = PodSecretIndex::default();
        let a = WatchScope::Namespace("a".into());
        let b = WatchScope::Namespace("b".into());
        index.apply(&a, watcher::Event::Apply(pod_secret("a", "x", false)));
        index.apply(&b, watcher::Event::Apply(pod_secret("b", "y", false)));
        index.apply(&a, watcher::Event::<SecretMeta>::Init);
        assert_eq!(
            index.unadopted("a"),
            0,
            "the relisting namespace starts over"
        );
        assert_eq!(
            index.unadopted("b"),
            1,
            "another namespace's watch is untouched"
        );
        index.apply(&WatchScope::Cluster, watcher::Event::<SecretMeta>::Init);
        assert_eq!(index.unadopted("b"), 0, "a cluster-wide relist starts over");
    }
}
