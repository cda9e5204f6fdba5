//! The one path every adapter's events take to Kafka: skip what was published moments ago,
//! publish the rest concurrently, and report success only once Kafka acknowledged every one.
//!
//! The recently-published cache is an optimisation, not the guarantee: it saves a provider
//! retry burst from producing the same record again on this instance. Exactly-one-message
//! across restarts and instances is the router's job (it drops any `message_id` it has
//! handled, docs/contracts.md), which the deterministic message id makes possible.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use switchboard_proto::events::v1::Envelope;
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_runtime::publisher::{EnvelopePublisher, LogPosition};

use crate::error::IngestError;
use crate::metrics::Metrics;

/// What the caller gets back for each event.
#[derive(Debug, Clone, Serialize)]
pub struct Published {
    /// `message_id` for messages; the deduplication key for consent and status events.
    pub id: String,
    pub event_type: &'static str,
    pub event_id: String,
    pub position: LogPosition,
    /// Already published recently: not published again; `event_id`/`position` are the
    /// original's.
    pub duplicate: bool,
}

/// Event id and position of a published event, by deduplication key, plus the keys in
/// insertion order (for eviction).
type RecentMap = (HashMap<String, (String, LogPosition)>, VecDeque<String>);

/// A bounded map from deduplication key to where the event landed; oldest entries leave first.
pub struct RecentlyPublished {
    capacity: usize,
    inner: Mutex<RecentMap>,
}

impl RecentlyPublished {
    pub fn new(capacity: usize) -> Self {
        RecentlyPublished { capacity, inner: Mutex::new((HashMap::new(), VecDeque::new())) }
    }

    pub fn get(&self, key: &str) -> Option<(String, LogPosition)> {
        let inner = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        inner.0.get(key).cloned()
    }

    pub fn insert(&self, key: String, event_id: String, position: LogPosition) {
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (map, order) = &mut *inner;
        if map.insert(key.clone(), (event_id, position)).is_none() {
            order.push_back(key);
        }
        while order.len() > self.capacity {
            if let Some(oldest) = order.pop_front() {
                map.remove(&oldest);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The key under which an event is deduplicated: a function of the provider's ids only, so a
/// retry of the same provider delivery has the same key.
pub fn dedup_key(event: &Envelope) -> String {
    match &event.payload {
        Some(Payload::InboundMessageReceived(inbound)) => inbound.message_id.clone(),
        Some(Payload::ContactConsentReceived(consent)) => {
            format!("consent:{}:{}", consent.channel_id, consent.provider_event_id)
        }
        Some(Payload::DeliveryStatusReported(status)) => format!(
            "status:{}:{}:{}:{}",
            status.channel_id, status.provider_message_id, status.recipient_external_id, status.status
        ),
        // Nothing else enters through ingest; never deduplicate what we cannot key.
        _ => event.event_id.clone(),
    }
}

#[derive(Clone)]
pub struct Intake {
    publisher: EnvelopePublisher,
    inbound_topic: Arc<str>,
    recently_published: Arc<RecentlyPublished>,
    pub metrics: Arc<Metrics>,
}

impl Intake {
    pub fn new(publisher: EnvelopePublisher, inbound_topic: &str, recent_capacity: usize) -> Self {
        Intake {
            publisher,
            inbound_topic: Arc::from(inbound_topic),
            recently_published: Arc::new(RecentlyPublished::new(recent_capacity)),
            metrics: Arc::default(),
        }
    }

    /// Publishes `events` (one provider delivery) and returns once Kafka acknowledged all of
    /// them. If any fails the whole delivery is reported failed, so the provider retries it;
    /// the ones that did land are recognised on the retry by their deterministic ids.
    pub async fn publish_all(
        &self,
        channel_type: &'static str,
        events: Vec<Envelope>,
    ) -> Result<Vec<Published>, IngestError> {
        let sends = events.into_iter().map(|event| async move {
            let key = dedup_key(&event);
            let event_type = event.payload.as_ref().map_or("none", switchboard_runtime::envelope::payload_name);
            if let Some((event_id, position)) = self.recently_published.get(&key) {
                return Ok(Published { id: key, event_type, event_id, position, duplicate: true });
            }
            let started = Instant::now();
            let position = self
                .publisher
                .publish(&self.inbound_topic, &event)
                .await
                .map_err(|error| IngestError::LogUnavailable(error.into()))?;
            self.metrics.publish_latency(channel_type, started.elapsed());
            self.recently_published.insert(key.clone(), event.event_id.clone(), position);
            Ok::<_, IngestError>(Published {
                id: key,
                event_type,
                event_id: event.event_id,
                position,
                duplicate: false,
            })
        });
        let results = futures::future::join_all(sends).await;
        let mut published = Vec::with_capacity(results.len());
        for result in results {
            published.push(result?);
        }
        let duplicates = published.iter().filter(|outcome| outcome.duplicate).count() as u64;
        self.metrics.accepted(channel_type, published.len() as u64 - duplicates);
        self.metrics.duplicates(channel_type, duplicates);
        Ok(published)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b1_recently_published_is_bounded_and_forgets_the_oldest_first() {
        let recent = RecentlyPublished::new(2);
        let position = LogPosition { partition: 0, offset: 1 };
        recent.insert("a".into(), "e1".into(), position);
        recent.insert("b".into(), "e2".into(), position);
        recent.insert("a".into(), "e1".into(), position);
        assert_eq!(recent.len(), 2);
        recent.insert("c".into(), "e3".into(), position);
        assert_eq!(recent.len(), 2);
        assert!(recent.get("a").is_none());
        assert_eq!(recent.get("c").unwrap().0, "e3");
    }
}
