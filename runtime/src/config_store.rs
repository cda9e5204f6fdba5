//! The in-memory view of the compacted config topic: inboxes, channels, routing rules, agents,
//! ticket settings.
//!
//! Each config record carries its entity's whole current state under a key such as
//! `channel/<id>`, so the latest record per key is the truth and a tombstone deletes it.
//! Services read the whole topic at start (and refuse to serve until they have), then follow it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    AgentConfigured, ChannelConfigured, Envelope, InboxConfigured, RoutingRulesConfigured, TicketSettingsConfigured,
};
use tokio::sync::watch;

/// Config entities of one kind, by id, with the account each belongs to.
pub type Entities<T> = BTreeMap<String, Owned<T>>;

#[derive(Debug, Clone, PartialEq)]
pub struct Owned<T> {
    pub account_id: String,
    pub entity: T,
}

/// Every config entity, latest state. `BTreeMap`s so iteration order is deterministic.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigSnapshot {
    pub inboxes: Entities<InboxConfigured>,
    pub channels: Entities<ChannelConfigured>,
    /// Routing rules by channel id.
    pub routing_rules: Entities<RoutingRulesConfigured>,
    pub agents: Entities<AgentConfigured>,
    /// Ticket settings by channel id (T1, R9, T2).
    pub ticket_settings: Entities<TicketSettingsConfigured>,
}

/// Compaction key of a config event: one key per entity.
pub fn config_key(payload: &Payload) -> Option<String> {
    match payload {
        Payload::InboxConfigured(inbox) => Some(format!("inbox/{}", inbox.inbox_id)),
        Payload::ChannelConfigured(channel) => Some(format!("channel/{}", channel.channel_id)),
        Payload::RoutingRulesConfigured(rules) => Some(format!("rules/{}", rules.channel_id)),
        Payload::AgentConfigured(agent) => Some(format!("agent/{}", agent.agent_id)),
        Payload::TicketSettingsConfigured(settings) => Some(format!("tickets/{}", settings.channel_id)),
        _ => None,
    }
}

impl ConfigSnapshot {
    /// Applies one config event. Non-config payloads are ignored (they never belong here).
    pub fn apply(&mut self, envelope: &Envelope) {
        let account_id = envelope.account_id.clone();
        match envelope.payload.clone() {
            Some(Payload::InboxConfigured(entity)) => {
                self.inboxes.insert(entity.inbox_id.clone(), Owned { account_id, entity });
            }
            Some(Payload::ChannelConfigured(entity)) => {
                self.channels.insert(entity.channel_id.clone(), Owned { account_id, entity: *entity });
            }
            Some(Payload::RoutingRulesConfigured(entity)) => {
                self.routing_rules.insert(entity.channel_id.clone(), Owned { account_id, entity });
            }
            Some(Payload::AgentConfigured(entity)) => {
                self.agents.insert(entity.agent_id.clone(), Owned { account_id, entity });
            }
            Some(Payload::TicketSettingsConfigured(entity)) => {
                self.ticket_settings.insert(entity.channel_id.clone(), Owned { account_id, entity });
            }
            _ => {}
        }
    }

    /// Applies a tombstone (a record with a key and no value): the entity is deleted.
    pub fn apply_tombstone(&mut self, key: &str) {
        match key.split_once('/') {
            Some(("inbox", id)) => drop(self.inboxes.remove(id)),
            Some(("channel", id)) => drop(self.channels.remove(id)),
            Some(("rules", id)) => drop(self.routing_rules.remove(id)),
            Some(("agent", id)) => drop(self.agents.remove(id)),
            Some(("tickets", id)) => drop(self.ticket_settings.remove(id)),
            _ => {}
        }
    }
}

/// A live, shared view of the config topic.
#[derive(Clone)]
pub struct ConfigStore {
    current: watch::Receiver<Arc<ConfigSnapshot>>,
}

impl ConfigStore {
    /// Reads the config topic to its end, then keeps following it in a background task.
    /// Returns once the snapshot reflects everything that was in the topic at call time.
    pub async fn start(brokers: &str, topic: &str, client_id: &str) -> anyhow::Result<ConfigStore> {
        let consumer: StreamConsumer<crate::kafka::ReaderContext> = crate::kafka::reader_config(brokers, client_id)
            .create_with_context(crate::kafka::ReaderContext)
            .context("failed to create config topic reader")?;
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(30))
            .context("failed to fetch config topic metadata")?;
        let partition_count = metadata
            .topics()
            .first()
            .filter(|topic_metadata| topic_metadata.error().is_none())
            .map(|topic_metadata| topic_metadata.partitions().len())
            .filter(|count| *count > 0)
            .with_context(|| format!("config topic {topic} does not exist"))?;
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partition_count as i32 {
            assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
        }
        consumer.assign(&assignment).context("failed to assign config topic partitions")?;

        let (sender, receiver) = watch::channel(Arc::new(ConfigSnapshot::default()));
        let (caught_up_sender, caught_up_receiver) = tokio::sync::oneshot::channel();
        tokio::spawn(follow_config_topic(consumer, partition_count, sender, caught_up_sender));
        tokio::time::timeout(Duration::from_secs(60), caught_up_receiver)
            .await
            .context("timed out reading the config topic")?
            .context("config topic reader stopped before catching up")?;
        Ok(ConfigStore { current: receiver })
    }

    /// A store that never changes: for tools and tests that are handed their config.
    pub fn fixed(snapshot: ConfigSnapshot) -> ConfigStore {
        let (sender, receiver) = watch::channel(Arc::new(snapshot));
        // Keep the channel open for the life of the process so `subscribe` receivers never
        // see it closed; a fixed store is created a handful of times at most.
        std::mem::forget(sender);
        ConfigStore { current: receiver }
    }

    /// The latest snapshot. Cheap: an `Arc` clone.
    pub fn snapshot(&self) -> Arc<ConfigSnapshot> {
        self.current.borrow().clone()
    }

    /// A receiver that is notified on every config change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ConfigSnapshot>> {
        self.current.clone()
    }
}

async fn follow_config_topic(
    consumer: StreamConsumer<crate::kafka::ReaderContext>,
    partition_count: usize,
    sender: watch::Sender<Arc<ConfigSnapshot>>,
    caught_up: tokio::sync::oneshot::Sender<()>,
) {
    let mut partitions_at_end = vec![false; partition_count];
    let mut caught_up = Some(caught_up);
    let mut stream = consumer.stream();
    while let Some(next) = stream.next().await {
        match next {
            Ok(record) => {
                let key = record.key().and_then(|key| std::str::from_utf8(key).ok()).unwrap_or_default().to_owned();
                match record.payload() {
                    None => sender.send_modify(|snapshot| Arc::make_mut(snapshot).apply_tombstone(&key)),
                    Some(bytes) => match crate::envelope::decode(Some(bytes)) {
                        Ok(envelope) => sender.send_modify(|snapshot| Arc::make_mut(snapshot).apply(&envelope)),
                        Err(error) => {
                            tracing::warn!(%error, key, offset = record.offset(), "skipping undecodable config record")
                        }
                    },
                }
            }
            Err(KafkaError::PartitionEOF(partition)) => {
                if let Some(at_end) = partitions_at_end.get_mut(partition as usize) {
                    *at_end = true;
                }
                if partitions_at_end.iter().all(|at_end| *at_end)
                    && let Some(caught_up) = caught_up.take()
                {
                    let _ = caught_up.send(());
                }
            }
            Err(error) => tracing::warn!(%error, "config topic read error (librdkafka retries)"),
        }
        if sender.is_closed() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    #[test]
    fn latest_state_per_entity_wins_and_tombstones_delete() {
        let mut snapshot = ConfigSnapshot::default();
        let agent = |name: &str| {
            crate::envelope::new_root(
                "acct",
                "agent/a1",
                Utc::now(),
                Payload::AgentConfigured(AgentConfigured {
                    agent_id: "a1".into(),
                    name: name.into(),
                    ..Default::default()
                }),
            )
        };
        snapshot.apply(&agent("Ada"));
        snapshot.apply(&agent("Ada Lovelace"));
        assert_eq!(snapshot.agents["a1"].entity.name, "Ada Lovelace");
        assert_eq!(snapshot.agents["a1"].account_id, "acct");
        assert_eq!(config_key(agent("x").payload.as_ref().unwrap()).as_deref(), Some("agent/a1"));
        snapshot.apply_tombstone("agent/a1");
        assert!(snapshot.agents.is_empty());

        let tickets = crate::envelope::new_root(
            "acct",
            "tickets/form-1",
            Utc::now(),
            Payload::TicketSettingsConfigured(TicketSettingsConfigured {
                channel_id: "form-1".into(),
                treat_as_tickets: true,
                ..Default::default()
            }),
        );
        assert_eq!(config_key(tickets.payload.as_ref().unwrap()).as_deref(), Some("tickets/form-1"));
        snapshot.apply(&tickets);
        assert!(snapshot.ticket_settings["form-1"].entity.treat_as_tickets);
        snapshot.apply_tombstone("tickets/form-1");
        assert!(snapshot.ticket_settings.is_empty());
    }
}
