//! Publishes inbound events to Kafka and reports success only once the broker acknowledged
//! them (`acks=all`, idempotent producer): an HTTP 202 means the message is durable.

use std::time::Duration;

use anyhow::Context;
use rdkafka::message::Header;
use rdkafka::producer::{FutureProducer, FutureRecord};
use switchboard_proto::events::v1::Envelope;
use switchboard_runtime::envelope;
use switchboard_runtime::kafka::{self, header};
use switchboard_runtime::telemetry::trace_context_headers;

/// Where an acknowledged event landed: its position in the log.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct LogPosition {
    pub partition: i32,
    pub offset: i64,
}

#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    topic: String,
    delivery_timeout: Duration,
}

impl Publisher {
    pub fn new(brokers: &str, topic: &str, delivery_timeout: Duration) -> anyhow::Result<Self> {
        let producer =
            kafka::idempotent_producer_config(brokers, "switchboard-ingest", delivery_timeout.as_millis() as u32)
                .create()
                .context("failed to create kafka producer")?;
        Ok(Publisher { producer, topic: topic.to_owned(), delivery_timeout })
    }

    /// Sends `event` keyed by its partition key and waits for the broker's acknowledgement.
    #[tracing::instrument(name = "publish", skip_all, fields(topic = %self.topic, event_id = %event.event_id))]
    pub async fn publish(&self, event: &Envelope) -> anyhow::Result<LogPosition> {
        let payload = envelope::encode(event);
        let event_type = event.payload.as_ref().map_or("none", envelope::payload_name);
        let headers = trace_context_headers(&tracing::Span::current())
            .insert(Header { key: header::EVENT_TYPE, value: Some(event_type) });
        let record = FutureRecord::to(&self.topic).key(&event.partition_key).payload(&payload).headers(headers);
        // The queue timeout bounds how long we wait for room in librdkafka's queue; delivery
        // itself is bounded by message.timeout.ms.
        let delivery = self.producer.send(record, self.delivery_timeout).await;
        match delivery {
            Ok(delivered) => Ok(LogPosition { partition: delivered.partition, offset: delivered.offset }),
            Err((error, _)) => Err(anyhow::Error::new(error).context("kafka did not acknowledge the event")),
        }
    }
}
