//! The delivery service (O1-O6): consumes `outbound.v1`, sends each message over its channel's
//! wire, and records every attempt on `delivery.v1`. See docs/outbound.md.

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// The PostgreSQL schema of the delivery service's own tables.
pub const DELIVERY_SCHEMA: &str = "delivery";

/// Runs the delivery migrations (`delivery/migrations`), recorded in `delivery._sqlx_migrations`
/// (same arrangement as the API's, see `switchboard_api::migrate`).
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    let options = (*pool.connect_options()).clone().options([("search_path", DELIVERY_SCHEMA)]);
    let migration_pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .context("failed to connect to postgres for the delivery migrations")?;
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {DELIVERY_SCHEMA}"))
        .execute(&migration_pool)
        .await
        .context("failed to create the delivery schema")?;
    let migrated =
        sqlx::migrate!("./migrations").run(&migration_pool).await.context("failed to run the delivery migrations");
    migration_pool.close().await;
    migrated
}

pub mod email;
pub mod http;
pub mod metrics;
pub mod outcome;
pub mod retry;
pub mod service;

pub use service::{DeliverySettings, run_delivery};
