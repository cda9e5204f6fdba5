//! Given/when/then tests of the routing rules, named after the spec rule they cover.

use super::*;
use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use switchboard_proto::events::v1::{ChannelType, Sender};
use switchboard_runtime::config_store::Owned;
use switchboard_runtime::envelope::{new_root, timestamp};

const ACCOUNT: &str = "acct-1";
const CHANNEL: &str = "chat-1";

struct Given {
    config: ConfigSnapshot,
    state: RouterState,
    sequence: i64,
}

fn agent(agent_id: &str, paid_seat: bool, available: bool) -> AgentConfigured {
    AgentConfigured { agent_id: agent_id.into(), name: agent_id.into(), paid_seat, available, ..Default::default() }
}

fn rules(auto_assign: bool, target: AssignTarget, users: &[&str]) -> RoutingRulesConfigured {
    RoutingRulesConfigured {
        channel_id: CHANNEL.into(),
        version: 7,
        auto_assign,
        target: target as i32,
        user_ids: users.iter().map(|user| user.to_string()).collect(),
        only_available: true,
        strategy: AssignmentStrategy::RoundRobin as i32,
        ..Default::default()
    }
}

impl Given {
    fn new() -> Self {
        Given { config: ConfigSnapshot::default(), state: RouterState::default(), sequence: 0 }
    }

    fn agents(mut self, agents: impl IntoIterator<Item = AgentConfigured>) -> Self {
        for entity in agents {
            self.config.agents.insert(entity.agent_id.clone(), Owned { account_id: ACCOUNT.into(), entity });
        }
        self
    }

    fn rules(mut self, entity: RoutingRulesConfigured) -> Self {
        self.config.routing_rules.insert(entity.channel_id.clone(), Owned { account_id: ACCOUNT.into(), entity });
        self
    }

    fn inbound(&mut self, visitor: &str, provider_message_id: &str) -> Envelope {
        self.sequence += 1;
        let mut envelope = new_root(
            ACCOUNT,
            ACCOUNT,
            Utc.timestamp_opt(1_700_000_000 + self.sequence, 0).unwrap(),
            Payload::InboundMessageReceived(InboundMessageReceived {
                channel_id: CHANNEL.into(),
                inbox_id: "inbox-1".into(),
                channel_type: ChannelType::Chat as i32,
                provider_message_id: provider_message_id.into(),
                message_id: switchboard_runtime::ids::message_id_for(CHANNEL, provider_message_id).to_string(),
                thread_key: visitor.into(),
                sender: Some(Sender {
                    external_id: visitor.into(),
                    display_name: visitor.into(),
                    email: String::new(),
                }),
                text: format!("hello from {visitor}"),
                ..Default::default()
            }),
        );
        // Ingest gives each event a fresh UUIDv7; here ids come from the sequence so two runs of
        // one scenario are comparable byte for byte. Event time strictly increases.
        envelope.event_id = format!("00000000-0000-7000-8000-{:012}", self.sequence);
        envelope.correlation_id = envelope.event_id.clone();
        envelope.recorded_at = Some(timestamp(Utc.timestamp_opt(1_700_000_000 + self.sequence, 0).unwrap()));
        envelope
    }

    /// When `visitor` writes: decide, then evolve the state with what was decided.
    fn when(&mut self, visitor: &str, provider_message_id: &str) -> Vec<Envelope> {
        let input = self.inbound(visitor, provider_message_id);
        let events = decide(&self.state, &self.config, &input).expect("routable");
        for event in &events {
            evolve(&mut self.state, event);
        }
        events
    }

    fn set_open_conversations(&mut self, agent_id: &str, open_conversations: u32) {
        self.state.workload_by_agent.entry(agent_id.into()).or_default().open_conversations = open_conversations;
    }
}

fn routing_outcome(events: &[Envelope]) -> Option<&Payload> {
    events
        .iter()
        .filter_map(|event| event.payload.as_ref())
        .find(|payload| matches!(payload, Payload::ConversationAssigned(_) | Payload::ConversationLeftUnassigned(_)))
}

fn assignee(events: &[Envelope]) -> Option<String> {
    match routing_outcome(events) {
        Some(Payload::ConversationAssigned(assigned)) => Some(assigned.assignee_agent_id.clone()),
        _ => None,
    }
}

fn unassigned_reason(events: &[Envelope]) -> Option<UnassignedReason> {
    match routing_outcome(events) {
        Some(Payload::ConversationLeftUnassigned(left)) => UnassignedReason::try_from(left.reason).ok(),
        _ => None,
    }
}

fn explanation(events: &[Envelope]) -> RoutingExplanation {
    match routing_outcome(events) {
        Some(Payload::ConversationAssigned(assigned)) => assigned.explanation.clone().unwrap(),
        Some(Payload::ConversationLeftUnassigned(left)) => left.explanation.clone().unwrap(),
        _ => panic!("no routing decision in {events:?}"),
    }
}

fn skipped(events: &[Envelope]) -> Vec<(String, SkipReason)> {
    explanation(events)
        .skipped
        .iter()
        .map(|skip| (skip.agent_id.clone(), SkipReason::try_from(skip.reason).unwrap()))
        .collect()
}

#[test]
fn r10_follow_up_in_open_conversation_joins_it_and_keeps_its_assignee() {
    let mut given = Given::new().agents([agent("ana", true, true), agent("bo", true, true)]).rules(rules(
        true,
        AssignTarget::SpecificUsersAndTeams,
        &["ana", "bo"],
    ));
    let first = given.when("visitor-1", "m1");
    assert_eq!(first.len(), 3, "started + appended + assigned");
    assert_eq!(assignee(&first).as_deref(), Some("ana"));

    let follow_up = given.when("visitor-1", "m2");
    assert_eq!(follow_up.len(), 1);
    let Some(Payload::MessageAppended(appended)) = &follow_up[0].payload else { panic!("{follow_up:?}") };
    let conversation_id = &given.state.open_conversation_by_thread.values().next().unwrap().clone();
    assert_eq!(&appended.conversation_id, conversation_id);
    assert_eq!(given.state.conversations.len(), 1, "never a second conversation");
    assert_eq!(given.state.conversations[conversation_id].assignee_agent_id_opt.as_deref(), Some("ana"));
    assert_eq!(given.state.workload_by_agent["ana"].open_conversations, 1, "follow-ups add no workload");
}

#[test]
fn b1_provider_retry_of_the_same_message_changes_nothing() {
    let mut given = Given::new().rules(rules(false, AssignTarget::Nobody, &[]));
    assert_eq!(given.when("visitor-1", "m1").len(), 3);
    let state_before = given.state.clone();
    assert!(given.when("visitor-1", "m1").is_empty(), "retry of the first message");
    given.when("visitor-1", "m2");
    assert!(given.when("visitor-1", "m2").is_empty(), "retry of a follow-up");
    assert_eq!(given.state.conversations.len(), state_before.conversations.len());
}

#[test]
fn r1_automatic_assignment_off_leaves_new_conversations_unassigned() {
    let mut given = Given::new().agents([agent("ana", true, true)]).rules(rules(
        false,
        AssignTarget::SpecificUsersAndTeams,
        &["ana"],
    ));
    let events = given.when("visitor-1", "m1");
    assert_eq!(unassigned_reason(&events), Some(UnassignedReason::AutoAssignmentOff));
    assert_eq!(explanation(&events).rule_version, 7);
}

#[test]
fn r1_channel_without_rules_leaves_conversations_unassigned_with_the_reason() {
    let mut given = Given::new();
    assert_eq!(unassigned_reason(&given.when("visitor-1", "m1")), Some(UnassignedReason::NoRoutingRules));
}

#[test]
fn r2_assign_to_nobody_and_contact_owner_without_owner_stay_unassigned() {
    let table = [
        (AssignTarget::Nobody, UnassignedReason::TargetNobody),
        (AssignTarget::ContactOwner, UnassignedReason::ContactHasNoOwner),
    ];
    for (target, expected_reason) in table {
        let mut given = Given::new().agents([agent("ana", true, true)]).rules(rules(true, target, &["ana"]));
        assert_eq!(unassigned_reason(&given.when("visitor-1", "m1")), Some(expected_reason), "{target:?}");
    }
}

#[test]
fn r3_round_robin_cycles_through_the_selected_users_in_order() {
    let mut given = Given::new()
        .agents([agent("ana", true, true), agent("bo", true, true), agent("cy", true, true)])
        .rules(rules(true, AssignTarget::SpecificUsersAndTeams, &["ana", "bo", "cy"]));
    let assignees: Vec<_> =
        (0..7).map(|index| assignee(&given.when(&format!("visitor-{index}"), "m")).unwrap()).collect();
    assert_eq!(assignees, ["ana", "bo", "cy", "ana", "bo", "cy", "ana"]);
}

#[test]
fn r3_members_of_selected_teams_are_candidates() {
    let mut team_member = agent("dee", true, true);
    team_member.team_ids = vec!["tier-2".into()];
    let outsider = agent("eve", true, true);
    let mut team_rules = rules(true, AssignTarget::SpecificUsersAndTeams, &[]);
    team_rules.team_ids = vec!["tier-2".into()];
    let mut given = Given::new().agents([team_member, outsider]).rules(team_rules);
    let events = given.when("visitor-1", "m1");
    assert_eq!(assignee(&events).as_deref(), Some("dee"));
    assert_eq!(explanation(&events).eligible_agent_ids, ["dee"]);
}

#[test]
fn r5_only_available_users_left_unassigned_when_none_online() {
    let mut given = Given::new().agents([agent("ana", true, false), agent("bo", true, false)]).rules(rules(
        true,
        AssignTarget::SpecificUsersAndTeams,
        &["ana", "bo"],
    ));
    let events = given.when("visitor-1", "m1");
    assert_eq!(unassigned_reason(&events), Some(UnassignedReason::NoEligibleAgent));
    assert_eq!(skipped(&events), [("ana".to_string(), SkipReason::Offline), ("bo".to_string(), SkipReason::Offline)]);
}

#[test]
fn r5_only_available_users_skips_offline_agents() {
    let mut given = Given::new().agents([agent("ana", true, false), agent("bo", true, true)]).rules(rules(
        true,
        AssignTarget::SpecificUsersAndTeams,
        &["ana", "bo"],
    ));
    for index in 0..3 {
        assert_eq!(assignee(&given.when(&format!("visitor-{index}"), "m")).as_deref(), Some("bo"));
    }
}

#[test]
fn r5_off_ignores_availability() {
    let mut rules_ignoring_availability = rules(true, AssignTarget::SpecificUsersAndTeams, &["ana"]);
    rules_ignoring_availability.only_available = false;
    let mut given = Given::new().agents([agent("ana", true, false)]).rules(rules_ignoring_availability);
    assert_eq!(assignee(&given.when("visitor-1", "m1")).as_deref(), Some("ana"));
}

#[test]
fn r6_users_without_a_paid_seat_are_never_auto_assigned() {
    let mut given = Given::new().agents([agent("free", false, true), agent("paid", true, true)]).rules(rules(
        true,
        AssignTarget::SpecificUsersAndTeams,
        &["free", "paid"],
    ));
    for index in 0..3 {
        let events = given.when(&format!("visitor-{index}"), "m");
        assert_eq!(assignee(&events).as_deref(), Some("paid"));
        assert_eq!(skipped(&events), [("free".to_string(), SkipReason::NoPaidSeat)]);
    }
}

#[test]
fn r8_agent_at_capacity_is_not_eligible() {
    let mut limited = agent("ana", true, true);
    limited.max_open_conversations = 2;
    let mut given = Given::new().agents([limited]).rules(rules(true, AssignTarget::SpecificUsersAndTeams, &["ana"]));
    assert_eq!(assignee(&given.when("visitor-1", "m")).as_deref(), Some("ana"));
    assert_eq!(assignee(&given.when("visitor-2", "m")).as_deref(), Some("ana"));
    let third = given.when("visitor-3", "m");
    assert_eq!(unassigned_reason(&third), Some(UnassignedReason::NoEligibleAgent));
    assert_eq!(skipped(&third), [("ana".to_string(), SkipReason::AtCapacity)]);
}

#[test]
fn balanced_strategy_picks_fewest_open_then_idle_longest() {
    let mut balanced = rules(true, AssignTarget::SpecificUsersAndTeams, &["ana", "bo", "cy"]);
    balanced.strategy = AssignmentStrategy::Balanced as i32;
    let mut given = Given::new()
        .agents([agent("ana", true, true), agent("bo", true, true), agent("cy", true, true)])
        .rules(balanced);
    given.set_open_conversations("ana", 5);
    given.set_open_conversations("bo", 1);
    given.set_open_conversations("cy", 1);
    // bo and cy tie on 1 open; neither was ever assigned, so pool order decides: bo.
    assert_eq!(assignee(&given.when("visitor-1", "m")).as_deref(), Some("bo"));
    // Now cy has fewer open conversations.
    assert_eq!(assignee(&given.when("visitor-2", "m")).as_deref(), Some("cy"));
    // bo and cy tie on 2; bo was assigned earlier (idle longest).
    assert_eq!(assignee(&given.when("visitor-3", "m")).as_deref(), Some("bo"));
}

#[test]
fn b2_every_decision_explains_rule_version_strategy_eligible_and_skipped() {
    let mut given = Given::new()
        .agents([agent("ana", true, true), agent("off", true, false), agent("free", false, true)])
        .rules(rules(true, AssignTarget::SpecificUsersAndTeams, &["ana", "off", "free", "ghost"]));
    let events = given.when("visitor-1", "m1");
    let explanation = explanation(&events);
    assert_eq!(explanation.rule_version, 7);
    assert_eq!(explanation.strategy, AssignmentStrategy::RoundRobin as i32);
    assert_eq!(explanation.eligible_agent_ids, ["ana"]);
    assert_eq!(
        skipped(&events),
        [
            ("off".to_string(), SkipReason::Offline),
            ("free".to_string(), SkipReason::NoPaidSeat),
            ("ghost".to_string(), SkipReason::UnknownAgent)
        ]
    );
}

#[test]
fn inputs_that_are_not_routable_are_rejected_not_panicked_on() {
    let mut given = Given::new();
    let mut no_thread = given.inbound("", "m1");
    assert!(matches!(
        decide(&given.state, &given.config, &no_thread),
        Err(Rejection::MissingField { field: "thread_key", .. })
    ));
    no_thread.payload = Some(Payload::AgentConfigured(agent("ana", true, true)));
    assert!(matches!(decide(&given.state, &given.config, &no_thread), Err(Rejection::NotAnInboundMessage { .. })));
}

/// One step of a random scenario: a message from one of a few visitors, or an agent's
/// availability flipping (a config change between messages).
#[derive(Debug, Clone)]
enum Step {
    Message { visitor: u8, message: u8 },
    ToggleAvailability { agent: u8 },
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u8..30, 0u8..4).prop_map(|(visitor, message)| Step::Message { visitor, message }),
        1 => (0u8..4).prop_map(|agent| Step::ToggleAvailability { agent }),
    ]
}

/// Runs a scenario; returns every emitted event and the final state.
fn run(steps: &[Step], strategy: AssignmentStrategy) -> (Vec<Envelope>, RouterState) {
    let agents = (0..4).map(|index| {
        let mut entity = agent(&format!("agent-{index}"), index != 3, true);
        entity.max_open_conversations = 3;
        entity
    });
    let mut pool_rules =
        rules(true, AssignTarget::SpecificUsersAndTeams, &["agent-0", "agent-1", "agent-2", "agent-3"]);
    pool_rules.strategy = strategy as i32;
    let mut given = Given::new().agents(agents).rules(pool_rules);
    let mut emitted = Vec::new();
    for step in steps {
        match step {
            Step::Message { visitor, message } => {
                emitted.extend(given.when(&format!("v{visitor}"), &format!("m{message}")))
            }
            Step::ToggleAvailability { agent } => {
                let entity = &mut given.config.agents.get_mut(&format!("agent-{agent}")).unwrap().entity;
                entity.available = !entity.available;
            }
        }
    }
    (emitted, given.state)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// B4: the same inputs always give the same decisions, and the state rebuilt by folding
    /// the emitted events (what a restarted router does) equals the live state.
    #[test]
    fn b4_decisions_are_deterministic_and_state_is_rebuilt_from_output(
        steps in proptest::collection::vec(step_strategy(), 0..120),
        balanced in any::<bool>(),
    ) {
        let strategy = if balanced { AssignmentStrategy::Balanced } else { AssignmentStrategy::RoundRobin };
        let (first_events, first_state) = run(&steps, strategy);
        let (second_events, _) = run(&steps, strategy);
        prop_assert_eq!(&first_events, &second_events);

        let mut rebuilt = RouterState::default();
        for event in &first_events {
            evolve(&mut rebuilt, event);
        }
        prop_assert_eq!(&rebuilt, &first_state);
    }

    /// R8, R6, R10 invariants hold for any sequence: nobody over capacity, no seatless agent
    /// assigned, one conversation per thread.
    #[test]
    fn r8_r6_r10_invariants_hold_for_any_sequence(steps in proptest::collection::vec(step_strategy(), 0..200)) {
        let (events, state) = run(&steps, AssignmentStrategy::RoundRobin);
        for workload in state.workload_by_agent.values() {
            prop_assert!(workload.open_conversations <= 3);
        }
        prop_assert!(!state.workload_by_agent.contains_key("agent-3"), "agent-3 has no paid seat");
        let started = events.iter().filter(|event| matches!(event.payload, Some(Payload::ConversationStarted(_)))).count();
        prop_assert_eq!(started, state.open_conversation_by_thread.len());
    }
}
