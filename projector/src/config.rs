//! Config read models (inboxes, channels, agents) from the compacted config topic.
//!
//! Every config event carries its entity's whole current state, so within a batch only the
//! last event per entity matters. Upserts only move forward: a row is replaced by an event
//! recorded at or after it (routing rules and ticket settings: by version), so an old event
//! delivered again never rolls the row back.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};

use crate::facts::{Event, Fact};

/// One config entity: the table its row is in, the row's account (M1; `None` only for a
/// tombstone of a legacy key, which named no account) and id, and which part of the row the
/// entity is. Sorted, so concurrent writers lock rows in the same order.
type EntityKey<'a> = (&'static str, Option<&'a str>, &'a str, &'static str);

/// What a batch does to one config entity.
#[derive(Debug, Clone)]
pub enum ConfigWrite<'a> {
    /// Replace the entity with the state `event` carries (only moving forward).
    Upsert(&'a Event),
    /// Delete the entity (`kind`: inbox, channel, rules, ticket_settings or agent).
    Delete { kind: &'static str, account_id_opt: Option<&'a str>, id: &'a str },
}

/// Two upserts are equal when they carry the same event (by id).
impl PartialEq for ConfigWrite<'_> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ConfigWrite::Upsert(event), ConfigWrite::Upsert(other_event)) => event.event_id == other_event.event_id,
            (
                ConfigWrite::Delete { kind, account_id_opt, id },
                ConfigWrite::Delete { kind: other_kind, account_id_opt: other_account_id_opt, id: other_id },
            ) => kind == other_kind && account_id_opt == other_account_id_opt && id == other_id,
            (ConfigWrite::Upsert(_), ConfigWrite::Delete { .. })
            | (ConfigWrite::Delete { .. }, ConfigWrite::Upsert(_)) => false,
        }
    }
}

impl Eq for ConfigWrite<'_> {}

/// The config writes of a batch: the last event per entity wins, in entity order. Pure.
pub fn fold_config<'a>(events: &[&'a Event]) -> Vec<ConfigWrite<'a>> {
    // BTreeMap: statements run in key order, the same order on every instance.
    let mut latest: BTreeMap<EntityKey<'a>, ConfigWrite<'a>> = BTreeMap::new();
    for &event in events {
        let account = Some(event.account_id.as_str());
        let (key, write) = match &event.fact {
            Fact::Inbox(inbox) => (("inboxes", account, inbox.inbox_id.as_str(), "inbox"), ConfigWrite::Upsert(event)),
            Fact::Channel(channel) => {
                (("channels", account, channel.channel_id.as_str(), "channel"), ConfigWrite::Upsert(event))
            }
            Fact::RoutingRules { channel_id, .. } => {
                (("channels", account, channel_id.as_str(), "rules"), ConfigWrite::Upsert(event))
            }
            Fact::TicketSettings { channel_id, .. } => {
                (("channels", account, channel_id.as_str(), "ticket_settings"), ConfigWrite::Upsert(event))
            }
            Fact::Agent(agent) => (("agents", account, agent.agent_id.as_str(), "agent"), ConfigWrite::Upsert(event)),
            Fact::Tombstone { kind, account_id_opt, id } => {
                let (table, kind) = match kind.as_str() {
                    "inbox" => ("inboxes", "inbox"),
                    "channel" => ("channels", "channel"),
                    "rules" | "routing_rules" => ("channels", "rules"),
                    "ticket_settings" | "tickets" | "ticket-settings" => ("channels", "ticket_settings"),
                    "agent" => ("agents", "agent"),
                    other => {
                        tracing::warn!(kind = other, id, "ignoring tombstone of an unknown config kind");
                        continue;
                    }
                };
                let account_id_opt = account_id_opt.as_deref();
                ((table, account_id_opt, id.as_str(), kind), ConfigWrite::Delete { kind, account_id_opt, id })
            }
            _ => continue,
        };
        latest.insert(key, write);
    }
    latest.into_values().collect()
}

/// Executes [`fold_config`]'s writes, in order.
pub async fn write_config(transaction: &mut Transaction<'_, Postgres>, writes: &[ConfigWrite<'_>]) -> sqlx::Result<()> {
    for write in writes {
        match write {
            ConfigWrite::Upsert(event) => upsert(transaction, event).await?,
            ConfigWrite::Delete { kind, account_id_opt, id } => delete(transaction, kind, *account_id_opt, id).await?,
        }
    }
    Ok(())
}

async fn upsert(transaction: &mut Transaction<'_, Postgres>, event: &Event) -> sqlx::Result<()> {
    let at: DateTime<Utc> = event.recorded_at;
    match &event.fact {
        Fact::Inbox(inbox) => {
            sqlx::query(
                "INSERT INTO inboxes (inbox_id, account_id, name, kind, access_mode, access_user_ids, access_team_ids, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (account_id, inbox_id) DO UPDATE SET name = EXCLUDED.name, \
                 kind = EXCLUDED.kind, access_mode = EXCLUDED.access_mode, access_user_ids = EXCLUDED.access_user_ids, \
                 access_team_ids = EXCLUDED.access_team_ids, updated_at = EXCLUDED.updated_at \
                 WHERE inboxes.updated_at <= EXCLUDED.updated_at",
            )
            .bind(&inbox.inbox_id)
            .bind(&event.account_id)
            .bind(&inbox.name)
            .bind(inbox.kind)
            .bind(inbox.access_mode)
            .bind(&inbox.access_user_ids)
            .bind(&inbox.access_team_ids)
            .bind(at)
            .execute(&mut **transaction)
            .await?;
        }
        Fact::Channel(channel) => {
            sqlx::query(
                "INSERT INTO channels (channel_id, account_id, inbox_id, channel_type, name, enabled, settings, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (account_id, channel_id) DO UPDATE SET inbox_id = EXCLUDED.inbox_id, \
                 channel_type = EXCLUDED.channel_type, name = EXCLUDED.name, enabled = EXCLUDED.enabled, \
                 settings = EXCLUDED.settings, updated_at = EXCLUDED.updated_at \
                 WHERE channels.updated_at <= EXCLUDED.updated_at",
            )
            .bind(&channel.channel_id)
            .bind(&event.account_id)
            .bind(&channel.inbox_id)
            .bind(channel.channel_type)
            .bind(&channel.name)
            .bind(channel.enabled)
            .bind(&channel.settings)
            .bind(at)
            .execute(&mut **transaction)
            .await?;
        }
        Fact::RoutingRules { channel_id, version, rules } => {
            set_channel_json(transaction, "routing_rules", channel_id, &event.account_id, *version, rules).await?;
        }
        Fact::TicketSettings { channel_id, version, settings } => {
            set_channel_json(transaction, "ticket_settings", channel_id, &event.account_id, *version, settings).await?;
        }
        Fact::Agent(agent) => {
            sqlx::query(
                "INSERT INTO agents (agent_id, account_id, name, email, role, paid_seat, available, team_ids, skills, \
                 max_open_conversations, capacity_per_channel_type, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
                 ON CONFLICT (account_id, agent_id) DO UPDATE SET name = EXCLUDED.name, \
                 email = EXCLUDED.email, role = EXCLUDED.role, paid_seat = EXCLUDED.paid_seat, \
                 available = EXCLUDED.available, team_ids = EXCLUDED.team_ids, skills = EXCLUDED.skills, \
                 max_open_conversations = EXCLUDED.max_open_conversations, \
                 capacity_per_channel_type = EXCLUDED.capacity_per_channel_type, updated_at = EXCLUDED.updated_at \
                 WHERE agents.updated_at <= EXCLUDED.updated_at",
            )
            .bind(&agent.agent_id)
            .bind(&event.account_id)
            .bind(&agent.name)
            .bind(&agent.email)
            .bind(&agent.role)
            .bind(agent.paid_seat)
            .bind(agent.available)
            .bind(&agent.team_ids)
            .bind(&agent.skills)
            .bind(agent.max_open_conversations)
            .bind(&agent.capacity_per_channel_type)
            .bind(at)
            .execute(&mut **transaction)
            .await?;
        }
        _ => {}
    }
    Ok(())
}

/// Routing rules and ticket settings live on the channel row. They may arrive before the
/// channel itself (other key, maybe other partition): then a placeholder row holds them, dated
/// `-infinity` so the channel's own event fills in the rest whenever it comes.
async fn set_channel_json(
    transaction: &mut Transaction<'_, Postgres>,
    column: &'static str,
    channel_id: &str,
    account_id: &str,
    version: i64,
    value: &serde_json::Value,
) -> sqlx::Result<()> {
    // `column` is one of two constants above, never input.
    let statement = format!(
        "INSERT INTO channels (channel_id, account_id, inbox_id, channel_type, name, enabled, {column}, updated_at) \
         VALUES ($1, $2, '', 'unspecified', '', false, $3, '-infinity') \
         ON CONFLICT (account_id, channel_id) DO UPDATE SET {column} = EXCLUDED.{column} \
         WHERE COALESCE((channels.{column}->>'version')::bigint, -1) <= $4"
    );
    sqlx::query(&statement)
        .bind(channel_id)
        .bind(account_id)
        .bind(value)
        .bind(version)
        .execute(&mut **transaction)
        .await?;
    Ok(())
}

/// Deletes the entity `id` of `account_id_opt`. A legacy tombstone (no account) deletes the id
/// in every account: it was written when ids were installation-wide.
async fn delete(
    transaction: &mut Transaction<'_, Postgres>,
    kind: &str,
    account_id_opt: Option<&str>,
    id: &str,
) -> sqlx::Result<()> {
    let statement = match kind {
        "inbox" => "DELETE FROM inboxes WHERE inbox_id = $1",
        "channel" => "DELETE FROM channels WHERE channel_id = $1",
        "rules" => "UPDATE channels SET routing_rules = NULL WHERE channel_id = $1",
        "ticket_settings" => "UPDATE channels SET ticket_settings = NULL WHERE channel_id = $1",
        "agent" => "DELETE FROM agents WHERE agent_id = $1",
        _ => return Ok(()),
    };
    // Both forms are constants; the account condition binds $2.
    let statement = format!("{statement} AND ($2::text IS NULL OR account_id = $2)");
    sqlx::query(&statement).bind(id).bind(account_id_opt).execute(&mut **transaction).await?;
    Ok(())
}
