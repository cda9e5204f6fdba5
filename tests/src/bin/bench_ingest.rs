//! Ingest throughput and latency: many concurrent HTTP keep-alive connections post chat
//! messages and/or signed WhatsApp webhooks to an in-process ingest publishing to the real
//! Kafka broker (`acks=all`), and the bench prints accepted messages/s and p50/p99 request
//! latency. Every success counted is a 2xx that ingest sent only after Kafka acknowledged.
//!
//! `cargo build --release -p switchboard-tests --bin bench-ingest`
//! `eval "$(scripts/stack env)" && target/release/bench-ingest --mode mixed --messages 200000 --concurrency 256`
//! `… --rate 5000` paces requests to measure latency at a fixed load; `--telemetry` adds the
//! ingest binary's tracing/OpenTelemetry setup (off by default).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use switchboard_ingest::secrets::{ChannelSecrets, Secret, Secrets};
use switchboard_ingest::signature::sign_hex;
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{ChannelConfigured, ChannelType, InboxConfigured, WhatsAppSettings};
use switchboard_runtime::config_store::{ConfigStore, config_key};
use switchboard_runtime::topics::{Topics, ensure_topics};
use switchboard_tests::demo::percentile;

/// The same allocator as the ingest binary (ingest runs in-process here), see Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// `chat`, `whatsapp` or `mixed` (alternating).
    #[arg(long, default_value = "mixed")]
    mode: String,
    /// Messages to send in total.
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Concurrent connections.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Messages per WhatsApp webhook (Meta batches under load).
    #[arg(long, default_value_t = 1)]
    whatsapp_batch: usize,
    /// Target requests per second (paced); unset: as fast as possible.
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: String,
    /// Initialise telemetry as the ingest binary does (every request span is also an
    /// OpenTelemetry span, trace context in Kafka headers; logs filtered by RUST_LOG). Off by
    /// default, as in the figures recorded before this flag existed.
    #[arg(long)]
    telemetry: bool,
}

const APP_SECRET: &str = "bench-app-secret";

fn whatsapp_body(run: &str, first: usize, count: usize) -> String {
    let messages: Vec<String> = (first..first + count)
        .map(|index| {
            format!(
                r#"{{"from":"1650555{:04}","id":"wamid.{run}.{index}","timestamp":"1749416383","type":"text","text":{{"body":"Does it come in another color? #{index}"}}}}"#,
                index % 10_000
            )
        })
        .collect();
    format!(
        r#"{{"object":"whatsapp_business_account","entry":[{{"id":"102290129340398","changes":[{{"field":"messages","value":{{"messaging_product":"whatsapp","metadata":{{"display_phone_number":"15550783881","phone_number_id":"106540352242922"}},"contacts":[{{"profile":{{"name":"Bench"}},"wa_id":"16505550000"}}],"messages":[{}]}}}}]}}]}}"#,
        messages.join(",")
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry_opt =
        if args.telemetry { Some(switchboard_runtime::telemetry::init_telemetry("switchboard-ingest")?) } else { None };
    let run = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
    let topics = Topics::with_prefix(&format!("bench.{run}."));
    ensure_topics(&args.kafka_brokers, &topics).await?;
    let producer: rdkafka::producer::FutureProducer =
        switchboard_runtime::kafka::idempotent_producer_config(&args.kafka_brokers, "bench-config", 10_000).create()?;
    let config_payloads = vec![
        Payload::InboxConfigured(InboxConfigured {
            inbox_id: "support".into(),
            name: "Support".into(),
            ..Default::default()
        }),
        Payload::ChannelConfigured(Box::new(ChannelConfigured {
            channel_id: "web".into(),
            inbox_id: "support".into(),
            channel_type: ChannelType::Chat as i32,
            enabled: true,
            ..Default::default()
        })),
        Payload::ChannelConfigured(Box::new(ChannelConfigured {
            channel_id: "wa".into(),
            inbox_id: "support".into(),
            channel_type: ChannelType::Whatsapp as i32,
            enabled: true,
            whatsapp: Some(WhatsAppSettings { phone_number_id: "106540352242922".into(), ..Default::default() }),
            ..Default::default()
        })),
    ];
    for payload in config_payloads {
        let key = config_key("bench", &payload).context("config payload")?;
        let event = switchboard_runtime::envelope::new_root("bench", &key, chrono::Utc::now(), payload);
        let bytes = switchboard_runtime::envelope::encode(&event);
        producer
            .send(
                rdkafka::producer::FutureRecord::to(&topics.config).key(&key).payload(&bytes),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(error, _)| error)?;
    }
    let config = ConfigStore::start(&args.kafka_brokers, &topics.config, "bench-ingest").await?;
    let mut secrets = Secrets::default();
    secrets
        .channels
        .insert("wa".into(), ChannelSecrets { app_secret: Some(Secret::new(APP_SECRET)), ..Default::default() });
    let settings = switchboard_ingest::IngestSettings {
        secrets,
        ..switchboard_ingest::IngestSettings::new("127.0.0.1:0".parse()?, &args.kafka_brokers, &topics.inbound)
    };
    let (bound_sender, bound) = tokio::sync::oneshot::channel();
    let (stop_sender, mut stop) = tokio::sync::watch::channel(false);
    tokio::spawn(switchboard_ingest::serve_all(settings, config, bound_sender, async move {
        let _ = stop.changed().await;
    }));
    let base = format!("http://{}", bound.await?.http);

    let client = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).build()?;
    // Requests, each carrying `messages_per_request` messages.
    let plan: Arc<Vec<(bool, usize)>> = {
        let mut plan = Vec::new();
        let mut sent = 0;
        let mut index = 0;
        while sent < args.messages {
            let whatsapp = match args.mode.as_str() {
                "chat" => false,
                "whatsapp" => true,
                _ => index % 2 == 1,
            };
            let count = if whatsapp { args.whatsapp_batch.min(args.messages - sent) } else { 1 };
            plan.push((whatsapp, count));
            sent += count;
            index += 1;
        }
        Arc::new(plan)
    };
    println!(
        "bench-ingest: {} messages in {} requests, mode {}, {} connections, whatsapp batch {}, rate {}, telemetry {}",
        args.messages,
        plan.len(),
        args.mode,
        args.concurrency,
        args.whatsapp_batch,
        args.rate.map_or("unlimited".to_owned(), |rate| format!("{rate}/s")),
        if args.telemetry { "on" } else { "off" }
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (client, base, plan, next, run, rate) =
            (client.clone(), base.clone(), plan.clone(), next.clone(), run.clone(), args.rate);
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut accepted_messages = 0usize;
            let mut failures = 0usize;
            loop {
                let request_index = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(whatsapp, count)) = plan.get(request_index) else { break };
                if let Some(rate) = rate {
                    let due = started + Duration::from_secs_f64(request_index as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let request = if whatsapp {
                    let body = whatsapp_body(&run, request_index * 1_000, count);
                    let signature = format!("sha256={}", sign_hex(APP_SECRET.as_bytes(), &[body.as_bytes()]));
                    client.post(format!("{base}/v1/webhooks/whatsapp")).header("x-hub-signature-256", signature).body(body)
                } else {
                    let body = format!(
                        r#"{{"visitor_id":"visitor-{}","message_id":"{run}-{request_index}","text":"Where is my order?"}}"#,
                        request_index % 5_000
                    );
                    client.post(format!("{base}/v1/channels/web/chat/messages")).header("content-type", "application/json").body(body)
                };
                let sent_at = Instant::now();
                match request.send().await {
                    Ok(response) if response.status().is_success() => {
                        let _ = response.bytes().await;
                        latencies.push(sent_at.elapsed());
                        accepted_messages += count;
                    }
                    Ok(response) => {
                        failures += 1;
                        if failures <= 3 {
                            eprintln!("request failed: {} {}", response.status(), response.text().await.unwrap_or_default());
                        }
                    }
                    Err(error) => {
                        failures += 1;
                        if failures <= 3 {
                            eprintln!("request error: {error}");
                        }
                    }
                }
            }
            (latencies, accepted_messages, failures)
        }));
    }
    let mut latencies = Vec::new();
    let (mut accepted, mut failures) = (0, 0);
    for worker in workers {
        let (worker_latencies, worker_accepted, worker_failures) = worker.await?;
        latencies.extend(worker_latencies);
        accepted += worker_accepted;
        failures += worker_failures;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    println!("accepted messages      : {accepted} ({failures} failed requests)");
    println!("wall time              : {:.2} s", elapsed.as_secs_f64());
    println!("accepted messages/s    : {:.0}", accepted as f64 / elapsed.as_secs_f64());
    println!("requests/s             : {:.0}", latencies.len() as f64 / elapsed.as_secs_f64());
    println!(
        "request latency        : p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&latencies, 50.0).as_secs_f64() * 1e3,
        percentile(&latencies, 99.0).as_secs_f64() * 1e3,
        percentile(&latencies, 100.0).as_secs_f64() * 1e3,
    );
    let _ = stop_sender.send(true);
    delete_topics(&args.kafka_brokers, &topics).await;
    Ok(())
}

async fn delete_topics(brokers: &str, topics: &Topics) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let Ok(admin) = switchboard_runtime::kafka::client_config(brokers, "bench-cleanup")
        .create::<AdminClient<DefaultClientContext>>()
    else {
        return;
    };
    // Every topic `ensure_topics` created (router snapshots included, which a fixed list of
    // four names used to leave behind on the shared broker after every run).
    let names: Vec<String> = switchboard_runtime::topics::topic_specs()
        .iter()
        .map(|spec| format!("{}{}", topics.prefix, spec.base_name))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&names, &AdminOptions::new()).await;
}
