//! Property tests: thousands of malformed inputs per parser. None may panic, and every refusal
//! must be a client error (4xx), never a "log unavailable" or anything that would make a
//! provider retry forever.
//!
//! Three kinds of input per parser: arbitrary bytes; a real fixture with random byte edits and
//! truncation; and (for the JSON channels) random JSON documents built from the provider's own
//! key names, so the parser sees the right shapes with the wrong types and nesting.

use chrono::Utc;
use proptest::prelude::*;
use serde_json::{Map, Value};

use crate::error::IngestError;
use crate::signature::sign_hex;
use crate::{calls, custom, email, forms, messenger, smtp, whatsapp};

const CASES: u32 = 2_000;

fn assert_client_error<T: std::fmt::Debug>(result: Result<T, IngestError>) {
    if let Err(error) = result {
        assert!(error.status().is_client_error(), "{error:?} is not a client error");
    }
}

/// A fixture with up to 16 byte edits and an optional truncation.
fn mutated(fixture: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..16),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(move |(edits, cut, truncate)| {
            let mut bytes = fixture.to_vec();
            for (index, byte) in edits {
                let at = index.index(bytes.len());
                bytes[at] = byte;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            bytes
        })
}

fn arbitrary_bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..2_048)
}

const KEYS: &[&str] = &[
    "object",
    "entry",
    "id",
    "time",
    "messaging",
    "sender",
    "recipient",
    "timestamp",
    "message",
    "mid",
    "text",
    "attachments",
    "type",
    "payload",
    "url",
    "coordinates",
    "lat",
    "long",
    "quick_reply",
    "postback",
    "title",
    "optin",
    "delivery",
    "mids",
    "watermark",
    "read",
    "is_echo",
    "changes",
    "field",
    "value",
    "metadata",
    "phone_number_id",
    "contacts",
    "wa_id",
    "profile",
    "name",
    "messages",
    "from",
    "body",
    "image",
    "document",
    "location",
    "latitude",
    "longitude",
    "interactive",
    "button_reply",
    "list_reply",
    "button",
    "statuses",
    "status",
    "recipient_id",
    "errors",
    "code",
    "submission_id",
    "fields",
    "hidden",
    "call_id",
    "state",
    "direction",
    "to",
    "duration_seconds",
    "message_id",
    "thread_id",
    "sender_id",
    "sent_at",
    "file_name",
];
const WORDS: &[&str] = &[
    "page",
    "whatsapp_business_account",
    "messages",
    "text",
    "image",
    "unsupported",
    "104212345678901",
    "106540352242922",
    "ringing",
    "completed",
    "inbound",
    "sideways",
    "",
    "SWITCHBOARD_CONSENT_GRANTED",
    "2026-03-03T10:00:00Z",
    "1749416383",
    "\u{0}",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|number| serde_json::Number::from_f64(number).map_or(Value::Null, Value::Number)),
        prop::sample::select(WORDS).prop_map(Value::from),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|entries| Value::Object(
                entries.into_iter().map(|(k, v)| (k.to_owned(), v)).collect::<Map<_, _>>()
            )),
        ]
    })
}

fn json_bytes() -> impl Strategy<Value = Vec<u8>> {
    json_value().prop_map(|value| serde_json::to_vec(&value).unwrap_or_default())
}

fn any_input(fixture: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![arbitrary_bytes(), mutated(fixture), json_bytes()]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn mime_parser_never_panics(raw in prop_oneof![arbitrary_bytes(), mutated(email::tests::MULTIPART.as_bytes())]) {
        let config = email::tests::email_config(false, true);
        assert_client_error(email::to_inbound_events(&config, &raw, &[], Utc::now()));
        assert_client_error(email::to_inbound_events(&config, &raw, &["support@example.com".into()], Utc::now()));
    }

    #[test]
    fn messenger_parser_never_panics(body in any_input(messenger::tests::DELIVERY.as_bytes())) {
        let (config, secrets) = messenger::tests::messenger_config(switchboard_proto::events::v1::ConsentMode::Explicit);
        // Correctly signed, so the parser itself is exercised, not just the signature check.
        let signature = messenger::tests::sign(&body);
        assert_client_error(messenger::to_events(&config, &secrets, Some(&signature), &body, Utc::now()));
    }

    #[test]
    fn whatsapp_parser_never_panics(body in any_input(whatsapp::tests::DELIVERY.as_bytes())) {
        let (config, secrets) = whatsapp::tests::whatsapp_config();
        let signature = whatsapp::tests::sign(&body);
        assert_client_error(whatsapp::to_events(&config, &secrets, Some(&signature), &body, Utc::now()));
    }

    #[test]
    fn forms_parser_never_panics(body in any_input(br#"{"submission_id":"s","fields":[{"name":"email","value":"a@b.c"},{"name":"ticket_stage","value":"new","hidden":false}]}"#)) {
        assert_client_error(forms::to_inbound_event(&forms::tests::forms_config(), "contact-form", &body, Utc::now()));
    }

    #[test]
    fn calls_parser_never_panics(body in any_input(br#"{"call_id":"CA1","state":"completed","direction":"inbound","from":"+1","to":"+2","duration_seconds":61}"#)) {
        assert_client_error(calls::to_inbound_event(&calls::tests::calling_config(), "phone", &body, Utc::now()));
    }

    #[test]
    fn custom_parser_never_panics(body in any_input(custom::tests::BODY), timestamp in prop_oneof![Just("now".to_owned()), ".{0,12}"]) {
        let (config, secrets) = custom::tests::custom_config();
        let now = Utc::now();
        let timestamp = if timestamp == "now" { now.timestamp().to_string() } else { timestamp };
        let signature = format!("v1={}", sign_hex(b"tg-key", &[timestamp.as_bytes(), b".", &body]));
        let request = custom::SignedRequest { timestamp: Some(&timestamp), signature: Some(&signature), body: &body };
        assert_client_error(custom::to_inbound_event(&config, &secrets, "telegram", request, now));
        let garbage_signature = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
        let request = custom::SignedRequest { timestamp: Some(&timestamp), signature: Some(&garbage_signature), body: &body };
        assert_client_error(custom::to_inbound_event(&config, &secrets, "telegram", request, now));
    }

    #[test]
    fn smtp_command_parser_never_panics(line in prop_oneof![
        arbitrary_bytes(),
        mutated(b"MAIL FROM:<juergen@kunde.example> SIZE=1024 BODY=8BITMIME\r\n"),
        mutated(b"RCPT TO:<@relay.example:support@example.com>\r\n"),
        "(?i)(helo|ehlo|mail from:|rcpt to:|data|rset|noop|quit|vrfy|starttls) ?[<>@:=a-z0-9 .\u{e9}]{0,40}\r?\n?".prop_map(String::into_bytes),
    ]) {
        let _ = smtp::parse_command(&line);
    }

    #[test]
    fn smtp_data_reader_never_panics_and_never_exceeds_its_limit(
        lines in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..50),
        limit in 0usize..4_000,
    ) {
        let mut data = smtp::DataReader::new(limit);
        for line in &lines {
            if data.push_line(line) {
                break;
            }
        }
        if let Some(message) = data.finish() {
            prop_assert!(message.len() <= limit);
        }
    }
}
