//! C5: the chat widget's reply stream on ingest, against a real PostgreSQL with the delivery
//! service's `delivery.chat_messages` table (rows inserted and notified here as the delivery
//! service does) and real HTTP.

use std::time::Duration;

use anyhow::Context;
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{ChannelConfigured, ChannelType};
use switchboard_tests::TestEnv;

/// Starts ingest in-process with the chat reply stream reading `database_url`; returns its URL.
/// Keep-alives every 200 ms so the tests see them without waiting.
async fn start_ingest_streaming(env: &TestEnv) -> anyhow::Result<String> {
    let config = env.config_store("test-ingest-chat-stream").await?;
    let settings = switchboard_ingest::IngestSettings {
        chat_stream_opt: Some(switchboard_ingest::chat_stream::ChatStreamSettings {
            database_url: env.database_url.clone(),
            keep_alive: Duration::from_millis(200),
        }),
        ..switchboard_ingest::IngestSettings::new("127.0.0.1:0".parse()?, &env.brokers, &env.topics.inbound)
    };
    let (bound_sender, bound) = tokio::sync::oneshot::channel();
    // Runs until the test process ends.
    tokio::spawn(switchboard_ingest::serve(settings, config, bound_sender, std::future::pending()));
    let address = bound.await.context("ingest did not start")?;
    Ok(format!("http://{address}"))
}

async fn configure(env: &TestEnv) -> anyhow::Result<()> {
    let channel = |account: &str, channel_id: &str, channel_type: ChannelType| {
        (
            account.to_owned(),
            Payload::ChannelConfigured(Box::new(ChannelConfigured {
                channel_id: channel_id.into(),
                inbox_id: "support".into(),
                channel_type: channel_type as i32,
                name: channel_id.into(),
                enabled: true,
                ..Default::default()
            })),
        )
    };
    for (account, payload) in [
        channel("acct-a", "web-a", ChannelType::Chat),
        channel("acct-a", "mail-a", ChannelType::TeamEmail),
        channel("acct-b", "web-b", ChannelType::Chat),
    ] {
        env.publish_config_events(&account, vec![payload]).await?;
    }
    Ok(())
}

/// Inserts a reply and notifies, in one transaction, as the delivery service does; returns its seq.
async fn deliver(env: &TestEnv, account: &str, channel: &str, visitor: &str, text: &str) -> anyhow::Result<i64> {
    let mut transaction = env.pool.begin().await?;
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO delivery.chat_messages \
           (account_id, channel_id, visitor_id, reply_id, conversation_id, author_kind, author_name, text, \
            attachments, sent_at) \
         VALUES ($1, $2, $3, $4, $5, 'agent', 'Ana', $6, '[{\"url\":\"https://files.example/a.png\"}]', now()) \
         RETURNING seq",
    )
    .bind(account)
    .bind(channel)
    .bind(visitor)
    .bind(uuid::Uuid::now_v7())
    .bind(uuid::Uuid::now_v7())
    .bind(text)
    .fetch_one(&mut *transaction)
    .await?;
    sqlx::query("SELECT pg_notify('delivery_chat_messages', $1)")
        .bind(seq.to_string())
        .execute(&mut *transaction)
        .await?;
    transaction.commit().await?;
    Ok(seq)
}

/// One server-sent event: its id and its data as JSON.
#[derive(Debug)]
struct Received {
    id: i64,
    data: serde_json::Value,
}

/// Reads a `text/event-stream` response frame by frame.
struct EventReader {
    response: reqwest::Response,
    buffer: String,
    keep_alives: usize,
}

impl EventReader {
    async fn open(url: &str, last_event_id_opt: Option<i64>) -> anyhow::Result<EventReader> {
        let mut request = reqwest::Client::new().get(url);
        if let Some(last_event_id) = last_event_id_opt {
            request = request.header("Last-Event-ID", last_event_id.to_string());
        }
        let response = request.send().await?;
        anyhow::ensure!(response.status() == 200, "status {}: {}", response.status(), response.text().await?);
        let content_type = response.headers()["content-type"].to_str()?.to_owned();
        anyhow::ensure!(content_type.starts_with("text/event-stream"), "content type {content_type}");
        Ok(EventReader { response, buffer: String::new(), keep_alives: 0 })
    }

    /// The next event with data within `timeout`, or `None`.
    async fn next(&mut self, timeout: Duration) -> anyhow::Result<Option<Received>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                let mut id_opt = None;
                let mut data = String::new();
                for line in frame.lines() {
                    if let Some(value) = line.strip_prefix("id:") {
                        id_opt = Some(value.trim().parse::<i64>()?);
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push_str(value.trim_start());
                    } else if line.starts_with(':') {
                        self.keep_alives += 1;
                    }
                }
                if let Some(id) = id_opt {
                    return Ok(Some(Received { id, data: serde_json::from_str(&data)? }));
                }
            }
            let chunk = match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Err(_) => return Ok(None),
                Ok(chunk) => chunk?,
            };
            let Some(chunk) = chunk else { anyhow::bail!("stream ended") };
            self.buffer.push_str(std::str::from_utf8(&chunk)?);
        }
    }
}

const WAIT: Duration = Duration::from_secs(10);
/// Long enough for a reply that should not come (the stream's own replies arrive in ms).
const QUIET: Duration = Duration::from_millis(700);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c5_replies_stream_live_and_a_resumed_stream_misses_nothing() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    switchboard_delivery::migrate(&env.pool).await?;
    configure(&env).await?;
    let ingest_url = start_ingest_streaming(&env).await?;
    let url = format!("{ingest_url}/v1/channels/web-a/chat/visitors/visitor-1/events");

    let stored = deliver(&env, "acct-a", "web-a", "visitor-1", "stored before the widget connected").await?;
    let mut stream = EventReader::open(&url, None).await?;
    let first = stream.next(WAIT).await?.context("the stored reply")?;
    assert_eq!(first.id, stored);
    assert_eq!(first.data["text"], "stored before the widget connected");
    assert_eq!(first.data["author"], serde_json::json!({"kind": "agent", "name": "Ana"}));
    assert_eq!(first.data["attachments"][0]["url"], "https://files.example/a.png");
    for field in ["reply_id", "conversation_id", "sent_at"] {
        assert!(first.data[field].is_string(), "{field} in {}", first.data);
    }

    // Live: inserted while the widget listens.
    let live = deliver(&env, "acct-a", "web-a", "visitor-1", "live").await?;
    let received = stream.next(WAIT).await?.context("the live reply")?;
    assert_eq!((received.id, received.data["text"].as_str()), (live, Some("live")));

    // Nobody else's replies: another visitor of the channel, and the same visitor id and
    // channel id in another account (M1).
    deliver(&env, "acct-a", "web-a", "visitor-2", "for visitor 2").await?;
    deliver(&env, "acct-b", "web-a", "visitor-1", "for account b").await?;
    deliver(&env, "acct-b", "web-b", "visitor-1", "for account b's channel").await?;
    assert!(stream.next(QUIET).await?.is_none(), "nothing for this visitor");
    assert!(stream.keep_alives > 0, "idle streams send keep-alive comments");

    // Disconnect; replies go on meanwhile; the browser reconnects with Last-Event-ID.
    drop(stream);
    let missed: Vec<i64> = [
        deliver(&env, "acct-a", "web-a", "visitor-1", "missed 1").await?,
        deliver(&env, "acct-a", "web-a", "visitor-1", "missed 2").await?,
    ]
    .into();
    let mut resumed = EventReader::open(&url, Some(live)).await?;
    let mut resumed_ids = Vec::new();
    for _ in 0..2 {
        resumed_ids.push(resumed.next(WAIT).await?.context("a missed reply")?.id);
    }
    assert_eq!(resumed_ids, missed, "oldest first, nothing lost, nothing repeated");
    let after_resume = deliver(&env, "acct-a", "web-a", "visitor-1", "after the resume").await?;
    assert_eq!(resumed.next(WAIT).await?.context("live after resuming")?.id, after_resume);
    assert!(resumed.next(QUIET).await?.is_none(), "nothing else");

    // ?after= resumes the same way (widgets that keep the cursor themselves).
    let mut from_query = EventReader::open(&format!("{url}?after={}", missed[0]), None).await?;
    assert_eq!(from_query.next(WAIT).await?.context("after the cursor")?.id, missed[1]);
    assert_eq!(from_query.next(WAIT).await?.context("then the next")?.id, after_resume);

    // Many streams share one listener: each visitor gets exactly their own reply.
    let mut streams = Vec::new();
    for visitor in 0..20 {
        let url = format!("{ingest_url}/v1/channels/web-a/chat/visitors/fan-{visitor}/events");
        streams.push(EventReader::open(&url, None).await?);
    }
    let mut expected = Vec::new();
    for visitor in 0..20 {
        expected.push(deliver(&env, "acct-a", "web-a", &format!("fan-{visitor}"), &format!("to {visitor}")).await?);
    }
    for (visitor, stream) in streams.iter_mut().enumerate() {
        let received = stream.next(WAIT).await?.context("each visitor's reply")?;
        assert_eq!((received.id, received.data["text"].as_str()), (expected[visitor], Some(&*format!("to {visitor}"))));
    }
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c5_bad_stream_requests_get_clear_errors() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    switchboard_delivery::migrate(&env.pool).await?;
    configure(&env).await?;
    let ingest_url = start_ingest_streaming(&env).await?;
    let client = reqwest::Client::new();
    let get = |path: String, last_event_id_opt: Option<&'static str>| {
        let mut request = client.get(format!("{ingest_url}{path}"));
        if let Some(last_event_id) = last_event_id_opt {
            request = request.header("Last-Event-ID", last_event_id);
        }
        request.send()
    };
    let cases = [
        ("/v1/channels/nowhere/chat/visitors/v-1/events".to_owned(), None, 404, "unknown_channel"),
        ("/v1/channels/mail-a/chat/visitors/v-1/events".to_owned(), None, 400, "invalid_field"),
        ("/v1/channels/web-a/chat/visitors/v%07x/events".to_owned(), None, 400, "invalid_field"),
        (format!("/v1/channels/web-a/chat/visitors/{}/events", "v".repeat(600)), None, 400, "invalid_field"),
        ("/v1/channels/web-a/chat/visitors/v-1/events".to_owned(), Some("yesterday"), 400, "invalid_field"),
        ("/v1/channels/web-a/chat/visitors/v-1/events?after=-3".to_owned(), None, 400, "invalid_field"),
    ];
    for (path, last_event_id_opt, status, code) in cases {
        let response = get(path.clone(), last_event_id_opt).await?;
        assert_eq!(response.status().as_u16(), status, "{path}");
        let body: serde_json::Value = response.json().await?;
        assert_eq!(body["error"]["code"], code, "{path}: {body}");
    }

    // Ingest without DATABASE_URL cannot stream, and says why.
    let without_database = env.start_ingest().await?;
    let response = client.get(format!("{without_database}/v1/channels/web-a/chat/visitors/v-1/events")).send().await?;
    assert_eq!(response.status().as_u16(), 503);
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["error"]["code"], "chat_stream_not_configured");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("DATABASE_URL"), "{body}");
    env.cleanup().await;
    Ok(())
}
