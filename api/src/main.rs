use std::net::SocketAddr;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sqlx::postgres::PgPoolOptions;
use switchboard_api::config_file::{ConfigFile, apply_config};
use switchboard_runtime::config_store::ConfigStore;
use switchboard_runtime::topics::{Topics, ensure_topics};

/// Switchboard API: gRPC queries over the read models, and the config loader.
#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC API.
    Serve {
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        #[arg(long, env = "API_LISTEN")]
        listen: SocketAddr,
        #[arg(long, env = "KAFKA_BROKERS")]
        kafka_brokers: String,
        #[arg(long, env = "SWITCHBOARD_TOPIC_PREFIX", default_value = switchboard_runtime::topics::DEFAULT_TOPIC_PREFIX)]
        topic_prefix: String,
        /// HS256 secret (at least 32 bytes) that bearer JWTs are signed with.
        #[arg(long, env = "API_JWT_SECRET", hide_env_values = true)]
        jwt_secret: Option<String>,
        /// TOML file of API keys (`[[keys]]` with key or key_sha256, user_id, account, role, teams).
        #[arg(long, env = "API_KEYS_FILE")]
        api_keys_file: Option<std::path::PathBuf>,
        /// C12: mail domain of the fallback address every new inbox gets.
        #[arg(long, env = "FALLBACK_EMAIL_DOMAIN", default_value = switchboard_runtime::outbound::DEFAULT_FALLBACK_DOMAIN)]
        fallback_email_domain: String,
        /// Let SendReply check attachment references on loopback and private addresses (local
        /// stand-ins, a trusted private network). Off: only public addresses are fetched.
        #[arg(long, env = "ATTACHMENT_ALLOW_PRIVATE_HOSTS")]
        attachment_allow_private_hosts: bool,
    },
    /// Print a bearer JWT signed with API_JWT_SECRET, for operators and the demo (production
    /// tokens come from the identity provider that shares the secret).
    MintToken {
        #[arg(long, env = "API_JWT_SECRET", hide_env_values = true)]
        jwt_secret: String,
        /// The user (agent) id the token names.
        #[arg(long)]
        user: String,
        #[arg(long)]
        account: String,
        /// agent, admin or super_admin.
        #[arg(long, default_value = "agent")]
        role: String,
        /// Comma-separated team ids.
        #[arg(long, value_delimiter = ',')]
        teams: Vec<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u64,
    },
    /// Publish a declarative config file (inboxes, channels, rules, agents) as config events.
    ApplyConfig {
        file: std::path::PathBuf,
        #[arg(long, env = "KAFKA_BROKERS")]
        kafka_brokers: String,
        #[arg(long, env = "SWITCHBOARD_TOPIC_PREFIX", default_value = switchboard_runtime::topics::DEFAULT_TOPIC_PREFIX)]
        topic_prefix: String,
        /// C12: mail domain of the fallback address every new inbox gets (as `serve`).
        #[arg(long, env = "FALLBACK_EMAIL_DOMAIN", default_value = switchboard_runtime::outbound::DEFAULT_FALLBACK_DOMAIN)]
        fallback_email_domain: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = switchboard_runtime::telemetry::init_telemetry("switchboard-api")?;
    match Args::parse().command {
        Command::Serve {
            database_url,
            listen,
            kafka_brokers,
            topic_prefix,
            jwt_secret,
            api_keys_file,
            fallback_email_domain,
            attachment_allow_private_hosts,
        } => {
            let api_keys = api_keys_file
                .map(|path| {
                    std::fs::read_to_string(&path).with_context(|| format!("failed to read {}", path.display()))
                })
                .transpose()?;
            let authenticator = switchboard_api::auth::Authenticator::new(
                jwt_secret.as_deref().map(str::as_bytes),
                api_keys.as_deref(),
            )
            .context("invalid authentication settings")?;
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(std::time::Duration::from_secs(5))
                .connect(&database_url)
                .await
                .context("failed to connect to postgres")?;
            let listener =
                tokio::net::TcpListener::bind(listen).await.with_context(|| format!("failed to bind {listen}"))?;
            let topics = Topics::with_prefix(&topic_prefix);
            ensure_topics(&kafka_brokers, &topics).await?;
            let settings = switchboard_api::ApiSettings {
                pool,
                authenticator,
                brokers: kafka_brokers,
                topics,
                fallback_email_domain,
                attachment_hosts: switchboard_runtime::attachment_hosts::AttachmentHosts::from_allow_private(
                    attachment_allow_private_hosts,
                ),
            };
            switchboard_api::serve(listener, settings, switchboard_runtime::shutdown_signal()).await
        }
        Command::MintToken { jwt_secret, user, account, role, teams, ttl_seconds } => {
            let role = switchboard_api::auth::Role::parse(&role)
                .with_context(|| format!("unknown role `{role}` (agent, admin or super_admin)"))?;
            let identity =
                switchboard_api::auth::Identity { user_id: user, account_id: account, role, team_ids: teams };
            let token = switchboard_api::auth::mint_token(
                jwt_secret.as_bytes(),
                &identity,
                std::time::Duration::from_secs(ttl_seconds),
            )?;
            println!("{token}");
            Ok(())
        }
        Command::ApplyConfig { file, kafka_brokers, topic_prefix, fallback_email_domain } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("failed to read {}", file.display()))?;
            let mut config_file =
                ConfigFile::parse(&text).with_context(|| format!("invalid config file {}", file.display()))?;
            config_file.fallback_email_domain_opt = Some(fallback_email_domain.trim().to_ascii_lowercase());
            let topics = Topics::with_prefix(&topic_prefix);
            ensure_topics(&kafka_brokers, &topics).await?;
            let current = ConfigStore::start(&kafka_brokers, &topics.config, "config-loader").await?;
            let published = apply_config(&kafka_brokers, &topics.config, &config_file, &current.snapshot()).await?;
            println!("applied {}: {published} config event(s) published", file.display());
            Ok(())
        }
    }
}
