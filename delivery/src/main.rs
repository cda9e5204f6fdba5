//! `delivery`: the delivery service binary (O1-O6, docs/delivery.md).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use switchboard_runtime::attachment_hosts::AttachmentHosts;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use mimalloc::MiMalloc;
use sqlx::postgres::PgPoolOptions;
use switchboard_delivery::email::{SmtpSettings, SmtpTls};
use switchboard_delivery::metrics::Metrics;
use switchboard_delivery::retry::RetryPolicy;
use switchboard_delivery::{DeliverySettings, run_delivery};
use switchboard_runtime::secrets::Secrets;
use switchboard_runtime::topics::{Topics, ensure_topics};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

#[derive(Clone, Copy, ValueEnum)]
enum TlsMode {
    None,
    Starttls,
    Tls,
}

/// Switchboard delivery: sends accepted replies and automated messages (SMTP, Graph API,
/// custom apps, chat) and records every attempt on delivery.v1.
#[derive(Parser)]
struct Args {
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: String,
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    #[arg(long, env = "SWITCHBOARD_TOPIC_PREFIX", default_value = switchboard_runtime::topics::DEFAULT_TOPIC_PREFIX)]
    topic_prefix: String,
    /// Consumer group (default `<prefix>delivery`).
    #[arg(long, env = "DELIVERY_GROUP_ID")]
    group_id: Option<String>,
    /// SMTP relay host; without it, email sends fail with "no SMTP relay is configured".
    #[arg(long, env = "DELIVERY_SMTP_HOST")]
    smtp_host: Option<String>,
    #[arg(long, env = "DELIVERY_SMTP_PORT", default_value_t = 587)]
    smtp_port: u16,
    #[arg(long, env = "DELIVERY_SMTP_TLS", value_enum, default_value = "starttls")]
    smtp_tls: TlsMode,
    /// Meta's Graph API (a stand-in's URL in tests).
    #[arg(long, env = "DELIVERY_GRAPH_API_BASE_URL", default_value = "https://graph.facebook.com/v21.0")]
    graph_api_base_url: String,
    /// Access tokens, custom-channel signing keys and SMTP credentials (TOML, see
    /// runtime/src/secrets.rs).
    #[arg(long, env = "DELIVERY_SECRETS_FILE")]
    secrets_file: Option<PathBuf>,
    #[arg(long, env = "DELIVERY_METRICS_ADDR", default_value = "0.0.0.0:9467")]
    metrics_addr: SocketAddr,
    /// Sends in flight at once.
    #[arg(long, env = "DELIVERY_CONCURRENCY", default_value_t = 256)]
    concurrency: usize,
    /// Connections to the SMTP relay (sends beyond them wait for one).
    #[arg(long, env = "DELIVERY_SMTP_CONNECTIONS", default_value_t = switchboard_delivery::service::DEFAULT_SMTP_CONNECTIONS)]
    smtp_connections: u32,
    /// Timeout of one HTTP or SMTP send.
    #[arg(long, env = "DELIVERY_SEND_TIMEOUT_MS", default_value_t = 10_000)]
    send_timeout_ms: u64,
    /// Attempts before a message is failed (retry policy, docs/delivery.md).
    #[arg(long, env = "DELIVERY_MAX_ATTEMPTS", default_value_t = 10)]
    max_attempts: u32,
    /// Backoff ceiling of the first retry, doubling per attempt.
    #[arg(long, env = "DELIVERY_RETRY_BASE_MS", default_value_t = 1_000)]
    retry_base_ms: u64,
    /// Let email sends fetch attachment references on loopback and private addresses (local
    /// stand-ins, a trusted private network). Off: only public addresses are fetched.
    #[arg(long, env = "ATTACHMENT_ALLOW_PRIVATE_HOSTS")]
    attachment_allow_private_hosts: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = switchboard_runtime::telemetry::init_telemetry("switchboard-delivery")?;
    let args = Args::parse();
    let secrets = match &args.secrets_file {
        Some(path) => Secrets::load(path)?,
        None => Secrets::default(),
    };
    let timeout = Duration::from_millis(args.send_timeout_ms);
    let smtp = args.smtp_host.clone().map(|host| SmtpSettings {
        host,
        port: args.smtp_port,
        tls: match args.smtp_tls {
            TlsMode::None => SmtpTls::None,
            TlsMode::Starttls => SmtpTls::StartTls,
            TlsMode::Tls => SmtpTls::Tls,
        },
        username: secrets.smtp.as_ref().map(|smtp| smtp.username.expose_str().to_owned()),
        password: secrets.smtp.as_ref().map(|smtp| smtp.password.expose_str().to_owned()),
        timeout,
        attachment_hosts: AttachmentHosts::from_allow_private(args.attachment_allow_private_hosts),
    });
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect(&args.database_url)
        .await
        .context("failed to connect to postgres")?;
    let topics = Topics::with_prefix(&args.topic_prefix);
    ensure_topics(&args.kafka_brokers, &topics).await?;
    let metrics = Arc::new(Metrics::default());
    let served = metrics.clone();
    switchboard_runtime::metrics_http::spawn_metrics_server(args.metrics_addr, move || served.render_prometheus());
    let settings = DeliverySettings {
        brokers: args.kafka_brokers.clone(),
        group_id: args.group_id.clone().unwrap_or_else(|| format!("{}delivery", topics.prefix)),
        outbound_topic: topics.outbound.clone(),
        delivery_topic: topics.delivery.clone(),
        graph_base_url: args.graph_api_base_url.clone(),
        secrets,
        smtp,
        smtp_connections: args.smtp_connections,
        concurrency: args.concurrency,
        http_timeout: timeout,
        retry: RetryPolicy {
            base_delay: Duration::from_millis(args.retry_base_ms),
            max_attempts: args.max_attempts,
            ..RetryPolicy::default()
        },
        poll_interval: Duration::from_millis(200),
    };
    let (shutdown_sender, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        switchboard_runtime::shutdown_signal().await;
        let _ = shutdown_sender.send(true);
    });
    run_delivery(settings, pool, shutdown, metrics).await
}
