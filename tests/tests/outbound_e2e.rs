//! The whole outbound path (issue 15), real everything but Meta and customers' apps: mail in
//! over ingest's SMTP, webhooks in over ingest's HTTP, the router, the projector, the gRPC API,
//! the delivery service sending email to the stack's Mailpit and HTTP to a stand-in (wiremock)
//! for the Graph API and a customer's app, chat replies read from ingest's SSE stream.
//! Every test has its own topics, database and addresses, so the tests share one Mailpit.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use mail_parser::{HeaderValue, MessageParser, MimeHeaders};
use serde_json::{Value, json};
use switchboard_api::auth::{Identity, Role};
use switchboard_proto::api::v1::{
    GetConversationRequest, GetConversationResponse, ListConversationsRequest, Message, SendReplyRequest,
    SetContactOwnerRequest,
};
use switchboard_runtime::secrets::Secret;
use switchboard_tests::api_seed::{Clients, clients_for};
use switchboard_tests::{OutboundPipeline, TestEnv};
use tokio::time::Instant;
use uuid::Uuid;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const ACCOUNT: &str = "e2e";
const WITHIN: Duration = Duration::from_secs(60);
const FB_APP_SECRET: &str = "fb-app-secret";
const APP_SIGNING_KEY: &str = "app-signing-key";

/// One secrets file for ingest (webhook secrets) and delivery (tokens, keys).
const SECRETS: &str = r#"
[channels.fb]
app_secret = "fb-app-secret"
verify_token = "fb-verify"
access_token = "PAGE-TOKEN"

[channels.fb-ask]
app_secret = "fb-app-secret"
access_token = "ASK-TOKEN"

[channels.app]
signing_key = "app-signing-key"
"#;

/// The account, with addresses unique to this run (`run`): ana answers team email, chat,
/// Messenger and the custom app; the owner-routed chat channel goes to the contact's owner.
fn config(run: &str, app_url: &str) -> String {
    format!(
        r#"
account_id = "{ACCOUNT}"

[[inboxes]]
id = "support"
name = "Support"
fallback_from_name = "E2E Support"

[[channels]]
id = "mail"
inbox = "support"
type = "team_email"
name = "E2E Help"
[channels.email]
team_address = "help-{run}@e2e.example"
from_name_mode = "agent_and_company"
signature = "<p>{{{{full_name}}}}</p><p>E2E &amp; Co</p>"
signature_is_html = true
[channels.routing]
auto_assign = true
assign_to = "specific_users_and_teams"
users = ["ana"]
only_available = true
strategy = "round_robin"

[[channels]]
id = "chat"
inbox = "support"
type = "chat"
name = "Website chat"
[channels.routing]
auto_assign = true
assign_to = "specific_users_and_teams"
users = ["ana"]
only_available = true
strategy = "round_robin"

[[channels]]
id = "owned-chat"
inbox = "support"
type = "chat"
name = "Account managers' chat"
[channels.routing]
auto_assign = true
assign_to = "contact_owner"
only_available = true

[[channels]]
id = "fb"
inbox = "support"
type = "facebook_messenger"
name = "E2E on Facebook"
[channels.messenger]
page_id = "page-{run}"

[[channels]]
id = "fb-ask"
inbox = "support"
type = "facebook_messenger"
name = "E2E asks first"
[channels.messenger]
page_id = "ask-{run}"
consent_mode = "explicit"
consent_text = "May we keep your messages to help you?"

[[channels]]
id = "app"
inbox = "support"
type = "custom"
name = "Telegram bridge"
[channels.custom]
delivery_url = "{app_url}"

[[agents]]
id = "ana"
name = "Ana Alvarez"
email = "ana-{run}@e2e.example"
paid_seat = true
available = true

[[agents]]
id = "olga"
name = "Olga Owner"
email = "olga-{run}@e2e.example"
paid_seat = true
available = false
"#
    )
}

struct Fixture {
    env: TestEnv,
    run: String,
    pipeline: OutboundPipeline,
    stand_in: MockServer,
    ana: Clients,
}

async fn fixture() -> anyhow::Result<Fixture> {
    let env = TestEnv::new().await?;
    let run = Uuid::now_v7().simple().to_string();
    let stand_in = MockServer::start().await;
    env.apply_config(&config(&run, &format!("{}/switchboard/replies", stand_in.uri()))).await?;
    let pipeline = env.start_outbound_pipeline(SECRETS, &stand_in.uri()).await?;
    let ana = clients_for(&pipeline.api_url, &identity("ana", Role::Agent)).await?;
    Ok(Fixture { env, run, pipeline, stand_in, ana })
}

fn identity(user_id: &str, role: Role) -> Identity {
    Identity { user_id: user_id.into(), account_id: ACCOUNT.into(), role, team_ids: Vec::new() }
}

fn reply(conversation_id: &str, text: &str) -> SendReplyRequest {
    SendReplyRequest {
        request_id: Uuid::now_v7().to_string(),
        conversation_id: conversation_id.to_owned(),
        text: text.to_owned(),
        ..Default::default()
    }
}

/// Polls until `check` accepts something, or fails with the last thing seen.
async fn eventually<T, F, Fut>(what: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + WITHIN;
    loop {
        if let Some(found) = attempt().await? {
            return Ok(found);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {WITHIN:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The account's conversation on `channel_id` once it exists (each test has its own database).
async fn conversation_on(clients: &mut Clients, channel_id: &str) -> anyhow::Result<String> {
    eventually(&format!("a conversation on {channel_id}"), || {
        let mut conversations = clients.conversations.clone();
        async move {
            let listed = conversations
                .list_conversations(ListConversationsRequest {
                    channel_id: channel_id.to_owned(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            Ok(listed.conversations.into_iter().next().map(|conversation| conversation.id))
        }
    })
    .await
}

async fn get_conversation(clients: &mut Clients, conversation_id: &str) -> anyhow::Result<GetConversationResponse> {
    Ok(clients
        .conversations
        .get_conversation(GetConversationRequest { conversation_id: conversation_id.to_owned(), ..Default::default() })
        .await?
        .into_inner())
}

/// The conversation's message `message_id` once `ready` holds for it.
async fn message_when(
    clients: &mut Clients,
    conversation_id: &str,
    message_id: &str,
    what: &str,
    ready: impl Fn(&Message) -> bool,
) -> anyhow::Result<Message> {
    let ready = &ready;
    eventually(what, || {
        let mut clients = Clients {
            conversations: clients.conversations.clone(),
            workspace: clients.workspace.clone(),
            admin: clients.admin.clone(),
        };
        async move {
            let response = get_conversation(&mut clients, conversation_id).await?;
            Ok(response.messages.into_iter().find(|message| message.id == message_id && ready(message)))
        }
    })
    .await
}

fn history(message: &Message) -> Vec<&str> {
    message.delivery_history.iter().map(|step| step.state.as_str()).collect()
}

/// Sends `mail` over SMTP to ingest with Python's smtplib (a real SMTP client).
fn send_smtp(port: u16, from: &str, to: &str, mail: &str) -> anyhow::Result<()> {
    const SCRIPT: &str = r#"
import smtplib, sys
port, sender, recipient, message = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.stdin.read()
with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
    client.sendmail(sender, [recipient], message.encode("utf-8"))
"#;
    use std::io::Write;
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT, &port.to_string(), from, to])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("python3 is needed for the SMTP client")?;
    child.stdin.take().context("stdin")?.write_all(mail.as_bytes())?;
    let output = child.wait_with_output()?;
    anyhow::ensure!(output.status.success(), "smtplib failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(())
}

fn header_text(message: &mail_parser::Message<'_>, name: &str) -> String {
    match message.header(name) {
        Some(HeaderValue::Text(text)) => text.to_string(),
        Some(HeaderValue::TextList(list)) => list.join(" "),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn header_list(message: &mail_parser::Message<'_>, name: &str) -> Vec<String> {
    match message.header(name) {
        Some(HeaderValue::Text(text)) => vec![text.to_string()],
        Some(HeaderValue::TextList(list)) => list.iter().map(|item| item.to_string()).collect(),
        _ => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o4_r10_email_round_trip_through_smtp_the_api_delivery_and_mailpit() -> anyhow::Result<()> {
    let mut fixture = fixture().await?;
    let run = fixture.run.clone();
    let team_address = format!("help-{run}@e2e.example");
    let customer = format!("kim-{run}@customer.example");
    let smtp_port = fixture.pipeline.ingest.smtp.context("ingest has no SMTP listener")?.port();

    // The customer writes in over SMTP.
    let first_id = format!("first-{run}@customer.example");
    // The customer's clock: the Date header is the message's sent_at, which orders it.
    let date = chrono::Utc::now().to_rfc2822();
    let first = format!(
        "From: Kim Kunde <{customer}>\r\nTo: {team_address}\r\nSubject: Refund for order 17\r\n\
         Message-ID: <{first_id}>\r\nDate: {date}\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\nMy parcel never arrived. Can I get a refund?\r\n"
    );
    tokio::task::spawn_blocking({
        let (customer, team_address) = (customer.clone(), team_address.clone());
        move || send_smtp(smtp_port, &customer, &team_address, &first)
    })
    .await??;
    let conversation_id = conversation_on(&mut fixture.ana, "mail").await?;
    let before = get_conversation(&mut fixture.ana, &conversation_id).await?;
    let assignee = before.conversation.as_ref().unwrap().assignee_id.clone();
    assert_eq!(assignee, "ana", "R3: the only eligible agent");
    assert!(before.conversation.as_ref().unwrap().first_response_at.is_none());

    // Ana answers through gRPC; the delivery service sends it to Mailpit.
    let accepted = fixture
        .ana
        .admin
        .send_reply(reply(&conversation_id, "We are sorry! The refund is on its way."))
        .await?
        .into_inner();
    let sent = message_when(&mut fixture.ana, &conversation_id, &accepted.reply_id, "the reply sent", |message| {
        message.delivery_state == "sent"
    })
    .await?;
    let message_id = sent.provider_message_id.trim_matches(['<', '>']).to_owned();
    assert!(message_id.ends_with("@e2e.example"), "{message_id}");
    let summary = fixture.pipeline.mailpit.wait_for_message_id(&message_id, WITHIN).await?;
    let raw = fixture.pipeline.mailpit.raw(&summary.id).await?;
    let mail = MessageParser::default().parse(&raw).context("Mailpit holds no parsable mail")?;

    let from = mail.from().and_then(|from| from.first()).context("no From")?;
    assert_eq!(from.address(), Some(team_address.as_str()));
    assert_eq!(from.name(), Some("Ana Alvarez at E2E Help"), "C2: agent and company");
    assert_eq!(mail.to().and_then(|to| to.first()).and_then(|to| to.address()), Some(customer.as_str()));
    assert_eq!(mail.subject(), Some("Re: Refund for order 17"));
    assert_eq!(mail.message_id(), Some(message_id.as_str()), "Message-ID = the recorded provider_message_id");
    assert_eq!(mail.in_reply_to().as_text(), Some(first_id.as_str()), "R10: threads on the customer's mail");
    assert_eq!(header_list(&mail, "References"), std::slice::from_ref(&first_id));
    let content_type = mail.content_type().context("no Content-Type")?;
    assert_eq!(
        (content_type.ctype(), content_type.subtype()),
        ("multipart", Some("alternative")),
        "text and HTML bodies"
    );
    let text = mail.body_text(0).context("no text body")?;
    assert!(text.contains("The refund is on its way."), "{text}");
    assert!(text.contains("Ana Alvarez") && text.contains("E2E & Co"), "the signature, with the agent's name: {text}");
    let html = mail.body_html(0).context("no HTML body")?;
    assert!(html.contains("<p>Ana Alvarez</p>"), "{html}");

    // The customer answers it from their mail client: threading built from the received mail.
    let answer_id = format!("answer-{run}@customer.example");
    let date = chrono::Utc::now().to_rfc2822();
    let mut references = header_list(&mail, "References");
    references.push(message_id.clone());
    let references = references.iter().map(|reference| format!("<{reference}>")).collect::<Vec<_>>().join(" ");
    let answer = format!(
        "From: Kim Kunde <{customer}>\r\nTo: {team_address}\r\nSubject: Re: Refund for order 17\r\n\
         Message-ID: <{answer_id}>\r\nIn-Reply-To: <{message_id}>\r\nReferences: {references}\r\n\
         Date: {date}\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\nThank you, received!\r\n"
    );
    tokio::task::spawn_blocking({
        let (customer, team_address) = (customer.clone(), team_address.clone());
        move || send_smtp(smtp_port, &customer, &team_address, &answer)
    })
    .await??;
    let after = eventually("the answer in the same conversation", || {
        let mut conversations = fixture.ana.conversations.clone();
        let conversation_id = conversation_id.clone();
        async move {
            let response = conversations
                .get_conversation(GetConversationRequest { conversation_id, ..Default::default() })
                .await?
                .into_inner();
            let answered = response.messages.iter().any(|message| message.text.contains("Thank you, received!"));
            Ok(answered.then_some(response))
        }
    })
    .await?;
    let conversation = after.conversation.as_ref().unwrap();
    assert_eq!(conversation.assignee_id, assignee, "R10: same assignee");
    let all = fixture.ana.conversations.list_conversations(ListConversationsRequest::default()).await?.into_inner();
    assert_eq!(all.conversations.len(), 1, "no second conversation");
    // Listed by sent_at: the mails' Date headers have whole seconds, so within one second the
    // order of the reply and the answer is not defined; each is checked by what it is.
    let mut shown: Vec<(&str, &str, &str)> = after
        .messages
        .iter()
        .map(|message| (message.direction.as_str(), message.delivery_state.as_str(), message.text.trim()))
        .collect();
    shown.sort();
    assert_eq!(
        shown,
        [
            ("inbound", "", "My parcel never arrived. Can I get a refund?"),
            ("inbound", "", "Thank you, received!"),
            ("outbound", "sent", "We are sorry! The refund is on its way."),
        ]
    );
    let ours = after.messages.iter().find(|message| message.id == accepted.reply_id).context("the reply")?;
    assert_eq!(history(ours), ["queued", "sent"]);
    assert_eq!(ours.author.as_ref().map(|author| author.agent_id.as_str()), Some("ana"));
    assert!(conversation.first_response_at.is_some(), "first_response_at is set by the agent's reply");
    assert_eq!(conversation.first_response_at, ours.sent_at, "the time the reply was queued");
    assert_eq!(conversation.first_response_at, conversation.last_agent_reply_at);
    fixture.env.cleanup().await;
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Messenger (C6, O5)

fn meta_signature(body: &str) -> String {
    format!("sha256={}", switchboard_ingest::signature::sign_hex(FB_APP_SECRET.as_bytes(), &[body.as_bytes()]))
}

async fn post_messenger(fixture: &Fixture, body: &str) -> anyhow::Result<()> {
    let response = fixture
        .pipeline
        .http
        .post(format!("{}/v1/webhooks/messenger", fixture.pipeline.ingest_url))
        .header("x-hub-signature-256", meta_signature(body))
        .body(body.to_owned())
        .send()
        .await?;
    anyhow::ensure!(response.status() == 200, "webhook answered {}: {}", response.status(), response.text().await?);
    Ok(())
}

fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A Messenger conversation started by `psid` over the signed webhook.
async fn messenger_conversation(fixture: &mut Fixture, psid: &str) -> anyhow::Result<String> {
    let page = format!("page-{}", fixture.run);
    let at = now_millis();
    let body = json!({"object": "page", "entry": [{"id": page, "time": at, "messaging": [
        {"sender": {"id": psid}, "recipient": {"id": page}, "timestamp": at,
         "message": {"mid": format!("m_in_{}", fixture.run), "text": "Is my order shipped?"}}]}]})
    .to_string();
    post_messenger(fixture, &body).await?;
    conversation_on(&mut fixture.ana, "fb").await
}

fn send_api_requests(requests: &[Request], page: &str) -> Vec<Value> {
    requests
        .iter()
        .filter(|request| request.url.path() == format!("/{page}/messages"))
        .map(|request| serde_json::from_slice(&request.body).unwrap_or(Value::Null))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o5_c6_messenger_reply_is_sent_then_delivered_and_read_and_its_echo_is_no_customer_message()
-> anyhow::Result<()> {
    let mut fixture = fixture().await?;
    let page = format!("page-{}", fixture.run);
    let mid = format!("m_out_{}", fixture.run);
    Mock::given(method("POST"))
        .and(path(format!("/{page}/messages")))
        .and(header("authorization", "Bearer PAGE-TOKEN"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"recipient_id": "psid-7", "message_id": mid})))
        .mount(&fixture.stand_in)
        .await;
    let conversation_id = messenger_conversation(&mut fixture, "psid-7").await?;

    let accepted = fixture.ana.admin.send_reply(reply(&conversation_id, "Yes, it left today.")).await?.into_inner();
    let sent = message_when(&mut fixture.ana, &conversation_id, &accepted.reply_id, "the reply sent", |message| {
        message.delivery_state == "sent"
    })
    .await?;
    assert_eq!(sent.provider_message_id, mid, "the stand-in's message_id is recorded");
    let requests = fixture.stand_in.received_requests().await.unwrap_or_default();
    let bodies = send_api_requests(&requests, &page);
    assert_eq!(
        bodies,
        [
            json!({"recipient": {"id": "psid-7"}, "messaging_type": "RESPONSE", "message": {"text": "Yes, it left today."}})
        ],
        "the documented Send API request, once"
    );
    let idempotency_keys: Vec<&str> = requests
        .iter()
        .filter_map(|request| request.headers.get("idempotency-key").and_then(|value| value.to_str().ok()))
        .collect();
    assert_eq!(idempotency_keys, [accepted.reply_id.as_str()]);

    // Meta echoes our send, then reports delivery, then the read watermark.
    let at = now_millis();
    let echo = json!({"object": "page", "entry": [{"id": page, "time": at, "messaging": [
        {"sender": {"id": page}, "recipient": {"id": "psid-7"}, "timestamp": at,
         "message": {"mid": mid, "is_echo": true, "text": "Yes, it left today."}}]}]})
    .to_string();
    post_messenger(&fixture, &echo).await?;
    let delivered = json!({"object": "page", "entry": [{"id": page, "time": at, "messaging": [
        {"sender": {"id": "psid-7"}, "recipient": {"id": page}, "timestamp": at,
         "delivery": {"mids": [mid], "watermark": at}}]}]})
    .to_string();
    post_messenger(&fixture, &delivered).await?;
    message_when(&mut fixture.ana, &conversation_id, &accepted.reply_id, "the reply delivered", |message| {
        message.delivery_state == "delivered"
    })
    .await?;
    let read_at = now_millis() + 1_000;
    let read = json!({"object": "page", "entry": [{"id": page, "time": read_at, "messaging": [
        {"sender": {"id": "psid-7"}, "recipient": {"id": page}, "timestamp": read_at,
         "read": {"watermark": read_at}}]}]})
    .to_string();
    post_messenger(&fixture, &read).await?;
    let read = message_when(&mut fixture.ana, &conversation_id, &accepted.reply_id, "the reply read", |message| {
        message.delivery_state == "read"
    })
    .await?;
    let steps = history(&read);
    assert_eq!(steps.first(), Some(&"queued"));
    assert_eq!(steps.last(), Some(&"read"));
    assert!(steps.contains(&"sent") && steps.contains(&"delivered"), "{steps:?}");

    let response = get_conversation(&mut fixture.ana, &conversation_id).await?;
    let shown: Vec<(&str, &str)> =
        response.messages.iter().map(|message| (message.direction.as_str(), message.text.as_str())).collect();
    assert_eq!(
        shown,
        [("inbound", "Is my order shipped?"), ("outbound", "Yes, it left today.")],
        "the echo of our own send is not a customer message"
    );
    fixture.env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o5_a_4xx_from_the_graph_api_shows_failed_with_metas_error_and_no_retry() -> anyhow::Result<()> {
    let mut fixture = fixture().await?;
    let page = format!("page-{}", fixture.run);
    Mock::given(method("POST"))
        .and(path(format!("/{page}/messages")))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": {
            "message": "(#100) No matching user found", "type": "OAuthException", "code": 100,
            "error_subcode": 2018001, "fbtrace_id": "AbC"}})))
        .mount(&fixture.stand_in)
        .await;
    let conversation_id = messenger_conversation(&mut fixture, "psid-8").await?;
    let accepted = fixture.ana.admin.send_reply(reply(&conversation_id, "Hello?")).await?.into_inner();
    let failed = message_when(&mut fixture.ana, &conversation_id, &accepted.reply_id, "the reply failed", |message| {
        message.delivery_state == "failed"
    })
    .await?;
    assert!(!failed.will_retry, "a 4xx is permanent");
    assert!(failed.failure_reason.contains("HTTP 400"), "{}", failed.failure_reason);
    assert!(
        failed.failure_reason.contains("No matching user found"),
        "Meta's error is kept: {}",
        failed.failure_reason
    );
    assert!(failed.failure_reason.contains("2018001"), "{}", failed.failure_reason);
    assert_eq!(history(&failed), ["queued", "failed"]);
    let requests = fixture.stand_in.received_requests().await.unwrap_or_default();
    assert_eq!(send_api_requests(&requests, &page).len(), 1, "tried once, never again");
    fixture.env.cleanup().await;
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Custom app (C10)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c10_custom_reply_is_posted_to_the_app_signed_with_the_inbound_scheme() -> anyhow::Result<()> {
    let mut fixture = fixture().await?;
    Mock::given(method("POST"))
        .and(path("/switchboard/replies"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "tg-out-1"})))
        .mount(&fixture.stand_in)
        .await;
    // The app forwards its user's message, signed.
    let body = br#"{"message_id":"tg-1","thread_id":"tg-chat-9","sender":{"id":"tg-user-1","name":"Kim"},"text":"Hi from Telegram"}"#;
    let timestamp = chrono::Utc::now().timestamp();
    let signature = switchboard_runtime::signature::sign_custom(&Secret::new(APP_SIGNING_KEY), timestamp, body);
    let inbound = fixture
        .pipeline
        .http
        .post(format!("{}/v1/channels/app/custom/messages", fixture.pipeline.ingest_url))
        .header("x-switchboard-timestamp", timestamp.to_string())
        .header("x-switchboard-signature", signature)
        .body(&body[..])
        .send()
        .await?;
    assert_eq!(inbound.status().as_u16(), 202);
    let conversation_id = conversation_on(&mut fixture.ana, "app").await?;

    let accepted = fixture.ana.admin.send_reply(reply(&conversation_id, "Hello Kim!")).await?.into_inner();
    let sent = message_when(&mut fixture.ana, &conversation_id, &accepted.reply_id, "the reply sent", |message| {
        message.delivery_state == "sent"
    })
    .await?;
    assert_eq!(sent.provider_message_id, "tg-out-1", "the app's id");
    let requests = fixture.stand_in.received_requests().await.unwrap_or_default();
    let posted: Vec<&Request> =
        requests.iter().filter(|request| request.url.path() == "/switchboard/replies").collect();
    assert_eq!(posted.len(), 1);
    let request = posted[0];
    let header_of = |name: &str| request.headers.get(name).and_then(|value| value.to_str().ok());
    switchboard_runtime::signature::verify_custom(
        &Secret::new(APP_SIGNING_KEY),
        header_of("x-switchboard-timestamp"),
        header_of("x-switchboard-signature"),
        &request.body,
        chrono::Utc::now().timestamp(),
    )
    .context("the app verifies the reply as ingest verifies the app")?;
    let posted: Value = serde_json::from_slice(&request.body)?;
    assert_eq!(posted["reply_id"], accepted.reply_id.as_str());
    assert_eq!(posted["thread_id"], "tg-chat-9");
    assert_eq!(posted["text"], "Hello Kim!");
    assert_eq!(posted["author"], json!({"kind": "agent", "agent_id": "ana", "name": "Ana Alvarez"}));
    assert_eq!(header_of("idempotency-key"), Some(accepted.reply_id.as_str()));
    fixture.env.cleanup().await;
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Chat (C5)

/// The first server-sent event with data on `response`, as JSON.
async fn next_event(response: &mut reqwest::Response, buffer: &mut String) -> anyhow::Result<(String, Value)> {
    let deadline = Instant::now() + WITHIN;
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let mut id = String::new();
            let mut data = String::new();
            for line in frame.lines() {
                if let Some(value) = line.strip_prefix("id:") {
                    id = value.trim().to_owned();
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push_str(value.trim_start());
                }
            }
            if !data.is_empty() {
                return Ok((id, serde_json::from_str(&data)?));
            }
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, response.chunk()).await {
            Ok(Ok(Some(chunk))) => buffer.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(Ok(None)) => bail!("the stream ended"),
            Ok(Err(error)) => return Err(error.into()),
            Err(_) => bail!("no event within {WITHIN:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c5_chat_reply_arrives_on_the_visitors_event_stream() -> anyhow::Result<()> {
    let mut fixture = fixture().await?;
    let pipeline = &fixture.pipeline;
    switchboard_tests::demo::post_chat(&pipeline.http, &pipeline.ingest_url, "chat", "vera", "vera-1", "Hi!").await?;
    let conversation_id = conversation_on(&mut fixture.ana, "chat").await?;
    let mut stream = fixture
        .pipeline
        .http
        .get(format!("{}/v1/channels/chat/chat/visitors/vera/events", fixture.pipeline.ingest_url))
        .send()
        .await?
        .error_for_status()?;
    // Another visitor's reply never reaches vera's stream.
    switchboard_tests::demo::post_chat(
        &fixture.pipeline.http,
        &fixture.pipeline.ingest_url,
        "chat",
        "walt",
        "walt-1",
        "Hello?",
    )
    .await?;

    let accepted =
        fixture.ana.admin.send_reply(reply(&conversation_id, "Hi Vera, how can I help?")).await?.into_inner();
    let mut buffer = String::new();
    let (id, event) = next_event(&mut stream, &mut buffer).await?;
    assert!(id.parse::<i64>().is_ok(), "the event id is the row's seq: {id}");
    assert_eq!(event["reply_id"], accepted.reply_id.as_str());
    assert_eq!(event["text"], "Hi Vera, how can I help?");
    message_when(&mut fixture.ana, &conversation_id, &accepted.reply_id, "the chat reply sent", |message| {
        message.delivery_state == "sent"
    })
    .await?;
    fixture.env.cleanup().await;
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Contact owner (R4)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r4_an_offline_owner_gets_an_auto_submitted_email_at_mailpit() -> anyhow::Result<()> {
    let mut fixture = fixture().await?;
    let admin = clients_for(&fixture.pipeline.api_url, &identity("boss", Role::Admin)).await?;
    let pipeline = &fixture.pipeline;
    switchboard_tests::demo::post_chat(&pipeline.http, &pipeline.ingest_url, "owned-chat", "otto", "otto-1", "Hi")
        .await?;
    let first = conversation_on(&mut fixture.ana, "owned-chat").await?;
    let contact_id = get_conversation(&mut fixture.ana, &first).await?.conversation.unwrap().contact_id;
    let mut admin_calls = admin.admin.clone();
    admin_calls
        .set_contact_owner(SetContactOwnerRequest {
            request_id: Uuid::now_v7().to_string(),
            contact_id,
            owner_agent_id: "olga".into(),
        })
        .await?;
    admin_calls
        .close_conversation(switchboard_proto::api::v1::CloseConversationRequest {
            request_id: Uuid::now_v7().to_string(),
            conversation_id: first.clone(),
        })
        .await?;
    // Wait for the close before the next message, so it starts a new conversation.
    eventually("the first conversation closed", || {
        let mut conversations = fixture.ana.conversations.clone();
        let first = first.clone();
        async move {
            let response = conversations
                .get_conversation(GetConversationRequest { conversation_id: first, ..Default::default() })
                .await?
                .into_inner();
            Ok(response.conversation.and_then(|conversation| conversation.closed_at).map(|_| ()))
        }
    })
    .await?;
    let pipeline = &fixture.pipeline;
    switchboard_tests::demo::post_chat(
        &pipeline.http,
        &pipeline.ingest_url,
        "owned-chat",
        "otto",
        "otto-2",
        "About my contract renewal",
    )
    .await?;

    let owner = format!("olga-{}@e2e.example", fixture.run);
    let found = fixture.pipeline.mailpit.wait_for(&format!("to:{owner}"), 1, WITHIN).await?;
    assert_eq!(found.len(), 1, "one notification");
    let raw = fixture.pipeline.mailpit.raw(&found[0].id).await?;
    let mail = MessageParser::default().parse(&raw).context("Mailpit holds no parsable mail")?;
    assert_eq!(header_text(&mail, "Auto-Submitted"), "auto-generated");
    assert_eq!(mail.subject(), Some("New message from otto in Support"));
    let text = mail.body_text(0).context("no text body")?;
    assert!(text.contains("> About my contract renewal"), "{text}");
    assert_eq!(
        mail.from().and_then(|from| from.first()).and_then(|from| from.name()),
        Some("E2E Support"),
        "C12: the inbox's fallback identity"
    );
    fixture.env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c6_the_consent_prompt_offers_quick_replies_and_a_tap_releases_the_held_message() -> anyhow::Result<()> {
    let mut fixture = fixture().await?;
    let page = format!("ask-{}", fixture.run);
    Mock::given(method("POST"))
        .and(path(format!("/{page}/messages")))
        .and(header("authorization", "Bearer ASK-TOKEN"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"recipient_id": "psid-9", "message_id": "m_prompt"})),
        )
        .mount(&fixture.stand_in)
        .await;
    let at = now_millis();
    let first = json!({"object": "page", "entry": [{"id": page, "time": at, "messaging": [
        {"sender": {"id": "psid-9"}, "recipient": {"id": page}, "timestamp": at,
         "message": {"mid": "m_held", "text": "Do you ship to Norway?"}}]}]})
    .to_string();
    post_messenger(&fixture, &first).await?;

    // The router's prompt reaches the Send API with the two answers ingest understands.
    let prompt = eventually("the consent prompt at the stand-in", || {
        let stand_in = &fixture.stand_in;
        let page = page.clone();
        async move {
            let requests = stand_in.received_requests().await.unwrap_or_default();
            Ok(send_api_requests(&requests, &page).into_iter().next())
        }
    })
    .await?;
    assert_eq!(
        prompt,
        json!({"recipient": {"id": "psid-9"}, "messaging_type": "RESPONSE", "message": {
        "text": "May we keep your messages to help you?",
        "quick_replies": [
            {"content_type": "text", "title": "Yes, continue", "payload": "SWITCHBOARD_CONSENT_GRANTED"},
            {"content_type": "text", "title": "No, thanks", "payload": "SWITCHBOARD_CONSENT_DECLINED"},
        ]}})
    );
    let listed = fixture
        .ana
        .conversations
        .list_conversations(ListConversationsRequest { channel_id: "fb-ask".into(), ..Default::default() })
        .await?
        .into_inner();
    assert!(listed.conversations.is_empty(), "the message is held until the customer answers");

    // The customer taps "Yes, continue": Meta sends the quick reply's payload back.
    let tapped_at = now_millis();
    let tap = json!({"object": "page", "entry": [{"id": page, "time": tapped_at, "messaging": [
        {"sender": {"id": "psid-9"}, "recipient": {"id": page}, "timestamp": tapped_at,
         "message": {"mid": "m_tap", "text": "Yes, continue", "quick_reply": {"payload": prompt["message"]["quick_replies"][0]["payload"]}}}]}]})
    .to_string();
    post_messenger(&fixture, &tap).await?;
    let conversation_id = conversation_on(&mut fixture.ana, "fb-ask").await?;
    let response = get_conversation(&mut fixture.ana, &conversation_id).await?;
    let inbound: Vec<&str> = response
        .messages
        .iter()
        .filter(|message| message.direction == "inbound")
        .map(|message| message.text.as_str())
        .collect();
    assert_eq!(inbound, ["Do you ship to Norway?"], "the held message starts the conversation; the tap is no message");
    fixture.env.cleanup().await;
    Ok(())
}
