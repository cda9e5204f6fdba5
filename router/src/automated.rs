//! O6: the automated messages the router decides, built as complete `OutboundMessageQueued`
//! events (docs/outbound.md): R4's email to an offline contact owner, and C6's Messenger
//! greeting, instant reply and consent prompt. Pure builders: `decide` chooses when, these say
//! what goes out. Everything the delivery service needs is resolved here, from the config the
//! decision saw, so a replay of the log sends nothing different.

use switchboard_proto::events::v1::{
    AgentConfigured, Author, AuthorKind, Automation, Envelope, InboundMessageReceived, InboxConfigured,
    MessengerMessagingType, MessengerQuickReply, OutboundEmail, OutboundMessageQueued, OutboundMessenger,
    OutboundPurpose,
};
use switchboard_runtime::envelope::{recorded_at_millis, timestamp_millis};
use switchboard_runtime::outbound::{
    CONSENT_DECLINED_PAYLOAD, CONSENT_GRANTED_PAYLOAD, email_message_id, fallback_identity,
};
use switchboard_runtime::reply_window::STANDARD_WINDOW;
use uuid::Uuid;

use crate::state::sender_identity;

/// The author name automated messages show when nothing more specific is configured.
pub const AUTOMATION_AUTHOR_NAME: &str = "Switchboard";
/// At most this many characters of the customer's message are quoted in an owner notification.
pub const PREVIEW_CHARS: usize = 500;

/// C6: whether an automated message may still go out for the customer interaction `cause`:
/// the cause's recorded time minus its occurred time (when the customer wrote, or agreed to
/// the consent prompt) is at most the 24-hour standard window. A cause without an occurred time
/// proves nothing, so nothing automated is sent for it. Pure: event time only.
pub fn within_standard_window(cause: &Envelope) -> bool {
    let Some(occurred_at) = cause.occurred_at.as_ref() else { return false };
    let window_millis = STANDARD_WINDOW.num_milliseconds() as u64;
    recorded_at_millis(cause).saturating_sub(timestamp_millis(occurred_at)) <= window_millis
}

/// What an R4 owner notification is about.
pub struct OwnerNotification<'a> {
    pub account_id: &'a str,
    pub reply_id: Uuid,
    pub owner: &'a AgentConfigured,
    /// The conversation's inbox (a blank one with only its id when it is not configured: the
    /// fallback address is then derived, C12).
    pub inbox: &'a InboxConfigured,
    pub conversation_id: &'a str,
    pub channel_type: i32,
    pub message: &'a InboundMessageReceived,
}

/// R4: the email telling an offline contact owner about a new message, from the inbox's
/// fallback identity (C12: the one address every inbox has). `None` when the owner has no email
/// address: there is nobody to send it to.
pub fn owner_notification_email(notification: &OwnerNotification<'_>) -> Option<OutboundMessageQueued> {
    let OwnerNotification { account_id, reply_id, owner, inbox, conversation_id, channel_type, message } =
        *notification;
    if owner.email.trim().is_empty() {
        return None;
    }
    let (from_address, from_name) = fallback_identity(account_id, inbox);
    let contact = contact_label(message);
    let inbox_label = if inbox.name.is_empty() { inbox.inbox_id.as_str() } else { inbox.name.as_str() };
    let subject = format!("New message from {contact} in {inbox_label}");
    let text = format!(
        "{contact} wrote in {inbox_label} while you were offline:\n\n{preview}\n\nConversation: {conversation_id}\n",
        preview = quoted_preview(message),
    );
    let message_id_header = email_message_id(reply_id, &from_address);
    let reply_id = reply_id.hyphenated().to_string();
    Some(OutboundMessageQueued {
        reply_id,
        conversation_id: conversation_id.to_owned(),
        inbox_id: inbox.inbox_id.clone(),
        channel_id: message.channel_id.clone(),
        channel_type,
        purpose: OutboundPurpose::OwnerNotification as i32,
        author: Some(automation_author(AUTOMATION_AUTHOR_NAME, Automation::OwnerNotification)),
        text: text.clone(),
        recipient: owner.email.clone(),
        recipient_name: owner.name.clone(),
        idempotency_key: message_id_header.clone(),
        email: Some(OutboundEmail {
            from_name,
            from_address,
            to: vec![owner.email.clone()],
            subject,
            message_id_header,
            from_fallback_address: true,
            text_body: text,
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// A C6 automated Messenger message to the sender of `message` (recipient: the PSID), sent as a
/// standard RESPONSE: only ever decided inside the 24-hour window.
pub struct MessengerAutomation<'a> {
    pub reply_id: String,
    pub automation: Automation,
    pub text: &'a str,
    pub page_id: &'a str,
    /// Empty for the consent prompt: the thread's messages are held, no conversation exists yet.
    pub conversation_id: &'a str,
    pub inbox_id: &'a str,
    pub channel_type: i32,
    /// Shown as the author: the page's channel name.
    pub author_name: &'a str,
    pub message: &'a InboundMessageReceived,
}

pub fn messenger_message(automated: MessengerAutomation<'_>) -> OutboundMessageQueued {
    let MessengerAutomation {
        reply_id,
        automation,
        text,
        page_id,
        conversation_id,
        inbox_id,
        channel_type,
        author_name,
        message,
    } = automated;
    let author_name = if author_name.is_empty() { AUTOMATION_AUTHOR_NAME } else { author_name };
    OutboundMessageQueued {
        idempotency_key: reply_id.clone(),
        reply_id,
        conversation_id: conversation_id.to_owned(),
        inbox_id: inbox_id.to_owned(),
        channel_id: message.channel_id.clone(),
        channel_type,
        purpose: OutboundPurpose::ConversationReply as i32,
        author: Some(automation_author(author_name, automation)),
        text: text.to_owned(),
        recipient: sender_identity(message).to_owned(),
        recipient_name: message.sender.as_ref().map(|sender| sender.display_name.clone()).unwrap_or_default(),
        messenger: Some(OutboundMessenger {
            page_id: page_id.to_owned(),
            messaging_type: MessengerMessagingType::Response as i32,
            quick_replies: quick_replies_of(automation),
        }),
        thread_key: message.thread_key.clone(),
        ..Default::default()
    }
}

/// The titles of the consent prompt's two buttons.
pub const CONSENT_GRANTED_TITLE: &str = "Yes, continue";
pub const CONSENT_DECLINED_TITLE: &str = "No, thanks";

/// C6: the consent prompt asks a question, so it offers the two answers as quick replies whose
/// payloads ingest recognises; other automated messages offer none.
fn quick_replies_of(automation: Automation) -> Vec<MessengerQuickReply> {
    if automation != Automation::ConsentPrompt {
        return Vec::new();
    }
    [(CONSENT_GRANTED_TITLE, CONSENT_GRANTED_PAYLOAD), (CONSENT_DECLINED_TITLE, CONSENT_DECLINED_PAYLOAD)]
        .into_iter()
        .map(|(title, payload)| MessengerQuickReply { title: title.to_owned(), payload: payload.to_owned() })
        .collect()
}

fn automation_author(name: &str, automation: Automation) -> Author {
    Author {
        kind: AuthorKind::Automation as i32,
        name: name.to_owned(),
        automation: automation as i32,
        ..Default::default()
    }
}

/// The customer as the owner knows them: name, else email, else the channel identity.
fn contact_label(message: &InboundMessageReceived) -> String {
    let sender = message.sender.clone().unwrap_or_default();
    [sender.display_name, sender.email]
        .into_iter()
        .find(|label| !label.trim().is_empty())
        .unwrap_or_else(|| sender_identity(message).to_owned())
}

/// The message's text (or its preview when it had only HTML), cut at [`PREVIEW_CHARS`] and
/// quoted line by line.
fn quoted_preview(message: &InboundMessageReceived) -> String {
    let preview = message.content.as_ref().map(|content| content.preview.as_str()).unwrap_or_default();
    let text = if message.text.trim().is_empty() { preview } else { message.text.as_str() };
    if text.trim().is_empty() {
        return "> (no text)".to_owned();
    }
    let mut cut: String = text.chars().take(PREVIEW_CHARS).collect();
    if text.chars().nth(PREVIEW_CHARS).is_some() {
        cut.push('…');
    }
    cut.lines().map(|line| format!("> {line}")).collect::<Vec<_>>().join("\n")
}
