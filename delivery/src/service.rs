//! The delivery service's shell: intake from `outbound.v1` into the outbox, and the attempt
//! loop that sends what is due for the partitions this instance owns. The guarantees and the
//! one duplicate window are in docs/delivery.md; the decisions are pure functions elsewhere
//! (`retry`, `http`), this module only moves data between Kafka, PostgreSQL and the transports.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::PgPool;
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    AuthorKind, ChannelType, DeliveryAttemptRecorded, DeliveryState, Envelope, OutboundMessageQueued,
};
use switchboard_runtime::envelope;
use switchboard_runtime::kafka::{self, header};
use switchboard_runtime::publisher::EnvelopePublisher;
use switchboard_runtime::secrets::Secrets;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tracing::{Instrument, info, warn};

use crate::email::{SmtpRelay, SmtpSettings};
use crate::http::{self, HttpSender};
use crate::metrics::Metrics;
use crate::outcome::SendOutcome;
use crate::retry::{NextStep, RetryPolicy};

/// `DELIVERY_SMTP_CONNECTIONS` unless set.
pub const DEFAULT_SMTP_CONNECTIONS: u32 = 64;

/// Added to the send timeout to make the lease of a `sending` row (see `Sender::lease`).
pub const SENDING_LEASE_MARGIN: Duration = Duration::from_secs(5);

/// An outcome recorded this long ago without an acknowledged event is published again: longer
/// than the publisher's delivery timeout, so an event still on its way is not sent twice.
pub const UNPUBLISHED_AFTER: Duration = Duration::from_secs(35);

/// Meta's default per-number WhatsApp throughput, used when the channel sets none.
pub const WHATSAPP_DEFAULT_MESSAGES_PER_SECOND: u32 = 80;

pub struct DeliverySettings {
    pub brokers: String,
    pub group_id: String,
    /// `outbound.v1` (read) and `delivery.v1` (written), with the prefix.
    pub outbound_topic: String,
    pub delivery_topic: String,
    /// Graph API base URL, e.g. `https://graph.facebook.com/v21.0`.
    pub graph_base_url: String,
    pub secrets: Secrets,
    /// The SMTP relay; `None` fails email sends permanently with a clear reason.
    pub smtp: Option<SmtpSettings>,
    /// Pooled connections to the SMTP relay: one SMTP conversation is several round trips, so
    /// the relay's throughput grows with them (docs/benchmarks.md, "Outbound").
    pub smtp_connections: u32,
    /// Sends in flight at once.
    pub concurrency: usize,
    pub http_timeout: Duration,
    pub retry: RetryPolicy,
    /// How often the outbox is looked at when nothing woke the loop (retries falling due).
    pub poll_interval: Duration,
}

/// One claimed outbox row: an attempt recorded (and committed) before it is sent.
#[derive(Debug, Clone)]
struct Claimed {
    account_id: String,
    reply_id: String,
    attempt: i32,
    partition: i32,
    envelope: Vec<u8>,
    traceparent: String,
    tracestate: String,
    queued_at: DateTime<Utc>,
    started_at: DateTime<Utc>,
    resent_after_crash: bool,
}

/// Which outbound.v1 partitions this instance owns, and what it is sending for them.
#[derive(Default)]
struct Ownership {
    owned: Mutex<BTreeSet<i32>>,
    /// Assigned partitions whose rows left `sending` must be resolved (the crash rule).
    to_recover: Mutex<Vec<i32>>,
    /// Assigned partitions intake must seek to their stored positions.
    to_seek: Mutex<Vec<i32>>,
    /// Sends in flight in this process, by key.
    in_flight_keys: Mutex<HashSet<(String, String)>>,
    wake: Notify,
}

impl Ownership {
    fn owned(&self) -> Vec<i32> {
        self.owned.lock().expect("ownership lock").iter().copied().collect()
    }

    fn start(&self, claimed: &Claimed) {
        self.in_flight_keys
            .lock()
            .expect("in-flight lock")
            .insert((claimed.account_id.clone(), claimed.reply_id.clone()));
    }

    fn finish(&self, claimed: &Claimed) {
        self.in_flight_keys
            .lock()
            .expect("in-flight lock")
            .remove(&(claimed.account_id.clone(), claimed.reply_id.clone()));
    }

    fn is_in_flight(&self, account_id: &str, reply_id: &str) -> bool {
        self.in_flight_keys.lock().expect("in-flight lock").contains(&(account_id.to_owned(), reply_id.to_owned()))
    }
}

/// The consumer's context: partition ownership follows the group's assignment.
struct OwnershipContext {
    ownership: Arc<Ownership>,
    topic: String,
}

impl OwnershipContext {
    fn partitions(&self, list: &TopicPartitionList) -> Vec<i32> {
        list.elements()
            .iter()
            .filter(|element| element.topic() == self.topic)
            .map(|element| element.partition())
            .collect()
    }
}

impl ClientContext for OwnershipContext {}

impl ConsumerContext for OwnershipContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            // No new claims for these partitions. Sends in flight finish and record their outcome;
            // the next owner resends a row left `sending` only once its lease has expired, which
            // is after any send of this instance has timed out (never block librdkafka here).
            let partitions = self.partitions(list);
            let mut owned = self.ownership.owned.lock().expect("ownership lock");
            for partition in &partitions {
                owned.remove(partition);
            }
            info!(?partitions, "delivery partitions revoked");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let partitions = self.partitions(list);
            self.ownership.owned.lock().expect("ownership lock").extend(partitions.iter().copied());
            self.ownership.to_recover.lock().expect("ownership lock").extend(partitions.iter().copied());
            self.ownership.to_seek.lock().expect("ownership lock").extend(partitions.iter().copied());
            self.ownership.wake.notify_one();
            info!(?partitions, "delivery partitions assigned");
        }
    }
}

/// The send rate of a channel (`None`: unlimited): WhatsApp's configured per-number rate, 0
/// meaning Meta's default of 80/s; a custom channel's configured rate, 0 meaning no limit.
pub fn channel_rate(channel_type: ChannelType, configured_per_second: u32) -> Option<NonZeroU32> {
    match channel_type {
        ChannelType::Whatsapp if configured_per_second == 0 => NonZeroU32::new(WHATSAPP_DEFAULT_MESSAGES_PER_SECOND),
        ChannelType::Whatsapp | ChannelType::Custom => NonZeroU32::new(configured_per_second),
        _ => None,
    }
}

/// Runs the delivery service until `shutdown` turns true.
pub async fn run_delivery(
    settings: DeliverySettings,
    pool: PgPool,
    mut shutdown: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    crate::migrate(&pool).await?;
    let ownership = Arc::new(Ownership::default());
    let context = OwnershipContext { ownership: ownership.clone(), topic: settings.outbound_topic.clone() };
    let consumer: StreamConsumer<OwnershipContext> =
        kafka::group_consumer_config(&settings.brokers, "switchboard-delivery", &settings.group_id)
            .create_with_context(context)
            .context("failed to create the delivery consumer")?;
    consumer.subscribe(&[&settings.outbound_topic]).context("failed to subscribe to outbound.v1")?;
    let publisher = EnvelopePublisher::new(&settings.brokers, "switchboard-delivery", Duration::from_secs(30))
        .context("failed to create the delivery producer")?;
    let smtp = match &settings.smtp {
        Some(smtp) => Some(Arc::new(SmtpRelay::with_max_connections(smtp.clone(), settings.smtp_connections)?)),
        None => None,
    };
    let sender = Sender {
        pool: pool.clone(),
        publisher,
        http: HttpSender::new(settings.http_timeout)?,
        smtp,
        secrets: Arc::new(settings.secrets),
        graph_base_url: settings.graph_base_url.clone(),
        retry: settings.retry,
        delivery_topic: settings.delivery_topic.clone(),
        lease: settings.http_timeout + SENDING_LEASE_MARGIN,
        limiters: Arc::default(),
        metrics: metrics.clone(),
        recorder: spawn_recorder(pool.clone()),
        published: spawn_publication_marker(pool.clone()),
    };
    let intake =
        Intake { consumer, pool: pool.clone(), topic: settings.outbound_topic.clone(), ownership: ownership.clone() };
    let intake_metrics = metrics.clone();
    let intake_shutdown = shutdown.clone();
    let intake_task = tokio::spawn(async move { intake.run(intake_shutdown, intake_metrics).await });
    let result =
        attempt_loop(sender, ownership, settings.concurrency.max(1), settings.poll_interval, &mut shutdown).await;
    intake_task.abort();
    result
}

struct Intake {
    consumer: StreamConsumer<OwnershipContext>,
    pool: PgPool,
    topic: String,
    ownership: Arc<Ownership>,
}

/// A record of outbound.v1 taken into the outbox.
struct IntakeRow {
    account_id: String,
    reply_id: String,
    partition: i32,
    offset: i64,
    channel_type: String,
    envelope: Vec<u8>,
    traceparent: String,
    tracestate: String,
    queued_at: DateTime<Utc>,
}

const INTAKE_BATCH: usize = 2000;

impl Intake {
    async fn run(self, mut shutdown: watch::Receiver<bool>, metrics: Arc<Metrics>) {
        let mut stream = self.consumer.stream();
        loop {
            let to_seek: Vec<i32> = self.ownership.to_seek.lock().expect("ownership lock").drain(..).collect();
            if !to_seek.is_empty() {
                let again = match self.seek_to_stored(&to_seek).await {
                    Ok(again) => again,
                    Err(error) => {
                        warn!(error = format!("{error:#}"), "reading the stored positions failed; trying again");
                        to_seek
                    }
                };
                self.ownership.to_seek.lock().expect("ownership lock").extend(again);
            }
            let first = tokio::select! {
                first = tokio::time::timeout(Duration::from_millis(100), stream.next()) => first,
                _ = shutdown.changed() => return,
            };
            let mut records = Vec::new();
            match first {
                Ok(Some(Ok(record))) => records.push(record.detach()),
                Ok(Some(Err(error))) => {
                    warn!(%error, "delivery consumer error (librdkafka retries)");
                    continue;
                }
                Ok(None) => return,
                Err(_) => continue,
            }
            let deadline = tokio::time::Instant::now() + Duration::from_millis(5);
            while records.len() < INTAKE_BATCH {
                match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(Some(Ok(record))) => records.push(record.detach()),
                    Ok(Some(Err(error))) => warn!(%error, "delivery consumer error (librdkafka retries)"),
                    Ok(None) | Err(_) => break,
                }
            }
            // Until it is stored, the batch is read again (after a seek to the stored position).
            loop {
                match self.store(&records, &metrics).await {
                    Ok(()) => break,
                    Err(error) => {
                        warn!(error = format!("{error:#}"), "intake batch not stored; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                            _ = shutdown.changed() => return,
                        }
                    }
                }
            }
            self.ownership.wake.notify_one();
        }
    }

    #[tracing::instrument(name = "intake", skip_all, fields(records = records.len()))]
    async fn store(&self, records: &[rdkafka::message::OwnedMessage], metrics: &Metrics) -> anyhow::Result<()> {
        let mut rows = Vec::new();
        let mut next_offsets: HashMap<i32, i64> = HashMap::new();
        let now = Utc::now();
        let mut lags = Vec::new();
        for record in records {
            let slot = next_offsets.entry(record.partition()).or_insert(0);
            *slot = (*slot).max(record.offset() + 1);
            let decoded = match envelope::decode(record.payload()) {
                Ok(decoded) => decoded,
                Err(error) => {
                    warn!(%error, partition = record.partition(), offset = record.offset(), "undecodable outbound record skipped");
                    continue;
                }
            };
            // Notes (InternalNoteAdded) are never sent; nothing else belongs on this topic.
            let Some(Payload::OutboundMessageQueued(message)) = &decoded.payload else { continue };
            let header_text = |name: &str| {
                kafka::header_str(record.headers().map(|h| h.as_borrowed()), name).unwrap_or_default().to_owned()
            };
            let queued_at = envelope::to_datetime(decoded.recorded_at.as_ref());
            if let Some(timestamp) = record.timestamp().to_millis() {
                lags.push(((now.timestamp_millis() - timestamp).max(0) as f64) / 1000.0);
            }
            rows.push(IntakeRow {
                account_id: decoded.account_id.clone(),
                reply_id: message.reply_id.clone(),
                partition: record.partition(),
                offset: record.offset(),
                channel_type: switchboard_proto::names::name_of::<ChannelType>(message.channel_type).to_owned(),
                envelope: record.payload().unwrap_or_default().to_vec(),
                traceparent: header_text(header::TRACEPARENT),
                tracestate: header_text(header::TRACESTATE),
                queued_at,
            });
        }
        let mut transaction = self.pool.begin().await.context("failed to begin the intake transaction")?;
        let partitions: Vec<i32> = next_offsets.keys().copied().collect();
        let stored: HashMap<i32, i64> = sqlx::query_as::<_, (i32, i64)>(
            "SELECT partition, next_offset FROM delivery.consumer_positions
             WHERE topic = $1 AND partition = ANY($2) ORDER BY partition FOR UPDATE",
        )
        .bind(&self.topic)
        .bind(&partitions)
        .fetch_all(&mut *transaction)
        .await
        .context("failed to read the intake positions")?
        .into_iter()
        .collect();
        // Below the stored position: taken in before (a redelivery).
        rows.retain(|row| stored.get(&row.partition).is_none_or(|next| row.offset >= *next));
        let taken = rows.len() as u64;
        if !rows.is_empty() {
            sqlx::query(
                "INSERT INTO delivery.outbox (account_id, reply_id, source_partition, source_offset, channel_type,
                     envelope, traceparent, tracestate, queued_at, next_attempt_at)
                 SELECT account_id, reply_id, partition, source_offset, channel_type, envelope, traceparent, tracestate,
                     queued_at, now()
                 FROM UNNEST($1::text[], $2::text[], $3::int[], $4::bigint[], $5::text[], $6::bytea[], $7::text[],
                     $8::text[], $9::timestamptz[])
                     AS t(account_id, reply_id, partition, source_offset, channel_type, envelope, traceparent, tracestate, queued_at)
                 ON CONFLICT (account_id, reply_id) DO NOTHING",
            )
            .bind(rows.iter().map(|row| row.account_id.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|row| row.reply_id.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|row| row.partition).collect::<Vec<_>>())
            .bind(rows.iter().map(|row| row.offset).collect::<Vec<_>>())
            .bind(rows.iter().map(|row| row.channel_type.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|row| row.envelope.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|row| row.traceparent.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|row| row.tracestate.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|row| row.queued_at).collect::<Vec<_>>())
            .execute(&mut *transaction)
            .await
            .context("failed to insert into the outbox")?;
        }
        let (partitions, offsets): (Vec<i32>, Vec<i64>) = next_offsets.iter().map(|(p, o)| (*p, *o)).unzip();
        sqlx::query(
            "INSERT INTO delivery.consumer_positions (topic, partition, next_offset)
             SELECT $1, partition, next_offset FROM UNNEST($2::int[], $3::bigint[]) AS t(partition, next_offset)
             ON CONFLICT (topic, partition) DO UPDATE
                 SET next_offset = GREATEST(delivery.consumer_positions.next_offset, EXCLUDED.next_offset)",
        )
        .bind(&self.topic)
        .bind(&partitions)
        .bind(&offsets)
        .execute(&mut *transaction)
        .await
        .context("failed to store the intake positions")?;
        transaction.commit().await.context("failed to commit the intake transaction")?;
        metrics.intake(taken, lags);
        // Advisory: where to fetch from after a restart; the stored positions rule.
        let mut list = TopicPartitionList::new();
        for (partition, next_offset) in next_offsets {
            let _ = list.add_partition_offset(&self.topic, partition, Offset::Offset(next_offset));
        }
        if let Err(error) = self.consumer.commit(&list, CommitMode::Async) {
            warn!(%error, "advisory offset commit failed (harmless: positions are stored in postgres)");
        }
        Ok(())
    }

    /// Seeks each partition to its stored position; returns those to try again (a partition
    /// not fetched yet cannot be sought). Partitions with nothing stored need no seek: Kafka's
    /// committed offset is only ever committed after the rows, so it is never ahead.
    async fn seek_to_stored(&self, partitions: &[i32]) -> anyhow::Result<Vec<i32>> {
        let stored: HashMap<i32, i64> = sqlx::query_as::<_, (i32, i64)>(
            "SELECT partition, next_offset FROM delivery.consumer_positions WHERE topic = $1 AND partition = ANY($2)",
        )
        .bind(&self.topic)
        .bind(partitions)
        .fetch_all(&self.pool)
        .await
        .context("failed to read the stored positions")?
        .into_iter()
        .collect();
        let mut again = Vec::new();
        for (partition, next_offset) in stored {
            // Only partitions still assigned can be sought.
            if !self.ownership.owned.lock().expect("ownership lock").contains(&partition) {
                continue;
            }
            if let Err(error) =
                self.consumer.seek(&self.topic, partition, Offset::Offset(next_offset), Duration::from_secs(10))
            {
                tracing::debug!(%error, partition, "seek to the stored position not possible yet");
                again.push(partition);
            }
        }
        Ok(again)
    }
}

/// A channel's rate limiter and the rate it was built for (rebuilt when the rate changes).
type Limiter = (u32, Arc<DefaultDirectRateLimiter>);

/// Everything a send needs; cheap to clone into each send.
#[derive(Clone)]
struct Sender {
    pool: PgPool,
    publisher: EnvelopePublisher,
    http: HttpSender,
    smtp: Option<Arc<SmtpRelay>>,
    secrets: Arc<Secrets>,
    graph_base_url: String,
    retry: RetryPolicy,
    delivery_topic: String,
    /// How long an attempt may stay `sending` before the crash rule resends it: longer than
    /// any send of a live instance can take (the send timeout plus a margin).
    lease: Duration,
    limiters: Arc<Mutex<HashMap<(String, String), Limiter>>>,
    metrics: Arc<Metrics>,
    /// Records outcomes, many attempts per transaction.
    recorder: mpsc::Sender<RecordRequest>,
    /// Marks attempts published, many per statement.
    published: mpsc::UnboundedSender<(String, String, i32)>,
}

const CLAIMED_COLUMNS: &str = "o.account_id, o.reply_id, o.attempts, o.source_partition, o.envelope, o.traceparent,
    o.tracestate, o.queued_at";

type ClaimedRow = (String, String, i32, i32, Vec<u8>, String, String, DateTime<Utc>);

fn claimed_from(row: ClaimedRow, started_at: DateTime<Utc>, resent_after_crash: bool) -> Claimed {
    let (account_id, reply_id, attempt, partition, envelope, traceparent, tracestate, queued_at) = row;
    Claimed {
        account_id,
        reply_id,
        attempt,
        partition,
        envelope,
        traceparent,
        tracestate,
        queued_at,
        started_at,
        resent_after_crash,
    }
}

async fn attempt_loop(
    sender: Sender,
    ownership: Arc<Ownership>,
    concurrency: usize,
    poll_interval: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // Each attempt is a task of its own: it must make progress (and give its connection back)
    // while this loop awaits a claim.
    let mut running = tokio::task::JoinSet::new();
    let mut last_housekeeping = Instant::now() - Duration::from_secs(60);
    // Set by a wake-up (intake took messages in, the poll interval passed); a finished send
    // alone claims only once half the room is free, so claims stay batches, not one per send.
    let mut woken = true;
    // The last claim was full: more rows are probably due.
    let mut more_due = false;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let to_recover: Vec<i32> = ownership.to_recover.lock().expect("ownership lock").drain(..).collect();
        if !to_recover.is_empty() {
            match sender.recover(&to_recover, &ownership).await {
                Ok(recovered) => {
                    for claimed in recovered {
                        ownership.start(&claimed);
                        running.spawn(sender.clone().attempt(claimed, ownership.clone()));
                    }
                }
                Err(error) => {
                    warn!(error = format!("{error:#}"), "crash recovery failed; trying again");
                    ownership.to_recover.lock().expect("ownership lock").extend(to_recover);
                }
            }
        }
        if last_housekeeping.elapsed() >= Duration::from_secs(2) {
            last_housekeeping = Instant::now();
            // Rows left `sending` whose lease expired after the assignment was looked at.
            ownership.to_recover.lock().expect("ownership lock").extend(ownership.owned());
            if let Err(error) = sender.housekeeping().await {
                warn!(error = format!("{error:#}"), "delivery housekeeping failed");
            }
        }
        // Claim when woken, or when half the room is free and more is due: claims stay batches
        // that overlap with the sends, not one query per finished send.
        let room = concurrency.saturating_sub(running.len());
        if room > 0 && (woken || (more_due && room >= concurrency.div_ceil(2))) {
            woken = false;
            let owned = ownership.owned();
            if !owned.is_empty() {
                match sender.claim(&owned, room as i64).await {
                    Ok(claimed) => {
                        more_due = claimed.len() == room;
                        for claimed in claimed {
                            ownership.start(&claimed);
                            running.spawn(sender.clone().attempt(claimed, ownership.clone()));
                        }
                    }
                    Err(error) => warn!(error = format!("{error:#}"), "claiming due messages failed"),
                }
            }
        }
        tokio::select! {
            Some(_) = running.join_next(), if !running.is_empty() => {}
            _ = ownership.wake.notified() => woken = true,
            _ = tokio::time::sleep(poll_interval) => woken = true,
            _ = shutdown.changed() => {}
        }
    }
    // Let the sends in flight be recorded: their outcome is known now, not after a restart.
    while running.join_next().await.is_some() {}
    Ok(())
}

impl Sender {
    /// Records attempt n+1 of up to `limit` due rows (state `sending`) and commits, before any
    /// of them is sent.
    #[tracing::instrument(name = "claim", skip_all, fields(limit))]
    async fn claim(&self, partitions: &[i32], limit: i64) -> anyhow::Result<Vec<Claimed>> {
        let mut transaction = self.pool.begin().await?;
        let rows: Vec<ClaimedRow> = sqlx::query_as(&format!(
            "WITH due AS (
                 SELECT account_id, reply_id FROM delivery.outbox
                 WHERE source_partition = ANY($1) AND state IN ('queued', 'retry') AND next_attempt_at <= now()
                 ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED)
             UPDATE delivery.outbox o SET state = 'sending', attempts = o.attempts + 1
             FROM due WHERE o.account_id = due.account_id AND o.reply_id = due.reply_id
             RETURNING {CLAIMED_COLUMNS}"
        ))
        .bind(partitions)
        .bind(limit)
        .fetch_all(&mut *transaction)
        .await
        .context("failed to claim due messages")?;
        if rows.is_empty() {
            transaction.rollback().await?;
            return Ok(Vec::new());
        }
        let started_at: DateTime<Utc> = sqlx::query_scalar(
            "INSERT INTO delivery.attempts (account_id, reply_id, attempt, source_partition, started_at)
             SELECT account_id, reply_id, attempt, partition, now()
             FROM UNNEST($1::text[], $2::text[], $3::int[], $4::int[]) AS t(account_id, reply_id, attempt, partition)
             RETURNING started_at",
        )
        .bind(rows.iter().map(|row| row.0.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|row| row.1.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|row| row.2).collect::<Vec<_>>())
        .bind(rows.iter().map(|row| row.3).collect::<Vec<_>>())
        .fetch_all(&mut *transaction)
        .await
        .context("failed to record the attempts")?
        .first()
        .copied()
        .unwrap_or_else(Utc::now);
        transaction.commit().await.context("failed to commit the recorded attempts")?;
        Ok(rows.into_iter().map(|row| claimed_from(row, started_at, false)).collect())
    }

    /// The crash rule: rows of `partitions` found `sending` (not in flight in this process)
    /// past their lease had an unknown outcome; their attempt is sent again with the same key,
    /// marked `resent_after_crash`. Outcomes recorded but not yet published are published.
    #[tracing::instrument(name = "recover", skip_all, fields(?partitions))]
    async fn recover(&self, partitions: &[i32], ownership: &Ownership) -> anyhow::Result<Vec<Claimed>> {
        let rows: Vec<ClaimedRow> = sqlx::query_as(&format!(
            "SELECT {CLAIMED_COLUMNS} FROM delivery.outbox o
             JOIN delivery.attempts a ON a.account_id = o.account_id AND a.reply_id = o.reply_id AND a.attempt = o.attempts
             WHERE o.source_partition = ANY($1) AND o.state = 'sending' AND a.outcome IS NULL
                 AND a.started_at < now() - make_interval(secs => $2)"
        ))
        .bind(partitions)
        .bind(self.lease.as_secs_f64())
        .fetch_all(&self.pool)
        .await
        .context("failed to find messages left sending")?;
        let rows: Vec<ClaimedRow> = rows.into_iter().filter(|row| !ownership.is_in_flight(&row.0, &row.1)).collect();
        let mut recovered = Vec::new();
        if !rows.is_empty() {
            // Taking the lease again is the claim: of two instances racing here (a rebalance),
            // only the one whose update still sees the expired lease resends.
            let taken: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
                "UPDATE delivery.attempts a SET resent_after_crash = true, started_at = now()
                 FROM UNNEST($1::text[], $2::text[], $3::int[]) AS t(account_id, reply_id, attempt)
                 WHERE a.account_id = t.account_id AND a.reply_id = t.reply_id AND a.attempt = t.attempt
                     AND a.outcome IS NULL AND a.started_at < now() - make_interval(secs => $4)
                 RETURNING a.account_id, a.reply_id, a.started_at",
            )
            .bind(rows.iter().map(|row| row.0.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|row| row.1.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|row| row.2).collect::<Vec<_>>())
            .bind(self.lease.as_secs_f64())
            .fetch_all(&self.pool)
            .await
            .context("failed to mark attempts resent after a crash")?;
            let taken: HashMap<(String, String), DateTime<Utc>> = taken
                .into_iter()
                .map(|(account_id, reply_id, started_at)| ((account_id, reply_id), started_at))
                .collect();
            info!(count = taken.len(), "messages left sending by a crash are sent again with the same key");
            self.metrics.resent_after_crash(taken.len() as u64);
            recovered = rows
                .into_iter()
                .filter_map(|row| {
                    let started_at = *taken.get(&(row.0.clone(), row.1.clone()))?;
                    Some(claimed_from(row, started_at, true))
                })
                .collect();
        }
        self.publish_unpublished(partitions).await?;
        Ok(recovered)
    }

    async fn housekeeping(&self) -> anyhow::Result<()> {
        let depth: i64 =
            sqlx::query_scalar("SELECT count(*) FROM delivery.outbox WHERE state IN ('queued', 'retry', 'sending')")
                .fetch_one(&self.pool)
                .await?;
        self.metrics.queue_depth(depth);
        Ok(())
    }

    /// Publishes the events of attempts whose outcome was recorded but whose event was not
    /// acknowledged (a crash or a Kafka error in between). Same event id as the first try.
    async fn publish_unpublished(&self, partitions: &[i32]) -> anyhow::Result<()> {
        type Row = (
            String,
            String,
            i32,
            bool,
            String,
            i32,
            String,
            String,
            Option<DateTime<Utc>>,
            DateTime<Utc>,
            Option<DateTime<Utc>>,
            Vec<u8>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT a.account_id, a.reply_id, a.attempt, a.resent_after_crash, a.outcome, a.status_code, a.error,
                 a.provider_message_id, a.next_attempt_at, a.started_at, a.finished_at, o.envelope
             FROM delivery.attempts a JOIN delivery.outbox o USING (account_id, reply_id)
             WHERE a.source_partition = ANY($1) AND a.outcome IS NOT NULL AND NOT a.published
                 AND a.finished_at < now() - make_interval(secs => $2)
             LIMIT 1000",
        )
        .bind(partitions)
        .bind(UNPUBLISHED_AFTER.as_secs_f64())
        .fetch_all(&self.pool)
        .await
        .context("failed to read unpublished attempts")?;
        for row in rows {
            let (
                account_id,
                reply_id,
                attempt,
                resent,
                outcome,
                status_code,
                error,
                provider_message_id,
                next_at,
                started_at,
                finished_at,
                bytes,
            ) = row;
            let Ok(cause) = envelope::decode(Some(&bytes)) else { continue };
            let Some(Payload::OutboundMessageQueued(message)) = &cause.payload else { continue };
            let recorded = Recorded {
                outcome_name: outcome,
                status_code: status_code as u32,
                error,
                provider_message_id,
                next_attempt_at: next_at,
                finished_at: finished_at.unwrap_or_else(Utc::now),
            };
            let event = attempt_event(&cause, message, attempt as u32, started_at, resent, &recorded);
            self.publisher.publish(&self.delivery_topic, &event).await.context("failed to publish an attempt")?;
            mark_published(&self.pool, &account_id, &reply_id, attempt).await?;
        }
        Ok(())
    }

    /// One attempt: send, record the outcome, publish it. Never fails: what cannot be recorded
    /// stays `sending` and is resolved by the crash rule.
    async fn attempt(self, claimed: Claimed, ownership: Arc<Ownership>) {
        let span = tracing::info_span!(
            "deliver",
            reply_id = %claimed.reply_id,
            attempt = claimed.attempt,
            resent_after_crash = claimed.resent_after_crash,
            channel_type = tracing::field::Empty,
        );
        if !claimed.traceparent.is_empty() {
            let mut headers = OwnedHeaders::new_with_capacity(2)
                .insert(Header { key: header::TRACEPARENT, value: Some(claimed.traceparent.as_bytes()) });
            if !claimed.tracestate.is_empty() {
                headers =
                    headers.insert(Header { key: header::TRACESTATE, value: Some(claimed.tracestate.as_bytes()) });
            }
            switchboard_runtime::telemetry::adopt_trace_context(&span, Some(headers.as_borrowed()));
        }
        if let Err(error) = self.attempt_inner(&claimed).instrument(span).await {
            warn!(reply_id = %claimed.reply_id, error = format!("{error:#}"), "attempt not recorded; the crash rule resolves it");
            // Left `sending`: resolved now by the crash rule, by this instance.
            ownership.finish(&claimed);
            ownership.to_recover.lock().expect("ownership lock").push(claimed.partition);
            return;
        }
        ownership.finish(&claimed);
    }

    async fn attempt_inner(&self, claimed: &Claimed) -> anyhow::Result<()> {
        let cause = envelope::decode(Some(&claimed.envelope)).context("stored envelope does not decode")?;
        let Some(Payload::OutboundMessageQueued(message)) = &cause.payload else {
            anyhow::bail!("stored envelope is not an OutboundMessageQueued");
        };
        let channel_type = ChannelType::try_from(message.channel_type).unwrap_or_default();
        let channel_name = switchboard_proto::names::name_of::<ChannelType>(message.channel_type);
        tracing::Span::current().record("channel_type", channel_name);
        let timer = Instant::now();
        self.rate_limit(&cause.account_id, message, channel_type).await;
        let recorded = if message.email.is_none() && channel_type == ChannelType::Chat {
            self.send_chat(claimed, &cause, message).await?
        } else {
            let outcome = self.send(claimed, message, channel_type).await;
            let next = self.retry.next_step(
                &outcome,
                claimed.attempt as u32,
                claimed.queued_at,
                Utc::now(),
                rand::random::<f64>(),
            );
            let recorded = Recorded::of(&outcome, &next);
            let (done, recorded_opt) = oneshot::channel();
            self.recorder
                .send(RecordRequest { claimed: claimed.clone(), recorded: recorded.clone(), done })
                .await
                .map_err(|_| anyhow::anyhow!("the outcome recorder stopped"))?;
            recorded_opt
                .await
                .map_err(|_| anyhow::anyhow!("the outcome recorder stopped"))?
                .map_err(anyhow::Error::msg)?;
            recorded
        };
        self.metrics.attempt(channel_name, &recorded.outcome_name, timer.elapsed().as_secs_f64());
        let event = attempt_event(
            &cause,
            message,
            claimed.attempt as u32,
            claimed.started_at,
            claimed.resent_after_crash,
            &recorded,
        );
        match self.publisher.publish(&self.delivery_topic, &event).await {
            Ok(_) => {
                let _ = self.published.send((claimed.account_id.clone(), claimed.reply_id.clone(), claimed.attempt));
            }
            // Recorded: housekeeping publishes it again.
            Err(error) => warn!(%error, "attempt event not acknowledged; published again later"),
        }
        Ok(())
    }

    async fn rate_limit(&self, account_id: &str, message: &OutboundMessageQueued, channel_type: ChannelType) {
        let Some(per_second) = channel_rate(channel_type, message.channel_messages_per_second) else { return };
        let rate = per_second.get();
        let limiter = {
            let mut limiters = self.limiters.lock().expect("limiter lock");
            let key = (account_id.to_owned(), message.channel_id.clone());
            match limiters.get(&key) {
                Some((configured, limiter)) if *configured == rate => limiter.clone(),
                _ => {
                    let limiter = Arc::new(RateLimiter::direct(Quota::per_second(per_second)));
                    limiters.insert(key, (rate, limiter.clone()));
                    limiter
                }
            }
        };
        // A burst waits for its turn; it is never refused.
        limiter.until_ready().instrument(tracing::info_span!("rate_limit", per_second = rate)).await;
    }

    async fn send(&self, claimed: &Claimed, message: &OutboundMessageQueued, channel_type: ChannelType) -> SendOutcome {
        let secrets = self.secrets.channel(&claimed.account_id, &message.channel_id);
        let built = match (&message.email, channel_type) {
            (Some(_), _) => {
                return match &self.smtp {
                    Some(relay) => relay.send(message).instrument(tracing::info_span!("smtp_send")).await,
                    None => SendOutcome::Permanent { error: "no SMTP relay is configured".into(), status_code: 0 },
                };
            }
            (None, ChannelType::FacebookMessenger) => {
                let token = secrets.and_then(|secrets| secrets.access_token.as_ref());
                return self.send_messenger(message, token).await;
            }
            (None, ChannelType::Whatsapp) => {
                http::whatsapp_request(&self.graph_base_url, message, secrets.and_then(|s| s.access_token.as_ref()))
            }
            (None, ChannelType::Custom) => http::custom_request(
                message,
                secrets.and_then(|secrets| secrets.signing_key.as_ref()),
                claimed.queued_at,
                Utc::now(),
            ),
            (None, other) => {
                return SendOutcome::Permanent {
                    error: format!(
                        "channel type {} has no reply path",
                        switchboard_proto::names::name_of::<ChannelType>(other as i32)
                    ),
                    status_code: 0,
                };
            }
        };
        match built {
            Ok(request) => self.http.send(&request, &message.idempotency_key).await,
            Err(error) => SendOutcome::Permanent { error: error.to_string(), status_code: 0 },
        }
    }

    /// A Messenger reply is one Meta message per part (text, each attachment), sent in order;
    /// the first part's message id is the reply's.
    async fn send_messenger(
        &self,
        message: &OutboundMessageQueued,
        token: Option<&switchboard_runtime::secrets::Secret>,
    ) -> SendOutcome {
        let parts = http::message_parts(message).len().max(1);
        let mut first_id = None;
        for part in 0..parts {
            let request = match http::messenger_request(&self.graph_base_url, message, token, part) {
                Ok(request) => request,
                Err(error) => return SendOutcome::Permanent { error: error.to_string(), status_code: 0 },
            };
            match self.http.send(&request, &http::part_key(&message.idempotency_key, part)).await {
                SendOutcome::Sent { provider_message_id, status_code } => {
                    let id = first_id.get_or_insert(provider_message_id);
                    if part + 1 == parts {
                        return SendOutcome::Sent { provider_message_id: id.clone(), status_code };
                    }
                }
                other => return other,
            }
        }
        SendOutcome::Permanent { error: "nothing to send".into(), status_code: 0 }
    }

    /// Chat (C5): "sent" is the row in `delivery.chat_messages`, inserted and notified in the
    /// transaction that records the outcome, so it happens exactly once.
    #[tracing::instrument(name = "chat_send", skip_all)]
    async fn send_chat(
        &self,
        claimed: &Claimed,
        cause: &Envelope,
        message: &OutboundMessageQueued,
    ) -> anyhow::Result<Recorded> {
        let author = message.author.clone().unwrap_or_default();
        let author_kind = if author.kind == AuthorKind::Automation as i32 { "automation" } else { "agent" };
        let attachments = serde_json::Value::Array(
            message
                .attachments
                .iter()
                .map(|attachment| {
                    serde_json::json!({
                        "url": attachment.url, "file_name": attachment.file_name,
                        "content_type": attachment.content_type, "size_bytes": attachment.size_bytes,
                    })
                })
                .collect(),
        );
        let ids = (uuid::Uuid::parse_str(&message.reply_id), uuid::Uuid::parse_str(&message.conversation_id));
        let (Ok(reply_id), Ok(conversation_id)) = ids else {
            let outcome =
                SendOutcome::Permanent { error: "chat reply or conversation id is not a UUID".into(), status_code: 0 };
            let recorded = Recorded::of(&outcome, &NextStep::Failed { gave_up: false });
            let mut transaction = self.pool.begin().await?;
            record_outcome(&mut transaction, claimed, &recorded).await?;
            transaction.commit().await?;
            return Ok(recorded);
        };
        let mut transaction = self.pool.begin().await?;
        let inserted: Option<i64> = sqlx::query_scalar(
            "INSERT INTO delivery.chat_messages (account_id, channel_id, visitor_id, reply_id, conversation_id,
                 author_kind, author_name, text, attachments, sent_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, now())
             ON CONFLICT (account_id, reply_id) DO NOTHING RETURNING seq",
        )
        .bind(&cause.account_id)
        .bind(&message.channel_id)
        .bind(&message.recipient)
        .bind(reply_id)
        .bind(conversation_id)
        .bind(author_kind)
        .bind(&author.name)
        .bind(&message.text)
        .bind(sqlx::types::Json(attachments))
        .fetch_optional(&mut *transaction)
        .await
        .context("failed to insert the chat message")?;
        let seq = match inserted {
            Some(seq) => {
                sqlx::query("SELECT pg_notify('delivery_chat_messages', $1)")
                    .bind(seq.to_string())
                    .execute(&mut *transaction)
                    .await
                    .context("failed to notify the chat message")?;
                seq
            }
            None => {
                sqlx::query_scalar("SELECT seq FROM delivery.chat_messages WHERE account_id = $1 AND reply_id = $2")
                    .bind(&cause.account_id)
                    .bind(reply_id)
                    .fetch_one(&mut *transaction)
                    .await?
            }
        };
        let outcome = SendOutcome::Sent { provider_message_id: seq.to_string(), status_code: 0 };
        let recorded = Recorded::of(&outcome, &NextStep::Sent);
        record_outcome(&mut transaction, claimed, &recorded).await?;
        transaction.commit().await.context("failed to commit the chat message")?;
        Ok(recorded)
    }
}

/// An attempt's outcome as stored and published.
#[derive(Debug, Clone)]
struct Recorded {
    /// sent | retry | failed
    outcome_name: String,
    status_code: u32,
    error: String,
    provider_message_id: String,
    next_attempt_at: Option<DateTime<Utc>>,
    finished_at: DateTime<Utc>,
}

impl Recorded {
    fn of(outcome: &SendOutcome, next: &NextStep) -> Recorded {
        let (status_code, error, provider_message_id) = match outcome {
            SendOutcome::Sent { provider_message_id, status_code } => {
                (*status_code, String::new(), provider_message_id.clone())
            }
            SendOutcome::Retryable { error, status_code, .. } | SendOutcome::Permanent { error, status_code } => {
                (*status_code, error.clone(), String::new())
            }
        };
        let (outcome_name, next_attempt_at, error) = match next {
            NextStep::Sent => ("sent", None, error),
            NextStep::RetryAt(at) => ("retry", Some(*at), error),
            NextStep::Failed { gave_up: true } => ("failed", None, format!("gave up after the retry limit: {error}")),
            NextStep::Failed { gave_up: false } => ("failed", None, error),
        };
        Recorded {
            outcome_name: outcome_name.to_owned(),
            status_code,
            error,
            provider_message_id,
            next_attempt_at,
            finished_at: Utc::now(),
        }
    }
}

async fn record_outcome(
    transaction: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    claimed: &Claimed,
    recorded: &Recorded,
) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE delivery.attempts SET outcome = $4, finished_at = $5, status_code = $6, error = $7,
             provider_message_id = $8, next_attempt_at = $9
         WHERE account_id = $1 AND reply_id = $2 AND attempt = $3",
    )
    .bind(&claimed.account_id)
    .bind(&claimed.reply_id)
    .bind(claimed.attempt)
    .bind(&recorded.outcome_name)
    .bind(recorded.finished_at)
    .bind(recorded.status_code as i32)
    .bind(&recorded.error)
    .bind(&recorded.provider_message_id)
    .bind(recorded.next_attempt_at)
    .execute(&mut **transaction)
    .await
    .context("failed to record the attempt's outcome")?;
    sqlx::query(
        "UPDATE delivery.outbox SET state = $4, next_attempt_at = COALESCE($5, next_attempt_at), last_error = $6,
             provider_message_id = $7
         WHERE account_id = $1 AND reply_id = $2 AND attempts = $3 AND state = 'sending'",
    )
    .bind(&claimed.account_id)
    .bind(&claimed.reply_id)
    .bind(claimed.attempt)
    .bind(&recorded.outcome_name)
    .bind(recorded.next_attempt_at)
    .bind(&recorded.error)
    .bind(&recorded.provider_message_id)
    .execute(&mut **transaction)
    .await
    .context("failed to record the message's state")?;
    Ok(())
}

/// An outcome to record, and where to say whether it was committed.
struct RecordRequest {
    claimed: Claimed,
    recorded: Recorded,
    done: oneshot::Sender<Result<(), String>>,
}

/// Outcomes per transaction at most.
const RECORD_BATCH: usize = 1000;

/// The task that records outcomes: whatever is waiting goes into one transaction (one commit,
/// one fsync, for many attempts).
fn spawn_recorder(pool: PgPool) -> mpsc::Sender<RecordRequest> {
    let (sender, mut requests) = mpsc::channel::<RecordRequest>(RECORD_BATCH * 4);
    tokio::spawn(async move {
        while let Some(first) = requests.recv().await {
            let mut batch = vec![first];
            while batch.len() < RECORD_BATCH {
                match requests.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            let result = record_outcomes(&pool, &batch).await.map_err(|error| format!("{error:#}"));
            for request in batch {
                let _ = request.done.send(result.clone());
            }
        }
    });
    sender
}

#[tracing::instrument(name = "record_outcomes", skip_all, fields(attempts = batch.len()))]
async fn record_outcomes(pool: &PgPool, batch: &[RecordRequest]) -> anyhow::Result<()> {
    let column = |get: &dyn Fn(&RecordRequest) -> String| batch.iter().map(get).collect::<Vec<_>>();
    let account_ids = column(&|request| request.claimed.account_id.clone());
    let reply_ids = column(&|request| request.claimed.reply_id.clone());
    let attempts: Vec<i32> = batch.iter().map(|request| request.claimed.attempt).collect();
    let outcomes = column(&|request| request.recorded.outcome_name.clone());
    let finished_at: Vec<DateTime<Utc>> = batch.iter().map(|request| request.recorded.finished_at).collect();
    let status_codes: Vec<i32> = batch.iter().map(|request| request.recorded.status_code as i32).collect();
    let errors = column(&|request| request.recorded.error.clone());
    let provider_ids = column(&|request| request.recorded.provider_message_id.clone());
    let next_at: Vec<Option<DateTime<Utc>>> = batch.iter().map(|request| request.recorded.next_attempt_at).collect();
    let mut transaction = pool.begin().await?;
    sqlx::query(
        "UPDATE delivery.attempts a SET outcome = t.outcome, finished_at = t.finished_at, status_code = t.status_code,
             error = t.error, provider_message_id = t.provider_message_id, next_attempt_at = t.next_attempt_at
         FROM UNNEST($1::text[], $2::text[], $3::int[], $4::text[], $5::timestamptz[], $6::int[], $7::text[],
             $8::text[], $9::timestamptz[])
             AS t(account_id, reply_id, attempt, outcome, finished_at, status_code, error, provider_message_id,
                  next_attempt_at)
         WHERE a.account_id = t.account_id AND a.reply_id = t.reply_id AND a.attempt = t.attempt",
    )
    .bind(&account_ids)
    .bind(&reply_ids)
    .bind(&attempts)
    .bind(&outcomes)
    .bind(&finished_at)
    .bind(&status_codes)
    .bind(&errors)
    .bind(&provider_ids)
    .bind(&next_at)
    .execute(&mut *transaction)
    .await
    .context("failed to record the attempts' outcomes")?;
    sqlx::query(
        "UPDATE delivery.outbox o SET state = t.outcome, next_attempt_at = COALESCE(t.next_attempt_at, o.next_attempt_at),
             last_error = t.error, provider_message_id = t.provider_message_id
         FROM UNNEST($1::text[], $2::text[], $3::int[], $4::text[], $5::timestamptz[], $6::text[], $7::text[])
             AS t(account_id, reply_id, attempt, outcome, next_attempt_at, error, provider_message_id)
         WHERE o.account_id = t.account_id AND o.reply_id = t.reply_id AND o.attempts = t.attempt
             AND o.state = 'sending'",
    )
    .bind(&account_ids)
    .bind(&reply_ids)
    .bind(&attempts)
    .bind(&outcomes)
    .bind(&next_at)
    .bind(&errors)
    .bind(&provider_ids)
    .execute(&mut *transaction)
    .await
    .context("failed to record the messages' states")?;
    transaction.commit().await.context("failed to commit the outcomes")?;
    Ok(())
}

/// The task that marks attempts published, many per statement. Losing a mark only means the
/// event is published again later, with the same event id.
fn spawn_publication_marker(pool: PgPool) -> mpsc::UnboundedSender<(String, String, i32)> {
    let (sender, mut marks) = mpsc::unbounded_channel::<(String, String, i32)>();
    tokio::spawn(async move {
        while let Some(first) = marks.recv().await {
            let mut batch = vec![first];
            while batch.len() < RECORD_BATCH {
                match marks.try_recv() {
                    Ok(mark) => batch.push(mark),
                    Err(_) => break,
                }
            }
            let result = sqlx::query(
                "UPDATE delivery.attempts a SET published = true
                 FROM UNNEST($1::text[], $2::text[], $3::int[]) AS t(account_id, reply_id, attempt)
                 WHERE a.account_id = t.account_id AND a.reply_id = t.reply_id AND a.attempt = t.attempt",
            )
            .bind(batch.iter().map(|mark| mark.0.clone()).collect::<Vec<_>>())
            .bind(batch.iter().map(|mark| mark.1.clone()).collect::<Vec<_>>())
            .bind(batch.iter().map(|mark| mark.2).collect::<Vec<_>>())
            .execute(&pool)
            .await;
            if let Err(error) = result {
                warn!(%error, "marking attempts published failed; they are published again later");
            }
        }
    });
    sender
}

async fn mark_published(pool: &PgPool, account_id: &str, reply_id: &str, attempt: i32) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE delivery.attempts SET published = true WHERE account_id = $1 AND reply_id = $2 AND attempt = $3",
    )
    .bind(account_id)
    .bind(reply_id)
    .bind(attempt)
    .execute(pool)
    .await
    .context("failed to mark an attempt published")?;
    Ok(())
}

/// The `DeliveryAttemptRecorded` of attempt `attempt`: derived from the queued message, so the
/// same attempt always has the same event id (a second publication is recognisable).
fn attempt_event(
    cause: &Envelope,
    message: &OutboundMessageQueued,
    attempt: u32,
    started_at: DateTime<Utc>,
    resent_after_crash: bool,
    recorded: &Recorded,
) -> Envelope {
    let state = if recorded.outcome_name == "sent" { DeliveryState::Sent } else { DeliveryState::Failed };
    let payload = Payload::DeliveryAttemptRecorded(DeliveryAttemptRecorded {
        reply_id: message.reply_id.clone(),
        conversation_id: message.conversation_id.clone(),
        channel_id: message.channel_id.clone(),
        attempt,
        state: state as i32,
        provider_message_id: recorded.provider_message_id.clone(),
        error: recorded.error.clone(),
        will_retry: recorded.outcome_name == "retry",
        next_attempt_at: recorded.next_attempt_at.map(envelope::timestamp),
        attempt_started_at: Some(envelope::timestamp(started_at)),
        idempotency_key: message.idempotency_key.clone(),
        resent_after_crash,
        provider_status_code: recorded.status_code,
        purpose: message.purpose,
    });
    let mut event = envelope::derived_from(cause, attempt as usize, payload);
    event.event_id = envelope::derived_id(cause, &format!("delivery-attempt/{attempt}")).to_string();
    event.occurred_at = Some(envelope::timestamp(recorded.finished_at));
    event.recorded_at = Some(envelope::timestamp(Utc::now()));
    event.partition_key =
        switchboard_runtime::outbound::outbound_partition_key(&cause.account_id, &message.conversation_id);
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c8_c10_channel_rates_default_per_channel_type() {
        assert_eq!(channel_rate(ChannelType::Whatsapp, 0), NonZeroU32::new(80));
        assert_eq!(channel_rate(ChannelType::Whatsapp, 20), NonZeroU32::new(20));
        assert_eq!(channel_rate(ChannelType::Custom, 0), None);
        assert_eq!(channel_rate(ChannelType::Custom, 5), NonZeroU32::new(5));
        assert_eq!(channel_rate(ChannelType::FacebookMessenger, 5), None);
    }

    #[test]
    fn o5_outcomes_are_recorded_with_the_next_step() {
        let retry = Recorded::of(
            &SendOutcome::Retryable { error: "HTTP 503".into(), status_code: 503, retry_after: None },
            &NextStep::RetryAt(DateTime::from_timestamp(1_700_000_000, 0).unwrap()),
        );
        assert_eq!((retry.outcome_name.as_str(), retry.status_code), ("retry", 503));
        assert!(retry.next_attempt_at.is_some());
        let gave_up = Recorded::of(
            &SendOutcome::Retryable { error: "HTTP 503".into(), status_code: 503, retry_after: None },
            &NextStep::Failed { gave_up: true },
        );
        assert_eq!(gave_up.outcome_name, "failed");
        assert_eq!(gave_up.error, "gave up after the retry limit: HTTP 503");
        let sent =
            Recorded::of(&SendOutcome::Sent { provider_message_id: "m".into(), status_code: 200 }, &NextStep::Sent);
        assert_eq!((sent.outcome_name.as_str(), sent.provider_message_id.as_str()), ("sent", "m"));
    }

    #[test]
    fn o5_an_attempts_event_id_is_the_same_every_time_it_is_published() {
        let message = OutboundMessageQueued { reply_id: "r".into(), conversation_id: "c".into(), ..Default::default() };
        let cause = envelope::new_root("acme", "acme/c", Utc::now(), Payload::OutboundMessageQueued(message.clone()));
        let recorded =
            Recorded::of(&SendOutcome::Sent { provider_message_id: "m".into(), status_code: 200 }, &NextStep::Sent);
        let first = attempt_event(&cause, &message, 2, Utc::now(), true, &recorded);
        let again = attempt_event(&cause, &message, 2, Utc::now(), true, &recorded);
        assert_eq!(first.event_id, again.event_id);
        assert_ne!(first.event_id, attempt_event(&cause, &message, 3, Utc::now(), false, &recorded).event_id);
        assert_eq!(first.partition_key, "acme/c");
        let Some(Payload::DeliveryAttemptRecorded(attempt)) = first.payload else { panic!("not an attempt") };
        assert!(attempt.resent_after_crash);
        assert_eq!(attempt.state, DeliveryState::Sent as i32);
    }
}
