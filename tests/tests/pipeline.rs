//! End-to-end tests through the real stack: HTTP in, Kafka, router, projector, PostgreSQL, gRPC out.

use std::collections::BTreeSet;
use std::time::Duration;

use switchboard_proto::api::v1::{GetConversationRequest, GetMessageRequest, ListConversationsRequest};
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_tests::TestEnv;
use switchboard_tests::demo::{LoadSpec, post_chat, run_load, wait_visible};

const CHANNEL: &str = "website-chat";
const VISIBLE_WITHIN: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c5_r3_r10_chat_message_over_http_is_visible_through_grpc_with_the_right_assignee() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let mut pipeline = env.start_pipeline().await?;

    // Three visitors in turn: round robin over ana, bo, cy in the rule's order (R3).
    let mut conversation_ids = Vec::new();
    for (index, visitor) in ["vera", "walt", "xena"].iter().enumerate() {
        let accepted =
            post_chat(&pipeline.http, &pipeline.ingest_url, CHANNEL, visitor, &format!("{visitor}-1"), "Hi!").await?;
        let message = wait_visible(&mut pipeline.api, &accepted.message_id, VISIBLE_WITHIN).await?;
        assert_eq!(message.text, "Hi!");
        // One trace id across ingest, router and projector, carried in Kafka headers.
        assert_eq!(message.trace_id, accepted.trace_id, "message {index} keeps its trace id end to end");
        assert_eq!(message.trace_id.len(), 32);
        conversation_ids.push(message.conversation_id);
    }
    let mut assignees = Vec::new();
    for conversation_id in &conversation_ids {
        let response = pipeline
            .api
            .get_conversation(GetConversationRequest { conversation_id: conversation_id.clone(), ..Default::default() })
            .await?
            .into_inner();
        let conversation = response.conversation.unwrap();
        assert_eq!(conversation.inbox_id, "support");
        assert_eq!(conversation.channel_type, "chat");
        // B2: the decision is recorded with its explanation.
        assert_eq!(response.assignments.len(), 1);
        assert_eq!(response.assignments[0].outcome, "assigned");
        assert_eq!(response.assignments[0].eligible_agent_ids, ["ana", "bo", "cy"]);
        assert_eq!(response.assignments[0].rule_version, 1);
        assignees.push(conversation.assignee_id);
    }
    assert_eq!(assignees, ["ana", "bo", "cy"]);

    // R10: a follow-up joins the open conversation and keeps its assignee.
    let follow_up = post_chat(&pipeline.http, &pipeline.ingest_url, CHANNEL, "vera", "vera-2", "Anyone there?").await?;
    let message = wait_visible(&mut pipeline.api, &follow_up.message_id, VISIBLE_WITHIN).await?;
    assert_eq!(message.conversation_id, conversation_ids[0]);
    let response = pipeline
        .api
        .get_conversation(GetConversationRequest { conversation_id: conversation_ids[0].clone(), ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(response.messages.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), ["Hi!", "Anyone there?"]);
    assert_eq!(response.conversation.unwrap().assignee_id, "ana");

    // ListConversations by inbox, by assignee, paginated.
    let all = pipeline
        .api
        .list_conversations(ListConversationsRequest { inbox_id: "support".into(), ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(all.conversations.len(), 3);
    let bos = pipeline
        .api
        .list_conversations(ListConversationsRequest {
            inbox_id: "support".into(),
            assignee_id: "bo".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(bos.conversations.len(), 1);
    let first_page = pipeline
        .api
        .list_conversations(ListConversationsRequest { inbox_id: "support".into(), page_size: 2, ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(first_page.conversations.len(), 2);
    let second_page = pipeline
        .api
        .list_conversations(ListConversationsRequest {
            inbox_id: "support".into(),
            page_size: 2,
            page_token: first_page.next_page_token.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(second_page.conversations.len(), 1);
    assert!(second_page.next_page_token.is_empty());
    let paged: BTreeSet<_> =
        first_page.conversations.iter().chain(&second_page.conversations).map(|c| c.id.clone()).collect();
    assert_eq!(paged, conversation_ids.iter().cloned().collect());

    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b1_the_same_message_posted_twice_is_one_message() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let mut pipeline = env.start_pipeline().await?;
    let first =
        post_chat(&pipeline.http, &pipeline.ingest_url, CHANNEL, "yuri", "provider-42", "Refund please").await?;
    let retry =
        post_chat(&pipeline.http, &pipeline.ingest_url, CHANNEL, "yuri", "provider-42", "Refund please").await?;
    assert_eq!(first.message_id, retry.message_id, "a retry maps to the same message id");
    // A later message from the same visitor: once it is visible, the retry has been routed too.
    let later = post_chat(&pipeline.http, &pipeline.ingest_url, CHANNEL, "yuri", "provider-43", "Order 1234").await?;
    let later = wait_visible(&mut pipeline.api, &later.message_id, VISIBLE_WITHIN).await?;
    let response = pipeline
        .api
        .get_conversation(GetConversationRequest { conversation_id: later.conversation_id, ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(response.messages.len(), 2, "retry did not add a message: {:?}", response.messages);
    assert_eq!(response.conversation.unwrap().message_count, 2);

    // And in the log itself: ingest answered the retry from its recently-published cache, so
    // the inbound topic holds one event per provider message, and one message was appended.
    let decided = env.read_committed_events(&env.topics.conversations)?;
    let appended = decided.iter().filter(|event| matches!(&event.payload, Some(Payload::MessageAppended(m)) if m.provider_message_id == "provider-42")).count();
    assert_eq!(appended, 1);
    assert_eq!(env.read_committed_events(&env.topics.inbound)?.len(), 2);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b1_router_killed_and_restarted_mid_stream_every_message_appears_exactly_once() -> anyhow::Result<()> {
    const VISITORS: usize = 100;
    const MESSAGES: usize = 2_000;
    let env = TestEnv::new().await?;
    env.apply_config(switchboard_tests::DEMO_CONFIG).await?;
    let ingest_url = env.start_ingest().await?;
    env.start_projector().await?;
    let api = env.start_api().await?;
    let mut router = env.spawn_router_process("router-0")?;

    let spec = LoadSpec {
        channel_id: CHANNEL.into(),
        messages: MESSAGES,
        visitors: VISITORS,
        concurrency: 20,
        run_id: "kill".into(),
    };
    let load = tokio::spawn({
        let (ingest_url, api, spec) = (ingest_url.clone(), api.clone(), spec.clone());
        async move { run_load(&ingest_url, api, &spec).await }
    });
    // Kill -9 twice while messages flow, restarting each time with the same instance id.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        router.kill()?;
        router.wait()?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        router = env.spawn_router_process("router-0")?;
    }
    let report = load.await??;
    router.kill()?;
    router.wait()?;
    assert_eq!(report.accepted, MESSAGES);

    // The committed log holds every decision exactly once.
    let decided = env.read_committed_events(&env.topics.conversations)?;
    let count = |predicate: fn(&Payload) -> bool| {
        decided.iter().filter(|event| event.payload.as_ref().is_some_and(predicate)).count()
    };
    assert_eq!(count(|p| matches!(p, Payload::ConversationStarted(_))), VISITORS);
    assert_eq!(count(|p| matches!(p, Payload::MessageAppended(_))), MESSAGES);
    assert_eq!(
        count(|p| matches!(p, Payload::ConversationAssigned(_) | Payload::ConversationLeftUnassigned(_))),
        VISITORS
    );
    let distinct_messages: BTreeSet<_> = decided
        .iter()
        .filter_map(|event| match &event.payload {
            Some(Payload::MessageAppended(appended)) => Some(appended.message_id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(distinct_messages.len(), MESSAGES);

    // And so do the read models.
    let (conversations, messages, assignments): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM conversations), (SELECT count(*) FROM messages), (SELECT count(*) FROM assignments)",
    )
    .fetch_one(&env.pool)
    .await?;
    assert_eq!((conversations, messages, assignments), (VISITORS as i64, MESSAGES as i64, VISITORS as i64));
    let per_agent: Vec<(String, i64)> =
        sqlx::query_as("SELECT assignee_id, count(*) FROM conversations GROUP BY assignee_id ORDER BY assignee_id")
            .fetch_all(&env.pool)
            .await?;
    assert_eq!(
        per_agent,
        [("ana".into(), 34), ("bo".into(), 33), ("cy".into(), 33)],
        "round robin stays fair across restarts"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_applying_the_same_events_twice_changes_nothing() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let pipeline = env.start_pipeline().await?;
    let spec =
        LoadSpec { channel_id: CHANNEL.into(), messages: 200, visitors: 20, concurrency: 10, run_id: "twice".into() };
    run_load(&pipeline.ingest_url, pipeline.api.clone(), &spec).await?;
    let fingerprint = |pool: sqlx::PgPool| async move {
        sqlx::query_as::<_, (i64, i64, i64, String)>(
            "SELECT (SELECT count(*) FROM conversations), (SELECT count(*) FROM messages), (SELECT count(*) FROM assignments), \
             (SELECT md5(string_agg(c::text, ',' ORDER BY conversation_id)) FROM conversations c)",
        )
        .fetch_one(&pool)
        .await
    };
    let before = fingerprint(env.pool.clone()).await?;
    assert_eq!((before.0, before.1, before.2), (20, 200, 20));

    // Forget the stored positions and replay everything with a second consumer group, which
    // redelivers every event to a projection that already applied them all.
    let positions_sql = "SELECT coalesce(sum(next_offset), 0)::bigint FROM projector_positions";
    let caught_up_at: i64 = sqlx::query_scalar(positions_sql).fetch_one(&env.pool).await?;
    sqlx::query("DELETE FROM projector_positions").execute(&env.pool).await?;
    let settings = env.projector_settings("-replay");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let replay = tokio::spawn(switchboard_projector::run_projector(settings, env.pool.clone(), stopped));
    let deadline = std::time::Instant::now() + VISIBLE_WITHIN;
    while sqlx::query_scalar::<_, i64>(positions_sql).fetch_one(&env.pool).await? < caught_up_at {
        assert!(std::time::Instant::now() < deadline, "replay did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(true);
    replay.await??;
    assert_eq!(fingerprint(env.pool.clone()).await?, before);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_never_reaches_the_log() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.apply_config(switchboard_tests::DEMO_CONFIG).await?;
    let ingest_url = env.start_ingest().await?;
    let mut api = env.start_api().await?;
    let http = reqwest::Client::new();
    let url = format!("{ingest_url}/v1/channels/{CHANNEL}/chat/messages");

    let cases: Vec<(String, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "unknown channel".into(),
            http.post(format!("{ingest_url}/v1/channels/nope/chat/messages"))
                .json(&serde_json::json!({"visitor_id": "v", "message_id": "m", "text": "hi"})),
            404,
            "unknown_channel",
        ),
        (
            "not json".into(),
            http.post(&url).header("content-type", "application/json").body("{not json"),
            400,
            "malformed_body",
        ),
        (
            "missing field".into(),
            http.post(&url).json(&serde_json::json!({"visitor_id": "v", "text": "hi"})),
            400,
            "malformed_body",
        ),
        (
            "unknown field".into(),
            http.post(&url).json(&serde_json::json!({"visitor_id": "v", "message_id": "m", "text": "hi", "extra": 1})),
            400,
            "malformed_body",
        ),
        (
            "empty text".into(),
            http.post(&url).json(&serde_json::json!({"visitor_id": "v", "message_id": "m", "text": " "})),
            400,
            "invalid_field",
        ),
        (
            "oversized".into(),
            http.post(&url)
                .header("content-type", "application/json")
                .body(format!("{{\"visitor_id\":\"v\",\"message_id\":\"m\",\"text\":\"{}\"}}", "x".repeat(100 * 1024))),
            413,
            "body_too_large",
        ),
    ];
    for (name, request, expected_status, expected_code) in cases {
        let response = request.send().await?;
        assert_eq!(response.status().as_u16(), expected_status, "{name}");
        let body: serde_json::Value = response.json().await?;
        assert_eq!(body["error"]["code"], expected_code, "{name}: {body}");
        assert!(!body["error"]["message"].as_str().unwrap_or_default().is_empty(), "{name}");
    }
    assert!(env.read_committed_events(&env.topics.inbound)?.is_empty(), "nothing rejected was published");

    let not_a_uuid =
        api.get_message(GetMessageRequest { message_id: "42".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(not_a_uuid.code(), tonic::Code::InvalidArgument);
    let missing = api
        .get_conversation(GetConversationRequest {
            conversation_id: uuid::Uuid::now_v7().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let bad_token = api
        .list_conversations(ListConversationsRequest { page_token: "forged".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(bad_token.code(), tonic::Code::InvalidArgument);
    assert!(bad_token.message().contains("page_token"));
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_unavailable_gets_503_with_retry_after() -> anyhow::Result<()> {
    let mut config = switchboard_runtime::config_store::ConfigSnapshot::default();
    let file = switchboard_api::config_file::ConfigFile::parse(switchboard_tests::DEMO_CONFIG)?;
    for payload in file.to_payloads(&config.clone())? {
        config.apply(&switchboard_runtime::envelope::new_root(&file.account_id, "k", chrono::Utc::now(), payload));
    }
    // A real producer pointed at a port where no broker listens.
    let settings = switchboard_ingest::IngestSettings {
        max_body_bytes: 64 * 1024,
        delivery_timeout: Duration::from_millis(1_500),
        ..switchboard_ingest::IngestSettings::new("127.0.0.1:0".parse()?, "127.0.0.1:1", "sb.inbound.v1")
    };
    let (bound_sender, bound) = tokio::sync::oneshot::channel();
    let store = switchboard_runtime::config_store::ConfigStore::fixed(config);
    tokio::spawn(switchboard_ingest::serve(settings, store, bound_sender, std::future::pending()));
    let address = bound.await?;
    let response = reqwest::Client::new()
        .post(format!("http://{address}/v1/channels/{CHANNEL}/chat/messages"))
        .json(&serde_json::json!({"visitor_id": "v", "message_id": "m", "text": "hi"}))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["error"]["code"], "log_unavailable");
    Ok(())
}

/// B6 / issue 5: how far the read models are is visible through the API, per partition: the
/// positions a command's position is compared with, and the live projector's lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b6_projection_positions_and_lag_are_served_by_the_api() -> anyhow::Result<()> {
    use switchboard_proto::api::v1::GetProjectionStatusRequest;
    use switchboard_proto::api::v1::workspace_service_client::WorkspaceServiceClient;

    let env = TestEnv::new().await?;
    let mut pipeline = env.start_pipeline().await?;
    let accepted = post_chat(&pipeline.http, &pipeline.ingest_url, CHANNEL, "zoe", "zoe-1", "Status?").await?;
    wait_visible(&mut pipeline.api, &accepted.message_id, VISIBLE_WITHIN).await?;

    let url = env.start_api_server().await?;
    let channel = tonic::transport::Channel::from_shared(url)?.connect().await?;
    let token = switchboard_tests::BearerToken::for_identity(&switchboard_tests::demo_admin())?;
    let mut workspace = WorkspaceServiceClient::with_interceptor(channel, token);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = workspace.get_projection_status(GetProjectionStatusRequest {}).await?.into_inner();
        // The projector measures lag about once a second; wait for its first measurement.
        if status.lag.iter().any(|progress| progress.topic == "conversations.v1") {
            break status;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no lag measurement served: {status:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status.active_schema, "public");
    let applied_inbound: i64 = status
        .positions
        .iter()
        .filter(|progress| progress.topic == "inbound.v1")
        .map(|progress| progress.next_offset)
        .sum();
    assert!(applied_inbound >= 1, "the message's inbound position is reflected: {status:?}");
    assert!(status.positions.iter().any(|progress| progress.topic == "conversations.v1" && progress.next_offset > 0));
    for progress in status.lag.iter().filter(|progress| progress.topic == "conversations.v1") {
        assert_eq!(progress.lag, progress.end_offset - progress.next_offset);
        assert!(progress.lag >= 0);
        assert!(progress.measured_at.is_some());
    }
    env.cleanup().await;
    Ok(())
}
