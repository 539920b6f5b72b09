//! The webhook's TLS configuration: certificate and key from PEM files, optionally a client
//! CA whose certificates alone may connect (mutual TLS), reloaded when a file changes.

use axum_server::tls_rustls::RustlsConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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

/// The files a webhook TLS configuration is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate issued by one of these CAs.
    pub client_ca: Option<PathBuf>,
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
                let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .map_err(|source| TlsError::ClientCa {
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
        // The API server speaks HTTP/2 when offered, HTTP/1.1 otherwise.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
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
    };
    Ok(RustlsConfig::from_config(Arc::new(files.server_config()?)))
}

/// Reload the TLS configuration when the certificate, the key or the client CA changes
/// (cert-manager rotates them in place); open connections keep their session, new ones get
/// the new configuration. The files as they are when this is called are the baseline: call it
/// right after loading `tls` from them.
pub fn watch_tls_files(
    tls: RustlsConfig,
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    interval: Duration,
    shutdown: impl Future<Output = ()>,
) -> impl Future<Output = ()> {
    let files = TlsFiles {
        cert,
        key,
        client_ca,
    };
    let mut last = files.read().ok();
    async move {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(interval) => {}
            }
            let Ok(current) = files.read() else { continue };
            if last.as_ref() == Some(&current) {
                continue;
            }
            match files.config_of(&current) {
                Ok(config) => {
                    tls.reload_from_config(Arc::new(config));
                    tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
                    last = Some(current);
                }
                // A half-written set fails to parse; the next tick retries.
                Err(error) => tracing::warn!(%error, "TLS certificate not reloaded"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
