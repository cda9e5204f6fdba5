//! The chat widget's reply stream (C5): `GET /v1/channels/{channel_id}/chat/visitors/{visitor_id}/events`,
//! server-sent events of the replies the delivery service "sent" to one visitor by inserting
//! them into `delivery.chat_messages` (delivery/migrations).
//!
//! - Each event's `id` is the row's `seq`; a reconnect with `Last-Event-ID` (or `?after=<seq>`)
//!   resumes after it, oldest first, so a visitor misses nothing across disconnects.
//! - Live: one shared task per ingest LISTENs on [`NOTIFY_CHANNEL`] (payload: the new row's
//!   `seq`), looks up whose row it is, and fans that out to the open streams (a tokio
//!   broadcast). A stream re-reads the table when a row is for its visitor, and also whenever a
//!   notification may have been missed (its receiver lagged behind, or the listener
//!   (re)connected), so a lost notification delays a reply, never loses it.
//! - Every read is by (account, channel, visitor): the account comes from the channel's
//!   address, as for the chat POST (M1, M2), never from the client.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use chrono::{DateTime, Utc};
use futures::Stream;
use futures::stream::{self, StreamExt};
use serde::Serialize;
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::error::IngestError;

/// The channel the delivery service notifies after inserting a chat reply (payload: its `seq`).
pub const NOTIFY_CHANNEL: &str = "delivery_chat_messages";
/// Rows read per query; a longer backlog is read in several.
pub const READ_BATCH: i64 = 500;
/// Wake-ups buffered per stream before it counts as lagged (and re-reads).
const BROADCAST_CAPACITY: usize = 1024;

#[derive(Debug, Clone)]
pub struct ChatStreamSettings {
    /// PostgreSQL holding `delivery.chat_messages` (the delivery service's database).
    pub database_url: String,
    /// How often an idle stream sends a keep-alive comment (proxies close silent connections).
    pub keep_alive: Duration,
}

/// Whose reply a notification announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub account_id: String,
    pub channel_id: String,
    pub visitor_id: String,
}

/// What the shared listener tells the streams.
#[derive(Debug, Clone)]
enum Wakeup {
    /// A reply for this visitor was inserted.
    Reply(Arc<Recipient>),
    /// Notifications may have been missed (the listener connected or reconnected): every
    /// stream reads again.
    Resync,
}

/// The replies' read side: the pool and the listener's fan-out. Cheap to clone.
#[derive(Clone)]
pub struct ChatReplies {
    pool: PgPool,
    wakeups: broadcast::Sender<Wakeup>,
    keep_alive: Duration,
}

/// One reply as the widget receives it (the event's `data`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatReply {
    #[serde(skip)]
    pub seq: i64,
    pub reply_id: Uuid,
    pub conversation_id: Uuid,
    pub author: ChatAuthor,
    pub text: String,
    pub attachments: serde_json::Value,
    pub sent_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatAuthor {
    /// `agent` or `automation`.
    pub kind: String,
    pub name: String,
}

/// Connects lazily (ingest starts while the database is down) and starts the shared listener,
/// which runs until `stop` is set.
pub fn start(settings: &ChatStreamSettings, stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<ChatReplies> {
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy(&settings.database_url)?;
    let (wakeups, _) = broadcast::channel(BROADCAST_CAPACITY);
    tokio::spawn(listen(pool.clone(), wakeups.clone(), stop));
    Ok(ChatReplies { pool, wakeups, keep_alive: settings.keep_alive })
}

/// The shared listener: LISTEN, then for each notification the recipient of its row, fanned
/// out. After every (re)connection the streams are told to read again.
async fn listen(pool: PgPool, wakeups: broadcast::Sender<Wakeup>, mut stop: tokio::sync::watch::Receiver<bool>) {
    use backon::BackoffBuilder;
    let backoff_builder = backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times();
    let mut backoff = backoff_builder.build();
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            () = stopped(&mut stop) => return,
            connected = connected => match connected {
                Ok(listener) => listener,
                Err(error) => {
                    let pause = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(%error, ?pause, "chat reply listener cannot connect; retrying");
                    tokio::time::sleep(pause).await;
                    continue;
                }
            },
        };
        backoff = backoff_builder.build();
        tracing::info!(channel = NOTIFY_CHANNEL, "chat reply listener connected");
        let _ = wakeups.send(Wakeup::Resync);
        loop {
            let received = tokio::select! {
                () = stopped(&mut stop) => return,
                received = listener.try_recv() => received,
            };
            match received {
                Ok(Some(notification)) => match recipient_of(&pool, notification.payload()).await {
                    Ok(Some(recipient)) => {
                        let _ = wakeups.send(Wakeup::Reply(Arc::new(recipient)));
                    }
                    Ok(None) => tracing::warn!(payload = notification.payload(), "chat notification for no row"),
                    Err(error) => {
                        tracing::warn!(%error, "cannot look up a notified chat reply; every stream reads again");
                        let _ = wakeups.send(Wakeup::Resync);
                    }
                },
                // The connection was lost and is re-established (LISTEN included): what was
                // notified meanwhile is gone, so everyone reads again.
                Ok(None) => {
                    tracing::info!("chat reply listener reconnected");
                    let _ = wakeups.send(Wakeup::Resync);
                }
                Err(error) => {
                    tracing::warn!(%error, "chat reply listener lost its connection; reconnecting");
                    break;
                }
            }
        }
    }
}

/// Resolves once `stop` is set (or its sender is gone).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

async fn recipient_of(pool: &PgPool, payload: &str) -> Result<Option<Recipient>, sqlx::Error> {
    let Ok(seq) = payload.trim().parse::<i64>() else { return Ok(None) };
    let row: Option<(String, String, String)> =
        sqlx::query_as("SELECT account_id, channel_id, visitor_id FROM delivery.chat_messages WHERE seq = $1")
            .bind(seq)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(|(account_id, channel_id, visitor_id)| Recipient { account_id, channel_id, visitor_id }))
}

/// The replies to `recipient` after `after_seq`, oldest first, at most `limit`.
pub async fn replies_after(
    pool: &PgPool,
    recipient: &Recipient,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<ChatReply>, sqlx::Error> {
    type Row = (i64, Uuid, Uuid, String, String, String, serde_json::Value, DateTime<Utc>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT seq, reply_id, conversation_id, author_kind, author_name, text, attachments, sent_at \
         FROM delivery.chat_messages \
         WHERE account_id = $1 AND channel_id = $2 AND visitor_id = $3 AND seq > $4 \
         ORDER BY seq LIMIT $5",
    )
    .bind(&recipient.account_id)
    .bind(&recipient.channel_id)
    .bind(&recipient.visitor_id)
    .bind(after_seq)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(seq, reply_id, conversation_id, kind, name, text, attachments, sent_at)| ChatReply {
            seq,
            reply_id,
            conversation_id,
            author: ChatAuthor { kind, name },
            text,
            attachments,
            sent_at,
        })
        .collect())
}

/// Where a stream resumes: after the `Last-Event-ID` header's seq, else after `?after=`, else
/// from the first reply. Either must be a non-negative integer.
pub fn resume_after(last_event_id_opt: Option<&str>, after_opt: Option<&str>) -> Result<i64, IngestError> {
    let (field, raw) = match (last_event_id_opt, after_opt) {
        (Some(last_event_id), _) => ("Last-Event-ID", last_event_id),
        (None, Some(after)) => ("after", after),
        (None, None) => return Ok(0),
    };
    match raw.trim().parse::<i64>() {
        Ok(seq) if seq >= 0 => Ok(seq),
        _ => Err(IngestError::InvalidField { field, problem: format!("`{raw}` is not a reply sequence number") }),
    }
}

impl ChatReplies {
    /// The event stream of `recipient`'s replies after `after_seq`: what is stored, then live.
    pub fn stream(
        &self,
        recipient: Recipient,
        after_seq: i64,
    ) -> Sse<impl Stream<Item = Result<Event, Infallible>> + use<>> {
        // Subscribed before the first read: a reply inserted after that read is announced to
        // this receiver.
        let cursor =
            Cursor { pool: self.pool.clone(), wakeups: self.wakeups.subscribe(), recipient, after_seq, read_due: true };
        let events = stream::unfold(cursor, Cursor::next_batch)
            .flat_map(|batch| stream::iter(batch.into_iter().map(Ok::<Event, Infallible>)));
        Sse::new(events).keep_alive(KeepAlive::new().interval(self.keep_alive))
    }
}

struct Cursor {
    pool: PgPool,
    wakeups: broadcast::Receiver<Wakeup>,
    recipient: Recipient,
    /// The last seq sent (the widget's resume point).
    after_seq: i64,
    /// Something may have arrived since the last read.
    read_due: bool,
}

impl Cursor {
    /// The next non-empty batch of events; `None` ends the stream (ingest stopping, or the
    /// database failing mid-stream: the widget reconnects with `Last-Event-ID` and resumes).
    async fn next_batch(mut self) -> Option<(Vec<Event>, Cursor)> {
        loop {
            if self.read_due {
                let replies = match replies_after(&self.pool, &self.recipient, self.after_seq, READ_BATCH).await {
                    Ok(replies) => replies,
                    Err(error) => {
                        tracing::warn!(%error, "chat stream cannot read replies; closing it (the widget resumes)");
                        return None;
                    }
                };
                self.read_due = replies.len() as i64 == READ_BATCH;
                if let Some(last) = replies.last() {
                    self.after_seq = last.seq;
                    let events = replies.iter().map(reply_event).collect();
                    return Some((events, self));
                }
            }
            match self.wakeups.recv().await {
                Ok(Wakeup::Reply(recipient)) => self.read_due = *recipient == self.recipient,
                Ok(Wakeup::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => self.read_due = true,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

fn reply_event(reply: &ChatReply) -> Event {
    let data = serde_json::to_string(reply).expect("a reply serializes");
    Event::default().id(reply.seq.to_string()).data(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c5_resume_point_prefers_last_event_id_and_refuses_garbage() {
        assert_eq!(resume_after(None, None).unwrap(), 0);
        assert_eq!(resume_after(None, Some("41")).unwrap(), 41);
        assert_eq!(resume_after(Some("7"), Some("41")).unwrap(), 7, "the browser's reconnect wins");
        for (last_event_id_opt, after_opt, field) in
            [(Some("x"), None, "Last-Event-ID"), (None, Some("-1"), "after"), (None, Some(""), "after")]
        {
            match resume_after(last_event_id_opt, after_opt) {
                Err(IngestError::InvalidField { field: named, .. }) => assert_eq!(named, field),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn c5_reply_events_carry_the_seq_as_id_and_the_documented_fields() {
        let reply = ChatReply {
            seq: 12,
            reply_id: Uuid::from_u128(1),
            conversation_id: Uuid::from_u128(2),
            author: ChatAuthor { kind: "agent".into(), name: "Ana".into() },
            text: "Hello".into(),
            attachments: serde_json::json!([]),
            sent_at: DateTime::<Utc>::UNIX_EPOCH,
        };
        let data = serde_json::to_value(&reply).unwrap();
        assert_eq!(
            data,
            serde_json::json!({
                "reply_id": "00000000-0000-0000-0000-000000000001",
                "conversation_id": "00000000-0000-0000-0000-000000000002",
                "author": {"kind": "agent", "name": "Ana"},
                "text": "Hello",
                "attachments": [],
                "sent_at": "1970-01-01T00:00:00Z"
            })
        );
    }
}
