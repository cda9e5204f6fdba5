//! Ingest against the real broker: every channel in its provider's wire format, delivered over
//! real HTTP and real SMTP (Python's smtplib as the client), read back from the inbound topic.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use switchboard_ingest::secrets::{ChannelSecrets, Secret, Secrets};
use switchboard_ingest::signature::sign_hex;
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    ChannelConfigured, ChannelType, ConsentMode, EmailSettings, Envelope, InboundMessageReceived, InboxAccessMode,
    InboxConfigured, InboxKind, MessageKind, MessengerSettings, WhatsAppSettings,
};
use switchboard_tests::TestEnv;

const ACCOUNT: &str = "acme";

fn channel(channel_id: &str, channel_type: ChannelType, enabled: bool) -> ChannelConfigured {
    ChannelConfigured {
        channel_id: channel_id.into(),
        inbox_id: "support".into(),
        channel_type: channel_type as i32,
        name: channel_id.into(),
        enabled,
        ..Default::default()
    }
}

fn channel_configured(channel: ChannelConfigured) -> Payload {
    Payload::ChannelConfigured(Box::new(channel))
}

fn config_payloads() -> Vec<Payload> {
    let email = |channel_id: &str, address: &str, enabled: bool| {
        channel_configured(ChannelConfigured {
            email: Some(EmailSettings { team_address: address.into(), ..Default::default() }),
            ..channel(channel_id, ChannelType::TeamEmail, enabled)
        })
    };
    vec![
        Payload::InboxConfigured(InboxConfigured {
            inbox_id: "support".into(),
            name: "Support".into(),
            access_mode: InboxAccessMode::Everyone as i32,
            kind: InboxKind::Conversations as i32,
            ..Default::default()
        }),
        email("team-mail", "support@acme.example", true),
        email("old-mail", "old@acme.example", false),
        channel_configured(ChannelConfigured {
            messenger: Some(MessengerSettings {
                page_id: "104212345678901".into(),
                consent_mode: ConsentMode::Implicit as i32,
                ..Default::default()
            }),
            ..channel("fb", ChannelType::FacebookMessenger, true)
        }),
        channel_configured(ChannelConfigured {
            whatsapp: Some(WhatsAppSettings {
                phone_number_id: "106540352242922".into(),
                display_phone_number: "15550783881".into(),
                ..Default::default()
            }),
            ..channel("wa", ChannelType::Whatsapp, true)
        }),
        channel_configured(channel("contact-form", ChannelType::Forms, true)),
        channel_configured(channel("phone", ChannelType::Calling, true)),
        channel_configured(channel("telegram", ChannelType::Custom, true)),
    ]
}

fn secrets() -> Secrets {
    let mut secrets = Secrets::default();
    secrets.channels.insert(
        "fb".into(),
        ChannelSecrets {
            app_secret: Some(Secret::new("fb-app-secret")),
            verify_token: Some(Secret::new("fb-verify")),
            ..Default::default()
        },
    );
    secrets.channels.insert(
        "wa".into(),
        ChannelSecrets {
            app_secret: Some(Secret::new("wa-app-secret")),
            verify_token: Some(Secret::new("wa-verify")),
            ..Default::default()
        },
    );
    secrets
        .channels
        .insert("telegram".into(), ChannelSecrets { signing_key: Some(Secret::new("tg-key")), ..Default::default() });
    secrets
}

async fn setup(with_smtp: bool) -> anyhow::Result<(TestEnv, switchboard_ingest::BoundAddresses)> {
    let env = TestEnv::new().await?;
    env.publish_config_events(ACCOUNT, config_payloads()).await?;
    let bound = env.start_ingest_with(secrets(), with_smtp).await?;
    Ok((env, bound))
}

fn inbound_messages(events: &[Envelope]) -> Vec<&InboundMessageReceived> {
    events
        .iter()
        .filter_map(|event| match &event.payload {
            Some(Payload::InboundMessageReceived(inbound)) => Some(inbound),
            _ => None,
        })
        .collect()
}

/// Sends `message` with Python's smtplib; returns its outcome as JSON
/// (`{"ok": {refused}}` or `{"error": class, "code": n, "message": …}`).
fn send_with_smtplib(port: u16, from: &str, recipients: &[&str], message: &str) -> anyhow::Result<serde_json::Value> {
    const SCRIPT: &str = r#"
import json, smtplib, sys
port, sender, recipients, message = int(sys.argv[1]), sys.argv[2], sys.argv[3].split(","), sys.stdin.read()
try:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        refused = client.sendmail(sender, recipients, message.encode("utf-8"))
        print(json.dumps({"ok": {k: list(v) for k, v in refused.items()}, "features": sorted(client.esmtp_features)}, default=str))
except smtplib.SMTPRecipientsRefused as error:
    print(json.dumps({"error": "SMTPRecipientsRefused", "code": list(error.recipients.values())[0][0]}))
except smtplib.SMTPResponseException as error:
    print(json.dumps({"error": type(error).__name__, "code": error.smtp_code, "message": error.smtp_error.decode()}))
"#;
    use std::io::Write;
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT, &port.to_string(), from, &recipients.join(",")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(message.as_bytes())?;
    let output = child.wait_with_output()?;
    Ok(serde_json::from_slice(&output.stdout)?)
}

const MIME_MAIL: &str = "From: =?UTF-8?Q?J=C3=BCrgen_M=C3=BCller?= <juergen@kunde.example>\r\n\
To: Support <support@acme.example>\r\n\
Cc: boss@kunde.example\r\n\
Subject: =?ISO-8859-1?Q?Rechnung_f=FCr_M=E4rz?=\r\n\
Message-ID: <rechnung-42@kunde.example>\r\n\
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
Die Rechnung f=FCr M=E4rz fehlt.\r\n\
--inner\r\n\
Content-Type: text/html; charset=utf-8\r\n\
\r\n\
<p>Die <b>Rechnung</b> fehlt.</p>\r\n\
--inner--\r\n\
--outer\r\n\
Content-Type: application/pdf; name=\"rechnung.pdf\"\r\n\
Content-Disposition: attachment; filename=\"rechnung.pdf\"\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
JVBERi0xLjQKJcfsj6IK\r\n\
--outer--\r\n";

const FORWARDED_MAIL: &str = "From: Fiona <fiona@acme.example>\r\n\
To: support@acme.example\r\n\
Cc: added-later@acme.example\r\n\
Subject: Fwd: Broken order\r\n\
Message-ID: <fwd-7@acme.example>\r\n\
\r\n\
Please help.\r\n\
\r\n\
---------- Forwarded message ---------\r\n\
From: Olga Original <olga@customer.example>\r\n\
Date: Mon, 2 Mar 2026 at 09:12\r\n\
Subject: Broken order\r\n\
To: Fiona <fiona@acme.example>\r\n\
Cc: carl@customer.example\r\n\
\r\n\
.My order arrived broken (this line starts with a dot).\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c1_c3_team_email_over_http_and_smtp_reaches_the_log_and_a_conversation() -> anyhow::Result<()> {
    let (env, bound) = setup(true).await?;
    env.start_router("router-0").await?;
    env.start_projector().await?;
    let http = reqwest::Client::new();

    // An inbound-mail relay posting the raw message.
    let response = http
        .post(format!("http://{}/v1/email/inbound", bound.http))
        .header("content-type", "message/rfc822")
        .body(MIME_MAIL)
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 202);
    let accepted: serde_json::Value = response.json().await?;
    let http_message_id = accepted["message_id"].as_str().unwrap().to_owned();

    // A real SMTP client delivering a forwarded mail.
    let smtp_port = bound.smtp.unwrap().port();
    let sent = tokio::task::spawn_blocking(move || {
        send_with_smtplib(smtp_port, "fiona@acme.example", &["support@acme.example"], FORWARDED_MAIL)
    })
    .await??;
    assert_eq!(sent["ok"], serde_json::json!({}), "{sent}");
    assert!(sent["features"].as_array().unwrap().iter().any(|feature| feature == "size"));

    let events = env.read_committed_events(&env.topics.inbound)?;
    let inbound = inbound_messages(&events);
    assert_eq!(inbound.len(), 2);
    let mime = inbound.iter().find(|m| m.message_id == http_message_id).unwrap();
    assert_eq!(mime.channel_id, "team-mail");
    assert_eq!(mime.provider_message_id, "rechnung-42@kunde.example");
    assert_eq!(mime.sender.as_ref().unwrap().display_name, "Jürgen Müller");
    assert_eq!(mime.text, "Die Rechnung für März fehlt.");
    let content = mime.content.as_ref().unwrap();
    assert_eq!(content.subject, "Rechnung für März");
    assert_eq!(content.attachments[0].file_name, "rechnung.pdf");
    assert_eq!(content.attachments[0].size_bytes, 15);
    assert_eq!(content.attachments[0].sha256.len(), 64);

    let forwarded = inbound.iter().find(|m| m.provider_message_id == "fwd-7@acme.example").unwrap();
    assert_eq!(forwarded.sender.as_ref().unwrap().email, "olga@customer.example", "C3: logged to the original sender");
    let details = forwarded.content.as_ref().unwrap().email.as_ref().unwrap();
    assert_eq!(details.cc, ["carl@customer.example"], "C3: only the original CCs");
    assert!(forwarded.text.contains("\n.My order arrived broken"), "dot-unstuffed: {}", forwarded.text);
    assert!(events.iter().all(|event| event.partition_key == ACCOUNT));

    // Both mails, over HTTP and over SMTP, become conversations visible through the API.
    let api_url = env.start_api_server().await?;
    let mut clients = switchboard_tests::api_seed::clients_for(
        &api_url,
        &switchboard_tests::api_seed::identity("acme-admin", switchboard_api::auth::Role::Admin, &[]),
    )
    .await?;
    for message_id in [&http_message_id, &forwarded.message_id] {
        let message =
            switchboard_tests::demo::wait_visible(&mut clients.conversations, message_id, Duration::from_secs(60))
                .await?;
        assert_eq!(message.kind, "email");
    }
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c1_smtp_refuses_unknown_team_addresses_and_oversized_mail_and_c11_marks_switched_off_channels()
-> anyhow::Result<()> {
    let (env, bound) = setup(true).await?;
    let smtp_port = bound.smtp.unwrap().port();
    let unknown = tokio::task::spawn_blocking(move || {
        send_with_smtplib(smtp_port, "a@b.example", &["sales@acme.example"], "Subject: hi\r\n\r\nhi\r\n")
    })
    .await??;
    assert_eq!(unknown["error"], "SMTPRecipientsRefused");
    assert_eq!(unknown["code"], 550);

    let huge = format!("From: a@b.example\r\nSubject: big\r\n\r\n{}\r\n", "x".repeat(300 * 1024));
    let too_big = tokio::task::spawn_blocking(move || {
        send_with_smtplib(smtp_port, "a@b.example", &["support@acme.example"], &huge)
    })
    .await??;
    assert_eq!(too_big["code"], 552, "{too_big}");

    // C11: mail to a switched-off channel is still recorded, marked.
    let to_old = "From: a@b.example\r\nTo: old@acme.example\r\nMessage-ID: <c11@b.example>\r\n\r\nhello?\r\n";
    let sent =
        tokio::task::spawn_blocking(move || send_with_smtplib(smtp_port, "a@b.example", &["old@acme.example"], to_old))
            .await??;
    assert_eq!(sent["ok"], serde_json::json!({}), "{sent}");
    let events = env.read_committed_events(&env.topics.inbound)?;
    let inbound = inbound_messages(&events);
    assert_eq!(inbound.len(), 1, "nothing from the refused deliveries");
    assert_eq!(inbound[0].channel_id, "old-mail");
    assert!(inbound[0].channel_disabled_at_ingest);
    env.cleanup().await;
    Ok(())
}

const MESSENGER_DELIVERY: &str = r#"{"object":"page","entry":[{"id":"104212345678901","time":1772530000000,"messaging":[
  {"sender":{"id":"6543210987654321"},"recipient":{"id":"104212345678901"},"timestamp":1772530000000,
   "message":{"mid":"m_AbCdEf123","text":"Hello, is my order shipped?"}},
  {"sender":{"id":"6543210987654321"},"recipient":{"id":"104212345678901"},"timestamp":1772530001000,
   "postback":{"mid":"m_consent","title":"I agree","payload":"SWITCHBOARD_CONSENT_GRANTED"}}]}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c6_messenger_handshake_and_signed_webhook() -> anyhow::Result<()> {
    let (env, bound) = setup(false).await?;
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/webhooks/messenger", bound.http);

    let handshake = http
        .get(format!("{url}?hub.mode=subscribe&hub.verify_token=fb-verify&hub.challenge=1158201444"))
        .send()
        .await?;
    assert_eq!(handshake.status().as_u16(), 200);
    assert_eq!(handshake.text().await?, "1158201444");
    let wrong_token =
        http.get(format!("{url}?hub.mode=subscribe&hub.verify_token=guess&hub.challenge=1")).send().await?;
    assert_eq!(wrong_token.status().as_u16(), 403);

    let unsigned = http.post(&url).body(MESSENGER_DELIVERY).send().await?;
    assert_eq!(unsigned.status().as_u16(), 401);
    let forged = http
        .post(&url)
        .header(
            "x-hub-signature-256",
            format!("sha256={}", sign_hex(b"not-the-secret", &[MESSENGER_DELIVERY.as_bytes()])),
        )
        .body(MESSENGER_DELIVERY)
        .send()
        .await?;
    assert_eq!(forged.status().as_u16(), 403);
    let error: serde_json::Value = forged.json().await?;
    assert_eq!(error["error"]["code"], "signature_mismatch");

    let signature = format!("sha256={}", sign_hex(b"fb-app-secret", &[MESSENGER_DELIVERY.as_bytes()]));
    let delivered = http.post(&url).header("x-hub-signature-256", &signature).body(MESSENGER_DELIVERY).send().await?;
    assert_eq!(delivered.status().as_u16(), 200);

    let events = env.read_committed_events(&env.topics.inbound)?;
    assert_eq!(events.len(), 2);
    let Some(Payload::InboundMessageReceived(message)) = &events[0].payload else { panic!("{:?}", events[0]) };
    assert_eq!(message.thread_key, "6543210987654321");
    assert_eq!(message.text, "Hello, is my order shipped?");
    let Some(Payload::ContactConsentReceived(consent)) = &events[1].payload else { panic!("{:?}", events[1]) };
    assert!(consent.granted);
    assert_eq!(consent.sender_external_id, "6543210987654321");
    env.cleanup().await;
    Ok(())
}

const WHATSAPP_DELIVERY: &str = r#"{"object":"whatsapp_business_account","entry":[{"id":"102290129340398","changes":[{"field":"messages","value":{
  "messaging_product":"whatsapp","metadata":{"display_phone_number":"15550783881","phone_number_id":"106540352242922"},
  "contacts":[{"profile":{"name":"Sheena Nelson"},"wa_id":"16505551234"}],
  "messages":[
    {"from":"16505551234","id":"wamid.TEXT1","timestamp":"1749416383","type":"text","text":{"body":"Does it come in another color?"}},
    {"from":"16505551234","id":"wamid.DOC1","timestamp":"1749416390","type":"document","document":{"caption":"invoice","filename":"invoice.pdf","mime_type":"application/pdf","sha256":"EtaEIKDkRSuoeOJRsZJThNJY1jMa9uB0Zc+Jq9dAi3c=","id":"1003383421387256"}},
    {"from":"16505551234","id":"wamid.UNS1","timestamp":"1749416420","type":"unsupported","errors":[{"code":131051,"title":"Message type unknown"}]}],
  "statuses":[{"id":"wamid.OUT1","status":"delivered","timestamp":"1749416500","recipient_id":"16505551234"}]}}]}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c8_b1_whatsapp_webhook_and_a_provider_retry_yield_one_event_per_message() -> anyhow::Result<()> {
    let (env, bound) = setup(false).await?;
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/webhooks/whatsapp", bound.http);
    let signature = format!("sha256={}", sign_hex(b"wa-app-secret", &[WHATSAPP_DELIVERY.as_bytes()]));
    let post = || http.post(&url).header("x-hub-signature-256", &signature).body(WHATSAPP_DELIVERY).send();

    let first: serde_json::Value = post().await?.error_for_status()?.json().await?;
    // Meta retries a delivery it did not see acknowledged: the same body again.
    let retry: serde_json::Value = post().await?.error_for_status()?.json().await?;
    let ids = |answer: &serde_json::Value| -> Vec<String> {
        answer["events"].as_array().unwrap().iter().map(|event| event["id"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(ids(&first), ids(&retry));
    assert!(retry["events"].as_array().unwrap().iter().all(|event| event["duplicate"] == true));
    assert_eq!(first["events"].as_array().unwrap().len(), 4);

    // A second ingest instance (or a restart) maps the retry to the same message ids, which the
    // router deduplicates across instances.
    let other_instance = env.start_ingest_with(secrets(), false).await?;
    let from_other: serde_json::Value = http
        .post(format!("http://{}/v1/webhooks/whatsapp", other_instance.http))
        .header("x-hub-signature-256", &signature)
        .body(WHATSAPP_DELIVERY)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    assert_eq!(ids(&from_other), ids(&first));

    let events = env.read_committed_events(&env.topics.inbound)?;
    // One copy from the first instance, one from the second; none from the retry.
    assert_eq!(events.len(), 8);
    let inbound = inbound_messages(&events);
    let mut by_message_id: BTreeMap<&str, usize> = BTreeMap::new();
    for message in &inbound {
        *by_message_id.entry(message.message_id.as_str()).or_default() += 1;
    }
    assert_eq!(by_message_id.len(), 3);
    let document = inbound.iter().find(|m| m.provider_message_id == "wamid.DOC1").unwrap();
    let content = document.content.as_ref().unwrap();
    assert_eq!(content.kind, MessageKind::Document as i32);
    assert_eq!(content.attachments[0].file_name, "invoice.pdf");
    let unsupported = inbound.iter().find(|m| m.provider_message_id == "wamid.UNS1").unwrap();
    assert_eq!(unsupported.content.as_ref().unwrap().kind, MessageKind::Unsupported as i32);
    assert!(events.iter().any(|event| matches!(&event.payload,
        Some(Payload::DeliveryStatusReported(status)) if status.provider_message_id == "wamid.OUT1" && status.status == "delivered")));
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c7_c9_c10_forms_calls_and_custom_channels_over_http() -> anyhow::Result<()> {
    let (env, bound) = setup(false).await?;
    let http = reqwest::Client::new();
    let base = format!("http://{}", bound.http);

    let form = http
        .post(format!("{base}/v1/channels/contact-form/forms/submissions"))
        .json(&serde_json::json!({"submission_id": "sub-1", "fields": [
            {"name": "email", "value": "kim@example.org"},
            {"name": "ticket_name", "value": "Refund"},
            {"name": "ticket_pipeline", "value": "support"},
            {"name": "campaign", "value": "spring", "hidden": true}]}))
        .send()
        .await?;
    assert_eq!(form.status().as_u16(), 202);

    for state in ["ringing", "answered", "completed"] {
        let call = http
            .post(format!("{base}/v1/channels/phone/calls/events"))
            .json(&serde_json::json!({"call_id": "CA77", "state": state, "direction": "inbound",
                "from": "+4930123456", "to": "+4930999999", "duration_seconds": 61}))
            .send()
            .await?;
        assert_eq!(call.status().as_u16(), 202);
    }

    let body = br#"{"message_id":"tg-1","thread_id":"tg-chat-9","sender":{"id":"tg-user-1","name":"Kim"},"text":"Hi from Telegram"}"#;
    let timestamp = chrono::Utc::now().timestamp().to_string();
    let signature = format!("v1={}", sign_hex(b"tg-key", &[timestamp.as_bytes(), b".", body]));
    let custom = http
        .post(format!("{base}/v1/channels/telegram/custom/messages"))
        .header("x-switchboard-timestamp", &timestamp)
        .header("x-switchboard-signature", &signature)
        .body(&body[..])
        .send()
        .await?;
    assert_eq!(custom.status().as_u16(), 202);
    let stale = (chrono::Utc::now().timestamp() - 3_600).to_string();
    let replayed = http
        .post(format!("{base}/v1/channels/telegram/custom/messages"))
        .header("x-switchboard-timestamp", &stale)
        .header("x-switchboard-signature", format!("v1={}", sign_hex(b"tg-key", &[stale.as_bytes(), b".", body])))
        .body(&body[..])
        .send()
        .await?;
    assert_eq!(replayed.status().as_u16(), 401);

    let events = env.read_committed_events(&env.topics.inbound)?;
    let inbound = inbound_messages(&events);
    assert_eq!(inbound.len(), 5);
    let form = inbound.iter().find(|m| m.channel_id == "contact-form").unwrap();
    let content = form.content.as_ref().unwrap();
    assert_eq!(content.form_ticket.as_ref().unwrap().name, "Refund");
    assert!(content.form_fields.iter().any(|field| field.name == "campaign" && field.hidden));
    assert!(content.form_fields.iter().any(|field| field.name == "ticket_pipeline" && field.hidden));
    let calls: Vec<_> = inbound.iter().filter(|m| m.channel_id == "phone").collect();
    assert_eq!(calls.len(), 3);
    assert!(calls.iter().all(|call| call.thread_key == "call:CA77"));
    let telegram = inbound.iter().find(|m| m.channel_id == "telegram").unwrap();
    assert_eq!(telegram.thread_key, "tg-chat-9");
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_400_404_413_with_a_named_problem_and_metrics_count_it() -> anyhow::Result<()> {
    let (env, bound) = setup(false).await?;
    let http = reqwest::Client::new();
    let base = format!("http://{}", bound.http);

    let malformed = http.post(format!("{base}/v1/channels/phone/calls/events")).body("{not json").send().await?;
    assert_eq!(malformed.status().as_u16(), 400);
    let error: serde_json::Value = malformed.json().await?;
    assert_eq!(error["error"]["code"], "malformed_body");

    let missing_field = http
        .post(format!("{base}/v1/channels/phone/calls/events"))
        .json(&serde_json::json!({"call_id": "c", "state": "ringing", "direction": "inbound", "from": "1"}))
        .send()
        .await?;
    assert_eq!(missing_field.status().as_u16(), 400);
    let error: serde_json::Value = missing_field.json().await?;
    assert!(error["error"]["message"].as_str().unwrap().contains("missing field `to`"), "{error}");

    let not_mail = http.post(format!("{base}/v1/email/inbound")).body("hello").send().await?;
    assert_eq!(not_mail.status().as_u16(), 400);
    let unknown_channel =
        http.post(format!("{base}/v1/channels/nope/forms/submissions")).json(&serde_json::json!({})).send().await?;
    assert_eq!(unknown_channel.status().as_u16(), 404);
    let unknown_address = http
        .post(format!("{base}/v1/email/inbound"))
        .body("From: a@b.example\r\nTo: nobody@acme.example\r\n\r\nhi\r\n")
        .send()
        .await?;
    assert_eq!(unknown_address.status().as_u16(), 404);
    let oversized = http
        .post(format!("{base}/v1/email/inbound"))
        .body(format!("From: a@b.example\r\nTo: support@acme.example\r\n\r\n{}", "x".repeat(70 * 1024)))
        .send()
        .await?;
    assert_eq!(oversized.status().as_u16(), 413);

    let metrics = http.get(format!("{base}/metrics")).send().await?.text().await?;
    assert!(
        metrics.contains("switchboard_ingest_rejected_total{channel_type=\"calling\",reason=\"malformed_body\"} 2")
    );
    assert!(
        metrics.contains("switchboard_ingest_rejected_total{channel_type=\"team_email\",reason=\"body_too_large\"} 1")
    );
    assert!(env.read_committed_events(&env.topics.inbound)?.is_empty(), "nothing published for bad input");
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b1_kafka_down_answers_503_over_http_and_451_over_smtp() -> anyhow::Result<()> {
    let mut config = switchboard_runtime::config_store::ConfigSnapshot::default();
    for payload in config_payloads() {
        config.apply(&switchboard_runtime::envelope::new_root(ACCOUNT, "k", chrono::Utc::now(), payload));
    }
    // A real producer pointed at a port where no broker listens.
    let settings = switchboard_ingest::IngestSettings {
        delivery_timeout: Duration::from_millis(1_500),
        smtp_listen: Some("127.0.0.1:0".parse()?),
        ..switchboard_ingest::IngestSettings::new("127.0.0.1:0".parse()?, "127.0.0.1:1", "sb.inbound.v1")
    };
    let (bound_sender, bound) = tokio::sync::oneshot::channel();
    let store = switchboard_runtime::config_store::ConfigStore::fixed(config);
    tokio::spawn(switchboard_ingest::serve_all(settings, store, bound_sender, std::future::pending()));
    let bound = bound.await?;
    let response =
        reqwest::Client::new().post(format!("http://{}/v1/email/inbound", bound.http)).body(MIME_MAIL).send().await?;
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    let smtp_port = bound.smtp.unwrap().port();
    let sent = tokio::task::spawn_blocking(move || {
        send_with_smtplib(smtp_port, "juergen@kunde.example", &["support@acme.example"], MIME_MAIL)
    })
    .await??;
    assert_eq!(sent["error"], "SMTPDataError");
    assert_eq!(sent["code"], 451);
    Ok(())
}

/// C5 at capacity: ana is the only member of the chat channel's rules, with room for one chat.
const AT_CAPACITY_CONFIG: &str = r#"
account_id = "acme"

[[inboxes]]
id = "support"
name = "Support"

[[channels]]
id = "site-chat"
inbox = "support"
type = "chat"
name = "Website chat"

[channels.chat]
availability_mode = "user_availability"
welcome_message = "Hi! How can we help?"
typical_reply_time = "a few minutes"
away_message = "We're away right now"
at_capacity_behaviour = "waiting_message"
at_capacity_message = "All our agents are busy; we'll be with you shortly"

[channels.routing]
auto_assign = true
assign_to = "specific_users_and_teams"
users = ["ana"]

[[agents]]
id = "ana"
name = "Ana Alvarez"
paid_seat = true
available = true
capacity = { chat = 1, team_email = 10 }
"#;

/// Polls the widget endpoint until `done` holds for its answer (or a minute passes).
async fn widget_until(
    http: &reqwest::Client,
    url: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let response = http.get(url).send().await?;
        assert_eq!(response.status().as_u16(), 200);
        let shown: serde_json::Value = response.json().await?;
        if done(&shown) {
            return Ok(shown);
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "widget never showed {what}: last answer {shown}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c5_r8_widget_says_at_capacity_once_the_only_agent_is_full_and_recovers_when_she_frees_up() -> anyhow::Result<()>
{
    use switchboard_api::auth::Role;
    use switchboard_proto::api::v1::CloseConversationRequest;
    use switchboard_tests::api_seed::{clients_for, identity};
    use switchboard_tests::demo::{post_chat, wait_visible};

    let env = TestEnv::new().await?;
    // Through apply-config: the at-capacity behaviour and the per-type capacity travel as the
    // config file declares them.
    env.apply_config(AT_CAPACITY_CONFIG).await?;
    let ingest_url = env.start_ingest_reading_workload(&env.database_url).await?;
    env.start_router("router-0").await?;
    env.start_projector().await?;
    let api_url = env.start_api_server().await?;
    let mut clients = clients_for(&api_url, &identity("acme-admin", Role::Admin, &[])).await?;
    let http = reqwest::Client::new();
    let widget_url = format!("{ingest_url}/v1/channels/site-chat/chat/widget");

    let free = widget_until(&http, &widget_url, "room", |shown| shown["capacity"] == "has_room").await?;
    assert_eq!(free["state"], "available");
    assert_eq!(free["message"], "a few minutes");
    assert_eq!(free["welcome_message"], "Hi! How can we help?");

    // A visitor writes in; the router assigns the conversation to ana, the projector counts it.
    let accepted = post_chat(&http, &ingest_url, "site-chat", "vera", "vera-1", "Where is my parcel?").await?;
    let message = wait_visible(&mut clients.conversations, &accepted.message_id, Duration::from_secs(60)).await?;
    let full = widget_until(&http, &widget_url, "at_capacity", |shown| shown["state"] == "at_capacity").await?;
    assert_eq!(full["capacity"], "at_capacity");
    assert_eq!(full["message"], "All our agents are busy; we'll be with you shortly");
    assert_eq!(full["show_launcher"], true, "waiting_message keeps the launcher");

    // Ana closes the conversation: she has room again, and the widget says so.
    clients
        .admin
        .close_conversation(CloseConversationRequest {
            request_id: uuid::Uuid::now_v7().to_string(),
            conversation_id: message.conversation_id.clone(),
        })
        .await?;
    let freed = widget_until(&http, &widget_url, "room again", |shown| shown["capacity"] == "has_room").await?;
    assert_eq!(freed["state"], "available");

    let metrics = http.get(format!("{ingest_url}/metrics")).send().await?.text().await?;
    assert!(metrics.contains("switchboard_ingest_workload_fresh 1"), "{metrics}");
    assert!(
        metrics.contains("switchboard_ingest_widget_answers_total{state=\"at_capacity\",capacity=\"at_capacity\"}")
    );

    // Degraded: an ingest whose database is unreachable answers from the settings, says the
    // capacity is unknown, and never fails the request.
    let unreachable = env.start_ingest_reading_workload("postgres://switchboard:switchboard@127.0.0.1:1/none").await?;
    let degraded_url = format!("{unreachable}/v1/channels/site-chat/chat/widget");
    let degraded = widget_until(&http, &degraded_url, "an answer", |_| true).await?;
    assert_eq!(degraded["state"], "available");
    assert_eq!(degraded["capacity"], "unknown");
    let metrics = http.get(format!("{unreachable}/metrics")).send().await?.text().await?;
    assert!(metrics.contains("switchboard_ingest_workload_fresh 0"), "{metrics}");
    assert!(metrics.contains("switchboard_ingest_widget_answers_total{state=\"available\",capacity=\"unknown\"}"));
    env.cleanup().await;
    Ok(())
}

/// One provider delivery as the provider sends it: method-less POST to `path` with headers.
struct Delivery {
    channel: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

/// Message ids of the inbound messages an accepted answer lists.
fn accepted_message_ids(answer: &serde_json::Value) -> Vec<String> {
    answer["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|event| event["event_type"] == "inbound_message_received")
        .map(|event| event["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

async fn deliver(http: &reqwest::Client, base: &str, delivery: &Delivery) -> anyhow::Result<serde_json::Value> {
    let mut request = http.post(format!("{base}{}", delivery.path)).body(delivery.body.clone());
    for (name, value) in &delivery.headers {
        request = request.header(*name, value);
    }
    let response = request.send().await?;
    let status = response.status();
    let answer: serde_json::Value = response.json().await?;
    anyhow::ensure!(status.is_success(), "{} refused: {status} {answer}", delivery.channel);
    Ok(answer)
}

/// Issue 3's "done means" for every HTTP channel at once: a realistic fixture goes through
/// ingest, Kafka, the router and the projector and is visible through the gRPC API; the same
/// deliveries retried through a second ingest instance (which has not seen them, so it
/// publishes them again) add no message and no conversation (B1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b1_every_channels_fixture_becomes_a_visible_conversation_once_even_when_retried_elsewhere()
-> anyhow::Result<()> {
    use switchboard_api::auth::Role;
    use switchboard_proto::api::v1::GetConversationRequest;
    use switchboard_tests::api_seed::{clients_for, identity};
    use switchboard_tests::demo::wait_visible;

    let (env, bound) = setup(false).await?;
    env.start_router("router-0").await?;
    env.start_projector().await?;
    let api_url = env.start_api_server().await?;
    let mut clients = clients_for(&api_url, &identity("acme-admin", Role::Admin, &[])).await?;
    let http = reqwest::Client::new();
    let first_instance = format!("http://{}", bound.http);

    let meta_signature = |secret: &[u8], body: &str| format!("sha256={}", sign_hex(secret, &[body.as_bytes()]));
    let json = |value: serde_json::Value| serde_json::to_vec(&value).unwrap();
    let custom_body = br#"{"message_id":"tg-1","thread_id":"tg-chat-9","sender":{"id":"tg-user-1","name":"Kim"},"text":"Hi from Telegram"}"#;
    let timestamp = chrono::Utc::now().timestamp().to_string();
    let custom_signature = format!("v1={}", sign_hex(b"tg-key", &[timestamp.as_bytes(), b".", custom_body]));
    let deliveries = vec![
        Delivery {
            channel: "team_email",
            path: "/v1/email/inbound",
            headers: vec![("content-type", "message/rfc822".into())],
            body: MIME_MAIL.as_bytes().to_vec(),
        },
        Delivery {
            channel: "facebook_messenger",
            path: "/v1/webhooks/messenger",
            headers: vec![("x-hub-signature-256", meta_signature(b"fb-app-secret", MESSENGER_DELIVERY))],
            body: MESSENGER_DELIVERY.as_bytes().to_vec(),
        },
        Delivery {
            channel: "whatsapp",
            path: "/v1/webhooks/whatsapp",
            headers: vec![("x-hub-signature-256", meta_signature(b"wa-app-secret", WHATSAPP_DELIVERY))],
            body: WHATSAPP_DELIVERY.as_bytes().to_vec(),
        },
        Delivery {
            channel: "forms",
            path: "/v1/channels/contact-form/forms/submissions",
            headers: vec![("content-type", "application/json".into())],
            body: json(serde_json::json!({"submission_id": "sub-81f2", "form_id": "contact-us",
                "submitted_at": "2026-03-03T10:00:00Z", "fields": [
                {"name": "email", "value": "kim@example.org"}, {"name": "name", "value": "Kim"},
                {"name": "message", "value": "Please call me back"},
                {"name": "utm_source", "value": "newsletter-secret-campaign", "hidden": true}]})),
        },
        Delivery {
            channel: "calling",
            path: "/v1/channels/phone/calls/events",
            headers: vec![("content-type", "application/json".into())],
            body: json(serde_json::json!({"event_id": "evt-9", "call_id": "CA5f1e", "state": "completed",
                "direction": "inbound", "from": "+4930123456", "to": "+4930999999", "duration_seconds": 184,
                "recording_url": "https://recordings.example/rec.mp3", "occurred_at": "2026-03-03T10:03:04Z",
                "caller_name": "Kim"})),
        },
        Delivery {
            channel: "custom",
            path: "/v1/channels/telegram/custom/messages",
            headers: vec![
                ("x-switchboard-timestamp", timestamp.clone()),
                ("x-switchboard-signature", custom_signature),
            ],
            body: custom_body.to_vec(),
        },
    ];

    // Channel type the conversation must have, and how many messages it holds, per delivery.
    let expected =
        [("team_email", 1), ("facebook_messenger", 1), ("whatsapp", 3), ("forms", 1), ("calling", 1), ("custom", 1)];
    let mut conversation_by_channel = BTreeMap::new();
    for (delivery, (channel_type, message_count)) in deliveries.iter().zip(expected) {
        let answer = deliver(&http, &first_instance, delivery).await?;
        let message_ids = accepted_message_ids(&answer);
        assert_eq!(message_ids.len(), message_count, "{}: {answer}", delivery.channel);
        let mut conversation_ids = std::collections::BTreeSet::new();
        for message_id in &message_ids {
            let message = wait_visible(&mut clients.conversations, message_id, Duration::from_secs(60)).await?;
            conversation_ids.insert(message.conversation_id);
        }
        assert_eq!(conversation_ids.len(), 1, "{}: one conversation per thread", delivery.channel);
        let conversation_id = conversation_ids.into_iter().next().unwrap();
        let response = clients
            .conversations
            .get_conversation(GetConversationRequest { conversation_id: conversation_id.clone(), ..Default::default() })
            .await?
            .into_inner();
        let conversation = response.conversation.unwrap();
        assert_eq!(conversation.channel_type, channel_type);
        assert_eq!(conversation.inbox_id, "support");
        assert_eq!(conversation.message_count as usize, message_count, "{}", delivery.channel);
        if delivery.channel == "forms" {
            // C7: the hidden field is kept, but never shown in the inbox view.
            assert!(!format!("{:?}", response.messages).contains("newsletter-secret-campaign"));
        }
        if delivery.channel == "team_email" {
            assert_eq!(response.messages[0].text, "Die Rechnung für März fehlt.");
        }
        conversation_by_channel.insert(delivery.channel, (conversation_id, message_count));
    }

    // Every provider retries everything, through another ingest instance.
    let second_instance = format!("http://{}", env.start_ingest_with(secrets(), false).await?.http);
    for delivery in &deliveries {
        let answer = deliver(&http, &second_instance, delivery).await?;
        assert_eq!(answer["duplicate"], false, "a fresh instance publishes again; the router deduplicates");
    }
    // A later message in the custom thread, after the retries in the same partition (every
    // event is keyed by the account): once it is visible, the retries have been routed too.
    let later_body =
        br#"{"message_id":"tg-2","thread_id":"tg-chat-9","sender":{"id":"tg-user-1"},"text":"Still there?"}"#;
    let later = Delivery {
        channel: "custom",
        path: "/v1/channels/telegram/custom/messages",
        headers: vec![
            ("x-switchboard-timestamp", timestamp.clone()),
            (
                "x-switchboard-signature",
                format!("v1={}", sign_hex(b"tg-key", &[timestamp.as_bytes(), b".", later_body])),
            ),
        ],
        body: later_body.to_vec(),
    };
    let later_answer = deliver(&http, &second_instance, &later).await?;
    let later_message =
        wait_visible(&mut clients.conversations, &accepted_message_ids(&later_answer)[0], Duration::from_secs(60))
            .await?;
    assert_eq!(
        later_message.conversation_id, conversation_by_channel["custom"].0,
        "R10: same thread, same conversation"
    );

    for (channel, (conversation_id, message_count)) in &conversation_by_channel {
        let conversation = clients
            .conversations
            .get_conversation(GetConversationRequest { conversation_id: conversation_id.clone(), ..Default::default() })
            .await?
            .into_inner()
            .conversation
            .unwrap();
        let expected_count = message_count + usize::from(*channel == "custom");
        assert_eq!(conversation.message_count as usize, expected_count, "{channel}: the retry added no message");
    }
    let listed = clients
        .conversations
        .list_conversations(switchboard_proto::api::v1::ListConversationsRequest {
            inbox_id: "support".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(listed.conversations.len(), conversation_by_channel.len(), "the retries added no conversation");
    // The retries really reached the log: the router, not ingest's cache, kept them out.
    let republished = inbound_messages(&env.read_committed_events(&env.topics.inbound)?)
        .iter()
        .filter(|message| message.provider_message_id == "wamid.TEXT1")
        .count();
    assert_eq!(republished, 2);
    env.cleanup().await;
    Ok(())
}
