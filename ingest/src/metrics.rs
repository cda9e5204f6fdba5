//! Per-channel counters and the publish-latency histogram, rendered at `/metrics` in the
//! Prometheus text format. One mutex around small maps: a handful of increments per request is
//! far below what the mutex can take, and it keeps labels and rendering in one place.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the publish-latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Default)]
struct ChannelMetrics {
    received: u64,
    accepted: u64,
    duplicates: u64,
    rejected_by_reason: BTreeMap<&'static str, u64>,
    latency_bucket_counts: [u64; LATENCY_BUCKETS.len()],
    latency_sum_seconds: f64,
    latency_count: u64,
}

#[derive(Default)]
pub struct Metrics {
    by_channel_type: Mutex<BTreeMap<&'static str, ChannelMetrics>>,
    /// Chat widget answers by (state, capacity).
    widget_answers: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl Metrics {
    fn with(&self, channel_type: &'static str, update: impl FnOnce(&mut ChannelMetrics)) {
        let mut by_channel_type = self.by_channel_type.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        update(by_channel_type.entry(channel_type).or_default());
    }

    /// A request (HTTP) or message (SMTP) arrived for this channel type.
    pub fn received(&self, channel_type: &'static str) {
        self.with(channel_type, |metrics| metrics.received += 1);
    }

    /// `count` events were acknowledged by Kafka.
    pub fn accepted(&self, channel_type: &'static str, count: u64) {
        self.with(channel_type, |metrics| metrics.accepted += count);
    }

    /// `count` events were recognised as recently published and not published again.
    pub fn duplicates(&self, channel_type: &'static str, count: u64) {
        self.with(channel_type, |metrics| metrics.duplicates += count);
    }

    pub fn rejected(&self, channel_type: &'static str, reason: &'static str) {
        self.with(channel_type, |metrics| *metrics.rejected_by_reason.entry(reason).or_default() += 1);
    }

    /// Time from handing an event to the producer until Kafka acknowledged it.
    pub fn publish_latency(&self, channel_type: &'static str, latency: Duration) {
        let seconds = latency.as_secs_f64();
        self.with(channel_type, |metrics| {
            for (bucket, upper_bound) in metrics.latency_bucket_counts.iter_mut().zip(LATENCY_BUCKETS) {
                if seconds <= upper_bound {
                    *bucket += 1;
                }
            }
            metrics.latency_sum_seconds += seconds;
            metrics.latency_count += 1;
        });
    }

    /// The chat widget endpoint answered `state` knowing `capacity` (C5).
    pub fn widget_answer(&self, state: &'static str, capacity: &'static str) {
        let mut widget_answers = self.widget_answers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *widget_answers.entry((state, capacity)).or_default() += 1;
    }

    pub fn render(&self) -> String {
        let by_channel_type = self.by_channel_type.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value_of: &dyn Fn(&ChannelMetrics) -> u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (channel_type, metrics) in by_channel_type.iter() {
                let _ = writeln!(out, "{name}{{channel_type=\"{channel_type}\"}} {}", value_of(metrics));
            }
        };
        counter("switchboard_ingest_received_total", "Requests or mails received.", &|m| m.received);
        counter("switchboard_ingest_accepted_total", "Events acknowledged by Kafka.", &|m| m.accepted);
        counter("switchboard_ingest_duplicates_total", "Events skipped as recently published (B1).", &|m| m.duplicates);
        let _ = writeln!(
            out,
            "# HELP switchboard_ingest_rejected_total Requests rejected, by reason.\n# TYPE switchboard_ingest_rejected_total counter"
        );
        for (channel_type, metrics) in by_channel_type.iter() {
            for (reason, count) in &metrics.rejected_by_reason {
                let _ = writeln!(
                    out,
                    "switchboard_ingest_rejected_total{{channel_type=\"{channel_type}\",reason=\"{reason}\"}} {count}"
                );
            }
        }
        let name = "switchboard_ingest_publish_latency_seconds";
        let _ = writeln!(out, "# HELP {name} Time until Kafka acknowledged an event.\n# TYPE {name} histogram");
        for (channel_type, metrics) in by_channel_type.iter() {
            for (count, upper_bound) in metrics.latency_bucket_counts.iter().zip(LATENCY_BUCKETS) {
                let _ = writeln!(out, "{name}_bucket{{channel_type=\"{channel_type}\",le=\"{upper_bound}\"}} {count}");
            }
            let _ =
                writeln!(out, "{name}_bucket{{channel_type=\"{channel_type}\",le=\"+Inf\"}} {}", metrics.latency_count);
            let _ = writeln!(out, "{name}_sum{{channel_type=\"{channel_type}\"}} {}", metrics.latency_sum_seconds);
            let _ = writeln!(out, "{name}_count{{channel_type=\"{channel_type}\"}} {}", metrics.latency_count);
        }
        drop(by_channel_type);
        let widget_answers = self.widget_answers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let name = "switchboard_ingest_widget_answers_total";
        let _ = writeln!(
            out,
            "# HELP {name} Chat widget answers, by state shown and what was known about capacity.\n# TYPE {name} counter"
        );
        for ((state, capacity), count) in widget_answers.iter() {
            let _ = writeln!(out, "{name}{{state=\"{state}\",capacity=\"{capacity}\"}} {count}");
        }
        out
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
        assert!(text.contains("switchboard_ingest_accepted_total{channel_type=\"whatsapp\"} 2"));
        assert!(text.contains("switchboard_ingest_duplicates_total{channel_type=\"whatsapp\"} 1"));
        assert!(text.contains("reason=\"signature_mismatch\"} 1"));
        assert!(text.contains("le=\"0.0025\"} 0"));
        assert!(text.contains("le=\"0.005\"} 1"));
        assert!(text.contains("switchboard_ingest_publish_latency_seconds_count{channel_type=\"whatsapp\"} 1"));
        assert!(
            text.contains("switchboard_ingest_widget_answers_total{state=\"at_capacity\",capacity=\"at_capacity\"} 1")
        );
        assert!(text.contains("switchboard_ingest_widget_answers_total{state=\"available\",capacity=\"unknown\"} 2"));
    }
}
