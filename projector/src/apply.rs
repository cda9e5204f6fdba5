//! How a batch of events changes the read models, with a handful of bulk statements per batch
//! instead of a few per event.
//!
//! 1. Load the current state of every conversation the batch touches (one `SELECT`).
//! 2. Insert the rows events create, keyed by their natural ids (`ON CONFLICT DO NOTHING
//!    RETURNING`): what comes back is what is new. Events without a natural key are recorded in
//!    `applied_events`. An event seen before (redelivered, or published twice) changes nothing.
//! 3. Fold the new events, in log order, into the in-memory state (counters, assignee,
//!    workload, reply window, change feed).
//! 4. Write the folded state back with multi-row `UNNEST` statements.
//!
//! Everything written is a function of the log (event times, never `now()`), so rebuilding the
//! read models from the log gives identical rows (B4). Cross-topic lookups (e.g. a channel's
//! inbox from the config topic) are avoided on purpose: the relative order of two topics is not
//! reproducible, the order within a partition is.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::facts::{Event, Fact, has_reply_window};

/// Whether the writer announces changes with `pg_notify` (the live projector) or not (a replay
/// into a schema nobody reads yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notify {
    Yes,
    No,
}

/// Counts of what one batch wrote (for logs and metrics).
#[derive(Debug, Default, Clone, Copy)]
pub struct Written {
    pub changes: usize,
}

/// A conversation as the batch sees it: loaded from the table, or started in this batch.
#[derive(Debug, Clone)]
struct Conversation {
    new: bool,
    dirty: bool,
    account_id: String,
    inbox_id: String,
    channel_id: String,
    channel_type: String,
    thread_key: String,
    contact_external_id: String,
    contact_name: String,
    started_at: DateTime<Utc>,
    open: bool,
    assignee_id: Option<String>,
    message_count: i32,
    last_message_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    closed_at: Option<DateTime<Utc>>,
    ticket_id: Option<Uuid>,
    reply_window_ends_at: Option<DateTime<Utc>>,
    contact_id: Option<Uuid>,
    subject: String,
}

type ConversationRow = (
    Uuid,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    i32,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<Uuid>,
    Option<DateTime<Utc>>,
    Option<Uuid>,
    String,
);

struct Change<'a> {
    account_id: &'a str,
    inbox_id: String,
    conversation_id: Uuid,
    kind: &'static str,
    event_id: &'a str,
    at: DateTime<Utc>,
}

/// Applies `events` (already position-checked, in log order per partition) in `transaction`.
pub async fn apply_events(
    transaction: &mut Transaction<'_, Postgres>,
    events: &[&Event],
    notify: Notify,
) -> sqlx::Result<Written> {
    if events.is_empty() {
        return Ok(Written::default());
    }
    let mut conversations = load_conversations(transaction, events).await?;
    let mut new_messages = insert_messages(transaction, events).await?;
    let mut new_decisions = insert_assignments(transaction, events, &conversations).await?;
    let mut new_keyless = insert_applied_events(transaction, events).await?;
    insert_contacts(transaction, events).await?;
    let mut new_tickets = insert_tickets(transaction, events).await?;

    // (account, agent, channel type) -> change in open conversations.
    let mut workload: BTreeMap<(String, String, String), i32> = BTreeMap::new();
    let mut changes: Vec<Change<'_>> = Vec::new();
    let mut ticket_updates: BTreeMap<Uuid, (String, bool, DateTime<Utc>)> = BTreeMap::new();
    let mut owners: BTreeMap<Uuid, Option<String>> = BTreeMap::new();
    let mut audits: Vec<(&Event, &crate::facts::Audit, String, String)> = Vec::new();
    let mut left_unassigned_audits: Vec<(&Event, crate::facts::Audit, String)> = Vec::new();
    let mut sources: BTreeMap<(String, i32), i64> = BTreeMap::new();

    for &event in events {
        if let Some((topic, partition, offset)) = &event.source {
            let next = sources.entry((topic.clone(), *partition)).or_insert(0);
            *next = (*next).max(offset + 1);
        }
        let change = |conversation: &Conversation, conversation_id: Uuid, kind: &'static str| Change {
            account_id: &event.account_id,
            inbox_id: conversation.inbox_id.clone(),
            conversation_id,
            kind,
            event_id: &event.event_id,
            at: event.recorded_at,
        };
        match &event.fact {
            Fact::ConversationStarted(started) => {
                if conversations.contains_key(&started.conversation_id) {
                    continue;
                }
                let conversation = Conversation {
                    new: true,
                    dirty: true,
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
                changes.push(change(&conversation, started.conversation_id, "started"));
                conversations.insert(started.conversation_id, conversation);
            }
            Fact::MessageAppended(message) => {
                if !new_messages.remove(&message.message_id) {
                    continue;
                }
                let Some(conversation) = conversations.get_mut(&message.conversation_id) else { continue };
                conversation.message_count += 1;
                conversation.last_message_at = conversation.last_message_at.max(event.occurred_at);
                conversation.updated_at = conversation.updated_at.max(event.recorded_at);
                if has_reply_window(&conversation.channel_type) {
                    // Every appended message is the customer's (agents' replies are not events
                    // of this log): the window runs 24 h from the latest one.
                    let ends_at = event.occurred_at + Duration::hours(24);
                    conversation.reply_window_ends_at =
                        Some(conversation.reply_window_ends_at.map_or(ends_at, |current| current.max(ends_at)));
                }
                if conversation.contact_id.is_none() {
                    conversation.contact_id = message.contact_id;
                }
                if conversation.subject.is_empty() && !message.subject.is_empty() {
                    conversation.subject = message.subject.clone();
                }
                conversation.dirty = true;
                changes.push(change(conversation, message.conversation_id, "message"));
            }
            Fact::Assigned { conversation_id, assignee_id, .. } => {
                if !new_decisions.remove(&event.event_id) {
                    continue;
                }
                let Some(conversation) = conversations.get_mut(conversation_id) else { continue };
                if conversation.open && conversation.assignee_id.as_deref() != Some(assignee_id) {
                    if let Some(previous) = &conversation.assignee_id {
                        *workload.entry(workload_key(conversation, previous)).or_default() -= 1;
                    }
                    *workload.entry(workload_key(conversation, assignee_id)).or_default() += 1;
                }
                conversation.assignee_id = Some(assignee_id.clone());
                conversation.updated_at = conversation.updated_at.max(event.recorded_at);
                conversation.dirty = true;
                changes.push(change(conversation, *conversation_id, "assigned"));
            }
            Fact::LeftUnassigned { conversation_id, reason, explanation } => {
                if !new_decisions.remove(&event.event_id) {
                    continue;
                }
                let inbox_id = conversations.get(conversation_id).map(|c| c.inbox_id.clone()).unwrap_or_default();
                let audit = crate::facts::Audit {
                    kind: "left_unassigned",
                    reason: (*reason).to_owned(),
                    channel_id: explanation.channel_id.clone(),
                    inbox_id: inbox_id.clone(),
                    conversation_id: Some(*conversation_id),
                    message_id: None,
                    detail: explanation.json.clone(),
                };
                left_unassigned_audits.push((event, audit, inbox_id));
            }
            Fact::Unassigned { conversation_id, .. } => {
                if !new_decisions.remove(&event.event_id) {
                    continue;
                }
                let Some(conversation) = conversations.get_mut(conversation_id) else { continue };
                if conversation.open
                    && let Some(previous) = conversation.assignee_id.take()
                {
                    *workload.entry(workload_key(conversation, &previous)).or_default() -= 1;
                }
                conversation.assignee_id = None;
                conversation.updated_at = conversation.updated_at.max(event.recorded_at);
                conversation.dirty = true;
                changes.push(change(conversation, *conversation_id, "unassigned"));
            }
            Fact::Closed { conversation_id, .. } => {
                if !new_keyless.remove(&event.event_id) {
                    continue;
                }
                let Some(conversation) = conversations.get_mut(conversation_id) else { continue };
                if conversation.open {
                    if let Some(assignee) = &conversation.assignee_id {
                        *workload.entry(workload_key(conversation, assignee)).or_default() -= 1;
                    }
                    conversation.open = false;
                    conversation.closed_at = Some(event.occurred_at);
                }
                conversation.updated_at = conversation.updated_at.max(event.recorded_at);
                conversation.dirty = true;
                changes.push(change(conversation, *conversation_id, "closed"));
            }
            Fact::TicketCreated(ticket) => {
                if !new_tickets.remove(&ticket.ticket_id) {
                    continue;
                }
                let Some(conversation) = conversations.get_mut(&ticket.conversation_id) else { continue };
                conversation.ticket_id = Some(ticket.ticket_id);
                conversation.updated_at = conversation.updated_at.max(event.recorded_at);
                conversation.dirty = true;
                changes.push(change(conversation, ticket.conversation_id, "ticket"));
            }
            Fact::TicketStageChanged { ticket_id, conversation_id, stage, closed } => {
                if !new_keyless.remove(&event.event_id) {
                    continue;
                }
                ticket_updates.insert(*ticket_id, (stage.clone(), *closed, event.recorded_at));
                if let Some(conversation_id) = conversation_id
                    && let Some(conversation) = conversations.get_mut(conversation_id)
                {
                    conversation.updated_at = conversation.updated_at.max(event.recorded_at);
                    conversation.dirty = true;
                    changes.push(change(conversation, *conversation_id, "ticket"));
                }
            }
            Fact::ContactOwnerChanged { contact_id, owner_agent_id } => {
                if new_keyless.remove(&event.event_id) {
                    owners.insert(*contact_id, owner_agent_id.clone());
                }
            }
            Fact::Audit(audit) => {
                let (inbox_id, channel_id) = audit
                    .conversation_id
                    .and_then(|id| conversations.get(&id))
                    .map(|conversation| (conversation.inbox_id.clone(), conversation.channel_id.clone()))
                    .unwrap_or_default();
                let channel_id = if audit.channel_id.is_empty() { channel_id } else { audit.channel_id.clone() };
                let inbox_id = if inbox_id.is_empty() { audit.inbox_id.clone() } else { inbox_id };
                audits.push((event, audit, inbox_id, channel_id));
            }
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

    write_conversations(transaction, &conversations).await?;
    write_workload(transaction, &workload).await?;
    write_tickets(transaction, &ticket_updates).await?;
    write_owners(transaction, &owners).await?;
    let mut audit_rows: Vec<(&Event, &crate::facts::Audit, String, String)> = audits;
    for (event, audit, inbox_id) in &left_unassigned_audits {
        audit_rows.push((event, audit, inbox_id.clone(), audit.channel_id.clone()));
    }
    write_audits(transaction, &audit_rows).await?;
    write_changes(transaction, &changes, notify).await?;
    crate::config::apply_config(transaction, events).await?;
    write_sources(transaction, &sources).await?;
    Ok(Written { changes: changes.len() })
}

fn conversation_ids(events: &[&Event]) -> Vec<Uuid> {
    let mut ids: HashSet<Uuid> = HashSet::new();
    for event in events {
        let id = match &event.fact {
            Fact::ConversationStarted(started) => Some(started.conversation_id),
            Fact::MessageAppended(message) => Some(message.conversation_id),
            Fact::Assigned { conversation_id, .. }
            | Fact::LeftUnassigned { conversation_id, .. }
            | Fact::Unassigned { conversation_id, .. }
            | Fact::Closed { conversation_id, .. } => Some(*conversation_id),
            Fact::TicketCreated(ticket) => Some(ticket.conversation_id),
            Fact::TicketStageChanged { conversation_id, .. } => *conversation_id,
            Fact::Audit(audit) => audit.conversation_id,
            _ => None,
        };
        ids.extend(id);
    }
    ids.into_iter().collect()
}

async fn load_conversations(
    transaction: &mut Transaction<'_, Postgres>,
    events: &[&Event],
) -> sqlx::Result<HashMap<Uuid, Conversation>> {
    let ids = conversation_ids(events);
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<ConversationRow> = sqlx::query_as(
        "SELECT conversation_id, account_id, inbox_id, channel_id, channel_type, status, assignee_id, message_count, \
         last_message_at, updated_at, closed_at, ticket_id, reply_window_ends_at, contact_id, subject \
         FROM conversations WHERE conversation_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&mut **transaction)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let conversation = Conversation {
                new: false,
                dirty: false,
                account_id: row.1,
                inbox_id: row.2,
                channel_id: row.3,
                channel_type: row.4,
                thread_key: String::new(),
                contact_external_id: String::new(),
                contact_name: String::new(),
                started_at: row.8,
                open: row.5 == "open",
                assignee_id: row.6,
                message_count: row.7,
                last_message_at: row.8,
                updated_at: row.9,
                closed_at: row.10,
                ticket_id: row.11,
                reply_window_ends_at: row.12,
                contact_id: row.13,
                subject: row.14,
            };
            (row.0, conversation)
        })
        .collect())
}

async fn insert_messages(
    transaction: &mut Transaction<'_, Postgres>,
    events: &[&Event],
) -> sqlx::Result<HashSet<Uuid>> {
    let mut seen = HashSet::new();
    let mut columns = MessageColumns::default();
    for event in events {
        let Fact::MessageAppended(message) = &event.fact else { continue };
        if !seen.insert(message.message_id) {
            continue;
        }
        columns.message_id.push(message.message_id);
        columns.conversation_id.push(message.conversation_id);
        columns.account_id.push(&event.account_id);
        columns.channel_id.push(&message.channel_id);
        columns.provider_message_id.push(&message.provider_message_id);
        columns.sender_external_id.push(&message.sender_external_id);
        columns.sender_name.push(&message.sender_name);
        columns.body.push(&message.body);
        columns.sent_at.push(event.occurred_at);
        columns.recorded_at.push(event.recorded_at);
        columns.source_event_id.push(&message.source_event_id);
        columns.trace_id.push(&event.trace_id);
        columns.contact_id.push(message.contact_id);
        columns.kind.push(message.kind);
        columns.subject.push(&message.subject);
        columns.content.push(&message.content);
        columns.hidden_fields.push(&message.hidden_fields);
    }
    if columns.message_id.is_empty() {
        return Ok(HashSet::new());
    }
    let inserted: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO messages (message_id, conversation_id, account_id, channel_id, provider_message_id, \
         sender_external_id, sender_name, body, sent_at, recorded_at, source_event_id, trace_id, contact_id, kind, \
         subject, content, hidden_fields) \
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], \
         $8::text[], $9::timestamptz[], $10::timestamptz[], $11::text[], $12::text[], $13::uuid[], $14::text[], \
         $15::text[], $16::jsonb[], $17::jsonb[]) \
         ON CONFLICT (message_id) DO NOTHING RETURNING message_id",
    )
    .bind(&columns.message_id)
    .bind(&columns.conversation_id)
    .bind(&columns.account_id)
    .bind(&columns.channel_id)
    .bind(&columns.provider_message_id)
    .bind(&columns.sender_external_id)
    .bind(&columns.sender_name)
    .bind(&columns.body)
    .bind(&columns.sent_at)
    .bind(&columns.recorded_at)
    .bind(&columns.source_event_id)
    .bind(&columns.trace_id)
    .bind(&columns.contact_id)
    .bind(&columns.kind)
    .bind(&columns.subject)
    .bind(&columns.content)
    .bind(&columns.hidden_fields)
    .fetch_all(&mut **transaction)
    .await?;
    Ok(inserted.into_iter().collect())
}

#[derive(Default)]
struct MessageColumns<'a> {
    message_id: Vec<Uuid>,
    conversation_id: Vec<Uuid>,
    account_id: Vec<&'a str>,
    channel_id: Vec<&'a str>,
    provider_message_id: Vec<&'a str>,
    sender_external_id: Vec<&'a str>,
    sender_name: Vec<&'a str>,
    body: Vec<&'a str>,
    sent_at: Vec<DateTime<Utc>>,
    recorded_at: Vec<DateTime<Utc>>,
    source_event_id: Vec<&'a str>,
    trace_id: Vec<&'a str>,
    contact_id: Vec<Option<Uuid>>,
    kind: Vec<&'a str>,
    subject: Vec<&'a str>,
    content: Vec<&'a Value>,
    hidden_fields: Vec<&'a Value>,
}

/// Assignment history (B2): assigned, left unassigned (with the reason) and manual unassigns.
async fn insert_assignments(
    transaction: &mut Transaction<'_, Postgres>,
    events: &[&Event],
    conversations: &HashMap<Uuid, Conversation>,
) -> sqlx::Result<HashSet<String>> {
    let mut event_ids: Vec<&str> = Vec::new();
    let mut conversation_ids: Vec<Uuid> = Vec::new();
    let mut assignees: Vec<Option<&str>> = Vec::new();
    let mut outcomes: Vec<&str> = Vec::new();
    let mut channel_ids: Vec<String> = Vec::new();
    let mut rule_versions: Vec<i64> = Vec::new();
    let mut strategies: Vec<&str> = Vec::new();
    let mut eligible: Vec<Value> = Vec::new();
    let mut skipped: Vec<&Value> = Vec::new();
    let mut decided_at: Vec<DateTime<Utc>> = Vec::new();
    let empty_skipped = Value::Array(Vec::new());
    // A manual unassign carries no explanation: its channel is the conversation's, which may
    // have started earlier in this very batch (so is not loaded yet).
    let started_here: HashMap<Uuid, &str> = events
        .iter()
        .filter_map(|event| match &event.fact {
            Fact::ConversationStarted(started) => Some((started.conversation_id, started.channel_id.as_str())),
            _ => None,
        })
        .collect();
    for event in events {
        let (conversation_id, assignee, outcome, explanation) = match &event.fact {
            Fact::Assigned { conversation_id, assignee_id, explanation } => {
                (*conversation_id, Some(assignee_id.as_str()), "assigned", Some(explanation))
            }
            Fact::LeftUnassigned { conversation_id, reason, explanation } => {
                (*conversation_id, None, *reason, Some(explanation))
            }
            Fact::Unassigned { conversation_id, .. } => (*conversation_id, None, "unassigned_manually", None),
            _ => continue,
        };
        event_ids.push(&event.event_id);
        conversation_ids.push(conversation_id);
        assignees.push(assignee);
        outcomes.push(outcome);
        match explanation {
            Some(explanation) => {
                channel_ids.push(explanation.channel_id.clone());
                rule_versions.push(explanation.rule_version);
                strategies.push(explanation.strategy);
                eligible.push(json!(explanation.eligible_agent_ids));
                skipped.push(&explanation.skipped);
            }
            None => {
                let channel_id = conversations
                    .get(&conversation_id)
                    .map(|conversation| conversation.channel_id.as_str())
                    .or_else(|| started_here.get(&conversation_id).copied())
                    .unwrap_or_default();
                channel_ids.push(channel_id.to_owned());
                rule_versions.push(0);
                strategies.push("");
                eligible.push(Value::Array(Vec::new()));
                skipped.push(&empty_skipped);
            }
        }
        decided_at.push(event.recorded_at);
    }
    if event_ids.is_empty() {
        return Ok(HashSet::new());
    }
    let inserted: Vec<String> = sqlx::query_scalar(
        "INSERT INTO assignments (event_id, conversation_id, assignee_id, outcome, channel_id, rule_version, strategy, \
         eligible_agent_ids, skipped, decided_at) \
         SELECT u.event_id, u.conversation_id, u.assignee_id, u.outcome, u.channel_id, u.rule_version, u.strategy, \
         ARRAY(SELECT jsonb_array_elements_text(u.eligible)), u.skipped, u.decided_at \
         FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::text[], \
         $8::jsonb[], $9::jsonb[], $10::timestamptz[]) \
         AS u(event_id, conversation_id, assignee_id, outcome, channel_id, rule_version, strategy, eligible, skipped, decided_at) \
         ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
    )
    .bind(&event_ids)
    .bind(&conversation_ids)
    .bind(&assignees)
    .bind(&outcomes)
    .bind(&channel_ids)
    .bind(&rule_versions)
    .bind(&strategies)
    .bind(&eligible)
    .bind(&skipped)
    .bind(&decided_at)
    .fetch_all(&mut **transaction)
    .await?;
    Ok(inserted.into_iter().collect())
}

async fn insert_applied_events(
    transaction: &mut Transaction<'_, Postgres>,
    events: &[&Event],
) -> sqlx::Result<HashSet<String>> {
    let event_ids: Vec<&str> = events
        .iter()
        .filter(|event| {
            matches!(
                event.fact,
                Fact::Closed { .. } | Fact::TicketStageChanged { .. } | Fact::ContactOwnerChanged { .. }
            )
        })
        .map(|event| event.event_id.as_str())
        .collect();
    if event_ids.is_empty() {
        return Ok(HashSet::new());
    }
    let inserted: Vec<String> = sqlx::query_scalar(
        "INSERT INTO applied_events (event_id) SELECT * FROM UNNEST($1::text[]) ON CONFLICT DO NOTHING RETURNING event_id",
    )
    .bind(&event_ids)
    .fetch_all(&mut **transaction)
    .await?;
    Ok(inserted.into_iter().collect())
}

/// C4: contacts and the channel identities that lead to them.
async fn insert_contacts(transaction: &mut Transaction<'_, Postgres>, events: &[&Event]) -> sqlx::Result<()> {
    let mut contact_ids: Vec<Uuid> = Vec::new();
    let mut accounts: Vec<&str> = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    let mut emails: Vec<&str> = Vec::new();
    let mut created_at: Vec<DateTime<Utc>> = Vec::new();
    let mut channel_ids: Vec<&str> = Vec::new();
    let mut external_ids: Vec<&str> = Vec::new();
    for event in events {
        let Fact::ContactCreated(contact) = &event.fact else { continue };
        contact_ids.push(contact.contact_id);
        accounts.push(&event.account_id);
        names.push(&contact.display_name);
        emails.push(&contact.email);
        created_at.push(event.occurred_at);
        channel_ids.push(&contact.channel_id);
        external_ids.push(&contact.external_id);
    }
    if contact_ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO contacts (contact_id, account_id, display_name, email, created_at) \
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[]) \
         ON CONFLICT (contact_id) DO NOTHING",
    )
    .bind(&contact_ids)
    .bind(&accounts)
    .bind(&names)
    .bind(&emails)
    .bind(&created_at)
    .execute(&mut **transaction)
    .await?;
    sqlx::query(
        "INSERT INTO contact_identities (account_id, channel_id, external_id, contact_id) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::uuid[]) ON CONFLICT DO NOTHING",
    )
    .bind(&accounts)
    .bind(&channel_ids)
    .bind(&external_ids)
    .bind(&contact_ids)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

async fn insert_tickets(transaction: &mut Transaction<'_, Postgres>, events: &[&Event]) -> sqlx::Result<HashSet<Uuid>> {
    let mut ticket_ids: Vec<Uuid> = Vec::new();
    let mut accounts: Vec<&str> = Vec::new();
    let mut conversation_ids: Vec<Uuid> = Vec::new();
    let mut contact_ids: Vec<Option<Uuid>> = Vec::new();
    let mut inbox_ids: Vec<&str> = Vec::new();
    let mut channel_ids: Vec<&str> = Vec::new();
    let mut pipelines: Vec<&str> = Vec::new();
    let mut stages: Vec<&str> = Vec::new();
    let mut owners: Vec<Option<&str>> = Vec::new();
    let mut owner_sources: Vec<&str> = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    let mut descriptions: Vec<&str> = Vec::new();
    let mut at: Vec<DateTime<Utc>> = Vec::new();
    let mut seen = HashSet::new();
    for event in events {
        let Fact::TicketCreated(ticket) = &event.fact else { continue };
        if !seen.insert(ticket.ticket_id) {
            continue;
        }
        ticket_ids.push(ticket.ticket_id);
        accounts.push(&event.account_id);
        conversation_ids.push(ticket.conversation_id);
        contact_ids.push(ticket.contact_id);
        inbox_ids.push(&ticket.inbox_id);
        channel_ids.push(&ticket.channel_id);
        pipelines.push(&ticket.pipeline);
        stages.push(&ticket.stage);
        owners.push(ticket.owner_agent_id.as_deref());
        owner_sources.push(ticket.owner_source);
        names.push(&ticket.name);
        descriptions.push(&ticket.description);
        at.push(event.recorded_at);
    }
    if ticket_ids.is_empty() {
        return Ok(HashSet::new());
    }
    let inserted: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO tickets (ticket_id, account_id, conversation_id, contact_id, inbox_id, channel_id, pipeline, stage, \
         owner_agent_id, owner_source, name, description, created_at, updated_at) \
         SELECT u.*, u.at FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::text[], $6::text[], \
         $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::timestamptz[]) \
         AS u(ticket_id, account_id, conversation_id, contact_id, inbox_id, channel_id, pipeline, stage, owner_agent_id, \
         owner_source, name, description, at) \
         ON CONFLICT (ticket_id) DO NOTHING RETURNING ticket_id",
    )
    .bind(&ticket_ids)
    .bind(&accounts)
    .bind(&conversation_ids)
    .bind(&contact_ids)
    .bind(&inbox_ids)
    .bind(&channel_ids)
    .bind(&pipelines)
    .bind(&stages)
    .bind(&owners)
    .bind(&owner_sources)
    .bind(&names)
    .bind(&descriptions)
    .bind(&at)
    .fetch_all(&mut **transaction)
    .await?;
    Ok(inserted.into_iter().collect())
}

async fn write_conversations(
    transaction: &mut Transaction<'_, Postgres>,
    conversations: &HashMap<Uuid, Conversation>,
) -> sqlx::Result<()> {
    // Sorted by id: two instances touching rows in the same order cannot deadlock.
    let mut dirty: Vec<(&Uuid, &Conversation)> = conversations.iter().filter(|(_, c)| c.dirty).collect();
    dirty.sort_by_key(|(id, _)| **id);
    let (new, existing): (Vec<_>, Vec<_>) = dirty.into_iter().partition(|(_, c)| c.new);
    if !new.is_empty() {
        sqlx::query(
            "INSERT INTO conversations (conversation_id, account_id, inbox_id, channel_id, channel_type, thread_key, \
             contact_external_id, contact_name, started_at, status, assignee_id, message_count, last_message_at, \
             updated_at, closed_at, ticket_id, reply_window_ends_at, contact_id, subject) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], \
             $8::text[], $9::timestamptz[], $10::text[], $11::text[], $12::int[], $13::timestamptz[], \
             $14::timestamptz[], $15::timestamptz[], $16::uuid[], $17::timestamptz[], $18::uuid[], $19::text[]) \
             ON CONFLICT (conversation_id) DO NOTHING",
        )
        .bind(new.iter().map(|(id, _)| **id).collect::<Vec<_>>())
        .bind(new.iter().map(|(_, c)| c.account_id.as_str()).collect::<Vec<_>>())
        .bind(new.iter().map(|(_, c)| c.inbox_id.as_str()).collect::<Vec<_>>())
        .bind(new.iter().map(|(_, c)| c.channel_id.as_str()).collect::<Vec<_>>())
        .bind(new.iter().map(|(_, c)| c.channel_type.as_str()).collect::<Vec<_>>())
        .bind(new.iter().map(|(_, c)| c.thread_key.as_str()).collect::<Vec<_>>())
        .bind(new.iter().map(|(_, c)| c.contact_external_id.as_str()).collect::<Vec<_>>())
        .bind(new.iter().map(|(_, c)| c.contact_name.as_str()).collect::<Vec<_>>())
        .bind(new.iter().map(|(_, c)| c.started_at).collect::<Vec<_>>())
        .bind(new.iter().map(|(_, c)| status(c)).collect::<Vec<_>>())
        .bind(new.iter().map(|(_, c)| c.assignee_id.as_deref()).collect::<Vec<_>>())
        .bind(new.iter().map(|(_, c)| c.message_count).collect::<Vec<_>>())
        .bind(new.iter().map(|(_, c)| c.last_message_at).collect::<Vec<_>>())
        .bind(new.iter().map(|(_, c)| c.updated_at).collect::<Vec<_>>())
        .bind(new.iter().map(|(_, c)| c.closed_at).collect::<Vec<_>>())
        .bind(new.iter().map(|(_, c)| c.ticket_id).collect::<Vec<_>>())
        .bind(new.iter().map(|(_, c)| c.reply_window_ends_at).collect::<Vec<_>>())
        .bind(new.iter().map(|(_, c)| c.contact_id).collect::<Vec<_>>())
        .bind(new.iter().map(|(_, c)| c.subject.as_str()).collect::<Vec<_>>())
        .execute(&mut **transaction)
        .await?;
    }
    if !existing.is_empty() {
        sqlx::query(
            "UPDATE conversations AS c SET status = u.status, assignee_id = u.assignee_id, \
             message_count = u.message_count, last_message_at = u.last_message_at, updated_at = u.updated_at, \
             closed_at = u.closed_at, ticket_id = u.ticket_id, reply_window_ends_at = u.reply_window_ends_at, \
             contact_id = u.contact_id, subject = u.subject \
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int[], $5::timestamptz[], $6::timestamptz[], \
             $7::timestamptz[], $8::uuid[], $9::timestamptz[], $10::uuid[], $11::text[]) \
             AS u(conversation_id, status, assignee_id, message_count, last_message_at, updated_at, closed_at, \
             ticket_id, reply_window_ends_at, contact_id, subject) \
             WHERE c.conversation_id = u.conversation_id",
        )
        .bind(existing.iter().map(|(id, _)| **id).collect::<Vec<_>>())
        .bind(existing.iter().map(|(_, c)| status(c)).collect::<Vec<_>>())
        .bind(existing.iter().map(|(_, c)| c.assignee_id.as_deref()).collect::<Vec<_>>())
        .bind(existing.iter().map(|(_, c)| c.message_count).collect::<Vec<_>>())
        .bind(existing.iter().map(|(_, c)| c.last_message_at).collect::<Vec<_>>())
        .bind(existing.iter().map(|(_, c)| c.updated_at).collect::<Vec<_>>())
        .bind(existing.iter().map(|(_, c)| c.closed_at).collect::<Vec<_>>())
        .bind(existing.iter().map(|(_, c)| c.ticket_id).collect::<Vec<_>>())
        .bind(existing.iter().map(|(_, c)| c.reply_window_ends_at).collect::<Vec<_>>())
        .bind(existing.iter().map(|(_, c)| c.contact_id).collect::<Vec<_>>())
        .bind(existing.iter().map(|(_, c)| c.subject.as_str()).collect::<Vec<_>>())
        .execute(&mut **transaction)
        .await?;
    }
    Ok(())
}

fn status(conversation: &Conversation) -> &'static str {
    if conversation.open { "open" } else { "closed" }
}

/// The workload row an assignment of `conversation` to `agent_id` counts in (M1: agents are
/// addressed by account and id).
fn workload_key(conversation: &Conversation, agent_id: &str) -> (String, String, String) {
    (conversation.account_id.clone(), agent_id.to_owned(), conversation.channel_type.clone())
}

/// R8 bookkeeping: open conversations per agent and channel type, as the log says it.
async fn write_workload(
    transaction: &mut Transaction<'_, Postgres>,
    workload: &BTreeMap<(String, String, String), i32>,
) -> sqlx::Result<()> {
    let deltas: Vec<(&(String, String, String), &i32)> = workload.iter().filter(|(_, delta)| **delta != 0).collect();
    if deltas.is_empty() {
        return Ok(());
    }
    // Rows go in sorted order, so two instances lock shared workload rows in the same order.
    sqlx::query(
        "INSERT INTO agent_workload (account_id, agent_id, channel_type, open_count) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int[]) \
         ON CONFLICT (account_id, agent_id, channel_type) DO UPDATE \
         SET open_count = GREATEST(0, agent_workload.open_count + EXCLUDED.open_count)",
    )
    .bind(deltas.iter().map(|((account, _, _), _)| account.as_str()).collect::<Vec<_>>())
    .bind(deltas.iter().map(|((_, agent, _), _)| agent.as_str()).collect::<Vec<_>>())
    .bind(deltas.iter().map(|((_, _, channel_type), _)| channel_type.as_str()).collect::<Vec<_>>())
    .bind(deltas.iter().map(|(_, delta)| **delta).collect::<Vec<_>>())
    .execute(&mut **transaction)
    .await?;
    if deltas.iter().any(|(_, delta)| **delta < 0) {
        // A row holds an agent's open conversations, so an agent with none has no row: however
        // the log was cut into batches (an assignment and its close in one batch or in two),
        // the table ends the same. A rebuild from a timestamp may also see a close without the
        // assignment that preceded it; that never leaves a negative count either.
        sqlx::query("DELETE FROM agent_workload WHERE open_count <= 0").execute(&mut **transaction).await?;
    }
    Ok(())
}

async fn write_tickets(
    transaction: &mut Transaction<'_, Postgres>,
    updates: &BTreeMap<Uuid, (String, bool, DateTime<Utc>)>,
) -> sqlx::Result<()> {
    if updates.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE tickets AS t SET stage = u.stage, status = CASE WHEN u.closed THEN 'closed' ELSE 'open' END, \
         updated_at = GREATEST(t.updated_at, u.at) \
         FROM UNNEST($1::uuid[], $2::text[], $3::bool[], $4::timestamptz[]) AS u(ticket_id, stage, closed, at) \
         WHERE t.ticket_id = u.ticket_id",
    )
    .bind(updates.keys().copied().collect::<Vec<_>>())
    .bind(updates.values().map(|(stage, _, _)| stage.as_str()).collect::<Vec<_>>())
    .bind(updates.values().map(|(_, closed, _)| *closed).collect::<Vec<_>>())
    .bind(updates.values().map(|(_, _, at)| *at).collect::<Vec<_>>())
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

async fn write_owners(
    transaction: &mut Transaction<'_, Postgres>,
    owners: &BTreeMap<Uuid, Option<String>>,
) -> sqlx::Result<()> {
    if owners.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE contacts AS c SET owner_agent_id = u.owner FROM UNNEST($1::uuid[], $2::text[]) AS u(contact_id, owner) \
         WHERE c.contact_id = u.contact_id",
    )
    .bind(owners.keys().copied().collect::<Vec<_>>())
    .bind(owners.values().map(Option::as_deref).collect::<Vec<_>>())
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

/// Why a message never reached the inbox, or a conversation stayed unassigned (B2).
async fn write_audits(
    transaction: &mut Transaction<'_, Postgres>,
    audits: &[(&Event, &crate::facts::Audit, String, String)],
) -> sqlx::Result<()> {
    if audits.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO routing_audit (event_id, account_id, kind, reason, channel_id, inbox_id, conversation_id, \
         message_id, detail, at) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::uuid[], \
         $8::uuid[], $9::jsonb[], $10::timestamptz[]) ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(audits.iter().map(|(event, ..)| event.event_id.as_str()).collect::<Vec<_>>())
    .bind(audits.iter().map(|(event, ..)| event.account_id.as_str()).collect::<Vec<_>>())
    .bind(audits.iter().map(|(_, audit, ..)| audit.kind).collect::<Vec<_>>())
    .bind(audits.iter().map(|(_, audit, ..)| audit.reason.as_str()).collect::<Vec<_>>())
    .bind(audits.iter().map(|(.., channel_id)| channel_id.as_str()).collect::<Vec<_>>())
    .bind(audits.iter().map(|(_, _, inbox_id, _)| inbox_id.as_str()).collect::<Vec<_>>())
    .bind(audits.iter().map(|(_, audit, ..)| audit.conversation_id).collect::<Vec<_>>())
    .bind(audits.iter().map(|(_, audit, ..)| audit.message_id).collect::<Vec<_>>())
    .bind(audits.iter().map(|(_, audit, ..)| &audit.detail).collect::<Vec<_>>())
    .bind(audits.iter().map(|(event, ..)| event.recorded_at).collect::<Vec<_>>())
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

/// The Watch feed: one row per change, in log order, and a wake-up per inbox.
async fn write_changes(
    transaction: &mut Transaction<'_, Postgres>,
    changes: &[Change<'_>],
    notify: Notify,
) -> sqlx::Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    // Watchers resume from the highest change id they saw, so ids must become visible in id
    // order. Batches run in parallel transactions; without this lock a transaction holding
    // lower ids could commit after one holding higher ids, and a watcher would skip its rows.
    // Held until commit (transaction-scoped), per schema so a replay does not wait on the live
    // projector.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.conversation_changes'))")
        .execute(&mut **transaction)
        .await?;
    sqlx::query(
        "INSERT INTO conversation_changes (account_id, inbox_id, conversation_id, kind, event_id, at) \
         SELECT u.account_id, u.inbox_id, u.conversation_id, u.kind, u.event_id, u.at \
         FROM UNNEST($1::text[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[]) WITH ORDINALITY \
         AS u(account_id, inbox_id, conversation_id, kind, event_id, at, position) ORDER BY u.position",
    )
    .bind(changes.iter().map(|change| change.account_id).collect::<Vec<_>>())
    .bind(changes.iter().map(|change| change.inbox_id.as_str()).collect::<Vec<_>>())
    .bind(changes.iter().map(|change| change.conversation_id).collect::<Vec<_>>())
    .bind(changes.iter().map(|change| change.kind).collect::<Vec<_>>())
    .bind(changes.iter().map(|change| change.event_id).collect::<Vec<_>>())
    .bind(changes.iter().map(|change| change.at).collect::<Vec<_>>())
    .execute(&mut **transaction)
    .await?;
    if notify == Notify::Yes {
        let inboxes: std::collections::BTreeSet<&str> = changes.iter().map(|change| change.inbox_id.as_str()).collect();
        // Delivered on commit only, so a watcher woken by it always finds the rows.
        sqlx::query("SELECT pg_notify('conversation_changes', inbox) FROM UNNEST($1::text[]) AS inbox")
            .bind(inboxes.into_iter().collect::<Vec<_>>())
            .execute(&mut **transaction)
            .await?;
    }
    Ok(())
}

/// B6: how far the read models have seen each input partition of the router.
async fn write_sources(
    transaction: &mut Transaction<'_, Postgres>,
    sources: &BTreeMap<(String, i32), i64>,
) -> sqlx::Result<()> {
    if sources.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO projector_positions (projection, topic, partition, next_offset) \
         SELECT 'sources', * FROM UNNEST($1::text[], $2::int[], $3::bigint[]) \
         ON CONFLICT (projection, topic, partition) DO UPDATE \
         SET next_offset = GREATEST(projector_positions.next_offset, EXCLUDED.next_offset), updated_at = now()",
    )
    .bind(sources.keys().map(|(topic, _)| topic.as_str()).collect::<Vec<_>>())
    .bind(sources.keys().map(|(_, partition)| *partition).collect::<Vec<_>>())
    .bind(sources.values().copied().collect::<Vec<_>>())
    .execute(&mut **transaction)
    .await?;
    Ok(())
}
