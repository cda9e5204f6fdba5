//! Request signatures: Meta's `X-Hub-Signature-256` and the custom-channel scheme. Both are
//! HMAC-SHA256 checked with `Mac::verify_slice`, which compares in constant time. The custom
//! scheme has one implementation for both directions: ingest verifies what apps send
//! ([`verify_custom`]), the delivery service signs what it posts to them ([`sign_custom`]).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::secrets::Secret;

/// Why a signed request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing or malformed signature: {0}")]
    Missing(String),
    #[error("signature does not match")]
    Mismatch,
    #[error("timestamp outside the replay window of {window_seconds} s")]
    OutsideReplayWindow { window_seconds: i64 },
}

/// Header of the custom scheme: unix seconds of the signature.
pub const CUSTOM_TIMESTAMP_HEADER: &str = "X-Switchboard-Timestamp";
/// Header of the custom scheme: `v1=<hex HMAC-SHA256 of "<timestamp>.<body>">`.
pub const CUSTOM_SIGNATURE_HEADER: &str = "X-Switchboard-Signature";

type HmacSha256 = Hmac<Sha256>;

/// Hex HMAC-SHA256 of `message` under `key` (for clients and tests that sign requests).
pub fn sign_hex(key: &[u8], message: &[&[u8]]) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in message {
        mac.update(part);
    }
    hex::encode(mac.finalize().into_bytes())
}

fn verify_hex(key: &Secret, message: &[&[u8]], signature_hex: &str) -> Result<(), SignatureError> {
    let signature = hex::decode(signature_hex.trim())
        .map_err(|_| SignatureError::Missing("signature is not hexadecimal".into()))?;
    if signature.len() != 32 {
        return Err(SignatureError::Missing("signature is not 32 bytes".into()));
    }
    let mut mac = HmacSha256::new_from_slice(key.expose()).expect("HMAC accepts keys of any length");
    for part in message {
        mac.update(part);
    }
    mac.verify_slice(&signature).map_err(|_| SignatureError::Mismatch)
}

/// Meta webhooks (Messenger, WhatsApp): `X-Hub-Signature-256: sha256=<hex HMAC of the raw body
/// under the app secret>`.
pub fn verify_meta(app_secret: &Secret, header_opt: Option<&str>, body: &[u8]) -> Result<(), SignatureError> {
    let header = header_opt.ok_or_else(|| SignatureError::Missing("no X-Hub-Signature-256 header".into()))?;
    let signature_hex = header
        .trim()
        .strip_prefix("sha256=")
        .ok_or_else(|| SignatureError::Missing("X-Hub-Signature-256 must start with `sha256=`".into()))?;
    verify_hex(app_secret, &[body], signature_hex)
}

/// The `X-Switchboard-Signature` value of a custom-channel request with `body` sent at
/// `timestamp_unix_seconds` (which goes, as text, in `X-Switchboard-Timestamp`).
pub fn sign_custom(signing_key: &Secret, timestamp_unix_seconds: i64, body: &[u8]) -> String {
    format!("v1={}", sign_hex(signing_key.expose(), &[timestamp_unix_seconds.to_string().as_bytes(), b".", body]))
}

/// How far a custom-channel request's timestamp may be from our clock (either way).
pub const REPLAY_WINDOW_SECONDS: i64 = 300;

/// Custom channels: `X-Switchboard-Timestamp: <unix seconds>` and
/// `X-Switchboard-Signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>">`. The timestamp is
/// inside the signed bytes, so a captured request cannot be replayed outside the window.
pub fn verify_custom(
    signing_key: &Secret,
    timestamp_header_opt: Option<&str>,
    signature_header_opt: Option<&str>,
    body: &[u8],
    now_unix_seconds: i64,
) -> Result<(), SignatureError> {
    let timestamp_text =
        timestamp_header_opt.ok_or_else(|| SignatureError::Missing("no X-Switchboard-Timestamp header".into()))?.trim();
    let timestamp: i64 = timestamp_text
        .parse()
        .map_err(|_| SignatureError::Missing("X-Switchboard-Timestamp must be unix seconds".into()))?;
    let signature_header =
        signature_header_opt.ok_or_else(|| SignatureError::Missing("no X-Switchboard-Signature header".into()))?;
    // Several comma-separated signatures are allowed so a key can be rotated without downtime.
    let mut last_error = SignatureError::Missing("X-Switchboard-Signature has no `v1=` entry".into());
    let mut verified = false;
    for entry in signature_header.split(',') {
        if let Some(signature_hex) = entry.trim().strip_prefix("v1=") {
            match verify_hex(signing_key, &[timestamp_text.as_bytes(), b".", body], signature_hex) {
                Ok(()) => {
                    verified = true;
                    break;
                }
                Err(error) => last_error = error,
            }
        }
    }
    if !verified {
        return Err(last_error);
    }
    // Checked after the signature so an unauthenticated caller learns nothing about our clock.
    if (now_unix_seconds - timestamp).abs() > REPLAY_WINDOW_SECONDS {
        return Err(SignatureError::OutsideReplayWindow { window_seconds: REPLAY_WINDOW_SECONDS });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c6_meta_signature_is_checked_against_the_raw_body() {
        let secret = Secret::new("app-secret");
        let body = br#"{"object":"page"}"#;
        let header = format!("sha256={}", sign_hex(b"app-secret", &[body]));
        assert!(verify_meta(&secret, Some(&header), body).is_ok());
        assert!(matches!(verify_meta(&secret, Some(&header), b"{}"), Err(SignatureError::Mismatch)));
        assert!(matches!(verify_meta(&secret, None, body), Err(SignatureError::Missing(_))));
        assert!(matches!(verify_meta(&secret, Some("sha1=abc"), body), Err(SignatureError::Missing(_))));
        assert!(matches!(verify_meta(&secret, Some("sha256=zz"), body), Err(SignatureError::Missing(_))));
        let wrong_key = format!("sha256={}", sign_hex(b"other", &[body]));
        assert!(matches!(verify_meta(&secret, Some(&wrong_key), body), Err(SignatureError::Mismatch)));
    }

    #[test]
    fn c10_custom_signature_covers_timestamp_and_body_within_the_replay_window() {
        let key = Secret::new("k");
        let body = b"{}";
        let now = 1_700_000_000;
        let signature = format!("v1={}", sign_hex(b"k", &[b"1700000000", b".", body]));
        assert!(verify_custom(&key, Some("1700000000"), Some(&signature), body, now).is_ok());
        // Rotation: an old signature first, the valid one second.
        let rotated = format!("v1={},{signature}", sign_hex(b"old", &[b"1700000000", b".", body]));
        assert!(verify_custom(&key, Some("1700000000"), Some(&rotated), body, now).is_ok());
        assert!(matches!(
            verify_custom(&key, Some("1700000000"), Some(&signature), body, now + 301),
            Err(SignatureError::OutsideReplayWindow { .. })
        ));
        assert!(matches!(
            verify_custom(&key, Some("1700000001"), Some(&signature), body, now),
            Err(SignatureError::Mismatch)
        ));
        assert!(matches!(verify_custom(&key, None, Some(&signature), body, now), Err(SignatureError::Missing(_))));
        assert!(matches!(
            verify_custom(&key, Some("soon"), Some(&signature), body, now),
            Err(SignatureError::Missing(_))
        ));
    }

    #[test]
    fn c10_what_delivery_signs_ingest_verifies() {
        let key = Secret::new("app-key");
        let body = br#"{"reply_id":"r"}"#;
        let signature = sign_custom(&key, 1_700_000_000, body);
        assert!(verify_custom(&key, Some("1700000000"), Some(&signature), body, 1_700_000_010).is_ok());
        assert_eq!(
            verify_custom(&Secret::new("other"), Some("1700000000"), Some(&signature), body, 1_700_000_010),
            Err(SignatureError::Mismatch)
        );
    }
}
