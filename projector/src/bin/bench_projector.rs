//! Projector benchmark: produces a realistic event mix to a fresh topic prefix, then measures
//! (1) the live projector (group consumer, NOTIFY on) draining it into a fresh database and
//! (2) `replay run` rebuilding it into a fresh schema, and optionally verifies both agree.
//!
//! Mix per 20 conversation events: 4 conversations started, 12 messages, 3 assignments and one
//! of ticket created / conversation closed / contact created / left unassigned; plus a few
//! hundred config events (agents, inboxes, channels, rules) on the config topic.
//!
//! ```text
//! eval "$(STACK_STATE_DIR=/work/main/.stack scripts/stack env)"
//! cargo run --release -p switchboard-projector --bin bench_projector -- --events 1000000
//! # the live projector's commit mode (docs/benchmarks.md, "Projector commit mode"):
//! cargo run --release -p switchboard-projector --bin bench_projector -- --skip-replay --synchronous-commit false
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use switchboard_projector::metrics::Metrics;
use switchboard_projector::replay::{self, Progress, ReplaySettings};
use switchboard_projector::{ProjectorSettings, run_projector_with, verify};
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    AgentConfigured, AssignmentStrategy, ChannelConfigured, ChannelType, ContactCreated, ConversationAssigned,
    ConversationClosed, ConversationLeftUnassigned, ConversationStarted, Envelope, InboxConfigured, KafkaPosition,
    MessageAppended, RoutingExplanation, RoutingRulesConfigured, Sender, TicketCreated,
};
use switchboard_runtime::envelope::{encode, new_root};
use switchboard_runtime::topics::{Topics, ensure_topics};

#[derive(Parser)]
struct Args {
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: String,
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Conversation events to produce (config events come on top).
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    #[arg(long, default_value_t = 10_000)]
    batch_records: usize,
    #[arg(long, default_value_t = 20)]
    batch_linger_ms: u64,
    /// The live projector's commit mode (`false`: `synchronous_commit = off` per batch).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    synchronous_commit: bool,
    /// Skip the live-projector phase (replay only).
    #[arg(long)]
    skip_live: bool,
    /// Skip the replay phase (live only, e.g. to compare commit modes).
    #[arg(long)]
    skip_replay: bool,
    /// Compare the live result with the replayed schema (`replay verify`).
    #[arg(long)]
    verify: bool,
    /// Keep the database and topics afterwards.
    #[arg(long)]
    keep: bool,
}

const ACCOUNTS: usize = 500;
const AGENTS: usize = 200;
const CHANNELS: usize = 20;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = switchboard_runtime::telemetry::init_telemetry("bench-projector")?;
    let args = Args::parse();
    let suffix = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
    let topics = Topics::with_prefix(&format!("bench.{suffix}."));
    ensure_topics(&args.kafka_brokers, &topics).await?;
    let database = format!("bench_projector_{suffix}");
    let admin = PgPoolOptions::new().max_connections(1).connect(&args.database_url).await?;
    sqlx::query(&format!("CREATE DATABASE {database}")).execute(&admin).await?;
    let database_url = replace_database(&args.database_url, &database);
    let pool = PgPoolOptions::new().max_connections(8).connect(&database_url).await?;
    switchboard_projector::migrate(&pool).await?;

    let conversation_partitions = topics.declared_partitions(&topics.conversations).unwrap_or(12);
    let produce_started = Instant::now();
    let (conversation_events, config_events) = produce(&args, &topics, conversation_partitions)?;
    let produce_seconds = produce_started.elapsed().as_secs_f64();
    println!(
        "produced {conversation_events} conversation events + {config_events} config events in {produce_seconds:.1} s"
    );
    let total = (conversation_events + config_events) as u64;

    let mut live_figures = None;
    if !args.skip_live {
        let metrics = Arc::new(Metrics::default());
        let settings = ProjectorSettings {
            brokers: args.kafka_brokers.clone(),
            topic: topics.conversations.clone(),
            group_id: format!("{}projector", topics.prefix),
            max_batch_records: args.batch_records,
            batch_linger: Duration::from_millis(args.batch_linger_ms),
            synchronous_commit: args.synchronous_commit,
        };
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let started = Instant::now();
        let projector = tokio::spawn(run_projector_with(settings, pool.clone(), stopped, metrics.clone()));
        let mut first_batch_at = None;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let applied = metrics.events_applied.get();
            if applied > 0 && first_batch_at.is_none() {
                first_batch_at = Some(Instant::now());
            }
            if applied >= total {
                break;
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(900), "live projection did not finish in 15 min");
        }
        let since_first = first_batch_at.map_or(0.0, |at| at.elapsed().as_secs_f64());
        let batches = metrics.batches.get();
        let _ = stop.send(true);
        projector.await??;
        live_figures = Some((since_first, total as f64 / since_first, total / batches.max(1)));
        println!(
            "live projector: {total} events in {since_first:.1} s after its first batch ({:.0} events/s), \
             {batches} batches, {} events per batch on average; {:.1} s including group join",
            total as f64 / since_first,
            total / batches.max(1),
            started.elapsed().as_secs_f64()
        );
    }

    let mut replay_summary_opt = None;
    if !args.skip_replay {
        let replay_settings = ReplaySettings {
            brokers: args.kafka_brokers.clone(),
            database_url: database_url.clone(),
            topics: topics.clone(),
            from: None,
            schema: Some(format!("rm_bench_{}", Utc::now().format("%Y%m%d%H%M%S"))),
            max_batch_records: args.batch_records,
            batch_linger: Duration::from_millis(args.batch_linger_ms),
            progress: Progress::detect(),
        };
        let summary = replay::run(replay_settings, &pool).await?;
        println!(
            "replay: {} events into {} in {:.1} s ({:.0} events/s)",
            summary.events,
            summary.schema,
            summary.elapsed.as_secs_f64(),
            summary.events as f64 / summary.elapsed.as_secs_f64()
        );
        if args.verify && !args.skip_live {
            let started = Instant::now();
            let reports = verify::verify(&pool, "public", &summary.schema).await?;
            let (text, all_match) = verify::render(&reports, "public", &summary.schema);
            print!("{text}");
            println!("verify took {:.1} s", started.elapsed().as_secs_f64());
            anyhow::ensure!(all_match, "live and replayed read models differ");
        }
        replay_summary_opt = Some(summary);
    }
    print_settings(&pool, args.synchronous_commit).await?;
    if let Some((seconds, rate, per_batch)) = live_figures {
        println!(
            "SUMMARY live: {rate:.0} events/s ({seconds:.1} s, ~{per_batch} events/batch, synchronous_commit {})",
            if args.synchronous_commit { "server's" } else { "off" }
        );
    }
    if let Some(summary) = &replay_summary_opt {
        println!(
            "SUMMARY replay: {} events in {:.1} s = {:.0} events/s (batch {} records, linger {} ms)",
            summary.events,
            summary.elapsed.as_secs_f64(),
            summary.events as f64 / summary.elapsed.as_secs_f64(),
            args.batch_records,
            args.batch_linger_ms
        );
    }

    if !args.keep {
        pool.close().await;
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")).execute(&admin).await;
        delete_topics(&args.kafka_brokers, &topics).await;
    }
    Ok(())
}

async fn print_settings(pool: &PgPool, synchronous_commit: bool) -> anyhow::Result<()> {
    let names = [
        "shared_buffers",
        "work_mem",
        "synchronous_commit",
        "fsync",
        "wal_level",
        "max_wal_size",
        "checkpoint_timeout",
    ];
    let mut parts = Vec::new();
    for name in names {
        let value: String = sqlx::query_scalar(&format!("SHOW {name}")).fetch_one(pool).await?;
        parts.push(format!("{name}={value}"));
    }
    let version: String = sqlx::query_scalar("SHOW server_version").fetch_one(pool).await?;
    let live_commit = if synchronous_commit { "the server's synchronous_commit" } else { "synchronous_commit=off" };
    println!(
        "postgres {version}: {} (live projector transactions: {live_commit}; replay: synchronous_commit=off)",
        parts.join(" ")
    );
    Ok(())
}

fn produce(args: &Args, topics: &Topics, partitions: i32) -> anyhow::Result<(usize, usize)> {
    let producer: ThreadedProducer<_> =
        switchboard_runtime::kafka::idempotent_producer_config(&args.kafka_brokers, "bench-projector", 120_000)
            .set("linger.ms", "20")
            .set("queue.buffering.max.kbytes", "1048576")
            .create()
            .context("failed to create producer")?;
    let send = |topic: &str, partition: i32, key: &str, envelope: &Envelope| -> anyhow::Result<()> {
        let payload = encode(envelope);
        let mut record = BaseRecord::to(topic).partition(partition).key(key).payload(&payload);
        loop {
            match producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    record = returned;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((error, _)) => return Err(error.into()),
            }
        }
    };

    // Config: inboxes, channels with rules, agents.
    let mut config_events = 0usize;
    let config_partitions = topics.declared_partitions(&topics.config).unwrap_or(3);
    for index in 0..CHANNELS {
        let account = format!("acct-{}", index % ACCOUNTS);
        let inbox = Payload::InboxConfigured(InboxConfigured {
            inbox_id: format!("inbox-{index}"),
            name: format!("Inbox {index}"),
            access_mode: 1,
            ..Default::default()
        });
        let channel = Payload::ChannelConfigured(Box::new(ChannelConfigured {
            channel_id: format!("chan-{index}"),
            inbox_id: format!("inbox-{index}"),
            channel_type: channel_type(index) as i32,
            name: format!("Channel {index}"),
            enabled: true,
            ..Default::default()
        }));
        let rules = Payload::RoutingRulesConfigured(RoutingRulesConfigured {
            channel_id: format!("chan-{index}"),
            version: 1,
            auto_assign: true,
            target: 2,
            user_ids: (0..10).map(|agent| format!("agent-{}", (index * 10 + agent) % AGENTS)).collect(),
            strategy: AssignmentStrategy::RoundRobin as i32,
            ..Default::default()
        });
        for (kind, payload) in [("inbox", inbox), ("channel", channel), ("rules", rules)] {
            let key = format!("{kind}/{index}");
            send(
                &topics.config,
                (index as i32) % config_partitions,
                &key,
                &new_root(&account, &key, Utc::now(), payload),
            )?;
            config_events += 1;
        }
    }
    for index in 0..AGENTS {
        let key = format!("agent/agent-{index}");
        let payload = Payload::AgentConfigured(AgentConfigured {
            agent_id: format!("agent-{index}"),
            name: format!("Agent {index}"),
            email: format!("agent{index}@example.com"),
            paid_seat: true,
            available: true,
            team_ids: vec![format!("team-{}", index % 7)],
            skills: vec!["english".into()],
            max_open_conversations: 20,
            role: "agent".into(),
            ..Default::default()
        });
        send(&topics.config, (index as i32) % config_partitions, &key, &new_root("acct-0", &key, Utc::now(), payload))?;
        config_events += 1;
    }

    // Conversations: groups of 4 conversations = 20 events.
    let groups = args.events / 20;
    let mut conversation_events = 0usize;
    let mut inbound_offsets = vec![0i64; partitions as usize];
    for group in 0..groups {
        for slot in 0..4 {
            let index = group * 4 + slot;
            let account_index = index % ACCOUNTS;
            let account = format!("acct-{account_index}");
            let partition = (account_index as i32) % partitions;
            let channel_index = index % CHANNELS;
            let channel_id = format!("chan-{channel_index}");
            let conversation_id = uuid::Uuid::now_v7().to_string();
            let contact_id = uuid::Uuid::now_v7().to_string();
            let visitor = format!("visitor-{index}");
            let mut events: Vec<Payload> = vec![Payload::ConversationStarted(ConversationStarted {
                conversation_id: conversation_id.clone(),
                inbox_id: format!("inbox-{channel_index}"),
                channel_id: channel_id.clone(),
                channel_type: channel_type(channel_index) as i32,
                thread_key: visitor.clone(),
                contact: Some(Sender {
                    external_id: visitor.clone(),
                    display_name: format!("Visitor {index}"),
                    email: String::new(),
                }),
                first_message_id: String::new(),
                contact_id: contact_id.clone(),
            })];
            for message in 0..3 {
                events.push(Payload::MessageAppended(MessageAppended {
                    conversation_id: conversation_id.clone(),
                    message_id: uuid::Uuid::now_v7().to_string(),
                    provider_message_id: format!("{visitor}-{message}"),
                    channel_id: channel_id.clone(),
                    sender: Some(Sender {
                        external_id: visitor.clone(),
                        display_name: format!("Visitor {index}"),
                        email: String::new(),
                    }),
                    text: "Hello, I have a question about my order and the delivery date, could you help me please?"
                        .into(),
                    source_event_id: uuid::Uuid::now_v7().to_string(),
                    content: None,
                    contact_id: contact_id.clone(),
                    thread_key: visitor.clone(),
                }));
            }
            let explanation = Some(RoutingExplanation {
                channel_id: channel_id.clone(),
                rule_version: 1,
                target: 2,
                strategy: AssignmentStrategy::RoundRobin as i32,
                only_available: true,
                eligible_agent_ids: (0..3)
                    .map(|agent| format!("agent-{}", (channel_index * 10 + agent) % AGENTS))
                    .collect(),
                skipped: Vec::new(),
            });
            if slot < 3 {
                events.push(Payload::ConversationAssigned(ConversationAssigned {
                    conversation_id: conversation_id.clone(),
                    assignee_agent_id: format!("agent-{}", (channel_index * 10 + index % 10) % AGENTS),
                    explanation: explanation.clone(),
                    ..Default::default()
                }));
            }
            if slot == 3 {
                events.push(match group % 4 {
                    0 => Payload::TicketCreated(TicketCreated {
                        ticket_id: uuid::Uuid::now_v7().to_string(),
                        conversation_id: conversation_id.clone(),
                        contact_id: contact_id.clone(),
                        pipeline: "support".into(),
                        stage: "new".into(),
                        owner_source: 3,
                        name: format!("Ticket {index}"),
                        channel_id: channel_id.clone(),
                        inbox_id: format!("inbox-{channel_index}"),
                        ..Default::default()
                    }),
                    1 => Payload::ConversationClosed(ConversationClosed {
                        conversation_id: conversation_id.clone(),
                        reason: 1,
                        ..Default::default()
                    }),
                    2 => Payload::ContactCreated(ContactCreated {
                        contact_id: contact_id.clone(),
                        channel_id: channel_id.clone(),
                        channel_type: channel_type(channel_index) as i32,
                        external_id: visitor.clone(),
                        display_name: format!("Visitor {index}"),
                        ..Default::default()
                    }),
                    _ => Payload::ConversationLeftUnassigned(ConversationLeftUnassigned {
                        conversation_id: conversation_id.clone(),
                        reason: 3,
                        explanation,
                    }),
                });
            }
            for payload in events {
                let mut envelope = new_root(&account, &account, Utc::now(), payload);
                // As the router sets it: where the cause was read on inbound.v1 (B6).
                let offset = &mut inbound_offsets[partition as usize];
                envelope.source_position =
                    Some(KafkaPosition { topic: "inbound.v1".into(), partition, offset: *offset });
                *offset += 1;
                send(&topics.conversations, partition, &account, &envelope)?;
                conversation_events += 1;
            }
        }
    }
    producer.flush(Duration::from_secs(120)).context("failed to flush the producer")?;
    Ok((conversation_events, config_events))
}

fn channel_type(index: usize) -> ChannelType {
    match index % 4 {
        0 => ChannelType::Chat,
        1 => ChannelType::TeamEmail,
        2 => ChannelType::Whatsapp,
        _ => ChannelType::FacebookMessenger,
    }
}

fn replace_database(url: &str, database: &str) -> String {
    match url.rsplit_once('/') {
        Some((base, rest)) => {
            let query = rest.split_once('?').map(|(_, query)| format!("?{query}")).unwrap_or_default();
            format!("{base}/{database}{query}")
        }
        None => url.to_owned(),
    }
}

async fn delete_topics(brokers: &str, topics: &Topics) {
    let Ok(admin) =
        switchboard_runtime::kafka::client_config(brokers, "bench-admin").create::<AdminClient<DefaultClientContext>>()
    else {
        return;
    };
    let names = [&topics.inbound, &topics.conversations, &topics.config, &topics.deadletter];
    let names: Vec<&str> = names.iter().map(|name| name.as_str()).collect();
    let _ = admin.delete_topics(&names, &AdminOptions::new()).await;
}
