//! O5 fault test: kill -9 the delivery binary at random points while 5,000 replies go out to a
//! stand-in customer app that also drops connections mid-request. Afterwards, per idempotency
//! key at the stand-in: every reply was received; a key received more than once only when the
//! delivery service recorded an attempt `resent_after_crash` for it (the one documented window).
//!
//! Needs the binaries: `cargo build --bins` (scripts/test does).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use rand::Rng;
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{Author, AuthorKind, ChannelType, OutboundMessageQueued, OutboundPurpose};
use switchboard_runtime::envelope;
use switchboard_runtime::outbound::outbound_partition_key;
use switchboard_tests::TestEnv;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How many replies (`DELIVERY_CRASH_REPLIES` overrides, for quick runs).
fn replies_count() -> usize {
    std::env::var("DELIVERY_CRASH_REPLIES").ok().and_then(|value| value.parse().ok()).unwrap_or(5_000)
}
const ACCOUNT: &str = "acme";

/// What the stand-in saw.
#[derive(Default)]
struct StandIn {
    /// Requests answered 200, by Idempotency-Key: what the app received.
    received: Mutex<HashMap<String, u32>>,
    /// Connections dropped before the request was complete (never received).
    dropped: AtomicU64,
}

/// A minimal HTTP/1.1 app: reads one request at a time per connection; drops about 2% of them
/// after the headers, mid-request (the body unread), otherwise answers 200.
async fn serve(listener: TcpListener, stand_in: Arc<StandIn>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { return };
        let stand_in = stand_in.clone();
        tokio::spawn(async move {
            let _ = connection(stream, stand_in).await;
        });
    }
}

async fn connection(mut stream: TcpStream, stand_in: Arc<StandIn>) -> std::io::Result<()> {
    let mut buffer = Vec::with_capacity(4096);
    loop {
        let header_end = loop {
            if let Some(position) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
                break position + 4;
            }
            let mut chunk = [0u8; 4096];
            let read = stream.read(&mut chunk).await?;
            if read == 0 {
                return Ok(());
            }
            buffer.extend_from_slice(&chunk[..read]);
        };
        let head = String::from_utf8_lossy(&buffer[..header_end]).to_string();
        let header_value = |name: &str| {
            head.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_owned())
            })
        };
        let content_length: usize = header_value("content-length").and_then(|value| value.parse().ok()).unwrap_or(0);
        let key = header_value("idempotency-key").unwrap_or_default();
        if rand::rng().random_bool(0.02) {
            // Mid-request: the body is never read; the sender sees the connection die.
            stand_in.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        while buffer.len() < header_end + content_length {
            let mut chunk = [0u8; 4096];
            let read = stream.read(&mut chunk).await?;
            if read == 0 {
                return Ok(());
            }
            buffer.extend_from_slice(&chunk[..read]);
        }
        buffer.drain(..header_end + content_length);
        *stand_in.received.lock().unwrap().entry(key).or_default() += 1;
        let body = br#"{"ok":true}"#;
        let response =
            format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", body.len());
        stream.write_all(response.as_bytes()).await?;
        stream.write_all(body).await?;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o5_kill_9_during_5000_replies_loses_none_and_duplicates_only_after_a_crash_with_the_same_key()
-> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let replies_total = replies_count();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/replies", listener.local_addr()?);
    let stand_in = Arc::new(StandIn::default());
    tokio::spawn(serve(listener, stand_in.clone()));
    let secrets_file = std::env::temp_dir().join(format!("delivery-crash-{}.toml", uuid::Uuid::now_v7().simple()));
    std::fs::write(&secrets_file, "[channels.app]\nsigning_key = \"crash-key\"\n")?;

    let replies: Vec<(String, switchboard_proto::events::v1::Envelope)> = (0..replies_total)
        .map(|index| {
            let reply_id = uuid::Uuid::now_v7().to_string();
            let conversation_id = uuid::Uuid::now_v7().to_string();
            let message = OutboundMessageQueued {
                reply_id: reply_id.clone(),
                conversation_id: conversation_id.clone(),
                channel_id: "app".into(),
                channel_type: ChannelType::Custom as i32,
                purpose: OutboundPurpose::ConversationReply as i32,
                author: Some(Author { kind: AuthorKind::Agent as i32, name: "Ann".into(), ..Default::default() }),
                text: format!("reply {index}"),
                recipient: format!("user-{index}"),
                idempotency_key: reply_id,
                custom_delivery_url: url.clone(),
                ..Default::default()
            };
            let key = outbound_partition_key(ACCOUNT, &conversation_id);
            let event = envelope::new_root(ACCOUNT, &key, Utc::now(), Payload::OutboundMessageQueued(message));
            (key, event)
        })
        .collect();
    let producing = {
        let env_topic = env.topics.outbound.clone();
        let brokers = env.brokers.clone();
        let replies = replies.clone();
        tokio::spawn(async move { produce(&brokers, &env_topic, &replies).await })
    };

    let extra = [("DELIVERY_SEND_TIMEOUT_MS", "2000"), ("DELIVERY_CONCURRENCY", "128")];
    let mut kills = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let mut rng = rand::rng();
    loop {
        let sent = sent_count(&env).await.unwrap_or(0);
        if sent == replies_total as i64 || tokio::time::Instant::now() > deadline {
            break;
        }
        let mut process = env.spawn_delivery_process(&url, &secrets_file, &extra)?;
        if kills < 10 {
            // Random point: during startup, intake, sends or recording.
            tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..4_000))).await;
            process.kill()?; // SIGKILL
            process.wait()?;
            kills += 1;
        } else {
            // Then let one run finish the rest.
            while sent_count(&env).await.unwrap_or(0) < replies_total as i64 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            // Let its last events be acknowledged and published.
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    }
    producing.await??;
    let _ = std::fs::remove_file(&secrets_file);

    // What the delivery service recorded: per reply, how many attempts were resends after a
    // crash (events deduplicated by event id: a recorded attempt may be published twice).
    let mut seen_events = std::collections::HashSet::new();
    let mut resent: HashMap<String, u32> = HashMap::new();
    let mut attempts_published = 0u64;
    for event in env.read_committed_events(&env.topics.delivery)? {
        if !seen_events.insert(event.event_id.clone()) {
            continue;
        }
        if let Some(Payload::DeliveryAttemptRecorded(attempt)) = event.payload {
            attempts_published += 1;
            if attempt.resent_after_crash {
                *resent.entry(attempt.idempotency_key).or_default() += 1;
            }
        }
    }
    let received = stand_in.received.lock().unwrap().clone();
    let missing = replies
        .iter()
        .filter_map(|(_, event)| match &event.payload {
            Some(Payload::OutboundMessageQueued(message)) => Some(message.idempotency_key.clone()),
            _ => None,
        })
        .filter(|key| !received.contains_key(key))
        .count();
    let duplicated: Vec<(&String, &u32)> = received.iter().filter(|(_, count)| **count > 1).collect();
    let unexplained: Vec<_> =
        duplicated.iter().filter(|(key, count)| resent.get(key.as_str()).copied().unwrap_or(0) < **count - 1).collect();
    let sent = sent_count(&env).await?;
    println!(
        "delivery crash test: {replies_total} replies, {kills} kill -9s, {} connections dropped mid-request; \
         received once: {}, received twice or more (same key): {}, of those explained by resent_after_crash: {}; \
         never received: {missing}; attempts published: {attempts_published}; attempts resent after a crash: {}; \
         outbox rows sent: {sent}",
        stand_in.dropped.load(Ordering::Relaxed),
        received.values().filter(|count| **count == 1).count(),
        duplicated.len(),
        duplicated.len() - unexplained.len(),
        resent.values().sum::<u32>(),
    );
    assert_eq!(sent, replies_total as i64, "every reply ends sent");
    assert_eq!(missing, 0, "every reply reached the app");
    assert!(unexplained.is_empty(), "duplicates without a crash resend: {unexplained:?}");
    env.cleanup().await;
    Ok(())
}

async fn produce(
    brokers: &str,
    topic: &str,
    records: &[(String, switchboard_proto::events::v1::Envelope)],
) -> anyhow::Result<()> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer =
        switchboard_runtime::kafka::idempotent_producer_config(brokers, "test-crash-replies", 60_000).create()?;
    // Paced: the replies keep coming while the service is killed and restarted.
    for slice in records.chunks(250) {
        let sends = slice.iter().map(|(key, event)| {
            let payload = envelope::encode(event);
            let producer = &producer;
            async move {
                producer
                    .send(FutureRecord::to(topic).key(key).payload(&payload), Duration::from_secs(60))
                    .await
                    .map_err(|(error, _)| anyhow::Error::new(error))
            }
        });
        futures::future::try_join_all(sends).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

async fn sent_count(env: &TestEnv) -> anyhow::Result<i64> {
    // The table exists once the first delivery process migrated.
    Ok(sqlx::query_scalar("SELECT count(*) FROM delivery.outbox WHERE state = 'sent'").fetch_one(&env.pool).await?)
}
