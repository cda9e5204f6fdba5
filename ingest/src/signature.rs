//! Request signatures as ingest checks them. The schemes live in
//! [`switchboard_runtime::signature`] (the delivery service signs custom-channel requests with the
//! same code); this module maps their refusals to ingest's HTTP errors.

use switchboard_runtime::secrets::Secret;
use switchboard_runtime::signature::{self as scheme, SignatureError};
pub use switchboard_runtime::signature::{REPLAY_WINDOW_SECONDS, sign_hex};

use crate::error::IngestError;

fn ingest_error(error: SignatureError) -> IngestError {
    match error {
        SignatureError::Missing(reason) => IngestError::SignatureMissing(reason),
        SignatureError::Mismatch => IngestError::SignatureMismatch,
        SignatureError::OutsideReplayWindow { window_seconds } => IngestError::OutsideReplayWindow { window_seconds },
    }
}

/// Meta webhooks: see [`scheme::verify_meta`].
pub fn verify_meta(app_secret: &Secret, header_opt: Option<&str>, body: &[u8]) -> Result<(), IngestError> {
    scheme::verify_meta(app_secret, header_opt, body).map_err(ingest_error)
}

/// Custom channels: see [`scheme::verify_custom`].
pub fn verify_custom(
    signing_key: &Secret,
    timestamp_header_opt: Option<&str>,
    signature_header_opt: Option<&str>,
    body: &[u8],
    now_unix_seconds: i64,
) -> Result<(), IngestError> {
    scheme::verify_custom(signing_key, timestamp_header_opt, signature_header_opt, body, now_unix_seconds)
        .map_err(ingest_error)
}
