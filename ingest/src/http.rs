//! The HTTP edge of ingest: routes, request decoding, and the server lifecycle.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde_json::json;
use switchboard_runtime::config_store::ConfigStore;
use switchboard_runtime::telemetry::trace_id_of;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::chat::{self, ChatMessageRequest};
use crate::error::IngestError;
use crate::publisher::Publisher;

#[derive(Debug, Clone)]
pub struct IngestSettings {
    pub listen: SocketAddr,
    pub brokers: String,
    pub inbound_topic: String,
    /// Requests with a larger body get 413.
    pub max_body_bytes: usize,
    /// How long to wait for Kafka's acknowledgement before answering 503.
    pub delivery_timeout: Duration,
}

/// Counters exposed at `/metrics` (Prometheus text format).
#[derive(Default)]
struct Counters {
    received: AtomicU64,
    accepted: AtomicU64,
    rejected_client: AtomicU64,
    rejected_unavailable: AtomicU64,
}

#[derive(Clone)]
struct AppState {
    config: ConfigStore,
    publisher: Publisher,
    counters: Arc<Counters>,
    max_body_bytes: usize,
}

pub fn app(config: ConfigStore, publisher: Publisher, max_body_bytes: usize) -> Router {
    let state = AppState { config, publisher, counters: Arc::default(), max_body_bytes };
    Router::new()
        .route("/v1/channels/{channel_id}/chat/messages", post(post_chat_message))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            (StatusCode::NOT_FOUND, Json(json!({"error": {"code": "no_such_route", "message": "no such endpoint"}})))
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Binds and serves until `shutdown` resolves. Returns the bound address through `bound`.
pub async fn serve(
    settings: IngestSettings,
    config: ConfigStore,
    bound: tokio::sync::oneshot::Sender<SocketAddr>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let publisher = Publisher::new(&settings.brokers, &settings.inbound_topic, settings.delivery_timeout)?;
    let listener =
        TcpListener::bind(settings.listen).await.with_context(|| format!("failed to bind {}", settings.listen))?;
    let local_addr = listener.local_addr()?;
    tracing::info!(%local_addr, "ingest listening");
    let _ = bound.send(local_addr);
    axum::serve(listener, app(config, publisher, settings.max_body_bytes))
        .with_graceful_shutdown(shutdown)
        .await
        .context("ingest server failed")
}

async fn post_chat_message(
    State(state): State<AppState>,
    Path(channel_id): Path<String>,
    body: Result<Json<ChatMessageRequest>, JsonRejection>,
) -> Result<impl IntoResponse, IngestError> {
    let span = tracing::info_span!("ingest_chat_message", %channel_id, event_id = tracing::field::Empty);
    async move {
        state.counters.received.fetch_add(1, Ordering::Relaxed);
        let result = accept_chat_message(&state, &channel_id, body).await;
        match &result {
            Ok(_) => state.counters.accepted.fetch_add(1, Ordering::Relaxed),
            Err(IngestError::LogUnavailable(_)) => state.counters.rejected_unavailable.fetch_add(1, Ordering::Relaxed),
            Err(error) => {
                tracing::info!(reason = error.code(), %error, "chat message rejected");
                state.counters.rejected_client.fetch_add(1, Ordering::Relaxed)
            }
        };
        result
    }
    .instrument(span)
    .await
}

async fn accept_chat_message(
    state: &AppState,
    channel_id: &str,
    body: Result<Json<ChatMessageRequest>, JsonRejection>,
) -> Result<impl IntoResponse + use<>, IngestError> {
    let Json(request) = body.map_err(|rejection| match rejection {
        JsonRejection::BytesRejection(_) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            IngestError::BodyTooLarge { limit_bytes: state.max_body_bytes }
        }
        other => IngestError::MalformedBody(other.body_text()),
    })?;
    let event = chat::to_inbound_event(&state.config.snapshot(), channel_id, request, Utc::now())?;
    tracing::Span::current().record("event_id", event.event_id.as_str());
    let position = state.publisher.publish(&event).await.map_err(IngestError::LogUnavailable)?;
    let message_id = match &event.payload {
        Some(switchboard_proto::events::v1::envelope::Payload::InboundMessageReceived(inbound)) => {
            inbound.message_id.clone()
        }
        _ => String::new(),
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "message_id": message_id,
            "event_id": event.event_id,
            "trace_id": trace_id_of(&tracing::Span::current()),
            "position": position,
        })),
    ))
}

async fn metrics(State(state): State<AppState>) -> String {
    let counters = &state.counters;
    format!(
        "# TYPE switchboard_ingest_received_total counter\n\
         switchboard_ingest_received_total{{channel_type=\"chat\"}} {}\n\
         # TYPE switchboard_ingest_accepted_total counter\n\
         switchboard_ingest_accepted_total{{channel_type=\"chat\"}} {}\n\
         # TYPE switchboard_ingest_rejected_total counter\n\
         switchboard_ingest_rejected_total{{channel_type=\"chat\",reason=\"client_error\"}} {}\n\
         switchboard_ingest_rejected_total{{channel_type=\"chat\",reason=\"log_unavailable\"}} {}\n",
        counters.received.load(Ordering::Relaxed),
        counters.accepted.load(Ordering::Relaxed),
        counters.rejected_client.load(Ordering::Relaxed),
        counters.rejected_unavailable.load(Ordering::Relaxed),
    )
}
