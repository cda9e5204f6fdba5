//! Custom channels (spec C10), API version 1: external messaging apps (Telegram, Slack, LINE
//! bridges…) post messages to `POST /v1/channels/{channel_id}/custom/messages`, signed per
//! channel (see [`crate::signature::verify_custom`] and docs/channels.md).
//!
//! ```json
//! {"message_id": "tg-8812", "thread_id": "tg-chat-4471",
//!  "sender": {"id": "tg-user-99", "name": "Kim", "email": "kim@example.org"},
//!  "text": "Hi from Telegram", "sent_at": "2026-03-03T10:00:00Z",
//!  "attachments": [{"url": "https://…/photo.jpg", "file_name": "photo.jpg",
//!                   "content_type": "image/jpeg", "size_bytes": 48213, "sha256": "…"}]}
//! ```

use chrono::{DateTime, Utc};
use serde::Deserialize;
use switchboard_proto::events::v1::{Attachment, ChannelType, Envelope, InboundContent, MessageKind, Sender};
use switchboard_runtime::config_store::ConfigSnapshot;

use crate::channel::{self, Extracted, require_id};
use crate::error::IngestError;
use crate::secrets::Secrets;
use crate::signature;

const MAX_ATTACHMENTS: usize = 50;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomMessage {
    pub message_id: String,
    /// The app's conversation id (chat, DM…): one open conversation per thread.
    pub thread_id: String,
    pub sender: CustomSender,
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub sent_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub attachments: Vec<CustomAttachment>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomSender {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomAttachment {
    pub url: String,
    #[serde(default)]
    pub file_name: Option<String>,
    #[serde(default)]
    pub content_type: Option<String>,
    #[serde(default)]
    pub size_bytes: Option<u64>,
    #[serde(default)]
    pub sha256: Option<String>,
}

/// The parts of the request the signature covers.
pub struct SignedRequest<'r> {
    pub timestamp: Option<&'r str>,
    pub signature: Option<&'r str>,
    pub body: &'r [u8],
}

pub fn to_inbound_event(
    config: &ConfigSnapshot,
    secrets: &Secrets,
    channel_id: &str,
    request: SignedRequest<'_>,
    now: DateTime<Utc>,
) -> Result<Envelope, IngestError> {
    let channel = channel::resolve(config, channel_id, ChannelType::Custom)?;
    let signing_key = secrets
        .channel(&channel.account_id, channel_id)
        .and_then(|channel| channel.signing_key.as_ref())
        .ok_or_else(|| IngestError::SecretNotConfigured { channel_id: channel_id.to_owned(), secret: "signing_key" })?;
    signature::verify_custom(signing_key, request.timestamp, request.signature, request.body, now.timestamp())?;
    let message: CustomMessage =
        serde_json::from_slice(request.body).map_err(|error| IngestError::MalformedBody(error.to_string()))?;
    require_id("message_id", &message.message_id)?;
    require_id("thread_id", &message.thread_id)?;
    require_id("sender.id", &message.sender.id)?;
    if message.text.trim().is_empty() && message.attachments.is_empty() {
        return Err(IngestError::InvalidField { field: "text", problem: "a message needs text or attachments".into() });
    }
    if message.attachments.len() > MAX_ATTACHMENTS {
        return Err(IngestError::InvalidField {
            field: "attachments",
            problem: format!("more than {MAX_ATTACHMENTS}"),
        });
    }
    let mut attachments = Vec::with_capacity(message.attachments.len());
    for attachment in message.attachments {
        require_id("attachments[].url", &attachment.url)?;
        let sha256 = attachment.sha256.unwrap_or_default().to_ascii_lowercase();
        if !sha256.is_empty() && (sha256.len() != 64 || !sha256.bytes().all(|byte| byte.is_ascii_hexdigit())) {
            return Err(IngestError::InvalidField {
                field: "attachments[].sha256",
                problem: "must be 64 hex digits".into(),
            });
        }
        attachments.push(Attachment {
            file_name: attachment.file_name.unwrap_or_default(),
            content_type: attachment.content_type.unwrap_or_default(),
            size_bytes: attachment.size_bytes.unwrap_or_default(),
            sha256,
            provider_ref: attachment.url,
            content_id: String::new(),
        });
    }
    let kind = if message.text.trim().is_empty() { MessageKind::Document } else { MessageKind::Text };
    let mut content = InboundContent { kind: kind as i32, attachments, ..Default::default() };
    content.provider_attributes.insert("custom_api_version".into(), "1".into());
    let extracted = Extracted {
        provider_message_id: message.message_id,
        thread_key: message.thread_id,
        sender: Sender {
            external_id: message.sender.id,
            display_name: message.sender.name.unwrap_or_default(),
            email: message.sender.email.unwrap_or_default(),
        },
        text: message.text,
        content,
        occurred_at: message.sent_at,
    };
    Ok(channel::inbound_event(channel, extracted, now))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::secrets::{ChannelSecrets, Secret};
    use crate::signature::sign_hex;
    use switchboard_proto::events::v1::ChannelConfigured;
    use switchboard_proto::events::v1::envelope::Payload;
    use switchboard_runtime::config_store::Owned;

    pub(crate) fn custom_config() -> (ConfigSnapshot, Secrets) {
        let mut config = ConfigSnapshot::default();
        config.channels.insert(Owned {
            account_id: "acct".into(),
            entity: ChannelConfigured {
                channel_id: "telegram".into(),
                inbox_id: "support".into(),
                channel_type: ChannelType::Custom as i32,
                enabled: true,
                ..Default::default()
            },
        });
        let mut secrets = Secrets::default();
        secrets.channels.insert(
            "telegram".into(),
            ChannelSecrets { signing_key: Some(Secret::new("tg-key")), ..Default::default() },
        );
        (config, secrets)
    }

    pub(crate) const BODY: &[u8] =
        br#"{"message_id":"tg-1","thread_id":"chat-9","sender":{"id":"u-99","name":"Kim"},"text":"Hi from Telegram"}"#;

    fn signed<'a>(timestamp: &'a str, signature: &'a str, body: &'a [u8]) -> SignedRequest<'a> {
        SignedRequest { timestamp: Some(timestamp), signature: Some(signature), body }
    }

    #[test]
    fn c10_signed_custom_message_becomes_an_inbound_event() {
        let (config, secrets) = custom_config();
        let now = Utc::now();
        let timestamp = now.timestamp().to_string();
        let signature = format!("v1={}", sign_hex(b"tg-key", &[timestamp.as_bytes(), b".", BODY]));
        let event = to_inbound_event(&config, &secrets, "telegram", signed(&timestamp, &signature, BODY), now).unwrap();
        let Some(Payload::InboundMessageReceived(inbound)) = event.payload else { panic!() };
        assert_eq!(inbound.thread_key, "chat-9");
        assert_eq!(inbound.sender.unwrap().display_name, "Kim");
        assert_eq!(inbound.text, "Hi from Telegram");
    }

    #[test]
    fn c10_unsigned_replayed_or_unknown_requests_are_refused() {
        let (config, secrets) = custom_config();
        let now = Utc::now();
        let old = (now.timestamp() - 600).to_string();
        let old_signature = format!("v1={}", sign_hex(b"tg-key", &[old.as_bytes(), b".", BODY]));
        assert!(matches!(
            to_inbound_event(&config, &secrets, "telegram", signed(&old, &old_signature, BODY), now),
            Err(IngestError::OutsideReplayWindow { .. })
        ));
        let timestamp = now.timestamp().to_string();
        assert!(matches!(
            to_inbound_event(&config, &secrets, "telegram", signed(&timestamp, "v1=00", BODY), now),
            Err(IngestError::SignatureMissing(_))
        ));
        let unsigned = SignedRequest { timestamp: None, signature: None, body: BODY };
        assert!(matches!(
            to_inbound_event(&config, &secrets, "telegram", unsigned, now),
            Err(IngestError::SignatureMissing(_))
        ));
        let unsigned = SignedRequest { timestamp: None, signature: None, body: BODY };
        assert!(matches!(
            to_inbound_event(&config, &secrets, "slack", unsigned, now),
            Err(IngestError::UnknownChannel { .. })
        ));
        let body = br#"{"message_id":"tg-1"}"#;
        let signature = format!("v1={}", sign_hex(b"tg-key", &[timestamp.as_bytes(), b".", body]));
        assert!(matches!(
            to_inbound_event(&config, &secrets, "telegram", signed(&timestamp, &signature, body), now),
            Err(IngestError::MalformedBody(_))
        ));
    }
}
