//! What the delivery service reports on `/metrics`: sends by channel type and outcome, the
//! duration of attempts, the outbox's depth and how long messages waited before intake.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use switchboard_runtime::metrics;

pub struct Metrics {
    registry: Registry,
    attempts: Family<SendLabels, Counter>,
    attempt_seconds: Histogram,
    queue_depth: Gauge,
    intake_lag_seconds: Histogram,
    intake_records: Counter,
    resent_after_crash: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SendLabels {
    channel_type: String,
    /// sent | retry | failed
    outcome: String,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = metrics::new_registry("delivery");
        let attempts = Family::<SendLabels, Counter>::default();
        registry.register(
            "attempts",
            "Send attempts by channel type and outcome (sent, retry, failed)",
            attempts.clone(),
        );
        let attempt_seconds = metrics::seconds_histogram();
        registry.register(
            "attempt_seconds",
            "Duration of one send attempt, from the rate limiter to the provider's answer",
            attempt_seconds.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register("queue_depth", "Messages in the outbox not yet sent or failed", queue_depth.clone());
        let intake_lag_seconds = metrics::seconds_histogram();
        registry.register(
            "intake_lag_seconds",
            "Time from a message's record on outbound.v1 to its row in the outbox",
            intake_lag_seconds.clone(),
        );
        let intake_records = Counter::default();
        registry.register(
            "intake_records",
            "OutboundMessageQueued records taken into the outbox",
            intake_records.clone(),
        );
        let resent_after_crash = Counter::default();
        registry.register(
            "resent_after_crash",
            "Attempts found in flight after a crash or reassignment and sent again with the same key",
            resent_after_crash.clone(),
        );
        Metrics {
            registry,
            attempts,
            attempt_seconds,
            queue_depth,
            intake_lag_seconds,
            intake_records,
            resent_after_crash,
        }
    }
}

impl Metrics {
    pub fn attempt(&self, channel_type: &str, outcome: &str, seconds: f64) {
        self.attempts.get_or_create(&SendLabels { channel_type: channel_type.into(), outcome: outcome.into() }).inc();
        self.attempt_seconds.observe(seconds);
    }

    pub fn queue_depth(&self, depth: i64) {
        self.queue_depth.set(depth);
    }

    pub fn intake(&self, records: u64, lag_seconds: impl IntoIterator<Item = f64>) {
        self.intake_records.inc_by(records);
        for lag in lag_seconds {
            self.intake_lag_seconds.observe(lag);
        }
    }

    pub fn resent_after_crash(&self, count: u64) {
        self.resent_after_crash.inc_by(count);
    }

    pub fn render_prometheus(&self) -> String {
        metrics::render(&self.registry)
    }
}
