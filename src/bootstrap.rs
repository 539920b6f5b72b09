//! The operator owns its keyring and its webhook serving certificate at run time, as Sealed
//! Secrets owns its key and the Vault injector its certificate. Nothing secret is rendered by
//! Helm: an offline render (`helm template`, Argo CD, helm-diff), an upgrade or a rollback can
//! neither replace a key-encryption key nor land one in the release history.
//!
//! - The keyring Secret is created when absent and never overwritten.
//! - The webhook's CA and serving certificate are generated, kept in a Secret (with the CA key,
//!   so that renewals keep the CA the API server trusts), renewed well before they expire, and
//!   the CA is written into the `caBundle` of the operator's own webhook configuration.
//!
//! Every write is conditional (create, or replace at the read resourceVersion), so replicas
//! that bootstrap at once converge on one keyring and one CA. The decisions are pure
//! functions of what is stored and the time; the Kubernetes calls are thin.

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;
use zeroize::Zeroizing;

use crate::api::{FIELD_MANAGER, MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use crate::crypto::{Keyring, KeyringError};

/// Key of the keyring file inside its Secret (and so inside the mounted volume).
pub const KEYRING_KEY: &str = "keyring.yaml";
/// Keys of the TLS Secret: the serving pair, the CA bundle the API server trusts, the CA key.
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
/// Annotations on the TLS Secret: when the serving certificate and the CA expire (RFC 3339),
/// and the names the serving certificate is for, so no certificate parser is needed to decide.
pub const NOT_AFTER_ANNOTATION: &str = "agentsecrets.io/not-after";
pub const CA_NOT_AFTER_ANNOTATION: &str = "agentsecrets.io/ca-not-after";
pub const DNS_NAMES_ANNOTATION: &str = "agentsecrets.io/dns-names";

/// Lifetime of a generated CA, and how long before its end a new one is made.
pub const CA_VALIDITY: SignedDuration = SignedDuration::from_hours(10 * 365 * 24);
pub const CA_RENEW_BEFORE: SignedDuration = SignedDuration::from_hours(365 * 24);
/// Lifetime of a serving certificate, and how long before its end it is renewed.
pub const SERVING_VALIDITY: SignedDuration = SignedDuration::from_hours(365 * 24);
pub const SERVING_RENEW_BEFORE: SignedDuration = SignedDuration::from_hours(120 * 24);

const CA_COMMON_NAME: &str = "agent-secrets webhook CA";

/// Why bootstrapping failed. Messages never carry key material.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("failed to generate a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("failed to generate the keyring: {0}")]
    Keyring(#[from] KeyringError),
    #[error("the stored TLS Secret {0} is incomplete or damaged; delete it to have a new one made")]
    DamagedTlsSecret(String),
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("a certificate validity falls outside what X.509 can express")]
    TimeOutOfRange,
}

/// The CA and serving certificate of the webhook. Private keys are zeroised and never printed.
#[derive(Clone)]
pub struct WebhookPki {
    /// PEM of every CA the API server should trust (the current one first; a retiring one
    /// after it while certificates it signed may still be served).
    pub ca_bundle_pem: String,
    pub ca_cert_pem: String,
    ca_key_pem: Zeroizing<String>,
    pub ca_not_after: Timestamp,
    pub cert_pem: String,
    key_pem: Zeroizing<String>,
    pub not_after: Timestamp,
    pub dns_names: Vec<String>,
}

impl fmt::Debug for WebhookPki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookPki")
            .field("dns_names", &self.dns_names)
            .field("not_after", &self.not_after)
            .field("ca_not_after", &self.ca_not_after)
            .finish_non_exhaustive()
    }
}

/// What the stored TLS Secret needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsAction {
    /// Valid for long enough and for the right names.
    Keep,
    /// A new serving certificate from the stored CA (expiring, or for other names).
    RenewServing,
    /// A new CA too (none stored, damaged, or the CA itself expiring).
    NewCa,
}

/// The DNS names of the webhook Service, as the API server addresses it.
pub fn service_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

fn annotation<'a>(secret: &'a Secret, key: &str) -> Option<&'a str> {
    secret
        .metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

fn data<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    secret.data.as_ref()?.get(key).map(|b| b.0.as_slice())
}

/// Decide what the stored TLS Secret (if any) needs at `now` for `dns_names`.
pub fn tls_action(stored: Option<&Secret>, dns_names: &[String], now: Timestamp) -> TlsAction {
    let Some(secret) = stored else {
        return TlsAction::NewCa;
    };
    let time = |key| annotation(secret, key).and_then(|t| t.parse::<Timestamp>().ok());
    let complete = [TLS_CRT, TLS_KEY, CA_CRT, CA_KEY]
        .iter()
        .all(|key| data(secret, key).is_some_and(|d| !d.is_empty()));
    let (Some(ca_not_after), true) = (time(CA_NOT_AFTER_ANNOTATION), complete) else {
        return TlsAction::NewCa;
    };
    if ca_not_after - CA_RENEW_BEFORE <= now {
        return TlsAction::NewCa;
    }
    let names = annotation(secret, DNS_NAMES_ANNOTATION).unwrap_or_default();
    let names_match = names.split(',').eq(dns_names.iter().map(String::as_str));
    match time(NOT_AFTER_ANNOTATION) {
        Some(not_after) if names_match && not_after - SERVING_RENEW_BEFORE > now => TlsAction::Keep,
        _ => TlsAction::RenewServing,
    }
}

fn asn1_time(at: Timestamp) -> Result<::time::OffsetDateTime, BootstrapError> {
    ::time::OffsetDateTime::from_unix_timestamp(at.as_second())
        .map_err(|_| BootstrapError::TimeOutOfRange)
}

fn validity(
    params: &mut rcgen::CertificateParams,
    from: Timestamp,
    to: Timestamp,
) -> Result<(), BootstrapError> {
    params.not_before = asn1_time(from)?;
    params.not_after = asn1_time(to)?;
    Ok(())
}

fn ca_params() -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Issue a serving certificate for `dns_names` from the CA (`ca_key_pem`), valid from `now`.
fn issue_serving(
    ca_key_pem: &str,
    dns_names: &[String],
    now: Timestamp,
) -> Result<(String, Zeroizing<String>, Timestamp), BootstrapError> {
    let ca_key = rcgen::KeyPair::from_pem(ca_key_pem)?;
    let issuer = rcgen::Issuer::new(ca_params(), ca_key);
    let mut params = rcgen::CertificateParams::new(dns_names.to_vec())?;
    if let Some(first) = dns_names.first() {
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, first.as_str());
    }
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    params.use_authority_key_identifier_extension = true;
    let not_after = now + SERVING_VALIDITY;
    validity(&mut params, now - SignedDuration::from_mins(5), not_after)?;
    let key = rcgen::KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), Zeroizing::new(key.serialize_pem()), not_after))
}

/// Generate (or renew) the webhook's PKI per `action`, keeping a stored CA where it can.
pub fn generate(
    action: TlsAction,
    stored: Option<&Secret>,
    dns_names: &[String],
    now: Timestamp,
) -> Result<WebhookPki, BootstrapError> {
    let text = |secret: &Secret, key| {
        data(secret, key)
            .and_then(|d| std::str::from_utf8(d).ok())
            .map(str::to_owned)
    };
    let (ca_cert_pem, ca_key_pem, ca_not_after, retiring) = match (action, stored) {
        (TlsAction::RenewServing | TlsAction::Keep, Some(secret)) => {
            let damaged = || {
                BootstrapError::DamagedTlsSecret(secret.metadata.name.clone().unwrap_or_default())
            };
            let ca_not_after = annotation(secret, CA_NOT_AFTER_ANNOTATION)
                .and_then(|t| t.parse::<Timestamp>().ok())
                .ok_or_else(damaged)?;
            let cert = text(secret, CA_CRT).ok_or_else(damaged)?;
            // The bundle may hold a retiring CA after the current one: keep only the first.
            let current = first_pem_block(&cert).ok_or_else(damaged)?;
            let key = Zeroizing::new(text(secret, CA_KEY).ok_or_else(damaged)?);
            (current, key, ca_not_after, None)
        }
        _ => {
            let key = rcgen::KeyPair::generate()?;
            let mut params = ca_params();
            let ca_not_after = now + CA_VALIDITY;
            validity(
                &mut params,
                now - SignedDuration::from_mins(5),
                ca_not_after,
            )?;
            let cert = params.self_signed(&key)?;
            // A CA being replaced stays trusted next to the new one, so certificates it signed
            // keep working on replicas that have not reloaded yet.
            let retiring = stored
                .and_then(|s| text(s, CA_CRT))
                .and_then(|c| first_pem_block(&c));
            (
                cert.pem(),
                Zeroizing::new(key.serialize_pem()),
                ca_not_after,
                retiring,
            )
        }
    };
    let (cert_pem, key_pem, not_after) = issue_serving(&ca_key_pem, dns_names, now)?;
    let mut ca_bundle_pem = ca_cert_pem.clone();
    if let Some(old) = retiring {
        ca_bundle_pem.push_str(&old);
    }
    Ok(WebhookPki {
        ca_bundle_pem,
        ca_cert_pem,
        ca_key_pem,
        ca_not_after,
        cert_pem,
        key_pem,
        not_after,
        dns_names: dns_names.to_vec(),
    })
}

/// The first `-----BEGIN ...-----`/`-----END ...-----` block of a PEM bundle.
fn first_pem_block(pem: &str) -> Option<String> {
    let start = pem.find("-----BEGIN")?;
    let end_marker = pem[start..].find("-----END")? + start;
    let end = pem[end_marker..]
        .find('\n')
        .map_or(pem.len(), |i| end_marker + i + 1);
    let mut block = pem[start..end].to_owned();
    if !block.ends_with('\n') {
        block.push('\n');
    }
    Some(block)
}

fn managed_metadata(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some([(MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned())].into()),
        ..ObjectMeta::default()
    }
}

/// The TLS Secret holding `pki`.
pub fn tls_secret(namespace: &str, name: &str, pki: &WebhookPki) -> Secret {
    let mut metadata = managed_metadata(namespace, name);
    metadata.annotations = Some(
        [
            (NOT_AFTER_ANNOTATION.to_owned(), pki.not_after.to_string()),
            (
                CA_NOT_AFTER_ANNOTATION.to_owned(),
                pki.ca_not_after.to_string(),
            ),
            (DNS_NAMES_ANNOTATION.to_owned(), pki.dns_names.join(",")),
        ]
        .into(),
    );
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            (TLS_CRT.to_owned(), bytes(&pki.cert_pem)),
            (TLS_KEY.to_owned(), bytes(&pki.key_pem)),
            (CA_CRT.to_owned(), bytes(&pki.ca_bundle_pem)),
            (CA_KEY.to_owned(), bytes(&pki.ca_key_pem)),
        ])),
        ..Secret::default()
    }
}

/// The keyring Secret holding `keyring`.
pub fn keyring_secret(
    namespace: &str,
    name: &str,
    keyring: &Keyring,
) -> Result<Secret, BootstrapError> {
    let text = keyring.to_yaml()?;
    Ok(Secret {
        metadata: managed_metadata(namespace, name),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            KEYRING_KEY.to_owned(),
            ByteString(text.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    })
}

/// A JSON patch setting every webhook's `caBundle` of `configuration` to `ca_bundle_pem`, or
/// `None` when all already hold it. Each operation is guarded by a `test` of the webhook's
/// name, so a concurrent reordering of the list fails the patch instead of mis-writing it.
pub fn ca_bundle_patch(
    configuration: &MutatingWebhookConfiguration,
    ca_bundle_pem: &str,
) -> Option<json_patch::Patch> {
    use json_patch::{PatchOperation, ReplaceOperation, TestOperation};
    let wanted = ByteString(ca_bundle_pem.as_bytes().to_vec());
    let mut ops = Vec::new();
    for (i, webhook) in configuration.webhooks.iter().flatten().enumerate() {
        if webhook.client_config.ca_bundle.as_ref() == Some(&wanted) {
            continue;
        }
        let index = i.to_string();
        ops.push(PatchOperation::Test(TestOperation {
            path: crate::webhook::patch::pointer(&["webhooks", &index, "name"]),
            value: serde_json::Value::String(webhook.name.clone()),
        }));
        use base64::Engine as _;
        ops.push(PatchOperation::Replace(ReplaceOperation {
            path: crate::webhook::patch::pointer(&["webhooks", &index, "clientConfig", "caBundle"]),
            value: serde_json::Value::String(
                base64::engine::general_purpose::STANDARD.encode(ca_bundle_pem),
            ),
        }));
    }
    (!ops.is_empty()).then_some(json_patch::Patch(ops))
}

fn post_params() -> PostParams {
    PostParams {
        dry_run: false,
        field_manager: Some(FIELD_MANAGER.to_owned()),
    }
}

/// Create the keyring Secret `namespace/name` with a fresh primary key `key_id` unless it
/// exists; an existing one is never read for writing, replaced or changed. Returns whether it
/// was created.
pub async fn ensure_keyring(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    key_id: &str,
) -> Result<bool, BootstrapError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    if api.get_metadata_opt(name).await?.is_some() {
        return Ok(false);
    }
    let secret = keyring_secret(namespace, name, &Keyring::generate(key_id)?)?;
    match api.create(&post_params(), &secret).await {
        Ok(_) => {
            tracing::info!(
                namespace,
                secret = name,
                key_id,
                "created the keyring Secret"
            );
            Ok(true)
        }
        // Another replica created it first: that one is the keyring.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Make sure the TLS Secret holds a CA and a serving certificate for `dns_names` that stay
/// valid for long enough, and that the webhook configuration `webhook_configuration` trusts the
/// CA (when one is named). Returns the CA bundle in force.
pub async fn ensure_tls(
    client: &kube::Client,
    namespace: &str,
    secret_name: &str,
    webhook_configuration: Option<&str>,
    dns_names: &[String],
    now: Timestamp,
) -> Result<String, BootstrapError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let stored = api.get_opt(secret_name).await?;
    let action = tls_action(stored.as_ref(), dns_names, now);
    let ca_bundle = match action {
        TlsAction::Keep => stored
            .as_ref()
            .and_then(|s| data(s, CA_CRT))
            .and_then(|d| std::str::from_utf8(d).ok())
            .map(str::to_owned)
            .ok_or_else(|| BootstrapError::DamagedTlsSecret(secret_name.to_owned()))?,
        TlsAction::RenewServing | TlsAction::NewCa => {
            let pki = generate(action, stored.as_ref(), dns_names, now)?;
            let mut secret = tls_secret(namespace, secret_name, &pki);
            // The CA bundle goes to the API server first: a serving certificate it does not
            // trust yet must never be in use.
            if let Some(configuration) = webhook_configuration {
                patch_ca_bundle(client, configuration, &pki.ca_bundle_pem).await?;
            }
            let written = match &stored {
                None => api.create(&post_params(), &secret).await,
                Some(old) => {
                    secret.metadata.resource_version = old.metadata.resource_version.clone();
                    api.replace(secret_name, &post_params(), &secret).await
                }
            };
            match written {
                Ok(_) => tracing::info!(
                    namespace,
                    secret = secret_name,
                    action = ?action,
                    not_after = %pki.not_after,
                    "wrote the webhook's serving certificate"
                ),
                // Another replica wrote first; its certificate stands (and its CA is patched
                // in by its own run, or by ours on the next pass).
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            pki.ca_bundle_pem
        }
    };
    if let Some(configuration) = webhook_configuration {
        patch_ca_bundle(client, configuration, &ca_bundle).await?;
    }
    Ok(ca_bundle)
}

async fn patch_ca_bundle(
    client: &kube::Client,
    name: &str,
    ca_bundle_pem: &str,
) -> Result<(), BootstrapError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(configuration) = api.get_opt(name).await? else {
        tracing::warn!(
            configuration = name,
            "webhook configuration not found; caBundle not set"
        );
        return Ok(());
    };
    if let Some(patch) = ca_bundle_patch(&configuration, ca_bundle_pem) {
        api.patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await?;
        tracing::info!(
            configuration = name,
            "webhook configuration now trusts the operator's CA"
        );
    }
    Ok(())
}

/// What this replica keeps for itself, from the `run` flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub namespace: String,
    /// The keyring Secret to create when absent, and the id of its first key.
    pub keyring: Option<(String, String)>,
    /// The TLS Secret, the Service's DNS names, and the webhook configuration to patch.
    pub tls: Option<(String, Vec<String>, Option<String>)>,
}

impl Plan {
    pub fn from_args(args: &crate::run::BootstrapArgs, namespace: &str) -> Self {
        let crate::run::BootstrapArgs {
            keyring_secret,
            initial_key_id,
            tls_secret,
            webhook_service,
            webhook_configuration,
        } = args;
        Self {
            namespace: namespace.to_owned(),
            keyring: keyring_secret.clone().map(|name| {
                let id = initial_key_id
                    .clone()
                    .unwrap_or_else(crate::cli::default_key_id);
                (name, id)
            }),
            tls: tls_secret.clone().map(|name| {
                let service = webhook_service.as_deref().unwrap_or("agent-secrets");
                (
                    name,
                    service_dns_names(service, namespace),
                    webhook_configuration.clone(),
                )
            }),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keyring.is_none() && self.tls.is_none()
    }
}

/// How often the certificate and the caBundle are looked at once all is in place: renewal
/// needs nothing faster, and a caBundle wiped by a `kubectl replace` of the configuration is
/// restored within this time.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(300);
/// How soon to try again after a failure (the API server unreachable, RBAC missing).
pub const RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// Keep `plan` in place until `stop` resolves: the keyring Secret created once, the serving
/// certificate renewed and the caBundle set, retrying failures.
pub async fn maintain(
    client: kube::Client,
    plan: Plan,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut keyring_done = plan.keyring.is_none();
    loop {
        let mut failed = false;
        if let (false, Some((name, key_id))) = (keyring_done, &plan.keyring) {
            match ensure_keyring(&client, &plan.namespace, name, key_id).await {
                Ok(_) => keyring_done = true,
                Err(error) => {
                    failed = true;
                    tracing::warn!(%error, secret = %name, "failed to ensure the keyring Secret; retrying");
                }
            }
        }
        if let Some((name, dns_names, configuration)) = &plan.tls {
            let result = ensure_tls(
                &client,
                &plan.namespace,
                name,
                configuration.as_deref(),
                dns_names,
                Timestamp::now(),
            )
            .await;
            if let Err(error) = result {
                failed = true;
                tracing::warn!(%error, secret = %name, "failed to ensure the webhook certificate; retrying");
            }
        }
        let wait = if failed {
            RETRY_INTERVAL
        } else {
            RECHECK_INTERVAL
        };
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, WebhookClientConfig};

    fn now() -> Timestamp {
        Timestamp::from_second(crate::testing::SEALED_AT).unwrap()
    }

    fn names() -> Vec<String> {
        service_dns_names("agent-secrets", "agent-secrets")
    }

    fn stored_at(at: Timestamp) -> Secret {
        let pki = generate(TlsAction::NewCa, None, &names(), at).unwrap();
        tls_secret("agent-secrets", "agent-secrets-tls", &pki)
    }

    #[test]
    fn nothing_stored_means_a_new_ca() {
        assert_eq!(tls_action(None, &names(), now()), TlsAction::NewCa);
    }

    #[test]
    fn a_fresh_pair_is_kept_and_renewed_only_near_its_end() {
        let stored = stored_at(now());
        assert_eq!(tls_action(Some(&stored), &names(), now()), TlsAction::Keep);
        let later = now() + SERVING_VALIDITY - SERVING_RENEW_BEFORE + SignedDuration::from_secs(1);
        assert_eq!(
            tls_action(Some(&stored), &names(), later),
            TlsAction::RenewServing
        );
        let near_ca_end = now() + CA_VALIDITY - CA_RENEW_BEFORE;
        assert_eq!(
            tls_action(Some(&stored), &names(), near_ca_end),
            TlsAction::NewCa
        );
    }

    #[test]
    fn other_names_or_a_damaged_secret_are_replaced() {
        let stored = stored_at(now());
        let other = service_dns_names("renamed", "agent-secrets");
        assert_eq!(
            tls_action(Some(&stored), &other, now()),
            TlsAction::RenewServing
        );
        let mut damaged = stored.clone();
        damaged.data.as_mut().unwrap().remove(CA_KEY);
        assert_eq!(
            tls_action(Some(&damaged), &names(), now()),
            TlsAction::NewCa
        );
    }

    #[test]
    fn a_renewal_keeps_the_ca_and_a_new_ca_keeps_the_old_one_trusted() {
        let stored = stored_at(now());
        let ca = String::from_utf8(data(&stored, CA_CRT).unwrap().to_vec()).unwrap();
        let later = now() + SignedDuration::from_hours(300 * 24);
        let renewed = generate(TlsAction::RenewServing, Some(&stored), &names(), later).unwrap();
        assert_eq!(renewed.ca_bundle_pem, ca, "same CA, same bundle");
        assert_ne!(
            renewed.cert_pem,
            String::from_utf8(data(&stored, TLS_CRT).unwrap().to_vec()).unwrap()
        );
        let rotated = generate(TlsAction::NewCa, Some(&stored), &names(), later).unwrap();
        assert_ne!(rotated.ca_cert_pem, ca);
        assert!(rotated.ca_bundle_pem.starts_with(&rotated.ca_cert_pem));
        assert!(
            rotated.ca_bundle_pem.ends_with(&ca),
            "the old CA stays trusted"
        );
    }

    /// The serving certificate verifies against the CA bundle for the Service's names, with
    /// the same rustls the API server's peers use.
    #[test]
    fn the_serving_certificate_verifies_against_the_bundle() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pki = generate(TlsAction::NewCa, None, &names(), Timestamp::now()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile_certs(&pki.ca_bundle_pem) {
            roots.add(cert).unwrap();
        }
        use rustls::client::danger::ServerCertVerifier as _;
        let verifier = rustls::client::WebPkiServerVerifier::builder(roots.into())
            .build()
            .unwrap();
        let chain = rustls_pemfile_certs(&pki.cert_pem);
        let name =
            rustls::pki_types::ServerName::try_from("agent-secrets.agent-secrets.svc").unwrap();
        verifier
            .verify_server_cert(
                &chain[0],
                &[],
                &name,
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .unwrap();
        let other = rustls::pki_types::ServerName::try_from("evil.example").unwrap();
        assert!(
            verifier
                .verify_server_cert(
                    &chain[0],
                    &[],
                    &other,
                    &[],
                    rustls::pki_types::UnixTime::now()
                )
                .is_err()
        );
    }

    fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        use rustls::pki_types::pem::PemObject as _;
        rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
            .map(Result::unwrap)
            .collect()
    }

    #[test]
    fn debug_never_shows_private_keys() {
        let pki = generate(TlsAction::NewCa, None, &names(), now()).unwrap();
        let text = format!("{pki:?}");
        assert!(!text.contains("PRIVATE KEY"), "{text}");
    }

    #[test]
    fn the_ca_bundle_patch_touches_only_webhooks_that_lack_it() {
        let webhook = |name: &str, bundle: Option<&str>| MutatingWebhook {
            name: name.into(),
            client_config: WebhookClientConfig {
                ca_bundle: bundle.map(|b| ByteString(b.as_bytes().to_vec())),
                ..WebhookClientConfig::default()
            },
            ..MutatingWebhook::default()
        };
        let configuration = MutatingWebhookConfiguration {
            webhooks: Some(vec![webhook("a", Some("PEM")), webhook("b", None)]),
            ..MutatingWebhookConfiguration::default()
        };
        let patch = ca_bundle_patch(&configuration, "PEM").unwrap();
        assert_eq!(
            serde_json::to_value(&patch).unwrap(),
            serde_json::json!([
                {"op": "test", "path": "/webhooks/1/name", "value": "b"},
                {"op": "replace", "path": "/webhooks/1/clientConfig/caBundle", "value": "UEVN"}
            ])
        );
        let done = MutatingWebhookConfiguration {
            webhooks: Some(vec![webhook("a", Some("PEM"))]),
            ..MutatingWebhookConfiguration::default()
        };
        assert!(ca_bundle_patch(&done, "PEM").is_none());
    }

    #[test]
    fn the_plan_follows_the_flags() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            bootstrap: crate::run::BootstrapArgs,
        }
        let flags = Flags::parse_from([
            "x",
            "--keyring-secret=ks",
            "--initial-key-id=kek-1",
            "--tls-secret=tls",
            "--webhook-service=svc",
            "--webhook-configuration=mwc",
        ]);
        let plan = Plan::from_args(&flags.bootstrap, "ops");
        assert_eq!(plan.keyring, Some(("ks".into(), "kek-1".into())));
        let (secret, names, configuration) = plan.tls.unwrap();
        assert_eq!(
            (secret.as_str(), configuration.as_deref()),
            ("tls", Some("mwc"))
        );
        assert_eq!(names[2], "svc.ops.svc");
        let none = Flags::parse_from(["x"]);
        assert!(Plan::from_args(&none.bootstrap, "ops").is_empty());
        // A certificate needs the Service it is for.
        assert!(Flags::try_parse_from(["x", "--tls-secret=tls"]).is_err());
    }

    #[test]
    fn the_keyring_secret_holds_a_loadable_keyring() {
        let secret = keyring_secret("ns", "k", &Keyring::generate("kek-1").unwrap()).unwrap();
        let text = std::str::from_utf8(data(&secret, KEYRING_KEY).unwrap()).unwrap();
        assert_eq!(Keyring::from_yaml(text).unwrap().primary_id(), "kek-1");
    }
}
