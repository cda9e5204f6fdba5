//! Facebook Messenger (spec C6): Meta's page webhook. `entry[]` per page (the page id picks the
//! channel), `entry[].messaging[]` per event, the sender's page-scoped id (PSID) is the thread.
//!
//! - `message` → a message (text, attachments, quick replies); echoes of the page's own
//!   sends (`is_echo`) → `DeliveryStatusReported` with status [`ECHO_STATUS`], never a message.
//! - `postback` → an interactive reply; the consent prompt's buttons
//!   ([`CONSENT_GRANTED_PAYLOAD`] / [`CONSENT_DECLINED_PAYLOAD`]) and `optin` events →
//!   `ContactConsentReceived`.
//! - `delivery` / `read` → `DeliveryStatusReported`.
//! - anything else (reactions, referrals, edits…) → a message of kind UNSUPPORTED naming it.
//!
//! Consent (C6): each message carries the consent state ingest can vouch for. Implicit mode:
//! GIVEN (agreement is implied by the consent text). Explicit mode: GIVEN only when the same
//! delivery carried the sender's agreement before the message, otherwise NOT_GIVEN, and the
//! router holds it until it has seen a `ContactConsentReceived` for the sender.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    Attachment, ChannelConfigured, ChannelType, ConsentMode, ConsentState, ContactConsentReceived,
    DeliveryStatusReported, Envelope, GeoLocation, InboundContent, MessageKind, Sender,
};
use switchboard_runtime::config_store::{ConfigSnapshot, Owned};

use crate::channel::{self, Extracted};
use crate::error::IngestError;
use crate::meta;
use crate::secrets::Secrets;

/// Postback / quick-reply payloads of the consent prompt's buttons (documented in
/// docs/channels.md; the router's consent prompt offers them as quick replies).
pub use switchboard_runtime::outbound::{CONSENT_DECLINED_PAYLOAD, CONSENT_GRANTED_PAYLOAD};
/// `DeliveryStatusReported.status` of a Messenger echo: Meta confirms the page sent the message
/// `provider_message_id` (the mid) to `recipient_external_id` (the PSID).
pub const ECHO_STATUS: &str = "echo";

#[derive(Debug, Deserialize)]
struct Webhook {
    object: String,
    entry: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
struct Entry {
    id: String,
    #[serde(default)]
    messaging: Vec<MessagingEvent>,
}

#[derive(Debug, Default, Deserialize)]
struct Party {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    user_ref: Option<String>,
}

#[derive(Debug, Deserialize)]
struct MessagingEvent {
    #[serde(default)]
    sender: Party,
    /// The page for customers' messages; the customer (PSID) for echoes of the page's own sends.
    #[serde(default)]
    recipient: Party,
    #[serde(default)]
    timestamp: Option<i64>,
    #[serde(default)]
    message: Option<IncomingMessage>,
    #[serde(default)]
    postback: Option<Postback>,
    #[serde(default)]
    optin: Option<Optin>,
    #[serde(default)]
    delivery: Option<Delivery>,
    #[serde(default)]
    read: Option<Read>,
    /// Every other event kind Meta sends (reaction, referral, message_edit…).
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
struct IncomingMessage {
    mid: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    is_echo: bool,
    #[serde(default)]
    attachments: Vec<MessengerAttachment>,
    #[serde(default)]
    quick_reply: Option<QuickReply>,
}

#[derive(Debug, Deserialize)]
struct MessengerAttachment {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    payload: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct QuickReply {
    payload: String,
}

#[derive(Debug, Deserialize)]
struct Postback {
    #[serde(default)]
    mid: Option<String>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    payload: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Optin {
    #[serde(default, rename = "ref")]
    reference: Option<String>,
    #[serde(default)]
    notification_messages_status: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Delivery {
    #[serde(default)]
    mids: Vec<String>,
    #[serde(default)]
    watermark: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct Read {
    watermark: i64,
}

fn attachment_kind(kind: &str, payload: Option<&Value>) -> MessageKind {
    match kind {
        "image" if payload.and_then(|payload| payload.get("sticker_id")).is_some() => MessageKind::Sticker,
        "image" => MessageKind::Image,
        "video" => MessageKind::Video,
        "audio" => MessageKind::Audio,
        "file" => MessageKind::Document,
        "location" => MessageKind::Location,
        _ => MessageKind::Unsupported,
    }
}

fn consent_word(payload: &str) -> Option<bool> {
    match payload {
        CONSENT_GRANTED_PAYLOAD => Some(true),
        CONSENT_DECLINED_PAYLOAD => Some(false),
        _ => None,
    }
}

struct PageContext<'c> {
    channel: &'c Owned<ChannelConfigured>,
    page_id: String,
    explicit_consent: bool,
}

/// Turns one signed webhook delivery into events, in delivery order.
pub fn to_events(
    config: &ConfigSnapshot,
    secrets: &Secrets,
    signature_header_opt: Option<&str>,
    body: &[u8],
    received_at: DateTime<Utc>,
) -> Result<Vec<Envelope>, IngestError> {
    meta::require_signature_header(signature_header_opt)?;
    let webhook: Webhook = meta::parse_json(body)?;
    if webhook.object != "page" {
        return Err(IngestError::InvalidField {
            field: "object",
            problem: format!("expected `page`, got `{}`", webhook.object),
        });
    }
    // Resolve every page first: nothing is published unless the whole delivery is understood.
    let mut pages = Vec::with_capacity(webhook.entry.len());
    for entry in &webhook.entry {
        let channel = channel::find_by(config, ChannelType::FacebookMessenger, |channel| {
            channel.messenger.as_ref().is_some_and(|settings| settings.page_id == entry.id)
        })
        .next()
        .ok_or_else(|| IngestError::NoChannelFor {
            channel_type: "facebook_messenger",
            what: "page id",
            value: entry.id.clone(),
        })?;
        let explicit_consent = channel
            .entity
            .messenger
            .as_ref()
            .is_some_and(|settings| settings.consent_mode == ConsentMode::Explicit as i32);
        pages.push(PageContext { channel, page_id: entry.id.clone(), explicit_consent });
    }
    meta::verify_delivery(secrets, pages.iter().map(|page| page.channel), signature_header_opt, body)?;

    let mut events = Vec::new();
    for (entry, page) in webhook.entry.into_iter().zip(&pages) {
        let mut consented_in_delivery = BTreeSet::new();
        for event in entry.messaging {
            translate(page, event, received_at, &mut consented_in_delivery, &mut events)?;
        }
    }
    Ok(events)
}

fn translate(
    page: &PageContext<'_>,
    event: MessagingEvent,
    received_at: DateTime<Utc>,
    consented_in_delivery: &mut BTreeSet<String>,
    events: &mut Vec<Envelope>,
) -> Result<(), IngestError> {
    let channel_id = page.channel.entity.channel_id.clone();
    let psid = event.sender.id.clone().or(event.sender.user_ref.clone()).unwrap_or_default();
    let occurred_at = event.timestamp.and_then(channel::from_unix_millis).unwrap_or(received_at);
    let timestamp = event.timestamp.unwrap_or_default();
    let consent_event = |granted: bool, provider_event_id: String| {
        channel::account_event(
            page.channel,
            occurred_at,
            Payload::ContactConsentReceived(ContactConsentReceived {
                channel_id: channel_id.clone(),
                sender_external_id: psid.clone(),
                granted,
                provider_event_id,
            }),
        )
    };
    let mut base_content = InboundContent::default();
    base_content.provider_attributes.insert("page_id".into(), page.page_id.clone());
    base_content
        .provider_attributes
        .insert("consent_mode".into(), if page.explicit_consent { "explicit" } else { "implicit" }.into());

    if let Some(message) = event.message {
        if message.is_echo {
            // C6: the page's own send echoed back (sender = page, recipient = the customer).
            // Never a customer message: reported as a status of our outbound message, which
            // the projector matches by (account, channel, provider message id = mid).
            let recipient_psid = event.recipient.id.clone().or(event.recipient.user_ref.clone()).unwrap_or_default();
            channel::require_id("recipient.id", &recipient_psid)?;
            channel::require_id("message.mid", &message.mid)?;
            events.push(channel::account_event(
                page.channel,
                occurred_at,
                Payload::DeliveryStatusReported(DeliveryStatusReported {
                    channel_id: channel_id.clone(),
                    provider_message_id: message.mid,
                    recipient_external_id: recipient_psid,
                    status: ECHO_STATUS.into(),
                    error: String::new(),
                }),
            ));
            return Ok(());
        }
        channel::require_id("sender.id", &psid)?;
        channel::require_id("message.mid", &message.mid)?;
        if let Some(granted) = message.quick_reply.as_ref().and_then(|reply| consent_word(&reply.payload)) {
            if granted {
                consented_in_delivery.insert(psid.clone());
            }
            events.push(consent_event(granted, message.mid.clone()));
            return Ok(());
        }
        let mut content = base_content;
        let mut kind = MessageKind::Text;
        for attachment in &message.attachments {
            let attachment_kind = attachment_kind(&attachment.kind, attachment.payload.as_ref());
            if kind == MessageKind::Text {
                kind = attachment_kind;
            }
            if attachment_kind == MessageKind::Unsupported {
                content.unsupported_kind = attachment.kind.clone();
            }
            let payload = attachment.payload.as_ref();
            if let Some(coordinates) = payload.and_then(|payload| payload.get("coordinates")) {
                content.location = Some(GeoLocation {
                    latitude: coordinates.get("lat").and_then(Value::as_f64).unwrap_or_default(),
                    longitude: coordinates.get("long").and_then(Value::as_f64).unwrap_or_default(),
                    ..Default::default()
                });
            }
            if let Some(url) = payload.and_then(|payload| payload.get("url")).and_then(Value::as_str) {
                content.attachments.push(Attachment {
                    content_type: attachment.kind.clone(),
                    provider_ref: url.to_owned(),
                    ..Default::default()
                });
            }
        }
        if let Some(reply) = &message.quick_reply {
            kind = MessageKind::InteractiveReply;
            content.interactive_reply_id = reply.payload.clone();
        }
        content.kind = kind as i32;
        content.consent = consent_state(page, consented_in_delivery, &psid) as i32;
        events.push(message_event(
            page,
            &psid,
            message.mid,
            message.text.unwrap_or_default(),
            content,
            occurred_at,
            received_at,
        ));
        return Ok(());
    }
    if let Some(postback) = event.postback {
        channel::require_id("sender.id", &psid)?;
        let payload = postback.payload.unwrap_or_default();
        let provider_id = postback.mid.unwrap_or_else(|| format!("postback:{psid}:{timestamp}"));
        if let Some(granted) = consent_word(&payload) {
            if granted {
                consented_in_delivery.insert(psid.clone());
            }
            events.push(consent_event(granted, provider_id));
            return Ok(());
        }
        let mut content = base_content;
        content.kind = MessageKind::InteractiveReply as i32;
        content.interactive_reply_id = payload;
        content.consent = consent_state(page, consented_in_delivery, &psid) as i32;
        let text = postback.title.unwrap_or_default();
        events.push(message_event(page, &psid, provider_id, text, content, occurred_at, received_at));
        return Ok(());
    }
    if let Some(optin) = event.optin {
        channel::require_id("sender", &psid)?;
        let granted = optin.notification_messages_status.as_deref() != Some("STOP_NOTIFICATIONS");
        if granted {
            consented_in_delivery.insert(psid.clone());
        }
        let provider_id = format!("optin:{psid}:{timestamp}:{}", optin.reference.unwrap_or_default());
        events.push(consent_event(granted, provider_id));
        return Ok(());
    }
    if let Some(delivery) = event.delivery {
        let status = |provider_message_id: String, status: &str| {
            channel::account_event(
                page.channel,
                occurred_at,
                Payload::DeliveryStatusReported(DeliveryStatusReported {
                    channel_id: channel_id.clone(),
                    provider_message_id,
                    recipient_external_id: psid.clone(),
                    status: status.to_owned(),
                    error: String::new(),
                }),
            )
        };
        if delivery.mids.is_empty() {
            events.push(status(format!("watermark:{}", delivery.watermark.unwrap_or(timestamp)), "delivered"));
        }
        for mid in delivery.mids {
            events.push(status(mid, "delivered"));
        }
        return Ok(());
    }
    if let Some(read) = event.read {
        events.push(channel::account_event(
            page.channel,
            occurred_at,
            Payload::DeliveryStatusReported(DeliveryStatusReported {
                channel_id: channel_id.clone(),
                // Messenger reports reads as a watermark: everything before it was read.
                provider_message_id: format!("watermark:{}", read.watermark),
                recipient_external_id: psid.clone(),
                status: "read".into(),
                error: String::new(),
            }),
        ));
        return Ok(());
    }
    // Unsupported kinds are recorded, never dropped.
    let Some((kind_name, raw)) = event.other.iter().next() else {
        return Err(IngestError::MalformedBody("messaging event with no content".into()));
    };
    channel::require_id("sender.id", &psid)?;
    let mut content = base_content;
    content.kind = MessageKind::Unsupported as i32;
    content.unsupported_kind = kind_name.clone();
    content.consent = consent_state(page, consented_in_delivery, &psid) as i32;
    let provider_id = raw
        .get("mid")
        .and_then(Value::as_str)
        .map(|mid| format!("{kind_name}:{mid}"))
        .unwrap_or_else(|| format!("{kind_name}:{psid}:{timestamp}"));
    events.push(message_event(page, &psid, provider_id, String::new(), content, occurred_at, received_at));
    Ok(())
}

fn consent_state(page: &PageContext<'_>, consented_in_delivery: &BTreeSet<String>, psid: &str) -> ConsentState {
    if !page.explicit_consent || consented_in_delivery.contains(psid) {
        ConsentState::Given
    } else {
        ConsentState::NotGiven
    }
}

fn message_event(
    page: &PageContext<'_>,
    psid: &str,
    provider_message_id: String,
    text: String,
    content: InboundContent,
    occurred_at: DateTime<Utc>,
    received_at: DateTime<Utc>,
) -> Envelope {
    let extracted = Extracted {
        provider_message_id,
        thread_key: psid.to_owned(),
        // The Messenger profile gives no email (C6): the PSID is the identity.
        sender: Sender { external_id: psid.to_owned(), ..Default::default() },
        text,
        content,
        occurred_at: Some(occurred_at),
    };
    channel::inbound_event(page.channel, extracted, received_at)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::secrets::{ChannelSecrets, Secret};
    use crate::signature::sign_hex;
    use switchboard_proto::events::v1::MessengerSettings;

    pub(crate) fn messenger_config(consent_mode: ConsentMode) -> (ConfigSnapshot, Secrets) {
        let mut config = ConfigSnapshot::default();
        config.channels.insert(Owned {
            account_id: "acct".into(),
            entity: ChannelConfigured {
                channel_id: "fb".into(),
                inbox_id: "support".into(),
                channel_type: ChannelType::FacebookMessenger as i32,
                enabled: true,
                messenger: Some(MessengerSettings {
                    page_id: "104212345678901".into(),
                    consent_mode: consent_mode as i32,
                    ..Default::default()
                }),
                ..Default::default()
            },
        });
        let mut secrets = Secrets::default();
        secrets.channels.insert(
            "fb".into(),
            ChannelSecrets {
                app_secret: Some(Secret::new("app-secret")),
                verify_token: Some(Secret::new("verify-me")),
                ..Default::default()
            },
        );
        (config, secrets)
    }

    /// Shaped like Meta's documented `messages` / `messaging_postbacks` / `message_deliveries`
    /// webhook payloads.
    pub(crate) const DELIVERY: &str = r#"{
      "object": "page",
      "entry": [{
        "id": "104212345678901",
        "time": 1772530000000,
        "messaging": [
          {"sender": {"id": "6543210987654321"}, "recipient": {"id": "104212345678901"}, "timestamp": 1772530000000,
           "message": {"mid": "m_AbCdEf123", "text": "Hello, is my order shipped?"}},
          {"sender": {"id": "6543210987654321"}, "recipient": {"id": "104212345678901"}, "timestamp": 1772530001000,
           "message": {"mid": "m_Img456", "attachments": [{"type": "image", "payload": {"url": "https://scontent.xx.fbcdn.net/v/photo.jpg"}}]}},
          {"sender": {"id": "6543210987654321"}, "recipient": {"id": "104212345678901"}, "timestamp": 1772530002000,
           "postback": {"mid": "m_Pb789", "title": "Track order", "payload": "TRACK_ORDER"}},
          {"sender": {"id": "6543210987654321"}, "recipient": {"id": "104212345678901"}, "timestamp": 1772530003000,
           "delivery": {"mids": ["m_Out1"], "watermark": 1772530003000}},
          {"sender": {"id": "6543210987654321"}, "recipient": {"id": "104212345678901"}, "timestamp": 1772530004000,
           "reaction": {"mid": "m_Out1", "action": "react", "emoji": "👍", "reaction": "like"}},
          {"sender": {"id": "104212345678901"}, "recipient": {"id": "6543210987654321"}, "timestamp": 1772530005000,
           "message": {"mid": "m_Echo", "is_echo": true, "text": "our reply"}}
        ]
      }]
    }"#;

    pub(crate) fn sign(body: &[u8]) -> String {
        format!("sha256={}", sign_hex(b"app-secret", &[body]))
    }

    fn payloads(events: &[Envelope]) -> Vec<&Payload> {
        events.iter().map(|event| event.payload.as_ref().unwrap()).collect()
    }

    #[test]
    fn c6_messenger_delivery_becomes_messages_statuses_and_recorded_unsupported_kinds() {
        let (config, secrets) = messenger_config(ConsentMode::Implicit);
        let body = DELIVERY.as_bytes();
        let events = to_events(&config, &secrets, Some(&sign(body)), body, Utc::now()).unwrap();
        let payloads = payloads(&events);
        assert_eq!(payloads.len(), 6, "everything kept");
        let Payload::InboundMessageReceived(text) = payloads[0] else { panic!() };
        assert_eq!(text.thread_key, "6543210987654321");
        assert_eq!(text.provider_message_id, "m_AbCdEf123");
        assert_eq!(text.text, "Hello, is my order shipped?");
        let content = text.content.as_ref().unwrap();
        assert_eq!(content.consent, ConsentState::Given as i32);
        assert_eq!(content.provider_attributes["page_id"], "104212345678901");
        let Payload::InboundMessageReceived(image) = payloads[1] else { panic!() };
        let content = image.content.as_ref().unwrap();
        assert_eq!(content.kind, MessageKind::Image as i32);
        assert_eq!(content.attachments[0].provider_ref, "https://scontent.xx.fbcdn.net/v/photo.jpg");
        let Payload::InboundMessageReceived(postback) = payloads[2] else { panic!() };
        assert_eq!(postback.content.as_ref().unwrap().interactive_reply_id, "TRACK_ORDER");
        let Payload::DeliveryStatusReported(status) = payloads[3] else { panic!() };
        assert_eq!((status.provider_message_id.as_str(), status.status.as_str()), ("m_Out1", "delivered"));
        let Payload::InboundMessageReceived(reaction) = payloads[4] else { panic!() };
        let content = reaction.content.as_ref().unwrap();
        assert_eq!(content.kind, MessageKind::Unsupported as i32);
        assert_eq!(content.unsupported_kind, "reaction");
        let Payload::DeliveryStatusReported(echo) = payloads[5] else { panic!("{:?}", payloads[5]) };
        assert_eq!(echo.status, ECHO_STATUS);
        assert_eq!(echo.provider_message_id, "m_Echo");
        assert_eq!(echo.recipient_external_id, "6543210987654321", "the customer the page wrote to");
    }

    #[test]
    fn c6_messenger_echoes_of_our_sends_are_statuses_never_customer_messages() {
        let (config, secrets) = messenger_config(ConsentMode::Explicit);
        let body = br#"{"object":"page","entry":[{"id":"104212345678901","messaging":[
          {"sender":{"id":"104212345678901"},"recipient":{"id":"777"},"timestamp":1,"message":{"mid":"m_Ours","is_echo":true,"text":"Hi, how can we help?","app_id":1517}}
        ]}]}"#;
        let events = to_events(&config, &secrets, Some(&sign(body)), body, Utc::now()).unwrap();
        assert_eq!(events.len(), 1);
        let Some(Payload::DeliveryStatusReported(echo)) = events[0].payload.as_ref() else { panic!("{events:?}") };
        assert_eq!(
            (echo.channel_id.as_str(), echo.provider_message_id.as_str(), echo.recipient_external_id.as_str()),
            ("fb", "m_Ours", "777")
        );
        assert_eq!(events[0].account_id, "acct");
        assert_eq!(echo.status, "echo");
        let no_recipient = br#"{"object":"page","entry":[{"id":"104212345678901","messaging":[
          {"sender":{"id":"104212345678901"},"timestamp":1,"message":{"mid":"m_Ours","is_echo":true}}
        ]}]}"#;
        let refused = to_events(&config, &secrets, Some(&sign(no_recipient)), no_recipient, Utc::now());
        assert!(matches!(refused, Err(IngestError::InvalidField { .. })), "{refused:?}");
    }

    #[test]
    fn c6_explicit_consent_marks_messages_until_the_sender_agrees() {
        let (config, secrets) = messenger_config(ConsentMode::Explicit);
        let body = br#"{"object":"page","entry":[{"id":"104212345678901","messaging":[
          {"sender":{"id":"777"},"recipient":{"id":"104212345678901"},"timestamp":1,"message":{"mid":"m1","text":"hi"}},
          {"sender":{"id":"777"},"recipient":{"id":"104212345678901"},"timestamp":2,"postback":{"mid":"m2","title":"I agree","payload":"SWITCHBOARD_CONSENT_GRANTED"}},
          {"sender":{"id":"777"},"recipient":{"id":"104212345678901"},"timestamp":3,"message":{"mid":"m3","text":"thanks"}}
        ]}]}"#;
        let events = to_events(&config, &secrets, Some(&sign(body)), body, Utc::now()).unwrap();
        let payloads = payloads(&events);
        let Payload::InboundMessageReceived(first) = payloads[0] else { panic!() };
        assert_eq!(first.content.as_ref().unwrap().consent, ConsentState::NotGiven as i32);
        let Payload::ContactConsentReceived(consent) = payloads[1] else { panic!() };
        assert!(consent.granted);
        assert_eq!(consent.sender_external_id, "777");
        let Payload::InboundMessageReceived(after) = payloads[2] else { panic!() };
        assert_eq!(after.content.as_ref().unwrap().consent, ConsentState::Given as i32);
    }

    #[test]
    fn c6_bad_signatures_unknown_pages_and_malformed_bodies_are_refused() {
        let (config, secrets) = messenger_config(ConsentMode::Implicit);
        let body = DELIVERY.as_bytes();
        assert!(matches!(to_events(&config, &secrets, None, body, Utc::now()), Err(IngestError::SignatureMissing(_))));
        assert!(matches!(
            to_events(&config, &secrets, Some(&sign(b"other")), body, Utc::now()),
            Err(IngestError::SignatureMismatch)
        ));
        let unknown_page =
            DELIVERY.replace("\"id\": \"104212345678901\",\n        \"time\"", "\"id\": \"999\",\n        \"time\"");
        assert!(matches!(
            to_events(&config, &secrets, Some(&sign(unknown_page.as_bytes())), unknown_page.as_bytes(), Utc::now()),
            Err(IngestError::NoChannelFor { .. })
        ));
        for malformed in [&b"{"[..], b"[]", br#"{"object":"page"}"#, br#"{"object":"user","entry":[]}"#] {
            let result = to_events(&config, &secrets, Some(&sign(malformed)), malformed, Utc::now());
            assert!(
                matches!(result, Err(IngestError::MalformedBody(_) | IngestError::InvalidField { .. })),
                "{result:?}"
            );
        }
    }
}
