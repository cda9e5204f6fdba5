//! What every adapter shares: finding the configured channel a request is for, and building
//! the inbound event from what the adapter extracted.

use chrono::{DateTime, Utc};
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    ChannelConfigured, ChannelType, Envelope, InboundContent, InboundMessageReceived, Sender,
};
use switchboard_proto::names;
use switchboard_runtime::config_store::{ConfigSnapshot, Owned};
use switchboard_runtime::{envelope, ids};

use crate::error::IngestError;

/// Longest id (provider message id, thread key) accepted from a provider.
pub const MAX_ID_BYTES: usize = 512;
/// Longest message text kept in the event. Longer text is cut (on a character boundary) and
/// the cut is recorded in `provider_attributes["text_truncated"]`; Kafka's record limit is
/// 1 MiB, and a record the broker refuses would be a message lost.
pub const MAX_EVENT_TEXT_BYTES: usize = 256 * 1024;

/// The channel whose public address (the id in ingest's URLs) is `channel_id`; it must be of
/// type `expected`. Such addresses belong to one channel in the installation (M2), so the
/// channel, and with it the account, is found from the address alone.
pub fn resolve<'c>(
    config: &'c ConfigSnapshot,
    channel_id: &'c str,
    expected: ChannelType,
) -> Result<&'c Owned<ChannelConfigured>, IngestError> {
    let mut claimants = config.channels.with_id(channel_id);
    let Some(owned) = claimants.next() else {
        return Err(IngestError::UnknownChannel { channel_id: channel_id.to_owned() });
    };
    if claimants.next().is_some() {
        tracing::error!(channel_id, "several channels claim one channel address (M2); refusing the request");
        return Err(IngestError::AmbiguousChannel { channel_id: channel_id.to_owned() });
    }
    if owned.entity.channel_type != expected as i32 {
        let actual = ChannelType::try_from(owned.entity.channel_type).map_or("unknown", names::name).to_owned();
        return Err(IngestError::WrongChannelType {
            channel_id: channel_id.to_owned(),
            expected: names::name(expected),
            actual,
        });
    }
    Ok(owned)
}

/// Channels of one type whose settings match `matches` (team address, page id...).
pub fn find_by(
    config: &ConfigSnapshot,
    channel_type: ChannelType,
    mut matches: impl FnMut(&ChannelConfigured) -> bool,
) -> impl Iterator<Item = &Owned<ChannelConfigured>> {
    config
        .channels
        .iter()
        .filter(move |owned| owned.entity.channel_type == channel_type as i32 && matches(&owned.entity))
}

/// Checks a provider-supplied id: non-empty, bounded, no control characters.
pub fn require_id(field: &'static str, value: &str) -> Result<(), IngestError> {
    if value.trim().is_empty() {
        return Err(IngestError::InvalidField { field, problem: "must not be empty".into() });
    }
    if value.len() > MAX_ID_BYTES {
        return Err(IngestError::InvalidField { field, problem: format!("longer than {MAX_ID_BYTES} bytes") });
    }
    if value.chars().any(char::is_control) {
        return Err(IngestError::InvalidField { field, problem: "contains control characters".into() });
    }
    Ok(())
}

/// What an adapter extracted from one provider message.
#[derive(Debug, Clone, Default)]
pub struct Extracted {
    pub provider_message_id: String,
    pub thread_key: String,
    pub sender: Sender,
    pub text: String,
    pub content: InboundContent,
    /// The provider's time for the message, when it gives one.
    pub occurred_at: Option<DateTime<Utc>>,
}

/// The inbound event for `extracted` on `channel`. The message id is a function of the account,
/// the channel and the provider's id (B1, M1); the record is keyed by account (one writer per account).
pub fn inbound_event(channel: &Owned<ChannelConfigured>, extracted: Extracted, received_at: DateTime<Utc>) -> Envelope {
    let Extracted { provider_message_id, thread_key, sender, mut text, mut content, occurred_at } = extracted;
    if text.len() > MAX_EVENT_TEXT_BYTES {
        let mut cut = MAX_EVENT_TEXT_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        content.provider_attributes.insert("text_truncated".into(), "true".into());
    }
    let entity = &channel.entity;
    let inbound = InboundMessageReceived {
        channel_id: entity.channel_id.clone(),
        inbox_id: entity.inbox_id.clone(),
        channel_type: entity.channel_type,
        message_id: ids::message_id_for(&channel.account_id, &entity.channel_id, &provider_message_id).to_string(),
        provider_message_id,
        thread_key,
        sender: Some(sender),
        text,
        content: Some(Box::new(content)),
        // C11: a switched-off channel's messages are still recorded, marked as such.
        channel_disabled_at_ingest: !entity.enabled,
    };
    envelope::new_root(
        &channel.account_id,
        &channel.account_id,
        occurred_at.unwrap_or(received_at),
        Payload::InboundMessageReceived(inbound),
    )
}

/// A non-message event (consent, delivery status) for `channel`, keyed by account.
pub fn account_event(channel: &Owned<ChannelConfigured>, occurred_at: DateTime<Utc>, payload: Payload) -> Envelope {
    envelope::new_root(&channel.account_id, &channel.account_id, occurred_at, payload)
}

/// Unix seconds (as providers send them) to a time; out-of-range values are ignored.
pub fn from_unix_seconds(seconds: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(seconds, 0)
}

/// Unix milliseconds (Messenger's clock) to a time.
pub fn from_unix_millis(millis: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(millis)
}
