//! WhatsApp Business (spec C8): the WhatsApp Cloud API webhook. `entry[].changes[]` with
//! `field = "messages"` carry a `value` whose `metadata.phone_number_id` picks the channel;
//! `value.messages[]` (every type, including `unsupported`), `value.contacts[]` (the sender's
//! profile name) and `value.statuses[]` (delivery reports → `DeliveryStatusReported`). The
//! sender's WhatsApp id (`wa_id`, their phone number) is the thread.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    Attachment, ChannelConfigured, ChannelType, DeliveryStatusReported, Envelope, GeoLocation, InboundContent,
    MessageKind, Sender,
};
use switchboard_runtime::config_store::{ConfigSnapshot, Owned};

use crate::channel::{self, Extracted};
use crate::error::IngestError;
use crate::meta;
use crate::secrets::Secrets;

/// The delivery, decoded in one pass: each change's `value` is only delimited here (Meta sends
/// `value` before `field`, so its shape is not known yet) and decoded once its `field` says
/// it is `messages`; other fields are skipped without being decoded at all.
#[derive(Debug, Deserialize)]
struct Webhook<'b> {
    object: String,
    #[serde(borrow)]
    entry: Vec<Entry<'b>>,
}

#[derive(Debug, Deserialize)]
struct Entry<'b> {
    #[serde(default)]
    id: String,
    #[serde(default, borrow)]
    changes: Vec<Change<'b>>,
}

#[derive(Debug, Deserialize)]
struct Change<'b> {
    field: String,
    #[serde(borrow)]
    value: &'b RawValue,
}

#[derive(Debug, Deserialize)]
struct MessagesValue {
    metadata: Metadata,
    #[serde(default)]
    contacts: Vec<Contact>,
    #[serde(default)]
    messages: Vec<WhatsAppMessage>,
    #[serde(default)]
    statuses: Vec<Status>,
}

#[derive(Debug, Deserialize)]
struct Metadata {
    phone_number_id: String,
    #[serde(default)]
    display_phone_number: String,
}

#[derive(Debug, Deserialize)]
struct Contact {
    wa_id: String,
    #[serde(default)]
    profile: Option<Profile>,
}

#[derive(Debug, Deserialize)]
struct Profile {
    #[serde(default)]
    name: String,
}

#[derive(Debug, Deserialize)]
struct WhatsAppMessage {
    from: String,
    id: String,
    #[serde(default)]
    timestamp: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<TextBody>,
    #[serde(default)]
    location: Option<Location>,
    #[serde(default)]
    interactive: Option<Interactive>,
    #[serde(default)]
    button: Option<Button>,
    #[serde(default)]
    context: Option<Context>,
    #[serde(default)]
    errors: Vec<ErrorDetail>,
    /// The media object of the message's type (image / video / audio / document / sticker).
    #[serde(default)]
    image: Option<Media>,
    #[serde(default)]
    video: Option<Media>,
    #[serde(default)]
    audio: Option<Media>,
    #[serde(default)]
    document: Option<Media>,
    #[serde(default)]
    sticker: Option<Media>,
}

/// `context`: the message this one replies to.
#[derive(Debug, Deserialize)]
struct Context {
    #[serde(default)]
    id: String,
}

#[derive(Debug, Default, Deserialize)]
struct Media {
    #[serde(default)]
    id: String,
    #[serde(default)]
    mime_type: String,
    /// Base64 (WhatsApp's encoding), or hex.
    #[serde(default)]
    sha256: String,
    #[serde(default)]
    caption: String,
    #[serde(default)]
    filename: String,
}

#[derive(Debug, Deserialize)]
struct TextBody {
    body: String,
}

#[derive(Debug, Deserialize)]
struct Location {
    latitude: f64,
    longitude: f64,
    #[serde(default)]
    name: String,
    #[serde(default)]
    address: String,
}

#[derive(Debug, Deserialize)]
struct Interactive {
    #[serde(default)]
    button_reply: Option<Reply>,
    #[serde(default)]
    list_reply: Option<Reply>,
}

#[derive(Debug, Deserialize)]
struct Reply {
    id: String,
    #[serde(default)]
    title: String,
}

#[derive(Debug, Deserialize)]
struct Button {
    #[serde(default)]
    payload: String,
    #[serde(default)]
    text: String,
}

#[derive(Debug, Deserialize)]
struct Status {
    id: String,
    status: String,
    #[serde(default)]
    timestamp: Option<String>,
    #[serde(default)]
    recipient_id: String,
    #[serde(default)]
    errors: Vec<ErrorDetail>,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    title: String,
}

fn media_attachment(media: &Media) -> Attachment {
    let sha256 = &media.sha256;
    Attachment {
        file_name: media.filename.clone(),
        content_type: media.mime_type.clone(),
        size_bytes: 0,
        // Attachment.sha256 is lower-case hex; WhatsApp sends base64, which stays in the
        // provider attributes instead of being mislabelled.
        sha256: if sha256.len() == 64 && sha256.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            sha256.to_ascii_lowercase()
        } else {
            String::new()
        },
        provider_ref: media.id.clone(),
        content_id: String::new(),
    }
}

fn parse_unix_seconds(text: Option<&str>) -> Option<DateTime<Utc>> {
    text.and_then(|text| text.parse::<i64>().ok()).and_then(channel::from_unix_seconds)
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
    if webhook.object != "whatsapp_business_account" {
        return Err(IngestError::InvalidField {
            field: "object",
            problem: format!("expected `whatsapp_business_account`, got `{}`", webhook.object),
        });
    }
    // Understand and resolve the whole delivery before publishing any of it.
    let mut values: Vec<(&Owned<ChannelConfigured>, String, MessagesValue)> = Vec::new();
    for entry in webhook.entry {
        for change in entry.changes {
            if change.field != "messages" {
                // Account/template/quality updates are not conversations.
                continue;
            }
            let value: MessagesValue = serde_json::from_str(change.value.get())
                .map_err(|error| IngestError::MalformedBody(format!("entry[].changes[].value: {error}")))?;
            let phone_number_id = value.metadata.phone_number_id.clone();
            let channel = channel::find_by(config, ChannelType::Whatsapp, |channel| {
                channel.whatsapp.as_ref().is_some_and(|settings| settings.phone_number_id == phone_number_id)
            })
            .next()
            .ok_or_else(|| IngestError::NoChannelFor {
                channel_type: "whatsapp",
                what: "phone_number_id",
                value: phone_number_id.clone(),
            })?;
            values.push((channel, entry.id.clone(), value));
        }
    }
    meta::verify_delivery(secrets, values.iter().map(|(channel, _, _)| *channel), signature_header_opt, body)?;

    let mut events = Vec::new();
    for (channel, business_account_id, value) in values {
        for message in value.messages {
            events.push(message_event(
                channel,
                &business_account_id,
                &value.metadata,
                &value.contacts,
                message,
                received_at,
            )?);
        }
        for status in value.statuses {
            channel::require_id("statuses[].id", &status.id)?;
            let error = status
                .errors
                .iter()
                .map(|error| format!("{} {}", error.code.map(|code| code.to_string()).unwrap_or_default(), error.title))
                .collect::<Vec<_>>()
                .join("; ");
            let occurred_at = parse_unix_seconds(status.timestamp.as_deref()).unwrap_or(received_at);
            events.push(channel::account_event(
                channel,
                occurred_at,
                Payload::DeliveryStatusReported(DeliveryStatusReported {
                    channel_id: channel.entity.channel_id.clone(),
                    provider_message_id: status.id,
                    recipient_external_id: status.recipient_id,
                    status: status.status,
                    error: error.trim().to_owned(),
                }),
            ));
        }
    }
    Ok(events)
}

fn message_event(
    channel: &Owned<ChannelConfigured>,
    business_account_id: &str,
    metadata: &Metadata,
    contacts: &[Contact],
    message: WhatsAppMessage,
    received_at: DateTime<Utc>,
) -> Result<Envelope, IngestError> {
    channel::require_id("messages[].id", &message.id)?;
    channel::require_id("messages[].from", &message.from)?;
    let display_name = contacts
        .iter()
        .find(|contact| contact.wa_id == message.from)
        .and_then(|contact| contact.profile.as_ref())
        .map(|profile| profile.name.clone())
        .unwrap_or_default();
    let mut content = InboundContent::default();
    content.provider_attributes.insert("phone_number_id".into(), metadata.phone_number_id.clone());
    content.provider_attributes.insert("display_phone_number".into(), metadata.display_phone_number.clone());
    content.provider_attributes.insert("business_account_id".into(), business_account_id.to_owned());
    if let Some(context) = message.context.filter(|context| !context.id.is_empty()) {
        content.provider_attributes.insert("context_message_id".into(), context.id);
    }
    let mut text = String::new();
    let kind = match message.kind.as_str() {
        "text" => {
            text = message.text.map(|body| body.body).unwrap_or_default();
            MessageKind::Text
        }
        media_kind @ ("image" | "video" | "audio" | "document" | "sticker") => {
            let (media_opt, kind) = match media_kind {
                "image" => (message.image, MessageKind::Image),
                "video" => (message.video, MessageKind::Video),
                "audio" => (message.audio, MessageKind::Audio),
                "document" => (message.document, MessageKind::Document),
                _ => (message.sticker, MessageKind::Sticker),
            };
            if let Some(media) = media_opt {
                let attachment = media_attachment(&media);
                if attachment.sha256.is_empty() && !media.sha256.is_empty() {
                    content.provider_attributes.insert("media_sha256".into(), media.sha256);
                }
                text = media.caption;
                content.attachments.push(attachment);
            }
            kind
        }
        "location" => {
            if let Some(location) = message.location {
                text = [location.name.as_str(), location.address.as_str()]
                    .iter()
                    .filter(|part| !part.is_empty())
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ");
                content.location = Some(GeoLocation {
                    latitude: location.latitude,
                    longitude: location.longitude,
                    name: location.name,
                    address: location.address,
                });
            }
            MessageKind::Location
        }
        "interactive" => {
            let reply = message.interactive.and_then(|interactive| interactive.button_reply.or(interactive.list_reply));
            if let Some(reply) = reply {
                content.interactive_reply_id = reply.id;
                text = reply.title;
            }
            MessageKind::InteractiveReply
        }
        "button" => {
            if let Some(button) = message.button {
                content.interactive_reply_id = button.payload;
                text = button.text;
            }
            MessageKind::InteractiveReply
        }
        "contacts" => MessageKind::Contacts,
        other => {
            // `unsupported`, `unknown`, `reaction`, `order`, `system`… are recorded as such.
            content.unsupported_kind = other.to_owned();
            if let Some(error) = message.errors.first() {
                content.provider_attributes.insert(
                    "error".into(),
                    format!("{} {}", error.code.map(|code| code.to_string()).unwrap_or_default(), error.title)
                        .trim()
                        .to_owned(),
                );
            }
            MessageKind::Unsupported
        }
    };
    content.kind = kind as i32;
    let extracted = Extracted {
        provider_message_id: message.id,
        thread_key: message.from.clone(),
        sender: Sender { external_id: message.from, display_name, email: String::new() },
        text,
        content,
        occurred_at: parse_unix_seconds(message.timestamp.as_deref()),
    };
    Ok(channel::inbound_event(channel, extracted, received_at))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::secrets::{ChannelSecrets, Secret};
    use crate::signature::sign_hex;
    use switchboard_proto::events::v1::WhatsAppSettings;

    pub(crate) fn whatsapp_config() -> (ConfigSnapshot, Secrets) {
        let mut config = ConfigSnapshot::default();
        config.channels.insert(Owned {
            account_id: "acct".into(),
            entity: ChannelConfigured {
                channel_id: "wa".into(),
                inbox_id: "support".into(),
                channel_type: ChannelType::Whatsapp as i32,
                enabled: true,
                whatsapp: Some(WhatsAppSettings {
                    phone_number_id: "106540352242922".into(),
                    display_phone_number: "15550783881".into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        });
        let mut secrets = Secrets::default();
        secrets
            .channels
            .insert("wa".into(), ChannelSecrets { app_secret: Some(Secret::new("wa-secret")), ..Default::default() });
        (config, secrets)
    }

    /// Shaped like the Cloud API's documented webhook examples.
    pub(crate) const DELIVERY: &str = r#"{
      "object": "whatsapp_business_account",
      "entry": [{
        "id": "102290129340398",
        "changes": [{
          "field": "messages",
          "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": "106540352242922"},
            "contacts": [{"profile": {"name": "Sheena Nelson"}, "wa_id": "16505551234"}],
            "messages": [
              {"from": "16505551234", "id": "wamid.HBgLMTY1MDM4Nzk0MzkVAgASGBQzQTRBNjU5OUFFRTAzODEwMTQ0RgA=", "timestamp": "1749416383", "type": "text", "text": {"body": "Does it come in another color?"}},
              {"from": "16505551234", "id": "wamid.IMG", "timestamp": "1749416390", "type": "image", "image": {"caption": "This one", "mime_type": "image/jpeg", "sha256": "EtaEIKDkRSuoeOJRsZJThNJY1jMa9uB0Zc+Jq9dAi3c=", "id": "1003383421387256"}},
              {"from": "16505551234", "id": "wamid.LOC", "timestamp": "1749416400", "type": "location", "location": {"address": "1 Hacker Way, Menlo Park, CA 94025", "latitude": 37.483307, "longitude": -122.148981, "name": "Main Office"}},
              {"from": "16505551234", "id": "wamid.BTN", "timestamp": "1749416410", "type": "interactive", "interactive": {"type": "button_reply", "button_reply": {"id": "yes-please", "title": "Yes please"}}},
              {"from": "16505551234", "id": "wamid.UNS", "timestamp": "1749416420", "type": "unsupported", "errors": [{"code": 131051, "title": "Message type unknown", "message": "Message type unknown"}]}
            ]
          }
        }, {
          "field": "messages",
          "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": "106540352242922"},
            "statuses": [{"id": "wamid.OUT1", "status": "read", "timestamp": "1749416500", "recipient_id": "16505551234"},
                         {"id": "wamid.OUT2", "status": "failed", "timestamp": "1749416501", "recipient_id": "16505551234", "errors": [{"code": 131047, "title": "Re-engagement message"}]}]
          }
        }]
      }]
    }"#;

    pub(crate) fn sign(body: &[u8]) -> String {
        format!("sha256={}", sign_hex(b"wa-secret", &[body]))
    }

    #[test]
    fn c8_whatsapp_messages_of_every_kind_and_statuses_are_recorded() {
        let (config, secrets) = whatsapp_config();
        let body = DELIVERY.as_bytes();
        let events = to_events(&config, &secrets, Some(&sign(body)), body, Utc::now()).unwrap();
        assert_eq!(events.len(), 7);
        let inbound: Vec<_> = events
            .iter()
            .filter_map(|event| match &event.payload {
                Some(Payload::InboundMessageReceived(inbound)) => Some(inbound),
                _ => None,
            })
            .collect();
        assert_eq!(inbound.len(), 5);
        assert_eq!(inbound[0].text, "Does it come in another color?");
        assert_eq!(inbound[0].thread_key, "16505551234");
        assert_eq!(inbound[0].sender.as_ref().unwrap().display_name, "Sheena Nelson");
        let image = inbound[1].content.as_ref().unwrap();
        assert_eq!(image.kind, MessageKind::Image as i32);
        assert_eq!(image.attachments[0].provider_ref, "1003383421387256");
        assert_eq!(image.attachments[0].content_type, "image/jpeg");
        assert_eq!(inbound[1].text, "This one");
        let location = inbound[2].content.as_ref().unwrap().location.as_ref().unwrap();
        assert_eq!(location.name, "Main Office");
        assert_eq!(inbound[3].content.as_ref().unwrap().interactive_reply_id, "yes-please");
        let unsupported = inbound[4].content.as_ref().unwrap();
        assert_eq!(unsupported.kind, MessageKind::Unsupported as i32);
        assert_eq!(unsupported.unsupported_kind, "unsupported");
        let Some(Payload::DeliveryStatusReported(failed)) = &events[6].payload else { panic!() };
        assert_eq!(failed.status, "failed");
        assert_eq!(failed.error, "131047 Re-engagement message");
    }

    /// Meta's real key order (`value` before `field`), a reply with `context`, a document with
    /// WhatsApp's base64 hash, and other change fields whose values have other shapes.
    #[test]
    fn c8_value_before_field_replies_documents_and_other_fields_are_handled_in_one_pass() {
        let (config, secrets) = whatsapp_config();
        let body = br#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[
          {"value":{"event":"APPROVED","message_template_id":594425479261596,"reason":null},"field":"message_template_status_update"},
          {"value":"an account update of a shape nobody documented","field":"account_update"},
          {"value":{"messaging_product":"whatsapp","metadata":{"display_phone_number":"15550783881","phone_number_id":"106540352242922"},
            "messages":[{"context":{"from":"15550783881","id":"wamid.OUT7"},"from":"16505551234","id":"wamid.DOC2","timestamp":"1749416390",
              "type":"document","document":{"caption":"the invoice","filename":"invoice.pdf","mime_type":"application/pdf",
              "sha256":"EtaEIKDkRSuoeOJRsZJThNJY1jMa9uB0Zc+Jq9dAi3c=","id":"1003383421387256"}}]},"field":"messages"}]}]}"#;
        let events = to_events(&config, &secrets, Some(&sign(body)), body, Utc::now()).unwrap();
        assert_eq!(events.len(), 1, "only the messages change yields events");
        let Some(Payload::InboundMessageReceived(document)) = &events[0].payload else { panic!("{:?}", events[0]) };
        let content = document.content.as_ref().unwrap();
        assert_eq!(content.kind, MessageKind::Document as i32);
        assert_eq!(document.text, "the invoice");
        assert_eq!(content.attachments[0].file_name, "invoice.pdf");
        assert_eq!(content.attachments[0].sha256, "", "base64 is not mislabelled as hex");
        assert_eq!(content.provider_attributes["media_sha256"], "EtaEIKDkRSuoeOJRsZJThNJY1jMa9uB0Zc+Jq9dAi3c=");
        assert_eq!(content.provider_attributes["context_message_id"], "wamid.OUT7");
    }

    #[test]
    fn c8_unknown_number_bad_signature_and_malformed_bodies_are_refused() {
        let (config, secrets) = whatsapp_config();
        let body = DELIVERY.as_bytes();
        assert!(matches!(
            to_events(&config, &secrets, Some(&sign(b"x")), body, Utc::now()),
            Err(IngestError::SignatureMismatch)
        ));
        let other_number = DELIVERY.replace("106540352242922", "999");
        assert!(matches!(
            to_events(&config, &secrets, Some(&sign(other_number.as_bytes())), other_number.as_bytes(), Utc::now()),
            Err(IngestError::NoChannelFor { .. })
        ));
        let no_metadata = br#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"messages","value":{}}]}]}"#;
        assert!(matches!(
            to_events(&config, &secrets, Some(&sign(no_metadata)), no_metadata, Utc::now()),
            Err(IngestError::MalformedBody(_))
        ));
    }
}
