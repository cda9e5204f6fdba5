//! What the router remembers, and [`evolve`]: how one emitted event changes it.
//!
//! The state is a pure fold of the router's own output (conversations topic), so a restarted
//! router rebuilds it from a snapshot plus the output written after the snapshot, never by
//! re-deciding. Everything here is per input partition (one partition holds whole accounts).

use std::collections::{BTreeMap, VecDeque};

use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{Envelope, InboundMessageReceived, WithheldReason};
use switchboard_runtime::envelope::{ACCOUNT_SCOPED_IDS, recorded_at_millis};

use crate::compact::InlineStr;
use crate::conversations::{ConversationState, OpenConversations};
use crate::fast_hash::{FastMap, FastSet};
use crate::ids::{
    contact_uuid_for, conversation_key, conversation_key_and_noncanonical_id, legacy_contact_uuid_for, message_key,
    request_key,
};

/// Message ids remembered after their conversation closed (B1): retries of a provider message
/// arrive within minutes to hours of the original, and a partition routes far fewer than this
/// many messages in that time. Beyond it memory stays bounded (16 bytes per id).
pub const RECENT_MESSAGE_WINDOW: usize = 500_000;
/// Command request ids remembered for idempotency (the API retries within seconds).
pub const RECENT_REQUEST_WINDOW: usize = 100_000;
/// Channel types are a small closed enum (`ChannelType`, 8 values today); per-type counters are
/// an array with one slot per value and room for new types (snapshots write the slot count, so
/// growing this changes no format). A unit test fails when the enum outgrows it.
pub const CHANNEL_TYPE_SLOTS: usize = 16;

pub fn channel_type_slot(channel_type: i32) -> usize {
    (channel_type.max(0) as usize).min(CHANNEL_TYPE_SLOTS - 1)
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContactState {
    pub contact_id: String,
    /// M1: the account whose channel the identity is on.
    pub account_id: String,
    /// The channel-scoped identity the contact was created for (C4).
    pub channel_id: String,
    pub external_id: InlineStr,
    pub owner_agent_id_opt: Option<String>,
    /// C6 explicit consent: set once the sender agreed (or withdrawn).
    pub consent_granted: bool,
    /// Tickets ever associated with the contact (T2 / C7 association limit).
    pub ticket_count: u32,
    /// Created by an event older than [`ACCOUNT_SCOPED_IDS`]: its id is the legacy derivation
    /// ([`legacy_contact_uuid_for`]).
    pub legacy_id: bool,
}

/// A message held until its sender consents (C6 explicit consent).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeldMessage {
    pub message: InboundMessageReceived,
    pub source_event_id: String,
    /// The consent prompt was queued when this message was withheld
    /// (`MessageWithheld.consent_prompt_reply_id`): the thread is not prompted again while its
    /// messages wait.
    pub consent_prompted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TicketState {
    pub conversation_id: String,
    pub pipeline: String,
    pub stage: String,
}

/// Per-agent bookkeeping the strategies and capacity limits need.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentWorkload {
    pub open_conversations: u32,
    /// R8 per channel type, indexed by `ChannelType` value.
    pub open_by_channel_type: [u32; CHANNEL_TYPE_SLOTS],
    /// Unix millis of the agent's latest assignment (event time); `None` if never assigned.
    pub last_assigned_at_millis_opt: Option<u64>,
}

/// One agent's entry in the [`AgentBook`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentSlot {
    pub account_id: InlineStr,
    pub agent_id: InlineStr,
    pub workload: AgentWorkload,
    /// Availability from `AgentAvailabilityChanged`: authoritative once seen; before that the
    /// configured `AgentConfigured.available` applies.
    pub availability_opt: Option<bool>,
}

impl AgentSlot {
    /// Nothing recorded: the same as an agent the book has never seen.
    fn is_blank(&self) -> bool {
        self.workload == AgentWorkload::default() && self.availability_opt.is_none()
    }
}

/// The agents' side of the state: workload, availability, round-robin positions. Kept apart
/// so a decision that makes several assignments (B3 re-drive, C6 release) can work on a copy.
///
/// Agents live in slots. After [`AgentBook::align`] with a compiled config, slot *i* is the
/// config's agent profile *i*, so routing reads a pool member's workload by the profile index
/// the config already resolved, with no hashing (a pool can hold dozens of agents). Slots
/// are an index only: which slot an agent has never changes a decision, and equality and
/// snapshots see agents by id.
#[derive(Debug, Clone, Default)]
pub struct AgentBook {
    /// By [`InlineStr::scoped`] (account, agent id): agents of different accounts never share a
    /// slot (M1).
    slot_by_agent: FastMap<InlineStr, u32>,
    slots: Vec<AgentSlot>,
    /// The agent table ([`crate::config::RouterConfig::agent_table_id`]) slots are aligned with.
    aligned_table_opt: Option<u64>,
    /// Slots whose availability a command set (zero: the configured availability applies to
    /// everyone, no lookup needed).
    availability_overrides: usize,
    /// Round-robin position per channel, by [`InlineStr::scoped`] (account, channel id): the
    /// agent assigned last in it.
    pub last_round_robin_agent_by_channel: FastMap<InlineStr, InlineStr>,
}

impl PartialEq for AgentBook {
    fn eq(&self, other: &AgentBook) -> bool {
        fn recorded_by_id(book: &AgentBook) -> Vec<&AgentSlot> {
            let mut slots: Vec<&AgentSlot> = book.recorded().collect();
            slots.sort_by(|left, right| {
                (left.account_id.as_bytes(), left.agent_id.as_bytes())
                    .cmp(&(right.account_id.as_bytes(), right.agent_id.as_bytes()))
            });
            slots
        }
        recorded_by_id(self) == recorded_by_id(other)
            && self.last_round_robin_agent_by_channel == other.last_round_robin_agent_by_channel
    }
}

impl AgentBook {
    pub fn slot(&self, account_id: &str, agent_id: &str) -> Option<&AgentSlot> {
        let index = *self.slot_by_agent.get(InlineStr::scoped(account_id, agent_id).as_bytes())?;
        self.slots.get(index as usize)
    }

    fn slot_mut(&mut self, account_id: &str, agent_id: &str) -> &mut AgentSlot {
        let key = InlineStr::scoped(account_id, agent_id);
        let index = match self.slot_by_agent.get(key.as_bytes()) {
            Some(index) => *index as usize,
            None => {
                let index = self.slots.len();
                self.slots.push(AgentSlot {
                    account_id: InlineStr::new(account_id),
                    agent_id: InlineStr::new(agent_id),
                    ..Default::default()
                });
                self.slot_by_agent.insert(key, index as u32);
                index
            }
        };
        &mut self.slots[index]
    }

    /// The agent's slot, found by the index of its profile in the compiled config when the
    /// book is aligned with that config (no hashing), else by (account, id).
    pub fn slot_for_profile(
        &self,
        agent_table_id: u64,
        profile_index: u32,
        account_id: &str,
        agent_id: &str,
    ) -> Option<&AgentSlot> {
        if self.aligned_table_opt == Some(agent_table_id) {
            let slot = self.slots.get(profile_index as usize);
            debug_assert!(
                slot.is_some_and(|slot| slot.agent_id == *agent_id && slot.account_id == *account_id),
                "aligned slot {profile_index}"
            );
            return slot;
        }
        self.slot(account_id, agent_id)
    }

    /// Renumbers the slots so that slot *i* is `agents[i]` (the compiled config's profiles as
    /// (account, agent id), see [`crate::config::RouterConfig::agent_table_id`]); agents outside
    /// the config keep slots after them. Routing is correct without it, only slower.
    pub fn align(&mut self, agent_table_id: u64, agents: &[(String, String)]) {
        if self.aligned_table_opt == Some(agent_table_id) {
            return;
        }
        let mut previous: Vec<Option<AgentSlot>> = std::mem::take(&mut self.slots).into_iter().map(Some).collect();
        let mut slots = Vec::with_capacity(agents.len().max(previous.len()));
        for (account_id, agent_id) in agents {
            let slot = self
                .slot_by_agent
                .get(InlineStr::scoped(account_id, agent_id).as_bytes())
                .and_then(|index| previous[*index as usize].take())
                .unwrap_or_else(|| AgentSlot {
                    account_id: InlineStr::new(account_id),
                    agent_id: InlineStr::new(agent_id),
                    ..Default::default()
                });
            slots.push(slot);
        }
        slots.extend(previous.into_iter().flatten());
        self.slot_by_agent = slots
            .iter()
            .enumerate()
            .map(|(index, slot)| (InlineStr::scoped(&slot.account_id, &slot.agent_id), index as u32))
            .collect();
        self.slots = slots;
        self.aligned_table_opt = Some(agent_table_id);
        debug_assert_eq!(self.slot_by_agent.len(), self.slots.len(), "one slot per agent");
    }

    pub fn workload(&self, account_id: &str, agent_id: &str) -> Option<&AgentWorkload> {
        self.slot(account_id, agent_id).map(|slot| &slot.workload)
    }

    /// The availability a command set for the agent, if any.
    pub fn availability(&self, account_id: &str, agent_id: &str) -> Option<bool> {
        if self.availability_overrides == 0 {
            return None;
        }
        self.slot(account_id, agent_id).and_then(|slot| slot.availability_opt)
    }

    pub fn has_availability_overrides(&self) -> bool {
        self.availability_overrides > 0
    }

    pub fn set_availability(&mut self, account_id: &str, agent_id: &str, available: bool) {
        let slot = self.slot_mut(account_id, agent_id);
        let was_set = slot.availability_opt.replace(available).is_some();
        if !was_set {
            self.availability_overrides += 1;
        }
    }

    /// Agents with something recorded (workload or availability), for snapshots.
    pub fn recorded(&self) -> impl Iterator<Item = &AgentSlot> + '_ {
        self.slots.iter().filter(|slot| !slot.is_blank())
    }

    /// Restores an agent's recorded workload (snapshots).
    pub fn restore_workload(&mut self, account_id: &str, agent_id: &str, workload: AgentWorkload) {
        self.slot_mut(account_id, agent_id).workload = workload;
    }

    /// The agent the channel assigned last (round robin, R3).
    pub fn last_round_robin_agent(&self, account_id: &str, channel_id: &str) -> Option<&InlineStr> {
        self.last_round_robin_agent_by_channel.get(InlineStr::scoped(account_id, channel_id).as_bytes())
    }

    /// The agent of the channel's account takes a conversation of the channel (`channel_key`:
    /// [`InlineStr::scoped`] (account, channel id)).
    pub fn take(&mut self, channel_key: &InlineStr, agent_id: &str, channel_type: i32, at_millis: u64) {
        let workload = &mut self.slot_mut(channel_key.scope().0, agent_id).workload;
        workload.open_conversations += 1;
        workload.open_by_channel_type[channel_type_slot(channel_type)] += 1;
        workload.last_assigned_at_millis_opt = Some(at_millis);
        match self.last_round_robin_agent_by_channel.get_mut(channel_key.as_bytes()) {
            Some(last) if *last == *agent_id => {}
            Some(last) => *last = InlineStr::new(agent_id),
            None => drop(self.last_round_robin_agent_by_channel.insert(channel_key.clone(), InlineStr::new(agent_id))),
        }
    }

    pub fn release(&mut self, account_id: &str, agent_id: &str, channel_type: i32) {
        if let Some(index) = self.slot_by_agent.get(InlineStr::scoped(account_id, agent_id).as_bytes()) {
            let workload = &mut self.slots[*index as usize].workload;
            workload.open_conversations = workload.open_conversations.saturating_sub(1);
            let slot = &mut workload.open_by_channel_type[channel_type_slot(channel_type)];
            *slot = slot.saturating_sub(1);
        }
    }
}

/// A bounded set that forgets its oldest entries (FIFO) beyond `capacity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentSet<T: std::hash::Hash + Eq + Clone> {
    pub members: FastSet<T>,
    pub order: VecDeque<T>,
    pub capacity: usize,
}

impl<T: std::hash::Hash + Eq + Clone> RecentSet<T> {
    pub fn with_capacity(capacity: usize) -> Self {
        RecentSet { members: FastSet::default(), order: VecDeque::new(), capacity }
    }

    pub fn insert(&mut self, value: T) {
        if self.members.insert(value.clone()) {
            self.order.push_back(value);
            while self.order.len() > self.capacity {
                if let Some(oldest) = self.order.pop_front() {
                    self.members.remove(&oldest);
                }
            }
        }
        debug_assert_eq!(self.members.len(), self.order.len(), "each member once in the order");
    }

    pub fn contains<Q>(&self, value: &Q) -> bool
    where
        T: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.members.contains(value)
    }
}

/// Every message id the router has handled that a retry could still repeat (B1): those of open
/// conversations and held messages (kept as long as they are open/held), plus a bounded window
/// of the most recent ones that left (closed conversations, withheld messages).
///
/// One set answers for both, so a message costs one lookup (every input asks) and retiring a
/// closed conversation's ids is an append to the window, not a move between sets. An id that
/// left is never opened again (`decide` drops ids it knows), so forgetting the oldest retired
/// id never forgets an open one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageDedup {
    seen: FastSet<u128>,
    /// Ids that left, oldest first; each is forgotten once the window holds newer ones.
    retired_order: VecDeque<u128>,
    window: usize,
}

impl Default for MessageDedup {
    fn default() -> Self {
        MessageDedup::with_window(RECENT_MESSAGE_WINDOW)
    }
}

impl MessageDedup {
    pub fn with_window(window: usize) -> Self {
        MessageDedup { seen: FastSet::default(), retired_order: VecDeque::new(), window }
    }

    pub fn contains(&self, key: u128) -> bool {
        self.seen.contains(&key)
    }

    /// The message is in an open conversation or held: remembered until it leaves.
    pub fn open(&mut self, key: u128) {
        self.seen.insert(key);
    }

    /// A held message is released: its delivery opens it again.
    fn forget_open(&mut self, key: u128) {
        self.seen.remove(&key);
    }

    /// The message left (its conversation closed, or it was withheld): remembered for the
    /// window only.
    pub fn retire(&mut self, key: u128) {
        self.seen.insert(key);
        self.retire_open(key);
    }

    /// Like [`MessageDedup::retire`] for a key known to be open (a closing conversation's):
    /// it is in the set already, so retiring it does not touch the set.
    fn retire_open(&mut self, key: u128) {
        debug_assert!(self.seen.contains(&key), "only a remembered id is retired");
        self.retired_order.push_back(key);
        while self.retired_order.len() > self.window {
            if let Some(oldest) = self.retired_order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
    }

    /// The retired ids, oldest first (what a snapshot keeps besides the open ones).
    pub fn retired(&self) -> impl ExactSizeIterator<Item = u128> + '_ {
        self.retired_order.iter().copied()
    }
}

/// A channel's waiting conversations ordered by (started-at, conversation id). Grouped by
/// start time so removing one needs no allocated key (it happens on every assignment).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Backlog {
    by_started_at: BTreeMap<u64, Vec<u128>>,
}

impl Backlog {
    pub fn insert(&mut self, started_at_millis: u64, conversation_key: u128) {
        let same_time = self.by_started_at.entry(started_at_millis).or_default();
        if let Err(position) = same_time.binary_search(&conversation_key) {
            same_time.insert(position, conversation_key);
        }
    }

    pub fn remove(&mut self, started_at_millis: u64, conversation_key: u128) {
        if let Some(same_time) = self.by_started_at.get_mut(&started_at_millis)
            && let Ok(position) = same_time.binary_search(&conversation_key)
        {
            same_time.remove(position);
            if same_time.is_empty() {
                self.by_started_at.remove(&started_at_millis);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_started_at.is_empty()
    }

    pub fn contains(&self, conversation_key: u128) -> bool {
        self.iter().any(|(_, key)| key == conversation_key)
    }

    /// Oldest first; ties in conversation-key order (the UUID's order, so the id's order).
    pub fn iter(&self) -> impl Iterator<Item = (u64, u128)> + '_ {
        self.by_started_at.iter().flat_map(|(started_at, keys)| keys.iter().map(move |key| (*started_at, *key)))
    }
}

/// Everything the router remembers for one input partition, derived only from its output.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterState {
    /// Open conversations by [`conversation_key`] and by thread (R10); closed ones are
    /// forgotten (their message ids stay in `dedup` for a while).
    pub conversations: OpenConversations,
    /// C4: contacts by their id as a 128-bit key. Contact ids are the UUIDv5 of their account
    /// and channel identity ([`contact_uuid_for`]), so one table serves lookups by id
    /// (commands) and by identity (messages) without a second index. Boxed: small entries,
    /// cheap growth.
    pub contacts: FastMap<u128, Box<ContactState>>,
    /// C6: messages held for consent, by contact id, in arrival order.
    pub held_by_contact: FastMap<String, Vec<HeldMessage>>,
    /// Open tickets by id.
    pub tickets: FastMap<String, TicketState>,
    pub agents: AgentBook,
    /// B3: open, unassigned conversations per channel, by [`InlineStr::scoped`] (account,
    /// channel id), oldest first (started-at, key).
    pub waiting_by_channel: FastMap<InlineStr, Backlog>,
    pub dedup: MessageDedup,
    /// Request ids of applied (or rejected) commands.
    /// Keys ([`request_key`]) of the command request ids applied lately.
    pub applied_requests: RecentSet<u128>,
    /// Contacts with a legacy id. While there are none (any log written since ids named the
    /// account), looking a sender up costs one hash, not two.
    pub legacy_contacts: usize,
}

impl Default for RouterState {
    fn default() -> Self {
        RouterState {
            conversations: OpenConversations::default(),
            contacts: FastMap::default(),
            held_by_contact: FastMap::default(),
            tickets: FastMap::default(),
            agents: AgentBook::default(),
            waiting_by_channel: FastMap::default(),
            dedup: MessageDedup::default(),
            applied_requests: RecentSet::with_capacity(RECENT_REQUEST_WINDOW),
            legacy_contacts: 0,
        }
    }
}

impl RouterState {
    /// R10: the id of the thread's open conversation.
    pub fn open_conversation_id(&self, account_id: &str, channel_id: &str, thread_key: &str) -> Option<String> {
        self.conversations.by_thread(account_id, channel_id, thread_key).map(|(key, conversation)| conversation.id(key))
    }

    /// An open conversation by id, with its key.
    pub fn conversation(&self, conversation_id: &str) -> Option<(u128, &ConversationState)> {
        let key = conversation_key(conversation_id);
        self.conversations.get(key).map(|conversation| (key, conversation))
    }

    /// The contact of a channel identity of an account (C4, M1).
    pub fn contact(&self, account_id: &str, channel_id: &str, external_id: &str) -> Option<&ContactState> {
        self.contact_with_uuid(
            contact_uuid_for(account_id, channel_id, external_id),
            account_id,
            channel_id,
            external_id,
        )
    }

    /// [`RouterState::contact`] when the caller already computed [`contact_uuid_for`]. A
    /// contact the log created before ids named the account is found under its legacy id, and
    /// only within its own account.
    pub fn contact_with_uuid(
        &self,
        uuid: uuid::Uuid,
        account_id: &str,
        channel_id: &str,
        external_id: &str,
    ) -> Option<&ContactState> {
        let key = self.contact_key(uuid, account_id, channel_id, external_id)?;
        self.contacts.get(&key).map(|contact| &**contact)
    }

    fn contact_mut(&mut self, account_id: &str, channel_id: &str, external_id: &str) -> Option<&mut ContactState> {
        let uuid = contact_uuid_for(account_id, channel_id, external_id);
        let key = self.contact_key(uuid, account_id, channel_id, external_id)?;
        self.contacts.get_mut(&key).map(|contact| &mut **contact)
    }

    /// The key the identity's contact is stored under: its id as made now, or its legacy id.
    fn contact_key(&self, uuid: uuid::Uuid, account_id: &str, channel_id: &str, external_id: &str) -> Option<u128> {
        let is_identity = |key: &u128| {
            self.contacts.get(key).is_some_and(|contact| {
                contact.account_id == account_id
                    && contact.channel_id == channel_id
                    && contact.external_id == *external_id
            })
        };
        let current = uuid.as_u128();
        if is_identity(&current) {
            return Some(current);
        }
        if self.legacy_contacts == 0 {
            return None;
        }
        let legacy = legacy_contact_uuid_for(channel_id, external_id).as_u128();
        is_identity(&legacy).then_some(legacy)
    }

    pub fn contact_by_id(&self, contact_id: &str) -> Option<&ContactState> {
        self.contacts.get(&message_key(contact_id)).map(|contact| &**contact).filter(|c| c.contact_id == contact_id)
    }

    fn contact_by_id_mut(&mut self, contact_id: &str) -> Option<&mut ContactState> {
        self.contacts
            .get_mut(&message_key(contact_id))
            .map(|contact| &mut **contact)
            .filter(|contact| contact.contact_id == contact_id)
    }

    /// Records a contact (C4). Its id is the UUIDv5 of its identity, as the router makes it; a
    /// contact recorded under another id is still found by id, and by identity the next
    /// message simply creates the recipe's contact.
    pub fn insert_contact(&mut self, contact: ContactState) {
        let legacy_id = contact.legacy_id;
        if let Some(replaced) = self.contacts.insert(message_key(&contact.contact_id), Box::new(contact))
            && replaced.legacy_id
        {
            self.legacy_contacts -= 1;
        }
        if legacy_id {
            self.legacy_contacts += 1;
        }
    }

    fn remember_request(&mut self, request_id: &str) {
        if !request_id.is_empty() {
            self.applied_requests.insert(request_key(request_id));
        }
    }

    /// B3: the channel's open, unassigned conversations, oldest first.
    pub fn waiting(&self, account_id: &str, channel_id: &str) -> Option<&Backlog> {
        self.waiting_by_channel.get(InlineStr::scoped(account_id, channel_id).as_bytes())
    }

    fn close_conversation(&mut self, conversation_id: &str) {
        let key = conversation_key(conversation_id);
        let Some(conversation) = self.conversations.remove(key) else { return };
        match &conversation.assignee_agent_id_opt {
            Some(agent_id) => {
                self.agents.release(conversation.account_id(), agent_id.as_str(), conversation.channel_type)
            }
            None => stop_waiting(
                &mut self.waiting_by_channel,
                key,
                &conversation.channel_key,
                conversation.started_at_millis,
            ),
        }
        for key in conversation.message_keys.iter() {
            self.dedup.retire_open(key);
        }
    }
}

/// Removes a conversation from its channel's backlog (B3); a free function so callers can keep
/// other fields of the state borrowed.
fn stop_waiting(
    waiting_by_channel: &mut FastMap<InlineStr, Backlog>,
    conversation_key: u128,
    channel_key: &InlineStr,
    started_at_millis: u64,
) {
    if let Some(waiting) = waiting_by_channel.get_mut(channel_key.as_bytes()) {
        waiting.remove(started_at_millis, conversation_key);
        if waiting.is_empty() {
            waiting_by_channel.remove(channel_key.as_bytes());
        }
    }
}

/// Adds a conversation to its channel's backlog (B3); `channel_key` is [`InlineStr::scoped`]
/// (account, channel id).
pub(crate) fn start_waiting(
    waiting_by_channel: &mut FastMap<InlineStr, Backlog>,
    conversation_key: u128,
    channel_key: &InlineStr,
    started_at_millis: u64,
) {
    let waiting = match waiting_by_channel.get_mut(channel_key.as_bytes()) {
        Some(waiting) => waiting,
        None => waiting_by_channel.entry(channel_key.clone()).or_default(),
    };
    waiting.insert(started_at_millis, conversation_key);
}

/// Applies one event emitted by [`crate::decide::decide`] to the state.
///
/// Takes `&mut` rather than returning a new state: the router folds millions of events and
/// copying maps per event would dominate its cost; the semantics are those of `evolve(S, &E) -> S`.
pub fn evolve(state: &mut RouterState, event: &Envelope) {
    match &event.payload {
        // A contact is created once per identity; a repeated event changes nothing.
        Some(Payload::ContactCreated(created)) if state.contact_by_id(&created.contact_id).is_none() => {
            state.insert_contact(ContactState {
                contact_id: created.contact_id.clone(),
                account_id: event.account_id.clone(),
                channel_id: created.channel_id.clone(),
                external_id: InlineStr::new(&created.external_id),
                legacy_id: event.schema_version < ACCOUNT_SCOPED_IDS,
                ..Default::default()
            });
        }
        Some(Payload::ContactConsentReceived(consent)) => {
            if let Some(contact) =
                state.contact_mut(&event.account_id, &consent.channel_id, &consent.sender_external_id)
            {
                contact.consent_granted = consent.granted;
                if consent.granted {
                    // The held messages are released by the events that follow this one.
                    let contact_id = contact.contact_id.clone();
                    if let Some(held) = state.held_by_contact.remove(&contact_id) {
                        for message in held {
                            let key = message_key(&message.message.message_id);
                            state.dedup.forget_open(key);
                        }
                    }
                }
            }
        }
        Some(Payload::ContactOwnerChanged(changed)) => {
            if let Some(contact) = state.contact_by_id_mut(&changed.contact_id) {
                contact.owner_agent_id_opt =
                    (!changed.owner_agent_id.is_empty()).then(|| changed.owner_agent_id.clone());
            }
            state.remember_request(&changed.request_id);
        }
        Some(Payload::MessageWithheld(withheld)) => {
            let key = message_key(&withheld.message_id);
            if withheld.reason == WithheldReason::AwaitingConsent as i32
                && let Some(message) = &withheld.message
                && let Some(contact) = state.contact(&event.account_id, &withheld.channel_id, sender_identity(message))
            {
                let contact_id = contact.contact_id.clone();
                state.dedup.open(key);
                state.held_by_contact.entry(contact_id).or_default().push(HeldMessage {
                    message: (**message).clone(),
                    source_event_id: withheld.source_event_id.clone(),
                    consent_prompted: !withheld.consent_prompt_reply_id.is_empty(),
                });
            } else {
                state.dedup.retire(key);
            }
        }
        Some(Payload::ConversationStarted(started)) => {
            let started_at_millis = recorded_at_millis(event);
            let (key, noncanonical_id_opt) = conversation_key_and_noncanonical_id(&started.conversation_id);
            state.conversations.insert(
                key,
                ConversationState {
                    noncanonical_id_opt,
                    channel_key: InlineStr::scoped(&event.account_id, &started.channel_id),
                    channel_type: started.channel_type,
                    thread_key: InlineStr::new(&started.thread_key),
                    contact_id: InlineStr::new(&started.contact_id),
                    contact_external_id: InlineStr::new(
                        match started.contact.as_ref().map(|sender| sender.external_id.as_str()) {
                            Some(external_id) if !external_id.is_empty() => external_id,
                            _ => &started.thread_key,
                        },
                    ),
                    started_at_millis,
                    ..Default::default()
                },
            );
        }
        Some(Payload::ConversationLeftUnassigned(left)) => {
            // Open and unassigned: it waits for an agent (B3). Every new conversation gets its
            // routing decision in the same decision as its start.
            let key = conversation_key(&left.conversation_id);
            if let Some(conversation) = state.conversations.get(key)
                && conversation.assignee_agent_id_opt.is_none()
            {
                let (channel_key, started_at_millis) =
                    (conversation.channel_key.clone(), conversation.started_at_millis);
                start_waiting(&mut state.waiting_by_channel, key, &channel_key, started_at_millis);
            }
        }
        Some(Payload::MessageAppended(appended)) => {
            // Through the thread when the event names it: the entries the decision just read.
            let key = conversation_key(&appended.conversation_id);
            if let Some(conversation) = state.conversations.get_mut_in_thread(
                key,
                &event.account_id,
                &appended.channel_id,
                &appended.thread_key,
            ) {
                let message = message_key(&appended.message_id);
                conversation.message_keys.push(message);
                state.dedup.open(message);
            }
        }
        Some(Payload::ConversationAssigned(assigned)) => {
            state.remember_request(&assigned.request_id);
            let at_millis = recorded_at_millis(event);
            // Field-wise borrows: the conversation stays borrowed while the agents' book and the
            // backlog change, so nothing is cloned (this runs for every assignment).
            let key = conversation_key(&assigned.conversation_id);
            let Some(conversation) = state.conversations.get_mut(key) else { return };
            match &mut conversation.assignee_agent_id_opt {
                Some(previous) => {
                    let account_id = conversation.channel_key.scope().0;
                    state.agents.release(account_id, previous.as_str(), conversation.channel_type);
                    *previous = InlineStr::new(&assigned.assignee_agent_id);
                }
                None => {
                    stop_waiting(
                        &mut state.waiting_by_channel,
                        key,
                        &conversation.channel_key,
                        conversation.started_at_millis,
                    );
                    conversation.assignee_agent_id_opt = Some(InlineStr::new(&assigned.assignee_agent_id));
                }
            }
            state.agents.take(
                &conversation.channel_key,
                &assigned.assignee_agent_id,
                conversation.channel_type,
                at_millis,
            );
        }
        Some(Payload::ConversationUnassigned(unassigned)) => {
            state.remember_request(&unassigned.request_id);
            let key = conversation_key(&unassigned.conversation_id);
            let Some(conversation) = state.conversations.get_mut(key) else { return };
            let Some(previous) = conversation.assignee_agent_id_opt.take() else { return };
            let (channel_key, channel_type, started_at_millis) =
                (conversation.channel_key.clone(), conversation.channel_type, conversation.started_at_millis);
            state.agents.release(channel_key.scope().0, previous.as_str(), channel_type);
            start_waiting(&mut state.waiting_by_channel, key, &channel_key, started_at_millis);
        }
        Some(Payload::ConversationClosed(closed)) => {
            state.remember_request(&closed.request_id);
            state.close_conversation(&closed.conversation_id);
        }
        Some(Payload::TicketCreated(created)) => {
            if let Some(conversation) = state.conversations.get_mut(conversation_key(&created.conversation_id)) {
                conversation.ticket_id_opt = Some(created.ticket_id.clone());
            }
            if let Some(contact) = state.contact_by_id_mut(&created.contact_id) {
                contact.ticket_count += 1;
            }
            state.tickets.insert(
                created.ticket_id.clone(),
                TicketState {
                    conversation_id: created.conversation_id.clone(),
                    pipeline: created.pipeline.clone(),
                    stage: created.stage.clone(),
                },
            );
        }
        Some(Payload::TicketStageChanged(changed)) => {
            state.remember_request(&changed.request_id);
            if changed.closed {
                state.tickets.remove(&changed.ticket_id);
            } else if let Some(ticket) = state.tickets.get_mut(&changed.ticket_id) {
                ticket.stage = changed.stage.clone();
            }
        }
        Some(Payload::AgentAvailabilityChanged(changed)) => {
            state.remember_request(&changed.request_id);
            state.agents.set_availability(&event.account_id, &changed.agent_id, changed.available);
        }
        Some(Payload::CommandRejected(rejected)) => state.remember_request(&rejected.request_id),
        // Notifications and TicketNotCreated change nothing the router needs.
        _ => {}
    }
}

/// The channel-scoped identity a message's contact is keyed by (C4): the sender's external id,
/// or the thread key when the adapter sent no sender.
pub fn sender_identity(message: &InboundMessageReceived) -> &str {
    match message.sender.as_ref().map(|sender| sender.external_id.as_str()).filter(|id| !id.is_empty()) {
        Some(external_id) => external_id,
        None => &message.thread_key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_channel_type_has_a_slot_of_its_own() {
        use switchboard_proto::events::v1::ChannelType;
        let values: Vec<i32> = (0..=255).filter(|value| ChannelType::try_from(*value).is_ok()).collect();
        assert!(
            values.iter().all(|value| (*value as usize) < CHANNEL_TYPE_SLOTS),
            "a channel type beyond CHANNEL_TYPE_SLOTS would share the last slot: grow CHANNEL_TYPE_SLOTS"
        );
        let slots: std::collections::BTreeSet<usize> = values.iter().map(|value| channel_type_slot(*value)).collect();
        assert_eq!(slots.len(), values.len());
    }

    #[test]
    fn b1_a_retired_message_id_is_remembered_for_the_window_then_forgotten() {
        let mut dedup = MessageDedup::with_window(2);
        dedup.open(1);
        dedup.open(2);
        assert!(dedup.contains(1) && dedup.contains(2) && !dedup.contains(3));
        dedup.retire(1);
        dedup.retire(3);
        assert!(dedup.contains(1) && dedup.contains(3), "retired ids stay within the window");
        dedup.retire(4);
        assert!(!dedup.contains(1), "the oldest retired id is forgotten");
        assert!(dedup.contains(2), "open ids are never forgotten by the window");
        assert_eq!(dedup.retired().collect::<Vec<_>>(), [3, 4]);
    }
}
