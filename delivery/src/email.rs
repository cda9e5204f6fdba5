//! Team email (C1, C2, C12) and owner notifications (R4) over SMTP.
//!
//! Where input enters: [`SmtpRelay::send`] gets an `OutboundMessageQueued` whose `email` part
//! was resolved when the reply was accepted (from-name mode, from address or fallback address,
//! signature, Message-ID, threading). Where decisions are made: [`build_message`] turns it into
//! the exact MIME message (pure: no clock, no I/O), [`smtp_outcome`] and
//! [`attachment_http_outcome`] say what an answer means. Where output leaves: the pooled lettre
//! transport to the configured relay, and the HTTP fetch of attachments by reference.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};
use switchboard_runtime::attachment_hosts::{self, AttachmentHosts};

use lettre::message::header::{ContentType, Date, Header, HeaderName, HeaderValue, InReplyTo, MessageId, References};
use lettre::message::{Attachment, Mailbox, Mailboxes, MultiPart, SinglePart};
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{Address, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use switchboard_proto::events::v1::{AuthorKind, OutboundAttachment, OutboundMessageQueued};
use tracing::Instrument;

use crate::outcome::SendOutcome;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain SMTP (a relay on loopback, Mailpit in the tests).
    None,
    /// Upgrade with STARTTLS (required: a relay that does not offer it is an error).
    StartTls,
    /// Implicit TLS (SMTPS, usually port 465).
    Tls,
}

impl FromStr for SmtpTls {
    type Err = String;

    /// `none`, `starttls` or `tls` (the spelling of the delivery settings).
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.to_ascii_lowercase().as_str() {
            "none" => Ok(SmtpTls::None),
            "starttls" => Ok(SmtpTls::StartTls),
            "tls" => Ok(SmtpTls::Tls),
            other => Err(format!("unknown SMTP TLS mode '{other}' (expected none, starttls or tls)")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    /// AUTH credentials, from the secrets file.
    pub username: Option<String>,
    pub password: Option<String>,
    /// Bounds connecting and every SMTP command (and each attachment fetch).
    pub timeout: Duration,
    /// Which hosts attachment references may point at (public addresses unless configured).
    pub attachment_hosts: AttachmentHosts,
}

/// Pooled connections to the relay unless [`SmtpRelay::with_max_connections`] says otherwise.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 16;
/// The largest total size of one message's attachments; mail relays commonly refuse more.
pub const MAX_ATTACHMENT_BYTES: usize = 25 * 1024 * 1024;

/// The configured SMTP relay: a pool of connections shared by concurrent sends.
pub struct SmtpRelay {
    settings: SmtpSettings,
    transport: AsyncSmtpTransport<Tokio1Executor>,
    http: reqwest::Client,
    max_attachment_bytes: usize,
}

impl SmtpRelay {
    pub fn new(settings: SmtpSettings) -> anyhow::Result<Self> {
        Self::with_max_connections(settings, DEFAULT_MAX_CONNECTIONS)
    }

    /// As [`SmtpRelay::new`], with at most `max_connections` open to the relay at once
    /// (concurrent sends beyond it wait for a free connection).
    pub fn with_max_connections(settings: SmtpSettings, max_connections: u32) -> anyhow::Result<Self> {
        use anyhow::Context;
        let tls = match settings.tls {
            SmtpTls::None => Tls::None,
            SmtpTls::StartTls => Tls::Required(
                TlsParameters::new(settings.host.clone()).context("failed to set up TLS for the SMTP relay")?,
            ),
            SmtpTls::Tls => Tls::Wrapper(
                TlsParameters::new(settings.host.clone()).context("failed to set up TLS for the SMTP relay")?,
            ),
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(settings.host.clone())
            .port(settings.port)
            .tls(tls)
            .timeout(Some(settings.timeout))
            .pool_config(PoolConfig::new().max_size(max_connections.max(1)));
        match (&settings.username, &settings.password) {
            (Some(username), Some(password)) => {
                builder = builder.credentials(Credentials::new(username.clone(), password.clone()));
            }
            (None, None) => {}
            _ => anyhow::bail!("SMTP credentials need both a username and a password"),
        }
        let http = attachment_hosts::client_builder(settings.attachment_hosts)
            .timeout(settings.timeout)
            .build()
            .context("failed to build the HTTP client for attachments")?;
        Ok(SmtpRelay { transport: builder.build(), settings, http, max_attachment_bytes: MAX_ATTACHMENT_BYTES })
    }

    /// Sends `message` (its `email` part must be set) and reports what the relay answered.
    pub async fn send(&self, message: &OutboundMessageQueued) -> SendOutcome {
        let span = tracing::info_span!(
            "smtp_send",
            reply_id = %message.reply_id,
            message_id = message.email.as_ref().map(|email| email.message_id_header.as_str()).unwrap_or(""),
            relay = %format_args!("{}:{}", self.settings.host, self.settings.port),
            outcome = tracing::field::Empty,
        );
        async {
            let outcome = self.send_inner(message).await;
            let label = match &outcome {
                SendOutcome::Sent { .. } => "sent",
                SendOutcome::Retryable { .. } => "retryable",
                SendOutcome::Permanent { .. } => "permanent",
            };
            tracing::Span::current().record("outcome", label);
            outcome
        }
        .instrument(span)
        .await
    }

    async fn send_inner(&self, message: &OutboundMessageQueued) -> SendOutcome {
        if message.email.is_none() {
            return SendOutcome::Permanent { error: BuildError::MissingEmail.to_string(), status_code: 0 };
        }
        let mut fetched = Vec::with_capacity(message.attachments.len());
        let mut budget = self.max_attachment_bytes;
        for reference in &message.attachments {
            match self.fetch_attachment(reference, budget).await {
                Ok(attachment) => {
                    budget -= attachment.content.len();
                    fetched.push(attachment);
                }
                Err(outcome) => return outcome,
            }
        }
        let built = match build_message(message, fetched, SystemTime::now()) {
            Ok(built) => built,
            // The event itself cannot be sent as it is: no later attempt does better.
            Err(error) => return SendOutcome::Permanent { error: error.to_string(), status_code: 0 },
        };
        match self.transport.send(built).await {
            Ok(response) => SendOutcome::Sent {
                provider_message_id: message
                    .email
                    .as_ref()
                    .map(|email| email.message_id_header.clone())
                    .unwrap_or_default(),
                status_code: reply_code(response.code()),
            },
            Err(error) => smtp_outcome(&error),
        }
    }

    /// Fetches one attachment, at most `budget` bytes; failures say what to do with the send.
    async fn fetch_attachment(
        &self,
        reference: &OutboundAttachment,
        budget: usize,
    ) -> Result<FetchedAttachment, SendOutcome> {
        let name = attachment_name(reference);
        let refused = |refusal: String| SendOutcome::Permanent {
            error: format!("attachment '{name}' is on a refused host: {refusal}"),
            status_code: 0,
        };
        if let Some(refusal) = reqwest::Url::parse(&reference.url)
            .ok()
            .and_then(|url| attachment_hosts::refusal_of_url(&url, self.settings.attachment_hosts))
        {
            return Err(refused(refusal));
        }
        let mut response = match self.http.get(&reference.url).send().await {
            Ok(response) => response,
            Err(error) if error.is_builder() => {
                return Err(SendOutcome::Permanent {
                    error: format!("attachment '{name}' has an invalid URL: {error}"),
                    status_code: 0,
                });
            }
            Err(error) => match attachment_hosts::refusal_in(&error) {
                Some(refusal) => return Err(refused(refusal)),
                None => return Err(attachment_unreachable(&name, &error)),
            },
        };
        let status = response.status().as_u16();
        if !response.status().is_success() {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Err(attachment_http_outcome(&name, status, retry_after));
        }
        if response.content_length().is_some_and(|length| length > budget as u64) {
            return Err(attachment_too_large(&name, budget));
        }
        let served_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let mut content = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if content.len() + chunk.len() > budget {
                        return Err(attachment_too_large(&name, budget));
                    }
                    content.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(error) => return Err(attachment_unreachable(&name, &error)),
            }
        }
        let content_type = if reference.content_type.is_empty() {
            served_type.unwrap_or_else(|| "application/octet-stream".into())
        } else {
            reference.content_type.clone()
        };
        Ok(FetchedAttachment { file_name: name, content_type, content })
    }
}

/// An attachment's bytes, fetched from its reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedAttachment {
    pub file_name: String,
    pub content_type: String,
    pub content: Vec<u8>,
}

/// Why an `OutboundMessageQueued` cannot become an email. Each is the event's own fault, so a
/// send that meets one fails permanently.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("the message has no email part")]
    MissingEmail,
    #[error("the email has no Message-ID (it is the send's idempotency key)")]
    MissingMessageId,
    #[error("the email has no recipient")]
    NoRecipient,
    #[error("invalid from address '{address}': {source}")]
    InvalidFrom { address: String, source: lettre::address::AddressError },
    #[error("invalid recipient address '{address}': {source}")]
    InvalidRecipient { address: String, source: lettre::address::AddressError },
    #[error("the email could not be built: {0}")]
    Message(#[from] lettre::error::Error),
}

/// `Auto-Submitted: auto-generated` (RFC 3834): marks automated messages (O6, R4) so that
/// auto-responders do not answer them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoSubmitted(String);

impl Header for AutoSubmitted {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("Auto-Submitted")
    }

    fn parse(value: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(AutoSubmitted(value.to_owned()))
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), self.0.clone())
    }
}

/// Builds the email exactly as it goes out: `multipart/alternative` (text, then HTML), inside
/// `multipart/mixed` when there are attachments; From "name <address>", To, Subject, Date
/// (`date`), Message-ID, In-Reply-To and References from the event; `Auto-Submitted` for
/// automated messages. An empty `html_body` gets an HTML rendering of the text, so every email
/// has both parts.
pub fn build_message(
    message: &OutboundMessageQueued,
    attachments: Vec<FetchedAttachment>,
    date: SystemTime,
) -> Result<Message, BuildError> {
    let email = message.email.as_ref().ok_or(BuildError::MissingEmail)?;
    if email.message_id_header.trim().is_empty() {
        return Err(BuildError::MissingMessageId);
    }
    let from_address: Address = email
        .from_address
        .parse()
        .map_err(|source| BuildError::InvalidFrom { address: email.from_address.clone(), source })?;
    let from = Mailbox::new(display_name(&email.from_name), from_address);
    let recipients = recipients(message)?;

    let mut builder = Message::builder()
        .from(from)
        .mailbox(lettre::message::header::To::from(recipients))
        .subject(single_line(&email.subject))
        .header(Date::new(date))
        .header(MessageId::from(angle(&email.message_id_header)));
    if !email.in_reply_to.trim().is_empty() {
        builder = builder.header(InReplyTo::from(angle(&email.in_reply_to)));
    }
    let references: Vec<String> =
        email.references.iter().filter(|reference| !reference.trim().is_empty()).map(|r| angle(r)).collect();
    if !references.is_empty() {
        builder = builder.header(References::from(references.join(" ")));
    }
    if message.author.as_ref().is_some_and(|author| author.kind() == AuthorKind::Automation) {
        builder = builder.header(AutoSubmitted("auto-generated".into()));
    }

    let html_body = if email.html_body.is_empty() { html_from_text(&email.text_body) } else { email.html_body.clone() };
    let alternative = MultiPart::alternative()
        .singlepart(SinglePart::plain(email.text_body.clone()))
        .singlepart(SinglePart::html(html_body));
    let built = if attachments.is_empty() {
        builder.multipart(alternative)?
    } else {
        let mut mixed = MultiPart::mixed().multipart(alternative);
        for attachment in attachments {
            let content_type = ContentType::parse(&attachment.content_type)
                .unwrap_or_else(|_| ContentType::parse("application/octet-stream").expect("a valid MIME type"));
            let file_name = single_line(&attachment.file_name);
            mixed = mixed.singlepart(Attachment::new(file_name).body(attachment.content, content_type));
        }
        builder.multipart(mixed)?
    };
    Ok(built)
}

/// `email.to`, or the message's recipient when the email names none.
fn recipients(message: &OutboundMessageQueued) -> Result<Mailboxes, BuildError> {
    let email = message.email.as_ref().ok_or(BuildError::MissingEmail)?;
    let mut mailboxes = Mailboxes::new();
    let listed: Vec<&String> = email.to.iter().filter(|address| !address.trim().is_empty()).collect();
    if listed.is_empty() {
        if message.recipient.trim().is_empty() {
            return Err(BuildError::NoRecipient);
        }
        let address: Address = message
            .recipient
            .trim()
            .parse()
            .map_err(|source| BuildError::InvalidRecipient { address: message.recipient.clone(), source })?;
        mailboxes.push(Mailbox::new(display_name(&message.recipient_name), address));
        return Ok(mailboxes);
    }
    for raw in listed {
        // Either a bare address or "Name <address>".
        let mut mailbox: Mailbox =
            raw.trim().parse().map_err(|source| BuildError::InvalidRecipient { address: raw.clone(), source })?;
        mailbox.name = mailbox.name.as_deref().and_then(display_name);
        mailboxes.push(mailbox);
    }
    Ok(mailboxes)
}

/// A header field's text on one line: control characters (CR, LF, tab, ...) become spaces, so
/// no text from a reply can start another header (and lettre refuses them in names).
fn single_line(value: &str) -> String {
    value.chars().map(|character| if character.is_control() { ' ' } else { character }).collect()
}

/// A mailbox's display name on one line, or none when empty.
fn display_name(value: &str) -> Option<String> {
    let name = single_line(value);
    let trimmed = name.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

/// `<id>`: the event stores Message-IDs without angle brackets (as ingest parses them). An id
/// has no whitespace or control characters; any are dropped.
fn angle(id: &str) -> String {
    let clean: String = id.chars().filter(|character| !character.is_control() && !character.is_whitespace()).collect();
    format!("<{}>", clean.trim_start_matches('<').trim_end_matches('>'))
}

/// A minimal HTML alternative of a plain-text body: escaped, paragraphs on blank lines, line
/// breaks kept.
pub fn html_from_text(text: &str) -> String {
    let escaped = text
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace("\r\n", "\n");
    let paragraphs: Vec<String> = escaped
        .split("\n\n")
        .filter(|paragraph| !paragraph.trim().is_empty())
        .map(|paragraph| format!("<p>{}</p>", paragraph.trim_matches('\n').replace('\n', "<br>\n")))
        .collect();
    format!("<html><body>\n{}\n</body></html>\n", paragraphs.join("\n"))
}

fn reply_code(code: lettre::transport::smtp::response::Code) -> u32 {
    code.to_string().parse().unwrap_or(0)
}

/// What a failed SMTP send means: a 5xx answer is permanent (the server's text kept), a 4xx
/// answer, a timeout or a failed/dropped connection is worth another attempt.
pub fn smtp_outcome(error: &lettre::transport::smtp::Error) -> SendOutcome {
    let status_code = error.status().map(reply_code).unwrap_or(0);
    if error.is_permanent() {
        SendOutcome::Permanent { error: error.to_string(), status_code }
    } else {
        SendOutcome::Retryable { error: error.to_string(), status_code, retry_after: None }
    }
}

/// What an HTTP error answer to an attachment fetch means: 4xx (but 408 and 429) is permanent
/// and names the attachment; 408, 429 and 5xx are worth another attempt.
pub fn attachment_http_outcome(file_name: &str, status: u16, retry_after: Option<Duration>) -> SendOutcome {
    let error = format!("attachment '{file_name}' could not be fetched: HTTP {status}");
    if (400..500).contains(&status) && status != 408 && status != 429 {
        SendOutcome::Permanent { error, status_code: u32::from(status) }
    } else {
        SendOutcome::Retryable { error, status_code: u32::from(status), retry_after }
    }
}

fn attachment_unreachable(file_name: &str, error: &reqwest::Error) -> SendOutcome {
    let error = format!("attachment '{file_name}' could not be fetched: {}", ErrorChain(error));
    SendOutcome::Retryable { error, status_code: 0, retry_after: None }
}

fn attachment_too_large(file_name: &str, budget: usize) -> SendOutcome {
    SendOutcome::Permanent {
        error: format!(
            "attachment '{file_name}' does not fit: the attachments of one email may total at most {MAX_ATTACHMENT_BYTES} bytes ({budget} left)"
        ),
        status_code: 0,
    }
}

/// The reference's file name, else the URL's last path segment, else `attachment`.
fn attachment_name(reference: &OutboundAttachment) -> String {
    if !reference.file_name.trim().is_empty() {
        return reference.file_name.trim().to_owned();
    }
    reference
        .url
        .split(['?', '#'])
        .next()
        .and_then(|path| path.rsplit('/').next())
        .filter(|segment| !segment.is_empty())
        .unwrap_or("attachment")
        .to_owned()
}

/// An error and its sources on one line (reqwest's own message hides the cause).
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use mail_parser::{MessageParser, MimeHeaders};
    use switchboard_proto::events::v1::{Author, Automation, OutboundEmail};

    use super::*;

    fn reply(author_kind: AuthorKind) -> OutboundMessageQueued {
        OutboundMessageQueued {
            reply_id: "r-1".into(),
            conversation_id: "c-1".into(),
            author: Some(Author {
                kind: author_kind as i32,
                agent_id: "ana".into(),
                name: "Ana Díaz".into(),
                automation: if author_kind == AuthorKind::Automation {
                    Automation::OwnerNotification as i32
                } else {
                    0
                },
            }),
            recipient: "kim@example.org".into(),
            email: Some(OutboundEmail {
                from_name: "Ana Díaz from Acme".into(),
                from_address: "support@acme.example".into(),
                to: vec!["kim@example.org".into()],
                subject: "Re: Où est ma commande ?".into(),
                message_id_header: "0123456789abcdef0123456789abcdef@acme.example".into(),
                in_reply_to: "customer-2@example.org".into(),
                references: vec!["customer-1@example.org".into(), "customer-2@example.org".into()],
                from_fallback_address: false,
                text_body: "Hello Kim,\nit ships today.\n\n-- \nAna Díaz".into(),
                html_body: "<p>Hello Kim,<br>it ships today.</p><p>-- <br>Ana Díaz</p>".into(),
            }),
            ..Default::default()
        }
    }

    /// Bodies travel with CRLF line ends (SMTP); the event's bodies use LF.
    fn lf(body: &str) -> String {
        body.replace("\r\n", "\n")
    }

    fn at() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn built_bytes(message: &OutboundMessageQueued, attachments: Vec<FetchedAttachment>) -> Vec<u8> {
        build_message(message, attachments, at()).expect("the message builds").formatted()
    }

    #[test]
    fn o4_headers_carry_identity_message_id_and_threading() {
        let bytes = built_bytes(&reply(AuthorKind::Agent), Vec::new());
        let parsed = MessageParser::default().parse(&bytes).expect("parses");
        let from = parsed.from().and_then(|from| from.first()).expect("a From");
        assert_eq!(from.name(), Some("Ana Díaz from Acme"));
        assert_eq!(from.address(), Some("support@acme.example"));
        assert_eq!(parsed.to().and_then(|to| to.first()).and_then(|to| to.address()), Some("kim@example.org"));
        assert_eq!(parsed.subject(), Some("Re: Où est ma commande ?"));
        assert_eq!(parsed.message_id(), Some("0123456789abcdef0123456789abcdef@acme.example"));
        assert_eq!(parsed.in_reply_to().as_text(), Some("customer-2@example.org"));
        let references: Vec<&str> =
            parsed.references().as_text_list().expect("a References list").iter().map(|r| r.as_ref()).collect();
        assert_eq!(references, ["customer-1@example.org", "customer-2@example.org"]);
        assert_eq!(parsed.date().map(|date| date.to_timestamp()), Some(1_800_000_000));
        assert!(parsed.header("Auto-Submitted").is_none(), "an agent's reply is not automated");
        // The headers are 7-bit: non-ASCII names and subjects are RFC 2047 encoded.
        let head_end = bytes.windows(4).position(|window| window == b"\r\n\r\n").expect("a header block");
        assert!(bytes[..head_end].is_ascii());
    }

    #[test]
    fn o4_bodies_are_multipart_alternative_text_then_html() {
        let bytes = built_bytes(&reply(AuthorKind::Agent), Vec::new());
        let parsed = MessageParser::default().parse(&bytes).expect("parses");
        let content_type = parsed.content_type().expect("a Content-Type");
        assert_eq!((content_type.ctype(), content_type.subtype()), ("multipart", Some("alternative")));
        assert_eq!(
            parsed.body_text(0).map(|body| lf(&body)),
            Some("Hello Kim,\nit ships today.\n\n-- \nAna Díaz".into())
        );
        assert_eq!(
            parsed.body_html(0).map(|body| lf(&body)),
            Some("<p>Hello Kim,<br>it ships today.</p><p>-- <br>Ana Díaz</p>".into())
        );
        assert_eq!(parsed.attachment_count(), 0);
    }

    #[test]
    fn o4_attachments_wrap_the_alternative_in_multipart_mixed() {
        let attachment = FetchedAttachment {
            file_name: "facture-été.pdf".into(),
            content_type: "application/pdf".into(),
            content: b"%PDF-1.4 not really".to_vec(),
        };
        let bytes = built_bytes(&reply(AuthorKind::Agent), vec![attachment]);
        let parsed = MessageParser::default().parse(&bytes).expect("parses");
        let content_type = parsed.content_type().expect("a Content-Type");
        assert_eq!((content_type.ctype(), content_type.subtype()), ("multipart", Some("mixed")));
        assert_eq!(
            parsed.body_text(0).map(|body| lf(&body)),
            Some("Hello Kim,\nit ships today.\n\n-- \nAna Díaz".into())
        );
        assert!(parsed.body_html(0).is_some());
        assert_eq!(parsed.attachment_count(), 1);
        let part = parsed.attachment(0).expect("the attachment");
        assert_eq!(part.attachment_name(), Some("facture-été.pdf"));
        assert_eq!(part.content_type().map(|ct| (ct.ctype(), ct.subtype())), Some(("application", Some("pdf"))));
        assert_eq!(part.contents(), b"%PDF-1.4 not really");
    }

    #[test]
    fn r4_automated_messages_are_marked_auto_submitted() {
        let bytes = built_bytes(&reply(AuthorKind::Automation), Vec::new());
        let parsed = MessageParser::default().parse(&bytes).expect("parses");
        assert_eq!(parsed.header("Auto-Submitted").and_then(|value| value.as_text()), Some("auto-generated"));
    }

    #[test]
    fn o4_line_breaks_in_header_fields_cannot_add_headers() {
        let mut message = reply(AuthorKind::Agent);
        let email = message.email.as_mut().expect("email");
        email.subject = "Hello\r\nBcc: attacker@evil.example".into();
        email.from_name = "Acme\r\nX-Injected: yes".into();
        email.in_reply_to = "id@x\r\nX-Threaded: yes".into();
        let attachment = FetchedAttachment {
            file_name: "a\r\nX-Part: yes.pdf".into(),
            content_type: "application/pdf\r\nX-Type: yes".into(),
            content: b"%PDF".to_vec(),
        };
        let bytes = built_bytes(&message, vec![attachment]);
        let parsed = MessageParser::default().parse(&bytes).expect("parses");
        assert!(parsed.header("Bcc").is_none());
        assert!(parsed.header("X-Injected").is_none());
        assert!(parsed.header("X-Threaded").is_none());
        let part = parsed.attachment(0).expect("the attachment");
        let text = String::from_utf8_lossy(&bytes);
        for injected in ["Bcc:", "X-Injected:", "X-Threaded:", "X-Part:", "X-Type:"] {
            assert!(!text.contains(&format!("\n{injected}")), "{injected} starts a line:\n{text}");
        }
        assert_eq!(part.attachment_name(), Some("a  X-Part: yes.pdf"));
        assert!(parsed.subject().is_some_and(|subject| subject.contains("attacker@evil.example")));

        // A recipient written as "Name <address>" must be one line: else it is refused.
        let mut multi_line_to = reply(AuthorKind::Agent);
        multi_line_to.email.as_mut().expect("email").to = vec!["Kim\r\nX-To: yes <kim@example.org>".into()];
        assert!(matches!(build_message(&multi_line_to, Vec::new(), at()), Err(BuildError::InvalidRecipient { .. })));
    }

    proptest::proptest! {
        /// Whatever text a reply carries, building its email never panics (the delivery loop
        /// must not crash on an event) and no field adds a header line.
        #[test]
        fn o4_any_text_builds_or_is_refused_without_panicking(
            subject in "\\PC*|[\r\n\t a-zA-Z:<>@\"]*",
            from_name in "\\PC*|[\r\n\t a-zA-Z:<>@\"]*",
            file_name in "\\PC*|[\r\n\t a-zA-Z:<>@\"]*",
            body in "\\PC*|[\r\n\t a-zA-Z:<>@.\"]*",
            reference in "[\r\n\t a-z0-9@.<>]*",
        ) {
            let mut message = reply(AuthorKind::Agent);
            let email = message.email.as_mut().expect("email");
            email.subject = subject;
            email.from_name = from_name;
            email.text_body = body.clone();
            email.html_body = body;
            email.references = vec![reference.clone()];
            email.in_reply_to = reference;
            let attachment = FetchedAttachment { file_name, content_type: "text/plain".into(), content: b"x".to_vec() };
            if let Ok(built) = build_message(&message, vec![attachment], at()) {
                let bytes = built.formatted();
                let parsed = MessageParser::default().parse(&bytes).expect("parses");
                proptest::prop_assert!(parsed.header("Bcc").is_none());
                proptest::prop_assert_eq!(parsed.message_id(), Some("0123456789abcdef0123456789abcdef@acme.example"));
            }
        }
    }

    #[test]
    fn o4_text_only_email_still_gets_an_html_alternative() {
        let mut message = reply(AuthorKind::Agent);
        let email = message.email.as_mut().expect("email");
        email.html_body.clear();
        email.text_body = "Tom & Jerry <3\nline two\n\nnext paragraph".into();
        email.in_reply_to.clear();
        email.references.clear();
        let bytes = built_bytes(&message, Vec::new());
        let parsed = MessageParser::default().parse(&bytes).expect("parses");
        assert_eq!(
            parsed.body_html(0).map(|body| lf(&body)),
            Some(
                "<html><body>\n<p>Tom &amp; Jerry &lt;3<br>\nline two</p>\n<p>next paragraph</p>\n</body></html>\n"
                    .into()
            )
        );
        assert!(parsed.header("In-Reply-To").is_none(), "a first message threads on nothing");
        assert!(parsed.header("References").is_none());
    }

    #[test]
    fn c12_recipient_falls_back_to_the_message_recipient_and_names_are_optional() {
        let mut message = reply(AuthorKind::Agent);
        message.recipient_name = "Kim Lê".into();
        let email = message.email.as_mut().expect("email");
        email.to.clear();
        email.from_name = "Acme Support".into();
        email.from_address = "inbox-1.acme@fallback.switchboard.invalid".into();
        let bytes = built_bytes(&message, Vec::new());
        let parsed = MessageParser::default().parse(&bytes).expect("parses");
        let to = parsed.to().and_then(|to| to.first()).expect("a To");
        assert_eq!((to.name(), to.address()), (Some("Kim Lê"), Some("kim@example.org")));
        let from = parsed.from().and_then(|from| from.first()).expect("a From");
        assert_eq!(from.address(), Some("inbox-1.acme@fallback.switchboard.invalid"));
    }

    #[test]
    fn o4_unsendable_events_are_refused_with_the_reason() {
        let mut no_email = reply(AuthorKind::Agent);
        no_email.email = None;
        assert!(matches!(build_message(&no_email, Vec::new(), at()), Err(BuildError::MissingEmail)));

        let mut no_id = reply(AuthorKind::Agent);
        no_id.email.as_mut().expect("email").message_id_header.clear();
        assert!(matches!(build_message(&no_id, Vec::new(), at()), Err(BuildError::MissingMessageId)));

        let mut bad_from = reply(AuthorKind::Agent);
        bad_from.email.as_mut().expect("email").from_address = "not an address".into();
        assert!(matches!(build_message(&bad_from, Vec::new(), at()), Err(BuildError::InvalidFrom { .. })));

        let mut nobody = reply(AuthorKind::Agent);
        nobody.email.as_mut().expect("email").to.clear();
        nobody.recipient.clear();
        assert!(matches!(build_message(&nobody, Vec::new(), at()), Err(BuildError::NoRecipient)));

        let mut bad_to = reply(AuthorKind::Agent);
        bad_to.email.as_mut().expect("email").to = vec!["kim@".into()];
        assert!(matches!(build_message(&bad_to, Vec::new(), at()), Err(BuildError::InvalidRecipient { .. })));
    }

    #[test]
    fn o5_attachment_answers_map_to_permanent_or_retryable() {
        assert_eq!(
            attachment_http_outcome("a.pdf", 404, None),
            SendOutcome::Permanent {
                error: "attachment 'a.pdf' could not be fetched: HTTP 404".into(),
                status_code: 404
            }
        );
        assert!(matches!(
            attachment_http_outcome("a.pdf", 503, Some(Duration::from_secs(7))),
            SendOutcome::Retryable { status_code: 503, retry_after: Some(delay), .. } if delay == Duration::from_secs(7)
        ));
        assert!(matches!(attachment_http_outcome("a.pdf", 429, None), SendOutcome::Retryable { .. }));
        assert!(matches!(attachment_http_outcome("a.pdf", 408, None), SendOutcome::Retryable { .. }));
    }

    #[test]
    fn attachment_names_come_from_the_reference_or_the_url() {
        let named =
            OutboundAttachment { url: "https://x/y/z.png".into(), file_name: "photo.png".into(), ..Default::default() };
        assert_eq!(attachment_name(&named), "photo.png");
        let unnamed = OutboundAttachment { url: "https://x/y/z.png?sig=1".into(), ..Default::default() };
        assert_eq!(attachment_name(&unnamed), "z.png");
        let bare = OutboundAttachment { url: "https://x/".into(), ..Default::default() };
        assert_eq!(attachment_name(&bare), "attachment");
    }

    #[test]
    fn smtp_tls_modes_parse() {
        assert_eq!("STARTTLS".parse::<SmtpTls>(), Ok(SmtpTls::StartTls));
        assert_eq!("none".parse::<SmtpTls>(), Ok(SmtpTls::None));
        assert_eq!("tls".parse::<SmtpTls>(), Ok(SmtpTls::Tls));
        assert!("ssl".parse::<SmtpTls>().is_err());
    }
}
