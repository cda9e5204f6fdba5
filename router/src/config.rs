//! The router's compiled view of the configuration: what `decide` needs, indexed for lookup.
//!
//! Built once per config change (not per decision) from the compacted config topic's snapshot:
//! every channel with its account, inbox kind, routing rules, resolved candidate pool (R3) and
//! ticket settings; every agent with seat, availability, skills and capacity limits.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use switchboard_proto::events::v1::{
    AssignTarget, ConsentMode, InboxKind, RoutingRulesConfigured, TicketSettingsConfigured,
};
use switchboard_runtime::config_store::ConfigSnapshot;

use crate::compact::InlineStr;
use crate::fast_hash::FastMap;
use crate::state::{CHANNEL_TYPE_SLOTS, channel_type_slot};

#[derive(Debug, Clone, PartialEq)]
pub struct AgentProfile {
    pub paid_seat: bool,
    /// The configured availability; `AgentAvailabilityChanged` overrides it once seen.
    pub available: bool,
    pub skills: BTreeSet<String>,
    /// 0 = no limit.
    pub max_open_conversations: u32,
    /// R8 per channel type; 0 = no limit.
    pub max_open_by_channel_type: [u32; CHANNEL_TYPE_SLOTS],
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChannelProfile {
    pub channel_id: String,
    pub account_id: String,
    pub inbox_id: String,
    pub channel_type: i32,
    /// C11.
    pub enabled: bool,
    /// C6: Messenger with explicit consent.
    pub explicit_consent: bool,
    /// I5: the channel's inbox is a help desk (every conversation becomes a ticket).
    pub help_desk: bool,
    /// Routing rules of the same account, if any.
    pub rules_opt: Option<RoutingRulesConfigured>,
    /// R3: the rule's users in their listed order, then members of its teams by agent id.
    pub pool: Vec<String>,
    /// For each pool member, its index in [`RouterConfig::profiles`] if it is an agent of the
    /// channel's account (resolved once here instead of a lookup per decision).
    pub pool_profiles: Vec<Option<u32>>,
    /// Each pool member's position in `pool`: round robin resumes after the last assignee
    /// without scanning the pool (members are unique, see `candidate_pool`).
    pub pool_position: FastMap<String, u32>,
    pub tickets_opt: Option<TicketSettingsConfigured>,
}

impl ChannelProfile {
    pub fn creates_tickets(&self) -> bool {
        self.help_desk || self.tickets_opt.as_ref().is_some_and(|settings| settings.treat_as_tickets)
    }
}

/// Entities by [`InlineStr::scoped`] (account, id) (M1: ids are unique within an account only):
/// one hash per lookup.
pub type ByAccount<T> = FastMap<InlineStr, T>;

/// The config as `decide` reads it.
#[derive(Debug, Clone, Default)]
pub struct RouterConfig {
    pub snapshot: Arc<ConfigSnapshot>,
    /// Agent profiles by account, then agent id.
    pub agents: ByAccount<AgentProfile>,
    /// The same profiles by index (pool members refer to them by index).
    pub profiles: Vec<AgentProfile>,
    /// The (account, agent id) of each profile, by the same index.
    pub profile_agents: Vec<(String, String)>,
    /// Identifies this compilation's profile numbering: an [`crate::state::AgentBook`]
    /// aligned with it reads a pool member's workload at the member's profile index.
    /// Unique per compilation within the process; never part of a decision.
    pub agent_table_id: u64,
    /// Channel profiles by account, then channel id.
    pub channels: ByAccount<ChannelProfile>,
    /// Per account, the ids of the enabled channels whose rules assign automatically and re-drive
    /// their backlog (B3), sorted: re-drive visits them in order. Every close and release asks,
    /// and most accounts have few such channels.
    pub redrive_channel_ids_by_account: FastMap<String, Vec<String>>,
}

impl RouterConfig {
    pub fn new(snapshot: Arc<ConfigSnapshot>) -> RouterConfig {
        let mut agents: ByAccount<AgentProfile> = FastMap::default();
        for owned in snapshot.agents.iter() {
            let agent = &owned.entity;
            let mut max_open_by_channel_type = [0u32; CHANNEL_TYPE_SLOTS];
            for limit in &agent.capacity_per_channel_type {
                max_open_by_channel_type[channel_type_slot(limit.channel_type)] = limit.max_open;
            }
            agents.insert(
                InlineStr::scoped(&owned.account_id, &agent.agent_id),
                AgentProfile {
                    paid_seat: agent.paid_seat,
                    available: agent.available,
                    skills: agent.skills.iter().cloned().collect(),
                    max_open_conversations: agent.max_open_conversations,
                    max_open_by_channel_type,
                },
            );
        }
        let mut profiles: Vec<AgentProfile> = Vec::with_capacity(agents.len());
        let mut profile_agents: Vec<(String, String)> = Vec::with_capacity(agents.len());
        let mut profile_index_by_agent: FastMap<(&str, &str), u32> = FastMap::default();
        for owned in snapshot.agents.iter() {
            let (account_id, agent_id) = (owned.account_id.as_str(), owned.entity.agent_id.as_str());
            profile_index_by_agent.insert((account_id, agent_id), profiles.len() as u32);
            profiles.push(agents[InlineStr::scoped(account_id, agent_id).as_bytes()].clone());
            profile_agents.push((account_id.to_owned(), agent_id.to_owned()));
        }
        let mut channels: ByAccount<ChannelProfile> = FastMap::default();
        let mut redrive_channel_ids_by_account: FastMap<String, Vec<String>> = FastMap::default();
        for owned in snapshot.channels.iter() {
            let channel = &owned.entity;
            let channel_id = &channel.channel_id;
            let account_id = &owned.account_id;
            let rules_opt = snapshot.routing_rules.get(account_id, channel_id).map(|rules| rules.entity.clone());
            let pool = rules_opt.as_ref().map(|rules| candidate_pool(&snapshot, account_id, rules)).unwrap_or_default();
            let pool_profiles = pool
                .iter()
                .map(|agent_id| profile_index_by_agent.get(&(account_id.as_str(), agent_id.as_str())).copied())
                .collect();
            let help_desk = snapshot
                .inboxes
                .get(account_id, &channel.inbox_id)
                .is_some_and(|inbox| inbox.entity.kind == InboxKind::HelpDesk as i32);
            let explicit_consent = channel
                .messenger
                .as_ref()
                .is_some_and(|messenger| messenger.consent_mode == ConsentMode::Explicit as i32);
            let profile = ChannelProfile {
                channel_id: channel_id.clone(),
                account_id: account_id.clone(),
                inbox_id: channel.inbox_id.clone(),
                channel_type: channel.channel_type,
                enabled: channel.enabled,
                explicit_consent,
                help_desk,
                rules_opt,
                pool_position: pool
                    .iter()
                    .enumerate()
                    .map(|(position, agent_id)| (agent_id.clone(), position as u32))
                    .collect(),
                pool,
                pool_profiles,
                tickets_opt: snapshot
                    .ticket_settings
                    .get(account_id, channel_id)
                    .map(|settings| settings.entity.clone()),
            };
            let redrives = profile
                .rules_opt
                .as_ref()
                .is_some_and(|rules: &RoutingRulesConfigured| rules.auto_assign && rules.redrive_backlog);
            if redrives && channel.enabled {
                redrive_channel_ids_by_account.entry(account_id.clone()).or_default().push(channel_id.clone());
            }
            channels.insert(InlineStr::scoped(account_id, channel_id), profile);
        }
        // BTreeMap iteration already gave sorted channel ids per account.
        drop(profile_index_by_agent);
        static NEXT_AGENT_TABLE_ID: AtomicU64 = AtomicU64::new(1);
        RouterConfig {
            snapshot: snapshot.clone(),
            agents,
            profiles,
            profile_agents,
            agent_table_id: NEXT_AGENT_TABLE_ID.fetch_add(1, Ordering::Relaxed),
            channels,
            redrive_channel_ids_by_account,
        }
    }

    pub fn from_snapshot(snapshot: ConfigSnapshot) -> RouterConfig {
        RouterConfig::new(Arc::new(snapshot))
    }

    /// The channel `channel_id` of `account_id` (M1: never another account's channel).
    pub fn channel(&self, account_id: &str, channel_id: &str) -> Option<&ChannelProfile> {
        self.channels.get(InlineStr::scoped(account_id, channel_id).as_bytes())
    }

    /// The agent `agent_id` of `account_id` (M1: never another account's agent).
    pub fn agent(&self, account_id: &str, agent_id: &str) -> Option<&AgentProfile> {
        self.agents.get(InlineStr::scoped(account_id, agent_id).as_bytes())
    }
}

/// R3: the rule's users in their listed order, then members of its teams by agent id; each once.
fn candidate_pool(snapshot: &ConfigSnapshot, account_id: &str, rules: &RoutingRulesConfigured) -> Vec<String> {
    if rules.target != AssignTarget::SpecificUsersAndTeams as i32 {
        return Vec::new();
    }
    let mut pool: Vec<String> = Vec::new();
    let mut seen = BTreeSet::new();
    for user_id in &rules.user_ids {
        if seen.insert(user_id.clone()) {
            pool.push(user_id.clone());
        }
    }
    if rules.team_ids.is_empty() {
        return pool;
    }
    for agent in snapshot.agents.in_account(account_id) {
        let in_selected_team = agent.entity.team_ids.iter().any(|team| rules.team_ids.contains(team));
        if in_selected_team && seen.insert(agent.entity.agent_id.clone()) {
            pool.push(agent.entity.agent_id.clone());
        }
    }
    pool
}
