//! `bench-delivery`: replies per second through the delivery service to an HTTP stand-in (a
//! customer's app, C10), and the latency from publishing the reply on `outbound.v1` to the
//! stand-in receiving the request (p50/p99). With `--email`, the replies are team emails sent
//! to the SMTP server at `--smtp-port` (Mailpit in the stack); the clock then stops when the
//! outbox has recorded every one as sent, and Mailpit (`--mailpit-url`) is asked whether it holds
//! them all.
//!
//! Needs KAFKA_BROKERS and DATABASE_URL (`eval "$(scripts/stack env)"`). Creates fresh topics
//! (`bench.<id>.`) and a fresh database, runs the delivery service in-process, drops both after.
//!
//! ```text
//! target/release/bench-delivery --replies 50000            # throughput, as fast as possible
//! target/release/bench-delivery --replies 30000 --rate 1000 # latency at 1,000 replies/s
//! target/release/bench-delivery --replies 20000 --email    # to Mailpit (MAILPIT_SMTP_PORT)
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
use switchboard_delivery::email::{SmtpSettings, SmtpTls};
use switchboard_delivery::metrics::Metrics;
use switchboard_delivery::retry::RetryPolicy;
use switchboard_delivery::{DeliverySettings, run_delivery};
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    Author, AuthorKind, ChannelType, OutboundEmail, OutboundMessageQueued, OutboundPurpose,
};
use switchboard_runtime::attachment_hosts::AttachmentHosts;
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
    /// Team emails to the SMTP server instead of HTTP requests to the stand-in.
    #[arg(long)]
    email: bool,
    #[arg(long, default_value = "127.0.0.1")]
    smtp_host: String,
    #[arg(long, env = "MAILPIT_SMTP_PORT", default_value_t = 1025)]
    smtp_port: u16,
    /// Mailpit's API, to check every email arrived (`--email`; skipped when unset).
    #[arg(long, env = "MAILPIT_URL")]
    mailpit_url: Option<String>,
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
        smtp: args.email.then(|| SmtpSettings {
            host: args.smtp_host.clone(),
            port: args.smtp_port,
            tls: SmtpTls::None,
            username: None,
            password: None,
            timeout: Duration::from_secs(10),
            attachment_hosts: AttachmentHosts::PublicOnly,
        }),
        smtp_connections: switchboard_delivery::service::DEFAULT_SMTP_CONNECTIONS,
        concurrency: args.concurrency,
        http_timeout: Duration::from_secs(10),
        retry: RetryPolicy::default(),
        poll_interval: Duration::from_millis(20),
    };
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let metrics = Arc::new(Metrics::default());
    let status_pool = pool.clone();
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
    let run_domain = format!("{}.bench.example", uuid::Uuid::now_v7().simple());
    let records: Vec<(String, String, Vec<u8>)> = (0..args.replies)
        .map(|index| {
            let reply_id = uuid::Uuid::now_v7().to_string();
            let conversation_id = uuid::Uuid::now_v7().to_string();
            let message = if args.email {
                email_reply(&reply_id, &conversation_id, index, &run_domain)
            } else {
                OutboundMessageQueued {
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
                }
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
    if args.email {
        return finish_email(args, &status_pool, started, &run_domain).await;
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

/// A team email reply as the API queues it (both bodies, threaded on the customer's email).
fn email_reply(reply_id: &str, conversation_id: &str, index: usize, domain: &str) -> OutboundMessageQueued {
    let from_address = "support@acme.example";
    let message_id =
        switchboard_runtime::outbound::email_message_id(uuid::Uuid::parse_str(reply_id).expect("a uuid"), from_address);
    let to = format!("customer-{index}@{domain}");
    OutboundMessageQueued {
        reply_id: reply_id.to_owned(),
        conversation_id: conversation_id.to_owned(),
        channel_id: "mail".into(),
        channel_type: ChannelType::TeamEmail as i32,
        purpose: OutboundPurpose::ConversationReply as i32,
        author: Some(Author { kind: AuthorKind::Agent as i32, name: "Ann".into(), ..Default::default() }),
        text: format!("Hello,\nyour order {index} ships today."),
        recipient: to.clone(),
        idempotency_key: message_id.clone(),
        email: Some(OutboundEmail {
            from_name: "Ann from Acme Support".into(),
            from_address: from_address.into(),
            to: vec![to],
            subject: format!("Re: order {index}"),
            message_id_header: message_id,
            in_reply_to: format!("customer-{index}@{domain}"),
            references: vec![format!("customer-{index}@{domain}")],
            from_fallback_address: false,
            text_body: format!("Hello,\nyour order {index} ships today.\n\n-- \nAnn\nAcme Support"),
            html_body: format!("<p>Hello,<br>your order {index} ships today.</p><p>-- <br>Ann<br>Acme Support</p>"),
        }),
        ..Default::default()
    }
}

/// Waits until the outbox records every email as sent (none failed), prints the rate, and
/// checks that Mailpit holds them all.
async fn finish_email(args: &Args, pool: &sqlx::PgPool, started: Instant, domain: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let finished = loop {
        let (sent, failed): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state = 'sent'), count(*) FILTER (WHERE state = 'failed')
             FROM delivery.outbox",
        )
        .fetch_one(pool)
        .await?;
        anyhow::ensure!(failed == 0, "{failed} emails failed");
        if sent as usize >= args.replies {
            break Instant::now();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {sent} of {} emails were sent within 10 minutes",
            args.replies
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let elapsed = finished.duration_since(started).as_secs_f64();
    println!(
        "bench-delivery: {} email replies through the delivery service to the SMTP server in {elapsed:.2} s = {:.0} replies/s (publish rate {})",
        args.replies,
        args.replies as f64 / elapsed.max(0.001),
        if args.rate == 0 { "unpaced".to_owned() } else { format!("{}/s", args.rate) },
    );
    if let Some(mailpit_url) = &args.mailpit_url {
        let search = format!("{}/api/v1/search", mailpit_url.trim_end_matches('/'));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let body: serde_json::Value = reqwest::Client::new()
                .get(&search)
                .query(&[("query", format!("to:\"@{domain}\"")), ("limit", "1".into())])
                .send()
                .await
                .context("mailpit search failed")?
                .error_for_status()?
                .json()
                .await?;
            let count = body["messages_count"].as_u64().context("mailpit answered no messages_count")?;
            if count as usize >= args.replies || Instant::now() > deadline {
                println!("bench-delivery: mailpit holds {count} of the {} emails", args.replies);
                anyhow::ensure!(count as usize == args.replies, "mailpit holds {count} emails of this run");
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
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
