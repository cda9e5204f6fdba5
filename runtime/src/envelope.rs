//! Building, encoding and decoding the event envelope (`switchboard.events.v1.Envelope`).

use chrono::{DateTime, Utc};
use prost::Message;
use prost_types::Timestamp;
use switchboard_proto::events::v1::{Envelope, envelope::Payload};
use uuid::Uuid;

/// Schema version of every payload this build writes.
/// - 1: the first.
/// - 2: ids derived from a provider identity (message ids, contact ids) name the account (M1).
pub const SCHEMA_VERSION: u32 = 2;
/// The first schema version whose derived ids name the account.
pub const ACCOUNT_SCOPED_IDS: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("record has no value")]
    EmptyRecord,
    #[error("record is not a valid envelope: {0}")]
    Undecodable(#[from] prost::DecodeError),
    #[error("envelope {event_id} has no payload (written by a newer schema?)")]
    MissingPayload { event_id: String },
}

/// Decodes a record value into an envelope that has a payload.
pub fn decode(bytes: Option<&[u8]>) -> Result<Envelope, EnvelopeError> {
    let bytes = bytes.ok_or(EnvelopeError::EmptyRecord)?;
    let envelope = Envelope::decode(bytes)?;
    if envelope.payload.is_none() {
        return Err(EnvelopeError::MissingPayload { event_id: envelope.event_id });
    }
    Ok(envelope)
}

pub fn encode(envelope: &Envelope) -> Vec<u8> {
    envelope.encode_to_vec()
}

/// Appends the encoding of `envelope` to `buffer` (hot paths reuse one buffer).
pub fn encode_into(envelope: &Envelope, buffer: &mut Vec<u8>) {
    buffer.reserve(envelope.encoded_len());
    envelope.encode_raw(buffer);
}

/// An envelope for an event entering the system (no cause): fresh UUIDv7, correlation id = its
/// own id, recorded now.
pub fn new_root(account_id: &str, partition_key: &str, occurred_at: DateTime<Utc>, payload: Payload) -> Envelope {
    let event_id = crate::ids::new_event_id().to_string();
    Envelope {
        correlation_id: event_id.clone(),
        event_id,
        occurred_at: Some(timestamp(occurred_at)),
        recorded_at: Some(timestamp(Utc::now())),
        partition_key: partition_key.to_owned(),
        causation_id: String::new(),
        schema_version: SCHEMA_VERSION,
        account_id: account_id.to_owned(),
        source_position: None,
        payload: Some(payload),
    }
}

/// An envelope derived from `cause` (the `index`-th event derived from it). Everything is a
/// function of the cause, so re-deriving gives identical bytes.
pub fn derived_from(cause: &Envelope, index: usize, payload: Payload) -> Envelope {
    let event_id = derived_id(cause, &index.to_string());
    Envelope {
        event_id: event_id.to_string(),
        occurred_at: cause.occurred_at,
        recorded_at: cause.recorded_at,
        partition_key: cause.partition_key.clone(),
        causation_id: cause.event_id.clone(),
        correlation_id: if cause.correlation_id.is_empty() {
            cause.event_id.clone()
        } else {
            cause.correlation_id.clone()
        },
        schema_version: SCHEMA_VERSION,
        account_id: cause.account_id.clone(),
        // Set by the shell that knows where the cause was read; `decide` stays offset-agnostic.
        source_position: None,
        payload: Some(payload),
    }
}

/// An id derived from `cause` for `purpose` (e.g. "conversation", or an event's index): a
/// UUIDv7 stamped with the cause's recorded-at, with bits hashed from the cause's id and the
/// purpose. The one recipe for every id the router derives, so replays reproduce them (B4).
pub fn derived_id(cause: &Envelope, purpose: &str) -> Uuid {
    crate::ids::derived_v7(recorded_at_millis(cause), &format!("{}/{purpose}", cause.event_id))
}

/// The envelope's recorded-at as unix millis (0 if absent): event time for pure logic.
pub fn recorded_at_millis(envelope: &Envelope) -> u64 {
    envelope.recorded_at.as_ref().map(timestamp_millis).unwrap_or(0)
}

pub fn timestamp(at: DateTime<Utc>) -> Timestamp {
    Timestamp { seconds: at.timestamp(), nanos: at.timestamp_subsec_nanos() as i32 }
}

pub fn timestamp_millis(at: &Timestamp) -> u64 {
    (at.seconds.max(0) as u64) * 1000 + (at.nanos.max(0) as u64) / 1_000_000
}

pub fn to_datetime(at: Option<&Timestamp>) -> DateTime<Utc> {
    at.and_then(|at| DateTime::from_timestamp(at.seconds, at.nanos.max(0) as u32)).unwrap_or(DateTime::UNIX_EPOCH)
}

/// Short, stable name of a payload case (`inbound_message_received`), used in the
/// `sb-event-type` header and in logs: the variant's name in snake_case, derived by the
/// generated code (proto/build.rs), so a new event type needs no entry here.
pub fn payload_name(payload: &Payload) -> &'static str {
    payload.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_proto::events::v1::InboxConfigured;

    /// `sb-event-type` values are read by consumers outside Switchboard (and by operators'
    /// filters): derived names must stay the names these headers always had.
    #[test]
    fn payload_names_are_the_snake_case_names_headers_always_carried() {
        let pinned = [
            (Payload::InboundMessageReceived(Default::default()), "inbound_message_received"),
            (Payload::ConversationStarted(Default::default()), "conversation_started"),
            (Payload::MessageAppended(Default::default()), "message_appended"),
            (Payload::ConversationAssigned(Default::default()), "conversation_assigned"),
            (Payload::ConversationLeftUnassigned(Default::default()), "conversation_left_unassigned"),
            (Payload::InboxConfigured(Default::default()), "inbox_configured"),
            (Payload::ChannelConfigured(Default::default()), "channel_configured"),
            (Payload::RoutingRulesConfigured(Default::default()), "routing_rules_configured"),
            (Payload::AgentConfigured(Default::default()), "agent_configured"),
            (Payload::ContactConsentReceived(Default::default()), "contact_consent_received"),
            (Payload::DeliveryStatusReported(Default::default()), "delivery_status_reported"),
            (Payload::AgentAvailabilityChanged(Default::default()), "agent_availability_changed"),
            (Payload::ManualAssignmentRequested(Default::default()), "manual_assignment_requested"),
            (Payload::ConversationCloseRequested(Default::default()), "conversation_close_requested"),
            (Payload::TicketStageChangeRequested(Default::default()), "ticket_stage_change_requested"),
            (Payload::ContactCreated(Default::default()), "contact_created"),
            (Payload::MessageWithheld(Default::default()), "message_withheld"),
            (Payload::ConversationUnassigned(Default::default()), "conversation_unassigned"),
            (Payload::ConversationClosed(Default::default()), "conversation_closed"),
            (Payload::TicketCreated(Default::default()), "ticket_created"),
            (Payload::TicketNotCreated(Default::default()), "ticket_not_created"),
            (Payload::TicketStageChanged(Default::default()), "ticket_stage_changed"),
            (Payload::OwnerNotificationRequested(Default::default()), "owner_notification_requested"),
            (Payload::CommandRejected(Default::default()), "command_rejected"),
            (Payload::ContactOwnerChangeRequested(Default::default()), "contact_owner_change_requested"),
            (Payload::ContactOwnerChanged(Default::default()), "contact_owner_changed"),
            (Payload::TicketSettingsConfigured(Default::default()), "ticket_settings_configured"),
        ];
        for (payload, name) in pinned {
            assert_eq!(payload_name(&payload), name);
        }
    }

    fn inbox_payload() -> Payload {
        Payload::InboxConfigured(InboxConfigured {
            inbox_id: "inbox-1".into(),
            name: "Support".into(),
            ..Default::default()
        })
    }

    #[test]
    fn envelopes_round_trip_and_garbage_is_rejected() {
        let envelope = new_root("acct", "inbox/inbox-1", Utc::now(), inbox_payload());
        assert_eq!(decode(Some(&encode(&envelope))).unwrap(), envelope);
        assert!(matches!(decode(None), Err(EnvelopeError::EmptyRecord)));
        assert!(matches!(decode(Some(&[0xff, 0xff, 0xff])), Err(EnvelopeError::Undecodable(_))));
        let without_payload = Envelope { payload: None, ..envelope };
        assert!(matches!(decode(Some(&encode(&without_payload))), Err(EnvelopeError::MissingPayload { .. })));
    }

    #[test]
    fn b4_derived_envelopes_are_a_pure_function_of_their_cause() {
        let cause = new_root("acct", "acct", Utc::now(), inbox_payload());
        let first = derived_from(&cause, 0, inbox_payload());
        assert_eq!(first, derived_from(&cause, 0, inbox_payload()));
        assert_ne!(first.event_id, derived_from(&cause, 1, inbox_payload()).event_id);
        assert_eq!(first.causation_id, cause.event_id);
        assert_eq!(first.correlation_id, cause.event_id);
    }
}
