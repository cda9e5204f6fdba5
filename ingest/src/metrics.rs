//! Per-channel counters, the publish-latency histogram and the chat widget's answers, rendered
//! at `/metrics` (with the workload figures, see `workload.rs`). Label values are static
//! strings: counting a request allocates nothing.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use switchboard_runtime::metrics;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabels {
    channel_type: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectionLabels {
    channel_type: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WidgetAnswerLabels {
    state: &'static str,
    capacity: &'static str,
}

pub struct Metrics {
    registry: Registry,
    received: Family<ChannelLabels, Counter>,
    accepted: Family<ChannelLabels, Counter>,
    duplicates: Family<ChannelLabels, Counter>,
    rejected: Family<RejectionLabels, Counter>,
    publish_latency: Family<ChannelLabels, Histogram>,
    /// Chat widget answers by (state, capacity).
    widget_answers: Family<WidgetAnswerLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = metrics::new_registry("ingest");
        let received = Family::default();
        registry.register("received", "Requests or mails received", received.clone());
        let accepted = Family::default();
        registry.register("accepted", "Events acknowledged by Kafka", accepted.clone());
        let duplicates = Family::default();
        registry.register("duplicates", "Events skipped as recently published (B1)", duplicates.clone());
        let rejected = Family::default();
        registry.register("rejected", "Requests rejected, by reason", rejected.clone());
        let publish_latency = Family::new_with_constructor(metrics::seconds_histogram as fn() -> Histogram);
        registry.register("publish_latency_seconds", "Time until Kafka acknowledged an event", publish_latency.clone());
        let widget_answers = Family::default();
        registry.register(
            "widget_answers",
            "Chat widget answers, by state shown and what was known about capacity",
            widget_answers.clone(),
        );
        Metrics { registry, received, accepted, duplicates, rejected, publish_latency, widget_answers }
    }
}

impl Metrics {
    /// A request (HTTP) or message (SMTP) arrived for this channel type.
    pub fn received(&self, channel_type: &'static str) {
        self.received.get_or_create(&ChannelLabels { channel_type }).inc();
    }

    /// `count` events were acknowledged by Kafka.
    pub fn accepted(&self, channel_type: &'static str, count: u64) {
        self.accepted.get_or_create(&ChannelLabels { channel_type }).inc_by(count);
    }

    /// `count` events were recognised as recently published and not published again.
    pub fn duplicates(&self, channel_type: &'static str, count: u64) {
        self.duplicates.get_or_create(&ChannelLabels { channel_type }).inc_by(count);
    }

    pub fn rejected(&self, channel_type: &'static str, reason: &'static str) {
        self.rejected.get_or_create(&RejectionLabels { channel_type, reason }).inc();
    }

    /// Time from handing an event to the producer until Kafka acknowledged it.
    pub fn publish_latency(&self, channel_type: &'static str, latency: Duration) {
        self.publish_latency.get_or_create(&ChannelLabels { channel_type }).observe(latency.as_secs_f64());
    }

    /// The chat widget endpoint answered `state` knowing `capacity` (C5).
    pub fn widget_answer(&self, state: &'static str, capacity: &'static str) {
        self.widget_answers.get_or_create(&WidgetAnswerLabels { state, capacity }).inc();
    }

    pub fn render(&self) -> String {
        metrics::render(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_histogram_render_per_channel_type() {
        let metrics = Metrics::default();
        metrics.received("whatsapp");
        metrics.accepted("whatsapp", 2);
        metrics.duplicates("whatsapp", 1);
        metrics.rejected("whatsapp", "signature_mismatch");
        metrics.publish_latency("whatsapp", Duration::from_millis(3));
        metrics.widget_answer("at_capacity", "at_capacity");
        metrics.widget_answer("available", "unknown");
        metrics.widget_answer("available", "unknown");
        let text = metrics.render();
        assert!(text.contains("switchboard_ingest_received_total{channel_type=\"whatsapp\"} 1"));
        assert!(text.contains("switchboard_ingest_accepted_total{channel_type=\"whatsapp\"} 2"));
        assert!(text.contains("switchboard_ingest_duplicates_total{channel_type=\"whatsapp\"} 1"));
        assert!(
            text.contains(
                "switchboard_ingest_rejected_total{channel_type=\"whatsapp\",reason=\"signature_mismatch\"} 1"
            )
        );
        assert!(text.contains("le=\"0.0025\"} 0"));
        assert!(text.contains("le=\"0.005\"} 1"));
        assert!(text.contains("switchboard_ingest_publish_latency_seconds_count{channel_type=\"whatsapp\"} 1"));
        assert!(
            text.contains("switchboard_ingest_widget_answers_total{state=\"at_capacity\",capacity=\"at_capacity\"} 1")
        );
        assert!(text.contains("switchboard_ingest_widget_answers_total{state=\"available\",capacity=\"unknown\"} 2"));
    }
}
