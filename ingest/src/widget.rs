//! What the chat widget should show right now (spec C5), from the channel's chat settings and,
//! when ingest can read them, the team's open-conversation counts:
//! `GET /v1/channels/{channel_id}/chat/widget`.
//!
//! Availability modes: `always` (24/7), `chat_hours` (weekly ranges in the channel's IANA time
//! zone) and `user_availability` (available while at least one member of the channel's routing
//! rules is available, per the agents' configured availability). Outside chat hours the
//! offline behaviour applies (show the return time, show the away message, or hide the
//! launcher); with nobody available, the away message.
//!
//! At capacity (C5, R8): when the widget would otherwise be available and no counted member of
//! the routing rules has room — every one is at its overall limit or its chat limit — the
//! channel's at-capacity behaviour applies (waiting message, hide the launcher, or nothing).
//! Counted members are the available ones when the rules only assign to available users (R5,
//! the default), otherwise all of them. The counts come from the projector's `agent_workload`
//! read model through [`crate::workload`]; without them the answer is taken from the settings
//! alone and says `"capacity": "unknown"` (or `"not_configured"` when ingest has no database).
//!
//! [`availability`], [`team_capacity`] and [`what_to_show`] are pure; [`widget_state`] gathers
//! their inputs from the config snapshot and the workload snapshot.

use chrono::{DateTime, Datelike, Duration, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use serde::Serialize;
use switchboard_proto::events::v1::{AgentConfigured, ChannelType, ChatSettings};
use switchboard_runtime::config_store::ConfigSnapshot;

use crate::channel;
use crate::error::IngestError;
use crate::workload::{AgentOpenConversations, CapacityKnowledge};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WidgetState {
    pub channel_id: String,
    /// What the visitor experiences: `available`, `away`, `offline` or `at_capacity`.
    pub state: &'static str,
    pub show_launcher: bool,
    pub accent_colour: String,
    pub welcome_message: String,
    pub pop_open_welcome: bool,
    /// Typical reply time when available, the away message when away/offline (if configured),
    /// the waiting message at capacity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Outside chat hours with `show_return_time`: when chat opens again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_available_at: Option<DateTime<Utc>>,
    /// What ingest knows about the team's capacity, whatever the state.
    pub capacity: Capacity,
}

/// Whether a new chat would find a counted member of the routing rules with room (R8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Capacity {
    HasRoom,
    /// Every counted member is at its overall or chat limit.
    AtCapacity,
    /// Nobody to count: no routing rules, no members, or (R5) no member available.
    NoMembers,
    /// The open-conversation counts are unavailable or stale: decided from settings alone.
    Unknown,
    /// Ingest runs without `DATABASE_URL`: capacity is never checked.
    NotConfigured,
}

impl Capacity {
    /// Metrics label (the same as the JSON value).
    pub fn label(self) -> &'static str {
        match self {
            Capacity::HasRoom => "has_room",
            Capacity::AtCapacity => "at_capacity",
            Capacity::NoMembers => "no_members",
            Capacity::Unknown => "unknown",
            Capacity::NotConfigured => "not_configured",
        }
    }
}

/// What the availability mode says before capacity is considered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Available,
    /// `chat_hours` mode, outside the hours; when they next open (within a week).
    OutsideChatHours {
        next_open_opt: Option<DateTime<Utc>>,
    },
    /// `user_availability` mode and no member of the routing rules is available.
    NobodyAvailable,
}

/// Whether chat hours are open at `now`, and if not, when they next open (within a week).
pub fn chat_hours_status(settings: &ChatSettings, now: DateTime<Utc>) -> (bool, Option<DateTime<Utc>>) {
    let time_zone: Tz = settings.time_zone.parse().unwrap_or(Tz::UTC);
    let local_now = now.with_timezone(&time_zone);
    let weekday = local_now.weekday().num_days_from_monday();
    let minute = local_now.hour() * 60 + local_now.minute();
    let open_now = settings
        .chat_hours
        .iter()
        .any(|range| range.weekday == weekday && range.start_minute <= minute && minute < range.end_minute);
    if open_now {
        return (true, None);
    }
    // The earliest range start after now, looking up to 7 days ahead in local time.
    let mut next_open = None;
    for days_ahead in 0..=7i64 {
        let local_day = local_now.date_naive() + Duration::days(days_ahead);
        let day_weekday = local_day.weekday().num_days_from_monday();
        for range in settings.chat_hours.iter().filter(|range| range.weekday == day_weekday) {
            let Some(start) = local_day.and_hms_opt(range.start_minute / 60, range.start_minute % 60, 0) else {
                continue;
            };
            // A start inside a DST gap does not exist locally; skip it rather than guess.
            let Some(start) = time_zone.from_local_datetime(&start).earliest() else { continue };
            let start = start.with_timezone(&Utc);
            if start > now && next_open.is_none_or(|best| start < best) {
                next_open = Some(start);
            }
        }
        if next_open.is_some() {
            break;
        }
    }
    (false, next_open)
}

/// The availability mode's verdict at `now`; `someone_available` only matters in
/// `user_availability` mode.
pub fn availability(settings: &ChatSettings, now: DateTime<Utc>, someone_available: bool) -> Availability {
    match settings.availability_mode.as_str() {
        "chat_hours" => match chat_hours_status(settings, now) {
            (true, _) => Availability::Available,
            (false, next_open_opt) => Availability::OutsideChatHours { next_open_opt },
        },
        "user_availability" if !someone_available => Availability::NobodyAvailable,
        // "always" and unset: 24/7.
        _ => Availability::Available,
    }
}

/// R8: whether `agent` can take one more conversation of `channel_type` given its open ones
/// (`None`: none open). 0 means no limit, overall and per channel type, as in the router.
pub fn has_room(agent: &AgentConfigured, open_opt: Option<&AgentOpenConversations>, channel_type: ChannelType) -> bool {
    let Some(open) = open_opt else { return true };
    let overall_full = agent.max_open_conversations > 0 && open.total >= agent.max_open_conversations;
    let type_limit = agent
        .capacity_per_channel_type
        .iter()
        .find(|limit| limit.channel_type == channel_type as i32)
        .map_or(0, |limit| limit.max_open);
    let type_full = type_limit > 0 && open.of_channel_type(switchboard_proto::names::name(channel_type)) >= type_limit;
    !(overall_full || type_full)
}

/// C5 "every member at capacity": the members counted are the available ones when
/// `only_available` (R5), else all; at capacity when there is at least one and none has room.
pub fn team_capacity(
    account_id: &str,
    members: &[&AgentConfigured],
    only_available: bool,
    channel_type: ChannelType,
    knowledge: &CapacityKnowledge,
) -> Capacity {
    let mut counted = members.iter().filter(|agent| !only_available || agent.available).peekable();
    if counted.peek().is_none() {
        return Capacity::NoMembers;
    }
    let counts = match knowledge {
        CapacityKnowledge::NotConfigured => return Capacity::NotConfigured,
        CapacityKnowledge::Unavailable => return Capacity::Unknown,
        CapacityKnowledge::Known(counts) => counts,
    };
    if counted.any(|agent| has_room(agent, counts.of_agent(account_id, &agent.agent_id), channel_type)) {
        Capacity::HasRoom
    } else {
        Capacity::AtCapacity
    }
}

fn non_empty(text: &str) -> Option<String> {
    (!text.trim().is_empty()).then(|| text.to_owned())
}

/// What the widget shows: availability first (offline, away), then capacity, then the
/// available experience. A switched-off channel (C11) never shows the launcher.
pub fn what_to_show(
    channel_id: &str,
    enabled: bool,
    settings: &ChatSettings,
    availability: Availability,
    capacity: Capacity,
) -> WidgetState {
    let mut shown = WidgetState {
        channel_id: channel_id.to_owned(),
        state: "available",
        show_launcher: enabled,
        accent_colour: settings.accent_colour.clone(),
        welcome_message: settings.welcome_message.clone(),
        pop_open_welcome: settings.pop_open_welcome,
        message: non_empty(&settings.typical_reply_time),
        next_available_at: None,
        capacity,
    };
    match availability {
        Availability::OutsideChatHours { next_open_opt } => {
            shown.state = "offline";
            shown.message = None;
            match settings.offline_behaviour.as_str() {
                "hide_launcher" => shown.show_launcher = false,
                "away_message" => shown.message = non_empty(&settings.away_message),
                // "show_return_time" and unset: tell the visitor when we are back.
                _ => shown.next_available_at = next_open_opt,
            }
        }
        Availability::NobodyAvailable => {
            shown.state = "away";
            shown.message = non_empty(&settings.away_message);
        }
        Availability::Available if capacity == Capacity::AtCapacity => match settings.at_capacity_behaviour.as_str() {
            "waiting_message" => {
                shown.state = "at_capacity";
                shown.message = non_empty(&settings.at_capacity_message);
            }
            "hide_launcher" => {
                shown.state = "at_capacity";
                shown.show_launcher = false;
                shown.message = None;
            }
            // "nothing" and unset: the visitor sees the available experience; `capacity`
            // still says the team is at capacity.
            _ => {}
        },
        Availability::Available => {}
    }
    shown
}

/// The members of the channel's routing rules: the listed users and the agents of the listed
/// teams, of the channel's account. No rules: nobody.
fn rule_members<'c>(
    config: &'c ConfigSnapshot,
    account_id: &str,
    channel_id: &str,
) -> Option<(&'c switchboard_proto::events::v1::RoutingRulesConfigured, Vec<&'c AgentConfigured>)> {
    let rules = &config.routing_rules.get(account_id, channel_id)?.entity;
    let members = config
        .agents
        .in_account(account_id)
        .map(|agent| &agent.entity)
        .filter(|agent| {
            rules.user_ids.contains(&agent.agent_id) || agent.team_ids.iter().any(|team| rules.team_ids.contains(team))
        })
        .collect();
    Some((rules, members))
}

pub fn widget_state(
    config: &ConfigSnapshot,
    channel_id: &str,
    now: DateTime<Utc>,
    knowledge: &CapacityKnowledge,
) -> Result<WidgetState, IngestError> {
    let owned = channel::resolve(config, channel_id, ChannelType::Chat)?;
    let default_settings = ChatSettings::default();
    let settings = owned.entity.chat.as_ref().unwrap_or(&default_settings);
    let (only_available, members) = match rule_members(config, &owned.account_id, channel_id) {
        Some((rules, members)) => (rules.only_available, members),
        None => (true, Vec::new()),
    };
    let someone_available = members.iter().any(|agent| agent.available);
    let availability = availability(settings, now, someone_available);
    let capacity = team_capacity(&owned.account_id, &members, only_available, ChannelType::Chat, knowledge);
    Ok(what_to_show(channel_id, owned.entity.enabled, settings, availability, capacity))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::workload::OpenConversations;
    use switchboard_proto::events::v1::{
        ChannelConfigured, ChannelTypeCapacity, ChatHoursRange, RoutingRulesConfigured,
    };
    use switchboard_runtime::config_store::Owned;

    fn config_with(settings: ChatSettings) -> ConfigSnapshot {
        let mut config = ConfigSnapshot::default();
        config.channels.insert(Owned {
            account_id: "acct".into(),
            entity: ChannelConfigured {
                channel_id: "web".into(),
                channel_type: ChannelType::Chat as i32,
                enabled: true,
                chat: Some(settings),
                ..Default::default()
            },
        });
        config
    }

    fn office_hours(offline_behaviour: &str) -> ChatSettings {
        ChatSettings {
            welcome_message: "Hi! How can we help?".into(),
            availability_mode: "chat_hours".into(),
            time_zone: "Europe/Berlin".into(),
            // Monday to Friday, 09:00–17:00 Berlin time.
            chat_hours: (0..5).map(|weekday| ChatHoursRange { weekday, start_minute: 540, end_minute: 1020 }).collect(),
            typical_reply_time: "a few minutes".into(),
            away_message: "We're away".into(),
            offline_behaviour: offline_behaviour.into(),
            ..Default::default()
        }
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    fn agent(agent_id: &str, available: bool, max_open: u32, chat_limit: u32) -> AgentConfigured {
        AgentConfigured {
            agent_id: agent_id.into(),
            team_ids: vec!["tier1".into()],
            paid_seat: true,
            available,
            max_open_conversations: max_open,
            capacity_per_channel_type: if chat_limit > 0 {
                vec![ChannelTypeCapacity { channel_type: ChannelType::Chat as i32, max_open: chat_limit }]
            } else {
                Vec::new()
            },
            ..Default::default()
        }
    }

    fn counts(rows: &[(&str, &str, i32)]) -> CapacityKnowledge {
        CapacityKnowledge::Known(Arc::new(OpenConversations::from_rows(rows.iter().map(
            |(agent, channel_type, open)| ("acct".to_owned(), agent.to_string(), channel_type.to_string(), *open),
        ))))
    }

    /// The channel `web` of account `acct`, routed to team `tier1`, with these agents.
    fn team_config(settings: ChatSettings, only_available: bool, agents: &[AgentConfigured]) -> ConfigSnapshot {
        let mut config = config_with(settings);
        config.routing_rules.insert(Owned {
            account_id: "acct".into(),
            entity: RoutingRulesConfigured {
                channel_id: "web".into(),
                team_ids: vec!["tier1".into()],
                only_available,
                ..Default::default()
            },
        });
        for agent in agents {
            config.agents.insert(Owned { account_id: "acct".into(), entity: agent.clone() });
        }
        config
    }

    #[test]
    fn c5_chat_hours_follow_the_channels_time_zone() {
        let config = config_with(office_hours("show_return_time"));
        let state = |now| widget_state(&config, "web", at(now), &CapacityKnowledge::NotConfigured).unwrap();
        // Tuesday 2026-03-03 08:30 UTC = 09:30 in Berlin (CET): open.
        let open = state("2026-03-03T08:30:00Z");
        assert_eq!(open.state, "available");
        assert_eq!(open.message.as_deref(), Some("a few minutes"));
        assert_eq!(open.welcome_message, "Hi! How can we help?");
        // Tuesday 07:30 UTC = 08:30 Berlin: closed, back at 09:00 Berlin = 08:00 UTC.
        let early = state("2026-03-03T07:30:00Z");
        assert_eq!(early.state, "offline");
        assert_eq!(early.next_available_at, Some(at("2026-03-03T08:00:00Z")));
        // Friday 17:30 Berlin: back on Monday 09:00 Berlin.
        let weekend = state("2026-03-06T16:30:00Z");
        assert_eq!(weekend.next_available_at, Some(at("2026-03-09T08:00:00Z")));
        // Summer time: 09:30 CEST = 07:30 UTC is open in July.
        assert_eq!(state("2026-07-07T07:30:00Z").state, "available");
    }

    #[test]
    fn c5_offline_behaviours() {
        let night = at("2026-03-03T22:00:00Z");
        let unknown = CapacityKnowledge::NotConfigured;
        let hidden = widget_state(&config_with(office_hours("hide_launcher")), "web", night, &unknown).unwrap();
        assert!(!hidden.show_launcher);
        let away = widget_state(&config_with(office_hours("away_message")), "web", night, &unknown).unwrap();
        assert_eq!(away.message.as_deref(), Some("We're away"));
        assert!(away.next_available_at.is_none());
    }

    #[test]
    fn c5_user_availability_mode_follows_the_rules_members() {
        let settings = ChatSettings {
            availability_mode: "user_availability".into(),
            away_message: "Back soon".into(),
            ..Default::default()
        };
        let unknown = CapacityKnowledge::NotConfigured;
        let config = team_config(settings.clone(), true, &[agent("ana", false, 0, 0)]);
        let away = widget_state(&config, "web", Utc::now(), &unknown).unwrap();
        assert_eq!((away.state, away.message.as_deref()), ("away", Some("Back soon")));
        let config = team_config(settings.clone(), true, &[agent("ana", true, 0, 0)]);
        assert_eq!(widget_state(&config, "web", Utc::now(), &unknown).unwrap().state, "available");
        // An available agent of another account in a team of the same name does not count.
        let mut config = team_config(settings, true, &[]);
        config.agents.insert(Owned { account_id: "other".into(), entity: agent("eve", true, 0, 0) });
        assert_eq!(widget_state(&config, "web", Utc::now(), &unknown).unwrap().state, "away");
    }

    #[test]
    fn c5_always_mode_is_available_and_non_chat_channels_are_not_found() {
        let config = config_with(ChatSettings { availability_mode: "always".into(), ..Default::default() });
        let unknown = CapacityKnowledge::NotConfigured;
        assert_eq!(widget_state(&config, "web", Utc::now(), &unknown).unwrap().state, "available");
        assert!(matches!(widget_state(&config, "nope", Utc::now(), &unknown), Err(IngestError::UnknownChannel { .. })));
    }

    /// State, launcher shown, message, return time.
    type Shown<'a> = (&'a str, bool, Option<&'a str>, Option<DateTime<Utc>>);

    /// availability × capacity × behaviour → state, launcher, message, return time.
    #[test]
    fn c5_what_to_show_by_availability_capacity_and_behaviour() {
        let monday_nine = Some(at("2026-03-09T08:00:00Z"));
        let outside = Availability::OutsideChatHours { next_open_opt: monday_nine };
        let available = Availability::Available;
        let nobody = Availability::NobodyAvailable;
        use Capacity::*;
        #[rustfmt::skip]
        let cases: [(Availability, Capacity, &str, &str, Shown); 13] = [
            // available, with room or without knowing: the typical reply time
            (available, HasRoom, "away_message", "waiting_message", ("available", true, Some("a few minutes"), None)),
            (available, Unknown, "away_message", "waiting_message", ("available", true, Some("a few minutes"), None)),
            (available, NotConfigured, "away_message", "hide_launcher", ("available", true, Some("a few minutes"), None)),
            (available, NoMembers, "away_message", "hide_launcher", ("available", true, Some("a few minutes"), None)),
            // at capacity: the channel's at-capacity behaviour
            (available, AtCapacity, "away_message", "waiting_message", ("at_capacity", true, Some("All agents are busy"), None)),
            (available, AtCapacity, "away_message", "hide_launcher", ("at_capacity", false, None, None)),
            (available, AtCapacity, "away_message", "nothing", ("available", true, Some("a few minutes"), None)),
            (available, AtCapacity, "away_message", "", ("available", true, Some("a few minutes"), None)),
            // offline and away win over capacity
            (outside, AtCapacity, "show_return_time", "hide_launcher", ("offline", true, None, monday_nine)),
            (outside, HasRoom, "away_message", "waiting_message", ("offline", true, Some("We're away"), None)),
            (outside, Unknown, "hide_launcher", "waiting_message", ("offline", false, None, None)),
            (nobody, AtCapacity, "show_return_time", "waiting_message", ("away", true, Some("We're away"), None)),
            (nobody, NoMembers, "show_return_time", "hide_launcher", ("away", true, Some("We're away"), None)),
        ];
        for (availability, capacity, offline_behaviour, at_capacity_behaviour, expected) in cases {
            let settings = ChatSettings {
                typical_reply_time: "a few minutes".into(),
                away_message: "We're away".into(),
                offline_behaviour: offline_behaviour.into(),
                at_capacity_behaviour: at_capacity_behaviour.into(),
                at_capacity_message: "All agents are busy".into(),
                ..Default::default()
            };
            let shown = what_to_show("web", true, &settings, availability, capacity);
            let actual = (shown.state, shown.show_launcher, shown.message.as_deref(), shown.next_available_at);
            assert_eq!(actual, expected, "{availability:?} {capacity:?} {offline_behaviour} {at_capacity_behaviour}");
            assert_eq!(shown.capacity, capacity, "the answer always says what is known about capacity");
        }
        // C11: a switched-off channel never shows the launcher, whatever else holds.
        let shown = what_to_show("web", false, &ChatSettings::default(), available, HasRoom);
        assert!(!shown.show_launcher);
    }

    #[test]
    fn c5_at_capacity_when_no_counted_member_has_room_overall_or_for_chat() {
        let knowledge = counts(&[("ana", "chat", 2), ("ana", "team_email", 3), ("bo", "chat", 1)]);
        let capacity = |agents: &[AgentConfigured], only_available: bool| {
            let members: Vec<&AgentConfigured> = agents.iter().collect();
            team_capacity("acct", &members, only_available, ChannelType::Chat, &knowledge)
        };
        // ana: 5 open overall (2 chat); bo: 1 open chat.
        assert_eq!(capacity(&[agent("ana", true, 0, 0)], true), Capacity::HasRoom, "no limits");
        assert_eq!(capacity(&[agent("ana", true, 5, 0)], true), Capacity::AtCapacity, "overall limit reached");
        assert_eq!(capacity(&[agent("ana", true, 6, 0)], true), Capacity::HasRoom);
        assert_eq!(capacity(&[agent("ana", true, 0, 2)], true), Capacity::AtCapacity, "chat limit reached");
        assert_eq!(capacity(&[agent("ana", true, 0, 3)], true), Capacity::HasRoom, "email does not count for chat");
        assert_eq!(
            capacity(&[agent("ana", true, 0, 2), agent("bo", true, 0, 2)], true),
            Capacity::HasRoom,
            "one member with room is enough"
        );
        assert_eq!(capacity(&[agent("ana", true, 0, 2), agent("bo", true, 0, 1)], true), Capacity::AtCapacity);
        assert_eq!(capacity(&[agent("cy", true, 1, 1)], true), Capacity::HasRoom, "no open conversations");
        // R5: with only available users, an offline member's room does not count…
        assert_eq!(capacity(&[agent("ana", true, 0, 2), agent("cy", false, 0, 0)], true), Capacity::AtCapacity);
        // …and with availability ignored, it does.
        assert_eq!(capacity(&[agent("ana", true, 0, 2), agent("cy", false, 0, 0)], false), Capacity::HasRoom);
        assert_eq!(capacity(&[agent("cy", false, 0, 0)], true), Capacity::NoMembers);
        assert_eq!(capacity(&[], false), Capacity::NoMembers);
    }

    #[test]
    fn c5_capacity_is_unknown_without_fresh_counts_and_not_configured_without_a_database() {
        let ana = agent("ana", true, 0, 1);
        let members = [&ana];
        let capacity = |knowledge| team_capacity("acct", &members, true, ChannelType::Chat, &knowledge);
        assert_eq!(capacity(CapacityKnowledge::Unavailable), Capacity::Unknown);
        assert_eq!(capacity(CapacityKnowledge::NotConfigured), Capacity::NotConfigured);
        assert_eq!(capacity(counts(&[("ana", "chat", 1)])), Capacity::AtCapacity);
    }

    #[test]
    fn c5_widget_state_shows_the_waiting_message_when_the_team_is_full() {
        let settings = ChatSettings {
            availability_mode: "user_availability".into(),
            typical_reply_time: "a few minutes".into(),
            at_capacity_behaviour: "waiting_message".into(),
            at_capacity_message: "All agents are busy, please wait".into(),
            ..Default::default()
        };
        let config = team_config(settings, true, &[agent("ana", true, 0, 1), agent("bo", false, 0, 0)]);
        let full = widget_state(&config, "web", Utc::now(), &counts(&[("ana", "chat", 1)])).unwrap();
        assert_eq!(full.state, "at_capacity");
        assert_eq!(full.message.as_deref(), Some("All agents are busy, please wait"));
        assert_eq!(full.capacity, Capacity::AtCapacity);
        let json = serde_json::to_value(&full).unwrap();
        assert_eq!(json["capacity"], "at_capacity");
        let free = widget_state(&config, "web", Utc::now(), &counts(&[])).unwrap();
        assert_eq!((free.state, free.capacity), ("available", Capacity::HasRoom));
        let degraded = widget_state(&config, "web", Utc::now(), &CapacityKnowledge::Unavailable).unwrap();
        assert_eq!((degraded.state, degraded.capacity), ("available", Capacity::Unknown));
        assert_eq!(serde_json::to_value(&degraded).unwrap()["capacity"], "unknown");
    }
}
