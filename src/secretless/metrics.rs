//! The proxy's Prometheus metrics. Labels are fixed vocabularies: never a secret's name, a
//! host, or a value (a host an agent chose would make the label set unbounded).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// Counters of the egress proxy.
pub struct ProxyMetrics {
    registry: Registry,
    /// Requests seen, by kind: `connect`, `tunnelled`, `http`.
    pub requests: Family<KindLabels, Counter>,
    /// Requests refused, by reason.
    pub refused: Family<ReasonLabels, Counter>,
    /// Placeholders replaced by their values (one per secret per request).
    pub substitutions: Counter,
    /// Response bodies passed through the value masker.
    pub masked_bodies: Counter,
    /// Upstream connections or requests that failed.
    pub upstream_errors: Counter,
}

impl std::fmt::Debug for ProxyMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProxyMetrics")
    }
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("agentsecrets_proxy");
        let requests = Family::<KindLabels, Counter>::default();
        let refused = Family::<ReasonLabels, Counter>::default();
        let substitutions = Counter::default();
        let masked_bodies = Counter::default();
        let upstream_errors = Counter::default();
        registry.register("requests", "Requests seen by the proxy", requests.clone());
        registry.register(
            "refused",
            "Requests refused (placeholder towards a host or place not allowed, egress allow-list, no configuration)",
            refused.clone(),
        );
        registry.register(
            "substitutions",
            "Placeholders replaced by their values",
            substitutions.clone(),
        );
        registry.register(
            "masked_bodies",
            "Response bodies scanned for echoed values",
            masked_bodies.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream connections or requests that failed",
            upstream_errors.clone(),
        );
        Self {
            registry,
            requests,
            refused,
            substitutions,
            masked_bodies,
            upstream_errors,
        }
    }
}

impl ProxyMetrics {
    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// How many requests were refused for `reason` (a [`super::policy::RefusalReason::label`]).
    pub fn refused_count(&self, reason: &'static str) -> u64 {
        self.refused.get_or_create(&ReasonLabels { reason }).get()
    }
}
