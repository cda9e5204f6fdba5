//! A client-side load: chat visitors writing in over HTTP, with each message's end-to-end
//! latency measured from ingest's 202 to the message being visible through the gRPC API.
//! Used by the demo (`demo-load`) and by the end-to-end tests.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use switchboard_proto::api::v1::{GetConversationRequest, GetMessageRequest, Message};

/// Ingest's answer to an accepted message.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub message_id: String,
    pub trace_id: String,
}

/// Posts one chat message; returns ingest's answer, or the status and body of a refusal.
pub async fn post_chat(
    http: &reqwest::Client,
    ingest_url: &str,
    channel_id: &str,
    visitor_id: &str,
    provider_message_id: &str,
    text: &str,
) -> anyhow::Result<Accepted> {
    let response = http
        .post(format!("{ingest_url}/v1/channels/{channel_id}/chat/messages"))
        .json(&json!({ "visitor_id": visitor_id, "message_id": provider_message_id, "text": text, "visitor_name": visitor_id }))
        .send()
        .await
        .context("ingest request failed")?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.context("ingest answered no JSON")?;
    if status != reqwest::StatusCode::ACCEPTED {
        bail!("ingest refused the message: {status} {body}");
    }
    Ok(Accepted {
        message_id: body["message_id"].as_str().unwrap_or_default().to_owned(),
        trace_id: body["trace_id"].as_str().unwrap_or_default().to_owned(),
    })
}

/// Polls `GetMessage` until the message is visible through the API.
pub async fn wait_visible(api: &mut crate::ApiClient, message_id: &str, timeout: Duration) -> anyhow::Result<Message> {
    let deadline = Instant::now() + timeout;
    loop {
        match api.get_message(GetMessageRequest { message_id: message_id.to_owned(), ..Default::default() }).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if status.code() == tonic::Code::NotFound && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            Err(status) => bail!("message {message_id} not visible: {status}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub channel_id: String,
    pub messages: usize,
    pub visitors: usize,
    /// Visitors writing at the same time.
    pub concurrency: usize,
    /// Makes visitor and message ids unique to this run.
    pub run_id: String,
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub accepted: usize,
    /// Accepted → visible through the API, per message.
    pub latencies: Vec<Duration>,
    pub conversation_ids: BTreeSet<String>,
    pub elapsed: Duration,
}

/// Sends `spec.messages` messages from `spec.visitors` visitors (each visitor's messages in
/// order) and waits until every accepted message is visible through the API.
pub async fn run_load(ingest_url: &str, api: crate::ApiClient, spec: &LoadSpec) -> anyhow::Result<LoadReport> {
    let http = reqwest::Client::new();
    let started = Instant::now();
    let permits = Arc::new(tokio::sync::Semaphore::new(spec.concurrency.max(1)));
    let mut visitor_tasks = tokio::task::JoinSet::new();
    for visitor_index in 0..spec.visitors {
        let message_count = spec.messages / spec.visitors + usize::from(visitor_index < spec.messages % spec.visitors);
        let (http, api, permits, spec, ingest_url) =
            (http.clone(), api.clone(), permits.clone(), spec.clone(), ingest_url.to_owned());
        visitor_tasks.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let visitor_id = format!("{}-visitor-{visitor_index}", spec.run_id);
            let mut visibility = tokio::task::JoinSet::new();
            for message_index in 0..message_count {
                let provider_message_id = format!("{visitor_id}-m{message_index}");
                let text = format!("Hello, this is message {message_index} from visitor {visitor_index}");
                let accepted =
                    post_chat(&http, &ingest_url, &spec.channel_id, &visitor_id, &provider_message_id, &text).await?;
                let accepted_at = Instant::now();
                let mut api = api.clone();
                visibility.spawn(async move {
                    let message = wait_visible(&mut api, &accepted.message_id, Duration::from_secs(120)).await?;
                    anyhow::Ok((accepted_at.elapsed(), message.conversation_id))
                });
            }
            let mut outcomes = Vec::new();
            while let Some(outcome) = visibility.join_next().await {
                outcomes.push(outcome??);
            }
            anyhow::Ok(outcomes)
        });
    }
    let mut report = LoadReport::default();
    while let Some(outcome) = visitor_tasks.join_next().await {
        for (latency, conversation_id) in outcome?? {
            report.accepted += 1;
            report.latencies.push(latency);
            report.conversation_ids.insert(conversation_id);
        }
    }
    report.elapsed = started.elapsed();
    report.latencies.sort();
    Ok(report)
}

/// The p-th percentile (0..=100) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// What the API says about a set of conversations.
#[derive(Debug, Default)]
pub struct ConversationSummary {
    pub conversations: usize,
    pub messages: usize,
    pub per_assignee: BTreeMap<String, usize>,
    pub unassigned: usize,
}

pub async fn summarize(
    api: &mut crate::ApiClient,
    conversation_ids: &BTreeSet<String>,
) -> anyhow::Result<ConversationSummary> {
    let mut summary = ConversationSummary::default();
    for conversation_id in conversation_ids {
        let response = api
            .get_conversation(GetConversationRequest { conversation_id: conversation_id.clone(), ..Default::default() })
            .await?
            .into_inner();
        let conversation = response.conversation.context("conversation missing from response")?;
        summary.conversations += 1;
        summary.messages += response.messages.len();
        if conversation.assignee_id.is_empty() {
            summary.unassigned += 1;
        } else {
            *summary.per_assignee.entry(conversation.assignee_id).or_default() += 1;
        }
    }
    Ok(summary)
}

/// What became of an agent's reply the demo sent (O5), as the API shows it.
#[derive(Debug, Clone)]
pub struct ReplyOutcome {
    pub conversation_id: String,
    pub channel_id: String,
    pub agent_id: String,
    pub reply_id: String,
    /// "sent", "delivered", "read" or "failed" (or "queued" if the wait ran out).
    pub delivery_state: String,
    /// The email's Message-ID, the chat row's id, ...
    pub provider_message_id: String,
    pub failure_reason: String,
}

/// The first conversation on `channel_id` (optionally from `contact_external_id`) once the API
/// shows it.
pub async fn wait_for_conversation(
    api: &mut crate::ApiClient,
    channel_id: &str,
    contact_external_id_opt: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let listed = api
            .list_conversations(switchboard_proto::api::v1::ListConversationsRequest {
                channel_id: channel_id.to_owned(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let found = listed.conversations.into_iter().find(|conversation| {
            contact_external_id_opt.is_none_or(|contact| conversation.contact_external_id == contact)
        });
        if let Some(conversation) = found {
            return Ok(conversation.id);
        }
        if Instant::now() > deadline {
            bail!("no conversation on {channel_id} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `text` through `SendReply` in `conversation_id` as its assignee (a JWT signed with
/// `jwt_secret`; the first of `fallback_agent_id` when nobody is assigned), then follows the
/// reply until the delivery service settled it (any state but `queued`) or `timeout` passed.
pub async fn reply_and_follow(
    api: &mut crate::ApiClient,
    api_url: &str,
    jwt_secret: &str,
    conversation_id: &str,
    fallback_agent_id: &str,
    text: &str,
    timeout: Duration,
) -> anyhow::Result<ReplyOutcome> {
    use switchboard_proto::api::v1::admin_service_client::AdminServiceClient;
    let conversation = api
        .get_conversation(GetConversationRequest { conversation_id: conversation_id.to_owned(), ..Default::default() })
        .await?
        .into_inner()
        .conversation
        .context("conversation missing from response")?;
    let agent_id =
        if conversation.assignee_id.is_empty() { fallback_agent_id.to_owned() } else { conversation.assignee_id };
    let identity = switchboard_api::auth::Identity {
        user_id: agent_id.clone(),
        account_id: crate::demo_admin().account_id,
        role: switchboard_api::auth::Role::Agent,
        team_ids: Vec::new(),
    };
    let token = switchboard_api::auth::mint_token(jwt_secret.as_bytes(), &identity, Duration::from_secs(600))?;
    let channel = crate::connect_channel(api_url).await?;
    let mut admin = AdminServiceClient::with_interceptor(channel, crate::BearerToken::new(&token)?);
    let accepted = admin
        .send_reply(switchboard_proto::api::v1::SendReplyRequest {
            request_id: uuid::Uuid::now_v7().to_string(),
            conversation_id: conversation_id.to_owned(),
            text: text.to_owned(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("SendReply as {agent_id} in {conversation_id}"))?
        .into_inner();
    let deadline = Instant::now() + timeout;
    loop {
        let response = api
            .get_conversation(GetConversationRequest {
                conversation_id: conversation_id.to_owned(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let shown = response.messages.into_iter().find(|message| message.id == accepted.reply_id);
        let state = shown.as_ref().map(|message| message.delivery_state.clone()).unwrap_or_default();
        let settled = !state.is_empty() && state != "queued";
        if settled || Instant::now() > deadline {
            let message = shown.unwrap_or_default();
            return Ok(ReplyOutcome {
                conversation_id: conversation_id.to_owned(),
                channel_id: conversation.channel_id,
                agent_id,
                reply_id: accepted.reply_id,
                delivery_state: if state.is_empty() { "not yet visible".to_owned() } else { state },
                provider_message_id: message.provider_message_id,
                failure_reason: message.failure_reason,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
