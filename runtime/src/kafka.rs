//! The one place where Kafka clients are configured. Every setting that matters for
//! correctness is set here, with the reason next to it.

use rdkafka::ClientConfig;
use rdkafka::message::{BorrowedHeaders, Header, Headers, OwnedHeaders};

/// Base settings shared by every client.
pub fn client_config(brokers: &str, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers).set("client.id", client_id).set("socket.keepalive.enable", "true");
    config
}

/// An idempotent producer for events entering the system (ingest, admin commands).
///
/// `acks=all` + idempotence: a record is acknowledged only once durable on the in-sync
/// replicas, and the producer's own retries never duplicate or reorder it.
pub fn idempotent_producer_config(brokers: &str, client_id: &str, delivery_timeout_ms: u32) -> ClientConfig {
    let mut config = client_config(brokers, client_id);
    config
        // Java-compatible hashing of keys, so that Kafka's own tools (and any JVM producer)
        // send a given key to the same partition as we do.
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "2")
        .set("batch.num.messages", "10000")
        // How long a send may wait for the broker before it is reported failed. Ingest turns
        // that failure into a 503 so the provider retries; it must stay below its HTTP timeout.
        .set("message.timeout.ms", delivery_timeout_ms.to_string());
    config
}

/// A transactional producer for consume-transform-produce (router). `transactional_id` must
/// be stable per instance so a restarted instance fences its zombie predecessor.
pub fn transactional_producer_config(brokers: &str, client_id: &str, transactional_id: &str) -> ClientConfig {
    // librdkafka requires message.timeout.ms <= transaction.timeout.ms.
    let mut config = idempotent_producer_config(brokers, client_id, 30_000);
    // A crashed instance's open transaction blocks its partitions' readers (LSO) until it times
    // out or a successor with the same transactional id fences it; keep the timeout short.
    config
        .set("transactional.id", transactional_id)
        .set("transaction.timeout.ms", "30000")
        // Acknowledged records are freed by librdkafka's own threads instead of being handed
        // back to the producing thread as delivery reports (tens of thousands per transaction
        // on the router's hot thread). A failed delivery is still reported, and it makes the
        // transaction abortable anyway, so its commit fails.
        .set("delivery.report.only.error", "true");
    config
}

/// A consumer in a group that commits nothing on its own: offsets are committed inside a
/// Kafka transaction (router) or stored with the rows in PostgreSQL (projector).
pub fn group_consumer_config(brokers: &str, client_id: &str, group_id: &str) -> ClientConfig {
    let mut config = client_config(brokers, client_id);
    config
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Never see records of aborted or still-open transactions.
        .set("isolation.level", "read_committed")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("fetch.wait.max.ms", "20")
        .set("queued.max.messages.kbytes", "65536");
    config
}

/// A consumer without group management, for reading whole topics (config, router state).
pub fn reader_config(brokers: &str, client_id: &str) -> ClientConfig {
    let mut config = client_config(brokers, client_id);
    config
        // librdkafka needs a group id even for manual assignment; nothing is ever committed.
        .set("group.id", format!("{client_id}-reader"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "20");
    config
}

/// Context for whole-topic readers: reaching the end of a partition is how they know they
/// caught up, so librdkafka's end-of-partition notices are not logged as errors.
#[derive(Default)]
pub struct ReaderContext;

impl rdkafka::ClientContext for ReaderContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode};
        if !matches!(error, KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
            tracing::warn!(%error, reason, "kafka reader error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ReaderContext {}

/// Kafka record header names.
pub mod header {
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
    /// Which payload case the record carries, readable without decoding (kcat, dead-letter triage).
    pub const EVENT_TYPE: &str = "sb-event-type";
    pub const DEADLETTER_REASON: &str = "sb-deadletter-reason";
    pub const DEADLETTER_SOURCE: &str = "sb-deadletter-source";
}

/// Copies every header of a consumed record, adding `extra` ones (dead-letter forwarding keeps
/// the original headers, trace context included).
pub fn copy_headers(original: Option<&BorrowedHeaders>, extra: &[(&str, &str)]) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    if let Some(original) = original {
        for header in original.iter() {
            headers = headers.insert(Header { key: header.key, value: header.value });
        }
    }
    for (key, value) in extra {
        headers = headers.insert(Header { key, value: Some(*value) });
    }
    headers
}

/// The value of a header as UTF-8, if present.
pub fn header_str<'a>(headers: Option<&'a BorrowedHeaders>, name: &str) -> Option<&'a str> {
    headers?
        .iter()
        .find(|header| header.key == name)
        .and_then(|header| header.value)
        .and_then(|value| std::str::from_utf8(value).ok())
}
