//! What a router instance is told: brokers, topics, identity, batching and snapshot cadence.

use std::time::Duration;

use switchboard_runtime::topics::Topics;

/// Timeout of every blocking Kafka call of the router (transactions, offsets, watermarks, reads).
pub(crate) const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct RouterSettings {
    pub brokers: String,
    pub topics: Topics,
    pub group_id: String,
    /// Stable per instance: it is the transactional id's suffix, so a restarted instance
    /// fences its predecessor's unfinished transaction at once.
    pub instance_id: String,
    pub max_batch_records: usize,
    pub batch_linger: Duration,
    /// A partition's state is snapshotted (in the batch's transaction) once this many inputs
    /// were routed since its last snapshot...
    pub snapshot_every_records: u64,
    /// ...or this much time passed with at least one input routed.
    pub snapshot_every: Duration,
    /// Raw librdkafka settings applied over the router's producer config
    /// (`kafka::transactional_producer_config`), e.g. for benchmarks of client tuning.
    pub producer_overrides: Vec<(String, String)>,
    /// Raw librdkafka settings applied over the inbound consumer's config.
    pub consumer_overrides: Vec<(String, String)>,
}

impl RouterSettings {
    pub fn new(brokers: &str, topics: Topics, instance_id: &str) -> Self {
        RouterSettings {
            brokers: brokers.to_owned(),
            group_id: format!("{}router", topics.prefix),
            topics,
            instance_id: instance_id.to_owned(),
            // Only reached with a backlog (a batch ends when the consumer has nothing more within
            // `batch_linger`); large batches amortise the transaction commit.
            max_batch_records: 20_000,
            batch_linger: Duration::from_millis(5),
            snapshot_every_records: 200_000,
            snapshot_every: Duration::from_secs(300),
            producer_overrides: Vec::new(),
            consumer_overrides: Vec::new(),
        }
    }

    /// The compacted topic holding router state snapshots (`deploy/topics.txt`), one partition
    /// per input partition.
    pub fn snapshot_topic(&self) -> String {
        format!("{}{}", self.topics.prefix, SNAPSHOT_TOPIC)
    }
}

/// Base name of the snapshot topic (declared in `deploy/topics.txt`).
pub const SNAPSHOT_TOPIC: &str = "router-snapshots.v1";
