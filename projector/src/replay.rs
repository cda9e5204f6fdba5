//! `projector replay`: rebuild every read model from the log into a fresh schema while the live
//! projection keeps serving, then switch readers to it atomically, roll back, or drop the old
//! one (B4, docs/contracts.md).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use switchboard_runtime::kafka;
use switchboard_runtime::topics::Topics;
use tokio::sync::{mpsc, watch};
use tracing::info;

use crate::apply::Notify;
use crate::consumer::{Batch, Command, ContextHandle, ProjectorContext, Reader, SchemaChoice, TopicPartition, Writer};
use crate::facts::InputTopic;
use crate::metrics::Metrics;
use crate::schema::{SWITCH_CHANNEL, active_schema, migrate_schema, validate_schema_name};

#[derive(Debug, Clone)]
pub struct ReplaySettings {
    pub brokers: String,
    pub database_url: String,
    pub topics: Topics,
    /// Rebuild conversations from this time on (config is always read whole: it is state).
    pub from: Option<DateTime<Utc>>,
    /// Schema to build; default `rm_<yyyymmddhhmmss>` of now.
    pub schema: Option<String>,
    pub max_batch_records: usize,
    pub batch_linger: Duration,
    pub progress: Progress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// A bar redrawn in place (stderr is a terminal).
    Bar,
    /// A log line every few seconds.
    Lines,
    Quiet,
}

impl Progress {
    pub fn detect() -> Progress {
        if std::io::stderr().is_terminal() { Progress::Bar } else { Progress::Lines }
    }
}

#[derive(Debug, Clone)]
pub struct ReplaySummary {
    pub schema: String,
    pub events: u64,
    pub elapsed: Duration,
}

/// Builds a fresh schema from the log and returns once it has caught up with the end of every
/// partition (as it was when each partition's end was reached).
pub async fn run(settings: ReplaySettings, pool: &PgPool) -> anyhow::Result<ReplaySummary> {
    let schema = settings.schema.clone().unwrap_or_else(|| format!("rm_{}", Utc::now().format("%Y%m%d%H%M%S")));
    validate_schema_name(&schema)?;
    anyhow::ensure!(schema != "public", "replay builds a fresh schema, never public");
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(&schema)
        .fetch_one(pool)
        .await?;
    anyhow::ensure!(!exists, "schema {schema} already exists; pick another name or drop it first");
    migrate_schema(&settings.database_url, &schema).await?;
    // Bulk-load trick: nobody reads this schema until the switch, and the writer only ever
    // looks rows up by primary key, so secondary indexes are dropped now and built once at the
    // end (a sorted build is several times cheaper than maintaining them row by row).
    let deferred_indexes = drop_secondary_indexes(pool, &schema).await?;
    info!(schema, from = ?settings.from, deferred_indexes = deferred_indexes.len(), "replaying the log into a fresh schema");

    let metrics = Arc::new(Metrics::default());
    let context = Arc::new(ProjectorContext::new(settings.topics.clone(), metrics.clone()));
    let mut starts: BTreeMap<TopicPartition, i64> = BTreeMap::new();
    let (batch_sender, mut batches) = mpsc::channel::<Batch>(1);
    let (_shutdown_sender, shutdown) = watch::channel(false);
    let mut readers = Vec::new();
    for topic in InputTopic::ALL {
        let full_name = context.full_name(topic).to_owned();
        let mut config = kafka::reader_config(&settings.brokers, &format!("projector-replay-{schema}"));
        config.set("statistics.interval.ms", "1000").set("queued.max.messages.kbytes", "131072");
        let consumer: StreamConsumer<ContextHandle> =
            config.create_with_context(ContextHandle(context.clone())).context("failed to create replay consumer")?;
        let partitions = partition_count(&consumer, &full_name)?;
        // Config is state (read whole); the other topics are history of conversations.
        let from = if topic == InputTopic::Config { None } else { settings.from };
        let assignment = start_offsets(&consumer, &full_name, partitions, from)?;
        for element in assignment.elements() {
            let partition = (topic, element.partition());
            let (low, high) = consumer
                .fetch_watermarks(&full_name, element.partition(), Duration::from_secs(10))
                .context("failed to fetch watermarks")?;
            let start = match element.offset() {
                Offset::Offset(offset) => offset,
                Offset::End => high,
                _ => low,
            };
            starts.insert(partition, start);
            metrics.record_end(topic.base_name(), element.partition(), high);
            metrics.record_position(topic.base_name(), element.partition(), start);
        }
        consumer.assign(&assignment).context("failed to assign replay partitions")?;
        for element in assignment.elements() {
            // Reading starts exactly where we said, into a schema with no positions yet.
            context.mark_sought((topic, element.partition()), None);
        }
        let (_commands_sender, commands) = mpsc::unbounded_channel();
        let reader = Reader {
            consumer: Arc::new(consumer),
            context: context.clone(),
            max_records: settings.max_batch_records,
            linger: settings.batch_linger,
            single_topic: Some(topic),
            stored: None,
        };
        readers.push(tokio::spawn(reader.run(batch_sender.clone(), commands, shutdown.clone())));
    }
    drop(batch_sender);

    let (command_sender, mut commands) = mpsc::unbounded_channel();
    let mut writer = Writer {
        pool: pool.clone(),
        context: context.clone(),
        schema: SchemaChoice::Fixed(schema.clone()),
        current_schema: String::new(),
        continuity: HashMap::new(),
        reread_requested: HashMap::new(),
        commands: command_sender,
        dead_letter: None,
        notify: Notify::No,
        metrics: metrics.clone(),
        parallel: crate::consumer::DEFAULT_PARALLEL_WRITERS,
        // Nobody reads the schema before the switch, and the end of the replay is checked.
        synchronous_commit: false,
    };
    let mut at_end: BTreeSet<TopicPartition> = BTreeSet::new();
    let started = Instant::now();
    let mut reporter = Reporter::new(settings.progress, starts.clone());
    let mut never_stopped = shutdown.clone();
    while at_end.len() < starts.len() {
        let batch = tokio::time::timeout(Duration::from_millis(500), batches.recv()).await;
        match batch {
            Ok(Some(batch)) => {
                if writer.write_retrying(&batch, &mut never_stopped).await.is_some() {
                    at_end.extend(batch.at_end.iter().copied());
                }
                ensure_no_seek_requested(&mut commands, &schema)?;
            }
            Ok(None) => bail!("replay readers stopped before reaching the end of the log"),
            Err(_) => {}
        }
        reporter.report(&metrics, &at_end, started);
    }
    for reader in readers {
        reader.abort();
    }
    let indexes_started = Instant::now();
    create_indexes(pool, &schema, &deferred_indexes).await?;
    info!(
        indexes = deferred_indexes.len(),
        seconds = format!("{:.1}", indexes_started.elapsed().as_secs_f64()),
        "secondary indexes built"
    );
    // The index builds committed synchronously, so every batch before them is durable now;
    // a crash before that may have lost the last ones: they must all still be there.
    writer.audit_positions().await?;
    ensure_no_seek_requested(&mut commands, &schema)?;
    reporter.finish(&metrics, started);
    Ok(ReplaySummary { schema, events: metrics.events_applied.get(), elapsed: started.elapsed() })
}

/// A replay reads each partition once, front to back, and cannot seek back: if the writer asks
/// for a seek (the database lost committed batches, e.g. in a crash), the replay stops.
fn ensure_no_seek_requested(commands: &mut mpsc::UnboundedReceiver<Command>, schema: &str) -> anyhow::Result<()> {
    while let Ok(command) = commands.try_recv() {
        if let Command::Seek(partition, stored_opt) = command {
            bail!(
                "the database lost committed replay batches of {}/{} (position {stored_opt:?}; crash or failover?): \
                 drop schema {schema} and run the replay again",
                partition.0.base_name(),
                partition.1
            );
        }
    }
    Ok(())
}

/// Drops the schema's non-unique indexes; returns their definitions to recreate them.
async fn drop_secondary_indexes(pool: &PgPool, schema: &str) -> anyhow::Result<Vec<String>> {
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT i.indexname::text, i.indexdef FROM pg_indexes i \
         JOIN pg_class c ON c.relname = i.indexname JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = i.schemaname \
         JOIN pg_index x ON x.indexrelid = c.oid \
         WHERE i.schemaname = $1 AND NOT x.indisunique ORDER BY 1",
    )
    .bind(schema)
    .fetch_all(pool)
    .await
    .context("failed to list the replay schema's indexes")?;
    for (name, _) in &indexes {
        sqlx::query(&format!("DROP INDEX {schema}.\"{name}\"")).execute(pool).await?;
    }
    Ok(indexes.into_iter().map(|(_, definition)| definition).collect())
}

async fn create_indexes(pool: &PgPool, schema: &str, definitions: &[String]) -> anyhow::Result<()> {
    let mut connection = pool.acquire().await?;
    sqlx::query("SET maintenance_work_mem TO '256MB'").execute(&mut *connection).await?;
    for definition in definitions {
        sqlx::query(definition).execute(&mut *connection).await.with_context(|| format!("failed: {definition}"))?;
    }
    sqlx::query("RESET maintenance_work_mem").execute(&mut *connection).await?;
    // Fresh tables: give the planner statistics before readers arrive.
    let tables: Vec<String> = sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = $1")
        .bind(schema)
        .fetch_all(&mut *connection)
        .await?;
    for table in tables {
        sqlx::query(&format!("ANALYZE {schema}.\"{table}\"")).execute(&mut *connection).await?;
    }
    Ok(())
}

fn partition_count(consumer: &StreamConsumer<ContextHandle>, topic: &str) -> anyhow::Result<i32> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(30)).context("failed to fetch metadata")?;
    metadata
        .topics()
        .first()
        .filter(|topic_metadata| topic_metadata.error().is_none())
        .map(|topic_metadata| topic_metadata.partitions().len() as i32)
        .filter(|count| *count > 0)
        .with_context(|| format!("topic {topic} does not exist"))
}

fn start_offsets(
    consumer: &StreamConsumer<ContextHandle>,
    topic: &str,
    partitions: i32,
    from: Option<DateTime<Utc>>,
) -> anyhow::Result<TopicPartitionList> {
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    let Some(from) = from else { return Ok(list) };
    let by_time = consumer
        .offsets_for_timestamp(from.timestamp_millis(), Duration::from_secs(30))
        .context("failed to look offsets up by time")?;
    let mut list = TopicPartitionList::new();
    for element in by_time.elements_for_topic(topic) {
        // No record at or after `from`: start at the end (nothing to replay there yet).
        let offset = match element.offset() {
            Offset::Offset(offset) => Offset::Offset(offset),
            _ => Offset::End,
        };
        list.add_partition_offset(topic, element.partition(), offset)?;
    }
    Ok(list)
}

/// How far a replay got, in records (up to the partitions' known ends).
struct ReplayFigures {
    done: u64,
    total: u64,
    /// Records still to read, per partition.
    lags: Vec<(TopicPartition, i64)>,
}

/// Progress on a terminal (an indicatif bar, redrawn in place) or as periodic log lines.
struct Reporter {
    mode: Progress,
    starts: BTreeMap<TopicPartition, i64>,
    last: Instant,
    last_events: u64,
    rate: f64,
    /// The bar and, under it, the lag line (`Progress::Bar` only). indicatif draws nothing when
    /// stderr is not a terminal.
    bars_opt: Option<(ProgressBar, ProgressBar)>,
}

impl Reporter {
    fn new(mode: Progress, starts: BTreeMap<TopicPartition, i64>) -> Self {
        let bars_opt = (mode == Progress::Bar).then(|| {
            let lines = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
            let bar = lines.add(
                ProgressBar::new(0).with_style(
                    ProgressStyle::with_template("[{bar:30}] {percent:>3}%  {pos}/{len} records  {msg}")
                        .expect("the progress template is valid")
                        .progress_chars("= "),
                ),
            );
            let lag = lines.add(
                ProgressBar::new(0).with_style(
                    ProgressStyle::with_template("  lag per conversations partition: {msg}")
                        .expect("the lag template is valid"),
                ),
            );
            (bar, lag)
        });
        Reporter { mode, starts, last: Instant::now(), last_events: 0, rate: 0.0, bars_opt }
    }

    fn report(&mut self, metrics: &Metrics, at_end: &BTreeSet<TopicPartition>, started: Instant) {
        let interval = match self.mode {
            Progress::Bar => Duration::from_millis(250),
            Progress::Lines => Duration::from_secs(5),
            Progress::Quiet => return,
        };
        if self.last.elapsed() < interval {
            return;
        }
        let events = metrics.events_applied.get();
        let instant_rate = (events - self.last_events) as f64 / self.last.elapsed().as_secs_f64();
        // Smoothed, so the ETA does not jump with every batch.
        self.rate = if self.rate == 0.0 { instant_rate } else { 0.7 * self.rate + 0.3 * instant_rate };
        self.last = Instant::now();
        self.last_events = events;
        let ReplayFigures { done, total, lags } = self.figures(metrics);
        let remaining = total.saturating_sub(done);
        let eta = if self.rate > 0.0 { remaining as f64 / self.rate } else { f64::INFINITY };
        let lag_text: Vec<String> = lags
            .iter()
            .filter(|((topic, _), _)| *topic == InputTopic::Conversations)
            .map(|((_, partition), lag)| format!("{partition}:{}", short(*lag)))
            .collect();
        match (&self.bars_opt, self.mode) {
            (Some((bar, lag)), _) => {
                bar.set_length(total);
                bar.set_position(done);
                bar.set_message(format!(
                    "{:>8.0} events/s  ETA {}  partitions at end {}/{}",
                    self.rate,
                    if eta.is_finite() { format!("{eta:.0}s") } else { "?".into() },
                    at_end.len(),
                    self.starts.len(),
                ));
                lag.set_message(lag_text.join(" "));
            }
            (None, Progress::Lines) => info!(
                records_done = done,
                records_total = total,
                events_per_second = self.rate as u64,
                eta_seconds = if eta.is_finite() { eta as u64 } else { u64::MAX },
                elapsed_seconds = started.elapsed().as_secs(),
                lag = lag_text.join(" "),
                "replay progress"
            ),
            (None, Progress::Bar | Progress::Quiet) => {}
        }
    }

    fn figures(&self, metrics: &Metrics) -> ReplayFigures {
        let partitions = metrics.partitions();
        let mut done = 0u64;
        let mut total = 0u64;
        let mut lags = Vec::new();
        for (partition, start) in &self.starts {
            let Some(figures) = partitions.get(&(partition.0.base_name().to_owned(), partition.1)) else { continue };
            let end = figures.end_offset.unwrap_or(*start).max(*start);
            let next = figures.next_offset.unwrap_or(*start).clamp(*start, end);
            done += (next - start) as u64;
            total += (end - start) as u64;
            lags.push((*partition, end - next));
        }
        ReplayFigures { done, total, lags }
    }

    fn finish(&mut self, metrics: &Metrics, started: Instant) {
        let events = metrics.events_applied.get();
        let seconds = started.elapsed().as_secs_f64();
        if let Some((bar, lag)) = self.bars_opt.clone() {
            self.last = Instant::now() - Duration::from_secs(1);
            self.report(metrics, &self.starts.keys().copied().collect(), started);
            // Left on screen: the final figures stay above the summary line.
            bar.abandon();
            lag.abandon();
        }
        info!(
            events,
            seconds = format!("{seconds:.1}"),
            events_per_second = (events as f64 / seconds) as u64,
            "replay caught up"
        );
    }
}

fn short(value: i64) -> String {
    match value {
        v if v >= 1_000_000 => format!("{:.1}M", v as f64 / 1e6),
        v if v >= 10_000 => format!("{}k", v / 1000),
        v => v.to_string(),
    }
}

/// Makes `target` (default: the newest `rm_` schema) the active read-model schema and tells
/// every reader, in one transaction. Returns (previous, new).
pub async fn switch(pool: &PgPool, target: Option<&str>) -> anyhow::Result<(String, String)> {
    let target = match target {
        Some(target) => validate_schema_name(target)?.to_owned(),
        None => sqlx::query_scalar(
            "SELECT nspname::text FROM pg_namespace WHERE nspname ~ '^rm_[0-9a-z_]+$' ORDER BY nspname DESC LIMIT 1",
        )
        .fetch_optional(pool)
        .await?
        .context("no rm_ schema to switch to; run `projector replay run` first")?,
    };
    ensure_read_model_schema(pool, &target).await?;
    let mut transaction = pool.begin().await?;
    let current: String = sqlx::query_scalar("SELECT active_schema FROM public.read_model_control FOR UPDATE")
        .fetch_optional(&mut *transaction)
        .await?
        .unwrap_or_else(|| "public".to_owned());
    anyhow::ensure!(current != target, "{target} is already the active schema");
    set_active(&mut transaction, &target, Some(&current)).await?;
    transaction.commit().await?;
    info!(from = current, to = target, "read models switched");
    Ok((current, target))
}

/// Swaps back to the previous schema. Returns (rolled back from, now active).
pub async fn rollback(pool: &PgPool) -> anyhow::Result<(String, String)> {
    let mut transaction = pool.begin().await?;
    let row: Option<(String, Option<String>)> =
        sqlx::query_as("SELECT active_schema, previous_schema FROM public.read_model_control FOR UPDATE")
            .fetch_optional(&mut *transaction)
            .await?;
    let Some((active, Some(previous))) = row else { bail!("nothing to roll back to: no previous schema recorded") };
    ensure_read_model_schema(pool, &previous).await?;
    set_active(&mut transaction, &previous, Some(&active)).await?;
    transaction.commit().await?;
    info!(from = active, to = previous, "read models rolled back");
    Ok((active, previous))
}

/// Drops `target` (default: the previous schema). Never the active one, never `public` (it
/// holds the control table).
pub async fn drop_schema(pool: &PgPool, target: Option<&str>) -> anyhow::Result<String> {
    let mut transaction = pool.begin().await?;
    let row: Option<(String, Option<String>)> =
        sqlx::query_as("SELECT active_schema, previous_schema FROM public.read_model_control FOR UPDATE")
            .fetch_optional(&mut *transaction)
            .await?;
    let (active, previous) = row.unwrap_or_else(|| ("public".to_owned(), None));
    let target = match target {
        Some(target) => validate_schema_name(target)?.to_owned(),
        None => previous.clone().context("no previous schema recorded; name the schema to drop")?,
    };
    anyhow::ensure!(target != active, "{target} is the active schema; switch away from it first");
    anyhow::ensure!(target != "public", "public holds the control table and is never dropped");
    sqlx::query(&format!("DROP SCHEMA {target} CASCADE"))
        .execute(&mut *transaction)
        .await
        .with_context(|| format!("failed to drop schema {target}"))?;
    if previous.as_deref() == Some(target.as_str()) {
        sqlx::query("UPDATE public.read_model_control SET previous_schema = NULL").execute(&mut *transaction).await?;
    }
    transaction.commit().await?;
    info!(schema = target, "read-model schema dropped");
    Ok(target)
}

async fn set_active(
    transaction: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    active: &str,
    previous: Option<&str>,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO public.read_model_control (singleton, active_schema, previous_schema, switched_at) \
         VALUES (true, $1, $2, now()) ON CONFLICT (singleton) DO UPDATE SET active_schema = EXCLUDED.active_schema, \
         previous_schema = EXCLUDED.previous_schema, switched_at = EXCLUDED.switched_at",
    )
    .bind(active)
    .bind(previous)
    .execute(&mut **transaction)
    .await?;
    // Delivered at commit, together with the new row: a reader woken by it sees the switch.
    sqlx::query("SELECT pg_notify($1, $2)").bind(SWITCH_CHANNEL).bind(active).execute(&mut **transaction).await?;
    Ok(())
}

async fn ensure_read_model_schema(pool: &PgPool, schema: &str) -> anyhow::Result<()> {
    let ready: bool = sqlx::query_scalar("SELECT to_regclass(quote_ident($1) || '.projector_positions') IS NOT NULL")
        .bind(schema)
        .fetch_one(pool)
        .await?;
    anyhow::ensure!(ready, "schema {schema} holds no read models");
    Ok(())
}

/// `replay status`: the active and previous schema and every read-model schema present.
pub async fn status(pool: &PgPool) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let active = active_schema(pool).await?;
    let previous: Option<String> = sqlx::query_scalar("SELECT previous_schema FROM public.read_model_control")
        .fetch_optional(pool)
        .await
        .ok()
        .flatten()
        .flatten();
    let schemas: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname ~ '^rm_' ORDER BY nspname")
            .fetch_all(pool)
            .await?;
    let mut out = String::new();
    let _ = writeln!(out, "active:   {active}");
    let _ = writeln!(out, "previous: {}", previous.as_deref().unwrap_or("-"));
    let _ = writeln!(out, "replay schemas: {}", if schemas.is_empty() { "-".to_owned() } else { schemas.join(", ") });
    Ok(out)
}
