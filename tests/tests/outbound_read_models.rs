//! Outbound read models on the real stack (issue 15, O5, R4, B6): the events of replies are
//! produced to real `outbound.v1`, `delivery.v1` and `conversations.v1` topics, the projector
//! runs, and the gRPC API shows what an agent desktop sees.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, TimeZone, Utc};
use rdkafka::producer::{FutureProducer, FutureRecord};
use switchboard_api::position::Position;
use switchboard_api::read::{PositionWait, ReadModels};
use switchboard_projector::replay::{self, Progress, ReplaySettings};
use switchboard_projector::verify;
use switchboard_proto::api::v1::{GetConversationRequest, GetMessageRequest, Message};
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::*;
use switchboard_runtime::envelope::{encode, timestamp};
use switchboard_runtime::outbound::outbound_partition_key;
use switchboard_tests::{ApiClient, TestEnv};
use uuid::Uuid;

const ACCOUNT: &str = "demo";
const CHANNEL: &str = "messenger-1";
const PSID: &str = "psid-7";

fn at(second: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_796_000_000 + second, 0).unwrap()
}

fn reply_id(n: u128) -> Uuid {
    Uuid::from_u128(0x0015_0000 + n)
}

/// One record to produce: topic, key, envelope.
struct Record {
    topic: String,
    key: String,
    envelope: Envelope,
}

struct Log<'a> {
    env: &'a TestEnv,
    conversation_id: Uuid,
    next_event: u128,
}

impl Log<'_> {
    fn envelope(&mut self, second: i64, payload: Payload) -> Envelope {
        self.next_event += 1;
        Envelope {
            event_id: Uuid::from_u128(0x00e0_0000 + self.next_event).to_string(),
            occurred_at: Some(timestamp(at(second))),
            recorded_at: Some(timestamp(at(second))),
            partition_key: ACCOUNT.into(),
            account_id: ACCOUNT.into(),
            schema_version: 1,
            payload: Some(payload),
            ..Default::default()
        }
    }

    fn conversations(&mut self, second: i64, payload: Payload) -> Record {
        Record {
            topic: self.env.topics.conversations.clone(),
            key: ACCOUNT.into(),
            envelope: self.envelope(second, payload),
        }
    }

    fn outbound_key(&self) -> String {
        outbound_partition_key(ACCOUNT, &self.conversation_id.to_string())
    }

    fn queued(&mut self, second: i64, n: u128, author: Author, purpose: OutboundPurpose) -> Record {
        let payload = Payload::OutboundMessageQueued(OutboundMessageQueued {
            reply_id: reply_id(n).to_string(),
            conversation_id: self.conversation_id.to_string(),
            inbox_id: "support".into(),
            channel_id: CHANNEL.into(),
            channel_type: ChannelType::FacebookMessenger as i32,
            purpose: purpose as i32,
            author: Some(author),
            text: format!("reply {n}"),
            recipient: if purpose == OutboundPurpose::OwnerNotification {
                "ana@example.com".into()
            } else {
                PSID.into()
            },
            idempotency_key: reply_id(n).to_string(),
            ..Default::default()
        });
        Record {
            topic: self.env.topics.outbound.clone(),
            key: self.outbound_key(),
            envelope: self.envelope(second, payload),
        }
    }

    fn note(&mut self, second: i64, n: u128) -> Record {
        let payload = Payload::InternalNoteAdded(InternalNoteAdded {
            note_id: reply_id(n).to_string(),
            conversation_id: self.conversation_id.to_string(),
            inbox_id: "support".into(),
            author: Some(agent("ana", "Ana")),
            text: "VIP: call them back".into(),
            ..Default::default()
        });
        Record {
            topic: self.env.topics.outbound.clone(),
            key: self.outbound_key(),
            envelope: self.envelope(second, payload),
        }
    }

    fn attempt(&mut self, second: i64, n: u128, attempt: u32, outcome: Result<(), (&str, bool)>) -> Record {
        let (state, error, will_retry) = match outcome {
            Ok(()) => (DeliveryState::Sent, String::new(), false),
            Err((error, will_retry)) => (DeliveryState::Failed, error.to_owned(), will_retry),
        };
        let payload = Payload::DeliveryAttemptRecorded(DeliveryAttemptRecorded {
            reply_id: reply_id(n).to_string(),
            conversation_id: self.conversation_id.to_string(),
            channel_id: CHANNEL.into(),
            attempt,
            state: state as i32,
            provider_message_id: if state == DeliveryState::Sent { format!("mid.{n}") } else { String::new() },
            error,
            will_retry,
            ..Default::default()
        });
        Record {
            topic: self.env.topics.delivery.clone(),
            key: self.outbound_key(),
            envelope: self.envelope(second, payload),
        }
    }

    fn status(&mut self, second: i64, provider_message_id: &str, status: &str) -> Record {
        let payload = Payload::DeliveryStatusReported(DeliveryStatusReported {
            channel_id: CHANNEL.into(),
            provider_message_id: provider_message_id.into(),
            recipient_external_id: PSID.into(),
            status: status.into(),
            error: String::new(),
        });
        self.conversations(second, payload)
    }
}

fn agent(id: &str, name: &str) -> Author {
    Author { kind: AuthorKind::Agent as i32, agent_id: id.into(), name: name.into(), automation: 0 }
}

fn automation(which: Automation) -> Author {
    Author { kind: AuthorKind::Automation as i32, name: "Acme".into(), automation: which as i32, ..Default::default() }
}

/// Produces the records in order and returns each one's position (unprefixed topic name).
async fn produce(env: &TestEnv, records: Vec<Record>) -> anyhow::Result<Vec<Position>> {
    let producer: FutureProducer =
        switchboard_runtime::kafka::idempotent_producer_config(&env.brokers, "test-outbound-log", 30_000).create()?;
    let mut positions = Vec::new();
    for record in records {
        let payload = encode(&record.envelope);
        let delivery = producer
            .send(FutureRecord::to(&record.topic).key(&record.key).payload(&payload), Duration::from_secs(30))
            .await
            .map_err(|(error, _)| error)?;
        let topic = record.topic.strip_prefix(&env.topics.prefix).context("topic of this environment")?;
        positions.push(Position { topic: topic.to_owned(), partition: delivery.partition, offset: delivery.offset });
    }
    Ok(positions)
}

/// B6: waits until the read models reflect every position.
async fn reach(read: &ReadModels, positions: &[Position]) -> anyhow::Result<()> {
    let wait = PositionWait { until: tokio::time::Instant::now() + Duration::from_secs(60), client_deadline: false };
    read.wait_for_positions(positions, wait).await.map_err(|error| anyhow::anyhow!("{error:?}"))
}

async fn message(api: &mut ApiClient, n: u128) -> anyhow::Result<Message> {
    Ok(api
        .get_message(GetMessageRequest { message_id: reply_id(n).to_string(), min_position: String::new() })
        .await?
        .into_inner())
}

fn history(message: &Message) -> Vec<(String, u32)> {
    message.delivery_history.iter().map(|step| (step.state.clone(), step.attempt)).collect()
}

fn states(steps: &[(&str, u32)]) -> Vec<(String, u32)> {
    steps.iter().map(|(state, attempt)| (state.to_string(), *attempt)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o5_an_agent_desktop_sees_replies_notes_and_their_delivery() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.start_projector().await?;
    let mut api = env.start_api().await?;
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let read = ReadModels::start(env.pool.clone(), stopped).await?;
    let conversation_id = Uuid::from_u128(0x0c0_0001);
    let mut log = Log { env: &env, conversation_id, next_event: 0 };

    // Given an inbox and a Messenger conversation with the customer's first message
    let mut inbox = log.envelope(
        0,
        Payload::InboxConfigured(InboxConfigured {
            inbox_id: "support".into(),
            name: "Support".into(),
            ..Default::default()
        }),
    );
    inbox.partition_key = "inbox/demo/support".into();
    let inbox = Record { topic: env.topics.config.clone(), key: "inbox/demo/support".into(), envelope: inbox };
    let customer = Sender { external_id: PSID.into(), display_name: "Ada".into(), email: String::new() };
    let started = vec![
        inbox,
        log.conversations(
            0,
            Payload::ConversationStarted(ConversationStarted {
                conversation_id: conversation_id.to_string(),
                inbox_id: "support".into(),
                channel_id: CHANNEL.into(),
                channel_type: ChannelType::FacebookMessenger as i32,
                thread_key: PSID.into(),
                contact: Some(customer.clone()),
                ..Default::default()
            }),
        ),
        log.conversations(
            1,
            Payload::MessageAppended(MessageAppended {
                conversation_id: conversation_id.to_string(),
                message_id: Uuid::from_u128(0x0c0_0002).to_string(),
                provider_message_id: "mid.customer".into(),
                channel_id: CHANNEL.into(),
                sender: Some(customer),
                text: "Where is my order?".into(),
                ..Default::default()
            }),
        ),
    ];
    reach(&read, &produce(&env, started).await?).await?;

    // When: an automated instant reply (R1 is not an agent's); agent replies 1 (sent, delivered,
    // read) and 2 (failed, retried, sent); a note; reply 3 whose statuses come before its SENT
    // record; replies 4 and 5 sent before and after a Messenger read watermark; an R4 owner
    // notification.
    let first_wave = vec![
        log.queued(5, 9, automation(Automation::InstantReply), OutboundPurpose::ConversationReply),
        log.queued(10, 1, agent("ana", "Ana"), OutboundPurpose::ConversationReply),
        log.attempt(11, 1, 1, Ok(())),
        log.status(12, "mid.1", "delivered"),
        log.status(13, "mid.1", "read"),
        log.queued(20, 2, agent("bo", "Bo"), OutboundPurpose::ConversationReply),
        log.attempt(21, 2, 1, Err(("Graph API 503: temporarily unavailable", true))),
        log.note(25, 50),
        log.queued(30, 3, agent("ana", "Ana"), OutboundPurpose::ConversationReply),
        log.status(33, "mid.3", "delivered"),
        log.queued(40, 4, agent("ana", "Ana"), OutboundPurpose::ConversationReply),
        log.attempt(41, 4, 1, Ok(())),
        log.queued(42, 5, agent("ana", "Ana"), OutboundPurpose::ConversationReply),
        log.attempt(47, 5, 1, Ok(())),
        log.status(48, "mid.5", "echo"),
        log.status(50, &format!("watermark:{}", at(45).timestamp_millis()), "read"),
        log.queued(60, 70, automation(Automation::OwnerNotification), OutboundPurpose::OwnerNotification),
        log.attempt(61, 70, 1, Ok(())),
    ];
    reach(&read, &produce(&env, first_wave).await?).await?;

    // Then reply 2 is failed with its reason and a retry to come; reply 3 is still queued
    let failed = message(&mut api, 2).await?;
    assert_eq!(
        (failed.delivery_state.as_str(), failed.will_retry, failed.failure_reason.as_str()),
        ("failed", true, "Graph API 503: temporarily unavailable")
    );
    assert_eq!(message(&mut api, 3).await?.delivery_state, "queued", "a status alone does not move a reply");

    // When the retry succeeds and reply 3's SENT record finally arrives
    // (after the watermark at 45: it does not cover them)
    let second_wave = vec![log.attempt(55, 3, 1, Ok(())), log.attempt(56, 2, 2, Ok(()))];
    let positions = produce(&env, second_wave).await?;
    // B6 with a delivery.v1 position, and an outbound.v1 one from the first wave
    assert!(positions.iter().all(|position| position.topic == "delivery.v1"));
    reach(&read, &positions).await?;

    // Then GetConversation shows what the desktop needs
    let response = api
        .get_conversation(GetConversationRequest {
            conversation_id: conversation_id.to_string(),
            min_position: String::new(),
        })
        .await?
        .into_inner();
    let conversation = response.conversation.context("conversation")?;
    assert_eq!(conversation.first_response_at, Some(timestamp(at(10))), "the first agent reply, not the automation");
    assert_eq!(conversation.last_agent_reply_at, Some(timestamp(at(42))));
    assert_eq!(conversation.message_count, 1, "replies are not customer messages");
    let by_id = |n: u128| response.messages.iter().find(|message| message.id == reply_id(n).to_string());
    let shown: Vec<(&str, &str, &str)> = response
        .messages
        .iter()
        .map(|message| {
            let author = message.author.as_ref().map_or("", |author| author.kind.as_str());
            (message.direction.as_str(), author, message.delivery_state.as_str())
        })
        .collect();
    assert_eq!(
        shown,
        [
            ("inbound", "customer", ""),
            ("outbound", "automation", "queued"),
            ("outbound", "agent", "read"),
            ("outbound", "agent", "sent"),
            ("note", "agent", ""),
            ("outbound", "agent", "delivered"),
            ("outbound", "agent", "read"),
            ("outbound", "agent", "sent"),
        ],
        "oldest first; the owner notification is no conversation message"
    );
    assert!(by_id(70).is_none());

    let read_reply = by_id(1).context("reply 1")?;
    assert_eq!(history(read_reply), states(&[("queued", 0), ("sent", 1), ("delivered", 0), ("read", 0)]));
    assert_eq!(read_reply.provider_message_id, "mid.1");
    let author = read_reply.author.as_ref().context("author")?;
    assert_eq!((author.agent_id.as_str(), author.name.as_str()), ("ana", "Ana"));

    let retried = by_id(2).context("reply 2")?;
    assert_eq!(history(retried), states(&[("queued", 0), ("failed", 1), ("sent", 2)]));
    assert_eq!((retried.failure_reason.as_str(), retried.will_retry), ("", false));
    assert_eq!(retried.delivery_history[1].error, "Graph API 503: temporarily unavailable");
    assert!(retried.delivery_history[1].will_retry);

    let note = by_id(50).context("note")?;
    assert_eq!((note.text.as_str(), note.delivery_history.len()), ("VIP: call them back", 0));

    // Statuses before the SENT record were kept and applied
    let late = by_id(3).context("reply 3")?;
    assert_eq!(late.delivery_state, "delivered");
    // The watermark (45) covers reply 4 (sent at 41), not reply 5 (sent at 47, echoed)
    assert_eq!(by_id(4).context("reply 4")?.delivery_state, "read");
    let echoed = by_id(5).context("reply 5")?;
    assert_eq!(history(echoed), states(&[("queued", 0), ("sent", 1), ("sent", 0)]));

    // GetMessage works for a reply id and carries the same history
    assert_eq!(message(&mut api, 1).await?, read_reply.clone());

    // R4: the owner notification is kept for the audit with its delivery state
    let audit: (String, String, String) = sqlx::query_as(
        "SELECT recipient, delivery_state, (SELECT string_agg(state, ',' ORDER BY at) FROM message_delivery_steps \
         WHERE message_id = n.notification_id) FROM owner_notifications n WHERE notification_id = $1",
    )
    .bind(reply_id(70))
    .fetch_one(&env.pool)
    .await?;
    assert_eq!(audit, ("ana@example.com".to_owned(), "sent".to_owned(), "queued,sent".to_owned()));

    // The change feed names the new kinds
    let kinds: Vec<String> = sqlx::query_scalar(
        "SELECT kind FROM conversation_changes WHERE conversation_id = $1 AND kind IN ('reply', 'note') ORDER BY change_id",
    )
    .bind(conversation_id)
    .fetch_all(&env.pool)
    .await?;
    assert_eq!(kinds.iter().filter(|kind| *kind == "reply").count(), 6);
    assert_eq!(kinds.iter().filter(|kind| *kind == "note").count(), 1);

    // B6: the outbound.v1 positions are stored under `read_models`
    let outbound_positions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM projector_positions WHERE projection = 'read_models' AND topic = 'outbound.v1'",
    )
    .fetch_one(&env.pool)
    .await?;
    assert!(outbound_positions >= 1);

    // B4: a replay reads the four topics in another interleaving and builds the same tables
    let settings = ReplaySettings {
        brokers: env.brokers.clone(),
        database_url: env.database_url.clone(),
        topics: env.topics.clone(),
        from: None,
        schema: Some("rm_outbound".into()),
        max_batch_records: 3,
        batch_linger: Duration::from_millis(5),
        progress: Progress::Quiet,
    };
    replay::run(settings, &env.pool).await?;
    let reports = verify::verify(&env.pool, "public", "rm_outbound").await?;
    let (text, all_match) = verify::render(&reports, "public", "rm_outbound");
    anyhow::ensure!(all_match, "the replay differs:\n{text}");
    env.cleanup().await;
    Ok(())
}
