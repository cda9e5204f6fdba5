//! Calling (spec C9): call lifecycle events from the telephony provider. Every event of a call
//! joins the thread of its call id, so ringing → answered → completed (or missed, voicemail)
//! build one conversation alongside chat and email.
//!
//! `POST /v1/channels/{channel_id}/calls/events`
//! ```json
//! {"event_id": "evt-9", "call_id": "CA5f1e", "state": "completed", "direction": "inbound",
//!  "from": "+4930123456", "to": "+4930999999", "duration_seconds": 184,
//!  "recording_url": "https://…/rec.mp3", "transcript_url": "https://…/t.txt",
//!  "occurred_at": "2026-03-03T10:03:04Z", "caller_name": "Kim"}
//! ```

use chrono::{DateTime, Utc};
use serde::Deserialize;
use switchboard_proto::events::v1::{
    CallDetails, CallDirection, CallState, ChannelType, Envelope, InboundContent, MessageKind, Sender,
};
use switchboard_runtime::config_store::ConfigSnapshot;

use crate::channel::{self, Extracted, require_id};
use crate::error::IngestError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallEvent {
    /// The provider's id for this lifecycle event; defaults to `<call_id>:<state>` (each state
    /// happens once per call), so retries are recognised either way.
    #[serde(default)]
    pub event_id: Option<String>,
    pub call_id: String,
    pub state: String,
    pub direction: String,
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub duration_seconds: Option<u32>,
    #[serde(default)]
    pub recording_url: Option<String>,
    #[serde(default)]
    pub transcript_url: Option<String>,
    #[serde(default)]
    pub occurred_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub caller_name: Option<String>,
}

fn parse_state(state: &str) -> Result<CallState, IngestError> {
    Ok(match state {
        "ringing" => CallState::Ringing,
        "answered" => CallState::Answered,
        "completed" => CallState::Completed,
        "missed" => CallState::Missed,
        "voicemail" => CallState::Voicemail,
        other => {
            return Err(IngestError::InvalidField {
                field: "state",
                problem: format!("`{other}` is not one of ringing, answered, completed, missed, voicemail"),
            });
        }
    })
}

fn parse_direction(direction: &str) -> Result<CallDirection, IngestError> {
    match direction {
        "inbound" => Ok(CallDirection::Inbound),
        "outbound" => Ok(CallDirection::Outbound),
        other => Err(IngestError::InvalidField {
            field: "direction",
            problem: format!("`{other}` is not inbound or outbound"),
        }),
    }
}

/// What the inbox shows for the event.
fn summary(state: CallState, direction: CallDirection, other_party: &str, duration_seconds: u32) -> String {
    let direction_word = if direction == CallDirection::Inbound { "inbound" } else { "outbound" };
    let preposition = if direction == CallDirection::Inbound { "from" } else { "to" };
    match state {
        CallState::Ringing => format!("Incoming call {preposition} {other_party}"),
        CallState::Answered => format!("Call {preposition} {other_party} answered"),
        CallState::Completed => {
            format!(
                "Completed {direction_word} call {preposition} {other_party} ({}m {:02}s)",
                duration_seconds / 60,
                duration_seconds % 60
            )
        }
        CallState::Missed => format!("Missed {direction_word} call {preposition} {other_party}"),
        CallState::Voicemail => format!("Voicemail {preposition} {other_party}"),
        CallState::Unspecified => format!("Call {preposition} {other_party}"),
    }
}

pub fn to_inbound_event(
    config: &ConfigSnapshot,
    channel_id: &str,
    body: &[u8],
    received_at: DateTime<Utc>,
) -> Result<Envelope, IngestError> {
    let channel = channel::resolve(config, channel_id, ChannelType::Calling)?;
    let event: CallEvent =
        serde_json::from_slice(body).map_err(|error| IngestError::MalformedBody(error.to_string()))?;
    require_id("call_id", &event.call_id)?;
    require_id("from", &event.from)?;
    require_id("to", &event.to)?;
    let state = parse_state(&event.state)?;
    let direction = parse_direction(&event.direction)?;
    let provider_message_id = match event.event_id {
        Some(event_id) => {
            require_id("event_id", &event_id)?;
            event_id
        }
        None => format!("{}:{}", event.call_id, event.state),
    };
    // The customer is the caller on inbound calls and the callee on outbound ones.
    let customer_number = if direction == CallDirection::Inbound { &event.from } else { &event.to };
    let duration_seconds = event.duration_seconds.unwrap_or_default();
    let text = summary(state, direction, customer_number, duration_seconds);
    let content = InboundContent {
        kind: MessageKind::Call as i32,
        call: Some(CallDetails {
            call_id: event.call_id.clone(),
            state: state as i32,
            direction: direction as i32,
            from_number: event.from.clone(),
            to_number: event.to.clone(),
            duration_seconds,
            recording_ref: event.recording_url.unwrap_or_default(),
            transcript_ref: event.transcript_url.unwrap_or_default(),
        }),
        ..Default::default()
    };
    let extracted = Extracted {
        provider_message_id,
        thread_key: format!("call:{}", event.call_id),
        sender: Sender {
            external_id: customer_number.clone(),
            display_name: event.caller_name.unwrap_or_default(),
            email: String::new(),
        },
        text,
        content,
        occurred_at: event.occurred_at,
    };
    Ok(channel::inbound_event(channel, extracted, received_at))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use switchboard_proto::events::v1::ChannelConfigured;
    use switchboard_proto::events::v1::envelope::Payload;
    use switchboard_runtime::config_store::Owned;

    pub(crate) fn calling_config() -> ConfigSnapshot {
        let mut config = ConfigSnapshot::default();
        config.channels.insert(Owned {
            account_id: "acct".into(),
            entity: ChannelConfigured {
                channel_id: "phone".into(),
                inbox_id: "support".into(),
                channel_type: ChannelType::Calling as i32,
                enabled: true,
                ..Default::default()
            },
        });
        config
    }

    fn inbound(body: &str) -> switchboard_proto::events::v1::InboundMessageReceived {
        let event = to_inbound_event(&calling_config(), "phone", body.as_bytes(), Utc::now()).unwrap();
        let Some(Payload::InboundMessageReceived(inbound)) = event.payload else { panic!() };
        inbound
    }

    #[test]
    fn c9_call_lifecycle_events_share_the_call_thread() {
        let ringing =
            inbound(r#"{"call_id":"CA1","state":"ringing","direction":"inbound","from":"+4930123","to":"+4930999"}"#);
        let completed = inbound(
            r#"{"event_id":"e2","call_id":"CA1","state":"completed","direction":"inbound","from":"+4930123","to":"+4930999","duration_seconds":184,"recording_url":"https://rec/1.mp3"}"#,
        );
        assert_eq!(ringing.thread_key, "call:CA1");
        assert_eq!(ringing.thread_key, completed.thread_key);
        assert_eq!(ringing.provider_message_id, "CA1:ringing");
        assert_ne!(ringing.message_id, completed.message_id);
        assert_eq!(ringing.sender.unwrap().external_id, "+4930123");
        assert_eq!(completed.text, "Completed inbound call from +4930123 (3m 04s)");
        let call = completed.content.unwrap().call.unwrap();
        assert_eq!(call.state, CallState::Completed as i32);
        assert_eq!(call.duration_seconds, 184);
        assert_eq!(call.recording_ref, "https://rec/1.mp3");
        let outbound_missed =
            inbound(r#"{"call_id":"CA2","state":"missed","direction":"outbound","from":"+4930999","to":"+1555"}"#);
        assert_eq!(outbound_missed.sender.unwrap().external_id, "+1555");
    }

    #[test]
    fn c9_unknown_states_and_directions_are_named() {
        let config = calling_config();
        let bad_state = br#"{"call_id":"c","state":"exploded","direction":"inbound","from":"1","to":"2"}"#;
        assert!(matches!(
            to_inbound_event(&config, "phone", bad_state, Utc::now()),
            Err(IngestError::InvalidField { field: "state", .. })
        ));
        let bad_direction = br#"{"call_id":"c","state":"missed","direction":"sideways","from":"1","to":"2"}"#;
        assert!(matches!(
            to_inbound_event(&config, "phone", bad_direction, Utc::now()),
            Err(IngestError::InvalidField { field: "direction", .. })
        ));
    }
}
