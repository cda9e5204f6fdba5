//! Website chat (spec C5): a visitor's message from the chat widget.
//!
//! The widget identifies the visitor by the id in its cookie (`visitor_id`, which is the thread
//! key: one open conversation per visitor and channel, R10) and gives every message a
//! client-side id (`message_id`) that it reuses when it retries, so a retry is recognised (B1).

use chrono::{DateTime, Utc};
use serde::Deserialize;
use switchboard_proto::events::v1::{ChannelType, Envelope, InboundContent, MessageKind, Sender};
use switchboard_runtime::config_store::ConfigSnapshot;

use crate::channel::{self, Extracted, require_id};
use crate::error::IngestError;

pub const MAX_TEXT_BYTES: usize = 64 * 1024;

/// `POST /v1/channels/{channel_id}/chat/messages`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageRequest {
    pub visitor_id: String,
    pub message_id: String,
    pub text: String,
    #[serde(default)]
    pub visitor_name: Option<String>,
    #[serde(default)]
    pub visitor_email: Option<String>,
    /// When the visitor sent it (widget clock); defaults to the time of receipt.
    #[serde(default)]
    pub sent_at: Option<DateTime<Utc>>,
}

/// Validates a chat message against the channel config and builds its inbound event.
pub fn to_inbound_event(
    config: &ConfigSnapshot,
    channel_id: &str,
    request: ChatMessageRequest,
    received_at: DateTime<Utc>,
) -> Result<Envelope, IngestError> {
    let channel = channel::resolve(config, channel_id, ChannelType::Chat)?;
    require_id("visitor_id", &request.visitor_id)?;
    require_id("message_id", &request.message_id)?;
    if request.text.trim().is_empty() {
        return Err(IngestError::InvalidField { field: "text", problem: "must not be empty".into() });
    }
    if request.text.len() > MAX_TEXT_BYTES {
        return Err(IngestError::InvalidField {
            field: "text",
            problem: format!("longer than {MAX_TEXT_BYTES} bytes"),
        });
    }
    let extracted = Extracted {
        provider_message_id: request.message_id,
        // One open conversation per visitor and channel (R10).
        thread_key: request.visitor_id.clone(),
        sender: Sender {
            external_id: request.visitor_id,
            display_name: request.visitor_name.unwrap_or_default(),
            email: request.visitor_email.unwrap_or_default(),
        },
        text: request.text,
        content: InboundContent { kind: MessageKind::Text as i32, ..Default::default() },
        occurred_at: request.sent_at,
    };
    Ok(channel::inbound_event(channel, extracted, received_at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_proto::events::v1::ChannelConfigured;
    use switchboard_proto::events::v1::envelope::Payload;
    use switchboard_runtime::config_store::Owned;
    use switchboard_runtime::ids;

    fn config_with(channel_type: ChannelType) -> ConfigSnapshot {
        let mut config = ConfigSnapshot::default();
        let channel = ChannelConfigured {
            channel_id: "web".into(),
            inbox_id: "inbox-1".into(),
            channel_type: channel_type as i32,
            name: "Website".into(),
            enabled: true,
            ..Default::default()
        };
        config.channels.insert(Owned { account_id: "acct".into(), entity: channel });
        config
    }

    fn request(visitor_id: &str, message_id: &str, text: &str) -> ChatMessageRequest {
        ChatMessageRequest {
            visitor_id: visitor_id.into(),
            message_id: message_id.into(),
            text: text.into(),
            visitor_name: Some("Vera".into()),
            visitor_email: None,
            sent_at: None,
        }
    }

    #[test]
    fn c5_chat_message_becomes_an_inbound_event_keyed_by_account() {
        let event =
            to_inbound_event(&config_with(ChannelType::Chat), "web", request("v-1", "m-1", "hi"), Utc::now()).unwrap();
        assert_eq!(event.account_id, "acct");
        assert_eq!(event.partition_key, "acct");
        let Some(Payload::InboundMessageReceived(inbound)) = event.payload else { panic!() };
        assert_eq!(inbound.thread_key, "v-1");
        assert_eq!(inbound.inbox_id, "inbox-1");
        assert_eq!(inbound.message_id, ids::message_id_for("acct", "web", "m-1").to_string());
        assert_eq!(inbound.sender.unwrap().display_name, "Vera");
    }

    #[test]
    fn c5_bad_chat_input_is_rejected_with_the_field_named() {
        let config = config_with(ChannelType::Chat);
        let cases = [
            (request("", "m", "hi"), "visitor_id"),
            (request("v", " ", "hi"), "message_id"),
            (request("v", "m", "  "), "text"),
            (request("v", &"x".repeat(600), "hi"), "message_id"),
            (request("v\u{7}", "m", "hi"), "visitor_id"),
            (request("v", "m", &"x".repeat(MAX_TEXT_BYTES + 1)), "text"),
        ];
        for (bad, expected_field) in cases {
            match to_inbound_event(&config, "web", bad, Utc::now()) {
                Err(IngestError::InvalidField { field, .. }) => assert_eq!(field, expected_field),
                other => panic!("expected invalid {expected_field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_or_non_chat_channels_are_not_found() {
        let chat = config_with(ChannelType::Chat);
        assert!(matches!(
            to_inbound_event(&chat, "nope", request("v", "m", "hi"), Utc::now()),
            Err(IngestError::UnknownChannel { .. })
        ));
        let email = config_with(ChannelType::TeamEmail);
        assert!(matches!(
            to_inbound_event(&email, "web", request("v", "m", "hi"), Utc::now()),
            Err(IngestError::WrongChannelType { .. })
        ));
    }
}
