//! Read-model schemas: which one is active (`public.read_model_control`), creating a fresh
//! one with the same migrations, and following switches (docs/contracts.md).

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgListener};
use sqlx::{ConnectOptions, PgPool};
use tokio::sync::watch;
use tracing::{info, warn};

/// The NOTIFY channel a switch or rollback announces itself on.
pub const SWITCH_CHANNEL: &str = "read_model_switch";

// The active-schema contract is shared with every reader (API, ingest).
pub use switchboard_runtime::read_models::{SchemaError, active_schema, validate_schema_name};

/// Runs the read-model migrations with `search_path` set to `schema` (created if missing).
pub async fn migrate_schema(database_url: &str, schema: &str) -> anyhow::Result<()> {
    validate_schema_name(schema)?;
    let options: PgConnectOptions = database_url.parse().context("bad DATABASE_URL")?;
    let mut connection = options
        .options([("search_path", schema)])
        .connect()
        .await
        .context("failed to connect to postgres for migrations")?;
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .execute(&mut connection)
        .await
        .with_context(|| format!("failed to create schema {schema}"))?;
    sqlx::migrate!("./migrations")
        .run(&mut connection)
        .await
        .with_context(|| format!("failed to run read-model migrations in schema {schema}"))?;
    Ok(())
}

/// Follows the active schema: refreshed on every `read_model_switch` notification and at least
/// once a second (a missed notification only delays a switch by that much).
/// Stops when `shutdown` turns true or the pool is closed.
pub fn follow_active_schema(pool: PgPool, initial: String, shutdown: watch::Receiver<bool>) -> watch::Receiver<String> {
    let (sender, receiver) = watch::channel(initial);
    tokio::spawn(async move {
        let mut listener = None;
        loop {
            if *shutdown.borrow() || pool.is_closed() {
                return;
            }
            if listener.is_none() {
                match PgListener::connect_with(&pool).await {
                    Ok(mut connected) => match connected.listen(SWITCH_CHANNEL).await {
                        Ok(()) => listener = Some(connected),
                        Err(error) => warn!(%error, "failed to listen for read-model switches"),
                    },
                    Err(error) => warn!(%error, "failed to connect a listener for read-model switches"),
                }
            }
            match listener.as_mut() {
                Some(connected) => {
                    if let Ok(Err(error)) = tokio::time::timeout(Duration::from_secs(1), connected.recv()).await {
                        warn!(%error, "read-model switch listener failed; reconnecting");
                        listener = None;
                    }
                }
                None => tokio::time::sleep(Duration::from_secs(1)).await,
            }
            match active_schema(&pool).await {
                Ok(schema) => {
                    sender.send_if_modified(|current| {
                        if *current != schema {
                            info!(from = %current, to = %schema, "read models switched schema");
                            *current = schema;
                            true
                        } else {
                            false
                        }
                    });
                }
                Err(error) => warn!(%error, "failed to read the active read-model schema"),
            }
            if sender.is_closed() {
                return;
            }
        }
    });
    receiver
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_and_rm_names_are_accepted() {
        assert!(validate_schema_name("public").is_ok());
        assert!(validate_schema_name("rm_20260101120000").is_ok());
        assert!(validate_schema_name("rm_x; DROP TABLE y").is_err());
        assert!(validate_schema_name("pg_catalog").is_err());
        assert!(validate_schema_name("RM_1").is_err());
    }
}
