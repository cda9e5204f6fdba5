//! The pipeline under a crash of PostgreSQL or of the Kafka broker (issue 13.4). Inbound messages
//! arrive at a steady rate while the router and the projector run as processes; the stack's
//! PostgreSQL (its postmaster) or broker is killed with kill -9 and, some seconds later, brought
//! back by `scripts/stack up`, as an operator would. Afterwards every message of the log is in the
//! read models exactly once, and the read models equal a rebuild from the log.
//!
//! These tests crash the stack that every test of this binary uses, so they hold `CRASH_LOCK`
//! throughout (cargo runs test binaries one after another: no other binary sees the crash).
//! `scripts/stack` runs with this process's environment, so it acts on the stack the tests were
//! started against (same `KAFKA_PORT`, `POSTGRES_PORT`, `STACK_STATE_DIR` overrides); the test
//! checks that before it kills anything.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use rdkafka::producer::{FutureProducer, FutureRecord};
use switchboard_projector::replay::{self, Progress, ReplaySettings};
use switchboard_projector::verify;
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_tests::router_fixtures::{account_config, inbound};
use switchboard_tests::{KillOnDrop, TestEnv};

const ACCOUNTS: usize = 12;
const VISITORS_PER_ACCOUNT: usize = 50;
/// Inbound messages per second, for `LOAD_FOR`.
const RATE: usize = 200;
const LOAD_FOR: Duration = Duration::from_secs(40);
const CRASH_AFTER: Duration = Duration::from_secs(12);
/// From the kill to `scripts/stack up`.
const DOWN_FOR: Duration = Duration::from_secs(10);
/// After the load, the pipeline catches up within this; the read models' positions may stand
/// still for at most `STALL` while they are not at the end of the log.
const CAUGHT_UP_WITHIN: Duration = Duration::from_secs(240);
const STALL: Duration = Duration::from_secs(30);

/// Held by each test of this file for its whole run: they crash the shared stack.
static CRASH_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crashed {
    Postgres,
    Kafka,
}

impl Crashed {
    /// The component's name for `scripts/stack pid`.
    fn stack_name(self) -> &'static str {
        match self {
            Crashed::Postgres => "postgres",
            Crashed::Kafka => "kafka",
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b4_postgres_killed_under_load_and_restarted_every_message_is_projected_exactly_once() -> anyhow::Result<()> {
    let _crash_lock = CRASH_LOCK.lock().await;
    crash_under_load(Crashed::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b4_kafka_broker_killed_under_load_and_restarted_every_message_is_projected_exactly_once() -> anyhow::Result<()>
{
    let _crash_lock = CRASH_LOCK.lock().await;
    crash_under_load(Crashed::Kafka).await
}

async fn crash_under_load(crashed: Crashed) -> anyhow::Result<()> {
    ensure_stack_is_the_tests_stack()?;
    let env = TestEnv::new().await?;
    let accounts: Vec<String> = (0..ACCOUNTS).map(|index| format!("crash{index}")).collect();
    let config: Vec<_> = accounts.iter().flat_map(|account| account_config(account, 1_000, true)).collect();
    env.produce_envelopes(&env.topics.config, &config).await?;
    let mut services = Services::start(&env)?;

    let load = tokio::spawn(steady_load(env.brokers.clone(), env.topics.inbound.clone(), accounts));
    services.supervise_for(&env, CRASH_AFTER).await?;
    if crashed == Crashed::Postgres {
        // The worst moment: right after a batch committed, before its WAL is surely on disk.
        wait_for_a_projector_commit(&env).await?;
    }
    let killed_at = Instant::now();
    let mut restore_stack = RestoreStackOnDrop { armed: true };
    kill_9(crashed).await?;
    services.supervise_for(&env, DOWN_FOR.saturating_sub(killed_at.elapsed())).await?;
    let restart_started = Instant::now();
    stack_up().await?;
    restore_stack.armed = false;
    eprintln!(
        "crash test: {} killed, back after {:.1} s ({:.1} s in scripts/stack up)",
        crashed.stack_name(),
        killed_at.elapsed().as_secs_f64(),
        restart_started.elapsed().as_secs_f64()
    );
    while !load.is_finished() {
        services.supervise_for(&env, Duration::from_millis(500)).await?;
    }
    let (acknowledged, unacknowledged) = load.await??;
    ensure!(unacknowledged == 0, "{unacknowledged} inbound messages were never acknowledged by Kafka");

    services.wait_routed(&env).await?;
    let inbound_ids: BTreeSet<String> = env
        .read_committed_events(&env.topics.inbound)?
        .into_iter()
        .filter_map(|envelope| match envelope.payload {
            Some(Payload::InboundMessageReceived(message)) => Some(message.message_id),
            _ => None,
        })
        .collect();
    let missing_inbound: Vec<_> = acknowledged.difference(&inbound_ids).collect();
    ensure!(missing_inbound.is_empty(), "acknowledged but not in the inbound log: {missing_inbound:?}");

    // The router's committed output: every inbound message appended exactly once.
    let decided = env.read_committed_records(&env.topics.conversations)?;
    let mut log_end: BTreeMap<i32, i64> = BTreeMap::new();
    let mut appended: BTreeMap<String, usize> = BTreeMap::new();
    for record in &decided {
        log_end.insert(record.partition, record.offset + 1);
        let envelope = switchboard_runtime::envelope::decode(record.payload.as_deref())?;
        if let Some(Payload::MessageAppended(message)) = envelope.payload {
            *appended.entry(message.message_id).or_default() += 1;
        }
    }
    ensure!(appended.values().all(|count| *count == 1), "a message was appended twice in the router's output");
    ensure!(
        appended.keys().cloned().collect::<BTreeSet<_>>() == inbound_ids,
        "the router's output does not append exactly the inbound messages"
    );

    services.wait_projected(&env, &log_end).await?;
    let metrics = services.projector_metrics().await.unwrap_or_else(|error| format!("(no metrics: {error:#})"));
    eprintln!(
        "crash test ({}): {} messages; restarts: {:?}; projector: {}",
        crashed.stack_name(),
        appended.len(),
        services.restarts,
        metrics
    );
    drop(services);

    // The read models against the log: every message once, counters and change feed moved once.
    let stored_ids: Vec<String> =
        sqlx::query_scalar("SELECT message_id::text FROM messages").fetch_all(&env.pool).await?;
    let stored: BTreeSet<String> = stored_ids.into_iter().collect();
    let missing: Vec<_> = appended.keys().filter(|id| !stored.contains(*id)).take(20).collect();
    ensure!(
        missing.is_empty(),
        "{} of {} messages of the log are missing from the read models, e.g. {missing:?}",
        appended.len() - appended.keys().filter(|id| stored.contains(*id)).count(),
        appended.len()
    );
    ensure!(stored.len() == appended.len(), "the read models hold messages that are not in the log");
    let (message_count, message_changes, duplicate_changes): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT coalesce(sum(message_count), 0)::bigint FROM conversations), \
         (SELECT count(*) FROM conversation_changes WHERE kind = 'message'), \
         (SELECT count(*) - count(DISTINCT (event_id, kind)) FROM conversation_changes)",
    )
    .fetch_one(&env.pool)
    .await?;
    assert_eq!(message_count, appended.len() as i64, "conversations.message_count counts each message once");
    assert_eq!(message_changes, appended.len() as i64, "one change-feed row per message");
    assert_eq!(duplicate_changes, 0, "no change-feed row written twice");

    // And everything else: the live read models equal a rebuild from the log.
    replay::run(
        ReplaySettings {
            brokers: env.brokers.clone(),
            database_url: env.database_url.clone(),
            topics: env.topics.clone(),
            from: None,
            schema: Some("rm_check".into()),
            max_batch_records: 2_000,
            batch_linger: Duration::from_millis(10),
            progress: Progress::Quiet,
        },
        &env.pool,
    )
    .await?;
    let reports = verify::verify(&env.pool, "public", "rm_check").await?;
    let (text, all_match) = verify::render(&reports, "public", "rm_check");
    ensure!(all_match, "the live read models differ from a rebuild of the log:\n{text}");
    env.cleanup().await;
    Ok(())
}

/// The router and the projector as processes, restarted if they exit (as a supervisor would):
/// a service may stop on an error it cannot recover from, e.g. the router's transactional
/// producer when the broker dies under it.
struct Services {
    router: KillOnDrop,
    projector: KillOnDrop,
    projector_metrics_addr: SocketAddr,
    restarts: BTreeMap<&'static str, usize>,
}

impl Services {
    fn start(env: &TestEnv) -> anyhow::Result<Services> {
        let projector_metrics_addr = free_local_address()?;
        Ok(Services {
            router: env.spawn_router_process("router-0")?,
            projector: env.spawn_projector_process(projector_metrics_addr)?,
            projector_metrics_addr,
            restarts: BTreeMap::new(),
        })
    }

    fn restart_exited(&mut self, env: &TestEnv) -> anyhow::Result<()> {
        if let Some(status) = self.router.try_wait()? {
            eprintln!("crash test: router exited ({status}); starting it again");
            self.router = env.spawn_router_process("router-0")?;
            *self.restarts.entry("router").or_default() += 1;
        }
        if let Some(status) = self.projector.try_wait()? {
            eprintln!("crash test: projector exited ({status}); starting it again");
            self.projector = env.spawn_projector_process(self.projector_metrics_addr)?;
            *self.restarts.entry("projector").or_default() += 1;
        }
        Ok(())
    }

    async fn supervise_for(&mut self, env: &TestEnv, duration: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + duration;
        loop {
            self.restart_exited(env)?;
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            tokio::time::sleep(left.min(Duration::from_millis(250))).await;
        }
    }

    /// Until the router's group has committed everything on the inbound topic.
    async fn wait_routed(&mut self, env: &TestEnv) -> anyhow::Result<()> {
        let group = format!("{}router", env.topics.prefix);
        let deadline = Instant::now() + CAUGHT_UP_WITHIN;
        loop {
            // A lag query can time out while the broker recovers: ask again until the deadline.
            match env.group_lag(&group, &env.topics.inbound) {
                Ok(0) => return Ok(()),
                Ok(lag) => ensure!(Instant::now() < deadline, "router did not catch up (lag {lag})"),
                Err(error) if Instant::now() >= deadline => return Err(error.context("router lag unknown")),
                Err(_) => {}
            }
            self.supervise_for(env, Duration::from_millis(500)).await?;
        }
    }

    /// Until the read models' positions reach the end of every conversations partition
    /// (`log_end`: last record + 1); fails if they stand still for `STALL` before that.
    async fn wait_projected(&mut self, env: &TestEnv, log_end: &BTreeMap<i32, i64>) -> anyhow::Result<()> {
        let deadline = Instant::now() + CAUGHT_UP_WITHIN;
        let mut last_change = (Instant::now(), BTreeMap::new());
        loop {
            let rows: Vec<(i32, i64)> = match sqlx::query_as(
                "SELECT partition, next_offset FROM projector_positions \
                 WHERE projection = 'read_models' AND topic = 'conversations.v1'",
            )
            .fetch_all(&env.pool)
            .await
            {
                Ok(rows) => rows,
                Err(_) if Instant::now() < deadline => Vec::new(),
                Err(error) => return Err(error).context("failed to read the projector's positions"),
            };
            let positions: BTreeMap<i32, i64> = rows.into_iter().collect();
            let behind: Vec<_> = log_end
                .iter()
                .filter(|(partition, end)| positions.get(partition).copied().unwrap_or(0) < **end)
                .map(|(partition, end)| (*partition, positions.get(partition).copied(), *end))
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            if positions != last_change.1 {
                last_change = (Instant::now(), positions);
            }
            ensure!(
                last_change.0.elapsed() < STALL && Instant::now() < deadline,
                "the projector stopped short of the end of the log (partition, stored, end): {behind:?}"
            );
            self.supervise_for(env, Duration::from_millis(500)).await?;
        }
    }

    /// The projector's counters about failures and gaps, from its `/metrics`.
    async fn projector_metrics(&self) -> anyhow::Result<String> {
        let text = reqwest::get(format!("http://{}/metrics", self.projector_metrics_addr)).await?.text().await?;
        Ok(text
            .lines()
            .filter(|line| {
                [
                    "switchboard_projector_batch_failures_total ",
                    "switchboard_projector_gaps_total ",
                    "switchboard_projector_lost_commits_total ",
                ]
                .iter()
                .any(|name| line.starts_with(name))
            })
            .collect::<Vec<_>>()
            .join(", "))
    }
}

/// Produces `RATE` inbound messages a second for `LOAD_FOR`, whatever the broker does (they wait
/// in the producer while it is down); returns the ids Kafka acknowledged, and how many it did not.
async fn steady_load(
    brokers: String,
    topic: String,
    accounts: Vec<String>,
) -> anyhow::Result<(BTreeSet<String>, usize)> {
    let producer: FutureProducer =
        switchboard_runtime::kafka::idempotent_producer_config(&brokers, "test-crash-load", 180_000).create()?;
    let per_tick = RATE / 20;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let started = Instant::now();
    let mut deliveries = Vec::new();
    let mut index = 0;
    while started.elapsed() < LOAD_FOR {
        tick.tick().await;
        for _ in 0..per_tick {
            let account = &accounts[index % ACCOUNTS];
            let visitor = (index / ACCOUNTS) % VISITORS_PER_ACCOUNT;
            let (key, envelope) = inbound(account, visitor, index / (ACCOUNTS * VISITORS_PER_ACCOUNT));
            index += 1;
            let Some(Payload::InboundMessageReceived(message)) = &envelope.payload else { bail!("not a message") };
            let payload = switchboard_runtime::envelope::encode(&envelope);
            let delivery = producer
                .send_result(FutureRecord::to(&topic).key(&key).payload(&payload))
                .map_err(|(error, _)| error)
                .context("failed to queue an inbound message")?;
            deliveries.push((message.message_id.clone(), delivery));
        }
    }
    let mut acknowledged = BTreeSet::new();
    let mut unacknowledged = 0;
    for (message_id, delivery) in deliveries {
        match delivery.await {
            Ok(Ok(_)) => {
                acknowledged.insert(message_id);
            }
            Ok(Err(_)) | Err(_) => unacknowledged += 1,
        }
    }
    Ok((acknowledged, unacknowledged))
}

/// Waits until the read models' positions move (a batch just committed).
async fn wait_for_a_projector_commit(env: &TestEnv) -> anyhow::Result<()> {
    let positions_sql = "SELECT coalesce(sum(next_offset), 0)::bigint FROM projector_positions \
                         WHERE projection = 'read_models'";
    let before: i64 = sqlx::query_scalar(positions_sql).fetch_one(&env.pool).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while sqlx::query_scalar::<_, i64>(positions_sql).fetch_one(&env.pool).await? == before {
        ensure!(Instant::now() < deadline, "the projector committed nothing for 10 s under load");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

fn stack_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/stack")
}

/// `scripts/stack <args>` with this process's environment; its stdout.
fn run_stack(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(stack_script())
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .context("failed to run scripts/stack")?;
    ensure!(output.status.success(), "scripts/stack {} failed ({})", args.join(" "), output.status);
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The test kills what `scripts/stack` manages: that must be the stack the tests talk to.
fn ensure_stack_is_the_tests_stack() -> anyhow::Result<()> {
    let stack_env = run_stack(&["env"])?;
    for name in ["KAFKA_BROKERS", "DATABASE_URL"] {
        let ours = std::env::var(name).with_context(|| format!("{name} is not set"))?;
        ensure!(
            stack_env.lines().any(|line| line == format!("export {name}={ours}")),
            "{name}={ours} is not the stack scripts/stack manages with this environment ({stack_env}); \
             run the tests with the same KAFKA_PORT/POSTGRES_PORT/STACK_STATE_DIR as the stack"
        );
    }
    Ok(())
}

/// kill -9 of the broker's JVM or of PostgreSQL's postmaster; returns once the process (and,
/// for PostgreSQL, its children, which leave on their own) is gone: a new postmaster refuses to
/// start while the old one's pid is still in the process table.
async fn kill_9(crashed: Crashed) -> anyhow::Result<()> {
    let pid: u32 = run_stack(&["pid", crashed.stack_name()])
        .with_context(|| format!("no running {} in this stack", crashed.stack_name()))?
        .trim()
        .parse()
        .context("scripts/stack pid printed no pid")?;
    let mut gone_before_restart = children_of(pid);
    gone_before_restart.push(pid);
    let status = Command::new("kill").args(["-9", &pid.to_string()]).status().context("failed to run kill")?;
    ensure!(status.success(), "kill -9 {pid} failed ({status})");
    eprintln!("crash test: kill -9 {} (pid {pid})", crashed.stack_name());
    let deadline = Instant::now() + Duration::from_secs(30);
    // A killed process stays listed until its parent (init, for both) reaps it.
    while gone_before_restart.iter().any(|pid| Path::new(&format!("/proc/{pid}")).exists()) {
        ensure!(Instant::now() < deadline, "{} processes still listed 30 s after kill -9", crashed.stack_name());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Processes whose parent is `parent` (from /proc/<pid>/stat).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // The fields after the command name (which may hold spaces) are: state, ppid, ...
            std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().is_some_and(|stat| {
                stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

async fn stack_up() -> anyhow::Result<()> {
    tokio::task::spawn_blocking(|| {
        let status = Command::new(stack_script())
            .arg("up")
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .status()
            .context("failed to run scripts/stack up")?;
        ensure!(status.success(), "scripts/stack up failed ({status})");
        Ok(())
    })
    .await?
}

/// Runs `scripts/stack up` when dropped armed: a test that fails between its kill and its restart
/// must not leave the stack down for the test binaries that run after it.
struct RestoreStackOnDrop {
    armed: bool,
}

impl Drop for RestoreStackOnDrop {
    fn drop(&mut self) {
        if self.armed {
            eprintln!("crash test: failed before restarting the stack; scripts/stack up");
            let _ = Command::new(stack_script()).arg("up").status();
        }
    }
}

fn free_local_address() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}
