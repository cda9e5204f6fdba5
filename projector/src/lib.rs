//! Projectors: the conversations topic in, PostgreSQL read models out.
//!
//! - Input enters in [`consumer`] (Kafka, `read_committed`, batched).
//! - Rows are decided in [`apply`] (one event → its row changes, idempotent).
//! - Positions are checked and stored in [`positions`], in the same transaction as the rows.

pub mod apply;
pub mod consumer;
pub mod positions;

pub use consumer::{ProjectorSettings, run_projector};

/// Creates or upgrades the read-model schema.
pub async fn migrate(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    use anyhow::Context;
    sqlx::migrate!("./migrations").run(pool).await.context("failed to run read-model migrations")
}
