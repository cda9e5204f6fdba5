//! `bench-delivery`: replies per second through the delivery service to an HTTP stand-in (a
//! customer's app, C10), and the latency from publishing the reply on `outbound.v1` to the
//! stand-in receiving the request (p50/p99).
//!
//! Needs KAFKA_BROKERS and DATABASE_URL (`eval "$(scripts/stack env)"`). Creates fresh topics
//! (`bench.<id>.`) and a fresh database, runs the delivery service in-process, drops both after.
//!
//! ```text
//! target/release/bench-delivery --replies 50000            # throughput, as fast as possible
//! target/release/bench-delivery --replies 30000 --rate 1000 # latency at 1,000 replies/s
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use clap::Parser;
use mimalloc::MiMalloc;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::postgres::PgPoolOptions;
use switchboard_delivery::metrics::Metrics;
use switchboard_delivery::retry::RetryPolicy;
use switchboard_delivery::{DeliverySettings, run_delivery};
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{Author, AuthorKind, ChannelType, OutboundMessageQueued, OutboundPurpose};
use switchboard_runtime::envelope;
use switchboard_runtime::outbound::outbound_partition_key;
use switchboard_runtime::secrets::Secrets;
use switchboard_runtime::topics::{Topics, ensure_topics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

#[derive(Parser)]
struct Args {
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: String,
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    #[arg(long, default_value_t = 20_000)]
    replies: usize,
    /// Replies published per second (0: all at once).
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// Sends in flight in the delivery service.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
}

/// When the stand-in received each key.
type Received = Arc<Mutex<HashMap<String, Instant>>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let suffix = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
    let topics = Topics::with_prefix(&format!("bench.{suffix}."));
    ensure_topics(&args.kafka_brokers, &topics).await?;
    let admin = PgPoolOptions::new().max_connections(1).connect(&args.database_url).await?;
    let database = format!("sb_bench_delivery_{suffix}");
    sqlx::query(&format!("CREATE DATABASE {database}")).execute(&admin).await?;
    let database_url = match args.database_url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{database}"),
        None => anyhow::bail!("DATABASE_URL has no database name"),
    };
    let result = run(&args, &topics, &database_url).await;
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")).execute(&admin).await;
    result
}

async fn run(args: &Args, topics: &Topics, database_url: &str) -> anyhow::Result<()> {
    let pool = PgPoolOptions::new().max_connections(16).connect(database_url).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/replies", listener.local_addr()?);
    let received: Received = Arc::default();
    tokio::spawn(serve(listener, received.clone()));

    let settings = DeliverySettings {
        brokers: args.kafka_brokers.clone(),
        group_id: format!("{}delivery", topics.prefix),
        outbound_topic: topics.outbound.clone(),
        delivery_topic: topics.delivery.clone(),
        graph_base_url: "http://127.0.0.1:9/unused".into(),
        secrets: Secrets::parse("[channels.app]\nsigning_key = \"bench-key\"\n")?,
        smtp: None,
        concurrency: args.concurrency,
        http_timeout: Duration::from_secs(10),
        retry: RetryPolicy::default(),
        poll_interval: Duration::from_millis(20),
    };
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let metrics = Arc::new(Metrics::default());
    tokio::spawn(async move {
        if let Err(error) = run_delivery(settings, pool, shutdown, metrics).await {
            eprintln!("delivery failed: {error:#}");
        }
    });
    // Let the consumer join its group before the clock starts.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let producer: FutureProducer =
        switchboard_runtime::kafka::idempotent_producer_config(&args.kafka_brokers, "bench-delivery", 60_000)
            .create()?;
    let records: Vec<(String, String, Vec<u8>)> = (0..args.replies)
        .map(|index| {
            let reply_id = uuid::Uuid::now_v7().to_string();
            let conversation_id = uuid::Uuid::now_v7().to_string();
            let message = OutboundMessageQueued {
                reply_id: reply_id.clone(),
                conversation_id: conversation_id.clone(),
                channel_id: "app".into(),
                channel_type: ChannelType::Custom as i32,
                purpose: OutboundPurpose::ConversationReply as i32,
                author: Some(Author { kind: AuthorKind::Agent as i32, name: "Ann".into(), ..Default::default() }),
                text: format!("benchmark reply {index}"),
                recipient: format!("user-{index}"),
                idempotency_key: reply_id.clone(),
                custom_delivery_url: url.clone(),
                ..Default::default()
            };
            let key = outbound_partition_key("bench", &conversation_id);
            let event = envelope::new_root("bench", &key, Utc::now(), Payload::OutboundMessageQueued(message));
            (reply_id, key, envelope::encode(&event))
        })
        .collect();

    let published: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let started = Instant::now();
    let slice = if args.rate == 0 { 5_000 } else { (args.rate as usize / 100).max(1) };
    let pause = if args.rate == 0 { Duration::ZERO } else { Duration::from_secs_f64(slice as f64 / args.rate as f64) };
    let mut next_slice_at = tokio::time::Instant::now();
    for chunk in records.chunks(slice) {
        let sends = chunk.iter().map(|(reply_id, key, payload)| {
            let producer = &producer;
            let published = published.clone();
            async move {
                published.lock().expect("published lock").insert(reply_id.clone(), Instant::now());
                producer
                    .send(FutureRecord::to(&topics.outbound).key(key).payload(payload), Duration::from_secs(60))
                    .await
                    .map_err(|(error, _)| anyhow::Error::new(error))
            }
        });
        futures::future::try_join_all(sends).await.context("publishing replies")?;
        if !pause.is_zero() {
            next_slice_at += pause;
            tokio::time::sleep_until(next_slice_at).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while received.lock().expect("received lock").len() < args.replies {
        anyhow::ensure!(Instant::now() < deadline, "not every reply arrived within 10 minutes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received = received.lock().expect("received lock").clone();
    let published = published.lock().expect("published lock").clone();
    let last = received.values().max().copied().unwrap_or(started);
    let elapsed = last.duration_since(started).as_secs_f64();
    let mut latencies: Vec<f64> = received
        .iter()
        .filter_map(|(key, at)| {
            published.get(key).map(|sent| at.saturating_duration_since(*sent).as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let percentile = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "bench-delivery: {} replies to the HTTP stand-in in {elapsed:.2} s = {:.0} replies/s (publish rate {}); \
         publish -> stand-in latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        args.replies,
        args.replies as f64 / elapsed.max(0.001),
        if args.rate == 0 { "unpaced".to_owned() } else { format!("{}/s", args.rate) },
        percentile(0.5),
        percentile(0.99),
        latencies.last().copied().unwrap_or_default(),
    );
    Ok(())
}

/// A minimal HTTP/1.1 app answering 200 to every request, noting when each key arrived.
async fn serve(listener: TcpListener, received: Received) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { return };
        let _ = stream.set_nodelay(true);
        let received = received.clone();
        tokio::spawn(async move {
            let _ = connection(stream, received).await;
        });
    }
}

async fn connection(mut stream: TcpStream, received: Received) -> std::io::Result<()> {
    let mut buffer = Vec::with_capacity(4096);
    loop {
        let header_end = loop {
            if let Some(position) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
                break position + 4;
            }
            let mut chunk = [0u8; 8192];
            let read = stream.read(&mut chunk).await?;
            if read == 0 {
                return Ok(());
            }
            buffer.extend_from_slice(&chunk[..read]);
        };
        let head = String::from_utf8_lossy(&buffer[..header_end]).to_string();
        let header_value = |name: &str| {
            head.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_owned())
            })
        };
        let arrived = Instant::now();
        let content_length: usize = header_value("content-length").and_then(|value| value.parse().ok()).unwrap_or(0);
        if let Some(key) = header_value("idempotency-key") {
            received.lock().expect("received lock").entry(key).or_insert(arrived);
        }
        while buffer.len() < header_end + content_length {
            let mut chunk = [0u8; 8192];
            let read = stream.read(&mut chunk).await?;
            if read == 0 {
                return Ok(());
            }
            buffer.extend_from_slice(&chunk[..read]);
        }
        buffer.drain(..header_end + content_length);
        stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}").await?;
    }
}
