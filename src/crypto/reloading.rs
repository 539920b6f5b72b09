//! The keyring in force, reloaded from its file when the file changes (a mounted Secret is
//! updated in place by the kubelet), without a restart.

use arc_swap::ArcSwapOption;
use prometheus_client::metrics::counter::Counter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

use super::keyring::{Keyring, KeyringError};

/// Shared, swappable keyring. Readers take a cheap snapshot per request.
#[derive(Clone)]
pub struct KeyringHandle {
    current: Arc<ArcSwapOption<Keyring>>,
    changed: Arc<tokio::sync::watch::Sender<()>>,
}

impl Default for KeyringHandle {
    fn default() -> Self {
        Self {
            current: Arc::default(),
            changed: Arc::new(tokio::sync::watch::channel(()).0),
        }
    }
}

impl std::fmt::Debug for KeyringHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyringHandle")
            .field("current", &self.current.load_full())
            .finish()
    }
}

impl KeyringHandle {
    /// A handle holding `keyring`.
    pub fn new(keyring: Keyring) -> Self {
        let handle = Self::default();
        handle.replace(keyring);
        handle
    }

    /// The keyring in force, if one has loaded.
    pub fn current(&self) -> Option<Arc<Keyring>> {
        self.current.load_full()
    }

    /// Put `keyring` in force.
    pub fn replace(&self, keyring: Keyring) {
        self.current.store(Some(Arc::new(keyring)));
        self.changed.send_replace(());
    }

    /// A receiver notified each time a keyring is put in force.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<()> {
        self.changed.subscribe()
    }

    /// Forget the keyring: nothing can be sealed or opened until one is put in force.
    pub fn clear(&self) {
        self.current.store(None);
    }

    /// Load `path` now; then, until `shutdown` resolves, re-read it every `interval` and put a
    /// changed, valid keyring in force. An invalid new file keeps the last good keyring and is
    /// reported (by message only: never key material) and counted in `failures`.
    pub async fn watch_file(
        self,
        path: PathBuf,
        interval: Duration,
        failures: Counter,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let mut last: Option<Zeroizing<String>> = None;
        tokio::pin!(shutdown);
        loop {
            self.reload_if_changed(&path, &mut last, &failures);
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// One step of [`Self::watch_file`]: returns whether a new keyring was put in force. Once a
    /// keyring is in force, an unreadable file counts as a failure on each check (the keyring
    /// in force may be stale); before, the file is awaited (on a first install the operator
    /// creates it and the kubelet then projects it) and readiness reports it. An invalid
    /// content counts once.
    pub fn reload_if_changed(
        &self,
        path: &Path,
        last: &mut Option<Zeroizing<String>>,
        failures: &Counter,
    ) -> bool {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => Zeroizing::new(text),
            Err(source) => {
                let error = KeyringError::Read {
                    path: path.display().to_string(),
                    source,
                };
                tracing::error!(%error, "keyring not reloaded");
                if self.current().is_some() {
                    failures.inc();
                }
                return false;
            }
        };
        if last.as_ref().is_some_and(|l| **l == *text) {
            return false;
        }
        let result = Keyring::from_yaml(&text);
        *last = Some(text);
        match result {
            Ok(keyring) => {
                tracing::info!(
                    primary = keyring.primary_id(),
                    keys = keyring.key_ids().count(),
                    "keyring loaded"
                );
                self.replace(keyring);
                true
            }
            Err(error) => {
                tracing::error!(%error, "keyring file is invalid; keeping the last good keyring");
                failures.inc();
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloads_changed_files_and_keeps_the_last_good_keyring() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.yaml");
        let mut ring = Keyring::generate("one").unwrap();
        std::fs::write(&path, ring.to_yaml().unwrap().as_bytes()).unwrap();

        let handle = KeyringHandle::default();
        assert!(handle.current().is_none());
        let mut last = None;
        let failures = Counter::default();
        assert!(!handle.reload_if_changed(&dir.path().join("absent.yaml"), &mut last, &failures));
        assert_eq!(
            failures.get(),
            0,
            "a file not there yet is awaited, not a failure"
        );
        assert!(handle.reload_if_changed(&path, &mut last, &failures));
        assert_eq!(handle.current().unwrap().primary_id(), "one");
        assert!(
            !handle.reload_if_changed(&path, &mut last, &failures),
            "unchanged file is not reloaded"
        );

        ring.add_primary("two").unwrap();
        std::fs::write(&path, ring.to_yaml().unwrap().as_bytes()).unwrap();
        assert!(handle.reload_if_changed(&path, &mut last, &failures));
        assert_eq!(handle.current().unwrap().primary_id(), "two");

        assert_eq!(failures.get(), 0, "good files are no failures");

        std::fs::write(&path, "primary: nope\nkeys: []\n").unwrap();
        assert!(!handle.reload_if_changed(&path, &mut last, &failures));
        assert_eq!(handle.current().unwrap().primary_id(), "two");
        assert_eq!(failures.get(), 1, "an invalid file is a failed reload");
        assert!(!handle.reload_if_changed(&path, &mut last, &failures));
        assert_eq!(
            failures.get(),
            1,
            "the same invalid content is counted once"
        );

        std::fs::remove_file(&path).unwrap();
        assert!(!handle.reload_if_changed(&path, &mut last, &failures));
        assert_eq!(handle.current().unwrap().primary_id(), "two");
        assert_eq!(failures.get(), 2, "an unreadable file is a failed reload");
        assert!(!handle.reload_if_changed(&path, &mut last, &failures));
        assert_eq!(failures.get(), 3, "counted on each check while it lasts");
    }
}
