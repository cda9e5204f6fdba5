//! The I/O half of applying a batch: a handful of bulk statements per batch instead of a few
//! per event. The decisions are made in [`crate::fold`].
//!
//! 1. Load the current state of every conversation the batch touches (one `SELECT`).
//! 2. Insert the rows events create, keyed by their natural ids (`ON CONFLICT DO NOTHING
//!    RETURNING`): what comes back is what is new. Events without a natural key are recorded in
//!    `applied_events`. An event seen before (redelivered, or published twice) changes nothing.
//! 3. Fold the batch ([`fold_batch`], pure) into [`Writes`](crate::fold::Writes).
//! 4. Execute the writes with multi-row `UNNEST` statements.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::facts::{Event, Fact};
use crate::fold::{
    AuditRow, BatchInput, Change, Claimed, ContactOwner, ConversationReply, ConversationRow, SourcePosition,
    StoredConversation, TicketStageUpdate, WorkloadDelta, fold_batch,
};
use crate::outbound::{OutboundStored, OutboundWrites, ProviderIdRow, RecipientRow, StatusRow, StepRow};

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

/// Applies `events` (already position-checked, in log order per partition) in `transaction`:
/// reads what the fold needs, folds, writes.
pub async fn apply_events(
    transaction: &mut Transaction<'_, Postgres>,
    events: &[&Event],
    notify: Notify,
) -> sqlx::Result<Written> {
    if events.is_empty() {
        return Ok(Written::default());
    }
    let stored_conversations = load_conversations(transaction, events).await?;
    let mut message_ids = insert_messages(transaction, events).await?;
    lock_outbound_accounts(transaction, events).await?;
    message_ids.extend(insert_outbound_messages(transaction, events).await?);
    insert_owner_notifications(transaction, events).await?;
    let outbound = load_outbound(transaction, events).await?;
    let decision_event_ids = insert_assignments(transaction, events, &stored_conversations).await?;
    let keyless_event_ids = insert_applied_events(transaction, events).await?;
    insert_contacts(transaction, events).await?;
    let ticket_ids = insert_tickets(transaction, events).await?;
    let claimed = Claimed { message_ids, decision_event_ids, keyless_event_ids, ticket_ids };

    let writes = fold_batch(BatchInput { events, stored_conversations, claimed, outbound });

    write_conversations(transaction, &writes.new_conversations, &writes.updated_conversations).await?;
    write_conversation_replies(transaction, &writes.conversation_replies).await?;
    write_workload(transaction, &writes.workload_deltas).await?;
    write_tickets(transaction, &writes.ticket_stages).await?;
    write_owners(transaction, &writes.contact_owners).await?;
    write_audits(transaction, &writes.audits).await?;
    write_changes(transaction, &writes.changes, notify).await?;
    crate::config::write_config(transaction, &writes.config).await?;
    write_outbound(transaction, &writes.outbound).await?;
    write_sources(transaction, &writes.sources).await?;
    Ok(Written { changes: writes.changes.len() })
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
) -> sqlx::Result<HashMap<Uuid, StoredConversation>> {
    let ids = conversation_ids(events);
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<StoredConversation> = sqlx::query_as(
        "SELECT conversation_id, account_id, inbox_id, channel_id, channel_type, status, assignee_id, message_count, \
         last_message_at, updated_at, closed_at, ticket_id, reply_window_ends_at, contact_id, subject \
         FROM conversations WHERE conversation_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&mut **transaction)
    .await?;
    Ok(rows.into_iter().map(|row| (row.conversation_id, row)).collect())
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
    stored_conversations: &HashMap<Uuid, StoredConversation>,
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
                let channel_id = stored_conversations
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
    new: &[ConversationRow],
    updated: &[ConversationRow],
) -> sqlx::Result<()> {
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
        .bind(new.iter().map(|c| c.conversation_id).collect::<Vec<_>>())
        .bind(new.iter().map(|c| c.account_id.as_str()).collect::<Vec<_>>())
        .bind(new.iter().map(|c| c.inbox_id.as_str()).collect::<Vec<_>>())
        .bind(new.iter().map(|c| c.channel_id.as_str()).collect::<Vec<_>>())
        .bind(new.iter().map(|c| c.channel_type.as_str()).collect::<Vec<_>>())
        .bind(new.iter().map(|c| c.thread_key.as_str()).collect::<Vec<_>>())
        .bind(new.iter().map(|c| c.contact_external_id.as_str()).collect::<Vec<_>>())
        .bind(new.iter().map(|c| c.contact_name.as_str()).collect::<Vec<_>>())
        .bind(new.iter().map(|c| c.started_at).collect::<Vec<_>>())
        .bind(new.iter().map(ConversationRow::status).collect::<Vec<_>>())
        .bind(new.iter().map(|c| c.assignee_id.as_deref()).collect::<Vec<_>>())
        .bind(new.iter().map(|c| c.message_count).collect::<Vec<_>>())
        .bind(new.iter().map(|c| c.last_message_at).collect::<Vec<_>>())
        .bind(new.iter().map(|c| c.updated_at).collect::<Vec<_>>())
        .bind(new.iter().map(|c| c.closed_at).collect::<Vec<_>>())
        .bind(new.iter().map(|c| c.ticket_id).collect::<Vec<_>>())
        .bind(new.iter().map(|c| c.reply_window_ends_at).collect::<Vec<_>>())
        .bind(new.iter().map(|c| c.contact_id).collect::<Vec<_>>())
        .bind(new.iter().map(|c| c.subject.as_str()).collect::<Vec<_>>())
        .execute(&mut **transaction)
        .await?;
    }
    if !updated.is_empty() {
        sqlx::query(
            "UPDATE conversations AS c SET status = u.status, assignee_id = u.assignee_id, \
             message_count = u.message_count, last_message_at = u.last_message_at, \
             updated_at = GREATEST(c.updated_at, u.updated_at), \
             closed_at = u.closed_at, ticket_id = u.ticket_id, reply_window_ends_at = u.reply_window_ends_at, \
             contact_id = u.contact_id, subject = u.subject \
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int[], $5::timestamptz[], $6::timestamptz[], \
             $7::timestamptz[], $8::uuid[], $9::timestamptz[], $10::uuid[], $11::text[]) \
             AS u(conversation_id, status, assignee_id, message_count, last_message_at, updated_at, closed_at, \
             ticket_id, reply_window_ends_at, contact_id, subject) \
             WHERE c.conversation_id = u.conversation_id",
        )
        .bind(updated.iter().map(|c| c.conversation_id).collect::<Vec<_>>())
        .bind(updated.iter().map(ConversationRow::status).collect::<Vec<_>>())
        .bind(updated.iter().map(|c| c.assignee_id.as_deref()).collect::<Vec<_>>())
        .bind(updated.iter().map(|c| c.message_count).collect::<Vec<_>>())
        .bind(updated.iter().map(|c| c.last_message_at).collect::<Vec<_>>())
        .bind(updated.iter().map(|c| c.updated_at).collect::<Vec<_>>())
        .bind(updated.iter().map(|c| c.closed_at).collect::<Vec<_>>())
        .bind(updated.iter().map(|c| c.ticket_id).collect::<Vec<_>>())
        .bind(updated.iter().map(|c| c.reply_window_ends_at).collect::<Vec<_>>())
        .bind(updated.iter().map(|c| c.contact_id).collect::<Vec<_>>())
        .bind(updated.iter().map(|c| c.subject.as_str()).collect::<Vec<_>>())
        .execute(&mut **transaction)
        .await?;
    }
    Ok(())
}

/// O5: what replies and notes did to their conversations, merged into the stored row (see
/// [`ConversationReply`]: another transaction may be writing the same row).
async fn write_conversation_replies(
    transaction: &mut Transaction<'_, Postgres>,
    replies: &[ConversationReply],
) -> sqlx::Result<()> {
    if replies.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE conversations AS c SET updated_at = GREATEST(c.updated_at, u.updated_at), \
         first_response_at = LEAST(c.first_response_at, u.first_response_at), \
         last_agent_reply_at = GREATEST(c.last_agent_reply_at, u.last_agent_reply_at) \
         FROM UNNEST($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::timestamptz[]) \
         AS u(conversation_id, updated_at, first_response_at, last_agent_reply_at) \
         WHERE c.conversation_id = u.conversation_id",
    )
    .bind(replies.iter().map(|reply| reply.conversation_id).collect::<Vec<_>>())
    .bind(replies.iter().map(|reply| reply.updated_at).collect::<Vec<_>>())
    .bind(replies.iter().map(|reply| reply.first_response_at).collect::<Vec<_>>())
    .bind(replies.iter().map(|reply| reply.last_agent_reply_at).collect::<Vec<_>>())
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

/// R8 bookkeeping: open conversations per agent and channel type, as the log says it.
async fn write_workload(transaction: &mut Transaction<'_, Postgres>, deltas: &[WorkloadDelta]) -> sqlx::Result<()> {
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
    .bind(deltas.iter().map(|delta| delta.key.account_id.as_str()).collect::<Vec<_>>())
    .bind(deltas.iter().map(|delta| delta.key.agent_id.as_str()).collect::<Vec<_>>())
    .bind(deltas.iter().map(|delta| delta.key.channel_type.as_str()).collect::<Vec<_>>())
    .bind(deltas.iter().map(|delta| delta.delta).collect::<Vec<_>>())
    .execute(&mut **transaction)
    .await?;
    if deltas.iter().any(|delta| delta.delta < 0) {
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
    updates: &[TicketStageUpdate<'_>],
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
    .bind(updates.iter().map(|update| update.ticket_id).collect::<Vec<_>>())
    .bind(updates.iter().map(|update| update.stage).collect::<Vec<_>>())
    .bind(updates.iter().map(|update| update.closed).collect::<Vec<_>>())
    .bind(updates.iter().map(|update| update.at).collect::<Vec<_>>())
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

async fn write_owners(transaction: &mut Transaction<'_, Postgres>, owners: &[ContactOwner<'_>]) -> sqlx::Result<()> {
    if owners.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE contacts AS c SET owner_agent_id = u.owner FROM UNNEST($1::uuid[], $2::text[]) AS u(contact_id, owner) \
         WHERE c.contact_id = u.contact_id",
    )
    .bind(owners.iter().map(|owner| owner.contact_id).collect::<Vec<_>>())
    .bind(owners.iter().map(|owner| owner.owner_agent_id_opt).collect::<Vec<_>>())
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

/// Why a message never reached the inbox, or a conversation stayed unassigned (B2).
async fn write_audits(transaction: &mut Transaction<'_, Postgres>, audits: &[AuditRow<'_>]) -> sqlx::Result<()> {
    if audits.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO routing_audit (event_id, account_id, kind, reason, channel_id, inbox_id, conversation_id, \
         message_id, detail, at) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::uuid[], \
         $8::uuid[], $9::jsonb[], $10::timestamptz[]) ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(audits.iter().map(|audit| audit.event_id).collect::<Vec<_>>())
    .bind(audits.iter().map(|audit| audit.account_id).collect::<Vec<_>>())
    .bind(audits.iter().map(|audit| audit.kind).collect::<Vec<_>>())
    .bind(audits.iter().map(|audit| audit.reason).collect::<Vec<_>>())
    .bind(audits.iter().map(|audit| audit.channel_id.as_str()).collect::<Vec<_>>())
    .bind(audits.iter().map(|audit| audit.inbox_id.as_str()).collect::<Vec<_>>())
    .bind(audits.iter().map(|audit| audit.conversation_id).collect::<Vec<_>>())
    .bind(audits.iter().map(|audit| audit.message_id).collect::<Vec<_>>())
    .bind(audits.iter().map(|audit| audit.detail).collect::<Vec<_>>())
    .bind(audits.iter().map(|audit| audit.at).collect::<Vec<_>>())
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
        let inboxes: BTreeSet<&str> = changes.iter().map(|change| change.inbox_id.as_str()).collect();
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
    sources: &[SourcePosition<'_>],
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
    .bind(sources.iter().map(|source| source.topic).collect::<Vec<_>>())
    .bind(sources.iter().map(|source| source.partition).collect::<Vec<_>>())
    .bind(sources.iter().map(|source| source.next_offset).collect::<Vec<_>>())
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

/// One reply's events arrive on three topics, whose partitions parallel writers apply in
/// parallel transactions: two of them could each miss what the other has not committed yet
/// (a status and the SENT record it waits for, in two batches, would never meet). So a batch
/// with outbound facts holds, until commit, a lock per account it names (sorted: no deadlock),
/// taken before it writes or reads any outbound row; under READ COMMITTED each later statement
/// sees what the previous holder committed.
async fn lock_outbound_accounts(transaction: &mut Transaction<'_, Postgres>, events: &[&Event]) -> sqlx::Result<()> {
    let accounts: BTreeSet<&str> = events
        .iter()
        .filter(|event| {
            matches!(
                event.fact,
                Fact::OutboundQueued(_) | Fact::NoteAdded(_) | Fact::DeliveryAttempt(_) | Fact::DeliveryStatus(_)
            )
        })
        .map(|event| event.account_id.as_str())
        .collect();
    if accounts.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '/outbound/' || u.account)) \
         FROM UNNEST($1::text[]) WITH ORDINALITY AS u(account, position) ORDER BY u.position",
    )
    .bind(accounts.into_iter().collect::<Vec<_>>())
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

/// O5: replies, automated messages and notes of conversations become `messages` rows (owner
/// notifications do not: [`insert_owner_notifications`]). Returns the ids that are new.
async fn insert_outbound_messages(
    transaction: &mut Transaction<'_, Postgres>,
    events: &[&Event],
) -> sqlx::Result<HashSet<Uuid>> {
    let empty_hidden = Value::Array(Vec::new());
    let empty_content = Value::Object(serde_json::Map::new());
    let mut seen = HashSet::new();
    let mut columns = MessageColumns::default();
    let mut outbound = OutboundColumns::default();
    for event in events {
        let (message_id, conversation_id, channel_id, author, body, kind, subject, content, direction, recipient) =
            match &event.fact {
                Fact::OutboundQueued(queued) if !queued.owner_notification => {
                    let Some(conversation_id) = queued.conversation_id else { continue };
                    (
                        queued.reply_id,
                        conversation_id,
                        queued.channel_id.as_str(),
                        &queued.author,
                        queued.text.as_str(),
                        queued.kind,
                        queued.subject.as_str(),
                        &queued.content,
                        "outbound",
                        queued.recipient.as_str(),
                    )
                }
                Fact::NoteAdded(note) => (
                    note.note_id,
                    note.conversation_id,
                    "",
                    &note.author,
                    note.text.as_str(),
                    "text",
                    "",
                    &empty_content,
                    "note",
                    "",
                ),
                _ => continue,
            };
        if !seen.insert(message_id) {
            continue;
        }
        columns.message_id.push(message_id);
        columns.conversation_id.push(conversation_id);
        columns.account_id.push(&event.account_id);
        columns.channel_id.push(channel_id);
        columns.provider_message_id.push("");
        columns.sender_external_id.push("");
        columns.sender_name.push(&author.name);
        columns.body.push(body);
        columns.sent_at.push(event.recorded_at);
        columns.recorded_at.push(event.recorded_at);
        columns.source_event_id.push(&event.event_id);
        columns.trace_id.push(&event.trace_id);
        columns.contact_id.push(None);
        columns.kind.push(kind);
        columns.subject.push(subject);
        columns.content.push(content);
        columns.hidden_fields.push(&empty_hidden);
        outbound.direction.push(direction);
        outbound.author_kind.push(author.kind);
        outbound.author_agent_id.push(&author.agent_id);
        outbound.automation.push(author.automation);
        outbound.recipient.push(recipient);
        outbound.delivery_state.push(if direction == "outbound" { "queued" } else { "" });
    }
    if columns.message_id.is_empty() {
        return Ok(HashSet::new());
    }
    let inserted: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO messages (message_id, conversation_id, account_id, channel_id, provider_message_id, \
         sender_external_id, sender_name, body, sent_at, recorded_at, source_event_id, trace_id, contact_id, kind, \
         subject, content, hidden_fields, direction, author_kind, author_agent_id, author_name, automation, recipient, \
         delivery_state) \
         SELECT u.message_id, u.conversation_id, u.account_id, u.channel_id, u.provider_message_id, \
         u.sender_external_id, u.sender_name, u.body, u.sent_at, u.recorded_at, u.source_event_id, u.trace_id, \
         u.contact_id, u.kind, u.subject, u.content, u.hidden_fields, u.direction, u.author_kind, u.author_agent_id, \
         u.sender_name, u.automation, u.recipient, u.delivery_state \
         FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], \
         $8::text[], $9::timestamptz[], $10::timestamptz[], $11::text[], $12::text[], $13::uuid[], $14::text[], \
         $15::text[], $16::jsonb[], $17::jsonb[], $18::text[], $19::text[], $20::text[], $21::text[], $22::text[], \
         $23::text[]) \
         AS u(message_id, conversation_id, account_id, channel_id, provider_message_id, sender_external_id, \
         sender_name, body, sent_at, recorded_at, source_event_id, trace_id, contact_id, kind, subject, content, \
         hidden_fields, direction, author_kind, author_agent_id, automation, recipient, delivery_state) \
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
    .bind(&outbound.direction)
    .bind(&outbound.author_kind)
    .bind(&outbound.author_agent_id)
    .bind(&outbound.automation)
    .bind(&outbound.recipient)
    .bind(&outbound.delivery_state)
    .fetch_all(&mut **transaction)
    .await?;
    Ok(inserted.into_iter().collect())
}

#[derive(Default)]
struct OutboundColumns<'a> {
    direction: Vec<&'a str>,
    author_kind: Vec<&'a str>,
    author_agent_id: Vec<&'a str>,
    automation: Vec<&'a str>,
    recipient: Vec<&'a str>,
    delivery_state: Vec<&'a str>,
}

/// R4: owner notifications are kept for the audit, apart from the conversation's messages.
async fn insert_owner_notifications(
    transaction: &mut Transaction<'_, Postgres>,
    events: &[&Event],
) -> sqlx::Result<()> {
    let notifications: Vec<(&Event, &crate::facts::OutboundQueued)> = events
        .iter()
        .filter_map(|event| match &event.fact {
            Fact::OutboundQueued(queued) if queued.owner_notification => Some((*event, queued.as_ref())),
            _ => None,
        })
        .collect();
    if notifications.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO owner_notifications (notification_id, account_id, conversation_id, inbox_id, channel_id, \
         recipient, subject, body, queued_at, source_event_id) \
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::text[], \
         $8::text[], $9::timestamptz[], $10::text[]) ON CONFLICT (notification_id) DO NOTHING",
    )
    .bind(notifications.iter().map(|(_, queued)| queued.reply_id).collect::<Vec<_>>())
    .bind(notifications.iter().map(|(event, _)| event.account_id.as_str()).collect::<Vec<_>>())
    .bind(notifications.iter().map(|(_, queued)| queued.conversation_id).collect::<Vec<_>>())
    .bind(notifications.iter().map(|(_, queued)| queued.inbox_id.as_str()).collect::<Vec<_>>())
    .bind(notifications.iter().map(|(_, queued)| queued.channel_id.as_str()).collect::<Vec<_>>())
    .bind(notifications.iter().map(|(_, queued)| queued.recipient.as_str()).collect::<Vec<_>>())
    .bind(notifications.iter().map(|(_, queued)| queued.subject.as_str()).collect::<Vec<_>>())
    .bind(notifications.iter().map(|(_, queued)| queued.text.as_str()).collect::<Vec<_>>())
    .bind(notifications.iter().map(|(event, _)| event.recorded_at).collect::<Vec<_>>())
    .bind(notifications.iter().map(|(event, _)| event.event_id.as_str()).collect::<Vec<_>>())
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

/// Three text columns of keys, for `(a, b, c) IN (SELECT * FROM UNNEST(...))`.
#[derive(Default)]
struct Keys {
    account_id: Vec<String>,
    channel_id: Vec<String>,
    third: Vec<String>,
}

impl Keys {
    fn push(&mut self, account_id: &str, channel_id: &str, third: &str) {
        self.account_id.push(account_id.to_owned());
        self.channel_id.push(channel_id.to_owned());
        self.third.push(third.to_owned());
    }
}

/// Reads what the batch's outbound events may relate to: the recipients, provider ids, statuses
/// and steps of the replies they name, and of the replies their statuses may match (by provider
/// id, or for a watermark by recipient), and the statuses those replies may match.
async fn load_outbound(transaction: &mut Transaction<'_, Postgres>, events: &[&Event]) -> sqlx::Result<OutboundStored> {
    let mut reply_ids: HashSet<Uuid> = HashSet::new();
    let mut status_ids = Keys::default();
    let mut status_recipients = Keys::default();
    for event in events {
        match &event.fact {
            Fact::OutboundQueued(queued) => {
                reply_ids.insert(queued.reply_id);
            }
            Fact::DeliveryAttempt(attempt) => {
                reply_ids.insert(attempt.reply_id);
            }
            Fact::DeliveryStatus(status) if status.watermark_at.is_some() => {
                status_recipients.push(&event.account_id, &status.channel_id, &status.recipient)
            }
            Fact::DeliveryStatus(status) => {
                status_ids.push(&event.account_id, &status.channel_id, &status.provider_message_id)
            }
            _ => {}
        }
    }
    if reply_ids.is_empty() && status_ids.third.is_empty() && status_recipients.third.is_empty() {
        return Ok(OutboundStored::default());
    }
    let recipients: Vec<RecipientRow> = sqlx::query_as(
        "SELECT message_id, account_id, channel_id, recipient FROM messages WHERE direction = 'outbound' \
         AND (message_id = ANY($1) OR (account_id, channel_id, recipient) IN \
         (SELECT * FROM UNNEST($2::text[], $3::text[], $4::text[])))",
    )
    .bind(reply_ids.iter().copied().collect::<Vec<_>>())
    .bind(&status_recipients.account_id)
    .bind(&status_recipients.channel_id)
    .bind(&status_recipients.third)
    .fetch_all(&mut **transaction)
    .await?;
    reply_ids.extend(recipients.iter().map(|row| row.message_id));
    let provider_ids: Vec<ProviderIdRow> = sqlx::query_as(
        "SELECT account_id, channel_id, provider_message_id, message_id, sent_at FROM outbound_provider_ids \
         WHERE message_id = ANY($1) OR (account_id, channel_id, provider_message_id) IN \
         (SELECT * FROM UNNEST($2::text[], $3::text[], $4::text[]))",
    )
    .bind(reply_ids.iter().copied().collect::<Vec<_>>())
    .bind(&status_ids.account_id)
    .bind(&status_ids.channel_id)
    .bind(&status_ids.third)
    .fetch_all(&mut **transaction)
    .await?;
    reply_ids.extend(provider_ids.iter().map(|row| row.message_id));

    // The statuses these replies may match: by the provider ids they got (stored or in this
    // batch), and watermarks by their recipients (stored or queued in this batch).
    let mut ids = Keys::default();
    for row in &provider_ids {
        ids.push(&row.account_id, &row.channel_id, &row.provider_message_id);
    }
    let mut by_recipient = Keys::default();
    for row in &recipients {
        by_recipient.push(&row.account_id, &row.channel_id, &row.recipient);
    }
    for event in events {
        match &event.fact {
            Fact::DeliveryAttempt(attempt) if attempt.sent => {
                ids.push(&event.account_id, &attempt.channel_id, &attempt.provider_message_id)
            }
            Fact::OutboundQueued(queued) if !queued.owner_notification => {
                by_recipient.push(&event.account_id, &queued.channel_id, &queued.recipient)
            }
            _ => {}
        }
    }
    let statuses: Vec<StatusRow> = sqlx::query_as(
        "SELECT event_id, account_id, channel_id, provider_message_id, recipient, watermark_at, status, error, at \
         FROM delivery_statuses \
         WHERE (account_id, channel_id, provider_message_id) IN (SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[])) \
         OR (watermark_at IS NOT NULL AND (account_id, channel_id, recipient) IN \
         (SELECT * FROM UNNEST($4::text[], $5::text[], $6::text[])))",
    )
    .bind(&ids.account_id)
    .bind(&ids.channel_id)
    .bind(&ids.third)
    .bind(&by_recipient.account_id)
    .bind(&by_recipient.channel_id)
    .bind(&by_recipient.third)
    .fetch_all(&mut **transaction)
    .await?;
    let steps: Vec<StepRow> = sqlx::query_as(
        "SELECT message_id, step_key, account_id, state, attempt, provider_message_id, error, will_retry, at, event_id \
         FROM message_delivery_steps WHERE message_id = ANY($1)",
    )
    .bind(reply_ids.iter().copied().collect::<Vec<_>>())
    .fetch_all(&mut **transaction)
    .await?;
    Ok(OutboundStored { steps, provider_ids, statuses, recipients })
}

/// O5: delivery steps (an existing step is replaced only by an earlier report of it), provider
/// ids, statuses, and the delivery state of every message whose steps changed.
async fn write_outbound(transaction: &mut Transaction<'_, Postgres>, writes: &OutboundWrites) -> sqlx::Result<()> {
    let OutboundWrites { steps, provider_ids, statuses, summaries } = writes;
    if !steps.is_empty() {
        sqlx::query(
            "INSERT INTO message_delivery_steps AS s (message_id, step_key, account_id, state, attempt, \
             provider_message_id, error, will_retry, at, event_id) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[], $7::text[], \
             $8::bool[], $9::timestamptz[], $10::text[]) \
             ON CONFLICT (message_id, step_key) DO UPDATE SET state = EXCLUDED.state, attempt = EXCLUDED.attempt, \
             provider_message_id = EXCLUDED.provider_message_id, error = EXCLUDED.error, \
             will_retry = EXCLUDED.will_retry, at = EXCLUDED.at, event_id = EXCLUDED.event_id \
             WHERE (EXCLUDED.at, EXCLUDED.event_id) < (s.at, s.event_id)",
        )
        .bind(steps.iter().map(|step| step.message_id).collect::<Vec<_>>())
        .bind(steps.iter().map(|step| step.step_key.as_str()).collect::<Vec<_>>())
        .bind(steps.iter().map(|step| step.account_id.as_str()).collect::<Vec<_>>())
        .bind(steps.iter().map(|step| step.state.as_str()).collect::<Vec<_>>())
        .bind(steps.iter().map(|step| step.attempt).collect::<Vec<_>>())
        .bind(steps.iter().map(|step| step.provider_message_id.as_str()).collect::<Vec<_>>())
        .bind(steps.iter().map(|step| step.error.as_str()).collect::<Vec<_>>())
        .bind(steps.iter().map(|step| step.will_retry).collect::<Vec<_>>())
        .bind(steps.iter().map(|step| step.at).collect::<Vec<_>>())
        .bind(steps.iter().map(|step| step.event_id.as_str()).collect::<Vec<_>>())
        .execute(&mut **transaction)
        .await?;
    }
    if !provider_ids.is_empty() {
        sqlx::query(
            "INSERT INTO outbound_provider_ids (account_id, channel_id, provider_message_id, message_id, sent_at) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::uuid[], $5::timestamptz[]) \
             ON CONFLICT DO NOTHING",
        )
        .bind(provider_ids.iter().map(|row| row.account_id.as_str()).collect::<Vec<_>>())
        .bind(provider_ids.iter().map(|row| row.channel_id.as_str()).collect::<Vec<_>>())
        .bind(provider_ids.iter().map(|row| row.provider_message_id.as_str()).collect::<Vec<_>>())
        .bind(provider_ids.iter().map(|row| row.message_id).collect::<Vec<_>>())
        .bind(provider_ids.iter().map(|row| row.sent_at).collect::<Vec<_>>())
        .execute(&mut **transaction)
        .await?;
    }
    if !statuses.is_empty() {
        sqlx::query(
            "INSERT INTO delivery_statuses (event_id, account_id, channel_id, provider_message_id, recipient, \
             watermark_at, status, error, at) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], \
             $7::text[], $8::text[], $9::timestamptz[]) ON CONFLICT DO NOTHING",
        )
        .bind(statuses.iter().map(|row| row.event_id.as_str()).collect::<Vec<_>>())
        .bind(statuses.iter().map(|row| row.account_id.as_str()).collect::<Vec<_>>())
        .bind(statuses.iter().map(|row| row.channel_id.as_str()).collect::<Vec<_>>())
        .bind(statuses.iter().map(|row| row.provider_message_id.as_str()).collect::<Vec<_>>())
        .bind(statuses.iter().map(|row| row.recipient.as_str()).collect::<Vec<_>>())
        .bind(statuses.iter().map(|row| row.watermark_at).collect::<Vec<_>>())
        .bind(statuses.iter().map(|row| row.status.as_str()).collect::<Vec<_>>())
        .bind(statuses.iter().map(|row| row.error.as_str()).collect::<Vec<_>>())
        .bind(statuses.iter().map(|row| row.at).collect::<Vec<_>>())
        .execute(&mut **transaction)
        .await?;
    }
    if !summaries.is_empty() {
        let ids: Vec<Uuid> = summaries.iter().map(|summary| summary.message_id).collect();
        let states: Vec<&str> = summaries.iter().map(|summary| summary.state).collect();
        let reasons: Vec<&str> = summaries.iter().map(|summary| summary.failure_reason.as_str()).collect();
        let retries: Vec<bool> = summaries.iter().map(|summary| summary.will_retry).collect();
        let provider_message_ids: Vec<&str> =
            summaries.iter().map(|summary| summary.provider_message_id.as_str()).collect();
        // A message whose row is not there yet (its queued event comes later) gets its state
        // then: the steps are kept and read again.
        sqlx::query(
            "UPDATE messages AS m SET delivery_state = u.state, failure_reason = u.reason, will_retry = u.retry, \
             provider_message_id = u.provider_message_id \
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bool[], $5::text[]) \
             AS u(message_id, state, reason, retry, provider_message_id) \
             WHERE m.message_id = u.message_id AND m.direction = 'outbound'",
        )
        .bind(&ids)
        .bind(&states)
        .bind(&reasons)
        .bind(&retries)
        .bind(&provider_message_ids)
        .execute(&mut **transaction)
        .await?;
        sqlx::query(
            "UPDATE owner_notifications AS n SET delivery_state = u.state, failure_reason = u.reason, \
             will_retry = u.retry \
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bool[]) AS u(message_id, state, reason, retry) \
             WHERE n.notification_id = u.message_id",
        )
        .bind(&ids)
        .bind(&states)
        .bind(&reasons)
        .bind(&retries)
        .execute(&mut **transaction)
        .await?;
    }
    Ok(())
}
