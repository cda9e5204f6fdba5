//! Every way a request can fail, and the one mapping from those failures to HTTP answers.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("no channel with id `{channel_id}`")]
    UnknownChannel { channel_id: String },
    #[error("channel `{channel_id}` is a {actual} channel, not a {expected} channel")]
    WrongChannelType { channel_id: String, expected: &'static str, actual: String },
    #[error("invalid field `{field}`: {problem}")]
    InvalidField { field: &'static str, problem: String },
    #[error("malformed request body: {0}")]
    MalformedBody(String),
    #[error("request body larger than the {limit_bytes}-byte limit")]
    BodyTooLarge { limit_bytes: usize },
    #[error("the event log is unavailable; retry later")]
    LogUnavailable(#[source] anyhow::Error),
}

impl IngestError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            IngestError::UnknownChannel { .. } => (StatusCode::NOT_FOUND, "unknown_channel"),
            IngestError::WrongChannelType { .. } => (StatusCode::NOT_FOUND, "wrong_channel_type"),
            IngestError::InvalidField { .. } => (StatusCode::BAD_REQUEST, "invalid_field"),
            IngestError::MalformedBody(_) => (StatusCode::BAD_REQUEST, "malformed_body"),
            IngestError::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            IngestError::LogUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "log_unavailable"),
        }
    }

    /// Reason label for the rejected-requests counter.
    pub fn code(&self) -> &'static str {
        self.status_and_code().1
    }
}

/// How long a provider should wait before retrying when the log is unavailable.
const RETRY_AFTER_SECONDS: &str = "5";

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let mut body = json!({ "error": { "code": code, "message": self.to_string() } });
        if let IngestError::InvalidField { field, .. } = &self {
            body["error"]["field"] = json!(field);
        }
        if let IngestError::LogUnavailable(cause) = &self {
            // The cause is for operators, not for clients.
            tracing::error!(error = format!("{cause:#}"), "publishing to kafka failed");
        }
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
        }
        response
    }
}
