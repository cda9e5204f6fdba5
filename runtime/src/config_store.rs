//! The in-memory view of the compacted config topic: inboxes, channels, routing rules, agents,
//! ticket settings.
//!
//! Each config record carries its entity's whole current state under a key such as
//! `channel/<id>`, so the latest record per key is the truth and a tombstone deletes it.
//! Services read the whole topic at start (and refuse to serve until they have), then follow it.

use std::collections::{BTreeMap, BTreeSet};
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

/// A config entity type: its kind (the first part of its config key) and its id within its
/// account.
pub trait ConfigEntity {
    const KIND: &'static str;
    fn entity_id(&self) -> &str;
}

impl ConfigEntity for InboxConfigured {
    const KIND: &'static str = "inbox";
    fn entity_id(&self) -> &str {
        &self.inbox_id
    }
}

impl ConfigEntity for ChannelConfigured {
    const KIND: &'static str = "channel";
    fn entity_id(&self) -> &str {
        &self.channel_id
    }
}

/// Routing rules are addressed by their channel's id.
impl ConfigEntity for RoutingRulesConfigured {
    const KIND: &'static str = "rules";
    fn entity_id(&self) -> &str {
        &self.channel_id
    }
}

impl ConfigEntity for AgentConfigured {
    const KIND: &'static str = "agent";
    fn entity_id(&self) -> &str {
        &self.agent_id
    }
}

/// Ticket settings are addressed by their channel's id.
impl ConfigEntity for TicketSettingsConfigured {
    const KIND: &'static str = "tickets";
    fn entity_id(&self) -> &str {
        &self.channel_id
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Owned<T> {
    pub account_id: String,
    pub entity: T,
}

/// Config entities of one kind, addressed by (account, id) (M1): two accounts may use the same
/// id and neither sees the other's entity through a lookup. Iteration is in (account, id) order.
#[derive(Debug, Clone, PartialEq)]
pub struct Entities<T> {
    by_account: BTreeMap<String, BTreeMap<String, Owned<T>>>,
    /// The accounts that have an entity of each id: ingest finds a channel by the id in its
    /// public URL without visiting every account.
    accounts_by_id: BTreeMap<String, BTreeSet<String>>,
}

impl<T> Default for Entities<T> {
    fn default() -> Self {
        Entities { by_account: BTreeMap::new(), accounts_by_id: BTreeMap::new() }
    }
}

impl<T: ConfigEntity> Entities<T> {
    /// The entity `id` of `account_id`; another account's entity of the same id is never found.
    pub fn get(&self, account_id: &str, id: &str) -> Option<&Owned<T>> {
        self.by_account.get(account_id)?.get(id)
    }

    /// The entity to change in place (its account and id stay as they are).
    pub fn get_mut(&mut self, account_id: &str, id: &str) -> Option<&mut T> {
        self.by_account.get_mut(account_id)?.get_mut(id).map(|owned| &mut owned.entity)
    }

    pub fn contains(&self, account_id: &str, id: &str) -> bool {
        self.get(account_id, id).is_some()
    }

    /// Stores `owned` under (its account, its id), replacing that entity's previous state.
    pub fn insert(&mut self, owned: Owned<T>) -> Option<Owned<T>> {
        let id = owned.entity.entity_id().to_owned();
        self.accounts_by_id.entry(id.clone()).or_default().insert(owned.account_id.clone());
        self.by_account.entry(owned.account_id.clone()).or_default().insert(id, owned)
    }

    pub fn remove(&mut self, account_id: &str, id: &str) -> Option<Owned<T>> {
        let entities = self.by_account.get_mut(account_id)?;
        let removed = entities.remove(id);
        if entities.is_empty() {
            self.by_account.remove(account_id);
        }
        if removed.is_some()
            && let Some(accounts) = self.accounts_by_id.get_mut(id)
        {
            accounts.remove(account_id);
            if accounts.is_empty() {
                self.accounts_by_id.remove(id);
            }
        }
        removed
    }

    /// Every account's entity of this id. For ids that are unique in the installation by rule
    /// (channels reached by their id in public URLs, M2), at most one.
    pub fn with_id<'e>(&'e self, id: &'e str) -> impl Iterator<Item = &'e Owned<T>> + 'e {
        self.accounts_by_id.get(id).into_iter().flatten().filter_map(move |account_id| self.get(account_id, id))
    }

    /// Every entity of every account: for installation-wide checks (M2) and compilers that
    /// index the whole config.
    pub fn iter(&self) -> impl Iterator<Item = &Owned<T>> {
        self.by_account.values().flat_map(BTreeMap::values)
    }

    /// The entities of one account, by id.
    pub fn in_account(&self, account_id: &str) -> impl Iterator<Item = &Owned<T>> {
        self.by_account.get(account_id).into_iter().flat_map(BTreeMap::values)
    }

    pub fn len(&self) -> usize {
        self.by_account.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_account.is_empty()
    }
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
    /// Entities read from a legacy key (`<kind>/<id>`, written before keys named the account),
    /// by that key, with the account the record named. See [`ConfigSnapshot::apply_record`].
    legacy_keys: BTreeMap<String, String>,
}

/// A config record's key, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKey<'k> {
    /// `<kind>/<account>/<id>`: the current form.
    Scoped { kind: &'k str, account_id: &'k str, id: &'k str },
    /// `<kind>/<id>`: records written before keys named the account; the envelope names it.
    Legacy { kind: &'k str, id: &'k str },
}

impl<'k> ConfigKey<'k> {
    /// Entity ids never contain `/` (they are checked where they are chosen), so the id is
    /// what follows the last `/` and the account is everything between the kind and the id.
    pub fn parse(key: &'k str) -> Option<ConfigKey<'k>> {
        let (kind, rest) = key.split_once('/')?;
        if kind.is_empty() || rest.is_empty() {
            return None;
        }
        Some(match rest.rsplit_once('/') {
            Some((account_id, id)) if !account_id.is_empty() && !id.is_empty() => {
                ConfigKey::Scoped { kind, account_id, id }
            }
            Some(_) => return None,
            None => ConfigKey::Legacy { kind, id: rest },
        })
    }

    pub fn kind(&self) -> &'k str {
        match self {
            ConfigKey::Scoped { kind, .. } | ConfigKey::Legacy { kind, .. } => kind,
        }
    }

    pub fn id(&self) -> &'k str {
        match self {
            ConfigKey::Scoped { id, .. } | ConfigKey::Legacy { id, .. } => id,
        }
    }
}

/// Compaction key of a config event of `account_id`: one key per entity, naming its account
/// (M1), so that two accounts' entities of the same id are two records that never replace
/// each other.
pub fn config_key(account_id: &str, payload: &Payload) -> Option<String> {
    let (kind, id) = kind_and_id(payload)?;
    Some(format!("{kind}/{account_id}/{id}"))
}

/// The kind and id of a config payload; `None` for other payloads.
fn kind_and_id(payload: &Payload) -> Option<(&'static str, &str)> {
    Some(match payload {
        Payload::InboxConfigured(inbox) => (InboxConfigured::KIND, inbox.entity_id()),
        Payload::ChannelConfigured(channel) => (ChannelConfigured::KIND, channel.entity_id()),
        Payload::RoutingRulesConfigured(rules) => (RoutingRulesConfigured::KIND, rules.entity_id()),
        Payload::AgentConfigured(agent) => (AgentConfigured::KIND, agent.entity_id()),
        Payload::TicketSettingsConfigured(settings) => (TicketSettingsConfigured::KIND, settings.entity_id()),
        _ => return None,
    })
}

impl ConfigSnapshot {
    /// Applies one config event written under its current (account-scoped) key. Non-config
    /// payloads are ignored (they never belong here).
    pub fn apply(&mut self, envelope: &Envelope) {
        self.insert_entity(envelope);
    }

    /// Applies one config record read from the topic under `key`.
    ///
    /// Records under a legacy key (`<kind>/<id>`) are still read, as the entity of the account
    /// their envelope names. Because a legacy and a scoped record of one entity have different
    /// keys, they may sit on different partitions and be read in either order; so a scoped
    /// record always wins, and a legacy record or tombstone only acts on an entity that no
    /// scoped record has written.
    pub fn apply_record(&mut self, key: &str, envelope: &Envelope) {
        match ConfigKey::parse(key) {
            Some(ConfigKey::Legacy { kind, id }) => {
                let account_id = envelope.account_id.as_str();
                let written_by_this_key = self.legacy_keys.get(key).is_some_and(|account| account == account_id);
                if self.contains(kind, account_id, id) && !written_by_this_key {
                    return;
                }
                if self.insert_entity(envelope) {
                    self.legacy_keys.insert(key.to_owned(), account_id.to_owned());
                }
            }
            _ => {
                if let Some(legacy) = envelope.payload.as_ref().and_then(legacy_key)
                    && self.legacy_keys.get(&legacy) == Some(&envelope.account_id)
                {
                    self.legacy_keys.remove(&legacy);
                }
                self.insert_entity(envelope);
            }
        }
    }

    /// Applies a tombstone (a record with a key and no value): the entity is deleted.
    pub fn apply_tombstone(&mut self, key: &str) {
        match ConfigKey::parse(key) {
            Some(ConfigKey::Scoped { kind, account_id, id }) => self.remove(kind, account_id, id),
            Some(ConfigKey::Legacy { kind, id }) => {
                if let Some(account_id) = self.legacy_keys.remove(key) {
                    self.remove(kind, &account_id, id);
                }
            }
            None => {}
        }
    }

    /// Whether `payload` is already the current state of its entity of `account_id`: what
    /// apply-config skips, and what a config command waits to see. False for a payload that is
    /// not a config entity.
    pub fn holds(&self, account_id: &str, payload: &Payload) -> bool {
        match payload {
            Payload::InboxConfigured(inbox) => {
                self.inboxes.get(account_id, &inbox.inbox_id).is_some_and(|stored| &stored.entity == inbox)
            }
            Payload::ChannelConfigured(channel) => {
                self.channels.get(account_id, &channel.channel_id).is_some_and(|stored| stored.entity == **channel)
            }
            Payload::RoutingRulesConfigured(rules) => {
                self.routing_rules.get(account_id, &rules.channel_id).is_some_and(|stored| &stored.entity == rules)
            }
            Payload::AgentConfigured(agent) => {
                self.agents.get(account_id, &agent.agent_id).is_some_and(|stored| &stored.entity == agent)
            }
            Payload::TicketSettingsConfigured(settings) => self
                .ticket_settings
                .get(account_id, &settings.channel_id)
                .is_some_and(|stored| &stored.entity == settings),
            _ => false,
        }
    }

    /// Whether an entity of `kind` (a config key's kind) is stored as (account, id).
    pub fn contains(&self, kind: &str, account_id: &str, id: &str) -> bool {
        match kind {
            InboxConfigured::KIND => self.inboxes.contains(account_id, id),
            ChannelConfigured::KIND => self.channels.contains(account_id, id),
            RoutingRulesConfigured::KIND => self.routing_rules.contains(account_id, id),
            AgentConfigured::KIND => self.agents.contains(account_id, id),
            TicketSettingsConfigured::KIND => self.ticket_settings.contains(account_id, id),
            _ => false,
        }
    }

    /// Stores the envelope's config entity; false if the payload is not a config entity.
    fn insert_entity(&mut self, envelope: &Envelope) -> bool {
        let account_id = envelope.account_id.clone();
        match envelope.payload.clone() {
            Some(Payload::InboxConfigured(entity)) => drop(self.inboxes.insert(Owned { account_id, entity })),
            Some(Payload::ChannelConfigured(entity)) => {
                drop(self.channels.insert(Owned { account_id, entity: *entity }))
            }
            Some(Payload::RoutingRulesConfigured(entity)) => {
                drop(self.routing_rules.insert(Owned { account_id, entity }))
            }
            Some(Payload::AgentConfigured(entity)) => drop(self.agents.insert(Owned { account_id, entity })),
            Some(Payload::TicketSettingsConfigured(entity)) => {
                drop(self.ticket_settings.insert(Owned { account_id, entity }))
            }
            _ => return false,
        }
        true
    }

    fn remove(&mut self, kind: &str, account_id: &str, id: &str) {
        match kind {
            InboxConfigured::KIND => drop(self.inboxes.remove(account_id, id)),
            ChannelConfigured::KIND => drop(self.channels.remove(account_id, id)),
            RoutingRulesConfigured::KIND => drop(self.routing_rules.remove(account_id, id)),
            AgentConfigured::KIND => drop(self.agents.remove(account_id, id)),
            TicketSettingsConfigured::KIND => drop(self.ticket_settings.remove(account_id, id)),
            _ => {}
        }
    }
}

/// The legacy key (`<kind>/<id>`) the same entity had before keys named the account.
fn legacy_key(payload: &Payload) -> Option<String> {
    let (kind, id) = kind_and_id(payload)?;
    Some(format!("{kind}/{id}"))
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
                        Ok(envelope) => {
                            sender.send_modify(|snapshot| Arc::make_mut(snapshot).apply_record(&key, &envelope))
                        }
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

    fn agent(account: &str, id: &str, name: &str) -> Envelope {
        let payload =
            Payload::AgentConfigured(AgentConfigured { agent_id: id.into(), name: name.into(), ..Default::default() });
        let key = config_key(account, &payload).unwrap();
        crate::envelope::new_root(account, &key, Utc::now(), payload)
    }

    #[test]
    fn latest_state_per_entity_wins_and_tombstones_delete() {
        let mut snapshot = ConfigSnapshot::default();
        snapshot.apply_record("agent/acct/a1", &agent("acct", "a1", "Ada"));
        snapshot.apply_record("agent/acct/a1", &agent("acct", "a1", "Ada Lovelace"));
        assert_eq!(snapshot.agents.get("acct", "a1").unwrap().entity.name, "Ada Lovelace");
        assert_eq!(snapshot.agents.get("acct", "a1").unwrap().account_id, "acct");
        assert_eq!(
            config_key("acct", agent("acct", "a1", "x").payload.as_ref().unwrap()).as_deref(),
            Some("agent/acct/a1")
        );
        snapshot.apply_tombstone("agent/acct/a1");
        assert!(snapshot.agents.is_empty());

        let payload = Payload::TicketSettingsConfigured(TicketSettingsConfigured {
            channel_id: "form-1".into(),
            treat_as_tickets: true,
            ..Default::default()
        });
        assert_eq!(config_key("acct", &payload).as_deref(), Some("tickets/acct/form-1"));
        snapshot.apply_record("tickets/acct/form-1", &crate::envelope::new_root("acct", "k", Utc::now(), payload));
        assert!(snapshot.ticket_settings.get("acct", "form-1").unwrap().entity.treat_as_tickets);
        snapshot.apply_tombstone("tickets/acct/form-1");
        assert!(snapshot.ticket_settings.is_empty());
    }

    #[test]
    fn m1_two_accounts_keep_their_own_entity_of_the_same_id() {
        let mut snapshot = ConfigSnapshot::default();
        snapshot.apply_record("agent/a/ana", &agent("a", "ana", "Ana of A"));
        snapshot.apply_record("agent/b/ana", &agent("b", "ana", "Ana of B"));
        assert_eq!(snapshot.agents.len(), 2);
        assert_eq!(snapshot.agents.get("a", "ana").unwrap().entity.name, "Ana of A");
        assert_eq!(snapshot.agents.get("b", "ana").unwrap().entity.name, "Ana of B");
        assert!(snapshot.agents.get("c", "ana").is_none());
        assert_eq!(snapshot.agents.in_account("b").count(), 1);
        assert_eq!(snapshot.agents.with_id("ana").count(), 2);
        snapshot.apply_tombstone("agent/b/ana");
        assert_eq!(snapshot.agents.get("a", "ana").unwrap().entity.name, "Ana of A");
        assert!(snapshot.agents.get("b", "ana").is_none());
        assert_eq!(snapshot.agents.with_id("ana").map(|agent| agent.account_id.as_str()).collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn m1_legacy_keys_are_read_and_scoped_records_win_in_either_order() {
        // Legacy record first, then the scoped one (on another partition): the scoped one wins,
        // and the legacy key's later tombstone no longer deletes it.
        let mut snapshot = ConfigSnapshot::default();
        snapshot.apply_record("agent/ana", &agent("a", "ana", "old"));
        assert_eq!(snapshot.agents.get("a", "ana").unwrap().entity.name, "old");
        snapshot.apply_record("agent/a/ana", &agent("a", "ana", "new"));
        snapshot.apply_tombstone("agent/ana");
        assert_eq!(snapshot.agents.get("a", "ana").unwrap().entity.name, "new");

        // Scoped record first: a late legacy record of the same entity changes nothing.
        let mut snapshot = ConfigSnapshot::default();
        snapshot.apply_record("agent/a/ana", &agent("a", "ana", "new"));
        snapshot.apply_record("agent/ana", &agent("a", "ana", "old"));
        assert_eq!(snapshot.agents.get("a", "ana").unwrap().entity.name, "new");

        // An entity only ever written under its legacy key is updated and deleted by it.
        let mut snapshot = ConfigSnapshot::default();
        snapshot.apply_record("agent/ana", &agent("a", "ana", "v1"));
        snapshot.apply_record("agent/ana", &agent("a", "ana", "v2"));
        assert_eq!(snapshot.agents.get("a", "ana").unwrap().entity.name, "v2");
        snapshot.apply_tombstone("agent/ana");
        assert!(snapshot.agents.is_empty());
    }

    #[test]
    fn config_keys_parse_scoped_and_legacy_forms() {
        assert_eq!(
            ConfigKey::parse("channel/acme/web"),
            Some(ConfigKey::Scoped { kind: "channel", account_id: "acme", id: "web" })
        );
        // An account id may contain `/`; entity ids never do.
        assert_eq!(
            ConfigKey::parse("inbox/org/acme/support"),
            Some(ConfigKey::Scoped { kind: "inbox", account_id: "org/acme", id: "support" })
        );
        assert_eq!(ConfigKey::parse("rules/web"), Some(ConfigKey::Legacy { kind: "rules", id: "web" }));
        for malformed in ["", "inbox", "inbox/", "/x", "inbox//x", "inbox/a/"] {
            assert_eq!(ConfigKey::parse(malformed), None, "{malformed}");
        }
    }
}
