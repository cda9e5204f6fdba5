//! API benchmark (issue 6): seeds 100,000 conversations and 1,000,000 messages into the read
//! models with SQL, serves the API in-process, drives `GetConversation` and 50-row
//! `ListConversations` at a fixed open-loop rate (latency measured from each request's scheduled
//! start, so queueing counts), and meanwhile commits conversation changes the way the projector
//! does and measures how long a watch stream takes to deliver them.
//!
//! `cargo run --release -p switchboard-tests --bin bench-api -- --rate 1000 --seconds 20`
//! (needs KAFKA_BROKERS and DATABASE_URL, as `scripts/stack env` prints).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
}

const INBOXES: i64 = 10;

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
    let token = BearerToken::for_identity(&agent)?;
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        clients.push(ConversationServiceClient::with_interceptor(connect_channel(&url).await?, token.clone()));
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
                let id = ids[(index as usize * 104_729) % ids.len()].clone();
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
        "load: {total} requests at {} req/s scheduled, {:.0} req/s achieved, {} errors, {} s warm-up excluded",
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
        "{name:<36} n={:<6} p50={:>7.2} ms  p99={:>7.2} ms  max={:>7.2} ms",
        sample.len(),
        at(0.50).as_secs_f64() * 1e3,
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
