//! Projector and replay on the real stack (Kafka + PostgreSQL), issue 5 / spec B1, B4, B6, C7.
//!
//! The log is written directly (a synthetic but complete router output: every decision kind),
//! so each test knows exactly what the read models must contain.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{TimeZone, Utc};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use switchboard_projector::metrics::Metrics;
use switchboard_projector::replay::{self, Progress, ReplaySettings};
use switchboard_projector::{run_projector_with, schema, verify};
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::*;
use switchboard_runtime::envelope::encode;
use switchboard_tests::TestEnv;
use tokio::sync::watch;

const CAUGHT_UP_WITHIN: Duration = Duration::from_secs(180);

/// What the synthetic log must produce in the read models.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Expected {
    events: usize,
    conversations: i64,
    messages: i64,
    assignments: i64,
    closed: i64,
    tickets: i64,
    contacts: i64,
    audits: i64,
    open_assigned: i64,
}

/// Conversations `first..first + count`, each with its full story, keyed by account (as the
/// router writes them). Event ids and times are functions of the index, so the same call gives
/// the same bytes.
fn conversation_log(first: usize, count: usize, partitions: i32) -> (Vec<(String, i32, Envelope)>, Expected) {
    let mut records = Vec::new();
    let mut expected = Expected::default();
    let id = |index: usize, purpose: u128| uuid::Uuid::from_u128(((index as u128) << 16) | purpose).to_string();
    for index in first..first + count {
        let account_index = index % 40;
        let account = format!("acct-{account_index}");
        let partition = (account_index as i32) % partitions;
        let messenger = index % 2 == 1;
        let channel_id = if messenger { "messenger-1" } else { "chat-1" }.to_owned();
        let channel_type = if messenger { ChannelType::FacebookMessenger } else { ChannelType::Chat };
        let conversation_id = id(index, 1);
        let contact_id = id(index, 2);
        let visitor = Sender {
            external_id: format!("visitor-{index}"),
            display_name: format!("Visitor {index}"),
            email: String::new(),
        };
        let agent = format!("agent-{}", index % 7);
        let explanation = RoutingExplanation {
            channel_id: channel_id.clone(),
            rule_version: 3,
            target: 2,
            strategy: 1,
            only_available: true,
            eligible_agent_ids: vec![agent.clone(), "agent-x".into()],
            skipped: vec![SkippedCandidate { agent_id: "agent-off".into(), reason: 1 }],
        };
        let mut payloads = vec![Payload::ConversationStarted(ConversationStarted {
            conversation_id: conversation_id.clone(),
            inbox_id: "support".into(),
            channel_id: channel_id.clone(),
            channel_type: channel_type as i32,
            thread_key: visitor.external_id.clone(),
            contact: Some(visitor.clone()),
            first_message_id: id(index, 3),
            contact_id: contact_id.clone(),
        })];
        for message in 0..2u128 {
            payloads.push(Payload::MessageAppended(MessageAppended {
                conversation_id: conversation_id.clone(),
                message_id: id(index, 3 + message),
                provider_message_id: format!("p-{index}-{message}"),
                channel_id: channel_id.clone(),
                sender: Some(visitor.clone()),
                text: format!("message {message} of conversation {index}"),
                source_event_id: id(index, 10 + message),
                content: Some(Box::new(InboundContent {
                    kind: MessageKind::FormSubmission as i32,
                    subject: format!("Subject {index}"),
                    form_fields: vec![
                        FormField { name: "email".into(), value: format!("v{index}@example.com"), hidden: false },
                        FormField { name: "utm_campaign".into(), value: "spring".into(), hidden: true },
                    ],
                    ..Default::default()
                })),
                contact_id: contact_id.clone(),
                thread_key: visitor.external_id.clone(),
            }));
        }
        expected.conversations += 1;
        expected.messages += 2;
        match index % 5 {
            0 => {
                payloads.push(assigned(&conversation_id, &agent, &explanation));
                expected.assignments += 1;
                expected.open_assigned += 1;
            }
            1 => {
                payloads.push(assigned(&conversation_id, &agent, &explanation));
                payloads.push(Payload::ConversationClosed(ConversationClosed {
                    conversation_id: conversation_id.clone(),
                    reason: 1,
                    previous_assignee_agent_id: agent.clone(),
                    ..Default::default()
                }));
                expected.assignments += 1;
                expected.closed += 1;
            }
            2 => {
                payloads.push(Payload::ConversationLeftUnassigned(ConversationLeftUnassigned {
                    conversation_id: conversation_id.clone(),
                    reason: 3,
                    explanation: Some(explanation.clone()),
                }));
                expected.assignments += 1;
                expected.audits += 1;
            }
            3 => {
                payloads.push(assigned(&conversation_id, &agent, &explanation));
                payloads.push(Payload::ConversationUnassigned(ConversationUnassigned {
                    conversation_id: conversation_id.clone(),
                    previous_assignee_agent_id: agent.clone(),
                    ..Default::default()
                }));
                expected.assignments += 2;
            }
            _ => {
                let ticket_id = id(index, 20);
                payloads.push(Payload::ContactCreated(ContactCreated {
                    contact_id: contact_id.clone(),
                    channel_id: channel_id.clone(),
                    channel_type: channel_type as i32,
                    external_id: visitor.external_id.clone(),
                    display_name: visitor.display_name.clone(),
                    email: format!("v{index}@example.com"),
                    source_message_id: id(index, 3),
                }));
                payloads.push(Payload::ContactOwnerChanged(ContactOwnerChanged {
                    contact_id: contact_id.clone(),
                    owner_agent_id: agent.clone(),
                    ..Default::default()
                }));
                payloads.push(Payload::TicketCreated(TicketCreated {
                    ticket_id: ticket_id.clone(),
                    conversation_id: conversation_id.clone(),
                    contact_id: contact_id.clone(),
                    pipeline: "support".into(),
                    stage: "new".into(),
                    owner_source: 3,
                    name: format!("Ticket {index}"),
                    channel_id: channel_id.clone(),
                    inbox_id: "support".into(),
                    ..Default::default()
                }));
                payloads.push(Payload::TicketStageChanged(TicketStageChanged {
                    ticket_id,
                    conversation_id: conversation_id.clone(),
                    previous_stage: "new".into(),
                    stage: "solved".into(),
                    closed: true,
                    ..Default::default()
                }));
                payloads.push(Payload::MessageWithheld(MessageWithheld {
                    message_id: id(index, 30),
                    channel_id: channel_id.clone(),
                    reason: 1,
                    thread_key: visitor.external_id.clone(),
                    sender: Some(visitor.clone()),
                    source_event_id: id(index, 31),
                    message: None,
                    inbox_id: "support".into(),
                    ..Default::default()
                }));
                expected.contacts += 1;
                expected.tickets += 1;
                expected.audits += 1;
            }
        }
        for (position, payload) in payloads.into_iter().enumerate() {
            let at = Utc.timestamp_opt(1_700_000_000 + index as i64 * 60 + position as i64, 0).unwrap();
            let envelope = Envelope {
                event_id: id(index, 100 + position as u128),
                occurred_at: Some(switchboard_runtime::envelope::timestamp(at)),
                recorded_at: Some(switchboard_runtime::envelope::timestamp(at)),
                partition_key: account.clone(),
                causation_id: String::new(),
                correlation_id: String::new(),
                schema_version: 1,
                account_id: account.clone(),
                source_position: Some(KafkaPosition {
                    topic: "inbound.v1".into(),
                    partition,
                    offset: (index * 10 + position) as i64,
                }),
                payload: Some(payload),
            };
            records.push((account.clone(), partition, envelope));
            expected.events += 1;
        }
    }
    (records, expected)
}

fn assigned(conversation_id: &str, agent: &str, explanation: &RoutingExplanation) -> Payload {
    Payload::ConversationAssigned(ConversationAssigned {
        conversation_id: conversation_id.into(),
        assignee_agent_id: agent.into(),
        explanation: Some(explanation.clone()),
        ..Default::default()
    })
}

fn config_log() -> Vec<(String, Envelope)> {
    let at = Utc.timestamp_opt(1_700_000_000, 0).unwrap();
    let envelope = |key: &str, payload: Payload| {
        let mut envelope = switchboard_runtime::envelope::new_root("acct-0", key, at, payload);
        envelope.event_id = format!("config-{key}");
        envelope.recorded_at = envelope.occurred_at;
        (key.to_owned(), envelope)
    };
    vec![
        envelope(
            "inbox/support",
            Payload::InboxConfigured(InboxConfigured {
                inbox_id: "support".into(),
                name: "Support".into(),
                access_mode: 2,
                access_user_ids: vec!["agent-1".into()],
                access_team_ids: vec!["team-a".into()],
                kind: 2,
                ..Default::default()
            }),
        ),
        envelope(
            "channel/messenger-1",
            Payload::ChannelConfigured(Box::new(ChannelConfigured {
                channel_id: "messenger-1".into(),
                inbox_id: "support".into(),
                channel_type: ChannelType::FacebookMessenger as i32,
                name: "Messenger".into(),
                enabled: true,
                messenger: Some(MessengerSettings { page_id: "page-9".into(), consent_mode: 2, ..Default::default() }),
                ..Default::default()
            })),
        ),
        envelope(
            "rules/messenger-1",
            Payload::RoutingRulesConfigured(RoutingRulesConfigured {
                channel_id: "messenger-1".into(),
                version: 3,
                auto_assign: true,
                ..Default::default()
            }),
        ),
        envelope(
            "agent/agent-1",
            Payload::AgentConfigured(AgentConfigured {
                agent_id: "agent-1".into(),
                name: "Ana".into(),
                paid_seat: true,
                available: true,
                capacity_per_channel_type: vec![ChannelTypeCapacity { channel_type: 2, max_open: 4 }],
                role: "admin".into(),
                ..Default::default()
            }),
        ),
    ]
}

fn producer(env: &TestEnv) -> anyhow::Result<ThreadedProducer<rdkafka::producer::DefaultProducerContext>> {
    Ok(switchboard_runtime::kafka::idempotent_producer_config(&env.brokers, "test-projector-log", 30_000).create()?)
}

fn produce(env: &TestEnv, records: &[(String, i32, Envelope)]) -> anyhow::Result<()> {
    let producer = producer(env)?;
    for (key, partition, envelope) in records {
        let payload = encode(envelope);
        let mut record = BaseRecord::to(&env.topics.conversations).partition(*partition).key(key).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, returned)) => {
                    record = returned;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

fn produce_config(env: &TestEnv) -> anyhow::Result<()> {
    let producer = producer(env)?;
    for (key, envelope) in config_log() {
        let payload = encode(&envelope);
        producer
            .send(BaseRecord::to(&env.topics.config).partition(0).key(&key).payload(&payload))
            .map_err(|(error, _)| error)?;
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// A projector instance in this process, in its own task, stopped with `stop`.
struct Instance {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn start_instance(env: &TestEnv, group_suffix: &str) -> Instance {
    let (stop, stopped) = watch::channel(false);
    let mut settings = env.projector_settings(group_suffix);
    settings.max_batch_records = 500;
    let task = tokio::spawn(run_projector_with(settings, env.pool.clone(), stopped, Arc::new(Metrics::default())));
    Instance { stop, task }
}

impl Instance {
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await?
    }
}

/// Waits until the read-model positions in `schema` cover `records` records of the
/// conversations topic (the log has no transaction markers: offsets are dense).
async fn wait_caught_up(env: &TestEnv, schema: &str, records: i64) -> anyhow::Result<()> {
    let deadline = Instant::now() + CAUGHT_UP_WITHIN;
    loop {
        let reached: i64 = sqlx::query_scalar(&format!(
            "SELECT coalesce(sum(next_offset), 0)::bigint FROM {schema}.projector_positions \
             WHERE projection = 'read_models' AND topic = 'conversations.v1'"
        ))
        .fetch_one(&env.pool)
        .await?;
        if reached >= records {
            anyhow::ensure!(reached == records, "positions went past the log: {reached} > {records}");
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "projection did not catch up: {reached}/{records}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn counts(env: &TestEnv, schema: &str) -> anyhow::Result<Expected> {
    let row: (i64, i64, i64, i64, i64, i64, i64, i64) = sqlx::query_as(&format!(
        "SELECT (SELECT count(*) FROM {schema}.conversations), (SELECT count(*) FROM {schema}.messages), \
         (SELECT count(*) FROM {schema}.assignments), (SELECT count(*) FROM {schema}.conversations WHERE status = 'closed'), \
         (SELECT count(*) FROM {schema}.tickets), (SELECT count(*) FROM {schema}.contacts), \
         (SELECT count(*) FROM {schema}.routing_audit), (SELECT coalesce(sum(open_count), 0)::bigint FROM {schema}.agent_workload)"
    ))
    .fetch_one(&env.pool)
    .await?;
    Ok(Expected {
        events: 0,
        conversations: row.0,
        messages: row.1,
        assignments: row.2,
        closed: row.3,
        tickets: row.4,
        contacts: row.5,
        audits: row.6,
        open_assigned: row.7,
    })
}

fn without_events(expected: &Expected) -> Expected {
    Expected { events: 0, ..expected.clone() }
}

async fn replay_into(env: &TestEnv, schema: &str) -> anyhow::Result<replay::ReplaySummary> {
    let settings = ReplaySettings {
        brokers: env.brokers.clone(),
        database_url: env.database_url.clone(),
        topics: env.topics.clone(),
        from: None,
        schema: Some(schema.to_owned()),
        max_batch_records: 700,
        batch_linger: Duration::from_millis(10),
        progress: Progress::Quiet,
    };
    replay::run(settings, &env.pool).await
}

/// Verifies two schemas; on a difference, fails with the report.
async fn assert_same(env: &TestEnv, schema_a: &str, schema_b: &str, skip: &[&str]) -> anyhow::Result<()> {
    let reports = verify::verify(&env.pool, schema_a, schema_b).await?;
    let relevant: Vec<_> = reports.into_iter().filter(|report| !skip.contains(&report.table.as_str())).collect();
    let (text, all_match) = verify::render(&relevant, schema_a, schema_b);
    anyhow::ensure!(all_match, "{schema_a} and {schema_b} differ:\n{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b4_replay_verifies_with_zero_differences_and_rebuilding_twice_gives_identical_checksums() -> anyhow::Result<()>
{
    let env = TestEnv::new().await?;
    produce_config(&env)?;
    let (log, expected) = conversation_log(0, 400, 12);
    produce(&env, &log)?;
    let live = start_instance(&env, "");
    wait_caught_up(&env, "public", expected.events as i64).await?;
    live.stop().await?;
    assert_eq!(counts(&env, "public").await?, without_events(&expected));

    let first = replay_into(&env, "rm_first").await?;
    assert_eq!(first.events as usize, expected.events + config_log().len());
    replay_into(&env, "rm_second").await?;
    assert_eq!(counts(&env, "rm_first").await?, without_events(&expected));
    assert_same(&env, "rm_first", "rm_second", &[]).await?;
    let checksums = |schema: &'static str| {
        let pool = env.pool.clone();
        async move {
            let reports = verify::verify(&pool, schema, schema).await?;
            anyhow::Ok(reports.into_iter().map(|report| (report.table, report.a)).collect::<BTreeMap<_, _>>())
        }
    };
    assert_eq!(checksums("rm_first").await?, checksums("rm_second").await?, "two rebuilds, same checksums");
    // The live projection (batches of another size, NOTIFY on) agrees with the rebuild.
    assert_same(&env, "public", "rm_first", &[]).await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b1_duplicate_delivery_changes_nothing() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    produce_config(&env)?;
    let (log, expected) = conversation_log(0, 300, 12);
    produce(&env, &log)?;
    let live = start_instance(&env, "");
    wait_caught_up(&env, "public", expected.events as i64).await?;
    live.stop().await?;
    replay_into(&env, "rm_before").await?;

    // 1. Redelivery: positions forgotten, a new group reads everything again.
    sqlx::query("DELETE FROM projector_positions WHERE projection = 'read_models'").execute(&env.pool).await?;
    let again = start_instance(&env, "-again");
    wait_caught_up(&env, "public", expected.events as i64).await?;
    again.stop().await?;
    assert_same(&env, "public", "rm_before", &[]).await?;

    // 2. The same events published a second time (new offsets, same event ids).
    produce(&env, &log)?;
    let live = start_instance(&env, "");
    wait_caught_up(&env, "public", 2 * expected.events as i64).await?;
    live.stop().await?;
    assert_eq!(counts(&env, "public").await?, without_events(&expected));
    // Positions moved on (more records); every read model is unchanged.
    assert_same(&env, "public", "rm_before", &["projector_positions"]).await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b4_kill_9_mid_batch_and_restart_counts_exactly_match_the_log() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    produce_config(&env)?;
    let (log, expected) = conversation_log(0, 3_000, 12);
    produce(&env, &log)?;
    let spawn = || {
        std::process::Command::new(switchboard_tests::binary_path("projector")?)
            .args(["run", "--metrics-addr", "127.0.0.1:0", "--batch-records", "200"])
            // A fresh group per start: no waiting for the killed member's session to expire.
            .env("PROJECTOR_GROUP_ID", format!("{}projector-{}", env.topics.prefix, uuid::Uuid::now_v7()))
            .env("KAFKA_BROKERS", &env.brokers)
            .env("DATABASE_URL", &env.database_url)
            .env("SWITCHBOARD_TOPIC_PREFIX", &env.topics.prefix)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("failed to start the projector binary")
    };
    let mut kills = 0;
    let deadline = Instant::now() + CAUGHT_UP_WITHIN;
    // Kill -9 while batches are being written, three times, then let it finish.
    while kills < 3 {
        let mut child = spawn()?;
        let reached_before: i64 = positions_sum(&env).await?;
        loop {
            anyhow::ensure!(Instant::now() < deadline, "no progress between kills");
            tokio::time::sleep(Duration::from_millis(20)).await;
            if positions_sum(&env).await? > reached_before {
                break;
            }
        }
        child.kill()?; // SIGKILL
        child.wait()?;
        kills += 1;
    }
    let reached: i64 = positions_sum(&env).await?;
    assert!(reached < expected.events as i64, "the kills must land mid-log (reached {reached})");
    let mut child = spawn()?;
    let result = wait_caught_up(&env, "public", expected.events as i64).await;
    child.kill()?;
    child.wait()?;
    result?;
    assert_eq!(counts(&env, "public").await?, without_events(&expected));
    replay_into(&env, "rm_check").await?;
    assert_same(&env, "public", "rm_check", &[]).await?;
    env.cleanup().await;
    Ok(())
}

async fn positions_sum(env: &TestEnv) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(sum(next_offset), 0)::bigint FROM projector_positions WHERE projection = 'read_models' \
         AND topic = 'conversations.v1'",
    )
    .fetch_one(&env.pool)
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_with_a_rebalance_in_the_middle_give_the_same_result_as_one() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    produce_config(&env)?;
    let (first_half, expected_first) = conversation_log(0, 1_000, 12);
    let (second_half, expected_second) = conversation_log(1_000, 1_000, 12);
    produce(&env, &first_half)?;
    let one = start_instance(&env, "");
    // Let the first instance get going, then make the group rebalance while it works.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let two = start_instance(&env, "");
    produce(&env, &second_half)?;
    let total = (expected_first.events + expected_second.events) as i64;
    wait_caught_up(&env, "public", total).await?;
    // And once more: one instance leaves while the other keeps the partitions.
    one.stop().await?;
    let (third, expected_third) = conversation_log(2_000, 300, 12);
    produce(&env, &third)?;
    wait_caught_up(&env, "public", total + expected_third.events as i64).await?;
    two.stop().await?;

    let single = replay_into(&env, "rm_single").await?;
    assert_eq!(
        single.events as usize,
        expected_first.events + expected_second.events + expected_third.events + config_log().len()
    );
    assert_same(&env, "public", "rm_single", &[]).await?;
    let conversations: i64 = sqlx::query_scalar("SELECT count(*) FROM conversations").fetch_one(&env.pool).await?;
    assert_eq!(conversations, 2_300);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b4_switch_and_rollback_while_queries_keep_answering() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    produce_config(&env)?;
    let (log, expected) = conversation_log(0, 300, 12);
    produce(&env, &log)?;
    let live = start_instance(&env, "");
    wait_caught_up(&env, "public", expected.events as i64).await?;
    replay_into(&env, "rm_new").await?;

    // A reader doing what the API does (docs/contracts.md): each query in a transaction with
    // SET LOCAL search_path to the active schema. It must answer throughout.
    let (stop_queries, queries_stopped) = watch::channel(false);
    let pool = env.pool.clone();
    let reader = tokio::spawn(async move {
        let mut answered = 0u64;
        let mut seen_schemas = std::collections::BTreeSet::new();
        while !*queries_stopped.borrow() {
            let active = schema::active_schema(&pool).await?;
            let mut transaction = pool.begin().await?;
            sqlx::query(&format!("SET LOCAL search_path TO {active}")).execute(&mut *transaction).await?;
            let count: i64 =
                sqlx::query_scalar("SELECT count(*) FROM conversations").fetch_one(&mut *transaction).await?;
            transaction.commit().await?;
            anyhow::ensure!(count >= 300, "schema {active} answered with {count} conversations");
            seen_schemas.insert(active);
            answered += 1;
        }
        anyhow::Ok((answered, seen_schemas))
    });

    let (from, to) = replay::switch(&env.pool, Some("rm_new")).await?;
    assert_eq!((from.as_str(), to.as_str()), ("public", "rm_new"));
    // The live projector follows the switch: new events land in rm_new.
    let (more, expected_more) = conversation_log(300, 100, 12);
    produce(&env, &more)?;
    let total = (expected.events + expected_more.events) as i64;
    wait_caught_up(&env, "rm_new", total).await?;
    let in_new: i64 = sqlx::query_scalar("SELECT count(*) FROM rm_new.conversations").fetch_one(&env.pool).await?;
    assert_eq!(in_new, 400);

    // Rollback: public becomes active again and catches up from its own positions.
    let (from, to) = replay::rollback(&env.pool).await?;
    assert_eq!((from.as_str(), to.as_str()), ("rm_new", "public"));
    wait_caught_up(&env, "public", total).await?;
    let in_public: i64 = sqlx::query_scalar("SELECT count(*) FROM public.conversations").fetch_one(&env.pool).await?;
    assert_eq!(in_public, 400);

    let _ = stop_queries.send(true);
    let (answered, seen) = reader.await??;
    assert!(answered > 10, "queries kept answering ({answered})");
    assert!(seen.contains("rm_new") && seen.contains("public"), "the reader followed both switches: {seen:?}");
    live.stop().await?;

    // `drop` never drops the active schema; it drops the previous one.
    assert!(replay::drop_schema(&env.pool, Some("public")).await.is_err());
    assert_eq!(replay::drop_schema(&env.pool, None).await?, "rm_new");
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c7_b6_read_models_hold_content_hidden_fields_reply_window_config_sources_and_change_feed() -> anyhow::Result<()>
{
    let env = TestEnv::new().await?;
    produce_config(&env)?;
    let (log, expected) = conversation_log(0, 10, 12);
    produce(&env, &log)?;
    // Poison: not an envelope. It goes to the dead-letter topic; the projection goes on.
    env.produce_raw(&env.topics.conversations, "acct-1", b"definitely not protobuf").await?;
    let (after, expected_after) = conversation_log(10, 5, 12);
    produce(&env, &after)?;
    let mut listener = sqlx::postgres::PgListener::connect_with(&env.pool).await?;
    listener.listen("conversation_changes").await?;
    let live = start_instance(&env, "");
    wait_caught_up(&env, "public", (expected.events + expected_after.events + 1) as i64).await?;
    let notification = tokio::time::timeout(Duration::from_secs(10), listener.recv()).await??;
    assert_eq!(notification.payload(), "support");
    live.stop().await?;

    // C7: hidden form fields kept apart from what the inbox view shows.
    let (content, hidden, kind, subject): (serde_json::Value, serde_json::Value, String, String) =
        sqlx::query_as("SELECT content, hidden_fields, kind, subject FROM messages ORDER BY sent_at LIMIT 1")
            .fetch_one(&env.pool)
            .await?;
    assert_eq!(content["form_fields"], serde_json::json!([{"name": "email", "value": "v0@example.com"}]));
    assert_eq!(hidden, serde_json::json!([{"name": "utm_campaign", "value": "spring"}]));
    assert_eq!((kind.as_str(), subject.as_str()), ("form_submission", "Subject 0"));

    // C6/C8: Messenger conversations get a reply window 24 h after the last customer message.
    let windows: Vec<(String, Option<chrono::DateTime<Utc>>, chrono::DateTime<Utc>)> = sqlx::query_as(
        "SELECT channel_type, reply_window_ends_at, last_message_at FROM conversations ORDER BY started_at",
    )
    .fetch_all(&env.pool)
    .await?;
    for (channel_type, window, last_message_at) in windows {
        match channel_type.as_str() {
            "facebook_messenger" => assert_eq!(window, Some(last_message_at + chrono::Duration::hours(24))),
            _ => assert_eq!(window, None),
        }
    }

    // Config read models from config.v1, settings as JSON.
    let (settings, rules): (serde_json::Value, serde_json::Value) =
        sqlx::query_as("SELECT settings, routing_rules FROM channels WHERE channel_id = 'messenger-1'")
            .fetch_one(&env.pool)
            .await?;
    assert_eq!(settings["messenger"]["page_id"], "page-9");
    assert_eq!(settings["messenger"]["consent_mode"], "explicit");
    assert_eq!(rules["version"], 3);
    let (kind, access_mode): (String, String) =
        sqlx::query_as("SELECT kind, access_mode FROM inboxes WHERE inbox_id = 'support'").fetch_one(&env.pool).await?;
    assert_eq!((kind.as_str(), access_mode.as_str()), ("help_desk", "specific_users_and_teams"));
    let capacity: serde_json::Value =
        sqlx::query_scalar("SELECT capacity_per_channel_type FROM agents WHERE agent_id = 'agent-1'")
            .fetch_one(&env.pool)
            .await?;
    assert_eq!(capacity, serde_json::json!({"chat": 4}));

    // B6: positions with unprefixed topic names, for both projections.
    let topics: Vec<(String, String)> =
        sqlx::query_as("SELECT DISTINCT projection, topic FROM projector_positions ORDER BY 1, 2")
            .fetch_all(&env.pool)
            .await?;
    assert_eq!(
        topics,
        [
            ("read_models".to_owned(), "config.v1".to_owned()),
            ("read_models".to_owned(), "conversations.v1".to_owned()),
            ("sources".to_owned(), "inbound.v1".to_owned())
        ]
    );
    // Conversation 14 (last one, account 14 → partition 2): its last event's source offset + 1.
    let source_next: i64 = sqlx::query_scalar(
        "SELECT next_offset FROM projector_positions WHERE projection = 'sources' AND topic = 'inbound.v1' AND partition = 2",
    )
    .fetch_one(&env.pool)
    .await?;
    let last_source = log
        .iter()
        .chain(after.iter())
        .filter(|(_, partition, _)| *partition == 2)
        .map(|(_, _, envelope)| envelope.source_position.as_ref().unwrap().offset)
        .max()
        .unwrap();
    assert_eq!(source_next, last_source + 1);

    // Audit rows for withheld / left-unassigned; change feed in log order per conversation.
    let audit_kinds: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT kind FROM routing_audit ORDER BY 1").fetch_all(&env.pool).await?;
    assert_eq!(audit_kinds, ["left_unassigned", "withheld"]);
    let feed: Vec<String> =
        sqlx::query_scalar("SELECT kind FROM conversation_changes WHERE conversation_id = $1 ORDER BY change_id")
            .bind(uuid::Uuid::from_u128((4u128 << 16) | 1))
            .fetch_all(&env.pool)
            .await?;
    assert_eq!(feed, ["started", "message", "message", "ticket", "ticket"]);

    // The poison record is on the dead-letter topic with its reason; nothing else was lost.
    let dead = env.read_committed_records(&env.topics.deadletter)?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload.as_deref(), Some(&b"definitely not protobuf"[..]));
    assert!(dead[0].headers.get("sb-deadletter-reason").is_some_and(|reason| reason.contains("not a valid envelope")));
    assert_eq!(counts(&env, "public").await?.conversations, expected.conversations + expected_after.conversations);
    let workload: i64 = sqlx::query_scalar("SELECT coalesce(sum(open_count), 0)::bigint FROM agent_workload")
        .fetch_one(&env.pool)
        .await?;
    assert_eq!(workload, expected.open_assigned + expected_after.open_assigned);
    env.cleanup().await;
    Ok(())
}
