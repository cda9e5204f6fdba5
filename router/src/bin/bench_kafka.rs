//! Benchmark of the router through Kafka with transactions: inbound events already in the
//! topic, one router instance (the real shell: batches, transactions, snapshots), timed until
//! its consumer group has committed everything.
//!
//!   eval "$(scripts/stack env)"
//!   cargo run --release -p switchboard-router --bin bench_kafka -- --inputs 300000
//!
//! As in production, telemetry is initialised (tracing spans become OpenTelemetry spans, so
//! trace context is adopted from every input and written on every output) and every input
//! carries a `traceparent` and `sb-event-type` header as ingest writes them. After the run the
//! bench prints where the CPU went while routing: the routing thread, librdkafka's threads,
//! the rest of this process, and the local broker (a `kafka.Kafka` JVM, if one is found).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    AgentConfigured, AssignTarget, AssignmentStrategy, ChannelConfigured, ChannelType, InboundMessageReceived,
    RoutingRulesConfigured, Sender,
};
use switchboard_router::bench_support::argument;
use switchboard_router::shell::{RouterSettings, run_router};
use switchboard_runtime::config_store::{ConfigSnapshot, ConfigStore, Owned};
use switchboard_runtime::envelope::{encode, new_root};
use switchboard_runtime::topics::{Topics, ensure_topics};

/// mimalloc: the router allocates per event (decoded inputs, protobuf outputs), see Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ACCOUNTS: usize = 24;
const AGENTS_PER_ACCOUNT: usize = 20;

/// Every `key=value` given after `name` (repeatable), e.g. `--producer linger.ms=20`.
fn key_values(name: &str) -> Vec<(String, String)> {
    let arguments: Vec<String> = std::env::args().collect();
    arguments
        .windows(2)
        .filter(|pair| pair[0] == name)
        .filter_map(|pair| pair[1].split_once('=').map(|(key, value)| (key.to_owned(), value.to_owned())))
        .collect()
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
            config.agents.insert(Owned { account_id: account_id.clone(), entity: agent });
        }
        let channel_id = format!("{account_id}-chat");
        let channel = ChannelConfigured {
            channel_id: channel_id.clone(),
            inbox_id: format!("{account_id}-inbox"),
            channel_type: ChannelType::Chat as i32,
            enabled: true,
            ..Default::default()
        };
        config.channels.insert(Owned { account_id: account_id.clone(), entity: channel });
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
        config.routing_rules.insert(Owned { account_id, entity: rules });
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

/// CPU seconds (user + system) from a `/proc/.../stat` line (fields 14 and 15, clock ticks).
fn stat_cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) may contain spaces; the fields after it are space-separated.
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    // CLK_TCK is 100 on Linux.
    Some((user + system) / 100.0)
}

/// CPU seconds used so far, per thread kind of this process: (routing thread, librdkafka
/// threads, everything else).
fn thread_cpu_seconds() -> (f64, f64, f64) {
    let (mut routing, mut librdkafka, mut other) = (0.0, 0.0, 0.0);
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return (0.0, 0.0, 0.0) };
    for task in tasks.flatten() {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let Some(seconds) =
            std::fs::read_to_string(task.path().join("stat")).ok().as_deref().and_then(stat_cpu_seconds)
        else {
            continue;
        };
        match name.trim() {
            "router" => routing += seconds,
            name if name.starts_with("rdk:") => librdkafka += seconds,
            _ => other += seconds,
        }
    }
    (routing, librdkafka, other)
}

/// The local broker's process (a JVM running `kafka.Kafka`), if there is one on this machine.
fn broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let command_line = std::fs::read(entry.path().join("cmdline")).ok()?;
        let command_line = String::from_utf8_lossy(&command_line);
        (command_line.starts_with("java") && command_line.contains("kafka.Kafka")).then_some(pid)
    })
}

fn process_cpu_seconds(pid: u32) -> Option<f64> {
    stat_cpu_seconds(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Busy CPU seconds of the whole machine (all cores) from `/proc/stat`.
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|line| line.starts_with("cpu ")) else { return 0.0 };
    let ticks: Vec<f64> = line.split_whitespace().skip(1).filter_map(|field| field.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    let busy: f64 =
        ticks.iter().take(8).enumerate().filter(|(index, _)| *index != 3 && *index != 4).map(|(_, t)| t).sum();
    busy / 100.0
}

/// A W3C `traceparent` with a fresh trace id, as ingest's spans would write it.
fn traceparent_for(index: usize) -> String {
    let trace_id = uuid::Uuid::now_v7().simple().to_string();
    format!("00-{trace_id}-{:016x}-01", index as u64 + 1)
}

fn main() -> anyhow::Result<()> {
    let _telemetry = switchboard_runtime::telemetry::init_telemetry("bench-kafka")?;
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
            message_id: switchboard_runtime::ids::message_id_for(&account_id, &channel_id, &provider_message_id)
                .to_string(),
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
        let traceparent = traceparent_for(index);
        let headers = OwnedHeaders::new()
            .insert(Header { key: "traceparent", value: Some(traceparent.as_str()) })
            .insert(Header { key: "sb-event-type", value: Some("inbound_message_received") });
        let mut record = BaseRecord::to(&topics.inbound).key(&account_id).payload(&bytes).headers(headers);
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

    let mut settings = RouterSettings::new(&brokers, topics.clone(), "bench-kafka");
    settings.producer_overrides = key_values("--producer");
    settings.consumer_overrides = key_values("--consumer");
    if std::env::args().any(|argument| argument == "--snapshot-every-records") {
        settings.snapshot_every_records = argument("--snapshot-every-records", 200_000.0) as u64;
    }
    if let Some(max_batch_records) =
        std::env::args().any(|argument| argument == "--max-batch").then(|| argument("--max-batch", 20_000.0))
    {
        settings.max_batch_records = max_batch_records as usize;
    }
    if !settings.producer_overrides.is_empty() || !settings.consumer_overrides.is_empty() {
        println!(
            "producer overrides {:?}, consumer overrides {:?}",
            settings.producer_overrides, settings.consumer_overrides
        );
    }
    let group = settings.group_id.clone();
    let config = ConfigStore::fixed(config());
    let shutdown = Arc::new(AtomicBool::new(false));
    let broker_pid_opt = broker_pid();
    let broker_cpu_before = broker_pid_opt.and_then(process_cpu_seconds).unwrap_or(0.0);
    let machine_busy_before = machine_busy_seconds();
    let (_, librdkafka_cpu_before, other_cpu_before) = thread_cpu_seconds();
    let router = std::thread::Builder::new().name("router".into()).spawn({
        let shutdown = shutdown.clone();
        let metrics = Arc::new(switchboard_router::metrics::RouterMetrics::default());
        move || run_router(&settings, &config, &shutdown, &metrics)
    })?;
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
    let (routing_cpu, librdkafka_cpu, other_cpu) = thread_cpu_seconds();
    let broker_cpu = broker_pid_opt.and_then(process_cpu_seconds).unwrap_or(0.0) - broker_cpu_before;
    let machine_busy = machine_busy_seconds() - machine_busy_before;
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
    // librdkafka threads of the bench's own input producer are idle by now, but counted: its
    // share before routing started is subtracted.
    let wall = total.as_secs_f64();
    println!(
        "cpu while routing ({wall:.1} s wall, 2 cores = {:.1} cpu-s): routing thread {routing_cpu:.1} s, librdkafka threads {:.1} s, rest of process {:.1} s, broker {}, whole machine {machine_busy:.1} s",
        2.0 * wall,
        librdkafka_cpu - librdkafka_cpu_before,
        other_cpu - other_cpu_before,
        if broker_pid_opt.is_some() { format!("{broker_cpu:.1} s") } else { "not found".to_owned() },
    );
    println!("load average: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());

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
