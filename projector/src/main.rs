use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sqlx::postgres::PgPoolOptions;
use switchboard_projector::{ProjectorSettings, migrate, run_projector};
use switchboard_runtime::topics::{Topics, ensure_topics};

/// Switchboard projector: builds the PostgreSQL read models from the event log.
#[derive(Parser)]
struct Args {
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: String,
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    #[arg(long, env = "SWITCHBOARD_TOPIC_PREFIX", default_value = switchboard_runtime::topics::DEFAULT_TOPIC_PREFIX)]
    topic_prefix: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = switchboard_runtime::telemetry::init_telemetry("switchboard-projector")?;
    let args = Args::parse();
    let topics = Topics::with_prefix(&args.topic_prefix);
    ensure_topics(&args.kafka_brokers, &topics).await?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&args.database_url)
        .await
        .context("failed to connect to postgres")?;
    migrate(&pool).await?;
    let settings = ProjectorSettings {
        brokers: args.kafka_brokers,
        group_id: format!("{}projector", topics.prefix),
        topic: topics.conversations,
        max_batch_records: 1_000,
        batch_linger: Duration::from_millis(20),
    };
    let (shutdown_sender, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        switchboard_runtime::shutdown_signal().await;
        let _ = shutdown_sender.send(true);
    });
    run_projector(settings, pool, shutdown).await
}
