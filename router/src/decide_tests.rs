//! Given/when/then tests of the routing rules, named after the spec rule they cover.

use super::*;
use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use switchboard_proto::events::v1::{
    AgentConfigured, ChannelConfigured, ChannelType, ChannelTypeCapacity, ConsentMode, DeliveryStatusReported,
    FormTicketFields, InboundContent, InboxConfigured, InboxKind, MessengerSettings, RoutingRulesConfigured, Sender,
    TicketSettingsConfigured,
};
use switchboard_runtime::config_store::{ConfigSnapshot, Owned};
use switchboard_runtime::envelope::{new_root, timestamp};

const ACCOUNT: &str = "acct-1";
const CHANNEL: &str = "chat-1";
const INBOX: &str = "inbox-1";

struct Given {
    snapshot: ConfigSnapshot,
    state: RouterState,
    sequence: i64,
    /// Align the state with the config before each decision, as the shell does (the default);
    /// off, routing takes the by-id lookups, which must decide the same.
    aligned: bool,
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

fn channel(channel_id: &str, channel_type: ChannelType) -> ChannelConfigured {
    ChannelConfigured {
        channel_id: channel_id.into(),
        inbox_id: INBOX.into(),
        channel_type: channel_type as i32,
        name: channel_id.into(),
        enabled: true,
        ..Default::default()
    }
}

fn owned<T>(entity: T) -> Owned<T> {
    Owned { account_id: ACCOUNT.into(), entity }
}

impl Given {
    /// One account with one enabled chat channel (no routing rules yet).
    fn new() -> Self {
        let mut given =
            Given { snapshot: ConfigSnapshot::default(), state: RouterState::default(), sequence: 0, aligned: true };
        given.snapshot.channels.insert(owned(channel(CHANNEL, ChannelType::Chat)));
        given
    }

    fn agents(mut self, agents: impl IntoIterator<Item = AgentConfigured>) -> Self {
        for entity in agents {
            self.snapshot.agents.insert(owned(entity));
        }
        self
    }

    fn rules(mut self, entity: RoutingRulesConfigured) -> Self {
        self.snapshot.routing_rules.insert(owned(entity));
        self
    }

    fn channel(mut self, entity: ChannelConfigured) -> Self {
        self.snapshot.channels.insert(owned(entity));
        self
    }

    fn tickets(mut self, entity: TicketSettingsConfigured) -> Self {
        self.snapshot.ticket_settings.insert(owned(entity));
        self
    }

    fn help_desk_inbox(mut self) -> Self {
        let inbox = InboxConfigured {
            inbox_id: INBOX.into(),
            name: "Help desk".into(),
            kind: InboxKind::HelpDesk as i32,
            ..Default::default()
        };
        self.snapshot.inboxes.insert(owned(inbox));
        self
    }

    fn config(&self) -> RouterConfig {
        RouterConfig::from_snapshot(self.snapshot.clone())
    }

    /// An input with a sequence-derived id, so two runs of one scenario compare byte for byte.
    fn input(&mut self, payload: Payload) -> Envelope {
        self.sequence += 1;
        let at = Utc.timestamp_opt(1_700_000_000 + self.sequence, 0).unwrap();
        let mut envelope = new_root(ACCOUNT, ACCOUNT, at, payload);
        envelope.event_id = format!("00000000-0000-7000-8000-{:012}", self.sequence);
        envelope.correlation_id = envelope.event_id.clone();
        envelope.recorded_at = Some(timestamp(at));
        envelope
    }

    /// A message from `visitor`. Providers' message ids are unique per channel; the visitor is
    /// part of the id here so that tests can reuse short names like "m1" per visitor.
    fn message_on(&mut self, channel_id: &str, visitor: &str, provider_message_id: &str) -> InboundMessageReceived {
        let provider_message_id = format!("{visitor}:{provider_message_id}");
        InboundMessageReceived {
            channel_id: channel_id.into(),
            inbox_id: INBOX.into(),
            channel_type: ChannelType::Chat as i32,
            message_id: switchboard_runtime::ids::message_id_for(ACCOUNT, channel_id, &provider_message_id).to_string(),
            provider_message_id,
            thread_key: visitor.into(),
            sender: Some(Sender { external_id: visitor.into(), display_name: visitor.into(), email: String::new() }),
            text: format!("hello from {visitor}"),
            ..Default::default()
        }
    }

    fn inbound(&mut self, visitor: &str, provider_message_id: &str) -> Envelope {
        let message = self.message_on(CHANNEL, visitor, provider_message_id);
        self.input(Payload::InboundMessageReceived(message))
    }

    fn when_input(&mut self, input: &Envelope) -> Vec<Envelope> {
        let config = self.config();
        if self.aligned {
            align_state(&mut self.state, &config);
        }
        let events = decide(&self.state, &config, input.clone()).expect("routable");
        for event in &events {
            evolve(&mut self.state, event);
        }
        events
    }

    /// When `visitor` writes on the chat channel: decide, then evolve with what was decided.
    fn when(&mut self, visitor: &str, provider_message_id: &str) -> Vec<Envelope> {
        let input = self.inbound(visitor, provider_message_id);
        self.when_input(&input)
    }

    fn when_message(&mut self, message: InboundMessageReceived) -> Vec<Envelope> {
        let input = self.input(Payload::InboundMessageReceived(message));
        self.when_input(&input)
    }

    fn when_command(&mut self, payload: Payload) -> Vec<Envelope> {
        let input = self.input(payload);
        self.when_input(&input)
    }

    fn set_open_conversations(&mut self, agent_id: &str, open_conversations: u32) {
        let mut workload = self.state.agents.workload(ACCOUNT, agent_id).cloned().unwrap_or_default();
        workload.open_conversations = open_conversations;
        self.state.agents.restore_workload(ACCOUNT, agent_id, workload);
    }

    fn open_conversations(&self, agent_id: &str) -> u32 {
        self.state.agents.workload(ACCOUNT, agent_id).map_or(0, |workload| workload.open_conversations)
    }
}

fn payloads(events: &[Envelope]) -> Vec<&Payload> {
    events.iter().filter_map(|event| event.payload.as_ref()).collect()
}

fn names(events: &[Envelope]) -> Vec<&'static str> {
    payloads(events).into_iter().map(payload_name).collect()
}

fn routing_outcome(events: &[Envelope]) -> Option<&Payload> {
    payloads(events)
        .into_iter()
        .find(|payload| matches!(payload, Payload::ConversationAssigned(_) | Payload::ConversationLeftUnassigned(_)))
}

fn assignee(events: &[Envelope]) -> Option<String> {
    match routing_outcome(events) {
        Some(Payload::ConversationAssigned(assigned)) => Some(assigned.assignee_agent_id.clone()),
        _ => None,
    }
}

fn assignees(events: &[Envelope]) -> Vec<(String, String)> {
    payloads(events)
        .into_iter()
        .filter_map(|payload| match payload {
            Payload::ConversationAssigned(assigned) => {
                Some((assigned.conversation_id.clone(), assigned.assignee_agent_id.clone()))
            }
            _ => None,
        })
        .collect()
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

fn started(events: &[Envelope]) -> Option<ConversationStarted> {
    payloads(events).into_iter().find_map(|payload| match payload {
        Payload::ConversationStarted(started) => Some(started.clone()),
        _ => None,
    })
}

fn ticket_created(events: &[Envelope]) -> Option<TicketCreated> {
    payloads(events).into_iter().find_map(|payload| match payload {
        Payload::TicketCreated(created) => Some(created.clone()),
        _ => None,
    })
}

fn rejection(events: &[Envelope]) -> Option<String> {
    payloads(events).into_iter().find_map(|payload| match payload {
        Payload::CommandRejected(rejected) => Some(rejected.reason.clone()),
        _ => None,
    })
}

fn conversation_of(events: &[Envelope]) -> String {
    started(events).expect("a conversation started").conversation_id
}

fn close_request(conversation_id: &str, request_id: &str) -> Payload {
    Payload::ConversationCloseRequested(ConversationCloseRequested {
        conversation_id: conversation_id.into(),
        request_id: request_id.into(),
        actor: None,
    })
}

fn assign_request(conversation_id: &str, assignee: &str, request_id: &str) -> Payload {
    Payload::ManualAssignmentRequested(ManualAssignmentRequested {
        conversation_id: conversation_id.into(),
        assignee_agent_id: assignee.into(),
        request_id: request_id.into(),
        actor: None,
    })
}

fn availability(agent_id: &str, available: bool, request_id: &str) -> Payload {
    Payload::AgentAvailabilityChanged(AgentAvailabilityChanged {
        agent_id: agent_id.into(),
        available,
        request_id: request_id.into(),
        actor: None,
    })
}

fn pool_of(agents: &[&str]) -> Given {
    Given::new().agents(agents.iter().map(|id| agent(id, true, true))).rules(rules(
        true,
        AssignTarget::SpecificUsersAndTeams,
        agents,
    ))
}

// ---------------------------------------------------------------------------------------------
// R10, B1: threading and duplicates.
// ---------------------------------------------------------------------------------------------

#[test]
fn r10_follow_up_in_open_conversation_joins_it_and_keeps_its_assignee() {
    let mut given = pool_of(&["ana", "bo"]);
    let first = given.when("visitor-1", "m1");
    assert_eq!(names(&first), ["contact_created", "conversation_started", "message_appended", "conversation_assigned"]);
    assert_eq!(assignee(&first).as_deref(), Some("ana"));
    let conversation_id = conversation_of(&first);

    let follow_up = given.when("visitor-1", "m2");
    assert_eq!(names(&follow_up), ["message_appended"]);
    let Some(Payload::MessageAppended(appended)) = &follow_up[0].payload else { panic!("{follow_up:?}") };
    assert_eq!(appended.conversation_id, conversation_id);
    assert_eq!(appended.thread_key, "visitor-1", "the event names its thread, as the first message's does");
    assert!(matches!(&first[2].payload, Some(Payload::MessageAppended(first)) if first.thread_key == "visitor-1"));
    assert_eq!(given.state.conversations.len(), 1, "never a second conversation");
    assert_eq!(given.state.conversation(&conversation_id).unwrap().1.assignee(), Some("ana"));
    assert_eq!(given.open_conversations("ana"), 1, "follow-ups add no workload");
}

/// B4: every decided event carries its cause's partition key, account and correlation, and
/// names the cause, whether it is the decision's only event or one of several.
#[test]
fn b4_every_decided_event_points_back_to_its_cause() {
    let mut given = pool_of(&["ana"]);
    let mut input = given.inbound("visitor-1", "m1");
    input.correlation_id = "the-customer-request".into();
    let first = given.when_input(&input);
    let follow_up_input = given.inbound("visitor-1", "m2");
    let follow_up = given.when_input(&follow_up_input);
    assert_eq!((first.len(), follow_up.len()), (4, 1));
    for (events, cause) in [(&first, &input), (&follow_up, &follow_up_input)] {
        for event in events {
            assert_eq!(event.causation_id, cause.event_id);
            assert_eq!(event.correlation_id, cause.correlation_id);
            assert_eq!((event.partition_key.as_str(), event.account_id.as_str()), (ACCOUNT, ACCOUNT));
        }
    }
    // A cause without a correlation id starts one: its own id.
    let mut uncorrelated = given.inbound("visitor-2", "m1");
    uncorrelated.correlation_id.clear();
    let events = given.when_input(&uncorrelated);
    assert!(events.iter().all(|event| event.correlation_id == uncorrelated.event_id));
}

#[test]
fn r10_a_closed_conversation_is_not_rejoined_the_next_message_starts_a_new_one() {
    let mut given = pool_of(&["ana"]);
    let first = conversation_of(&given.when("visitor-1", "m1"));
    given.when_command(close_request(&first, "close-1"));
    let second = given.when("visitor-1", "m2");
    assert_ne!(conversation_of(&second), first);
    assert!(!names(&second).contains(&"contact_created"), "same contact");
}

#[test]
fn b1_provider_retry_of_the_same_message_changes_nothing() {
    let mut given = Given::new().rules(rules(false, AssignTarget::Nobody, &[]));
    assert_eq!(given.when("visitor-1", "m1").len(), 4);
    let state_before = given.state.clone();
    assert!(given.when("visitor-1", "m1").is_empty(), "retry of the first message");
    given.when("visitor-1", "m2");
    assert!(given.when("visitor-1", "m2").is_empty(), "retry of a follow-up");
    assert_eq!(given.state.conversations.len(), state_before.conversations.len());
}

#[test]
fn b1_a_message_id_seen_on_any_channel_of_the_account_is_dropped() {
    let mut given = Given::new().channel(channel("chat-2", ChannelType::Chat));
    let message = given.message_on(CHANNEL, "visitor-1", "m1");
    assert!(!given.when_message(message.clone()).is_empty());
    // Same Switchboard message id, delivered again through another channel's adapter.
    let redelivered = InboundMessageReceived { channel_id: "chat-2".into(), ..message };
    assert!(given.when_message(redelivered).is_empty());
}

#[test]
fn b1_a_retry_after_its_conversation_closed_is_still_dropped() {
    let mut given = pool_of(&["ana"]);
    let conversation_id = conversation_of(&given.when("visitor-1", "m1"));
    given.when_command(close_request(&conversation_id, "close-1"));
    assert!(given.when("visitor-1", "m1").is_empty(), "remembered in the recent window");
    let key = message_key(&switchboard_runtime::ids::message_id_for(ACCOUNT, CHANNEL, "visitor-1:m1").to_string());
    assert!(given.state.dedup.retired().any(|retired| retired == key), "in the recent window, not open");
}

#[test]
fn b1_the_recent_window_is_bounded_and_forgets_oldest_first() {
    let mut window = crate::state::RecentSet::with_capacity(3);
    for key in [1u128, 2, 3, 2, 4] {
        window.insert(key);
    }
    assert!(!window.contains(&1), "oldest evicted");
    assert!(window.contains(&2) && window.contains(&3) && window.contains(&4));
    assert_eq!(window.order.len(), 3);
}

// ---------------------------------------------------------------------------------------------
// C4, C11, C6: contacts, channel status, consent.
// ---------------------------------------------------------------------------------------------

#[test]
fn c4_first_message_from_an_unknown_identity_creates_one_contact_with_a_deterministic_id() {
    let mut given = Given::new();
    let first = given.when("visitor-1", "m1");
    let Some(Payload::ContactCreated(created)) = first[0].payload.as_ref() else { panic!("{first:?}") };
    assert_eq!(created.contact_id, contact_id_for(ACCOUNT, CHANNEL, "visitor-1"));
    assert_eq!((created.channel_id.as_str(), created.external_id.as_str()), (CHANNEL, "visitor-1"));
    assert_eq!(started(&first).unwrap().contact_id, created.contact_id);
    let follow_up = given.when("visitor-1", "m2");
    assert_eq!(names(&follow_up), ["message_appended"], "no second contact");
    let Some(Payload::MessageAppended(appended)) = follow_up[0].payload.as_ref() else { panic!() };
    assert_eq!(appended.contact_id, created.contact_id);
    assert_ne!(contact_id_for(ACCOUNT, CHANNEL, "visitor-2"), created.contact_id);
}

#[test]
fn c4_another_sender_writing_in_an_open_thread_gets_their_own_contact() {
    let mut given = Given::new();
    let first = given.when("thread-1", "m1");
    let conversation_id = conversation_of(&first);
    // An email reply from someone CC'd: same thread, different sender.
    let mut reply = given.message_on(CHANNEL, "thread-1", "m2");
    reply.sender = Some(Sender { external_id: "cc@example.com".into(), ..Default::default() });
    let events = given.when_message(reply);
    assert_eq!(names(&events), ["contact_created", "message_appended"]);
    let Some(Payload::MessageAppended(appended)) = events[1].payload.as_ref() else { panic!() };
    assert_eq!(appended.conversation_id, conversation_id, "R10: same conversation");
    assert_eq!(appended.contact_id, contact_id_for(ACCOUNT, CHANNEL, "cc@example.com"));
}

#[test]
fn c11_messages_of_a_switched_off_channel_are_withheld_and_create_nothing() {
    let mut off = channel(CHANNEL, ChannelType::Chat);
    off.enabled = false;
    let mut given = pool_of(&["ana"]).channel(off);
    let events = given.when("visitor-1", "m1");
    assert_eq!(names(&events), ["message_withheld"]);
    let Some(Payload::MessageWithheld(withheld)) = events[0].payload.as_ref() else { panic!() };
    assert_eq!(withheld.reason, WithheldReason::ChannelOff as i32);
    assert!(withheld.message.is_none(), "a suppressed message is recorded, not kept for release");
    assert!(given.state.conversations.is_empty() && given.state.contacts.is_empty(), "not logged to contacts");
    assert!(given.when("visitor-1", "m1").is_empty(), "its retry is a duplicate (B1)");
}

#[test]
fn c11_messages_of_an_unknown_or_foreign_channel_are_withheld() {
    let mut given = Given::new();
    let message = given.message_on("nowhere", "visitor-1", "m1");
    let events = given.when_message(message);
    let Some(Payload::MessageWithheld(withheld)) = events[0].payload.as_ref() else { panic!("{events:?}") };
    assert_eq!(withheld.reason, WithheldReason::UnknownChannel as i32);
    let mut moved = given.snapshot.channels.remove(ACCOUNT, CHANNEL).unwrap();
    moved.account_id = "someone-else".into();
    given.snapshot.channels.insert(moved);
    let events = given.when("visitor-1", "m2");
    assert_eq!(names(&events), ["message_withheld"]);
}

fn messenger_with_explicit_consent() -> ChannelConfigured {
    let mut messenger = channel("fb-1", ChannelType::FacebookMessenger);
    messenger.messenger = Some(MessengerSettings { consent_mode: ConsentMode::Explicit as i32, ..Default::default() });
    messenger
}

fn consent(external_id: &str, granted: bool) -> Payload {
    Payload::ContactConsentReceived(ContactConsentReceived {
        channel_id: "fb-1".into(),
        sender_external_id: external_id.into(),
        granted,
        provider_event_id: format!("optin-{external_id}-{granted}"),
    })
}

#[test]
fn c6_explicit_consent_holds_messages_until_consent_then_releases_them_in_order() {
    let mut given = Given::new().agents([agent("ana", true, true)]).channel(messenger_with_explicit_consent());
    let mut messenger_rules = rules(true, AssignTarget::SpecificUsersAndTeams, &["ana"]);
    messenger_rules.channel_id = "fb-1".into();
    given = given.rules(messenger_rules);
    let first = given.message_on("fb-1", "psid-1", "mid-1");
    let second = given.message_on("fb-1", "psid-1", "mid-2");
    assert_eq!(names(&given.when_message(first.clone())), ["contact_created", "message_withheld"]);
    assert_eq!(names(&given.when_message(second.clone())), ["message_withheld"]);
    assert!(given.when_message(first.clone()).is_empty(), "a retry of a held message is a duplicate (B1)");
    assert!(given.state.conversations.is_empty(), "nothing reaches the inbox before consent");

    assert_eq!(names(&given.when_command(consent("psid-1", false))), ["contact_consent_received"]);
    assert!(given.state.conversations.is_empty(), "a refusal keeps holding");

    let released = given.when_command(consent("psid-1", true));
    assert_eq!(
        names(&released),
        [
            "contact_consent_received",
            "conversation_started",
            "message_appended",
            "conversation_assigned",
            "message_appended"
        ]
    );
    let appended: Vec<_> = payloads(&released)
        .into_iter()
        .filter_map(|payload| match payload {
            Payload::MessageAppended(appended) => Some(appended.message_id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(appended, [first.message_id.clone(), second.message_id.clone()], "arrival order");
    assert!(given.state.held_by_contact.is_empty());
    // From now on the contact's messages flow normally.
    let third = given.message_on("fb-1", "psid-1", "mid-3");
    assert_eq!(names(&given.when_message(third)), ["message_appended"]);
    assert!(given.when_message(first).is_empty(), "released messages stay deduplicated");
}

#[test]
fn c6_consent_given_with_the_message_lets_it_through() {
    let mut given = Given::new().channel(messenger_with_explicit_consent());
    let mut message = given.message_on("fb-1", "psid-9", "mid-1");
    message.content = Some(Box::new(InboundContent { consent: ConsentState::Given as i32, ..Default::default() }));
    let events = given.when_message(message);
    assert_eq!(
        names(&events)[..4],
        ["contact_created", "contact_consent_received", "conversation_started", "message_appended"]
    );
}

// ---------------------------------------------------------------------------------------------
// R1–R8, B2: assignment.
// ---------------------------------------------------------------------------------------------

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
    let mut given = pool_of(&["ana", "bo", "cy"]);
    let assigned: Vec<_> =
        (0..7).map(|index| assignee(&given.when(&format!("visitor-{index}"), "m")).unwrap()).collect();
    assert_eq!(assigned, ["ana", "bo", "cy", "ana", "bo", "cy", "ana"]);
}

#[test]
fn r3_round_robin_resumes_after_the_last_assignee_skipping_ineligible_and_wrapping() {
    let mut given = pool_of(&["ana", "bo", "cy"]);
    // The pool position of the last assignee comes from the channel's index: after "bo" comes
    // "cy", but "cy" is at capacity, so the turn wraps around to "ana".
    assert_eq!(assignee(&given.when("visitor-0", "m")).as_deref(), Some("ana"));
    assert_eq!(assignee(&given.when("visitor-1", "m")).as_deref(), Some("bo"));
    given.snapshot.agents.get_mut(ACCOUNT, "cy").expect("configured").max_open_conversations = 1;
    given.set_open_conversations("cy", 1);
    let events = given.when("visitor-2", "m");
    assert_eq!(assignee(&events).as_deref(), Some("ana"));
    assert_eq!(skipped(&events), [("cy".to_owned(), SkipReason::AtCapacity)]);
    assert_eq!(explanation(&events).eligible_agent_ids, ["ana", "bo"]);
}

#[test]
fn r8_workload_is_tracked_for_agent_ids_of_any_length() {
    // Short ids are stored inline in the workload map, long ones on the heap; both are the same
    // agent for lookups by `&str`.
    let long_id = "agent-with-a-rather-long-identifier-0001";
    let mut given = pool_of(&["ana", long_id]);
    given.when("visitor-0", "m");
    given.when("visitor-1", "m");
    assert_eq!(given.open_conversations("ana"), 1);
    assert_eq!(given.open_conversations(long_id), 1);
    let keys: Vec<String> = given.state.agents.recorded().map(|slot| slot.agent_id.to_string()).collect();
    assert!(keys.contains(&long_id.to_owned()) && keys.contains(&"ana".to_owned()), "{keys:?}");
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

fn contact_owner_given(owner_available: bool, only_available: bool) -> (Given, String) {
    let mut owner_rules = rules(true, AssignTarget::ContactOwner, &[]);
    owner_rules.only_available = only_available;
    let mut given =
        Given::new().agents([agent("ana", true, owner_available), agent("bo", true, true)]).rules(owner_rules);
    let first = given.when("visitor-1", "m1");
    let contact_id = started(&first).unwrap().contact_id;
    let conversation_id = conversation_of(&first);
    given.when_command(close_request(&conversation_id, "close-1"));
    let changed = given.when_command(Payload::ContactOwnerChangeRequested(ContactOwnerChangeRequested {
        contact_id: contact_id.clone(),
        owner_agent_id: "ana".into(),
        request_id: "owner-1".into(),
        actor: None,
    }));
    assert_eq!(names(&changed), ["contact_owner_changed"]);
    (given, contact_id)
}

#[test]
fn r4_contact_owner_rule_assigns_the_owner() {
    let (mut given, _) = contact_owner_given(true, true);
    let events = given.when("visitor-1", "m2");
    assert_eq!(assignee(&events).as_deref(), Some("ana"));
    assert!(!names(&events).contains(&"owner_notification_requested"));
}

#[test]
fn r4_offline_contact_owner_is_notified_and_the_conversation_waits() {
    let (mut given, contact_id) = contact_owner_given(false, true);
    let events = given.when("visitor-1", "m2");
    assert_eq!(unassigned_reason(&events), Some(UnassignedReason::NoEligibleAgent));
    assert_eq!(skipped(&events), [("ana".to_string(), SkipReason::Offline)]);
    let notification = payloads(&events)
        .into_iter()
        .find_map(|payload| match payload {
            Payload::OwnerNotificationRequested(notification) => Some(notification.clone()),
            _ => None,
        })
        .expect("owner notified");
    assert_eq!((notification.agent_id.as_str(), notification.contact_id.as_str()), ("ana", contact_id.as_str()));
    // Availability ignored by the rule: assigned anyway, and still notified.
    let (mut given, _) = contact_owner_given(false, false);
    let events = given.when("visitor-1", "m2");
    assert_eq!(assignee(&events).as_deref(), Some("ana"));
    assert!(names(&events).contains(&"owner_notification_requested"));
}

#[test]
fn r4_owner_change_for_an_unknown_contact_or_agent_is_rejected() {
    let mut given = Given::new();
    let contact_id = started(&given.when("visitor-1", "m1")).unwrap().contact_id;
    let request = |contact: &str, owner: &str, id: &str| {
        Payload::ContactOwnerChangeRequested(ContactOwnerChangeRequested {
            contact_id: contact.into(),
            owner_agent_id: owner.into(),
            request_id: id.into(),
            actor: None,
        })
    };
    assert!(rejection(&given.when_command(request("nobody", "ana", "r1"))).unwrap().contains("unknown contact"));
    assert!(rejection(&given.when_command(request(&contact_id, "ghost", "r2"))).unwrap().contains("unknown agent"));
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
fn r5_availability_command_is_authoritative_over_config_once_seen() {
    let mut given = pool_of(&["ana", "bo"]);
    assert_eq!(names(&given.when_command(availability("ana", false, "away-1"))), ["agent_availability_changed"]);
    let events = given.when("visitor-1", "m1");
    assert_eq!(assignee(&events).as_deref(), Some("bo"));
    assert_eq!(skipped(&events), [("ana".to_string(), SkipReason::Offline)]);
    // A config update saying "available" does not override the command.
    given.snapshot.agents.get_mut(ACCOUNT, "ana").unwrap().available = true;
    assert_eq!(assignee(&given.when("visitor-2", "m1")).as_deref(), Some("bo"));
    assert!(rejection(&given.when_command(availability("ghost", true, "x"))).unwrap().contains("unknown agent"));
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
fn r7_members_missing_a_required_skill_are_skipped() {
    let mut german = agent("ana", true, true);
    german.skills = vec!["german".into(), "billing".into()];
    let mut english = agent("bo", true, true);
    english.skills = vec!["english".into(), "billing".into()];
    let mut skill_rules = rules(true, AssignTarget::SpecificUsersAndTeams, &["bo", "ana"]);
    skill_rules.required_skills = vec!["german".into(), "billing".into()];
    let mut given = Given::new().agents([german, english]).rules(skill_rules);
    let events = given.when("visitor-1", "m1");
    assert_eq!(assignee(&events).as_deref(), Some("ana"));
    assert_eq!(skipped(&events), [("bo".to_string(), SkipReason::MissingSkill)]);
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
fn r8_capacity_per_channel_type_limits_only_that_type() {
    let mut limited = agent("ana", true, true);
    limited.capacity_per_channel_type =
        vec![ChannelTypeCapacity { channel_type: ChannelType::Chat as i32, max_open: 1 }];
    let mut email_rules = rules(true, AssignTarget::SpecificUsersAndTeams, &["ana"]);
    email_rules.channel_id = "email-1".into();
    let mut given = Given::new()
        .agents([limited])
        .rules(rules(true, AssignTarget::SpecificUsersAndTeams, &["ana"]))
        .channel(channel("email-1", ChannelType::TeamEmail))
        .rules(email_rules);
    assert_eq!(assignee(&given.when("visitor-1", "m")).as_deref(), Some("ana"));
    let second_chat = given.when("visitor-2", "m");
    assert_eq!(skipped(&second_chat), [("ana".to_string(), SkipReason::AtCapacity)]);
    let mut mail = given.message_on("email-1", "someone@example.com", "<mail-1>");
    mail.channel_type = ChannelType::TeamEmail as i32;
    assert_eq!(assignee(&given.when_message(mail)).as_deref(), Some("ana"), "email has no per-type limit");
    assert_eq!(
        given.state.agents.workload(ACCOUNT, "ana").unwrap().open_by_channel_type[ChannelType::Chat as usize],
        1
    );
}

#[test]
fn r8_workload_follows_assignment_reassignment_unassignment_and_close() {
    let mut given = pool_of(&["ana", "bo"]);
    let conversation_id = conversation_of(&given.when("visitor-1", "m1"));
    assert_eq!((given.open_conversations("ana"), given.open_conversations("bo")), (1, 0));
    let reassigned = given.when_command(assign_request(&conversation_id, "bo", "move-1"));
    assert_eq!(assignees(&reassigned), [(conversation_id.clone(), "bo".to_string())]);
    assert_eq!((given.open_conversations("ana"), given.open_conversations("bo")), (0, 1));
    let unassigned = given.when_command(assign_request(&conversation_id, "", "unassign-1"));
    assert_eq!(names(&unassigned), ["conversation_unassigned"]);
    assert_eq!(given.open_conversations("bo"), 0);
    given.when_command(assign_request(&conversation_id, "ana", "assign-2"));
    let closed = given.when_command(close_request(&conversation_id, "close-1"));
    let Some(Payload::ConversationClosed(closed)) = closed[0].payload.as_ref() else { panic!("{closed:?}") };
    assert_eq!((closed.reason, closed.previous_assignee_agent_id.as_str()), (CloseReason::Agent as i32, "ana"));
    assert_eq!(given.open_conversations("ana"), 0);
    assert!(given.state.conversations.is_empty());
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
    let mut full = agent("busy", true, true);
    full.max_open_conversations = 1;
    let mut given = Given::new()
        .agents([agent("ana", true, true), agent("off", true, false), agent("free", false, true), full])
        .rules(rules(true, AssignTarget::SpecificUsersAndTeams, &["ana", "off", "free", "ghost", "busy"]));
    given.set_open_conversations("busy", 1);
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
            ("ghost".to_string(), SkipReason::UnknownAgent),
            ("busy".to_string(), SkipReason::AtCapacity),
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Manual commands and B6.
// ---------------------------------------------------------------------------------------------

#[test]
fn i4_a_retried_manual_assignment_is_recognised_even_after_a_later_reassignment() {
    let mut given = pool_of(&["ana", "bo"]);
    let conversation_id = conversation_of(&given.when("visitor-1", "m1"));
    let first = given.when_command(assign_request(&conversation_id, "bo", "assign-to-bo"));
    assert_eq!(assignees(&first), [(conversation_id.clone(), "bo".to_string())]);
    let Some(Payload::ConversationAssigned(assigned)) = &first[0].payload else { panic!("{first:?}") };
    assert_eq!(assigned.request_id, "assign-to-bo", "the decision names the request it answers");
    given.when_command(assign_request(&conversation_id, "ana", "assign-to-ana"));
    // The API retries its first request after a timeout: it must not take the conversation back.
    let retried = given.when_command(assign_request(&conversation_id, "bo", "assign-to-bo"));
    assert_eq!(names(&retried), ["command_rejected"]);
    assert_eq!(given.open_conversations("ana"), 1);
    assert_eq!(given.open_conversations("bo"), 0);
}

#[test]
fn b6_every_command_yields_at_least_one_event_and_inapplicable_ones_are_rejected() {
    let mut given = pool_of(&["ana"]);
    let conversation_id = conversation_of(&given.when("visitor-1", "m1"));
    let table: Vec<(Payload, Option<&str>)> = vec![
        (assign_request("no-such-conversation", "ana", "a1"), Some("is not open")),
        (assign_request(&conversation_id, "ana", "a2"), Some("already assigned")),
        (assign_request(&conversation_id, "ghost", "a3"), Some("unknown agent")),
        (close_request(&conversation_id, "c1"), None),
        (close_request(&conversation_id, "c2"), Some("is not open")),
        (close_request(&conversation_id, "c1"), Some("request already applied")),
        (
            Payload::TicketStageChangeRequested(TicketStageChangeRequested {
                ticket_id: "no-ticket".into(),
                stage: "done".into(),
                close: false,
                request_id: "t1".into(),
                actor: None,
            }),
            Some("is not open"),
        ),
        (availability("ana", false, "v1"), None),
        (availability("ana", false, "v1"), Some("request already applied")),
    ];
    for (command, expected_rejection) in table {
        let name = payload_name(&command);
        let events = given.when_command(command);
        assert!(!events.is_empty(), "{name} produced no event");
        assert_eq!(rejection(&events).is_some(), expected_rejection.is_some(), "{name}: {events:?}");
        if let Some(expected) = expected_rejection {
            assert!(rejection(&events).unwrap().contains(expected), "{name}: {events:?}");
        }
    }
}

#[test]
fn inputs_that_are_not_routable_are_rejected_not_panicked_on() {
    let mut given = Given::new();
    let mut no_thread = given.inbound("", "m1");
    assert!(matches!(
        decide(&given.state, &given.config(), no_thread.clone()),
        Err(Rejection::MissingField { field: "thread_key", .. })
    ));
    no_thread.payload = Some(Payload::AgentConfigured(agent("ana", true, true)));
    assert!(matches!(decide(&given.state, &given.config(), no_thread.clone()), Err(Rejection::NotARouterInput { .. })));
}

// ---------------------------------------------------------------------------------------------
// T1–T3, R9, C7, I5: tickets.
// ---------------------------------------------------------------------------------------------

fn ticket_settings(limit: u32, fixed_owner: &str) -> TicketSettingsConfigured {
    TicketSettingsConfigured {
        channel_id: CHANNEL.into(),
        treat_as_tickets: true,
        default_pipeline: "support".into(),
        default_stage: "open".into(),
        fixed_owner_agent_id: fixed_owner.into(),
        contact_association_limit: limit,
        version: 1,
    }
}

#[test]
fn t1_r9_treat_as_tickets_creates_a_ticket_owned_by_the_conversation_assignee() {
    let mut given = pool_of(&["ana"]).tickets(ticket_settings(0, ""));
    let events = given.when("visitor-1", "m1");
    let ticket = ticket_created(&events).expect("ticket");
    assert_eq!((ticket.pipeline.as_str(), ticket.stage.as_str()), ("support", "open"));
    assert_eq!(
        (ticket.owner_agent_id.as_str(), ticket.owner_source),
        ("ana", TicketOwnerSource::ConversationAssignee as i32)
    );
    assert_eq!(ticket.conversation_id, conversation_of(&events));
    assert_eq!(ticket.name, "hello from visitor-1");
    assert!(ticket_created(&given.when("visitor-1", "m2")).is_none(), "R10: a follow-up never makes a second ticket");
}

#[test]
fn r9_a_fixed_owner_overrides_the_assignee_and_unassigned_conversations_have_no_owner() {
    let mut given = pool_of(&["ana"]).tickets(ticket_settings(0, "lead"));
    let ticket = ticket_created(&given.when("visitor-1", "m1")).unwrap();
    assert_eq!((ticket.owner_agent_id.as_str(), ticket.owner_source), ("lead", TicketOwnerSource::Fixed as i32));
    let mut given = Given::new().tickets(ticket_settings(0, ""));
    let ticket = ticket_created(&given.when("visitor-1", "m1")).unwrap();
    assert_eq!((ticket.owner_agent_id.as_str(), ticket.owner_source), ("", TicketOwnerSource::None as i32));
}

#[test]
fn i5_help_desk_inbox_always_creates_tickets() {
    let mut given = Given::new().help_desk_inbox();
    let ticket = ticket_created(&given.when("visitor-1", "m1")).expect("help desk makes tickets without settings");
    assert_eq!((ticket.pipeline.as_str(), ticket.stage.as_str()), (DEFAULT_PIPELINE, DEFAULT_STAGE));
    let mut plain = Given::new();
    assert!(ticket_created(&plain.when("visitor-1", "m1")).is_none(), "conversations inbox without T1: no ticket");
}

#[test]
fn c7_form_ticket_fields_override_name_description_pipeline_and_stage() {
    let mut given = Given::new().tickets(ticket_settings(0, ""));
    let mut submission = given.message_on(CHANNEL, "form-visitor", "sub-1");
    submission.content = Some(Box::new(InboundContent {
        form_ticket: Some(FormTicketFields {
            name: "Broken invoice".into(),
            description: "Invoice 42 is wrong".into(),
            pipeline: "billing".into(),
            stage: "triage".into(),
        }),
        ..Default::default()
    }));
    let ticket = ticket_created(&given.when_message(submission)).unwrap();
    assert_eq!(
        (ticket.name.as_str(), ticket.description.as_str(), ticket.pipeline.as_str(), ticket.stage.as_str()),
        ("Broken invoice", "Invoice 42 is wrong", "billing", "triage")
    );
}

#[test]
fn t2_c7_a_contact_at_its_association_limit_gets_no_ticket_but_the_conversation_exists() {
    let mut given = pool_of(&["ana"]).tickets(ticket_settings(1, ""));
    let first = given.when("visitor-1", "m1");
    given.when_command(close_request(&conversation_of(&first), "close-1"));
    let second = given.when("visitor-1", "m2");
    assert!(started(&second).is_some(), "the conversation itself is created");
    let not_created = payloads(&second)
        .into_iter()
        .find_map(|payload| match payload {
            Payload::TicketNotCreated(not_created) => Some(not_created.clone()),
            _ => None,
        })
        .expect("the event says why");
    assert_eq!((not_created.reason, not_created.limit), (TicketNotCreatedReason::ContactAtAssociationLimit as i32, 1));
    assert!(ticket_created(&given.when("visitor-2", "m3")).is_some(), "other contacts are not limited");
}

#[test]
fn t3_ticket_stage_changes_and_closing_it_closes_the_conversation() {
    let mut given = pool_of(&["ana"]).tickets(ticket_settings(0, ""));
    let ticket = ticket_created(&given.when("visitor-1", "m1")).unwrap();
    let stage_request = |stage: &str, close: bool, request_id: &str| {
        Payload::TicketStageChangeRequested(TicketStageChangeRequested {
            ticket_id: ticket.ticket_id.clone(),
            stage: stage.into(),
            close,
            request_id: request_id.into(),
            actor: None,
        })
    };
    let moved = given.when_command(stage_request("waiting-on-customer", false, "s1"));
    let Some(Payload::TicketStageChanged(changed)) = moved[0].payload.as_ref() else { panic!("{moved:?}") };
    assert_eq!(
        (changed.previous_stage.as_str(), changed.stage.as_str(), changed.closed),
        ("open", "waiting-on-customer", false)
    );
    let closed = given.when_command(stage_request("done", true, "s2"));
    assert_eq!(names(&closed), ["ticket_stage_changed", "conversation_closed"]);
    let Some(Payload::ConversationClosed(conversation_closed)) = closed[1].payload.as_ref() else { panic!() };
    assert_eq!(conversation_closed.reason, CloseReason::TicketClosed as i32);
    assert_eq!(given.open_conversations("ana"), 0);
    assert!(
        rejection(&given.when_command(stage_request("reopened", false, "s3"))).is_some(),
        "closed tickets stay closed"
    );
}

// ---------------------------------------------------------------------------------------------
// B3: backlog re-drive.
// ---------------------------------------------------------------------------------------------

fn redrive_given(redrive_backlog: bool) -> Given {
    let mut limited = agent("ana", true, true);
    limited.max_open_conversations = 1;
    let mut redrive_rules = rules(true, AssignTarget::SpecificUsersAndTeams, &["ana"]);
    redrive_rules.redrive_backlog = redrive_backlog;
    Given::new().agents([limited]).rules(redrive_rules)
}

#[test]
fn b3_closing_frees_capacity_and_the_oldest_waiting_conversation_is_assigned() {
    let mut given = redrive_given(true);
    let first = conversation_of(&given.when("visitor-1", "m1"));
    let waiting_older = given.when("visitor-2", "m1");
    assert_eq!(unassigned_reason(&waiting_older), Some(UnassignedReason::NoEligibleAgent));
    let waiting_younger = given.when("visitor-3", "m1");
    let closed = given.when_command(close_request(&first, "close-1"));
    assert_eq!(names(&closed), ["conversation_closed", "conversation_assigned"]);
    assert_eq!(assignees(&closed), [(conversation_of(&waiting_older), "ana".to_string())], "oldest first");
    assert!(explanation(&closed).rule_version == 7, "re-drive decisions are explained like any other");
    assert!(
        given
            .state
            .waiting(ACCOUNT, CHANNEL)
            .expect("a backlog")
            .contains(crate::ids::conversation_key(&conversation_of(&waiting_younger)))
    );
}

#[test]
fn b3_an_agent_coming_online_takes_waiting_conversations_up_to_capacity() {
    let mut given = redrive_given(true);
    given.snapshot.agents.get_mut(ACCOUNT, "ana").unwrap().max_open_conversations = 2;
    given.when_command(availability("ana", false, "away"));
    let waiting: Vec<String> =
        (0..3).map(|index| conversation_of(&given.when(&format!("visitor-{index}"), "m1"))).collect();
    let online = given.when_command(availability("ana", true, "back"));
    assert_eq!(
        assignees(&online),
        [(waiting[0].clone(), "ana".to_string()), (waiting[1].clone(), "ana".to_string())],
        "oldest first, never beyond capacity"
    );
    assert_eq!(given.open_conversations("ana"), 2);
}

#[test]
fn b3_channels_that_do_not_opt_in_are_not_redriven() {
    let mut given = redrive_given(false);
    let first = conversation_of(&given.when("visitor-1", "m1"));
    given.when("visitor-2", "m1");
    assert_eq!(names(&given.when_command(close_request(&first, "close-1"))), ["conversation_closed"]);
}

#[test]
fn b3_an_unassigned_conversation_is_not_handed_straight_back() {
    let mut given = redrive_given(true);
    let first = conversation_of(&given.when("visitor-1", "m1"));
    let waiting = conversation_of(&given.when("visitor-2", "m1"));
    let unassigned = given.when_command(assign_request(&first, "", "unassign-1"));
    assert_eq!(assignees(&unassigned), [(waiting, "ana".to_string())]);
}

// ---------------------------------------------------------------------------------------------
// B4: determinism, rebuild from output, snapshots.
// ---------------------------------------------------------------------------------------------

/// One step of a random scenario.
#[derive(Debug, Clone)]
enum Step {
    Message { visitor: u8, message: u8 },
    ToggleAvailability { agent: u8 },
    Close { visitor: u8 },
    Reassign { visitor: u8, agent: u8 },
    CloseTicket { visitor: u8 },
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0u8..30, 0u8..4).prop_map(|(visitor, message)| Step::Message { visitor, message }),
        1 => (0u8..4).prop_map(|agent| Step::ToggleAvailability { agent }),
        2 => (0u8..30).prop_map(|visitor| Step::Close { visitor }),
        1 => (0u8..30, 0u8..5).prop_map(|(visitor, agent)| Step::Reassign { visitor, agent }),
        1 => (0u8..30).prop_map(|visitor| Step::CloseTicket { visitor }),
    ]
}

/// Runs a scenario; returns every emitted event and the final state.
fn run(steps: &[Step], strategy: AssignmentStrategy, aligned: bool) -> (Vec<Envelope>, RouterState) {
    let agents = (0..4).map(|index| {
        let mut entity = agent(&format!("agent-{index}"), index != 3, true);
        entity.max_open_conversations = 3;
        entity
    });
    let mut pool_rules =
        rules(true, AssignTarget::SpecificUsersAndTeams, &["agent-0", "agent-1", "agent-2", "agent-3"]);
    pool_rules.strategy = strategy as i32;
    pool_rules.redrive_backlog = true;
    let mut given = Given::new().agents(agents).rules(pool_rules).tickets(ticket_settings(2, ""));
    given.aligned = aligned;
    let mut emitted = Vec::new();
    let mut availability_by_agent = [true; 4];
    for (index, step) in steps.iter().enumerate() {
        let request_id = format!("request-{index}");
        let conversation_of_visitor = |given: &Given, visitor: u8| {
            given.state.open_conversation_id(ACCOUNT, CHANNEL, &format!("v{visitor}")).unwrap_or_default()
        };
        let events = match step {
            Step::Message { visitor, message } => given.when(&format!("v{visitor}"), &format!("m{message}")),
            Step::ToggleAvailability { agent } => {
                let available = &mut availability_by_agent[*agent as usize];
                *available = !*available;
                let available = *available;
                given.when_command(availability(&format!("agent-{agent}"), available, &request_id))
            }
            Step::Close { visitor } => {
                let conversation_id = conversation_of_visitor(&given, *visitor);
                given.when_command(close_request(&conversation_id, &request_id))
            }
            Step::Reassign { visitor, agent } => {
                let conversation_id = conversation_of_visitor(&given, *visitor);
                let assignee = if *agent == 4 { String::new() } else { format!("agent-{agent}") };
                given.when_command(assign_request(&conversation_id, &assignee, &request_id))
            }
            Step::CloseTicket { visitor } => {
                let conversation_id = conversation_of_visitor(&given, *visitor);
                let ticket_id = given
                    .state
                    .conversation(&conversation_id)
                    .and_then(|(_, conversation)| conversation.ticket_id_opt.clone())
                    .unwrap_or_default();
                given.when_command(Payload::TicketStageChangeRequested(TicketStageChangeRequested {
                    ticket_id,
                    stage: "done".into(),
                    close: true,
                    request_id,
                    actor: None,
                }))
            }
        };
        emitted.extend(events);
    }
    (emitted, given.state)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// B4: the same inputs always give the same decisions (also when the state's agent slots
    /// are not aligned with the config, the slower by-id path); the state rebuilt by folding
    /// the emitted events (what a restarted router does) equals the live state; and a snapshot
    /// decodes to exactly the state it was taken of.
    #[test]
    fn b4_decisions_are_deterministic_and_state_is_rebuilt_from_output_and_snapshots(
        steps in proptest::collection::vec(step_strategy(), 0..120),
        balanced in any::<bool>(),
    ) {
        let strategy = if balanced { AssignmentStrategy::Balanced } else { AssignmentStrategy::RoundRobin };
        let (first_events, first_state) = run(&steps, strategy, true);
        let (second_events, _) = run(&steps, strategy, false);
        prop_assert_eq!(&first_events, &second_events);

        let mut rebuilt = RouterState::default();
        for event in &first_events {
            evolve(&mut rebuilt, event);
        }
        prop_assert_eq!(&rebuilt, &first_state);

        let restored = crate::snapshot::decode_state(&crate::snapshot::encode_state(&first_state)).unwrap();
        prop_assert_eq!(&restored, &first_state);
    }

    /// B4: a snapshot's bytes depend on the state alone, never on how its hash maps were
    /// filled (their iteration order is the hasher's, which may change between versions).
    #[test]
    fn b4_a_snapshot_is_the_same_bytes_however_its_maps_were_filled(
        steps in proptest::collection::vec(step_strategy(), 0..120),
    ) {
        let (_, state) = run(&steps, AssignmentStrategy::RoundRobin, true);
        let bytes = crate::snapshot::encode_state(&state);
        let mut refilled = crate::snapshot::decode_state(&bytes).unwrap();
        let mut contacts = crate::fast_hash::FastMap::with_capacity_and_hasher(4096, Default::default());
        contacts.extend(refilled.contacts.drain());
        refilled.contacts = contacts;
        let mut tickets = crate::fast_hash::FastMap::with_capacity_and_hasher(4096, Default::default());
        tickets.extend(refilled.tickets.drain());
        refilled.tickets = tickets;
        let mut held = crate::fast_hash::FastMap::with_capacity_and_hasher(4096, Default::default());
        held.extend(refilled.held_by_contact.drain());
        refilled.held_by_contact = held;
        let mut last_round_robin = crate::fast_hash::FastMap::with_capacity_and_hasher(4096, Default::default());
        last_round_robin.extend(refilled.agents.last_round_robin_agent_by_channel.drain());
        refilled.agents.last_round_robin_agent_by_channel = last_round_robin;
        prop_assert_eq!(&refilled, &state);
        prop_assert_eq!(crate::snapshot::encode_state(&refilled), bytes);
    }

    /// R8, R6, R10, T2 invariants hold for any sequence: nobody over capacity at any point, no
    /// seatless agent auto-assigned, one open conversation per thread, no contact over its
    /// ticket limit, workload equal to the open conversations assigned.
    #[test]
    fn r8_r6_r10_t2_invariants_hold_for_any_sequence(steps in proptest::collection::vec(step_strategy(), 0..200)) {
        let (events, state) = run(&steps, AssignmentStrategy::RoundRobin, true);
        let mut replayed = RouterState::default();
        for event in &events {
            evolve(&mut replayed, event);
            if let Some(Payload::ConversationAssigned(assigned)) = &event.payload
                && assigned.explanation.as_ref().is_some_and(|explanation| explanation.rule_version != 0)
            {
                prop_assert!(replayed.agents.workload(&event.account_id, &assigned.assignee_agent_id).unwrap().open_conversations <= 3);
                prop_assert_ne!(assigned.assignee_agent_id.as_str(), "agent-3", "agent-3 has no paid seat");
            }
        }
        for slot in state.agents.recorded() {
            let assigned = state
                .conversations
                .iter()
                .filter(|(_, conversation)| conversation.assignee() == Some(slot.agent_id.as_str()))
                .count() as u32;
            prop_assert_eq!(slot.workload.open_conversations, assigned, "{}", slot.agent_id);
        }
        prop_assert_eq!(state.conversations.thread_count(), state.conversations.len());
        for contact in state.contacts.values() {
            prop_assert!(contact.ticket_count <= 2);
        }
    }
}

/// M1: a partition routes several accounts; two of them using the same channel id, agent id
/// and visitor id never share a conversation, a contact or a workload.
#[test]
fn m1_accounts_sharing_a_partition_and_ids_never_share_conversations_contacts_or_workloads() {
    const OTHER: &str = "acct-2";
    let mut ana = agent("ana", true, true);
    ana.max_open_conversations = 1;
    let mut given =
        Given::new().agents([ana.clone()]).rules(rules(true, AssignTarget::SpecificUsersAndTeams, &["ana"]));
    given.snapshot.channels.insert(Owned { account_id: OTHER.into(), entity: channel(CHANNEL, ChannelType::Chat) });
    given.snapshot.agents.insert(Owned { account_id: OTHER.into(), entity: ana });
    given
        .snapshot
        .routing_rules
        .insert(Owned { account_id: OTHER.into(), entity: rules(true, AssignTarget::SpecificUsersAndTeams, &["ana"]) });
    let first = given.when("visitor", "m1");
    let mut input = given.inbound("visitor", "m1");
    input.account_id = OTHER.into();
    if let Some(Payload::InboundMessageReceived(message)) = input.payload.as_mut() {
        message.message_id =
            switchboard_runtime::ids::message_id_for(OTHER, CHANNEL, &message.provider_message_id).to_string();
    }
    let second = given.when_input(&input);

    let started = |events: &[Envelope]| match payloads(events).into_iter().find_map(|payload| match payload {
        Payload::ConversationStarted(started) => Some(started.clone()),
        _ => None,
    }) {
        Some(started) => started,
        None => panic!("no conversation started: {:?}", names(events)),
    };
    let (first_started, second_started) = (started(&first), started(&second));
    assert_ne!(first_started.conversation_id, second_started.conversation_id);
    assert_ne!(first_started.contact_id, second_started.contact_id, "a contact per account");
    assert_eq!(second_started.contact_id, contact_id_for(OTHER, CHANNEL, "visitor"));
    // Each account's ana has room for one: both are assigned, each to their own ana.
    assert_eq!(assignee(&first).as_deref(), Some("ana"));
    assert_eq!(assignee(&second).as_deref(), Some("ana"));
    assert_eq!(given.state.agents.workload(ACCOUNT, "ana").map(|w| w.open_conversations), Some(1));
    assert_eq!(given.state.agents.workload(OTHER, "ana").map(|w| w.open_conversations), Some(1));
    // A follow-up joins its own account's conversation.
    let follow_up = given.when("visitor", "m2");
    assert!(
        payloads(&follow_up).iter().any(|payload| matches!(payload,
            Payload::MessageAppended(appended) if appended.conversation_id == first_started.conversation_id)),
        "{:?}",
        names(&follow_up)
    );
    // A command of one account naming the other's conversation is refused, not applied.
    let mut close = given.input(Payload::ConversationCloseRequested(ConversationCloseRequested {
        conversation_id: first_started.conversation_id.clone(),
        request_id: "close-1".into(),
        ..Default::default()
    }));
    close.account_id = OTHER.into();
    let refused = given.when_input(&close);
    assert_eq!(names(&refused), ["command_rejected"]);
    assert!(given.state.conversation(&first_started.conversation_id).is_some());
}

/// M1 upgrade: a contact the log created before ids named the account keeps its id and is still
/// found by identity, in its own account only.
#[test]
fn m1_contacts_created_before_ids_named_the_account_keep_their_id() {
    let mut given = Given::new();
    let legacy_id = crate::ids::legacy_contact_uuid_for(CHANNEL, "visitor-old").hyphenated().to_string();
    let mut created = given.input(Payload::ContactCreated(ContactCreated {
        contact_id: legacy_id.clone(),
        channel_id: CHANNEL.into(),
        external_id: "visitor-old".into(),
        ..Default::default()
    }));
    created.schema_version = 1;
    evolve(&mut given.state, &created);
    assert_eq!(given.state.legacy_contacts, 1);
    let events = given.when("visitor-old", "m1");
    assert!(!names(&events).contains(&"contact_created"), "{:?}", names(&events));
    let started = payloads(&events).into_iter().find_map(|payload| match payload {
        Payload::ConversationStarted(started) => Some(started.contact_id.clone()),
        _ => None,
    });
    assert_eq!(started, Some(legacy_id.clone()));
    assert!(given.state.contact("acct-2", CHANNEL, "visitor-old").is_none(), "never another account's");
    // Contacts made now are not legacy: lookups of new senders stay one hash.
    given.when("visitor-new", "m1");
    assert_eq!(given.state.legacy_contacts, 1);
}

// ---------------------------------------------------------------------------------------------
// O6: automated messages (R4 owner email, C6 greeting, instant reply, consent prompt), O5
// provider statuses.
// ---------------------------------------------------------------------------------------------

use switchboard_proto::events::v1::{AuthorKind, MessengerMessagingType, OutboundPurpose};
use switchboard_runtime::outbound::{default_fallback_address, email_message_id};

fn queued(events: &[Envelope]) -> Vec<(&Envelope, &OutboundMessageQueued)> {
    events
        .iter()
        .filter_map(|event| match event.payload.as_ref() {
            Some(Payload::OutboundMessageQueued(queued)) => Some((event, queued)),
            _ => None,
        })
        .collect()
}

fn owner_notification(events: &[Envelope]) -> OwnerNotificationRequested {
    payloads(events)
        .into_iter()
        .find_map(|payload| match payload {
            Payload::OwnerNotificationRequested(notification) => Some(notification.clone()),
            _ => None,
        })
        .expect("owner notified")
}

/// An account whose contact "visitor-1" is owned by `owner` (offline), on a channel assigning
/// to the contact owner; the first conversation is closed again.
fn offline_owner_given(owner: AgentConfigured) -> Given {
    let owner_id = owner.agent_id.clone();
    let mut given = Given::new().agents([owner]).rules(rules(true, AssignTarget::ContactOwner, &[]));
    given.snapshot.inboxes.insert(owned(InboxConfigured {
        inbox_id: INBOX.into(),
        name: "Support".into(),
        ..Default::default()
    }));
    let first = given.when("visitor-1", "m1");
    let contact_id = started(&first).unwrap().contact_id;
    given.when_command(close_request(&conversation_of(&first), "close-1"));
    given.when_command(Payload::ContactOwnerChangeRequested(ContactOwnerChangeRequested {
        contact_id,
        owner_agent_id: owner_id,
        request_id: "owner-1".into(),
        actor: None,
    }));
    given
}

#[test]
fn r4_offline_owner_gets_an_email_from_the_inbox_fallback_address() {
    let mut ana = agent("ana", true, false);
    ana.name = "Ana Lima".into();
    ana.email = "ana@acme.example".into();
    let mut given = offline_owner_given(ana);
    let input = given.inbound("visitor-1", "m2");
    let events = given.when_input(&input);
    let conversation_id = conversation_of(&events);
    let notification = owner_notification(&events);
    let sent = queued(&events);
    assert_eq!(sent.len(), 1, "{:?}", names(&events));
    let (envelope, email) = sent[0];
    let reply_id = switchboard_runtime::envelope::derived_id(&input, "owner_notification");
    assert_eq!(email.reply_id, reply_id.hyphenated().to_string());
    assert_eq!(notification.reply_id, email.reply_id, "the audit names the email");
    assert_eq!(destination(envelope), Destination::Outbound);
    assert_eq!(envelope.partition_key, outbound_partition_key(ACCOUNT, &conversation_id));
    assert_eq!(envelope.account_id, ACCOUNT);
    assert_eq!(envelope.causation_id, input.event_id);
    assert_eq!(email.purpose, OutboundPurpose::OwnerNotification as i32);
    assert_eq!((email.conversation_id.as_str(), email.channel_id.as_str()), (conversation_id.as_str(), CHANNEL));
    assert_eq!(email.channel_type, ChannelType::Chat as i32, "the conversation's channel");
    assert_eq!((email.recipient.as_str(), email.recipient_name.as_str()), ("ana@acme.example", "Ana Lima"));
    let author = email.author.clone().unwrap();
    assert_eq!(author.kind, AuthorKind::Automation as i32);
    assert_eq!(author.automation, Automation::OwnerNotification as i32);
    let mail = email.email.clone().expect("an email");
    let fallback = default_fallback_address(ACCOUNT, INBOX, "fallback.switchboard.invalid");
    assert_eq!((mail.from_address.as_str(), mail.from_name.as_str()), (fallback.as_str(), "Support"));
    assert!(mail.from_fallback_address);
    assert_eq!(mail.to, ["ana@acme.example"]);
    assert_eq!(mail.subject, "New message from visitor-1 in Support");
    assert!(mail.text_body.contains("> hello from visitor-1"), "{}", mail.text_body);
    assert!(mail.text_body.contains(&conversation_id), "{}", mail.text_body);
    assert_eq!(mail.message_id_header, email_message_id(reply_id, &fallback));
    assert_eq!(email.idempotency_key, mail.message_id_header);
    // The notification is no conversation event: the state is what it was without it.
    let mut without = given.state.clone();
    for event in events.iter().filter(|event| destination(event) == Destination::Conversations) {
        evolve(&mut without, event);
    }
    assert_eq!(without, given.state);
}

#[test]
fn r4_owner_without_an_email_address_gets_no_email_and_the_event_says_so() {
    let mut given = offline_owner_given(agent("ana", true, false));
    let events = given.when("visitor-1", "m2");
    assert!(queued(&events).is_empty(), "{:?}", names(&events));
    assert_eq!(owner_notification(&events).reply_id, "", "no email was queued");
}

fn messenger_channel(
    consent_mode: ConsentMode,
    greeting: &str,
    instant_reply: &str,
    consent_text: &str,
) -> ChannelConfigured {
    let mut messenger = channel("fb-1", ChannelType::FacebookMessenger);
    messenger.name = "Acme on Facebook".into();
    messenger.messenger = Some(MessengerSettings {
        page_id: "page-77".into(),
        consent_mode: consent_mode as i32,
        consent_text: consent_text.into(),
        greeting: greeting.into(),
        instant_reply: instant_reply.into(),
    });
    messenger
}

impl Given {
    /// A Messenger message from `psid`, written `hours_ago` hours before the router records it.
    fn messenger_input(&mut self, psid: &str, mid: &str, hours_ago: i64) -> Envelope {
        let mut message = self.message_on("fb-1", psid, mid);
        message.channel_type = ChannelType::FacebookMessenger as i32;
        let mut input = self.input(Payload::InboundMessageReceived(message));
        let mut occurred = input.recorded_at.unwrap();
        occurred.seconds -= hours_ago * 3600;
        input.occurred_at = Some(occurred);
        input
    }
}

fn automations(events: &[Envelope]) -> Vec<(Automation, String)> {
    queued(events)
        .into_iter()
        .map(|(_, queued)| {
            let automation = Automation::try_from(queued.author.as_ref().unwrap().automation).unwrap();
            (automation, queued.text.clone())
        })
        .collect()
}

#[test]
fn c6_greeting_and_instant_reply_go_out_once_when_a_messenger_conversation_starts() {
    let channel = messenger_channel(ConsentMode::Implicit, "Welcome to Acme!", "We usually answer within an hour.", "");
    let mut given = Given::new().channel(channel);
    let input = given.messenger_input("psid-1", "mid-1", 0);
    let events = given.when_input(&input);
    let conversation_id = conversation_of(&events);
    assert_eq!(
        automations(&events),
        [
            (Automation::Greeting, "Welcome to Acme!".to_owned()),
            (Automation::InstantReply, "We usually answer within an hour.".to_owned())
        ]
    );
    for ((envelope, message), purpose) in queued(&events).into_iter().zip(["greeting", "instant_reply"]) {
        assert_eq!(destination(envelope), Destination::Outbound);
        assert_eq!(envelope.partition_key, outbound_partition_key(ACCOUNT, &conversation_id));
        assert_eq!(message.reply_id, switchboard_runtime::envelope::derived_id(&input, purpose).to_string());
        assert_eq!(message.idempotency_key, message.reply_id);
        assert_eq!(message.conversation_id, conversation_id);
        assert_eq!(message.purpose, OutboundPurpose::ConversationReply as i32);
        assert_eq!(message.channel_type, ChannelType::FacebookMessenger as i32);
        assert_eq!((message.recipient.as_str(), message.thread_key.as_str()), ("psid-1", "psid-1"), "the PSID");
        let author = message.author.clone().unwrap();
        assert_eq!((author.kind, author.name.as_str()), (AuthorKind::Automation as i32, "Acme on Facebook"));
        let messenger = message.messenger.clone().unwrap();
        assert_eq!(messenger.page_id, "page-77");
        assert_eq!(messenger.messaging_type, MessengerMessagingType::Response as i32);
        assert!(message.email.is_none());
    }
    let follow_up = given.messenger_input("psid-1", "mid-2", 0);
    assert_eq!(names(&given.when_input(&follow_up)), ["message_appended"], "once per conversation");
    // A new conversation (after a close) is greeted again.
    given.when_command(close_request(&conversation_id, "close-1"));
    let next = given.messenger_input("psid-1", "mid-3", 0);
    assert_eq!(automations(&given.when_input(&next)).len(), 2);
    // Other channels never get Messenger automations.
    assert!(queued(&given.when("visitor-1", "m1")).is_empty());
}

#[test]
fn c6_instant_reply_alone_when_no_greeting_is_configured_and_nothing_without_either() {
    let mut given = Given::new().channel(messenger_channel(ConsentMode::Implicit, "", "Thanks, we are on it.", ""));
    let input = given.messenger_input("psid-1", "mid-1", 0);
    assert_eq!(automations(&given.when_input(&input)), [(Automation::InstantReply, "Thanks, we are on it.".into())]);
    let mut given = Given::new().channel(messenger_channel(ConsentMode::Implicit, " ", "", ""));
    let input = given.messenger_input("psid-1", "mid-1", 0);
    assert!(queued(&given.when_input(&input)).is_empty());
}

#[test]
fn c6_greeting_and_instant_reply_are_not_sent_outside_the_24_hour_window() {
    let channel = messenger_channel(ConsentMode::Implicit, "Welcome!", "Got it.", "");
    let mut given = Given::new().channel(channel.clone());
    let late = given.messenger_input("psid-1", "mid-1", 25);
    let events = given.when_input(&late);
    assert!(started(&events).is_some(), "the conversation starts all the same");
    assert!(queued(&events).is_empty(), "{:?}", names(&events));
    let mut given = Given::new().channel(channel);
    let edge = given.messenger_input("psid-1", "mid-1", 24);
    assert_eq!(automations(&given.when_input(&edge)).len(), 2, "exactly 24 h is still inside");
}

#[test]
fn c6_consent_prompt_is_sent_once_while_a_thread_waits_for_consent() {
    let channel = messenger_channel(ConsentMode::Explicit, "Welcome!", "", "May we store your messages? Reply YES.");
    let mut given = Given::new().channel(channel);
    let first = given.messenger_input("psid-1", "mid-1", 0);
    let events = given.when_input(&first);
    assert_eq!(names(&events), ["contact_created", "message_withheld", "outbound_message_queued"]);
    let (envelope, prompt) = queued(&events)[0];
    assert_eq!(prompt.text, "May we store your messages? Reply YES.");
    assert_eq!(prompt.author.as_ref().unwrap().automation, Automation::ConsentPrompt as i32);
    assert_eq!(prompt.reply_id, switchboard_runtime::envelope::derived_id(&first, "consent_prompt").to_string());
    assert_eq!(prompt.conversation_id, "", "no conversation while the messages are held");
    assert_eq!((prompt.recipient.as_str(), prompt.messenger.as_ref().unwrap().page_id.as_str()), ("psid-1", "page-77"));
    assert_eq!(envelope.partition_key, outbound_partition_key(ACCOUNT, "fb-1/psid-1"));
    // The customer answers with a tap: the payloads are the words ingest's webhook recognises.
    let buttons: Vec<(String, String)> = prompt
        .messenger
        .as_ref()
        .unwrap()
        .quick_replies
        .iter()
        .map(|reply| (reply.title.clone(), reply.payload.clone()))
        .collect();
    assert_eq!(
        buttons,
        [
            ("Yes, continue".to_owned(), switchboard_runtime::outbound::CONSENT_GRANTED_PAYLOAD.to_owned()),
            ("No, thanks".to_owned(), switchboard_runtime::outbound::CONSENT_DECLINED_PAYLOAD.to_owned()),
        ]
    );
    let Some(Payload::MessageWithheld(withheld)) = events[1].payload.as_ref() else { panic!() };
    assert_eq!(withheld.consent_prompt_reply_id, prompt.reply_id);

    let second = given.messenger_input("psid-1", "mid-2", 0);
    assert_eq!(names(&given.when_input(&second)), ["message_withheld"], "prompted once");
    assert_eq!(names(&given.when_command(consent("psid-1", false))), ["contact_consent_received"]);
    let third = given.messenger_input("psid-1", "mid-3", 0);
    assert_eq!(names(&given.when_input(&third)), ["message_withheld"], "a refusal is not a new round");
    // Another sender on the same page is a thread of its own.
    let other = given.messenger_input("psid-2", "mid-1", 0);
    assert_eq!(automations(&given.when_input(&other)).len(), 1);

    // Consent: the held messages start the conversation, which is greeted (the consent is the
    // customer's latest interaction, inside the window).
    let released = given.when_command(consent("psid-1", true));
    assert_eq!(automations(&released), [(Automation::Greeting, "Welcome!".to_owned())]);
    assert_eq!(queued(&released)[0].1.conversation_id, conversation_of(&released));
    assert!(queued(&released)[0].1.messenger.as_ref().unwrap().quick_replies.is_empty(), "a greeting asks nothing");
    // Consent withdrawn later: the next held message asks again.
    given.when_command(consent("psid-1", false));
    let after = given.messenger_input("psid-1", "mid-4", 0);
    assert_eq!(
        automations(&given.when_input(&after)),
        [(Automation::ConsentPrompt, "May we store your messages? Reply YES.".into())]
    );
}

#[test]
fn c6_consent_prompt_outside_24_hours_is_not_sent_and_a_later_message_inside_them_is_prompted() {
    let channel = messenger_channel(ConsentMode::Explicit, "", "", "Agree?");
    let mut given = Given::new().channel(channel);
    let late = given.messenger_input("psid-1", "mid-1", 30);
    let events = given.when_input(&late);
    assert_eq!(names(&events), ["contact_created", "message_withheld"]);
    let Some(Payload::MessageWithheld(withheld)) = events[1].payload.as_ref() else { panic!() };
    assert_eq!(withheld.consent_prompt_reply_id, "");
    let fresh = given.messenger_input("psid-1", "mid-2", 1);
    assert_eq!(automations(&given.when_input(&fresh)), [(Automation::ConsentPrompt, "Agree?".into())]);
    // Without a consent text there is nothing to ask with.
    let mut given = Given::new().channel(messenger_channel(ConsentMode::Explicit, "", "", ""));
    let input = given.messenger_input("psid-1", "mid-1", 0);
    assert!(queued(&given.when_input(&input)).is_empty());
}

#[test]
fn c6_consent_prompt_once_only_across_restarts_and_replays() {
    let channel = messenger_channel(ConsentMode::Explicit, "", "", "Agree?");
    let mut given = Given::new().channel(channel);
    let first = given.messenger_input("psid-1", "mid-1", 0);
    let decided = given.when_input(&first);
    assert_eq!(automations(&decided).len(), 1);
    // A replay of the same input on the same state decides the same prompt, byte for byte
    // (B4): a transaction retried after an abort writes the same reply id.
    let mut before = RouterState::default();
    for event in decided.iter().filter(|event| destination(event) == Destination::Conversations) {
        evolve(&mut before, event);
    }
    // Recovery folds only the conversations topic; it must remember the prompt all the same.
    assert_eq!(before, given.state, "the state is a fold of the conversations output");
    // ...and a snapshot keeps it.
    let restored = crate::snapshot::decode_state(&crate::snapshot::encode_state(&given.state)).unwrap();
    for state in [before, restored] {
        given.state = state;
        let second = given.messenger_input("psid-1", "mid-2", 0);
        assert!(queued(&given.when_input(&second)).is_empty(), "not prompted twice after a restart");
    }
}

#[test]
fn c6_automated_messages_are_decided_deterministically() {
    let channel = messenger_channel(ConsentMode::Implicit, "Welcome!", "Got it.", "");
    let mut given = Given::new().channel(channel);
    let input = given.messenger_input("psid-1", "mid-1", 0);
    let config = given.config();
    let once = decide(&given.state, &config, input.clone()).unwrap();
    let twice = decide(&given.state, &config, input).unwrap();
    assert_eq!(once, twice);
}

#[test]
fn o5_provider_statuses_are_forwarded_unchanged_to_the_conversations_topic() {
    let mut given = Given::new();
    let status = DeliveryStatusReported {
        channel_id: "fb-1".into(),
        provider_message_id: "m_Out1".into(),
        recipient_external_id: "psid-1".into(),
        status: "echo".into(),
        error: String::new(),
    };
    let input = given.input(Payload::DeliveryStatusReported(status.clone()));
    let state_before = given.state.clone();
    let events = given.when_input(&input);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].payload, Some(Payload::DeliveryStatusReported(status)));
    assert_eq!(destination(&events[0]), Destination::Conversations);
    assert_eq!((events[0].causation_id.as_str(), events[0].account_id.as_str()), (input.event_id.as_str(), ACCOUNT));
    assert_eq!(events[0].occurred_at, input.occurred_at);
    assert_eq!(given.state, state_before, "statuses change no routing state");
}

/// One step of a random Messenger scenario (explicit consent, every automation configured).
#[derive(Debug, Clone)]
enum MessengerStep {
    Message { psid: u8, message: u8, hours_ago: u8 },
    Consent { psid: u8, granted: bool },
    Close { psid: u8 },
}

fn messenger_step_strategy() -> impl Strategy<Value = MessengerStep> {
    prop_oneof![
        6 => (0u8..4, 0u8..6, prop_oneof![4 => Just(0u8), 1 => 20u8..30])
            .prop_map(|(psid, message, hours_ago)| MessengerStep::Message { psid, message, hours_ago }),
        2 => (0u8..4, any::<bool>()).prop_map(|(psid, granted)| MessengerStep::Consent { psid, granted }),
        1 => (0u8..4).prop_map(|psid| MessengerStep::Close { psid }),
    ]
}

fn run_messenger(steps: &[MessengerStep]) -> (Vec<Envelope>, RouterState) {
    let mut given = Given::new().channel(messenger_channel(ConsentMode::Explicit, "Welcome!", "On it.", "Agree?"));
    let mut emitted = Vec::new();
    for (index, step) in steps.iter().enumerate() {
        let events = match step {
            MessengerStep::Message { psid, message, hours_ago } => {
                let input =
                    given.messenger_input(&format!("psid-{psid}"), &format!("mid-{message}"), *hours_ago as i64);
                given.when_input(&input)
            }
            MessengerStep::Consent { psid, granted } => {
                let Payload::ContactConsentReceived(mut consent) = consent(&format!("psid-{psid}"), *granted) else {
                    unreachable!()
                };
                consent.provider_event_id = format!("consent-{index}");
                given.when_command(Payload::ContactConsentReceived(consent))
            }
            MessengerStep::Close { psid } => {
                let conversation_id =
                    given.state.open_conversation_id(ACCOUNT, "fb-1", &format!("psid-{psid}")).unwrap_or_default();
                given.when_command(close_request(&conversation_id, &format!("close-{index}")))
            }
        };
        emitted.extend(events);
    }
    (emitted, given.state)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// C6 / O6 for any sequence of Messenger messages (some late), consents, refusals and
    /// closes: decisions are deterministic; the state rebuilt from the conversations topic alone
    /// (what recovery folds) and from a snapshot equals the live state; each conversation is
    /// greeted and instantly answered at most once; a thread is prompted for consent at most
    /// once until consent is granted; every automated message has its own id.
    #[test]
    fn c6_automated_messages_are_once_only_and_the_state_is_rebuilt_from_the_conversations_topic(
        steps in proptest::collection::vec(messenger_step_strategy(), 0..80),
    ) {
        let (events, state) = run_messenger(&steps);
        let (again, _) = run_messenger(&steps);
        prop_assert_eq!(&events, &again);

        let mut rebuilt = RouterState::default();
        for event in events.iter().filter(|event| destination(event) == Destination::Conversations) {
            evolve(&mut rebuilt, event);
        }
        prop_assert_eq!(&rebuilt, &state);
        let restored = crate::snapshot::decode_state(&crate::snapshot::encode_state(&state)).unwrap();
        prop_assert_eq!(&restored, &state);

        let mut per_conversation: std::collections::BTreeMap<(String, i32), usize> = Default::default();
        let mut prompted_since_grant: std::collections::BTreeSet<String> = Default::default();
        let mut reply_ids: std::collections::BTreeSet<String> = Default::default();
        for event in &events {
            match event.payload.as_ref() {
                Some(Payload::OutboundMessageQueued(queued)) => {
                    prop_assert!(reply_ids.insert(queued.reply_id.clone()), "reply id reused");
                    let automation = queued.author.as_ref().unwrap().automation;
                    if automation == Automation::ConsentPrompt as i32 {
                        prop_assert!(prompted_since_grant.insert(queued.recipient.clone()), "prompted twice");
                    } else {
                        let count = per_conversation.entry((queued.conversation_id.clone(), automation)).or_default();
                        *count += 1;
                        prop_assert_eq!(*count, 1, "automation sent twice in one conversation");
                    }
                }
                Some(Payload::ContactConsentReceived(consent)) if consent.granted => {
                    prompted_since_grant.remove(&consent.sender_external_id);
                }
                _ => {}
            }
        }
    }
}
