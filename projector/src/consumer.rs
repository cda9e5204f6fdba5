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
//! each partition's position in PostgreSQL and checks every batch against it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
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
use crate::positions::{BatchCheck, check_batch};

/// Name under which the read models' own positions are stored (both input topics).
pub const PROJECTION: &str = "read_models";

/// A partition of one of the projector's input topics.
pub type TopicPartition = (InputTopic, i32);

#[derive(Debug, Clone)]
pub struct ProjectorSettings {
    pub brokers: String,
    /// Full name of the conversations topic; the environment's other topics (config,
    /// dead-letter) share its prefix.
    pub topic: String,
    pub group_id: String,
    pub max_batch_records: usize,
    pub batch_linger: Duration,
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
    /// The epoch at which a seek (or an explicit assignment) last took effect per partition:
    /// the first batch of that epoch starts where we asked, even if offsets jump (transaction
    /// markers are never delivered), so it is trusted without a gap check.
    sought: Mutex<HashMap<TopicPartition, u64>>,
    newly_assigned: Mutex<Vec<TopicPartition>>,
    metrics: Arc<Metrics>,
}

impl ProjectorContext {
    pub fn new(topics: Topics, metrics: Arc<Metrics>) -> Self {
        ProjectorContext {
            topics,
            epochs: Mutex::default(),
            sought: Mutex::default(),
            newly_assigned: Mutex::default(),
            metrics,
        }
    }

    fn input_topic(&self, full_name: &str) -> Option<InputTopic> {
        if full_name == self.topics.conversations {
            Some(InputTopic::Conversations)
        } else if full_name == self.topics.config {
            Some(InputTopic::Config)
        } else {
            None
        }
    }

    pub fn full_name(&self, topic: InputTopic) -> &str {
        match topic {
            InputTopic::Conversations => &self.topics.conversations,
            InputTopic::Config => &self.topics.config,
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

    /// Records that the partition now reads from an offset we chose (seek or assignment).
    pub(crate) fn mark_sought(&self, partition: TopicPartition) {
        let epoch = self.bump(partition);
        self.sought.lock().expect("seek lock poisoned").insert(partition, epoch);
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
/// rolled back and retried from the stored positions; only setup errors are returned.
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
        .subscribe(&[&topics.conversations, &topics.config])
        .context("failed to subscribe to the conversations and config topics")?;
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
        positioned: HashMap::new(),
        commands: command_sender,
        dead_letter: Some(DeadLetter { producer, topics }),
        notify: Notify::Yes,
        metrics,
        parallel: DEFAULT_PARALLEL_WRITERS,
    };
    let mut window = (Instant::now(), 0usize);
    loop {
        let batch = tokio::select! {
            batch = batches.recv() => match batch { Some(batch) => batch, None => break },
            _ = shutdown.changed() => break,
        };
        match writer.write(batch).await {
            Ok(written) => window.1 += written.applied,
            Err(error) => {
                warn!(error = format!("{error:#}"), "projection batch failed; retrying from the stored positions");
                tokio::time::sleep(Duration::from_secs(1)).await;
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
                self.0.bump(*partition);
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
            if !assigned.is_empty() {
                self.seek_to_stored(&assigned).await;
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
                self.context.mark_sought(partition);
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
    async fn seek_to_stored(&self, partitions: &[TopicPartition]) {
        let Some((pool, schema)) = &self.stored else { return };
        let schema_name = schema.borrow().clone();
        let stored = load_positions(pool, &schema_name, partitions).await;
        match stored {
            Ok(stored) => {
                for partition in partitions {
                    self.seek(*partition, stored.get(partition).copied());
                }
            }
            Err(error) => {
                warn!(%error, "failed to load stored positions after assignment; the first batch checks them")
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
            let input = [InputTopic::Conversations, InputTopic::Config].into_iter().find(|t| t.base_name() == topic)?;
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
    /// Partitions checked against their stored position, with the epoch they were checked in.
    pub positioned: HashMap<TopicPartition, u64>,
    pub commands: mpsc::UnboundedSender<Command>,
    /// `None` in replays: poison was dead-lettered by the live projector already.
    pub dead_letter: Option<DeadLetter>,
    pub notify: Notify,
    pub metrics: Arc<Metrics>,
    /// Transactions written side by side per batch (each with its own partitions).
    pub parallel: usize,
}

/// Default number of side-by-side transactions per batch.
pub const DEFAULT_PARALLEL_WRITERS: usize = 2;

#[derive(Debug, Default)]
pub struct WriteOutcome {
    pub applied: usize,
    pub poison: usize,
}

impl Writer {
    pub async fn write(&mut self, batch: Batch) -> anyhow::Result<WriteOutcome> {
        let schema = match &self.schema {
            SchemaChoice::Follow(receiver) => receiver.borrow().clone(),
            SchemaChoice::Fixed(schema) => schema.clone(),
        };
        if schema != self.current_schema {
            // Continue in the new schema from its own stored positions: every partition is
            // checked (and sought) again.
            info!(schema, "projecting into schema");
            self.current_schema = schema;
            self.positioned.clear();
        }
        let started = Instant::now();
        let (epochs, sought) = {
            let epochs = self.context.epochs.lock().expect("epoch lock poisoned").clone();
            let sought = self.context.sought.lock().expect("seek lock poisoned").clone();
            (epochs, sought)
        };
        let mut by_partition: BTreeMap<TopicPartition, Vec<&Record>> = BTreeMap::new();
        for record in &batch.records {
            // Stale: read before a revoke, a reassignment or a seek of its partition.
            if epochs.get(&record.partition).copied().unwrap_or(0) != record.epoch {
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
        let results = futures::future::join_all(groups.iter().map(|group| self.write_partitions(group, &sought)))
            .instrument(span)
            .await;
        let mut total = WriteOutcome::default();
        let mut first_error = None;
        for (group, result) in groups.iter().zip(results) {
            match result {
                Ok((outcome, stored, seeks)) => {
                    for (partition, records) in group {
                        if !seeks.iter().any(|(sought_partition, _)| sought_partition == partition) {
                            self.positioned.insert(*partition, records[0].epoch);
                        }
                    }
                    for (partition, offset_opt) in seeks {
                        info!(
                            topic = partition.0.base_name(),
                            partition = partition.1,
                            ?offset_opt,
                            "batch does not start at the stored position; seeking"
                        );
                        self.positioned.remove(&partition);
                        let _ = self.commands.send(Command::Seek(partition, offset_opt));
                    }
                    for ((topic, partition), next_offset) in &stored {
                        self.metrics.record_position(topic.base_name(), *partition, *next_offset);
                    }
                    if !stored.is_empty() {
                        let _ = self.commands.send(Command::Commit(stored));
                    }
                    total.applied += outcome.applied;
                    total.poison += outcome.poison;
                }
                Err(error) => {
                    // Rolled back. Later batches of these partitions start after this one, so
                    // the position check seeks each back to its stored position.
                    for partition in group.keys() {
                        self.positioned.remove(partition);
                    }
                    first_error.get_or_insert(error);
                }
            }
        }
        self.metrics.events_applied.fetch_add(total.applied as u64, Ordering::Relaxed);
        self.metrics.dead_lettered.fetch_add(total.poison as u64, Ordering::Relaxed);
        if let Some(error) = first_error {
            self.metrics.batch_failures.fetch_add(1, Ordering::Relaxed);
            return Err(error);
        }
        self.metrics.batches.fetch_add(1, Ordering::Relaxed);
        self.metrics.last_batch_records.store(batch.records.len() as u64, Ordering::Relaxed);
        self.metrics.last_batch_micros.store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok(total)
    }

    #[allow(clippy::type_complexity)]
    async fn write_partitions(
        &self,
        by_partition: &BTreeMap<TopicPartition, Vec<&Record>>,
        sought: &HashMap<TopicPartition, u64>,
    ) -> anyhow::Result<(WriteOutcome, Vec<(TopicPartition, i64)>, Vec<(TopicPartition, Option<i64>)>)> {
        let mut transaction = self.pool.begin().await.context("failed to begin transaction")?;
        sqlx::query(&format!("SET LOCAL search_path TO {}", self.current_schema))
            .execute(&mut *transaction)
            .await
            .context("failed to select the read-model schema")?;
        // The read models are derived: if PostgreSQL crashes before flushing this commit, the
        // positions roll back with the rows and the records are projected again from Kafka.
        sqlx::query("SET LOCAL synchronous_commit TO off").execute(&mut *transaction).await?;
        // Every read and update of the writer is by key. A fresh replay schema has no
        // statistics yet, and the planner would happily scan a growing table per batch.
        sqlx::query("SET LOCAL enable_seqscan TO off").execute(&mut *transaction).await?;
        let partitions: Vec<TopicPartition> = by_partition.keys().copied().collect();
        let stored =
            load_positions_in(&mut transaction, &partitions, true).await.context("failed to load positions")?;

        let mut seeks = Vec::new();
        let mut to_apply: Vec<&Record> = Vec::new();
        let mut new_positions: Vec<(TopicPartition, i64)> = Vec::new();
        for (partition, records) in by_partition {
            let epoch = records[0].epoch;
            let positioned = self.positioned.get(partition) == Some(&epoch) || sought.get(partition) == Some(&epoch);
            let offsets: Vec<i64> = records.iter().map(|record| record.offset).collect();
            match check_batch(stored.get(partition).copied(), positioned, &offsets) {
                BatchCheck::ApplyFrom(index) => {
                    if index < records.len() {
                        to_apply.extend(&records[index..]);
                        new_positions.push((*partition, records[records.len() - 1].offset + 1));
                    }
                }
                BatchCheck::SeekTo(offset_opt) => seeks.push((*partition, offset_opt)),
            }
        }

        let mut outcome = WriteOutcome::default();
        let mut events: Vec<&Event> = Vec::with_capacity(to_apply.len());
        for record in &to_apply {
            match &record.input {
                Ok(event) => events.push(event),
                Err(poison) => {
                    outcome.poison += 1;
                    warn!(topic = record.partition.0.base_name(), partition = record.partition.1, offset = record.offset,
                        reason = %poison, "poison record: not projected");
                    if let Some(dead_letter) = &self.dead_letter {
                        dead_letter.send(&self.context, record, &poison.0).await?;
                    }
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
                return Box::pin(self.write_one_by_one(by_partition, sought)).await;
            }
            Err(error) => return Err(anyhow::Error::new(error).context("failed to apply batch")),
        }
        outcome.applied = events.len();
        store_positions(&mut transaction, &new_positions).await?;
        transaction.commit().await.context("failed to commit projection batch")?;
        Ok((outcome, new_positions, seeks))
    }

    #[allow(clippy::type_complexity)]
    async fn write_one_by_one(
        &self,
        by_partition: &BTreeMap<TopicPartition, Vec<&Record>>,
        sought: &HashMap<TopicPartition, u64>,
    ) -> anyhow::Result<(WriteOutcome, Vec<(TopicPartition, i64)>, Vec<(TopicPartition, Option<i64>)>)> {
        let mut transaction = self.pool.begin().await?;
        sqlx::query(&format!("SET LOCAL search_path TO {}", self.current_schema)).execute(&mut *transaction).await?;
        let partitions: Vec<TopicPartition> = by_partition.keys().copied().collect();
        let stored = load_positions_in(&mut transaction, &partitions, true).await?;
        let mut outcome = WriteOutcome::default();
        let mut seeks = Vec::new();
        let mut new_positions = Vec::new();
        for (partition, records) in by_partition {
            let epoch = records[0].epoch;
            let positioned = self.positioned.get(partition) == Some(&epoch) || sought.get(partition) == Some(&epoch);
            let offsets: Vec<i64> = records.iter().map(|record| record.offset).collect();
            let index = match check_batch(stored.get(partition).copied(), positioned, &offsets) {
                BatchCheck::ApplyFrom(index) => index,
                BatchCheck::SeekTo(offset_opt) => {
                    seeks.push((*partition, offset_opt));
                    continue;
                }
            };
            for record in &records[index..] {
                let failure = match &record.input {
                    Ok(event) => {
                        sqlx::query("SAVEPOINT one_event").execute(&mut *transaction).await?;
                        match apply_events(&mut transaction, &[event], self.notify).await {
                            Ok(_) => {
                                outcome.applied += 1;
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
                    outcome.poison += 1;
                    warn!(offset = record.offset, reason, "poison record: not projected");
                    if let (Some(dead_letter), Some(_)) = (&self.dead_letter, &record.raw) {
                        dead_letter.send(&self.context, record, &reason).await?;
                    }
                }
            }
            if index < records.len() {
                new_positions.push((*partition, records[records.len() - 1].offset + 1));
            }
        }
        store_positions(&mut transaction, &new_positions).await?;
        transaction.commit().await?;
        Ok((outcome, new_positions, seeks))
    }
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
