//! API benchmark (issues 6 and 13): seeds 100,000 conversations and 1,000,000 messages into
//! the read models with SQL and serves the API in-process. First, on the idle API, it calls
//! `GetConversation` and 50-row `ListConversations` the way an interactive client does: one
//! channel, one call after another, each waiting for the previous answer; once from Rust
//! (tonic) and once through Python grpcio (tests/python/grpcio_sequential.py), a client no one on
//! the team wrote. Then it drives the same two calls at a fixed open-loop rate (latency measured
//! from each request's scheduled start, so queueing counts), and meanwhile commits conversation
//! changes the way the projector does and measures how long a watch stream takes to deliver
//! them.
//!
//! `cargo run --release -p switchboard-tests --bin bench-api -- --rate 1000 --seconds 20`
//! (needs KAFKA_BROKERS and DATABASE_URL, as `scripts/stack env` prints; `--seconds 0` measures
//! only the sequential calls, `--grpcio-calls 0` leaves out Python).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use switchboard_api::auth::{Identity, Role};
use switchboard_proto::api::v1::{
    GetConversationRequest, ListConversationsRequest, WatchConversationsRequest,
    conversation_service_client::ConversationServiceClient,
};
use switchboard_tests::{BearerToken, TestEnv, connect_channel};
use tokio_stream::StreamExt;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    conversations: i64,
    #[arg(long, default_value_t = 10)]
    messages_per_conversation: i64,
    /// Requests per second (half GetConversation, half ListConversations).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Excluded from the figures (connection set-up, cold caches).
    #[arg(long, default_value_t = 3)]
    warmup_seconds: u64,
    /// HTTP/2 connections the load is spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Timed calls of each kind made one after another on one channel, before the load
    /// (0: none).
    #[arg(long, default_value_t = 2000)]
    sequential_calls: usize,
    /// Timed calls of each kind made one after another through Python grpcio, before the load
    /// (0: none; the first run creates a virtualenv with pip).
    #[arg(long, default_value_t = 1000)]
    grpcio_calls: usize,
}

const INBOXES: i64 = 10;
/// Untimed calls before each sequential series (connection set-up, cold caches).
const SEQUENTIAL_WARMUP_CALLS: usize = 100;
/// At most this many conversation ids are handed to the Python client (in an environment
/// variable, which Linux caps at 128 KiB); it cycles through them.
const GRPCIO_MAX_IDS: usize = 2000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let env = TestEnv::new().await?;
    let result = run(&args, &env).await;
    env.cleanup().await;
    result
}

async fn run(args: &Args, env: &TestEnv) -> anyhow::Result<()> {
    let seeding = Instant::now();
    seed(env, args).await?;
    println!(
        "seeded {} conversations and {} messages in {:.1} s",
        args.conversations,
        args.conversations * args.messages_per_conversation,
        seeding.elapsed().as_secs_f64()
    );
    let conversation_ids: Arc<Vec<String>> = Arc::new(
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT conversation_id FROM conversations")
            .fetch_all(&env.pool)
            .await?
            .into_iter()
            .map(|id| id.to_string())
            .collect(),
    );
    let url = env.start_api_server().await?;
    // A plain agent: every call resolves inbox access, the realistic (slower) path.
    let agent = Identity { user_id: "agent-1".into(), account_id: "bench".into(), role: Role::Agent, team_ids: vec![] };
    let raw_token = switchboard_api::auth::mint_token(
        switchboard_tests::TEST_JWT_SECRET.as_bytes(),
        &agent,
        Duration::from_secs(86_400),
    )?;
    let token = BearerToken::new(&raw_token)?;
    if args.sequential_calls > 0 {
        sequential_calls(&url, &token, &conversation_ids, args.sequential_calls).await?;
    }
    if args.grpcio_calls > 0 {
        sequential_calls_through_grpcio(&url, &raw_token, &conversation_ids, args.grpcio_calls).await?;
    }
    if args.seconds > 0 {
        concurrent_load(args, env, &url, &token, conversation_ids).await?;
    }
    Ok(())
}

/// The position of the conversation the `index`th call fetches: spread over the table, the
/// same sequence in every series.
fn conversation_index(index: usize, conversation_count: usize) -> usize {
    index * 104_729 % conversation_count
}

/// One channel, one call after another, each waiting for the previous answer: how an agent's
/// screen or a script calls the API. Each figure is one call's own round trip, so a stall per
/// response (e.g. Nagle's algorithm waiting for the client's delayed ACK, issue 13) shows in
/// every call; under concurrent load other calls' traffic hides it.
async fn sequential_calls(
    url: &str,
    token: &BearerToken,
    conversation_ids: &[String],
    calls: usize,
) -> anyhow::Result<()> {
    let mut client = ConversationServiceClient::with_interceptor(connect_channel(url).await?, token.clone());
    let mut get_latencies = Vec::with_capacity(calls);
    for index in 0..SEQUENTIAL_WARMUP_CALLS + calls {
        let conversation_id = conversation_ids[conversation_index(index, conversation_ids.len())].clone();
        let started = Instant::now();
        client.get_conversation(GetConversationRequest { conversation_id, ..Default::default() }).await?;
        if index >= SEQUENTIAL_WARMUP_CALLS {
            get_latencies.push(started.elapsed());
        }
    }
    let mut list_latencies = Vec::with_capacity(calls);
    for index in 0..SEQUENTIAL_WARMUP_CALLS + calls {
        let request = ListConversationsRequest {
            inbox_id: format!("inbox-{}", index % INBOXES as usize),
            page_size: 50,
            ..Default::default()
        };
        let started = Instant::now();
        let listed = client.list_conversations(request).await?.into_inner();
        if index >= SEQUENTIAL_WARMUP_CALLS {
            list_latencies.push(started.elapsed());
        }
        assert_eq!(listed.conversations.len(), 50);
    }
    println!("sequential, tonic, one channel ({SEQUENTIAL_WARMUP_CALLS} warm-up calls of each kind excluded):");
    report("GetConversation (10 messages)", &mut get_latencies);
    report("ListConversations (50 rows)", &mut list_latencies);
    Ok(())
}

/// The same sequential calls through Python grpcio (tests/python/grpcio_sequential.py), timed
/// by the Python client around each call.
async fn sequential_calls_through_grpcio(
    url: &str,
    raw_token: &str,
    conversation_ids: &[String],
    calls: usize,
) -> anyhow::Result<()> {
    let ids_for_python: Vec<&str> = (0..(SEQUENTIAL_WARMUP_CALLS + calls).min(GRPCIO_MAX_IDS))
        .map(|index| conversation_ids[conversation_index(index, conversation_ids.len())].as_str())
        .collect();
    let mut command = std::process::Command::new("bash");
    command
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/python/run_grpcio_client.sh"))
        .arg("grpcio_sequential.py")
        .env("API_ADDR", url.trim_start_matches("http://"))
        .env("API_TOKEN", raw_token)
        .env("BENCH_CONVERSATION_IDS", ids_for_python.join(","))
        .env("BENCH_INBOX", "inbox-0")
        .env("BENCH_CALLS", calls.to_string())
        .env("BENCH_WARMUP_CALLS", SEQUENTIAL_WARMUP_CALLS.to_string())
        .stderr(std::process::Stdio::inherit());
    let output = tokio::task::spawn_blocking(move || command.output()).await?.context("failed to run python")?;
    anyhow::ensure!(output.status.success(), "python grpcio client failed: {}", output.status);
    println!("sequential, Python grpcio, one channel ({SEQUENTIAL_WARMUP_CALLS} warm-up calls of each kind excluded):");
    for line in String::from_utf8(output.stdout)?.lines() {
        let series: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("unexpected line {line}"))?;
        let mut latencies: Vec<Duration> = series["latencies_ms"]
            .as_array()
            .context("no latencies_ms")?
            .iter()
            .filter_map(serde_json::Value::as_f64)
            .map(|milliseconds| Duration::from_secs_f64(milliseconds / 1e3))
            .collect();
        let name = match series["call"].as_str() {
            Some("GetConversation") => "GetConversation (10 messages)",
            Some("ListConversations") => "ListConversations (50 rows)",
            _ => anyhow::bail!("unexpected call in {line}"),
        };
        report(name, &mut latencies);
    }
    Ok(())
}

/// The open-loop load (half `GetConversation`, half `ListConversations`) with a watch stream
/// following committed changes meanwhile.
async fn concurrent_load(
    args: &Args,
    env: &TestEnv,
    url: &str,
    token: &BearerToken,
    conversation_ids: Arc<Vec<String>>,
) -> anyhow::Result<()> {
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        clients.push(ConversationServiceClient::with_interceptor(connect_channel(url).await?, token.clone()));
    }

    // Watch: one stream; changes committed every 20 ms during the load.
    let committed_at: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let watch_latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let mut watch_stream = clients[0]
        .clone()
        .watch_conversations(WatchConversationsRequest { inbox_ids: vec![], after_change_id: None })
        .await?
        .into_inner();
    let watcher = {
        let (committed_at, watch_latencies) = (committed_at.clone(), watch_latencies.clone());
        tokio::spawn(async move {
            while let Some(Ok(change)) = watch_stream.next().await {
                let received = Instant::now();
                // The commit time is recorded right after COMMIT returns; a change can arrive
                // first, so wait for its entry briefly.
                for _ in 0..100 {
                    if let Some(at) = committed_at.lock().unwrap().remove(&change.change_id) {
                        watch_latencies.lock().unwrap().push(received.saturating_duration_since(at));
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        })
    };

    let latencies: Arc<Mutex<Vec<(bool, Duration)>>> = Arc::default();
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let total = args.rate * args.seconds;
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let warmup_until = args.rate * args.warmup_seconds;
    let started = Instant::now();
    let change_writer = {
        let pool = env.pool.clone();
        let committed_at = committed_at.clone();
        let conversation_ids = conversation_ids.clone();
        let until = started + Duration::from_secs(args.seconds);
        tokio::spawn(async move {
            let mut round = 0usize;
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
                round += 1;
                let Ok(mut transaction) = pool.begin().await else { continue };
                let inbox = format!("inbox-{}", round % INBOXES as usize);
                let id: uuid::Uuid = conversation_ids[round * 7919 % conversation_ids.len()].parse().unwrap();
                let Ok(change_id) = sqlx::query_scalar::<_, i64>(
                    "INSERT INTO conversation_changes (account_id, inbox_id, conversation_id, kind, event_id, at) \
                     VALUES ('bench', $1, $2, 'message', $3, now()) RETURNING change_id",
                )
                .bind(&inbox)
                .bind(id)
                .bind(uuid::Uuid::now_v7().to_string())
                .fetch_one(&mut *transaction)
                .await
                else {
                    continue;
                };
                let _ = sqlx::query("SELECT pg_notify('conversation_changes', $1)")
                    .bind(&inbox)
                    .execute(&mut *transaction)
                    .await;
                if transaction.commit().await.is_ok() {
                    committed_at.lock().unwrap().insert(change_id as u64, Instant::now());
                }
            }
        })
    };

    let mut tasks = Vec::with_capacity(total as usize);
    for index in 0..total {
        let scheduled = started + interval * index as u32;
        tokio::time::sleep_until(scheduled.into()).await;
        let mut client = clients[index as usize % clients.len()].clone();
        let (latencies, errors, ids) = (latencies.clone(), errors.clone(), conversation_ids.clone());
        tasks.push(tokio::spawn(async move {
            let is_get = index % 2 == 0;
            let outcome = if is_get {
                let id = ids[conversation_index(index as usize, ids.len())].clone();
                client
                    .get_conversation(GetConversationRequest { conversation_id: id, ..Default::default() })
                    .await
                    .map(drop)
            } else {
                let request = ListConversationsRequest {
                    inbox_id: format!("inbox-{}", index % INBOXES as u64),
                    page_size: 50,
                    ..Default::default()
                };
                client
                    .list_conversations(request)
                    .await
                    .map(|response| assert_eq!(response.into_inner().conversations.len(), 50))
            };
            if outcome.is_err() {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if index >= warmup_until {
                latencies.lock().unwrap().push((is_get, scheduled.elapsed()));
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let elapsed = started.elapsed();
    change_writer.await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    watcher.abort();

    let latencies = latencies.lock().unwrap().clone();
    println!(
        "concurrent load: {total} requests at {} req/s scheduled, {:.0} req/s achieved, {} errors, {} s warm-up excluded",
        args.rate,
        total as f64 / elapsed.as_secs_f64(),
        errors.load(std::sync::atomic::Ordering::Relaxed),
        args.warmup_seconds
    );
    for (is_get, name) in [(true, "GetConversation (10 messages)"), (false, "ListConversations (50 rows)")] {
        let mut sample: Vec<Duration> = latencies.iter().filter(|(get, _)| *get == is_get).map(|(_, d)| *d).collect();
        report(name, &mut sample);
    }
    let mut watch = watch_latencies.lock().unwrap().clone();
    report("watch delivery (commit -> client)", &mut watch);
    Ok(())
}

fn report(name: &str, sample: &mut [Duration]) {
    sample.sort();
    let at = |quantile: f64| {
        sample
            .get(((sample.len() as f64 * quantile) as usize).min(sample.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "{name:<36} n={:<6} p50={:>7.2} ms  p90={:>7.2} ms  p99={:>7.2} ms  max={:>7.2} ms",
        sample.len(),
        at(0.50).as_secs_f64() * 1e3,
        at(0.90).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        sample.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
}

async fn seed(env: &TestEnv, args: &Args) -> anyhow::Result<()> {
    let pool = &env.pool;
    sqlx::query(
        "INSERT INTO inboxes (inbox_id, account_id, name, access_mode, updated_at) \
         SELECT 'inbox-' || i, 'bench', 'Inbox ' || i, 'everyone', now() FROM generate_series(0, $1 - 1) i",
    )
    .bind(INBOXES)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO conversations (conversation_id, account_id, inbox_id, channel_id, channel_type, thread_key, status, \
             assignee_id, contact_external_id, contact_name, message_count, started_at, last_message_at, updated_at) \
         SELECT md5('c' || i)::uuid, 'bench', 'inbox-' || (i % $2), 'chan-' || (i % $2), 'chat', 't' || i, \
                CASE WHEN i % 5 = 0 THEN 'closed' ELSE 'open' END, \
                CASE WHEN i % 3 = 0 THEN NULL ELSE 'agent-' || (i % 20) END, \
                'visitor-' || i, 'Visitor ' || i, $3, \
                now() - make_interval(secs => i), now() - make_interval(secs => i), now() - make_interval(secs => i) \
         FROM generate_series(1, $1) i",
    )
    .bind(args.conversations)
    .bind(INBOXES)
    .bind(args.messages_per_conversation as i32)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO messages (message_id, conversation_id, account_id, channel_id, provider_message_id, sender_external_id, \
             sender_name, body, sent_at, recorded_at, source_event_id, trace_id) \
         SELECT md5('m' || i || '-' || j)::uuid, md5('c' || i)::uuid, 'bench', 'chan-' || (i % $3), 'p' || i || '-' || j, \
                'visitor-' || i, 'Visitor ' || i, 'Hello, I need help with my order number ' || i || ' (message ' || j || ')', \
                now() - make_interval(secs => i) + make_interval(secs => j), now(), 'e', '' \
         FROM generate_series(1, $1) i, generate_series(1, $2) j",
    )
    .bind(args.conversations)
    .bind(args.messages_per_conversation)
    .bind(INBOXES)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO assignments (event_id, conversation_id, assignee_id, outcome, channel_id, rule_version, strategy, \
             eligible_agent_ids, skipped, decided_at) \
         SELECT 'a' || i, md5('c' || i)::uuid, 'agent-' || (i % 20), 'assigned', 'chan-' || (i % $2), 1, 'round_robin', \
                ARRAY['agent-' || (i % 20)], '[{\"agent_id\": \"agent-x\", \"reason\": \"offline\"}]', now() \
         FROM generate_series(1, $1) i",
    )
    .bind(args.conversations)
    .bind(INBOXES)
    .execute(pool)
    .await?;
    // One statement per call: several in one simple query would run as one transaction, which
    // VACUUM refuses.
    for table in ["conversations", "messages", "assignments", "inboxes"] {
        sqlx::raw_sql(&format!("VACUUM ANALYZE {table}")).execute(pool).await?;
    }
    Ok(())
}
