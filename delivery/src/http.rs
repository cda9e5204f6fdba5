//! HTTP transports: Meta's Messenger Send API, the WhatsApp Cloud API and customers' apps
//! (C6, C8, C10). The requests and the reading of the answers are pure functions
//! ([`messenger_request`], [`whatsapp_request`], [`custom_request`], [`classify`]); [`HttpSender`]
//! is the thin reqwest shell that sends one request and classifies what came back.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use switchboard_proto::events::v1::{
    AuthorKind, MessengerMessagingType, OutboundAttachment, OutboundMessageQueued, OutboundWhatsApp,
};
use switchboard_runtime::secrets::Secret;
use switchboard_runtime::signature::{CUSTOM_SIGNATURE_HEADER, CUSTOM_TIMESTAMP_HEADER, sign_custom};

use crate::outcome::SendOutcome;
use crate::retry::parse_retry_after;

/// The header carrying the send's stable idempotency key on every HTTP send.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

/// Which answer shape the provider gives (where its message id is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// `{"recipient_id", "message_id"}`.
    Messenger,
    /// `{"messages": [{"id"}]}`.
    WhatsApp,
    /// A customer's app: `{"id"}` or `{"message_id"}` if it gives one, else the reply id.
    Custom,
}

/// One request, fully built: nothing about it is decided by the shell.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRequest {
    pub provider: Provider,
    pub url: String,
    /// Header name and value, in order (the bearer token included).
    pub headers: Vec<(String, String)>,
    /// The exact bytes sent (the custom signature covers them).
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("no access_token for channel {0} in the secrets file")]
    NoAccessToken(String),
    #[error("no signing_key for channel {0} in the secrets file")]
    NoSigningKey(String),
    #[error("the message has no {0} part")]
    MissingPart(&'static str),
    #[error("custom channel {0} has no delivery URL")]
    NoDeliveryUrl(String),
}

fn json_body(value: &Value) -> Vec<u8> {
    serde_json::to_vec(value).expect("a JSON value always serialises")
}

fn graph_url(base_url: &str, node: &str) -> String {
    format!("{}/{node}/messages", base_url.trim_end_matches('/'))
}

/// Meta's attachment type from a MIME type.
fn messenger_attachment_type(content_type: &str) -> &'static str {
    match content_type.split('/').next().unwrap_or_default() {
        "image" => "image",
        "video" => "video",
        "audio" => "audio",
        _ => "file",
    }
}

/// Messenger Send API: `POST {base}/{page_id}/messages`. The text and each attachment are
/// separate Meta messages; this builds the one for `part` (0 = the text if there is one, then
/// the attachments in order), so every part has its own request and idempotency key suffix.
pub fn messenger_request(
    base_url: &str,
    message: &OutboundMessageQueued,
    access_token: Option<&Secret>,
    part: usize,
) -> Result<HttpRequest, BuildError> {
    let messenger = message.messenger.as_ref().ok_or(BuildError::MissingPart("messenger"))?;
    let token = access_token.ok_or_else(|| BuildError::NoAccessToken(message.channel_id.clone()))?;
    let tagged = messenger.messaging_type == MessengerMessagingType::HumanAgentTag as i32;
    let mut content = match message_parts(message).get(part) {
        Some(Part::Text(text)) => json!({ "text": text }),
        Some(Part::Attachment(attachment)) => json!({
            "attachment": {
                "type": messenger_attachment_type(&attachment.content_type),
                "payload": { "url": attachment.url, "is_reusable": false },
            }
        }),
        None => json!({ "text": message.text }),
    };
    // Quick replies go with the first part, the one the customer reads first (C6 consent).
    if part == 0 && !messenger.quick_replies.is_empty() {
        content["quick_replies"] = messenger
            .quick_replies
            .iter()
            .map(|reply| json!({ "content_type": "text", "title": reply.title, "payload": reply.payload }))
            .collect();
    }
    let mut body = json!({
        "recipient": { "id": message.recipient },
        "messaging_type": if tagged { "MESSAGE_TAG" } else { "RESPONSE" },
        "message": content,
    });
    if tagged {
        body["tag"] = json!("HUMAN_AGENT");
    }
    Ok(HttpRequest {
        provider: Provider::Messenger,
        url: graph_url(base_url, &messenger.page_id),
        headers: vec![
            ("Authorization".into(), format!("Bearer {}", token.expose_str())),
            ("Content-Type".into(), "application/json".into()),
            (IDEMPOTENCY_KEY_HEADER.into(), part_key(&message.idempotency_key, part)),
        ],
        body: json_body(&body),
    })
}

/// One Meta message of a reply: its text, or one of its attachments.
#[derive(Debug, Clone, PartialEq)]
pub enum Part<'a> {
    Text(&'a str),
    Attachment(&'a OutboundAttachment),
}

/// The Meta messages a Messenger reply is sent as: the text (if any), then each attachment.
pub fn message_parts(message: &OutboundMessageQueued) -> Vec<Part<'_>> {
    let text = (!message.text.is_empty()).then_some(Part::Text(message.text.as_str()));
    text.into_iter().chain(message.attachments.iter().map(Part::Attachment)).collect()
}

/// The idempotency key of part `part`: the message's own for the first, suffixed after.
pub fn part_key(key: &str, part: usize) -> String {
    if part == 0 { key.to_owned() } else { format!("{key}/{part}") }
}

/// WhatsApp Cloud API: `POST {base}/{phone_number_id}/messages`, a text message, or the
/// template outside the 24-hour window (C8).
pub fn whatsapp_request(
    base_url: &str,
    message: &OutboundMessageQueued,
    access_token: Option<&Secret>,
) -> Result<HttpRequest, BuildError> {
    let whatsapp: &OutboundWhatsApp = message.whatsapp.as_ref().ok_or(BuildError::MissingPart("whatsapp"))?;
    let token = access_token.ok_or_else(|| BuildError::NoAccessToken(message.channel_id.clone()))?;
    let mut body = json!({
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": message.recipient,
    });
    match &whatsapp.template {
        Some(template) => {
            let parameters: Vec<Value> =
                template.parameters.iter().map(|text| json!({ "type": "text", "text": text })).collect();
            body["type"] = json!("template");
            body["template"] = json!({
                "name": template.name,
                "language": { "code": template.language },
                "components": if parameters.is_empty() { json!([]) } else { json!([{ "type": "body", "parameters": parameters }]) },
            });
        }
        None => {
            body["type"] = json!("text");
            body["text"] = json!({ "preview_url": false, "body": message.text });
        }
    }
    Ok(HttpRequest {
        provider: Provider::WhatsApp,
        url: graph_url(base_url, &whatsapp.phone_number_id),
        headers: vec![
            ("Authorization".into(), format!("Bearer {}", token.expose_str())),
            ("Content-Type".into(), "application/json".into()),
            (IDEMPOTENCY_KEY_HEADER.into(), message.idempotency_key.clone()),
        ],
        body: json_body(&body),
    })
}

/// Customers' apps (C10): `POST <delivery URL>` with the reply as JSON, signed with the inbound
/// scheme (`X-Switchboard-Timestamp`, `X-Switchboard-Signature`) at `now`.
pub fn custom_request(
    message: &OutboundMessageQueued,
    signing_key: Option<&Secret>,
    queued_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<HttpRequest, BuildError> {
    if message.custom_delivery_url.is_empty() {
        return Err(BuildError::NoDeliveryUrl(message.channel_id.clone()));
    }
    let key = signing_key.ok_or_else(|| BuildError::NoSigningKey(message.channel_id.clone()))?;
    let author = message.author.clone().unwrap_or_default();
    let author_kind = match AuthorKind::try_from(author.kind).unwrap_or_default() {
        AuthorKind::Agent => "agent",
        AuthorKind::Automation => "automation",
        AuthorKind::Customer => "customer",
        AuthorKind::Unspecified => "unspecified",
    };
    let attachments: Vec<Value> = message
        .attachments
        .iter()
        .map(|attachment| {
            json!({
                "url": attachment.url,
                "file_name": attachment.file_name,
                "content_type": attachment.content_type,
                "size_bytes": attachment.size_bytes,
            })
        })
        .collect();
    let body = json_body(&json!({
        "reply_id": message.reply_id,
        "thread_id": message.thread_key,
        "recipient": message.recipient,
        "text": message.text,
        "attachments": attachments,
        "author": { "kind": author_kind, "agent_id": author.agent_id, "name": author.name },
        "sent_at": queued_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    }));
    let timestamp = now.timestamp();
    Ok(HttpRequest {
        provider: Provider::Custom,
        url: message.custom_delivery_url.clone(),
        headers: vec![
            ("Content-Type".into(), "application/json".into()),
            (IDEMPOTENCY_KEY_HEADER.into(), message.idempotency_key.clone()),
            (CUSTOM_TIMESTAMP_HEADER.into(), timestamp.to_string()),
            (CUSTOM_SIGNATURE_HEADER.into(), sign_custom(key, timestamp, &body)),
        ],
        body,
    })
}

/// Meta's error object (`{"error": {"message", "type", "code", "error_subcode"}}`) as one line,
/// or the body's start when it is not one.
fn provider_error(status: u16, body: &[u8]) -> String {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    if let Some(error) = parsed.as_ref().and_then(|value| value.get("error")).filter(|error| error.is_object()) {
        let message = error.get("message").and_then(Value::as_str).unwrap_or("(no message)");
        let code = error.get("code").map(Value::to_string).unwrap_or_else(|| "?".into());
        let subcode = error.get("error_subcode").map(|subcode| format!(", subcode {subcode}")).unwrap_or_default();
        return format!("HTTP {status}: (#{code}{subcode}) {message}");
    }
    let text = String::from_utf8_lossy(body);
    let text: String = text.chars().take(300).collect();
    if text.trim().is_empty() { format!("HTTP {status}") } else { format!("HTTP {status}: {}", text.trim()) }
}

/// The provider's message id in a 2xx answer.
fn provider_message_id(provider: Provider, body: &[u8], fallback: &str) -> Option<String> {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let id = match provider {
        Provider::Messenger => value.get("message_id"),
        Provider::WhatsApp => value.get("messages").and_then(|messages| messages.get(0)).and_then(|m| m.get("id")),
        Provider::Custom => value.get("id").or_else(|| value.get("message_id")),
    };
    match (id.and_then(Value::as_str), provider) {
        (Some(id), _) => Some(id.to_owned()),
        (None, Provider::Custom) => Some(fallback.to_owned()),
        (None, _) => None,
    }
}

/// What an HTTP answer means (O5): 2xx sent; 429 and 5xx worth another attempt (with the
/// provider's `Retry-After`); any other status permanent, the provider's error kept.
pub fn classify(
    provider: Provider,
    status: u16,
    retry_after_header: Option<&str>,
    body: &[u8],
    idempotency_key: &str,
    now: DateTime<Utc>,
) -> SendOutcome {
    let status_code = u32::from(status);
    match status {
        200..=299 => match provider_message_id(provider, body, idempotency_key) {
            Some(provider_message_id) => SendOutcome::Sent { provider_message_id, status_code },
            // Accepted, but not with the documented answer: the provider has the message, so
            // sending again would duplicate it; record it sent without an id.
            None => SendOutcome::Sent { provider_message_id: String::new(), status_code },
        },
        429 | 500..=599 => SendOutcome::Retryable {
            error: provider_error(status, body),
            status_code,
            retry_after: retry_after_header.and_then(|value| parse_retry_after(value, now)),
        },
        _ => SendOutcome::Permanent { error: provider_error(status, body), status_code },
    }
}

/// The reqwest shell: sends a built request, classifies the answer; no answer at all (timeout,
/// refused or dropped connection) is worth another attempt.
#[derive(Clone)]
pub struct HttpSender {
    client: reqwest::Client,
}

impl HttpSender {
    pub fn new(timeout: Duration) -> anyhow::Result<HttpSender> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .tcp_nodelay(true)
            .pool_max_idle_per_host(256)
            .build()?;
        Ok(HttpSender { client })
    }

    #[tracing::instrument(name = "http_send", skip_all, fields(url = %request.url, status))]
    pub async fn send(&self, request: &HttpRequest, idempotency_key: &str) -> SendOutcome {
        let mut builder = self.client.post(&request.url).body(request.body.clone());
        for (name, value) in &request.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let response = match builder.send().await {
            Ok(response) => response,
            Err(error) => {
                return SendOutcome::Retryable {
                    error: format!("no answer: {}", error_chain(&error)),
                    status_code: 0,
                    retry_after: None,
                };
            }
        };
        let status = response.status().as_u16();
        tracing::Span::current().record("status", status);
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        match response.bytes().await {
            Ok(body) => classify(request.provider, status, retry_after.as_deref(), &body, idempotency_key, Utc::now()),
            // The status arrived but the body did not: for a 2xx the provider has the message.
            Err(_) if (200..300).contains(&status) => {
                classify(request.provider, status, None, b"", idempotency_key, Utc::now())
            }
            Err(error) => SendOutcome::Retryable {
                error: format!("HTTP {status}, body lost: {}", error_chain(&error)),
                status_code: u32::from(status),
                retry_after: None,
            },
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_proto::events::v1::{
        Author, ChannelType, MessengerQuickReply, OutboundMessenger, OutboundWhatsApp, WhatsAppTemplateMessage,
    };
    use switchboard_runtime::signature::verify_custom;

    fn reply(channel_type: ChannelType) -> OutboundMessageQueued {
        OutboundMessageQueued {
            reply_id: "0190c0de-0000-7000-8000-000000000001".into(),
            conversation_id: "c-1".into(),
            channel_id: "ch".into(),
            channel_type: channel_type as i32,
            text: "Hello there".into(),
            recipient: "psid-1".into(),
            idempotency_key: "0190c0de-0000-7000-8000-000000000001".into(),
            author: Some(Author {
                kind: AuthorKind::Agent as i32,
                agent_id: "a-1".into(),
                name: "Ann".into(),
                automation: 0,
            }),
            ..Default::default()
        }
    }

    fn body_of(request: &HttpRequest) -> Value {
        serde_json::from_slice(&request.body).unwrap()
    }

    fn header<'a>(request: &'a HttpRequest, name: &str) -> Option<&'a str> {
        request.headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
    }

    #[test]
    fn c6_messenger_reply_inside_the_window_is_a_response() {
        let mut message = reply(ChannelType::FacebookMessenger);
        message.messenger = Some(OutboundMessenger {
            page_id: "page-9".into(),
            messaging_type: MessengerMessagingType::Response as i32,
            ..Default::default()
        });
        let request =
            messenger_request("https://graph.example/v21.0/", &message, Some(&Secret::new("PAGE")), 0).unwrap();
        assert_eq!(request.url, "https://graph.example/v21.0/page-9/messages");
        assert_eq!(header(&request, "authorization"), Some("Bearer PAGE"));
        assert_eq!(header(&request, IDEMPOTENCY_KEY_HEADER), Some(message.idempotency_key.as_str()));
        assert_eq!(
            body_of(&request),
            json!({"recipient": {"id": "psid-1"}, "messaging_type": "RESPONSE", "message": {"text": "Hello there"}})
        );
    }

    #[test]
    fn c6_messenger_reply_after_24_hours_carries_the_human_agent_tag() {
        let mut message = reply(ChannelType::FacebookMessenger);
        message.messenger = Some(OutboundMessenger {
            page_id: "page-9".into(),
            messaging_type: MessengerMessagingType::HumanAgentTag as i32,
            ..Default::default()
        });
        message.attachments.push(OutboundAttachment {
            url: "https://files.example/a.png".into(),
            content_type: "image/png".into(),
            ..Default::default()
        });
        assert_eq!(message_parts(&message).len(), 2);
        let text = messenger_request("https://g", &message, Some(&Secret::new("T")), 0).unwrap();
        assert_eq!(body_of(&text)["messaging_type"], "MESSAGE_TAG");
        assert_eq!(body_of(&text)["tag"], "HUMAN_AGENT");
        let image = messenger_request("https://g", &message, Some(&Secret::new("T")), 1).unwrap();
        assert_eq!(
            body_of(&image)["message"],
            json!({"attachment": {"type": "image", "payload": {"url": "https://files.example/a.png", "is_reusable": false}}})
        );
        assert_eq!(header(&image, IDEMPOTENCY_KEY_HEADER), Some(format!("{}/1", message.idempotency_key).as_str()));
        assert_eq!(messenger_request("https://g", &message, None, 0), Err(BuildError::NoAccessToken("ch".into())));
    }

    #[test]
    fn c6_consent_prompt_offers_its_quick_replies_with_the_text() {
        let mut message = reply(ChannelType::FacebookMessenger);
        message.messenger = Some(OutboundMessenger {
            page_id: "page-1".into(),
            messaging_type: MessengerMessagingType::Response as i32,
            quick_replies: vec![
                MessengerQuickReply { title: "Yes".into(), payload: "SWITCHBOARD_CONSENT_GRANTED".into() },
                MessengerQuickReply { title: "No".into(), payload: "SWITCHBOARD_CONSENT_DECLINED".into() },
            ],
        });
        let request =
            messenger_request("https://graph.example/v21.0", &message, Some(&Secret::new("PAGE")), 0).unwrap();
        assert_eq!(
            body_of(&request)["message"]["quick_replies"],
            json!([
                {"content_type": "text", "title": "Yes", "payload": "SWITCHBOARD_CONSENT_GRANTED"},
                {"content_type": "text", "title": "No", "payload": "SWITCHBOARD_CONSENT_DECLINED"},
            ])
        );
    }

    #[test]
    fn c8_whatsapp_text_and_template_requests() {
        let mut message = reply(ChannelType::Whatsapp);
        message.recipient = "4915112345678".into();
        message.whatsapp = Some(OutboundWhatsApp { phone_number_id: "pn-1".into(), template: None });
        let text = whatsapp_request("https://g/v21.0", &message, Some(&Secret::new("WA"))).unwrap();
        assert_eq!(text.url, "https://g/v21.0/pn-1/messages");
        assert_eq!(
            body_of(&text),
            json!({"messaging_product": "whatsapp", "recipient_type": "individual", "to": "4915112345678",
                   "type": "text", "text": {"preview_url": false, "body": "Hello there"}})
        );
        message.whatsapp = Some(OutboundWhatsApp {
            phone_number_id: "pn-1".into(),
            template: Some(WhatsAppTemplateMessage {
                name: "order_update".into(),
                language: "en_US".into(),
                parameters: vec!["Ann".into(), "42".into()],
            }),
        });
        let template = whatsapp_request("https://g/v21.0", &message, Some(&Secret::new("WA"))).unwrap();
        assert_eq!(
            body_of(&template)["template"],
            json!({"name": "order_update", "language": {"code": "en_US"}, "components": [{"type": "body",
                   "parameters": [{"type": "text", "text": "Ann"}, {"type": "text", "text": "42"}]}]})
        );
        assert_eq!(body_of(&template)["type"], "template");
    }

    #[test]
    fn c10_custom_request_is_signed_with_the_inbound_scheme() {
        let mut message = reply(ChannelType::Custom);
        message.custom_delivery_url = "https://app.example/switchboard".into();
        message.thread_key = "thread-7".into();
        let now = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let key = Secret::new("app-key");
        let request = custom_request(&message, Some(&key), now, now).unwrap();
        assert_eq!(request.url, "https://app.example/switchboard");
        let body = body_of(&request);
        assert_eq!(body["thread_id"], "thread-7");
        assert_eq!(body["author"], json!({"kind": "agent", "agent_id": "a-1", "name": "Ann"}));
        assert_eq!(body["sent_at"], "2023-11-14T22:13:20.000Z");
        verify_custom(
            &key,
            header(&request, CUSTOM_TIMESTAMP_HEADER),
            header(&request, CUSTOM_SIGNATURE_HEADER),
            &request.body,
            now.timestamp(),
        )
        .unwrap();
        message.custom_delivery_url.clear();
        assert_eq!(custom_request(&message, Some(&key), now, now), Err(BuildError::NoDeliveryUrl("ch".into())));
    }

    #[test]
    fn o5_answers_are_classified_with_the_providers_error_kept() {
        let now = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        assert_eq!(
            classify(Provider::Messenger, 200, None, br#"{"recipient_id":"1","message_id":"m_1"}"#, "k", now),
            SendOutcome::Sent { provider_message_id: "m_1".into(), status_code: 200 }
        );
        assert_eq!(
            classify(Provider::WhatsApp, 200, None, br#"{"messages":[{"id":"wamid.X"}]}"#, "k", now),
            SendOutcome::Sent { provider_message_id: "wamid.X".into(), status_code: 200 }
        );
        assert_eq!(
            classify(Provider::Custom, 202, None, b"", "k", now),
            SendOutcome::Sent { provider_message_id: "k".into(), status_code: 202 }
        );
        assert_eq!(
            classify(Provider::Messenger, 429, Some("3"), br#"{"error":{"message":"Too many","code":613}}"#, "k", now),
            SendOutcome::Retryable {
                error: "HTTP 429: (#613) Too many".into(),
                status_code: 429,
                retry_after: Some(Duration::from_secs(3))
            }
        );
        assert!(matches!(classify(Provider::Custom, 503, None, b"busy", "k", now), SendOutcome::Retryable { .. }));
        assert_eq!(
            classify(
                Provider::Messenger,
                400,
                None,
                br#"{"error":{"message":"(#100) No matching user found","type":"OAuthException","code":100,"error_subcode":2018001}}"#,
                "k",
                now
            ),
            SendOutcome::Permanent {
                error: "HTTP 400: (#100, subcode 2018001) (#100) No matching user found".into(),
                status_code: 400
            }
        );
    }
}
