//! The delivery service against real Kafka and PostgreSQL, with a stand-in (wiremock) for Meta's
//! Graph API and a customer's app. The stand-in answers 2xx only to requests of the documented
//! shape (anything else gets wiremock's 404, a permanent failure the test sees).

use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    Author, AuthorKind, ChannelType, DeliveryAttemptRecorded, DeliveryState, Envelope, MessengerMessagingType,
    OutboundMessageQueued, OutboundMessenger, OutboundPurpose, OutboundWhatsApp, WhatsAppTemplateMessage,
};
use switchboard_runtime::envelope;
use switchboard_runtime::outbound::outbound_partition_key;
use switchboard_tests::TestEnv;
use wiremock::matchers::{body_json, header, method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const ACCOUNT: &str = "acme";
const SECRETS: &str = r#"
[channels.fb]
access_token = "PAGE-TOKEN"
[channels.wa]
access_token = "WA-TOKEN"
[channels.app]
signing_key = "app-signing-key"
"#;

fn reply(channel_id: &str, channel_type: ChannelType, text: &str) -> OutboundMessageQueued {
    let reply_id = uuid::Uuid::now_v7().to_string();
    OutboundMessageQueued {
        reply_id: reply_id.clone(),
        conversation_id: uuid::Uuid::now_v7().to_string(),
        inbox_id: "support".into(),
        channel_id: channel_id.into(),
        channel_type: channel_type as i32,
        purpose: OutboundPurpose::ConversationReply as i32,
        author: Some(Author {
            kind: AuthorKind::Agent as i32,
            agent_id: "ann".into(),
            name: "Ann".into(),
            automation: 0,
        }),
        text: text.into(),
        idempotency_key: reply_id,
        ..Default::default()
    }
}

fn messenger(text: &str, messaging_type: MessengerMessagingType) -> OutboundMessageQueued {
    let mut message = reply("fb", ChannelType::FacebookMessenger, text);
    message.recipient = "psid-1".into();
    message.messenger = Some(OutboundMessenger {
        page_id: "page-9".into(),
        messaging_type: messaging_type as i32,
        ..Default::default()
    });
    message
}

fn whatsapp(text: &str, template: Option<WhatsAppTemplateMessage>) -> OutboundMessageQueued {
    let mut message = reply("wa", ChannelType::Whatsapp, text);
    message.recipient = "4915112345678".into();
    message.whatsapp = Some(OutboundWhatsApp { phone_number_id: "pn-1".into(), template });
    message
}

fn record(message: &OutboundMessageQueued) -> (String, Envelope) {
    let key = outbound_partition_key(ACCOUNT, &message.conversation_id);
    let event = envelope::new_root(ACCOUNT, &key, Utc::now(), Payload::OutboundMessageQueued(message.clone()));
    (key, event)
}

/// Every DeliveryAttemptRecorded on delivery.v1 once at least `count` are there.
async fn wait_for_attempts(env: &TestEnv, count: usize) -> anyhow::Result<Vec<DeliveryAttemptRecorded>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let attempts: Vec<DeliveryAttemptRecorded> = env
            .read_committed_events(&env.topics.delivery)?
            .into_iter()
            .filter_map(|event| match event.payload {
                Some(Payload::DeliveryAttemptRecorded(attempt)) => Some(attempt),
                _ => None,
            })
            .collect();
        if attempts.len() >= count {
            return Ok(attempts);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} of {count} attempts recorded: {attempts:?}",
            attempts.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn attempts_of<'a>(attempts: &'a [DeliveryAttemptRecorded], reply_id: &str) -> Vec<&'a DeliveryAttemptRecorded> {
    let mut of: Vec<_> = attempts.iter().filter(|attempt| attempt.reply_id == reply_id).collect();
    of.sort_by_key(|attempt| attempt.attempt);
    of
}

fn requests_with_key(requests: &[Request], key: &str) -> Vec<Value> {
    requests
        .iter()
        .filter(|request| request.headers.get("idempotency-key").and_then(|value| value.to_str().ok()) == Some(key))
        .map(|request| serde_json::from_slice(&request.body).unwrap_or(Value::Null))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c6_c8_c10_c5_each_channel_gets_the_documented_request_and_the_attempt_is_recorded() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let stand_in = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/page-9/messages"))
        .and(header("authorization", "Bearer PAGE-TOKEN"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"recipient_id": "psid-1", "message_id": "m_fb"})))
        .mount(&stand_in)
        .await;
    Mock::given(method("POST"))
        .and(path("/pn-1/messages"))
        .and(header("authorization", "Bearer WA-TOKEN"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "messaging_product": "whatsapp",
            "contacts": [{"input": "4915112345678", "wa_id": "4915112345678"}],
            "messages": [{"id": "wamid.HBg"}]
        })))
        .mount(&stand_in)
        .await;
    Mock::given(method("POST"))
        .and(path("/app/replies"))
        .respond_with(ResponseTemplate::new(202))
        .mount(&stand_in)
        .await;

    let response = messenger("Inside the window", MessengerMessagingType::Response);
    let tagged = messenger("Three days later", MessengerMessagingType::HumanAgentTag);
    let text = whatsapp("Your order shipped", None);
    let template = whatsapp(
        "",
        Some(WhatsAppTemplateMessage {
            name: "order_update".into(),
            language: "en_US".into(),
            parameters: vec!["Ann".into(), "A-42".into()],
        }),
    );
    let mut custom = reply("app", ChannelType::Custom, "Hello from support");
    custom.custom_delivery_url = format!("{}/app/replies", stand_in.uri());
    custom.thread_key = "thread-7".into();
    custom.recipient = "user-3".into();
    let mut chat = reply("web", ChannelType::Chat, "Hi visitor");
    chat.recipient = "visitor-5".into();

    let mut listener = sqlx::postgres::PgListener::connect(&env.database_url).await?;
    listener.listen("delivery_chat_messages").await?;
    let all = [&response, &tagged, &text, &template, &custom, &chat];
    env.produce_envelopes(&env.topics.outbound, &all.iter().map(|message| record(message)).collect::<Vec<_>>()).await?;
    // A note on the same topic is never sent.
    let note = Payload::InternalNoteAdded(switchboard_proto::events::v1::InternalNoteAdded {
        note_id: uuid::Uuid::now_v7().to_string(),
        conversation_id: response.conversation_id.clone(),
        text: "internal".into(),
        ..Default::default()
    });
    let note_key = outbound_partition_key(ACCOUNT, &response.conversation_id);
    env.produce_envelopes(
        &env.topics.outbound,
        &[(note_key.clone(), envelope::new_root(ACCOUNT, &note_key, Utc::now(), note))],
    )
    .await?;

    env.start_delivery(env.delivery_settings(&stand_in.uri(), SECRETS)?).await?;
    let attempts = wait_for_attempts(&env, all.len()).await?;
    let requests = stand_in.received_requests().await.unwrap_or_default();

    for message in all {
        let of = attempts_of(&attempts, &message.reply_id);
        assert_eq!(of.len(), 1, "one attempt for {}: {of:?}", message.text);
        assert_eq!(of[0].state, DeliveryState::Sent as i32, "{:?}", of[0]);
        assert_eq!((of[0].attempt, of[0].resent_after_crash), (1, false));
        assert_eq!(of[0].idempotency_key, message.idempotency_key);
    }
    assert_eq!(attempts_of(&attempts, &response.reply_id)[0].provider_message_id, "m_fb");
    assert_eq!(attempts_of(&attempts, &text.reply_id)[0].provider_message_id, "wamid.HBg");

    assert_eq!(
        requests_with_key(&requests, &response.idempotency_key),
        vec![
            json!({"recipient": {"id": "psid-1"}, "messaging_type": "RESPONSE", "message": {"text": "Inside the window"}})
        ]
    );
    assert_eq!(
        requests_with_key(&requests, &tagged.idempotency_key),
        vec![json!({"recipient": {"id": "psid-1"}, "messaging_type": "MESSAGE_TAG", "tag": "HUMAN_AGENT",
                    "message": {"text": "Three days later"}})]
    );
    assert_eq!(
        requests_with_key(&requests, &text.idempotency_key),
        vec![json!({"messaging_product": "whatsapp", "recipient_type": "individual", "to": "4915112345678",
                    "type": "text", "text": {"preview_url": false, "body": "Your order shipped"}})]
    );
    assert_eq!(
        requests_with_key(&requests, &template.idempotency_key),
        vec![json!({"messaging_product": "whatsapp", "recipient_type": "individual", "to": "4915112345678",
                    "type": "template", "template": {"name": "order_update", "language": {"code": "en_US"},
                    "components": [{"type": "body", "parameters": [{"type": "text", "text": "Ann"},
                                                                   {"type": "text", "text": "A-42"}]}]}})]
    );

    // C10: the custom app's request verifies with ingest's inbound verifier.
    let custom_request =
        requests.iter().find(|request| request.url.path() == "/app/replies").expect("the custom app got the reply");
    let header_text = |name: &str| custom_request.headers.get(name).and_then(|value| value.to_str().ok());
    switchboard_ingest::signature::verify_custom(
        &switchboard_runtime::secrets::Secret::new("app-signing-key"),
        header_text("x-switchboard-timestamp"),
        header_text("x-switchboard-signature"),
        &custom_request.body,
        Utc::now().timestamp(),
    )?;
    assert_eq!(header_text("idempotency-key"), Some(custom.idempotency_key.as_str()));
    let custom_body: Value = serde_json::from_slice(&custom_request.body)?;
    assert_eq!(custom_body["reply_id"], custom.reply_id);
    assert_eq!(custom_body["thread_id"], "thread-7");
    assert_eq!(custom_body["recipient"], "user-3");
    assert_eq!(custom_body["text"], "Hello from support");
    assert_eq!(custom_body["author"], json!({"kind": "agent", "agent_id": "ann", "name": "Ann"}));

    // C5: the chat reply is a row, notified with its seq.
    let (seq, visitor, text_sent): (i64, String, String) = sqlx::query_as(
        "SELECT seq, visitor_id, text FROM delivery.chat_messages WHERE account_id = $1 AND reply_id = $2::uuid",
    )
    .bind(ACCOUNT)
    .bind(&chat.reply_id)
    .fetch_one(&env.pool)
    .await?;
    assert_eq!((visitor.as_str(), text_sent.as_str()), ("visitor-5", "Hi visitor"));
    let notification = tokio::time::timeout(Duration::from_secs(10), listener.recv()).await??;
    assert_eq!(notification.payload(), seq.to_string());
    assert_eq!(attempts_of(&attempts, &chat.reply_id)[0].provider_message_id, seq.to_string());

    // Nothing else reached the stand-in (the note was not sent).
    assert_eq!(requests.len(), 5, "{requests:?}");
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o5_429_and_5xx_are_retried_and_a_4xx_fails_at_once_with_the_providers_error() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let stand_in = MockServer::start().await;
    let throttled = messenger("throttled", MessengerMessagingType::Response);
    let unavailable = messenger("unavailable", MessengerMessagingType::Response);
    let refused = messenger("refused", MessengerMessagingType::Response);
    let matches_text = |text: &'static str| {
        body_json(json!({"recipient": {"id": "psid-1"}, "messaging_type": "RESPONSE", "message": {"text": text}}))
    };
    // Meta's rate-limit answer, once, with Retry-After; then success.
    Mock::given(method("POST"))
        .and(matches_text("throttled"))
        .respond_with(
            ResponseTemplate::new(429).insert_header("Retry-After", "1").set_body_json(json!({"error": {
                "message": "(#613) Calls to this api have exceeded the rate limit.", "type": "OAuthException", "code": 613}})),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&stand_in)
        .await;
    Mock::given(method("POST"))
        .and(matches_text("unavailable"))
        .respond_with(ResponseTemplate::new(503).set_body_string("upstream unavailable"))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&stand_in)
        .await;
    Mock::given(method("POST"))
        .and(matches_text("refused"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": {
            "message": "(#100) No matching user found", "type": "OAuthException", "code": 100,
            "error_subcode": 2018001, "fbtrace_id": "AbC"}})))
        .with_priority(1)
        .mount(&stand_in)
        .await;
    Mock::given(method("POST"))
        .and(path("/page-9/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"recipient_id": "psid-1", "message_id": "m_ok"})))
        .with_priority(5)
        .mount(&stand_in)
        .await;
    let started = std::time::Instant::now();
    env.produce_envelopes(&env.topics.outbound, &[record(&throttled), record(&unavailable), record(&refused)]).await?;
    env.start_delivery(env.delivery_settings(&stand_in.uri(), SECRETS)?).await?;
    // throttled: 2 attempts, unavailable: 3, refused: 1.
    let attempts = wait_for_attempts(&env, 6).await?;

    let throttled_attempts = attempts_of(&attempts, &throttled.reply_id);
    assert_eq!(throttled_attempts.len(), 2, "{throttled_attempts:?}");
    assert_eq!(throttled_attempts[0].state, DeliveryState::Failed as i32);
    assert!(throttled_attempts[0].will_retry);
    assert_eq!(throttled_attempts[0].provider_status_code, 429);
    assert!(throttled_attempts[0].error.contains("(#613) Calls to this api"), "{}", throttled_attempts[0].error);
    // Retry-After: 1 was honoured.
    let first_started = envelope::to_datetime(throttled_attempts[0].attempt_started_at.as_ref());
    let next_at = envelope::to_datetime(throttled_attempts[0].next_attempt_at.as_ref());
    assert!(next_at - first_started >= chrono::Duration::milliseconds(900), "{first_started} -> {next_at}");
    let second_started = envelope::to_datetime(throttled_attempts[1].attempt_started_at.as_ref());
    assert!(second_started >= next_at, "the retry waited for Retry-After");
    assert_eq!((throttled_attempts[1].state, throttled_attempts[1].attempt), (DeliveryState::Sent as i32, 2));
    assert_eq!(throttled_attempts[1].provider_message_id, "m_ok");

    let unavailable_attempts = attempts_of(&attempts, &unavailable.reply_id);
    assert_eq!(
        unavailable_attempts
            .iter()
            .map(|attempt| (attempt.attempt, attempt.will_retry, attempt.provider_status_code))
            .collect::<Vec<_>>(),
        vec![(1, true, 503), (2, true, 503), (3, false, 200)]
    );
    assert_eq!(unavailable_attempts[2].state, DeliveryState::Sent as i32);

    let refused_attempts = attempts_of(&attempts, &refused.reply_id);
    assert_eq!(refused_attempts.len(), 1);
    assert_eq!(refused_attempts[0].state, DeliveryState::Failed as i32);
    assert!(!refused_attempts[0].will_retry);
    assert_eq!(refused_attempts[0].provider_status_code, 400);
    assert_eq!(refused_attempts[0].error, "HTTP 400: (#100, subcode 2018001) (#100) No matching user found");

    // Every attempt is in the delivery service's own history too, and the refused reply was
    // never tried again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let requests = stand_in.received_requests().await.unwrap_or_default();
    assert_eq!(requests_with_key(&requests, &refused.idempotency_key).len(), 1);
    assert_eq!(requests_with_key(&requests, &throttled.idempotency_key).len(), 2);
    let states: Vec<(String, i32)> =
        sqlx::query_as("SELECT state, attempts FROM delivery.outbox WHERE account_id = $1 ORDER BY reply_id")
            .bind(ACCOUNT)
            .fetch_all(&env.pool)
            .await?;
    let mut expected = vec![
        (throttled.reply_id.clone(), ("sent".to_owned(), 2)),
        (unavailable.reply_id.clone(), ("sent".to_owned(), 3)),
        (refused.reply_id.clone(), ("failed".to_owned(), 1)),
    ];
    expected.sort();
    assert_eq!(states, expected.into_iter().map(|(_, state)| state).collect::<Vec<_>>());
    println!("retries settled in {:?}", started.elapsed());
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o5_a_message_left_sending_by_a_crash_is_resent_with_the_same_key() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let stand_in = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/pn-1/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"messages": [{"id": "wamid.again"}]})))
        .mount(&stand_in)
        .await;
    let message = whatsapp("Sent just before the crash", None);
    let (key, event) = record(&message);
    env.produce_envelopes(&env.topics.outbound, &[(key, event.clone())]).await?;
    // A first delivery process took the message in and recorded attempt 1, then died before
    // recording the provider's answer: the row is `sending`, the attempt has no outcome.
    switchboard_delivery::migrate(&env.pool).await?;
    let partition: i32 = 0;
    sqlx::query(
        "INSERT INTO delivery.outbox (account_id, reply_id, source_partition, source_offset, channel_type, envelope,
             state, attempts, queued_at, next_attempt_at)
         VALUES ($1, $2, $3, 0, 'whatsapp', $4, 'sending', 1, now(), now())",
    )
    .bind(ACCOUNT)
    .bind(&message.reply_id)
    .bind(partition)
    .bind(envelope::encode(&event))
    .execute(&env.pool)
    .await?;
    sqlx::query(
        "INSERT INTO delivery.attempts (account_id, reply_id, attempt, source_partition, started_at)
         VALUES ($1, $2, 1, $3, now() - interval '1 minute')",
    )
    .bind(ACCOUNT)
    .bind(&message.reply_id)
    .bind(partition)
    .execute(&env.pool)
    .await?;

    env.start_delivery(env.delivery_settings(&stand_in.uri(), SECRETS)?).await?;
    let attempts = wait_for_attempts(&env, 1).await?;
    let of = attempts_of(&attempts, &message.reply_id);
    assert_eq!(of.len(), 1, "{of:?}");
    assert_eq!((of[0].attempt, of[0].resent_after_crash), (1, true));
    assert_eq!(of[0].state, DeliveryState::Sent as i32);
    assert_eq!(of[0].idempotency_key, message.idempotency_key);
    // Intake met the same message on outbound.v1 and did not queue it a second time.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let requests = stand_in.received_requests().await.unwrap_or_default();
    assert_eq!(requests_with_key(&requests, &message.idempotency_key).len(), 1);
    let (state, attempts_made): (String, i32) =
        sqlx::query_as("SELECT state, attempts FROM delivery.outbox WHERE account_id = $1 AND reply_id = $2")
            .bind(ACCOUNT)
            .bind(&message.reply_id)
            .fetch_one(&env.pool)
            .await?;
    assert_eq!((state.as_str(), attempts_made), ("sent", 1));
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c10_a_burst_to_a_rate_limited_channel_waits_and_is_not_refused() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let stand_in = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/app/replies"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&stand_in)
        .await;
    // 2 per second: a burst of 7 takes at least (7 - 2) / 2 = 2.5 s (governor allows a burst of 2).
    let burst: Vec<OutboundMessageQueued> = (0..7)
        .map(|index| {
            let mut message = reply("app", ChannelType::Custom, &format!("burst {index}"));
            message.custom_delivery_url = format!("{}/app/replies", stand_in.uri());
            message.channel_messages_per_second = 2;
            message
        })
        .collect();
    env.produce_envelopes(&env.topics.outbound, &burst.iter().map(record).collect::<Vec<_>>()).await?;
    env.start_delivery(env.delivery_settings(&stand_in.uri(), SECRETS)?).await?;
    let attempts = wait_for_attempts(&env, burst.len()).await?;
    assert!(attempts.iter().all(|attempt| attempt.state == DeliveryState::Sent as i32 && attempt.attempt == 1));
    let times: Vec<chrono::DateTime<Utc>> = {
        let mut rows: Vec<chrono::DateTime<Utc>> =
            sqlx::query_scalar("SELECT finished_at FROM delivery.attempts WHERE account_id = $1 ORDER BY finished_at")
                .bind(ACCOUNT)
                .fetch_all(&env.pool)
                .await?;
        rows.sort();
        rows
    };
    let spread = times[times.len() - 1] - times[0];
    assert!(spread >= chrono::Duration::milliseconds(2_000), "7 sends at 2/s took only {spread}");
    assert_eq!(stand_in.received_requests().await.unwrap_or_default().len(), burst.len());
    env.cleanup().await;
    Ok(())
}
