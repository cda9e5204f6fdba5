//! Benchmark of router restart: how long one partition's state takes to recover from the latest
//! snapshot plus the output written after it, compared with folding the whole output history.
//!
//! It writes a realistic history for one partition straight to a fresh set of topics (random
//! prefix) on the running broker: `--conversations` conversations of one account, each a
//! contact, a first message, an assignment and a follow-up; all but `--open-share` of them are
//! closed later (as they are in a real inbox). The events are real `decide` output. A snapshot
//! is written as the router writes it (chunks + manifest), then `--tail-inputs` more inputs.
//! Recovery is then timed both ways and both recovered states are checked against the live one.
//!
//!   eval "$(scripts/stack env)"
//!   cargo run --release -p switchboard-router --bin bench_restart -- --conversations 1000000

use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{TimeZone, Utc};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    AgentConfigured, AssignTarget, AssignmentStrategy, ChannelConfigured, ChannelType, ConversationCloseRequested,
    Envelope, InboundMessageReceived, KafkaPosition, RoutingRulesConfigured, Sender,
};
use switchboard_router::bench_support::argument;
use switchboard_router::decide::{RouterConfig, RouterState, align_state, decide, evolve};
use switchboard_router::recovery::{RecoverFrom, recover_partition_state};
use switchboard_router::shell::RouterSettings;
use switchboard_router::snapshot::{self, Manifest};
use switchboard_runtime::config_store::{ConfigSnapshot, Owned};
use switchboard_runtime::envelope::{encode, new_root, timestamp};
use switchboard_runtime::topics::{Topics, ensure_topics};

/// mimalloc: the router allocates per event (decoded inputs, protobuf outputs), see Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ACCOUNT: &str = "bench";
const AGENTS: usize = 200;
const PARTITION: i32 = 0;

fn config() -> RouterConfig {
    let mut config = ConfigSnapshot::default();
    for index in 0..AGENTS {
        let agent = AgentConfigured {
            agent_id: format!("agent-{index:04}"),
            paid_seat: true,
            available: true,
            ..Default::default()
        };
        config.agents.insert(Owned { account_id: ACCOUNT.into(), entity: agent });
    }
    let channel = ChannelConfigured {
        channel_id: "chat".into(),
        inbox_id: "inbox".into(),
        channel_type: ChannelType::Chat as i32,
        enabled: true,
        ..Default::default()
    };
    config.channels.insert(Owned { account_id: ACCOUNT.into(), entity: channel });
    let rules = RoutingRulesConfigured {
        channel_id: "chat".into(),
        version: 1,
        auto_assign: true,
        target: AssignTarget::SpecificUsersAndTeams as i32,
        user_ids: (0..AGENTS).map(|index| format!("agent-{index:04}")).collect(),
        only_available: true,
        strategy: AssignmentStrategy::RoundRobin as i32,
        ..Default::default()
    };
    config.routing_rules.insert(Owned { account_id: ACCOUNT.into(), entity: rules });
    RouterConfig::from_snapshot(config)
}

/// Generates inputs, routes them with the real core, and produces the decisions.
struct History {
    config: RouterConfig,
    state: RouterState,
    input_offset: i64,
    producer: ThreadedProducer<DefaultProducerContext>,
    output_topic: String,
    events: u64,
}

impl History {
    fn input(&mut self, payload: Payload) -> Envelope {
        let at = Utc.timestamp_opt(1_700_000_000 + self.input_offset / 100, 0).unwrap();
        let mut envelope = new_root(ACCOUNT, ACCOUNT, at, payload);
        envelope.recorded_at = Some(timestamp(at));
        envelope
    }

    fn route(&mut self, payload: Payload) -> anyhow::Result<()> {
        let input = self.input(payload);
        align_state(&mut self.state, &self.config);
        let decided = decide(&self.state, &self.config, input).context("bench input not routable")?;
        for mut event in decided {
            evolve(&mut self.state, &event);
            event.source_position =
                Some(KafkaPosition { topic: "inbound.v1".into(), partition: PARTITION, offset: self.input_offset });
            let bytes = encode(&event);
            let mut record = BaseRecord::to(&self.output_topic).partition(PARTITION).key(ACCOUNT).payload(&bytes);
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((_, returned)) => {
                        std::thread::sleep(Duration::from_millis(5));
                        record = returned;
                    }
                }
            }
            self.events += 1;
        }
        self.input_offset += 1;
        Ok(())
    }

    fn message(&mut self, visitor: u64, sequence: u32) -> anyhow::Result<()> {
        let provider_message_id = format!("v{visitor}-m{sequence}");
        self.route(Payload::InboundMessageReceived(InboundMessageReceived {
            message_id: switchboard_runtime::ids::message_id_for(ACCOUNT, "chat", &provider_message_id).to_string(),
            channel_id: "chat".into(),
            inbox_id: "inbox".into(),
            channel_type: ChannelType::Chat as i32,
            provider_message_id,
            thread_key: format!("visitor-{visitor}"),
            sender: Some(Sender {
                external_id: format!("visitor-{visitor}"),
                display_name: "Visitor".into(),
                email: String::new(),
            }),
            text: "Hello, I have a question about my order".into(),
            ..Default::default()
        }))
    }

    fn close(&mut self, visitor: u64) -> anyhow::Result<()> {
        let conversation_id = self.state.open_conversation_id(ACCOUNT, "chat", &format!("visitor-{visitor}"));
        let Some(conversation_id) = conversation_id else { return Ok(()) };
        self.route(Payload::ConversationCloseRequested(ConversationCloseRequested {
            conversation_id,
            request_id: format!("close-{visitor}"),
            actor: None,
        }))
    }
}

fn main() -> anyhow::Result<()> {
    let conversations = argument("--conversations", 1_000_000.0) as u64;
    let open_share = argument("--open-share", 0.1);
    let tail_inputs = argument("--tail-inputs", 20_000.0) as u64;
    let brokers = std::env::var("KAFKA_BROKERS").context("KAFKA_BROKERS is not set (eval \"$(scripts/stack env)\")")?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let unique = uuid::Uuid::now_v7().simple().to_string();
    let topics = Topics::with_prefix(&format!("bench.restart.{}.", &unique[unique.len() - 10..]));
    runtime.block_on(ensure_topics(&brokers, &topics))?;
    let settings = RouterSettings::new(&brokers, topics.clone(), "bench-restart");

    let producer: ThreadedProducer<DefaultProducerContext> =
        switchboard_runtime::kafka::idempotent_producer_config(&brokers, "bench-restart", 120_000)
            .set("queue.buffering.max.messages", "500000")
            .create()
            .context("failed to create producer")?;
    let mut history = History {
        config: config(),
        state: RouterState::default(),
        input_offset: 0,
        producer,
        output_topic: topics.conversations.clone(),
        events: 0,
    };

    let generation_started = Instant::now();
    let closed_every = if open_share <= 0.0 { u64::MAX } else { (1.0 / open_share).round() as u64 };
    for visitor in 0..conversations {
        history.message(visitor, 0)?;
        history.message(visitor, 1)?;
        // Conversations close some time later: close the one started 1,000 visitors ago,
        // keeping every `closed_every`-th open.
        if visitor >= 1_000 && (visitor - 1_000) % closed_every != 0 {
            history.close(visitor - 1_000)?;
        }
    }
    history.producer.flush(Duration::from_secs(300)).context("failed to flush history")?;
    println!(
        "history: {conversations} conversations, {} open, {} events ({} inputs) written in {:.1} s",
        history.state.conversations.len(),
        history.events,
        history.input_offset,
        generation_started.elapsed().as_secs_f64()
    );

    // The snapshot, exactly as the shell writes it (chunks, then the manifest).
    let snapshot_started = Instant::now();
    let (_, output_next_offset) = history
        .producer
        .client()
        .fetch_watermarks(&topics.conversations, PARTITION, Duration::from_secs(30))
        .context("failed to read output end")?;
    let bytes = snapshot::encode_state(&history.state);
    let encoded_in = snapshot_started.elapsed();
    let chunks = snapshot::split_into_chunks(&bytes);
    let snapshot_topic = settings.snapshot_topic();
    for (index, chunk) in chunks.iter().enumerate() {
        let value = snapshot::chunk_value(history.input_offset, index as u32, chunk);
        let key = snapshot::chunk_key(index as u32);
        history
            .producer
            .send(BaseRecord::to(&snapshot_topic).partition(PARTITION).key(&key).payload(&value))
            .map_err(|(error, _)| error)?;
    }
    let manifest = Manifest {
        input_next_offset: history.input_offset,
        output_next_offset,
        chunk_count: chunks.len() as u32,
        records_before_manifest: chunks.len() as u32,
        state_bytes: bytes.len() as u64,
    };
    history
        .producer
        .send(
            BaseRecord::to(&snapshot_topic)
                .partition(PARTITION)
                .key(snapshot::MANIFEST_KEY)
                .payload(&manifest.encode()),
        )
        .map_err(|(error, _)| error)?;
    history.producer.flush(Duration::from_secs(120)).context("failed to flush snapshot")?;
    println!(
        "snapshot: {:.1} MB in {} chunks (encoded in {:.2} s, written in {:.2} s)",
        bytes.len() as f64 / 1e6,
        chunks.len(),
        encoded_in.as_secs_f64(),
        snapshot_started.elapsed().as_secs_f64()
    );

    // The tail: inputs routed after the snapshot.
    for visitor in conversations..conversations + tail_inputs / 2 {
        history.message(visitor, 0)?;
        history.message(visitor, 1)?;
    }
    history.producer.flush(Duration::from_secs(120)).context("failed to flush tail")?;

    let (from_snapshot, stats, _) = recover_partition_state(&settings, PARTITION, RecoverFrom::LatestSnapshot)?;
    println!(
        "restart from snapshot + tail: {:.2} s (snapshot read {:.2} s, {:.1} MB; tail {} events)",
        stats.total.as_secs_f64(),
        stats.snapshot_read.as_secs_f64(),
        stats.snapshot_bytes as f64 / 1e6,
        stats.tail_events
    );
    anyhow::ensure!(from_snapshot == history.state, "state recovered from the snapshot differs from the live state");
    drop(from_snapshot);
    let (from_beginning, full_stats, _) = recover_partition_state(&settings, PARTITION, RecoverFrom::Beginning)?;
    println!(
        "restart by folding the whole output: {:.2} s ({} events)",
        full_stats.total.as_secs_f64(),
        full_stats.tail_events
    );
    anyhow::ensure!(from_beginning == history.state, "state folded from the whole output differs from the live state");
    println!("both recovered states equal the live state");

    runtime.block_on(async {
        use rdkafka::admin::{AdminClient, AdminOptions};
        use rdkafka::client::DefaultClientContext;
        let admin: AdminClient<DefaultClientContext> =
            switchboard_runtime::kafka::client_config(&brokers, "bench-restart-cleanup").create()?;
        let names = [&topics.inbound, &topics.conversations, &topics.config, &topics.deadletter, &snapshot_topic];
        let names: Vec<&str> = names.iter().map(|name| name.as_str()).collect();
        admin.delete_topics(&names, &AdminOptions::new()).await?;
        anyhow::Ok(())
    })?;
    Ok(())
}
