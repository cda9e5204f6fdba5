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
