//! `SendReply` and `AddInternalNote` (O1-O4): the agent's side of outbound.
//!
//! Input enters as the request, the conversation as the read model has it ([`load_facts`]) and
//! the configuration the call was authorised against. The decisions are pure:
//! [`check_request`] (the request alone), [`route_reply`] (who may be written to on this
//! channel now: C6, C8, C9, C11, forms by email) and [`build_outbound`] (the complete
//! `OutboundMessageQueued`, email identity included, docs/outbound.md). The I/O around them is
//! the read-model queries, the attachment check ([`fetch_attachments`]: HEAD, else a ranged
//! GET) and the publish to `outbound.v1`. Nothing is published when any check refuses.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use prost::Message as _;
use switchboard_proto::api::v1::{AddInternalNoteRequest, ReplyResult, SendReplyRequest};
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    Author, AuthorKind, ChannelConfigured, ChannelType, InboxConfigured, InternalNoteAdded, MessengerMessagingType,
    OutboundAttachment, OutboundEmail, OutboundMessageQueued, OutboundMessenger, OutboundPurpose, OutboundWhatsApp,
    WhatsAppTemplateMessage,
};
use switchboard_runtime::attachment_hosts::{self, AttachmentHosts};
use switchboard_runtime::{envelope, outbound, reply_window};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::access::ConversationAction;
use crate::admin::{Admin, actor};
use crate::auth::Identity;
use crate::error::{ApiError, Violations};
use crate::position::Position;

/// O1: replies and notes are 1..20,000 characters.
pub const MAX_TEXT_CHARS: usize = 20_000;
/// Email HTML bodies: at most 1 MB.
pub const MAX_HTML_BYTES: usize = 1024 * 1024;
pub const MAX_ATTACHMENTS: usize = 10;
/// Attachments of one reply together: at most 25 MB (as the sizes their hosts report).
pub const MAX_ATTACHMENT_TOTAL_BYTES: u64 = 25 * 1024 * 1024;
/// RFC 5322's line limit, the longest subject a header can carry unfolded.
pub const MAX_SUBJECT_CHARS: usize = 998;
/// How long the API waits for an attachment's host (each request of the check).
pub const ATTACHMENT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Topic name of outbound records as positions show it (without the environment prefix).
const OUTBOUND_TOPIC: &str = "outbound.v1";

// ---------------------------------------------------------------------------------------------
// Input: the conversation as the read model has it.
// ---------------------------------------------------------------------------------------------

/// What the read model knows of the conversation a reply answers.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ConversationFacts {
    pub conversation_id: Uuid,
    pub inbox_id: String,
    pub channel_id: String,
    /// Short name (`team_email`, `facebook_messenger`, ...).
    pub channel_type: String,
    pub thread_key: String,
    pub status: String,
    pub assignee_id: Option<String>,
    /// The customer's channel-scoped id: email address, PSID, WhatsApp id, visitor id, app user id.
    pub contact_external_id: String,
    pub contact_name: String,
    /// The contact's email address ('' when unknown).
    pub contact_email: String,
    pub subject: String,
    /// C6/C8: end of the 24-hour standard window after the customer's latest message.
    pub reply_window_ends_at: Option<DateTime<Utc>>,
}

/// The customer's latest email in the conversation (R10 threading).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundEmail {
    pub message_id_header: String,
    pub references: Vec<String>,
}

/// The conversation (of the caller's account) with the columns a reply needs.
async fn load_facts(
    connection: &mut sqlx::PgConnection,
    account_id: &str,
    conversation_id: Uuid,
) -> Result<Option<ConversationFacts>, ApiError> {
    Ok(sqlx::query_as(
        "SELECT c.conversation_id, c.inbox_id, c.channel_id, c.channel_type, c.thread_key, c.status, c.assignee_id, \
                c.contact_external_id, c.contact_name, COALESCE(contact.email, '') AS contact_email, c.subject, \
                c.reply_window_ends_at \
         FROM conversations c \
         LEFT JOIN contacts contact ON contact.contact_id = c.contact_id AND contact.account_id = c.account_id \
         WHERE c.conversation_id = $1 AND c.account_id = $2",
    )
    .bind(conversation_id)
    .bind(account_id)
    .fetch_optional(connection)
    .await?)
}

/// The customer's latest email of the conversation: the newest message whose content carries
/// the email details the projector stores for inbound mail (`content.email`, with the team
/// address it was delivered to; outbound rows carry no team address).
async fn latest_inbound_email(
    connection: &mut sqlx::PgConnection,
    account_id: &str,
    conversation_id: Uuid,
) -> Result<Option<InboundEmail>, ApiError> {
    let row: Option<(String, Option<serde_json::Value>)> = sqlx::query_as(
        "SELECT content->'email'->>'message_id_header', content->'email'->'references' FROM messages \
         WHERE conversation_id = $1 AND account_id = $2 \
           AND COALESCE(content->'email'->>'team_address', '') <> '' \
           AND COALESCE(content->'email'->>'message_id_header', '') <> '' \
         ORDER BY sent_at DESC, recorded_at DESC LIMIT 1",
    )
    .bind(conversation_id)
    .bind(account_id)
    .fetch_optional(connection)
    .await?;
    Ok(row.map(|(message_id_header, references_opt)| InboundEmail {
        message_id_header,
        references: references_opt
            .and_then(|value| serde_json::from_value::<Vec<String>>(value).ok())
            .unwrap_or_default(),
    }))
}

// ---------------------------------------------------------------------------------------------
// Decisions (pure).
// ---------------------------------------------------------------------------------------------

fn check_text(violations: &mut Violations, field: &str, text: &str, required: bool) {
    let characters = text.chars().count();
    if text.trim().is_empty() {
        if required {
            violations.add(field, "must not be empty");
        }
    } else if characters > MAX_TEXT_CHARS {
        violations.add(field, format!("must be at most {MAX_TEXT_CHARS} characters (has {characters})"));
    }
}

/// A reply's request on its own: every problem at once, as field violations.
pub fn check_request(request: &SendReplyRequest) -> Result<(), ApiError> {
    let mut violations = Violations::default();
    if request.conversation_id.is_empty() {
        violations.add("conversation_id", "is required");
    }
    // Only a WhatsApp template may go without text (C8).
    check_text(&mut violations, "text", &request.text, request.whatsapp_template.is_none());
    if request.html.len() > MAX_HTML_BYTES {
        violations.add("html", format!("must be at most {MAX_HTML_BYTES} bytes (has {})", request.html.len()));
    }
    let subject_characters = request.subject.chars().count();
    if subject_characters > MAX_SUBJECT_CHARS {
        violations.add("subject", format!("must be at most {MAX_SUBJECT_CHARS} characters (has {subject_characters})"));
    }
    if request.subject.contains(['\r', '\n']) {
        violations.add("subject", "must be one line");
    }
    if request.attachments.len() > MAX_ATTACHMENTS {
        violations
            .add("attachments", format!("at most {MAX_ATTACHMENTS} attachments (has {})", request.attachments.len()));
    }
    for (index, attachment) in request.attachments.iter().enumerate() {
        match reqwest::Url::parse(&attachment.url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            _ => violations.add(format!("attachments[{index}].url"), "must be an http or https URL"),
        }
    }
    let declared_total: u64 = request.attachments.iter().map(|attachment| attachment.size_bytes).sum();
    if declared_total > MAX_ATTACHMENT_TOTAL_BYTES {
        violations.add("attachments", format!("must total at most {MAX_ATTACHMENT_TOTAL_BYTES} bytes"));
    }
    if let Some(template) = &request.whatsapp_template {
        if template.name.trim().is_empty() {
            violations.add("whatsapp_template.name", "is required");
        }
        if template.language.trim().is_empty() {
            violations.add("whatsapp_template.language", "is required");
        }
    }
    violations.into_result()
}

/// A note's request on its own.
pub fn check_note_request(request: &AddInternalNoteRequest) -> Result<(), ApiError> {
    let mut violations = Violations::default();
    if request.conversation_id.is_empty() {
        violations.add("conversation_id", "is required");
    }
    check_text(&mut violations, "text", &request.text, true);
    violations.into_result()
}

/// How a reply leaves, once the channel's rules allow it.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// Team email, or a form answered by email to the submitter (C7). `team_channel_opt` is the
    /// team-email channel whose identity applies (none: the fallback address, C12).
    Email {
        to: String,
        team_channel_opt: Option<Box<ChannelConfigured>>,
    },
    Messenger {
        page_id: String,
        messaging_type: MessengerMessagingType,
    },
    WhatsApp {
        phone_number_id: String,
        template_opt: Option<WhatsAppTemplateMessage>,
    },
    Chat,
    Custom,
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn window_closed(
    conversation: &ConversationFacts,
    reason: &'static str,
    ends_at_opt: Option<DateTime<Utc>>,
    description: String,
) -> ApiError {
    ApiError::Precondition {
        reason,
        subject: format!("conversation/{}", conversation.conversation_id),
        description,
        metadata: ends_at_opt.map(|ends_at| vec![("window_ends_at".to_owned(), rfc3339(ends_at))]).unwrap_or_default(),
    }
}

fn channel_refused(conversation: &ConversationFacts, reason: &'static str, description: String) -> ApiError {
    ApiError::Precondition {
        reason,
        subject: format!("channel/{}", conversation.channel_id),
        description,
        metadata: vec![
            ("channel_id".to_owned(), conversation.channel_id.clone()),
            ("channel_type".to_owned(), conversation.channel_type.clone()),
        ],
    }
}

/// The channel's rules for an agent's reply at `now` (O2, O3): the conversation's channel must
/// be configured and on (C11); calls have no reply path (C9); HTML and subjects are for email;
/// Messenger within 24 h is a standard reply, then until 7 days a human-agent-tagged one, then
/// nothing (C6); WhatsApp free-form only within 24 h, a channel template anywhere (C8); email
/// needs the contact's address. `team_channels` are the account's channels (forms reply from
/// the inbox's connected team address).
pub fn route_reply<'a>(
    conversation: &ConversationFacts,
    channel_opt: Option<&ChannelConfigured>,
    team_channels: impl IntoIterator<Item = &'a ChannelConfigured>,
    request: &SendReplyRequest,
    now: DateTime<Utc>,
) -> Result<Route, ApiError> {
    let Some(channel) = channel_opt else {
        return Err(channel_refused(
            conversation,
            "CHANNEL_NOT_CONFIGURED",
            format!(
                "channel `{}` of this conversation is no longer configured; nothing can be sent",
                conversation.channel_id
            ),
        ));
    };
    if !channel.enabled {
        return Err(channel_refused(
            conversation,
            "CHANNEL_OFF",
            format!("channel `{}` is switched off; nothing can be sent from it (C11)", channel.channel_id),
        ));
    }
    let channel_type = ChannelType::try_from(channel.channel_type).unwrap_or(ChannelType::Unspecified);
    let is_email = matches!(channel_type, ChannelType::TeamEmail | ChannelType::Forms);
    let mut violations = Violations::default();
    if !is_email && !request.html.is_empty() {
        violations.add("html", "only email conversations (team email, forms) take an HTML body");
    }
    if !is_email && !request.subject.is_empty() {
        violations.add("subject", "only email conversations (team email, forms) take a subject");
    }
    if channel_type != ChannelType::Whatsapp && request.whatsapp_template.is_some() {
        violations.add("whatsapp_template", "only WhatsApp conversations take a template (C8)");
    }
    if channel_type == ChannelType::Calling {
        return Err(channel_refused(
            conversation,
            "NO_REPLY_PATH",
            "calls have no reply path (C9); answer the contact on another channel".to_owned(),
        ));
    }
    violations.into_result()?;
    match channel_type {
        ChannelType::TeamEmail | ChannelType::Forms => {
            // Team email answers the address that wrote in (the conversation's sender); a form
            // answers the contact's address, its sender id being the submission's.
            let candidates = if channel_type == ChannelType::TeamEmail {
                [conversation.contact_external_id.trim(), conversation.contact_email.trim()]
            } else {
                [conversation.contact_email.trim(), conversation.contact_external_id.trim()]
            };
            let to =
                candidates.into_iter().find(|address| address.contains('@')).map(str::to_owned).ok_or_else(|| {
                    ApiError::Precondition {
                        reason: "CONTACT_HAS_NO_EMAIL",
                        subject: format!("conversation/{}", conversation.conversation_id),
                        description: "the contact has no email address to reply to".to_owned(),
                        metadata: Vec::new(),
                    }
                })?;
            let team_channel_opt = if channel_type == ChannelType::TeamEmail {
                Some(Box::new(channel.clone()))
            } else {
                outbound::inbox_team_email_channel(&conversation.inbox_id, team_channels).cloned().map(Box::new)
            };
            Ok(Route::Email { to, team_channel_opt })
        }
        ChannelType::FacebookMessenger => {
            let Some(standard_ends_at) = conversation.reply_window_ends_at else {
                return Err(window_closed(
                    conversation,
                    "REPLY_WINDOW_CLOSED",
                    None,
                    "the customer has sent no message to reply to (C6)".to_owned(),
                ));
            };
            let human_agent_ends_at = reply_window::human_agent_window_ends_at(channel_type, standard_ends_at)
                .expect("Messenger has a human-agent window");
            let messaging_type = if now < standard_ends_at {
                MessengerMessagingType::Response
            } else if now < human_agent_ends_at {
                MessengerMessagingType::HumanAgentTag
            } else {
                return Err(window_closed(
                    conversation,
                    "REPLY_WINDOW_CLOSED",
                    Some(human_agent_ends_at),
                    format!(
                        "Messenger accepts replies until 7 days after the customer's last message; that window ended at {} (C6)",
                        rfc3339(human_agent_ends_at)
                    ),
                ));
            };
            let page_id = channel.messenger.as_ref().map(|messenger| messenger.page_id.clone()).unwrap_or_default();
            Ok(Route::Messenger { page_id, messaging_type })
        }
        ChannelType::Whatsapp => {
            let settings = channel.whatsapp.clone().unwrap_or_default();
            let template_opt = match &request.whatsapp_template {
                None => {
                    let inside = conversation.reply_window_ends_at.is_some_and(|ends_at| now < ends_at);
                    if !inside {
                        return Err(window_closed(
                            conversation,
                            "CUSTOMER_SERVICE_WINDOW_CLOSED",
                            conversation.reply_window_ends_at,
                            match conversation.reply_window_ends_at {
                                Some(ends_at) => format!(
                                    "WhatsApp accepts free-form replies only until 24 hours after the customer's last message, which ended at {}; send an approved template (whatsapp_template) (C8)",
                                    rfc3339(ends_at)
                                ),
                                None => {
                                    "the customer has sent no message, so only an approved template can be sent (C8)"
                                        .to_owned()
                                }
                            },
                        ));
                    }
                    None
                }
                Some(requested) => {
                    let name = requested.name.trim();
                    let language = requested.language.trim();
                    let Some(approved) = settings
                        .templates
                        .iter()
                        .find(|template| template.name == name && template.language == language)
                    else {
                        return Err(ApiError::not_found("whatsapp template", format!("{name} ({language})")));
                    };
                    if requested.parameters.len() != approved.parameter_count as usize {
                        return Err(ApiError::invalid(
                            "whatsapp_template.parameters",
                            format!(
                                "template `{name}` ({language}) takes {} parameter(s), {} given",
                                approved.parameter_count,
                                requested.parameters.len()
                            ),
                        ));
                    }
                    Some(WhatsAppTemplateMessage {
                        name: name.to_owned(),
                        language: language.to_owned(),
                        parameters: requested.parameters.clone(),
                    })
                }
            };
            Ok(Route::WhatsApp { phone_number_id: settings.phone_number_id, template_opt })
        }
        ChannelType::Chat => Ok(Route::Chat),
        ChannelType::Custom => Ok(Route::Custom),
        ChannelType::Calling | ChannelType::Unspecified => Err(channel_refused(
            conversation,
            "NO_REPLY_PATH",
            format!("channel type `{}` has no reply path", conversation.channel_type),
        )),
    }
}

/// Everything else [`build_outbound`] needs besides the route.
#[derive(Debug, Clone)]
pub struct ReplyParts<'a> {
    pub account_id: &'a str,
    pub reply_id: Uuid,
    pub conversation: &'a ConversationFacts,
    pub channel: &'a ChannelConfigured,
    pub inbox: &'a InboxConfigured,
    pub author: Author,
    pub latest_inbound_email_opt: Option<&'a InboundEmail>,
    pub attachments: Vec<OutboundAttachment>,
}

/// The complete `OutboundMessageQueued` of an agent's reply (docs/outbound.md: the delivery
/// service reads nothing else). Email replies get their identity, bodies with the signature,
/// subject, Message-ID and threading here (C2, C12, R10).
pub fn build_outbound(parts: ReplyParts<'_>, route: Route, request: &SendReplyRequest) -> OutboundMessageQueued {
    let conversation = parts.conversation;
    let mut message = OutboundMessageQueued {
        reply_id: parts.reply_id.to_string(),
        conversation_id: conversation.conversation_id.to_string(),
        inbox_id: conversation.inbox_id.clone(),
        channel_id: conversation.channel_id.clone(),
        channel_type: parts.channel.channel_type,
        purpose: OutboundPurpose::ConversationReply as i32,
        text: request.text.clone(),
        attachments: parts.attachments,
        recipient: conversation.contact_external_id.clone(),
        recipient_name: conversation.contact_name.clone(),
        idempotency_key: parts.reply_id.to_string(),
        thread_key: conversation.thread_key.clone(),
        request_id: request.request_id.clone(),
        ..Default::default()
    };
    let agent_name = parts.author.name.clone();
    message.author = Some(parts.author);
    match route {
        Route::Email { to, team_channel_opt } => {
            let identity =
                outbound::email_identity(parts.account_id, parts.inbox, team_channel_opt.as_deref(), &agent_name);
            let settings = team_channel_opt.as_ref().and_then(|channel| channel.email.clone()).unwrap_or_default();
            let html_opt = (!request.html.is_empty()).then_some(request.html.as_str());
            let bodies = outbound::email_bodies(
                &request.text,
                html_opt,
                &settings.signature,
                settings.signature_is_html,
                &agent_name,
            );
            let (in_reply_to, references) = outbound::threading_headers(
                parts
                    .latest_inbound_email_opt
                    .map(|email| (email.message_id_header.as_str(), email.references.as_slice())),
            );
            let message_id_header = outbound::email_message_id(parts.reply_id, &identity.from_address);
            message.recipient = to.clone();
            message.idempotency_key = message_id_header.clone();
            message.email = Some(OutboundEmail {
                from_name: identity.from_name,
                from_address: identity.from_address,
                to: vec![to],
                subject: outbound::reply_subject(&request.subject, &conversation.subject),
                message_id_header,
                in_reply_to,
                references,
                from_fallback_address: identity.from_fallback_address,
                text_body: bodies.text_body,
                html_body: bodies.html_body,
            });
        }
        Route::Messenger { page_id, messaging_type } => {
            message.messenger =
                Some(OutboundMessenger { page_id, messaging_type: messaging_type as i32, quick_replies: Vec::new() });
        }
        Route::WhatsApp { phone_number_id, template_opt } => {
            if message.text.is_empty()
                && let Some(template) = &template_opt
            {
                // What the inbox shows for a template sent without text.
                message.text = format!("[WhatsApp template {} ({})]", template.name, template.language);
            }
            message.channel_messages_per_second =
                parts.channel.whatsapp.as_ref().map_or(0, |settings| settings.messages_per_second);
            message.whatsapp = Some(OutboundWhatsApp { phone_number_id, template: template_opt });
        }
        Route::Custom => {
            // C10: the app's URL and rate as configured now; the delivery service reads no
            // configuration, so a later change applies to later replies only.
            let settings = parts.channel.custom.clone().unwrap_or_default();
            message.custom_delivery_url = settings.delivery_url;
            message.channel_messages_per_second = settings.messages_per_second;
        }
        Route::Chat => {}
    }
    message
}

/// The author of an agent's reply or note: the agent's configured name, else the caller's id
/// (API keys need not name an agent).
fn agent_author(snapshot: &switchboard_runtime::config_store::ConfigSnapshot, identity: &Identity) -> Author {
    let name = snapshot
        .agents
        .get(&identity.account_id, &identity.user_id)
        .map(|agent| agent.entity.name.clone())
        .filter(|name| !name.trim().is_empty())
        .unwrap_or_else(|| identity.user_id.clone());
    Author { kind: AuthorKind::Agent as i32, agent_id: identity.user_id.clone(), name, automation: 0 }
}

// ---------------------------------------------------------------------------------------------
// Attachments (I/O): each reference must be reachable before the reply is accepted.
// ---------------------------------------------------------------------------------------------

/// Why an attachment could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfetchable {
    pub index: usize,
    pub url: String,
    pub why: String,
}

impl From<Unfetchable> for ApiError {
    fn from(unfetchable: Unfetchable) -> Self {
        ApiError::Precondition {
            reason: "ATTACHMENT_UNREACHABLE",
            subject: format!("attachments[{}]", unfetchable.index),
            description: format!(
                "attachment {} ({}) cannot be fetched: {}",
                unfetchable.index, unfetchable.url, unfetchable.why
            ),
            metadata: vec![
                ("index".to_owned(), unfetchable.index.to_string()),
                ("url".to_owned(), unfetchable.url),
                ("why".to_owned(), unfetchable.why),
            ],
        }
    }
}

fn header_text(response: &reqwest::Response, name: reqwest::header::HeaderName) -> Option<String> {
    response.headers().get(name).and_then(|value| value.to_str().ok()).map(str::to_owned)
}

/// The total size named by `Content-Range: bytes 0-0/<total>`.
fn content_range_total(value: &str) -> Option<u64> {
    value.rsplit_once('/').and_then(|(_, total)| total.trim().parse().ok())
}

/// Checks one attachment: `HEAD`, else (any failure or non-2xx) `GET` of its first byte. The
/// reply records the host's size (`Content-Length`, or the ranged answer's total) and fills
/// in the content type and file name where the request left them empty.
#[tracing::instrument(name = "fetch_attachment", skip_all, fields(index, url = %attachment.url))]
async fn fetch_attachment(
    client: &reqwest::Client,
    hosts: AttachmentHosts,
    index: usize,
    attachment: &OutboundAttachment,
) -> Result<OutboundAttachment, Unfetchable> {
    let unfetchable = |why: String| Unfetchable { index, url: attachment.url.clone(), why };
    if let Some(refusal) =
        reqwest::Url::parse(&attachment.url).ok().and_then(|url| attachment_hosts::refusal_of_url(&url, hosts))
    {
        return Err(unfetchable(refusal));
    }
    let mut checked = attachment.clone();
    let head = client.head(&attachment.url).timeout(ATTACHMENT_FETCH_TIMEOUT).send().await;
    let (response, size_opt) = match head {
        Ok(response) if response.status().is_success() => {
            let size_opt = header_text(&response, reqwest::header::CONTENT_LENGTH).and_then(|text| text.parse().ok());
            (response, size_opt)
        }
        head_outcome => {
            let ranged = client
                .get(&attachment.url)
                .header(reqwest::header::RANGE, "bytes=0-0")
                .timeout(ATTACHMENT_FETCH_TIMEOUT)
                .send()
                .await;
            match ranged {
                Ok(response) if response.status().is_success() => {
                    let size_opt = header_text(&response, reqwest::header::CONTENT_RANGE)
                        .and_then(|range| content_range_total(&range))
                        .or_else(|| {
                            (response.status() == reqwest::StatusCode::OK)
                                .then(|| header_text(&response, reqwest::header::CONTENT_LENGTH))
                                .flatten()
                                .and_then(|text| text.parse().ok())
                        });
                    (response, size_opt)
                }
                Ok(response) => return Err(unfetchable(format!("the host answered HTTP {}", response.status()))),
                Err(error) => {
                    let cause = if error.is_timeout() {
                        format!("no answer within {} s", ATTACHMENT_FETCH_TIMEOUT.as_secs())
                    } else if let Some(refusal) = attachment_hosts::refusal_in(&error) {
                        refusal
                    } else if error.is_connect() {
                        "the host is unreachable".to_owned()
                    } else {
                        format!("the request failed ({error})")
                    };
                    tracing::debug!(head = ?head_outcome.map(|response| response.status()), %cause, "attachment unfetchable");
                    return Err(unfetchable(cause));
                }
            }
        }
    };
    checked.size_bytes = size_opt.unwrap_or(attachment.size_bytes);
    if checked.content_type.is_empty()
        && let Some(content_type) = header_text(&response, reqwest::header::CONTENT_TYPE)
    {
        checked.content_type = content_type;
    }
    if checked.file_name.is_empty()
        && let Ok(url) = reqwest::Url::parse(&attachment.url)
    {
        checked.file_name =
            url.path_segments().and_then(|mut segments| segments.next_back()).unwrap_or_default().to_owned();
    }
    Ok(checked)
}

/// Checks every attachment (concurrently) and their total size.
pub async fn fetch_attachments(
    client: &reqwest::Client,
    hosts: AttachmentHosts,
    attachments: &[OutboundAttachment],
) -> Result<Vec<OutboundAttachment>, ApiError> {
    let checks =
        attachments.iter().enumerate().map(|(index, attachment)| fetch_attachment(client, hosts, index, attachment));
    let checked = futures::future::join_all(checks).await.into_iter().collect::<Result<Vec<_>, _>>()?;
    let total: u64 = checked.iter().map(|attachment| attachment.size_bytes).sum();
    if total > MAX_ATTACHMENT_TOTAL_BYTES {
        return Err(ApiError::invalid(
            "attachments",
            format!("total {total} bytes, more than the {MAX_ATTACHMENT_TOTAL_BYTES} bytes a reply may carry"),
        ));
    }
    Ok(checked)
}

// ---------------------------------------------------------------------------------------------
// The commands.
// ---------------------------------------------------------------------------------------------

impl Admin {
    /// `SendReply`: the idempotent frame, then [`Admin::accept_reply`]. A retry with the same
    /// request id names the same reply and answers with the first position.
    pub(crate) async fn reply_command(
        &self,
        request: Request<SendReplyRequest>,
    ) -> Result<Response<ReplyResult>, Status> {
        let identity = Identity::of(&request)?;
        let body = request.into_inner();
        let reply_id = outbound::reply_id_for(&identity.account_id, &body.request_id);
        let (position, replayed) = self
            .run_claimed(&identity, "SendReply", &body.request_id, body.encode_to_vec(), async {
                Ok(vec![self.accept_reply(&identity, &body, reply_id).await?])
            })
            .await?;
        Ok(Response::new(ReplyResult { reply_id: reply_id.to_string(), position, replayed }))
    }

    /// `AddInternalNote`: as a reply, but never sent (O1).
    pub(crate) async fn note_command(
        &self,
        request: Request<AddInternalNoteRequest>,
    ) -> Result<Response<ReplyResult>, Status> {
        let identity = Identity::of(&request)?;
        let body = request.into_inner();
        let note_id = outbound::reply_id_for(&identity.account_id, &body.request_id);
        let (position, replayed) = self
            .run_claimed(&identity, "AddInternalNote", &body.request_id, body.encode_to_vec(), async {
                Ok(vec![self.accept_note(&identity, &body, note_id).await?])
            })
            .await?;
        Ok(Response::new(ReplyResult { reply_id: note_id.to_string(), position, replayed }))
    }

    #[tracing::instrument(name = "accept_reply", skip_all, fields(conversation_id = %request.conversation_id, %reply_id))]
    async fn accept_reply(
        &self,
        identity: &Identity,
        request: &SendReplyRequest,
        reply_id: Uuid,
    ) -> Result<Position, ApiError> {
        check_request(request)?;
        let authorised =
            self.authorised_conversation(identity, &request.conversation_id, ConversationAction::Reply).await?;
        if !authorised.is_open {
            return Err(ApiError::FailedPrecondition("the conversation is closed; reopen it to reply".into()));
        }
        let conversation_id = authorised.conversation_id;
        let not_found = || ApiError::not_found("conversation", conversation_id.to_string());
        let (facts, latest_inbound_email_opt) = {
            let mut connection = self.read_models().connection().await?;
            let facts =
                load_facts(&mut connection, &identity.account_id, conversation_id).await?.ok_or_else(not_found)?;
            let latest = latest_inbound_email(&mut connection, &identity.account_id, conversation_id).await?;
            (facts, latest)
        };
        let snapshot = &authorised.snapshot;
        let inbox = snapshot.inboxes.get(&identity.account_id, &facts.inbox_id).ok_or_else(not_found)?.entity.clone();
        let channel_opt =
            snapshot.channels.get(&identity.account_id, &facts.channel_id).map(|owned| owned.entity.clone());
        let team_channels = snapshot.channels.in_account(&identity.account_id).map(|owned| &owned.entity);
        let route = route_reply(&facts, channel_opt.as_ref(), team_channels, request, Utc::now())?;
        let channel = channel_opt.expect("route_reply refuses unconfigured channels");
        let attachments = fetch_attachments(self.http(), self.attachment_hosts(), &request.attachments).await?;
        let mut message = build_outbound(
            ReplyParts {
                account_id: &identity.account_id,
                reply_id,
                conversation: &facts,
                channel: &channel,
                inbox: &inbox,
                author: agent_author(snapshot, identity),
                latest_inbound_email_opt: latest_inbound_email_opt.as_ref(),
                attachments,
            },
            route,
            request,
        );
        message.actor = actor(identity);
        self.publish_outbound(identity, conversation_id, Payload::OutboundMessageQueued(message)).await
    }

    #[tracing::instrument(name = "accept_note", skip_all, fields(conversation_id = %request.conversation_id, %note_id))]
    async fn accept_note(
        &self,
        identity: &Identity,
        request: &AddInternalNoteRequest,
        note_id: Uuid,
    ) -> Result<Position, ApiError> {
        check_note_request(request)?;
        // Notes are allowed on closed conversations too: they document, they send nothing.
        let authorised =
            self.authorised_conversation(identity, &request.conversation_id, ConversationAction::Reply).await?;
        let note = InternalNoteAdded {
            note_id: note_id.to_string(),
            conversation_id: authorised.conversation_id.to_string(),
            inbox_id: authorised.inbox.inbox_id.clone(),
            author: Some(agent_author(&authorised.snapshot, identity)),
            text: request.text.clone(),
            request_id: request.request_id.clone(),
            actor: actor(identity),
        };
        self.publish_outbound(identity, authorised.conversation_id, Payload::InternalNoteAdded(note)).await
    }

    /// Publishes to `outbound.v1`, keyed by the conversation (docs/outbound.md).
    async fn publish_outbound(
        &self,
        identity: &Identity,
        conversation_id: Uuid,
        payload: Payload,
    ) -> Result<Position, ApiError> {
        let key = outbound::outbound_partition_key(&identity.account_id, &conversation_id.to_string());
        let event_type = envelope::payload_name(&payload);
        let event = envelope::new_root(&identity.account_id, &key, Utc::now(), payload);
        let published = self.publisher().publish(&self.topics().outbound, &event).await.map_err(|error| {
            tracing::warn!(error = format!("{:#}", anyhow::Error::new(error)), "failed to publish a reply");
            ApiError::Unavailable("the event log is unavailable; retry with the same request_id".into())
        })?;
        tracing::info!(
            event_type,
            partition = published.partition,
            offset = published.offset,
            "outbound record published"
        );
        Ok(Position { topic: OUTBOUND_TOPIC.to_owned(), partition: published.partition, offset: published.offset })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration as ChronoDuration;
    use switchboard_proto::events::v1::{
        CustomChannelSettings, EmailSettings, MessengerSettings, WhatsAppSettings, WhatsAppTemplate,
    };
    use switchboard_proto::names;

    fn at(hours: i64) -> DateTime<Utc> {
        DateTime::UNIX_EPOCH + ChronoDuration::hours(hours)
    }

    fn facts(channel_type: ChannelType, channel_id: &str) -> ConversationFacts {
        ConversationFacts {
            conversation_id: Uuid::from_u128(7),
            inbox_id: "support".into(),
            channel_id: channel_id.into(),
            channel_type: names::name(channel_type).into(),
            thread_key: "thread-1".into(),
            status: "open".into(),
            assignee_id: None,
            contact_external_id: "ext-1".into(),
            contact_name: "Carla".into(),
            contact_email: String::new(),
            subject: "Refund".into(),
            // The customer wrote at hour 100.
            reply_window_ends_at: Some(at(124)),
        }
    }

    fn channel(channel_type: ChannelType, channel_id: &str) -> ChannelConfigured {
        ChannelConfigured {
            channel_id: channel_id.into(),
            inbox_id: "support".into(),
            channel_type: channel_type as i32,
            name: "Acme Help".into(),
            enabled: true,
            ..Default::default()
        }
    }

    fn reply(text: &str) -> SendReplyRequest {
        SendReplyRequest {
            request_id: "r-1".into(),
            conversation_id: Uuid::from_u128(7).to_string(),
            text: text.into(),
            ..Default::default()
        }
    }

    fn fields_of(error: ApiError) -> Vec<String> {
        match error {
            ApiError::InvalidArgument(violations) => violations.into_iter().map(|violation| violation.field).collect(),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    fn reason_of(error: ApiError) -> &'static str {
        match error {
            ApiError::Precondition { reason, .. } => reason,
            other => panic!("expected a precondition, got {other:?}"),
        }
    }

    #[test]
    fn o1_requests_are_checked_field_by_field() {
        assert!(check_request(&reply("hello")).is_ok());
        assert_eq!(fields_of(check_request(&reply("  ")).unwrap_err()), ["text"]);
        assert_eq!(fields_of(check_request(&reply(&"x".repeat(MAX_TEXT_CHARS + 1))).unwrap_err()), ["text"]);
        assert!(check_request(&reply(&"é".repeat(MAX_TEXT_CHARS))).is_ok(), "characters, not bytes");
        let mut everything_wrong = reply("");
        everything_wrong.conversation_id = String::new();
        everything_wrong.html = "x".repeat(MAX_HTML_BYTES + 1);
        everything_wrong.subject = "s".repeat(MAX_SUBJECT_CHARS + 1);
        everything_wrong.attachments = (0..11)
            .map(|index| OutboundAttachment {
                url: if index == 3 { "ftp://files.example/a".into() } else { format!("https://files.example/{index}") },
                ..Default::default()
            })
            .collect();
        assert_eq!(
            fields_of(check_request(&everything_wrong).unwrap_err()),
            ["conversation_id", "text", "html", "subject", "attachments", "attachments[3].url"]
        );
        let mut too_big = reply("hi");
        too_big.attachments = vec![OutboundAttachment {
            url: "https://files.example/big".into(),
            size_bytes: MAX_ATTACHMENT_TOTAL_BYTES + 1,
            ..Default::default()
        }];
        assert_eq!(fields_of(check_request(&too_big).unwrap_err()), ["attachments"]);
        let mut header_injection = reply("hi");
        header_injection.subject = "Hi\r\nBcc: x@y".into();
        assert_eq!(fields_of(check_request(&header_injection).unwrap_err()), ["subject"]);
    }

    #[test]
    fn c8_a_template_may_go_without_text_but_needs_name_and_language() {
        let mut template_only = reply("");
        template_only.whatsapp_template =
            Some(WhatsAppTemplateMessage { name: "order_update".into(), language: "en_US".into(), parameters: vec![] });
        assert!(check_request(&template_only).is_ok());
        template_only.whatsapp_template = Some(WhatsAppTemplateMessage::default());
        assert_eq!(
            fields_of(check_request(&template_only).unwrap_err()),
            ["whatsapp_template.name", "whatsapp_template.language"]
        );
    }

    #[test]
    fn o1_notes_need_text() {
        let note = |text: &str| AddInternalNoteRequest {
            request_id: "n-1".into(),
            conversation_id: "c".into(),
            text: text.into(),
        };
        assert!(check_note_request(&note("looked into it")).is_ok());
        assert_eq!(fields_of(check_note_request(&note("")).unwrap_err()), ["text"]);
        assert_eq!(fields_of(check_note_request(&note(&"x".repeat(MAX_TEXT_CHARS + 1))).unwrap_err()), ["text"]);
    }

    #[test]
    fn c11_c9_switched_off_channels_and_calls_send_nothing() {
        let chat = facts(ChannelType::Chat, "web");
        let off = ChannelConfigured { enabled: false, ..channel(ChannelType::Chat, "web") };
        assert_eq!(reason_of(route_reply(&chat, Some(&off), [], &reply("hi"), at(100)).unwrap_err()), "CHANNEL_OFF");
        assert_eq!(
            reason_of(route_reply(&chat, None, [], &reply("hi"), at(100)).unwrap_err()),
            "CHANNEL_NOT_CONFIGURED"
        );
        let call = facts(ChannelType::Calling, "phone");
        let error =
            route_reply(&call, Some(&channel(ChannelType::Calling, "phone")), [], &reply("hi"), at(100)).unwrap_err();
        assert_eq!(error.code(), tonic::Code::FailedPrecondition);
        assert!(error.to_string().contains("calls have no reply path"));
        let on = channel(ChannelType::Chat, "web");
        assert_eq!(route_reply(&chat, Some(&on), [], &reply("hi"), at(100)).unwrap(), Route::Chat);
        let custom = facts(ChannelType::Custom, "app");
        assert_eq!(
            route_reply(&custom, Some(&channel(ChannelType::Custom, "app")), [], &reply("hi"), at(100)).unwrap(),
            Route::Custom
        );
    }

    #[test]
    fn o3_html_subjects_and_templates_only_where_the_channel_takes_them() {
        let chat = facts(ChannelType::Chat, "web");
        let mut request = reply("hi");
        request.html = "<p>hi</p>".into();
        request.subject = "Hello".into();
        request.whatsapp_template =
            Some(WhatsAppTemplateMessage { name: "t".into(), language: "en".into(), parameters: vec![] });
        let error = route_reply(&chat, Some(&channel(ChannelType::Chat, "web")), [], &request, at(100)).unwrap_err();
        assert_eq!(fields_of(error), ["html", "subject", "whatsapp_template"]);
    }

    fn messenger_channel() -> ChannelConfigured {
        ChannelConfigured {
            messenger: Some(MessengerSettings { page_id: "page-1".into(), ..Default::default() }),
            ..channel(ChannelType::FacebookMessenger, "fb")
        }
    }

    #[test]
    fn c6_messenger_standard_then_human_agent_then_refused_with_the_windows_end() {
        let conversation = facts(ChannelType::FacebookMessenger, "fb");
        let messenger = messenger_channel();
        let route_at = |now| route_reply(&conversation, Some(&messenger), [], &reply("hi"), now);
        assert_eq!(
            route_at(at(123)).unwrap(),
            Route::Messenger { page_id: "page-1".into(), messaging_type: MessengerMessagingType::Response }
        );
        assert_eq!(
            route_at(at(124)).unwrap(),
            Route::Messenger { page_id: "page-1".into(), messaging_type: MessengerMessagingType::HumanAgentTag },
            "24 h after the customer's message"
        );
        assert_eq!(
            route_at(at(100 + 7 * 24 - 1)).unwrap(),
            Route::Messenger { page_id: "page-1".into(), messaging_type: MessengerMessagingType::HumanAgentTag }
        );
        let ApiError::Precondition { reason, metadata, .. } = route_at(at(100 + 7 * 24)).unwrap_err() else {
            panic!("expected a precondition")
        };
        assert_eq!(reason, "REPLY_WINDOW_CLOSED");
        assert_eq!(metadata, [("window_ends_at".to_owned(), "1970-01-12T04:00:00Z".to_owned())]);
    }

    fn whatsapp_channel() -> ChannelConfigured {
        ChannelConfigured {
            whatsapp: Some(WhatsAppSettings {
                phone_number_id: "pn-1".into(),
                templates: vec![WhatsAppTemplate {
                    name: "order_update".into(),
                    language: "en_US".into(),
                    parameter_count: 2,
                }],
                ..Default::default()
            }),
            ..channel(ChannelType::Whatsapp, "wa")
        }
    }

    #[test]
    fn c8_whatsapp_free_form_inside_24_hours_templates_anywhere() {
        let conversation = facts(ChannelType::Whatsapp, "wa");
        let whatsapp = whatsapp_channel();
        assert_eq!(
            route_reply(&conversation, Some(&whatsapp), [], &reply("hi"), at(123)).unwrap(),
            Route::WhatsApp { phone_number_id: "pn-1".into(), template_opt: None }
        );
        let ApiError::Precondition { reason, metadata, .. } =
            route_reply(&conversation, Some(&whatsapp), [], &reply("hi"), at(124)).unwrap_err()
        else {
            panic!("expected a precondition")
        };
        assert_eq!(reason, "CUSTOMER_SERVICE_WINDOW_CLOSED");
        assert_eq!(metadata, [("window_ends_at".to_owned(), rfc3339(at(124)))]);
        let template = |name: &str, parameters: &[&str]| {
            let mut request = reply("");
            request.whatsapp_template = Some(WhatsAppTemplateMessage {
                name: name.into(),
                language: "en_US".into(),
                parameters: parameters.iter().map(|parameter| parameter.to_string()).collect(),
            });
            request
        };
        for now in [at(110), at(500)] {
            let route =
                route_reply(&conversation, Some(&whatsapp), [], &template("order_update", &["A-1", "today"]), now)
                    .unwrap();
            let Route::WhatsApp { template_opt: Some(sent), .. } = route else { panic!("expected a template") };
            assert_eq!(sent.parameters, ["A-1", "today"]);
        }
        let unknown = route_reply(&conversation, Some(&whatsapp), [], &template("promo", &[]), at(500)).unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);
        let wrong_count =
            route_reply(&conversation, Some(&whatsapp), [], &template("order_update", &["A-1"]), at(500)).unwrap_err();
        assert_eq!(fields_of(wrong_count), ["whatsapp_template.parameters"]);
    }

    fn email_channel(channel_id: &str, disconnected: bool) -> ChannelConfigured {
        ChannelConfigured {
            email: Some(EmailSettings {
                team_address: "help@acme.example".into(),
                from_name_mode: "agent_and_company".into(),
                signature: "{{first_name}} from Acme".into(),
                disconnected,
                ..Default::default()
            }),
            ..channel(ChannelType::TeamEmail, channel_id)
        }
    }

    #[test]
    fn c7_forms_are_answered_by_email_and_need_the_contacts_address() {
        let mut form = facts(ChannelType::Forms, "contact-form");
        let forms = channel(ChannelType::Forms, "contact-form");
        let mail = email_channel("mail", false);
        assert_eq!(
            reason_of(route_reply(&form, Some(&forms), [&mail], &reply("hi"), at(0)).unwrap_err()),
            "CONTACT_HAS_NO_EMAIL"
        );
        form.contact_email = "kim@example.org".into();
        form.contact_external_id = "someone@else.example".into();
        assert_eq!(
            route_reply(&form, Some(&forms), [&mail], &reply("hi"), at(0)).unwrap(),
            Route::Email { to: "kim@example.org".into(), team_channel_opt: Some(Box::new(mail.clone())) }
        );
        assert_eq!(
            route_reply(&form, Some(&forms), [], &reply("hi"), at(0)).unwrap(),
            Route::Email { to: "kim@example.org".into(), team_channel_opt: None },
            "no team address in the inbox: the fallback address (C12)"
        );
    }

    fn inbox() -> InboxConfigured {
        InboxConfigured {
            inbox_id: "support".into(),
            name: "Support".into(),
            fallback_address: "support.acme@fallback.example".into(),
            fallback_from_name: "Acme Support".into(),
            ..Default::default()
        }
    }

    fn agent() -> Author {
        Author { kind: AuthorKind::Agent as i32, agent_id: "ana".into(), name: "Ana Alvarez".into(), automation: 0 }
    }

    #[test]
    fn o4_email_replies_carry_identity_signature_subject_and_threading() {
        let mut conversation = facts(ChannelType::TeamEmail, "mail");
        conversation.contact_external_id = "carla@example.com".into();
        let mail = email_channel("mail", false);
        let reply_id = Uuid::from_u128(0xabc);
        let inbound =
            InboundEmail { message_id_header: "m2@example.com".into(), references: vec!["m1@example.com".into()] };
        let route = route_reply(&conversation, Some(&mail), [], &reply("Hello Carla"), at(0)).unwrap();
        let message = build_outbound(
            ReplyParts {
                account_id: "acme",
                reply_id,
                conversation: &conversation,
                channel: &mail,
                inbox: &inbox(),
                author: agent(),
                latest_inbound_email_opt: Some(&inbound),
                attachments: vec![],
            },
            route,
            &reply("Hello Carla"),
        );
        let email = message.email.expect("email details");
        assert_eq!(email.from_name, "Ana Alvarez at Acme Help");
        assert_eq!(email.from_address, "help@acme.example");
        assert!(!email.from_fallback_address);
        assert_eq!(email.to, ["carla@example.com"]);
        assert_eq!(email.subject, "Re: Refund");
        assert_eq!(email.message_id_header, format!("{}@acme.example", reply_id.simple()));
        assert_eq!(email.in_reply_to, "m2@example.com");
        assert_eq!(email.references, ["m1@example.com", "m2@example.com"]);
        assert_eq!(email.text_body, "Hello Carla\n\n-- \nAna from Acme");
        assert!(email.html_body.starts_with("<p>Hello Carla</p>"));
        assert_eq!(message.idempotency_key, email.message_id_header);
        assert_eq!(message.recipient, "carla@example.com");
        assert_eq!(message.reply_id, reply_id.to_string());
        assert_eq!(message.purpose, OutboundPurpose::ConversationReply as i32);
        assert_eq!(message.author.unwrap().name, "Ana Alvarez");
    }

    #[test]
    fn c1_team_email_answers_the_address_that_wrote_in() {
        let mut conversation = facts(ChannelType::TeamEmail, "mail");
        conversation.contact_external_id = "carla.work@example.com".into();
        conversation.contact_email = "carla@example.com".into();
        let route = route_reply(&conversation, Some(&email_channel("mail", false)), [], &reply("Hi"), at(0)).unwrap();
        let Route::Email { to, .. } = route else { panic!("expected email") };
        assert_eq!(to, "carla.work@example.com");
    }

    #[test]
    fn c12_disconnected_team_address_replies_from_the_fallback_address() {
        let mut conversation = facts(ChannelType::TeamEmail, "mail");
        conversation.contact_email = "carla@example.com".into();
        let mail = email_channel("mail", true);
        let route = route_reply(&conversation, Some(&mail), [], &reply("Hi"), at(0)).unwrap();
        let message = build_outbound(
            ReplyParts {
                account_id: "acme",
                reply_id: Uuid::from_u128(1),
                conversation: &conversation,
                channel: &mail,
                inbox: &inbox(),
                author: agent(),
                latest_inbound_email_opt: None,
                attachments: vec![],
            },
            route,
            &reply("Hi"),
        );
        let email = message.email.unwrap();
        assert_eq!(email.from_address, "support.acme@fallback.example");
        assert_eq!(email.from_name, "Ana Alvarez at Acme Support");
        assert!(email.from_fallback_address);
        assert!(email.message_id_header.ends_with("@fallback.example"));
        assert_eq!((email.in_reply_to.as_str(), email.references.len()), ("", 0));
    }

    #[test]
    fn o1_other_channels_name_their_recipient_and_ids() {
        let conversation = facts(ChannelType::FacebookMessenger, "fb");
        let messenger = messenger_channel();
        let route = route_reply(&conversation, Some(&messenger), [], &reply("Hi"), at(130)).unwrap();
        let message = build_outbound(
            ReplyParts {
                account_id: "acme",
                reply_id: Uuid::from_u128(2),
                conversation: &conversation,
                channel: &messenger,
                inbox: &inbox(),
                author: agent(),
                latest_inbound_email_opt: None,
                attachments: vec![],
            },
            route,
            &reply("Hi"),
        );
        assert_eq!(message.recipient, "ext-1");
        assert_eq!(message.thread_key, "thread-1");
        assert_eq!(message.idempotency_key, Uuid::from_u128(2).to_string());
        let sent = message.messenger.unwrap();
        assert_eq!(
            (sent.page_id.as_str(), sent.messaging_type),
            ("page-1", MessengerMessagingType::HumanAgentTag as i32)
        );
        assert!(message.email.is_none());
    }

    fn build_for(conversation: &ConversationFacts, channel: &ChannelConfigured) -> OutboundMessageQueued {
        let route = route_reply(conversation, Some(channel), [], &reply("Hi"), at(110)).unwrap();
        build_outbound(
            ReplyParts {
                account_id: "acme",
                reply_id: Uuid::from_u128(3),
                conversation,
                channel,
                inbox: &inbox(),
                author: agent(),
                latest_inbound_email_opt: None,
                attachments: vec![],
            },
            route,
            &reply("Hi"),
        )
    }

    #[test]
    fn c10_custom_replies_carry_the_apps_url_and_rate_as_configured() {
        let mut app = channel(ChannelType::Custom, "app");
        app.custom = Some(CustomChannelSettings {
            delivery_url: "https://app.example/switchboard/replies".into(),
            messages_per_second: 25,
        });
        let message = build_for(&facts(ChannelType::Custom, "app"), &app);
        assert_eq!(message.custom_delivery_url, "https://app.example/switchboard/replies");
        assert_eq!(message.channel_messages_per_second, 25);
        assert_eq!(message.thread_key, "thread-1");
    }

    #[test]
    fn c8_whatsapp_replies_carry_the_numbers_rate_and_others_none() {
        let mut number = whatsapp_channel();
        number.whatsapp.as_mut().unwrap().messages_per_second = 40;
        let message = build_for(&facts(ChannelType::Whatsapp, "wa"), &number);
        assert_eq!((message.channel_messages_per_second, message.custom_delivery_url.as_str()), (40, ""));
        let chat = build_for(&facts(ChannelType::Chat, "site"), &channel(ChannelType::Chat, "site"));
        assert_eq!((chat.channel_messages_per_second, chat.custom_delivery_url.as_str()), (0, ""));
    }

    #[test]
    fn attachments_report_the_total_of_a_ranged_answer() {
        assert_eq!(content_range_total("bytes 0-0/12345"), Some(12345));
        assert_eq!(content_range_total("bytes 0-0/*"), None);
    }
}
