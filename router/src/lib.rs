//! The router: where inbound messages and commands become conversations, contacts, tickets and
//! assignments.
//!
//! - Input enters in [`shell`] (Kafka consumer of the inbound topic).
//! - Decisions are made in [`decide`] (pure and deterministic) over the state in [`state`]
//!   (`evolve` folds the router's own output) and the compiled config in [`config`].
//! - Output leaves in [`shell`] (transactional producer to the conversations topic, automated
//!   messages built in [`automated`] to the outbound topic, with periodic state snapshots from
//!   [`snapshot`] in the same transactions).
//! - A partition's state is rebuilt in [`recovery`] (latest snapshot, then the committed output).

pub mod automated;
#[doc(hidden)]
pub mod bench_support;
pub mod compact;
pub mod config;
pub mod conversations;
pub mod decide;
pub mod fast_hash;
pub mod ids;
pub mod metrics;
pub mod recovery;
pub mod settings;
pub mod shell;
pub mod snapshot;
pub mod state;
