//! The router's Kafka shell: consume inbound events, call the pure core, and write the decided
//! events together with the consumed offsets in one Kafka transaction (exactly-once
//! consume-transform-produce).
//!
//! Keying (docs/router.md): inbound events are keyed by account, so one partition holds whole
//! accounts and the instance that owns input partition `p` is the only writer of the routing
//! state of those accounts. Its output goes to the same partition index `p` of the
//! conversations topic, which therefore is also the state's changelog: a newly assigned
//! partition's state is rebuilt by folding that output partition with `decide::evolve`.
//! Automated messages (O6) go to the outbound topic in the same transaction, partitioned by
//! their key (`<account>/<conversation id>`) like the API's replies to the same conversation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use switchboard_proto::events::v1::{Envelope, KafkaPosition};
use switchboard_runtime::config_store::{ConfigSnapshot, ConfigStore};
use switchboard_runtime::envelope;
use switchboard_runtime::kafka::{self, header};
use switchboard_runtime::publisher::envelope_headers;
use switchboard_runtime::telemetry::{TraceContextHeaders, adopt_trace_context};
use tracing::{info, info_span, warn};

use crate::decide::{self, Destination, RouterConfig, RouterState};
use crate::metrics::{BatchFigures, RouterMetrics};
use crate::recovery::{self, PartitionState};
use crate::snapshot::{self, Manifest};

use crate::settings::KAFKA_TIMEOUT;
pub use crate::settings::{RouterSettings, SNAPSHOT_TOPIC};

/// Remembers partitions taken away by a rebalance. librdkafka runs rebalance callbacks inside
/// `consumer.poll` on the routing thread, so `poll_batch` takes this list after every poll: the
/// batch's records of those partitions were polled before the revocation and must not be routed
/// here, and their state is dropped (and rebuilt from the log if they come back: someone else
/// may have routed them meanwhile).
struct RebalanceTracker {
    revoked_during_poll: Mutex<Vec<i32>>,
    inbound_topic: String,
    metrics: Arc<RouterMetrics>,
}

/// librdkafka's statistics (every `CONSUMER_STATISTICS_INTERVAL`, served by `poll` like the
/// rebalance callbacks) give each assigned partition's lag without asking the broker.
impl ClientContext for RebalanceTracker {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(topic) = statistics.topics.get(&self.inbound_topic) else { return };
        for (partition, figures) in &topic.partitions {
            // Partition -1 is librdkafka's internal "unassigned" queue.
            if *partition < 0 || !figures.desired || figures.ls_offset < 0 {
                continue;
            }
            // Next offset to hand out: the one after the last record handed out, else where
            // consumption starts (the committed offset, or the log start for a group that has
            // committed nothing: `auto.offset.reset=earliest`).
            let next = [figures.app_offset, figures.committed_offset, figures.lo_offset]
                .into_iter()
                .find(|offset| *offset >= 0)
                .unwrap_or(-1);
            if next >= 0 {
                self.metrics.record_lag(*partition, figures.ls_offset - next);
            }
        }
    }
}

impl ConsumerContext for RebalanceTracker {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let partitions_of = |list: &TopicPartitionList| -> Vec<i32> {
            list.elements().iter().map(|element| element.partition()).collect()
        };
        let protocol = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => "cooperative",
            RebalanceProtocol::Eager => "eager",
            RebalanceProtocol::None => "none",
        };
        match rebalance {
            Rebalance::Assign(partitions) => {
                info!(partitions = ?partitions_of(partitions), protocol, "inbound partitions assigned");
                self.metrics.partitions_assigned();
            }
            Rebalance::Revoke(partitions) => {
                let partitions = partitions_of(partitions);
                info!(partitions = ?partitions, protocol, "inbound partitions revoked");
                self.metrics.partitions_revoked(&partitions);
                self.revoked_during_poll.lock().expect("lock poisoned").extend(partitions);
            }
            Rebalance::Error(error) => warn!(error = %error, "inbound rebalance failed"),
        }
    }
}

/// How a failed transaction is handled.
enum TransactionFailure {
    /// Abort, rewind to the last committed offsets, and carry on.
    AbortAndRewind(anyhow::Error),
    /// This instance can no longer produce transactionally (e.g. fenced by a newer instance).
    Fatal(anyhow::Error),
}

/// Runs the router until `shutdown` is set. Blocking: call it on a dedicated thread.
pub fn run_router(
    settings: &RouterSettings,
    config: &ConfigStore,
    shutdown: &AtomicBool,
    metrics: &Arc<RouterMetrics>,
) -> anyhow::Result<()> {
    let transactional_id = format!("{}-{}", settings.group_id, settings.instance_id);
    let mut producer_config = kafka::transactional_producer_config(
        &settings.brokers,
        &format!("router-{}", settings.instance_id),
        &transactional_id,
    );
    for (key, value) in &settings.producer_overrides {
        producer_config.set(key, value);
    }
    let producer: BaseProducer = producer_config.create().context("failed to create transactional producer")?;
    producer.init_transactions(KAFKA_TIMEOUT).context("failed to initialise kafka transactions")?;
    info!(transactional_id, "router producer ready");

    // How many aborts followed one another without a committed batch.
    let mut consecutive_aborts = 0u32;
    let mut abort_backoff = AbortBackoff::new();
    while !shutdown.load(Ordering::Relaxed) {
        let consumer = subscribe_to_inbound(settings, metrics)?;
        // Each session starts from the committed offsets with empty state. A session ends only
        // after an aborted transaction, whose effects on in-memory state must be forgotten.
        loop {
            let mut session = RoutingSession::new(settings, config, &producer, &consumer, metrics);
            match session.route_until_failure(shutdown) {
                Ok(()) => return Ok(()),
                Err(TransactionFailure::AbortAndRewind(error)) => {
                    consecutive_aborts = if session.committed_batches > 0 { 1 } else { consecutive_aborts + 1 };
                    // Its states and the records of its batch go before the abort.
                    drop(session);
                    metrics.transaction_aborted(consecutive_aborts);
                    warn!(
                        error = format!("{error:#}"),
                        consecutive_aborts, "transaction aborted; rewinding to the last committed offsets"
                    );
                    // Aborted before the consumer does anything else: reading the committed
                    // offsets below (require_stable) would wait for this very transaction if it
                    // carries offsets.
                    abort_transaction(&producer, KAFKA_TIMEOUT).context("failed to abort transaction")?;
                    // The consumer stays in the group. Leaving and joining again would make the
                    // whole group rebalance twice (the partitions of this instance would move
                    // away and back, their state recovered twice), and closing a consumer blocks
                    // in rust-rdkafka's drop until librdkafka has left the group, polled in 100 ms
                    // steps, up to the session timeout when the coordinator is unreachable.
                    // A failure that repeats (an output the broker keeps refusing, a broker in
                    // trouble) is retried with growing pauses: rewriting the same batch at full
                    // speed only adds aborted records to the log and load to the broker.
                    pause_unless_shutdown(abort_backoff.pause_after(consecutive_aborts), shutdown);
                    match rewind_to_committed_offsets(&consumer) {
                        Ok(rewound) => info!(partitions = rewound, "inbound consumer rewound to the committed offsets"),
                        Err(rewind_error) => {
                            warn!(
                                error = format!("{rewind_error:#}"),
                                "cannot rewind the inbound consumer; rejoining the group with a new one"
                            );
                            break;
                        }
                    }
                }
                Err(TransactionFailure::Fatal(error)) => {
                    return Err(error.context("router stopped on a fatal kafka error"));
                }
            }
        }
    }
    Ok(())
}

/// The pauses before retrying after aborted transactions: none after the first abort of a
/// series (a one-off failure is retried at once), then 100 ms doubling up to 5 s for each
/// further abort in a row. A committed batch ends the series.
struct AbortBackoff {
    /// The pauses still ahead in the current series; `None` before its second abort.
    pauses_opt: Option<backon::ExponentialBackoff>,
}

impl AbortBackoff {
    fn new() -> Self {
        AbortBackoff { pauses_opt: None }
    }

    /// The pause before the next attempt, `consecutive_aborts` (at least 1) having failed in a
    /// row.
    fn pause_after(&mut self, consecutive_aborts: u32) -> Duration {
        use backon::BackoffBuilder;
        if consecutive_aborts <= 1 {
            self.pauses_opt = None;
            return Duration::ZERO;
        }
        let pauses = self.pauses_opt.get_or_insert_with(|| {
            backon::ExponentialBuilder::new()
                .with_min_delay(Duration::from_millis(100))
                .with_factor(2.0)
                .with_max_delay(Duration::from_secs(5))
                .without_max_times()
                .build()
        });
        let pause = pauses.next().unwrap_or(Duration::from_secs(5));
        // backon scales in f32 seconds, off by nanoseconds: the pauses are whole milliseconds.
        Duration::from_millis(pause.as_secs_f64().mul_add(1e3, 0.5) as u64)
    }
}

/// Sleeps for `pause`, in short steps so that a shutdown is not held up.
fn pause_unless_shutdown(pause: Duration, shutdown: &AtomicBool) {
    let until = Instant::now() + pause;
    while !shutdown.load(Ordering::Relaxed) && Instant::now() < until {
        std::thread::sleep(until.saturating_duration_since(Instant::now()).min(Duration::from_millis(50)));
    }
}

/// How often librdkafka reports the inbound consumer's statistics (lag per partition).
const CONSUMER_STATISTICS_INTERVAL: Duration = Duration::from_secs(5);

/// A new member of the router group, subscribed to the inbound topic.
fn subscribe_to_inbound(
    settings: &RouterSettings,
    metrics: &Arc<RouterMetrics>,
) -> anyhow::Result<BaseConsumer<RebalanceTracker>> {
    let mut consumer_config = kafka::group_consumer_config(
        &settings.brokers,
        &format!("router-{}", settings.instance_id),
        &settings.group_id,
    );
    // Incremental rebalancing: when an instance joins or leaves, only the partitions that change
    // owner are revoked (an eager rebalance would make every instance recover the state of every
    // partition before routing again). Partitions an instance keeps keep their in-memory state:
    // nobody else can have routed them meanwhile.
    consumer_config.set("partition.assignment.strategy", "cooperative-sticky");
    consumer_config.set("statistics.interval.ms", CONSUMER_STATISTICS_INTERVAL.as_millis().to_string());
    for (key, value) in &settings.consumer_overrides {
        consumer_config.set(key, value);
    }
    let consumer: BaseConsumer<RebalanceTracker> = consumer_config
        .create_with_context(RebalanceTracker {
            revoked_during_poll: Mutex::default(),
            inbound_topic: settings.topics.inbound.clone(),
            metrics: metrics.clone(),
        })
        .context("failed to create inbound consumer")?;
    consumer.subscribe(&[&settings.topics.inbound]).context("failed to subscribe to inbound topic")?;
    Ok(consumer)
}

/// Moves the consumer back to the group's committed offsets on every assigned partition, so the
/// records of an aborted transaction are consumed again (with state rebuilt from the committed
/// output). Returns how many partitions were moved.
///
/// Records already fetched from before the seek are discarded by librdkafka (a seek bumps the
/// partition's fetch version). A partition whose fetch has not started yet (its committed offset
/// is still being looked up after an assignment) or that is being stopped (revoked) handed out
/// nothing since it was assigned, so it is left alone.
fn rewind_to_committed_offsets(consumer: &BaseConsumer<RebalanceTracker>) -> anyhow::Result<usize> {
    let assignment = consumer.assignment().context("failed to read the consumer's assignment")?;
    if assignment.count() == 0 {
        return Ok(0);
    }
    // `read_committed` makes librdkafka ask with require_stable: an open transaction covering
    // a partition (a fenced predecessor's) is waited for.
    let committed =
        consumer.committed_offsets(assignment, KAFKA_TIMEOUT).context("failed to read the committed offsets")?;
    let mut targets = TopicPartitionList::new();
    for element in committed.elements() {
        element
            .error()
            .with_context(|| format!("failed to read the committed offset of partition {}", element.partition()))?;
        let target = match element.offset() {
            Offset::Offset(offset) => Offset::Offset(offset),
            // Nothing committed yet: where `auto.offset.reset=earliest` started it.
            _ => Offset::Beginning,
        };
        targets.add_partition_offset(element.topic(), element.partition(), target)?;
    }
    let sought = consumer.seek_partitions(targets, KAFKA_TIMEOUT).context("failed to seek to the committed offsets")?;
    let mut rewound = 0;
    for element in sought.elements() {
        match element.error() {
            Ok(()) => rewound += 1,
            // (rust-rdkafka reports every per-partition error of a list as `OffsetFetch`.)
            Err(KafkaError::OffsetFetch(RDKafkaErrorCode::State | RDKafkaErrorCode::PreviousInProgress)) => {}
            Err(error) => {
                return Err(error).with_context(|| format!("failed to seek partition {}", element.partition()));
            }
        }
    }
    Ok(rewound)
}

/// Routing with one consumer from its subscription (or its latest rewind) until shutdown or the
/// first failed transaction: the partitions' states, the compiled config, and the batch loop.
///
/// A session ends with a failed transaction, and with it every in-memory state that the
/// aborted transaction may have changed: the next session recovers from the committed output.
struct RoutingSession<'run, 'consumer> {
    settings: &'run RouterSettings,
    config_store: &'run ConfigStore,
    consumer: &'consumer BaseConsumer<RebalanceTracker>,
    metrics: &'run RouterMetrics,
    output: Output<'run>,
    state_by_partition: HashMap<i32, PartitionState>,
    /// The config compiled for routing, with the snapshot it was compiled from: compiled once
    /// per change, not per decision.
    compiled_opt: Option<(Arc<ConfigSnapshot>, RouterConfig)>,
    throughput: Throughput,
    /// Batches this session committed.
    committed_batches: u64,
    /// Reused across batches: the records of one batch, and one output's encoding.
    batch: Vec<BorrowedMessage<'consumer>>,
    encode_buffer: Vec<u8>,
}

impl<'run, 'consumer> RoutingSession<'run, 'consumer> {
    fn new(
        settings: &'run RouterSettings,
        config_store: &'run ConfigStore,
        producer: &'run BaseProducer,
        consumer: &'consumer BaseConsumer<RebalanceTracker>,
        metrics: &'run RouterMetrics,
    ) -> Self {
        RoutingSession {
            settings,
            config_store,
            consumer,
            metrics,
            output: Output { settings, producer },
            state_by_partition: HashMap::new(),
            compiled_opt: None,
            throughput: Throughput::new(),
            committed_batches: 0,
            batch: Vec::with_capacity(settings.max_batch_records),
            encode_buffer: Vec::with_capacity(4096),
        }
    }

    /// Routes batch after batch, one transaction each, until `shutdown` is set (`Ok`) or a
    /// transaction fails.
    fn route_until_failure(&mut self, shutdown: &AtomicBool) -> Result<(), TransactionFailure> {
        while !shutdown.load(Ordering::Relaxed) {
            let poll_started = Instant::now();
            let revoked_partitions =
                poll_batch(self.consumer, &mut self.batch, self.settings.max_batch_records, self.settings.batch_linger);
            self.process_revoke_partitions(&revoked_partitions);
            if self.batch.is_empty() {
                continue;
            }
            self.route_batch(poll_started)?;
        }
        Ok(())
    }

    /// Partitions taken away: their state goes (someone else may route them before they come
    /// back, so it is recovered again then).
    fn process_revoke_partitions(&mut self, revoked_partitions: &[i32]) {
        for partition in revoked_partitions {
            self.state_by_partition.remove(partition);
        }
    }

    /// Compiles the store's current config snapshot for routing, unless that one already is.
    fn compile_config(&mut self) {
        let snapshot_now = self.config_store.snapshot();
        if self.compiled_opt.as_ref().is_none_or(|(source, _)| !Arc::ptr_eq(source, &snapshot_now)) {
            self.compiled_opt = Some((snapshot_now.clone(), RouterConfig::new(snapshot_now)));
        }
    }

    /// Routes the polled batch in one transaction, with the consumed offsets, and commits it.
    fn route_batch(&mut self, poll_started: Instant) -> Result<(), TransactionFailure> {
        let route_started = Instant::now();
        let (settings, output) = (self.settings, self.output);
        self.compile_config();
        output.producer.begin_transaction().map_err(classify)?;
        // Next offset per partition, turned into the offsets list once per batch (adding to
        // a TopicPartitionList per record is a linear search in librdkafka: quadratic).
        let mut next_offset_by_partition: HashMap<i32, i64> = HashMap::new();
        let mut produced = 0usize;
        let mut dead_lettered = 0u64;
        let mut snapshotted: Vec<i32> = Vec::new();
        let load_started = Instant::now();
        recovery::recover_missing_states(settings, &self.batch, &mut self.state_by_partition, self.metrics)
            .map_err(TransactionFailure::AbortAndRewind)?;
        let load_ms = load_started.elapsed().as_secs_f64() * 1e3;
        let router_config = &self.compiled_opt.as_ref().expect("compiled above").1;
        let record_count = self.batch.len();
        // Each record is released to librdkafka right after it is routed (drain), which lets
        // the allocator reuse its memory (and its parsed headers') for the next one.
        for record in self.batch.drain(..) {
            let partition = record.partition();
            let partition_state =
                self.state_by_partition.get_mut(&partition).expect("state recovered before the batch");
            // The snapshot holds the state before this batch's first record of the partition:
            // exactly what the committed output below the current end describes.
            if !snapshotted.contains(&partition) && snapshot_due(settings, partition_state) {
                output.write_snapshot(partition, record.offset(), partition_state)?;
                snapshotted.push(partition);
            }
            partition_state.records_since_snapshot += 1;
            match route_record(output, &mut partition_state.state, router_config, &record, &mut self.encode_buffer)? {
                Routed::Events(count) => produced += count,
                Routed::DeadLettered => dead_lettered += 1,
            }
            next_offset_by_partition.insert(partition, record.offset() + 1);
        }
        let mut next_offsets = TopicPartitionList::new();
        for (partition, next_offset) in &next_offset_by_partition {
            next_offsets
                .add_partition_offset(&settings.topics.inbound, *partition, Offset::Offset(*next_offset))
                .map_err(|error| TransactionFailure::Fatal(error.into()))?;
        }
        let group_metadata = self
            .consumer
            .group_metadata()
            .context("consumer has no group metadata")
            .map_err(TransactionFailure::Fatal)?;
        let offsets_started = Instant::now();
        output.producer.send_offsets_to_transaction(&next_offsets, &group_metadata, KAFKA_TIMEOUT).map_err(classify)?;
        let acks_started = Instant::now();
        await_deliveries(output.producer, KAFKA_TIMEOUT)?;
        let commit_started = Instant::now();
        commit_with_retries(output.producer)?;
        tracing::debug!(
            records = record_count,
            produced,
            poll_ms = (route_started - poll_started).as_secs_f64() * 1e3,
            route_ms = (offsets_started - route_started).as_secs_f64() * 1e3,
            acks_ms = (commit_started - acks_started).as_secs_f64() * 1e3,
            offsets_ms = (acks_started - offsets_started).as_secs_f64() * 1e3,
            commit_ms = commit_started.elapsed().as_secs_f64() * 1e3,
            load_ms,
            "batch committed"
        );
        self.throughput.record(record_count, produced);
        self.committed_batches += 1;
        let figures = BatchFigures {
            inputs: record_count as u64,
            events: produced as u64,
            dead_lettered,
            snapshots: snapshotted.len() as u64,
        };
        self.metrics.batch_committed(&figures, poll_started.elapsed());
        for partition in next_offset_by_partition.keys() {
            if let Some(partition_state) = self.state_by_partition.get(partition) {
                self.metrics.record_open_conversations(*partition, partition_state.state.conversations.len());
            }
        }
        Ok(())
    }
}

fn snapshot_due(settings: &RouterSettings, partition_state: &PartitionState) -> bool {
    partition_state.records_since_snapshot >= settings.snapshot_every_records
        || (partition_state.records_since_snapshot > 0
            && partition_state.last_snapshot_at.elapsed() >= settings.snapshot_every)
}

/// Where the router writes inside the open transaction: decided events (conversations topic),
/// dead letters and state snapshots.
#[derive(Clone, Copy)]
struct Output<'run> {
    settings: &'run RouterSettings,
    producer: &'run BaseProducer,
}

impl Output<'_> {
    /// Writes the partition's state as chunks plus a manifest to the snapshot topic, inside the
    /// open transaction: if the batch aborts, so does the snapshot.
    fn write_snapshot(
        &self,
        partition: i32,
        input_next_offset: i64,
        partition_state: &mut PartitionState,
    ) -> Result<(), TransactionFailure> {
        let started = Instant::now();
        // Everything committed so far in the output partition is below its high watermark; this
        // instance is the partition's only writer and its earlier transactions are committed.
        let (_, output_next_offset) = self
            .producer
            .client()
            .fetch_watermarks(&self.settings.topics.conversations, partition, KAFKA_TIMEOUT)
            .context("failed to read the output partition's end for a snapshot")
            .map_err(TransactionFailure::AbortAndRewind)?;
        let bytes = snapshot::encode_state(&partition_state.state);
        let chunks = snapshot::split_into_chunks(&bytes);
        let topic = self.settings.snapshot_topic();
        let no_headers = OwnedHeaders::new;
        for (index, chunk) in chunks.iter().enumerate() {
            let value = snapshot::chunk_value(input_next_offset, index as u32, chunk);
            let key = snapshot::chunk_key(index as u32);
            self.send_with_backpressure(&topic, Some(partition), key.as_bytes(), Some(&value), no_headers())?;
        }
        let chunk_count = chunks.len() as u32;
        let stale_chunks = partition_state.last_chunk_count.saturating_sub(chunk_count);
        for index in chunk_count..partition_state.last_chunk_count {
            // A tombstone: compaction forgets the chunk of a larger earlier snapshot.
            let key = snapshot::chunk_key(index);
            self.send_with_backpressure(&topic, Some(partition), key.as_bytes(), None, no_headers())?;
        }
        let manifest = Manifest {
            input_next_offset,
            output_next_offset,
            chunk_count,
            records_before_manifest: chunk_count + stale_chunks,
            state_bytes: bytes.len() as u64,
        };
        let manifest_key = snapshot::MANIFEST_KEY.as_bytes();
        self.send_with_backpressure(&topic, Some(partition), manifest_key, Some(&manifest.encode()), no_headers())?;
        partition_state.last_chunk_count = chunk_count;
        partition_state.records_since_snapshot = 0;
        partition_state.last_snapshot_at = Instant::now();
        info!(
            partition,
            input_next_offset,
            output_next_offset,
            chunk_count,
            state_bytes = bytes.len(),
            conversations = partition_state.state.conversations.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "router state snapshot written"
        );
        Ok(())
    }

    /// One decided event: to the conversations topic at its cause's partition, or to the
    /// outbound topic at the partition its key hashes to (the producer's murmur2 partitioner,
    /// the same as every other producer of that topic).
    fn produce(
        &self,
        partition: i32,
        event: &Envelope,
        trace_headers: &TraceContextHeaders,
        encode_buffer: &mut Vec<u8>,
    ) -> Result<(), TransactionFailure> {
        // librdkafka copies the payload on send, so one buffer serves every output.
        encode_buffer.clear();
        envelope::encode_into(event, encode_buffer);
        let headers = envelope_headers(trace_headers, event);
        let topics = &self.settings.topics;
        let (topic, partition_opt) = match decide::destination(event) {
            Destination::Conversations => (&topics.conversations, Some(partition)),
            Destination::Outbound => (&topics.outbound, None),
        };
        self.send_with_backpressure(topic, partition_opt, event.partition_key.as_bytes(), Some(encode_buffer), headers)
    }

    /// A record that cannot be routed goes to the dead-letter topic, in the same transaction,
    /// with its original key, bytes and headers plus the reason. The router keeps going.
    fn dead_letter(
        &self,
        record: &BorrowedMessage<'_>,
        span: &tracing::Span,
        reason: &str,
    ) -> Result<(), TransactionFailure> {
        span.in_scope(|| {
            warn!(reason, partition = record.partition(), offset = record.offset(), "dead-lettering inbound record");
        });
        let source = format!("{}/{}/{}", record.topic(), record.partition(), record.offset());
        let headers = kafka::copy_headers(
            record.headers(),
            &[(header::DEADLETTER_REASON, reason), (header::DEADLETTER_SOURCE, &source)],
        );
        let topics = &self.settings.topics;
        let partition = record.partition() % topics.declared_partitions(&topics.deadletter).unwrap_or(1).max(1);
        let payload = record.payload().unwrap_or_default();
        self.send_with_backpressure(
            &topics.deadletter,
            Some(partition),
            record.key().unwrap_or_default(),
            Some(payload),
            headers,
        )
    }

    /// Enqueues one record (`payload_opt` `None`: a tombstone) to `partition_opt`, or where the
    /// key hashes to when `None`. When librdkafka's queue is full, delivery reports are served
    /// to make room and the send is retried.
    fn send_with_backpressure(
        &self,
        topic: &str,
        partition_opt: Option<i32>,
        key: &[u8],
        payload_opt: Option<&[u8]>,
        headers: OwnedHeaders,
    ) -> Result<(), TransactionFailure> {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).key(key).headers(headers);
        if let Some(partition) = partition_opt {
            record = record.partition(partition);
        }
        if let Some(payload) = payload_opt {
            record = record.payload(payload);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    self.producer.poll(Duration::from_millis(10));
                    record = returned;
                }
                Err((error, _)) => {
                    let what = if payload_opt.is_some() { "record" } else { "tombstone" };
                    return Err(TransactionFailure::AbortAndRewind(
                        anyhow::Error::new(error).context(format!("failed to enqueue {what}")),
                    ));
                }
            }
        }
    }
}

/// What routing one record did.
enum Routed {
    /// Decided; this many events were produced (none for a duplicate).
    Events(usize),
    /// Could not be routed; sent to the dead-letter topic.
    DeadLettered,
}

/// Routes one record: decide, evolve, produce.
fn route_record(
    output: Output<'_>,
    state: &mut RouterState,
    config: &RouterConfig,
    record: &BorrowedMessage<'_>,
    encode_buffer: &mut Vec<u8>,
) -> Result<Routed, TransactionFailure> {
    let span =
        info_span!("route", partition = record.partition(), offset = record.offset(), event_id = tracing::field::Empty);
    adopt_trace_context(&span, record.headers());
    // The span is not entered: nothing below logs on the routing path (the core is pure), and
    // entering/leaving costs two clock reads and registry lookups per record. The dead-letter
    // path logs inside it.

    let input = match envelope::decode(record.payload()) {
        Ok(input) => input,
        Err(error) => {
            return output.dead_letter(record, &span, &error.to_string()).map(|()| Routed::DeadLettered);
        }
    };
    span.record("event_id", input.event_id.as_str());
    decide::align_state(state, config);
    let decided = match decide::decide(state, config, input) {
        Ok(decided) => decided,
        Err(rejection) => {
            return output.dead_letter(record, &span, &rejection.to_string()).map(|()| Routed::DeadLettered);
        }
    };
    if decided.is_empty() {
        return Ok(Routed::Events(0));
    }
    // B6: every decision says where its cause was read (topic without the environment prefix).
    let prefix = output.settings.topics.prefix.as_str();
    let source_topic = record.topic().strip_prefix(prefix).unwrap_or(record.topic());
    // Every output of this input carries the route span's trace context: computed once.
    let trace_headers = TraceContextHeaders::of(&span);
    let count = decided.len();
    for mut event in decided {
        decide::evolve(state, &event);
        event.source_position = Some(KafkaPosition {
            topic: source_topic.to_owned(),
            partition: record.partition(),
            offset: record.offset(),
        });
        output.produce(record.partition(), &event, &trace_headers, encode_buffer)?;
    }
    Ok(Routed::Events(count))
}

/// Waits until every record produced so far is acknowledged, in 1 ms steps.
///
/// `commit_transaction` flushes first anyway, but rust-rdkafka's `flush` polls in fixed
/// 100 ms steps once anything is in flight (its `poll` runs to its deadline even after an
/// event): a 100 ms floor on every transaction. Each short `flush` here also tells librdkafka
/// to send what it holds back for `linger.ms`. After this the commit's own flush finds nothing
/// in flight. A failed delivery is not lost: librdkafka makes the transaction abortable, so
/// the commit fails.
fn await_deliveries(producer: &BaseProducer, timeout: Duration) -> Result<(), TransactionFailure> {
    let deadline = Instant::now() + timeout;
    loop {
        match producer.flush(Duration::from_millis(1)) {
            Ok(()) => return Ok(()),
            Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) if Instant::now() < deadline => {}
            Err(error) => {
                return Err(TransactionFailure::AbortAndRewind(
                    anyhow::Error::new(error).context("produced records were not acknowledged"),
                ));
            }
        }
    }
}

/// Aborts the open transaction, serving the delivery reports of the records it purges.
///
/// librdkafka's abort purges the records still queued and then waits until no record is
/// outstanding. A purged record stays outstanding until its (failed) delivery report is served,
/// and rust-rdkafka delivers reports as events that only this thread's `poll` serves: its
/// `commit_transaction` flushes first, its `abort_transaction` does not. So an abort with records
/// still queued (a failure in the middle of a batch: a send refused, the offsets refused after a
/// rebalance) would block for its whole timeout and then fail, stopping the router. The abort
/// is resumable: each attempt waits one step, the reports are served, and the next attempt
/// carries on where the last one stopped.
fn abort_transaction(producer: &BaseProducer, timeout: Duration) -> KafkaResult<()> {
    const STEP: Duration = Duration::from_millis(10);
    let deadline = Instant::now() + timeout;
    loop {
        match producer.abort_transaction(STEP) {
            Ok(()) => return Ok(()),
            Err(KafkaError::Transaction(error)) if error.is_retriable() && Instant::now() < deadline => {
                producer.poll(Duration::from_millis(1));
            }
            // No transaction to abort: the failure was `begin_transaction`'s own (the producer
            // is still ready), so rewinding is all that is left to do.
            Err(KafkaError::Transaction(error)) if error.code() == RDKafkaErrorCode::State && !error.is_fatal() => {
                return Ok(());
            }
            Err(error) => return Err(error),
        }
    }
}

/// Commits the open transaction, retrying a retriable failure at once, up to 5 times.
fn commit_with_retries(producer: &BaseProducer) -> Result<(), TransactionFailure> {
    use backon::BlockingRetryable;
    let mut attempts = 0u32;
    (|| producer.commit_transaction(KAFKA_TIMEOUT))
        .retry(backon::ConstantBuilder::new().with_delay(Duration::ZERO).with_max_times(5))
        .when(|error| matches!(error, KafkaError::Transaction(transaction_error) if transaction_error.is_retriable()))
        .notify(|error, _| {
            attempts += 1;
            warn!(%error, attempts, "retrying transaction commit");
        })
        .call()
        .map_err(classify)
}

/// Classifies a transactional API error (rust-rdkafka's retriable / abort / fatal split).
fn classify(error: KafkaError) -> TransactionFailure {
    match &error {
        KafkaError::Transaction(transaction_error) if transaction_error.is_fatal() => {
            TransactionFailure::Fatal(anyhow::Error::new(error))
        }
        _ => TransactionFailure::AbortAndRewind(anyhow::Error::new(error)),
    }
}

/// Polls up to `max_records` into `batch`, waiting at most `linger` after the first one.
/// Returns the partitions revoked meanwhile (rebalance callbacks run inside `poll`); `batch`
/// keeps none of their records polled before the revocation.
///
/// Routing such a record would be routing a partition this instance no longer owns: its new
/// owner starts from the committed offset, and nothing stops this instance from committing the
/// record's offset too (a transactional offset commit is checked against the group generation
/// and member, not against who owns the partition), so both would route it. And a partition
/// revoked and assigned back is fetched again from its committed offset, which would put the
/// same records in the batch twice.
fn poll_batch<'consumer>(
    consumer: &'consumer BaseConsumer<RebalanceTracker>,
    batch: &mut Vec<BorrowedMessage<'consumer>>,
    max_records: usize,
    linger: Duration,
) -> Vec<i32> {
    let mut revoked_partitions = Vec::new();
    let mut deadline_opt: Option<Instant> = None;
    while batch.len() < max_records {
        let timeout = match deadline_opt {
            None => Duration::from_millis(100),
            Some(deadline) => deadline.saturating_duration_since(Instant::now()),
        };
        let polled_opt = consumer.poll(timeout);
        let revoked_now = std::mem::take(&mut *consumer.context().revoked_during_poll.lock().expect("lock poisoned"));
        if !revoked_now.is_empty() {
            let dropped = drop_records_of_revoked_partitions(batch, &revoked_now, BorrowedMessage::partition);
            if dropped > 0 {
                info!(dropped, revoked = ?revoked_now, "dropped records polled before their partitions were revoked");
            }
            if batch.is_empty() {
                deadline_opt = None;
            }
            revoked_partitions.extend(revoked_now);
        }
        match polled_opt {
            Some(Ok(record)) => {
                batch.push(record);
                deadline_opt.get_or_insert_with(|| Instant::now() + linger);
            }
            Some(Err(error)) => {
                warn!(%error, "inbound consumer error (librdkafka retries)");
                break;
            }
            // Nothing within the timeout, or a poll that served an event (a rebalance) instead
            // of a record: the batch ends here.
            None => break,
        }
    }
    revoked_partitions
}

/// Removes from `batch` the records of `revoked_partitions` (all polled before the revocation),
/// keeping the others in order; returns how many were removed.
///
/// The router's group uses cooperative assignment (`cooperative-sticky`): only the partitions
/// that move are revoked, and the rest of the batch stays valid. (Under eager assignment a
/// rebalance revokes every partition and empties the batch.)
fn drop_records_of_revoked_partitions<Record>(
    batch: &mut Vec<Record>,
    revoked_partitions: &[i32],
    partition_of: impl Fn(&Record) -> i32,
) -> usize {
    let before = batch.len();
    batch.retain(|record| !revoked_partitions.contains(&partition_of(record)));
    before - batch.len()
}

/// Logs routed throughput every 10 seconds.
struct Throughput {
    window_started: Instant,
    consumed: usize,
    produced: usize,
}

impl Throughput {
    fn new() -> Self {
        Throughput { window_started: Instant::now(), consumed: 0, produced: 0 }
    }

    fn record(&mut self, consumed: usize, produced: usize) {
        self.consumed += consumed;
        self.produced += produced;
        let elapsed = self.window_started.elapsed();
        if elapsed >= Duration::from_secs(10) {
            let per_second = self.consumed as f64 / elapsed.as_secs_f64();
            info!(
                consumed = self.consumed,
                produced = self.produced,
                inbound_per_second = per_second as u64,
                "routing throughput"
            );
            *self = Throughput::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{AbortBackoff, drop_records_of_revoked_partitions};

    #[test]
    fn a_repeated_abort_is_retried_after_growing_pauses_a_one_off_at_once() {
        let mut backoff = AbortBackoff::new();
        let pauses: Vec<Duration> = (1..=9).map(|aborts| backoff.pause_after(aborts)).collect();
        assert_eq!(pauses[0], Duration::ZERO, "a one-off failure is retried at once");
        assert_eq!(pauses[1], Duration::from_millis(100));
        assert_eq!(pauses[2], Duration::from_millis(200));
        assert_eq!(pauses[6], Duration::from_millis(3200));
        assert!(pauses.windows(2).all(|pair| pair[0] <= pair[1]));
        assert_eq!(pauses[8], Duration::from_secs(5), "never longer than 5 s");
        assert!((10..10_000).all(|aborts| backoff.pause_after(aborts) == Duration::from_secs(5)));
        assert_eq!(backoff.pause_after(1), Duration::ZERO, "a commit in between starts a new series");
        assert_eq!(backoff.pause_after(2), Duration::from_millis(100));
    }

    /// A polled record as far as batch filtering cares: (partition, offset).
    type Polled = (i32, i64);

    /// What one `consumer.poll` gave `poll_batch`: the revocations its rebalance callback saw
    /// (served before anything it returns), then possibly a record.
    enum Poll {
        Record(i32, i64),
        Revoke(&'static [i32]),
    }

    /// Replays polls the way `poll_batch` handles them.
    fn assemble(polls: &[Poll]) -> Vec<Polled> {
        let mut batch = Vec::new();
        for poll in polls {
            match poll {
                Poll::Record(partition, offset) => batch.push((*partition, *offset)),
                Poll::Revoke(partitions) => {
                    drop_records_of_revoked_partitions(&mut batch, partitions, |record| record.0);
                }
            }
        }
        batch
    }

    #[test]
    fn records_of_revoked_partitions_leave_the_batch_and_the_rest_keeps_its_order() {
        let mut batch: Vec<Polled> = vec![(0, 10), (1, 20), (0, 11), (2, 30), (1, 21)];
        let dropped = drop_records_of_revoked_partitions(&mut batch, &[1], |record| record.0);
        assert_eq!(dropped, 2);
        assert_eq!(batch, [(0, 10), (0, 11), (2, 30)]);
    }

    #[test]
    fn an_eager_revocation_of_every_partition_empties_the_batch() {
        let mut batch: Vec<Polled> = vec![(0, 10), (1, 20), (2, 30)];
        let dropped = drop_records_of_revoked_partitions(&mut batch, &[0, 1, 2, 3], |record| record.0);
        assert_eq!(dropped, 3);
        assert!(batch.is_empty());
    }

    #[test]
    fn a_revocation_of_partitions_without_records_in_the_batch_changes_nothing() {
        let mut batch: Vec<Polled> = vec![(0, 10), (2, 30)];
        assert_eq!(drop_records_of_revoked_partitions(&mut batch, &[1, 5], |record| record.0), 0);
        assert_eq!(drop_records_of_revoked_partitions(&mut batch, &[], |record| record.0), 0);
        assert_eq!(batch, [(0, 10), (2, 30)]);
    }

    #[test]
    fn a_partition_revoked_and_assigned_back_mid_batch_is_in_the_batch_once_from_its_committed_offset() {
        // Partition 3 is revoked after offsets 100-102 were polled and comes back: its fetch
        // restarts at the committed offset 100. Partition 4 stays (cooperative assignment).
        let batch = assemble(&[
            Poll::Record(3, 100),
            Poll::Record(4, 7),
            Poll::Record(3, 101),
            Poll::Record(3, 102),
            Poll::Revoke(&[3]),
            Poll::Record(3, 100),
            Poll::Record(3, 101),
            Poll::Record(4, 8),
            Poll::Record(3, 102),
            Poll::Record(3, 103),
        ]);
        assert_eq!(batch, [(4, 7), (3, 100), (3, 101), (4, 8), (3, 102), (3, 103)]);
    }

    #[test]
    fn records_polled_after_a_revocation_of_another_partition_stay() {
        let batch = assemble(&[Poll::Record(1, 5), Poll::Revoke(&[1, 2]), Poll::Record(2, 9), Poll::Record(6, 1)]);
        assert_eq!(batch, [(2, 9), (6, 1)]);
    }
}
