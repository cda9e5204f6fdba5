//! What the router reports about itself on `/metrics`: throughput, committed and aborted
//! transactions, dead letters, snapshots, state recoveries, batch durations, and per input
//! partition the lag and the open conversations in state.
//!
//! Counters of routed work move only when the transaction holding that work commits, so an
//! aborted and re-routed batch is counted once, like its output. They move once per batch,
//! never per record.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use switchboard_runtime::metrics;

pub struct RouterMetrics {
    registry: Registry,
    inputs_routed: Counter,
    events_produced: Counter,
    dead_lettered: Counter,
    snapshots_written: Counter,
    transactions_committed: Counter,
    transactions_aborted: Counter,
    consecutive_aborts: Gauge,
    partitions_recovered: Counter,
    recovery_seconds: Counter<f64, AtomicU64>,
    rebalances: Counter,
    last_batch_records: Gauge,
    batch_seconds: Histogram,
    partition_lag: Family<PartitionLabels, Gauge>,
    partition_open_conversations: Family<PartitionLabels, Gauge>,
    partitions: Mutex<BTreeMap<i32, PartitionFigures>>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    partition: i32,
}

/// What is known about one input partition this instance routes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionFigures {
    /// Committed inbound records not yet handed to the router (librdkafka's statistics: last
    /// stable offset minus the next offset to route).
    pub lag_opt: Option<i64>,
    pub open_conversations_opt: Option<u64>,
}

/// What one batch did, counted when its transaction commits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchFigures {
    pub inputs: u64,
    pub events: u64,
    pub dead_lettered: u64,
    pub snapshots: u64,
}

impl Default for RouterMetrics {
    fn default() -> Self {
        let mut registry = metrics::new_registry("router");
        let mut counter = |name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let inputs_routed = counter("inputs_routed", "Inbound records routed (committed)");
        let events_produced = counter("events_produced", "Decision events written (committed)");
        let dead_lettered = counter("dead_lettered", "Inbound records sent to the dead-letter topic (committed)");
        let snapshots_written = counter("snapshots_written", "State snapshots written (committed)");
        let transactions_committed = counter("transactions_committed", "Transactions committed");
        let transactions_aborted =
            counter("transactions_aborted", "Transactions aborted and rewound to the last committed offsets");
        let partitions_recovered = counter("partitions_recovered", "Partition states recovered (snapshot + tail)");
        let rebalances = counter("rebalances", "Partition assignments and revocations");
        let recovery_seconds = Counter::<f64, AtomicU64>::default();
        registry.register(
            "recovery_seconds",
            "Time routing waited for partition state recoveries",
            recovery_seconds.clone(),
        );
        let consecutive_aborts = Gauge::default();
        registry.register(
            "consecutive_aborts",
            "Transactions aborted in a row since the last commit (an output the broker keeps refusing shows here)",
            consecutive_aborts.clone(),
        );
        let last_batch_records = Gauge::default();
        registry.register(
            "last_batch_records",
            "Inbound records in the last committed batch",
            last_batch_records.clone(),
        );
        let batch_seconds = metrics::seconds_histogram();
        registry.register("batch_seconds", "Poll to commit of each committed batch", batch_seconds.clone());
        let partition_lag = Family::default();
        registry.register(
            "partition_lag",
            "Committed inbound records not yet routed, per input partition",
            partition_lag.clone(),
        );
        let partition_open_conversations = Family::default();
        registry.register(
            "open_conversations",
            "Open conversations in the routing state, per input partition",
            partition_open_conversations.clone(),
        );
        RouterMetrics {
            registry,
            inputs_routed,
            events_produced,
            dead_lettered,
            snapshots_written,
            transactions_committed,
            transactions_aborted,
            consecutive_aborts,
            partitions_recovered,
            recovery_seconds,
            rebalances,
            last_batch_records,
            batch_seconds,
            partition_lag,
            partition_open_conversations,
            partitions: Mutex::default(),
        }
    }
}

impl RouterMetrics {
    pub fn batch_committed(&self, batch: &BatchFigures, took: Duration) {
        self.inputs_routed.inc_by(batch.inputs);
        self.events_produced.inc_by(batch.events);
        self.dead_lettered.inc_by(batch.dead_lettered);
        self.snapshots_written.inc_by(batch.snapshots);
        self.transactions_committed.inc();
        self.consecutive_aborts.set(0);
        self.last_batch_records.set(i64::try_from(batch.inputs).unwrap_or(i64::MAX));
        self.batch_seconds.observe(took.as_secs_f64());
    }

    pub fn transaction_aborted(&self, consecutive_aborts: u32) {
        self.transactions_aborted.inc();
        self.consecutive_aborts.set(i64::from(consecutive_aborts));
    }

    /// `count` partition states were recovered side by side while routing waited `took`.
    pub fn partitions_recovered(&self, count: usize, took: Duration) {
        self.partitions_recovered.inc_by(count as u64);
        self.recovery_seconds.inc_by(took.as_secs_f64());
    }

    /// Partitions taken away: their figures are another instance's now.
    pub fn partitions_revoked(&self, partitions: &[i32]) {
        self.rebalances.inc();
        let mut figures = self.partitions.lock().expect("metrics lock poisoned");
        for partition in partitions {
            figures.remove(partition);
            let labels = PartitionLabels { partition: *partition };
            self.partition_lag.remove(&labels);
            self.partition_open_conversations.remove(&labels);
        }
    }

    pub fn partitions_assigned(&self) {
        self.rebalances.inc();
    }

    pub fn record_open_conversations(&self, partition: i32, open_conversations: usize) {
        let mut figures = self.partitions.lock().expect("metrics lock poisoned");
        figures.entry(partition).or_default().open_conversations_opt = Some(open_conversations as u64);
        self.partition_open_conversations
            .get_or_create(&PartitionLabels { partition })
            .set(i64::try_from(open_conversations).unwrap_or(i64::MAX));
    }

    pub fn record_lag(&self, partition: i32, lag: i64) {
        let mut figures = self.partitions.lock().expect("metrics lock poisoned");
        figures.entry(partition).or_default().lag_opt = Some(lag.max(0));
        self.partition_lag.get_or_create(&PartitionLabels { partition }).set(lag.max(0));
    }

    pub fn partitions(&self) -> BTreeMap<i32, PartitionFigures> {
        self.partitions.lock().expect("metrics lock poisoned").clone()
    }

    pub fn render_prometheus(&self) -> String {
        metrics::render(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_committed_work_is_counted_and_an_abort_streak_shows_until_the_next_commit() {
        let metrics = RouterMetrics::default();
        metrics.transaction_aborted(1);
        metrics.transaction_aborted(2);
        assert!(metrics.render_prometheus().contains("switchboard_router_consecutive_aborts 2\n"));
        let batch = BatchFigures { inputs: 10, events: 14, dead_lettered: 1, snapshots: 1 };
        metrics.batch_committed(&batch, Duration::from_millis(250));
        let text = metrics.render_prometheus();
        for expected in [
            "switchboard_router_inputs_routed_total 10\n",
            "switchboard_router_events_produced_total 14\n",
            "switchboard_router_dead_lettered_total 1\n",
            "switchboard_router_snapshots_written_total 1\n",
            "switchboard_router_transactions_committed_total 1\n",
            "switchboard_router_transactions_aborted_total 2\n",
            "switchboard_router_consecutive_aborts 0\n",
            "switchboard_router_last_batch_records 10\n",
            "switchboard_router_batch_seconds_bucket{le=\"0.1\"} 0\n",
            "switchboard_router_batch_seconds_bucket{le=\"0.25\"} 1\n",
            "switchboard_router_batch_seconds_sum 0.25\n",
            "switchboard_router_batch_seconds_count 1\n",
        ] {
            assert!(text.contains(expected), "{expected} missing in\n{text}");
        }
    }

    #[test]
    fn recovery_time_adds_up_in_seconds() {
        let metrics = RouterMetrics::default();
        metrics.partitions_recovered(2, Duration::from_millis(1500));
        metrics.partitions_recovered(1, Duration::from_millis(500));
        let text = metrics.render_prometheus();
        assert!(text.contains("switchboard_router_partitions_recovered_total 3\n"), "{text}");
        assert!(text.contains("switchboard_router_recovery_seconds_total 2.0\n"), "{text}");
    }

    #[test]
    fn a_revoked_partition_is_no_longer_reported() {
        let metrics = RouterMetrics::default();
        metrics.record_lag(3, 120);
        metrics.record_open_conversations(3, 42);
        metrics.record_lag(4, -5);
        let text = metrics.render_prometheus();
        assert!(text.contains("switchboard_router_partition_lag{partition=\"3\"} 120\n"), "{text}");
        assert!(text.contains("switchboard_router_partition_lag{partition=\"4\"} 0\n"), "never negative: {text}");
        assert!(text.contains("switchboard_router_open_conversations{partition=\"3\"} 42\n"), "{text}");
        metrics.partitions_revoked(&[3]);
        let text = metrics.render_prometheus();
        assert!(!text.contains("partition=\"3\""), "{text}");
        assert!(text.contains("switchboard_router_rebalances_total 1\n"));
    }
}
