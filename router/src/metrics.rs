//! What the router reports about itself on `/metrics` (Prometheus text): throughput, committed
//! and aborted transactions, dead letters, snapshots, state recoveries, and per input partition
//! the lag and the open conversations in state.
//!
//! Counters of routed work move only when the transaction holding that work commits, so an
//! aborted and re-routed batch is counted once, like its output.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use switchboard_runtime::metrics_http::{write_labelled, write_metric};

#[derive(Default)]
pub struct RouterMetrics {
    inputs_routed: AtomicU64,
    events_produced: AtomicU64,
    dead_lettered: AtomicU64,
    snapshots_written: AtomicU64,
    transactions_committed: AtomicU64,
    transactions_aborted: AtomicU64,
    consecutive_aborts: AtomicU64,
    partitions_recovered: AtomicU64,
    recovery_micros: AtomicU64,
    rebalances: AtomicU64,
    last_batch_records: AtomicU64,
    last_batch_micros: AtomicU64,
    partitions: Mutex<BTreeMap<i32, PartitionFigures>>,
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

impl RouterMetrics {
    pub fn batch_committed(&self, batch: &BatchFigures, took: Duration) {
        self.inputs_routed.fetch_add(batch.inputs, Ordering::Relaxed);
        self.events_produced.fetch_add(batch.events, Ordering::Relaxed);
        self.dead_lettered.fetch_add(batch.dead_lettered, Ordering::Relaxed);
        self.snapshots_written.fetch_add(batch.snapshots, Ordering::Relaxed);
        self.transactions_committed.fetch_add(1, Ordering::Relaxed);
        self.consecutive_aborts.store(0, Ordering::Relaxed);
        self.last_batch_records.store(batch.inputs, Ordering::Relaxed);
        self.last_batch_micros.store(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn transaction_aborted(&self, consecutive_aborts: u32) {
        self.transactions_aborted.fetch_add(1, Ordering::Relaxed);
        self.consecutive_aborts.store(u64::from(consecutive_aborts), Ordering::Relaxed);
    }

    /// `count` partition states were recovered side by side while routing waited `took`.
    pub fn partitions_recovered(&self, count: usize, took: Duration) {
        self.partitions_recovered.fetch_add(count as u64, Ordering::Relaxed);
        self.recovery_micros.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Partitions taken away: their figures are another instance's now.
    pub fn partitions_revoked(&self, partitions: &[i32]) {
        self.rebalances.fetch_add(1, Ordering::Relaxed);
        let mut figures = self.partitions.lock().expect("metrics lock poisoned");
        for partition in partitions {
            figures.remove(partition);
        }
    }

    pub fn partitions_assigned(&self) {
        self.rebalances.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_open_conversations(&self, partition: i32, open_conversations: usize) {
        let mut figures = self.partitions.lock().expect("metrics lock poisoned");
        figures.entry(partition).or_default().open_conversations_opt = Some(open_conversations as u64);
    }

    pub fn record_lag(&self, partition: i32, lag: i64) {
        let mut figures = self.partitions.lock().expect("metrics lock poisoned");
        figures.entry(partition).or_default().lag_opt = Some(lag.max(0));
    }

    pub fn partitions(&self) -> BTreeMap<i32, PartitionFigures> {
        self.partitions.lock().expect("metrics lock poisoned").clone()
    }

    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        let counters = [
            ("switchboard_router_inputs_routed_total", "Inbound records routed (committed).", &self.inputs_routed),
            ("switchboard_router_events_produced_total", "Decision events written (committed).", &self.events_produced),
            (
                "switchboard_router_dead_lettered_total",
                "Inbound records sent to the dead-letter topic (committed).",
                &self.dead_lettered,
            ),
            (
                "switchboard_router_snapshots_written_total",
                "State snapshots written (committed).",
                &self.snapshots_written,
            ),
            (
                "switchboard_router_transactions_committed_total",
                "Transactions committed.",
                &self.transactions_committed,
            ),
            (
                "switchboard_router_transactions_aborted_total",
                "Transactions aborted and rewound to the last committed offsets.",
                &self.transactions_aborted,
            ),
            (
                "switchboard_router_partitions_recovered_total",
                "Partition states recovered (snapshot + tail).",
                &self.partitions_recovered,
            ),
            ("switchboard_router_rebalances_total", "Partition assignments and revocations.", &self.rebalances),
        ];
        for (name, help, value) in counters {
            write_metric(&mut out, "counter", name, help, value.load(Ordering::Relaxed));
        }
        let seconds = |micros: &AtomicU64| micros.load(Ordering::Relaxed) as f64 / 1e6;
        write_metric(
            &mut out,
            "counter",
            "switchboard_router_recovery_seconds_total",
            "Time routing waited for partition state recoveries.",
            seconds(&self.recovery_micros),
        );
        let gauges = [
            (
                "switchboard_router_consecutive_aborts",
                "Transactions aborted in a row since the last commit (an output the broker keeps refusing shows here).",
                self.consecutive_aborts.load(Ordering::Relaxed) as f64,
            ),
            (
                "switchboard_router_last_batch_records",
                "Inbound records in the last committed batch.",
                self.last_batch_records.load(Ordering::Relaxed) as f64,
            ),
            (
                "switchboard_router_last_batch_seconds",
                "Poll to commit of the last committed batch.",
                seconds(&self.last_batch_micros),
            ),
        ];
        for (name, help, value) in gauges {
            write_metric(&mut out, "gauge", name, help, value);
        }
        let partitions = self.partitions();
        let by_partition = |value_of: fn(&PartitionFigures) -> Option<u64>| {
            partitions.iter().filter_map(move |(partition, figures)| {
                Some((format!("partition=\"{partition}\""), value_of(figures)?))
            })
        };
        write_labelled(
            &mut out,
            "gauge",
            "switchboard_router_partition_lag",
            "Committed inbound records not yet routed, per input partition.",
            by_partition(|figures| figures.lag_opt.map(|lag| lag as u64)),
        );
        write_labelled(
            &mut out,
            "gauge",
            "switchboard_router_open_conversations",
            "Open conversations in the routing state, per input partition.",
            by_partition(|figures| figures.open_conversations_opt),
        );
        out
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
            "switchboard_router_last_batch_seconds 0.25\n",
        ] {
            assert!(text.contains(expected), "{expected} missing in\n{text}");
        }
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
