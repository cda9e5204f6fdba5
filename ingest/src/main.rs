use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use switchboard_ingest::{IngestSettings, serve};
use switchboard_runtime::config_store::ConfigStore;
use switchboard_runtime::topics::{Topics, ensure_topics};

/// Switchboard ingest: channel adapters that publish inbound messages to Kafka.
#[derive(Parser)]
struct Args {
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: String,
    #[arg(long, env = "SWITCHBOARD_TOPIC_PREFIX", default_value = switchboard_runtime::topics::DEFAULT_TOPIC_PREFIX)]
    topic_prefix: String,
    #[arg(long, env = "INGEST_LISTEN")]
    listen: SocketAddr,
    #[arg(long, env = "INGEST_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    max_body_bytes: usize,
    #[arg(long, env = "INGEST_DELIVERY_TIMEOUT_MS", default_value_t = 10_000)]
    delivery_timeout_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = switchboard_runtime::telemetry::init_telemetry("switchboard-ingest")?;
    let args = Args::parse();
    let topics = Topics::with_prefix(&args.topic_prefix);
    ensure_topics(&args.kafka_brokers, &topics).await?;
    let config = ConfigStore::start(&args.kafka_brokers, &topics.config, "ingest").await?;
    let settings = IngestSettings {
        listen: args.listen,
        brokers: args.kafka_brokers,
        inbound_topic: topics.inbound,
        max_body_bytes: args.max_body_bytes,
        delivery_timeout: Duration::from_millis(args.delivery_timeout_ms),
    };
    let (bound, _) = tokio::sync::oneshot::channel();
    serve(settings, config, bound, switchboard_runtime::shutdown_signal()).await
}
