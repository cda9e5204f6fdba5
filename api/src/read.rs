//! Access to the read models: the active schema (B4 schema switching), read transactions in it,
//! the change notifications that wake watch streams, and waiting for a position (B6).
//!
//! Contract (docs/contracts.md): `public.read_model_control` names the active schema (no row
//! means `public`); a switch is announced with `NOTIFY read_model_switch`. The active schema is
//! cached and refreshed on notification and at least once a second. Instead of a transaction
//! with `SET LOCAL search_path` per request (two extra round trips), reads use a connection
//! pool per schema whose connections start with that `search_path`: the same isolation of
//! schemas, at no per-request cost (this is what keeps p99 within budget under load).

use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::Context;
use backon::{ConstantBuilder, ExponentialBuilder, Retryable};
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Postgres};
use switchboard_runtime::read_models::active_schema;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use crate::error::ApiError;
use crate::position::{Position, projection_of};

/// Channel the projector notifies (payload: inbox id) when it appends conversation changes.
pub const CHANGES_CHANNEL: &str = "conversation_changes";
/// Channel notified when replay switches the active read-model schema.
pub const SWITCH_CHANNEL: &str = "read_model_switch";

/// How long a query without a client deadline waits for `min_position` before UNAVAILABLE.
pub const DEFAULT_POSITION_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct ReadModels {
    pool: PgPool,
    schema: watch::Receiver<Arc<str>>,
    /// Connection pools whose sessions have `search_path` set to the keyed schema.
    schema_pools: Arc<Mutex<HashMap<Arc<str>, PgPool>>>,
    /// Inbox ids of conversation changes, as notified; lagging receivers just re-query.
    changes: broadcast::Sender<Arc<str>>,
}

impl ReadModels {
    /// Reads the active schema and starts the notification listener (until `shutdown`).
    pub async fn start(pool: PgPool, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<ReadModels> {
        let initial = load_active_schema(&pool).await?;
        let (schema_sender, schema) = watch::channel(initial);
        let (changes, _) = broadcast::channel(1024);
        let read_models =
            ReadModels { pool: pool.clone(), schema, schema_pools: Arc::default(), changes: changes.clone() };
        tokio::spawn(async move {
            tokio::select! {
                () = follow_notifications(pool, schema_sender, changes) => {}
                _ = shutdown.wait_for(|stopped| *stopped) => {}
            }
        });
        Ok(read_models)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn active_schema(&self) -> Arc<str> {
        self.schema.borrow().clone()
    }

    /// A connection reading the active schema. Statements run in autocommit: each sees
    /// everything committed before it (the projector commits a batch's rows together).
    pub async fn connection(&self) -> Result<PoolConnection<Postgres>, ApiError> {
        Ok(self.schema_pool(&self.active_schema()).acquire().await?)
    }

    fn schema_pool(&self, schema: &Arc<str>) -> PgPool {
        let mut pools = self.schema_pools.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(pool) = pools.get(schema) {
            return pool.clone();
        }
        // Pools of schemas no longer active drain and close; connections in use finish first.
        for (_, stale) in pools.drain() {
            tokio::spawn(async move { stale.close().await });
        }
        let options = (*self.pool.connect_options()).clone().options([("search_path", quote_identifier(schema))]);
        let pool = self.pool.options().clone().connect_lazy_with(options);
        pools.insert(schema.clone(), pool.clone());
        pool
    }

    pub fn subscribe_changes(&self) -> broadcast::Receiver<Arc<str>> {
        self.changes.subscribe()
    }

    /// Waits until every position is reflected in the read models (B6), polling
    /// `projector_positions` of the active schema until `wait.until`.
    pub async fn wait_for_positions(&self, positions: &[Position], wait: PositionWait) -> Result<(), ApiError> {
        for position in positions {
            (|| self.check_position(position))
                .retry(POSITION_POLL)
                .adjust(|outcome, pause_opt| match outcome {
                    // Poll again only if the next poll still comes before the deadline.
                    PositionCheck::Behind { .. } => pause_opt.filter(|pause| Instant::now() + *pause < wait.until),
                    PositionCheck::Failed(_) => None,
                })
                .await
                .map_err(|outcome| outcome.into_error(position, wait))?;
        }
        Ok(())
    }

    /// One look at whether the read models reached `position`.
    async fn check_position(&self, position: &Position) -> Result<(), PositionCheck> {
        let schema = self.active_schema();
        let next_offset_opt: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT next_offset FROM {}.projector_positions WHERE projection = $1 AND topic = $2 AND partition = $3",
            quote_identifier(&schema)
        ))
        .bind(projection_of(&position.topic))
        .bind(&position.topic)
        .bind(position.partition)
        .fetch_optional(&self.pool)
        .await
        .map_err(|error| PositionCheck::Failed(error.into()))?;
        if next_offset_opt.is_some_and(|next_offset| next_offset > position.offset) {
            Ok(())
        } else {
            Err(PositionCheck::Behind { next_offset_opt })
        }
    }
}

/// How `wait_for_positions` polls: 2 ms, doubling up to 20 ms, until the deadline.
const POSITION_POLL: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(2))
    .with_max_delay(Duration::from_millis(20))
    .with_factor(2.0)
    .without_max_times();

/// How the notification listener reconnects: every second, for ever.
const LISTENER_RECONNECT: ConstantBuilder =
    ConstantBuilder::new().with_delay(Duration::from_secs(1)).without_max_times();

/// Why a position is not (yet) confirmed.
enum PositionCheck {
    /// The read models are behind it (`next_offset_opt`: where they are; none: nothing yet).
    Behind { next_offset_opt: Option<i64> },
    /// The database could not be asked: not retried.
    Failed(ApiError),
}

impl PositionCheck {
    fn into_error(self, position: &Position, wait: PositionWait) -> ApiError {
        match self {
            PositionCheck::Behind { next_offset_opt } => {
                let message = format!(
                    "read models have not reached position {position} yet (at {}); retry later",
                    next_offset_opt.map_or_else(|| "nothing".to_owned(), |next| format!("offset {}", next - 1))
                );
                if wait.client_deadline { ApiError::DeadlineExceeded(message) } else { ApiError::Unavailable(message) }
            }
            PositionCheck::Failed(error) => error,
        }
    }
}

/// How long a query may wait for its `min_position`.
#[derive(Debug, Clone, Copy)]
pub struct PositionWait {
    pub until: Instant,
    /// True when the client set a deadline (DEADLINE_EXCEEDED when it passes); otherwise the
    /// server's bound applies (UNAVAILABLE: the read models lag, retry later).
    pub client_deadline: bool,
}

impl PositionWait {
    /// From the request's `grpc-timeout`. Ends a little before the client's deadline so the
    /// answer (DEADLINE_EXCEEDED with a reason) reaches the client before it gives up.
    pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> PositionWait {
        let now = Instant::now();
        match metadata.get("grpc-timeout").and_then(|value| value.to_str().ok()).and_then(parse_grpc_timeout) {
            Some(timeout) => {
                let margin = (timeout / 10).min(Duration::from_millis(50));
                PositionWait { until: now + timeout.saturating_sub(margin), client_deadline: true }
            }
            None => PositionWait { until: now + DEFAULT_POSITION_WAIT, client_deadline: false },
        }
    }
}

/// `grpc-timeout` header value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Schema names come from our own control table, but are still validated before being
/// interpolated: a lowercase identifier, quoted.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn load_active_schema(pool: &PgPool) -> anyhow::Result<Arc<str>> {
    let name = active_schema(pool).await.context("failed to read the active read-model schema")?;
    Ok(name.into())
}

/// Keeps the schema cache and the change broadcast fed; reconnects after failures. Refreshes the
/// schema at least once a second so a missed notification costs at most a second.
async fn follow_notifications(
    pool: PgPool,
    schema_sender: watch::Sender<Arc<str>>,
    changes: broadcast::Sender<Arc<str>>,
) {
    let refresh = |schema_sender: &watch::Sender<Arc<str>>, loaded: anyhow::Result<Arc<str>>| match loaded {
        Ok(schema) => {
            schema_sender.send_if_modified(|current| {
                if *current == schema {
                    return false;
                }
                tracing::info!(from = %current, to = %schema, "read-model schema switched");
                *current = schema;
                true
            });
        }
        Err(error) => tracing::warn!(error = format!("{error:#}"), "failed to refresh the active schema"),
    };
    let connect = || async {
        let mut listener = PgListener::connect_with(&pool)
            .await
            .map_err(|error| ("failed to connect the notification listener", error))?;
        listener.listen_all([CHANGES_CHANNEL, SWITCH_CHANNEL]).await.map_err(|error| ("failed to LISTEN", error))?;
        Ok::<_, (&str, sqlx::Error)>(listener)
    };
    loop {
        let connected = connect
            .retry(LISTENER_RECONNECT)
            .notify(|(failure, error), _| tracing::warn!(%error, "{failure}; retrying"))
            .await;
        // Retried for ever: an error here is impossible, but is retried all the same.
        let Ok(mut listener) = connected else { continue };
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                notification = listener.try_recv() => match notification {
                    Ok(Some(notification)) if notification.channel() == SWITCH_CHANNEL => {
                        refresh(&schema_sender, load_active_schema(&pool).await);
                    }
                    Ok(Some(notification)) => {
                        let _ = changes.send(Arc::from(notification.payload()));
                    }
                    // The connection was lost (and is re-established by the next call):
                    // notifications may have been missed, so wake every watcher to re-query.
                    Ok(None) => {
                        let _ = changes.send(Arc::from(""));
                    }
                    Err(error) => {
                        tracing::warn!(%error, "notification listener failed; reconnecting");
                        break;
                    }
                },
                _ = ticker.tick() => refresh(&schema_sender, load_active_schema(&pool).await),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_per_the_http2_protocol_spec() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("99999999u"), Some(Duration::from_micros(99_999_999)));
        for bad in ["", "m", "10", "123456789S", "1x", "-1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn schema_names_are_validated_and_quoted() {
        let valid_schema_name = |name| switchboard_runtime::read_models::validate_schema_name(name).is_ok();
        assert!(valid_schema_name("public"));
        assert!(valid_schema_name("rm_20260101120000"));
        assert!(!valid_schema_name("rm; DROP TABLE x"));
        assert!(!valid_schema_name("Public"));
        assert!(!valid_schema_name("1abc"));
        assert_eq!(quote_identifier("rm_1"), "\"rm_1\"");
    }
}
