//! SendReply and AddInternalNote (O1-O4) against real Kafka, PostgreSQL and the API: what the
//! API publishes to `outbound.v1` is read back and checked field by field; every refusal is a
//! clear gRPC status and publishes nothing. Conversations are written straight into the read
//! models (as `api_seed` does); attachment hosts are a local HTTP stand-in (wiremock).

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use switchboard_api::auth::Role;
use switchboard_proto::api::v1::*;
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    AuthorKind, ChannelType, InternalNoteAdded, MessengerMessagingType, OutboundAttachment, OutboundMessageQueued,
    OutboundPurpose, WhatsAppTemplateMessage,
};
use switchboard_tests::TestEnv;
use switchboard_tests::api_seed::{Clients, clients_for, identity};
use tonic::Code;
use tonic_types::StatusExt;
use uuid::Uuid;

const CONFIG: &str = r#"
account_id = "acme"

[[inboxes]]
id = "support"
name = "Support"
fallback_from_name = "Acme Support"

[[inboxes]]
id = "web"
name = "Web"

[[inboxes]]
id = "vip"
name = "VIP"
access = "specific_users_and_teams"
access_users = ["vip-agent"]

[[channels]]
id = "mail"
inbox = "support"
type = "team_email"
name = "Acme Help"
[channels.email]
team_address = "help@acme.test"
from_name_mode = "agent_and_company"
signature = "<p>{{full_name}}</p><p>Acme &amp; Co</p>"
signature_is_html = true

[[channels]]
id = "old-mail"
inbox = "support"
type = "team_email"
name = "Old mail"
[channels.email]
team_address = "old@acme.test"
from_name_mode = "company"
disconnected = true

[[channels]]
id = "contact-form"
inbox = "web"
type = "forms"
name = "Contact form"

[[channels]]
id = "chat"
inbox = "support"
type = "chat"
name = "Website chat"

[[channels]]
id = "chat-off"
inbox = "support"
type = "chat"
name = "Old chat"
enabled = false

[[channels]]
id = "fb"
inbox = "support"
type = "facebook_messenger"
name = "Facebook"
[channels.messenger]
page_id = "page-1"

[[channels]]
id = "wa"
inbox = "support"
type = "whatsapp"
name = "WhatsApp"
[channels.whatsapp]
phone_number_id = "pn-1"
templates = [{ name = "order_update", language = "en_US", parameters = 2 }]
messages_per_second = 40

[[channels]]
id = "phone"
inbox = "support"
type = "calling"
name = "Phone"

[[channels]]
id = "app"
inbox = "support"
type = "custom"
name = "Telegram bridge"
[channels.custom]
delivery_url = "http://127.0.0.1:9/deliver"
messages_per_second = 12

[[channels]]
id = "vip-chat"
inbox = "vip"
type = "chat"
name = "VIP chat"

[[agents]]
id = "ana"
name = "Ana Alvarez"
paid_seat = true

[[agents]]
id = "free-member"
name = "Free Member"
paid_seat = false

[[agents]]
id = "vip-agent"
name = "Vip Agent"
paid_seat = true

[[agents]]
id = "admin-outsider"
name = "Admin Outsider"
paid_seat = true
"#;

struct Fixture {
    env: TestEnv,
    url: String,
}

async fn fixture() -> anyhow::Result<Fixture> {
    let env = TestEnv::new().await?;
    env.apply_config(CONFIG).await?;
    let url = env.start_api_server().await?;
    Ok(Fixture { env, url })
}

async fn as_user(fixture: &Fixture, user: &str, role: Role) -> anyhow::Result<Clients> {
    clients_for(&fixture.url, &identity(user, role, &[])).await
}

/// A conversation as the projector would have stored it.
struct Seed<'a> {
    account_id: &'a str,
    inbox_id: &'a str,
    channel_id: &'a str,
    channel_type: &'a str,
    external_id: &'a str,
    contact_email: &'a str,
    subject: &'a str,
    status: &'a str,
    assignee_opt: Option<&'a str>,
    reply_window_ends_at_opt: Option<DateTime<Utc>>,
}

impl Default for Seed<'_> {
    fn default() -> Self {
        Seed {
            account_id: "acme",
            inbox_id: "support",
            channel_id: "chat",
            channel_type: "chat",
            external_id: "visitor-1",
            contact_email: "",
            subject: "",
            status: "open",
            assignee_opt: None,
            reply_window_ends_at_opt: None,
        }
    }
}

async fn seed(env: &TestEnv, seed: Seed<'_>) -> anyhow::Result<Uuid> {
    let conversation_id = Uuid::now_v7();
    let contact_id = Uuid::now_v7();
    let started_at = Utc::now() - ChronoDuration::minutes(5);
    sqlx::query(
        "INSERT INTO contacts (contact_id, account_id, display_name, email, created_at) \
         VALUES ($1, $2, 'Carla Customer', $3, now())",
    )
    .bind(contact_id)
    .bind(seed.account_id)
    .bind(seed.contact_email)
    .execute(&env.pool)
    .await?;
    sqlx::query(
        "INSERT INTO conversations (conversation_id, account_id, inbox_id, channel_id, channel_type, thread_key, status, \
             assignee_id, contact_external_id, contact_name, message_count, started_at, last_message_at, contact_id, \
             subject, updated_at, reply_window_ends_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $6, 'Carla Customer', 1, $9, $9, $10, $11, $9, $12)",
    )
    .bind(conversation_id)
    .bind(seed.account_id)
    .bind(seed.inbox_id)
    .bind(seed.channel_id)
    .bind(seed.channel_type)
    .bind(seed.external_id)
    .bind(seed.status)
    .bind(seed.assignee_opt)
    .bind(started_at)
    .bind(contact_id)
    .bind(seed.subject)
    .bind(seed.reply_window_ends_at_opt)
    .execute(&env.pool)
    .await?;
    Ok(conversation_id)
}

/// The customer's email in `conversation_id`, with the details the projector stores.
async fn seed_inbound_email(
    env: &TestEnv,
    conversation_id: Uuid,
    message_id_header: &str,
    references: &[&str],
    minutes_ago: i64,
) -> anyhow::Result<()> {
    let sent_at = Utc::now() - ChronoDuration::minutes(minutes_ago);
    let content = serde_json::json!({"email": {
        "message_id_header": message_id_header, "in_reply_to": "", "references": references,
        "team_address": "help@acme.test", "to": ["help@acme.test"], "cc": [], "has_html": false,
    }});
    sqlx::query(
        "INSERT INTO messages (message_id, conversation_id, account_id, channel_id, provider_message_id, sender_external_id, \
             sender_name, body, sent_at, recorded_at, source_event_id, trace_id, kind, subject, content) \
         VALUES ($1, $2, 'acme', 'mail', $3, 'carla@example.com', 'Carla Customer', 'help', $4, $4, 'e', '', 'text', \
                 'Refund', $5)",
    )
    .bind(Uuid::now_v7())
    .bind(conversation_id)
    .bind(message_id_header)
    .bind(sent_at)
    .bind(content)
    .execute(&env.pool)
    .await?;
    Ok(())
}

fn request_id() -> String {
    Uuid::now_v7().to_string()
}

fn reply(conversation_id: Uuid, text: &str) -> SendReplyRequest {
    SendReplyRequest {
        request_id: request_id(),
        conversation_id: conversation_id.to_string(),
        text: text.into(),
        ..Default::default()
    }
}

/// Every `OutboundMessageQueued` / `InternalNoteAdded` on outbound.v1, with its record key.
fn outbound_records(env: &TestEnv) -> anyhow::Result<Vec<(String, Payload)>> {
    Ok(env
        .read_committed_records(&env.topics.outbound)?
        .into_iter()
        .map(|record| {
            let envelope = switchboard_runtime::envelope::decode(record.payload.as_deref()).expect("an envelope");
            let key = String::from_utf8(record.key.unwrap_or_default()).expect("utf-8 key");
            (key, envelope.payload.expect("a payload"))
        })
        .collect())
}

fn queued(env: &TestEnv, reply_id: &str) -> anyhow::Result<OutboundMessageQueued> {
    let found = outbound_records(env)?.into_iter().find_map(|(_, payload)| match payload {
        Payload::OutboundMessageQueued(message) if message.reply_id == reply_id => Some(message),
        _ => None,
    });
    found.ok_or_else(|| anyhow::anyhow!("reply {reply_id} is not on outbound.v1"))
}

fn precondition_metadata(status: &tonic::Status) -> (String, std::collections::HashMap<String, String>) {
    let info = status.get_details_error_info().expect("ErrorInfo details");
    (info.reason, info.metadata)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o4_c2_email_reply_is_published_complete_threaded_and_idempotent() -> anyhow::Result<()> {
    let fixture = fixture().await?;
    let env = &fixture.env;
    let conversation_id = seed(
        env,
        Seed {
            channel_id: "mail",
            channel_type: "team_email",
            external_id: "carla@example.com",
            contact_email: "carla@example.com",
            subject: "Refund",
            ..Default::default()
        },
    )
    .await?;
    seed_inbound_email(env, conversation_id, "m1@customer.test", &[], 30).await?;
    seed_inbound_email(env, conversation_id, "<m2@customer.test>", &["m1@customer.test"], 10).await?;
    let mut ana = as_user(&fixture, "ana", Role::Agent).await?;
    let request = reply(conversation_id, "We refunded you.\n\nAnything else?");
    let first = ana.admin.send_reply(request.clone()).await?.into_inner();
    let expected_reply_id = switchboard_runtime::outbound::reply_id_for("acme", &request.request_id);
    assert_eq!(first.reply_id, expected_reply_id.to_string());
    assert!(first.position.starts_with("outbound.v1:"), "{}", first.position);
    assert!(!first.replayed);

    let message = queued(env, &first.reply_id)?;
    assert_eq!(message.conversation_id, conversation_id.to_string());
    assert_eq!((message.inbox_id.as_str(), message.channel_id.as_str()), ("support", "mail"));
    assert_eq!(message.channel_type, ChannelType::TeamEmail as i32);
    assert_eq!(message.purpose, OutboundPurpose::ConversationReply as i32);
    assert_eq!(message.request_id, request.request_id);
    assert_eq!(message.recipient, "carla@example.com");
    assert_eq!(message.text, "We refunded you.\n\nAnything else?");
    let author = message.author.clone().expect("author");
    assert_eq!(
        (author.kind, author.agent_id.as_str(), author.name.as_str()),
        (AuthorKind::Agent as i32, "ana", "Ana Alvarez")
    );
    assert_eq!(message.actor.as_ref().map(|actor| actor.user_id.as_str()), Some("ana"));
    let email = message.email.clone().expect("email details");
    assert_eq!(email.from_name, "Ana Alvarez at Acme Help");
    assert_eq!(email.from_address, "help@acme.test");
    assert!(!email.from_fallback_address);
    assert_eq!(email.to, ["carla@example.com"]);
    assert_eq!(email.subject, "Re: Refund");
    assert_eq!(email.message_id_header, format!("{}@acme.test", expected_reply_id.simple()));
    assert_eq!(message.idempotency_key, email.message_id_header, "email: the Message-ID is the key");
    assert_eq!(email.in_reply_to, "m2@customer.test", "the customer's latest email (R10)");
    assert_eq!(email.references, ["m1@customer.test", "m2@customer.test"]);
    assert_eq!(email.text_body, "We refunded you.\n\nAnything else?\n\n-- \nAna Alvarez\nAcme & Co");
    assert_eq!(
        email.html_body,
        "<p>We refunded you.</p>\n<p>Anything else?</p>\n<div class=\"signature\">-- <br>\n<p>Ana Alvarez</p><p>Acme &amp; Co</p></div>"
    );

    // B6 and idempotency: the same request names the same reply and position, and publishes
    // nothing more.
    let retry = ana.admin.send_reply(request.clone()).await?.into_inner();
    assert_eq!(
        (retry.reply_id.as_str(), retry.position.as_str(), retry.replayed),
        (first.reply_id.as_str(), first.position.as_str(), true)
    );
    let records = outbound_records(env)?;
    assert_eq!(records.len(), 1, "one record for two calls");
    assert_eq!(records[0].0, format!("acme/{conversation_id}"), "keyed by account and conversation");
    let reused = ana.admin.send_reply(SendReplyRequest { text: "other".into(), ..request }).await.unwrap_err();
    assert_eq!(reused.code(), Code::InvalidArgument, "a request id names one request");
    fixture.env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c12_forms_and_disconnected_addresses_reply_from_the_fallback_address() -> anyhow::Result<()> {
    let fixture = fixture().await?;
    let env = &fixture.env;
    let mut ana = as_user(&fixture, "ana", Role::Agent).await?;
    // A form in an inbox without a team address: answered by email from the fallback address.
    let form = seed(
        env,
        Seed {
            inbox_id: "web",
            channel_id: "contact-form",
            channel_type: "forms",
            external_id: "kim@example.org",
            contact_email: "kim@example.org",
            subject: "Contact us",
            ..Default::default()
        },
    )
    .await?;
    let mut request = reply(form, "Thanks for writing");
    request.subject = "About your request".into();
    let result = ana.admin.send_reply(request).await?.into_inner();
    let message = queued(env, &result.reply_id)?;
    assert_eq!(message.channel_type, ChannelType::Forms as i32);
    let email = message.email.expect("forms are answered by email (C7)");
    assert_eq!(email.from_address, "web.acme@fallback.switchboard.invalid");
    assert_eq!(email.from_name, "Ana Alvarez at Web", "no team channel: default mode, fallback from-name");
    assert!(email.from_fallback_address);
    assert_eq!(email.subject, "About your request");
    assert_eq!(email.to, ["kim@example.org"]);
    assert!(email.message_id_header.ends_with("@fallback.switchboard.invalid"));
    assert_eq!((email.in_reply_to.as_str(), email.references.len()), ("", 0), "no email to thread to");
    assert_eq!(email.text_body, "Thanks for writing", "no signature without a team channel");

    // A disconnected team address: the inbox's fallback address and from-name, the channel's mode.
    let disconnected = seed(
        env,
        Seed {
            channel_id: "old-mail",
            channel_type: "team_email",
            external_id: "carla@example.com",
            subject: "Re: Invoice",
            ..Default::default()
        },
    )
    .await?;
    let result = ana.admin.send_reply(reply(disconnected, "Here it is")).await?.into_inner();
    let email = queued(env, &result.reply_id)?.email.expect("email");
    assert_eq!(email.from_address, "support.acme@fallback.switchboard.invalid");
    assert_eq!(email.from_name, "Acme Support", "company mode with the fallback from-name");
    assert!(email.from_fallback_address);
    assert_eq!(email.subject, "Re: Invoice", "no second Re:");
    assert_eq!(email.to, ["carla@example.com"], "the contact's address from its external id");

    // A form whose contact left no email address cannot be answered.
    let anonymous = seed(
        env,
        Seed {
            inbox_id: "web",
            channel_id: "contact-form",
            channel_type: "forms",
            external_id: "form-submission:9",
            ..Default::default()
        },
    )
    .await?;
    let refused = ana.admin.send_reply(reply(anonymous, "Hello?")).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(precondition_metadata(&refused).0, "CONTACT_HAS_NO_EMAIL");

    // CreateInbox assigns the fallback address; chosen from-names are unique (C12).
    let mut admin = clients_for(&fixture.url, &identity("admin-outsider", Role::Admin, &[])).await?;
    admin
        .admin
        .create_inbox(CreateInboxRequest {
            request_id: request_id(),
            inbox_id: "billing".into(),
            name: "Billing".into(),
            fallback_from_name: "Acme Billing".into(),
            ..Default::default()
        })
        .await?;
    let taken = admin
        .admin
        .create_inbox(CreateInboxRequest {
            request_id: request_id(),
            inbox_id: "billing-2".into(),
            name: "Billing 2".into(),
            fallback_from_name: "acme billing".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");
    let configured = env.read_committed_events(&env.topics.config)?;
    let billing = configured
        .iter()
        .find_map(|event| match &event.payload {
            Some(Payload::InboxConfigured(inbox)) if inbox.inbox_id == "billing" => Some(inbox.clone()),
            _ => None,
        })
        .expect("billing configured");
    assert_eq!(billing.fallback_address, "billing.acme@fallback.switchboard.invalid");
    assert_eq!(billing.fallback_from_name, "Acme Billing");
    // An unnamed from-name defaults to the inbox's name.
    admin
        .admin
        .create_inbox(CreateInboxRequest {
            request_id: request_id(),
            inbox_id: "returns".into(),
            name: "Returns".into(),
            ..Default::default()
        })
        .await?;
    let configured = env.read_committed_events(&env.topics.config)?;
    let returns = configured.iter().rev().find_map(|event| match &event.payload {
        Some(Payload::InboxConfigured(inbox)) if inbox.inbox_id == "returns" => Some(inbox.clone()),
        _ => None,
    });
    assert_eq!(returns.map(|inbox| inbox.fallback_from_name), Some("Returns".to_owned()));
    fixture.env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c6_o3_messenger_replies_follow_the_24_hour_and_7_day_windows() -> anyhow::Result<()> {
    let fixture = fixture().await?;
    let env = &fixture.env;
    let mut ana = as_user(&fixture, "ana", Role::Agent).await?;
    let now = Utc::now();
    let messenger = |ends_at| Seed {
        channel_id: "fb",
        channel_type: "facebook_messenger",
        external_id: "psid-1",
        reply_window_ends_at_opt: Some(ends_at),
        ..Default::default()
    };
    // The customer wrote an hour ago, two days ago, eight days ago.
    let recent = seed(env, messenger(now + ChronoDuration::hours(23))).await?;
    let two_days = seed(env, messenger(now - ChronoDuration::hours(24))).await?;
    let eight_days = seed(env, messenger(now - ChronoDuration::days(7))).await?;

    let standard = ana.admin.send_reply(reply(recent, "Hi!")).await?.into_inner();
    let message = queued(env, &standard.reply_id)?;
    assert_eq!(message.recipient, "psid-1");
    assert_eq!(message.idempotency_key, standard.reply_id, "HTTP sends: the reply id is the key");
    let sent = message.messenger.expect("messenger details");
    assert_eq!((sent.page_id.as_str(), sent.messaging_type), ("page-1", MessengerMessagingType::Response as i32));

    let tagged = ana.admin.send_reply(reply(two_days, "Following up")).await?.into_inner();
    let sent = queued(env, &tagged.reply_id)?.messenger.expect("messenger details");
    assert_eq!(sent.messaging_type, MessengerMessagingType::HumanAgentTag as i32, "24 h..7 d: human agent tag");

    let refused = ana.admin.send_reply(reply(eight_days, "Too late")).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let (reason, metadata) = precondition_metadata(&refused);
    assert_eq!(reason, "REPLY_WINDOW_CLOSED");
    let window_end = DateTime::parse_from_rfc3339(&metadata["window_ends_at"])?.with_timezone(&Utc);
    let expected_end = now - ChronoDuration::days(7) - ChronoDuration::hours(24) + ChronoDuration::days(7);
    assert!((window_end - expected_end).num_seconds().abs() <= 1, "{window_end} vs {expected_end}");
    assert_eq!(outbound_records(env)?.len(), 2, "the refused reply published nothing");
    fixture.env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c8_o3_whatsapp_free_form_inside_24_hours_templates_outside() -> anyhow::Result<()> {
    let fixture = fixture().await?;
    let env = &fixture.env;
    let mut ana = as_user(&fixture, "ana", Role::Agent).await?;
    let now = Utc::now();
    let whatsapp = |ends_at| Seed {
        channel_id: "wa",
        channel_type: "whatsapp",
        external_id: "4915112345678",
        reply_window_ends_at_opt: Some(ends_at),
        ..Default::default()
    };
    let inside = seed(env, whatsapp(now + ChronoDuration::hours(2))).await?;
    let outside = seed(env, whatsapp(now - ChronoDuration::hours(2))).await?;
    let free_form = ana.admin.send_reply(reply(inside, "Sure")).await?.into_inner();
    let message = queued(env, &free_form.reply_id)?;
    assert_eq!(message.recipient, "4915112345678");
    assert_eq!(message.channel_messages_per_second, 40, "the number's rate travels with the reply (C8)");
    let sent = message.whatsapp.expect("whatsapp details");
    assert_eq!((sent.phone_number_id.as_str(), sent.template), ("pn-1", None));

    let refused = ana.admin.send_reply(reply(outside, "Sure")).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let (reason, metadata) = precondition_metadata(&refused);
    assert_eq!(reason, "CUSTOMER_SERVICE_WINDOW_CLOSED");
    assert!(metadata.contains_key("window_ends_at"));

    let template = |conversation_id, name: &str, parameters: &[&str]| SendReplyRequest {
        whatsapp_template: Some(WhatsAppTemplateMessage {
            name: name.into(),
            language: "en_US".into(),
            parameters: parameters.iter().map(|parameter| parameter.to_string()).collect(),
        }),
        ..reply(conversation_id, "")
    };
    let templated = ana.admin.send_reply(template(outside, "order_update", &["A-17", "tomorrow"])).await?.into_inner();
    let sent = queued(env, &templated.reply_id)?.whatsapp.expect("whatsapp details").template.expect("template");
    assert_eq!((sent.name.as_str(), sent.language.as_str()), ("order_update", "en_US"));
    assert_eq!(sent.parameters, ["A-17", "tomorrow"]);
    let in_window = ana.admin.send_reply(template(inside, "order_update", &["A-18", "today"])).await;
    assert!(in_window.is_ok(), "a template inside the window is fine");

    let unknown = ana.admin.send_reply(template(outside, "spring_sale", &[])).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(unknown.message().contains("spring_sale"), "{}", unknown.message());
    let wrong_count = ana.admin.send_reply(template(outside, "order_update", &["A-17"])).await.unwrap_err();
    assert_eq!(wrong_count.code(), Code::InvalidArgument);
    let fields: Vec<String> = wrong_count
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|violation| violation.field)
        .collect();
    assert_eq!(fields, ["whatsapp_template.parameters"]);
    assert_eq!(outbound_records(env)?.len(), 3, "only the accepted replies were published");
    fixture.env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c9_c11_o1_bad_requests_calls_off_channels_closed_and_unknown_conversations_publish_nothing()
-> anyhow::Result<()> {
    let fixture = fixture().await?;
    let env = &fixture.env;
    let mut ana = as_user(&fixture, "ana", Role::Agent).await?;
    let chat = seed(env, Seed::default()).await?;
    let call =
        seed(env, Seed { channel_id: "phone", channel_type: "calling", external_id: "+4930123", ..Default::default() })
            .await?;
    let off = seed(env, Seed { channel_id: "chat-off", ..Default::default() }).await?;
    let closed = seed(env, Seed { status: "closed", ..Default::default() }).await?;
    let foreign = seed(env, Seed { account_id: "globex", inbox_id: "support", ..Default::default() }).await?;

    let code_and_message = |result: Result<tonic::Response<ReplyResult>, tonic::Status>| match result {
        Ok(_) => (Code::Ok, String::new()),
        Err(status) => (status.code(), status.message().to_owned()),
    };
    let (code, message) = code_and_message(ana.admin.send_reply(reply(chat, "")).await);
    assert_eq!(code, Code::InvalidArgument, "empty: {message}");
    let (code, _) = code_and_message(ana.admin.send_reply(reply(chat, &"x".repeat(20_001))).await);
    assert_eq!(code, Code::InvalidArgument, "oversized");
    let mut html_on_chat = reply(chat, "hi");
    html_on_chat.html = "<p>hi</p>".into();
    assert_eq!(code_and_message(ana.admin.send_reply(html_on_chat).await).0, Code::InvalidArgument);
    let (code, message) = code_and_message(ana.admin.send_reply(reply(call, "hi")).await);
    assert_eq!(code, Code::FailedPrecondition);
    assert!(message.contains("calls have no reply path"), "{message}");
    let refused_off = ana.admin.send_reply(reply(off, "hi")).await.unwrap_err();
    assert_eq!(refused_off.code(), Code::FailedPrecondition);
    assert_eq!(precondition_metadata(&refused_off).0, "CHANNEL_OFF");
    assert_eq!(code_and_message(ana.admin.send_reply(reply(closed, "hi")).await).0, Code::FailedPrecondition);
    assert_eq!(code_and_message(ana.admin.send_reply(reply(Uuid::now_v7(), "hi")).await).0, Code::NotFound);
    let (code, message) = code_and_message(ana.admin.send_reply(reply(foreign, "hi")).await);
    assert_eq!(code, Code::NotFound, "another account's conversation is unknown here");
    assert!(!message.contains("globex"), "{message}");
    assert!(outbound_records(env)?.is_empty(), "nothing was published");

    // Custom channels and chat: the conversation's ids travel with the reply.
    let custom =
        seed(env, Seed { channel_id: "app", channel_type: "custom", external_id: "tg-user-5", ..Default::default() })
            .await?;
    let result = ana.admin.send_reply(reply(custom, "Hello from support")).await?.into_inner();
    let message = queued(env, &result.reply_id)?;
    assert_eq!((message.recipient.as_str(), message.thread_key.as_str()), ("tg-user-5", "tg-user-5"));
    assert_eq!(message.channel_type, ChannelType::Custom as i32);
    // C10: the app's URL and rate travel with the reply: the delivery service reads no config.
    assert_eq!(
        (message.custom_delivery_url.as_str(), message.channel_messages_per_second),
        ("http://127.0.0.1:9/deliver", 12)
    );
    let result = ana.admin.send_reply(reply(chat, "Hello visitor")).await?.into_inner();
    let message = queued(env, &result.reply_id)?;
    assert_eq!((message.recipient.as_str(), message.channel_id.as_str()), ("visitor-1", "chat"));
    fixture.env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i4_o2_who_may_reply_follows_inbox_access_and_seats() -> anyhow::Result<()> {
    let fixture = fixture().await?;
    let env = &fixture.env;
    let unassigned = seed(env, Seed::default()).await?;
    let own = seed(env, Seed { assignee_opt: Some("free-member"), ..Default::default() }).await?;
    let others = seed(env, Seed { assignee_opt: Some("ana"), ..Default::default() }).await?;
    let vip = seed(env, Seed { inbox_id: "vip", channel_id: "vip-chat", ..Default::default() }).await?;

    let mut free = as_user(&fixture, "free-member", Role::Agent).await?;
    assert!(free.admin.send_reply(reply(unassigned, "I can take this")).await.is_ok(), "I4: unassigned");
    assert!(free.admin.send_reply(reply(own, "On it")).await.is_ok(), "I4: their own");
    let denied = free.admin.send_reply(reply(others, "Mine now")).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "I4: not someone else's");
    let note =
        AddInternalNoteRequest { request_id: request_id(), conversation_id: others.to_string(), text: "fyi".into() };
    assert_eq!(free.admin.add_internal_note(note).await.unwrap_err().code(), Code::PermissionDenied);

    let mut ana = as_user(&fixture, "ana", Role::Agent).await?;
    assert_eq!(ana.admin.send_reply(reply(vip, "hi")).await.unwrap_err().code(), Code::NotFound, "I2: not a member");
    let mut admin_outsider = as_user(&fixture, "admin-outsider", Role::Admin).await?;
    let denied = admin_outsider.admin.send_reply(reply(vip, "hi")).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "I3: admins see but do not act");
    let mut member = as_user(&fixture, "vip-agent", Role::Agent).await?;
    assert!(member.admin.send_reply(reply(vip, "hi")).await.is_ok());
    assert_eq!(outbound_records(env)?.len(), 3, "only the allowed replies were published");
    fixture.env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o1_attachments_are_fetched_before_the_reply_is_accepted() -> anyhow::Result<()> {
    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let fixture = fixture().await?;
    let env = &fixture.env;
    // The stand-in for the customer's file host.
    let host = MockServer::start().await;
    Mock::given(method("HEAD"))
        .and(path("/invoice.pdf"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-length", "48213")
                .insert_header("content-type", "application/pdf"),
        )
        .mount(&host)
        .await;
    // No HEAD here: the ranged GET tells the size.
    Mock::given(method("HEAD")).and(path("/photo.jpg")).respond_with(ResponseTemplate::new(405)).mount(&host).await;
    Mock::given(method("GET"))
        .and(path("/photo.jpg"))
        .and(header("range", "bytes=0-0"))
        .respond_with(
            ResponseTemplate::new(206)
                .insert_header("content-range", "bytes 0-0/734003")
                .insert_header("content-type", "image/jpeg")
                .set_body_bytes(vec![0xff]),
        )
        .mount(&host)
        .await;
    Mock::given(method("HEAD"))
        .and(path("/huge.bin"))
        .respond_with(ResponseTemplate::new(200).insert_header("content-length", (26 * 1024 * 1024).to_string()))
        .mount(&host)
        .await;
    let attachment = |name: &str| OutboundAttachment { url: format!("{}/{name}", host.uri()), ..Default::default() };
    let chat = seed(env, Seed::default()).await?;
    let mut ana = as_user(&fixture, "ana", Role::Agent).await?;

    let mut good = reply(chat, "Here are the files");
    good.attachments = vec![attachment("invoice.pdf"), attachment("photo.jpg")];
    let result = ana.admin.send_reply(good).await?.into_inner();
    let attachments = queued(env, &result.reply_id)?.attachments;
    assert_eq!(attachments.len(), 2);
    assert_eq!(
        (attachments[0].size_bytes, attachments[0].content_type.as_str(), attachments[0].file_name.as_str()),
        (48_213, "application/pdf", "invoice.pdf")
    );
    assert_eq!((attachments[1].size_bytes, attachments[1].content_type.as_str()), (734_003, "image/jpeg"));

    let mut missing = reply(chat, "Here");
    missing.attachments = vec![attachment("invoice.pdf"), attachment("gone.pdf")];
    let refused = ana.admin.send_reply(missing).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let (reason, metadata) = precondition_metadata(&refused);
    assert_eq!((reason.as_str(), metadata["index"].as_str()), ("ATTACHMENT_UNREACHABLE", "1"));
    assert!(metadata["why"].contains("404"), "{metadata:?}");

    let unreachable_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?.port()
    };
    let mut unreachable = reply(chat, "Here");
    unreachable.attachments =
        vec![OutboundAttachment { url: format!("http://127.0.0.1:{unreachable_port}/a.pdf"), ..Default::default() }];
    let refused = ana.admin.send_reply(unreachable).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(precondition_metadata(&refused).1["index"], "0");

    let mut too_big = reply(chat, "Here");
    too_big.attachments = vec![attachment("huge.bin")];
    assert_eq!(ana.admin.send_reply(too_big).await.unwrap_err().code(), Code::InvalidArgument, "25 MB in total");
    let mut not_http = reply(chat, "Here");
    not_http.attachments = vec![OutboundAttachment { url: "file:///etc/passwd".into(), ..Default::default() }];
    assert_eq!(ana.admin.send_reply(not_http).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(outbound_records(env)?.len(), 1, "only the reply whose attachments were fetched");
    fixture.env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o1_internal_notes_are_published_never_sent_and_allowed_on_closed_conversations() -> anyhow::Result<()> {
    let fixture = fixture().await?;
    let env = &fixture.env;
    let closed = seed(env, Seed { status: "closed", ..Default::default() }).await?;
    let mut ana = as_user(&fixture, "ana", Role::Agent).await?;
    let request = AddInternalNoteRequest {
        request_id: request_id(),
        conversation_id: closed.to_string(),
        text: "Customer called back; refund approved".into(),
    };
    let first = ana.admin.add_internal_note(request.clone()).await?.into_inner();
    assert!(first.position.starts_with("outbound.v1:"));
    let retry = ana.admin.add_internal_note(request.clone()).await?.into_inner();
    assert_eq!(
        (retry.reply_id.as_str(), retry.position.as_str(), retry.replayed),
        (first.reply_id.as_str(), first.position.as_str(), true)
    );
    let notes: Vec<InternalNoteAdded> = outbound_records(env)?
        .into_iter()
        .filter_map(|(_, payload)| match payload {
            Payload::InternalNoteAdded(note) => Some(note),
            _ => None,
        })
        .collect();
    assert_eq!(notes.len(), 1);
    let note = &notes[0];
    assert_eq!(note.note_id, first.reply_id);
    assert_eq!(note.note_id, switchboard_runtime::outbound::reply_id_for("acme", &request.request_id).to_string());
    assert_eq!((note.conversation_id.as_str(), note.inbox_id.as_str()), (closed.to_string().as_str(), "support"));
    assert_eq!(note.text, "Customer called back; refund approved");
    assert_eq!(note.author.as_ref().map(|author| author.name.as_str()), Some("Ana Alvarez"));
    let empty =
        AddInternalNoteRequest { request_id: request_id(), conversation_id: closed.to_string(), text: " ".into() };
    assert_eq!(ana.admin.add_internal_note(empty).await.unwrap_err().code(), Code::InvalidArgument);
    fixture.env.cleanup().await;
    Ok(())
}

/// By default the API fetches attachment references only from public addresses: a URL on
/// loopback (or a name resolving only to it) is refused before any connection, so a reply
/// cannot make the API probe its own network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o1_attachments_on_private_addresses_are_refused_by_default() -> anyhow::Result<()> {
    use switchboard_runtime::attachment_hosts::{self, AttachmentHosts};
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let host = MockServer::start().await;
    Mock::given(method("HEAD")).respond_with(ResponseTemplate::new(200)).mount(&host).await;
    let client = attachment_hosts::client_builder(AttachmentHosts::PublicOnly).build()?;
    let port = host.address().port();
    for url in [format!("http://127.0.0.1:{port}/a.pdf"), format!("http://localhost:{port}/a.pdf")] {
        let attachment = OutboundAttachment { url: url.clone(), ..Default::default() };
        let refused = switchboard_api::replies::fetch_attachments(&client, AttachmentHosts::PublicOnly, &[attachment])
            .await
            .expect_err("a loopback attachment must be refused");
        let status = tonic::Status::from(refused);
        assert_eq!(status.code(), Code::FailedPrecondition, "{url}");
        let (reason, metadata) = precondition_metadata(&status);
        assert_eq!(reason, "ATTACHMENT_UNREACHABLE");
        assert!(metadata["why"].contains("public address"), "{url}: {metadata:?}");
    }
    assert!(host.received_requests().await.unwrap_or_default().is_empty(), "nothing reached the host");
    Ok(())
}
