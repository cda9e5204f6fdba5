//! The router's Kafka shell: consume inbound events, call the pure core, and write the decided
//! events together with the consumed offsets in one Kafka transaction (exactly-once
//! consume-transform-produce).
//!
//! Keying (docs/router.md): inbound events are keyed by account, so one partition holds whole
//! accounts and the instance that owns input partition `p` is the only writer of the routing
//! state of those accounts. Its output goes to the same partition index `p` of the
//! conversations topic, which therefore is also the state's changelog: a newly assigned
//! partition's state is rebuilt by folding that output partition with `core::evolve`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use switchboard_proto::events::v1::Envelope;
use switchboard_runtime::config_store::ConfigStore;
use switchboard_runtime::envelope;
use switchboard_runtime::kafka::{self, header};
use switchboard_runtime::telemetry::{adopt_trace_context, trace_context_headers};
use switchboard_runtime::topics::Topics;
use tracing::{info, info_span, warn};

use crate::core::{self, RouterState};

const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct RouterSettings {
    pub brokers: String,
    pub topics: Topics,
    pub group_id: String,
    /// Stable per instance: it is the transactional id's suffix, so a restarted instance
    /// fences its predecessor's unfinished transaction at once.
    pub instance_id: String,
    pub max_batch_records: usize,
    pub batch_linger: Duration,
}

impl RouterSettings {
    pub fn new(brokers: &str, topics: Topics, instance_id: &str) -> Self {
        RouterSettings {
            brokers: brokers.to_owned(),
            group_id: format!("{}router", topics.prefix),
            topics,
            instance_id: instance_id.to_owned(),
            max_batch_records: 2_000,
            batch_linger: Duration::from_millis(5),
        }
    }
}

/// Remembers partitions taken away by a rebalance, so their state is dropped (and rebuilt from
/// the log if they come back: someone else may have routed them meanwhile).
#[derive(Default)]
struct RebalanceTracker {
    revoked_partitions: Mutex<Vec<i32>>,
}

impl ClientContext for RebalanceTracker {}

impl ConsumerContext for RebalanceTracker {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            let mut revoked = self.revoked_partitions.lock().expect("lock poisoned");
            revoked.extend(partitions.elements().iter().map(|element| element.partition()));
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
pub fn run_router(settings: &RouterSettings, config: &ConfigStore, shutdown: &AtomicBool) -> anyhow::Result<()> {
    let transactional_id = format!("{}-{}", settings.group_id, settings.instance_id);
    let producer: BaseProducer = kafka::transactional_producer_config(
        &settings.brokers,
        &format!("router-{}", settings.instance_id),
        &transactional_id,
    )
    .create()
    .context("failed to create transactional producer")?;
    producer.init_transactions(KAFKA_TIMEOUT).context("failed to initialise kafka transactions")?;
    info!(transactional_id, "router producer ready");

    while !shutdown.load(Ordering::Relaxed) {
        // Each pass starts from the committed offsets with empty state. A pass ends only
        // after an aborted transaction, whose effects on in-memory state must be forgotten.
        match route_until_failure(settings, config, &producer, shutdown) {
            Ok(()) => return Ok(()),
            Err(TransactionFailure::AbortAndRewind(error)) => {
                warn!(error = format!("{error:#}"), "transaction aborted; rewinding to the last committed offsets");
                if let Err(abort_error) = producer.abort_transaction(KAFKA_TIMEOUT) {
                    return Err(abort_error).context("failed to abort transaction");
                }
            }
            Err(TransactionFailure::Fatal(error)) => return Err(error.context("router stopped on a fatal kafka error")),
        }
    }
    Ok(())
}

fn route_until_failure(
    settings: &RouterSettings,
    config: &ConfigStore,
    producer: &BaseProducer,
    shutdown: &AtomicBool,
) -> Result<(), TransactionFailure> {
    let consumer: BaseConsumer<RebalanceTracker> = kafka::group_consumer_config(
        &settings.brokers,
        &format!("router-{}", settings.instance_id),
        &settings.group_id,
    )
    .create_with_context(RebalanceTracker::default())
    .context("failed to create inbound consumer")
    .map_err(TransactionFailure::Fatal)?;
    consumer
        .subscribe(&[&settings.topics.inbound])
        .context("failed to subscribe to inbound topic")
        .map_err(TransactionFailure::Fatal)?;

    let mut state_by_partition: HashMap<i32, RouterState> = HashMap::new();
    let mut stats = Throughput::new();
    while !shutdown.load(Ordering::Relaxed) {
        let batch = poll_batch(&consumer, settings.max_batch_records, settings.batch_linger);
        for partition in consumer.context().revoked_partitions.lock().expect("lock poisoned").drain(..) {
            state_by_partition.remove(&partition);
        }
        if batch.is_empty() {
            continue;
        }
        let config_snapshot = config.snapshot();
        producer.begin_transaction().map_err(classify)?;
        let mut next_offsets = TopicPartitionList::new();
        let mut produced = 0usize;
        for record in &batch {
            let partition = record.partition();
            let state = match state_by_partition.entry(partition) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => {
                    entry.insert(load_partition_state(settings, partition).map_err(TransactionFailure::AbortAndRewind)?)
                }
            };
            produced += route_record(settings, producer, state, &config_snapshot, record)?;
            next_offsets
                .add_partition_offset(record.topic(), partition, Offset::Offset(record.offset() + 1))
                .map_err(|error| TransactionFailure::Fatal(error.into()))?;
        }
        let group_metadata =
            consumer.group_metadata().context("consumer has no group metadata").map_err(TransactionFailure::Fatal)?;
        producer.send_offsets_to_transaction(&next_offsets, &group_metadata, KAFKA_TIMEOUT).map_err(classify)?;
        commit_with_retries(producer)?;
        stats.record(batch.len(), produced);
    }
    Ok(())
}

/// Routes one record: decide, evolve, produce. Returns how many events it produced.
fn route_record(
    settings: &RouterSettings,
    producer: &BaseProducer,
    state: &mut RouterState,
    config: &switchboard_runtime::config_store::ConfigSnapshot,
    record: &BorrowedMessage<'_>,
) -> Result<usize, TransactionFailure> {
    let span =
        info_span!("route", partition = record.partition(), offset = record.offset(), event_id = tracing::field::Empty);
    adopt_trace_context(&span, record.headers());
    let _entered = span.enter();

    let input = match envelope::decode(record.payload()) {
        Ok(input) => input,
        Err(error) => return dead_letter(settings, producer, record, &error.to_string()).map(|()| 0),
    };
    span.record("event_id", input.event_id.as_str());
    let decided = match core::decide(state, config, &input) {
        Ok(decided) => decided,
        Err(rejection) => return dead_letter(settings, producer, record, &rejection.to_string()).map(|()| 0),
    };
    for event in &decided {
        core::evolve(state, event);
        produce(producer, &settings.topics.conversations, record.partition(), event, &span)?;
    }
    Ok(decided.len())
}

fn produce(
    producer: &BaseProducer,
    topic: &str,
    partition: i32,
    event: &Envelope,
    span: &tracing::Span,
) -> Result<(), TransactionFailure> {
    let payload = envelope::encode(event);
    let event_type = event.payload.as_ref().map_or("none", envelope::payload_name);
    let headers = trace_context_headers(span).insert(Header { key: header::EVENT_TYPE, value: Some(event_type) });
    send_with_backpressure(producer, topic, partition, event.partition_key.as_bytes(), &payload, headers)
}

/// A record that cannot be routed goes to the dead-letter topic, in the same transaction, with
/// its original key, bytes and headers plus the reason. The router keeps going.
fn dead_letter(
    settings: &RouterSettings,
    producer: &BaseProducer,
    record: &BorrowedMessage<'_>,
    reason: &str,
) -> Result<(), TransactionFailure> {
    warn!(reason, partition = record.partition(), offset = record.offset(), "dead-lettering inbound record");
    let source = format!("{}/{}/{}", record.topic(), record.partition(), record.offset());
    let headers = kafka::copy_headers(
        record.headers(),
        &[(header::DEADLETTER_REASON, reason), (header::DEADLETTER_SOURCE, &source)],
    );
    let partition =
        record.partition() % settings.topics.declared_partitions(&settings.topics.deadletter).unwrap_or(1).max(1);
    send_with_backpressure(
        producer,
        &settings.topics.deadletter,
        partition,
        record.key().unwrap_or_default(),
        record.payload().unwrap_or_default(),
        headers,
    )
}

fn send_with_backpressure(
    producer: &BaseProducer,
    topic: &str,
    partition: i32,
    key: &[u8],
    payload: &[u8],
    headers: OwnedHeaders,
) -> Result<(), TransactionFailure> {
    let mut record = BaseRecord::to(topic).partition(partition).key(key).payload(payload).headers(headers);
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                // librdkafka's queue is full: serve delivery reports to make room, then retry.
                producer.poll(Duration::from_millis(10));
                record = returned;
            }
            Err((error, _)) => {
                return Err(TransactionFailure::AbortAndRewind(
                    anyhow::Error::new(error).context("failed to enqueue record"),
                ));
            }
        }
    }
}

fn commit_with_retries(producer: &BaseProducer) -> Result<(), TransactionFailure> {
    let mut attempts = 0;
    loop {
        match producer.commit_transaction(KAFKA_TIMEOUT) {
            Ok(()) => return Ok(()),
            Err(KafkaError::Transaction(error)) if error.is_retriable() && attempts < 5 => {
                attempts += 1;
                warn!(%error, attempts, "retrying transaction commit");
            }
            Err(error) => return Err(classify(error)),
        }
    }
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

/// Polls up to `max_records`, waiting at most `linger` after the first one.
fn poll_batch<'consumer>(
    consumer: &'consumer BaseConsumer<RebalanceTracker>,
    max_records: usize,
    linger: Duration,
) -> Vec<BorrowedMessage<'consumer>> {
    let mut batch = Vec::new();
    let mut deadline_opt: Option<Instant> = None;
    while batch.len() < max_records {
        let timeout = match deadline_opt {
            None => Duration::from_millis(100),
            Some(deadline) => deadline.saturating_duration_since(Instant::now()),
        };
        match consumer.poll(timeout) {
            Some(Ok(record)) => {
                batch.push(record);
                deadline_opt.get_or_insert_with(|| Instant::now() + linger);
            }
            Some(Err(error)) => {
                warn!(%error, "inbound consumer error (librdkafka retries)");
                break;
            }
            None => break,
        }
    }
    batch
}

/// Rebuilds one partition's routing state by folding the router's own committed output.
pub fn load_partition_state(settings: &RouterSettings, partition: i32) -> anyhow::Result<RouterState> {
    let started = Instant::now();
    let reader: BaseConsumer<kafka::ReaderContext> =
        kafka::reader_config(&settings.brokers, &format!("router-{}-state", settings.instance_id))
            .create_with_context(kafka::ReaderContext)
            .context("failed to create state reader")?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(&settings.topics.conversations, partition, Offset::Beginning)?;
    reader.assign(&assignment).context("failed to assign state partition")?;
    let mut state = RouterState::default();
    let mut events = 0u64;
    loop {
        match reader.poll(KAFKA_TIMEOUT) {
            Some(Ok(record)) => match envelope::decode(record.payload()) {
                Ok(event) => {
                    core::evolve(&mut state, &event);
                    events += 1;
                }
                Err(error) => warn!(%error, offset = record.offset(), "skipping undecodable router output record"),
            },
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(error)) => warn!(%error, "state reader error (librdkafka retries)"),
            None => anyhow::bail!("timed out rebuilding router state of partition {partition}"),
        }
    }
    info!(partition, events, elapsed_ms = started.elapsed().as_millis() as u64, "router partition state rebuilt");
    Ok(state)
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
