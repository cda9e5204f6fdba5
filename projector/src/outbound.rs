//! The pure fold of outbound messages' delivery (O5): steps, the provider ids that map statuses
//! to replies, statuses kept until their reply is known, and each message's delivery state.
//!
//! The events of one reply arrive on three topics (`outbound.v1`, `delivery.v1`,
//! `conversations.v1`) that are consumed independently, so in any order. Everything here is
//! therefore a function of *sets*: the steps of a message (keyed, so applying an event twice
//! adds nothing) and the statuses and provider ids seen so far. A message's state is the
//! highest-ranked of its steps ([`rank`]), so it never moves backwards, and the same set gives
//! the same state whatever order built it. A status whose reply is not known yet (its SENT
//! record, or for a watermark the reply itself, comes later) is kept in `delivery_statuses`
//! and matched when the reply becomes known.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::facts::{Event, Fact};

/// A `message_delivery_steps` row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StepRow {
    pub message_id: Uuid,
    /// `queued`, `attempt:<n>`, `status:<word>`.
    pub step_key: String,
    pub account_id: String,
    pub state: String,
    /// The attempt it belongs to (0: queued and provider statuses).
    pub attempt: i32,
    pub provider_message_id: String,
    pub error: String,
    pub will_retry: bool,
    pub at: DateTime<Utc>,
    pub event_id: String,
}

impl StepRow {
    /// Of two rows with the same key, the one kept: the earliest (a status reported twice
    /// keeps its first time), whichever was stored first.
    fn precedes(&self, other: &StepRow) -> bool {
        (self.at, &self.event_id) < (other.at, &other.event_id)
    }
}

/// An `outbound_provider_ids` row: the provider's id of one of our sends.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ProviderIdRow {
    pub account_id: String,
    pub channel_id: String,
    pub provider_message_id: String,
    pub message_id: Uuid,
    pub sent_at: DateTime<Utc>,
}

/// A `delivery_statuses` row: a provider status as reported.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StatusRow {
    pub event_id: String,
    pub account_id: String,
    pub channel_id: String,
    pub provider_message_id: String,
    pub recipient: String,
    pub watermark_at: Option<DateTime<Utc>>,
    pub status: String,
    pub error: String,
    pub at: DateTime<Utc>,
}

/// Where an outbound conversation message goes (`messages.recipient` of an outbound row).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RecipientRow {
    pub message_id: Uuid,
    pub account_id: String,
    pub channel_id: String,
    pub recipient: String,
}

/// What is stored already that the batch's outbound events may relate to (the shell reads the
/// relevant rows; a superset is fine).
#[derive(Debug, Default, Clone)]
pub struct OutboundStored {
    pub steps: Vec<StepRow>,
    pub provider_ids: Vec<ProviderIdRow>,
    pub statuses: Vec<StatusRow>,
    pub recipients: Vec<RecipientRow>,
}

/// A message's delivery state as its steps say (`messages` and `owner_notifications` columns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliverySummary {
    pub message_id: Uuid,
    pub state: &'static str,
    /// When the state is `failed`: why.
    pub failure_reason: String,
    /// When the state is `failed` by an attempt: another one is scheduled.
    pub will_retry: bool,
    /// The provider's id of the first successful attempt ('' until sent).
    pub provider_message_id: String,
}

/// What the outbound part of a batch writes. Every list is sorted by its key.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OutboundWrites {
    /// Inserted; an existing row with the same key is replaced only by an earlier one.
    pub steps: Vec<StepRow>,
    /// Inserted if new.
    pub provider_ids: Vec<ProviderIdRow>,
    /// Inserted if new.
    pub statuses: Vec<StatusRow>,
    /// The state of every message whose steps the batch may have changed.
    pub summaries: Vec<DeliverySummary>,
}

/// Rank of a step: the state is the step of the highest rank. A failed *attempt* ranks below
/// `sent` (a later attempt that succeeds wins); a `failed` *status* from the provider ranks
/// above `sent` (the provider refused what it had accepted) but below `delivered` and `read`
/// (the customer got it after all; a provider reports no failure after that in practice, and
/// ranking it so keeps the state independent of the order reports arrive in).
pub fn rank(state: &str, attempt: i32) -> Option<u8> {
    Some(match (state, attempt) {
        ("queued", _) => 0,
        ("failed", 1..) => 1,
        ("sent", _) => 2,
        ("failed", _) => 3,
        ("delivered", _) => 4,
        ("read", _) => 5,
        _ => return None,
    })
}

/// The state of a message with these steps (`None` without a known step).
pub fn summarize<'a>(message_id: Uuid, steps: impl IntoIterator<Item = &'a StepRow>) -> Option<DeliverySummary> {
    let steps: Vec<&StepRow> = steps.into_iter().collect();
    let top = steps
        .iter()
        .filter_map(|step| Some((rank(&step.state, step.attempt)?, *step)))
        .max_by(|(rank_a, step_a), (rank_b, step_b)| rank_a.cmp(rank_b).then_with(|| step_b.at.cmp(&step_a.at)))?
        .1;
    let state = ["queued", "sent", "delivered", "read", "failed"].into_iter().find(|state| *state == top.state)?;
    let (failure_reason, will_retry) = if state != "failed" {
        (String::new(), false)
    } else if top.attempt == 0 {
        (top.error.clone(), false)
    } else {
        // The latest attempt says whether another comes.
        let last = steps.iter().filter(|step| step.attempt > 0).max_by_key(|step| step.attempt).unwrap_or(&top);
        (last.error.clone(), last.will_retry)
    };
    let provider_message_id = steps
        .iter()
        .filter(|step| step.attempt > 0 && step.state == "sent")
        .min_by_key(|step| step.attempt)
        .map(|step| step.provider_message_id.clone())
        .unwrap_or_default();
    Some(DeliverySummary { message_id, state, failure_reason, will_retry, provider_message_id })
}

/// The step a provider status adds to the message it matched.
fn status_step(status: &StatusRow, message_id: Uuid) -> StepRow {
    StepRow {
        message_id,
        step_key: format!("status:{}", status.status),
        account_id: status.account_id.clone(),
        // A Messenger echo is our own send confirmed: a `sent` step.
        state: if status.status == "echo" { "sent".to_owned() } else { status.status.clone() },
        attempt: 0,
        provider_message_id: status.provider_message_id.clone(),
        error: status.error.clone(),
        will_retry: false,
        at: status.at,
        event_id: status.event_id.clone(),
    }
}

/// Adds a step unless one with its key that precedes it is there.
fn add_step(steps: &mut BTreeMap<(Uuid, String), StepRow>, step: StepRow) {
    let key = (step.message_id, step.step_key.clone());
    match steps.get(&key) {
        Some(kept) if !step.precedes(kept) => {}
        _ => {
            steps.insert(key, step);
        }
    }
}

/// Folds the outbound events of a batch (queued messages, attempts, provider statuses) with
/// what is stored into the rows to write and the states of the messages touched.
pub fn fold_outbound(events: &[&Event], stored: OutboundStored) -> OutboundWrites {
    let mut new_steps: BTreeMap<(Uuid, String), StepRow> = BTreeMap::new();
    let mut provider_ids: BTreeMap<(String, String, String), ProviderIdRow> = BTreeMap::new();
    let mut statuses: BTreeMap<String, StatusRow> = BTreeMap::new();
    let mut recipients: HashMap<Uuid, RecipientRow> = HashMap::new();

    for event in events {
        match &event.fact {
            Fact::OutboundQueued(queued) => {
                add_step(
                    &mut new_steps,
                    StepRow {
                        message_id: queued.reply_id,
                        step_key: "queued".into(),
                        account_id: event.account_id.clone(),
                        state: "queued".into(),
                        attempt: 0,
                        provider_message_id: String::new(),
                        error: String::new(),
                        will_retry: false,
                        at: event.recorded_at,
                        event_id: event.event_id.clone(),
                    },
                );
                if !queued.owner_notification {
                    recipients.insert(
                        queued.reply_id,
                        RecipientRow {
                            message_id: queued.reply_id,
                            account_id: event.account_id.clone(),
                            channel_id: queued.channel_id.clone(),
                            recipient: queued.recipient.clone(),
                        },
                    );
                }
            }
            Fact::DeliveryAttempt(attempt) => {
                add_step(
                    &mut new_steps,
                    StepRow {
                        message_id: attempt.reply_id,
                        step_key: format!("attempt:{}", attempt.attempt),
                        account_id: event.account_id.clone(),
                        state: if attempt.sent { "sent" } else { "failed" }.to_owned(),
                        attempt: attempt.attempt.max(1),
                        provider_message_id: attempt.provider_message_id.clone(),
                        error: attempt.error.clone(),
                        will_retry: attempt.will_retry,
                        at: event.occurred_at,
                        event_id: event.event_id.clone(),
                    },
                );
                if attempt.sent && !attempt.provider_message_id.is_empty() {
                    let key =
                        (event.account_id.clone(), attempt.channel_id.clone(), attempt.provider_message_id.clone());
                    let row = ProviderIdRow {
                        account_id: event.account_id.clone(),
                        channel_id: attempt.channel_id.clone(),
                        provider_message_id: attempt.provider_message_id.clone(),
                        message_id: attempt.reply_id,
                        sent_at: event.occurred_at,
                    };
                    provider_ids.entry(key).or_insert(row);
                }
            }
            Fact::DeliveryStatus(status) => {
                statuses.entry(event.event_id.clone()).or_insert_with(|| StatusRow {
                    event_id: event.event_id.clone(),
                    account_id: event.account_id.clone(),
                    channel_id: status.channel_id.clone(),
                    provider_message_id: status.provider_message_id.clone(),
                    recipient: status.recipient.clone(),
                    watermark_at: status.watermark_at,
                    status: status.status.to_owned(),
                    error: status.error.clone(),
                    at: event.occurred_at,
                });
            }
            _ => {}
        }
    }
    if new_steps.is_empty() && statuses.is_empty() {
        return OutboundWrites::default();
    }

    // Everything known: stored and new. A stored row wins a key (it was there first).
    let mut all_provider_ids: HashMap<(&str, &str, &str), &ProviderIdRow> = HashMap::new();
    for row in stored.provider_ids.iter().chain(provider_ids.values()) {
        all_provider_ids
            .entry((row.account_id.as_str(), row.channel_id.as_str(), row.provider_message_id.as_str()))
            .or_insert(row);
    }
    let mut sent_at: HashMap<Uuid, DateTime<Utc>> = HashMap::new();
    for row in all_provider_ids.values() {
        let at = sent_at.entry(row.message_id).or_insert(row.sent_at);
        *at = (*at).min(row.sent_at);
    }
    let mut by_recipient: HashMap<(&str, &str, &str), Vec<Uuid>> = HashMap::new();
    let mut seen_recipients = HashSet::new();
    for row in stored.recipients.iter().chain(recipients.values()) {
        if seen_recipients.insert(row.message_id) {
            by_recipient
                .entry((row.account_id.as_str(), row.channel_id.as_str(), row.recipient.as_str()))
                .or_default()
                .push(row.message_id);
        }
    }
    let mut seen_statuses = HashSet::new();
    for status in stored.statuses.iter().chain(statuses.values()) {
        if !seen_statuses.insert(status.event_id.as_str()) {
            continue;
        }
        let key = (status.account_id.as_str(), status.channel_id.as_str());
        match status.watermark_at {
            None => {
                if let Some(row) = all_provider_ids.get(&(key.0, key.1, status.provider_message_id.as_str())) {
                    add_step(&mut new_steps, status_step(status, row.message_id));
                }
            }
            Some(watermark_at) => {
                let candidates = by_recipient.get(&(key.0, key.1, status.recipient.as_str()));
                for message_id in candidates.into_iter().flatten() {
                    if sent_at.get(message_id).is_some_and(|sent| *sent <= watermark_at) {
                        add_step(&mut new_steps, status_step(status, *message_id));
                    }
                }
            }
        }
    }

    // A new step only matters if it is not stored already (or is earlier than the stored one).
    let stored_steps: HashMap<(Uuid, &str), &StepRow> =
        stored.steps.iter().map(|step| ((step.message_id, step.step_key.as_str()), step)).collect();
    new_steps.retain(|(message_id, key), step| {
        stored_steps.get(&(*message_id, key.as_str())).is_none_or(|kept| step.precedes(kept))
    });
    let mut steps_by_message: BTreeMap<Uuid, BTreeMap<&str, &StepRow>> = BTreeMap::new();
    for step in stored.steps.iter().chain(new_steps.values()) {
        let entry = steps_by_message.entry(step.message_id).or_default();
        match entry.get(step.step_key.as_str()) {
            Some(kept) if !step.precedes(kept) => {}
            _ => {
                entry.insert(step.step_key.as_str(), step);
            }
        }
    }
    let touched: HashSet<Uuid> = new_steps.keys().map(|(message_id, _)| *message_id).collect();
    let summaries = steps_by_message
        .iter()
        .filter(|(message_id, _)| touched.contains(message_id))
        .filter_map(|(message_id, steps)| summarize(*message_id, steps.values().copied()))
        .collect();
    OutboundWrites {
        steps: new_steps.into_values().collect(),
        provider_ids: provider_ids.into_values().collect(),
        statuses: statuses.into_values().collect(),
        summaries,
    }
}

/// The outbound tables as the shell leaves them, kept in memory (tests only): the statements'
/// semantics, and the whole store as the fold's input (a superset of what the shell reads).
#[cfg(test)]
pub(crate) mod memory {
    use super::*;

    #[derive(Debug, Default, Clone, PartialEq, Eq)]
    pub struct MemoryOutbound {
        pub steps: BTreeMap<(Uuid, String), StepRow>,
        pub provider_ids: BTreeMap<(String, String, String), ProviderIdRow>,
        pub statuses: BTreeMap<String, StatusRow>,
        /// Outbound `messages` rows: where each goes and its delivery state.
        pub messages: BTreeMap<Uuid, (RecipientRow, DeliverySummary)>,
    }

    impl MemoryOutbound {
        /// As the message insert does before the fold: a queued reply's row, if new.
        pub fn insert_messages(&mut self, events: &[&Event]) {
            for event in events {
                let Fact::OutboundQueued(queued) = &event.fact else { continue };
                if queued.owner_notification {
                    continue;
                }
                self.messages.entry(queued.reply_id).or_insert_with(|| {
                    let recipient = RecipientRow {
                        message_id: queued.reply_id,
                        account_id: event.account_id.clone(),
                        channel_id: queued.channel_id.clone(),
                        recipient: queued.recipient.clone(),
                    };
                    let queued_state = DeliverySummary {
                        message_id: queued.reply_id,
                        state: "queued",
                        failure_reason: String::new(),
                        will_retry: false,
                        provider_message_id: String::new(),
                    };
                    (recipient, queued_state)
                });
            }
        }

        pub fn stored(&self) -> OutboundStored {
            OutboundStored {
                steps: self.steps.values().cloned().collect(),
                provider_ids: self.provider_ids.values().cloned().collect(),
                statuses: self.statuses.values().cloned().collect(),
                recipients: self.messages.values().map(|(recipient, _)| recipient.clone()).collect(),
            }
        }

        pub fn write(&mut self, writes: &OutboundWrites) {
            for step in &writes.steps {
                add_step(&mut self.steps, step.clone());
            }
            for row in &writes.provider_ids {
                let key = (row.account_id.clone(), row.channel_id.clone(), row.provider_message_id.clone());
                self.provider_ids.entry(key).or_insert_with(|| row.clone());
            }
            for row in &writes.statuses {
                self.statuses.entry(row.event_id.clone()).or_insert_with(|| row.clone());
            }
            for summary in &writes.summaries {
                if let Some((_, state)) = self.messages.get_mut(&summary.message_id) {
                    *state = summary.clone();
                }
            }
        }

        /// One batch through insert, fold and write.
        pub fn apply(&mut self, events: &[&Event]) {
            self.insert_messages(events);
            let writes = fold_outbound(events, self.stored());
            self.write(&writes);
        }

        pub fn state(&self, message_id: Uuid) -> Option<&DeliverySummary> {
            self.messages.get(&message_id).map(|(_, state)| state)
        }

        pub fn history(&self, message_id: Uuid) -> Vec<(&str, &str)> {
            let mut steps: Vec<&StepRow> = self.steps.values().filter(|step| step.message_id == message_id).collect();
            steps.sort_by_key(|step| (step.at, step.step_key.clone()));
            steps.iter().map(|step| (step.step_key.as_str(), step.state.as_str())).collect()
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use chrono::TimeZone;
    use serde_json::json;

    use super::memory::MemoryOutbound;
    use super::*;
    use crate::facts::{AuthorFact, DeliveryAttempt, DeliveryStatus, OutboundQueued};

    pub const ACCOUNT: &str = "acme";

    pub fn at(second: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + second, 0).unwrap()
    }

    pub fn reply(n: u128) -> Uuid {
        Uuid::from_u128(0x5000 + n)
    }

    fn event(event_id: &str, second: i64, fact: Fact) -> Event {
        Event {
            event_id: event_id.to_owned(),
            account_id: ACCOUNT.to_owned(),
            occurred_at: at(second),
            recorded_at: at(second),
            trace_id: String::new(),
            source: None,
            fact,
        }
    }

    pub fn agent() -> AuthorFact {
        AuthorFact { kind: "agent", agent_id: "ana".into(), name: "Ana".into(), automation: "" }
    }

    /// A reply `n` to the conversation `Uuid(1)` on channel `messenger-1`, to `psid-7`.
    pub fn queued(event_id: &str, second: i64, n: u128, author: AuthorFact, owner_notification: bool) -> Event {
        event(
            event_id,
            second,
            Fact::OutboundQueued(Box::new(OutboundQueued {
                reply_id: reply(n),
                conversation_id: Some(Uuid::from_u128(1)),
                inbox_id: "inbox-1".into(),
                channel_id: "messenger-1".into(),
                owner_notification,
                author,
                text: format!("reply {n}"),
                kind: "text",
                subject: String::new(),
                recipient: "psid-7".into(),
                content: json!({}),
            })),
        )
    }

    pub fn attempt(event_id: &str, second: i64, n: u128, number: i32, sent: bool, will_retry: bool) -> Event {
        event(
            event_id,
            second,
            Fact::DeliveryAttempt(Box::new(DeliveryAttempt {
                reply_id: reply(n),
                channel_id: "messenger-1".into(),
                attempt: number,
                sent,
                provider_message_id: if sent { format!("mid.{n}") } else { String::new() },
                error: if sent { String::new() } else { format!("503 from Graph API on attempt {number}") },
                will_retry,
            })),
        )
    }

    /// A provider status about reply `n` (its provider id `mid.<n>`).
    pub fn status(event_id: &str, second: i64, n: u128, word: &'static str) -> Event {
        event(
            event_id,
            second,
            Fact::DeliveryStatus(Box::new(DeliveryStatus {
                channel_id: "messenger-1".into(),
                provider_message_id: format!("mid.{n}"),
                recipient: "psid-7".into(),
                watermark_at: None,
                status: word,
                error: if word == "failed" { "131047: re-engagement required".into() } else { String::new() },
            })),
        )
    }

    /// A Messenger read watermark for `psid-7` at `watermark_second`.
    pub fn watermark(event_id: &str, second: i64, watermark_second: i64) -> Event {
        let millis = at(watermark_second).timestamp_millis();
        event(
            event_id,
            second,
            Fact::DeliveryStatus(Box::new(DeliveryStatus {
                channel_id: "messenger-1".into(),
                provider_message_id: format!("watermark:{millis}"),
                recipient: "psid-7".into(),
                watermark_at: Some(at(watermark_second)),
                status: "read",
                error: String::new(),
            })),
        )
    }

    fn applied(batches: &[&[&Event]]) -> MemoryOutbound {
        let mut store = MemoryOutbound::default();
        for batch in batches {
            store.apply(batch);
        }
        store
    }

    #[test]
    fn o5_a_queued_reply_is_queued_with_one_step() {
        // Given a reply accepted for sending
        let queue = queued("e1", 0, 1, agent(), false);
        // When folded
        let store = applied(&[&[&queue]]);
        // Then it is queued, with the queued step at the time it was recorded
        assert_eq!(store.state(reply(1)).unwrap().state, "queued");
        assert_eq!(store.history(reply(1)), [("queued", "queued")]);
        assert_eq!(store.steps.values().next().unwrap().at, at(0));
    }

    #[test]
    fn o5_a_reply_moves_queued_sent_delivered_read_with_its_provider_id() {
        let (queue, sent, delivered, read) = (
            queued("e1", 0, 1, agent(), false),
            attempt("e2", 1, 1, 1, true, false),
            status("e3", 2, 1, "delivered"),
            status("e4", 3, 1, "read"),
        );
        let mut store = MemoryOutbound::default();
        let mut states = Vec::new();
        for event in [&queue, &sent, &delivered, &read] {
            store.apply(&[event]);
            states.push(store.state(reply(1)).unwrap().state);
        }
        assert_eq!(states, ["queued", "sent", "delivered", "read"]);
        assert_eq!(store.state(reply(1)).unwrap().provider_message_id, "mid.1");
        assert_eq!(
            store.history(reply(1)),
            [("queued", "queued"), ("attempt:1", "sent"), ("status:delivered", "delivered"), ("status:read", "read")]
        );
    }

    #[test]
    fn o5_a_failed_attempt_that_will_be_retried_says_so_and_a_successful_retry_wins() {
        // Given a reply whose first attempt failed with a retry scheduled
        let queue = queued("e1", 0, 1, agent(), false);
        let failed = attempt("e2", 1, 1, 1, false, true);
        let mut store = applied(&[&[&queue, &failed]]);
        // Then it is failed, with the reason, and will be retried
        let state = store.state(reply(1)).unwrap().clone();
        assert_eq!((state.state, state.will_retry), ("failed", true));
        assert_eq!(state.failure_reason, "503 from Graph API on attempt 1");
        // When the second attempt succeeds
        let retried = attempt("e3", 5, 1, 2, true, false);
        store.apply(&[&retried]);
        // Then it is sent, the failure is in the history only
        let state = store.state(reply(1)).unwrap();
        assert_eq!((state.state, state.will_retry, state.failure_reason.as_str()), ("sent", false, ""));
        assert_eq!(store.history(reply(1)), [("queued", "queued"), ("attempt:1", "failed"), ("attempt:2", "sent")]);
    }

    #[test]
    fn o5_the_last_attempt_says_whether_another_comes() {
        let events = [
            queued("e1", 0, 1, agent(), false),
            attempt("e2", 1, 1, 1, false, true),
            attempt("e3", 2, 1, 2, false, false),
        ];
        // Delivered in reverse: the first attempt's "will retry" does not win
        let store = applied(&[&[&events[2]], &[&events[1]], &[&events[0]]]);
        let state = store.state(reply(1)).unwrap();
        assert_eq!((state.state, state.will_retry), ("failed", false));
        assert_eq!(state.failure_reason, "503 from Graph API on attempt 2");
    }

    #[test]
    fn o5_statuses_before_the_sent_record_are_kept_and_applied_when_it_arrives() {
        // Given a delivered and a read status for a reply whose SENT record was not seen yet
        let queue = queued("e1", 0, 1, agent(), false);
        let delivered = status("s1", 2, 1, "delivered");
        let read = status("s2", 3, 1, "read");
        let mut store = applied(&[&[&queue], &[&delivered, &read]]);
        // Then the reply is still queued and the statuses are kept
        assert_eq!(store.state(reply(1)).unwrap().state, "queued");
        assert_eq!(store.statuses.len(), 2);
        // When the SENT record arrives
        let sent = attempt("e2", 1, 1, 1, true, false);
        store.apply(&[&sent]);
        // Then both statuses apply
        assert_eq!(store.state(reply(1)).unwrap().state, "read");
        assert_eq!(store.history(reply(1)).len(), 4);
    }

    #[test]
    fn o5_a_messenger_read_watermark_covers_every_reply_sent_at_or_before_it() {
        // Given replies 1 and 2 sent at 10 and 20, reply 3 sent at 40
        let events = [
            queued("q1", 0, 1, agent(), false),
            queued("q2", 0, 2, agent(), false),
            queued("q3", 0, 3, agent(), false),
            attempt("a1", 10, 1, 1, true, false),
            attempt("a2", 20, 2, 1, true, false),
            attempt("a3", 40, 3, 1, true, false),
        ];
        let all: Vec<&Event> = events.iter().collect();
        let mut store = applied(&[&all]);
        // When the customer read up to 30
        let read = watermark("w1", 50, 30);
        store.apply(&[&read]);
        // Then 1 and 2 are read, 3 is not
        let states: Vec<&str> = (1..=3).map(|n| store.state(reply(n)).unwrap().state).collect();
        assert_eq!(states, ["read", "read", "sent"]);
    }

    #[test]
    fn o5_a_watermark_before_the_reply_is_known_applies_when_it_is() {
        // Given the watermark first, then the SENT record, then the queued reply itself
        let read = watermark("w1", 50, 30);
        let sent = attempt("a1", 10, 1, 1, true, false);
        let queue = queued("q1", 0, 1, agent(), false);
        let store = applied(&[&[&read], &[&sent], &[&queue]]);
        assert_eq!(store.state(reply(1)).unwrap().state, "read");
    }

    #[test]
    fn o5_a_messenger_echo_confirms_the_send_and_shows_no_customer_message() {
        let queue = queued("q1", 0, 1, agent(), false);
        let sent = attempt("a1", 1, 1, 1, true, false);
        let echo = status("s1", 2, 1, "echo");
        let store = applied(&[&[&queue, &echo], &[&sent]]);
        assert_eq!(store.state(reply(1)).unwrap().state, "sent");
        assert_eq!(store.history(reply(1))[2], ("status:echo", "sent"));
    }

    #[test]
    fn o5_a_provider_failure_after_sent_fails_the_reply_but_delivered_wins_over_it() {
        let queue = queued("q1", 0, 1, agent(), false);
        let sent = attempt("a1", 1, 1, 1, true, false);
        let failed = status("s1", 2, 1, "failed");
        let mut store = applied(&[&[&queue, &sent, &failed]]);
        let state = store.state(reply(1)).unwrap();
        assert_eq!((state.state, state.failure_reason.as_str()), ("failed", "131047: re-engagement required"));
        let delivered = status("s2", 3, 1, "delivered");
        store.apply(&[&delivered]);
        assert_eq!(store.state(reply(1)).unwrap().state, "delivered");
    }

    #[test]
    fn o5_the_state_never_moves_backwards() {
        // Given read reported, then a late SENT status and a late delivered
        let queue = queued("q1", 0, 1, agent(), false);
        let sent = attempt("a1", 1, 1, 1, true, false);
        let read = status("s1", 3, 1, "read");
        let late = status("s2", 4, 1, "delivered");
        let store = applied(&[&[&queue, &sent], &[&read], &[&late]]);
        assert_eq!(store.state(reply(1)).unwrap().state, "read");
    }

    #[test]
    fn o5_applying_any_event_twice_changes_nothing() {
        let events = [
            queued("q1", 0, 1, agent(), false),
            attempt("a1", 1, 1, 1, false, true),
            attempt("a2", 2, 1, 2, true, false),
            status("s1", 3, 1, "delivered"),
            watermark("w1", 4, 10),
        ];
        let once: Vec<&Event> = events.iter().collect();
        let mut store = applied(&[&once]);
        let before = store.clone();
        store.apply(&once);
        for event in &events {
            store.apply(&[event]);
        }
        assert_eq!(store, before);
    }

    #[test]
    fn o5_a_status_repeated_later_keeps_its_first_time() {
        let queue = queued("q1", 0, 1, agent(), false);
        let sent = attempt("a1", 1, 1, 1, true, false);
        let late = status("s2", 9, 1, "delivered");
        let early = status("s1", 3, 1, "delivered");
        let store = applied(&[&[&queue, &sent, &late], &[&early]]);
        let step = &store.steps[&(reply(1), "status:delivered".to_owned())];
        assert_eq!((step.at, step.event_id.as_str()), (at(3), "s1"));
    }

    #[test]
    fn r4_an_owner_notification_is_no_conversation_message_but_its_attempts_are_kept() {
        let notify = queued("q1", 0, 9, AuthorFact { automation: "owner_notification", ..agent() }, true);
        let sent = attempt("a1", 1, 9, 1, true, false);
        let events = [&notify, &sent];
        let writes = fold_outbound(&events, OutboundStored::default());
        assert!(writes.steps.iter().all(|step| step.message_id == reply(9)));
        assert_eq!(writes.steps.len(), 2);
        assert_eq!(writes.summaries[0].state, "sent");
        // No recipient row: a watermark never matches it.
        let mut store = MemoryOutbound::default();
        store.apply(&events);
        assert!(store.messages.is_empty());
    }

    #[test]
    fn o5_statuses_of_another_account_never_match() {
        let queue = queued("q1", 0, 1, agent(), false);
        let sent = attempt("a1", 1, 1, 1, true, false);
        let mut other = status("s1", 2, 1, "read");
        other.account_id = "globex".into();
        let store = applied(&[&[&queue, &sent, &other]]);
        assert_eq!(store.state(reply(1)).unwrap().state, "sent");
    }
}
