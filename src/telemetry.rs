//! Logging and Prometheus metrics. Labels are fixed vocabularies (kind, operation, decision,
//! key id): never values, names of secrets, or a pod's labels.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// Install the global tracing subscriber (`RUST_LOG` sets levels, default `info`).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    pub kind: &'static str,
    pub operation: &'static str,
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    pub key_id: String,
}

fn latency_histogram() -> Histogram {
    // 25 µs .. ~1.6 s: admission itself is sub-millisecond; Secret creation adds a round trip.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_025, 2.0, 17,
    ))
}

/// Every metric the process exports.
pub struct Metrics {
    registry: Registry,
    pub admission_requests: Family<AdmissionLabels, Counter>,
    pub admission_duration: Family<KindLabels, Histogram, fn() -> Histogram>,
    pub injected_secrets: Counter,
    pub pod_secrets_created: Family<ResultLabels, Counter>,
    pub keyring_keys: Gauge,
    pub agentsecrets_by_key: Family<KeyLabels, Gauge>,
    pub reconciliations: Family<ResultLabels, Counter>,
    pub rewraps: Family<ResultLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("agentsecrets");
        let admission_requests = Family::<AdmissionLabels, Counter>::default();
        registry.register(
            "admission_requests",
            "Admission reviews answered, by kind, operation and decision",
            admission_requests.clone(),
        );
        let admission_duration =
            Family::<KindLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "admission_duration_seconds",
            "Time to answer an admission review, including pod-scoped Secret creation",
            admission_duration.clone(),
        );
        let injected_secrets = Counter::default();
        registry.register(
            "injected_secrets",
            "Secrets injected into sandbox pods (one per env name per pod)",
            injected_secrets.clone(),
        );
        let pod_secrets_created = Family::<ResultLabels, Counter>::default();
        registry.register(
            "pod_secrets_created",
            "Pod-scoped Secrets at admission, by result: created, reused (a reinvoked admission), failed, limited (too many wait for their pods)",
            pod_secrets_created.clone(),
        );
        let keyring_keys = Gauge::default();
        registry.register(
            "keyring_keys",
            "Keys in the loaded keyring (0 when none is loaded)",
            keyring_keys.clone(),
        );
        let agentsecrets_by_key = Family::<KeyLabels, Gauge>::default();
        registry.register(
            "agentsecrets",
            "AgentSecrets by the key-encryption key their data key is wrapped under",
            agentsecrets_by_key.clone(),
        );
        let reconciliations = Family::<ResultLabels, Counter>::default();
        registry.register(
            "reconciliations",
            "Controller reconciliations, by result",
            reconciliations.clone(),
        );
        let rewraps = Family::<ResultLabels, Counter>::default();
        registry.register(
            "rewraps",
            "Data keys re-wrapped under the primary key-encryption key, by result",
            rewraps.clone(),
        );
        Self {
            registry,
            admission_requests,
            admission_duration,
            injected_secrets,
            pod_secrets_created,
            keyring_keys,
            agentsecrets_by_key,
            reconciliations,
            rewraps,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
