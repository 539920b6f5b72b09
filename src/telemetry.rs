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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    /// The AgentSecret API version this build serves (`agentsecrets.io/v1alpha1`).
    pub api_version: String,
}

fn reconcile_histogram() -> Histogram {
    // 1 ms .. ~33 s: a reconcile is one to three API round trips, slower under API throttling.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 16,
    ))
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
    pub build_info: Family<BuildLabels, Gauge>,
    /// 1 while this replica holds the leader Lease (and so reconciles), else 0.
    pub leader: Gauge,
    pub reconcile_duration: Family<KindLabels, Histogram, fn() -> Histogram>,
    pub keyring_reload_failures: Counter,
    pub tls_reload_failures: Counter,
    /// The serving certificate's notAfter, in seconds since the epoch (0 until one is loaded).
    pub tls_not_after: Gauge,
    /// Value feed requests by result: `opened`, `unauthenticated`, `forbidden`, `unavailable`.
    pub feed_requests: Family<ResultLabels, Counter>,
    /// Value feed streams open on this replica (one per running secretless sandbox it serves).
    pub feed_streams: Gauge,
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
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                api_version: <crate::api::AgentSecret as kube::Resource>::api_version(&())
                    .into_owned(),
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the labels say which build of agent-secrets runs",
            build_info.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 on the replica holding the leader Lease (it alone reconciles and reports controller-wide gauges), else 0",
            leader.clone(),
        );
        let reconcile_duration =
            Family::<KindLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                reconcile_histogram,
            );
        registry.register(
            "reconcile_duration_seconds",
            "Time a controller reconcile takes, by the kind reconciled (AgentSecret, Secret)",
            reconcile_duration.clone(),
        );
        let keyring_reload_failures = Counter::default();
        registry.register(
            "keyring_reload_failures",
            "Keyring file checks that failed: the file unreadable once a keyring is loaded (counted on each check) or a new content invalid (counted once); the last good keyring stays in force",
            keyring_reload_failures.clone(),
        );
        let tls_reload_failures = Counter::default();
        registry.register(
            "tls_reload_failures",
            "Changed webhook certificate files that could not be loaded (counted once per content, or once per spell of unreadable files); the last good certificate is still served",
            tls_reload_failures.clone(),
        );
        let tls_not_after = Gauge::default();
        registry.register_with_unit(
            "tls_certificate_not_after",
            "When the webhook's serving certificate in force expires (notAfter), since the epoch; 0 until one is loaded",
            prometheus_client::registry::Unit::Seconds,
            tls_not_after.clone(),
        );
        let feed_requests = Family::<ResultLabels, Counter>::default();
        registry.register(
            "feed_requests",
            "Value feed requests of secretless proxies, by result (opened, unauthenticated, forbidden, unavailable)",
            feed_requests.clone(),
        );
        let feed_streams = Gauge::default();
        registry.register(
            "feed_streams",
            "Value feed streams open on this replica",
            feed_streams.clone(),
        );
        Self {
            registry,
            feed_requests,
            feed_streams,
            admission_requests,
            admission_duration,
            injected_secrets,
            pod_secrets_created,
            keyring_keys,
            agentsecrets_by_key,
            reconciliations,
            rewraps,
            build_info,
            leader,
            reconcile_duration,
            keyring_reload_failures,
            tls_reload_failures,
            tls_not_after,
        }
    }
}

impl Metrics {
    /// Set the AgentSecrets-per-key gauge from `counts` on the leader only: every replica
    /// caches every AgentSecret, and a sum over replicas must not multiply the count by the
    /// replica count. A follower exports no series of it (and counts nothing).
    pub fn set_key_usage<I>(&self, counts: impl FnOnce() -> I)
    where
        I: IntoIterator<Item = (String, usize)>,
    {
        self.agentsecrets_by_key.clear();
        if self.leader.get() != 1 {
            return;
        }
        for (key_id, count) in counts() {
            self.agentsecrets_by_key
                .get_or_create(&KeyLabels { key_id })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The samples (not the HELP/TYPE lines) of `name` in the exposition, sorted (a family's
    /// series come in no particular order).
    fn samples(metrics: &Metrics, name: &str) -> Vec<String> {
        let mut samples: Vec<String> = metrics
            .encode()
            .lines()
            .filter(|line| {
                !line.starts_with('#')
                    && line
                        .strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .map(str::to_owned)
            .collect();
        samples.sort();
        samples
    }

    #[test]
    fn build_info_is_one_labelled_with_the_crate_version_and_the_api_version() {
        let metrics = Metrics::default();
        assert_eq!(
            samples(&metrics, "agentsecrets_build_info"),
            [format!(
                "agentsecrets_build_info{{version=\"{}\",api_version=\"agentsecrets.io/v1alpha1\"}} 1",
                env!("CARGO_PKG_VERSION")
            )]
        );
    }

    #[test]
    fn key_usage_is_exported_by_the_leader_only() {
        let metrics = Metrics::default();
        let counts = || [("k1".to_owned(), 3), ("k2".to_owned(), 5)];
        metrics.set_key_usage(counts);
        assert_eq!(
            samples(&metrics, "agentsecrets_agentsecrets"),
            Vec::<String>::new(),
            "a follower exports no series"
        );

        metrics.leader.set(1);
        metrics.set_key_usage(counts);
        assert_eq!(
            samples(&metrics, "agentsecrets_agentsecrets"),
            [
                "agentsecrets_agentsecrets{key_id=\"k1\"} 3",
                "agentsecrets_agentsecrets{key_id=\"k2\"} 5"
            ]
            .map(str::to_owned)
            .to_vec()
        );

        // Leadership lost: the series go at the next scrape, and a key no longer used goes too.
        metrics.set_key_usage(|| [("k2".to_owned(), 8)]);
        assert_eq!(
            samples(&metrics, "agentsecrets_agentsecrets"),
            ["agentsecrets_agentsecrets{key_id=\"k2\"} 8".to_owned()]
        );
        metrics.leader.set(0);
        metrics.set_key_usage(counts);
        assert!(samples(&metrics, "agentsecrets_agentsecrets").is_empty());
        metrics.set_key_usage(|| -> Vec<(String, usize)> {
            panic!("a follower does not count AgentSecrets")
        });
    }

    #[test]
    fn the_new_metrics_start_at_zero() {
        let metrics = Metrics::default();
        for name in [
            "agentsecrets_leader",
            "agentsecrets_keyring_reload_failures_total",
            "agentsecrets_tls_reload_failures_total",
            "agentsecrets_tls_certificate_not_after_seconds",
        ] {
            assert_eq!(samples(&metrics, name), [format!("{name} 0")], "{name}");
        }
    }
}
