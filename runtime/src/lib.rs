//! The shared runtime of Switchboard's services. Everything that every binary needs exactly
//! once lives here, so that each concern has one place:
//! - [`telemetry`]: the tracing subscriber, OTLP export and W3C trace context in Kafka headers;
//! - [`kafka`]: how Kafka clients are configured (producers, transactional producers, consumers);
//! - [`topics`]: topic names and specs, read from `deploy/topics.txt`;
//! - [`envelope`]: building, encoding and decoding the event envelope;
//! - [`publisher`]: publishing an envelope with every header and waiting for the acknowledgement
//!   (ingest, API commands, `apply-config`);
//! - [`ids`]: deterministic identifiers;
//! - [`config_store`]: the in-memory view of the compacted config topic;
//! - `read_models` (feature `read-models`): which read-model schema is active;
//! - `metrics` and `metrics_http` (feature `metrics-http`): the prometheus-client registry every
//!   service's metrics live in, and the `/metrics` endpoint of router and projector;
//! - [`reply_window`]: C6/C8, how long a business may answer on Messenger and WhatsApp;
//! - [`secrets`] and [`signature`]: the secrets file, and the HMAC request signatures (ingest
//!   verifies, delivery signs);
//! - [`tcp`]: the options every listener sets on an accepted connection (`TCP_NODELAY`).

#[cfg(feature = "attachment-fetch")]
pub mod attachment_hosts;
pub mod config_store;
pub mod envelope;
pub mod ids;
pub mod kafka;
#[cfg(feature = "metrics-http")]
pub mod metrics;
#[cfg(feature = "metrics-http")]
pub mod metrics_http;
pub mod outbound;
pub mod publisher;
#[cfg(feature = "read-models")]
pub mod read_models;
pub mod reply_window;
pub mod secrets;
pub mod signature;
pub mod tcp;
pub mod telemetry;
pub mod topics;

/// Resolves on SIGINT or SIGTERM: every binary's graceful-shutdown trigger.
pub async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("failed to install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
