//! `switchboard.api.v1.WorkspaceService`: inboxes with channels, agents with workload, tickets,
//! contacts and their timeline, routing audit; each limited to the caller's [`Scope`].

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{Postgres, QueryBuilder};
use switchboard_proto::api::v1::workspace_service_server::WorkspaceService;
use switchboard_proto::api::v1::*;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::access::{self, InboxAccess};
use crate::auth::Identity;
use crate::conversations::{
    CONVERSATION_COLUMNS, ConversationRow, MESSAGE_COLUMNS, MessageRow, hidden_fields_of, reach_min_position,
};
use crate::error::ApiError;
use crate::read::ReadModels;
use crate::scope::{self, PageCursor, Scope, json_to_struct, timestamp};

pub struct Workspace {
    read: ReadModels,
}

impl Workspace {
    pub fn new(read: ReadModels) -> Self {
        Workspace { read }
    }
}

#[derive(sqlx::FromRow)]
struct InboxRow {
    inbox_id: String,
    account_id: String,
    name: String,
    kind: String,
    access_mode: String,
    access_user_ids: Vec<String>,
    access_team_ids: Vec<String>,
    updated_at: DateTime<Utc>,
}

impl InboxRow {
    fn access(&self) -> InboxAccess {
        InboxAccess {
            inbox_id: self.inbox_id.clone(),
            account_id: self.account_id.clone(),
            access_mode: self.access_mode.clone(),
            access_user_ids: self.access_user_ids.clone(),
            access_team_ids: self.access_team_ids.clone(),
        }
    }
}

#[derive(sqlx::FromRow)]
struct ChannelRow {
    channel_id: String,
    inbox_id: String,
    channel_type: String,
    name: String,
    enabled: bool,
    settings: serde_json::Value,
    routing_rules: Option<serde_json::Value>,
    ticket_settings: Option<serde_json::Value>,
    updated_at: DateTime<Utc>,
}

impl From<ChannelRow> for Channel {
    fn from(row: ChannelRow) -> Self {
        Channel {
            id: row.channel_id,
            inbox_id: row.inbox_id,
            channel_type: row.channel_type,
            name: row.name,
            enabled: row.enabled,
            settings: json_to_struct(&row.settings),
            routing_rules: row.routing_rules.as_ref().and_then(json_to_struct),
            ticket_settings: row.ticket_settings.as_ref().and_then(json_to_struct),
            updated_at: Some(timestamp(row.updated_at)),
        }
    }
}

const INBOX_COLUMNS: &str =
    "inbox_id, account_id, name, kind, access_mode, access_user_ids, access_team_ids, updated_at";
const CHANNEL_COLUMNS: &str =
    "channel_id, inbox_id, channel_type, name, enabled, settings, routing_rules, ticket_settings, updated_at";

#[derive(sqlx::FromRow)]
struct TicketRow {
    ticket_id: Uuid,
    conversation_id: Uuid,
    contact_id: Option<Uuid>,
    inbox_id: String,
    channel_id: String,
    pipeline: String,
    stage: String,
    owner_agent_id: Option<String>,
    owner_source: String,
    name: String,
    description: String,
    status: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

const TICKET_COLUMNS: &str = "ticket_id, conversation_id, contact_id, inbox_id, channel_id, pipeline, stage, \
    owner_agent_id, owner_source, name, description, status, created_at, updated_at";

impl From<TicketRow> for Ticket {
    fn from(row: TicketRow) -> Self {
        Ticket {
            id: row.ticket_id.to_string(),
            conversation_id: row.conversation_id.to_string(),
            contact_id: row.contact_id.map(|id| id.to_string()).unwrap_or_default(),
            inbox_id: row.inbox_id,
            channel_id: row.channel_id,
            pipeline: row.pipeline,
            stage: row.stage,
            owner_agent_id: row.owner_agent_id.unwrap_or_default(),
            owner_source: row.owner_source,
            name: row.name,
            description: row.description,
            status: row.status,
            created_at: Some(timestamp(row.created_at)),
            updated_at: Some(timestamp(row.updated_at)),
        }
    }
}

#[derive(sqlx::FromRow)]
struct ContactRow {
    contact_id: Uuid,
    display_name: String,
    email: String,
    owner_agent_id: Option<String>,
    created_at: DateTime<Utc>,
}

impl ContactRow {
    fn into_contact(self, identities: Vec<ContactIdentity>) -> Contact {
        Contact {
            id: self.contact_id.to_string(),
            display_name: self.display_name,
            email: self.email,
            owner_agent_id: self.owner_agent_id.unwrap_or_default(),
            created_at: Some(timestamp(self.created_at)),
            identities,
        }
    }
}

#[derive(sqlx::FromRow)]
struct AuditRow {
    event_id: String,
    kind: String,
    reason: String,
    channel_id: String,
    inbox_id: String,
    conversation_id: Option<Uuid>,
    message_id: Option<Uuid>,
    detail: serde_json::Value,
    at: DateTime<Utc>,
}

fn non_empty(value: &str) -> Option<&str> {
    (!value.is_empty()).then_some(value)
}

/// Keyset pagination over `(created_at|at DESC, id DESC)` where ids are UUIDs.
fn next_token<T>(rows: &mut Vec<T>, page_size: u32, tag: char, key: impl Fn(&T) -> (DateTime<Utc>, Uuid)) -> String {
    if rows.len() <= page_size as usize {
        return String::new();
    }
    rows.truncate(page_size as usize);
    rows.last()
        .map(|last| {
            let (instant, id) = key(last);
            PageCursor { order_tag: tag, micros: instant.timestamp_micros(), id }.encode()
        })
        .unwrap_or_default()
}

fn scope_filter<'a>(sql: &mut QueryBuilder<'a, Postgres>, scope: &'a Scope, column: &str) {
    if let Some(inbox_ids) = scope.inbox_filter() {
        sql.push(format!(" AND {column} = ANY(")).push_bind(inbox_ids).push(")");
    }
}

#[tonic::async_trait]
impl WorkspaceService for Workspace {
    #[tracing::instrument(skip_all)]
    async fn list_inboxes(
        &self,
        request: Request<ListInboxesRequest>,
    ) -> Result<Response<ListInboxesResponse>, Status> {
        let identity = Identity::of(&request)?;
        reach_min_position(&self.read, &request, &request.get_ref().min_position).await?;
        let mut connection = self.read.connection().await?;
        let inboxes: Vec<InboxRow> =
            sqlx::query_as(&format!("SELECT {INBOX_COLUMNS} FROM inboxes WHERE account_id = $1 ORDER BY inbox_id"))
                .bind(&identity.account_id)
                .fetch_all(&mut *connection)
                .await
                .map_err(ApiError::from)?;
        let visible: Vec<InboxRow> =
            inboxes.into_iter().filter(|inbox| access::can_see(&identity, &inbox.access())).collect();
        let ids: Vec<String> = visible.iter().map(|inbox| inbox.inbox_id.clone()).collect();
        let channels: Vec<ChannelRow> = sqlx::query_as(&format!(
            "SELECT {CHANNEL_COLUMNS} FROM channels WHERE inbox_id = ANY($1) AND account_id = $2 ORDER BY channel_id"
        ))
        .bind(&ids)
        .bind(&identity.account_id)
        .fetch_all(&mut *connection)
        .await
        .map_err(ApiError::from)?;
        let mut channels_by_inbox: HashMap<String, Vec<Channel>> = HashMap::new();
        for channel in channels {
            channels_by_inbox.entry(channel.inbox_id.clone()).or_default().push(channel.into());
        }
        let inboxes = visible
            .into_iter()
            .map(|inbox| {
                let channels = channels_by_inbox.remove(&inbox.inbox_id).unwrap_or_default();
                to_inbox(&identity, inbox, channels)
            })
            .collect();
        Ok(Response::new(ListInboxesResponse { inboxes }))
    }

    #[tracing::instrument(skip_all, fields(inbox_id = %request.get_ref().inbox_id))]
    async fn get_inbox(&self, request: Request<GetInboxRequest>) -> Result<Response<Inbox>, Status> {
        let identity = Identity::of(&request)?;
        let inbox_id = request.get_ref().inbox_id.clone();
        if inbox_id.is_empty() {
            return Err(ApiError::invalid("inbox_id", "is required").into());
        }
        reach_min_position(&self.read, &request, &request.get_ref().min_position).await?;
        let mut connection = self.read.connection().await?;
        let inbox: Option<InboxRow> =
            sqlx::query_as(&format!("SELECT {INBOX_COLUMNS} FROM inboxes WHERE inbox_id = $1 AND account_id = $2"))
                .bind(&inbox_id)
                .bind(&identity.account_id)
                .fetch_optional(&mut *connection)
                .await
                .map_err(ApiError::from)?;
        let Some(inbox) = inbox.filter(|inbox| access::can_see(&identity, &inbox.access())) else {
            return Err(ApiError::not_found("inbox", inbox_id).into());
        };
        let channels: Vec<ChannelRow> = sqlx::query_as(&format!(
            "SELECT {CHANNEL_COLUMNS} FROM channels WHERE inbox_id = $1 AND account_id = $2 ORDER BY channel_id"
        ))
        .bind(&inbox_id)
        .bind(&identity.account_id)
        .fetch_all(&mut *connection)
        .await
        .map_err(ApiError::from)?;
        Ok(Response::new(to_inbox(&identity, inbox, channels.into_iter().map(Channel::from).collect())))
    }

    #[tracing::instrument(skip_all)]
    async fn list_agents(&self, request: Request<ListAgentsRequest>) -> Result<Response<ListAgentsResponse>, Status> {
        let identity = Identity::of(&request)?;
        reach_min_position(&self.read, &request, &request.get_ref().min_position).await?;
        let body = request.get_ref();
        let mut connection = self.read.connection().await?;
        #[derive(sqlx::FromRow)]
        struct AgentRow {
            agent_id: String,
            name: String,
            email: String,
            role: String,
            paid_seat: bool,
            available: bool,
            team_ids: Vec<String>,
            skills: Vec<String>,
            max_open_conversations: i32,
            capacity_per_channel_type: serde_json::Value,
        }
        let agents: Vec<AgentRow> = sqlx::query_as(
            "SELECT agent_id, name, email, role, paid_seat, available, team_ids, skills, max_open_conversations, \
                    capacity_per_channel_type \
             FROM agents WHERE account_id = $1 AND ($2 = '' OR $2 = ANY(team_ids)) AND (NOT $3 OR available) \
             ORDER BY agent_id",
        )
        .bind(&identity.account_id)
        .bind(&body.team_id)
        .bind(body.available_only)
        .fetch_all(&mut *connection)
        .await
        .map_err(ApiError::from)?;
        let ids: Vec<&str> = agents.iter().map(|agent| agent.agent_id.as_str()).collect();
        let workload: Vec<(String, String, i32)> = sqlx::query_as(
            "SELECT agent_id, channel_type, open_count FROM agent_workload \
                 WHERE account_id = $2 AND agent_id = ANY($1)",
        )
        .bind(&ids)
        .bind(&identity.account_id)
        .fetch_all(&mut *connection)
        .await
        .map_err(ApiError::from)?;
        let mut open_by_agent: HashMap<String, HashMap<String, u32>> = HashMap::new();
        for (agent_id, channel_type, open_count) in workload {
            open_by_agent.entry(agent_id).or_default().insert(channel_type, open_count.max(0) as u32);
        }
        let agents = agents
            .into_iter()
            .map(|row| {
                let open_per_channel_type = open_by_agent.remove(&row.agent_id).unwrap_or_default();
                let capacity_per_channel_type = row
                    .capacity_per_channel_type
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(|(channel_type, limit)| {
                        Some((channel_type.clone(), u32::try_from(limit.as_u64()?).ok()?))
                    })
                    .collect();
                Agent {
                    open_total: open_per_channel_type.values().sum(),
                    id: row.agent_id,
                    name: row.name,
                    email: row.email,
                    role: row.role,
                    paid_seat: row.paid_seat,
                    available: row.available,
                    team_ids: row.team_ids,
                    skills: row.skills,
                    max_open_conversations: row.max_open_conversations.max(0) as u32,
                    capacity_per_channel_type,
                    open_per_channel_type,
                }
            })
            .collect();
        Ok(Response::new(ListAgentsResponse { agents }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_tickets(
        &self,
        request: Request<ListTicketsRequest>,
    ) -> Result<Response<ListTicketsResponse>, Status> {
        let identity = Identity::of(&request)?;
        let body = request.get_ref();
        if !["", "open", "closed"].contains(&body.status.as_str()) {
            return Err(ApiError::invalid("status", "must be open, closed or empty").into());
        }
        let cursor_opt = non_empty(&body.page_token).map(|token| PageCursor::decode(token, 't')).transpose()?;
        let page_size = scope::page_size(body.page_size);
        reach_min_position(&self.read, &request, &body.min_position).await?;
        let mut connection = self.read.connection().await?;
        let scope = Scope::resolve(&mut connection, &identity).await?;
        let mut sql =
            QueryBuilder::<Postgres>::new(format!("SELECT {TICKET_COLUMNS} FROM tickets WHERE account_id = "));
        sql.push_bind(scope.account_id());
        scope_filter(&mut sql, &scope, "inbox_id");
        for (column, value) in [
            ("inbox_id", &body.inbox_id),
            ("pipeline", &body.pipeline),
            ("stage", &body.stage),
            ("owner_agent_id", &body.owner_agent_id),
            ("status", &body.status),
        ] {
            if !value.is_empty() {
                sql.push(format!(" AND {column} = ")).push_bind(value);
            }
        }
        if let Some(cursor) = cursor_opt {
            sql.push(" AND (created_at, ticket_id) < (")
                .push_bind(cursor.instant())
                .push(", ")
                .push_bind(cursor.id)
                .push(")");
        }
        sql.push(" ORDER BY created_at DESC, ticket_id DESC LIMIT ").push_bind(i64::from(page_size) + 1);
        let mut rows: Vec<TicketRow> =
            sql.build_query_as().fetch_all(&mut *connection).await.map_err(ApiError::from)?;
        let next_page_token = next_token(&mut rows, page_size, 't', |row| (row.created_at, row.ticket_id));
        Ok(Response::new(ListTicketsResponse {
            tickets: rows.into_iter().map(Ticket::from).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_contacts(
        &self,
        request: Request<ListContactsRequest>,
    ) -> Result<Response<ListContactsResponse>, Status> {
        let identity = Identity::of(&request)?;
        let body = request.get_ref();
        let cursor_opt = non_empty(&body.page_token).map(|token| PageCursor::decode(token, 'c')).transpose()?;
        let page_size = scope::page_size(body.page_size);
        reach_min_position(&self.read, &request, &body.min_position).await?;
        let mut connection = self.read.connection().await?;
        let mut sql = QueryBuilder::<Postgres>::new(
            "SELECT contact_id, display_name, email, owner_agent_id, created_at FROM contacts WHERE account_id = ",
        );
        sql.push_bind(&identity.account_id);
        if !body.owner_agent_id.is_empty() {
            sql.push(" AND owner_agent_id = ").push_bind(&body.owner_agent_id);
        }
        if let Some(cursor) = cursor_opt {
            sql.push(" AND (created_at, contact_id) < (")
                .push_bind(cursor.instant())
                .push(", ")
                .push_bind(cursor.id)
                .push(")");
        }
        sql.push(" ORDER BY created_at DESC, contact_id DESC LIMIT ").push_bind(i64::from(page_size) + 1);
        let mut rows: Vec<ContactRow> =
            sql.build_query_as().fetch_all(&mut *connection).await.map_err(ApiError::from)?;
        let next_page_token = next_token(&mut rows, page_size, 'c', |row| (row.created_at, row.contact_id));
        let ids: Vec<Uuid> = rows.iter().map(|row| row.contact_id).collect();
        let mut identities = identities_of(&mut connection, &ids).await?;
        let contacts = rows
            .into_iter()
            .map(|row| {
                let found = identities.remove(&row.contact_id).unwrap_or_default();
                row.into_contact(found)
            })
            .collect();
        Ok(Response::new(ListContactsResponse { contacts, next_page_token }))
    }

    #[tracing::instrument(skip_all, fields(contact_id = %request.get_ref().contact_id))]
    async fn get_contact_timeline(
        &self,
        request: Request<GetContactTimelineRequest>,
    ) -> Result<Response<ContactTimeline>, Status> {
        let identity = Identity::of(&request)?;
        let contact_id = scope::parse_uuid("contact_id", &request.get_ref().contact_id)?;
        reach_min_position(&self.read, &request, &request.get_ref().min_position).await?;
        let mut connection = self.read.connection().await?;
        let contact: Option<ContactRow> = sqlx::query_as(
            "SELECT contact_id, display_name, email, owner_agent_id, created_at FROM contacts \
             WHERE contact_id = $1 AND account_id = $2",
        )
        .bind(contact_id)
        .bind(&identity.account_id)
        .fetch_optional(&mut *connection)
        .await
        .map_err(ApiError::from)?;
        let Some(contact) = contact else {
            return Err(ApiError::not_found("contact", contact_id.to_string()).into());
        };
        let scope = Scope::resolve(&mut connection, &identity).await?;
        let mut conversations_sql = QueryBuilder::<Postgres>::new(format!(
            "SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE contact_id = "
        ));
        conversations_sql.push_bind(contact_id).push(" AND account_id = ").push_bind(scope.account_id());
        scope_filter(&mut conversations_sql, &scope, "inbox_id");
        conversations_sql.push(" ORDER BY started_at, conversation_id");
        let conversations: Vec<ConversationRow> =
            conversations_sql.build_query_as().fetch_all(&mut *connection).await.map_err(ApiError::from)?;
        // The timeline is where hidden form fields are shown (C7); messages of inboxes the
        // caller cannot see stay out of it (I2).
        let columns = MESSAGE_COLUMNS.split(", ").map(|column| format!("m.{column}")).collect::<Vec<_>>().join(", ");
        let mut messages_sql = QueryBuilder::<Postgres>::new(format!(
            "SELECT {columns}, m.hidden_fields FROM messages m JOIN conversations c USING (conversation_id) \
             WHERE m.contact_id = "
        ));
        messages_sql.push_bind(contact_id).push(" AND m.account_id = ").push_bind(scope.account_id());
        scope_filter(&mut messages_sql, &scope, "c.inbox_id");
        messages_sql.push(" ORDER BY m.sent_at, m.message_id");
        #[derive(sqlx::FromRow)]
        struct TimelineRow {
            #[sqlx(flatten)]
            message: MessageRow,
            hidden_fields: serde_json::Value,
        }
        let messages: Vec<TimelineRow> =
            messages_sql.build_query_as().fetch_all(&mut *connection).await.map_err(ApiError::from)?;
        let mut tickets_sql =
            QueryBuilder::<Postgres>::new(format!("SELECT {TICKET_COLUMNS} FROM tickets WHERE contact_id = "));
        tickets_sql.push_bind(contact_id).push(" AND account_id = ").push_bind(scope.account_id());
        scope_filter(&mut tickets_sql, &scope, "inbox_id");
        tickets_sql.push(" ORDER BY created_at, ticket_id");
        let tickets: Vec<TicketRow> =
            tickets_sql.build_query_as().fetch_all(&mut *connection).await.map_err(ApiError::from)?;
        let mut identities = identities_of(&mut connection, &[contact_id]).await?;
        Ok(Response::new(ContactTimeline {
            contact: Some(contact.into_contact(identities.remove(&contact_id).unwrap_or_default())),
            messages: messages
                .into_iter()
                .map(|row| {
                    let hidden_fields = hidden_fields_of(&row.hidden_fields);
                    Message { hidden_fields, ..Message::from(row.message) }
                })
                .collect(),
            conversations: conversations.into_iter().map(Conversation::from).collect(),
            tickets: tickets.into_iter().map(Ticket::from).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_projection_status(
        &self,
        request: Request<GetProjectionStatusRequest>,
    ) -> Result<Response<ProjectionStatus>, Status> {
        // Any authenticated caller may ask: positions and lag reveal no account's data.
        Identity::of(&request)?;
        let mut connection = self.read.connection().await?;
        let active_schema: String =
            sqlx::query_scalar("SELECT current_schema()").fetch_one(&mut *connection).await.map_err(ApiError::from)?;
        let positions: Vec<(String, String, i32, i64)> = sqlx::query_as(
            "SELECT projection, topic, partition, next_offset FROM projector_positions ORDER BY topic, partition",
        )
        .fetch_all(&mut *connection)
        .await
        .map_err(ApiError::from)?;
        let lag: Vec<(String, i32, i64, i64, i64, DateTime<Utc>)> = sqlx::query_as(
            "SELECT topic, partition, next_offset, end_offset, lag, measured_at FROM projector_lag \
             ORDER BY topic, partition",
        )
        .fetch_all(&mut *connection)
        .await
        .map_err(ApiError::from)?;
        Ok(Response::new(ProjectionStatus {
            active_schema,
            positions: positions
                .into_iter()
                .map(|(_projection, topic, partition, next_offset)| PartitionProgress {
                    topic,
                    partition,
                    next_offset,
                    ..Default::default()
                })
                .collect(),
            lag: lag
                .into_iter()
                .map(|(topic, partition, next_offset, end_offset, lag, measured_at)| PartitionProgress {
                    topic,
                    partition,
                    next_offset,
                    end_offset,
                    lag,
                    measured_at: Some(timestamp(measured_at)),
                })
                .collect(),
        }))
    }

    async fn list_routing_audit(
        &self,
        request: Request<ListRoutingAuditRequest>,
    ) -> Result<Response<ListRoutingAuditResponse>, Status> {
        let identity = Identity::of(&request)?;
        let body = request.get_ref();
        let conversation_id_opt = scope::optional_uuid("conversation_id", &body.conversation_id)?;
        let message_id_opt = scope::optional_uuid("message_id", &body.message_id)?;
        let cursor_opt = non_empty(&body.page_token).map(|token| PageCursor::decode(token, 'a')).transpose()?;
        let page_size = scope::page_size(body.page_size);
        reach_min_position(&self.read, &request, &body.min_position).await?;
        let mut connection = self.read.connection().await?;
        let scope = Scope::resolve(&mut connection, &identity).await?;
        let mut sql = QueryBuilder::<Postgres>::new(
            "SELECT event_id, kind, reason, channel_id, inbox_id, conversation_id, message_id, detail, at \
             FROM routing_audit WHERE account_id = ",
        );
        sql.push_bind(scope.account_id());
        // Entries not tied to an inbox (e.g. an unknown channel) are for admins only.
        scope_filter(&mut sql, &scope, "inbox_id");
        for (column, value) in [("kind", &body.kind), ("channel_id", &body.channel_id)] {
            if !value.is_empty() {
                sql.push(format!(" AND {column} = ")).push_bind(value);
            }
        }
        if let Some(conversation_id) = conversation_id_opt {
            sql.push(" AND conversation_id = ").push_bind(conversation_id);
        }
        if let Some(message_id) = message_id_opt {
            sql.push(" AND message_id = ").push_bind(message_id);
        }
        if let Some(cursor) = cursor_opt {
            // Event ids are UUIDv7 text; the cursor carries them as UUIDs.
            sql.push(" AND (at, event_id) < (")
                .push_bind(cursor.instant())
                .push(", ")
                .push_bind(cursor.id.to_string())
                .push(")");
        }
        sql.push(" ORDER BY at DESC, event_id DESC LIMIT ").push_bind(i64::from(page_size) + 1);
        let mut rows: Vec<AuditRow> = sql.build_query_as().fetch_all(&mut *connection).await.map_err(ApiError::from)?;
        let next_page_token =
            next_token(&mut rows, page_size, 'a', |row| (row.at, Uuid::parse_str(&row.event_id).unwrap_or_default()));
        let entries = rows
            .into_iter()
            .map(|row| RoutingAuditEntry {
                event_id: row.event_id,
                kind: row.kind,
                reason: row.reason,
                channel_id: row.channel_id,
                inbox_id: row.inbox_id,
                conversation_id: row.conversation_id.map(|id| id.to_string()).unwrap_or_default(),
                message_id: row.message_id.map(|id| id.to_string()).unwrap_or_default(),
                detail: json_to_struct(&row.detail),
                at: Some(timestamp(row.at)),
            })
            .collect();
        Ok(Response::new(ListRoutingAuditResponse { entries, next_page_token }))
    }
}

fn to_inbox(identity: &Identity, row: InboxRow, channels: Vec<Channel>) -> Inbox {
    let caller_can_act = access::can_act(identity, &row.access());
    Inbox {
        id: row.inbox_id,
        name: row.name,
        kind: row.kind,
        access_mode: row.access_mode,
        access_user_ids: row.access_user_ids,
        access_team_ids: row.access_team_ids,
        channels,
        caller_can_act,
        updated_at: Some(timestamp(row.updated_at)),
    }
}

async fn identities_of(
    connection: &mut sqlx::PgConnection,
    contact_ids: &[Uuid],
) -> Result<HashMap<Uuid, Vec<ContactIdentity>>, ApiError> {
    let rows: Vec<(Uuid, String, String)> = sqlx::query_as(
        "SELECT contact_id, channel_id, external_id FROM contact_identities WHERE contact_id = ANY($1) \
         ORDER BY channel_id, external_id",
    )
    .bind(contact_ids)
    .fetch_all(connection)
    .await?;
    let mut identities: HashMap<Uuid, Vec<ContactIdentity>> = HashMap::new();
    for (contact_id, channel_id, external_id) in rows {
        identities.entry(contact_id).or_default().push(ContactIdentity { channel_id, external_id });
    }
    Ok(identities)
}
