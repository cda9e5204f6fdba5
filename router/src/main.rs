use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::Parser;
use switchboard_router::metrics::RouterMetrics;
use switchboard_router::shell::{RouterSettings, run_router};
use switchboard_runtime::config_store::ConfigStore;
use switchboard_runtime::topics::{Topics, ensure_topics};

/// mimalloc: the router allocates per event (decoded inputs, protobuf outputs), see Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Switchboard router: threads and assigns inbound messages, exactly once.
#[derive(Parser)]
struct Args {
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: String,
    #[arg(long, env = "SWITCHBOARD_TOPIC_PREFIX", default_value = switchboard_runtime::topics::DEFAULT_TOPIC_PREFIX)]
    topic_prefix: String,
    /// Stable identity of this instance (its transactional id derives from it).
    #[arg(long, env = "SWITCHBOARD_INSTANCE_ID", default_value = "router-0")]
    instance_id: String,
    /// Snapshot a partition's routing state after this many routed inputs (restart cost bound).
    #[arg(long, env = "SWITCHBOARD_ROUTER_SNAPSHOT_EVERY_RECORDS", default_value_t = 200_000)]
    snapshot_every_records: u64,
    /// ...or after this many seconds with at least one routed input.
    #[arg(long, env = "SWITCHBOARD_ROUTER_SNAPSHOT_EVERY_SECONDS", default_value_t = 300)]
    snapshot_every_seconds: u64,
    /// How long a batch keeps polling after its first record (latency vs. transactions per
    /// record). Tests raise it so that batches span the moment a rebalance starts.
    #[arg(long, env = "SWITCHBOARD_ROUTER_BATCH_LINGER_MS", default_value_t = 5)]
    batch_linger_ms: u64,
    /// Prometheus metrics (`/metrics`): throughput, transactions, dead letters, recoveries, lag.
    #[arg(long, env = "SWITCHBOARD_ROUTER_METRICS_ADDR", default_value = "0.0.0.0:9465")]
    metrics_addr: std::net::SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = switchboard_runtime::telemetry::init_telemetry("switchboard-router")?;
    let args = Args::parse();
    let topics = Topics::with_prefix(&args.topic_prefix);
    ensure_topics(&args.kafka_brokers, &topics).await?;
    let config =
        ConfigStore::start(&args.kafka_brokers, &topics.config, &format!("router-{}", args.instance_id)).await?;
    let mut settings = RouterSettings::new(&args.kafka_brokers, topics, &args.instance_id);
    settings.snapshot_every_records = args.snapshot_every_records.max(1);
    settings.snapshot_every = std::time::Duration::from_secs(args.snapshot_every_seconds.max(1));
    settings.batch_linger = std::time::Duration::from_millis(args.batch_linger_ms);

    let metrics = Arc::new(RouterMetrics::default());
    let served = metrics.clone();
    switchboard_runtime::metrics_http::spawn_metrics_server(args.metrics_addr, move || served.render_prometheus());

    let shutdown = Arc::new(AtomicBool::new(false));
    let mut router = tokio::task::spawn_blocking({
        let shutdown = shutdown.clone();
        move || run_router(&settings, &config, &shutdown, &metrics)
    });
    tokio::select! {
        result = &mut router => return result.context("router thread panicked")?,
        _ = switchboard_runtime::shutdown_signal() => {}
    }
    tracing::info!("shutting down after the current batch");
    shutdown.store(true, Ordering::Relaxed);
    router.await.context("router thread panicked")?
}
