//! What the router remembers, and [`evolve`]: how one emitted event changes it.
//!
//! The state is a pure fold of the router's own output (conversations topic), so a restarted
//! router rebuilds it from a snapshot plus the output written after the snapshot, never by
//! re-deciding. Everything here is per input partition (one partition holds whole accounts).

use std::collections::{BTreeMap, VecDeque};

use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{Envelope, InboundMessageReceived, WithheldReason};
use switchboard_runtime::envelope::recorded_at_millis;

use crate::fast_hash::{FastMap, FastSet};

/// Message ids remembered after their conversation closed (B1): retries of a provider message
/// arrive within minutes to hours of the original, and a partition routes far fewer than this
/// many messages in that time. Beyond it memory stays bounded (16 bytes per id).
pub const RECENT_MESSAGE_WINDOW: usize = 500_000;
/// Command request ids remembered for idempotency (the API retries within seconds).
pub const RECENT_REQUEST_WINDOW: usize = 100_000;
/// Channel types are a small closed enum (`ChannelType`); per-type counters are an array.
pub const CHANNEL_TYPE_SLOTS: usize = 8;

/// A message id as a 128-bit key: Switchboard message ids are UUIDs (UUIDv5, see
/// `runtime::ids`); anything else is hashed with SHA-256 (truncated), still collision-free in
/// practice and deterministic.
pub fn message_key(message_id: &str) -> u128 {
    match uuid::Uuid::try_parse(message_id) {
        Ok(uuid) => uuid.as_u128(),
        Err(_) => {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(message_id.as_bytes());
            u128::from_be_bytes(digest[..16].try_into().expect("16 bytes"))
        }
    }
}

pub fn channel_type_slot(channel_type: i32) -> usize {
    (channel_type.max(0) as usize).min(CHANNEL_TYPE_SLOTS - 1)
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConversationState {
    pub channel_id: String,
    pub channel_type: i32,
    pub thread_key: String,
    pub contact_id: String,
    /// The contact's channel-scoped identity: a follow-up from the same sender needs no
    /// contact lookup (the contact is this one).
    pub contact_external_id: String,
    pub assignee_agent_id_opt: Option<String>,
    /// Recorded-at of the ConversationStarted event: the backlog is re-driven oldest first (B3).
    pub started_at_millis: u64,
    /// Message ids in the conversation; retired into the recent window when it closes (B1).
    pub message_keys: Vec<u128>,
    pub ticket_id_opt: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContactState {
    pub contact_id: String,
    pub owner_agent_id_opt: Option<String>,
    /// C6 explicit consent: set once the sender agreed (or withdrawn).
    pub consent_granted: bool,
    /// Tickets ever associated with the contact (T2 / C7 association limit).
    pub ticket_count: u32,
}

/// A message held until its sender consents (C6 explicit consent).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeldMessage {
    pub message: InboundMessageReceived,
    pub source_event_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TicketState {
    pub conversation_id: String,
    pub pipeline: String,
    pub stage: String,
}

/// An agent id as a workload-map key, stored inline when it is short (agent ids usually are).
/// Routing a new conversation looks up the workload of every pool member (B2 explains each
/// one); with inline keys the comparison reads the table's own memory instead of chasing one
/// heap pointer per member, which was a fifth of a new conversation's cost (docs/router.md).
/// Hashes and compares as the id's bytes, so maps are queried with `agent_id.as_bytes()`.
#[derive(Clone)]
pub enum AgentKey {
    Inline { len: u8, bytes: [u8; AgentKey::INLINE] },
    Heap(Box<str>),
}

impl AgentKey {
    const INLINE: usize = 22;

    pub fn new(agent_id: &str) -> AgentKey {
        if agent_id.len() <= AgentKey::INLINE {
            let mut bytes = [0u8; AgentKey::INLINE];
            bytes[..agent_id.len()].copy_from_slice(agent_id.as_bytes());
            AgentKey::Inline { len: agent_id.len() as u8, bytes }
        } else {
            AgentKey::Heap(agent_id.into())
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            AgentKey::Inline { len, bytes } => &bytes[..*len as usize],
            AgentKey::Heap(agent_id) => agent_id.as_bytes(),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            // Built from a `&str` prefix of the same length, so always valid UTF-8.
            AgentKey::Inline { .. } => std::str::from_utf8(self.as_bytes()).unwrap_or_default(),
            AgentKey::Heap(agent_id) => agent_id,
        }
    }
}

impl PartialEq for AgentKey {
    fn eq(&self, other: &AgentKey) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for AgentKey {}

impl std::hash::Hash for AgentKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl std::borrow::Borrow<[u8]> for AgentKey {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), formatter)
    }
}

impl std::fmt::Display for AgentKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl From<&str> for AgentKey {
    fn from(agent_id: &str) -> AgentKey {
        AgentKey::new(agent_id)
    }
}

impl From<String> for AgentKey {
    fn from(agent_id: String) -> AgentKey {
        AgentKey::new(&agent_id)
    }
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

/// The agents' side of the state: workload, availability, round-robin positions. Kept apart
/// so a decision that makes several assignments (B3 re-drive, C6 release) can work on a copy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentBook {
    pub workload_by_agent: FastMap<AgentKey, AgentWorkload>,
    /// Availability from `AgentAvailabilityChanged`: authoritative once seen; before that the
    /// configured `AgentConfigured.available` applies.
    pub availability_by_agent: FastMap<String, bool>,
    /// Round-robin position per channel: the agent assigned last in it.
    pub last_round_robin_agent_by_channel: FastMap<String, String>,
}

impl AgentBook {
    pub fn workload(&self, agent_id: &str) -> Option<&AgentWorkload> {
        self.workload_by_agent.get(agent_id.as_bytes())
    }

    pub fn take(&mut self, agent_id: &str, channel_id: &str, channel_type: i32, at_millis: u64) {
        let workload = match self.workload_by_agent.get_mut(agent_id.as_bytes()) {
            Some(workload) => workload,
            None => self.workload_by_agent.entry(AgentKey::new(agent_id)).or_default(),
        };
        workload.open_conversations += 1;
        workload.open_by_channel_type[channel_type_slot(channel_type)] += 1;
        workload.last_assigned_at_millis_opt = Some(at_millis);
        match self.last_round_robin_agent_by_channel.get_mut(channel_id) {
            Some(last) if last == agent_id => {}
            Some(last) => agent_id.clone_into(last),
            None => drop(self.last_round_robin_agent_by_channel.insert(channel_id.to_owned(), agent_id.to_owned())),
        }
    }

    pub fn release(&mut self, agent_id: &str, channel_type: i32) {
        if let Some(workload) = self.workload_by_agent.get_mut(agent_id.as_bytes()) {
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageDedup {
    pub open: FastSet<u128>,
    pub recent: RecentSet<u128>,
}

impl Default for MessageDedup {
    fn default() -> Self {
        MessageDedup { open: FastSet::default(), recent: RecentSet::with_capacity(RECENT_MESSAGE_WINDOW) }
    }
}

impl MessageDedup {
    pub fn contains(&self, key: u128) -> bool {
        self.open.contains(&key) || self.recent.contains(&key)
    }

    fn retire(&mut self, key: u128) {
        self.open.remove(&key);
        self.recent.insert(key);
    }
}

/// A channel's waiting conversations ordered by (started-at, conversation id). Grouped by
/// start time so removing one needs no allocated key (it happens on every assignment).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Backlog {
    by_started_at: BTreeMap<u64, Vec<String>>,
}

impl Backlog {
    pub fn insert(&mut self, started_at_millis: u64, conversation_id: &str) {
        let same_time = self.by_started_at.entry(started_at_millis).or_default();
        if let Err(position) = same_time.binary_search_by(|id| id.as_str().cmp(conversation_id)) {
            same_time.insert(position, conversation_id.to_owned());
        }
    }

    pub fn remove(&mut self, started_at_millis: u64, conversation_id: &str) {
        if let Some(same_time) = self.by_started_at.get_mut(&started_at_millis)
            && let Ok(position) = same_time.binary_search_by(|id| id.as_str().cmp(conversation_id))
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

    pub fn contains(&self, conversation_id: &str) -> bool {
        self.iter().any(|(_, id)| id == conversation_id)
    }

    /// Oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &String)> + '_ {
        self.by_started_at.iter().flat_map(|(started_at, ids)| ids.iter().map(move |id| (*started_at, id)))
    }
}

/// Everything the router remembers for one input partition, derived only from its output.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterState {
    /// R10: the open conversation of each thread, by channel id then thread key (channel ids
    /// are unique across accounts; two levels let lookups borrow `&str` without allocating).
    pub open_conversation_by_thread: FastMap<String, FastMap<String, String>>,
    /// Open conversations by id (closed ones are forgotten, see `dedup`).
    pub conversations: FastMap<String, ConversationState>,
    /// C4: contacts by channel id then the sender's channel-scoped external id.
    pub contacts: FastMap<String, FastMap<String, ContactState>>,
    /// Contact id → (channel id, external id), for commands that name a contact.
    pub contact_identity_by_id: FastMap<String, (String, String)>,
    /// C6: messages held for consent, by contact id, in arrival order.
    pub held_by_contact: FastMap<String, Vec<HeldMessage>>,
    /// Open tickets by id.
    pub tickets: FastMap<String, TicketState>,
    pub agents: AgentBook,
    /// B3: open, unassigned conversations per channel, oldest first (started-at, id).
    pub waiting_by_channel: FastMap<String, Backlog>,
    pub dedup: MessageDedup,
    /// Request ids of applied (or rejected) commands.
    pub applied_requests: RecentSet<String>,
}

impl Default for RouterState {
    fn default() -> Self {
        RouterState {
            open_conversation_by_thread: FastMap::default(),
            conversations: FastMap::default(),
            contacts: FastMap::default(),
            contact_identity_by_id: FastMap::default(),
            held_by_contact: FastMap::default(),
            tickets: FastMap::default(),
            agents: AgentBook::default(),
            waiting_by_channel: FastMap::default(),
            dedup: MessageDedup::default(),
            applied_requests: RecentSet::with_capacity(RECENT_REQUEST_WINDOW),
        }
    }
}

impl RouterState {
    pub fn open_conversation(&self, channel_id: &str, thread_key: &str) -> Option<&String> {
        self.open_conversation_by_thread.get(channel_id).and_then(|threads| threads.get(thread_key))
    }

    pub fn contact(&self, channel_id: &str, external_id: &str) -> Option<&ContactState> {
        self.contacts.get(channel_id).and_then(|contacts| contacts.get(external_id))
    }

    pub fn contact_by_id(&self, contact_id: &str) -> Option<&ContactState> {
        let (channel_id, external_id) = self.contact_identity_by_id.get(contact_id)?;
        self.contact(channel_id, external_id)
    }

    fn contact_by_id_mut(&mut self, contact_id: &str) -> Option<&mut ContactState> {
        let (channel_id, external_id) = self.contact_identity_by_id.get(contact_id)?;
        self.contacts.get_mut(channel_id.as_str()).and_then(|contacts| contacts.get_mut(external_id.as_str()))
    }

    fn remember_request(&mut self, request_id: &str) {
        if !request_id.is_empty() {
            self.applied_requests.insert(request_id.to_owned());
        }
    }

    fn stop_waiting(&mut self, conversation_id: &str, channel_id: &str, started_at_millis: u64) {
        stop_waiting(&mut self.waiting_by_channel, conversation_id, channel_id, started_at_millis);
    }

    fn start_waiting(&mut self, conversation_id: &str, channel_id: &str, started_at_millis: u64) {
        let waiting = match self.waiting_by_channel.get_mut(channel_id) {
            Some(waiting) => waiting,
            None => self.waiting_by_channel.entry(channel_id.to_owned()).or_default(),
        };
        waiting.insert(started_at_millis, conversation_id);
    }

    fn close_conversation(&mut self, conversation_id: &str) {
        let Some(conversation) = self.conversations.remove(conversation_id) else { return };
        if let Some(threads) = self.open_conversation_by_thread.get_mut(&conversation.channel_id) {
            threads.remove(&conversation.thread_key);
            if threads.is_empty() {
                self.open_conversation_by_thread.remove(&conversation.channel_id);
            }
        }
        match &conversation.assignee_agent_id_opt {
            Some(agent_id) => self.agents.release(agent_id, conversation.channel_type),
            None => self.stop_waiting(conversation_id, &conversation.channel_id, conversation.started_at_millis),
        }
        for key in conversation.message_keys {
            self.dedup.retire(key);
        }
    }
}

/// Removes a conversation from its channel's backlog (B3); a free function so callers can keep
/// other fields of the state borrowed.
fn stop_waiting(
    waiting_by_channel: &mut FastMap<String, Backlog>,
    conversation_id: &str,
    channel_id: &str,
    started_at_millis: u64,
) {
    if let Some(waiting) = waiting_by_channel.get_mut(channel_id) {
        waiting.remove(started_at_millis, conversation_id);
        if waiting.is_empty() {
            waiting_by_channel.remove(channel_id);
        }
    }
}

/// Applies one event emitted by [`crate::core::decide`] to the state.
///
/// Takes `&mut` rather than returning a new state: the router folds millions of events and
/// copying maps per event would dominate its cost; the semantics are those of `evolve(S, &E) -> S`.
pub fn evolve(state: &mut RouterState, event: &Envelope) {
    match &event.payload {
        Some(Payload::ContactCreated(created)) => {
            let contacts = match state.contacts.get_mut(created.channel_id.as_str()) {
                Some(contacts) => contacts,
                None => state.contacts.entry(created.channel_id.clone()).or_default(),
            };
            contacts
                .entry(created.external_id.clone())
                .or_insert_with(|| ContactState { contact_id: created.contact_id.clone(), ..Default::default() });
            state
                .contact_identity_by_id
                .insert(created.contact_id.clone(), (created.channel_id.clone(), created.external_id.clone()));
        }
        Some(Payload::ContactConsentReceived(consent)) => {
            if let Some(contact) = state
                .contacts
                .get_mut(consent.channel_id.as_str())
                .and_then(|contacts| contacts.get_mut(consent.sender_external_id.as_str()))
            {
                contact.consent_granted = consent.granted;
                if consent.granted {
                    // The held messages are released by the events that follow this one.
                    let contact_id = contact.contact_id.clone();
                    if let Some(held) = state.held_by_contact.remove(&contact_id) {
                        for message in held {
                            let key = message_key(&message.message.message_id);
                            state.dedup.open.remove(&key);
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
                && let Some(contact) = state.contact(&withheld.channel_id, sender_identity(message))
            {
                let contact_id = contact.contact_id.clone();
                state.dedup.open.insert(key);
                state
                    .held_by_contact
                    .entry(contact_id)
                    .or_default()
                    .push(HeldMessage { message: message.clone(), source_event_id: withheld.source_event_id.clone() });
            } else {
                state.dedup.retire(key);
            }
        }
        Some(Payload::ConversationStarted(started)) => {
            let started_at_millis = recorded_at_millis(event);
            let threads = match state.open_conversation_by_thread.get_mut(started.channel_id.as_str()) {
                Some(threads) => threads,
                None => state.open_conversation_by_thread.entry(started.channel_id.clone()).or_default(),
            };
            threads.insert(started.thread_key.clone(), started.conversation_id.clone());
            state.conversations.insert(
                started.conversation_id.clone(),
                ConversationState {
                    channel_id: started.channel_id.clone(),
                    channel_type: started.channel_type,
                    thread_key: started.thread_key.clone(),
                    contact_id: started.contact_id.clone(),
                    contact_external_id: match started.contact.as_ref().map(|sender| sender.external_id.as_str()) {
                        Some(external_id) if !external_id.is_empty() => external_id.to_owned(),
                        _ => started.thread_key.clone(),
                    },
                    started_at_millis,
                    ..Default::default()
                },
            );
        }
        Some(Payload::ConversationLeftUnassigned(left)) => {
            // Open and unassigned: it waits for an agent (B3). Every new conversation gets its
            // routing decision in the same decision as its start.
            if let Some(conversation) = state.conversations.get(&left.conversation_id)
                && conversation.assignee_agent_id_opt.is_none()
            {
                let (channel_id, started_at_millis) = (conversation.channel_id.clone(), conversation.started_at_millis);
                state.start_waiting(&left.conversation_id, &channel_id, started_at_millis);
            }
        }
        Some(Payload::MessageAppended(appended)) => {
            if let Some(conversation) = state.conversations.get_mut(&appended.conversation_id) {
                let key = message_key(&appended.message_id);
                conversation.message_keys.push(key);
                state.dedup.open.insert(key);
            }
        }
        Some(Payload::ConversationAssigned(assigned)) => {
            let at_millis = recorded_at_millis(event);
            // Field-wise borrows: the conversation stays borrowed while the agents' book and the
            // backlog change, so nothing is cloned (this runs for every assignment).
            let Some(conversation) = state.conversations.get_mut(&assigned.conversation_id) else { return };
            match &mut conversation.assignee_agent_id_opt {
                Some(previous) => {
                    state.agents.release(previous, conversation.channel_type);
                    assigned.assignee_agent_id.clone_into(previous);
                }
                None => {
                    stop_waiting(
                        &mut state.waiting_by_channel,
                        &assigned.conversation_id,
                        &conversation.channel_id,
                        conversation.started_at_millis,
                    );
                    conversation.assignee_agent_id_opt = Some(assigned.assignee_agent_id.clone());
                }
            }
            state.agents.take(
                &assigned.assignee_agent_id,
                &conversation.channel_id,
                conversation.channel_type,
                at_millis,
            );
        }
        Some(Payload::ConversationUnassigned(unassigned)) => {
            state.remember_request(&unassigned.request_id);
            let Some(conversation) = state.conversations.get_mut(&unassigned.conversation_id) else { return };
            let Some(previous) = conversation.assignee_agent_id_opt.take() else { return };
            let (channel_id, channel_type, started_at_millis) =
                (conversation.channel_id.clone(), conversation.channel_type, conversation.started_at_millis);
            state.agents.release(&previous, channel_type);
            state.start_waiting(&unassigned.conversation_id, &channel_id, started_at_millis);
        }
        Some(Payload::ConversationClosed(closed)) => {
            state.remember_request(&closed.request_id);
            state.close_conversation(&closed.conversation_id);
        }
        Some(Payload::TicketCreated(created)) => {
            if let Some(conversation) = state.conversations.get_mut(&created.conversation_id) {
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
            state.agents.availability_by_agent.insert(changed.agent_id.clone(), changed.available);
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
