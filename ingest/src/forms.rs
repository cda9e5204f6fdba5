//! Forms (spec C7): a form submission becomes a conversation of its own. Every field is kept
//! with its hidden flag (hidden fields reach the contact timeline, never the inbox view); the
//! ticket properties a form may carry are recognised by field name, and the pipeline and stage
//! fields are always hidden.
//!
//! `POST /v1/channels/{channel_id}/forms/submissions`
//! ```json
//! {"submission_id": "sub-81f2", "form_id": "contact-us", "submitted_at": "2026-03-03T10:00:00Z",
//!  "fields": [{"name": "email", "value": "kim@example.org"},
//!             {"name": "ticket_name", "value": "Refund"},
//!             {"name": "utm_source", "value": "newsletter", "hidden": true}]}
//! ```

use chrono::{DateTime, Utc};
use serde::Deserialize;
use switchboard_proto::events::v1::{
    ChannelType, Envelope, FormField, FormTicketFields, InboundContent, MessageKind, Sender,
};
use switchboard_runtime::config_store::ConfigSnapshot;

use crate::channel::{self, Extracted, require_id};
use crate::error::IngestError;

const MAX_FIELDS: usize = 200;
const MAX_FIELD_VALUE_BYTES: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormSubmission {
    /// The form provider's id for this submission; a retry carries the same id (B1).
    pub submission_id: String,
    #[serde(default)]
    pub form_id: Option<String>,
    #[serde(default)]
    pub submitted_at: Option<DateTime<Utc>>,
    pub fields: Vec<SubmittedField>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmittedField {
    pub name: String,
    #[serde(default)]
    pub value: String,
    #[serde(default)]
    pub hidden: bool,
}

/// Which ticket property a field name carries, if any.
fn ticket_property(name: &str) -> Option<&'static str> {
    match name.to_ascii_lowercase().as_str() {
        "ticket_name" | "ticket.name" | "subject" => Some("name"),
        "ticket_description" | "ticket.description" | "description" => Some("description"),
        "ticket_pipeline" | "ticket.pipeline" | "pipeline" | "hs_pipeline" => Some("pipeline"),
        "ticket_stage" | "ticket.stage" | "ticket_status" | "stage" | "status" | "hs_pipeline_stage" => Some("stage"),
        _ => None,
    }
}

pub fn to_inbound_event(
    config: &ConfigSnapshot,
    channel_id: &str,
    body: &[u8],
    received_at: DateTime<Utc>,
) -> Result<Envelope, IngestError> {
    let channel = channel::resolve(config, channel_id, ChannelType::Forms)?;
    let submission: FormSubmission =
        serde_json::from_slice(body).map_err(|error| IngestError::MalformedBody(error.to_string()))?;
    require_id("submission_id", &submission.submission_id)?;
    if submission.fields.is_empty() {
        return Err(IngestError::InvalidField {
            field: "fields",
            problem: "a submission needs at least one field".into(),
        });
    }
    if submission.fields.len() > MAX_FIELDS {
        return Err(IngestError::InvalidField { field: "fields", problem: format!("more than {MAX_FIELDS} fields") });
    }
    let mut ticket = FormTicketFields::default();
    let mut fields = Vec::with_capacity(submission.fields.len());
    let mut sender = Sender::default();
    for field in submission.fields {
        require_id("fields[].name", &field.name)?;
        if field.value.len() > MAX_FIELD_VALUE_BYTES {
            return Err(IngestError::InvalidField {
                field: "fields[].value",
                problem: format!("`{}` is longer than {MAX_FIELD_VALUE_BYTES} bytes", field.name),
            });
        }
        let property = ticket_property(&field.name);
        match property {
            Some("name") => ticket.name = field.value.clone(),
            Some("description") => ticket.description = field.value.clone(),
            Some("pipeline") => ticket.pipeline = field.value.clone(),
            Some("stage") => ticket.stage = field.value.clone(),
            _ => {}
        }
        match field.name.to_ascii_lowercase().as_str() {
            "email" if sender.email.is_empty() => sender.email = field.value.trim().to_owned(),
            "name" | "full_name" if sender.display_name.is_empty() => {
                sender.display_name = field.value.trim().to_owned()
            }
            "firstname" | "first_name" if sender.display_name.is_empty() => {
                sender.display_name = field.value.trim().to_owned()
            }
            _ => {}
        }
        // C7: pipeline and status fields are hidden whatever the form says.
        let hidden = field.hidden || matches!(property, Some("pipeline" | "stage"));
        fields.push(FormField { name: field.name, value: field.value, hidden });
    }
    sender.external_id = if sender.email.is_empty() {
        format!("form-submission:{}", submission.submission_id)
    } else {
        sender.email.to_ascii_lowercase()
    };
    // The inbox shows the visible fields only; hidden ones stay in `form_fields`.
    let text = fields
        .iter()
        .filter(|field| !field.hidden)
        .map(|field| format!("{}: {}", field.name, field.value))
        .collect::<Vec<_>>()
        .join("\n");
    let mut content = InboundContent {
        kind: MessageKind::FormSubmission as i32,
        subject: ticket.name.clone(),
        form_fields: fields,
        form_ticket: Some(ticket),
        ..Default::default()
    };
    if let Some(form_id) = submission.form_id {
        content.provider_attributes.insert("form_id".into(), form_id);
    }
    let extracted = Extracted {
        // Each submission is its own conversation (C7).
        thread_key: format!("form-submission:{}", submission.submission_id),
        provider_message_id: submission.submission_id,
        sender,
        text,
        content,
        occurred_at: submission.submitted_at,
    };
    Ok(channel::inbound_event(channel, extracted, received_at))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use switchboard_proto::events::v1::ChannelConfigured;
    use switchboard_proto::events::v1::envelope::Payload;
    use switchboard_runtime::config_store::Owned;

    pub(crate) fn forms_config() -> ConfigSnapshot {
        let mut config = ConfigSnapshot::default();
        config.channels.insert(Owned {
            account_id: "acct".into(),
            entity: ChannelConfigured {
                channel_id: "contact-form".into(),
                inbox_id: "support".into(),
                channel_type: ChannelType::Forms as i32,
                enabled: true,
                ..Default::default()
            },
        });
        config
    }

    #[test]
    fn c7_form_fields_keep_their_hidden_flag_and_ticket_fields_are_recognised() {
        let body = br#"{"submission_id":"sub-1","form_id":"contact-us","fields":[
            {"name":"email","value":"kim@example.org"},
            {"name":"name","value":"Kim"},
            {"name":"ticket_name","value":"Refund request"},
            {"name":"ticket_description","value":"Charged twice"},
            {"name":"ticket_pipeline","value":"support"},
            {"name":"ticket_stage","value":"new"},
            {"name":"utm_source","value":"newsletter","hidden":true}]}"#;
        let event = to_inbound_event(&forms_config(), "contact-form", body, Utc::now()).unwrap();
        let Some(Payload::InboundMessageReceived(inbound)) = event.payload else { panic!() };
        assert_eq!(inbound.thread_key, "form-submission:sub-1");
        assert_eq!(inbound.sender.as_ref().unwrap().email, "kim@example.org");
        let content = inbound.content.unwrap();
        let ticket = content.form_ticket.unwrap();
        assert_eq!(
            (ticket.name.as_str(), ticket.description.as_str(), ticket.pipeline.as_str(), ticket.stage.as_str()),
            ("Refund request", "Charged twice", "support", "new")
        );
        let hidden: Vec<_> = content.form_fields.iter().filter(|f| f.hidden).map(|f| f.name.as_str()).collect();
        assert_eq!(hidden, ["ticket_pipeline", "ticket_stage", "utm_source"]);
        assert!(!inbound.text.contains("newsletter"), "hidden values stay out of the inbox text");
        assert!(inbound.text.contains("ticket_name: Refund request"));
    }

    #[test]
    fn c7_bad_submissions_name_the_problem() {
        let config = forms_config();
        let cases: [(&[u8], &str); 3] = [
            (br#"{"submission_id":"","fields":[{"name":"a","value":"b"}]}"#, "submission_id"),
            (br#"{"submission_id":"s","fields":[]}"#, "fields"),
            (br#"{"submission_id":"s","fields":[{"name":"","value":"b"}]}"#, "fields[].name"),
        ];
        for (body, expected) in cases {
            match to_inbound_event(&config, "contact-form", body, Utc::now()) {
                Err(IngestError::InvalidField { field, .. }) => assert_eq!(field, expected),
                other => panic!("expected {expected}, got {other:?}"),
            }
        }
        assert!(matches!(
            to_inbound_event(&config, "contact-form", b"{\"submission_id\":1}", Utc::now()),
            Err(IngestError::MalformedBody(_))
        ));
        assert!(matches!(
            to_inbound_event(&config, "nope", b"{}", Utc::now()),
            Err(IngestError::UnknownChannel { .. })
        ));
    }
}
