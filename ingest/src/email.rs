//! Team email (spec C1–C4): a raw RFC 5322 message, as an SMTP client delivers it or an
//! inbound-mail relay posts it, becomes one inbound event per team channel it was sent to.
//!
//! Parsing is `mail-parser`'s (multipart, encoded words, charsets, quoted-printable/base64);
//! this module decides what Switchboard keeps: the team address that picks the channel, the
//! thread (root of References / In-Reply-To / Message-ID), attachments as metadata with a
//! SHA-256 of their decoded bytes, a plain-text preview (HTML converted when there is no text
//! part) and, for forwarded mail, whom it is logged to (C3).

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use mail_parser::{Address, HeaderValue, Message, MessageParser, MimeHeaders, PartType};
use sha2::{Digest, Sha256};
use switchboard_proto::events::v1::{
    Attachment, ChannelConfigured, ChannelType, EmailDetails, Envelope, InboundContent, MessageKind, Sender,
};
use switchboard_runtime::config_store::{ConfigSnapshot, Owned};

use crate::channel::{self, Extracted};
use crate::error::IngestError;

/// Characters of body text kept as the preview.
const PREVIEW_CHARS: usize = 280;

/// A parsed mail, owned, with only what ingest needs.
pub struct ParsedEmail<'raw> {
    message: Message<'raw>,
}

/// Parses `raw` as an RFC 5322 message. Fails when it is not recognisably a mail: no header
/// block, or no author address.
pub fn parse(raw: &[u8]) -> Result<ParsedEmail<'_>, IngestError> {
    if raw.is_empty() {
        return Err(IngestError::MalformedBody("empty message".into()));
    }
    let Some(message) = MessageParser::default().parse(raw) else {
        return Err(IngestError::MalformedBody("not an RFC 5322 message (no header section)".into()));
    };
    if message.headers().is_empty() {
        return Err(IngestError::MalformedBody("not an RFC 5322 message (no header section)".into()));
    }
    if first_address(message.from()).is_none() {
        return Err(IngestError::InvalidField { field: "From", problem: "no sender address".into() });
    }
    Ok(ParsedEmail { message })
}

fn first_address(address: Option<&Address<'_>>) -> Option<(String, String)> {
    let addr = address?.first()?;
    let email = addr.address.as_deref()?.trim();
    if email.is_empty() {
        return None;
    }
    Some((addr.name.as_deref().unwrap_or_default().trim().to_owned(), email.to_owned()))
}

fn all_addresses<'a>(addresses: impl Iterator<Item = &'a Address<'a>>) -> Vec<String> {
    addresses.flat_map(|address| address.iter()).filter_map(|addr| addr.address.as_deref().map(str::to_owned)).collect()
}

/// Message ids in a header (`References` holds several), without angle brackets.
fn header_ids(value: &HeaderValue<'_>) -> Vec<String> {
    match value {
        HeaderValue::Text(id) => vec![id.to_string()],
        HeaderValue::TextList(ids) => ids.iter().map(|id| id.to_string()).collect(),
        _ => Vec::new(),
    }
}

/// The address inside a raw header value such as `Delivered-To: <team@example.com>`.
fn bare_address(raw: &str) -> String {
    let trimmed = raw.trim();
    let inner = match (trimmed.rfind('<'), trimmed.rfind('>')) {
        (Some(open), Some(close)) if open < close => &trimmed[open + 1..close],
        _ => trimmed,
    };
    inner.trim().to_ascii_lowercase()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn sender(name: &str, email: &str) -> Sender {
    Sender { external_id: email.to_ascii_lowercase(), display_name: name.to_owned(), email: email.to_owned() }
}

/// C3: who originally wrote a forwarded mail, and whom they copied.
#[derive(Debug, Clone, PartialEq)]
pub struct Forwarded {
    pub original_name: String,
    pub original_email: String,
    pub original_cc: Vec<String>,
}

/// Markers mail clients put above an inline-forwarded message (Gmail, Outlook, Apple Mail,
/// Thunderbird).
const FORWARD_MARKERS: [&str; 5] = [
    "---------- forwarded message ---------",
    "begin forwarded message:",
    "-----original message-----",
    "-------- original message --------",
    "-------- forwarded message --------",
];

fn subject_says_forwarded(subject: &str) -> bool {
    let lower = subject.trim_start().to_ascii_lowercase();
    ["fwd:", "fw:", "fwd :", "fw :", "wg:", "tr:"].iter().any(|prefix| lower.starts_with(prefix))
}

/// Finds the original author of a forwarded mail: either an attached `message/rfc822` (forward
/// as attachment) or a forwarded-message block in the text body (inline forward), whose
/// `From:`/`Cc:` lines are parsed as real address headers.
pub fn detect_forward(message: &Message<'_>, body_text: &str) -> Option<Forwarded> {
    if subject_says_forwarded(message.subject().unwrap_or_default()) {
        for part in message.parts.iter() {
            if let PartType::Message(nested) = &part.body
                && let Some((name, email)) = first_address(nested.from())
            {
                return Some(Forwarded {
                    original_name: name,
                    original_email: email,
                    original_cc: all_addresses(nested.all_cc()),
                });
            }
        }
    }
    let lines: Vec<&str> = body_text.lines().collect();
    let marker_index = lines.iter().position(|line| {
        let lower = line.trim_start_matches(['>', ' ']).trim().to_ascii_lowercase();
        FORWARD_MARKERS.iter().any(|marker| lower.contains(marker.trim_end_matches(':').trim_matches('-').trim()))
            && (lower.starts_with('-') || lower.starts_with("begin forwarded"))
    })?;
    // Collect the header-like lines of the forwarded block (Apple Mail leaves a blank line
    // after the marker; the block ends at the first blank line after a header).
    let mut header_block = String::new();
    let mut seen_header = false;
    for line in lines.iter().skip(marker_index + 1).take(30) {
        let line = line.trim_start_matches('>').trim();
        if line.is_empty() {
            if seen_header {
                break;
            }
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            if seen_header {
                break;
            }
            continue;
        };
        let name = name.trim().to_ascii_lowercase();
        // Outlook writes "Sent:" for the date; only the address headers matter here.
        if matches!(name.as_str(), "from" | "cc" | "to") {
            header_block.push_str(&format!("{name}: {}\r\n", value.trim()));
        }
        seen_header = true;
    }
    header_block.push_str("\r\n");
    let block = MessageParser::default().parse(header_block.as_bytes())?;
    let (name, email) = first_address(block.from())?;
    Some(Forwarded { original_name: name, original_email: email, original_cc: all_addresses(block.all_cc()) })
}

impl ParsedEmail<'_> {
    /// Every address the mail was delivered or addressed to: the SMTP envelope recipients when
    /// there are any; otherwise `Delivered-To` / `X-Original-To` (set by forwarding hosts such
    /// as Gmail and Office 365), then `To` and `Cc`.
    pub fn recipient_candidates(&self, envelope_recipients: &[String]) -> Vec<String> {
        let mut candidates: Vec<String> = envelope_recipients.iter().map(|address| bare_address(address)).collect();
        if !candidates.is_empty() {
            // Delivered over SMTP: the envelope says exactly which mailboxes this copy is for
            // (another team address in To/Cc gets its own delivery).
            return candidates;
        }
        for (name, value) in self.message.headers_raw() {
            if name.eq_ignore_ascii_case("Delivered-To") || name.eq_ignore_ascii_case("X-Original-To") {
                candidates.push(bare_address(value));
            }
        }
        candidates.extend(
            all_addresses(self.message.all_to().chain(self.message.all_cc())).iter().map(|a| a.to_ascii_lowercase()),
        );
        let mut seen = BTreeSet::new();
        candidates.retain(|address| !address.is_empty() && seen.insert(address.clone()));
        candidates
    }

    /// The provider's id for this mail: its Message-ID, or (rarely, for mail without one) a
    /// hash of the raw bytes, so a re-delivery of the same bytes still maps to one message.
    pub fn provider_message_id(&self) -> String {
        match self.message.message_id() {
            Some(id) if !id.trim().is_empty() => id.trim().to_owned(),
            _ => format!("sha256:{}", sha256_hex(self.message.raw_message())),
        }
    }

    /// The thread this mail belongs to: the first id of References (the thread's root, RFC
    /// 5322 §3.6.4), else the message it replies to, else its own id (a new thread).
    pub fn thread_key(&self) -> String {
        let references = header_ids(self.message.references());
        if let Some(root) = references.first() {
            return root.clone();
        }
        if let Some(parent) = header_ids(self.message.in_reply_to()).first() {
            return parent.clone();
        }
        self.provider_message_id()
    }

    fn attachments(&self) -> Vec<Attachment> {
        self.message
            .attachments()
            .map(|part| {
                let content_type = part
                    .content_type()
                    .map(|ct| match ct.subtype() {
                        Some(subtype) => format!("{}/{}", ct.ctype(), subtype),
                        None => ct.ctype().to_owned(),
                    })
                    .unwrap_or_else(|| "application/octet-stream".into())
                    .to_ascii_lowercase();
                let file_name = part
                    .attachment_name()
                    .map(str::to_owned)
                    .or_else(|| part.message().and_then(|nested| nested.subject().map(|s| format!("{s}.eml"))))
                    .unwrap_or_default();
                let bytes = part.contents();
                Attachment {
                    file_name,
                    content_type,
                    size_bytes: bytes.len() as u64,
                    sha256: sha256_hex(bytes),
                    provider_ref: String::new(),
                    content_id: part.content_id().unwrap_or_default().to_owned(),
                }
            })
            .collect()
    }

    /// Builds the inbound content for delivery to the team address `team_address`.
    fn extract(&self, team_address: &str, log_forwarded_to_forwarder: bool) -> Extracted {
        let message = &self.message;
        let (from_name, from_email) = first_address(message.from()).unwrap_or_default();
        let text = message.body_text(0).map(|text| text.trim().to_owned()).unwrap_or_default();
        let preview: String = message
            .body_preview(PREVIEW_CHARS)
            .map(|preview| preview.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        let forwarded = detect_forward(message, &text);
        let author = sender(&from_name, &from_email);
        let (logged_to, cc, forwarded_by, original_sender) = match &forwarded {
            Some(forward) => {
                let original = sender(&forward.original_name, &forward.original_email);
                // C3: only the original CC list; CCs added while forwarding are dropped.
                let logged_to = if log_forwarded_to_forwarder { author.clone() } else { original.clone() };
                (logged_to, forward.original_cc.clone(), Some(author.clone()), Some(original))
            }
            None => (author.clone(), all_addresses(message.all_cc()), None, None),
        };
        let details = EmailDetails {
            message_id_header: message.message_id().unwrap_or_default().to_owned(),
            in_reply_to: header_ids(message.in_reply_to()).into_iter().next().unwrap_or_default(),
            references: header_ids(message.references()),
            team_address: team_address.to_owned(),
            to: all_addresses(message.all_to()),
            cc,
            forwarded_by,
            original_sender,
            has_html: message.html_body_count() > 0 && message.html_part(0).is_some_and(|part| part.is_text_html()),
        };
        let content = InboundContent {
            kind: MessageKind::Email as i32,
            subject: message.subject().unwrap_or_default().to_owned(),
            preview,
            attachments: self.attachments(),
            email: Some(details),
            ..Default::default()
        };
        let occurred_at = message.date().and_then(|date| DateTime::from_timestamp(date.to_timestamp(), 0));
        Extracted {
            provider_message_id: self.provider_message_id(),
            thread_key: self.thread_key(),
            sender: logged_to,
            text,
            content,
            occurred_at,
        }
    }
}

/// The team channels a mail is for: every team-email channel whose team address is among its
/// recipients, with the address that matched. Empty when none is.
pub fn matching_channels<'c>(
    config: &'c ConfigSnapshot,
    recipients: &[String],
) -> Vec<(&'c Owned<ChannelConfigured>, String)> {
    let mut matched: Vec<(&'c Owned<ChannelConfigured>, String)> = Vec::new();
    for recipient in recipients {
        for owned in channel::find_by(config, ChannelType::TeamEmail, |channel| {
            channel.email.as_ref().is_some_and(|email| email.team_address.trim().eq_ignore_ascii_case(recipient))
        }) {
            if !matched.iter().any(|(already, _)| already.entity.channel_id == owned.entity.channel_id) {
                matched.push((owned, recipient.clone()));
            }
        }
    }
    matched
}

/// Whether `address` is a configured team address (the SMTP listener's RCPT check).
pub fn is_team_address(config: &ConfigSnapshot, address: &str) -> bool {
    let address = bare_address(address);
    channel::find_by(config, ChannelType::TeamEmail, |channel| {
        channel.email.as_ref().is_some_and(|email| email.team_address.trim().eq_ignore_ascii_case(&address))
    })
    .next()
    .is_some()
}

/// One inbound event per team channel the mail is for (usually one). No matching team address
/// → 404 naming the addresses tried.
pub fn to_inbound_events(
    config: &ConfigSnapshot,
    raw: &[u8],
    envelope_recipients: &[String],
    received_at: DateTime<Utc>,
) -> Result<Vec<Envelope>, IngestError> {
    let parsed = parse(raw)?;
    let recipients = parsed.recipient_candidates(envelope_recipients);
    let channels = matching_channels(config, &recipients);
    if channels.is_empty() {
        return Err(IngestError::NoChannelFor {
            channel_type: "team_email",
            what: "recipient",
            value: recipients.join(", "),
        });
    }
    Ok(channels
        .into_iter()
        .map(|(owned, team_address)| {
            let log_to_forwarder = owned.entity.email.as_ref().is_some_and(|email| email.log_forwarded_to_forwarder);
            channel::inbound_event(owned, parsed.extract(&team_address, log_to_forwarder), received_at)
        })
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use switchboard_proto::events::v1::envelope::Payload;
    use switchboard_proto::events::v1::{EmailSettings, InboundMessageReceived};

    pub(crate) fn email_config(log_forwarded_to_forwarder: bool, enabled: bool) -> ConfigSnapshot {
        let mut config = ConfigSnapshot::default();
        let channel = ChannelConfigured {
            channel_id: "team-mail".into(),
            inbox_id: "support".into(),
            channel_type: ChannelType::TeamEmail as i32,
            name: "Support mail".into(),
            enabled,
            email: Some(EmailSettings {
                team_address: "Support@Example.com".into(),
                log_forwarded_to_forwarder,
                ..Default::default()
            }),
            ..Default::default()
        };
        config.channels.insert(Owned { account_id: "acct".into(), entity: channel });
        config
    }

    fn inbound(config: &ConfigSnapshot, raw: &str) -> InboundMessageReceived {
        let mut events = to_inbound_events(config, raw.as_bytes(), &[], Utc::now()).unwrap();
        assert_eq!(events.len(), 1);
        match events.remove(0).payload {
            Some(Payload::InboundMessageReceived(inbound)) => inbound,
            other => panic!("unexpected payload {other:?}"),
        }
    }

    pub(crate) const MULTIPART: &str = "From: =?UTF-8?B?SsO8cmdlbiBNw7xsbGVy?= <juergen@kunde.de>\r\n\
To: Support <support@example.com>\r\n\
Cc: boss@kunde.de\r\n\
Subject: =?ISO-8859-1?Q?Rechnung_f=FCr_M=E4rz?=\r\n\
Message-ID: <abc123@kunde.de>\r\n\
Date: Tue, 3 Mar 2026 10:00:00 +0100\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"outer\"\r\n\
\r\n\
--outer\r\n\
Content-Type: multipart/alternative; boundary=\"inner\"\r\n\
\r\n\
--inner\r\n\
Content-Type: text/plain; charset=iso-8859-1\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\
\r\n\
Gr=FC=DFe, die Rechnung f=FCr M=E4rz fehlt.\r\n\
--inner\r\n\
Content-Type: text/html; charset=utf-8\r\n\
\r\n\
<p>Gr\u{fc}\u{df}e, die <b>Rechnung</b> fehlt.</p>\r\n\
--inner--\r\n\
--outer\r\n\
Content-Type: application/pdf; name=\"rechnung.pdf\"\r\n\
Content-Disposition: attachment; filename=\"rechnung.pdf\"\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
JVBERi0xLjQKJcfsj6IK\r\n\
--outer--\r\n";

    #[test]
    fn c1_multipart_mail_with_encoded_headers_charsets_and_attachment_is_normalised() {
        let inbound = inbound(&email_config(false, true), MULTIPART);
        assert_eq!(inbound.channel_id, "team-mail");
        assert_eq!(inbound.provider_message_id, "abc123@kunde.de");
        assert_eq!(inbound.thread_key, "abc123@kunde.de");
        let sender = inbound.sender.unwrap();
        assert_eq!(sender.display_name, "Jürgen Müller");
        assert_eq!(sender.email, "juergen@kunde.de");
        assert_eq!(inbound.text, "Grüße, die Rechnung für März fehlt.");
        let content = inbound.content.unwrap();
        assert_eq!(content.kind, MessageKind::Email as i32);
        assert_eq!(content.subject, "Rechnung für März");
        let details = content.email.unwrap();
        assert_eq!(details.team_address, "support@example.com");
        assert_eq!(details.cc, ["boss@kunde.de"]);
        assert!(details.has_html);
        assert_eq!(content.attachments.len(), 1);
        let pdf = &content.attachments[0];
        assert_eq!(pdf.file_name, "rechnung.pdf");
        assert_eq!(pdf.content_type, "application/pdf");
        assert_eq!(pdf.size_bytes, 15);
        assert_eq!(pdf.sha256, sha256_hex(b"%PDF-1.4\n%\xc7\xec\x8f\xa2\n"));
        assert!(!inbound.channel_disabled_at_ingest);
    }

    #[test]
    fn c1_html_only_mail_gets_a_text_preview() {
        let raw = "From: a@b.c\r\nTo: support@example.com\r\nMessage-ID: <h1@b.c>\r\nContent-Type: text/html\r\n\r\n<html><body><h1>Hello</h1><p>Order&nbsp;42 is <i>late</i></p></body></html>\r\n";
        let inbound = inbound(&email_config(false, true), raw);
        assert!(inbound.text.contains("Hello"), "{}", inbound.text);
        assert!(inbound.text.contains("late"));
        let content = inbound.content.unwrap();
        assert!(!content.preview.contains('<'), "{}", content.preview);
        assert!(content.preview.contains("Order"));
    }

    #[test]
    fn c1_replies_join_the_thread_root_from_references_or_in_reply_to() {
        let config = email_config(false, true);
        let reply = "From: a@b.c\r\nTo: support@example.com\r\nMessage-ID: <3@b.c>\r\nIn-Reply-To: <2@x>\r\nReferences: <1@b.c> <2@x>\r\nSubject: Re: hi\r\n\r\nthanks\r\n";
        let inbound_reply = inbound(&config, reply);
        assert_eq!(inbound_reply.thread_key, "1@b.c");
        assert_eq!(inbound_reply.content.unwrap().email.unwrap().references, ["1@b.c", "2@x"]);
        let only_in_reply_to =
            "From: a@b.c\r\nTo: support@example.com\r\nMessage-ID: <4@b.c>\r\nIn-Reply-To: <1@b.c>\r\n\r\nok\r\n";
        assert_eq!(inbound(&config, only_in_reply_to).thread_key, "1@b.c");
    }

    #[test]
    fn c1_the_team_address_decides_the_channel_and_unknown_addresses_are_not_found() {
        let config = email_config(false, true);
        let via_delivered_to = "From: a@b.c\r\nDelivered-To: support@example.com\r\nTo: undisclosed-recipients:;\r\nMessage-ID: <5@b.c>\r\n\r\nhi\r\n";
        assert_eq!(inbound(&config, via_delivered_to).channel_id, "team-mail");
        let elsewhere = "From: a@b.c\r\nTo: sales@example.com\r\nMessage-ID: <6@b.c>\r\n\r\nhi\r\n";
        assert!(matches!(
            to_inbound_events(&config, elsewhere.as_bytes(), &[], Utc::now()),
            Err(IngestError::NoChannelFor { .. })
        ));
        // The SMTP envelope recipient wins even when the headers name nobody we know (Bcc).
        let events = to_inbound_events(&config, elsewhere.as_bytes(), &["<support@example.com>".into()], Utc::now());
        assert_eq!(events.unwrap().len(), 1);
        assert!(is_team_address(&config, "<SUPPORT@example.com>"));
        assert!(!is_team_address(&config, "<sales@example.com>"));
    }

    const INLINE_FORWARD: &str = "From: Fiona Forwarder <fiona@example.com>\r\n\
To: support@example.com\r\n\
Cc: added-while-forwarding@example.com\r\n\
Subject: Fwd: Broken order\r\n\
Message-ID: <fwd1@example.com>\r\n\
\r\n\
Can you help this customer?\r\n\
\r\n\
---------- Forwarded message ---------\r\n\
From: Olga Original <olga@customer.org>\r\n\
Date: Mon, 2 Mar 2026 at 09:12\r\n\
Subject: Broken order\r\n\
To: Fiona Forwarder <fiona@example.com>\r\n\
Cc: Carl <carl@customer.org>, dora@customer.org\r\n\
\r\n\
My order arrived broken.\r\n";

    #[test]
    fn c3_forwarded_mail_is_logged_to_the_original_sender_with_only_the_original_ccs() {
        let inbound = inbound(&email_config(false, true), INLINE_FORWARD);
        let sender = inbound.sender.unwrap();
        assert_eq!(sender.email, "olga@customer.org");
        assert_eq!(sender.display_name, "Olga Original");
        let details = inbound.content.unwrap().email.unwrap();
        assert_eq!(details.cc, ["carl@customer.org", "dora@customer.org"]);
        assert_eq!(details.forwarded_by.unwrap().email, "fiona@example.com");
        assert_eq!(details.original_sender.unwrap().email, "olga@customer.org");
    }

    #[test]
    fn c3_channel_switch_logs_forwarded_mail_to_the_forwarder() {
        let inbound = inbound(&email_config(true, true), INLINE_FORWARD);
        assert_eq!(inbound.sender.unwrap().email, "fiona@example.com");
        let details = inbound.content.unwrap().email.unwrap();
        assert_eq!(details.cc, ["carl@customer.org", "dora@customer.org"], "still only the original CCs");
    }

    #[test]
    fn c3_forward_as_attachment_takes_the_author_of_the_attached_message() {
        let raw = "From: fiona@example.com\r\nTo: support@example.com\r\nCc: extra@example.com\r\nSubject: FW: help\r\nMessage-ID: <fwd2@example.com>\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--b\r\nContent-Type: message/rfc822\r\nContent-Disposition: attachment\r\n\r\nFrom: Olga <olga@customer.org>\r\nCc: carl@customer.org\r\nSubject: help\r\nMessage-ID: <orig@customer.org>\r\n\r\nplease help\r\n--b--\r\n";
        let inbound = inbound(&email_config(false, true), raw);
        assert_eq!(inbound.sender.unwrap().email, "olga@customer.org");
        let content = inbound.content.unwrap();
        assert_eq!(content.email.unwrap().cc, ["carl@customer.org"]);
        assert_eq!(content.attachments.len(), 1);
        assert_eq!(content.attachments[0].content_type, "message/rfc822");
    }

    #[test]
    fn c11_mail_to_a_switched_off_channel_is_recorded_and_marked() {
        let inbound = inbound(&email_config(false, false), MULTIPART);
        assert!(inbound.channel_disabled_at_ingest);
    }

    #[test]
    fn b1_same_mail_maps_to_the_same_message_id_and_mail_without_message_id_hashes_its_bytes() {
        let config = email_config(false, true);
        assert_eq!(inbound(&config, MULTIPART).message_id, inbound(&config, MULTIPART).message_id);
        let no_id = "From: a@b.c\r\nTo: support@example.com\r\n\r\nhi\r\n";
        let first = inbound(&config, no_id);
        assert!(first.provider_message_id.starts_with("sha256:"));
        assert_eq!(first.message_id, inbound(&config, no_id).message_id);
    }

    #[test]
    fn malformed_mail_is_rejected_with_a_reason() {
        let config = email_config(false, true);
        for raw in ["", "just some text without headers", "To: support@example.com\r\n\r\nno from\r\n"] {
            let result = to_inbound_events(&config, raw.as_bytes(), &[], Utc::now());
            assert!(
                matches!(result, Err(IngestError::MalformedBody(_) | IngestError::InvalidField { .. })),
                "{raw:?} gave {result:?}"
            );
        }
    }
}
