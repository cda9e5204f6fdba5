//! What every service's metrics share: a prometheus-client registry under the one
//! `switchboard_` prefix, the duration buckets, and the text every `/metrics` answers with.
//!
//! Each service keeps its metrics in a struct of prometheus-client counters, gauges and
//! histograms registered in a registry from [`new_registry`]; [`render`] turns it into the
//! Prometheus text format (0.0.4), with label values escaped by the encoder.

use prometheus_client::registry::Registry;

/// `Content-Type` of what [`render`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds (seconds) of every duration histogram: a Kafka acknowledgement takes a few
/// milliseconds, a large batch or a broker hiccup seconds.
pub const SECONDS_BUCKETS: [f64; 13] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A registry whose metrics are named `switchboard_<service>_...`: `service` is the part after
/// the common prefix (`router`). Help texts are registered without a final full stop: the
/// registry adds one.
pub fn new_registry(service: &str) -> Registry {
    Registry::with_prefix(format!("switchboard_{service}"))
}

/// A histogram of durations in seconds, with [`SECONDS_BUCKETS`].
pub fn seconds_histogram() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new(SECONDS_BUCKETS)
}

/// Everything in `registry`, in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, registry).expect("writing to a String cannot fail");
    text
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;

    use super::*;

    #[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Labels {
        reason: String,
    }

    #[test]
    fn metrics_are_prefixed_and_label_values_escaped() {
        let mut registry = new_registry("test");
        let counter = Counter::<u64>::default();
        registry.register("things", "Things seen", counter.clone());
        let by_reason = Family::<Labels, Counter>::default();
        registry.register("refusals", "Refusals by reason", by_reason.clone());
        let histogram = seconds_histogram();
        registry.register("wait_seconds", "Waits", histogram.clone());
        counter.inc_by(3);
        by_reason.get_or_create(&Labels { reason: "say \"no\"\\\n".into() }).inc();
        histogram.observe(0.003);
        let text = render(&registry);
        assert!(
            text.contains(
                "# HELP switchboard_test_things_total Things seen.\n\
                 # TYPE switchboard_test_things_total counter\n\
                 switchboard_test_things_total 3\n"
            ),
            "{text}"
        );
        assert!(text.contains("switchboard_test_refusals_total{reason=\"say \\\"no\\\"\\\\\\n\"} 1\n"), "{text}");
        assert!(text.contains("switchboard_test_wait_seconds_bucket{le=\"0.0025\"} 0\n"), "{text}");
        assert!(text.contains("switchboard_test_wait_seconds_bucket{le=\"0.005\"} 1\n"), "{text}");
        assert!(text.contains("switchboard_test_wait_seconds_count 1\n"), "{text}");
    }
}
