//! The one mapping from API failures to gRPC status codes (as the gRPC status-code guide defines
//! them). Internal details are logged, never sent to clients.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// `google.rpc.ErrorInfo.domain` of Switchboard's errors.
pub const ERROR_DOMAIN: &str = "switchboard";

/// One problem with one request field, reported as a `google.rpc.BadRequest` field violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request itself is wrong, whatever the system's state (INVALID_ARGUMENT with
    /// `google.rpc.BadRequest` details naming each field).
    #[error("invalid request: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    #[error("{what} `{id}` not found")]
    NotFound { what: &'static str, id: String },
    #[error("{what} `{id}` already exists")]
    AlreadyExists { what: &'static str, id: String },
    /// A provider identity another channel holds (M2): ALREADY_EXISTS, naming the identity
    /// and never the channel or account holding it.
    #[error("{0}")]
    IdentityTaken(String),
    /// No or unusable credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// Authenticated, but not allowed to do this (I2-I4, roles).
    #[error("{0}")]
    PermissionDenied(String),
    /// The system is not in a state where the command makes sense (e.g. closed conversation).
    #[error("{0}")]
    FailedPrecondition(String),
    /// FAILED_PRECONDITION with the fact that refused the command, for clients to act on: a
    /// `google.rpc.PreconditionFailure` violation (type = `reason`, `subject`, `description`)
    /// and a `google.rpc.ErrorInfo` (`reason`, domain `switchboard`, `metadata`), e.g. a closed
    /// reply window with its end (C6, C8).
    #[error("{description}")]
    Precondition { reason: &'static str, subject: String, description: String, metadata: Vec<(String, String)> },
    /// A concurrent request with the same request id is in flight; retry later.
    #[error("{0}")]
    Aborted(String),
    /// The caller's deadline passed before the read models reached `min_position` (B6).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A dependency (database, Kafka) is unavailable, or the read models lag too far; retry.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Database(#[from] sqlx::Error),
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|violation| format!("`{}` {}", violation.field, violation.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ApiError {
    /// A single invalid field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        ApiError::InvalidArgument(vec![FieldViolation { field: field.into(), description: description.into() }])
    }

    pub fn not_found(what: &'static str, id: impl Into<String>) -> Self {
        ApiError::NotFound { what, id: id.into() }
    }

    pub fn denied(reason: impl Into<String>) -> Self {
        ApiError::PermissionDenied(reason.into())
    }

    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::NotFound { .. } => Code::NotFound,
            ApiError::AlreadyExists { .. } | ApiError::IdentityTaken(_) => Code::AlreadyExists,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::FailedPrecondition(_) | ApiError::Precondition { .. } => Code::FailedPrecondition,
            ApiError::Aborted(_) => Code::Aborted,
            ApiError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Database(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed) => {
                Code::Unavailable
            }
            ApiError::Database(_) | ApiError::Internal(_) => Code::Internal,
        }
    }
}

/// How a broken config rule is answered: a taken identity is ALREADY_EXISTS, an address that
/// may not be used is a bad field, and a seat that rules still need is FAILED_PRECONDITION.
impl From<crate::config_rules::Breach> for ApiError {
    fn from(breach: crate::config_rules::Breach) -> Self {
        use crate::config_rules::Breach;
        let description = breach.describe();
        match breach {
            Breach::IdentityTaken(_) | Breach::FallbackFromNameTaken(_) => ApiError::IdentityTaken(description),
            Breach::TeamAddressIsAgentAddress(_) => ApiError::invalid("settings.email.team_address", description),
            Breach::AgentAddressIsTeamAddress(_) => ApiError::invalid("email", description),
            Breach::UnpaidAgentsInRule { .. } => ApiError::invalid("user_ids", description),
            Breach::SeatNeededByRules { .. } => ApiError::FailedPrecondition(description),
        }
    }
}

/// Accumulates field violations so a request gets every problem reported at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation { field: field.into(), description: description.into() });
    }

    /// Records the violation of a field check, if any.
    pub fn check(&mut self, result: Result<(), ApiError>) {
        if let Err(ApiError::InvalidArgument(violations)) = result {
            self.0.extend(violations);
        }
    }

    pub fn into_result(self) -> Result<(), ApiError> {
        if self.0.is_empty() { Ok(()) } else { Err(ApiError::InvalidArgument(self.0)) }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        let code = error.code();
        match &error {
            ApiError::InvalidArgument(violations) => {
                let details = ErrorDetails::with_bad_request(
                    violations
                        .iter()
                        .map(|violation| {
                            tonic_types::FieldViolation::new(violation.field.clone(), violation.description.clone())
                        })
                        .collect::<Vec<_>>(),
                );
                Status::with_error_details(code, error.to_string(), details)
            }
            ApiError::Precondition { reason, subject, description, metadata } => {
                let mut details = ErrorDetails::new();
                details.add_precondition_failure_violation(*reason, subject.clone(), description.clone());
                details.set_error_info(
                    *reason,
                    ERROR_DOMAIN,
                    metadata.iter().cloned().collect::<std::collections::HashMap<_, _>>(),
                );
                Status::with_error_details(code, error.to_string(), details)
            }
            ApiError::Database(cause) => {
                tracing::error!(error = %cause, "database error while serving request");
                if code == Code::Unavailable {
                    Status::new(code, "read models unavailable; retry")
                } else {
                    Status::new(code, "internal error")
                }
            }
            ApiError::Internal(cause) => {
                tracing::error!(error = format!("{cause:#}"), "internal error while serving request");
                Status::new(code, "internal error")
            }
            _ => Status::new(code, error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_arguments_carry_bad_request_details_per_field() {
        let mut violations = Violations::default();
        violations.add("inbox_id", "is required");
        violations.add("name", "must not be empty");
        let status = Status::from(violations.into_result().unwrap_err());
        assert_eq!(status.code(), Code::InvalidArgument);
        let bad_request = status.get_details_bad_request().expect("BadRequest details");
        let fields: Vec<&str> = bad_request.field_violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["inbox_id", "name"]);
    }

    #[test]
    fn preconditions_carry_the_refusing_fact() {
        let status = Status::from(ApiError::Precondition {
            reason: "REPLY_WINDOW_CLOSED",
            subject: "conversation/c-1".into(),
            description: "the window ended".into(),
            metadata: vec![("window_ends_at".into(), "2026-01-01T00:00:00Z".into())],
        });
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.message(), "the window ended");
        let failure = status.get_details_precondition_failure().expect("PreconditionFailure details");
        assert_eq!(failure.violations[0].r#type, "REPLY_WINDOW_CLOSED");
        assert_eq!(failure.violations[0].subject, "conversation/c-1");
        let info = status.get_details_error_info().expect("ErrorInfo details");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(info.metadata["window_ends_at"], "2026-01-01T00:00:00Z");
    }

    #[test]
    fn internal_errors_never_leak_their_text() {
        let status = Status::from(ApiError::Internal(anyhow::anyhow!("password=hunter2 at db01")));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
        let status = Status::from(ApiError::Database(sqlx::Error::Protocol("secret detail".into())));
        assert_eq!(status.message(), "internal error");
        let status = Status::from(ApiError::Database(sqlx::Error::PoolTimedOut));
        assert_eq!(status.code(), Code::Unavailable);
    }
}
