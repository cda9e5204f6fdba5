//! The one mapping from API failures to gRPC status codes. Internal details are logged, never
//! sent to clients.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid `{field}`: {problem}")]
    InvalidArgument { field: &'static str, problem: String },
    #[error("{what} `{id}` not found")]
    NotFound { what: &'static str, id: String },
    #[error("internal error")]
    Internal(#[from] sqlx::Error),
}

impl ApiError {
    pub fn invalid(field: &'static str, problem: impl Into<String>) -> Self {
        ApiError::InvalidArgument { field, problem: problem.into() }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        match &error {
            ApiError::InvalidArgument { .. } => Status::new(Code::InvalidArgument, error.to_string()),
            ApiError::NotFound { .. } => Status::new(Code::NotFound, error.to_string()),
            ApiError::Internal(cause) => {
                tracing::error!(error = %cause, "database error while serving request");
                match cause {
                    sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) => {
                        Status::new(Code::Unavailable, "read models unavailable; retry")
                    }
                    _ => Status::new(Code::Internal, "internal error"),
                }
            }
        }
    }
}
