//! Where the proxy's snapshot comes from. The file source serves tests and local use; the
//! operator's authenticated feed implements the same trait.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use super::snapshot::{Snapshot, SnapshotError, Unusable};

/// A source of snapshots. The proxy reads [`ValueSource::watch`]'s current value for every
/// request, so a change applies to the next request without a restart.
pub trait ValueSource: Send + Sync + 'static {
    /// A receiver whose current value is the snapshot in force; it is notified on every change.
    fn watch(&self) -> watch::Receiver<Arc<Snapshot>>;
}

/// A source that never changes (tests, benchmarks).
#[derive(Debug)]
pub struct StaticSource {
    sender: watch::Sender<Arc<Snapshot>>,
}

impl StaticSource {
    pub fn new(snapshot: Snapshot) -> Self {
        Self {
            sender: watch::Sender::new(Arc::new(snapshot)),
        }
    }

    /// Replaces the snapshot (what an operator feed does on a change).
    pub fn replace(&self, snapshot: Snapshot) {
        self.sender.send_replace(Arc::new(snapshot));
    }
}

impl ValueSource for StaticSource {
    fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.sender.subscribe()
    }
}

/// How often the file source looks at its file: changes apply within this interval.
pub const FILE_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Errors of the file source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("failed to read the secretless values file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to load the secretless values file {path}: {source}")]
    Invalid {
        path: PathBuf,
        source: SnapshotError,
    },
}

/// A JSON values file, polled for changes. Polling (rather than inotify) also sees the
/// symlink swap by which the kubelet updates mounted volumes, and costs one small read per
/// interval. Writers must replace the file atomically (write then rename); a file that cannot
/// be read or parsed makes the proxy refuse every request until it is fixed, so a broken
/// update never keeps a deleted secret usable.
#[derive(Debug)]
pub struct FileSource {
    sender: watch::Sender<Arc<Snapshot>>,
}

impl FileSource {
    /// Loads the file (it must be valid now) and polls it until `stop` is cancelled.
    pub fn spawn(path: PathBuf, stop: CancellationToken) -> Result<Arc<Self>, SourceError> {
        let bytes = read(&path)?;
        let snapshot = Snapshot::from_json(&bytes).map_err(|source| SourceError::Invalid {
            path: path.clone(),
            source,
        })?;
        let source = Arc::new(Self {
            sender: watch::Sender::new(Arc::new(snapshot)),
        });
        let sender = source.sender.clone();
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        tokio::spawn(poll(path, sender, digest, stop));
        Ok(source)
    }
}

impl ValueSource for FileSource {
    fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.sender.subscribe()
    }
}

fn read(path: &Path) -> Result<Zeroizing<Vec<u8>>, SourceError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|source| SourceError::Read {
            path: path.to_owned(),
            source,
        })
}

async fn poll(
    path: PathBuf,
    sender: watch::Sender<Arc<Snapshot>>,
    first: ring::digest::Digest,
    stop: CancellationToken,
) {
    // Digest of the content last applied; None while the file is unreadable.
    let mut last: Option<ring::digest::Digest> = Some(first);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(FILE_POLL_INTERVAL) => {}
        }
        let bytes = match read(&path) {
            Ok(bytes) => bytes,
            Err(e) => {
                if last.take().is_some() {
                    tracing::error!(error = %e, "secretless values unreadable: refusing every request");
                    sender.send_replace(Arc::new(Snapshot::unusable(Unusable::Unreadable)));
                }
                continue;
            }
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        if last.as_ref().is_some_and(|d| d.as_ref() == digest.as_ref()) {
            continue;
        }
        last = Some(digest);
        match Snapshot::from_json(&bytes) {
            Ok(snapshot) => {
                tracing::info!(
                    secrets = snapshot.entries().len(),
                    "secretless values reloaded"
                );
                sender.send_replace(Arc::new(snapshot));
            }
            Err(e) => {
                tracing::error!(error = %e, "secretless values invalid: refusing every request");
                sender.send_replace(Arc::new(Snapshot::unusable(Unusable::Invalid)));
            }
        }
    }
}
