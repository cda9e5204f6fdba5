//! The router's decisions: a pure, synchronous, deterministic function of (state, config, input).
//!
//! - [`decide`] looks at the state and one inbound event and returns the events to emit.
//! - [`evolve`] (in [`crate::state`]) applies one emitted event to the state.
//!
//! No clock, no randomness, no I/O: time comes from the events, ids are derived from the cause,
//! and nothing depends on hash-map iteration order, so replaying the log re-derives the same
//! decisions byte for byte (B4). The Kafka shell (`crate::shell`) feeds inputs in and writes the
//! returned events out in one transaction with the consumed offsets.
//!
//! Rule map: threading R10; duplicates B1; unknown/switched-off channel C11; contacts C4;
//! consent C6; assignment R1–R8 with explanations B2; tickets T1–T3, R9, C7, I5; manual
//! commands (assign, unassign, close, contact owner, availability); backlog re-drive B3;
//! automated messages O6 (R4 owner email, C6 greeting, instant reply, consent prompt, built in
//! [`crate::automated`]); provider statuses forwarded for the projector (O5).
//!
//! Each decided event has a [`Destination`]: automated messages go to the outbound topic, keyed
//! by `runtime::outbound::outbound_partition_key`; everything else to the conversations topic
//! at the input's partition (the state's changelog).

use std::borrow::Cow;

use sha2::{Digest, Sha256};
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{
    Actor, AgentAvailabilityChanged, AssignTarget, AssignmentStrategy, Automation, ChannelType, CloseReason,
    CommandRejected, ConsentState, ContactConsentReceived, ContactCreated, ContactOwnerChangeRequested,
    ContactOwnerChanged, ConversationAssigned, ConversationCloseRequested, ConversationClosed,
    ConversationLeftUnassigned, ConversationStarted, ConversationUnassigned, Envelope, InboundMessageReceived,
    InboxConfigured, ManualAssignmentRequested, MessageAppended, MessageWithheld, MessengerSettings,
    OutboundMessageQueued, OwnerNotificationRequested, RoutingExplanation, RoutingRulesConfigured, SkipReason,
    SkippedCandidate, TicketCreated, TicketNotCreated, TicketNotCreatedReason, TicketOwnerSource,
    TicketSettingsConfigured, TicketStageChangeRequested, TicketStageChanged, UnassignedReason, WithheldReason,
};
use switchboard_runtime::envelope::{SCHEMA_VERSION, payload_name, recorded_at_millis};
use switchboard_runtime::outbound::outbound_partition_key;
use uuid::Uuid;

use crate::automated::{self, MessengerAutomation, OwnerNotification};

use crate::compact::InlineStr;
pub use crate::config::RouterConfig;
use crate::config::{AgentProfile, ChannelProfile};
use crate::conversations::ConversationState;
use crate::ids::{contact_uuid_for, message_key, request_key};
use crate::state::{AgentBook, AgentSlot, ContactState, sender_identity};
pub use crate::state::{RouterState, evolve};

/// Upper bound of routing attempts one re-drive makes (B3): keeps the latency of a single
/// decision bounded when a huge backlog waits; the rest is re-driven by the next trigger.
pub const MAX_REDRIVE_ATTEMPTS: usize = 1_000;
/// Ticket defaults when a channel creates tickets without configuring pipeline/stage (I5).
pub const DEFAULT_PIPELINE: &str = "default";
pub const DEFAULT_STAGE: &str = "new";

/// Where a decided event is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// The conversations topic, at the input's partition: the router's changelog, folded by
    /// `evolve` on recovery.
    Conversations,
    /// The outbound topic, partitioned by the event's key (`<account>/<conversation id>`), like
    /// the API's replies to the same conversation. Never folded: the state learns of automated
    /// messages from the conversations events decided with them.
    Outbound,
}

/// The destination of one event returned by [`decide`].
pub fn destination(event: &Envelope) -> Destination {
    match event.payload {
        Some(Payload::OutboundMessageQueued(_)) => Destination::Outbound,
        _ => Destination::Conversations,
    }
}

/// Why an input cannot be routed at all. Such inputs go to the dead-letter topic; they are
/// never retried, because retrying a deterministic function cannot change its answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("event {event_id} is not a router input (payload {payload}); wrong topic?")]
    NotARouterInput { event_id: String, payload: &'static str },
    #[error("router input {event_id} lacks required field `{field}`")]
    MissingField { event_id: String, field: &'static str },
}

/// The deterministic contact id of a channel identity of an account (C4, M1): the same sender
/// on the same channel is the same contact, also after a state loss.
pub fn contact_id_for(account_id: &str, channel_id: &str, external_id: &str) -> String {
    contact_uuid_for(account_id, channel_id, external_id).hyphenated().to_string()
}

/// Lines the state's indexes up with a compiled config (agent workloads by profile index, see
/// [`crate::state::AgentBook`]). Decisions are the same without it, only slower; it returns at
/// once when already aligned, so shells call it before every decision.
pub fn align_state(state: &mut RouterState, config: &RouterConfig) {
    state.agents.align(config.agent_table_id, &config.profile_agents);
}

/// Decides what one input means. Every command yields at least one event (a decision or
/// `CommandRejected`), so read models can report having seen it (B6).
///
/// Takes the input by value: a follow-up's message moves into its `MessageAppended` instead
/// of being copied (the shell decodes each input only to route it).
pub fn decide(state: &RouterState, config: &RouterConfig, mut input: Envelope) -> Result<Vec<Envelope>, Rejection> {
    let payload_opt = input.payload.take();
    let is_command = matches!(
        payload_opt,
        Some(
            Payload::AgentAvailabilityChanged(_)
                | Payload::ManualAssignmentRequested(_)
                | Payload::ConversationCloseRequested(_)
                | Payload::TicketStageChangeRequested(_)
                | Payload::ContactOwnerChangeRequested(_)
        )
    );
    let mut decision = Decision::new(&input);
    match payload_opt {
        Some(Payload::InboundMessageReceived(message)) => decide_message(state, config, &mut decision, message)?,
        Some(Payload::ContactConsentReceived(consent)) => decide_consent(state, config, &mut decision, &consent)?,
        Some(Payload::AgentAvailabilityChanged(changed)) => decide_availability(state, config, &mut decision, &changed),
        Some(Payload::ManualAssignmentRequested(request)) => {
            decide_manual_assignment(state, config, &mut decision, &request)
        }
        Some(Payload::ConversationCloseRequested(request)) => decide_close(state, config, &mut decision, &request),
        Some(Payload::TicketStageChangeRequested(request)) => {
            decide_ticket_stage(state, config, &mut decision, &request)
        }
        Some(Payload::ContactOwnerChangeRequested(request)) => {
            decide_contact_owner(state, config, &mut decision, &request)
        }
        // O5: provider statuses (delivered, read, failed, Messenger echoes) arrive in order with
        // the account's messages and are forwarded unchanged for the projector, which matches
        // them to replies. They change no routing state.
        Some(Payload::DeliveryStatusReported(status)) => decision.emit(Payload::DeliveryStatusReported(status)),
        Some(other) => {
            return Err(Rejection::NotARouterInput { event_id: input.event_id.clone(), payload: payload_name(&other) });
        }
        None => return Err(Rejection::NotARouterInput { event_id: input.event_id.clone(), payload: "none" }),
    }
    let events = decision.events;
    debug_assert!(!is_command || !events.is_empty(), "B6: every command yields an event");
    Ok(stamp_cause(events, input))
}

/// Fills in what every decided event carries of its cause (partition key, account, causation
/// and correlation ids). The input is consumed, so the last event takes its strings instead of
/// copies: most decisions emit one event (a follow-up's `MessageAppended`). Outbound events keep
/// the partition key they were emitted with ([`Decision::emit_outbound`]).
fn stamp_cause(mut events: Vec<Envelope>, cause: Envelope) -> Vec<Envelope> {
    let Envelope { event_id: cause_id, partition_key, correlation_id, account_id, .. } = cause;
    let correlation_id = if correlation_id.is_empty() { cause_id.clone() } else { correlation_id };
    if let Some((last, earlier)) = events.split_last_mut() {
        for event in earlier {
            if event.partition_key.is_empty() {
                event.partition_key.clone_from(&partition_key);
            }
            event.causation_id.clone_from(&cause_id);
            event.correlation_id.clone_from(&correlation_id);
            event.account_id.clone_from(&account_id);
        }
        if last.partition_key.is_empty() {
            last.partition_key = partition_key;
        }
        last.causation_id = cause_id;
        last.correlation_id = correlation_id;
        last.account_id = account_id;
    }
    events
}

/// The events decided for one input, with ids derived from it.
struct Decision<'input> {
    cause: &'input Envelope,
    cause_millis: u64,
    events: Vec<Envelope>,
}

impl<'input> Decision<'input> {
    fn new(cause: &'input Envelope) -> Self {
        Decision { cause, cause_millis: recorded_at_millis(cause), events: Vec::with_capacity(4) }
    }

    /// A UUIDv7 stamped with the cause's recorded-at whose other bits hash the cause's id and
    /// `purpose`: the same recipe as `runtime::envelope::derived_id`, without allocating.
    fn derived_id(&self, purpose: &[&str]) -> String {
        let mut buffer = [0u8; uuid::fmt::Hyphenated::LENGTH];
        self.derived_uuid(purpose).hyphenated().encode_lower(&mut buffer).to_owned()
    }

    /// [`Decision::derived_id`] as a UUID: `derived_uuid(&["owner_notification"])` is
    /// `runtime::envelope::derived_id(cause, "owner_notification")`.
    fn derived_uuid(&self, purpose: &[&str]) -> Uuid {
        let mut hasher = Sha256::new();
        hasher.update(self.cause.event_id.as_bytes());
        hasher.update(b"/");
        for part in purpose {
            hasher.update(part.as_bytes());
        }
        let digest = hasher.finalize();
        let mut random_bytes = [0u8; 10];
        random_bytes.copy_from_slice(&digest[..10]);
        uuid::Builder::from_unix_timestamp_millis(self.cause_millis, &random_bytes).into_uuid()
    }

    /// An automated message for the outbound topic, keyed by its conversation (or, for a
    /// consent prompt that has none yet, by the held thread).
    fn emit_outbound(&mut self, queued: OutboundMessageQueued) {
        let scope = if queued.conversation_id.is_empty() {
            format!("{}/{}", queued.channel_id, queued.thread_key)
        } else {
            queued.conversation_id.clone()
        };
        let partition_key = outbound_partition_key(&self.cause.account_id, &scope);
        self.emit(Payload::OutboundMessageQueued(queued));
        self.events.last_mut().expect("just emitted").partition_key = partition_key;
    }

    fn emit(&mut self, payload: Payload) {
        let index = self.events.len();
        let mut digits = itoa_buffer();
        let event_id = self.derived_id(&[format_index(index, &mut digits)]);
        self.events.push(Envelope {
            event_id,
            occurred_at: self.cause.occurred_at,
            recorded_at: self.cause.recorded_at,
            // The cause's strings are filled in once the decision is complete (`stamp_cause`).
            partition_key: String::new(),
            causation_id: String::new(),
            correlation_id: String::new(),
            schema_version: SCHEMA_VERSION,
            account_id: String::new(),
            // Set by the shell, which knows where the cause was read; `decide` is offset-agnostic.
            source_position: None,
            payload: Some(payload),
        });
    }

    fn reject(&mut self, command: &str, request_id: &str, reason: impl Into<String>) {
        self.emit(Payload::CommandRejected(CommandRejected {
            request_id: request_id.to_owned(),
            reason: reason.into(),
            command: command.to_owned(),
        }));
    }
}

fn itoa_buffer() -> [u8; 20] {
    [0u8; 20]
}

fn format_index(mut index: usize, buffer: &mut [u8; 20]) -> &str {
    let mut position = buffer.len();
    loop {
        position -= 1;
        buffer[position] = b'0' + (index % 10) as u8;
        index /= 10;
        if index == 0 {
            break;
        }
    }
    std::str::from_utf8(&buffer[position..]).expect("ascii digits")
}

/// What a multi-step decision (C6 release, B3 re-drive) has changed so far and the state does
/// not show yet. Single-message decisions never copy anything (`track` is false).
struct Overlay<'state> {
    agents: Cow<'state, AgentBook>,
    track: bool,
    /// Threads opened by this decision: (channel id, thread key, conversation id).
    new_threads: Vec<(String, String, String)>,
    /// Tickets created by this decision per contact id.
    new_tickets_by_contact: Vec<(String, u32)>,
}

impl<'state> Overlay<'state> {
    fn untracked(state: &'state RouterState) -> Self {
        Overlay {
            agents: Cow::Borrowed(&state.agents),
            track: false,
            new_threads: Vec::new(),
            new_tickets_by_contact: Vec::new(),
        }
    }

    fn tracked(state: &'state RouterState) -> Self {
        Overlay { track: true, ..Overlay::untracked(state) }
    }

    /// The id of the thread's open conversation, including those this decision opened (all of
    /// them in the cause's account).
    fn open_conversation(
        &self,
        state: &RouterState,
        account_id: &str,
        channel_id: &str,
        thread_key: &str,
    ) -> Option<String> {
        debug_assert!(self.track || self.new_threads.is_empty(), "only a tracked overlay records threads");
        self.new_threads
            .iter()
            .find(|(channel, thread, _)| channel == channel_id && thread == thread_key)
            .map(|(_, _, conversation_id)| conversation_id.clone())
            .or_else(|| state.open_conversation_id(account_id, channel_id, thread_key))
    }

    fn extra_tickets(&self, contact_id: &str) -> u32 {
        self.new_tickets_by_contact.iter().filter(|(id, _)| id == contact_id).map(|(_, count)| count).sum()
    }
}

// ---------------------------------------------------------------------------------------------
// Messages: B1, C11, C4, C6, R10, routing, tickets.
// ---------------------------------------------------------------------------------------------

fn validate_message(input: &Envelope, message: &InboundMessageReceived) -> Result<(), Rejection> {
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

fn decide_message(
    state: &RouterState,
    config: &RouterConfig,
    decision: &mut Decision<'_>,
    message: InboundMessageReceived,
) -> Result<(), Rejection> {
    let input = decision.cause;
    validate_message(input, &message)?;
    // B1: a message id already handled (any channel of the partition's accounts, open
    // conversations, held messages and a recent window) changes nothing.
    if state.dedup.contains(message_key(&message.message_id)) {
        return Ok(());
    }
    let Some(channel) = config.channel(&input.account_id, &message.channel_id) else {
        decision.emit(withheld(&message, &input.event_id, WithheldReason::UnknownChannel, false));
        return Ok(());
    };
    // C11: a switched-off channel's messages are recorded, never routed or logged to contacts.
    if !channel.enabled {
        decision.emit(withheld(&message, &input.event_id, WithheldReason::ChannelOff, false));
        return Ok(());
    }
    let external_id = sender_identity(&message);
    // Fast path (most traffic): a follow-up from the conversation's own contact on a channel
    // without explicit consent joins the open conversation (R10); no contact lookup needed.
    if !channel.explicit_consent
        && let Some((key, conversation)) =
            state.conversations.by_thread(&input.account_id, &message.channel_id, &message.thread_key)
        && conversation.contact_external_id == *external_id
    {
        let conversation_id = conversation.id(key);
        decision.emit(message_appended(conversation_id, &input.event_id, message, &conversation.contact_id));
        return Ok(());
    }
    let contact_uuid = contact_uuid_for(&input.account_id, &message.channel_id, external_id);
    let contact_opt = state.contact_with_uuid(contact_uuid, &input.account_id, &message.channel_id, external_id);
    let contact_id = match contact_opt {
        Some(contact) => contact.contact_id.clone(),
        None => {
            let contact_id = contact_uuid.hyphenated().to_string();
            decision.emit(contact_created(channel, &message, external_id, &contact_id));
            contact_id
        }
    };
    // C6 explicit consent: held until the sender agrees (consent seen with the message counts).
    if channel.explicit_consent && !contact_opt.is_some_and(|contact| contact.consent_granted) {
        let consent_given_now =
            message.content.as_ref().is_some_and(|content| content.consent == ConsentState::Given as i32);
        if !consent_given_now {
            // C6: the thread is asked for consent once while its messages wait.
            let prompted = contact_opt.is_some_and(|contact| {
                state
                    .held_by_contact
                    .get(&contact.contact_id)
                    .is_some_and(|held| held.iter().any(|held_message| held_message.consent_prompted))
            });
            let prompt_opt = if prompted { None } else { consent_prompt(config, decision, channel, &message) };
            let mut withheld_payload = withheld(&message, &input.event_id, WithheldReason::AwaitingConsent, true);
            if let (Payload::MessageWithheld(withheld), Some(prompt)) = (&mut withheld_payload, &prompt_opt) {
                withheld.consent_prompt_reply_id.clone_from(&prompt.reply_id);
            }
            decision.emit(withheld_payload);
            if let Some(prompt) = prompt_opt {
                decision.emit_outbound(prompt);
            }
            return Ok(());
        }
        decision.emit(Payload::ContactConsentReceived(ContactConsentReceived {
            channel_id: message.channel_id.clone(),
            sender_external_id: external_id.to_owned(),
            granted: true,
            provider_event_id: message.provider_message_id.clone(),
        }));
    }
    let mut overlay = Overlay::untracked(state);
    let delivery = Delivery {
        channel,
        message: &message,
        source_event_id: &input.event_id,
        contact_id: &contact_id,
        contact_opt,
        purpose_suffix: "",
    };
    deliver(state, config, decision, &mut overlay, &delivery);
    Ok(())
}

/// One accepted message on its way into a conversation ([`deliver`]).
struct Delivery<'a> {
    channel: &'a ChannelProfile,
    message: &'a InboundMessageReceived,
    /// The event the message arrived in: the input, or for a released message the input that
    /// was withheld.
    source_event_id: &'a str,
    contact_id: &'a str,
    /// The contact's recorded state, if it existed before this decision (the caller looked it up).
    contact_opt: Option<&'a ContactState>,
    /// Keeps derived ids distinct when one decision delivers several messages.
    purpose_suffix: &'a str,
}

/// Puts one accepted message into its conversation (R10) or starts one, routes it (R1–R8) and
/// creates its ticket (T1, I5, C7, R9, T2).
fn deliver(
    state: &RouterState,
    config: &RouterConfig,
    decision: &mut Decision<'_>,
    overlay: &mut Overlay<'_>,
    delivery: &Delivery<'_>,
) {
    let &Delivery { channel, message, source_event_id, contact_id, contact_opt, purpose_suffix } = delivery;
    if let Some(conversation_id) =
        overlay.open_conversation(state, &decision.cause.account_id, &message.channel_id, &message.thread_key)
    {
        // R10: a follow-up joins the open conversation and keeps its assignee; never a second
        // conversation or ticket.
        decision.emit(message_appended(conversation_id, source_event_id, appended_part(message), contact_id));
        return;
    }
    let conversation_id = decision.derived_id(&["conversation", purpose_suffix]);
    let channel_type = if message.channel_type != 0 { message.channel_type } else { channel.channel_type };
    decision.emit(Payload::ConversationStarted(ConversationStarted {
        conversation_id: conversation_id.clone(),
        inbox_id: if message.inbox_id.is_empty() { channel.inbox_id.clone() } else { message.inbox_id.clone() },
        channel_id: message.channel_id.clone(),
        channel_type,
        thread_key: message.thread_key.clone(),
        contact: message.sender.clone(),
        first_message_id: message.message_id.clone(),
        contact_id: contact_id.to_owned(),
    }));
    decision.emit(message_appended(conversation_id.clone(), source_event_id, appended_part(message), contact_id));
    conversation_start_automations(config, decision, delivery, &conversation_id, channel_type);

    let owner_opt = contact_opt.and_then(|contact| contact.owner_agent_id_opt.as_deref());
    let routed = route(config, &overlay.agents, channel, channel_type, owner_opt);
    let assignee_opt = match &routed.outcome {
        Outcome::Assigned(agent_id) => Some(agent_id.clone()),
        Outcome::Unassigned(_) => None,
    };
    emit_routing(decision, &conversation_id, routed.outcome, routed.explanation);
    if let Some(owner_agent_id) = routed.notify_owner_opt {
        // R4: the contact owner is offline; they are told about the new message by email (O6).
        let email_opt = owner_email(config, decision, delivery, &conversation_id, channel_type, &owner_agent_id);
        decision.emit(Payload::OwnerNotificationRequested(OwnerNotificationRequested {
            agent_id: owner_agent_id,
            conversation_id: conversation_id.clone(),
            message_id: message.message_id.clone(),
            contact_id: contact_id.to_owned(),
            reply_id: email_opt.as_ref().map(|email| email.reply_id.clone()).unwrap_or_default(),
        }));
        if let Some(email) = email_opt {
            decision.emit_outbound(email);
        }
    }
    if overlay.track {
        if let Some(agent_id) = &assignee_opt {
            let channel_key = InlineStr::scoped(&decision.cause.account_id, &message.channel_id);
            overlay.agents.to_mut().take(&channel_key, agent_id, channel_type, decision.cause_millis);
        }
        overlay.new_threads.push((message.channel_id.clone(), message.thread_key.clone(), conversation_id.clone()));
    }
    if channel.creates_tickets() {
        decide_ticket(decision, overlay, delivery, &conversation_id, assignee_opt);
    }
}

// ---------------------------------------------------------------------------------------------
// O6: automated messages (R4 owner email, C6 greeting, instant reply, consent prompt).
// ---------------------------------------------------------------------------------------------

/// R4: the email to the offline owner `owner_agent_id` about the message `delivery` just put
/// into a new conversation; `None` if the owner has no email address (the
/// `OwnerNotificationRequested` then says no email was queued). Its id is
/// `derived_id(cause, "owner_notification")` (plus the release suffix when one decision
/// delivers several messages).
fn owner_email(
    config: &RouterConfig,
    decision: &Decision<'_>,
    delivery: &Delivery<'_>,
    conversation_id: &str,
    channel_type: i32,
    owner_agent_id: &str,
) -> Option<OutboundMessageQueued> {
    let account_id = decision.cause.account_id.as_str();
    let owner = &config.snapshot.agents.get(account_id, owner_agent_id)?.entity;
    let inbox_id =
        if delivery.message.inbox_id.is_empty() { &delivery.channel.inbox_id } else { &delivery.message.inbox_id };
    let unconfigured_inbox;
    let inbox = match config.snapshot.inboxes.get(account_id, inbox_id) {
        Some(inbox) => &inbox.entity,
        None => {
            unconfigured_inbox = InboxConfigured { inbox_id: inbox_id.clone(), ..Default::default() };
            &unconfigured_inbox
        }
    };
    automated::owner_notification_email(&OwnerNotification {
        account_id,
        reply_id: decision.derived_uuid(&["owner_notification", delivery.purpose_suffix]),
        owner,
        inbox,
        conversation_id,
        channel_type,
        message: delivery.message,
    })
}

/// The Messenger settings and channel name of a Messenger channel.
fn messenger_settings<'config>(
    config: &'config RouterConfig,
    account_id: &str,
    channel: &ChannelProfile,
) -> Option<(&'config MessengerSettings, &'config str)> {
    if channel.channel_type != ChannelType::FacebookMessenger as i32 {
        return None;
    }
    let configured = &config.snapshot.channels.get(account_id, &channel.channel_id)?.entity;
    Some((configured.messenger.as_ref()?, configured.name.as_str()))
}

/// C6: the greeting and the instant reply, each when configured, to a Messenger conversation
/// that `delivery` just started with its first message, inside the 24-hour window. Both exist
/// once per conversation because the conversation starts once.
fn conversation_start_automations(
    config: &RouterConfig,
    decision: &mut Decision<'_>,
    delivery: &Delivery<'_>,
    conversation_id: &str,
    channel_type: i32,
) {
    let account_id = decision.cause.account_id.as_str();
    let Some((settings, channel_name)) = messenger_settings(config, account_id, delivery.channel) else { return };
    if !automated::within_standard_window(decision.cause) {
        return;
    }
    let automations = [
        (Automation::Greeting, "greeting", settings.greeting.as_str()),
        (Automation::InstantReply, "instant_reply", settings.instant_reply.as_str()),
    ];
    for (automation, purpose, text) in automations {
        if text.trim().is_empty() {
            continue;
        }
        let queued = automated::messenger_message(MessengerAutomation {
            reply_id: decision.derived_id(&[purpose, delivery.purpose_suffix]),
            automation,
            text,
            page_id: &settings.page_id,
            conversation_id,
            inbox_id: &delivery.channel.inbox_id,
            channel_type,
            author_name: channel_name,
            message: delivery.message,
        });
        decision.emit_outbound(queued);
    }
}

/// C6 explicit consent: the prompt (the consent text) to the sender of a message just withheld
/// awaiting consent, when configured and inside the 24-hour window. The caller checks that the
/// thread was not prompted yet.
fn consent_prompt(
    config: &RouterConfig,
    decision: &Decision<'_>,
    channel: &ChannelProfile,
    message: &InboundMessageReceived,
) -> Option<OutboundMessageQueued> {
    let (settings, channel_name) = messenger_settings(config, &decision.cause.account_id, channel)?;
    if settings.consent_text.trim().is_empty() || !automated::within_standard_window(decision.cause) {
        return None;
    }
    let channel_type = if message.channel_type != 0 { message.channel_type } else { channel.channel_type };
    Some(automated::messenger_message(MessengerAutomation {
        reply_id: decision.derived_id(&["consent_prompt"]),
        automation: Automation::ConsentPrompt,
        text: &settings.consent_text,
        page_id: &settings.page_id,
        conversation_id: "",
        inbox_id: &channel.inbox_id,
        channel_type,
        author_name: channel_name,
        message,
    }))
}

/// T1, I5, C7, R9, T2: the ticket of a conversation `delivery` just started.
fn decide_ticket(
    decision: &mut Decision<'_>,
    overlay: &mut Overlay<'_>,
    delivery: &Delivery<'_>,
    conversation_id: &str,
    assignee_opt: Option<String>,
) {
    let &Delivery { channel, message, contact_id, contact_opt, purpose_suffix, .. } = delivery;
    let no_settings = TicketSettingsConfigured::default();
    let settings = channel.tickets_opt.as_ref().unwrap_or(&no_settings);
    let tickets_so_far = contact_opt.map_or(0, |contact| contact.ticket_count) + overlay.extra_tickets(contact_id);
    // T2 / C7: a contact at its association limit gets no ticket; the conversation stands.
    if settings.contact_association_limit > 0 && tickets_so_far >= settings.contact_association_limit {
        decision.emit(Payload::TicketNotCreated(TicketNotCreated {
            conversation_id: conversation_id.to_owned(),
            contact_id: contact_id.to_owned(),
            reason: TicketNotCreatedReason::ContactAtAssociationLimit as i32,
            limit: settings.contact_association_limit,
        }));
        return;
    }
    let content = message.content.clone().unwrap_or_default();
    let form = content.form_ticket.unwrap_or_default();
    let first_non_empty =
        |values: &[&str]| values.iter().find(|value| !value.is_empty()).map(|value| value.to_string());
    // R9: a fixed owner overrides the conversation's assignee.
    let (owner_agent_id, owner_source) = if !settings.fixed_owner_agent_id.is_empty() {
        (settings.fixed_owner_agent_id.clone(), TicketOwnerSource::Fixed)
    } else if let Some(assignee) = assignee_opt {
        (assignee, TicketOwnerSource::ConversationAssignee)
    } else {
        (String::new(), TicketOwnerSource::None)
    };
    let text_title: String = message.text.chars().take(80).collect();
    let ticket_id = decision.derived_id(&["ticket", purpose_suffix]);
    decision.emit(Payload::TicketCreated(TicketCreated {
        ticket_id,
        conversation_id: conversation_id.to_owned(),
        contact_id: contact_id.to_owned(),
        // C7: form ticket fields override the channel's defaults (T1).
        pipeline: first_non_empty(&[&form.pipeline, &settings.default_pipeline]).unwrap_or(DEFAULT_PIPELINE.into()),
        stage: first_non_empty(&[&form.stage, &settings.default_stage]).unwrap_or(DEFAULT_STAGE.into()),
        owner_agent_id,
        owner_source: owner_source as i32,
        name: first_non_empty(&[&form.name, &content.subject, &text_title]).unwrap_or_default(),
        description: first_non_empty(&[&form.description, &message.text]).unwrap_or_default(),
        channel_id: message.channel_id.clone(),
        inbox_id: channel.inbox_id.clone(),
    }));
    if overlay.track {
        overlay.new_tickets_by_contact.push((contact_id.to_owned(), 1));
    }
}

fn withheld(message: &InboundMessageReceived, source_event_id: &str, reason: WithheldReason, keep: bool) -> Payload {
    Payload::MessageWithheld(MessageWithheld {
        message_id: message.message_id.clone(),
        channel_id: message.channel_id.clone(),
        reason: reason as i32,
        thread_key: message.thread_key.clone(),
        sender: message.sender.clone(),
        source_event_id: source_event_id.to_owned(),
        message: keep.then(|| Box::new(message.clone())),
        inbox_id: message.inbox_id.clone(),
        consent_prompt_reply_id: String::new(),
    })
}

fn contact_created(
    channel: &ChannelProfile,
    message: &InboundMessageReceived,
    external_id: &str,
    contact_id: &str,
) -> Payload {
    let sender = message.sender.clone().unwrap_or_default();
    Payload::ContactCreated(ContactCreated {
        contact_id: contact_id.to_owned(),
        channel_id: message.channel_id.clone(),
        channel_type: if message.channel_type != 0 { message.channel_type } else { channel.channel_type },
        external_id: external_id.to_owned(),
        display_name: sender.display_name,
        email: sender.email,
        source_message_id: message.message_id.clone(),
    })
}

/// The message joins its conversation: its fields move into the event.
fn message_appended(
    conversation_id: String,
    source_event_id: &str,
    message: InboundMessageReceived,
    contact_id: &str,
) -> Payload {
    Payload::MessageAppended(MessageAppended {
        conversation_id,
        message_id: message.message_id,
        provider_message_id: message.provider_message_id,
        channel_id: message.channel_id,
        sender: message.sender,
        text: message.text,
        source_event_id: source_event_id.to_owned(),
        content: message.content,
        contact_id: contact_id.to_owned(),
        thread_key: message.thread_key,
    })
}

/// A copy of the parts of a message that `MessageAppended` carries, for callers that still
/// need the message afterwards.
fn appended_part(message: &InboundMessageReceived) -> InboundMessageReceived {
    InboundMessageReceived {
        message_id: message.message_id.clone(),
        provider_message_id: message.provider_message_id.clone(),
        channel_id: message.channel_id.clone(),
        sender: message.sender.clone(),
        text: message.text.clone(),
        content: message.content.clone(),
        thread_key: message.thread_key.clone(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Routing: R1–R8 with the explanation (B2).
// ---------------------------------------------------------------------------------------------

enum Outcome {
    Assigned(String),
    Unassigned(UnassignedReason),
}

struct Routed {
    outcome: Outcome,
    explanation: RoutingExplanation,
    /// R4: the contact owner to notify because they are offline.
    notify_owner_opt: Option<String>,
}

fn emit_routing(decision: &mut Decision<'_>, conversation_id: &str, outcome: Outcome, explanation: RoutingExplanation) {
    decision.emit(match outcome {
        Outcome::Assigned(assignee_agent_id) => Payload::ConversationAssigned(ConversationAssigned {
            conversation_id: conversation_id.to_owned(),
            assignee_agent_id,
            explanation: Some(explanation),
            ..Default::default()
        }),
        Outcome::Unassigned(reason) => Payload::ConversationLeftUnassigned(ConversationLeftUnassigned {
            conversation_id: conversation_id.to_owned(),
            reason: reason as i32,
            explanation: Some(explanation),
        }),
    });
}

/// Applies the channel's routing rules to a conversation that has no assignee.
fn route(
    config: &RouterConfig,
    agents: &AgentBook,
    channel: &ChannelProfile,
    channel_type: i32,
    contact_owner_opt: Option<&str>,
) -> Routed {
    let unassigned =
        |reason, explanation| Routed { outcome: Outcome::Unassigned(reason), explanation, notify_owner_opt: None };
    let Some(rules) = &channel.rules_opt else {
        let explanation = RoutingExplanation { channel_id: channel.channel_id.clone(), ..Default::default() };
        return unassigned(UnassignedReason::NoRoutingRules, explanation);
    };
    let mut explanation = RoutingExplanation {
        channel_id: channel.channel_id.clone(),
        rule_version: rules.version,
        target: rules.target,
        strategy: rules.strategy,
        only_available: rules.only_available,
        ..Default::default()
    };
    // R1: automatic assignment is off by default; the team triages.
    if !rules.auto_assign {
        return unassigned(UnassignedReason::AutoAssignmentOff, explanation);
    }
    let account_id = &channel.account_id;
    match AssignTarget::try_from(rules.target).unwrap_or(AssignTarget::Nobody) {
        AssignTarget::Nobody | AssignTarget::Unspecified => unassigned(UnassignedReason::TargetNobody, explanation),
        AssignTarget::ContactOwner => {
            // R4: the contact's owner, if they may take it; offline owners are notified.
            let Some(owner) = contact_owner_opt else {
                return unassigned(UnassignedReason::ContactHasNoOwner, explanation);
            };
            let profile_opt = config.agent(account_id, owner);
            let slot_opt = agents.slot(account_id, owner);
            let notify_owner_opt =
                profile_opt.filter(|profile| !is_available(slot_opt, profile)).map(|_| owner.to_owned());
            match ineligibility(profile_opt, slot_opt, rules, channel_type) {
                None => {
                    explanation.eligible_agent_ids.push(owner.to_owned());
                    Routed { outcome: Outcome::Assigned(owner.to_owned()), explanation, notify_owner_opt }
                }
                Some(reason) => {
                    explanation.skipped.push(SkippedCandidate { agent_id: owner.to_owned(), reason: reason as i32 });
                    Routed {
                        outcome: Outcome::Unassigned(UnassignedReason::NoEligibleAgent),
                        explanation,
                        notify_owner_opt,
                    }
                }
            }
        }
        AssignTarget::SpecificUsersAndTeams => {
            match choose_from_pool(config, agents, channel, rules, channel_type, &mut explanation) {
                Some(agent_id) => {
                    Routed { outcome: Outcome::Assigned(agent_id.clone()), explanation, notify_owner_opt: None }
                }
                // R5: nobody eligible (e.g. nobody available) → stays unassigned, with the reasons.
                None => unassigned(UnassignedReason::NoEligibleAgent, explanation),
            }
        }
    }
}

/// R3, R5–R8: the member of the channel's pool its strategy picks among the eligible ones, or
/// `None` if nobody is eligible. Every member is recorded in `explanation` as eligible or
/// skipped with the reason (B2), in pool order.
fn choose_from_pool<'channel>(
    config: &RouterConfig,
    agents: &AgentBook,
    channel: &'channel ChannelProfile,
    rules: &RoutingRulesConfigured,
    channel_type: i32,
    explanation: &mut RoutingExplanation,
) -> Option<&'channel String> {
    let account_id = &channel.account_id;
    let pool = &channel.pool;
    debug_assert_eq!(pool.len(), channel.pool_profiles.len(), "one resolved profile per pool member");
    let strategy = AssignmentStrategy::try_from(rules.strategy).unwrap_or(AssignmentStrategy::RoundRobin);
    let balanced = strategy == AssignmentStrategy::Balanced;
    // Round robin: the next eligible agent after the one this channel assigned last, in
    // pool order (wrapping). The position comes from the channel's index, not a scan.
    let round_robin_start = if balanced {
        0
    } else {
        agents
            .last_round_robin_agent(account_id, &channel.channel_id)
            .and_then(|last| channel.pool_position.get(last.as_str()))
            .map_or(0, |position| *position as usize + 1)
    };
    // One pass over the pool: each member's workload is looked up once and serves both
    // the eligibility check (R5–R8) and the strategy (R3).
    explanation.eligible_agent_ids.reserve_exact(pool.len());
    let mut balanced_best_opt: Option<((u32, u64), usize)> = None;
    let mut round_robin_after_start_opt: Option<usize> = None;
    let mut round_robin_first_opt: Option<usize> = None;
    for (index, (agent_id, profile_opt)) in pool.iter().zip(&channel.pool_profiles).enumerate() {
        let (profile_opt, slot_opt) = match profile_opt {
            Some(profile_index) => (
                Some(&config.profiles[*profile_index as usize]),
                agents.slot_for_profile(config.agent_table_id, *profile_index, account_id, agent_id),
            ),
            None => (None, agents.slot(account_id, agent_id)),
        };
        if let Some(reason) = ineligibility(profile_opt, slot_opt, rules, channel_type) {
            explanation.skipped.push(SkippedCandidate { agent_id: agent_id.clone(), reason: reason as i32 });
            continue;
        }
        explanation.eligible_agent_ids.push(agent_id.clone());
        if balanced {
            // Fewest open conversations; ties go to the agent idle longest (never
            // assigned first), then to pool order (the first of equals is kept).
            let key = slot_opt.map_or((0, 0), |slot| {
                let workload = &slot.workload;
                (workload.open_conversations, workload.last_assigned_at_millis_opt.map_or(0, |at| at + 1))
            });
            if balanced_best_opt.is_none_or(|(best, _)| key < best) {
                balanced_best_opt = Some((key, index));
            }
        } else {
            round_robin_first_opt.get_or_insert(index);
            if index >= round_robin_start && round_robin_after_start_opt.is_none() {
                round_robin_after_start_opt = Some(index);
            }
        }
    }
    let chosen_opt = if balanced {
        balanced_best_opt.map(|(_, index)| index)
    } else {
        round_robin_after_start_opt.or(round_robin_first_opt)
    };
    chosen_opt.map(|index| &pool[index])
}

/// An availability command, once seen, overrides the configured availability (R5).
fn is_available(slot_opt: Option<&AgentSlot>, profile: &AgentProfile) -> bool {
    slot_opt.and_then(|slot| slot.availability_opt).unwrap_or(profile.available)
}

/// Why the agent of `profile_opt` (with its recorded `slot_opt`) may not take the
/// conversation, or `None` if eligible.
fn ineligibility(
    profile_opt: Option<&AgentProfile>,
    slot_opt: Option<&AgentSlot>,
    rules: &RoutingRulesConfigured,
    channel_type: i32,
) -> Option<SkipReason> {
    let Some(profile) = profile_opt else { return Some(SkipReason::UnknownAgent) };
    if !profile.paid_seat {
        return Some(SkipReason::NoPaidSeat); // R6
    }
    if rules.only_available && !is_available(slot_opt, profile) {
        return Some(SkipReason::Offline); // R5
    }
    if !rules.required_skills.iter().all(|skill| profile.skills.contains(skill)) {
        return Some(SkipReason::MissingSkill); // R7
    }
    if let Some(workload) = slot_opt.map(|slot| &slot.workload) {
        let overall_full =
            profile.max_open_conversations > 0 && workload.open_conversations >= profile.max_open_conversations;
        let slot = crate::state::channel_type_slot(channel_type);
        let type_limit = profile.max_open_by_channel_type[slot];
        let type_full = type_limit > 0 && workload.open_by_channel_type[slot] >= type_limit;
        if overall_full || type_full {
            return Some(SkipReason::AtCapacity); // R8, overall or per channel type
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// C6 consent.
// ---------------------------------------------------------------------------------------------

fn decide_consent(
    state: &RouterState,
    config: &RouterConfig,
    decision: &mut Decision<'_>,
    consent: &ContactConsentReceived,
) -> Result<(), Rejection> {
    let input = decision.cause;
    for (field, value) in [("channel_id", &consent.channel_id), ("sender_external_id", &consent.sender_external_id)] {
        if value.is_empty() {
            return Err(Rejection::MissingField { event_id: input.event_id.clone(), field });
        }
    }
    let channel_opt = config.channel(&input.account_id, &consent.channel_id);
    let contact_opt = state.contact(&input.account_id, &consent.channel_id, &consent.sender_external_id);
    if contact_opt.is_none()
        && let Some(channel) = channel_opt
    {
        // Consent can precede the first message: the contact exists from now on, consenting.
        let contact_id = contact_id_for(&input.account_id, &consent.channel_id, &consent.sender_external_id);
        let sender = InboundMessageReceived { channel_id: consent.channel_id.clone(), ..Default::default() };
        let mut created = contact_created(channel, &sender, &consent.sender_external_id, &contact_id);
        if let Payload::ContactCreated(created) = &mut created {
            created.source_message_id = String::new();
        }
        decision.emit(created);
    }
    // Echoed onto the output: consent is router state, and the state is a fold of the output.
    decision.emit(Payload::ContactConsentReceived(consent.clone()));
    let (Some(contact), Some(channel), true) = (contact_opt, channel_opt, consent.granted) else { return Ok(()) };
    let Some(held) = state.held_by_contact.get(&contact.contact_id) else { return Ok(()) };
    // Released in arrival order, as if they had just arrived (C6).
    let mut overlay = Overlay::tracked(state);
    for (index, held_message) in held.iter().enumerate() {
        let mut digits = itoa_buffer();
        let suffix = format!("/released/{}", format_index(index, &mut digits));
        let delivery = Delivery {
            channel,
            message: &held_message.message,
            source_event_id: &held_message.source_event_id,
            contact_id: &contact.contact_id,
            contact_opt: Some(contact),
            purpose_suffix: &suffix,
        };
        deliver(state, config, decision, &mut overlay, &delivery);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Commands: availability, manual assignment, close, ticket stage, contact owner.
// ---------------------------------------------------------------------------------------------

/// A command whose request id was already applied is answered with `CommandRejected` (so the
/// caller's position is still reached, B6) and changes nothing.
fn already_applied(state: &RouterState, decision: &mut Decision<'_>, command: &str, request_id: &str) -> bool {
    if !request_id.is_empty() && state.applied_requests.contains(&request_key(request_id)) {
        decision.reject(command, request_id, "request already applied");
        return true;
    }
    false
}

/// The prologue of commands on a conversation: a request already applied, or a conversation
/// that is not open, is answered with `CommandRejected` and yields `None`.
fn open_conversation_for_command<'state>(
    state: &'state RouterState,
    decision: &mut Decision<'_>,
    command: &str,
    request_id: &str,
    conversation_id: &str,
) -> Option<(u128, &'state ConversationState)> {
    if already_applied(state, decision, command, request_id) {
        return None;
    }
    // M1: another account's conversation (same partition) is as unknown as a closed one.
    let account_id = &decision.cause.account_id;
    let found = state
        .conversation(conversation_id)
        .filter(|(_, conversation)| conversation.account_id() == account_id.as_str());
    if found.is_none() {
        decision.reject(command, request_id, format!("conversation `{conversation_id}` is not open"));
    }
    found
}

fn decide_availability(
    state: &RouterState,
    config: &RouterConfig,
    decision: &mut Decision<'_>,
    changed: &AgentAvailabilityChanged,
) {
    const COMMAND: &str = "agent_availability_changed";
    if already_applied(state, decision, COMMAND, &changed.request_id) {
        return;
    }
    if config.agent(&decision.cause.account_id, &changed.agent_id).is_none() {
        decision.reject(COMMAND, &changed.request_id, format!("unknown agent `{}`", changed.agent_id));
        return;
    }
    // Echoed onto the output: from now on this, not the config, says whether the agent is
    // available for routing.
    decision.emit(Payload::AgentAvailabilityChanged(changed.clone()));
    if changed.available {
        let cause = decision.cause;
        redrive(state, config, decision, &changed.agent_id, None, |agents| {
            agents.set_availability(&cause.account_id, &changed.agent_id, true);
        });
    }
}

fn decide_manual_assignment(
    state: &RouterState,
    config: &RouterConfig,
    decision: &mut Decision<'_>,
    request: &ManualAssignmentRequested,
) {
    const COMMAND: &str = "manual_assignment_requested";
    let Some((key, conversation)) =
        open_conversation_for_command(state, decision, COMMAND, &request.request_id, &request.conversation_id)
    else {
        return;
    };
    let previous_opt = conversation.assignee();
    if request.assignee_agent_id.is_empty() {
        let Some(previous) = previous_opt else {
            decision.reject(COMMAND, &request.request_id, "conversation is not assigned");
            return;
        };
        decision.emit(Payload::ConversationUnassigned(ConversationUnassigned {
            conversation_id: conversation.id(key),
            previous_assignee_agent_id: previous.to_owned(),
            actor: request.actor.clone(),
            request_id: request.request_id.clone(),
        }));
        redrive(state, config, decision, previous, Some(key), |agents| {
            agents.release(conversation.account_id(), previous, conversation.channel_type);
        });
        return;
    }
    if config.agent(&decision.cause.account_id, &request.assignee_agent_id).is_none() {
        decision.reject(COMMAND, &request.request_id, format!("unknown agent `{}`", request.assignee_agent_id));
        return;
    }
    if previous_opt == Some(request.assignee_agent_id.as_str()) {
        decision.reject(COMMAND, &request.request_id, format!("already assigned to `{}`", request.assignee_agent_id));
        return;
    }
    // Manual assignment is a person's decision: capacity and availability do not apply (I4);
    // the explanation names the channel and the chosen agent, with no rule.
    decision.emit(Payload::ConversationAssigned(ConversationAssigned {
        conversation_id: conversation.id(key),
        assignee_agent_id: request.assignee_agent_id.clone(),
        explanation: Some(RoutingExplanation {
            channel_id: conversation.channel_id().to_owned(),
            eligible_agent_ids: vec![request.assignee_agent_id.clone()],
            ..Default::default()
        }),
        actor: request.actor.clone(),
        request_id: request.request_id.clone(),
    }));
    if let Some(previous) = previous_opt {
        let cause_millis = decision.cause_millis;
        redrive(state, config, decision, previous, Some(key), |agents| {
            agents.release(conversation.account_id(), previous, conversation.channel_type);
            agents.take(&conversation.channel_key, &request.assignee_agent_id, conversation.channel_type, cause_millis);
        });
    }
}

fn decide_close(
    state: &RouterState,
    config: &RouterConfig,
    decision: &mut Decision<'_>,
    request: &ConversationCloseRequested,
) {
    const COMMAND: &str = "conversation_close_requested";
    let Some((key, conversation)) =
        open_conversation_for_command(state, decision, COMMAND, &request.request_id, &request.conversation_id)
    else {
        return;
    };
    let closing = Closing { reason: CloseReason::Agent, actor: request.actor.clone(), request_id: &request.request_id };
    close(state, config, decision, key, conversation, closing);
}

/// Why, by whom and at whose request a conversation closes.
struct Closing<'a> {
    reason: CloseReason,
    actor: Option<Actor>,
    /// Empty when the close follows from another command (T3: its ticket closed).
    request_id: &'a str,
}

fn close(
    state: &RouterState,
    config: &RouterConfig,
    decision: &mut Decision<'_>,
    key: u128,
    conversation: &ConversationState,
    closing: Closing<'_>,
) {
    let Closing { reason, actor, request_id } = closing;
    decision.emit(Payload::ConversationClosed(ConversationClosed {
        conversation_id: conversation.id(key),
        reason: reason as i32,
        previous_assignee_agent_id: conversation.assignee().unwrap_or_default().to_owned(),
        actor,
        request_id: request_id.to_owned(),
    }));
    // B3: the assignee has room for one more now.
    if let Some(previous) = conversation.assignee() {
        redrive(state, config, decision, previous, Some(key), |agents| {
            agents.release(conversation.account_id(), previous, conversation.channel_type);
        });
    }
}

fn decide_ticket_stage(
    state: &RouterState,
    config: &RouterConfig,
    decision: &mut Decision<'_>,
    request: &TicketStageChangeRequested,
) {
    const COMMAND: &str = "ticket_stage_change_requested";
    if already_applied(state, decision, COMMAND, &request.request_id) {
        return;
    }
    let Some(ticket) = state.tickets.get(&request.ticket_id) else {
        decision.reject(COMMAND, &request.request_id, format!("ticket `{}` is not open", request.ticket_id));
        return;
    };
    if request.stage.is_empty() && !request.close {
        decision.reject(COMMAND, &request.request_id, "neither a stage nor close was requested");
        return;
    }
    let stage = if request.stage.is_empty() { ticket.stage.clone() } else { request.stage.clone() };
    decision.emit(Payload::TicketStageChanged(TicketStageChanged {
        ticket_id: request.ticket_id.clone(),
        conversation_id: ticket.conversation_id.clone(),
        previous_stage: ticket.stage.clone(),
        stage,
        closed: request.close,
        actor: request.actor.clone(),
        request_id: request.request_id.clone(),
    }));
    // T3: closing the ticket closes its conversation.
    if request.close
        && let Some((key, conversation)) = state.conversation(&ticket.conversation_id)
    {
        let closing = Closing { reason: CloseReason::TicketClosed, actor: request.actor.clone(), request_id: "" };
        close(state, config, decision, key, conversation, closing);
    }
}

fn decide_contact_owner(
    state: &RouterState,
    config: &RouterConfig,
    decision: &mut Decision<'_>,
    request: &ContactOwnerChangeRequested,
) {
    const COMMAND: &str = "contact_owner_change_requested";
    if already_applied(state, decision, COMMAND, &request.request_id) {
        return;
    }
    // M1: another account's contact (same partition) is unknown here.
    let account_id = &decision.cause.account_id;
    let Some(contact) = state.contact_by_id(&request.contact_id).filter(|contact| contact.account_id == *account_id)
    else {
        decision.reject(COMMAND, &request.request_id, format!("unknown contact `{}`", request.contact_id));
        return;
    };
    if !request.owner_agent_id.is_empty() && config.agent(&decision.cause.account_id, &request.owner_agent_id).is_none()
    {
        decision.reject(COMMAND, &request.request_id, format!("unknown agent `{}`", request.owner_agent_id));
        return;
    }
    decision.emit(Payload::ContactOwnerChanged(ContactOwnerChanged {
        contact_id: request.contact_id.clone(),
        owner_agent_id: request.owner_agent_id.clone(),
        previous_owner_agent_id: contact.owner_agent_id_opt.clone().unwrap_or_default(),
        actor: request.actor.clone(),
        request_id: request.request_id.clone(),
    }));
}

// ---------------------------------------------------------------------------------------------
// B3: backlog re-drive.
// ---------------------------------------------------------------------------------------------

/// `freed_agent_id` became available or has room again (`free_agent` applies that change to a
/// copy of the agents' book): waiting (open, unassigned) conversations of the account's
/// opted-in channels whose pool includes the agent (or whose contact it owns) are routed again,
/// oldest first across channels, with the usual rules and explanations. A channel whose oldest
/// waiting conversation still finds nobody is done.
///
/// The book (every agent's workload) is copied only when something waits for the agent: closes
/// and reassignments are frequent, and most find no backlog.
fn redrive(
    state: &RouterState,
    config: &RouterConfig,
    decision: &mut Decision<'_>,
    freed_agent_id: &str,
    exclude_conversation_opt: Option<u128>,
    free_agent: impl FnOnce(&mut AgentBook),
) {
    let Some(channel_ids) = config.redrive_channel_ids_by_account.get(&decision.cause.account_id) else { return };
    struct Cursor<'a> {
        channel: &'a ChannelProfile,
        owner_target: bool,
        exhausted: bool,
        waiting: std::iter::Peekable<Box<dyn Iterator<Item = (u64, u128)> + 'a>>,
    }
    let mut cursors: Vec<Cursor<'_>> = Vec::new();
    for channel_id in channel_ids {
        let Some(channel) = config.channel(&decision.cause.account_id, channel_id) else { continue };
        let Some(rules) = channel.rules_opt.as_ref().filter(|rules| rules.auto_assign && rules.redrive_backlog) else {
            continue;
        };
        let owner_target = rules.target == AssignTarget::ContactOwner as i32;
        let in_pool = channel.pool_position.contains_key(freed_agent_id);
        if !(owner_target || in_pool) || !channel.enabled {
            continue;
        }
        if let Some(waiting) = state.waiting(&decision.cause.account_id, channel_id) {
            let oldest_first: Box<dyn Iterator<Item = (u64, u128)>> = Box::new(waiting.iter());
            cursors.push(Cursor { channel, owner_target, exhausted: false, waiting: oldest_first.peekable() });
        }
    }
    if cursors.is_empty() {
        return;
    }
    let mut overlay = Overlay::tracked(state);
    free_agent(overlay.agents.to_mut());
    let mut attempts = 0;
    while attempts < MAX_REDRIVE_ATTEMPTS {
        // The oldest head among the channels still being re-driven (ties: channel id order).
        let mut best_opt: Option<((u64, u128), usize)> = None;
        for (index, cursor) in cursors.iter_mut().enumerate() {
            if cursor.exhausted {
                continue;
            }
            if let Some(head) = cursor.waiting.peek().copied()
                && best_opt.is_none_or(|(best, _)| head < best)
            {
                best_opt = Some((head, index));
            }
        }
        let Some((_, next)) = best_opt else { break };
        let cursor = &mut cursors[next];
        let (_, key) = cursor.waiting.next().expect("peeked");
        if Some(key) == exclude_conversation_opt {
            continue;
        }
        let Some(conversation) = state.conversations.get(key) else { continue };
        let owner_opt =
            state.contact_by_id(&conversation.contact_id).and_then(|contact| contact.owner_agent_id_opt.as_deref());
        if cursor.owner_target && owner_opt != Some(freed_agent_id) {
            continue;
        }
        attempts += 1;
        let routed = route(config, &overlay.agents, cursor.channel, conversation.channel_type, owner_opt);
        match routed.outcome {
            Outcome::Assigned(agent_id) => {
                overlay.agents.to_mut().take(
                    &conversation.channel_key,
                    &agent_id,
                    conversation.channel_type,
                    decision.cause_millis,
                );
                emit_routing(decision, &conversation.id(key), Outcome::Assigned(agent_id), routed.explanation);
            }
            Outcome::Unassigned(_) if cursor.owner_target => {}
            // Nobody in the pool can take this one, so nobody can take a younger one either.
            Outcome::Unassigned(_) => cursor.exhausted = true,
        }
    }
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
