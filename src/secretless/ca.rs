//! The per-pod certificate authority: generated in memory when the proxy starts, it mints one
//! leaf certificate per destination host for the TLS the sandbox speaks to the proxy. Its key
//! never leaves the process; its certificate is written, with the Mozilla roots, as the CA
//! bundle the sandbox trusts.

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Leaf certificates kept; past this the cache starts over (a sandbox talks to few hosts).
const LEAF_CACHE_LIMIT: usize = 1024;

/// Failures of the certificate authority.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("failed to generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("failed to build the TLS configuration for a minted certificate: {0}")]
    Tls(#[from] rustls::Error),
    #[error("failed to write the CA bundle {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("failed to read the system time")]
    Clock,
}

/// The per-pod CA and its cache of per-host TLS server configurations.
pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
    leaves: Mutex<HashMap<String, Arc<ServerConfig>>>,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertAuthority(<key redacted>)")
    }
}

/// Validity window: from a day ago (clock skew) to `days` from now.
fn validity(params: &mut CertificateParams, days: i64) -> Result<(), CaError> {
    use k8s_openapi::jiff::{Timestamp, ToSpan as _, tz::TimeZone};
    let now = Timestamp::now();
    let day = |t: Timestamp| {
        let d = t.to_zoned(TimeZone::UTC).date();
        // `date_time_ymd` takes a day of month; every month has a 28th.
        rcgen::date_time_ymd(i32::from(d.year()), d.month() as u8, d.day().min(28) as u8)
    };
    let start = now.checked_sub(48.hours()).map_err(|_| CaError::Clock)?;
    let end = now
        .checked_add((days * 24).hours())
        .map_err(|_| CaError::Clock)?;
    params.not_before = day(start);
    params.not_after = day(end);
    Ok(())
}

impl CertAuthority {
    /// A fresh CA (ECDSA P-256), valid for a year: longer than any sandbox pod lives.
    pub fn generate() -> Result<Self, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "agent-secrets");
        dn.push(DnType::CommonName, "agent-secrets per-pod egress proxy CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, 365)?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The bundle the sandbox trusts: this CA, then the Mozilla roots, so a client whose whole
    /// trust store is replaced by `SSL_CERT_FILE` (OpenSSL, Python, curl) still verifies hosts
    /// reached without interception and the proxy's own upstream-style checks stay meaningful.
    pub fn bundle_pem(&self) -> String {
        let mut out = String::with_capacity(256 * 1024);
        out.push_str("# agent-secrets per-pod egress proxy CA\n");
        out.push_str(&self.cert_pem);
        for root in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
            out.push_str(&pem("CERTIFICATE", root.as_ref()));
        }
        out
    }

    /// Writes [`Self::bundle_pem`] to `path` atomically (a sibling temporary file renamed over
    /// it), readable by everyone: it holds only public certificates.
    pub fn write_bundle(&self, path: &Path) -> Result<(), CaError> {
        let err = |source| CaError::Write {
            path: path.display().to_string(),
            source,
        };
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        let tmp = dir.join(format!(
            ".{}.tmp",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "ca-bundle".into())
        ));
        let mut file = std::fs::File::create(&tmp).map_err(err)?;
        file.write_all(self.bundle_pem().as_bytes()).map_err(err)?;
        file.sync_all().map_err(err)?;
        drop(file);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).map_err(err)?;
        }
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// The TLS configuration presented to the sandbox for `host`: a leaf for it, minted once.
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, CaError> {
        if let Some(found) = self.lock().get(host) {
            return Ok(found.clone());
        }
        let config = Arc::new(self.mint(host)?);
        let mut leaves = self.lock();
        if leaves.len() >= LEAF_CACHE_LIMIT {
            leaves.clear();
        }
        leaves.insert(host.to_owned(), config.clone());
        Ok(config)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ServerConfig>>> {
        // A panic while holding the lock leaves a map that is still consistent.
        self.leaves.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mint(&self, host: &str) -> Result<ServerConfig, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.try_into()?),
        }];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        // OpenSSL 3's strict verification (Python 3.13's default) wants the AKI in leaves.
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, 90)?;
        let leaf = params.signed_by(&key, &self.issuer)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), self.cert_der.clone()], key_der)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// PEM text of one DER object.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_are_cached_per_host_and_chain_to_the_ca() {
        let ca = CertAuthority::generate().unwrap();
        let a = ca.server_config("api.example.com").unwrap();
        let again = ca.server_config("api.example.com").unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        let ip = ca.server_config("127.0.0.1").unwrap();
        assert!(!Arc::ptr_eq(&a, &ip));
    }

    #[test]
    fn the_bundle_holds_the_ca_first_and_the_public_roots_but_no_key() {
        let ca = CertAuthority::generate().unwrap();
        let bundle = ca.bundle_pem();
        assert!(bundle.find(ca.cert_pem()) < Some(100));
        assert!(
            bundle.matches("BEGIN CERTIFICATE").count()
                > webpki_root_certs::TLS_SERVER_ROOT_CERTS.len()
        );
        assert!(!bundle.contains("PRIVATE KEY"));
        assert!(!format!("{ca:?}").contains("PRIVATE"));
    }
}
