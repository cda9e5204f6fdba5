//! What the projector reports about itself: counters, the last batch, and lag per partition,
//! as Prometheus text on `/metrics` and as rows of `projector_lag` (so the API can expose it).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use switchboard_runtime::metrics_http::{write_labelled, write_metric};
use tracing::warn;

#[derive(Default)]
pub struct Metrics {
    pub events_applied: AtomicU64,
    pub batches: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub last_batch_records: AtomicU64,
    pub last_batch_micros: AtomicU64,
    pub batch_failures: AtomicU64,
    /// Batches of a partition refused because they did not continue from its stored position.
    pub gaps: AtomicU64,
    /// Stored positions found behind what this instance had committed (lost commits).
    pub lost_commits: AtomicU64,
    partitions: Mutex<BTreeMap<(String, i32), PartitionLag>>,
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

impl Metrics {
    pub fn record_position(&self, topic: &str, partition: i32, next_offset: i64) {
        let mut partitions = self.partitions.lock().expect("metrics lock poisoned");
        partitions.entry((topic.to_owned(), partition)).or_default().next_offset = Some(next_offset);
    }

    pub fn record_end(&self, topic: &str, partition: i32, end_offset: i64) {
        let mut partitions = self.partitions.lock().expect("metrics lock poisoned");
        partitions.entry((topic.to_owned(), partition)).or_default().end_offset = Some(end_offset);
    }

    /// The partition no longer belongs to this instance: its figures are someone else's now.
    pub fn forget(&self, topic: &str, partition: i32) {
        self.partitions.lock().expect("metrics lock poisoned").remove(&(topic.to_owned(), partition));
    }

    pub fn partitions(&self) -> BTreeMap<(String, i32), PartitionLag> {
        self.partitions.lock().expect("metrics lock poisoned").clone()
    }

    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        let counters = [
            ("projector_events_applied_total", "Events applied to the read models.", &self.events_applied),
            ("projector_batches_total", "Batches committed.", &self.batches),
            ("projector_dead_lettered_total", "Records sent to the dead-letter topic.", &self.dead_lettered),
            ("projector_batch_failures_total", "Batches rolled back and retried.", &self.batch_failures),
            (
                "projector_gaps_total",
                "Batches of a partition that did not continue from its stored position: not applied, the partition is read again from the stored position.",
                &self.gaps,
            ),
            (
                "projector_lost_commits_total",
                "Stored positions found behind what this projector had committed (the database lost committed batches: crash with asynchronous commit, failover, restore); each is read again from the stored position.",
                &self.lost_commits,
            ),
        ];
        for (name, help, value) in counters {
            write_metric(&mut out, "counter", name, help, value.load(Ordering::Relaxed));
        }
        write_metric(
            &mut out,
            "gauge",
            "projector_last_batch_records",
            "Records in the last batch.",
            self.last_batch_records.load(Ordering::Relaxed),
        );
        write_metric(
            &mut out,
            "gauge",
            "projector_last_batch_seconds",
            "Time to write the last batch.",
            format!("{:.6}", self.last_batch_micros.load(Ordering::Relaxed) as f64 / 1e6),
        );
        write_labelled(
            &mut out,
            "gauge",
            "projector_partition_lag",
            "Records between the stored position and the end of the partition.",
            self.partitions().into_iter().filter_map(|((topic, partition), figures)| {
                Some((format!("topic=\"{topic}\",partition=\"{partition}\""), figures.lag()?))
            }),
        );
        out
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
