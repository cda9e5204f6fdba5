//! The one way an event enters the log outside the router's transactions: ingest's inbound
//! messages, the API's commands and config entities, and `apply-config`. Every record gets the
//! same headers (W3C trace context of the current span, `sb-event-type`), is keyed by the
//! envelope's partition key, and counts as published only once the broker acknowledged it
//! (`acks=all`, idempotent producer, see [`crate::kafka::idempotent_producer_config`]).

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use switchboard_proto::events::v1::Envelope;

use crate::envelope;
use crate::kafka::{self, header};
use crate::telemetry::TraceContextHeaders;

/// Where an acknowledged event landed: its position in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LogPosition {
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("failed to create kafka producer")]
    Producer(#[source] KafkaError),
    #[error("kafka did not acknowledge the event")]
    NotAcknowledged(#[source] KafkaError),
}

/// Publishes envelopes and waits for the broker's acknowledgement. Cheap to clone (the
/// producer is shared).
#[derive(Clone)]
pub struct EnvelopePublisher {
    producer: FutureProducer,
    delivery_timeout: Duration,
}

impl EnvelopePublisher {
    /// A producer named `client_id` whose sends fail after `delivery_timeout` (the time to get
    /// room in librdkafka's queue, and, as `message.timeout.ms`, the time to get the broker's
    /// acknowledgement).
    pub fn new(brokers: &str, client_id: &str, delivery_timeout: Duration) -> Result<Self, PublishError> {
        let producer = kafka::idempotent_producer_config(brokers, client_id, delivery_timeout.as_millis() as u32)
            .create()
            .map_err(PublishError::Producer)?;
        Ok(EnvelopePublisher { producer, delivery_timeout })
    }

    /// Sends `event` to `topic`, keyed by its partition key, and waits for the acknowledgement.
    /// The record carries the trace context of this call's span, a child of the caller's.
    #[tracing::instrument(name = "publish", skip_all, fields(topic = %topic, event_id = %event.event_id))]
    pub async fn publish(&self, topic: &str, event: &Envelope) -> Result<LogPosition, PublishError> {
        let payload = envelope::encode(event);
        let headers = envelope_headers(&TraceContextHeaders::of(&tracing::Span::current()), event);
        let record = FutureRecord::to(topic).key(&event.partition_key).payload(&payload).headers(headers);
        match self.producer.send(record, self.delivery_timeout).await {
            Ok(delivered) => Ok(LogPosition { partition: delivered.partition, offset: delivered.offset }),
            Err((error, _)) => Err(PublishError::NotAcknowledged(error)),
        }
    }
}

/// Every header a record holding `event` carries, whoever produces it (this publisher, the
/// router's transactions): the trace context and the event type.
pub fn envelope_headers(trace: &TraceContextHeaders, event: &Envelope) -> OwnedHeaders {
    let event_type = event.payload.as_ref().map_or("none", envelope::payload_name);
    trace.to_kafka_headers(1).insert(Header { key: header::EVENT_TYPE, value: Some(event_type) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use rdkafka::message::Headers;
    use switchboard_proto::events::v1::InboxConfigured;
    use switchboard_proto::events::v1::envelope::Payload;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn published_envelopes_carry_the_trace_context_of_the_current_span_and_their_type() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let event = envelope::new_root(
                "acct",
                "inbox/acct/support",
                Utc::now(),
                Payload::InboxConfigured(InboxConfigured { inbox_id: "support".into(), ..Default::default() }),
            );
            let span = tracing::info_span!("command");
            let headers = envelope_headers(&TraceContextHeaders::of(&span), &event);
            let value_of = |name: &str| {
                headers
                    .iter()
                    .find(|header| header.key == name)
                    .and_then(|header| header.value)
                    .map(|value| String::from_utf8(value.to_vec()).unwrap())
            };
            let traceparent = value_of(header::TRACEPARENT).expect("a traceparent header");
            assert_eq!(
                crate::telemetry::trace_id_from_traceparent(&traceparent),
                Some(crate::telemetry::trace_id_of(&span).as_str())
            );
            assert_eq!(value_of(header::EVENT_TYPE).as_deref(), Some("inbox_configured"));
        });
    }
}
