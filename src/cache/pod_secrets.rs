//! The pod-scoped Secrets that exist, per namespace, and until when each is reused.

use kube::runtime::watcher;
use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use super::WatchScope;

/// The pod-scoped Secrets that exist, per namespace, with the end of each one's reuse window,
/// fed by metadata-only watches (values are never transferred). The webhook looks a sandbox's
/// Secret up here, so a warm owner's admission writes nothing; the count of the current
/// windows' Secrets bounds what forged admission reviews can make the operator create.
#[derive(Debug, Default)]
pub struct PodSecretIndex {
    state: RwLock<State>,
}

/// namespace → Secret name → end of its reuse window (Unix seconds; `None` for Secrets of
/// older versions, made for one pod and never reused).
type Names = HashMap<String, HashMap<String, Option<i64>>>;

#[derive(Debug, Default)]
struct State {
    current: Names,
    /// What a relist has listed so far, per relisting scope: it replaces that scope's part of
    /// `current` once complete, so admissions keep finding the Secrets meanwhile.
    relisting: BTreeMap<WatchScope, Names>,
}

/// The end of a pod-scoped Secret's reuse window, in Unix seconds.
fn reuse_until(meta: &kube::api::ObjectMeta) -> Option<i64> {
    crate::api::reuse_until(meta).map(|t| t.as_second())
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
            watcher::Event::Apply(object) => {
                if let Some((namespace, name)) = key(&object) {
                    // A Secret being deleted is no longer handed out.
                    if object.meta().deletion_timestamp.is_some() {
                        remove(&mut state.current, &namespace, &name);
                    } else {
                        let until = reuse_until(object.meta());
                        state
                            .current
                            .entry(namespace)
                            .or_default()
                            .insert(name, until);
                    }
                }
            }
            watcher::Event::InitApply(object) => {
                if let Some((namespace, name)) = key(&object)
                    && object.meta().deletion_timestamp.is_none()
                {
                    let until = reuse_until(object.meta());
                    state
                        .relisting
                        .entry(scope.clone())
                        .or_default()
                        .entry(namespace)
                        .or_default()
                        .insert(name, until);
                }
            }
            watcher::Event::Delete(object) => {
                if let Some((namespace, name)) = key(&object) {
                    remove(&mut state.current, &namespace, &name);
                }
            }
            // A relist re-lists everything; entries of Secrets deleted meanwhile would be
            // stale, so the listed set replaces the scope's entries once complete. Only the
            // relisting watch's own scope: per-namespace watches relist independently.
            watcher::Event::Init => {
                state.relisting.insert(scope.clone(), Names::new());
            }
            watcher::Event::InitDone => {
                let mut listed = state.relisting.remove(scope).unwrap_or_default();
                match scope {
                    WatchScope::Cluster => state.current = listed,
                    WatchScope::Namespace(namespace) => {
                        state.current.remove(namespace);
                        if let Some(names) = listed.remove(namespace) {
                            state.current.insert(namespace.clone(), names);
                        }
                    }
                }
            }
        }
    }

    /// Record a Secret this replica just created (or found), before the watch reports it.
    pub fn created(&self, namespace: &str, name: &str, reuse_until: i64) {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        state
            .current
            .entry(namespace.to_owned())
            .or_default()
            .insert(name.to_owned(), Some(reuse_until));
    }

    /// Whether the Secret exists (as far as this replica knows).
    pub fn contains(&self, namespace: &str, name: &str) -> bool {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state
            .current
            .get(namespace)
            .is_some_and(|names| names.contains_key(name))
    }

    /// Pod-scoped Secrets in `namespace` whose reuse window has not ended at `now` (Unix
    /// seconds): those new sandboxes may still be given.
    pub fn reusable(&self, namespace: &str, now: i64) -> usize {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.current.get(namespace).map_or(0, |names| {
            names
                .values()
                .filter(|until| until.is_some_and(|until| until > now))
                .count()
        })
    }
}

fn remove(state: &mut Names, namespace: &str, name: &str) {
    if let Some(names) = state.get_mut(namespace) {
        names.remove(name);
        if names.is_empty() {
            state.remove(namespace);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::REUSE_UNTIL_ANNOTATION;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    type SecretMeta = kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Secret>;

    fn pod_secret(namespace: &str, name: &str, until: Option<&str>) -> SecretMeta {
        let meta = kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            annotations: until.map(|u| [(REUSE_UNTIL_ANNOTATION.to_owned(), u.to_owned())].into()),
            ..Default::default()
        };
        kube::core::PartialObjectMeta {
            types: None,
            metadata: meta,
            _phantom: Default::default(),
        }
    }

    const NOW: i64 = 1_800_000_000; // 2027-01-15T08:00:00Z

    #[test]
    fn secrets_still_in_their_reuse_window_are_counted_per_namespace() {
        let index = PodSecretIndex::default();
        let all = WatchScope::Cluster;
        index.apply(&all, watcher::Event::<SecretMeta>::Init);
        let current = Some("2027-01-15T08:05:00Z");
        let ended = Some("2027-01-15T08:00:00Z");
        index.apply(
            &all,
            watcher::Event::InitApply(pod_secret("ns", "a", current)),
        );
        index.apply(
            &all,
            watcher::Event::InitApply(pod_secret("ns", "b", ended)),
        );
        index.apply(
            &all,
            watcher::Event::InitApply(pod_secret("ns", "old", None)),
        );
        index.apply(
            &all,
            watcher::Event::InitApply(pod_secret("ns", "odd", Some("soon"))),
        );
        index.apply(&all, watcher::Event::<SecretMeta>::InitDone);
        assert_eq!(index.reusable("ns", NOW), 1);
        assert!(index.contains("ns", "b") && index.contains("ns", "old"));
        index.created("ns", "c", NOW + 300);
        assert_eq!(index.reusable("ns", NOW), 2);
        assert!(index.contains("ns", "c"));
        index.apply(&all, watcher::Event::Delete(pod_secret("ns", "c", current)));
        assert!(!index.contains("ns", "c"));
        assert_eq!(index.reusable("ns", NOW), 1);
        assert_eq!(index.reusable("other", NOW), 0);
        assert_eq!(index.reusable("ns", NOW + 300), 0, "the window ended");
    }

    #[test]
    fn a_secret_being_deleted_is_not_handed_out() {
        let index = PodSecretIndex::default();
        let all = WatchScope::Cluster;
        index.apply(
            &all,
            watcher::Event::Apply(pod_secret("ns", "a", Some("2027-01-15T08:05:00Z"))),
        );
        let mut deleting = pod_secret("ns", "a", Some("2027-01-15T08:05:00Z"));
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(NOW).unwrap()));
        index.apply(&all, watcher::Event::Apply(deleting));
        assert!(!index.contains("ns", "a"));
    }

    #[test]
    fn a_relist_replaces_its_scopes_entries_once_complete_and_keeps_them_meanwhile() {
        let index = PodSecretIndex::default();
        let a = WatchScope::Namespace("a".into());
        let b = WatchScope::Namespace("b".into());
        index.apply(&a, watcher::Event::Apply(pod_secret("a", "x", None)));
        index.apply(&a, watcher::Event::Apply(pod_secret("a", "gone", None)));
        index.apply(&b, watcher::Event::Apply(pod_secret("b", "y", None)));
        index.apply(&a, watcher::Event::<SecretMeta>::Init);
        index.apply(&a, watcher::Event::InitApply(pod_secret("a", "x", None)));
        assert!(
            index.contains("a", "gone"),
            "admissions keep finding the Secrets while the relist runs"
        );
        index.apply(&a, watcher::Event::<SecretMeta>::InitDone);
        assert!(index.contains("a", "x"));
        assert!(
            !index.contains("a", "gone"),
            "not listed again: deleted meanwhile"
        );
        assert!(
            index.contains("b", "y"),
            "another namespace's watch is untouched"
        );
        index.apply(&WatchScope::Cluster, watcher::Event::<SecretMeta>::Init);
        index.apply(&WatchScope::Cluster, watcher::Event::<SecretMeta>::InitDone);
        assert!(
            !index.contains("b", "y") && !index.contains("a", "x"),
            "a cluster-wide relist replaces everything"
        );
    }
}
