//! The projector's consume loop: batches of records in, one PostgreSQL transaction per batch
//! with the rows and the positions they reach.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use switchboard_runtime::kafka;
use switchboard_runtime::telemetry::{adopt_trace_context, trace_id_of};
use tokio::sync::watch;
use tracing::{Instrument, info, info_span, warn};

use crate::apply::{ApplyError, apply_event};
use crate::positions::{self, BatchCheck, check_batch};

/// Name under which this projection's positions are stored.
pub const PROJECTION: &str = "conversations";

#[derive(Debug, Clone)]
pub struct ProjectorSettings {
    pub brokers: String,
    pub topic: String,
    pub group_id: String,
    pub max_batch_records: usize,
    pub batch_linger: Duration,
}

/// Partitions revoked since the loop last looked: their "positioned" flag must be reset,
/// because whoever owned them meanwhile may have moved the stored position.
#[derive(Default)]
struct RevokedPartitions(Mutex<Vec<i32>>);

impl ClientContext for RevokedPartitions {}

impl ConsumerContext for RevokedPartitions {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            self.0
                .lock()
                .expect("lock poisoned")
                .extend(partitions.elements().iter().map(|element| element.partition()));
        }
    }
}

/// Runs the projection until `shutdown` turns true. A failed batch (e.g. PostgreSQL down) is
/// rolled back and retried from the stored positions; only setup errors are returned.
pub async fn run_projector(
    settings: ProjectorSettings,
    pool: PgPool,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let consumer: StreamConsumer<RevokedPartitions> =
        kafka::group_consumer_config(&settings.brokers, "projector", &settings.group_id)
            .create_with_context(RevokedPartitions::default())
            .context("failed to create projector consumer")?;
    consumer.subscribe(&[&settings.topic]).context("failed to subscribe to conversations topic")?;
    let mut positioned: HashSet<i32> = HashSet::new();
    let mut window = (Instant::now(), 0usize);

    loop {
        let batch = tokio::select! {
            batch = next_batch(&consumer, settings.max_batch_records, settings.batch_linger) => batch,
            _ = shutdown.changed() => return Ok(()),
        };
        for partition in consumer.context().0.lock().expect("lock poisoned").drain(..) {
            positioned.remove(&partition);
        }
        if batch.is_empty() {
            continue;
        }
        let applied = match apply_batch(&settings, &pool, &consumer, &batch, &mut positioned).await {
            Ok(applied) => applied,
            Err(error) => {
                // Rolled back. Forget where partitions stand: their next batches start after
                // this one, so the position check seeks each back to its stored position.
                warn!(error = format!("{error:#}"), "projection batch failed; retrying from the stored positions");
                positioned.clear();
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        window.1 += applied;
        if window.0.elapsed() >= Duration::from_secs(10) {
            info!(
                events = window.1,
                events_per_second = (window.1 as f64 / window.0.elapsed().as_secs_f64()) as u64,
                "projection throughput"
            );
            window = (Instant::now(), 0);
        }
    }
}

async fn next_batch<'consumer>(
    consumer: &'consumer StreamConsumer<RevokedPartitions>,
    max_records: usize,
    linger: Duration,
) -> Vec<BorrowedMessage<'consumer>> {
    let mut batch = Vec::new();
    let mut stream = consumer.stream();
    // Wait for the first record as long as it takes, then at most `linger` for more.
    match stream.next().await {
        Some(Ok(record)) => batch.push(record),
        Some(Err(error)) => {
            warn!(%error, "projector consumer error (librdkafka retries)");
            return batch;
        }
        None => return batch,
    }
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < max_records {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(record))) => batch.push(record),
            Ok(Some(Err(error))) => {
                warn!(%error, "projector consumer error (librdkafka retries)");
                break;
            }
            Ok(None) | Err(_) => break,
        }
    }
    batch
}

/// Applies one batch in one transaction; returns how many events were applied.
async fn apply_batch(
    settings: &ProjectorSettings,
    pool: &PgPool,
    consumer: &StreamConsumer<RevokedPartitions>,
    batch: &[BorrowedMessage<'_>],
    positioned: &mut HashSet<i32>,
) -> anyhow::Result<usize> {
    let mut by_partition: BTreeMap<i32, Vec<&BorrowedMessage<'_>>> = BTreeMap::new();
    for record in batch {
        by_partition.entry(record.partition()).or_default().push(record);
    }
    let span = info_span!("project_batch", records = batch.len(), partitions = by_partition.len());
    async {
        let mut transaction = pool.begin().await.context("failed to begin transaction")?;
        let mut applied = 0usize;
        let mut seeks: Vec<(i32, Option<i64>)> = Vec::new();
        let mut new_positions: Vec<(i32, i64)> = Vec::new();
        for (&partition, records) in &by_partition {
            let stored = positions::load_for_update(&mut transaction, PROJECTION, &settings.topic, partition).await?;
            let offsets: Vec<i64> = records.iter().map(|record| record.offset()).collect();
            let first_new = match check_batch(stored, positioned.contains(&partition), &offsets) {
                BatchCheck::ApplyFrom(index) => index,
                BatchCheck::SeekTo(offset_opt) => {
                    seeks.push((partition, offset_opt));
                    continue;
                }
            };
            positioned.insert(partition);
            for record in &records[first_new..] {
                apply_record(&mut transaction, settings, record).await?;
                applied += 1;
            }
            if let Some(last) = records.last().filter(|_| first_new < records.len()) {
                let next_offset = last.offset() + 1;
                positions::store(&mut transaction, PROJECTION, &settings.topic, partition, next_offset).await?;
                new_positions.push((partition, next_offset));
            }
        }
        transaction.commit().await.context("failed to commit projection batch")?;

        for (partition, offset_opt) in seeks {
            let offset = offset_opt.map_or(Offset::Beginning, Offset::Offset);
            info!(partition, ?offset, "first batch after assignment does not start at the stored position; seeking");
            consumer
                .seek(&settings.topic, partition, offset, Duration::from_secs(10))
                .with_context(|| format!("failed to seek partition {partition}"))?;
            positioned.insert(partition);
        }
        // Advisory only: where to start fetching after a restart. The stored position rules.
        if !new_positions.is_empty() {
            let mut offsets = TopicPartitionList::new();
            for (partition, next_offset) in new_positions {
                offsets.add_partition_offset(&settings.topic, partition, Offset::Offset(next_offset))?;
            }
            if let Err(error) = consumer.commit(&offsets, CommitMode::Async) {
                warn!(%error, "advisory offset commit failed (harmless: positions are stored in postgres)");
            }
        }
        Ok(applied)
    }
    .instrument(span)
    .await
}

async fn apply_record(
    transaction: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    settings: &ProjectorSettings,
    record: &BorrowedMessage<'_>,
) -> anyhow::Result<()> {
    let span = info_span!(
        "project",
        partition = record.partition(),
        offset = record.offset(),
        event_id = tracing::field::Empty
    );
    adopt_trace_context(&span, record.headers());
    let trace_id = trace_id_of(&span);
    let outcome = match switchboard_runtime::envelope::decode(record.payload()) {
        Ok(event) => {
            span.record("event_id", event.event_id.as_str());
            apply_event(transaction, &event, &trace_id).instrument(span.clone()).await
        }
        Err(error) => Err(ApplyError::Unusable(error.to_string())),
    };
    match outcome {
        Ok(()) => Ok(()),
        Err(ApplyError::Unusable(reason)) => {
            warn!(parent: &span, reason, "rejecting record the projection cannot apply");
            sqlx::query(
                "INSERT INTO projection_rejects (topic, partition, \"offset\", reason, payload) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&settings.topic)
            .bind(record.partition())
            .bind(record.offset())
            .bind(&reason)
            .bind(record.payload())
            .execute(&mut **transaction)
            .await?;
            Ok(())
        }
        Err(ApplyError::Database(error)) => Err(anyhow::Error::new(error).context("failed to apply event")),
    }
}
