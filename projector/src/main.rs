use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use switchboard_projector::metrics::Metrics;
use switchboard_projector::replay::{self, Progress, ReplaySettings};
use switchboard_projector::schema::{active_schema, migrate_schema};
use switchboard_projector::{ProjectorSettings, migrate, run_projector_with, verify};
use switchboard_runtime::topics::{Topics, ensure_topics};

/// Switchboard projector: builds the PostgreSQL read models from the event log.
#[derive(Parser)]
struct Args {
    #[arg(long, env = "KAFKA_BROKERS", global = true)]
    kafka_brokers: Option<String>,
    #[arg(long, env = "DATABASE_URL", global = true)]
    database_url: Option<String>,
    #[arg(long, env = "SWITCHBOARD_TOPIC_PREFIX", default_value = switchboard_runtime::topics::DEFAULT_TOPIC_PREFIX, global = true)]
    topic_prefix: String,
    /// Records per batch (one PostgreSQL transaction).
    #[arg(long, env = "PROJECTOR_BATCH_RECORDS", default_value_t = 10_000, global = true)]
    batch_records: usize,
    /// How long a batch waits for more records once it has one.
    #[arg(long, env = "PROJECTOR_BATCH_LINGER_MS", default_value_t = 20, global = true)]
    batch_linger_ms: u64,
    /// Consumer group of the live projector (default `<prefix>projector`).
    #[arg(long, env = "PROJECTOR_GROUP_ID", global = true)]
    group_id: Option<String>,
    /// Live projector: commit each batch with the server's `synchronous_commit` (true) or with
    /// it off (false: a crash can lose acknowledged batches; they are projected again, but
    /// readers may have seen them in between). docs/read-models.md, "How exactly-once holds".
    #[arg(long, env = "PROJECTOR_SYNCHRONOUS_COMMIT", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    synchronous_commit: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Where `/metrics` listens unless told otherwise.
const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9464";

#[derive(Subcommand)]
enum Command {
    /// Project the log into the active read-model schema (the default).
    Run {
        /// Prometheus metrics (`/metrics`), including lag per partition.
        #[arg(long, env = "PROJECTOR_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
        metrics_addr: SocketAddr,
    },
    /// Rebuild the read models from the log into a fresh schema and manage schemas (B4).
    Replay {
        #[command(subcommand)]
        command: ReplayCommand,
    },
}

#[derive(Subcommand)]
enum ReplayCommand {
    /// Build a fresh schema `rm_<yyyymmddhhmmss>` from the log, until caught up.
    Run {
        /// Rebuild conversations from this time on (RFC 3339); config is always read whole.
        #[arg(long)]
        from: Option<DateTime<Utc>>,
        /// Schema name instead of `rm_<timestamp>`.
        #[arg(long)]
        schema: Option<String>,
    },
    /// Make a schema (default: the newest rm_ schema) the active one, atomically.
    Switch { schema: Option<String> },
    /// Switch back to the previous schema.
    Rollback,
    /// Drop a schema (default: the previous one); never the active one.
    Drop { schema: Option<String> },
    /// Compare two schemas table by table; exits 1 when they differ.
    Verify { schema_a: String, schema_b: String },
    /// Show the active, previous and available schemas.
    Status,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = switchboard_runtime::telemetry::init_telemetry("switchboard-projector")?;
    let args = Args::parse();
    let database_url = args.database_url.clone().context("DATABASE_URL (or --database-url) is required")?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&database_url)
        .await
        .context("failed to connect to postgres")?;
    // `public` always: the control table lives there.
    migrate(&pool).await?;
    let topics = Topics::with_prefix(&args.topic_prefix);
    let brokers = || args.kafka_brokers.clone().context("KAFKA_BROKERS (or --kafka-brokers) is required");
    match args.command {
        None => {
            // No subcommand is `run` with its defaults, the environment included.
            let metrics_addr = std::env::var("PROJECTOR_METRICS_ADDR").unwrap_or_else(|_| DEFAULT_METRICS_ADDR.into());
            let metrics_addr = metrics_addr
                .parse()
                .with_context(|| format!("PROJECTOR_METRICS_ADDR is not a socket address: {metrics_addr}"))?;
            run(&args, brokers()?, &database_url, pool, topics, metrics_addr).await
        }
        Some(Command::Run { metrics_addr }) => run(&args, brokers()?, &database_url, pool, topics, metrics_addr).await,
        Some(Command::Replay { command }) => match command {
            ReplayCommand::Run { from, schema } => {
                let brokers = brokers()?;
                ensure_topics(&brokers, &topics).await?;
                let settings = ReplaySettings {
                    brokers,
                    database_url,
                    topics,
                    from,
                    schema,
                    max_batch_records: args.batch_records,
                    batch_linger: Duration::from_millis(args.batch_linger_ms),
                    progress: Progress::detect(),
                };
                let summary = replay::run(settings, &pool).await?;
                println!(
                    "built {} from the log: {} events in {:.1} s ({:.0} events/s)\n\
                     check it:  projector replay verify {} {}\n\
                     switch:    projector replay switch {}",
                    summary.schema,
                    summary.events,
                    summary.elapsed.as_secs_f64(),
                    summary.events as f64 / summary.elapsed.as_secs_f64().max(0.001),
                    active_schema(&pool).await?,
                    summary.schema,
                    summary.schema
                );
                Ok(())
            }
            ReplayCommand::Switch { schema } => {
                let (from, to) = replay::switch(&pool, schema.as_deref()).await?;
                println!("switched read models from {from} to {to} (rollback: projector replay rollback)");
                Ok(())
            }
            ReplayCommand::Rollback => {
                let (from, to) = replay::rollback(&pool).await?;
                println!("rolled read models back from {from} to {to}");
                Ok(())
            }
            ReplayCommand::Drop { schema } => {
                let dropped = replay::drop_schema(&pool, schema.as_deref()).await?;
                println!("dropped schema {dropped}");
                Ok(())
            }
            ReplayCommand::Verify { schema_a, schema_b } => {
                let reports = verify::verify(&pool, &schema_a, &schema_b).await?;
                let (text, all_match) = verify::render(&reports, &schema_a, &schema_b);
                print!("{text}");
                if !all_match {
                    std::process::exit(1);
                }
                Ok(())
            }
            ReplayCommand::Status => {
                print!("{}", replay::status(&pool).await?);
                Ok(())
            }
        },
    }
}

async fn run(
    args: &Args,
    brokers: String,
    database_url: &str,
    pool: PgPool,
    topics: Topics,
    metrics_addr: SocketAddr,
) -> anyhow::Result<()> {
    ensure_topics(&brokers, &topics).await?;
    // New migrations reach the schema readers use, whichever it is.
    let active = active_schema(&pool).await?;
    if active != "public" {
        migrate_schema(database_url, &active).await?;
    }
    let metrics = Arc::new(Metrics::default());
    let served = metrics.clone();
    switchboard_runtime::metrics_http::spawn_metrics_server(metrics_addr, move || served.render_prometheus());
    let settings = ProjectorSettings {
        brokers,
        group_id: args.group_id.clone().unwrap_or_else(|| format!("{}projector", topics.prefix)),
        topic: topics.conversations,
        max_batch_records: args.batch_records,
        batch_linger: Duration::from_millis(args.batch_linger_ms),
        synchronous_commit: args.synchronous_commit,
    };
    let (shutdown_sender, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        switchboard_runtime::shutdown_signal().await;
        let _ = shutdown_sender.send(true);
    });
    run_projector_with(settings, pool, shutdown, metrics).await
}
