use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use switchboard_ingest::chat_stream::ChatStreamSettings;
use switchboard_ingest::secrets::Secrets;
use switchboard_ingest::workload::WorkloadSettings;
use switchboard_ingest::{IngestSettings, serve_all};
use switchboard_runtime::config_store::ConfigStore;
use switchboard_runtime::topics::{Topics, ensure_topics};

/// mimalloc: ingest allocates per request (bodies, parsed JSON, protobuf events), see Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Switchboard ingest: channel adapters that publish inbound messages to Kafka.
#[derive(Parser)]
struct Args {
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: String,
    #[arg(long, env = "SWITCHBOARD_TOPIC_PREFIX", default_value = switchboard_runtime::topics::DEFAULT_TOPIC_PREFIX)]
    topic_prefix: String,
    #[arg(long, env = "INGEST_LISTEN")]
    listen: SocketAddr,
    /// Where the SMTP listener for team email binds; unset: no SMTP.
    #[arg(long, env = "INGEST_SMTP_LISTEN")]
    smtp_listen: Option<SocketAddr>,
    #[arg(long, env = "INGEST_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    max_body_bytes: usize,
    #[arg(long, env = "INGEST_SMTP_MAX_MESSAGE_BYTES", default_value_t = 25 * 1024 * 1024)]
    smtp_max_message_bytes: usize,
    #[arg(long, env = "INGEST_DELIVERY_TIMEOUT_MS", default_value_t = 10_000)]
    delivery_timeout_ms: u64,
    /// TOML file with channel secrets (docs/channels.md); unset: signed channels refuse requests.
    #[arg(long, env = "INGEST_SECRETS_FILE")]
    secrets_file: Option<PathBuf>,
    /// How many recently published message ids to remember to skip provider retries.
    #[arg(long, env = "INGEST_RECENT_CAPACITY", default_value_t = 100_000)]
    recently_published_capacity: usize,
    /// PostgreSQL with the read models: the chat widget reads agents' open-conversation counts
    /// from it to say when the team is at capacity (C5), and its reply stream reads
    /// `delivery.chat_messages`. Unset: the widget answers from channel settings alone and the
    /// reply stream answers 503.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// How often the open-conversation counts are re-read (in the background, never per request).
    #[arg(long, env = "INGEST_WORKLOAD_REFRESH_MS", default_value_t = 1_000)]
    workload_refresh_ms: u64,
    /// Counts older than this are not used: the widget answers without capacity ("unknown").
    #[arg(long, env = "INGEST_WORKLOAD_STALE_MS", default_value_t = 5_000)]
    workload_stale_ms: u64,
    /// How often an idle chat reply stream sends a keep-alive comment.
    #[arg(long, env = "INGEST_CHAT_KEEP_ALIVE_MS", default_value_t = 15_000)]
    chat_keep_alive_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = switchboard_runtime::telemetry::init_telemetry("switchboard-ingest")?;
    let args = Args::parse();
    let secrets = match &args.secrets_file {
        Some(path) => Secrets::load(path).context("failed to load channel secrets")?,
        None => {
            tracing::warn!("INGEST_SECRETS_FILE not set: Messenger, WhatsApp and custom channels will refuse requests");
            Secrets::default()
        }
    };
    if args.workload_stale_ms <= args.workload_refresh_ms {
        anyhow::bail!(
            "INGEST_WORKLOAD_STALE_MS ({}) must be longer than INGEST_WORKLOAD_REFRESH_MS ({}), or counts would \
             always be stale",
            args.workload_stale_ms,
            args.workload_refresh_ms
        );
    }
    if args.database_url.is_none() {
        tracing::warn!(
            "DATABASE_URL not set: the chat widget cannot tell when the team is at capacity, and its reply stream \
             answers 503"
        );
    }
    let chat_stream_opt = args.database_url.clone().map(|database_url| ChatStreamSettings {
        database_url,
        keep_alive: Duration::from_millis(args.chat_keep_alive_ms.max(1)),
    });
    let workload_opt = args.database_url.map(|database_url| WorkloadSettings {
        database_url,
        refresh_interval: Duration::from_millis(args.workload_refresh_ms.max(1)),
        stale_after: Duration::from_millis(args.workload_stale_ms),
    });
    let topics = Topics::with_prefix(&args.topic_prefix);
    ensure_topics(&args.kafka_brokers, &topics).await?;
    let config = ConfigStore::start(&args.kafka_brokers, &topics.config, "ingest").await?;
    let settings = IngestSettings {
        smtp_listen: args.smtp_listen,
        max_body_bytes: args.max_body_bytes,
        smtp_max_message_bytes: args.smtp_max_message_bytes,
        delivery_timeout: Duration::from_millis(args.delivery_timeout_ms),
        secrets,
        recently_published_capacity: args.recently_published_capacity,
        workload_opt,
        chat_stream_opt,
        ..IngestSettings::new(args.listen, &args.kafka_brokers, &topics.inbound)
    };
    let (bound, _) = tokio::sync::oneshot::channel();
    serve_all(settings, config, bound, switchboard_runtime::shutdown_signal()).await
}
