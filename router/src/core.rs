//! The router's decisions: a pure, synchronous, deterministic function of (state, input).
//!
//! - [`decide`] looks at the state and one inbound event and returns the events to emit.
//! - [`evolve`] applies one emitted event to the state.
//!
//! No clock, no randomness, no I/O: time comes from the events, ids are derived from the cause
//! (see `runtime::ids`), and every map is ordered, so replaying the log re-derives the same
//! decisions byte for byte (B4). The Kafka shell (`crate::shell`) feeds inputs in and writes the
//! returned events out in one transaction with the consumed offsets.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    AgentConfigured, AssignTarget, AssignmentStrategy, ConversationAssigned, ConversationLeftUnassigned,
    ConversationStarted, Envelope, InboundMessageReceived, MessageAppended, RoutingExplanation, RoutingRulesConfigured,
    SkipReason, SkippedCandidate, UnassignedReason,
};
use switchboard_runtime::config_store::ConfigSnapshot;
use switchboard_runtime::envelope::{derived_from, derived_id, recorded_at_millis};

/// Why an input cannot be routed at all. Such inputs go to the dead-letter topic; they are
/// never retried, because retrying a deterministic function cannot change its answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("event {event_id} is not an inbound message (payload {payload}); wrong topic?")]
    NotAnInboundMessage { event_id: String, payload: &'static str },
    #[error("inbound message {event_id} lacks required field `{field}`")]
    MissingField { event_id: String, field: &'static str },
}

/// Identity of a thread within an account: the channel and its channel-specific thread key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ThreadKey {
    pub account_id: String,
    pub channel_id: String,
    pub thread_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConversationState {
    pub thread: Option<ThreadKey>,
    pub channel_id: String,
    pub assignee_agent_id_opt: Option<String>,
    /// Message ids already in the conversation: a provider's retry is recognised here (B1).
    pub message_ids: BTreeSet<String>,
}

/// Per-agent bookkeeping the strategies need.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentWorkload {
    pub open_conversations: u32,
    /// Unix millis of the agent's latest assignment (event time); `None` if never assigned.
    pub last_assigned_at_millis_opt: Option<u64>,
}

/// Everything the router remembers, derived only from the events it emitted.
///
/// The two large maps are hash maps for lookup speed; determinism holds because decisions
/// only ever look keys up in them and never depend on their iteration order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouterState {
    pub open_conversation_by_thread: HashMap<ThreadKey, String>,
    pub conversations: HashMap<String, ConversationState>,
    pub workload_by_agent: BTreeMap<String, AgentWorkload>,
    /// Round-robin position per channel rule: the agent assigned last by it.
    pub last_round_robin_agent_by_channel: BTreeMap<String, String>,
}

/// Decides what an inbound event means: which conversation it joins or starts (R10), and for a
/// new conversation who owns it (R1–R3, R5, R6, R8) with the explanation (B2).
pub fn decide(state: &RouterState, config: &ConfigSnapshot, input: &Envelope) -> Result<Vec<Envelope>, Rejection> {
    let message = match &input.payload {
        Some(Payload::InboundMessageReceived(message)) => message,
        Some(other) => {
            return Err(Rejection::NotAnInboundMessage {
                event_id: input.event_id.clone(),
                payload: switchboard_runtime::envelope::payload_name(other),
            });
        }
        None => return Err(Rejection::NotAnInboundMessage { event_id: input.event_id.clone(), payload: "none" }),
    };
    validate_inbound(input, message)?;

    let thread = ThreadKey {
        account_id: input.account_id.clone(),
        channel_id: message.channel_id.clone(),
        thread_key: message.thread_key.clone(),
    };
    if let Some(conversation_id) = state.open_conversation_by_thread.get(&thread) {
        let already_seen = state
            .conversations
            .get(conversation_id)
            .is_some_and(|conversation| conversation.message_ids.contains(&message.message_id));
        if already_seen {
            // B1: a provider retry of a message we already threaded changes nothing.
            return Ok(Vec::new());
        }
        // R10: a follow-up joins the open conversation and keeps its assignee.
        return Ok(vec![derived_from(input, 0, message_appended(conversation_id, input, message))]);
    }

    let conversation_id = derived_id(input, "conversation").to_string();
    let started = Payload::ConversationStarted(ConversationStarted {
        conversation_id: conversation_id.clone(),
        inbox_id: message.inbox_id.clone(),
        channel_id: message.channel_id.clone(),
        channel_type: message.channel_type,
        thread_key: message.thread_key.clone(),
        contact: message.sender.clone(),
        first_message_id: message.message_id.clone(),
        contact_id: String::new(),
    });
    let routing = route_new_conversation(state, config, &input.account_id, &message.channel_id, &conversation_id);
    Ok(vec![
        derived_from(input, 0, started),
        derived_from(input, 1, message_appended(&conversation_id, input, message)),
        derived_from(input, 2, routing),
    ])
}

fn validate_inbound(input: &Envelope, message: &InboundMessageReceived) -> Result<(), Rejection> {
    let required = [
        ("account_id", input.account_id.as_str()),
        ("channel_id", message.channel_id.as_str()),
        ("thread_key", message.thread_key.as_str()),
        ("message_id", message.message_id.as_str()),
    ];
    match required.into_iter().find(|(_, value)| value.is_empty()) {
        Some((field, _)) => Err(Rejection::MissingField { event_id: input.event_id.clone(), field }),
        None => Ok(()),
    }
}

fn message_appended(conversation_id: &str, input: &Envelope, message: &InboundMessageReceived) -> Payload {
    Payload::MessageAppended(MessageAppended {
        conversation_id: conversation_id.to_owned(),
        message_id: message.message_id.clone(),
        provider_message_id: message.provider_message_id.clone(),
        channel_id: message.channel_id.clone(),
        sender: message.sender.clone(),
        text: message.text.clone(),
        source_event_id: input.event_id.clone(),
        content: message.content.clone(),
        contact_id: String::new(),
    })
}

fn left_unassigned(conversation_id: &str, reason: UnassignedReason, explanation: RoutingExplanation) -> Payload {
    Payload::ConversationLeftUnassigned(ConversationLeftUnassigned {
        conversation_id: conversation_id.to_owned(),
        reason: reason as i32,
        explanation: Some(explanation),
    })
}

/// Applies the channel's routing rules to a new conversation.
fn route_new_conversation(
    state: &RouterState,
    config: &ConfigSnapshot,
    account_id: &str,
    channel_id: &str,
    conversation_id: &str,
) -> Payload {
    let Some(rules) = config.routing_rules.get(channel_id).filter(|rules| rules.account_id == account_id) else {
        let explanation = RoutingExplanation { channel_id: channel_id.to_owned(), ..Default::default() };
        return left_unassigned(conversation_id, UnassignedReason::NoRoutingRules, explanation);
    };
    let rules = &rules.entity;
    let mut explanation = RoutingExplanation {
        channel_id: channel_id.to_owned(),
        rule_version: rules.version,
        target: rules.target,
        strategy: rules.strategy,
        only_available: rules.only_available,
        ..Default::default()
    };
    // R1: automatic assignment is off by default; the team triages.
    if !rules.auto_assign {
        return left_unassigned(conversation_id, UnassignedReason::AutoAssignmentOff, explanation);
    }
    match AssignTarget::try_from(rules.target).unwrap_or(AssignTarget::Nobody) {
        AssignTarget::Nobody | AssignTarget::Unspecified => {
            left_unassigned(conversation_id, UnassignedReason::TargetNobody, explanation)
        }
        // R4: contacts carry no owner in this version, so the rule can never find one.
        AssignTarget::ContactOwner => {
            left_unassigned(conversation_id, UnassignedReason::ContactHasNoOwner, explanation)
        }
        AssignTarget::SpecificUsersAndTeams => {
            let pool = candidate_pool(config, account_id, rules);
            for agent_id in &pool {
                match ineligibility(state, config, account_id, rules, agent_id) {
                    Some(reason) => {
                        explanation.skipped.push(SkippedCandidate { agent_id: agent_id.clone(), reason: reason as i32 })
                    }
                    None => explanation.eligible_agent_ids.push(agent_id.clone()),
                }
            }
            match choose(state, rules, channel_id, &pool, &explanation.eligible_agent_ids) {
                Some(assignee_agent_id) => Payload::ConversationAssigned(ConversationAssigned {
                    conversation_id: conversation_id.to_owned(),
                    assignee_agent_id,
                    explanation: Some(explanation),
                }),
                // R5: nobody eligible (e.g. nobody available) → stays unassigned, with the reasons.
                None => left_unassigned(conversation_id, UnassignedReason::NoEligibleAgent, explanation),
            }
        }
    }
}

/// R3: the rule's users in their listed order, then members of its teams by agent id; each once.
fn candidate_pool(config: &ConfigSnapshot, account_id: &str, rules: &RoutingRulesConfigured) -> Vec<String> {
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
    for (agent_id, agent) in &config.agents {
        let in_selected_team = agent.entity.team_ids.iter().any(|team| rules.team_ids.contains(team));
        if agent.account_id == account_id && in_selected_team && seen.insert(agent_id.clone()) {
            pool.push(agent_id.clone());
        }
    }
    pool
}

/// Why `agent_id` may not take the conversation, or `None` if eligible.
fn ineligibility(
    state: &RouterState,
    config: &ConfigSnapshot,
    account_id: &str,
    rules: &RoutingRulesConfigured,
    agent_id: &str,
) -> Option<SkipReason> {
    let Some(agent) = config.agents.get(agent_id).filter(|agent| agent.account_id == account_id) else {
        return Some(SkipReason::UnknownAgent);
    };
    let agent: &AgentConfigured = &agent.entity;
    if !agent.paid_seat {
        return Some(SkipReason::NoPaidSeat); // R6
    }
    if rules.only_available && !agent.available {
        return Some(SkipReason::Offline); // R5
    }
    let open_conversations = state.workload_by_agent.get(agent_id).map_or(0, |workload| workload.open_conversations);
    if agent.max_open_conversations > 0 && open_conversations >= agent.max_open_conversations {
        return Some(SkipReason::AtCapacity); // R8
    }
    None
}

/// Picks the assignee among the eligible agents with the rule's strategy.
fn choose(
    state: &RouterState,
    rules: &RoutingRulesConfigured,
    channel_id: &str,
    pool: &[String],
    eligible: &[String],
) -> Option<String> {
    if eligible.is_empty() {
        return None;
    }
    match AssignmentStrategy::try_from(rules.strategy).unwrap_or(AssignmentStrategy::RoundRobin) {
        AssignmentStrategy::Balanced => eligible
            .iter()
            .min_by_key(|agent_id| {
                let workload = state.workload_by_agent.get(*agent_id).cloned().unwrap_or_default();
                // Fewest open conversations; ties go to the agent idle longest (never assigned first),
                // then to pool order (min_by_key keeps the first of equals).
                (workload.open_conversations, workload.last_assigned_at_millis_opt.map_or(0, |at| at + 1))
            })
            .cloned(),
        AssignmentStrategy::RoundRobin | AssignmentStrategy::Unspecified => {
            // The next eligible agent after the one this rule assigned last, in pool order.
            let last_index_opt = state
                .last_round_robin_agent_by_channel
                .get(channel_id)
                .and_then(|last_agent_id| pool.iter().position(|agent_id| agent_id == last_agent_id));
            let start = last_index_opt.map_or(0, |index| index + 1);
            let eligible: BTreeSet<&String> = eligible.iter().collect();
            (0..pool.len())
                .map(|offset| &pool[(start + offset) % pool.len()])
                .find(|agent_id| eligible.contains(agent_id))
                .cloned()
        }
    }
}

/// Applies one event emitted by [`decide`] to the state.
///
/// Takes `&mut` rather than returning a new state: the router folds millions of events and
/// copying maps per event would dominate its cost; the semantics are those of `evolve(S, &E) -> S`.
pub fn evolve(state: &mut RouterState, event: &Envelope) {
    match &event.payload {
        Some(Payload::ConversationStarted(started)) => {
            let thread = ThreadKey {
                account_id: event.account_id.clone(),
                channel_id: started.channel_id.clone(),
                thread_key: started.thread_key.clone(),
            };
            state.open_conversation_by_thread.insert(thread.clone(), started.conversation_id.clone());
            state.conversations.insert(
                started.conversation_id.clone(),
                ConversationState {
                    thread: Some(thread),
                    channel_id: started.channel_id.clone(),
                    ..Default::default()
                },
            );
        }
        Some(Payload::MessageAppended(appended)) => {
            if let Some(conversation) = state.conversations.get_mut(&appended.conversation_id) {
                conversation.message_ids.insert(appended.message_id.clone());
            }
        }
        Some(Payload::ConversationAssigned(assigned)) => {
            let Some(conversation) = state.conversations.get_mut(&assigned.conversation_id) else { return };
            if let Some(previous) = conversation.assignee_agent_id_opt.replace(assigned.assignee_agent_id.clone())
                && let Some(workload) = state.workload_by_agent.get_mut(&previous)
            {
                workload.open_conversations = workload.open_conversations.saturating_sub(1);
            }
            let workload = state.workload_by_agent.entry(assigned.assignee_agent_id.clone()).or_default();
            workload.open_conversations += 1;
            workload.last_assigned_at_millis_opt = Some(recorded_at_millis(event));
            state
                .last_round_robin_agent_by_channel
                .insert(conversation.channel_id.clone(), assigned.assignee_agent_id.clone());
        }
        _ => {}
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
