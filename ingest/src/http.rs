//! The HTTP edge of ingest: routes, body limits, signatures, and the server lifecycle. Each
//! handler hands the raw request to its channel module (pure: bytes in, events out) and the
//! events to [`Intake`], and answers only after Kafka acknowledged them.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt as _;
use axum::{Json, Router};
use chrono::Utc;
use serde_json::json;
use switchboard_runtime::config_store::ConfigStore;
use switchboard_runtime::publisher::{EnvelopePublisher, LogPosition};
use switchboard_runtime::telemetry::trace_id_of;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::chat_stream::{ChatReplies, ChatStreamSettings, Recipient};
use crate::error::IngestError;
use crate::intake::{Intake, Published};
use crate::secrets::Secrets;
use crate::workload::{WorkloadCache, WorkloadSettings};
use crate::{calls, channel, chat, chat_stream, custom, email, forms, meta, smtp, widget, workload};

#[derive(Debug, Clone)]
pub struct IngestSettings {
    pub listen: SocketAddr,
    pub brokers: String,
    pub inbound_topic: String,
    /// Requests with a larger body get 413.
    pub max_body_bytes: usize,
    /// How long to wait for Kafka's acknowledgement before answering 503.
    pub delivery_timeout: Duration,
    /// The SMTP listener's address; `None` runs HTTP only.
    pub smtp_listen: Option<SocketAddr>,
    /// Largest mail the SMTP listener accepts (advertised as SIZE; larger → 552).
    pub smtp_max_message_bytes: usize,
    /// Channel secrets (Meta app secrets, custom-channel keys).
    pub secrets: Secrets,
    /// How many recently published ids to remember for skipping retries (B1).
    pub recently_published_capacity: usize,
    /// Where to read open-conversation counts for the chat widget's at-capacity answer (C5);
    /// `None`: the widget answers from channel settings alone (`"capacity": "not_configured"`).
    pub workload_opt: Option<WorkloadSettings>,
    /// Where the chat widget's reply stream reads `delivery.chat_messages` (C5); `None`: the
    /// stream answers 503.
    pub chat_stream_opt: Option<ChatStreamSettings>,
}

impl IngestSettings {
    /// Settings with the defaults the binary uses for everything but where to listen and
    /// which broker and topic to publish to.
    pub fn new(listen: SocketAddr, brokers: &str, inbound_topic: &str) -> Self {
        IngestSettings {
            listen,
            brokers: brokers.to_owned(),
            inbound_topic: inbound_topic.to_owned(),
            max_body_bytes: 1024 * 1024,
            delivery_timeout: Duration::from_secs(10),
            smtp_listen: None,
            smtp_max_message_bytes: 25 * 1024 * 1024,
            secrets: Secrets::default(),
            recently_published_capacity: 100_000,
            workload_opt: None,
            chat_stream_opt: None,
        }
    }
}

/// Where the servers listen (port 0 in the settings resolves to these).
#[derive(Debug, Clone, Copy)]
pub struct BoundAddresses {
    pub http: SocketAddr,
    pub smtp: Option<SocketAddr>,
}

#[derive(Clone)]
pub struct AppState {
    pub config: ConfigStore,
    pub intake: Intake,
    pub secrets: Arc<Secrets>,
    pub max_body_bytes: usize,
    /// Open-conversation counts for the chat widget (refreshed in the background).
    pub workload: WorkloadCache,
    /// The chat reply stream's reads and live wake-ups (C5); `None` without a database.
    pub chat_replies_opt: Option<ChatReplies>,
}

pub fn app(state: AppState) -> Router {
    let max_body_bytes = state.max_body_bytes;
    Router::new()
        .route("/v1/channels/{channel_id}/chat/messages", post(post_chat_message))
        .route("/v1/channels/{channel_id}/chat/widget", get(get_chat_widget))
        .route("/v1/channels/{channel_id}/chat/visitors/{visitor_id}/events", get(get_chat_events))
        .route("/v1/email/inbound", post(post_email))
        .route("/v1/webhooks/messenger", get(verify_messenger).post(post_messenger))
        .route("/v1/webhooks/whatsapp", get(verify_whatsapp).post(post_whatsapp))
        .route("/v1/channels/{channel_id}/forms/submissions", post(post_form_submission))
        .route("/v1/channels/{channel_id}/calls/events", post(post_call_event))
        .route("/v1/channels/{channel_id}/custom/messages", post(post_custom_message))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            (StatusCode::NOT_FOUND, Json(json!({"error": {"code": "no_such_route", "message": "no such endpoint"}})))
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Binds and serves until `shutdown` resolves. Returns the bound HTTP address through `bound`.
pub async fn serve(
    settings: IngestSettings,
    config: ConfigStore,
    bound: tokio::sync::oneshot::Sender<SocketAddr>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (all_bound, addresses) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Ok(addresses) = addresses.await {
            let addresses: BoundAddresses = addresses;
            let _ = bound.send(addresses.http);
        }
    });
    serve_all(settings, config, all_bound, shutdown).await
}

/// Binds HTTP (and SMTP when configured) and serves both until `shutdown` resolves.
pub async fn serve_all(
    settings: IngestSettings,
    config: ConfigStore,
    bound: tokio::sync::oneshot::Sender<BoundAddresses>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let publisher = EnvelopePublisher::new(&settings.brokers, "switchboard-ingest", settings.delivery_timeout)?;
    let intake = Intake::new(publisher, &settings.inbound_topic, settings.recently_published_capacity);
    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    let workload = match &settings.workload_opt {
        Some(workload_settings) => workload::spawn_refresher(workload_settings, stop.clone())?,
        None => WorkloadCache::not_configured(),
    };
    let chat_replies_opt = match &settings.chat_stream_opt {
        Some(chat_stream_settings) => Some(chat_stream::start(chat_stream_settings, stop.clone())?),
        None => None,
    };
    let state = AppState {
        config: config.clone(),
        intake: intake.clone(),
        secrets: Arc::new(settings.secrets.clone()),
        max_body_bytes: settings.max_body_bytes,
        workload,
        chat_replies_opt,
    };
    let listener =
        TcpListener::bind(settings.listen).await.with_context(|| format!("failed to bind {}", settings.listen))?;
    let http_address = listener.local_addr()?;
    let smtp_address = match settings.smtp_listen {
        Some(smtp_listen) => {
            let smtp_listener =
                TcpListener::bind(smtp_listen).await.with_context(|| format!("failed to bind smtp {smtp_listen}"))?;
            let smtp_address = smtp_listener.local_addr()?;
            let smtp_settings =
                smtp::SmtpSettings { max_message_bytes: settings.smtp_max_message_bytes, ..Default::default() };
            let mut smtp_stop = stop.clone();
            tokio::spawn(smtp::serve(smtp_listener, smtp_settings, config, intake, async move {
                let _ = smtp_stop.wait_for(|stopped| *stopped).await;
            }));
            Some(smtp_address)
        }
        None => None,
    };
    tracing::info!(%http_address, smtp_address = ?smtp_address, "ingest listening");
    let _ = bound.send(BoundAddresses { http: http_address, smtp: smtp_address });
    let configured_listener = listener.tap_io(|stream| switchboard_runtime::tcp::configure_accepted_connection(stream));
    let result = axum::serve(configured_listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
        .context("ingest server failed");
    let _ = stop_sender.send(true);
    result
}

/// Counts the request, runs it in a span, and turns a failure into its HTTP answer (and a
/// rejected-by-reason count).
async fn instrumented(
    state: &AppState,
    channel_type: &'static str,
    span: tracing::Span,
    work: impl Future<Output = Result<Response, IngestError>>,
) -> Response {
    async move {
        state.intake.metrics.received(channel_type);
        match work.await {
            Ok(response) => response,
            Err(error) => {
                state.intake.metrics.rejected(channel_type, error.code());
                if !matches!(error, IngestError::LogUnavailable(_)) {
                    tracing::info!(reason = error.code(), %error, "request rejected");
                }
                error.into_response()
            }
        }
    }
    .instrument(span)
    .await
}

fn body_bytes(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, IngestError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            IngestError::BodyTooLarge { limit_bytes: state.max_body_bytes }
        } else {
            IngestError::MalformedBody(rejection.body_text())
        }
    })
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// The success answer's body: the first event's ids at the top level (single-message
/// channels), every event in `events`.
#[derive(serde::Serialize)]
struct AcceptedBody<'p> {
    message_id: &'p str,
    event_id: &'p str,
    position: Option<LogPosition>,
    duplicate: bool,
    trace_id: String,
    events: &'p [Published],
}

/// The success answer. Serialized straight from [`AcceptedBody`] (not through a
/// `serde_json::Value` tree): this runs once per accepted request.
fn accepted(status: StatusCode, published: &[Published]) -> Response {
    let first = published.first();
    let body = AcceptedBody {
        message_id: first.map(|p| p.id.as_str()).unwrap_or_default(),
        event_id: first.map(|p| p.event_id.as_str()).unwrap_or_default(),
        position: first.map(|p| p.position),
        duplicate: first.is_some_and(|p| p.duplicate),
        trace_id: trace_id_of(&tracing::Span::current()),
        events: published,
    };
    (status, Json(body)).into_response()
}

async fn post_chat_message(
    State(state): State<AppState>,
    Path(channel_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = tracing::info_span!("ingest_chat_message", %channel_id);
    instrumented(&state, "chat", span, async {
        let body = body_bytes(&state, body)?;
        let request: chat::ChatMessageRequest =
            serde_json::from_slice(&body).map_err(|error| IngestError::MalformedBody(error.to_string()))?;
        let event = chat::to_inbound_event(&state.config.snapshot(), &channel_id, request, Utc::now())?;
        let published = state.intake.publish_all("chat", vec![event]).await?;
        Ok(accepted(StatusCode::ACCEPTED, &published))
    })
    .await
}

async fn get_chat_widget(State(state): State<AppState>, Path(channel_id): Path<String>) -> Response {
    let span = tracing::info_span!("ingest_chat_widget", %channel_id);
    instrumented(&state, "chat_widget", span, async {
        // The counts come from the background refresh; no database round trip here.
        let knowledge = state.workload.knowledge(std::time::Instant::now());
        let shown = widget::widget_state(&state.config.snapshot(), &channel_id, Utc::now(), &knowledge)?;
        state.intake.metrics.widget_answer(shown.state, shown.capacity.label());
        Ok(Json(shown).into_response())
    })
    .await
}

/// `?after=<seq>` of the chat reply stream.
#[derive(Debug, serde::Deserialize)]
struct ChatEventsQuery {
    #[serde(default)]
    after: Option<String>,
}

/// C5: the visitor's replies as server-sent events (see [`chat_stream`]). The channel and its
/// account are resolved from the address as for the chat POST.
async fn get_chat_events(
    State(state): State<AppState>,
    Path((channel_id, visitor_id)): Path<(String, String)>,
    Query(query): Query<ChatEventsQuery>,
    headers: HeaderMap,
) -> Response {
    let span = tracing::info_span!("ingest_chat_events", %channel_id);
    instrumented(&state, "chat_stream", span, async {
        let snapshot = state.config.snapshot();
        let channel = channel::resolve(&snapshot, &channel_id, switchboard_proto::events::v1::ChannelType::Chat)
            .map_err(|error| match error {
                // The address exists but has no chat to stream: a wrong request, not a missing one.
                IngestError::WrongChannelType { .. } => {
                    IngestError::InvalidField { field: "channel_id", problem: error.to_string() }
                }
                other => other,
            })?;
        channel::require_id("visitor_id", &visitor_id)?;
        let after_seq = chat_stream::resume_after(header_str(&headers, "last-event-id"), query.after.as_deref())?;
        let Some(replies) = &state.chat_replies_opt else { return Err(IngestError::ChatStreamNotConfigured) };
        let recipient = Recipient {
            account_id: channel.account_id.clone(),
            channel_id: channel.entity.channel_id.clone(),
            visitor_id,
        };
        Ok(replies.stream(recipient, after_seq).into_response())
    })
    .await
}

async fn post_email(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = tracing::info_span!("ingest_email_http");
    instrumented(&state, "team_email", span, async {
        let content_type = header_str(&headers, header::CONTENT_TYPE.as_str()).unwrap_or("message/rfc822");
        let media_type = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        if !matches!(media_type.as_str(), "message/rfc822" | "text/plain" | "application/octet-stream") {
            return Err(IngestError::UnsupportedMediaType(media_type));
        }
        let body = body_bytes(&state, body)?;
        let events = email::to_inbound_events(&state.config.snapshot(), &body, &[], Utc::now())?;
        let published = state.intake.publish_all("team_email", events).await?;
        Ok(accepted(StatusCode::ACCEPTED, &published))
    })
    .await
}

async fn verify_messenger(State(state): State<AppState>, Query(query): Query<meta::HandshakeQuery>) -> Response {
    let span = tracing::info_span!("ingest_messenger_handshake");
    instrumented(&state, "facebook_messenger", span, async {
        let challenge =
            meta::verify_handshake(&state.config.snapshot(), &state.secrets, meta::MetaProduct::Messenger, &query)?;
        Ok(challenge.into_response())
    })
    .await
}

async fn verify_whatsapp(State(state): State<AppState>, Query(query): Query<meta::HandshakeQuery>) -> Response {
    let span = tracing::info_span!("ingest_whatsapp_handshake");
    instrumented(&state, "whatsapp", span, async {
        let challenge =
            meta::verify_handshake(&state.config.snapshot(), &state.secrets, meta::MetaProduct::WhatsApp, &query)?;
        Ok(challenge.into_response())
    })
    .await
}

async fn post_messenger(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = tracing::info_span!("ingest_messenger_webhook");
    instrumented(&state, "facebook_messenger", span, async {
        let body = body_bytes(&state, body)?;
        let signature = header_str(&headers, "x-hub-signature-256");
        let events =
            crate::messenger::to_events(&state.config.snapshot(), &state.secrets, signature, &body, Utc::now())?;
        let published = state.intake.publish_all("facebook_messenger", events).await?;
        // Meta expects 200 for a delivered webhook; anything else is retried.
        Ok(accepted(StatusCode::OK, &published))
    })
    .await
}

async fn post_whatsapp(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = tracing::info_span!("ingest_whatsapp_webhook");
    instrumented(&state, "whatsapp", span, async {
        let body = body_bytes(&state, body)?;
        let signature = header_str(&headers, "x-hub-signature-256");
        let events =
            crate::whatsapp::to_events(&state.config.snapshot(), &state.secrets, signature, &body, Utc::now())?;
        let published = state.intake.publish_all("whatsapp", events).await?;
        Ok(accepted(StatusCode::OK, &published))
    })
    .await
}

async fn post_form_submission(
    State(state): State<AppState>,
    Path(channel_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = tracing::info_span!("ingest_form_submission", %channel_id);
    instrumented(&state, "forms", span, async {
        let body = body_bytes(&state, body)?;
        let event = forms::to_inbound_event(&state.config.snapshot(), &channel_id, &body, Utc::now())?;
        let published = state.intake.publish_all("forms", vec![event]).await?;
        Ok(accepted(StatusCode::ACCEPTED, &published))
    })
    .await
}

async fn post_call_event(
    State(state): State<AppState>,
    Path(channel_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = tracing::info_span!("ingest_call_event", %channel_id);
    instrumented(&state, "calling", span, async {
        let body = body_bytes(&state, body)?;
        let event = calls::to_inbound_event(&state.config.snapshot(), &channel_id, &body, Utc::now())?;
        let published = state.intake.publish_all("calling", vec![event]).await?;
        Ok(accepted(StatusCode::ACCEPTED, &published))
    })
    .await
}

async fn post_custom_message(
    State(state): State<AppState>,
    Path(channel_id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = tracing::info_span!("ingest_custom_message", %channel_id);
    instrumented(&state, "custom", span, async {
        let body = body_bytes(&state, body)?;
        let signed = custom::SignedRequest {
            timestamp: header_str(&headers, "x-switchboard-timestamp"),
            signature: header_str(&headers, "x-switchboard-signature"),
            body: &body,
        };
        let event =
            custom::to_inbound_event(&state.config.snapshot(), &state.secrets, &channel_id, signed, Utc::now())?;
        let published = state.intake.publish_all("custom", vec![event]).await?;
        Ok(accepted(StatusCode::ACCEPTED, &published))
    })
    .await
}

async fn metrics(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    let mut text = state.intake.metrics.render();
    state.workload.render_metrics(&mut text, std::time::Instant::now());
    switchboard_runtime::metrics_http::metrics_response(text)
}
