//! Secretless pods: the sandbox containers get placeholders, and an egress proxy sidecar
//! (`agentsecrets proxy`, fed by the operator) puts the values into requests to the hosts each
//! secret is allowed for. See docs/secretless.md.
//!
//! Everything here is pure but placeholder generation: which mode a pod is in, whether what it
//! already holds under the reserved names is ours, and the patch.
//!
//! Reinvocation: the API server calls the webhook again with the same request after a later
//! webhook changed the pod, and the pod then carries the sidecar, volumes and env of the first
//! call. Placeholders are random, so they cannot be derived again; the sidecar of the first
//! call is recognised (same image, args, feed, CA and mounts, no command) and its placeholders
//! are kept, so both calls give one shape. A sidecar or reserved volume that is not exactly
//! ours refuses the pod: whoever wrote it could otherwise receive the values from the feed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::api::{
    EGRESS_ANNOTATION, FEED_AUDIENCE, FEED_PATH, FEED_TOKEN_VOLUME, MODE_ANNOTATION,
    PROXY_CA_VOLUME, PROXY_CONTAINER_NAME, PROXY_PLACEHOLDERS_ENV,
};
use crate::secretless::snapshot::{PLACEHOLDER_MIN_RANDOM, PLACEHOLDER_PREFIX};

use super::super::patch::{PatchWriter, write_str};
use super::super::quoted;
use super::super::review::{ContainerView, PodView, VolumeView};

/// Prefix of every volume name reserved for agent-secrets.
pub const RESERVED_VOLUME_PREFIX: &str = "agentsecrets-";
/// Where the proxy writes its CA bundle, and the sandbox reads it.
pub const CA_DIR: &str = "/var/run/agentsecrets/ca";
/// The CA bundle the sandbox trusts.
pub const CA_BUNDLE: &str = "/var/run/agentsecrets/ca/ca-bundle.pem";
/// Where the proxy reads its feed token.
pub const FEED_TOKEN_DIR: &str = "/var/run/agentsecrets/feed-token";
/// The proxy's loopback listener, which the sandbox's proxy variables name.
pub const PROXY_URL: &str = "http://127.0.0.1:15080";
/// The proxy's admin port (probes).
pub const ADMIN_PORT: u16 = 15081;
/// Port of the operator's value feed when `--feed-service-host` names none.
pub const DEFAULT_FEED_PORT: u16 = 8444;
pub use crate::api::{PROXY_EGRESS_ENV, PROXY_FEED_CA_ENV, PROXY_OWNER_ENV};
/// Random characters of a placeholder made here.
pub const PLACEHOLDER_RANDOM_CHARS: usize = 32;
/// Lifetime of the proxy's feed token; the kubelet renews it at 80 %.
const FEED_TOKEN_SECONDS: i64 = 3600;

/// What secretless mode is configured with (`--secretless-*`, `--proxy-image`, the feed).
#[derive(Debug, Clone, Default)]
pub struct SecretlessPolicy {
    /// Namespaces whose sandbox pods must be secretless.
    pub namespaces: NamespaceSet,
    /// What happens to a selected secret without `allowedHosts` in a secretless pod.
    pub unscoped: Unscoped,
    /// Image of the proxy sidecar (the operator's own).
    pub proxy_image: Option<String>,
    /// `https://HOST:PORT/v1/feed`.
    pub feed_url: Option<String>,
    /// The feed's CA certificate, for the sidecar to verify the feed.
    pub feed_ca: FeedCa,
}

/// Namespaces given by `--secretless-namespaces`: names, or `*` for all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceSet {
    pub all: bool,
    pub names: BTreeSet<String>,
}

impl NamespaceSet {
    /// Parse comma-list entries; `*` means every namespace.
    pub fn parse(entries: impl IntoIterator<Item = String>) -> Self {
        let mut set = Self::default();
        for entry in entries {
            if entry == "*" {
                set.all = true;
            } else {
                set.names.insert(entry);
            }
        }
        set
    }

    pub fn contains(&self, namespace: &str) -> bool {
        self.all || self.names.contains(namespace)
    }
}

/// `--secretless-unscoped`: a secret without `allowedHosts` has no host to be bound to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Unscoped {
    /// Refuse the pod, naming the secrets.
    #[default]
    Refuse,
    /// Inject them as today: the value in the environment, from a pod-scoped Secret.
    Env,
}

/// The feed's CA certificate: a file re-read when it changes (the serving certificate's CA
/// rotates), or fixed text.
#[derive(Debug, Clone, Default)]
pub enum FeedCa {
    #[default]
    Unset,
    Pem(Arc<str>),
    File(Arc<FeedCaFile>),
}

/// Modification time and length: a change of either means the file was replaced.
type FileStamp = (SystemTime, u64);

/// A CA file and what was last read from it.
#[derive(Debug)]
pub struct FeedCaFile {
    path: PathBuf,
    last: Mutex<Option<(FileStamp, Arc<str>)>>,
}

impl FeedCa {
    pub fn file(path: PathBuf) -> Self {
        Self::File(Arc::new(FeedCaFile {
            path,
            last: Mutex::new(None),
        }))
    }

    /// The PEM text, or why there is none (a message for the pod's creator).
    pub fn pem(&self) -> Result<Arc<str>, String> {
        match self {
            Self::Unset => Err("no feed CA is configured (--feed-ca-file)".into()),
            Self::Pem(pem) => Ok(pem.clone()),
            Self::File(file) => file.read(),
        }
    }
}

impl FeedCaFile {
    fn read(&self) -> Result<Arc<str>, String> {
        let unreadable = || format!("the feed CA file {} cannot be read", self.path.display());
        let meta = std::fs::metadata(&self.path).map_err(|_| unreadable())?;
        let stamp = (meta.modified().map_err(|_| unreadable())?, meta.len());
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((seen, pem)) = last.as_ref()
            && *seen == stamp
        {
            return Ok(pem.clone());
        }
        let text = std::fs::read_to_string(&self.path).map_err(|_| unreadable())?;
        if !text.contains("-----BEGIN CERTIFICATE-----") {
            return Err(format!(
                "the feed CA file {} holds no PEM certificate",
                self.path.display()
            ));
        }
        let pem: Arc<str> = Arc::from(text.as_str());
        *last = Some((stamp, pem.clone()));
        Ok(pem)
    }
}

/// `https://HOST:PORT/v1/feed` for `--feed-service-host` `HOST` or `HOST:PORT`.
pub fn feed_url(host: &str) -> String {
    let has_port = host
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()));
    if has_port {
        format!("https://{host}{FEED_PATH}")
    } else {
        format!("https://{host}:{DEFAULT_FEED_PORT}{FEED_PATH}")
    }
}

/// Whether a sandbox may reach hosts no secret mentions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Egress {
    #[default]
    Open,
    Allowlist,
}

impl Egress {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Allowlist => "allowlist",
        }
    }
}

/// How a sandbox pod receives its secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The values in its environment (from a pod-scoped Secret).
    Env,
    /// Placeholders in its environment, the values in the proxy sidecar.
    Secretless(Egress),
}

/// The mode of a sandbox pod in `namespace`: its [`MODE_ANNOTATION`], which a namespace of
/// `--secretless-namespaces` makes mandatory.
pub fn mode(pod: &PodView, namespace: &str, policy: &SecretlessPolicy) -> Result<Mode, String> {
    let annotations = pod.metadata.annotations.as_ref();
    let mandatory = policy.namespaces.contains(namespace);
    let secretless = match annotations
        .and_then(|a| a.get(MODE_ANNOTATION))
        .map(String::as_str)
    {
        None => mandatory,
        Some("secretless") => true,
        Some("env") if mandatory => {
            return Err(format!(
                "namespace {} requires secretless sandboxes: remove {MODE_ANNOTATION}: env",
                quoted(namespace)
            ));
        }
        Some("env") => false,
        Some(other) => {
            return Err(format!(
                "annotation {MODE_ANNOTATION} must be secretless or env, not {}",
                quoted(other)
            ));
        }
    };
    if !secretless {
        return Ok(Mode::Env);
    }
    let egress = match annotations
        .and_then(|a| a.get(EGRESS_ANNOTATION))
        .map(String::as_str)
    {
        None | Some("open") => Egress::Open,
        Some("allowlist") => Egress::Allowlist,
        Some(other) => {
            return Err(format!(
                "annotation {EGRESS_ANNOTATION} must be open or allowlist, not {}",
                quoted(other)
            ));
        }
    };
    Ok(Mode::Secretless(egress))
}

/// What the proxy sidecar of one pod is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidecar {
    pub image: String,
    pub feed_url: String,
    pub feed_ca: Arc<str>,
    pub egress: Egress,
    /// The owner the pod was admitted for. Pinned in the pod spec (which cannot change), so the
    /// feed serves this owner's values even if the pod's owner label is changed later.
    pub owner: String,
}

impl SecretlessPolicy {
    /// The sidecar for a pod of `egress`, or why secretless pods cannot be admitted now.
    pub fn sidecar(&self, egress: Egress, owner: &str) -> Result<Sidecar, String> {
        let not_configured = |what: &str| {
            format!(
                "secretless sandboxes cannot be admitted: {what}; ask the cluster administrator"
            )
        };
        let image = self
            .proxy_image
            .clone()
            .ok_or_else(|| not_configured("no proxy image is configured (--proxy-image)"))?;
        let feed_url = self.feed_url.clone().ok_or_else(|| {
            not_configured("the operator's feed address is not known (--feed-service-host)")
        })?;
        let feed_ca = self.feed_ca.pem().map_err(|e| not_configured(&e))?;
        Ok(Sidecar {
            image,
            feed_url,
            feed_ca,
            egress,
            owner: owner.to_owned(),
        })
    }
}

impl Sidecar {
    /// The sidecar's arguments.
    pub fn args(&self) -> Vec<String> {
        vec![
            "proxy".into(),
            "--listen=127.0.0.1:15080".into(),
            format!("--admin-listen=0.0.0.0:{ADMIN_PORT}"),
            format!("--ca-bundle={CA_BUNDLE}"),
            format!("--feed-url={}", self.feed_url),
            format!("--feed-token-file={FEED_TOKEN_DIR}/token"),
        ]
    }

    fn mounts() -> serde_json::Value {
        serde_json::json!([
            {"name": PROXY_CA_VOLUME, "mountPath": CA_DIR},
            {"name": FEED_TOKEN_VOLUME, "mountPath": FEED_TOKEN_DIR, "readOnly": true},
        ])
    }

    /// The native sidecar (an init container that keeps running) holding `placeholders`.
    pub fn container(&self, placeholders: &BTreeMap<String, String>) -> serde_json::Value {
        let probe = serde_json::json!({"httpGet": {"path": "/readyz", "port": ADMIN_PORT}});
        let mut startup = probe.clone();
        startup["periodSeconds"] = 1.into();
        startup["failureThreshold"] = 60.into();
        let mut readiness = probe;
        readiness["periodSeconds"] = 5.into();
        serde_json::json!({
            "name": PROXY_CONTAINER_NAME,
            "image": self.image,
            "restartPolicy": "Always",
            "args": self.args(),
            "env": [
                {"name": PROXY_PLACEHOLDERS_ENV, "value": placeholders_json(placeholders)},
                {"name": PROXY_FEED_CA_ENV, "value": &*self.feed_ca},
                {"name": PROXY_EGRESS_ENV, "value": self.egress.as_str()},
                {"name": PROXY_OWNER_ENV, "value": self.owner},
            ],
            "startupProbe": startup,
            "readinessProbe": readiness,
            "securityContext": {
                "runAsNonRoot": true,
                "readOnlyRootFilesystem": true,
                "allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "resources": {
                "requests": {"cpu": "10m", "memory": "32Mi"},
                "limits": {"memory": "128Mi"},
            },
            "volumeMounts": Self::mounts(),
        })
    }

    /// The placeholders of `container` if it is this sidecar as an earlier invocation of the
    /// same admission wrote it, else `None`.
    pub fn recognise(&self, container: &ContainerView) -> Option<BTreeMap<String, String>> {
        let same = container.name == PROXY_CONTAINER_NAME
            && container.image.as_deref() == Some(self.image.as_str())
            && container.command.is_none()
            && container.args.as_ref() == Some(&self.args())
            && container.restart_policy.as_deref() == Some("Always")
            && container.env_from.is_none();
        if !same {
            return None;
        }
        let mounts: Vec<(&str, &str, bool, bool)> = container
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| {
                (
                    m.name.as_str(),
                    m.mount_path.as_str(),
                    m.read_only.unwrap_or(false),
                    m.sub_path.as_deref().is_some_and(|p| !p.is_empty()),
                )
            })
            .collect();
        let expected = [
            (PROXY_CA_VOLUME, CA_DIR, false, false),
            (FEED_TOKEN_VOLUME, FEED_TOKEN_DIR, true, false),
        ];
        if mounts != expected {
            return None;
        }
        let env = container.env.as_deref()?;
        let value = |name: &str| {
            let mut entries = env.iter().filter(|e| e.name == name);
            let entry = entries.next()?;
            (entries.next().is_none() && entry.value_from.is_none())
                .then_some(entry.value.as_deref())
                .flatten()
        };
        if env.len() != 4
            || value(PROXY_FEED_CA_ENV) != Some(&*self.feed_ca)
            || value(PROXY_EGRESS_ENV) != Some(self.egress.as_str())
            || value(PROXY_OWNER_ENV) != Some(self.owner.as_str())
        {
            return None;
        }
        let placeholders: BTreeMap<String, String> =
            serde_json::from_str(value(PROXY_PLACEHOLDERS_ENV)?).ok()?;
        let distinct: BTreeSet<&String> = placeholders.values().collect();
        (distinct.len() == placeholders.len() && placeholders.values().all(|p| is_placeholder(p)))
            .then_some(placeholders)
    }
}

/// `{"ENV_NAME": "placeholder"}`, keys sorted.
pub fn placeholders_json(placeholders: &BTreeMap<String, String>) -> String {
    serde_json::to_string(placeholders).unwrap_or_default()
}

/// Whether `text` has the shape of a placeholder the proxy accepts.
pub fn is_placeholder(text: &str) -> bool {
    text.strip_prefix(PLACEHOLDER_PREFIX).is_some_and(|random| {
        random.len() >= PLACEHOLDER_MIN_RANDOM && random.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// Why placeholders could not be made.
#[derive(Debug, thiserror::Error)]
#[error("failed to generate placeholders: the system's random source failed")]
pub struct RandomError;

/// A fresh placeholder: [`PLACEHOLDER_PREFIX`] and 32 letters or digits from the operating
/// system's CSPRNG (about 190 bits).
pub fn placeholder() -> Result<String, RandomError> {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(PLACEHOLDER_PREFIX.len() + PLACEHOLDER_RANDOM_CHARS);
    out.push_str(PLACEHOLDER_PREFIX);
    let mut produced = 0;
    while produced < PLACEHOLDER_RANDOM_CHARS {
        let mut bytes = [0u8; 48];
        getrandom::fill(&mut bytes).map_err(|_| RandomError)?;
        // Bytes of 248 and above are dropped, so every character is equally likely.
        for byte in bytes.into_iter().filter(|b| *b < 248) {
            if produced == PLACEHOLDER_RANDOM_CHARS {
                break;
            }
            out.push(char::from(ALPHABET[usize::from(byte % 62)]));
            produced += 1;
        }
    }
    Ok(out)
}

/// Fresh placeholders for `names`, distinct from each other.
pub fn placeholders_for(names: &[&str]) -> Result<BTreeMap<String, String>, RandomError> {
    let mut placeholders = BTreeMap::new();
    let mut used = BTreeSet::new();
    for name in names {
        let mut candidate = placeholder()?;
        // 190 random bits do not collide; the loop only makes it a guarantee.
        while !used.insert(candidate.clone()) {
            candidate = placeholder()?;
        }
        placeholders.insert((*name).to_owned(), candidate);
    }
    Ok(placeholders)
}

/// Check what the pod holds under names reserved for agent-secrets. `sidecar` is what this
/// pod's proxy would be (`None` when the pod is not secretless). Returns the placeholders of
/// the pod's own sidecar from an earlier invocation, if it has one.
pub fn check_reserved(
    pod: &PodView,
    sidecar: Option<&Sidecar>,
) -> Result<Option<BTreeMap<String, String>>, String> {
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(None);
    };
    let reserved_container = || {
        format!(
            "container {PROXY_CONTAINER_NAME} is reserved for the proxy agent-secrets adds to secretless sandboxes; remove it"
        )
    };
    let init = spec.init_containers.as_deref().unwrap_or_default();
    if spec
        .containers
        .iter()
        .chain(spec.ephemeral_containers.iter().flatten())
        .any(|c| c.name == PROXY_CONTAINER_NAME)
        || init
            .iter()
            .filter(|c| c.name == PROXY_CONTAINER_NAME)
            .count()
            > 1
    {
        return Err(reserved_container());
    }
    let placeholders = match (
        init.iter().find(|c| c.name == PROXY_CONTAINER_NAME),
        sidecar,
    ) {
        (None, _) => None,
        (Some(_), None) => return Err(reserved_container()),
        (Some(existing), Some(sidecar)) => {
            Some(sidecar.recognise(existing).ok_or_else(reserved_container)?)
        }
    };
    let ours = placeholders.is_some();
    let mut found = BTreeSet::new();
    for volume in spec.volumes.iter().flatten() {
        if volume.name.starts_with(RESERVED_VOLUME_PREFIX) {
            let expected = match volume.name.as_str() {
                PROXY_CA_VOLUME => volume.empty_dir.is_some() && volume.projected.is_none(),
                FEED_TOKEN_VOLUME => is_feed_token_volume(volume),
                _ => false,
            };
            if !(ours && expected && found.insert(volume.name.as_str())) {
                return Err(format!(
                    "volume {} uses a name reserved for agent-secrets ({RESERVED_VOLUME_PREFIX}*); rename it",
                    quoted(&volume.name)
                ));
            }
        } else if projects_feed_token(volume) {
            // A pod-bound token for the feed's audience fetches the values from the feed.
            return Err(format!(
                "volume {} projects a service-account token for audience {FEED_AUDIENCE}, which only the agent-secrets proxy may hold",
                quoted(&volume.name)
            ));
        }
    }
    if ours && found.len() != 2 {
        return Err(reserved_container());
    }
    for container in spec
        .containers
        .iter()
        .chain(init.iter().filter(|c| c.name != PROXY_CONTAINER_NAME))
        .chain(spec.ephemeral_containers.iter().flatten())
    {
        for mount in container.volume_mounts.iter().flatten() {
            if !mount.name.starts_with(RESERVED_VOLUME_PREFIX) {
                continue;
            }
            let sandbox_ca = ours
                && mount.name == PROXY_CA_VOLUME
                && mount.mount_path == CA_DIR
                && mount.read_only == Some(true)
                && mount.sub_path.as_deref().is_none_or(str::is_empty);
            if !sandbox_ca {
                return Err(format!(
                    "container {} mounts volume {}, a name reserved for agent-secrets ({RESERVED_VOLUME_PREFIX}*); remove the mount",
                    quoted(&container.name),
                    quoted(&mount.name)
                ));
            }
        }
    }
    Ok(placeholders)
}

fn is_feed_token_volume(volume: &VolumeView) -> bool {
    let sources = volume
        .projected
        .as_ref()
        .and_then(|p| p.sources.as_deref())
        .unwrap_or_default();
    volume.empty_dir.is_none()
        && volume.secret.is_none()
        && matches!(sources, [only] if only.secret.is_none()
        && only.service_account_token.as_ref().is_some_and(|t| {
            t.audience.as_deref() == Some(FEED_AUDIENCE) && t.path == "token"
        }))
}

fn projects_feed_token(volume: &VolumeView) -> bool {
    volume
        .projected
        .iter()
        .flat_map(|p| p.sources.iter().flatten())
        .filter_map(|s| s.service_account_token.as_ref())
        .any(|t| t.audience.as_deref() == Some(FEED_AUDIENCE))
}

/// The env every sandbox container of a secretless pod gets besides its placeholders: the
/// proxy for every client library, and trust in the proxy's CA.
pub const SANDBOX_ENV: &[(&str, &str)] = &[
    ("HTTPS_PROXY", PROXY_URL),
    ("https_proxy", PROXY_URL),
    ("HTTP_PROXY", PROXY_URL),
    ("http_proxy", PROXY_URL),
    ("NO_PROXY", "localhost,127.0.0.1,::1"),
    ("no_proxy", "localhost,127.0.0.1,::1"),
    ("SSL_CERT_FILE", CA_BUNDLE),
    ("REQUESTS_CA_BUNDLE", CA_BUNDLE),
    ("CURL_CA_BUNDLE", CA_BUNDLE),
    ("NODE_EXTRA_CA_CERTS", CA_BUNDLE),
    ("NODE_USE_ENV_PROXY", "1"),
];

/// Writes the secretless part of one pod's injection.
pub struct SecretlessWriter<'a> {
    /// Env name → placeholder, sorted by name.
    pub placeholders: &'a BTreeMap<String, String>,
    /// Whether every container already has an `env` list (the env-mode references of the same
    /// patch create it).
    pub env_created: bool,
}

/// What the writer did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Placed {
    /// Env names some container received a placeholder for.
    pub received: BTreeSet<String>,
    /// `container/NAME` entries the pod spec already set, which win.
    pub skipped: Vec<String>,
}

impl SecretlessWriter<'_> {
    /// Placeholders, proxy env and the CA mount into each container of the pod spec's `field`
    /// (the proxy sidecar of an earlier invocation excepted).
    pub fn containers(
        &self,
        writer: &mut PatchWriter,
        field: &str,
        containers: &[ContainerView],
        placed: &mut Placed,
    ) -> Result<(), String> {
        for (index, container) in containers.iter().enumerate() {
            if container.name == PROXY_CONTAINER_NAME {
                continue;
            }
            self.container(writer, field, index, container, placed)?;
        }
        Ok(())
    }

    fn container(
        &self,
        writer: &mut PatchWriter,
        field: &str,
        index: usize,
        container: &ContainerView,
        placed: &mut Placed,
    ) -> Result<(), String> {
        let i = index.to_string();
        let existing = container.env.as_deref().unwrap_or_default();
        let mut entries: Vec<(&str, &str)> = Vec::new();
        for (name, placeholder) in self.placeholders {
            match existing.iter().find(|e| e.name == *name) {
                None => {
                    entries.push((name, placeholder));
                    placed.received.insert(name.clone());
                }
                // Ours, from an earlier invocation of this admission.
                Some(e) if e.value_from.is_none() && e.value.as_deref() == Some(placeholder) => {
                    placed.received.insert(name.clone());
                }
                Some(_) => placed.skipped.push(format!("{}/{name}", container.name)),
            }
        }
        for (name, value) in SANDBOX_ENV {
            match existing.iter().find(|e| e.name == *name) {
                None => entries.push((name, value)),
                Some(e) if e.value_from.is_none() && e.value.as_deref() == Some(*value) => {}
                Some(_) => {
                    return Err(format!(
                        "container {} sets {name}, which agent-secrets sets in secretless sandboxes so that requests go through its proxy; remove it",
                        quoted(&container.name)
                    ));
                }
            }
        }
        let entry = |buf: &mut Vec<u8>, (name, value): (&str, &str)| {
            buf.extend_from_slice(b"{\"name\":");
            write_str(buf, name);
            buf.extend_from_slice(b",\"value\":");
            write_str(buf, value);
            buf.push(b'}');
        };
        if container.env.is_some() || self.env_created {
            for e in entries {
                writer.op("add", &["spec", field, &i, "env", "-"], |buf| entry(buf, e));
            }
        } else {
            writer.op("add", &["spec", field, &i, "env"], |buf| {
                buf.push(b'[');
                for (n, e) in entries.into_iter().enumerate() {
                    if n > 0 {
                        buf.push(b',');
                    }
                    entry(buf, e);
                }
                buf.push(b']');
            });
        }
        // `check_reserved` admitted an existing mount of the CA only as ours.
        let mounts = container.volume_mounts.as_deref();
        if !mounts
            .unwrap_or_default()
            .iter()
            .any(|m| m.name == PROXY_CA_VOLUME)
        {
            let mount = |buf: &mut Vec<u8>| {
                buf.extend_from_slice(b"{\"name\":");
                write_str(buf, PROXY_CA_VOLUME);
                buf.extend_from_slice(b",\"mountPath\":");
                write_str(buf, CA_DIR);
                buf.extend_from_slice(b",\"readOnly\":true}");
            };
            match mounts {
                Some(_) => writer.op("add", &["spec", field, &i, "volumeMounts", "-"], mount),
                None => writer.op("add", &["spec", field, &i, "volumeMounts"], |buf| {
                    buf.push(b'[');
                    mount(buf);
                    buf.push(b']');
                }),
            }
        }
        Ok(())
    }
}

/// The pod's volumes for the proxy: its CA (memory-backed, small) and its feed token.
pub fn volumes() -> [serde_json::Value; 2] {
    [
        serde_json::json!({"name": PROXY_CA_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}),
        serde_json::json!({"name": FEED_TOKEN_VOLUME, "projected": {"sources": [
            {"serviceAccountToken": {"audience": FEED_AUDIENCE, "expirationSeconds": FEED_TOKEN_SECONDS, "path": "token"}}
        ]}}),
    ]
}

/// Add the volumes and the sidecar (first among the init containers, so it runs before the
/// others). Written after every operation that addresses init containers by index.
pub fn write_sidecar(
    writer: &mut PatchWriter,
    pod: &PodView,
    sidecar: &Sidecar,
    placeholders: &BTreeMap<String, String>,
) {
    let spec = pod.spec.as_ref();
    let to_json = |buf: &mut Vec<u8>, value: &serde_json::Value| {
        // Writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *buf, value);
    };
    let volumes = volumes();
    if spec.and_then(|s| s.volumes.as_ref()).is_some() {
        for volume in &volumes {
            writer.op("add", &["spec", "volumes", "-"], |buf| to_json(buf, volume));
        }
    } else {
        let list = serde_json::Value::from(volumes.to_vec());
        writer.op("add", &["spec", "volumes"], |buf| to_json(buf, &list));
    }
    let container = sidecar.container(placeholders);
    if spec.and_then(|s| s.init_containers.as_ref()).is_some() {
        writer.op("add", &["spec", "initContainers", "0"], |buf| {
            to_json(buf, &container);
        });
    } else {
        let list = serde_json::Value::from(vec![container]);
        writer.op("add", &["spec", "initContainers"], |buf| {
            to_json(buf, &list)
        });
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn every_variable_the_webhook_sets_for_the_proxy_is_a_reserved_env_name() {
        // An AgentSecret of the same name would otherwise give the sandbox two entries.
        for (name, _) in SANDBOX_ENV {
            if name.chars().any(|c| c.is_ascii_lowercase()) {
                continue; // not a valid AgentSecret env name in the first place
            }
            assert!(
                crate::api::RESERVED_ENV_NAMES.contains(name),
                "{name} is not reserved"
            );
        }
    }
    use super::*;
    use serde_json::{Value, json};

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn sidecar() -> Sidecar {
        Sidecar {
            image: "ghcr.io/example/agent-secrets:1.0".into(),
            feed_url: feed_url("agent-secrets.agent-secrets.svc"),
            feed_ca: Arc::from(CA),
            egress: Egress::Open,
            owner: "alice".into(),
        }
    }

    fn pod(value: Value) -> PodView {
        serde_json::from_value(value).unwrap()
    }

    fn labelled(annotations: Value) -> PodView {
        pod(
            json!({"metadata": {"name": "p", "annotations": annotations},
                   "spec": {"containers": [{"name": "c"}]}}),
        )
    }

    fn placeholders() -> BTreeMap<String, String> {
        placeholders_for(&["A_TOKEN", "B_KEY"]).unwrap()
    }

    /// The pod after `patch`.
    fn apply(mut doc: Value, patch: Vec<u8>) -> Value {
        let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
        json_patch::patch(&mut doc, &patch).unwrap();
        doc
    }

    /// The full shape on a pod without env, mounts, volumes or init containers.
    /// The placeholders written into `view`'s regular containers, and where they went.
    fn place(
        view: &PodView,
        placeholders: &BTreeMap<String, String>,
    ) -> Result<(PatchWriter, Placed), String> {
        let mut writer = PatchWriter::default();
        let mut placed = Placed::default();
        SecretlessWriter {
            placeholders,
            env_created: false,
        }
        .containers(
            &mut writer,
            "containers",
            &view.spec.as_ref().unwrap().containers,
            &mut placed,
        )?;
        Ok((writer, placed))
    }

    fn shaped(doc: &Value, placeholders: &BTreeMap<String, String>) -> Value {
        let view = pod(doc.clone());
        let (mut writer, _) = place(&view, placeholders).unwrap();
        write_sidecar(&mut writer, &view, &sidecar(), placeholders);
        apply(doc.clone(), writer.finish())
    }

    #[test]
    fn placeholders_are_random_alphanumeric_and_distinct() {
        let a = placeholder().unwrap();
        assert!(a.starts_with("asec_ph_"), "{a}");
        assert_eq!(a.len(), "asec_ph_".len() + 32);
        assert!(is_placeholder(&a));
        let many = placeholders_for(&["A", "B", "C"]).unwrap();
        let distinct: BTreeSet<&String> = many.values().collect();
        assert_eq!(distinct.len(), 3);
        assert_ne!(placeholder().unwrap(), placeholder().unwrap());
        for bad in [
            "asec_ph_short",
            "asec_ph_0123456789abcdef-",
            "xsec_ph_0123456789abcdefgh",
        ] {
            assert!(!is_placeholder(bad), "{bad}");
        }
    }

    #[test]
    fn the_mode_comes_from_the_annotation_and_is_mandatory_in_secretless_namespaces() {
        let policy = SecretlessPolicy {
            namespaces: NamespaceSet::parse(["locked".to_owned()]),
            ..SecretlessPolicy::default()
        };
        let none = labelled(json!({}));
        assert_eq!(mode(&none, "free", &policy), Ok(Mode::Env));
        assert_eq!(
            mode(&none, "locked", &policy),
            Ok(Mode::Secretless(Egress::Open))
        );
        let secretless =
            labelled(json!({MODE_ANNOTATION: "secretless", EGRESS_ANNOTATION: "allowlist"}));
        assert_eq!(
            mode(&secretless, "free", &policy),
            Ok(Mode::Secretless(Egress::Allowlist))
        );
        let env = labelled(json!({MODE_ANNOTATION: "env"}));
        assert_eq!(mode(&env, "free", &policy), Ok(Mode::Env));
        let refused = mode(&env, "locked", &policy).unwrap_err();
        assert!(refused.contains("requires secretless"), "{refused}");
        let odd = labelled(json!({MODE_ANNOTATION: "Secretless"}));
        assert!(
            mode(&odd, "free", &policy)
                .unwrap_err()
                .contains("must be secretless or env")
        );
        let odd = labelled(json!({MODE_ANNOTATION: "secretless", EGRESS_ANNOTATION: "closed"}));
        assert!(
            mode(&odd, "free", &policy)
                .unwrap_err()
                .contains("must be open or allowlist")
        );
        let all = SecretlessPolicy {
            namespaces: NamespaceSet::parse(["*".to_owned()]),
            ..SecretlessPolicy::default()
        };
        assert_eq!(
            mode(&none, "anything", &all),
            Ok(Mode::Secretless(Egress::Open))
        );
    }

    #[test]
    fn the_sidecar_is_a_restricted_native_sidecar_fed_by_the_operator() {
        let placeholders = placeholders();
        let doc = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "agent"}]}});
        let after = shaped(&doc, &placeholders);
        let proxy = &after["spec"]["initContainers"][0];
        assert_eq!(proxy["name"], PROXY_CONTAINER_NAME);
        assert_eq!(proxy["image"], "ghcr.io/example/agent-secrets:1.0");
        assert_eq!(proxy["restartPolicy"], "Always");
        assert_eq!(
            proxy["args"],
            json!([
                "proxy",
                "--listen=127.0.0.1:15080",
                "--admin-listen=0.0.0.0:15081",
                "--ca-bundle=/var/run/agentsecrets/ca/ca-bundle.pem",
                "--feed-url=https://agent-secrets.agent-secrets.svc:8444/v1/feed",
                "--feed-token-file=/var/run/agentsecrets/feed-token/token"
            ])
        );
        let env: BTreeMap<String, String> = proxy["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_owned(),
                    e["value"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let in_env: BTreeMap<String, String> =
            serde_json::from_str(&env[PROXY_PLACEHOLDERS_ENV]).unwrap();
        assert_eq!(in_env, placeholders);
        assert_eq!(env[PROXY_FEED_CA_ENV], CA);
        assert_eq!(env[PROXY_EGRESS_ENV], "open");
        assert_eq!(env[PROXY_OWNER_ENV], "alice");
        assert_eq!(
            proxy["startupProbe"],
            json!({"httpGet": {"path": "/readyz", "port": 15081}, "periodSeconds": 1, "failureThreshold": 60})
        );
        assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/readyz");
        let security = &proxy["securityContext"];
        assert_eq!(security["runAsNonRoot"], true);
        assert_eq!(security["readOnlyRootFilesystem"], true);
        assert_eq!(security["allowPrivilegeEscalation"], false);
        assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
        assert_eq!(
            proxy["volumeMounts"],
            json!([{"name": "agentsecrets-ca", "mountPath": "/var/run/agentsecrets/ca"},
                   {"name": "agentsecrets-feed-token", "mountPath": "/var/run/agentsecrets/feed-token", "readOnly": true}])
        );
        assert_eq!(
            after["spec"]["volumes"],
            json!([{"name": "agentsecrets-ca", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
                   {"name": "agentsecrets-feed-token", "projected": {"sources": [{"serviceAccountToken":
                       {"audience": "agentsecrets.io/feed", "expirationSeconds": 3600, "path": "token"}}]}}])
        );
    }

    #[test]
    fn sandbox_containers_get_placeholders_proxy_env_and_the_ca_read_only() {
        let placeholders = placeholders();
        let doc = json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "c", "image": "agent"},
            {"name": "d", "env": [{"name": "OTHER", "value": "x"}], "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}});
        let after = shaped(&doc, &placeholders);
        for container in after["spec"]["containers"].as_array().unwrap() {
            let env = container["env"].as_array().unwrap();
            for (name, placeholder) in &placeholders {
                let entry = env.iter().find(|e| e["name"] == name.as_str()).unwrap();
                assert_eq!(
                    entry,
                    &json!({"name": name, "value": placeholder}),
                    "no secretKeyRef"
                );
            }
            for (name, value) in SANDBOX_ENV {
                assert!(
                    env.contains(&json!({"name": name, "value": value})),
                    "{name}"
                );
            }
            assert!(!container.to_string().contains("secretKeyRef"));
            let mounts = container["volumeMounts"].as_array().unwrap();
            assert!(mounts.contains(
                &json!({"name": "agentsecrets-ca", "mountPath": CA_DIR, "readOnly": true})
            ));
            assert!(
                !container.to_string().contains(FEED_TOKEN_VOLUME),
                "the sandbox never mounts the feed token"
            );
        }
        assert_eq!(after["spec"]["containers"][1]["env"][0]["name"], "OTHER");
    }

    #[test]
    fn the_sidecar_goes_first_among_existing_init_containers() {
        let placeholders = placeholders();
        let doc = json!({"metadata": {"name": "p"}, "spec": {
            "initContainers": [{"name": "setup"}], "volumes": [{"name": "data", "emptyDir": {}}],
            "containers": [{"name": "c"}]}});
        let after = shaped(&doc, &placeholders);
        let names: Vec<&str> = after["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, [PROXY_CONTAINER_NAME, "setup"]);
        let volumes: Vec<&str> = after["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(volumes, ["data", PROXY_CA_VOLUME, FEED_TOKEN_VOLUME]);
    }

    #[test]
    fn a_reinvocation_keeps_the_first_placeholders_and_changes_nothing() {
        let placeholders = placeholders();
        let doc = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}});
        let first = shaped(&doc, &placeholders);
        let view = pod(first.clone());
        let kept = check_reserved(&view, Some(&sidecar())).unwrap();
        assert_eq!(kept, Some(placeholders.clone()));
        // The second call writes nothing for what the first wrote.
        let (writer, placed) = place(&view, &placeholders).unwrap();
        assert!(writer.is_empty());
        assert_eq!(placed.received.len(), 2);
        assert!(placed.skipped.is_empty());
    }

    #[test]
    fn a_sidecar_that_is_not_exactly_ours_is_refused() {
        let placeholders = placeholders();
        let doc = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}});
        let first = shaped(&doc, &placeholders);
        let tamper: [(&str, Value); 6] = [
            ("/spec/initContainers/0/image", json!("attacker/image")),
            ("/spec/initContainers/0/command", json!(["/bin/sh"])),
            (
                "/spec/initContainers/0/args/4",
                json!("--feed-url=https://evil.example/v1/feed"),
            ),
            ("/spec/initContainers/0/env/1/value", json!("another CA")),
            (
                "/spec/initContainers/0/env/0/value",
                json!("{\"A_TOKEN\":\"short\"}"),
            ),
            (
                "/spec/volumes/1/projected/sources/0/serviceAccountToken/audience",
                json!("other"),
            ),
        ];
        for (path, value) in tamper {
            let mut doc = first.clone();
            let (parent, key) = path.rsplit_once('/').unwrap();
            match doc.pointer_mut(parent).unwrap() {
                Value::Object(map) => {
                    map.insert(key.to_owned(), value);
                }
                Value::Array(list) => list[key.parse::<usize>().unwrap()] = value,
                _ => unreachable!(),
            }
            let error = check_reserved(&pod(doc), Some(&sidecar())).unwrap_err();
            assert!(error.contains("reserved"), "{path}: {error}");
        }
        // Not secretless now: the sidecar is refused outright.
        let error = check_reserved(&pod(first), None).unwrap_err();
        assert!(error.contains("is reserved for the proxy"), "{error}");
    }

    #[test]
    fn reserved_volumes_mounts_containers_and_feed_tokens_are_refused() {
        for (spec, needle) in [
            (
                json!({"containers": [{"name": "c"}], "volumes": [{"name": "agentsecrets-ca", "emptyDir": {}}]}),
                "volume \"agentsecrets-ca\"",
            ),
            (
                json!({"containers": [{"name": "c"}], "volumes": [{"name": "agentsecrets-x", "emptyDir": {}}]}),
                "volume \"agentsecrets-x\"",
            ),
            (
                json!({"containers": [{"name": "c", "volumeMounts": [{"name": "agentsecrets-feed-token", "mountPath": "/t"}]}]}),
                "mounts volume",
            ),
            (
                json!({"containers": [{"name": PROXY_CONTAINER_NAME}]}),
                "is reserved for the proxy",
            ),
            (
                json!({"containers": [{"name": "c"}], "initContainers": [{"name": PROXY_CONTAINER_NAME}]}),
                "is reserved for the proxy",
            ),
            (
                json!({"containers": [{"name": "c"}], "volumes": [{"name": "mine", "projected": {"sources": [
                {"serviceAccountToken": {"audience": FEED_AUDIENCE, "path": "t"}}]}}]}),
                "audience agentsecrets.io/feed",
            ),
        ] {
            let view = pod(json!({"metadata": {"name": "p"}, "spec": spec}));
            for sidecar in [None, Some(sidecar())] {
                let error = check_reserved(&view, sidecar.as_ref()).unwrap_err();
                assert!(error.contains(needle), "{needle}: {error}");
            }
        }
        let plain = pod(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}],
            "volumes": [{"name": "data", "emptyDir": {}}]}}),
        );
        assert_eq!(check_reserved(&plain, Some(&sidecar())), Ok(None));
    }

    #[test]
    fn a_container_setting_the_proxy_variables_itself_is_refused_and_own_values_win() {
        let placeholders = placeholders();
        let view = pod(
            json!({"spec": {"containers": [{"name": "c", "env": [{"name": "A_TOKEN", "value": "mine"}]}]}}),
        );
        let (_, placed) = place(&view, &placeholders).unwrap();
        assert_eq!(placed.skipped, ["c/A_TOKEN"]);
        assert!(placed.received.contains("B_KEY") && !placed.received.contains("A_TOKEN"));
        let view = pod(
            json!({"spec": {"containers": [{"name": "c", "env": [{"name": "HTTPS_PROXY", "value": "http://elsewhere"}]}]}}),
        );
        let Err(error) = place(&view, &placeholders) else {
            panic!("refused");
        };
        assert!(error.contains("sets HTTPS_PROXY"), "{error}");
    }

    #[test]
    fn the_feed_url_gets_the_default_port_unless_one_is_given() {
        assert_eq!(feed_url("feed.ns.svc"), "https://feed.ns.svc:8444/v1/feed");
        assert_eq!(
            feed_url("feed.ns.svc:9443"),
            "https://feed.ns.svc:9443/v1/feed"
        );
    }

    #[test]
    fn the_feed_ca_is_read_again_when_its_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.crt");
        let ca = FeedCa::file(path.clone());
        assert!(ca.pem().unwrap_err().contains("cannot be read"));
        std::fs::write(&path, CA).unwrap();
        assert_eq!(&*ca.pem().unwrap(), CA);
        let rotated = format!("{CA}{CA}");
        std::fs::write(&path, &rotated).unwrap();
        assert_eq!(&*ca.pem().unwrap(), rotated);
        std::fs::write(&path, "not a certificate").unwrap();
        assert!(ca.pem().unwrap_err().contains("no PEM certificate"));
        let policy = SecretlessPolicy {
            proxy_image: Some("img".into()),
            feed_url: Some(feed_url("f")),
            feed_ca: ca,
            ..SecretlessPolicy::default()
        };
        let error = policy.sidecar(Egress::Open, "alice").unwrap_err();
        assert!(
            error.contains("secretless sandboxes cannot be admitted"),
            "{error}"
        );
    }
}
