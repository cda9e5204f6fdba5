//! The pure half of applying a batch: given the batch's events and what the database said
//! before the fold (the conversations the batch touches, and which natural keys were new),
//! [`fold_batch`] returns the [`Writes`] that bring the read models up to date. No I/O: the
//! shell in [`crate::apply`] reads the input first and executes the writes after, in one
//! transaction.
//!
//! Everything written is a function of the log (event times, never `now()`), so rebuilding the
//! read models from the log gives identical rows (B4). Cross-topic lookups (e.g. a channel's
//! inbox from the config topic) are avoided on purpose: the relative order of two topics is not
//! reproducible, the order within a partition is.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::config::{ConfigWrite, fold_config};
use crate::facts::{Event, Fact};
use crate::outbound::{OutboundStored, OutboundWrites, fold_outbound};
use switchboard_runtime::reply_window;

/// What a batch needs besides its events; the shell reads it before the fold.
#[derive(Debug, Default)]
pub struct BatchInput<'a> {
    /// The batch, position-checked, in log order per partition.
    pub events: &'a [&'a Event],
    /// The stored rows of the conversations the batch names (absent: not stored yet).
    pub stored_conversations: HashMap<Uuid, StoredConversation>,
    /// Which events are new to the read models.
    pub claimed: Claimed,
    /// Stored delivery steps, provider ids, statuses and recipients the batch's outbound
    /// events may relate to.
    pub outbound: OutboundStored,
}

/// The natural keys the batch's idempotency inserts (`ON CONFLICT DO NOTHING RETURNING`)
/// reported as new. An event whose key is absent was applied before (redelivered, or
/// published twice) and changes nothing.
#[derive(Debug, Default, Clone)]
pub struct Claimed {
    /// Inbound messages, and outbound messages and notes of conversations.
    pub message_ids: HashSet<Uuid>,
    /// Assigned, left unassigned and unassigned events (the `assignments` table).
    pub decision_event_ids: HashSet<String>,
    /// Events without a natural key of their own (the `applied_events` table): closes, ticket
    /// stage changes, contact owner changes.
    pub keyless_event_ids: HashSet<String>,
    pub ticket_ids: HashSet<Uuid>,
}

/// A `conversations` row as the fold reads it (the columns an update can change, and what
/// locates the conversation).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredConversation {
    pub conversation_id: Uuid,
    pub account_id: String,
    pub inbox_id: String,
    pub channel_id: String,
    pub channel_type: String,
    pub status: String,
    pub assignee_id: Option<String>,
    pub message_count: i32,
    pub last_message_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub closed_at: Option<DateTime<Utc>>,
    pub ticket_id: Option<Uuid>,
    pub reply_window_ends_at: Option<DateTime<Utc>>,
    pub contact_id: Option<Uuid>,
    pub subject: String,
}

/// A `conversations` row to write. Inserted rows use every field; updated rows only those
/// [`StoredConversation`] reads (the others, e.g. `thread_key`, are never rewritten).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationRow {
    pub conversation_id: Uuid,
    pub account_id: String,
    pub inbox_id: String,
    pub channel_id: String,
    pub channel_type: String,
    pub thread_key: String,
    pub contact_external_id: String,
    pub contact_name: String,
    pub started_at: DateTime<Utc>,
    pub open: bool,
    pub assignee_id: Option<String>,
    pub message_count: i32,
    pub last_message_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub closed_at: Option<DateTime<Utc>>,
    pub ticket_id: Option<Uuid>,
    pub reply_window_ends_at: Option<DateTime<Utc>>,
    pub contact_id: Option<Uuid>,
    pub subject: String,
}

/// What the outbound messages and notes of a batch do to a conversation (O5). Written with
/// monotone merges (latest `updated_at`, earliest first response, latest agent reply) and not
/// with the rest of the row: these events come from other topics than the conversation's, so
/// another transaction may be writing the same row, and merges commute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationReply {
    pub conversation_id: Uuid,
    pub updated_at: DateTime<Utc>,
    /// Agent replies only (not notes, not automated messages), at the time each was queued.
    pub first_response_at: Option<DateTime<Utc>>,
    pub last_agent_reply_at: Option<DateTime<Utc>>,
}

impl ConversationReply {
    /// Both applied, in either order.
    pub fn merge(&mut self, other: &ConversationReply) {
        self.updated_at = self.updated_at.max(other.updated_at);
        self.first_response_at = min_option(self.first_response_at, other.first_response_at);
        self.last_agent_reply_at = self.last_agent_reply_at.max(other.last_agent_reply_at);
    }
}

fn min_option(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl ConversationRow {
    pub fn status(&self) -> &'static str {
        if self.open { "open" } else { "closed" }
    }

    fn from_stored(stored: StoredConversation) -> Self {
        ConversationRow {
            conversation_id: stored.conversation_id,
            open: stored.status == "open",
            account_id: stored.account_id,
            inbox_id: stored.inbox_id,
            channel_id: stored.channel_id,
            channel_type: stored.channel_type,
            // Not read back: an update never writes them.
            thread_key: String::new(),
            contact_external_id: String::new(),
            contact_name: String::new(),
            started_at: stored.last_message_at,
            assignee_id: stored.assignee_id,
            message_count: stored.message_count,
            last_message_at: stored.last_message_at,
            updated_at: stored.updated_at,
            closed_at: stored.closed_at,
            ticket_id: stored.ticket_id,
            reply_window_ends_at: stored.reply_window_ends_at,
            contact_id: stored.contact_id,
            subject: stored.subject,
        }
    }
}

/// The `agent_workload` row an open conversation counts in (R8; M1: agents are addressed by
/// account and id). Field order is the sort order, which is the lock order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct WorkloadKey {
    pub account_id: String,
    pub agent_id: String,
    pub channel_type: String,
}

/// A change in an agent's open conversations; never zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadDelta {
    pub key: WorkloadKey,
    pub delta: i32,
}

/// The latest stage change of a ticket in the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketStageUpdate<'a> {
    pub ticket_id: Uuid,
    pub stage: &'a str,
    pub closed: bool,
    pub at: DateTime<Utc>,
}

/// The latest owner of a contact in the batch (`None`: no owner).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactOwner<'a> {
    pub contact_id: Uuid,
    pub owner_agent_id_opt: Option<&'a str>,
}

/// A `routing_audit` row (B2): why a message never reached the inbox, or a conversation
/// stayed unassigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow<'a> {
    pub event_id: &'a str,
    pub account_id: &'a str,
    pub kind: &'static str,
    pub reason: &'a str,
    pub channel_id: String,
    pub inbox_id: String,
    pub conversation_id: Option<Uuid>,
    pub message_id: Option<Uuid>,
    pub detail: &'a Value,
    pub at: DateTime<Utc>,
}

/// A `conversation_changes` row (the Watch feed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change<'a> {
    pub account_id: &'a str,
    pub inbox_id: String,
    pub conversation_id: Uuid,
    pub kind: &'static str,
    pub event_id: &'a str,
    pub at: DateTime<Utc>,
}

/// B6: how far the read models have seen an input partition of the router (the next offset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePosition<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub next_offset: i64,
}

/// Everything one batch writes, in the order the shell executes it. Lists of keyed rows are
/// sorted by key, so two writers touching the same rows lock them in the same order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Writes<'a> {
    /// Conversations started in the batch, sorted by id.
    pub new_conversations: Vec<ConversationRow>,
    /// Stored conversations the batch changed, sorted by id.
    pub updated_conversations: Vec<ConversationRow>,
    /// Sorted by key; a row whose count reaches zero is deleted.
    pub workload_deltas: Vec<WorkloadDelta>,
    /// Sorted by ticket id.
    pub ticket_stages: Vec<TicketStageUpdate<'a>>,
    /// Sorted by contact id.
    pub contact_owners: Vec<ContactOwner<'a>>,
    pub audits: Vec<AuditRow<'a>>,
    /// In log order: watchers see changes in the order they happened.
    pub changes: Vec<Change<'a>>,
    /// Config upserts and deletes, sorted by entity.
    pub config: Vec<ConfigWrite<'a>>,
    /// Sorted by topic and partition.
    pub sources: Vec<SourcePosition<'a>>,
    /// What replies and notes did to their conversations, sorted by conversation id.
    pub conversation_replies: Vec<ConversationReply>,
    /// Delivery steps, provider ids, statuses and delivery states (O5).
    pub outbound: OutboundWrites,
}

/// A conversation while the batch folds into it.
struct FoldedConversation {
    /// Started in this batch (inserted), else stored (updated).
    new: bool,
    /// Changed by the batch: written back.
    dirty: bool,
    row: ConversationRow,
}

/// Folds the batch, in log order, into the conversations it touches (counters, assignee,
/// workload, reply window, change feed) and collects every write.
pub fn fold_batch<'a>(input: BatchInput<'a>) -> Writes<'a> {
    let BatchInput { events, stored_conversations, mut claimed, outbound } = input;
    let mut conversations: HashMap<Uuid, FoldedConversation> = stored_conversations
        .into_iter()
        .map(|(id, stored)| {
            (id, FoldedConversation { new: false, dirty: false, row: ConversationRow::from_stored(stored) })
        })
        .collect();
    let mut workload: BTreeMap<WorkloadKey, i32> = BTreeMap::new();
    let mut changes: Vec<Change<'a>> = Vec::new();
    let mut ticket_stages: BTreeMap<Uuid, TicketStageUpdate<'a>> = BTreeMap::new();
    let mut contact_owners: BTreeMap<Uuid, Option<&'a str>> = BTreeMap::new();
    let mut audits: Vec<AuditRow<'a>> = Vec::new();
    let mut left_unassigned_audits: Vec<AuditRow<'a>> = Vec::new();
    let mut sources: BTreeMap<(&'a str, i32), i64> = BTreeMap::new();
    let mut conversation_replies: BTreeMap<Uuid, ConversationReply> = BTreeMap::new();
    let mut reply_to = |reply: ConversationReply| {
        conversation_replies.entry(reply.conversation_id).and_modify(|merged| merged.merge(&reply)).or_insert(reply);
    };

    for &event in events {
        if let Some((topic, partition, offset)) = &event.source {
            let next_offset = sources.entry((topic.as_str(), *partition)).or_insert(0);
            *next_offset = (*next_offset).max(offset + 1);
        }
        let change = |row: &ConversationRow, kind: &'static str| Change {
            account_id: &event.account_id,
            inbox_id: row.inbox_id.clone(),
            conversation_id: row.conversation_id,
            kind,
            event_id: &event.event_id,
            at: event.recorded_at,
        };
        match &event.fact {
            Fact::ConversationStarted(started) => {
                if conversations.contains_key(&started.conversation_id) {
                    continue;
                }
                let row = ConversationRow {
                    conversation_id: started.conversation_id,
                    account_id: event.account_id.clone(),
                    inbox_id: started.inbox_id.clone(),
                    channel_id: started.channel_id.clone(),
                    channel_type: started.channel_type.to_owned(),
                    thread_key: started.thread_key.clone(),
                    contact_external_id: started.contact_external_id.clone(),
                    contact_name: started.contact_name.clone(),
                    started_at: event.occurred_at,
                    open: true,
                    assignee_id: None,
                    message_count: 0,
                    last_message_at: event.occurred_at,
                    updated_at: event.recorded_at,
                    closed_at: None,
                    ticket_id: None,
                    reply_window_ends_at: None,
                    contact_id: started.contact_id,
                    subject: String::new(),
                };
                changes.push(change(&row, "started"));
                conversations.insert(started.conversation_id, FoldedConversation { new: true, dirty: true, row });
            }
            Fact::MessageAppended(message) => {
                if !claimed.message_ids.remove(&message.message_id) {
                    continue;
                }
                let Some(conversation) = conversations.get_mut(&message.conversation_id) else { continue };
                let row = &mut conversation.row;
                row.message_count += 1;
                row.last_message_at = row.last_message_at.max(event.occurred_at);
                row.updated_at = row.updated_at.max(event.recorded_at);
                if reply_window::has_reply_window_named(&row.channel_type) {
                    // Every appended message is the customer's (agents' replies are not events
                    // of this log): the window runs from the latest one.
                    let ends_at = reply_window::standard_window_ends_at(event.occurred_at);
                    row.reply_window_ends_at =
                        Some(row.reply_window_ends_at.map_or(ends_at, |current| current.max(ends_at)));
                }
                if row.contact_id.is_none() {
                    row.contact_id = message.contact_id;
                }
                if row.subject.is_empty() && !message.subject.is_empty() {
                    row.subject = message.subject.clone();
                }
                conversation.dirty = true;
                changes.push(change(row, "message"));
            }
            Fact::Assigned { conversation_id, assignee_id, .. } => {
                if !claimed.decision_event_ids.remove(&event.event_id) {
                    continue;
                }
                let Some(conversation) = conversations.get_mut(conversation_id) else { continue };
                let row = &mut conversation.row;
                if row.open && row.assignee_id.as_deref() != Some(assignee_id) {
                    if let Some(previous) = &row.assignee_id {
                        *workload.entry(workload_key(row, previous)).or_default() -= 1;
                    }
                    *workload.entry(workload_key(row, assignee_id)).or_default() += 1;
                }
                row.assignee_id = Some(assignee_id.clone());
                row.updated_at = row.updated_at.max(event.recorded_at);
                conversation.dirty = true;
                changes.push(change(row, "assigned"));
            }
            Fact::LeftUnassigned { conversation_id, reason, explanation } => {
                if !claimed.decision_event_ids.remove(&event.event_id) {
                    continue;
                }
                let inbox_id = conversations
                    .get(conversation_id)
                    .map(|conversation| conversation.row.inbox_id.clone())
                    .unwrap_or_default();
                left_unassigned_audits.push(AuditRow {
                    event_id: &event.event_id,
                    account_id: &event.account_id,
                    kind: "left_unassigned",
                    reason,
                    channel_id: explanation.channel_id.clone(),
                    inbox_id,
                    conversation_id: Some(*conversation_id),
                    message_id: None,
                    detail: &explanation.json,
                    at: event.recorded_at,
                });
            }
            Fact::Unassigned { conversation_id, .. } => {
                if !claimed.decision_event_ids.remove(&event.event_id) {
                    continue;
                }
                let Some(conversation) = conversations.get_mut(conversation_id) else { continue };
                let row = &mut conversation.row;
                if row.open
                    && let Some(previous) = row.assignee_id.take()
                {
                    *workload.entry(workload_key(row, &previous)).or_default() -= 1;
                }
                row.assignee_id = None;
                row.updated_at = row.updated_at.max(event.recorded_at);
                conversation.dirty = true;
                changes.push(change(row, "unassigned"));
            }
            Fact::Closed { conversation_id, .. } => {
                if !claimed.keyless_event_ids.remove(&event.event_id) {
                    continue;
                }
                let Some(conversation) = conversations.get_mut(conversation_id) else { continue };
                let row = &mut conversation.row;
                if row.open {
                    if let Some(assignee) = &row.assignee_id {
                        *workload.entry(workload_key(row, assignee)).or_default() -= 1;
                    }
                    row.open = false;
                    row.closed_at = Some(event.occurred_at);
                }
                row.updated_at = row.updated_at.max(event.recorded_at);
                conversation.dirty = true;
                changes.push(change(row, "closed"));
            }
            Fact::TicketCreated(ticket) => {
                if !claimed.ticket_ids.remove(&ticket.ticket_id) {
                    continue;
                }
                let Some(conversation) = conversations.get_mut(&ticket.conversation_id) else { continue };
                let row = &mut conversation.row;
                row.ticket_id = Some(ticket.ticket_id);
                row.updated_at = row.updated_at.max(event.recorded_at);
                conversation.dirty = true;
                changes.push(change(row, "ticket"));
            }
            Fact::TicketStageChanged { ticket_id, conversation_id, stage, closed } => {
                if !claimed.keyless_event_ids.remove(&event.event_id) {
                    continue;
                }
                ticket_stages.insert(
                    *ticket_id,
                    TicketStageUpdate { ticket_id: *ticket_id, stage, closed: *closed, at: event.recorded_at },
                );
                if let Some(conversation_id) = conversation_id
                    && let Some(conversation) = conversations.get_mut(conversation_id)
                {
                    let row = &mut conversation.row;
                    row.updated_at = row.updated_at.max(event.recorded_at);
                    conversation.dirty = true;
                    changes.push(change(row, "ticket"));
                }
            }
            Fact::ContactOwnerChanged { contact_id, owner_agent_id } => {
                if claimed.keyless_event_ids.remove(&event.event_id) {
                    contact_owners.insert(*contact_id, owner_agent_id.as_deref());
                }
            }
            Fact::Audit(audit) => {
                let (inbox_id, channel_id) = audit
                    .conversation_id
                    .and_then(|id| conversations.get(&id))
                    .map(|conversation| (conversation.row.inbox_id.clone(), conversation.row.channel_id.clone()))
                    .unwrap_or_default();
                let channel_id = if audit.channel_id.is_empty() { channel_id } else { audit.channel_id.clone() };
                let inbox_id = if inbox_id.is_empty() { audit.inbox_id.clone() } else { inbox_id };
                audits.push(AuditRow {
                    event_id: &event.event_id,
                    account_id: &event.account_id,
                    kind: audit.kind,
                    reason: &audit.reason,
                    channel_id,
                    inbox_id,
                    conversation_id: audit.conversation_id,
                    message_id: audit.message_id,
                    detail: &audit.detail,
                    at: event.recorded_at,
                });
            }
            Fact::OutboundQueued(queued) => {
                // The message row is inserted by the shell (owner notifications go to their own
                // table and are no conversation's message).
                if queued.owner_notification || !claimed.message_ids.remove(&queued.reply_id) {
                    continue;
                }
                let Some(conversation_id) = queued.conversation_id else { continue };
                let agent_at = (queued.author.kind == "agent").then_some(event.recorded_at);
                reply_to(ConversationReply {
                    conversation_id,
                    updated_at: event.recorded_at,
                    first_response_at: agent_at,
                    last_agent_reply_at: agent_at,
                });
                changes.push(Change {
                    account_id: &event.account_id,
                    inbox_id: queued.inbox_id.clone(),
                    conversation_id,
                    kind: "reply",
                    event_id: &event.event_id,
                    at: event.recorded_at,
                });
            }
            Fact::NoteAdded(note) => {
                if !claimed.message_ids.remove(&note.note_id) {
                    continue;
                }
                reply_to(ConversationReply {
                    conversation_id: note.conversation_id,
                    updated_at: event.recorded_at,
                    first_response_at: None,
                    last_agent_reply_at: None,
                });
                changes.push(Change {
                    account_id: &event.account_id,
                    inbox_id: note.inbox_id.clone(),
                    conversation_id: note.conversation_id,
                    kind: "note",
                    event_id: &event.event_id,
                    at: event.recorded_at,
                });
            }
            // Steps and states: `fold_outbound` below.
            Fact::DeliveryAttempt(_) | Fact::DeliveryStatus(_) => {}
            // Contacts are written by their idempotency insert alone; config facts below.
            Fact::ContactCreated(_) => {}
            Fact::Inbox(_)
            | Fact::Channel(_)
            | Fact::RoutingRules { .. }
            | Fact::TicketSettings { .. }
            | Fact::Agent(_)
            | Fact::RouterStateEcho
            | Fact::Tombstone { .. } => {}
        }
    }

    // Sorted by id: two instances touching rows in the same order cannot deadlock. The ids are
    // sorted rather than the rows, which are large to move.
    let mut dirty_ids: Vec<Uuid> =
        conversations.iter().filter(|(_, conversation)| conversation.dirty).map(|(id, _)| *id).collect();
    dirty_ids.sort_unstable();
    let mut new_conversations = Vec::new();
    let mut updated_conversations = Vec::with_capacity(dirty_ids.len());
    for id in dirty_ids {
        let Some(conversation) = conversations.remove(&id) else { continue };
        if conversation.new {
            new_conversations.push(conversation.row);
        } else {
            updated_conversations.push(conversation.row);
        }
    }
    audits.append(&mut left_unassigned_audits);
    Writes {
        new_conversations,
        updated_conversations,
        workload_deltas: workload
            .into_iter()
            .filter(|(_, delta)| *delta != 0)
            .map(|(key, delta)| WorkloadDelta { key, delta })
            .collect(),
        ticket_stages: ticket_stages.into_values().collect(),
        contact_owners: contact_owners
            .into_iter()
            .map(|(contact_id, owner_agent_id_opt)| ContactOwner { contact_id, owner_agent_id_opt })
            .collect(),
        audits,
        changes,
        config: fold_config(events),
        conversation_replies: conversation_replies.into_values().collect(),
        outbound: fold_outbound(events, outbound),
        sources: sources
            .into_iter()
            .map(|((topic, partition), next_offset)| SourcePosition { topic, partition, next_offset })
            .collect(),
    }
}

/// The workload row an assignment of `conversation` to `agent_id` counts in.
fn workload_key(conversation: &ConversationRow, agent_id: &str) -> WorkloadKey {
    WorkloadKey {
        account_id: conversation.account_id.clone(),
        agent_id: agent_id.to_owned(),
        channel_type: conversation.channel_type.clone(),
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, TimeZone};
    use serde_json::json;

    use super::*;
    use crate::facts::{
        Audit, AuthorFact, ConversationStarted, Explanation, InboxRow, MessageAppended, NoteAdded, TicketCreated,
    };
    use crate::outbound::memory::MemoryOutbound;
    use crate::outbound::tests as outbound_events;

    const ACCOUNT: &str = "acme";

    fn at(second: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + second, 0).unwrap()
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    /// An event recorded one second after it occurred, at `second`.
    fn event(event_id: &str, second: i64, fact: Fact) -> Event {
        Event {
            event_id: event_id.to_owned(),
            account_id: ACCOUNT.to_owned(),
            occurred_at: at(second),
            recorded_at: at(second + 1),
            trace_id: String::new(),
            source: None,
            fact,
        }
    }

    fn started(conversation: u128, channel_type: &'static str) -> Fact {
        Fact::ConversationStarted(ConversationStarted {
            conversation_id: id(conversation),
            inbox_id: "inbox-1".into(),
            channel_id: "channel-1".into(),
            channel_type,
            thread_key: "thread".into(),
            contact_external_id: "+15550100".into(),
            contact_name: "Ada".into(),
            contact_id: None,
        })
    }

    fn message(conversation: u128, message_id: u128, subject: &str) -> Fact {
        Fact::MessageAppended(Box::new(MessageAppended {
            conversation_id: id(conversation),
            message_id: id(message_id),
            provider_message_id: String::new(),
            channel_id: "channel-1".into(),
            sender_external_id: "+15550100".into(),
            sender_name: "Ada".into(),
            body: "hello".into(),
            source_event_id: String::new(),
            contact_id: Some(id(900)),
            kind: "text",
            subject: subject.into(),
            content: json!({}),
            hidden_fields: json!([]),
        }))
    }

    fn assigned(conversation: u128, agent: &str) -> Fact {
        Fact::Assigned {
            conversation_id: id(conversation),
            assignee_id: agent.into(),
            explanation: Explanation::default(),
        }
    }

    fn closed(conversation: u128) -> Fact {
        Fact::Closed { conversation_id: id(conversation), reason: "closed_by_agent", actor: json!({}) }
    }

    fn stored(conversation: u128, channel_type: &str, assignee_id: Option<&str>) -> StoredConversation {
        StoredConversation {
            conversation_id: id(conversation),
            account_id: ACCOUNT.into(),
            inbox_id: "inbox-1".into(),
            channel_id: "channel-1".into(),
            channel_type: channel_type.into(),
            status: "open".into(),
            assignee_id: assignee_id.map(str::to_owned),
            message_count: 3,
            last_message_at: at(-100),
            updated_at: at(-100),
            closed_at: None,
            ticket_id: None,
            reply_window_ends_at: None,
            contact_id: None,
            subject: String::new(),
        }
    }

    /// What the idempotency inserts report when every key of the batch is seen for the first time.
    fn all_new(events: &[&Event]) -> Claimed {
        let mut claimed = Claimed::default();
        for event in events {
            match &event.fact {
                Fact::MessageAppended(message) => {
                    claimed.message_ids.insert(message.message_id);
                }
                Fact::Assigned { .. } | Fact::LeftUnassigned { .. } | Fact::Unassigned { .. } => {
                    claimed.decision_event_ids.insert(event.event_id.clone());
                }
                Fact::Closed { .. } | Fact::TicketStageChanged { .. } | Fact::ContactOwnerChanged { .. } => {
                    claimed.keyless_event_ids.insert(event.event_id.clone());
                }
                Fact::TicketCreated(ticket) => {
                    claimed.ticket_ids.insert(ticket.ticket_id);
                }
                Fact::OutboundQueued(queued) if !queued.owner_notification => {
                    claimed.message_ids.insert(queued.reply_id);
                }
                Fact::NoteAdded(note) => {
                    claimed.message_ids.insert(note.note_id);
                }
                _ => {}
            }
        }
        claimed
    }

    /// When the batch is folded with these stored conversations, every key new.
    fn fold_new<'a>(events: &'a [&'a Event], stored: Vec<StoredConversation>) -> Writes<'a> {
        let stored_conversations = stored.into_iter().map(|row| (row.conversation_id, row)).collect();
        fold_batch(BatchInput { events, stored_conversations, claimed: all_new(events), ..Default::default() })
    }

    fn change_kinds(writes: &Writes<'_>) -> Vec<&'static str> {
        writes.changes.iter().map(|change| change.kind).collect()
    }

    fn workload<'w>(writes: &'w Writes<'_>) -> Vec<(&'w str, i32)> {
        writes.workload_deltas.iter().map(|delta| (delta.key.agent_id.as_str(), delta.delta)).collect()
    }

    #[test]
    fn an_empty_batch_writes_nothing() {
        assert_eq!(fold_new(&[], vec![]), Writes::default());
    }

    #[test]
    fn a_started_conversation_is_inserted_open_with_its_messages_counted() {
        // Given a conversation started and a message appended in the same batch
        let start = event("e1", 0, started(1, "chat"));
        let first = event("e2", 5, message(1, 11, "Order 42"));
        let events = [&start, &first];
        // When folded
        let writes = fold_new(&events, vec![]);
        // Then one new open row, carrying the message, and two changes in log order
        assert_eq!(writes.new_conversations.len(), 1);
        assert!(writes.updated_conversations.is_empty());
        let row = &writes.new_conversations[0];
        assert_eq!(row.conversation_id, id(1));
        assert_eq!(row.status(), "open");
        assert_eq!(row.started_at, at(0));
        assert_eq!(row.message_count, 1);
        assert_eq!(row.last_message_at, at(5));
        assert_eq!(row.updated_at, at(6));
        assert_eq!(row.contact_id, Some(id(900)));
        assert_eq!(row.subject, "Order 42");
        assert_eq!(row.reply_window_ends_at, None, "chat has no reply window");
        assert_eq!(change_kinds(&writes), ["started", "message"]);
        assert_eq!(writes.changes[1].event_id, "e2");
        assert_eq!(writes.changes[1].inbox_id, "inbox-1");
    }

    #[test]
    fn a_message_updates_a_stored_conversation_and_opens_the_reply_window() {
        // Given a stored WhatsApp conversation with a subject already
        let mut whatsapp = stored(1, "whatsapp", None);
        whatsapp.subject = "first subject".into();
        let later = event("e1", 10, message(1, 11, "second subject"));
        let events = [&later];
        // When a message is appended
        let writes = fold_new(&events, vec![whatsapp]);
        // Then the row is updated: counted, window 24 h from the message, subject kept
        assert!(writes.new_conversations.is_empty());
        let row = &writes.updated_conversations[0];
        assert_eq!(row.message_count, 4);
        assert_eq!(row.last_message_at, at(10));
        assert_eq!(row.reply_window_ends_at, Some(at(10) + Duration::hours(24)));
        assert_eq!(row.subject, "first subject");
        assert_eq!(change_kinds(&writes), ["message"]);
    }

    #[test]
    fn a_message_for_an_unknown_conversation_updates_no_row() {
        let orphan = event("e1", 0, message(7, 11, ""));
        let events = [&orphan];
        let writes = fold_new(&events, vec![]);
        assert_eq!(writes, Writes::default());
    }

    #[test]
    fn an_assignment_moves_one_open_conversation_from_the_previous_assignee() {
        // Given a stored open conversation assigned to ana
        let reassign = event("e1", 0, assigned(1, "bob"));
        let events = [&reassign];
        // When it is assigned to bob
        let writes = fold_new(&events, vec![stored(1, "chat", Some("ana"))]);
        // Then ana loses one, bob gains one, sorted by (account, agent, channel type)
        assert_eq!(workload(&writes), [("ana", -1), ("bob", 1)]);
        assert_eq!(writes.workload_deltas[0].key.channel_type, "chat");
        assert_eq!(writes.updated_conversations[0].assignee_id.as_deref(), Some("bob"));
        assert_eq!(change_kinds(&writes), ["assigned"]);
    }

    #[test]
    fn an_assignment_and_its_close_in_one_batch_leave_the_workload_unchanged() {
        // Given a conversation started, assigned and closed in one batch
        let start = event("e1", 0, started(1, "chat"));
        let assign = event("e2", 1, assigned(1, "ana"));
        let close = event("e3", 2, closed(1));
        let events = [&start, &assign, &close];
        let writes = fold_new(&events, vec![]);
        // Then no workload row moves (the +1 and -1 cancel), and the row is inserted closed
        assert!(writes.workload_deltas.is_empty());
        let row = &writes.new_conversations[0];
        assert_eq!(row.status(), "closed");
        assert_eq!(row.closed_at, Some(at(2)));
        assert_eq!(row.assignee_id.as_deref(), Some("ana"));
        assert_eq!(change_kinds(&writes), ["started", "assigned", "closed"]);
    }

    #[test]
    fn closing_a_closed_conversation_keeps_its_close_time_and_the_workload() {
        let mut already_closed = stored(1, "chat", Some("ana"));
        already_closed.status = "closed".into();
        already_closed.closed_at = Some(at(-50));
        let close = event("e1", 0, closed(1));
        let events = [&close];
        let writes = fold_new(&events, vec![already_closed]);
        assert!(writes.workload_deltas.is_empty());
        assert_eq!(writes.updated_conversations[0].closed_at, Some(at(-50)));
        assert_eq!(writes.updated_conversations[0].updated_at, at(1));
    }

    #[test]
    fn a_manual_unassign_frees_the_assignee() {
        let unassign = event("e1", 0, Fact::Unassigned { conversation_id: id(1), actor: json!({}) });
        let events = [&unassign];
        let writes = fold_new(&events, vec![stored(1, "chat", Some("ana"))]);
        assert_eq!(workload(&writes), [("ana", -1)]);
        assert_eq!(writes.updated_conversations[0].assignee_id, None);
        assert_eq!(change_kinds(&writes), ["unassigned"]);
    }

    #[test]
    fn tickets_link_to_their_conversation_and_the_last_stage_change_wins() {
        // Given a ticket created on a stored conversation, then moved twice
        let create = event(
            "e1",
            0,
            Fact::TicketCreated(TicketCreated {
                ticket_id: id(50),
                conversation_id: id(1),
                contact_id: None,
                inbox_id: "inbox-1".into(),
                channel_id: "channel-1".into(),
                pipeline: "support".into(),
                stage: "new".into(),
                owner_agent_id: None,
                owner_source: "none",
                name: "Broken".into(),
                description: String::new(),
            }),
        );
        let stage = |event_id: &str, second, stage: &str, closed| {
            event(
                event_id,
                second,
                Fact::TicketStageChanged {
                    ticket_id: id(50),
                    conversation_id: Some(id(1)),
                    stage: stage.into(),
                    closed,
                },
            )
        };
        let working = stage("e2", 1, "working", false);
        let done = stage("e3", 2, "done", true);
        let events = [&create, &working, &done];
        let writes = fold_new(&events, vec![stored(1, "chat", None)]);
        // Then the conversation points at the ticket, and one stage update says "done"
        assert_eq!(writes.updated_conversations[0].ticket_id, Some(id(50)));
        assert_eq!(
            writes.ticket_stages,
            [TicketStageUpdate { ticket_id: id(50), stage: "done", closed: true, at: at(3) }]
        );
        assert_eq!(change_kinds(&writes), ["ticket", "ticket", "ticket"]);
    }

    #[test]
    fn the_last_owner_change_of_a_contact_wins() {
        let owner = |event_id: &str, agent: Option<&str>| {
            event(
                event_id,
                0,
                Fact::ContactOwnerChanged { contact_id: id(9), owner_agent_id: agent.map(str::to_owned) },
            )
        };
        let first = owner("e1", Some("ana"));
        let second = owner("e2", None);
        let events = [&first, &second];
        let writes = fold_new(&events, vec![]);
        assert_eq!(writes.contact_owners, [ContactOwner { contact_id: id(9), owner_agent_id_opt: None }]);
    }

    #[test]
    fn audits_take_the_conversation_inbox_and_left_unassigned_audits_come_last() {
        // Given a left-unassigned decision before a withheld-message audit
        let left = event(
            "e1",
            0,
            Fact::LeftUnassigned {
                conversation_id: id(1),
                reason: "no_agent_available",
                explanation: Explanation {
                    channel_id: "channel-9".into(),
                    json: json!({"why": 1}),
                    ..Default::default()
                },
            },
        );
        let withheld = event(
            "e2",
            1,
            Fact::Audit(Audit {
                kind: "message_withheld",
                reason: "blocked".into(),
                channel_id: String::new(),
                inbox_id: "inbox-from-event".into(),
                conversation_id: Some(id(1)),
                message_id: Some(id(11)),
                detail: json!({}),
            }),
        );
        let events = [&left, &withheld];
        let writes = fold_new(&events, vec![stored(1, "chat", None)]);
        // Then both rows carry the conversation's inbox; the audit fills its channel from it
        let summary: Vec<(&str, &str, &str, &str)> = writes
            .audits
            .iter()
            .map(|audit| (audit.event_id, audit.kind, audit.inbox_id.as_str(), audit.channel_id.as_str()))
            .collect();
        assert_eq!(
            summary,
            [("e2", "message_withheld", "inbox-1", "channel-1"), ("e1", "left_unassigned", "inbox-1", "channel-9")]
        );
        assert_eq!(writes.audits[1].reason, "no_agent_available");
        assert!(writes.updated_conversations.is_empty(), "audits change no conversation");
    }

    #[test]
    fn an_audit_without_a_conversation_keeps_the_inbox_it_names() {
        let withheld = event(
            "e1",
            0,
            Fact::Audit(Audit {
                kind: "message_withheld",
                reason: "unknown_channel".into(),
                channel_id: "channel-2".into(),
                inbox_id: "inbox-2".into(),
                conversation_id: None,
                message_id: None,
                detail: json!({}),
            }),
        );
        let events = [&withheld];
        let writes = fold_new(&events, vec![]);
        assert_eq!(
            (writes.audits[0].inbox_id.as_str(), writes.audits[0].channel_id.as_str()),
            ("inbox-2", "channel-2")
        );
    }

    #[test]
    fn source_positions_are_one_past_the_highest_offset_per_partition() {
        let with_source = |event_id: &str, partition, offset| {
            let mut echo = event(event_id, 0, Fact::RouterStateEcho);
            echo.source = Some(("inbound.v1".into(), partition, offset));
            echo
        };
        let (a, b, c) = (with_source("e1", 1, 7), with_source("e2", 0, 3), with_source("e3", 1, 5));
        let events = [&a, &b, &c];
        let writes = fold_new(&events, vec![]);
        assert_eq!(
            writes.sources,
            [
                SourcePosition { topic: "inbound.v1", partition: 0, next_offset: 4 },
                SourcePosition { topic: "inbound.v1", partition: 1, next_offset: 8 },
            ]
        );
        assert!(writes.changes.is_empty());
    }

    #[test]
    fn config_keeps_the_last_event_per_entity_and_tombstones_delete() {
        let inbox = |event_id: &str, inbox_id: &str, name: &str| {
            event(
                event_id,
                0,
                Fact::Inbox(InboxRow {
                    inbox_id: inbox_id.into(),
                    name: name.into(),
                    kind: "shared",
                    access_mode: "everyone",
                    access_user_ids: vec![],
                    access_team_ids: vec![],
                }),
            )
        };
        let tombstone = |event_id: &str, kind: &str, id: &str| {
            event(
                event_id,
                0,
                Fact::Tombstone { kind: kind.into(), account_id_opt: Some(ACCOUNT.into()), id: id.into() },
            )
        };
        // Given: inbox b renamed twice, inbox a created then deleted, rules deleted (alias
        // kind), and a tombstone of an unknown kind
        let events_owned = [
            inbox("e1", "b", "Sales"),
            inbox("e2", "a", "Support"),
            tombstone("e3", "inbox", "a"),
            inbox("e4", "b", "Sales EU"),
            tombstone("e5", "routing_rules", "channel-1"),
            tombstone("e6", "widget", "w"),
        ];
        let events: Vec<&Event> = events_owned.iter().collect();
        let writes = fold_new(&events, vec![]);
        // Then one write per entity, in (table, account, id, part) order
        assert_eq!(
            writes.config,
            [
                ConfigWrite::Delete { kind: "rules", account_id_opt: Some(ACCOUNT), id: "channel-1" },
                ConfigWrite::Delete { kind: "inbox", account_id_opt: Some(ACCOUNT), id: "a" },
                ConfigWrite::Upsert(&events_owned[3]),
            ]
        );
        assert!(writes.changes.is_empty() && writes.new_conversations.is_empty());
    }

    #[test]
    fn a_legacy_tombstone_deletes_in_every_account() {
        let legacy = event("e1", 0, Fact::Tombstone { kind: "agent".into(), account_id_opt: None, id: "ana".into() });
        let events = [&legacy];
        let writes = fold_new(&events, vec![]);
        assert_eq!(writes.config, [ConfigWrite::Delete { kind: "agent", account_id_opt: None, id: "ana" }]);
    }

    #[test]
    fn a_started_event_for_a_stored_conversation_changes_nothing() {
        let start = event("e1", 0, started(1, "chat"));
        let events = [&start];
        let writes = fold_new(&events, vec![stored(1, "chat", None)]);
        assert_eq!(writes, Writes::default());
    }

    #[test]
    fn events_whose_keys_were_not_new_change_nothing() {
        // Given events applied before (redelivered): the idempotency inserts claim none of them
        let message_again = event("e1", 0, message(1, 11, "x"));
        let assign_again = event("e2", 1, assigned(1, "bob"));
        let close_again = event("e3", 2, closed(1));
        let owner_again = event("e4", 3, Fact::ContactOwnerChanged { contact_id: id(9), owner_agent_id: None });
        let events = [&message_again, &assign_again, &close_again, &owner_again];
        let stored_conversations = HashMap::from([(id(1), stored(1, "chat", Some("ana")))]);
        // When folded
        let writes = fold_batch(BatchInput {
            events: &events,
            stored_conversations,
            claimed: Claimed::default(),
            ..Default::default()
        });
        // Then no write at all
        assert_eq!(writes, Writes::default());
    }

    #[test]
    fn a_key_repeated_within_a_batch_is_applied_once() {
        // Given the same message published twice in one batch
        let once = event("e1", 0, message(1, 11, ""));
        let twice = event("e2", 0, message(1, 11, ""));
        let events = [&once, &twice];
        let writes = fold_new(&events, vec![stored(1, "chat", None)]);
        assert_eq!(writes.updated_conversations[0].message_count, 4);
        assert_eq!(change_kinds(&writes), ["message"]);
    }

    #[test]
    fn folding_a_batch_again_after_it_was_written_changes_no_conversation() {
        // Given a batch folded once and its rows stored
        let start = event("e1", 0, started(1, "whatsapp"));
        let first = event("e2", 1, message(1, 11, "hi"));
        let assign = event("e3", 2, assigned(1, "ana"));
        let events = [&start, &first, &assign];
        let once = fold_new(&events, vec![]);
        let written = stored_from(&once.new_conversations[0]);
        // When the same batch is read again (the inserts now claim nothing)
        let stored_conversations = HashMap::from([(id(1), written)]);
        let again = fold_batch(BatchInput {
            events: &events,
            stored_conversations,
            claimed: Claimed::default(),
            ..Default::default()
        });
        // Then nothing is written
        assert_eq!(again, Writes::default());
    }

    fn note(event_id: &str, second: i64, note: u128) -> Event {
        event(
            event_id,
            second,
            Fact::NoteAdded(Box::new(NoteAdded {
                note_id: id(note),
                conversation_id: id(1),
                inbox_id: "inbox-1".into(),
                author: outbound_events::agent(),
                text: "call them back".into(),
            })),
        )
    }

    fn automation(name: &'static str) -> AuthorFact {
        AuthorFact { kind: "automation", agent_id: String::new(), name: "Acme".into(), automation: name }
    }

    #[test]
    fn o5_agent_replies_set_first_response_and_last_agent_reply_at_their_queued_time() {
        // Given two agent replies (recorded at 10 and 30), in one batch, the later one first
        let first = outbound_events::queued("e1", 10, 1, outbound_events::agent(), false);
        let second = outbound_events::queued("e2", 30, 2, outbound_events::agent(), false);
        let events = [&second, &first];
        // When folded
        let writes = fold_new(&events, vec![stored(1, "facebook_messenger", None)]);
        // Then the conversation has the earliest and latest, and two "reply" changes
        let reply = &writes.conversation_replies[0];
        assert_eq!(reply.first_response_at, Some(outbound_events::at(10)));
        assert_eq!(reply.last_agent_reply_at, Some(outbound_events::at(30)));
        assert_eq!(reply.updated_at, outbound_events::at(30));
        assert!(writes.updated_conversations.is_empty(), "replies are not customer messages: no count moves");
        assert_eq!(change_kinds(&writes), ["reply", "reply"]);
    }

    #[test]
    fn o5_automated_messages_and_notes_are_not_responses() {
        let greeting = outbound_events::queued("e1", 10, 1, automation("greeting"), false);
        let internal = note("e2", 20, 77);
        let events = [&greeting, &internal];
        let writes = fold_new(&events, vec![stored(1, "facebook_messenger", None)]);
        let reply = &writes.conversation_replies[0];
        assert_eq!((reply.first_response_at, reply.last_agent_reply_at), (None, None));
        assert_eq!(reply.updated_at, at(21), "the note's recorded time");
        assert_eq!(change_kinds(&writes), ["reply", "note"]);
    }

    #[test]
    fn r4_an_owner_notification_changes_no_conversation() {
        let notify = outbound_events::queued("e1", 10, 1, automation("owner_notification"), true);
        let events = [&notify];
        let writes = fold_new(&events, vec![stored(1, "facebook_messenger", None)]);
        assert!(writes.conversation_replies.is_empty() && writes.changes.is_empty());
        assert_eq!(writes.outbound.summaries.len(), 1, "its delivery is still tracked");
    }

    /// The read models as the shell leaves them, kept in memory: what the idempotency inserts
    /// claimed, the conversations and workload rows (with the statements' semantics), and the
    /// change feed.
    #[derive(Debug, Default)]
    struct MemoryReadModels {
        message_ids: HashSet<Uuid>,
        event_ids: HashSet<String>,
        conversations: HashMap<Uuid, StoredConversation>,
        workload: BTreeMap<WorkloadKey, i32>,
        changes: Vec<(Uuid, &'static str, String)>,
        outbound: MemoryOutbound,
        /// The columns replies and notes merge into (`updated_at` is merged into the row).
        replies: BTreeMap<Uuid, ConversationReply>,
    }

    impl MemoryReadModels {
        fn apply(&mut self, events: &[&Event]) {
            // As the inserts do: the first event of a key, in this batch or before, claims it
            // (each guard records the key).
            let mut claimed = Claimed::default();
            for event in events {
                match &event.fact {
                    Fact::MessageAppended(message) if self.message_ids.insert(message.message_id) => {
                        claimed.message_ids.insert(message.message_id);
                    }
                    Fact::Assigned { .. } | Fact::Unassigned { .. }
                        if self.event_ids.insert(event.event_id.clone()) =>
                    {
                        claimed.decision_event_ids.insert(event.event_id.clone());
                    }
                    Fact::Closed { .. } if self.event_ids.insert(event.event_id.clone()) => {
                        claimed.keyless_event_ids.insert(event.event_id.clone());
                    }
                    Fact::OutboundQueued(queued)
                        if !queued.owner_notification && self.message_ids.insert(queued.reply_id) =>
                    {
                        claimed.message_ids.insert(queued.reply_id);
                    }
                    Fact::NoteAdded(note) if self.message_ids.insert(note.note_id) => {
                        claimed.message_ids.insert(note.note_id);
                    }
                    _ => {}
                }
            }
            self.outbound.insert_messages(events);
            let writes = fold_batch(BatchInput {
                events,
                stored_conversations: self.conversations.clone(),
                claimed,
                outbound: self.outbound.stored(),
            });
            self.outbound.write(&writes.outbound);
            for reply in &writes.conversation_replies {
                // As the merging UPDATE: only stored conversations change.
                if let Some(stored) = self.conversations.get_mut(&reply.conversation_id) {
                    stored.updated_at = stored.updated_at.max(reply.updated_at);
                    self.replies
                        .entry(reply.conversation_id)
                        .and_modify(|kept| kept.merge(reply))
                        .or_insert(reply.clone());
                }
            }
            for row in writes.new_conversations {
                self.conversations.entry(row.conversation_id).or_insert_with(|| stored_from(&row));
            }
            for row in writes.updated_conversations {
                // An updated row carries the stored identifying columns unchanged.
                let stored = self.conversations.get_mut(&row.conversation_id).expect("updates stored rows only");
                *stored = stored_from(&row);
            }
            let any_decrement = writes.workload_deltas.iter().any(|delta| delta.delta < 0);
            for WorkloadDelta { key, delta } in writes.workload_deltas {
                self.workload.entry(key).and_modify(|count| *count = (*count + delta).max(0)).or_insert(delta);
            }
            if any_decrement {
                self.workload.retain(|_, count| *count > 0);
            }
            self.changes.extend(
                writes.changes.iter().map(|change| (change.conversation_id, change.kind, change.event_id.to_owned())),
            );
        }
    }

    fn stored_from(row: &ConversationRow) -> StoredConversation {
        StoredConversation {
            conversation_id: row.conversation_id,
            account_id: row.account_id.clone(),
            inbox_id: row.inbox_id.clone(),
            channel_id: row.channel_id.clone(),
            channel_type: row.channel_type.clone(),
            status: row.status().to_owned(),
            assignee_id: row.assignee_id.clone(),
            message_count: row.message_count,
            last_message_at: row.last_message_at,
            updated_at: row.updated_at,
            closed_at: row.closed_at,
            ticket_id: row.ticket_id,
            reply_window_ends_at: row.reply_window_ends_at,
            contact_id: row.contact_id,
            subject: row.subject.clone(),
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// One event of a small log: two conversations (one with a reply window), two agents,
        /// messages that may be published twice.
        fn fact_strategy() -> impl Strategy<Value = Fact> {
            let conversation = 1u128..=2;
            let agent = prop_oneof![Just("ana"), Just("bob")];
            prop_oneof![
                conversation.clone().prop_map(|c| started(c, if c == 1 { "whatsapp" } else { "chat" })),
                (conversation.clone(), 10u128..16).prop_map(|(c, m)| message(c, m, "subject")),
                (conversation.clone(), agent).prop_map(|(c, agent)| assigned(c, agent)),
                conversation.clone().prop_map(|c| Fact::Unassigned { conversation_id: id(c), actor: json!({}) }),
                conversation.prop_map(closed),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

            /// However the log is cut into batches, the conversations, the workload and the
            /// change feed end the same (and reading it all again changes nothing).
            #[test]
            fn cutting_the_log_into_batches_does_not_change_the_read_models(
                facts in proptest::collection::vec(fact_strategy(), 0..40),
                cuts in proptest::collection::btree_set(0usize..40, 0..6),
            ) {
                let log: Vec<Event> = facts
                    .into_iter()
                    .enumerate()
                    .map(|(index, fact)| event(&format!("e{index}"), index as i64, fact))
                    .collect();
                let events: Vec<&Event> = log.iter().collect();
                let mut whole = MemoryReadModels::default();
                whole.apply(&events);

                let mut batched = MemoryReadModels::default();
                let mut start = 0;
                for cut in cuts.into_iter().filter(|cut| *cut < events.len()).chain([events.len()]) {
                    batched.apply(&events[start..cut]);
                    start = cut;
                }
                prop_assert_eq!(&batched.conversations, &whole.conversations);
                prop_assert_eq!(&batched.workload, &whole.workload);
                prop_assert_eq!(&batched.changes, &whole.changes);

                let changes_before = whole.changes.len();
                let outbound_before = whole.outbound.clone();
                let conversations_before = whole.conversations.clone();
                whole.apply(&events);
                prop_assert_eq!(whole.changes.len(), changes_before);
                prop_assert_eq!(whole.conversations, conversations_before);
                prop_assert_eq!(whole.outbound, outbound_before);
            }

            /// O5: a reply's events arrive on three topics read independently. Whatever the
            /// order, the batching and the repeats, the read models end as if each event had been
            /// applied once in log order: messages' states and histories, statuses kept,
            /// conversations (first response, last agent reply) and the change feed (as a set).
            #[test]
            fn o5_any_interleaving_of_outbound_events_gives_the_same_read_model(
                picks in proptest::collection::vec(0usize..OUTBOUND_LOG_LEN, 0..40),
                cuts in proptest::collection::btree_set(0usize..40, 0..8),
            ) {
                let log = outbound_log();
                let mut canonical_indexes: Vec<usize> = picks.clone();
                canonical_indexes.sort_unstable();
                canonical_indexes.dedup();
                let canonical: Vec<&Event> = canonical_indexes.iter().map(|index| &log[*index]).collect();
                let mut expected = memory_with_conversation();
                expected.apply(&canonical);

                let interleaved: Vec<&Event> = picks.iter().map(|index| &log[*index]).collect();
                let mut actual = memory_with_conversation();
                let mut start = 0;
                for cut in cuts.into_iter().filter(|cut| *cut < interleaved.len()).chain([interleaved.len()]) {
                    if cut >= start {
                        actual.apply(&interleaved[start..cut]);
                        start = cut;
                    }
                }
                prop_assert_eq!(&actual.outbound, &expected.outbound);
                prop_assert_eq!(&actual.conversations, &expected.conversations);
                prop_assert_eq!(&actual.replies, &expected.replies);
                let sorted = |changes: &[(Uuid, &'static str, String)]| {
                    let mut changes = changes.to_vec();
                    changes.sort();
                    changes
                };
                prop_assert_eq!(sorted(&actual.changes), sorted(&expected.changes));
            }
        }

        const OUTBOUND_LOG_LEN: usize = 16;

        /// Three replies (two by agents, one automated), an owner notification and a note to
        /// conversation 1, their attempts (one failed then retried), provider statuses by id
        /// (one an echo, one a failure) and two Messenger read watermarks.
        fn outbound_log() -> Vec<Event> {
            use outbound_events::{agent, attempt, queued, status, watermark};
            let log = vec![
                queued("q1", 10, 1, agent(), false),
                queued("q2", 20, 2, agent(), false),
                queued("q3", 25, 3, automation("instant_reply"), false),
                queued("q9", 26, 9, automation("owner_notification"), true),
                note("n1", 27, 77),
                attempt("a1", 11, 1, 1, false, true),
                attempt("a2", 15, 1, 2, true, false),
                attempt("a3", 21, 2, 1, true, false),
                attempt("a4", 26, 3, 1, true, false),
                attempt("a9", 27, 9, 1, false, false),
                status("s1", 16, 1, "delivered"),
                status("s2", 22, 2, "echo"),
                status("s3", 23, 2, "failed"),
                status("s4", 28, 3, "delivered"),
                watermark("w1", 30, 22),
                watermark("w2", 40, 29),
            ];
            assert_eq!(log.len(), OUTBOUND_LOG_LEN);
            log
        }

        fn memory_with_conversation() -> MemoryReadModels {
            let mut memory = MemoryReadModels::default();
            memory.conversations.insert(id(1), stored(1, "facebook_messenger", Some("ana")));
            memory
        }
    }
}
