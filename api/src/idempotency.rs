//! Idempotent commands (B6): one row per (account, client request id) in
//! `api.command_requests`. A command first tries to claim its request id; a retry of a command
//! that was published gets the original position back instead of running again.
//!
//! Contract of a claim: the row's `position` is set once the command's records are published
//! ([`record_position`]); a command that fails before publishing anything frees the id
//! ([`release`]) so the client may retry a corrected request with it. A claim whose command
//! crashed is taken over after [`CLAIM_TIMEOUT_SECONDS`].

use sha2::{Digest, Sha256};
use sqlx::PgPool;

use crate::error::ApiError;

/// A command whose first attempt is still running (or crashed) holds its request id this long
/// before a retry may take it over.
const CLAIM_TIMEOUT_SECONDS: i32 = 30;

/// What a command does after trying to claim its request id.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The id is this call's: run the command, then record its position or release the id.
    Run,
    /// The same request was already published: answer with its position, run nothing.
    Replay(String),
}

pub fn validate_request_id(request_id: &str) -> Result<(), ApiError> {
    if request_id.is_empty() {
        return Err(ApiError::invalid("request_id", "is required (any unique string per command, e.g. a UUID)"));
    }
    if request_id.len() > 128 || request_id.chars().any(char::is_control) {
        return Err(ApiError::invalid("request_id", "must be 1..128 printable characters"));
    }
    Ok(())
}

/// SHA-256 of the command's name and encoded request, in hex: the same id with a different
/// request is refused.
pub fn request_digest(command: &str, request_bytes: &[u8]) -> String {
    hex::encode(Sha256::new().chain_update(command).chain_update(request_bytes).finalize())
}

/// Claims `request_id` for `command`, or finds the position of its earlier run.
pub async fn try_claim(
    pool: &PgPool,
    account_id: &str,
    request_id: &str,
    command: &str,
    digest: &str,
) -> Result<Claim, ApiError> {
    if let Some(position) = stored_position(pool, account_id, request_id, digest).await? {
        return Ok(Claim::Replay(position));
    }
    let claimed = sqlx::query(
        "INSERT INTO api.command_requests (account_id, request_id, command, request_digest) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (account_id, request_id) DO UPDATE SET claimed_at = now() \
         WHERE api.command_requests.position IS NULL \
           AND api.command_requests.request_digest = EXCLUDED.request_digest \
           AND api.command_requests.claimed_at <= now() - make_interval(secs => $5)",
    )
    .bind(account_id)
    .bind(request_id)
    .bind(command)
    .bind(digest)
    .bind(f64::from(CLAIM_TIMEOUT_SECONDS))
    .execute(pool)
    .await?
    .rows_affected();
    if claimed == 1 {
        Ok(Claim::Run)
    } else {
        Err(ApiError::Aborted("a request with this request_id is being processed concurrently; retry shortly".into()))
    }
}

/// The position of an earlier run of the same request, if it was published.
async fn stored_position(
    pool: &PgPool,
    account_id: &str,
    request_id: &str,
    digest: &str,
) -> Result<Option<String>, ApiError> {
    let row: Option<(String, Option<String>, bool)> = sqlx::query_as(
        "SELECT request_digest, position, claimed_at > now() - make_interval(secs => $3) \
         FROM api.command_requests WHERE account_id = $1 AND request_id = $2",
    )
    .bind(account_id)
    .bind(request_id)
    .bind(f64::from(CLAIM_TIMEOUT_SECONDS))
    .fetch_optional(pool)
    .await?;
    match row {
        None => Ok(None),
        Some((stored_digest, _, _)) if stored_digest != digest => {
            Err(ApiError::invalid("request_id", "was already used for a different request"))
        }
        Some((_, Some(position), _)) => Ok(Some(position)),
        Some((_, None, true)) => {
            Err(ApiError::Aborted("a request with this request_id is still being processed; retry shortly".into()))
        }
        Some((_, None, false)) => Ok(None),
    }
}

/// Records where the claimed command's records landed; retries now replay it.
pub async fn record_position(
    pool: &PgPool,
    account_id: &str,
    request_id: &str,
    position: &str,
) -> Result<(), ApiError> {
    sqlx::query(
        "UPDATE api.command_requests SET position = $3, completed_at = now() \
         WHERE account_id = $1 AND request_id = $2",
    )
    .bind(account_id)
    .bind(request_id)
    .bind(position)
    .execute(pool)
    .await?;
    Ok(())
}

/// Frees a claimed id whose command published nothing.
pub async fn release(pool: &PgPool, account_id: &str, request_id: &str) -> Result<(), ApiError> {
    sqlx::query("DELETE FROM api.command_requests WHERE account_id = $1 AND request_id = $2 AND position IS NULL")
        .bind(account_id)
        .bind(request_id)
        .execute(pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b6_request_digests_tell_commands_and_requests_apart() {
        let digest = request_digest("CreateInbox", b"request");
        assert_eq!(digest.len(), 64);
        assert!(digest.bytes().all(|byte| byte.is_ascii_hexdigit() && !byte.is_ascii_uppercase()));
        assert_eq!(digest, request_digest("CreateInbox", b"request"));
        assert_ne!(digest, request_digest("RenameInbox", b"request"));
        assert_ne!(digest, request_digest("CreateInbox", b"other request"));
    }
}
