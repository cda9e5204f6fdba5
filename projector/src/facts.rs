//! From a decoded envelope to a [`Fact`]: the event with every id parsed and every enum named,
//! so the bulk writer ([`crate::apply`]) never meets bad input half-way through a batch. An
//! event that cannot become a fact is poison: it goes to the dead-letter topic with the reason.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    AgentConfigured, AssignTarget, AssignmentStrategy, Author, AuthorKind, Automation, CallDirection, CallState,
    ChannelConfigured, ChannelType, CloseReason, ConsentMode, ConsentState, DeliveryState, DeliveryStatusReported,
    Envelope, InboundContent, InboxAccessMode, InboxKind, MessageKind, MessengerMessagingType, OutboundMessageQueued,
    OutboundPurpose, RoutingRulesConfigured, SkipReason, TicketNotCreatedReason, TicketOwnerSource,
    TicketSettingsConfigured, UnassignedReason, WithheldReason,
};
use switchboard_proto::names;
use switchboard_runtime::config_store::ConfigKey;
use switchboard_runtime::envelope::{payload_name, to_datetime};
use uuid::Uuid;

/// Why a record cannot be projected (the dead-letter reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Poison(pub String);

/// Which input topic a record came from (unprefixed names are what positions store).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InputTopic {
    Conversations,
    Config,
    /// Replies, automated messages and notes accepted for sending (docs/outbound.md).
    Outbound,
    /// Delivery attempts and their outcomes.
    Delivery,
}

impl InputTopic {
    /// Every input topic, in the order positions are locked.
    pub const ALL: [InputTopic; 4] =
        [InputTopic::Conversations, InputTopic::Config, InputTopic::Outbound, InputTopic::Delivery];

    pub fn base_name(self) -> &'static str {
        match self {
            InputTopic::Conversations => "conversations.v1",
            InputTopic::Config => "config.v1",
            InputTopic::Outbound => "outbound.v1",
            InputTopic::Delivery => "delivery.v1",
        }
    }
}

/// One event ready to be written.
#[derive(Debug, Clone)]
pub struct Event {
    pub event_id: String,
    pub account_id: String,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    pub trace_id: String,
    /// Where the router read the cause (unprefixed topic, partition, offset): B6 positions.
    pub source: Option<(String, i32, i64)>,
    pub fact: Fact,
}

#[derive(Debug, Clone)]
pub enum Fact {
    ConversationStarted(ConversationStarted),
    MessageAppended(Box<MessageAppended>),
    Assigned {
        conversation_id: Uuid,
        assignee_id: String,
        explanation: Explanation,
    },
    LeftUnassigned {
        conversation_id: Uuid,
        reason: &'static str,
        explanation: Explanation,
    },
    Unassigned {
        conversation_id: Uuid,
        actor: Value,
    },
    Closed {
        conversation_id: Uuid,
        reason: &'static str,
        actor: Value,
    },
    ContactCreated(ContactCreated),
    ContactOwnerChanged {
        contact_id: Uuid,
        owner_agent_id: Option<String>,
    },
    TicketCreated(TicketCreated),
    TicketStageChanged {
        ticket_id: Uuid,
        conversation_id: Option<Uuid>,
        stage: String,
        closed: bool,
    },
    Audit(Audit),
    Inbox(InboxRow),
    Channel(ChannelRow),
    RoutingRules {
        channel_id: String,
        version: i64,
        rules: Value,
    },
    TicketSettings {
        channel_id: String,
        version: i64,
        settings: Value,
    },
    Agent(AgentRow),
    /// A router input the router echoes into its output because it is routing state
    /// (availability changes, consent); the read models get the same facts from the config
    /// topic or from the decisions it causes, so the projection only moves its position. Also
    /// a provider status word the projector does not know (nothing to apply).
    RouterStateEcho,
    /// O5: a reply, automated message or owner notification accepted for sending.
    OutboundQueued(Box<OutboundQueued>),
    /// O1: an internal note.
    NoteAdded(Box<NoteAdded>),
    /// O5: one attempt to hand an outbound message to its provider, and how it ended.
    DeliveryAttempt(Box<DeliveryAttempt>),
    /// O5: a provider's status for one of our sends (forwarded by the router).
    DeliveryStatus(Box<DeliveryStatus>),
    /// A compacted-topic tombstone: the entity named by the record key is gone.
    Tombstone {
        kind: String,
        /// The key's account; `None` for a legacy key (`<kind>/<id>`), which named none.
        account_id_opt: Option<String>,
        id: String,
    },
}

#[derive(Debug, Clone)]
pub struct ConversationStarted {
    pub conversation_id: Uuid,
    pub inbox_id: String,
    pub channel_id: String,
    pub channel_type: &'static str,
    pub thread_key: String,
    pub contact_external_id: String,
    pub contact_name: String,
    pub contact_id: Option<Uuid>,
}

#[derive(Debug, Clone)]
pub struct MessageAppended {
    pub conversation_id: Uuid,
    pub message_id: Uuid,
    pub provider_message_id: String,
    pub channel_id: String,
    pub sender_external_id: String,
    pub sender_name: String,
    pub body: String,
    pub source_event_id: String,
    pub contact_id: Option<Uuid>,
    pub kind: &'static str,
    pub subject: String,
    pub content: Value,
    pub hidden_fields: Value,
}

#[derive(Debug, Clone, Default)]
pub struct Explanation {
    pub channel_id: String,
    pub rule_version: i64,
    pub strategy: &'static str,
    pub eligible_agent_ids: Vec<String>,
    pub skipped: Value,
    pub json: Value,
}

#[derive(Debug, Clone)]
pub struct ContactCreated {
    pub contact_id: Uuid,
    pub channel_id: String,
    pub external_id: String,
    pub display_name: String,
    pub email: String,
}

#[derive(Debug, Clone)]
pub struct TicketCreated {
    pub ticket_id: Uuid,
    pub conversation_id: Uuid,
    pub contact_id: Option<Uuid>,
    pub inbox_id: String,
    pub channel_id: String,
    pub pipeline: String,
    pub stage: String,
    pub owner_agent_id: Option<String>,
    pub owner_source: &'static str,
    pub name: String,
    pub description: String,
}

#[derive(Debug, Clone)]
pub struct Audit {
    pub kind: &'static str,
    pub reason: String,
    pub channel_id: String,
    /// The inbox, when the event names it and no conversation does (withheld messages).
    pub inbox_id: String,
    pub conversation_id: Option<Uuid>,
    pub message_id: Option<Uuid>,
    pub detail: Value,
}

#[derive(Debug, Clone)]
pub struct InboxRow {
    pub inbox_id: String,
    pub name: String,
    pub kind: &'static str,
    pub access_mode: &'static str,
    pub access_user_ids: Vec<String>,
    pub access_team_ids: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ChannelRow {
    pub channel_id: String,
    pub inbox_id: String,
    pub channel_type: &'static str,
    pub name: String,
    pub enabled: bool,
    pub settings: Value,
}

#[derive(Debug, Clone)]
pub struct AgentRow {
    pub agent_id: String,
    pub name: String,
    pub email: String,
    pub role: String,
    pub paid_seat: bool,
    pub available: bool,
    pub team_ids: Vec<String>,
    pub skills: Vec<String>,
    pub max_open_conversations: i32,
    pub capacity_per_channel_type: Value,
}

/// Who wrote an outbound message or a note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorFact {
    /// `agent` or `automation`.
    pub kind: &'static str,
    pub agent_id: String,
    pub name: String,
    /// For automations: `owner_notification`, `greeting`, `instant_reply`, `consent_prompt`.
    pub automation: &'static str,
}

#[derive(Debug, Clone)]
pub struct OutboundQueued {
    pub reply_id: Uuid,
    pub conversation_id: Option<Uuid>,
    pub inbox_id: String,
    pub channel_id: String,
    /// R4: an email to the contact owner, not a conversation message.
    pub owner_notification: bool,
    pub author: AuthorFact,
    pub text: String,
    /// `email` for email replies, else `text`.
    pub kind: &'static str,
    pub subject: String,
    pub recipient: String,
    /// Shown in the inbox view: attachments, the email's headers, a WhatsApp template.
    pub content: Value,
}

#[derive(Debug, Clone)]
pub struct NoteAdded {
    pub note_id: Uuid,
    pub conversation_id: Uuid,
    pub inbox_id: String,
    pub author: AuthorFact,
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct DeliveryAttempt {
    pub reply_id: Uuid,
    pub channel_id: String,
    pub attempt: i32,
    /// SENT (else FAILED).
    pub sent: bool,
    pub provider_message_id: String,
    pub error: String,
    pub will_retry: bool,
}

/// The status words a provider reports, as the projector knows them.
pub const STATUS_WORDS: [&str; 5] = ["sent", "delivered", "read", "failed", "echo"];

#[derive(Debug, Clone)]
pub struct DeliveryStatus {
    pub channel_id: String,
    /// The provider's message id, or `watermark:<millis>` (Messenger).
    pub provider_message_id: String,
    pub recipient: String,
    /// Parsed from a `watermark:<millis>` id: every message to `recipient` sent at or before.
    pub watermark_at: Option<DateTime<Utc>>,
    /// One of [`STATUS_WORDS`].
    pub status: &'static str,
    pub error: String,
}

fn uuid(field: &str, value: &str) -> Result<Uuid, Poison> {
    Uuid::parse_str(value).map_err(|_| Poison(format!("{field} `{value}` is not a UUID")))
}

/// Empty means "none" for optional ids in the contract.
fn optional_uuid(field: &str, value: &str) -> Result<Option<Uuid>, Poison> {
    if value.is_empty() { Ok(None) } else { uuid(field, value).map(Some) }
}

fn optional_text(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

/// A config tombstone (record with a key and no value) as a fact.
pub fn tombstone(key: &[u8]) -> Result<Fact, Poison> {
    let key = std::str::from_utf8(key).map_err(|_| Poison("tombstone key is not UTF-8".into()))?;
    let parsed = ConfigKey::parse(key)
        .ok_or_else(|| Poison(format!("tombstone key `{key}` is not <kind>/<account>/<id> (or legacy <kind>/<id>)")))?;
    let account_id_opt = match parsed {
        ConfigKey::Scoped { account_id, .. } => Some(account_id.to_owned()),
        ConfigKey::Legacy { .. } => None,
    };
    Ok(Fact::Tombstone { kind: parsed.kind().to_owned(), account_id_opt, id: parsed.id().to_owned() })
}

/// Turns an envelope read from `topic` into an event, or says why it is poison.
pub fn to_event(topic: InputTopic, envelope: Envelope, trace_id: String) -> Result<Event, Poison> {
    let payload = envelope.payload.ok_or_else(|| Poison("envelope without payload".into()))?;
    let fact = match (topic, payload) {
        (InputTopic::Conversations, payload) => conversation_fact(payload)?,
        (InputTopic::Config, payload) => config_fact(payload)?,
        (InputTopic::Outbound | InputTopic::Delivery, payload) => outbound_fact(topic, payload)?,
    };
    let source = envelope
        .source_position
        .filter(|position| !position.topic.is_empty())
        .map(|position| (position.topic, position.partition, position.offset));
    Ok(Event {
        event_id: envelope.event_id,
        account_id: envelope.account_id,
        occurred_at: to_datetime(envelope.occurred_at.as_ref()),
        recorded_at: to_datetime(envelope.recorded_at.as_ref()),
        trace_id,
        source,
        fact,
    })
}

fn conversation_fact(payload: Payload) -> Result<Fact, Poison> {
    Ok(match payload {
        Payload::ConversationStarted(started) => {
            let contact = started.contact.unwrap_or_default();
            Fact::ConversationStarted(ConversationStarted {
                conversation_id: uuid("conversation_id", &started.conversation_id)?,
                inbox_id: started.inbox_id,
                channel_id: started.channel_id,
                channel_type: names::name_of::<ChannelType>(started.channel_type),
                thread_key: started.thread_key,
                contact_external_id: contact.external_id,
                contact_name: contact.display_name,
                contact_id: optional_uuid("contact_id", &started.contact_id)?,
            })
        }
        Payload::MessageAppended(appended) => {
            let sender = appended.sender.unwrap_or_default();
            let content = appended.content.unwrap_or_default();
            let (visible, hidden_fields) = split_content(&content);
            Fact::MessageAppended(Box::new(MessageAppended {
                conversation_id: uuid("conversation_id", &appended.conversation_id)?,
                message_id: uuid("message_id", &appended.message_id)?,
                provider_message_id: appended.provider_message_id,
                channel_id: appended.channel_id,
                sender_external_id: sender.external_id,
                sender_name: sender.display_name,
                body: appended.text,
                source_event_id: appended.source_event_id,
                contact_id: optional_uuid("contact_id", &appended.contact_id)?,
                kind: names::name_of_or(content.kind, MessageKind::Text),
                subject: content.subject.clone(),
                content: visible,
                hidden_fields,
            }))
        }
        Payload::ConversationAssigned(assigned) => {
            if assigned.assignee_agent_id.is_empty() {
                return Err(Poison("conversation_assigned without an assignee".into()));
            }
            Fact::Assigned {
                conversation_id: uuid("conversation_id", &assigned.conversation_id)?,
                assignee_id: assigned.assignee_agent_id,
                explanation: explanation(assigned.explanation.unwrap_or_default()),
            }
        }
        Payload::ConversationLeftUnassigned(left) => Fact::LeftUnassigned {
            conversation_id: uuid("conversation_id", &left.conversation_id)?,
            reason: names::name_of::<UnassignedReason>(left.reason),
            explanation: explanation(left.explanation.unwrap_or_default()),
        },
        Payload::ConversationUnassigned(unassigned) => Fact::Unassigned {
            conversation_id: uuid("conversation_id", &unassigned.conversation_id)?,
            actor: actor_json(unassigned.actor.as_ref(), &unassigned.request_id),
        },
        Payload::ConversationClosed(closed) => Fact::Closed {
            conversation_id: uuid("conversation_id", &closed.conversation_id)?,
            reason: names::name_of::<CloseReason>(closed.reason),
            actor: actor_json(closed.actor.as_ref(), &closed.request_id),
        },
        Payload::ContactCreated(created) => Fact::ContactCreated(ContactCreated {
            contact_id: uuid("contact_id", &created.contact_id)?,
            channel_id: created.channel_id,
            external_id: created.external_id,
            display_name: created.display_name,
            email: created.email,
        }),
        Payload::ContactOwnerChanged(changed) => Fact::ContactOwnerChanged {
            contact_id: uuid("contact_id", &changed.contact_id)?,
            owner_agent_id: optional_text(&changed.owner_agent_id),
        },
        Payload::TicketCreated(created) => Fact::TicketCreated(TicketCreated {
            ticket_id: uuid("ticket_id", &created.ticket_id)?,
            conversation_id: uuid("conversation_id", &created.conversation_id)?,
            contact_id: optional_uuid("contact_id", &created.contact_id)?,
            inbox_id: created.inbox_id,
            channel_id: created.channel_id,
            pipeline: created.pipeline,
            stage: created.stage,
            owner_agent_id: optional_text(&created.owner_agent_id),
            owner_source: names::name_of::<TicketOwnerSource>(created.owner_source),
            name: created.name,
            description: created.description,
        }),
        Payload::TicketStageChanged(changed) => Fact::TicketStageChanged {
            ticket_id: uuid("ticket_id", &changed.ticket_id)?,
            conversation_id: optional_uuid("conversation_id", &changed.conversation_id)?,
            stage: changed.stage,
            closed: changed.closed,
        },
        Payload::MessageWithheld(withheld) => {
            let sender = withheld.sender.unwrap_or_default();
            Fact::Audit(Audit {
                kind: "withheld",
                reason: names::name_of::<WithheldReason>(withheld.reason).to_owned(),
                channel_id: withheld.channel_id,
                // Older events lack the field; a held message (C6) still names its inbox.
                inbox_id: if withheld.inbox_id.is_empty() {
                    withheld.message.as_ref().map(|message| message.inbox_id.clone()).unwrap_or_default()
                } else {
                    withheld.inbox_id
                },
                conversation_id: None,
                message_id: optional_uuid("message_id", &withheld.message_id)?,
                detail: json!({
                    "thread_key": withheld.thread_key,
                    "sender": {"external_id": sender.external_id, "display_name": sender.display_name, "email": sender.email},
                    "source_event_id": withheld.source_event_id,
                }),
            })
        }
        Payload::TicketNotCreated(not_created) => Fact::Audit(Audit {
            kind: "ticket_not_created",
            reason: names::name_of::<TicketNotCreatedReason>(not_created.reason).to_owned(),
            channel_id: String::new(),
            inbox_id: String::new(),
            conversation_id: optional_uuid("conversation_id", &not_created.conversation_id)?,
            message_id: None,
            detail: json!({"contact_id": not_created.contact_id, "limit": not_created.limit}),
        }),
        Payload::CommandRejected(rejected) => Fact::Audit(Audit {
            kind: "command_rejected",
            reason: rejected.reason,
            channel_id: String::new(),
            inbox_id: String::new(),
            conversation_id: None,
            message_id: None,
            detail: json!({"request_id": rejected.request_id, "command": rejected.command}),
        }),
        Payload::OwnerNotificationRequested(notification) => Fact::Audit(Audit {
            kind: "owner_notified",
            reason: "owner_offline".to_owned(),
            channel_id: String::new(),
            inbox_id: String::new(),
            conversation_id: optional_uuid("conversation_id", &notification.conversation_id)?,
            message_id: optional_uuid("message_id", &notification.message_id)?,
            detail: json!({"agent_id": notification.agent_id, "contact_id": notification.contact_id}),
        }),
        Payload::AgentAvailabilityChanged(_) | Payload::ContactConsentReceived(_) => Fact::RouterStateEcho,
        Payload::DeliveryStatusReported(reported) => delivery_status(reported)?,
        other => {
            return Err(Poison(format!("{} does not belong on the conversations topic", payload_name(&other))));
        }
    })
}

/// A provider status; a word the projector does not know (a provider's new status) changes
/// nothing, like an echo of router state.
fn delivery_status(reported: DeliveryStatusReported) -> Result<Fact, Poison> {
    let word = reported.status.trim().to_ascii_lowercase();
    let Some(status) = STATUS_WORDS.iter().copied().find(|known| *known == word) else {
        return Ok(Fact::RouterStateEcho);
    };
    if reported.provider_message_id.is_empty() {
        return Err(Poison("delivery_status_reported without a provider message id".into()));
    }
    let watermark_at = match reported.provider_message_id.strip_prefix("watermark:") {
        Some(millis) => Some(
            millis
                .parse::<i64>()
                .ok()
                .and_then(DateTime::<Utc>::from_timestamp_millis)
                .ok_or_else(|| Poison(format!("`{}` is not watermark:<millis>", reported.provider_message_id)))?,
        ),
        None => None,
    };
    Ok(Fact::DeliveryStatus(Box::new(DeliveryStatus {
        channel_id: reported.channel_id,
        provider_message_id: reported.provider_message_id,
        recipient: reported.recipient_external_id,
        watermark_at,
        status,
        error: reported.error,
    })))
}

fn author_fact(author: Option<Author>) -> AuthorFact {
    let author = author.unwrap_or_default();
    let kind = match AuthorKind::try_from(author.kind) {
        Ok(AuthorKind::Agent) => "agent",
        Ok(AuthorKind::Customer) => "customer",
        _ => "automation",
    };
    let automation = match Automation::try_from(author.automation) {
        Ok(Automation::OwnerNotification) => "owner_notification",
        Ok(Automation::Greeting) => "greeting",
        Ok(Automation::InstantReply) => "instant_reply",
        Ok(Automation::ConsentPrompt) => "consent_prompt",
        _ => "",
    };
    AuthorFact { kind, agent_id: author.agent_id, name: author.name, automation }
}

/// What the inbox view shows of an outbound message besides its text (no bodies twice).
fn outbound_content(queued: &OutboundMessageQueued) -> Value {
    let mut content = serde_json::Map::new();
    if !queued.attachments.is_empty() {
        let attachments: Vec<Value> = queued
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
        content.insert("attachments".into(), Value::Array(attachments));
    }
    if let Some(email) = &queued.email {
        content.insert(
            "email".into(),
            json!({
                "from_name": email.from_name,
                "from_address": email.from_address,
                "to": email.to,
                "message_id_header": email.message_id_header,
                "in_reply_to": email.in_reply_to,
                "references": email.references,
                "from_fallback_address": email.from_fallback_address,
                "has_html": !email.html_body.is_empty(),
            }),
        );
    }
    if let Some(template) = queued.whatsapp.as_ref().and_then(|whatsapp| whatsapp.template.as_ref()) {
        content.insert(
            "whatsapp_template".into(),
            json!({"name": template.name, "language": template.language, "parameters": template.parameters}),
        );
    }
    if let Some(messenger) = &queued.messenger
        && messenger.messaging_type == MessengerMessagingType::HumanAgentTag as i32
    {
        content.insert("messenger_tag".into(), json!("human_agent"));
    }
    Value::Object(content)
}

fn outbound_fact(topic: InputTopic, payload: Payload) -> Result<Fact, Poison> {
    Ok(match (topic, payload) {
        (InputTopic::Outbound, Payload::OutboundMessageQueued(queued)) => {
            let owner_notification = queued.purpose == OutboundPurpose::OwnerNotification as i32;
            let conversation_id = optional_uuid("conversation_id", &queued.conversation_id)?;
            if conversation_id.is_none() && !owner_notification {
                return Err(Poison("outbound_message_queued reply without a conversation id".into()));
            }
            let email = queued.email.as_ref();
            let text = match email {
                Some(email) if queued.text.is_empty() => email.text_body.clone(),
                _ => queued.text.clone(),
            };
            Fact::OutboundQueued(Box::new(OutboundQueued {
                reply_id: uuid("reply_id", &queued.reply_id)?,
                conversation_id,
                content: outbound_content(&queued),
                kind: if email.is_some() { "email" } else { "text" },
                subject: email.map(|email| email.subject.clone()).unwrap_or_default(),
                recipient: match email {
                    Some(email) if queued.recipient.is_empty() => email.to.join(", "),
                    _ => queued.recipient,
                },
                inbox_id: queued.inbox_id,
                channel_id: queued.channel_id,
                owner_notification,
                author: author_fact(queued.author),
                text,
            }))
        }
        (InputTopic::Outbound, Payload::InternalNoteAdded(note)) => Fact::NoteAdded(Box::new(NoteAdded {
            note_id: uuid("note_id", &note.note_id)?,
            conversation_id: uuid("conversation_id", &note.conversation_id)?,
            inbox_id: note.inbox_id,
            author: author_fact(note.author),
            text: note.text,
        })),
        (InputTopic::Delivery, Payload::DeliveryAttemptRecorded(attempt)) => {
            let sent = match DeliveryState::try_from(attempt.state) {
                Ok(DeliveryState::Sent) => true,
                Ok(DeliveryState::Failed) => false,
                _ => return Err(Poison("delivery_attempt_recorded is neither SENT nor FAILED".into())),
            };
            Fact::DeliveryAttempt(Box::new(DeliveryAttempt {
                reply_id: uuid("reply_id", &attempt.reply_id)?,
                channel_id: attempt.channel_id,
                attempt: attempt.attempt.min(i32::MAX as u32) as i32,
                sent,
                provider_message_id: attempt.provider_message_id,
                error: attempt.error,
                will_retry: attempt.will_retry && !sent,
            }))
        }
        (topic, other) => {
            return Err(Poison(format!("{} does not belong on the {} topic", payload_name(&other), topic.base_name())));
        }
    })
}

fn config_fact(payload: Payload) -> Result<Fact, Poison> {
    Ok(match payload {
        Payload::InboxConfigured(inbox) => {
            if inbox.inbox_id.is_empty() {
                return Err(Poison("inbox_configured without an inbox id".into()));
            }
            Fact::Inbox(InboxRow {
                kind: names::name_of_or(inbox.kind, InboxKind::Conversations),
                access_mode: names::name_of_or(inbox.access_mode, InboxAccessMode::Everyone),
                inbox_id: inbox.inbox_id,
                name: inbox.name,
                access_user_ids: inbox.access_user_ids,
                access_team_ids: inbox.access_team_ids,
            })
        }
        Payload::ChannelConfigured(channel) => {
            if channel.channel_id.is_empty() {
                return Err(Poison("channel_configured without a channel id".into()));
            }
            Fact::Channel(ChannelRow {
                settings: channel_settings_json(&channel),
                channel_type: names::name_of::<ChannelType>(channel.channel_type),
                channel_id: channel.channel_id,
                inbox_id: channel.inbox_id,
                name: channel.name,
                enabled: channel.enabled,
            })
        }
        Payload::RoutingRulesConfigured(rules) => {
            if rules.channel_id.is_empty() {
                return Err(Poison("routing_rules_configured without a channel id".into()));
            }
            Fact::RoutingRules {
                channel_id: rules.channel_id.clone(),
                version: rules.version as i64,
                rules: rules_json(&rules),
            }
        }
        Payload::TicketSettingsConfigured(settings) => {
            if settings.channel_id.is_empty() {
                return Err(Poison("ticket_settings_configured without a channel id".into()));
            }
            Fact::TicketSettings {
                channel_id: settings.channel_id.clone(),
                version: settings.version as i64,
                settings: ticket_settings_json(&settings),
            }
        }
        Payload::AgentConfigured(agent) => {
            if agent.agent_id.is_empty() {
                return Err(Poison("agent_configured without an agent id".into()));
            }
            Fact::Agent(agent_row(agent))
        }
        other => return Err(Poison(format!("{} does not belong on the config topic", payload_name(&other)))),
    })
}

fn agent_row(agent: AgentConfigured) -> AgentRow {
    let capacity: serde_json::Map<String, Value> = agent
        .capacity_per_channel_type
        .iter()
        .map(|capacity| (names::name_of::<ChannelType>(capacity.channel_type).to_owned(), json!(capacity.max_open)))
        .collect();
    AgentRow {
        role: if agent.role.is_empty() { "agent".to_owned() } else { agent.role },
        agent_id: agent.agent_id,
        name: agent.name,
        email: agent.email,
        paid_seat: agent.paid_seat,
        available: agent.available,
        team_ids: agent.team_ids,
        skills: agent.skills,
        max_open_conversations: agent.max_open_conversations.min(i32::MAX as u32) as i32,
        capacity_per_channel_type: Value::Object(capacity),
    }
}

/// The type-specific settings of a channel as JSON (no secrets ever travel in config events).
fn channel_settings_json(channel: &ChannelConfigured) -> Value {
    let mut settings = serde_json::Map::new();
    if let Some(email) = &channel.email {
        settings.insert(
            "email".into(),
            json!({
                "team_address": email.team_address,
                "from_name_mode": email.from_name_mode,
                "from_address": email.from_address,
                "signature": email.signature,
                "signature_is_html": email.signature_is_html,
                "log_forwarded_to_forwarder": email.log_forwarded_to_forwarder,
            }),
        );
    }
    if let Some(chat) = &channel.chat {
        let hours: Vec<Value> = chat
            .chat_hours
            .iter()
            .map(|range| json!({"weekday": range.weekday, "start_minute": range.start_minute, "end_minute": range.end_minute}))
            .collect();
        settings.insert(
            "chat".into(),
            json!({
                "accent_colour": chat.accent_colour,
                "welcome_message": chat.welcome_message,
                "pop_open_welcome": chat.pop_open_welcome,
                "availability_mode": chat.availability_mode,
                "time_zone": chat.time_zone,
                "chat_hours": hours,
                "typical_reply_time": chat.typical_reply_time,
                "away_message": chat.away_message,
                "offline_behaviour": chat.offline_behaviour,
                "at_capacity_behaviour": chat.at_capacity_behaviour,
                "at_capacity_message": chat.at_capacity_message,
            }),
        );
    }
    if let Some(messenger) = &channel.messenger {
        let consent_mode = names::name_of::<ConsentMode>(messenger.consent_mode);
        settings.insert(
            "messenger".into(),
            json!({
                "page_id": messenger.page_id,
                "consent_mode": consent_mode,
                "consent_text": messenger.consent_text,
                "greeting": messenger.greeting,
                "instant_reply": messenger.instant_reply,
            }),
        );
    }
    if let Some(whatsapp) = &channel.whatsapp {
        settings.insert(
            "whatsapp".into(),
            json!({"phone_number_id": whatsapp.phone_number_id, "display_phone_number": whatsapp.display_phone_number}),
        );
    }
    Value::Object(settings)
}

fn rules_json(rules: &RoutingRulesConfigured) -> Value {
    let target = names::name_of::<AssignTarget>(rules.target);
    json!({
        "version": rules.version,
        "auto_assign": rules.auto_assign,
        "target": target,
        "user_ids": rules.user_ids,
        "team_ids": rules.team_ids,
        "only_available": rules.only_available,
        "strategy": names::name_of::<AssignmentStrategy>(rules.strategy),
        "required_skills": rules.required_skills,
        "redrive_backlog": rules.redrive_backlog,
    })
}

fn ticket_settings_json(settings: &TicketSettingsConfigured) -> Value {
    json!({
        "version": settings.version,
        "treat_as_tickets": settings.treat_as_tickets,
        "default_pipeline": settings.default_pipeline,
        "default_stage": settings.default_stage,
        "fixed_owner_agent_id": settings.fixed_owner_agent_id,
        "contact_association_limit": settings.contact_association_limit,
    })
}

fn actor_json(actor: Option<&switchboard_proto::events::v1::Actor>, request_id: &str) -> Value {
    let actor = actor.cloned().unwrap_or_default();
    json!({"user_id": actor.user_id, "role": actor.role, "request_id": request_id})
}

fn explanation(explanation: switchboard_proto::events::v1::RoutingExplanation) -> Explanation {
    let skipped: Vec<Value> = explanation
        .skipped
        .iter()
        .map(|skip| json!({"agent_id": skip.agent_id, "reason": names::name_of::<SkipReason>(skip.reason)}))
        .collect();
    let strategy = names::name_of::<AssignmentStrategy>(explanation.strategy);
    let target = names::name_of::<AssignTarget>(explanation.target);
    Explanation {
        json: json!({
            "channel_id": explanation.channel_id,
            "rule_version": explanation.rule_version,
            "target": target,
            "strategy": strategy,
            "only_available": explanation.only_available,
            "eligible_agent_ids": explanation.eligible_agent_ids,
            "skipped": skipped,
        }),
        channel_id: explanation.channel_id,
        rule_version: explanation.rule_version.min(i64::MAX as u64) as i64,
        strategy,
        eligible_agent_ids: explanation.eligible_agent_ids,
        skipped: Value::Array(skipped),
    }
}

/// C7: splits content into what the inbox view may show and the hidden form fields, which are
/// kept apart (contact timeline only). Empty parts are left out so plain text stays `{}`.
pub fn split_content(content: &InboundContent) -> (Value, Value) {
    let mut visible = serde_json::Map::new();
    let mut hidden = Vec::new();
    let mut fields = Vec::new();
    for field in &content.form_fields {
        let entry = json!({"name": field.name, "value": field.value});
        if field.hidden { hidden.push(entry) } else { fields.push(entry) }
    }
    if !fields.is_empty() {
        visible.insert("form_fields".into(), Value::Array(fields));
    }
    if let Some(ticket) = &content.form_ticket {
        visible.insert(
            "form_ticket".into(),
            json!({"name": ticket.name, "description": ticket.description, "pipeline": ticket.pipeline, "stage": ticket.stage}),
        );
    }
    if !content.unsupported_kind.is_empty() {
        visible.insert("unsupported_kind".into(), json!(content.unsupported_kind));
    }
    if !content.preview.is_empty() {
        visible.insert("preview".into(), json!(content.preview));
    }
    if !content.attachments.is_empty() {
        let attachments: Vec<Value> = content
            .attachments
            .iter()
            .map(|attachment| {
                json!({
                    "file_name": attachment.file_name,
                    "content_type": attachment.content_type,
                    "size_bytes": attachment.size_bytes,
                    "sha256": attachment.sha256,
                    "provider_ref": attachment.provider_ref,
                    "content_id": attachment.content_id,
                })
            })
            .collect();
        visible.insert("attachments".into(), Value::Array(attachments));
    }
    if let Some(email) = &content.email {
        let person = |sender: &Option<switchboard_proto::events::v1::Sender>| {
            sender.as_ref().map(|sender| {
                json!({"external_id": sender.external_id, "display_name": sender.display_name, "email": sender.email})
            })
        };
        visible.insert(
            "email".into(),
            json!({
                "message_id_header": email.message_id_header,
                "in_reply_to": email.in_reply_to,
                "references": email.references,
                "team_address": email.team_address,
                "to": email.to,
                "cc": email.cc,
                "forwarded_by": person(&email.forwarded_by),
                "original_sender": person(&email.original_sender),
                "has_html": email.has_html,
            }),
        );
    }
    if let Some(call) = &content.call {
        let state = names::name_of::<CallState>(call.state);
        let direction = names::name_of::<CallDirection>(call.direction);
        visible.insert(
            "call".into(),
            json!({
                "call_id": call.call_id, "state": state, "direction": direction,
                "from_number": call.from_number, "to_number": call.to_number,
                "duration_seconds": call.duration_seconds,
                "recording_ref": call.recording_ref, "transcript_ref": call.transcript_ref,
            }),
        );
    }
    if let Some(location) = &content.location {
        visible.insert(
            "location".into(),
            json!({"latitude": location.latitude, "longitude": location.longitude, "name": location.name, "address": location.address}),
        );
    }
    if !content.interactive_reply_id.is_empty() {
        visible.insert("interactive_reply_id".into(), json!(content.interactive_reply_id));
    }
    if let Ok(consent @ (ConsentState::Given | ConsentState::NotGiven)) = ConsentState::try_from(content.consent) {
        visible.insert("consent".into(), json!(names::name(consent)));
    }
    if !content.provider_attributes.is_empty() {
        // Sorted keys: a map's iteration order must not make two replays differ.
        let attributes: std::collections::BTreeMap<_, _> = content.provider_attributes.iter().collect();
        visible.insert("provider_attributes".into(), json!(attributes));
    }
    (Value::Object(visible), Value::Array(hidden))
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_proto::events::v1::FormField;

    #[test]
    fn c7_hidden_form_fields_are_split_from_visible_content() {
        let content = InboundContent {
            kind: MessageKind::FormSubmission as i32,
            form_fields: vec![
                FormField { name: "email".into(), value: "a@b.c".into(), hidden: false },
                FormField { name: "utm_source".into(), value: "ads".into(), hidden: true },
            ],
            ..Default::default()
        };
        let (visible, hidden) = split_content(&content);
        assert_eq!(visible["form_fields"], json!([{"name": "email", "value": "a@b.c"}]));
        assert_eq!(hidden, json!([{"name": "utm_source", "value": "ads"}]));
        assert!(!visible.to_string().contains("utm_source"));
    }

    #[test]
    fn payloads_on_the_wrong_topic_are_poison() {
        let envelope = switchboard_runtime::envelope::new_root(
            "acct",
            "acct",
            Utc::now(),
            Payload::InboxConfigured(Default::default()),
        );
        let error = to_event(InputTopic::Conversations, envelope, String::new()).unwrap_err();
        assert!(error.0.contains("does not belong on the conversations topic"), "{error}");
    }

    #[test]
    fn bad_ids_are_poison_with_the_field_named() {
        let envelope = switchboard_runtime::envelope::new_root(
            "acct",
            "acct",
            Utc::now(),
            Payload::ConversationClosed(switchboard_proto::events::v1::ConversationClosed {
                conversation_id: "nope".into(),
                ..Default::default()
            }),
        );
        let error = to_event(InputTopic::Conversations, envelope, String::new()).unwrap_err();
        assert_eq!(error.0, "conversation_id `nope` is not a UUID");
    }

    fn envelope(payload: Payload) -> Envelope {
        switchboard_runtime::envelope::new_root("acct", "acct", Utc::now(), payload)
    }

    fn status(provider_message_id: &str, word: &str) -> Result<Event, Poison> {
        let reported = DeliveryStatusReported {
            channel_id: "messenger-1".into(),
            provider_message_id: provider_message_id.into(),
            recipient_external_id: "psid-7".into(),
            status: word.into(),
            error: String::new(),
        };
        to_event(InputTopic::Conversations, envelope(Payload::DeliveryStatusReported(reported)), String::new())
    }

    #[test]
    fn o5_a_messenger_watermark_id_is_parsed_and_unknown_status_words_change_nothing() {
        let Fact::DeliveryStatus(read) = status("watermark:1796000045000", "READ").unwrap().fact else {
            panic!("a status")
        };
        assert_eq!(read.status, "read");
        assert_eq!(read.watermark_at, DateTime::<Utc>::from_timestamp_millis(1_796_000_045_000));
        let Fact::DeliveryStatus(echo) = status("mid.1", "echo").unwrap().fact else { panic!("a status") };
        assert_eq!((echo.status, echo.watermark_at), ("echo", None));
        assert!(matches!(status("wamid.1", "deleted").unwrap().fact, Fact::RouterStateEcho));
        assert_eq!(status("watermark:soon", "read").unwrap_err().0, "`watermark:soon` is not watermark:<millis>");
    }

    #[test]
    fn o5_outbound_events_name_their_purpose_author_and_outcome() {
        let queued = OutboundMessageQueued {
            reply_id: Uuid::from_u128(1).to_string(),
            conversation_id: Uuid::from_u128(2).to_string(),
            purpose: OutboundPurpose::OwnerNotification as i32,
            author: Some(Author {
                kind: AuthorKind::Automation as i32,
                automation: Automation::OwnerNotification as i32,
                ..Default::default()
            }),
            email: Some(switchboard_proto::events::v1::OutboundEmail {
                subject: "New message".into(),
                to: vec!["ana@example.com".into()],
                text_body: "Ada wrote".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let event = to_event(InputTopic::Outbound, envelope(Payload::OutboundMessageQueued(queued)), String::new());
        let Fact::OutboundQueued(queued) = event.unwrap().fact else { panic!("queued") };
        assert!(queued.owner_notification);
        assert_eq!((queued.author.kind, queued.author.automation), ("automation", "owner_notification"));
        assert_eq!(
            (queued.kind, queued.recipient.as_str(), queued.text.as_str()),
            ("email", "ana@example.com", "Ada wrote")
        );

        let unfinished = switchboard_proto::events::v1::DeliveryAttemptRecorded {
            reply_id: Uuid::from_u128(1).to_string(),
            state: DeliveryState::Queued as i32,
            ..Default::default()
        };
        let error =
            to_event(InputTopic::Delivery, envelope(Payload::DeliveryAttemptRecorded(unfinished)), String::new())
                .unwrap_err();
        assert_eq!(error.0, "delivery_attempt_recorded is neither SENT nor FAILED");
        let misplaced =
            to_event(InputTopic::Delivery, envelope(Payload::InternalNoteAdded(Default::default())), String::new())
                .unwrap_err();
        assert!(misplaced.0.contains("does not belong on the delivery.v1 topic"), "{misplaced}");
    }
}
