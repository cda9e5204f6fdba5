//! Benchmark of the router through Kafka with transactions: inbound events already in the
//! topic, one router instance (the real shell: batches, transactions, snapshots), timed until
//! its consumer group has committed everything.
//!
//!   eval "$(scripts/stack env)"
//!   cargo run --release -p switchboard-router --bin bench_kafka -- --inputs 300000

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    AgentConfigured, AssignTarget, AssignmentStrategy, ChannelConfigured, ChannelType, InboundMessageReceived,
    RoutingRulesConfigured, Sender,
};
use switchboard_router::shell::{RouterSettings, run_router};
use switchboard_runtime::config_store::{ConfigSnapshot, ConfigStore, Owned};
use switchboard_runtime::envelope::{encode, new_root};
use switchboard_runtime::topics::{Topics, ensure_topics};

/// mimalloc: the router allocates per event (decoded inputs, protobuf outputs), see Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ACCOUNTS: usize = 24;
const AGENTS_PER_ACCOUNT: usize = 20;

fn argument(name: &str, default: f64) -> f64 {
    let arguments: Vec<String> = std::env::args().collect();
    arguments
        .iter()
        .position(|argument| argument == name)
        .and_then(|index| arguments.get(index + 1))
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn config() -> ConfigSnapshot {
    let mut config = ConfigSnapshot::default();
    for account in 0..ACCOUNTS {
        let account_id = format!("account-{account}");
        let agent_ids: Vec<String> =
            (0..AGENTS_PER_ACCOUNT).map(|index| format!("{account_id}-agent-{index}")).collect();
        for agent_id in &agent_ids {
            let agent = AgentConfigured {
                agent_id: agent_id.clone(),
                paid_seat: true,
                available: true,
                max_open_conversations: 10_000,
                ..Default::default()
            };
            config.agents.insert(agent_id.clone(), Owned { account_id: account_id.clone(), entity: agent });
        }
        let channel_id = format!("{account_id}-chat");
        let channel = ChannelConfigured {
            channel_id: channel_id.clone(),
            inbox_id: format!("{account_id}-inbox"),
            channel_type: ChannelType::Chat as i32,
            enabled: true,
            ..Default::default()
        };
        config.channels.insert(channel_id.clone(), Owned { account_id: account_id.clone(), entity: channel });
        let rules = RoutingRulesConfigured {
            channel_id: channel_id.clone(),
            version: 1,
            auto_assign: true,
            target: AssignTarget::SpecificUsersAndTeams as i32,
            user_ids: agent_ids,
            only_available: true,
            strategy: AssignmentStrategy::RoundRobin as i32,
            ..Default::default()
        };
        config.routing_rules.insert(channel_id, Owned { account_id, entity: rules });
    }
    config
}

fn lag(consumer: &BaseConsumer, topic: &str, partitions: i32) -> anyhow::Result<i64> {
    let mut wanted = TopicPartitionList::new();
    for partition in 0..partitions {
        wanted.add_partition(topic, partition);
    }
    let committed = consumer.committed_offsets(wanted, Duration::from_secs(10))?;
    let mut lag = 0;
    for element in committed.elements() {
        let (_, high) = consumer.fetch_watermarks(topic, element.partition(), Duration::from_secs(10))?;
        let committed_offset = if let Offset::Offset(offset) = element.offset() { offset } else { 0 };
        lag += (high - committed_offset).max(0);
    }
    Ok(lag)
}

fn main() -> anyhow::Result<()> {
    let inputs = argument("--inputs", 300_000.0) as usize;
    let follow_ups_per_conversation = argument("--messages-per-conversation", 5.0) as usize;
    let brokers = std::env::var("KAFKA_BROKERS").context("KAFKA_BROKERS is not set (eval \"$(scripts/stack env)\")")?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let unique = uuid::Uuid::now_v7().simple().to_string();
    let topics = Topics::with_prefix(&format!("bench.kafka.{}.", &unique[unique.len() - 10..]));
    runtime.block_on(ensure_topics(&brokers, &topics))?;

    let producer: ThreadedProducer<DefaultProducerContext> =
        switchboard_runtime::kafka::idempotent_producer_config(&brokers, "bench-kafka", 120_000)
            .set("queue.buffering.max.messages", "500000")
            .create()?;
    let produce_started = Instant::now();
    for index in 0..inputs {
        let account_id = format!("account-{}", index % ACCOUNTS);
        let visitor = index / (ACCOUNTS * follow_ups_per_conversation.max(1));
        let channel_id = format!("{account_id}-chat");
        let provider_message_id = format!("m-{index}");
        let payload = Payload::InboundMessageReceived(InboundMessageReceived {
            message_id: switchboard_runtime::ids::message_id_for(&channel_id, &provider_message_id).to_string(),
            channel_id,
            inbox_id: format!("{account_id}-inbox"),
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
        });
        let bytes = encode(&new_root(&account_id, &account_id, Utc::now(), payload));
        let mut record = BaseRecord::to(&topics.inbound).key(&account_id).payload(&bytes);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, returned)) => {
                    std::thread::sleep(Duration::from_millis(2));
                    record = returned;
                }
            }
        }
    }
    producer.flush(Duration::from_secs(300))?;
    println!("produced {inputs} inbound events in {:.1} s", produce_started.elapsed().as_secs_f64());

    let settings = RouterSettings::new(&brokers, topics.clone(), "bench-kafka");
    let group = settings.group_id.clone();
    let config = ConfigStore::fixed(config());
    let shutdown = Arc::new(AtomicBool::new(false));
    let router = std::thread::spawn({
        let shutdown = shutdown.clone();
        move || run_router(&settings, &config, &shutdown)
    });
    let watcher: BaseConsumer = switchboard_runtime::kafka::client_config(&brokers, "bench-kafka-lag")
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .create()?;
    let partitions = topics.declared_partitions(&topics.inbound).unwrap_or(12);
    let started = Instant::now();
    let mut first_progress_opt: Option<(Instant, i64)> = None;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let remaining = lag(&watcher, &topics.inbound, partitions)?;
        if first_progress_opt.is_none() && remaining < inputs as i64 {
            first_progress_opt = Some((Instant::now(), remaining));
        }
        if remaining == 0 {
            break;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(1800), "router did not finish (lag {remaining})");
    }
    let total = started.elapsed();
    shutdown.store(true, Ordering::Relaxed);
    router.join().expect("router thread")?;
    println!(
        "routed {inputs} inbound events in {:.1} s including group join: {:.0}/s",
        total.as_secs_f64(),
        inputs as f64 / total.as_secs_f64()
    );
    if let Some((first_at, remaining_then)) = first_progress_opt {
        let steady = first_at.elapsed();
        println!(
            "after the first commit: {} events in {:.1} s: {:.0} inbound events/s",
            remaining_then,
            steady.as_secs_f64(),
            remaining_then as f64 / steady.as_secs_f64()
        );
    }

    runtime.block_on(async {
        use rdkafka::admin::{AdminClient, AdminOptions};
        use rdkafka::client::DefaultClientContext;
        let admin: AdminClient<DefaultClientContext> =
            switchboard_runtime::kafka::client_config(&brokers, "bench-kafka-cleanup").create()?;
        let names: Vec<String> = switchboard_runtime::topics::topic_specs()
            .iter()
            .map(|spec| format!("{}{}", topics.prefix, spec.base_name))
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        admin.delete_topics(&names, &AdminOptions::new()).await?;
        anyhow::Ok(())
    })?;
    Ok(())
}
