//! `switchboard.api.v1.ConversationService` over the PostgreSQL read models: conversation
//! queries and the live change stream. Every answer is limited to the caller's [`Scope`].

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::Stream;
use sqlx::{PgConnection, Postgres, QueryBuilder};
use switchboard_proto::api::v1::conversation_service_server::ConversationService;
use switchboard_proto::api::v1::{
    Assignment, Conversation, ConversationChange, ConversationOrder, ConversationStatus, DeliveryStep, FormFieldValue,
    GetConversationRequest, GetConversationResponse, GetMessageRequest, ListConversationsRequest,
    ListConversationsResponse, Message, MessageAuthor, SkippedCandidate, WatchConversationsRequest,
};
use switchboard_proto::events::v1::ChannelType;
use switchboard_proto::names;
use switchboard_runtime::reply_window;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::auth::Identity;
use crate::error::{ApiError, Violations};
use crate::position::Position;
use crate::read::{PositionWait, ReadModels};
use crate::scope::{self, PageCursor, Scope, json_to_struct, timestamp};

pub struct Conversations {
    read: ReadModels,
}

impl Conversations {
    pub fn new(read: ReadModels) -> Self {
        Conversations { read }
    }
}

/// B6 for every query: parse `min_position` and wait for it within the call's deadline.
pub async fn reach_min_position<T>(
    read: &ReadModels,
    request: &Request<T>,
    min_position: &str,
) -> Result<(), ApiError> {
    let positions = Position::parse_list("min_position", min_position)?;
    if positions.is_empty() {
        return Ok(());
    }
    read.wait_for_positions(&positions, PositionWait::from_metadata(request.metadata())).await
}

/// C6: the read model stores the standard window's end; the human-agent one follows from it.
fn human_agent_reply_window_ends_at(
    channel_type: &str,
    reply_window_ends_at: Option<DateTime<Utc>>,
) -> Option<DateTime<Utc>> {
    let channel_type = names::parse::<ChannelType>(channel_type)?;
    reply_window::human_agent_window_ends_at(channel_type, reply_window_ends_at?)
}

#[derive(sqlx::FromRow)]
pub struct ConversationRow {
    conversation_id: Uuid,
    inbox_id: String,
    channel_id: String,
    channel_type: String,
    status: String,
    assignee_id: Option<String>,
    contact_external_id: String,
    contact_name: String,
    message_count: i32,
    started_at: DateTime<Utc>,
    last_message_at: DateTime<Utc>,
    contact_id: Option<Uuid>,
    subject: String,
    updated_at: DateTime<Utc>,
    closed_at: Option<DateTime<Utc>>,
    ticket_id: Option<Uuid>,
    reply_window_ends_at: Option<DateTime<Utc>>,
    first_response_at: Option<DateTime<Utc>>,
    last_agent_reply_at: Option<DateTime<Utc>>,
}

pub const CONVERSATION_COLUMNS: &str = "conversation_id, inbox_id, channel_id, channel_type, status, assignee_id, \
    contact_external_id, contact_name, message_count, started_at, last_message_at, contact_id, subject, updated_at, \
    closed_at, ticket_id, reply_window_ends_at, first_response_at, last_agent_reply_at";

impl From<ConversationRow> for Conversation {
    fn from(row: ConversationRow) -> Self {
        let human_agent_reply_window_ends_at =
            human_agent_reply_window_ends_at(&row.channel_type, row.reply_window_ends_at).map(timestamp);
        Conversation {
            id: row.conversation_id.to_string(),
            inbox_id: row.inbox_id,
            channel_id: row.channel_id,
            channel_type: row.channel_type,
            status: status_from_name(&row.status) as i32,
            assignee_id: row.assignee_id.unwrap_or_default(),
            contact_external_id: row.contact_external_id,
            contact_name: row.contact_name,
            message_count: row.message_count.max(0) as u32,
            started_at: Some(timestamp(row.started_at)),
            last_message_at: Some(timestamp(row.last_message_at)),
            contact_id: row.contact_id.map(|id| id.to_string()).unwrap_or_default(),
            subject: row.subject,
            updated_at: Some(timestamp(row.updated_at)),
            closed_at: row.closed_at.map(timestamp),
            ticket_id: row.ticket_id.map(|id| id.to_string()).unwrap_or_default(),
            human_agent_reply_window_ends_at,
            reply_window_ends_at: row.reply_window_ends_at.map(timestamp),
            first_response_at: row.first_response_at.map(timestamp),
            last_agent_reply_at: row.last_agent_reply_at.map(timestamp),
        }
    }
}

#[derive(sqlx::FromRow)]
pub struct MessageRow {
    message_id: Uuid,
    conversation_id: Uuid,
    provider_message_id: String,
    sender_external_id: String,
    sender_name: String,
    body: String,
    sent_at: DateTime<Utc>,
    recorded_at: DateTime<Utc>,
    trace_id: String,
    kind: String,
    subject: String,
    content: serde_json::Value,
    direction: String,
    author_kind: String,
    author_agent_id: String,
    author_name: String,
    automation: String,
    delivery_state: String,
    failure_reason: String,
    will_retry: bool,
}

/// Columns for the inbox view: `hidden_fields` is deliberately not selected (C7).
pub const MESSAGE_COLUMNS: &str = "message_id, conversation_id, provider_message_id, sender_external_id, sender_name, \
    body, sent_at, recorded_at, trace_id, kind, subject, content, direction, author_kind, author_agent_id, \
    author_name, automation, delivery_state, failure_reason, will_retry";

impl From<MessageRow> for Message {
    fn from(row: MessageRow) -> Self {
        Message {
            id: row.message_id.to_string(),
            conversation_id: row.conversation_id.to_string(),
            provider_message_id: row.provider_message_id,
            sender_external_id: row.sender_external_id,
            sender_name: row.sender_name,
            text: row.body,
            sent_at: Some(timestamp(row.sent_at)),
            recorded_at: Some(timestamp(row.recorded_at)),
            trace_id: row.trace_id,
            kind: row.kind,
            subject: row.subject,
            content: json_to_struct(&without_hidden_form_fields(row.content)),
            hidden_fields: Vec::new(),
            direction: row.direction,
            author: Some(MessageAuthor {
                kind: row.author_kind,
                agent_id: row.author_agent_id,
                name: row.author_name,
                automation: row.automation,
            }),
            delivery_state: row.delivery_state,
            // Filled by `with_delivery_history` where a query shows it.
            delivery_history: Vec::new(),
            failure_reason: row.failure_reason,
            will_retry: row.will_retry,
        }
    }
}

#[derive(sqlx::FromRow)]
struct DeliveryStepRow {
    message_id: Uuid,
    state: String,
    at: DateTime<Utc>,
    attempt: i32,
    provider_message_id: String,
    error: String,
    will_retry: bool,
}

impl From<DeliveryStepRow> for DeliveryStep {
    fn from(row: DeliveryStepRow) -> Self {
        DeliveryStep {
            state: row.state,
            at: Some(timestamp(row.at)),
            attempt: row.attempt.max(0) as u32,
            provider_message_id: row.provider_message_id,
            error: row.error,
            will_retry: row.will_retry,
        }
    }
}

/// O5: each outbound message's delivery history (every attempt and provider status), oldest
/// first, in one query for all of `messages`.
pub async fn with_delivery_history(
    connection: &mut PgConnection,
    account_id: &str,
    mut messages: Vec<Message>,
) -> Result<Vec<Message>, ApiError> {
    let outbound_ids: Vec<Uuid> = messages
        .iter()
        .filter(|message| message.direction == "outbound")
        .filter_map(|message| Uuid::parse_str(&message.id).ok())
        .collect();
    if outbound_ids.is_empty() {
        return Ok(messages);
    }
    let steps: Vec<DeliveryStepRow> = sqlx::query_as(
        "SELECT message_id, state, at, attempt, provider_message_id, error, will_retry FROM message_delivery_steps \
         WHERE message_id = ANY($1) AND account_id = $2 ORDER BY message_id, at, attempt, step_key",
    )
    .bind(&outbound_ids)
    .bind(account_id)
    .fetch_all(connection)
    .await?;
    let mut by_message: HashMap<Uuid, Vec<DeliveryStep>> = HashMap::new();
    for step in steps {
        by_message.entry(step.message_id).or_default().push(step.into());
    }
    for message in &mut messages {
        if let Some(history) = Uuid::parse_str(&message.id).ok().and_then(|id| by_message.remove(&id)) {
            message.delivery_history = history;
        }
    }
    Ok(messages)
}

/// C7, defence in depth: the projector keeps hidden fields out of `content`, but should a form
/// field flagged hidden ever reach it, the inbox view still never shows it.
pub fn without_hidden_form_fields(mut content: serde_json::Value) -> serde_json::Value {
    if let Some(fields) = content.get_mut("form_fields").and_then(serde_json::Value::as_array_mut) {
        fields.retain(|field| !field.get("hidden").and_then(serde_json::Value::as_bool).unwrap_or(false));
    }
    content
}

/// Hidden form fields as stored (`[{"name": .., "value": ..}, ..]`), for the contact timeline.
pub fn hidden_fields_of(stored: &serde_json::Value) -> Vec<FormFieldValue> {
    stored
        .as_array()
        .into_iter()
        .flatten()
        .map(|field| FormFieldValue {
            name: field.get("name").and_then(serde_json::Value::as_str).unwrap_or_default().to_owned(),
            value: field.get("value").and_then(serde_json::Value::as_str).unwrap_or_default().to_owned(),
        })
        .collect()
}

#[derive(sqlx::FromRow)]
struct AssignmentRow {
    assignee_id: Option<String>,
    outcome: String,
    channel_id: String,
    rule_version: i64,
    strategy: String,
    eligible_agent_ids: Vec<String>,
    skipped: serde_json::Value,
    decided_at: DateTime<Utc>,
}

impl From<AssignmentRow> for Assignment {
    fn from(row: AssignmentRow) -> Self {
        let skipped = row
            .skipped
            .as_array()
            .into_iter()
            .flatten()
            .map(|skip| SkippedCandidate {
                agent_id: skip["agent_id"].as_str().unwrap_or_default().to_owned(),
                reason: skip["reason"].as_str().unwrap_or_default().to_owned(),
            })
            .collect();
        Assignment {
            assignee_id: row.assignee_id.unwrap_or_default(),
            outcome: row.outcome,
            channel_id: row.channel_id,
            rule_version: row.rule_version.max(0) as u64,
            strategy: row.strategy,
            eligible_agent_ids: row.eligible_agent_ids,
            skipped,
            decided_at: Some(timestamp(row.decided_at)),
        }
    }
}

fn status_from_name(name: &str) -> ConversationStatus {
    switchboard_proto::names::parse(name).unwrap_or(ConversationStatus::Unspecified)
}

/// Validated ListConversations parameters ("parse, don't validate").
#[derive(Debug, PartialEq)]
pub struct ListQuery {
    pub inbox_id_opt: Option<String>,
    pub channel_id_opt: Option<String>,
    pub contact_id_opt: Option<Uuid>,
    pub assignee_id_opt: Option<String>,
    pub unassigned_only: bool,
    pub status_opt: Option<&'static str>,
    pub updated_since_opt: Option<DateTime<Utc>>,
    pub by_updated: bool,
    pub page_size: u32,
    pub cursor_opt: Option<PageCursor>,
}

impl ListQuery {
    pub fn parse(request: &ListConversationsRequest) -> Result<Self, ApiError> {
        let mut violations = Violations::default();
        if request.unassigned_only && !request.assignee_id.is_empty() {
            violations.add("unassigned_only", "cannot be combined with assignee_id");
        }
        let status_opt = match ConversationStatus::try_from(request.status) {
            Ok(ConversationStatus::Unspecified) => None,
            Ok(status) => Some(switchboard_proto::names::name(status)),
            Err(_) => {
                violations.add("status", "unknown status value");
                None
            }
        };
        let by_updated = match ConversationOrder::try_from(request.order_by) {
            Ok(ConversationOrder::UpdatedAtDesc) => true,
            Ok(_) => false,
            Err(_) => {
                violations.add("order_by", "unknown order value");
                false
            }
        };
        let contact_id_opt = scope::optional_uuid("contact_id", &request.contact_id)
            .inspect_err(|_| violations.add("contact_id", "must be a UUID"))
            .ok()
            .flatten();
        let updated_since_opt = match &request.updated_since {
            Some(at) => scope::to_datetime(at).inspect_err(|problem| violations.add("updated_since", problem)).ok(),
            None => None,
        };
        let cursor_opt = if request.page_token.is_empty() {
            None
        } else {
            let decoded = PageCursor::decode(&request.page_token, if by_updated { 'u' } else { 's' });
            let cursor_opt = decoded.as_ref().ok().copied();
            violations.check(decoded.map(|_| ()));
            cursor_opt
        };
        violations.check(Position::parse_list("min_position", &request.min_position).map(|_| ()));
        violations.into_result()?;
        let non_empty = |value: &String| (!value.is_empty()).then(|| value.clone());
        Ok(ListQuery {
            inbox_id_opt: non_empty(&request.inbox_id),
            channel_id_opt: non_empty(&request.channel_id),
            contact_id_opt,
            assignee_id_opt: non_empty(&request.assignee_id),
            unassigned_only: request.unassigned_only,
            status_opt,
            updated_since_opt,
            by_updated,
            page_size: scope::page_size(request.page_size),
            cursor_opt,
        })
    }

    /// The SQL for this query: only the filters present, so each shape gets a plan that uses
    /// the matching index.
    fn build<'a>(&'a self, scope: &'a Scope) -> QueryBuilder<'a, Postgres> {
        let order_column = if self.by_updated { "updated_at" } else { "started_at" };
        let mut sql =
            QueryBuilder::new(format!("SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE account_id = "));
        sql.push_bind(scope.account_id());
        if let Some(inbox_ids) = scope.inbox_filter() {
            sql.push(" AND inbox_id = ANY(").push_bind(inbox_ids).push(")");
        }
        if let Some(inbox_id) = &self.inbox_id_opt {
            sql.push(" AND inbox_id = ").push_bind(inbox_id);
        }
        if let Some(channel_id) = &self.channel_id_opt {
            sql.push(" AND channel_id = ").push_bind(channel_id);
        }
        if let Some(contact_id) = self.contact_id_opt {
            sql.push(" AND contact_id = ").push_bind(contact_id);
        }
        if let Some(assignee_id) = &self.assignee_id_opt {
            sql.push(" AND assignee_id = ").push_bind(assignee_id);
        }
        if self.unassigned_only {
            sql.push(" AND assignee_id IS NULL");
        }
        if let Some(status) = self.status_opt {
            sql.push(" AND status = ").push_bind(status);
        }
        if let Some(since) = self.updated_since_opt {
            sql.push(" AND updated_at >= ").push_bind(since);
        }
        if let Some(cursor) = self.cursor_opt {
            sql.push(format!(" AND ({order_column}, conversation_id) < ("))
                .push_bind(cursor.instant())
                .push(", ")
                .push_bind(cursor.id)
                .push(")");
        }
        sql.push(format!(" ORDER BY {order_column} DESC, conversation_id DESC LIMIT "))
            .push_bind(i64::from(self.page_size) + 1);
        sql
    }
}

async fn conversations_by_id(
    connection: &mut PgConnection,
    account_id: &str,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, ConversationRow>, ApiError> {
    let rows: Vec<ConversationRow> = sqlx::query_as(&format!(
        "SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE conversation_id = ANY($1) AND account_id = $2"
    ))
    .bind(ids)
    .bind(account_id)
    .fetch_all(connection)
    .await?;
    Ok(rows.into_iter().map(|row| (row.conversation_id, row)).collect())
}

type ChangeStream = Pin<Box<dyn Stream<Item = Result<ConversationChange, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ConversationService for Conversations {
    #[tracing::instrument(skip_all, fields(inbox_id = %request.get_ref().inbox_id))]
    async fn list_conversations(
        &self,
        request: Request<ListConversationsRequest>,
    ) -> Result<Response<ListConversationsResponse>, Status> {
        let identity = Identity::of(&request)?;
        let query = ListQuery::parse(request.get_ref())?;
        reach_min_position(&self.read, &request, &request.get_ref().min_position).await?;
        let mut connection = self.read.connection().await?;
        if let Some(inbox_id) = &query.inbox_id_opt
            && !scope::may_read_inbox(&mut connection, &identity, inbox_id).await?
        {
            return Err(ApiError::not_found("inbox", inbox_id).into());
        }
        // With an inbox filter that passed the check, the scope need not list inboxes again.
        let scope = if query.inbox_id_opt.is_some() {
            Scope::WholeAccount { account_id: identity.account_id.clone() }
        } else {
            Scope::resolve(&mut connection, &identity).await?
        };
        let mut rows: Vec<ConversationRow> =
            query.build(&scope).build_query_as().fetch_all(&mut *connection).await.map_err(ApiError::from)?;
        let next_page_token = if rows.len() > query.page_size as usize {
            rows.truncate(query.page_size as usize);
            rows.last()
                .map(|last| {
                    let (order_tag, instant) =
                        if query.by_updated { ('u', last.updated_at) } else { ('s', last.started_at) };
                    PageCursor { order_tag, micros: instant.timestamp_micros(), id: last.conversation_id }.encode()
                })
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListConversationsResponse {
            conversations: rows.into_iter().map(Conversation::from).collect(),
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(conversation_id = %request.get_ref().conversation_id))]
    async fn get_conversation(
        &self,
        request: Request<GetConversationRequest>,
    ) -> Result<Response<GetConversationResponse>, Status> {
        let identity = Identity::of(&request)?;
        let conversation_id = scope::parse_uuid("conversation_id", &request.get_ref().conversation_id)?;
        reach_min_position(&self.read, &request, &request.get_ref().min_position).await?;
        let mut connection = self.read.connection().await?;
        // The conversation and its inbox's access list in one round trip. An inbox the read
        // models do not know (yet) counts as restricted to nobody: only admins read it (I3).
        #[derive(sqlx::FromRow)]
        struct Found {
            #[sqlx(flatten)]
            conversation: ConversationRow,
            #[sqlx(flatten)]
            inbox: crate::access::InboxAccess,
        }
        let columns =
            CONVERSATION_COLUMNS.split(", ").map(|column| format!("c.{column}")).collect::<Vec<_>>().join(", ");
        let found: Option<Found> = sqlx::query_as(&format!(
            "SELECT {columns}, c.account_id, \
                    COALESCE(i.access_mode, 'specific_users_and_teams') AS access_mode, \
                    COALESCE(i.access_user_ids, '{{}}') AS access_user_ids, \
                    COALESCE(i.access_team_ids, '{{}}') AS access_team_ids \
             FROM conversations c LEFT JOIN inboxes i ON i.inbox_id = c.inbox_id AND i.account_id = c.account_id \
             WHERE c.conversation_id = $1 AND c.account_id = $2"
        ))
        .bind(conversation_id)
        .bind(&identity.account_id)
        .fetch_optional(&mut *connection)
        .await
        .map_err(ApiError::from)?;
        let not_found = || ApiError::not_found("conversation", conversation_id.to_string());
        let Some(Found { conversation, inbox }) = found else {
            return Err(not_found().into());
        };
        if !crate::access::can_see(&identity, &inbox) {
            return Err(not_found().into());
        }
        let messages: Vec<MessageRow> = sqlx::query_as(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 ORDER BY sent_at, message_id"
        ))
        .bind(conversation_id)
        .fetch_all(&mut *connection)
        .await
        .map_err(ApiError::from)?;
        let assignments: Vec<AssignmentRow> = sqlx::query_as(
            "SELECT assignee_id, outcome, channel_id, rule_version, strategy, eligible_agent_ids, skipped, decided_at \
             FROM assignments WHERE conversation_id = $1 ORDER BY decided_at, event_id",
        )
        .bind(conversation_id)
        .fetch_all(&mut *connection)
        .await
        .map_err(ApiError::from)?;
        let messages = with_delivery_history(
            &mut connection,
            &identity.account_id,
            messages.into_iter().map(Message::from).collect(),
        )
        .await?;
        Ok(Response::new(GetConversationResponse {
            conversation: Some(conversation.into()),
            messages,
            assignments: assignments.into_iter().map(Assignment::from).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(message_id = %request.get_ref().message_id))]
    async fn get_message(&self, request: Request<GetMessageRequest>) -> Result<Response<Message>, Status> {
        let identity = Identity::of(&request)?;
        let message_id = scope::parse_uuid("message_id", &request.get_ref().message_id)?;
        reach_min_position(&self.read, &request, &request.get_ref().min_position).await?;
        let mut connection = self.read.connection().await?;
        let columns = MESSAGE_COLUMNS.split(", ").map(|column| format!("m.{column}")).collect::<Vec<_>>().join(", ");
        let found: Option<(String,)> = sqlx::query_as(
            "SELECT c.inbox_id FROM messages m JOIN conversations c USING (conversation_id) \
             WHERE m.message_id = $1 AND m.account_id = $2",
        )
        .bind(message_id)
        .bind(&identity.account_id)
        .fetch_optional(&mut *connection)
        .await
        .map_err(ApiError::from)?;
        let not_found = || ApiError::not_found("message", message_id.to_string());
        let Some((inbox_id,)) = found else {
            return Err(not_found().into());
        };
        if !scope::may_read_inbox(&mut connection, &identity, &inbox_id).await? {
            return Err(not_found().into());
        }
        let message: MessageRow = sqlx::query_as(&format!("SELECT {columns} FROM messages m WHERE m.message_id = $1"))
            .bind(message_id)
            .fetch_one(&mut *connection)
            .await
            .map_err(ApiError::from)?;
        let mut messages = with_delivery_history(&mut connection, &identity.account_id, vec![message.into()]).await?;
        Ok(Response::new(messages.remove(0)))
    }

    type WatchConversationsStream = ChangeStream;

    #[tracing::instrument(skip_all, fields(after_change_id = ?request.get_ref().after_change_id))]
    async fn watch_conversations(
        &self,
        request: Request<WatchConversationsRequest>,
    ) -> Result<Response<Self::WatchConversationsStream>, Status> {
        let identity = Identity::of(&request)?;
        let request = request.into_inner();
        let mut connection = self.read.connection().await?;
        for inbox_id in &request.inbox_ids {
            if !scope::may_read_inbox(&mut connection, &identity, inbox_id).await? {
                return Err(ApiError::not_found("inbox", inbox_id).into());
            }
        }
        let after_change_id = if let Some(after_change_id) = request.after_change_id {
            i64::try_from(after_change_id).map_err(|_| ApiError::invalid("after_change_id", "is too large"))?
        } else {
            sqlx::query_scalar::<_, Option<i64>>("SELECT max(change_id) FROM conversation_changes")
                .fetch_one(&mut *connection)
                .await
                .map_err(ApiError::from)?
                .unwrap_or(0)
        };
        let (sender, receiver) = mpsc::channel(256);
        let watcher = Watcher {
            read: self.read.clone(),
            identity,
            requested_inbox_ids: request.inbox_ids,
            last_change_id: after_change_id,
            schema: self.read.active_schema(),
        };
        tokio::spawn(watcher.run(sender));
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

/// How often a watcher re-queries without a notification (covers a lost LISTEN connection) and
/// re-resolves which inboxes the caller may see.
const WATCH_POLL: Duration = Duration::from_secs(1);
const WATCH_BATCH: i64 = 500;

struct Watcher {
    read: ReadModels,
    identity: Identity,
    requested_inbox_ids: Vec<String>,
    last_change_id: i64,
    schema: std::sync::Arc<str>,
}

#[derive(sqlx::FromRow)]
struct ChangeRow {
    change_id: i64,
    inbox_id: String,
    conversation_id: Uuid,
    kind: String,
    event_id: String,
    at: DateTime<Utc>,
}

impl Watcher {
    async fn run(mut self, sender: mpsc::Sender<Result<ConversationChange, Status>>) {
        let mut notifications = self.read.subscribe_changes();
        loop {
            if self.read.active_schema() != self.schema {
                // Change ids are per schema: after a switch (B4 replay) old tokens mean nothing.
                let _ = sender
                    .send(Err(Status::aborted(
                        "the read models were rebuilt (schema switch); re-read state and watch again",
                    )))
                    .await;
                return;
            }
            match self.deliver_new_changes(&sender).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(error) => {
                    let _ = sender.send(Err(error.into())).await;
                    return;
                }
            }
            if sender.is_closed() {
                return;
            }
            let wait_for_relevant_notification = async {
                loop {
                    match notifications.recv().await {
                        Ok(inbox_id) if inbox_id.is_empty() || self.interested_in(&inbox_id) => return,
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => return,
                        Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                    }
                }
            };
            tokio::select! {
                () = wait_for_relevant_notification => {}
                () = tokio::time::sleep(WATCH_POLL) => {}
                () = sender.closed() => return,
            }
        }
    }

    fn interested_in(&self, inbox_id: &str) -> bool {
        self.requested_inbox_ids.is_empty() || self.requested_inbox_ids.iter().any(|wanted| wanted == inbox_id)
    }

    /// Sends the changes after the last one delivered; true when a full batch was sent (more
    /// may be waiting).
    async fn deliver_new_changes(
        &mut self,
        sender: &mpsc::Sender<Result<ConversationChange, Status>>,
    ) -> Result<bool, ApiError> {
        let mut connection = self.read.connection().await?;
        // Re-resolved every round, so an access change takes effect on the open stream.
        let scope = Scope::resolve(&mut connection, &self.identity).await?;
        let mut sql = QueryBuilder::<Postgres>::new(
            "SELECT change_id, inbox_id, conversation_id, kind, event_id, at FROM conversation_changes WHERE change_id > ",
        );
        sql.push_bind(self.last_change_id).push(" AND account_id = ").push_bind(scope.account_id());
        if let Some(visible) = scope.inbox_filter() {
            sql.push(" AND inbox_id = ANY(").push_bind(visible).push(")");
        }
        if !self.requested_inbox_ids.is_empty() {
            sql.push(" AND inbox_id = ANY(").push_bind(&self.requested_inbox_ids).push(")");
        }
        sql.push(" ORDER BY change_id LIMIT ").push_bind(WATCH_BATCH);
        let changes: Vec<ChangeRow> = sql.build_query_as().fetch_all(&mut *connection).await?;
        if changes.is_empty() {
            return Ok(false);
        }
        let ids: Vec<Uuid> = changes.iter().map(|change| change.conversation_id).collect();
        let mut conversations = conversations_by_id(&mut connection, scope.account_id(), &ids).await?;
        let full_batch = changes.len() as i64 == WATCH_BATCH;
        for change in changes {
            let conversation = conversations.remove(&change.conversation_id).map(Conversation::from);
            let message = ConversationChange {
                change_id: change.change_id.max(0) as u64,
                inbox_id: change.inbox_id,
                conversation_id: change.conversation_id.to_string(),
                kind: change.kind,
                event_id: change.event_id,
                at: Some(timestamp(change.at)),
                conversation,
            };
            if sender.send(Ok(message)).await.is_err() {
                return Ok(false);
            }
            self.last_change_id = change.change_id;
        }
        Ok(full_batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(inbox_id: &str) -> ListConversationsRequest {
        ListConversationsRequest { inbox_id: inbox_id.into(), ..Default::default() }
    }

    fn fields_of(error: ApiError) -> Vec<String> {
        match error {
            ApiError::InvalidArgument(violations) => violations.into_iter().map(|violation| violation.field).collect(),
            other => panic!("expected invalid argument, got {other}"),
        }
    }

    #[test]
    fn c6_messenger_human_agents_may_answer_for_7_days_after_the_last_customer_message() {
        use chrono::TimeZone;
        let last_customer_message = Utc.with_ymd_and_hms(2026, 11, 2, 9, 30, 0).unwrap();
        let automated_until = last_customer_message + chrono::Duration::hours(24);
        assert_eq!(
            human_agent_reply_window_ends_at("facebook_messenger", Some(automated_until)),
            Some(last_customer_message + chrono::Duration::days(7))
        );
        assert_eq!(human_agent_reply_window_ends_at("whatsapp", Some(automated_until)), None, "24 h only (C8)");
        assert_eq!(human_agent_reply_window_ends_at("chat", None), None);
    }

    #[test]
    fn list_queries_are_validated_field_by_field_and_page_size_is_capped() {
        let bad = ListConversationsRequest {
            assignee_id: "ana".into(),
            unassigned_only: true,
            status: 42,
            contact_id: "x".into(),
            page_token: "garbage".into(),
            min_position: "nope".into(),
            ..request("support")
        };
        assert_eq!(
            fields_of(ListQuery::parse(&bad).unwrap_err()),
            ["unassigned_only", "status", "contact_id", "page_token", "min_position"]
        );
        assert_eq!(ListQuery::parse(&request("support")).unwrap().page_size, scope::DEFAULT_PAGE_SIZE);
        let huge = ListConversationsRequest { page_size: 100_000, ..request("support") };
        assert_eq!(ListQuery::parse(&huge).unwrap().page_size, scope::MAX_PAGE_SIZE);
        assert_eq!(ListQuery::parse(&request("")).unwrap().inbox_id_opt, None, "inbox is optional");
    }

    #[test]
    fn c7_hidden_form_fields_never_reach_the_inbox_view() {
        let content = serde_json::json!({"form_fields": [
            {"name": "email", "value": "a@b.c", "hidden": false},
            {"name": "utm_source", "value": "ads", "hidden": true},
        ]});
        let shown = without_hidden_form_fields(content);
        assert_eq!(shown["form_fields"].as_array().unwrap().len(), 1);
        assert_eq!(shown["form_fields"][0]["name"], "email");
        let hidden = hidden_fields_of(&serde_json::json!([{"name": "utm_source", "value": "ads"}]));
        assert_eq!(hidden, [FormFieldValue { name: "utm_source".into(), value: "ads".into() }]);
    }
}
