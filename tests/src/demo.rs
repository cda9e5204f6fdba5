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
