//! Every way a request can fail, and the one mapping from those failures to HTTP answers
//! (the SMTP listener maps the same enum to reply codes in `smtp.rs`).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("no channel with id `{channel_id}`")]
    UnknownChannel { channel_id: String },
    /// Several channels claim the address (only possible for config written before M2 was
    /// enforced); an operator must rename all but one.
    #[error(
        "channel address `{channel_id}` is claimed by more than one channel; it cannot be used until only one has it"
    )]
    AmbiguousChannel { channel_id: String },
    #[error("channel `{channel_id}` is a {actual} channel, not a {expected} channel")]
    WrongChannelType { channel_id: String, expected: &'static str, actual: String },
    /// The provider addressed something (team address, page id, phone-number id) that no
    /// configured channel owns.
    #[error("no {channel_type} channel for {what} `{value}`")]
    NoChannelFor { channel_type: &'static str, what: &'static str, value: String },
    #[error("invalid field `{field}`: {problem}")]
    InvalidField { field: &'static str, problem: String },
    #[error("malformed request body: {0}")]
    MalformedBody(String),
    #[error("unsupported content type `{0}`")]
    UnsupportedMediaType(String),
    #[error("request body larger than the {limit_bytes}-byte limit")]
    BodyTooLarge { limit_bytes: usize },
    /// No or unreadable signature header: the caller did not authenticate at all.
    #[error("missing or malformed signature: {0}")]
    SignatureMissing(String),
    /// A well-formed signature that does not match: the caller is not who it claims to be.
    #[error("signature does not match the request body")]
    SignatureMismatch,
    #[error("request timestamp is outside the {window_seconds}-second replay window")]
    OutsideReplayWindow { window_seconds: i64 },
    /// The secrets file has no key for the channel, so nothing it receives can be verified.
    #[error("channel `{channel_id}` has no {secret} in the secrets file")]
    SecretNotConfigured { channel_id: String, secret: &'static str },
    #[error("webhook verification failed: {0}")]
    VerificationFailed(String),
    #[error("the event log is unavailable; retry later")]
    LogUnavailable(#[source] anyhow::Error),
    /// Ingest runs without `DATABASE_URL`, so it cannot read the chat replies it would stream.
    #[error("the chat reply stream is not available: this ingest runs without DATABASE_URL (delivery.chat_messages)")]
    ChatStreamNotConfigured,
}

impl IngestError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            IngestError::UnknownChannel { .. } => (StatusCode::NOT_FOUND, "unknown_channel"),
            IngestError::WrongChannelType { .. } => (StatusCode::NOT_FOUND, "wrong_channel_type"),
            IngestError::AmbiguousChannel { .. } => (StatusCode::CONFLICT, "ambiguous_channel"),
            IngestError::NoChannelFor { .. } => (StatusCode::NOT_FOUND, "unknown_channel"),
            IngestError::InvalidField { .. } => (StatusCode::BAD_REQUEST, "invalid_field"),
            IngestError::MalformedBody(_) => (StatusCode::BAD_REQUEST, "malformed_body"),
            IngestError::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            IngestError::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            IngestError::SignatureMissing(_) => (StatusCode::UNAUTHORIZED, "signature_missing"),
            IngestError::SignatureMismatch => (StatusCode::FORBIDDEN, "signature_mismatch"),
            IngestError::OutsideReplayWindow { .. } => (StatusCode::UNAUTHORIZED, "outside_replay_window"),
            IngestError::SecretNotConfigured { .. } => (StatusCode::UNAUTHORIZED, "secret_not_configured"),
            IngestError::VerificationFailed(_) => (StatusCode::FORBIDDEN, "verification_failed"),
            IngestError::LogUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "log_unavailable"),
            IngestError::ChatStreamNotConfigured => (StatusCode::SERVICE_UNAVAILABLE, "chat_stream_not_configured"),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status_and_code().0
    }

    /// Reason label for the rejected-requests counter.
    pub fn code(&self) -> &'static str {
        self.status_and_code().1
    }
}

/// How long a provider should wait before retrying when the log is unavailable.
pub const RETRY_AFTER_SECONDS: &str = "5";

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
        if let IngestError::SecretNotConfigured { channel_id, .. } = &self {
            tracing::warn!(%channel_id, "signed request for a channel without a secret: check INGEST_SECRETS_FILE");
        }
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
        }
        response
    }
}
