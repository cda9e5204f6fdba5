//! The projector's pipeline: a reader task turns Kafka records into decoded batches (bounded
//! by size and linger), a writer applies each batch in one PostgreSQL transaction together with
//! the positions it reaches. The two are joined by a channel of capacity one, so reading runs
//! at most one batch ahead of writing: back-pressure instead of unbounded memory (librdkafka's
//! own prefetch is bounded by `queued.max.messages.kbytes`).
//!
//! Partition ownership changes (rebalance, a seek, a schema switch) are tracked with an epoch
//! per partition: every record is stamped with its partition's epoch when read, and the writer
//! drops records of an older epoch (work in flight for a partition this instance no longer owns
//! is aborted, never applied late). Correctness does not rest on that alone: the writer locks
//! each partition's position in PostgreSQL and checks every batch against it, and what it knows
//! it stored against what is stored ([`crate::positions`]): a failed batch is written again,
//! never dropped, and a position the database lost (a crash, a failover) is read again.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use sqlx::PgPool;
use switchboard_runtime::kafka::{self, header};
use switchboard_runtime::telemetry::trace_id_from_traceparent;
use switchboard_runtime::topics::Topics;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, info, info_span, warn};

use crate::apply::{Notify, apply_events};
use crate::facts::{Event, InputTopic, Poison, to_event, tombstone};
use crate::metrics::Metrics;
use crate::positions::{BatchCheck, Continuity, check_batch};

/// Name under which the read models' own positions are stored (every input topic).
pub const PROJECTION: &str = "read_models";

/// A partition of one of the projector's input topics.
pub type TopicPartition = (InputTopic, i32);

/// The partitions' epochs as the writer sees them at the start of a batch.
#[derive(Debug, Clone, Default)]
pub struct EpochView {
    pub current: HashMap<TopicPartition, u64>,
    /// The epoch in which the last seek took effect, and the stored position it went to
    /// (`None`: nothing stored).
    pub sought: HashMap<TopicPartition, (u64, Option<i64>)>,
    /// Assignments whose seek to the stored position has not taken effect yet, by epoch: their
    /// records are not applied (the seek reads them again).
    pub awaiting_seek: HashMap<TopicPartition, u64>,
}

#[derive(Debug, Clone)]
pub struct ProjectorSettings {
    pub brokers: String,
    /// Full name of the conversations topic; the environment's other topics (config,
    /// dead-letter) share its prefix.
    pub topic: String,
    pub group_id: String,
    pub max_batch_records: usize,
    pub batch_linger: Duration,
    /// Commit batches with the server's `synchronous_commit` (`true`, the default) or with it
    /// off (faster; a crash can then lose acknowledged commits, which the position checks
    /// re-project, but readers may have seen them in between).
    pub synchronous_commit: bool,
}

impl ProjectorSettings {
    pub fn topics(&self) -> Topics {
        let prefix = self.topic.strip_suffix(InputTopic::Conversations.base_name()).unwrap_or("");
        Topics::with_prefix(prefix)
    }
}

/// Shared between the Kafka client's callbacks, the reader and the writer.
pub struct ProjectorContext {
    topics: Topics,
    epochs: Mutex<HashMap<TopicPartition, u64>>,
    /// The epoch at which a seek (or an explicit assignment) last took effect per partition,
    /// and the stored position it went to (`None`: nothing stored, reading starts where it was
    /// told). The reading of that epoch continues from there, even if offsets jump
    /// (transaction markers are never delivered).
    sought: Mutex<HashMap<TopicPartition, (u64, Option<i64>)>>,
    /// The epoch of each assignment until the reader sought it to the stored position.
    awaiting_seek: Mutex<HashMap<TopicPartition, u64>>,
    newly_assigned: Mutex<Vec<TopicPartition>>,
    metrics: Arc<Metrics>,
}

impl ProjectorContext {
    pub fn new(topics: Topics, metrics: Arc<Metrics>) -> Self {
        ProjectorContext {
            topics,
            epochs: Mutex::default(),
            sought: Mutex::default(),
            awaiting_seek: Mutex::default(),
            newly_assigned: Mutex::default(),
            metrics,
        }
    }

    fn input_topic(&self, full_name: &str) -> Option<InputTopic> {
        InputTopic::ALL.into_iter().find(|topic| self.full_name(*topic) == full_name)
    }

    pub fn full_name(&self, topic: InputTopic) -> &str {
        match topic {
            InputTopic::Conversations => &self.topics.conversations,
            InputTopic::Config => &self.topics.config,
            InputTopic::Outbound => &self.topics.outbound,
            InputTopic::Delivery => &self.topics.delivery,
        }
    }

    fn bump(&self, partition: TopicPartition) -> u64 {
        let mut epochs = self.epochs.lock().expect("epoch lock poisoned");
        let epoch = epochs.entry(partition).or_insert(0);
        *epoch += 1;
        *epoch
    }

    fn epoch(&self, partition: TopicPartition) -> u64 {
        self.epochs.lock().expect("epoch lock poisoned").get(&partition).copied().unwrap_or(0)
    }

    /// Records that the partition now reads from an offset we chose (seek or assignment): the
    /// stored position `stored_opt`, or where a replay starts (`None`).
    pub(crate) fn mark_sought(&self, partition: TopicPartition, stored_opt: Option<i64>) {
        let epoch = self.bump(partition);
        self.sought.lock().expect("seek lock poisoned").insert(partition, (epoch, stored_opt));
    }

    /// The epochs, and the seeks and assignments of them (read in this order: both bump the
    /// epoch first, so what is seen here always belongs to an epoch seen or older).
    fn epoch_view(&self) -> EpochView {
        let current = self.epochs.lock().expect("epoch lock poisoned").clone();
        let sought = self.sought.lock().expect("seek lock poisoned").clone();
        let awaiting_seek = self.awaiting_seek.lock().expect("assign lock poisoned").clone();
        EpochView { current, sought, awaiting_seek }
    }

    fn partitions_of(&self, list: &TopicPartitionList) -> Vec<TopicPartition> {
        list.elements()
            .iter()
            .filter_map(|element| Some((self.input_topic(element.topic())?, element.partition())))
            .collect()
    }
}

impl ProjectorContext {
    fn stats(&self, statistics: Statistics) {
        for (name, topic) in statistics.topics {
            let Some(input) = self.input_topic(&name) else { continue };
            for (partition, figures) in topic.partitions {
                // ls_offset: the last stable offset, the end a read_committed consumer can reach.
                if partition >= 0 && figures.desired && figures.ls_offset >= 0 {
                    self.metrics.record_end(input.base_name(), partition, figures.ls_offset);
                }
            }
        }
    }
}

/// One record, read and decoded.
pub struct Record {
    pub partition: TopicPartition,
    pub offset: i64,
    pub epoch: u64,
    pub input: Result<Event, Poison>,
    /// Kept for poison records only: what the dead-letter topic gets.
    pub raw: Option<RawRecord>,
}

pub struct RawRecord {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: OwnedHeaders,
}

#[derive(Default)]
pub struct Batch {
    pub records: Vec<Record>,
    /// Partitions that reached their end after the records of this batch (replay only).
    pub at_end: Vec<TopicPartition>,
}

pub enum Command {
    Seek(TopicPartition, Option<i64>),
    Commit(Vec<(TopicPartition, i64)>),
}

/// Runs the projection until `shutdown` turns true. A failed batch (e.g. PostgreSQL down) is
/// rolled back and written again; only setup errors are returned.
pub async fn run_projector(
    settings: ProjectorSettings,
    pool: PgPool,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    run_projector_with(settings, pool, shutdown, Arc::new(Metrics::default())).await
}

pub async fn run_projector_with(
    settings: ProjectorSettings,
    pool: PgPool,
    mut shutdown: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let topics = settings.topics();
    let context = Arc::new(ProjectorContext::new(topics.clone(), metrics.clone()));
    let mut config = kafka::group_consumer_config(&settings.brokers, "projector", &settings.group_id);
    config.set("statistics.interval.ms", "1000");
    let consumer: StreamConsumer<ContextHandle> =
        config.create_with_context(ContextHandle(context.clone())).context("failed to create projector consumer")?;
    consumer
        .subscribe(&[&topics.conversations, &topics.config, &topics.outbound, &topics.delivery])
        .context("failed to subscribe to the conversations, config, outbound and delivery topics")?;
    let producer: FutureProducer = kafka::idempotent_producer_config(&settings.brokers, "projector-deadletter", 30_000)
        .create()
        .context("failed to create dead-letter producer")?;

    let initial_schema = crate::schema::active_schema(&pool).await?;
    let schema = crate::schema::follow_active_schema(pool.clone(), initial_schema, shutdown.clone());
    tokio::spawn(crate::metrics::store_lag_periodically(
        pool.clone(),
        metrics.clone(),
        schema.clone(),
        shutdown.clone(),
    ));

    let (batch_sender, mut batches) = mpsc::channel::<Batch>(1);
    let (command_sender, commands) = mpsc::unbounded_channel::<Command>();
    let reader = Reader {
        consumer: Arc::new(consumer),
        context: context.clone(),
        max_records: settings.max_batch_records,
        linger: settings.batch_linger,
        single_topic: None,
        stored: Some((pool.clone(), schema.clone())),
    };
    let reader_task = tokio::spawn(reader.run(batch_sender, commands, shutdown.clone()));
    let mut writer = Writer {
        pool,
        context,
        schema: SchemaChoice::Follow(schema),
        current_schema: String::new(),
        continuity: HashMap::new(),
        reread_requested: HashMap::new(),
        commands: command_sender,
        dead_letter: Some(DeadLetter { producer, topics }),
        notify: Notify::Yes,
        metrics,
        parallel: DEFAULT_PARALLEL_WRITERS,
        synchronous_commit: settings.synchronous_commit,
    };
    let mut window = (Instant::now(), 0usize);
    let mut audit = tokio::time::interval(POSITION_AUDIT_INTERVAL);
    audit.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let batch_opt = tokio::select! {
            batch = batches.recv() => match batch { Some(batch) => Some(batch), None => break },
            _ = audit.tick() => None,
            _ = shutdown.changed() => break,
        };
        match batch_opt {
            Some(batch) => match writer.write_retrying(&batch, &mut shutdown).await {
                Some(written) => window.1 += written.applied,
                None => break,
            },
            None => {
                if let Err(error) = writer.audit_positions().await {
                    warn!(error = format!("{error:#}"), "position audit failed; trying again in a second");
                }
            }
        }
        if window.0.elapsed() >= Duration::from_secs(10) {
            info!(
                events = window.1,
                events_per_second = (window.1 as f64 / window.0.elapsed().as_secs_f64()) as u64,
                "projection throughput"
            );
            window = (Instant::now(), 0);
        }
    }
    reader_task.abort();
    Ok(())
}

/// `StreamConsumer` wants its context by value; the reader and writer share it through this.
pub struct ContextHandle(pub Arc<ProjectorContext>);

impl ClientContext for ContextHandle {
    fn stats(&self, statistics: Statistics) {
        self.0.stats(statistics)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Replays read to the end of each partition on purpose: that notice is not an error.
        use rdkafka::types::RDKafkaErrorCode;
        if !matches!(error, KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
            warn!(%error, reason, "kafka client error");
        }
    }
}

impl ConsumerContext for ContextHandle {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            for partition in self.0.partitions_of(list) {
                self.0.bump(partition);
                self.0.metrics.forget(partition.0.base_name(), partition.1);
            }
            info!(partitions = list.count(), "projector partitions revoked");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let partitions = self.0.partitions_of(list);
            for partition in &partitions {
                let epoch = self.0.bump(*partition);
                self.0.awaiting_seek.lock().expect("assign lock poisoned").insert(*partition, epoch);
            }
            info!(partitions = partitions.len(), "projector partitions assigned");
            self.0.newly_assigned.lock().expect("assign lock poisoned").extend(partitions);
        }
    }
}

pub struct Reader {
    pub consumer: Arc<StreamConsumer<ContextHandle>>,
    pub context: Arc<ProjectorContext>,
    pub max_records: usize,
    pub linger: Duration,
    /// Set when the consumer reads one topic (replay): end-of-partition notices name only the
    /// partition, so they are attributed to this topic.
    pub single_topic: Option<InputTopic>,
    /// Where stored positions are read from for seek-on-assign (group consumers only).
    pub stored: Option<(PgPool, watch::Receiver<String>)>,
}

impl Reader {
    pub async fn run(
        self,
        batches: mpsc::Sender<Batch>,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut stream = self.consumer.stream();
        let mut schema_seen = self.stored.as_ref().map(|(_, schema)| schema.borrow().clone());
        // Partitions whose stored positions could not be read at assignment, and when to try
        // again (meanwhile the writer applies none of their records: it awaits the seek).
        let mut seek_pending: Vec<TopicPartition> = Vec::new();
        let mut seek_retry_at = tokio::time::Instant::now();
        loop {
            while let Ok(command) = commands.try_recv() {
                self.execute(command);
            }
            let mut assigned: Vec<TopicPartition> =
                self.context.newly_assigned.lock().expect("assign lock poisoned").drain(..).collect();
            if let Some((_, schema)) = &self.stored
                && schema_seen.as_deref() != Some(schema.borrow().as_str())
            {
                // Switched (or rolled back): continue from the new schema's own positions,
                // which may be behind what this consumer has read (nothing new would arrive).
                schema_seen = Some(schema.borrow().clone());
                if let Ok(assignment) = self.consumer.assignment() {
                    assigned = self.context.partitions_of(&assignment);
                }
            }
            if !seek_pending.is_empty() && tokio::time::Instant::now() >= seek_retry_at {
                // Only those still assigned (a new assignment of one is in `assigned` already).
                let current =
                    self.consumer.assignment().map(|list| self.context.partitions_of(&list)).unwrap_or_default();
                assigned.extend(seek_pending.drain(..).filter(|partition| current.contains(partition)));
                assigned.sort_unstable();
                assigned.dedup();
            }
            if !assigned.is_empty() && !self.seek_to_stored(&assigned).await {
                seek_pending = assigned;
                seek_retry_at = tokio::time::Instant::now() + Duration::from_secs(1);
            }
            let mut batch = Batch::default();
            // Wait for a first record at most a moment, so commands and assignments are served.
            let first = tokio::select! {
                first = tokio::time::timeout(Duration::from_millis(100), stream.next()) => first,
                _ = shutdown.changed() => return,
            };
            match first {
                Ok(Some(next)) => self.take(next, &mut batch),
                Ok(None) => return,
                Err(_) => continue,
            }
            let deadline = tokio::time::Instant::now() + self.linger;
            while batch.records.len() < self.max_records {
                match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(Some(next)) => self.take(next, &mut batch),
                    Ok(None) | Err(_) => break,
                }
            }
            if batch.records.is_empty() && batch.at_end.is_empty() {
                continue;
            }
            // Blocks while the writer is busy with the previous batch: back-pressure.
            if batches.send(batch).await.is_err() {
                return;
            }
        }
    }

    fn take(&self, next: Result<rdkafka::message::BorrowedMessage<'_>, KafkaError>, batch: &mut Batch) {
        let record = match next {
            Ok(record) => record,
            Err(KafkaError::PartitionEOF(partition)) => {
                if let Some(topic) = self.single_topic {
                    batch.at_end.push((topic, partition));
                }
                return;
            }
            Err(error) => {
                warn!(%error, "projector consumer error (librdkafka retries)");
                return;
            }
        };
        let Some(topic) = self.context.input_topic(record.topic()) else { return };
        let partition = (topic, record.partition());
        let trace_id = kafka::header_str(record.headers(), header::TRACEPARENT)
            .and_then(trace_id_from_traceparent)
            .unwrap_or_default()
            .to_owned();
        let input = match (topic, record.payload()) {
            (InputTopic::Config, None) => match record.key() {
                Some(key) => tombstone(key).map(|fact| Event {
                    event_id: String::new(),
                    account_id: String::new(),
                    occurred_at: chrono::DateTime::UNIX_EPOCH,
                    recorded_at: chrono::DateTime::UNIX_EPOCH,
                    trace_id: String::new(),
                    source: None,
                    fact,
                }),
                None => Err(Poison("config record without key or value".into())),
            },
            (_, bytes) => match switchboard_runtime::envelope::decode(bytes) {
                Ok(envelope) => to_event(topic, envelope, trace_id),
                Err(error) => Err(Poison(error.to_string())),
            },
        };
        let raw = input.is_err().then(|| RawRecord {
            key: record.key().map(<[u8]>::to_vec),
            payload: record.payload().map(<[u8]>::to_vec),
            headers: kafka::copy_headers(record.headers(), &[]),
        });
        batch.records.push(Record {
            partition,
            offset: record.offset(),
            epoch: self.context.epoch(partition),
            input,
            raw,
        });
    }

    fn execute(&self, command: Command) {
        match command {
            Command::Seek(partition, offset_opt) => self.seek(partition, offset_opt),
            Command::Commit(positions) => {
                // Advisory only: where to start fetching after a restart. The stored position rules.
                let mut offsets = TopicPartitionList::new();
                for ((topic, partition), next_offset) in positions {
                    let _ = offsets.add_partition_offset(
                        self.context.full_name(topic),
                        partition,
                        Offset::Offset(next_offset),
                    );
                }
                if let Err(error) = self.consumer.commit(&offsets, CommitMode::Async) {
                    warn!(%error, "advisory offset commit failed (harmless: positions are stored in postgres)");
                }
            }
        }
    }

    fn seek(&self, partition: TopicPartition, offset_opt: Option<i64>) {
        let offset = offset_opt.map_or(Offset::Beginning, Offset::Offset);
        match self.consumer.seek(self.context.full_name(partition.0), partition.1, offset, Duration::from_secs(10)) {
            Ok(()) => {
                info!(
                    topic = partition.0.base_name(),
                    partition = partition.1,
                    ?offset,
                    "seeked to the stored position"
                );
                self.context.mark_sought(partition, offset_opt);
            }
            Err(error) => {
                // A new epoch without the "sought" mark: the next batch is checked again and
                // the writer asks for the seek once more.
                warn!(%error, topic = partition.0.base_name(), partition = partition.1, "seek failed; will retry");
                self.context.bump(partition);
            }
        }
    }

    /// On assignment: start each partition at the position stored with the read models.
    /// `false` if the positions could not be read (the caller tries again).
    async fn seek_to_stored(&self, partitions: &[TopicPartition]) -> bool {
        let Some((pool, schema)) = &self.stored else { return true };
        let schema_name = schema.borrow().clone();
        let stored = load_positions(pool, &schema_name, partitions).await;
        match stored {
            Ok(stored) => {
                for partition in partitions {
                    self.seek(*partition, stored.get(partition).copied());
                }
                true
            }
            Err(error) => {
                warn!(%error, "failed to load stored positions after assignment; trying again in a second");
                false
            }
        }
    }
}

async fn load_positions(
    pool: &PgPool,
    schema: &str,
    partitions: &[TopicPartition],
) -> sqlx::Result<HashMap<TopicPartition, i64>> {
    let mut transaction = pool.begin().await?;
    sqlx::query(&format!("SET LOCAL search_path TO {schema}")).execute(&mut *transaction).await?;
    let stored = load_positions_in(&mut transaction, partitions, false).await?;
    transaction.commit().await?;
    Ok(stored)
}

async fn load_positions_in(
    transaction: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    partitions: &[TopicPartition],
    lock: bool,
) -> sqlx::Result<HashMap<TopicPartition, i64>> {
    let topics: Vec<&str> = partitions.iter().map(|(topic, _)| topic.base_name()).collect();
    let numbers: Vec<i32> = partitions.iter().map(|(_, partition)| *partition).collect();
    if lock {
        // Serialises writers of the same partition (two instances during a rebalance, or a
        // position row that does not exist yet), in a fixed order so they cannot deadlock.
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '/' || u.topic), u.partition) \
             FROM UNNEST($1::text[], $2::int[]) WITH ORDINALITY AS u(topic, partition, position) ORDER BY u.position",
        )
        .bind(&topics)
        .bind(&numbers)
        .execute(&mut **transaction)
        .await?;
    }
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT p.topic, p.partition, p.next_offset FROM projector_positions p \
         JOIN UNNEST($2::text[], $3::int[]) AS u(topic, partition) ON p.topic = u.topic AND p.partition = u.partition \
         WHERE p.projection = $1",
    )
    .bind(PROJECTION)
    .bind(&topics)
    .bind(&numbers)
    .fetch_all(&mut **transaction)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(topic, partition, next_offset)| {
            let input = InputTopic::ALL.into_iter().find(|t| t.base_name() == topic)?;
            Some(((input, partition), next_offset))
        })
        .collect())
}

pub struct DeadLetter {
    pub producer: FutureProducer,
    pub topics: Topics,
}

impl DeadLetter {
    async fn send(&self, context: &ProjectorContext, record: &Record, reason: &str) -> anyhow::Result<()> {
        let raw = record.raw.as_ref().context("poison record without its raw bytes")?;
        let source = format!("{}/{}/{}", context.full_name(record.partition.0), record.partition.1, record.offset);
        let mut headers = raw.headers.clone();
        for (key, value) in [(header::DEADLETTER_REASON, reason), (header::DEADLETTER_SOURCE, source.as_str())] {
            headers = headers.insert(Header { key, value: Some(value) });
        }
        let partitions = self.topics.declared_partitions(&self.topics.deadletter).unwrap_or(1).max(1);
        let mut out = FutureRecord::to(&self.topics.deadletter)
            .partition(record.partition.1 % partitions)
            .payload(raw.payload.as_deref().unwrap_or_default())
            .headers(headers);
        if let Some(key) = &raw.key {
            out = out.key(key.as_slice());
        }
        self.producer
            .send(out, Duration::from_secs(30))
            .await
            .map_err(|(error, _)| error)
            .context("failed to send a poison record to the dead-letter topic")?;
        Ok(())
    }
}

pub enum SchemaChoice {
    /// The live projector: whatever `public.read_model_control` says, switching when it does.
    Follow(watch::Receiver<String>),
    /// A replay: its own fresh schema.
    Fixed(String),
}

pub struct Writer {
    pub pool: PgPool,
    pub context: Arc<ProjectorContext>,
    pub schema: SchemaChoice,
    pub current_schema: String,
    /// What this writer knows of each partition's reading, with the epoch it holds for; set by
    /// committed batches only (docs in [`crate::positions`]).
    pub continuity: HashMap<TopicPartition, (u64, Continuity)>,
    /// The epoch in which this writer asked to read a partition again: its later records of
    /// that epoch are dropped quietly (the seek starts a new epoch).
    pub reread_requested: HashMap<TopicPartition, u64>,
    pub commands: mpsc::UnboundedSender<Command>,
    /// `None` in replays: poison was dead-lettered by the live projector already.
    pub dead_letter: Option<DeadLetter>,
    pub notify: Notify,
    pub metrics: Arc<Metrics>,
    /// Transactions written side by side per batch (each with its own partitions).
    pub parallel: usize,
    /// `false`: batch transactions commit with `synchronous_commit = off` (replays); `true`:
    /// with the server's setting (`on` in scripts/stack), so nothing a reader saw can vanish.
    pub synchronous_commit: bool,
}

/// Default number of side-by-side transactions per batch.
pub const DEFAULT_PARALLEL_WRITERS: usize = 2;

/// How often the live writer compares the positions it knows with the stored ones, so a
/// partition that receives nothing more is re-read too after the database lost commits.
pub const POSITION_AUDIT_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct WriteOutcome {
    pub applied: usize,
    pub poison: usize,
}

/// What a batch transaction decided for one partition, acted upon once it committed.
#[derive(Debug, Clone, Copy)]
enum PartitionDecision {
    /// Every record before `next_offset` is applied (by this batch or before); `stored` when
    /// this transaction wrote the position.
    Reached { next_offset: i64, stored: bool },
    /// Not applied: read the partition again from `stored_opt`. `went_back_from_opt` is the
    /// position this writer had stored or sought to, when the stored one is behind it.
    Reread { stored_opt: Option<i64>, went_back_from_opt: Option<i64> },
    /// Not applied: this epoch's records are read again after a seek that is pending (asked
    /// for by this writer, or the seek to the stored position that follows an assignment).
    AwaitingSeek,
}

/// What a batch transaction decided for one partition: the epoch of its records, and the
/// decision.
struct PartitionOutcome {
    partition: TopicPartition,
    epoch: u64,
    decision: PartitionDecision,
}

/// A partition's records of one batch checked against its stored position.
struct PartitionCheck<'b> {
    outcome: PartitionOutcome,
    /// The records to apply (those past the stored position; none unless the check passed).
    to_apply: &'b [&'b Record],
}

/// A committed batch transaction: what it wrote, and what it decided per partition.
struct GroupOutcome {
    written: WriteOutcome,
    decisions: Vec<PartitionOutcome>,
}

impl Writer {
    /// Writes a batch, and writes it again after a pause for as long as that fails (PostgreSQL
    /// down, a lost connection); `None` if `shutdown` turns true first. A failed batch is never
    /// dropped: the writer's [`Continuity`] assumes that every record of an epoch is written.
    pub async fn write_retrying(
        &mut self,
        batch: &Batch,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<WriteOutcome> {
        loop {
            match self.write(batch).await {
                Ok(outcome) => return Some(outcome),
                Err(error) => {
                    warn!(
                        error = format!("{error:#}"),
                        "projection batch failed; writing it again in a second, checked against the stored positions"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        Ok(()) = shutdown.changed() => return None,
                    }
                }
            }
        }
    }

    async fn write(&mut self, batch: &Batch) -> anyhow::Result<WriteOutcome> {
        let schema = match &self.schema {
            SchemaChoice::Follow(receiver) => receiver.borrow().clone(),
            SchemaChoice::Fixed(schema) => schema.clone(),
        };
        let started = Instant::now();
        let epochs = self.context.epoch_view();
        if schema != self.current_schema {
            // Positions known in the old schema say nothing about the new one: continue from the
            // new schema's own stored positions, every partition checked (and sought) again.
            info!(schema, "projecting into schema");
            self.current_schema = schema;
            self.continuity =
                epochs.current.iter().map(|(partition, epoch)| (*partition, (*epoch, Continuity::Unknown))).collect();
        }
        let mut by_partition: BTreeMap<TopicPartition, Vec<&Record>> = BTreeMap::new();
        for record in &batch.records {
            // Stale: read before a revoke, a reassignment or a seek of its partition.
            if epochs.current.get(&record.partition).copied().unwrap_or(0) != record.epoch {
                continue;
            }
            by_partition.entry(record.partition).or_default().push(record);
        }
        if by_partition.is_empty() {
            return Ok(WriteOutcome::default());
        }
        let span = info_span!("project_batch", records = batch.records.len(), partitions = by_partition.len());
        // Partitions are independent (each with its own rows and position), so a batch is
        // written as `parallel` transactions side by side: PostgreSQL works on several cores
        // while exactly-once still holds per partition.
        let mut groups: Vec<BTreeMap<TopicPartition, Vec<&Record>>> = vec![BTreeMap::new(); self.parallel.max(1)];
        for (index, (partition, records)) in by_partition.into_iter().enumerate() {
            groups[index % self.parallel.max(1)].insert(partition, records);
        }
        groups.retain(|group| !group.is_empty());
        let results = futures::future::join_all(groups.iter().map(|group| self.write_partitions(group, &epochs)))
            .instrument(span)
            .await;
        let mut total = WriteOutcome::default();
        let mut first_error = None;
        for result in results {
            match result {
                Ok(group) => {
                    self.act_on(group.decisions);
                    total.applied += group.written.applied;
                    total.poison += group.written.poison;
                }
                // Rolled back; the caller writes the batch again.
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        self.metrics.events_applied.inc_by(total.applied as u64);
        self.metrics.dead_lettered.inc_by(total.poison as u64);
        if let Some(error) = first_error {
            self.metrics.batch_failures.inc();
            return Err(error);
        }
        self.metrics.batches.inc();
        self.metrics.last_batch_records.set(batch.records.len() as i64);
        self.metrics.batch_seconds.observe(started.elapsed().as_secs_f64());
        Ok(total)
    }

    /// Compares the stored position of every partition whose position this writer knows (it
    /// stored it or sought to it) with what it knows. Batches check their own partitions; this
    /// also catches a partition that receives nothing more after the database lost commits.
    pub async fn audit_positions(&mut self) -> anyhow::Result<()> {
        if self.current_schema.is_empty() {
            return Ok(());
        }
        let epochs = self.context.epoch_view();
        let known: Vec<(TopicPartition, u64, i64)> = epochs
            .current
            .iter()
            .filter_map(|(partition, epoch)| match self.continuity_of(*partition, *epoch, &epochs) {
                Continuity::ContinuesFrom(Some(expected)) => Some((*partition, *epoch, expected)),
                Continuity::ContinuesFrom(None) | Continuity::Unknown => None,
            })
            .collect();
        if known.is_empty() {
            return Ok(());
        }
        let partitions: Vec<TopicPartition> = known.iter().map(|(partition, _, _)| *partition).collect();
        let stored = load_positions(&self.pool, &self.current_schema, &partitions)
            .await
            .context("failed to load stored positions for the position audit")?;
        for (partition, epoch, expected) in known {
            let stored_opt = stored.get(&partition).copied();
            if stored_opt < Some(expected) {
                self.reread(partition, epoch, stored_opt, Some(expected));
            }
        }
        Ok(())
    }

    /// What this writer knows of a partition's reading in `epoch`: its own record of that epoch,
    /// else the position the epoch's seek went to, else nothing.
    fn continuity_of(&self, partition: TopicPartition, epoch: u64, epochs: &EpochView) -> Continuity {
        match (self.continuity.get(&partition), epochs.sought.get(&partition)) {
            (Some((known_epoch, continuity)), _) if *known_epoch == epoch => *continuity,
            (_, Some((sought_epoch, stored_opt))) if *sought_epoch == epoch => Continuity::ContinuesFrom(*stored_opt),
            _ => Continuity::Unknown,
        }
    }

    /// Checks a partition's records of one batch against its stored position.
    fn check_partition<'b>(
        &self,
        partition: TopicPartition,
        records: &'b [&'b Record],
        stored_opt: Option<i64>,
        epochs: &EpochView,
    ) -> PartitionCheck<'b> {
        let epoch = records[0].epoch;
        let apply_none = |decision| PartitionCheck {
            outcome: PartitionOutcome { partition, epoch, decision },
            to_apply: &records[records.len()..],
        };
        if self.reread_requested.get(&partition) == Some(&epoch) || epochs.awaiting_seek.get(&partition) == Some(&epoch)
        {
            return apply_none(PartitionDecision::AwaitingSeek);
        }
        let offsets: Vec<i64> = records.iter().map(|record| record.offset).collect();
        let next_offset = offsets[offsets.len() - 1] + 1;
        match check_batch(stored_opt, self.continuity_of(partition, epoch, epochs), &offsets) {
            BatchCheck::ApplyFrom(index) => PartitionCheck {
                outcome: PartitionOutcome {
                    partition,
                    epoch,
                    decision: PartitionDecision::Reached { next_offset, stored: index < records.len() },
                },
                to_apply: &records[index..],
            },
            BatchCheck::SeekTo(stored_opt) => {
                apply_none(PartitionDecision::Reread { stored_opt, went_back_from_opt: None })
            }
            BatchCheck::StoredPositionWentBack { stored_opt, expected } => {
                apply_none(PartitionDecision::Reread { stored_opt, went_back_from_opt: Some(expected) })
            }
        }
    }

    /// After a commit: remembers how far each partition got and asks for the seeks.
    fn act_on(&mut self, decisions: Vec<PartitionOutcome>) {
        let mut stored_positions = Vec::new();
        for PartitionOutcome { partition, epoch, decision } in decisions {
            match decision {
                PartitionDecision::Reached { next_offset, stored } => {
                    self.continuity.insert(partition, (epoch, Continuity::ContinuesFrom(Some(next_offset))));
                    if stored {
                        self.metrics.record_position(partition.0.base_name(), partition.1, next_offset);
                        stored_positions.push((partition, next_offset));
                    }
                }
                PartitionDecision::Reread { stored_opt, went_back_from_opt } => {
                    self.reread(partition, epoch, stored_opt, went_back_from_opt)
                }
                PartitionDecision::AwaitingSeek => {}
            }
        }
        if !stored_positions.is_empty() {
            let _ = self.commands.send(Command::Commit(stored_positions));
        }
    }

    /// A gap: the partition's records of `epoch` are not applied, and it is read again from the
    /// stored position. Logged and counted, never skipped.
    fn reread(
        &mut self,
        partition: TopicPartition,
        epoch: u64,
        stored_opt: Option<i64>,
        went_back_from_opt: Option<i64>,
    ) {
        self.continuity.insert(partition, (epoch, Continuity::Unknown));
        self.reread_requested.insert(partition, epoch);
        self.metrics.gaps.inc();
        let topic = partition.0.base_name();
        match went_back_from_opt {
            Some(expected) => {
                self.metrics.lost_commits.inc();
                warn!(
                    topic,
                    partition = partition.1,
                    stored_next_offset = ?stored_opt,
                    committed_next_offset = expected,
                    "stored position is behind what this projector committed: the database lost committed batches \
                     (crash with asynchronous commit, failover, restore); reading the partition again from the stored position"
                );
            }
            None => info!(
                topic,
                partition = partition.1,
                ?stored_opt,
                "batch does not start at the stored position; seeking"
            ),
        }
        let _ = self.commands.send(Command::Seek(partition, stored_opt));
    }

    /// Begins a batch transaction (schema, commit mode, planner settings), locks the group's
    /// partitions and checks each one's records against its stored position. Every batch
    /// transaction starts here, whether it applies the group in bulk or one event at a time.
    async fn begin_group<'b>(
        &self,
        by_partition: &'b BTreeMap<TopicPartition, Vec<&'b Record>>,
        epochs: &EpochView,
    ) -> anyhow::Result<(sqlx::Transaction<'static, sqlx::Postgres>, Vec<PartitionCheck<'b>>)> {
        let mut transaction = self.pool.begin().await.context("failed to begin transaction")?;
        sqlx::query(&format!("SET LOCAL search_path TO {}", self.current_schema))
            .execute(&mut *transaction)
            .await
            .context("failed to select the read-model schema")?;
        if !self.synchronous_commit {
            // A crash can lose this commit after it was acknowledged; its position goes back
            // with the rows, and the position checks read the records again.
            sqlx::query("SET LOCAL synchronous_commit TO off").execute(&mut *transaction).await?;
        }
        // Every read and update of the writer is by key. A fresh replay schema has no
        // statistics yet, and the planner would happily scan a growing table per batch.
        sqlx::query("SET LOCAL enable_seqscan TO off").execute(&mut *transaction).await?;
        let partitions: Vec<TopicPartition> = by_partition.keys().copied().collect();
        let stored =
            load_positions_in(&mut transaction, &partitions, true).await.context("failed to load positions")?;
        let checks = by_partition
            .iter()
            .map(|(partition, records)| {
                self.check_partition(*partition, records, stored.get(partition).copied(), epochs)
            })
            .collect();
        Ok((transaction, checks))
    }

    async fn write_partitions(
        &self,
        by_partition: &BTreeMap<TopicPartition, Vec<&Record>>,
        epochs: &EpochView,
    ) -> anyhow::Result<GroupOutcome> {
        let (mut transaction, checks) = self.begin_group(by_partition, epochs).await?;
        let mut written = WriteOutcome::default();
        let mut events: Vec<&Event> = Vec::with_capacity(checks.iter().map(|check| check.to_apply.len()).sum());
        for record in checks.iter().flat_map(|check| check.to_apply) {
            match &record.input {
                Ok(event) => events.push(event),
                Err(poison) => {
                    written.poison += 1;
                    self.set_aside(record, &poison.0).await?;
                }
            }
        }
        match apply_events(&mut transaction, &events, self.notify).await {
            Ok(_) => {}
            Err(error) if is_data_error(&error) => {
                // Some event makes PostgreSQL refuse the batch whatever we retry. Find it one
                // event at a time (savepoints), dead-letter it, keep the rest.
                warn!(%error, "batch refused by postgres; applying its events one by one");
                transaction.rollback().await?;
                return Box::pin(self.write_one_by_one(by_partition, epochs)).await;
            }
            Err(error) => return Err(anyhow::Error::new(error).context("failed to apply batch")),
        }
        written.applied = events.len();
        Self::commit_group(transaction, checks, written).await
    }

    async fn write_one_by_one(
        &self,
        by_partition: &BTreeMap<TopicPartition, Vec<&Record>>,
        epochs: &EpochView,
    ) -> anyhow::Result<GroupOutcome> {
        let (mut transaction, checks) = self.begin_group(by_partition, epochs).await?;
        let mut written = WriteOutcome::default();
        for record in checks.iter().flat_map(|check| check.to_apply) {
            let failure = match &record.input {
                Ok(event) => {
                    sqlx::query("SAVEPOINT one_event").execute(&mut *transaction).await?;
                    match apply_events(&mut transaction, &[event], self.notify).await {
                        Ok(_) => {
                            written.applied += 1;
                            None
                        }
                        Err(error) if is_data_error(&error) => {
                            sqlx::query("ROLLBACK TO SAVEPOINT one_event").execute(&mut *transaction).await?;
                            Some(format!("refused by postgres: {error}"))
                        }
                        Err(error) => return Err(error.into()),
                    }
                }
                Err(poison) => Some(poison.0.clone()),
            };
            if let Some(reason) = failure {
                written.poison += 1;
                self.set_aside(record, &reason).await?;
            }
        }
        Self::commit_group(transaction, checks, written).await
    }

    /// The end of both write paths: the positions of what the group applied, stored in its
    /// transaction, then the commit.
    async fn commit_group(
        mut transaction: sqlx::Transaction<'_, sqlx::Postgres>,
        checks: Vec<PartitionCheck<'_>>,
        written: WriteOutcome,
    ) -> anyhow::Result<GroupOutcome> {
        let decisions: Vec<PartitionOutcome> = checks.into_iter().map(|check| check.outcome).collect();
        store_positions(&mut transaction, &new_positions(&decisions)).await?;
        transaction.commit().await.context("failed to commit projection batch")?;
        Ok(GroupOutcome { written, decisions })
    }

    /// A record that is not projected: logged, and sent to the dead-letter topic when one is
    /// configured and the record's raw bytes were kept (poison records keep them; an event
    /// PostgreSQL refused has only its decoded form).
    async fn set_aside(&self, record: &Record, reason: &str) -> anyhow::Result<()> {
        warn!(
            topic = record.partition.0.base_name(),
            partition = record.partition.1,
            offset = record.offset,
            reason,
            "poison record: not projected"
        );
        if let (Some(dead_letter), Some(_)) = (&self.dead_letter, &record.raw) {
            dead_letter.send(&self.context, record, reason).await?;
        }
        Ok(())
    }
}

/// The positions a batch transaction stores: those of partitions it applied records of.
fn new_positions(decisions: &[PartitionOutcome]) -> Vec<(TopicPartition, i64)> {
    decisions
        .iter()
        .filter_map(|PartitionOutcome { partition, decision, .. }| match decision {
            PartitionDecision::Reached { next_offset, stored: true } => Some((*partition, *next_offset)),
            PartitionDecision::Reached { stored: false, .. }
            | PartitionDecision::Reread { .. }
            | PartitionDecision::AwaitingSeek => None,
        })
        .collect()
}

/// SQLSTATE classes 22 (data exception) and 23 (integrity constraint violation): retrying the
/// same statement can never succeed.
fn is_data_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(database_error) => {
            database_error.code().is_some_and(|code| code.starts_with("22") || code.starts_with("23"))
        }
        _ => false,
    }
}

async fn store_positions(
    transaction: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    positions: &[(TopicPartition, i64)],
) -> anyhow::Result<()> {
    if positions.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO projector_positions (projection, topic, partition, next_offset) \
         SELECT $1, * FROM UNNEST($2::text[], $3::int[], $4::bigint[]) \
         ON CONFLICT (projection, topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()",
    )
    .bind(PROJECTION)
    .bind(positions.iter().map(|((topic, _), _)| topic.base_name()).collect::<Vec<_>>())
    .bind(positions.iter().map(|((_, partition), _)| *partition).collect::<Vec<_>>())
    .bind(positions.iter().map(|(_, next_offset)| *next_offset).collect::<Vec<_>>())
    .execute(&mut **transaction)
    .await
    .context("failed to store positions")?;
    Ok(())
}
