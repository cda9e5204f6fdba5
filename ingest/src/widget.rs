//! What the chat widget should show right now (spec C5), from the channel's chat settings:
//! `GET /v1/channels/{channel_id}/chat/widget`.
//!
//! Availability modes: `always` (24/7), `chat_hours` (weekly ranges in the channel's IANA time
//! zone) and `user_availability` (available while at least one user of the channel's assignment
//! rules is available, per the agents' configured availability). Outside chat hours the
//! offline behaviour applies (show the return time, show the away message, or hide the
//! launcher); with nobody available, the away message.
//!
//! Not decided here: "every member at capacity" needs the open-conversation counts, which
//! live in the router and read models, not in the config ingest sees.

use chrono::{DateTime, Datelike, Duration, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use serde::Serialize;
use switchboard_proto::events::v1::{ChannelType, ChatSettings};
use switchboard_runtime::config_store::ConfigSnapshot;

use crate::channel;
use crate::error::IngestError;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WidgetState {
    pub channel_id: String,
    /// `available`, `away` or `offline`.
    pub state: &'static str,
    pub show_launcher: bool,
    pub accent_colour: String,
    pub welcome_message: String,
    pub pop_open_welcome: bool,
    /// Typical reply time when available, the away message when away/offline (if configured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Outside chat hours with `show_return_time`: when chat opens again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_available_at: Option<DateTime<Utc>>,
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

fn someone_available(config: &ConfigSnapshot, channel_id: &str) -> bool {
    let Some(rules) = config.routing_rules.get(channel_id) else { return false };
    let rules = &rules.entity;
    config.agents.values().any(|agent| {
        let agent = &agent.entity;
        let in_rules =
            rules.user_ids.contains(&agent.agent_id) || agent.team_ids.iter().any(|team| rules.team_ids.contains(team));
        in_rules && agent.available
    })
}

fn non_empty(text: &str) -> Option<String> {
    (!text.trim().is_empty()).then(|| text.to_owned())
}

pub fn widget_state(config: &ConfigSnapshot, channel_id: &str, now: DateTime<Utc>) -> Result<WidgetState, IngestError> {
    let owned = channel::resolve(config, channel_id, ChannelType::Chat)?;
    let settings = owned.entity.chat.clone().unwrap_or_default();
    let mut shown = WidgetState {
        channel_id: channel_id.to_owned(),
        state: "available",
        // C11: a switched-off channel shows no launcher.
        show_launcher: owned.entity.enabled,
        accent_colour: settings.accent_colour.clone(),
        welcome_message: settings.welcome_message.clone(),
        pop_open_welcome: settings.pop_open_welcome,
        message: non_empty(&settings.typical_reply_time),
        next_available_at: None,
    };
    match settings.availability_mode.as_str() {
        "chat_hours" => {
            let (open, next_open) = chat_hours_status(&settings, now);
            if !open {
                shown.state = "offline";
                shown.message = None;
                match settings.offline_behaviour.as_str() {
                    "hide_launcher" => shown.show_launcher = false,
                    "away_message" => shown.message = non_empty(&settings.away_message),
                    // "show_return_time" and unset: tell the visitor when we are back.
                    _ => shown.next_available_at = next_open,
                }
            }
        }
        "user_availability" if !someone_available(config, channel_id) => {
            shown.state = "away";
            shown.message = non_empty(&settings.away_message);
        }
        // "always" and unset: 24/7.
        _ => {}
    }
    Ok(shown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_proto::events::v1::{AgentConfigured, ChannelConfigured, ChatHoursRange, RoutingRulesConfigured};
    use switchboard_runtime::config_store::Owned;

    fn config_with(settings: ChatSettings) -> ConfigSnapshot {
        let mut config = ConfigSnapshot::default();
        config.channels.insert(
            "web".into(),
            Owned {
                account_id: "acct".into(),
                entity: ChannelConfigured {
                    channel_id: "web".into(),
                    channel_type: ChannelType::Chat as i32,
                    enabled: true,
                    chat: Some(settings),
                    ..Default::default()
                },
            },
        );
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

    #[test]
    fn c5_chat_hours_follow_the_channels_time_zone() {
        let config = config_with(office_hours("show_return_time"));
        // Tuesday 2026-03-03 08:30 UTC = 09:30 in Berlin (CET): open.
        let open = widget_state(&config, "web", at("2026-03-03T08:30:00Z")).unwrap();
        assert_eq!(open.state, "available");
        assert_eq!(open.message.as_deref(), Some("a few minutes"));
        assert_eq!(open.welcome_message, "Hi! How can we help?");
        // Tuesday 07:30 UTC = 08:30 Berlin: closed, back at 09:00 Berlin = 08:00 UTC.
        let early = widget_state(&config, "web", at("2026-03-03T07:30:00Z")).unwrap();
        assert_eq!(early.state, "offline");
        assert_eq!(early.next_available_at, Some(at("2026-03-03T08:00:00Z")));
        // Friday 17:30 Berlin: back on Monday 09:00 Berlin.
        let weekend = widget_state(&config, "web", at("2026-03-06T16:30:00Z")).unwrap();
        assert_eq!(weekend.next_available_at, Some(at("2026-03-09T08:00:00Z")));
        // Summer time: 09:30 CEST = 07:30 UTC is open in July.
        assert_eq!(widget_state(&config, "web", at("2026-07-07T07:30:00Z")).unwrap().state, "available");
    }

    #[test]
    fn c5_offline_behaviours() {
        let night = at("2026-03-03T22:00:00Z");
        let hidden = widget_state(&config_with(office_hours("hide_launcher")), "web", night).unwrap();
        assert!(!hidden.show_launcher);
        let away = widget_state(&config_with(office_hours("away_message")), "web", night).unwrap();
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
        let mut config = config_with(settings);
        config.routing_rules.insert(
            "web".into(),
            Owned {
                account_id: "acct".into(),
                entity: RoutingRulesConfigured {
                    channel_id: "web".into(),
                    team_ids: vec!["tier1".into()],
                    ..Default::default()
                },
            },
        );
        let agent = |available| Owned {
            account_id: "acct".into(),
            entity: AgentConfigured {
                agent_id: "ana".into(),
                team_ids: vec!["tier1".into()],
                available,
                ..Default::default()
            },
        };
        config.agents.insert("ana".into(), agent(false));
        let away = widget_state(&config, "web", Utc::now()).unwrap();
        assert_eq!((away.state, away.message.as_deref()), ("away", Some("Back soon")));
        config.agents.insert("ana".into(), agent(true));
        assert_eq!(widget_state(&config, "web", Utc::now()).unwrap().state, "available");
    }

    #[test]
    fn c5_always_mode_is_available_and_non_chat_channels_are_not_found() {
        let config = config_with(ChatSettings { availability_mode: "always".into(), ..Default::default() });
        assert_eq!(widget_state(&config, "web", Utc::now()).unwrap().state, "available");
        assert!(matches!(widget_state(&config, "nope", Utc::now()), Err(IngestError::UnknownChannel { .. })));
    }
}
