//! The router: where inbound messages become conversations and assignments.
//!
//! - Input enters in [`shell`] (Kafka consumer of the inbound topic).
//! - Decisions are made in [`core`] (`decide` / `evolve`, pure and deterministic).
//! - Output leaves in [`shell`] (transactional producer to the conversations topic).

pub mod core;
pub mod shell;
