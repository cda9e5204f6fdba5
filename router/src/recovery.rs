//! Recovery of a partition's routing state when this instance starts routing it: the latest
//! snapshot from the snapshot topic, then the router's own committed output after it, folded
//! with `evolve` (nothing is re-decided).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use switchboard_runtime::envelope;
use switchboard_runtime::kafka;
use tracing::{info, warn};

use crate::decide::{self, RouterState};
use crate::metrics::RouterMetrics;
use crate::settings::{KAFKA_TIMEOUT, RouterSettings};
use crate::snapshot::{self, Manifest};

/// The routing state of one input partition, with its snapshot bookkeeping.
pub struct PartitionState {
    pub state: RouterState,
    /// Inputs routed since the latest snapshot (or the recovery).
    pub(crate) records_since_snapshot: u64,
    pub(crate) last_snapshot_at: Instant,
    /// Chunk count of the latest snapshot: keys beyond a smaller new snapshot get tombstones.
    pub(crate) last_chunk_count: u32,
}

/// At most this many partitions are recovered at once (each recovery has its own reader).
const MAX_PARALLEL_RECOVERIES: usize = 16;

/// Makes sure every partition of `batch` has its routing state, recovering the missing ones in
/// parallel (a recovery mostly waits on the broker).
///
/// Only partitions with a record in the batch: the consumer hands out a partition's records
/// only once its committed offset is stable (`read_committed` fetches it with require_stable),
/// that is once a previous owner's transaction covering it has completed, so the output that
/// recovery folds includes that transaction. Recovering other assigned partitions earlier could
/// miss it.
pub(crate) fn recover_missing_states(
    settings: &RouterSettings,
    batch: &[BorrowedMessage<'_>],
    state_by_partition: &mut HashMap<i32, PartitionState>,
    metrics: &RouterMetrics,
) -> anyhow::Result<()> {
    let mut missing: Vec<i32> = batch
        .iter()
        .map(|record| record.partition())
        .filter(|partition| !state_by_partition.contains_key(partition))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    missing.sort_unstable();
    missing.dedup();
    for wave in missing.chunks(MAX_PARALLEL_RECOVERIES) {
        let started = Instant::now();
        let recovered: Vec<(i32, anyhow::Result<PartitionState>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = wave
                .iter()
                .map(|&partition| {
                    let handle = std::thread::Builder::new()
                        .name(format!("router-recover-{partition}"))
                        .spawn_scoped(scope, move || load_partition_state(settings, partition));
                    (partition, handle)
                })
                .collect();
            handles
                .into_iter()
                .map(|(partition, handle)| {
                    let result = match handle {
                        Ok(handle) => handle
                            .join()
                            .unwrap_or_else(|_| Err(anyhow::anyhow!("recovery of partition {partition} panicked"))),
                        Err(error) => Err(anyhow::Error::new(error).context("failed to start a recovery thread")),
                    };
                    (partition, result)
                })
                .collect()
        });
        for (partition, result) in recovered {
            let partition_state =
                result.with_context(|| format!("failed to recover the routing state of partition {partition}"))?;
            metrics.record_open_conversations(partition, partition_state.state.conversations.len());
            state_by_partition.insert(partition, partition_state);
        }
        metrics.partitions_recovered(wave.len(), started.elapsed());
    }
    Ok(())
}

/// How a partition's state was recovered (logged, and reported by the restart benchmark).
#[derive(Debug, Clone, Default)]
pub struct RecoveryStats {
    pub snapshot_bytes: u64,
    pub snapshot_read: Duration,
    pub tail_events: u64,
    pub total: Duration,
}

/// Recovers one partition's routing state: the latest snapshot (if any), then the router's own
/// committed output written after it, folded with `evolve` (nothing is re-decided).
pub fn load_partition_state(settings: &RouterSettings, partition: i32) -> anyhow::Result<PartitionState> {
    let (state, stats, last_chunk_count) = recover_partition_state(settings, partition, RecoverFrom::LatestSnapshot)?;
    info!(
        partition,
        snapshot_bytes = stats.snapshot_bytes,
        snapshot_read_ms = stats.snapshot_read.as_millis() as u64,
        tail_events = stats.tail_events,
        elapsed_ms = stats.total.as_millis() as u64,
        "router partition state recovered"
    );
    Ok(PartitionState { state, records_since_snapshot: 0, last_snapshot_at: Instant::now(), last_chunk_count })
}

/// Where recovery starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoverFrom {
    /// The latest snapshot plus the output written after it (what the router does).
    LatestSnapshot,
    /// The whole output partition (the fallback; the restart benchmark compares both).
    Beginning,
}

/// The recovery itself, without bookkeeping: (state, stats, chunk count of the snapshot used).
pub fn recover_partition_state(
    settings: &RouterSettings,
    partition: i32,
    from: RecoverFrom,
) -> anyhow::Result<(RouterState, RecoveryStats, u32)> {
    let started = Instant::now();
    // (The reader keeps its group id: librdkafka's assign() fails with "Unknown group" without
    // one. Dropping it costs rust-rdkafka's group close, polled in 100 ms steps; recoveries run in
    // parallel, so that is paid once per wave.)
    let reader: BaseConsumer<kafka::ReaderContext> =
        kafka::reader_config(&settings.brokers, &format!("router-{}-state", settings.instance_id))
            .create_with_context(kafka::ReaderContext)
            .context("failed to create state reader")?;
    let mut stats = RecoveryStats::default();
    let latest_opt = match from {
        RecoverFrom::LatestSnapshot => read_latest_snapshot(settings, &reader, partition),
        RecoverFrom::Beginning => Ok(None),
    };
    let (mut state, tail_from, skip_inputs_below, chunk_count) = match latest_opt {
        Ok(Some((manifest, bytes))) => match snapshot::decode_state(&bytes) {
            Ok(state) => {
                stats.snapshot_bytes = bytes.len() as u64;
                (state, Offset::Offset(manifest.output_next_offset), manifest.input_next_offset, manifest.chunk_count)
            }
            Err(error) => {
                warn!(%error, partition, "undecodable router snapshot; rebuilding from the whole output");
                (RouterState::default(), Offset::Beginning, 0, manifest.chunk_count)
            }
        },
        Ok(None) => (RouterState::default(), Offset::Beginning, 0, 0),
        Err(error) => {
            warn!(
                error = format!("{error:#}"),
                partition, "cannot read router snapshot; rebuilding from the whole output"
            );
            (RouterState::default(), Offset::Beginning, 0, 0)
        }
    };
    stats.snapshot_read = started.elapsed();

    // The output partition's bounds. Asking for them also gives the reader the topic's
    // metadata, so the assignment below fetches at once: a logical offset (`Beginning`) assigned
    // before the reader knows the partition's leader waits for librdkafka's 500 ms offset-query
    // retry. With nothing after the start there is nothing to read (no wait for an EOF).
    let (output_low, output_high) = reader
        .fetch_watermarks(&settings.topics.conversations, partition, KAFKA_TIMEOUT)
        .context("failed to read the output partition's bounds")?;
    let tail_start = match tail_from {
        Offset::Offset(offset) => offset.max(output_low),
        _ => output_low,
    };
    if tail_start < output_high {
        fold_output_tail(settings, &reader, partition, tail_start, skip_inputs_below, &mut state, &mut stats)?;
    }
    stats.total = started.elapsed();
    Ok((state, stats, chunk_count))
}

/// Folds the router's committed output of `partition` from `start` to its end into `state`.
fn fold_output_tail(
    settings: &RouterSettings,
    reader: &BaseConsumer<kafka::ReaderContext>,
    partition: i32,
    start: i64,
    skip_inputs_below: i64,
    state: &mut RouterState,
    stats: &mut RecoveryStats,
) -> anyhow::Result<()> {
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(&settings.topics.conversations, partition, Offset::Offset(start))?;
    reader.assign(&assignment).context("failed to assign state partition")?;
    loop {
        match reader.poll(KAFKA_TIMEOUT) {
            Some(Ok(record)) => match envelope::decode(record.payload()) {
                Ok(event) => {
                    // Belt and braces: an event caused by an input the snapshot already covers
                    // is never applied twice, whatever the output offset said.
                    let covered = event
                        .source_position
                        .as_ref()
                        .is_some_and(|source| source.partition == partition && source.offset < skip_inputs_below);
                    if !covered {
                        decide::evolve(state, &event);
                        stats.tail_events += 1;
                    }
                }
                Err(error) => warn!(%error, offset = record.offset(), "skipping undecodable router output record"),
            },
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(()),
            Some(Err(error)) => warn!(%error, "state reader error (librdkafka retries)"),
            None => anyhow::bail!("timed out rebuilding router state of partition {partition}"),
        }
    }
}

/// A record of the snapshot topic as the reader needs it.
struct SnapshotRecord {
    offset: i64,
    key: Vec<u8>,
    value_opt: Option<Vec<u8>>,
}

/// Reads committed records of one partition from `start` to its end.
fn read_to_end(
    reader: &BaseConsumer<kafka::ReaderContext>,
    topic: &str,
    partition: i32,
    start: i64,
    mut keep: impl FnMut(&SnapshotRecord) -> bool,
) -> anyhow::Result<Vec<SnapshotRecord>> {
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Offset(start))?;
    reader.assign(&assignment).context("failed to assign snapshot partition")?;
    let mut records = Vec::new();
    loop {
        match reader.poll(KAFKA_TIMEOUT) {
            Some(Ok(record)) => {
                let record = SnapshotRecord {
                    offset: record.offset(),
                    key: record.key().unwrap_or_default().to_vec(),
                    value_opt: record.payload().map(<[u8]>::to_vec),
                };
                if keep(&record) {
                    records.push(record);
                }
            }
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(records),
            Some(Err(error)) => warn!(%error, "snapshot reader error (librdkafka retries)"),
            None => anyhow::bail!("timed out reading the snapshot topic"),
        }
    }
}

/// Finds the newest committed manifest near the end of the partition's snapshot topic (looking
/// further back only if needed), then reads just the chunks written before it.
fn read_latest_snapshot(
    settings: &RouterSettings,
    reader: &BaseConsumer<kafka::ReaderContext>,
    partition: i32,
) -> anyhow::Result<Option<(Manifest, Vec<u8>)>> {
    let topic = settings.snapshot_topic();
    let (low, high) =
        reader.fetch_watermarks(&topic, partition, KAFKA_TIMEOUT).context("failed to read snapshot watermarks")?;
    if high <= low {
        return Ok(None);
    }
    let mut window = 64i64;
    let (manifest_offset, manifest) = loop {
        let start = (high - window).max(low);
        let manifests = read_to_end(reader, &topic, partition, start, |record| {
            record.key == snapshot::MANIFEST_KEY.as_bytes() && record.value_opt.is_some()
        })?;
        if let Some(record) = manifests.last() {
            let manifest = Manifest::decode(record.value_opt.as_deref().unwrap_or_default())
                .context("undecodable snapshot manifest")?;
            break (record.offset, manifest);
        }
        if start == low {
            return Ok(None);
        }
        window *= 8;
    };
    let chunks_start = (manifest_offset - manifest.records_before_manifest as i64).max(low);
    let mut chunks: Vec<Option<Vec<u8>>> = vec![None; manifest.chunk_count as usize];
    for record in read_to_end(reader, &topic, partition, chunks_start, |record| {
        record.offset < manifest_offset && record.key.starts_with(b"chunk/")
    })? {
        let Some(value) = &record.value_opt else { continue };
        let (input_next_offset, index, bytes) = snapshot::parse_chunk(value)?;
        if input_next_offset == manifest.input_next_offset
            && let Some(slot) = chunks.get_mut(index as usize)
        {
            *slot = Some(bytes.to_vec());
        }
    }
    let mut bytes = Vec::with_capacity(manifest.state_bytes as usize);
    for (index, chunk) in chunks.into_iter().enumerate() {
        let chunk = chunk.with_context(|| format!("snapshot chunk {index} of {} is missing", manifest.chunk_count))?;
        bytes.extend_from_slice(&chunk);
    }
    Ok(Some((manifest, bytes)))
}
