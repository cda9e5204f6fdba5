//! A small account written straight into the read models (and the matching config file), for
//! API tests that must not depend on the projector filling every table.

use chrono::{Duration as ChronoDuration, Utc};
use sqlx::PgPool;
use switchboard_api::auth::{Identity, Role};
use switchboard_proto::api::v1::admin_service_client::AdminServiceClient;
use switchboard_proto::api::v1::conversation_service_client::ConversationServiceClient;
use switchboard_proto::api::v1::workspace_service_client::WorkspaceServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::BearerToken;

pub const ACCOUNT: &str = "acme";

/// The same account as configuration (what commands validate against): `support` is open to
/// everyone; `vip` only to `vip-agent`, `free-member`, `admin-member` and team `vip-team`.
pub const ACME_CONFIG: &str = r#"
account_id = "acme"

[[inboxes]]
id = "support"
name = "Support"

[[inboxes]]
id = "vip"
name = "VIP"
access = "specific_users_and_teams"
access_users = ["vip-agent", "free-member", "admin-member"]
access_teams = ["vip-team"]

[[channels]]
id = "web-chat"
inbox = "support"
type = "chat"
name = "Website chat"

[[channels]]
id = "vip-mail"
inbox = "vip"
type = "team_email"
name = "VIP mail"

[[agents]]
id = "ana"
name = "Ana"
paid_seat = true
available = true

[[agents]]
id = "vip-agent"
name = "Vip Agent"
paid_seat = true

[[agents]]
id = "teammate"
name = "Team Mate"
paid_seat = true
teams = ["vip-team"]

[[agents]]
id = "outsider"
name = "Outsider"
paid_seat = true

[[agents]]
id = "free-member"
name = "Free Member"
paid_seat = false

[[agents]]
id = "admin-member"
name = "Admin Member"
paid_seat = true

[[agents]]
id = "admin-outsider"
name = "Admin Outsider"
paid_seat = true

[[agents]]
id = "super-outsider"
name = "Super Outsider"
paid_seat = true
"#;

pub fn identity(user_id: &str, role: Role, teams: &[&str]) -> Identity {
    Identity {
        user_id: user_id.into(),
        account_id: ACCOUNT.into(),
        role,
        team_ids: teams.iter().map(|team| team.to_string()).collect(),
    }
}

/// Ids of the seeded rows.
#[derive(Debug, Clone)]
pub struct Seeded {
    pub contact_id: Uuid,
    /// support, unassigned, with a form message that has a hidden field.
    pub support_unassigned: Uuid,
    /// support, assigned to ana.
    pub support_assigned: Uuid,
    pub vip_unassigned: Uuid,
    /// vip, assigned to vip-agent.
    pub vip_assigned: Uuid,
    pub form_message_id: Uuid,
    pub support_ticket: Uuid,
    pub vip_ticket: Uuid,
}

pub async fn seed(pool: &PgPool) -> anyhow::Result<Seeded> {
    let now = Utc::now();
    sqlx::raw_sql(
        "INSERT INTO inboxes (inbox_id, account_id, name, kind, access_mode, access_user_ids, access_team_ids, updated_at) VALUES
           ('support', 'acme', 'Support', 'conversations', 'everyone', '{}', '{}', now()),
           ('vip', 'acme', 'VIP', 'conversations', 'specific_users_and_teams', '{vip-agent,free-member,admin-member}', '{vip-team}', now()),
           ('other-support', 'other', 'Other account', 'conversations', 'everyone', '{}', '{}', now());
         INSERT INTO channels (channel_id, account_id, inbox_id, channel_type, name, enabled, settings, routing_rules, updated_at) VALUES
           ('web-chat', 'acme', 'support', 'chat', 'Website chat', true, '{\"accent_colour\": \"#123456\"}', '{\"auto_assign\": false}', now()),
           ('vip-mail', 'acme', 'vip', 'team_email', 'VIP mail', true, '{\"team_address\": \"vip@acme.test\"}', NULL, now());
         INSERT INTO agents (agent_id, account_id, name, email, role, paid_seat, available, team_ids, skills, max_open_conversations, capacity_per_channel_type, updated_at) VALUES
           ('ana', 'acme', 'Ana', 'ana@acme.test', 'agent', true, true, '{}', '{fr}', 5, '{\"chat\": 3}', now()),
           ('vip-agent', 'acme', 'Vip Agent', '', 'agent', true, false, '{}', '{}', 0, '{}', now()),
           ('teammate', 'acme', 'Team Mate', '', 'agent', true, true, '{vip-team}', '{}', 0, '{}', now()),
           ('free-member', 'acme', 'Free Member', '', 'agent', false, true, '{}', '{}', 0, '{}', now());
         INSERT INTO agent_workload (account_id, agent_id, channel_type, open_count) VALUES ('acme', 'ana', 'chat', 1), ('acme', 'vip-agent', 'team_email', 1);",
    )
    .execute(pool)
    .await?;
    let seeded = Seeded {
        contact_id: Uuid::now_v7(),
        support_unassigned: Uuid::now_v7(),
        support_assigned: Uuid::now_v7(),
        vip_unassigned: Uuid::now_v7(),
        vip_assigned: Uuid::now_v7(),
        form_message_id: Uuid::now_v7(),
        support_ticket: Uuid::now_v7(),
        vip_ticket: Uuid::now_v7(),
    };
    sqlx::query(
        "INSERT INTO contacts (contact_id, account_id, display_name, email, owner_agent_id, created_at) \
         VALUES ($1, 'acme', 'Carla Customer', 'carla@example.com', 'ana', now())",
    )
    .bind(seeded.contact_id)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO contact_identities (account_id, channel_id, external_id, contact_id) VALUES ('acme', 'web-chat', 'visitor-1', $1)",
    )
    .bind(seeded.contact_id)
    .execute(pool)
    .await?;
    let conversations = [
        (seeded.support_unassigned, "support", "web-chat", "chat", None, 4),
        (seeded.support_assigned, "support", "web-chat", "chat", Some("ana"), 3),
        (seeded.vip_unassigned, "vip", "vip-mail", "team_email", None, 2),
        (seeded.vip_assigned, "vip", "vip-mail", "team_email", Some("vip-agent"), 1),
    ];
    for (id, inbox_id, channel_id, channel_type, assignee_opt, age_minutes) in conversations {
        let started_at = now - ChronoDuration::minutes(age_minutes);
        sqlx::query(
            "INSERT INTO conversations (conversation_id, account_id, inbox_id, channel_id, channel_type, thread_key, status, \
                 assignee_id, contact_external_id, contact_name, message_count, started_at, last_message_at, contact_id, \
                 subject, updated_at) \
             VALUES ($1, 'acme', $2, $3, $4, $5, 'open', $6, 'visitor-1', 'Carla Customer', 1, $7, $7, $8, '', $7)",
        )
        .bind(id)
        .bind(inbox_id)
        .bind(channel_id)
        .bind(channel_type)
        .bind(id.to_string())
        .bind(assignee_opt)
        .bind(started_at)
        .bind(seeded.contact_id)
        .execute(pool)
        .await?;
        let message_id = if id == seeded.support_unassigned { seeded.form_message_id } else { Uuid::now_v7() };
        let (kind, content, hidden) = if id == seeded.support_unassigned {
            (
                "form_submission",
                serde_json::json!({"form_fields": [{"name": "email", "value": "carla@example.com", "hidden": false}]}),
                serde_json::json!([{"name": "utm_campaign", "value": "spring-sale"}]),
            )
        } else {
            ("text", serde_json::json!({}), serde_json::json!([]))
        };
        sqlx::query(
            "INSERT INTO messages (message_id, conversation_id, account_id, channel_id, provider_message_id, sender_external_id, \
                 sender_name, body, sent_at, recorded_at, source_event_id, trace_id, contact_id, kind, content, hidden_fields) \
             VALUES ($1, $2, 'acme', $3, $4, 'visitor-1', 'Carla Customer', 'hello', $5, $5, 'e', '', $6, $7, $8, $9)",
        )
        .bind(message_id)
        .bind(id)
        .bind(channel_id)
        .bind(message_id.to_string())
        .bind(started_at)
        .bind(seeded.contact_id)
        .bind(kind)
        .bind(content)
        .bind(hidden)
        .execute(pool)
        .await?;
        let (outcome, skipped) = match assignee_opt {
            Some(_) => ("assigned", serde_json::json!([{"agent_id": "bo", "reason": "offline"}])),
            None => ("no_eligible_agent", serde_json::json!([{"agent_id": "ana", "reason": "at_capacity"}])),
        };
        sqlx::query(
            "INSERT INTO assignments (event_id, conversation_id, assignee_id, outcome, channel_id, rule_version, strategy, \
                 eligible_agent_ids, skipped, decided_at) VALUES ($1, $2, $3, $4, $5, 3, 'round_robin', $6, $7, $8)",
        )
        .bind(Uuid::now_v7().to_string())
        .bind(id)
        .bind(assignee_opt)
        .bind(outcome)
        .bind(channel_id)
        .bind(assignee_opt.map(|assignee| vec![assignee.to_owned()]).unwrap_or_default())
        .bind(skipped)
        .bind(started_at)
        .execute(pool)
        .await?;
    }
    for (ticket_id, conversation_id, inbox_id, channel_id, stage, owner) in [
        (seeded.support_ticket, seeded.support_unassigned, "support", "web-chat", "new", Some("ana")),
        (seeded.vip_ticket, seeded.vip_assigned, "vip", "vip-mail", "waiting", None),
    ] {
        sqlx::query(
            "INSERT INTO tickets (ticket_id, account_id, conversation_id, contact_id, inbox_id, channel_id, pipeline, stage, \
                 owner_agent_id, owner_source, name, created_at, updated_at) \
             VALUES ($1, 'acme', $2, $3, $4, $5, 'support', $6, $7, 'conversation_assignee', 'Help', now(), now())",
        )
        .bind(ticket_id)
        .bind(conversation_id)
        .bind(seeded.contact_id)
        .bind(inbox_id)
        .bind(channel_id)
        .bind(stage)
        .bind(owner)
        .execute(pool)
        .await?;
    }
    for (kind, reason, inbox_id, conversation_opt) in [
        ("left_unassigned", "no_eligible_agent", "support", Some(seeded.support_unassigned)),
        ("withheld", "channel_off", "vip", None),
        ("withheld", "unknown_channel", "", None),
    ] {
        sqlx::query(
            "INSERT INTO routing_audit (event_id, account_id, kind, reason, channel_id, inbox_id, conversation_id, detail, at) \
             VALUES ($1, 'acme', $2, $3, '', $4, $5, '{\"skipped\": 1}', now())",
        )
        .bind(Uuid::now_v7().to_string())
        .bind(kind)
        .bind(reason)
        .bind(inbox_id)
        .bind(conversation_opt)
        .execute(pool)
        .await?;
    }
    Ok(seeded)
}

/// Appends a conversation change the way the projector does (row + NOTIFY in one
/// transaction); returns its change id.
pub async fn append_change(pool: &PgPool, inbox_id: &str, conversation_id: Uuid, kind: &str) -> anyhow::Result<i64> {
    let mut transaction = pool.begin().await?;
    let change_id: i64 = sqlx::query_scalar(
        "INSERT INTO conversation_changes (account_id, inbox_id, conversation_id, kind, event_id, at) \
         VALUES ('acme', $1, $2, $3, $4, now()) RETURNING change_id",
    )
    .bind(inbox_id)
    .bind(conversation_id)
    .bind(kind)
    .bind(Uuid::now_v7().to_string())
    .fetch_one(&mut *transaction)
    .await?;
    sqlx::query("SELECT pg_notify('conversation_changes', $1)").bind(inbox_id).execute(&mut *transaction).await?;
    transaction.commit().await?;
    Ok(change_id)
}

pub type Authed = InterceptedService<Channel, BearerToken>;

/// Clients of every API service, authenticated as one identity.
#[derive(Clone)]
pub struct Clients {
    pub conversations: ConversationServiceClient<Authed>,
    pub workspace: WorkspaceServiceClient<Authed>,
    pub admin: AdminServiceClient<Authed>,
}

pub async fn clients_for(url: &str, identity: &Identity) -> anyhow::Result<Clients> {
    let channel = crate::connect_channel(url).await?;
    let token = BearerToken::for_identity(identity)?;
    Ok(Clients {
        conversations: ConversationServiceClient::with_interceptor(channel.clone(), token.clone()),
        workspace: WorkspaceServiceClient::with_interceptor(channel.clone(), token.clone()),
        admin: AdminServiceClient::with_interceptor(channel, token),
    })
}
