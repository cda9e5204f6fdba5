//! Email over SMTP (O4, O5, C2, C12, R4) against the stack's real Mailpit, through the delivery
//! service's `SmtpRelay`: what arrives is read back through Mailpit's REST API and parsed.
//! Every test sends to its own unique address and finds its mail by Message-ID, so the tests
//! run in parallel against one Mailpit.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;
use switchboard_runtime::attachment_hosts::AttachmentHosts;

use anyhow::Context;
use mail_parser::{MessageParser, MimeHeaders};
use switchboard_delivery::email::{SmtpRelay, SmtpSettings, SmtpTls};
use switchboard_delivery::outcome::SendOutcome;
use switchboard_proto::events::v1::{
    Author, AuthorKind, Automation, ChannelType, OutboundAttachment, OutboundEmail, OutboundMessageQueued,
    OutboundPurpose,
};
use switchboard_runtime::outbound::{DEFAULT_FALLBACK_DOMAIN, default_fallback_address, email_message_id};
use switchboard_tests::{KillOnDrop, Mailpit, free_port};
use uuid::Uuid;

const ARRIVAL: Duration = Duration::from_secs(15);

fn relay_to(mailpit: &Mailpit) -> anyhow::Result<SmtpRelay> {
    relay_at(mailpit.smtp_port, Some(("agent@acme.example", "any password")))
}

fn relay_at(port: u16, credentials: Option<(&str, &str)>) -> anyhow::Result<SmtpRelay> {
    SmtpRelay::new(SmtpSettings {
        host: "127.0.0.1".into(),
        port,
        tls: SmtpTls::None,
        username: credentials.map(|(user, _)| user.to_owned()),
        password: credentials.map(|(_, password)| password.to_owned()),
        timeout: Duration::from_secs(5),
        // Attachments come from a local stand-in.
        attachment_hosts: AttachmentHosts::AnyAddress,
    })
}

/// A unique customer address, so this test's mail is told apart from every other test's.
fn customer_address() -> String {
    format!("kim-{}@customer.example", Uuid::now_v7().simple())
}

/// An agent's reply as the API resolves it (C2: from-name mode, signature with the agent's
/// name; R10: threading on the customer's last message).
fn agent_reply(from_name: &str, from_address: &str, to: &str) -> OutboundMessageQueued {
    let reply_id = Uuid::now_v7();
    let message_id = email_message_id(reply_id, from_address);
    OutboundMessageQueued {
        reply_id: reply_id.to_string(),
        conversation_id: format!("conv-{}", Uuid::now_v7().simple()),
        inbox_id: "support".into(),
        channel_id: "team-email".into(),
        channel_type: ChannelType::TeamEmail as i32,
        purpose: OutboundPurpose::ConversationReply as i32,
        author: Some(Author {
            kind: AuthorKind::Agent as i32,
            agent_id: "ana".into(),
            name: "Ana Díaz".into(),
            automation: 0,
        }),
        text: "Your parcel ships today.".into(),
        recipient: to.into(),
        recipient_name: "Kim Lê".into(),
        idempotency_key: message_id.clone(),
        email: Some(OutboundEmail {
            from_name: from_name.into(),
            from_address: from_address.into(),
            to: vec![to.into()],
            subject: "Re: Où est ma commande ?".into(),
            message_id_header: message_id,
            in_reply_to: format!("{}@customer.example", Uuid::now_v7().simple()),
            references: vec![
                format!("{}@customer.example", Uuid::now_v7().simple()),
                format!("{}@acme.example", Uuid::now_v7().simple()),
            ],
            from_fallback_address: false,
            text_body: "Hello Kim,\nyour parcel ships today.\n\n-- \nAna Díaz\nAcme Support".into(),
            html_body: "<p>Hello Kim,<br>your parcel ships today.</p><p>-- <br><b>Ana Díaz</b><br>Acme Support</p>"
                .into(),
        }),
        ..Default::default()
    }
}

fn email_of(message: &OutboundMessageQueued) -> &OutboundEmail {
    message.email.as_ref().expect("the test builds an email")
}

fn lf(body: &str) -> String {
    body.replace("\r\n", "\n")
}

/// Sends `message` through the relay, expects `Sent` with its Message-ID, and returns the raw
/// bytes Mailpit received.
async fn send_and_receive(mailpit: &Mailpit, message: &OutboundMessageQueued) -> anyhow::Result<Vec<u8>> {
    let relay = relay_to(mailpit)?;
    let message_id = email_of(message).message_id_header.clone();
    let outcome = relay.send(message).await;
    assert_eq!(outcome, SendOutcome::Sent { provider_message_id: message_id.clone(), status_code: 250 });
    let received = mailpit.wait_for_message_id(&message_id, ARRIVAL).await?;
    mailpit.raw(&received.id).await
}

/// What every received reply must show (O4): its identity, Message-ID, threading and both
/// bodies with the signature, as multipart/alternative.
fn assert_received_as_sent(raw: &[u8], sent: &OutboundMessageQueued) {
    let email = email_of(sent);
    let parsed = MessageParser::default().parse(raw).expect("mailpit's raw message parses");
    let from = parsed.from().and_then(|from| from.first()).expect("a From");
    assert_eq!(from.name(), Some(email.from_name.as_str()));
    assert_eq!(from.address(), Some(email.from_address.as_str()));
    let to = parsed.to().and_then(|to| to.first()).expect("a To");
    assert_eq!(to.address(), Some(email.to[0].as_str()));
    assert_eq!(parsed.subject(), Some(email.subject.as_str()));
    assert_eq!(parsed.message_id(), Some(email.message_id_header.as_str()));
    assert_eq!(parsed.in_reply_to().as_text(), Some(email.in_reply_to.as_str()));
    let references: Vec<String> = parsed
        .references()
        .as_text_list()
        .expect("a References list")
        .iter()
        .map(|reference| reference.to_string())
        .collect();
    assert_eq!(references, email.references);
    assert!(parsed.date().is_some(), "a Date header");
    assert_eq!(lf(&parsed.body_text(0).expect("a text body")), email.text_body);
    assert_eq!(lf(&parsed.body_html(0).expect("an html body")), email.html_body);
    let alternative = parsed.parts.iter().any(|part| {
        part.content_type().is_some_and(|ct| ct.ctype() == "multipart" && ct.subtype() == Some("alternative"))
    });
    assert!(alternative, "the bodies travel as multipart/alternative");
}

#[tokio::test]
async fn o4_reply_in_agent_and_company_mode_arrives_with_identity_threading_and_signature() -> anyhow::Result<()> {
    let mailpit = Mailpit::from_env()?;
    let reply = agent_reply("Ana Díaz from Acme Support", "support@acme.example", &customer_address());
    let raw = send_and_receive(&mailpit, &reply).await?;
    assert_received_as_sent(&raw, &reply);
    let parsed = MessageParser::default().parse(&raw).expect("parses");
    let content_type = parsed.content_type().expect("a Content-Type");
    assert_eq!((content_type.ctype(), content_type.subtype()), ("multipart", Some("alternative")));
    assert!(parsed.header("Auto-Submitted").is_none(), "an agent's reply is not automated");
    Ok(())
}

#[tokio::test]
async fn o4_reply_in_company_mode_arrives_under_the_company_name() -> anyhow::Result<()> {
    let mailpit = Mailpit::from_env()?;
    let reply = agent_reply("Acme Support", "support@acme.example", &customer_address());
    let raw = send_and_receive(&mailpit, &reply).await?;
    assert_received_as_sent(&raw, &reply);
    Ok(())
}

#[tokio::test]
async fn c12_reply_from_the_fallback_address_arrives_from_it() -> anyhow::Result<()> {
    let mailpit = Mailpit::from_env()?;
    let fallback = default_fallback_address("acme", "support", DEFAULT_FALLBACK_DOMAIN);
    let mut reply = agent_reply("Acme Support", &fallback, &customer_address());
    let email = reply.email.as_mut().expect("email");
    email.from_fallback_address = true;
    assert!(email.message_id_header.ends_with(&format!("@{DEFAULT_FALLBACK_DOMAIN}")));
    let raw = send_and_receive(&mailpit, &reply).await?;
    assert_received_as_sent(&raw, &reply);
    let parsed = MessageParser::default().parse(&raw).expect("parses");
    assert_eq!(
        parsed.from().and_then(|from| from.first()).and_then(|from| from.address()),
        Some("support.acme@fallback.switchboard.invalid")
    );
    Ok(())
}

#[tokio::test]
async fn r4_owner_notification_arrives_marked_auto_submitted() -> anyhow::Result<()> {
    let mailpit = Mailpit::from_env()?;
    let owner = format!("owner-{}@acme.example", Uuid::now_v7().simple());
    let reply_id = Uuid::now_v7();
    let message_id = email_message_id(reply_id, "support@acme.example");
    let notification = OutboundMessageQueued {
        reply_id: reply_id.to_string(),
        conversation_id: "conv-r4".into(),
        channel_type: ChannelType::TeamEmail as i32,
        purpose: OutboundPurpose::OwnerNotification as i32,
        author: Some(Author {
            kind: AuthorKind::Automation as i32,
            automation: Automation::OwnerNotification as i32,
            name: "Switchboard".into(),
            ..Default::default()
        }),
        recipient: owner.clone(),
        idempotency_key: message_id.clone(),
        email: Some(OutboundEmail {
            from_name: "Switchboard".into(),
            from_address: "support@acme.example".into(),
            to: vec![owner.clone()],
            subject: "New message from Kim Lê while you were away".into(),
            message_id_header: message_id.clone(),
            text_body: "Kim Lê wrote: where is my order?".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let raw = send_and_receive(&mailpit, &notification).await?;
    let parsed = MessageParser::default().parse(&raw).expect("parses");
    assert_eq!(parsed.header("Auto-Submitted").and_then(|value| value.as_text()), Some("auto-generated"));
    assert_eq!(parsed.to().and_then(|to| to.first()).and_then(|to| to.address()), Some(owner.as_str()));
    assert_eq!(parsed.subject(), Some("New message from Kim Lê while you were away"));
    assert_eq!(lf(&parsed.body_text(0).expect("a text body")), "Kim Lê wrote: where is my order?");
    // No HTML was given: the text's HTML rendering is the alternative.
    assert!(parsed.body_html(0).expect("an html body").contains("Kim Lê wrote: where is my order?"));
    Ok(())
}

/// A real HTTP file server (Python's `http.server`) over a directory of its own.
struct FileServer {
    base_url: String,
    directory: PathBuf,
    _process: KillOnDrop,
}

impl FileServer {
    async fn serving(files: &[(&str, &[u8])]) -> anyhow::Result<FileServer> {
        let directory = std::env::temp_dir().join(format!("attachments-{}", Uuid::now_v7().simple()));
        std::fs::create_dir_all(&directory)?;
        for (name, content) in files {
            std::fs::write(directory.join(name), content)?;
        }
        let port = free_port()?;
        let child = Command::new("python3")
            .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"])
            .arg(&directory)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("failed to start python3 -m http.server")?;
        let process = KillOnDrop(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            anyhow::ensure!(std::time::Instant::now() < deadline, "the file server did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(FileServer { base_url: format!("http://127.0.0.1:{port}"), directory, _process: process })
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

#[tokio::test]
async fn o4_attachment_is_fetched_and_sent_inside_multipart_mixed() -> anyhow::Result<()> {
    let mailpit = Mailpit::from_env()?;
    let invoice: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let files = FileServer::serving(&[("invoice.pdf", &invoice)]).await?;
    let mut reply = agent_reply("Acme Support", "support@acme.example", &customer_address());
    reply.attachments.push(OutboundAttachment {
        url: format!("{}/invoice.pdf", files.base_url),
        file_name: "facture été.pdf".into(),
        content_type: "application/pdf".into(),
        size_bytes: invoice.len() as u64,
    });
    let raw = send_and_receive(&mailpit, &reply).await?;
    assert_received_as_sent(&raw, &reply);
    let parsed = MessageParser::default().parse(&raw).expect("parses");
    let content_type = parsed.content_type().expect("a Content-Type");
    assert_eq!((content_type.ctype(), content_type.subtype()), ("multipart", Some("mixed")));
    assert_eq!(parsed.attachment_count(), 1);
    let attachment = parsed.attachment(0).expect("the attachment");
    assert_eq!(attachment.attachment_name(), Some("facture été.pdf"));
    assert_eq!(attachment.content_type().map(|ct| (ct.ctype(), ct.subtype())), Some(("application", Some("pdf"))));
    assert_eq!(attachment.contents(), invoice.as_slice());
    Ok(())
}

#[tokio::test]
async fn o5_attachment_that_cannot_be_fetched_fails_permanently_and_nothing_is_sent() -> anyhow::Result<()> {
    let mailpit = Mailpit::from_env()?;
    let files = FileServer::serving(&[]).await?;
    let to = customer_address();
    let mut reply = agent_reply("Acme Support", "support@acme.example", &to);
    reply.attachments.push(OutboundAttachment {
        url: format!("{}/gone.pdf", files.base_url),
        file_name: "gone.pdf".into(),
        content_type: "application/pdf".into(),
        size_bytes: 0,
    });
    let outcome = relay_to(&mailpit)?.send(&reply).await;
    assert_eq!(
        outcome,
        SendOutcome::Permanent {
            error: "attachment 'gone.pdf' could not be fetched: HTTP 404".into(),
            status_code: 404
        }
    );
    // A later, successful send to the same address is the only mail there: the failed one never
    // reached the relay.
    let follow_up = agent_reply("Acme Support", "support@acme.example", &to);
    send_and_receive(&mailpit, &follow_up).await?;
    let received = mailpit.search(&format!("to:\"{to}\"")).await?;
    let ids: Vec<&str> = received.iter().map(|summary| summary.message_id.as_str()).collect();
    assert_eq!(ids, [email_of(&follow_up).message_id_header.as_str()]);
    Ok(())
}

#[tokio::test]
async fn o5_relay_refusing_with_5xx_is_a_permanent_failure_with_its_text() -> anyhow::Result<()> {
    let (refusing, _process) = Mailpit::spawn_with_chaos("Recipient:550:100").await?;
    let reply = agent_reply("Acme Support", "support@acme.example", &customer_address());
    match relay_to(&refusing)?.send(&reply).await {
        SendOutcome::Permanent { error, status_code } => {
            assert_eq!(status_code, 550);
            assert!(error.contains("550"), "the relay's answer is kept: {error}");
        }
        other => panic!("a 5xx answer must be permanent, got {other:?}"),
    }
    assert!(refusing.messages().await?.is_empty(), "the refusing relay stored nothing");
    Ok(())
}

#[tokio::test]
async fn o5_relay_answering_4xx_is_retryable() -> anyhow::Result<()> {
    let (busy, _process) = Mailpit::spawn_with_chaos("Sender:451:100").await?;
    let reply = agent_reply("Acme Support", "support@acme.example", &customer_address());
    match relay_to(&busy)?.send(&reply).await {
        SendOutcome::Retryable { status_code, error, .. } => {
            assert_eq!(status_code, 451, "{error}");
        }
        other => panic!("a 4xx answer must be retryable, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn o5_unreachable_relay_is_retryable() -> anyhow::Result<()> {
    let port = free_port()?;
    let reply = agent_reply("Acme Support", "support@acme.example", &customer_address());
    match relay_at(port, None)?.send(&reply).await {
        SendOutcome::Retryable { status_code, retry_after, .. } => {
            assert_eq!((status_code, retry_after), (0, None));
        }
        other => panic!("a relay that cannot be reached must be retried, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn o5_required_starttls_that_the_relay_does_not_offer_is_retryable_and_nothing_goes_out_in_clear()
-> anyhow::Result<()> {
    // The stack's Mailpit offers no STARTTLS: a relay configured to require it must not fall
    // back to plain text.
    let mailpit = Mailpit::from_env()?;
    let to = customer_address();
    let reply = agent_reply("Acme Support", "support@acme.example", &to);
    let relay = SmtpRelay::new(SmtpSettings {
        host: "127.0.0.1".into(),
        port: mailpit.smtp_port,
        tls: SmtpTls::StartTls,
        username: None,
        password: None,
        timeout: Duration::from_secs(5),
        // Attachments come from a local stand-in.
        attachment_hosts: AttachmentHosts::AnyAddress,
    })?;
    match relay.send(&reply).await {
        SendOutcome::Retryable { status_code, .. } => assert_eq!(status_code, 0),
        other => panic!("a relay without the required STARTTLS must not take the mail, got {other:?}"),
    }
    // An agent reply to the same address afterwards is the only mail there.
    let follow_up = agent_reply("Acme Support", "support@acme.example", &to);
    send_and_receive(&mailpit, &follow_up).await?;
    let received = mailpit.search(&format!("to:\"{to}\"")).await?;
    assert_eq!(received.len(), 1, "the STARTTLS-required send must not have arrived");
    Ok(())
}
