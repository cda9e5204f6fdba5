//! How each event changes the read models. Every statement is idempotent on its own (keyed
//! inserts with `ON CONFLICT DO NOTHING`, counters bumped only when the row was new), so even
//! outside the position check applying an event twice changes nothing.

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{Postgres, Transaction};
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    AssignmentStrategy, ChannelType, Envelope, RoutingExplanation, SkipReason, UnassignedReason,
};
use switchboard_runtime::envelope::to_datetime;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The event cannot be applied whatever we retry (kept in `projection_rejects`).
    #[error("unusable event: {0}")]
    Unusable(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

fn parse_uuid(field: &str, value: &str) -> Result<Uuid, ApplyError> {
    Uuid::parse_str(value).map_err(|_| ApplyError::Unusable(format!("{field} `{value}` is not a UUID")))
}

/// Applies one event of the conversations topic. `trace_id` is the trace the event belongs to.
pub async fn apply_event(
    transaction: &mut Transaction<'_, Postgres>,
    event: &Envelope,
    trace_id: &str,
) -> Result<(), ApplyError> {
    let occurred_at = to_datetime(event.occurred_at.as_ref());
    let recorded_at = to_datetime(event.recorded_at.as_ref());
    match &event.payload {
        Some(Payload::ConversationStarted(started)) => {
            let contact = started.contact.clone().unwrap_or_default();
            let channel_type = ChannelType::try_from(started.channel_type).unwrap_or(ChannelType::Unspecified);
            sqlx::query(
                "INSERT INTO conversations (conversation_id, account_id, inbox_id, channel_id, channel_type, thread_key, \
                 contact_external_id, contact_name, started_at, last_message_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) ON CONFLICT (conversation_id) DO NOTHING",
            )
            .bind(parse_uuid("conversation_id", &started.conversation_id)?)
            .bind(&event.account_id)
            .bind(&started.inbox_id)
            .bind(&started.channel_id)
            .bind(channel_type_name(channel_type))
            .bind(&started.thread_key)
            .bind(&contact.external_id)
            .bind(&contact.display_name)
            .bind(occurred_at)
            .execute(&mut **transaction)
            .await?;
        }
        Some(Payload::MessageAppended(appended)) => {
            let sender = appended.sender.clone().unwrap_or_default();
            let conversation_id = parse_uuid("conversation_id", &appended.conversation_id)?;
            let inserted = sqlx::query(
                "INSERT INTO messages (message_id, conversation_id, account_id, channel_id, provider_message_id, \
                 sender_external_id, sender_name, body, sent_at, recorded_at, source_event_id, trace_id) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (message_id) DO NOTHING",
            )
            .bind(parse_uuid("message_id", &appended.message_id)?)
            .bind(conversation_id)
            .bind(&event.account_id)
            .bind(&appended.channel_id)
            .bind(&appended.provider_message_id)
            .bind(&sender.external_id)
            .bind(&sender.display_name)
            .bind(&appended.text)
            .bind(occurred_at)
            .bind(recorded_at)
            .bind(&appended.source_event_id)
            .bind(trace_id)
            .execute(&mut **transaction)
            .await?
            .rows_affected();
            if inserted == 1 {
                bump_conversation(transaction, conversation_id, occurred_at).await?;
            }
        }
        Some(Payload::ConversationAssigned(assigned)) => {
            let conversation_id = parse_uuid("conversation_id", &assigned.conversation_id)?;
            record_decision(
                transaction,
                event,
                conversation_id,
                Some(&assigned.assignee_agent_id),
                "assigned",
                assigned.explanation.as_ref(),
                recorded_at,
            )
            .await?;
            sqlx::query("UPDATE conversations SET assignee_id = $2 WHERE conversation_id = $1")
                .bind(conversation_id)
                .bind(&assigned.assignee_agent_id)
                .execute(&mut **transaction)
                .await?;
        }
        Some(Payload::ConversationLeftUnassigned(left)) => {
            let conversation_id = parse_uuid("conversation_id", &left.conversation_id)?;
            let outcome = unassigned_reason_name(
                UnassignedReason::try_from(left.reason).unwrap_or(UnassignedReason::Unspecified),
            );
            record_decision(transaction, event, conversation_id, None, outcome, left.explanation.as_ref(), recorded_at)
                .await?;
        }
        Some(other) => {
            return Err(ApplyError::Unusable(format!(
                "{} does not belong on the conversations topic",
                switchboard_runtime::envelope::payload_name(other)
            )));
        }
        None => return Err(ApplyError::Unusable("envelope without payload".into())),
    }
    Ok(())
}

async fn bump_conversation(
    transaction: &mut Transaction<'_, Postgres>,
    conversation_id: Uuid,
    message_at: DateTime<Utc>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE conversations SET message_count = message_count + 1, last_message_at = GREATEST(last_message_at, $2) \
         WHERE conversation_id = $1",
    )
    .bind(conversation_id)
    .bind(message_at)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

async fn record_decision(
    transaction: &mut Transaction<'_, Postgres>,
    event: &Envelope,
    conversation_id: Uuid,
    assignee_id_opt: Option<&str>,
    outcome: &str,
    explanation_opt: Option<&RoutingExplanation>,
    decided_at: DateTime<Utc>,
) -> sqlx::Result<()> {
    let explanation = explanation_opt.cloned().unwrap_or_default();
    let strategy = AssignmentStrategy::try_from(explanation.strategy).unwrap_or(AssignmentStrategy::Unspecified);
    let skipped: Vec<serde_json::Value> = explanation
        .skipped
        .iter()
        .map(|skip| {
            let reason = SkipReason::try_from(skip.reason).unwrap_or(SkipReason::Unspecified);
            json!({ "agent_id": skip.agent_id, "reason": skip_reason_name(reason) })
        })
        .collect();
    sqlx::query(
        "INSERT INTO assignments (event_id, conversation_id, assignee_id, outcome, channel_id, rule_version, strategy, \
         eligible_agent_ids, skipped, decided_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(&event.event_id)
    .bind(conversation_id)
    .bind(assignee_id_opt)
    .bind(outcome)
    .bind(&explanation.channel_id)
    .bind(explanation.rule_version as i64)
    .bind(strategy_name(strategy))
    .bind(&explanation.eligible_agent_ids)
    .bind(serde_json::Value::Array(skipped))
    .bind(decided_at)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

pub fn channel_type_name(channel_type: ChannelType) -> &'static str {
    match channel_type {
        ChannelType::Unspecified => "unspecified",
        ChannelType::TeamEmail => "team_email",
        ChannelType::Chat => "chat",
        ChannelType::FacebookMessenger => "facebook_messenger",
        ChannelType::Forms => "forms",
        ChannelType::Whatsapp => "whatsapp",
        ChannelType::Calling => "calling",
        ChannelType::Custom => "custom",
    }
}

fn unassigned_reason_name(reason: UnassignedReason) -> &'static str {
    match reason {
        UnassignedReason::Unspecified => "unassigned",
        UnassignedReason::AutoAssignmentOff => "auto_assignment_off",
        UnassignedReason::TargetNobody => "target_nobody",
        UnassignedReason::NoEligibleAgent => "no_eligible_agent",
        UnassignedReason::NoRoutingRules => "no_routing_rules",
        UnassignedReason::ContactHasNoOwner => "contact_has_no_owner",
    }
}

fn skip_reason_name(reason: SkipReason) -> &'static str {
    match reason {
        SkipReason::Unspecified => "unspecified",
        SkipReason::Offline => "offline",
        SkipReason::NoPaidSeat => "no_paid_seat",
        SkipReason::AtCapacity => "at_capacity",
        SkipReason::MissingSkill => "missing_skill",
        SkipReason::UnknownAgent => "unknown_agent",
    }
}

fn strategy_name(strategy: AssignmentStrategy) -> &'static str {
    match strategy {
        AssignmentStrategy::Unspecified => "",
        AssignmentStrategy::RoundRobin => "round_robin",
        AssignmentStrategy::Balanced => "balanced",
    }
}
