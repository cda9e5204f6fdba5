//! Reply latency benchmark (issue 15): from `SendReply` (a gRPC call from a tonic client, as a
//! real client makes it) to the provider's stand-in receiving the request, at a steady rate.
//!
//! Conversations of a custom channel (C10) are seeded straight into the read models (as
//! `api_seed` does); the API and the delivery service run in-process against this stack's Kafka
//! and PostgreSQL, and the channel's `delivery_url` is a small in-process HTTP server (the
//! stand-in for the customer's app) that notes when each reply's `Idempotency-Key` (the reply
//! id) first arrives. Calls are paced open-loop: each starts at its scheduled time, whether or
//! not earlier calls have answered, so queueing counts.
//!
//! `cargo build --release -p switchboard-tests --bin bench-reply-latency`
//! `eval "$(scripts/stack env)" && target/release/bench-reply-latency --rate 1000 --seconds 20`

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::http::HeaderMap;
use clap::Parser;
use sqlx::postgres::PgPoolOptions;
use switchboard_api::auth::Role;
use switchboard_proto::api::v1::SendReplyRequest;
use switchboard_runtime::outbound::reply_id_for;
use switchboard_tests::TestEnv;
use switchboard_tests::api_seed::{ACCOUNT, clients_for, identity};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// SendReply calls per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Timed seconds at that rate.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Seconds at the same rate before the timed ones (connections, caches, group join).
    #[arg(long, default_value_t = 3)]
    warmup_seconds: u64,
    /// Conversations the replies are spread over (round robin).
    #[arg(long, default_value_t = 1000)]
    conversations: i64,
    /// HTTP/2 connections to the API the calls are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// The delivery service's sends in flight (`DELIVERY_CONCURRENCY`).
    #[arg(long, default_value_t = 256)]
    delivery_concurrency: usize,
}

/// When the stand-in first received each reply (by its `Idempotency-Key`).
type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

fn config(delivery_url: &str) -> String {
    format!(
        r#"
account_id = "{ACCOUNT}"

[[inboxes]]
id = "support"
name = "Support"

[[channels]]
id = "app"
inbox = "support"
type = "custom"
name = "Customer app"
[channels.custom]
delivery_url = "{delivery_url}"

[[agents]]
id = "ana"
name = "Ana"
paid_seat = true
"#
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let env = TestEnv::new().await?;
    let result = run(&args, &env).await;
    env.cleanup().await;
    result
}

async fn run(args: &Args, env: &TestEnv) -> anyhow::Result<()> {
    let arrivals: Arrivals = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let delivery_url = format!("http://{}/deliver", listener.local_addr()?);
    let stand_in = axum::Router::new().route("/deliver", axum::routing::post(receive)).with_state(arrivals.clone());
    tokio::spawn(async move { axum::serve(listener, stand_in).await });

    env.apply_config(&config(&delivery_url)).await?;
    let conversation_ids = seed(env, args.conversations).await?;
    // The API and the delivery service each with a pool of their own, as their binaries run
    // (16 connections each, api/src/main.rs and delivery/src/main.rs).
    let api_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", api_listener.local_addr()?);
    let api_settings = switchboard_api::ApiSettings {
        pool: PgPoolOptions::new().max_connections(16).connect(&env.database_url).await?,
        authenticator: switchboard_api::auth::Authenticator::new(
            Some(switchboard_tests::TEST_JWT_SECRET.as_bytes()),
            None,
        )?,
        brokers: env.brokers.clone(),
        topics: env.topics.clone(),
        fallback_email_domain: switchboard_runtime::outbound::DEFAULT_FALLBACK_DOMAIN.to_owned(),
        // Replies carry no attachments here; as the binary's default.
        attachment_hosts: switchboard_runtime::attachment_hosts::AttachmentHosts::PublicOnly,
    };
    tokio::spawn(async move {
        if let Err(error) = switchboard_api::serve(api_listener, api_settings, std::future::pending()).await {
            eprintln!("api failed: {error:#}");
        }
    });
    let mut settings =
        env.delivery_settings("http://127.0.0.1:9/unused", "[channels.app]\nsigning_key = \"bench-key\"\n")?;
    settings.concurrency = args.delivery_concurrency;
    settings.http_timeout = Duration::from_secs(10);
    settings.poll_interval = Duration::from_millis(20);
    let delivery_pool = PgPoolOptions::new().max_connections(16).connect(&env.database_url).await?;
    switchboard_delivery::migrate(&delivery_pool).await?;
    let (_stop_delivery, stopped) = tokio::sync::watch::channel(false);
    let metrics = Arc::new(switchboard_delivery::metrics::Metrics::default());
    tokio::spawn(async move {
        if let Err(error) = switchboard_delivery::run_delivery(settings, delivery_pool, stopped, metrics).await {
            eprintln!("delivery failed: {error:#}");
        }
    });

    let agent = identity("ana", Role::Agent, &[]);
    let mut clients = Vec::with_capacity(args.connections);
    for _ in 0..args.connections.max(1) {
        clients.push(clients_for(&url, &agent).await?.admin);
    }
    // One reply through the whole path before the clock starts: the delivery consumer has
    // joined its group and the API has its connections.
    let first = Instant::now();
    call(clients[0].clone(), &conversation_ids[0], &uuid::Uuid::now_v7().to_string()).await?;
    wait_for(&arrivals, 1, Duration::from_secs(60)).await?;
    println!("first reply through the path after {:.2} s", first.elapsed().as_secs_f64());

    let warmup_calls = (args.rate * args.warmup_seconds) as usize;
    let timed_calls = (args.rate * args.seconds) as usize;
    let total = warmup_calls + timed_calls;
    let started_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let answered: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let origin = tokio::time::Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for index in 0..total {
        tokio::time::sleep_until(origin + interval * index as u32).await;
        let request_id = uuid::Uuid::now_v7().to_string();
        let reply_id = reply_id_for(ACCOUNT, &request_id).to_string();
        let client = clients[index % clients.len()].clone();
        let conversation_id = conversation_ids[index % conversation_ids.len()].clone();
        let timed = index >= warmup_calls;
        let (started_at, answered, errors) = (started_at.clone(), answered.clone(), errors.clone());
        calls.spawn(async move {
            let start = Instant::now();
            if timed {
                started_at.lock().expect("started lock").insert(reply_id, start);
            }
            match call(client, &conversation_id, &request_id).await {
                Ok(()) if timed => answered.lock().expect("answered lock").push(start.elapsed()),
                Ok(()) => {}
                Err(error) => {
                    if errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 5 {
                        eprintln!("SendReply failed: {error:#}");
                    }
                }
            }
        });
        while calls.try_join_next().is_some() {}
    }
    let paced = origin.elapsed();
    while calls.join_next().await.is_some() {}
    let errors = errors.load(std::sync::atomic::Ordering::Relaxed);
    anyhow::ensure!(errors == 0, "{errors} SendReply calls failed");
    wait_for(&arrivals, total + 1, Duration::from_secs(120)).await?;

    let arrivals = arrivals.lock().expect("arrivals lock").clone();
    let started_at = started_at.lock().expect("started lock").clone();
    let mut latencies: Vec<Duration> = started_at
        .iter()
        .map(|(reply_id, start)| {
            arrivals
                .get(reply_id)
                .map(|arrived| arrived.saturating_duration_since(*start))
                .with_context(|| format!("reply {reply_id} never reached the stand-in"))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut answered = answered.lock().expect("answered lock").clone();
    let timed_start = started_at.values().min().copied().context("no timed calls")?;
    let timed_end = started_at.values().max().copied().context("no timed calls")?;
    println!(
        "{} calls paced at {}/s over {:.2} s ({} warm-up calls excluded); achieved {:.0} calls/s in the timed window",
        total,
        args.rate,
        paced.as_secs_f64(),
        warmup_calls,
        (timed_calls.saturating_sub(1)) as f64 / timed_end.duration_since(timed_start).as_secs_f64().max(1e-9),
    );
    report("SendReply -> stand-in received", &mut latencies);
    report("SendReply answered", &mut answered);
    Ok(())
}

async fn call(
    mut client: switchboard_proto::api::v1::admin_service_client::AdminServiceClient<
        switchboard_tests::api_seed::Authed,
    >,
    conversation_id: &str,
    request_id: &str,
) -> anyhow::Result<()> {
    let request = SendReplyRequest {
        request_id: request_id.to_owned(),
        conversation_id: conversation_id.to_owned(),
        text: "Thanks, your order ships today.".into(),
        ..Default::default()
    };
    client.send_reply(request).await.context("SendReply")?;
    Ok(())
}

/// The stand-in for the customer's app: notes the first arrival of each key, answers 200.
async fn receive(axum::extract::State(arrivals): axum::extract::State<Arrivals>, headers: HeaderMap) -> &'static str {
    let arrived = Instant::now();
    if let Some(key) = headers.get("idempotency-key").and_then(|value| value.to_str().ok()) {
        arrivals.lock().expect("arrivals lock").entry(key.to_owned()).or_insert(arrived);
    }
    "{}"
}

async fn wait_for(arrivals: &Arrivals, count: usize, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let arrived = arrivals.lock().expect("arrivals lock").len();
        if arrived >= count {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "only {arrived} of {count} replies reached the stand-in");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Open conversations of the custom channel, written as the projector would store them.
async fn seed(env: &TestEnv, conversations: i64) -> anyhow::Result<Vec<String>> {
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
        "WITH seeded AS (
             SELECT gen_random_uuid() AS conversation_id, gen_random_uuid() AS contact_id, index
             FROM generate_series(1, $1) AS index),
         contacts AS (
             INSERT INTO contacts (contact_id, account_id, display_name, email, created_at)
             SELECT contact_id, 'acme', 'Customer ' || index, '', now() FROM seeded)
         INSERT INTO conversations (conversation_id, account_id, inbox_id, channel_id, channel_type, thread_key, status,
             contact_external_id, contact_name, message_count, started_at, last_message_at, contact_id, subject,
             updated_at)
         SELECT conversation_id, 'acme', 'support', 'app', 'custom', 'user-' || index, 'open', 'user-' || index,
             'Customer ' || index, 1, now() - interval '5 minutes', now() - interval '5 minutes', contact_id, '', now()
         FROM seeded
         RETURNING conversation_id",
    )
    .bind(conversations)
    .fetch_all(&env.pool)
    .await
    .context("seeding conversations")?;
    Ok(ids.into_iter().map(|id| id.to_string()).collect())
}

fn report(name: &str, latencies: &mut [Duration]) {
    latencies.sort_unstable();
    let at = |fraction: f64| {
        let rank = ((latencies.len() as f64 * fraction).ceil() as usize).clamp(1, latencies.len().max(1));
        latencies.get(rank - 1).copied().unwrap_or_default().as_secs_f64() * 1e3
    };
    println!(
        "{name}: {} replies, p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        at(0.50),
        at(0.90),
        at(0.99),
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}
