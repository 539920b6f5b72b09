//! TLS configurations from PEM files (the webhook's, the value feed's, the Secrets page's):
//! certificate and key, optionally a client CA whose certificates are required (mutual TLS)
//! or verified when presented, reloaded when a file changes.

use axum_server::tls_rustls::RustlsConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::telemetry::Metrics;

/// Why a TLS configuration could not be built. Never shows file content: a key file could be
/// swapped with another secret.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("failed to read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to parse a PEM certificate in {}", .0.display())]
    Certificate(PathBuf),
    #[error("failed to find a PEM certificate in {}", .0.display())]
    NoCertificate(PathBuf),
    #[error("failed to parse a PEM private key in {}", .0.display())]
    Key(PathBuf),
    #[error("failed to use the client CA {}: {source}", path.display())]
    ClientCa {
        path: PathBuf,
        source: rustls::server::VerifierBuilderError,
    },
    #[error("failed to use the certificate and key as a TLS server identity: {0}")]
    Identity(#[source] rustls::Error),
}

/// Whether clients must present a certificate issued by the client CA, or may connect without
/// one (a certificate presented is still verified).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClientCertificates {
    #[default]
    Required,
    Optional,
}

/// The files a TLS configuration is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, client certificates are verified against these CAs.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: whether a client certificate is required.
    pub client_certificates: ClientCertificates,
}

/// The content of [`TlsFiles`], to notice a change.
#[derive(Debug, PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

impl TlsFiles {
    fn read(&self) -> Result<Contents, TlsError> {
        Ok(Contents {
            cert: read(&self.cert)?,
            key: read(&self.key)?,
            client_ca: self.client_ca.as_deref().map(read).transpose()?,
        })
    }

    /// The server configuration these files describe.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        self.config_of(&self.read()?)
    }

    fn config_of(&self, contents: &Contents) -> Result<rustls::ServerConfig, TlsError> {
        let chain = certificates(&contents.cert, &self.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&contents.key)
            .map_err(|_| TlsError::Key(self.key.clone()))?;
        let builder = rustls::ServerConfig::builder();
        let builder = match (&self.client_ca, &contents.client_ca) {
            (Some(path), Some(pem)) => {
                let mut roots = rustls::RootCertStore::empty();
                for ca in certificates(pem, path)? {
                    roots
                        .add(ca)
                        .map_err(|_| TlsError::Certificate(path.clone()))?;
                }
                let verifier = WebPkiClientVerifier::builder(Arc::new(roots));
                let verifier = match self.client_certificates {
                    ClientCertificates::Required => verifier,
                    ClientCertificates::Optional => verifier.allow_unauthenticated(),
                };
                let verifier = verifier.build().map_err(|source| TlsError::ClientCa {
                    path: path.clone(),
                    source,
                })?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(TlsError::Identity)?;
        // The API server (and browsers) speak HTTP/2 when offered, HTTP/1.1 otherwise.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// When the first (serving) certificate of a PEM chain expires, in seconds since the epoch;
/// `None` when it does not parse.
pub fn not_after(pem: &[u8]) -> Option<i64> {
    let leaf = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
    let (_, certificate) = x509_parser::parse_x509_certificate(&leaf).ok()?;
    Some(certificate.validity().not_after.timestamp())
}

fn certificates(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsError::Certificate(path.to_owned()))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(chain)
}

/// Load the webhook's TLS configuration from `cert` and `key`, requiring client certificates
/// issued by `client_ca` when it is set.
pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<RustlsConfig, TlsError> {
    let files = TlsFiles {
        cert: cert.to_owned(),
        key: key.to_owned(),
        client_ca: client_ca.map(Path::to_owned),
        client_certificates: ClientCertificates::Required,
    };
    Ok(RustlsConfig::from_config(Arc::new(files.server_config()?)))
}

/// Reload the TLS configuration when the certificate, the key or the client CA changes
/// (cert-manager rotates them in place); open connections keep their session, new ones get
/// the new configuration. The files as they are when this is called are the baseline: call it
/// right after loading `tls` from them. `metrics`, when given, get the notAfter of the
/// certificate in force and the failed reloads (one watcher per set of files reports them).
pub fn watch_tls_files(
    tls: RustlsConfig,
    files: TlsFiles,
    interval: Duration,
    metrics: Option<Arc<Metrics>>,
    shutdown: impl Future<Output = ()>,
) -> impl Future<Output = ()> {
    let mut watch = TlsWatch::new(files, metrics);
    async move {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(interval) => {}
            }
            if let Some(config) = watch.check() {
                tls.reload_from_config(Arc::new(config));
            }
        }
    }
}

/// The state of [`watch_tls_files`] between checks.
struct TlsWatch {
    files: TlsFiles,
    metrics: Option<Arc<Metrics>>,
    /// The contents in force.
    last: Option<Contents>,
    /// The contents that failed last, so a bad set is counted once, not on every check.
    failed: Option<Contents>,
    /// Whether the last check could not read the files.
    unreadable: bool,
}

impl TlsWatch {
    /// Starts from the files as they are (the configuration in force was just loaded from
    /// them).
    fn new(files: TlsFiles, metrics: Option<Arc<Metrics>>) -> Self {
        let last = files.read().ok();
        if let (Some(metrics), Some(seconds)) =
            (&metrics, last.as_ref().and_then(|c| not_after(&c.cert)))
        {
            metrics.tls_not_after.set(seconds);
        }
        Self {
            files,
            metrics,
            last,
            failed: None,
            unreadable: false,
        }
    }

    fn count_failure(&self) {
        if let Some(metrics) = &self.metrics {
            metrics.tls_reload_failures.inc();
        }
    }

    /// One check: the new configuration to put in force, if the files changed and load.
    fn check(&mut self) -> Option<rustls::ServerConfig> {
        let current = match self.files.read() {
            Ok(current) => current,
            Err(error) => {
                if !self.unreadable {
                    self.count_failure();
                    tracing::warn!(%error, "TLS certificate not reloaded");
                }
                self.unreadable = true;
                return None;
            }
        };
        self.unreadable = false;
        if self.last.as_ref() == Some(&current) || self.failed.as_ref() == Some(&current) {
            return None;
        }
        match self.files.config_of(&current) {
            Ok(config) => {
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                if let (Some(metrics), Some(seconds)) = (&self.metrics, not_after(&current.cert)) {
                    metrics.tls_not_after.set(seconds);
                }
                self.last = Some(current);
                self.failed = None;
                Some(config)
            }
            // A half-written set fails to parse; the next change is tried again.
            Err(error) => {
                self.count_failure();
                tracing::warn!(%error, "TLS certificate not reloaded");
                self.failed = Some(current);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(seconds).unwrap()
    }

    /// A self-signed serving certificate and its key (PEM) expiring at `not_after`.
    fn certificate(not_after: time::OffsetDateTime) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec!["webhook.example".into()]).unwrap();
        params.not_after = not_after;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn watch_of(dir: &Path, metrics: &Arc<Metrics>) -> TlsWatch {
        TlsWatch::new(
            TlsFiles {
                cert: dir.join("tls.crt"),
                key: dir.join("tls.key"),
                client_ca: None,
                client_certificates: ClientCertificates::Required,
            },
            Some(metrics.clone()),
        )
    }

    fn write(dir: &Path, (cert, key): &(String, String)) {
        std::fs::write(dir.join("tls.crt"), cert).unwrap();
        std::fs::write(dir.join("tls.key"), key).unwrap();
    }

    #[test]
    fn the_expiry_gauge_is_the_notafter_of_the_certificate_in_force() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let first = at(1_936_000_000);
        write(dir.path(), &certificate(first));
        let metrics = Arc::new(Metrics::default());
        let mut watch = watch_of(dir.path(), &metrics);
        assert_eq!(metrics.tls_not_after.get(), first.unix_timestamp());
        assert!(watch.check().is_none(), "unchanged files are not reloaded");

        let renewed = at(1_956_000_000);
        write(dir.path(), &certificate(renewed));
        assert!(watch.check().is_some());
        assert_eq!(metrics.tls_not_after.get(), renewed.unix_timestamp());
        assert_eq!(metrics.tls_reload_failures.get(), 0);
    }

    #[test]
    fn failed_reloads_are_counted_once_each_and_keep_the_certificate_in_force() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let expiry = at(1_936_000_000);
        let good = certificate(expiry);
        write(dir.path(), &good);
        let metrics = Arc::new(Metrics::default());
        let mut watch = watch_of(dir.path(), &metrics);

        std::fs::write(dir.path().join("tls.crt"), "not a certificate").unwrap();
        assert!(watch.check().is_none());
        assert_eq!(metrics.tls_reload_failures.get(), 1);
        assert!(watch.check().is_none());
        assert_eq!(
            metrics.tls_reload_failures.get(),
            1,
            "the same bad file is counted once"
        );

        // A key that does not match the certificate is another failure.
        let other = certificate(expiry);
        std::fs::write(dir.path().join("tls.crt"), &good.0).unwrap();
        std::fs::write(dir.path().join("tls.key"), &other.1).unwrap();
        assert!(watch.check().is_none());
        assert_eq!(metrics.tls_reload_failures.get(), 2);

        std::fs::remove_file(dir.path().join("tls.key")).unwrap();
        assert!(watch.check().is_none());
        assert!(watch.check().is_none());
        assert_eq!(
            metrics.tls_reload_failures.get(),
            3,
            "unreadable files count once per spell"
        );
        assert_eq!(metrics.tls_not_after.get(), expiry.unix_timestamp());

        write(dir.path(), &certificate(expiry));
        assert!(watch.check().is_some(), "a good set loads again");
        assert_eq!(metrics.tls_reload_failures.get(), 3);
    }

    #[test]
    fn the_notafter_of_a_chain_is_the_first_certificates() {
        let leaf = certificate(at(1_900_000_000)).0;
        let issuer = certificate(at(2_200_000_000)).0;
        assert_eq!(
            not_after(format!("{leaf}{issuer}").as_bytes()),
            Some(at(1_900_000_000).unix_timestamp())
        );
        assert_eq!(not_after(b"garbage"), None);
    }

    #[test]
    fn errors_name_the_file_and_never_its_content() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = std::env::temp_dir().join(format!("asec-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("tls.crt");
        let key = dir.join("tls.key");
        std::fs::write(&cert, "not a certificate canary-tls-content").unwrap();
        std::fs::write(&key, "canary-key-content").unwrap();
        let error = load(&cert, &key, None).unwrap_err().to_string();
        assert!(error.contains("tls.crt"), "{error}");
        assert!(!error.contains("canary"), "{error}");
        let missing = load(&dir.join("absent.crt"), &key, None).unwrap_err();
        assert!(matches!(missing, TlsError::Read { .. }), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
