//! Projectors: the conversations and config topics in, PostgreSQL read models out.
//!
//! - Input enters in [`consumer`] (Kafka, `read_committed`, batched, epochs per partition).
//! - Records become [`facts`] (ids parsed, enums named) or poison (dead-letter topic).
//! - A batch is folded into the rows it writes by [`fold`] (pure), and written in bulk by
//!   [`apply`] and [`config`], idempotently.
//! - Positions are checked in [`positions`] and stored in the same transaction as the rows.
//! - [`schema`] knows the active read-model schema; [`replay`] rebuilds one from the log and
//!   [`verify`] compares two.

pub mod apply;
pub mod config;
pub mod consumer;
pub mod facts;
pub mod fold;
pub mod metrics;
pub mod outbound;
pub mod positions;
pub mod replay;
pub mod schema;
pub mod verify;

pub use consumer::{ProjectorSettings, run_projector, run_projector_with};

/// Creates or upgrades the read-model schema in `public` (the control table lives there).
pub async fn migrate(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    use anyhow::Context;
    sqlx::migrate!("./migrations").run(pool).await.context("failed to run read-model migrations")
}
