//! Open conversations per agent and channel type (R8), as the projector's `agent_workload` read
//! model has them, so the chat widget can tell when every member of a channel's team is at
//! capacity (C5).
//!
//! Never read per request: a background task ([`spawn_refresher`]) reloads the table (one row
//! per agent and channel type with open conversations) every `refresh_interval` into an
//! in-memory snapshot, and widget requests read that snapshot ([`WorkloadCache::knowledge`]).
//! When the database is unreachable, or the newest good snapshot is older than `stale_after`,
//! requests get [`CapacityKnowledge::Unavailable`] and the widget answers from its settings
//! alone, saying so (`"capacity": "unknown"`, and `switchboard_ingest_workload_fresh 0`).
//!
//! The read model lives in the active read-model schema (docs/contracts.md, schema switching):
//! each refresh reads `public.read_model_control` first, so a replay switch is followed within
//! one refresh.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use switchboard_runtime::read_models::active_schema;

/// Open conversations of one agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentOpenConversations {
    /// Over every channel type (the overall limit, `max_open_conversations`).
    pub total: u32,
    /// By the read model's channel type name (`chat`, `team_email`, …; see `switchboard_proto::names`).
    pub by_channel_type: HashMap<String, u32>,
}

impl AgentOpenConversations {
    pub fn of_channel_type(&self, channel_type_label: &str) -> u32 {
        self.by_channel_type.get(channel_type_label).copied().unwrap_or(0)
    }
}

/// Open conversations per agent, by (account, agent id) (M1); an agent without an entry has
/// none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenConversations {
    /// By account, then agent id: a lookup borrows both ids.
    by_agent: HashMap<String, HashMap<String, AgentOpenConversations>>,
}

impl OpenConversations {
    /// From `agent_workload` rows (`account_id`, `agent_id`, `channel_type`, `open_count`);
    /// negative counts (which the projector never writes) count as zero.
    pub fn from_rows(rows: impl IntoIterator<Item = (String, String, String, i32)>) -> OpenConversations {
        let mut by_agent: HashMap<String, HashMap<String, AgentOpenConversations>> = HashMap::new();
        for (account_id, agent_id, channel_type, open_count) in rows {
            let open_count = u32::try_from(open_count).unwrap_or(0);
            let agent = by_agent.entry(account_id).or_default().entry(agent_id).or_default();
            agent.total = agent.total.saturating_add(open_count);
            *agent.by_channel_type.entry(channel_type).or_default() += open_count;
        }
        OpenConversations { by_agent }
    }

    pub fn of_agent(&self, account_id: &str, agent_id: &str) -> Option<&AgentOpenConversations> {
        self.by_agent.get(account_id)?.get(agent_id)
    }
}

/// What a widget request can know about capacity right now.
#[derive(Debug, Clone)]
pub enum CapacityKnowledge {
    /// Ingest runs without `DATABASE_URL`: capacity is never checked.
    NotConfigured,
    /// Configured, but no snapshot newer than `stale_after` (database unreachable, refreshes
    /// failing, or none succeeded yet).
    Unavailable,
    /// The newest snapshot (at most `stale_after` old).
    Known(Arc<OpenConversations>),
}

struct Latest {
    counts: Arc<OpenConversations>,
    loaded_at: Instant,
}

struct Shared {
    configured: bool,
    stale_after: Duration,
    latest_opt: RwLock<Option<Latest>>,
    refreshes_succeeded: AtomicU64,
    refreshes_failed: AtomicU64,
    /// Whether the previous refresh failed (logs only transitions, not every failed second).
    failing: AtomicBool,
}

/// The in-memory snapshot widget requests read; cheap to clone.
#[derive(Clone)]
pub struct WorkloadCache {
    shared: Arc<Shared>,
}

impl WorkloadCache {
    fn with(configured: bool, stale_after: Duration) -> WorkloadCache {
        WorkloadCache {
            shared: Arc::new(Shared {
                configured,
                stale_after,
                latest_opt: RwLock::new(None),
                refreshes_succeeded: AtomicU64::new(0),
                refreshes_failed: AtomicU64::new(0),
                failing: AtomicBool::new(false),
            }),
        }
    }

    /// For ingest without a database: every request gets [`CapacityKnowledge::NotConfigured`].
    pub fn not_configured() -> WorkloadCache {
        WorkloadCache::with(false, Duration::ZERO)
    }

    /// A cache fed by a refresher; snapshots older than `stale_after` are not used.
    pub fn new(stale_after: Duration) -> WorkloadCache {
        WorkloadCache::with(true, stale_after)
    }

    pub fn knowledge(&self, now: Instant) -> CapacityKnowledge {
        if !self.shared.configured {
            return CapacityKnowledge::NotConfigured;
        }
        let latest_opt = self.shared.latest_opt.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*latest_opt {
            Some(latest) if now.saturating_duration_since(latest.loaded_at) <= self.shared.stale_after => {
                CapacityKnowledge::Known(latest.counts.clone())
            }
            _ => CapacityKnowledge::Unavailable,
        }
    }

    /// A refresh loaded `counts` (read from the database at `loaded_at`).
    pub fn store(&self, counts: OpenConversations, loaded_at: Instant) {
        *self.shared.latest_opt.write().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(Latest { counts: Arc::new(counts), loaded_at });
        self.shared.refreshes_succeeded.fetch_add(1, Ordering::Relaxed);
        if self.shared.failing.swap(false, Ordering::Relaxed) {
            tracing::info!("agent workload readable again: the chat widget checks capacity again");
        }
    }

    /// A refresh failed; the previous snapshot stays until it is older than `stale_after`.
    pub fn record_failure(&self, error: &anyhow::Error) {
        self.shared.refreshes_failed.fetch_add(1, Ordering::Relaxed);
        if !self.shared.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                error = format!("{error:#}"),
                "failed to read agent workload: the chat widget answers without capacity once counts are stale"
            );
        } else {
            tracing::debug!(error = format!("{error:#}"), "failed to read agent workload");
        }
    }

    /// Prometheus text: whether capacity counts are fresh, their age, refresh outcomes; read as
    /// of `now`, at each scrape.
    pub fn render_metrics(&self, out: &mut String, now: Instant) {
        use prometheus_client::metrics::counter::Counter;
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::ConstGauge;

        #[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
        struct OutcomeLabels {
            outcome: &'static str,
        }

        let mut registry = switchboard_runtime::metrics::new_registry("ingest");
        registry.register(
            "workload_configured",
            "1 when DATABASE_URL is set (the chat widget checks capacity)",
            ConstGauge::new(i64::from(self.shared.configured)),
        );
        let fresh = matches!(self.knowledge(now), CapacityKnowledge::Known(_));
        registry.register(
            "workload_fresh",
            "1 when the open-conversation counts are recent enough to decide capacity",
            ConstGauge::new(i64::from(fresh)),
        );
        let latest_opt = self.shared.latest_opt.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(latest) = &*latest_opt {
            registry.register(
                "workload_age_seconds",
                "Age of the newest open-conversation counts",
                ConstGauge::new(now.saturating_duration_since(latest.loaded_at).as_secs_f64()),
            );
        }
        drop(latest_opt);
        let refreshes = Family::<OutcomeLabels, Counter>::default();
        refreshes
            .get_or_create(&OutcomeLabels { outcome: "ok" })
            .inc_by(self.shared.refreshes_succeeded.load(Ordering::Relaxed));
        refreshes
            .get_or_create(&OutcomeLabels { outcome: "failed" })
            .inc_by(self.shared.refreshes_failed.load(Ordering::Relaxed));
        registry.register("workload_refreshes", "Reads of the agent_workload read model, by outcome", refreshes);
        out.push_str(&switchboard_runtime::metrics::render(&registry));
    }
}

/// Where and how often the refresher reads the read model.
#[derive(Debug, Clone)]
pub struct WorkloadSettings {
    pub database_url: String,
    pub refresh_interval: Duration,
    /// Snapshots older than this are not used (capacity `unknown`).
    pub stale_after: Duration,
}

/// Reads every agent's open conversations from the active schema.
pub async fn load_open_conversations(pool: &PgPool) -> anyhow::Result<OpenConversations> {
    let schema = active_schema(pool).await?;
    let rows: Vec<(String, String, String, i32)> = sqlx::query_as(&format!(
        "SELECT account_id, agent_id, channel_type, open_count FROM \"{schema}\".agent_workload WHERE open_count > 0"
    ))
    .fetch_all(pool)
    .await
    .with_context(|| format!("failed to read {schema}.agent_workload"))?;
    Ok(OpenConversations::from_rows(rows))
}

/// Starts the background refresh (until `shutdown` turns true) and returns the cache it feeds.
/// Fails only on a malformed `database_url`; an unreachable database is retried every interval.
pub fn spawn_refresher(
    settings: &WorkloadSettings,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<WorkloadCache> {
    let cache = WorkloadCache::new(settings.stale_after);
    // One connection is plenty for one small query a second; a refresh that cannot get it (or
    // an answer) within the interval counts as failed.
    let query_timeout = settings.refresh_interval.max(Duration::from_millis(500));
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(query_timeout)
        .connect_lazy(&settings.database_url)
        .context("DATABASE_URL is not a valid PostgreSQL URL")?;
    let refresh_interval = settings.refresh_interval;
    let refreshed = cache.clone();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(refresh_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.wait_for(|stopped| *stopped) => break,
            }
            let outcome = tokio::time::timeout(query_timeout, load_open_conversations(&pool)).await;
            match outcome {
                Ok(Ok(counts)) => refreshed.store(counts, Instant::now()),
                Ok(Err(error)) => refreshed.record_failure(&error),
                Err(_) => refreshed.record_failure(&anyhow::anyhow!(
                    "reading agent_workload took longer than {} ms",
                    query_timeout.as_millis()
                )),
            }
        }
        pool.close().await;
    });
    Ok(cache)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r8_rows_sum_per_agent_and_keep_channel_types_apart() {
        let row = |account: &str, agent: &str, channel_type: &str, open: i32| {
            (account.to_owned(), agent.to_owned(), channel_type.to_owned(), open)
        };
        let counts = OpenConversations::from_rows([
            row("a", "ana", "chat", 2),
            row("a", "ana", "team_email", 3),
            row("a", "bo", "chat", -1),
            row("b", "ana", "chat", 7),
        ]);
        let ana = counts.of_agent("a", "ana").unwrap();
        assert_eq!((ana.total, ana.of_channel_type("chat"), ana.of_channel_type("whatsapp")), (5, 2, 0));
        assert_eq!(counts.of_agent("a", "bo").unwrap().total, 0, "a negative count is no open conversation");
        assert!(counts.of_agent("a", "cy").is_none());
        assert_eq!(counts.of_agent("b", "ana").unwrap().total, 7, "M1: another account's ana is another agent");
    }

    #[test]
    fn c5_counts_older_than_the_staleness_bound_are_not_used() {
        let cache = WorkloadCache::new(Duration::from_secs(5));
        let start = Instant::now();
        assert!(matches!(cache.knowledge(start), CapacityKnowledge::Unavailable), "nothing loaded yet");
        cache.store(OpenConversations::default(), start);
        assert!(matches!(cache.knowledge(start + Duration::from_secs(5)), CapacityKnowledge::Known(_)));
        cache.record_failure(&anyhow::anyhow!("connection refused"));
        assert!(
            matches!(cache.knowledge(start + Duration::from_secs(4)), CapacityKnowledge::Known(_)),
            "one failed refresh keeps the recent snapshot"
        );
        assert!(matches!(cache.knowledge(start + Duration::from_secs(6)), CapacityKnowledge::Unavailable));
        let mut metrics = String::new();
        cache.render_metrics(&mut metrics, start + Duration::from_secs(6));
        assert!(metrics.contains("switchboard_ingest_workload_fresh 0"), "{metrics}");
        assert!(metrics.contains("switchboard_ingest_workload_refreshes_total{outcome=\"failed\"} 1"));
        assert!(metrics.contains("switchboard_ingest_workload_age_seconds 6"));
        assert!(matches!(WorkloadCache::not_configured().knowledge(start), CapacityKnowledge::NotConfigured));
    }

    #[test]
    fn schema_names_from_the_control_table_are_checked_before_use() {
        let valid_schema_name = |name| switchboard_runtime::read_models::validate_schema_name(name).is_ok();
        assert!(valid_schema_name("public"));
        assert!(valid_schema_name("rm_20261121093000"));
        assert!(!valid_schema_name("public\"; DROP TABLE agents; --"));
        assert!(!valid_schema_name("9abc"));
        assert!(!valid_schema_name(""));
    }
}
