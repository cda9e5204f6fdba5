//! `switchboard.api.v1.ConversationService` over the PostgreSQL read models.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;
use sqlx::PgPool;
use switchboard_proto::api::v1::conversation_service_server::ConversationService;
use switchboard_proto::api::v1::{
    Assignment, Conversation, ConversationStatus, GetConversationRequest, GetConversationResponse, GetMessageRequest,
    ListConversationsRequest, ListConversationsResponse, Message, SkippedCandidate,
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::error::ApiError;

pub const DEFAULT_PAGE_SIZE: u32 = 50;
pub const MAX_PAGE_SIZE: u32 = 500;

pub struct Conversations {
    pool: PgPool,
}

impl Conversations {
    pub fn new(pool: PgPool) -> Self {
        Conversations { pool }
    }
}

#[derive(sqlx::FromRow)]
struct ConversationRow {
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
}

const CONVERSATION_COLUMNS: &str = "conversation_id, inbox_id, channel_id, channel_type, status, assignee_id, \
    contact_external_id, contact_name, message_count, started_at, last_message_at";

impl From<ConversationRow> for Conversation {
    fn from(row: ConversationRow) -> Self {
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
        }
    }
}

#[derive(sqlx::FromRow)]
struct MessageRow {
    message_id: Uuid,
    conversation_id: Uuid,
    provider_message_id: String,
    sender_external_id: String,
    sender_name: String,
    body: String,
    sent_at: DateTime<Utc>,
    recorded_at: DateTime<Utc>,
    trace_id: String,
}

const MESSAGE_COLUMNS: &str = "message_id, conversation_id, provider_message_id, sender_external_id, sender_name, body, sent_at, recorded_at, trace_id";

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
        }
    }
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

fn timestamp(at: DateTime<Utc>) -> Timestamp {
    switchboard_runtime::envelope::timestamp(at)
}

fn status_from_name(name: &str) -> ConversationStatus {
    match name {
        "open" => ConversationStatus::Open,
        "closed" => ConversationStatus::Closed,
        _ => ConversationStatus::Unspecified,
    }
}

fn parse_id(field: &'static str, value: &str) -> Result<Uuid, ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "is required"));
    }
    Uuid::parse_str(value).map_err(|_| ApiError::invalid(field, "must be a UUID"))
}

/// Keyset cursor: the (started_at, id) of the last row of the previous page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageCursor {
    pub started_at_micros: i64,
    pub conversation_id: Uuid,
}

impl PageCursor {
    pub fn encode(&self) -> String {
        format!("v1.{}.{}", self.started_at_micros, self.conversation_id.simple())
    }

    pub fn decode(token: &str) -> Result<Self, ApiError> {
        let invalid = || ApiError::invalid("page_token", "is not a token returned by this API");
        let mut parts = token.split('.');
        let (Some("v1"), Some(micros), Some(id), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        Ok(PageCursor {
            started_at_micros: micros.parse().map_err(|_| invalid())?,
            conversation_id: Uuid::parse_str(id).map_err(|_| invalid())?,
        })
    }
}

/// Validated ListConversations parameters.
#[derive(Debug, PartialEq)]
pub struct ListQuery {
    pub inbox_id: String,
    pub assignee_id_opt: Option<String>,
    pub unassigned_only: bool,
    pub status_opt: Option<&'static str>,
    pub page_size: u32,
    pub cursor_opt: Option<PageCursor>,
}

impl ListQuery {
    pub fn parse(request: &ListConversationsRequest) -> Result<Self, ApiError> {
        if request.inbox_id.is_empty() {
            return Err(ApiError::invalid("inbox_id", "is required"));
        }
        if request.unassigned_only && !request.assignee_id.is_empty() {
            return Err(ApiError::invalid("unassigned_only", "cannot be combined with assignee_id"));
        }
        let status_opt = match ConversationStatus::try_from(request.status) {
            Ok(ConversationStatus::Unspecified) => None,
            Ok(ConversationStatus::Open) => Some("open"),
            Ok(ConversationStatus::Closed) => Some("closed"),
            Err(_) => return Err(ApiError::invalid("status", "unknown status value")),
        };
        // Page sizes above the cap are coerced down rather than refused (AIP-158).
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            size => size.min(MAX_PAGE_SIZE),
        };
        let cursor_opt =
            (!request.page_token.is_empty()).then(|| PageCursor::decode(&request.page_token)).transpose()?;
        Ok(ListQuery {
            inbox_id: request.inbox_id.clone(),
            assignee_id_opt: (!request.assignee_id.is_empty()).then(|| request.assignee_id.clone()),
            unassigned_only: request.unassigned_only,
            status_opt,
            page_size,
            cursor_opt,
        })
    }
}

#[tonic::async_trait]
impl ConversationService for Conversations {
    async fn list_conversations(
        &self,
        request: Request<ListConversationsRequest>,
    ) -> Result<Response<ListConversationsResponse>, Status> {
        let query = ListQuery::parse(request.get_ref())?;
        let cursor_started_at_opt = query.cursor_opt.map(|cursor| {
            DateTime::<Utc>::from_timestamp_micros(cursor.started_at_micros).unwrap_or(DateTime::UNIX_EPOCH)
        });
        let sql = format!(
            "SELECT {CONVERSATION_COLUMNS} FROM conversations \
             WHERE inbox_id = $1 \
               AND ($2::text IS NULL OR assignee_id = $2) \
               AND (NOT $3 OR assignee_id IS NULL) \
               AND ($4::text IS NULL OR status = $4) \
               AND ($5::timestamptz IS NULL OR (started_at, conversation_id) < ($5, $6)) \
             ORDER BY started_at DESC, conversation_id DESC LIMIT $7"
        );
        let mut rows: Vec<ConversationRow> = sqlx::query_as(&sql)
            .bind(&query.inbox_id)
            .bind(&query.assignee_id_opt)
            .bind(query.unassigned_only)
            .bind(query.status_opt)
            .bind(cursor_started_at_opt)
            .bind(query.cursor_opt.map(|cursor| cursor.conversation_id))
            .bind(i64::from(query.page_size) + 1)
            .fetch_all(&self.pool)
            .await
            .map_err(ApiError::from)?;
        let next_page_token = if rows.len() > query.page_size as usize {
            rows.truncate(query.page_size as usize);
            rows.last()
                .map(|last| {
                    PageCursor {
                        started_at_micros: last.started_at.timestamp_micros(),
                        conversation_id: last.conversation_id,
                    }
                    .encode()
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

    async fn get_conversation(
        &self,
        request: Request<GetConversationRequest>,
    ) -> Result<Response<GetConversationResponse>, Status> {
        let conversation_id = parse_id("conversation_id", &request.get_ref().conversation_id)?;
        let conversation: Option<ConversationRow> =
            sqlx::query_as(&format!("SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE conversation_id = $1"))
                .bind(conversation_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(ApiError::from)?;
        let Some(conversation) = conversation else {
            return Err(ApiError::NotFound { what: "conversation", id: conversation_id.to_string() }.into());
        };
        let messages: Vec<MessageRow> = sqlx::query_as(&format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 ORDER BY sent_at, message_id"
        ))
        .bind(conversation_id)
        .fetch_all(&self.pool)
        .await
        .map_err(ApiError::from)?;
        let assignments: Vec<AssignmentRow> = sqlx::query_as(
            "SELECT assignee_id, outcome, channel_id, rule_version, strategy, eligible_agent_ids, skipped, decided_at \
             FROM assignments WHERE conversation_id = $1 ORDER BY decided_at, event_id",
        )
        .bind(conversation_id)
        .fetch_all(&self.pool)
        .await
        .map_err(ApiError::from)?;
        Ok(Response::new(GetConversationResponse {
            conversation: Some(conversation.into()),
            messages: messages.into_iter().map(Message::from).collect(),
            assignments: assignments.into_iter().map(Assignment::from).collect(),
        }))
    }

    async fn get_message(&self, request: Request<GetMessageRequest>) -> Result<Response<Message>, Status> {
        let message_id = parse_id("message_id", &request.get_ref().message_id)?;
        let message: Option<MessageRow> =
            sqlx::query_as(&format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE message_id = $1"))
                .bind(message_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(ApiError::from)?;
        match message {
            Some(message) => Ok(Response::new(message.into())),
            None => Err(ApiError::NotFound { what: "message", id: message_id.to_string() }.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(inbox_id: &str) -> ListConversationsRequest {
        ListConversationsRequest { inbox_id: inbox_id.into(), ..Default::default() }
    }

    #[test]
    fn page_tokens_round_trip_and_foreign_tokens_are_invalid_arguments() {
        let cursor = PageCursor { started_at_micros: 1_700_000_000_123_456, conversation_id: Uuid::now_v7() };
        assert_eq!(PageCursor::decode(&cursor.encode()).unwrap(), cursor);
        for bad in ["", "v1", "v2.1.00000000000000000000000000000000", "v1.x.abc", "v1.1.abc.extra"] {
            assert!(
                matches!(PageCursor::decode(bad), Err(ApiError::InvalidArgument { field: "page_token", .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn list_queries_are_validated_and_page_size_is_capped() {
        assert!(matches!(ListQuery::parse(&request("")), Err(ApiError::InvalidArgument { field: "inbox_id", .. })));
        let both = ListConversationsRequest { assignee_id: "ana".into(), unassigned_only: true, ..request("support") };
        assert!(matches!(ListQuery::parse(&both), Err(ApiError::InvalidArgument { field: "unassigned_only", .. })));
        let bad_status = ListConversationsRequest { status: 42, ..request("support") };
        assert!(matches!(ListQuery::parse(&bad_status), Err(ApiError::InvalidArgument { field: "status", .. })));
        assert_eq!(ListQuery::parse(&request("support")).unwrap().page_size, DEFAULT_PAGE_SIZE);
        let huge = ListConversationsRequest { page_size: 100_000, ..request("support") };
        assert_eq!(ListQuery::parse(&huge).unwrap().page_size, MAX_PAGE_SIZE);
    }

    #[test]
    fn ids_must_be_uuids() {
        assert!(matches!(parse_id("message_id", ""), Err(ApiError::InvalidArgument { .. })));
        assert!(matches!(parse_id("message_id", "42"), Err(ApiError::InvalidArgument { .. })));
        assert!(parse_id("message_id", &Uuid::now_v7().to_string()).is_ok());
    }
}
