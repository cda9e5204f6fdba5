//! What the projector reports about itself: counters, batch sizes and durations, and lag per
//! partition, as Prometheus text on `/metrics` and as rows of `projector_lag` (so the API can
//! expose it).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use switchboard_runtime::metrics;
use tracing::warn;

pub struct Metrics {
    registry: Registry,
    pub events_applied: Counter,
    pub batches: Counter,
    pub dead_lettered: Counter,
    pub last_batch_records: Gauge,
    /// Time to write each batch.
    pub batch_seconds: Histogram,
    pub batch_failures: Counter,
    /// Batches of a partition refused because they did not continue from its stored position.
    pub gaps: Counter,
    /// Stored positions found behind what this instance had committed (lost commits).
    pub lost_commits: Counter,
    partition_lag: Family<PartitionLabels, Gauge>,
    partitions: Mutex<BTreeMap<(String, i32), PartitionLag>>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    topic: String,
    partition: i32,
}

/// What is known about one input partition: where the read models are and where the log ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionLag {
    pub next_offset: Option<i64>,
    pub end_offset: Option<i64>,
}

impl PartitionLag {
    pub fn lag(&self) -> Option<i64> {
        Some((self.end_offset? - self.next_offset.unwrap_or(0)).max(0))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = metrics::new_registry("projector");
        let mut counter = |name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let events_applied = counter("events_applied", "Events applied to the read models");
        let batches = counter("batches", "Batches committed");
        let dead_lettered = counter("dead_lettered", "Records sent to the dead-letter topic");
        let batch_failures = counter("batch_failures", "Batches rolled back and retried");
        let gaps = counter(
            "gaps",
            "Batches of a partition that did not continue from its stored position: not applied, the partition is read again from the stored position",
        );
        let lost_commits = counter(
            "lost_commits",
            "Stored positions found behind what this projector had committed (the database lost committed batches: crash with asynchronous commit, failover, restore); each is read again from the stored position",
        );
        let last_batch_records = Gauge::default();
        registry.register("last_batch_records", "Records in the last batch", last_batch_records.clone());
        let batch_seconds = metrics::seconds_histogram();
        registry.register("batch_seconds", "Time to write each batch", batch_seconds.clone());
        let partition_lag = Family::default();
        registry.register(
            "partition_lag",
            "Records between the stored position and the end of the partition",
            partition_lag.clone(),
        );
        Metrics {
            registry,
            events_applied,
            batches,
            dead_lettered,
            last_batch_records,
            batch_seconds,
            batch_failures,
            gaps,
            lost_commits,
            partition_lag,
            partitions: Mutex::default(),
        }
    }
}

impl Metrics {
    pub fn record_position(&self, topic: &str, partition: i32, next_offset: i64) {
        let mut partitions = self.partitions.lock().expect("metrics lock poisoned");
        let figures = partitions.entry((topic.to_owned(), partition)).or_default();
        figures.next_offset = Some(next_offset);
        self.show_lag(topic, partition, figures);
    }

    pub fn record_end(&self, topic: &str, partition: i32, end_offset: i64) {
        let mut partitions = self.partitions.lock().expect("metrics lock poisoned");
        let figures = partitions.entry((topic.to_owned(), partition)).or_default();
        figures.end_offset = Some(end_offset);
        self.show_lag(topic, partition, figures);
    }

    fn show_lag(&self, topic: &str, partition: i32, figures: &PartitionLag) {
        if let Some(lag) = figures.lag() {
            self.partition_lag.get_or_create(&PartitionLabels { topic: topic.to_owned(), partition }).set(lag);
        }
    }

    /// The partition no longer belongs to this instance: its figures are someone else's now.
    pub fn forget(&self, topic: &str, partition: i32) {
        self.partitions.lock().expect("metrics lock poisoned").remove(&(topic.to_owned(), partition));
        self.partition_lag.remove(&PartitionLabels { topic: topic.to_owned(), partition });
    }

    pub fn partitions(&self) -> BTreeMap<(String, i32), PartitionLag> {
        self.partitions.lock().expect("metrics lock poisoned").clone()
    }

    pub fn render_prometheus(&self) -> String {
        metrics::render(&self.registry)
    }
}

/// Writes this instance's lag figures to `projector_lag` of the active schema once a second.
pub async fn store_lag_periodically(
    pool: PgPool,
    metrics: std::sync::Arc<Metrics>,
    schema: tokio::sync::watch::Receiver<String>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if *shutdown.borrow() || pool.is_closed() {
            return;
        }
        let rows: Vec<((String, i32), PartitionLag)> =
            metrics.partitions().into_iter().filter(|(_, figures)| figures.lag().is_some()).collect();
        if rows.is_empty() {
            continue;
        }
        let schema_name = schema.borrow().clone();
        let result = async {
            let mut transaction = pool.begin().await?;
            sqlx::query(&format!("SET LOCAL search_path TO {schema_name}")).execute(&mut *transaction).await?;
            sqlx::query(
                "INSERT INTO projector_lag (topic, partition, next_offset, end_offset, lag, measured_at) \
                 SELECT t, p, n, e, GREATEST(0, e - n), now() FROM UNNEST($1::text[], $2::int[], $3::bigint[], $4::bigint[]) \
                 AS u(t, p, n, e) \
                 ON CONFLICT (topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, \
                 end_offset = EXCLUDED.end_offset, lag = EXCLUDED.lag, measured_at = EXCLUDED.measured_at",
            )
            .bind(rows.iter().map(|((topic, _), _)| topic.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|((_, partition), _)| *partition).collect::<Vec<_>>())
            .bind(rows.iter().map(|(_, figures)| figures.next_offset.unwrap_or(0)).collect::<Vec<_>>())
            .bind(rows.iter().map(|(_, figures)| figures.end_offset.unwrap_or(0)).collect::<Vec<_>>())
            .execute(&mut *transaction)
            .await?;
            transaction.commit().await
        }
        .await;
        if let Err(error) = result {
            warn!(%error, "failed to store projector lag");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_batches_and_lag_are_reported_with_the_switchboard_prefix() {
        let metrics = Metrics::default();
        metrics.events_applied.inc_by(7);
        metrics.gaps.inc();
        metrics.last_batch_records.set(7);
        metrics.batch_seconds.observe(0.02);
        metrics.record_position("conversations.v1", 2, 10);
        metrics.record_end("conversations.v1", 2, 15);
        metrics.record_end("config.v1", 0, 3);
        let text = metrics.render_prometheus();
        for expected in [
            "switchboard_projector_events_applied_total 7\n",
            "switchboard_projector_gaps_total 1\n",
            "switchboard_projector_lost_commits_total 0\n",
            "switchboard_projector_batch_failures_total 0\n",
            "switchboard_projector_last_batch_records 7\n",
            "switchboard_projector_batch_seconds_bucket{le=\"0.025\"} 1\n",
            "switchboard_projector_batch_seconds_count 1\n",
            "switchboard_projector_partition_lag{topic=\"conversations.v1\",partition=\"2\"} 5\n",
            "switchboard_projector_partition_lag{topic=\"config.v1\",partition=\"0\"} 3\n",
        ] {
            assert!(text.contains(expected), "{expected} missing in\n{text}");
        }
        metrics.forget("conversations.v1", 2);
        assert!(!metrics.render_prometheus().contains("conversations.v1"));
    }
}
