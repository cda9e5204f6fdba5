//! The one place where protobuf enum values become the short lower-case names that PostgreSQL
//! stores, config files and the API accept, metrics use as labels and the docs show
//! (`team_email`, `round_robin`, ...), and back.
//!
//! A short name is derived from prost's `as_str_name` (`CHANNEL_TYPE_TEAM_EMAIL`) by removing
//! the enum's prefix and lower-casing (`team_email`); names are read back through
//! `from_str_name`. So a new enum value needs no edit here. The few stored names that differ from
//! that rule are listed per enum in an exception table. These names are a stored contract: the
//! test `stored_names_are_unchanged` pins every one of them.

use std::sync::OnceLock;

use crate::api::v1::ConversationStatus;
use crate::events::v1::{
    AssignTarget, AssignmentStrategy, CallDirection, CallState, ChannelType, CloseReason, ConsentMode, ConsentState,
    InboxAccessMode, InboxKind, MessageKind, SkipReason, TicketNotCreatedReason, TicketOwnerSource, UnassignedReason,
    WithheldReason,
};

/// A protobuf enum with short names. Implemented by `short_names!` (below) for every enum whose values
/// are stored or shown as text.
pub trait ShortNamed: Copy + Eq + Into<i32> + TryFrom<i32> + 'static {
    /// What protoc puts before every value name of this enum (`CHANNEL_TYPE_`).
    const PREFIX: &'static str;
    /// Values whose stored name is not the derived one.
    const EXCEPTIONS: &'static [(Self, &'static str)];
    /// The value's name in the `.proto` file (prost's `as_str_name`).
    fn proto_name(self) -> &'static str;
    /// The value of a `.proto` value name (prost's `from_str_name`).
    fn from_proto_name(proto_name: &str) -> Option<Self>;
    /// The short names by value, derived once from the proto names.
    fn short_names() -> &'static [Option<String>];
}

/// Enum values are looked for in `0..=HIGHEST_VALUE`; every Switchboard enum is numbered from 0
/// without gaps, far below this.
const HIGHEST_VALUE: i32 = 255;

/// The short name of every value of `Enum`, indexed by value (`None` where the enum has no value).
fn derive_short_names<Enum: ShortNamed>() -> Vec<Option<String>> {
    let mut names: Vec<Option<String>> = (0..=HIGHEST_VALUE)
        .map(|number| {
            let value = Enum::try_from(number).ok()?;
            let exception_opt = Enum::EXCEPTIONS.iter().find(|(excepted, _)| *excepted == value);
            Some(match exception_opt {
                Some((_, name)) => (*name).to_owned(),
                None => derived_name::<Enum>(value),
            })
        })
        .collect();
    while names.last().is_some_and(Option::is_none) {
        names.pop();
    }
    names
}

fn derived_name<Enum: ShortNamed>(value: Enum) -> String {
    let proto_name = value.proto_name();
    let unprefixed = proto_name.strip_prefix(Enum::PREFIX).unwrap_or_else(|| {
        panic!("{proto_name} does not start with {}: the enum's PREFIX in names.rs is wrong", Enum::PREFIX)
    });
    unprefixed.to_ascii_lowercase()
}

/// The short name of `value` (`ChannelType::TeamEmail` → `team_email`).
pub fn name<Enum: ShortNamed>(value: Enum) -> &'static str {
    let number: i32 = value.into();
    usize::try_from(number)
        .ok()
        .and_then(|index| Enum::short_names().get(index))
        .and_then(Option::as_deref)
        .expect("every enum value has a short name (values are below HIGHEST_VALUE)")
}

/// The short name of the value numbered `number` in a message; a number this build does not
/// know reads as the enum's unspecified value (0).
pub fn name_of<Enum: ShortNamed>(number: i32) -> &'static str {
    Enum::try_from(number).map_or_else(|_| unspecified_name::<Enum>(), name)
}

/// Like [`name_of`], but an unset (unspecified) or unknown value reads as `default`: for fields
/// whose absence means a default kind (an inbox without a kind is a conversations inbox).
pub fn name_of_or<Enum: ShortNamed>(number: i32, default: Enum) -> &'static str {
    match Enum::try_from(number) {
        Ok(value) if Into::<i32>::into(value) != 0 => name(value),
        _ => name(default),
    }
}

fn unspecified_name<Enum: ShortNamed>() -> &'static str {
    Enum::short_names().first().and_then(Option::as_deref).expect("every protobuf enum has a value 0")
}

/// The value whose short name is `short_name`; `None` for unknown names and for the
/// unspecified value (0), which means "not set" and is never written by anyone.
pub fn parse<Enum: ShortNamed>(short_name: &str) -> Option<Enum> {
    let value = match Enum::EXCEPTIONS.iter().find(|(_, name)| *name == short_name) {
        Some((value, _)) => *value,
        None => {
            let is_short_name = !short_name.is_empty()
                && short_name.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_');
            if !is_short_name {
                return None;
            }
            let value = Enum::from_proto_name(&format!("{}{}", Enum::PREFIX, short_name.to_ascii_uppercase()))?;
            // A value with an exception is known by that name only.
            if Enum::EXCEPTIONS.iter().any(|(excepted, _)| *excepted == value) {
                return None;
            }
            value
        }
    };
    (Into::<i32>::into(value) != 0).then_some(value)
}

/// Implements [`ShortNamed`]: `short_names!(Enum, "PREFIX_", [(Enum::Value, "stored name"), ...])`.
macro_rules! short_names {
    ($enum:ty, $prefix:literal, [$(($value:expr, $name:literal)),* $(,)?]) => {
        impl ShortNamed for $enum {
            const PREFIX: &'static str = $prefix;
            const EXCEPTIONS: &'static [(Self, &'static str)] = &[$(($value, $name)),*];

            fn proto_name(self) -> &'static str {
                self.as_str_name()
            }

            fn from_proto_name(proto_name: &str) -> Option<Self> {
                Self::from_str_name(proto_name)
            }

            fn short_names() -> &'static [Option<String>] {
                static SHORT_NAMES: OnceLock<Vec<Option<String>>> = OnceLock::new();
                SHORT_NAMES.get_or_init(derive_short_names::<Self>)
            }
        }
    };
}

short_names!(ChannelType, "CHANNEL_TYPE_", []);
short_names!(AssignmentStrategy, "ASSIGNMENT_STRATEGY_", [(AssignmentStrategy::Unspecified, "")]);
short_names!(AssignTarget, "ASSIGN_TARGET_", []);
short_names!(SkipReason, "SKIP_REASON_", []);
// A conversation left unassigned without a stated reason is stored as plainly "unassigned".
short_names!(UnassignedReason, "UNASSIGNED_REASON_", [(UnassignedReason::Unspecified, "unassigned")]);
short_names!(InboxAccessMode, "INBOX_ACCESS_MODE_", []);
short_names!(InboxKind, "INBOX_KIND_", []);
short_names!(MessageKind, "MESSAGE_KIND_", []);
short_names!(CallState, "CALL_STATE_", []);
short_names!(CallDirection, "CALL_DIRECTION_", []);
short_names!(ConsentState, "CONSENT_STATE_", []);
short_names!(ConsentMode, "CONSENT_MODE_", []);
short_names!(WithheldReason, "WITHHELD_REASON_", []);
short_names!(CloseReason, "CLOSE_REASON_", []);
short_names!(TicketOwnerSource, "TICKET_OWNER_SOURCE_", []);
short_names!(TicketNotCreatedReason, "TICKET_NOT_CREATED_REASON_", []);
short_names!(ConversationStatus, "CONVERSATION_STATUS_", []);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value of `Enum` with its stored name, in value order.
    fn all_names<Enum: ShortNamed>() -> Vec<(Enum, &'static str)> {
        (0..=HIGHEST_VALUE).filter_map(|number| Enum::try_from(number).ok()).map(|value| (value, name(value))).collect()
    }

    /// Each name reads back as its value, every value has one distinct name, and the
    /// unspecified value is never parsed.
    fn assert_round_trip<Enum: ShortNamed + std::fmt::Debug>() {
        let names = all_names::<Enum>();
        assert!(names.len() > 1, "{} has values", Enum::PREFIX);
        for (value, short_name) in &names {
            let number: i32 = (*value).into();
            assert_eq!(name_of::<Enum>(number), *short_name);
            let expected_opt = (number != 0).then_some(*value);
            assert_eq!(parse::<Enum>(short_name), expected_opt, "{short_name}");
            assert_eq!(names.iter().filter(|(_, other)| other == short_name).count(), 1, "{short_name} is unique");
        }
    }

    #[test]
    fn every_enum_round_trips() {
        assert_round_trip::<ChannelType>();
        assert_round_trip::<AssignmentStrategy>();
        assert_round_trip::<AssignTarget>();
        assert_round_trip::<SkipReason>();
        assert_round_trip::<UnassignedReason>();
        assert_round_trip::<InboxAccessMode>();
        assert_round_trip::<InboxKind>();
        assert_round_trip::<MessageKind>();
        assert_round_trip::<CallState>();
        assert_round_trip::<CallDirection>();
        assert_round_trip::<ConsentState>();
        assert_round_trip::<ConsentMode>();
        assert_round_trip::<WithheldReason>();
        assert_round_trip::<CloseReason>();
        assert_round_trip::<TicketOwnerSource>();
        assert_round_trip::<TicketNotCreatedReason>();
        assert_round_trip::<ConversationStatus>();
    }

    /// Every stored name, written out: PostgreSQL rows, config files, metric labels and the API
    /// docs hold them, so a change to a `.proto` value name must not change them unnoticed.
    #[test]
    fn stored_names_are_unchanged() {
        fn assert_names<Enum: ShortNamed + std::fmt::Debug>(expected: &[&str]) {
            let names: Vec<&str> = all_names::<Enum>().into_iter().map(|(_, short_name)| short_name).collect();
            assert_eq!(names, expected, "{}", Enum::PREFIX);
        }
        assert_names::<ChannelType>(&[
            "unspecified",
            "team_email",
            "chat",
            "facebook_messenger",
            "forms",
            "whatsapp",
            "calling",
            "custom",
        ]);
        assert_names::<AssignmentStrategy>(&["", "round_robin", "balanced"]);
        assert_names::<AssignTarget>(&["unspecified", "nobody", "specific_users_and_teams", "contact_owner"]);
        assert_names::<SkipReason>(&[
            "unspecified",
            "offline",
            "no_paid_seat",
            "at_capacity",
            "missing_skill",
            "unknown_agent",
        ]);
        assert_names::<UnassignedReason>(&[
            "unassigned",
            "auto_assignment_off",
            "target_nobody",
            "no_eligible_agent",
            "no_routing_rules",
            "contact_has_no_owner",
        ]);
        assert_names::<InboxAccessMode>(&["unspecified", "everyone", "specific_users_and_teams"]);
        assert_names::<InboxKind>(&["unspecified", "conversations", "help_desk"]);
        assert_names::<MessageKind>(&[
            "unspecified",
            "text",
            "email",
            "image",
            "document",
            "audio",
            "video",
            "location",
            "interactive_reply",
            "form_submission",
            "call",
            "sticker",
            "contacts",
            "unsupported",
        ]);
        assert_names::<CallState>(&["unspecified", "ringing", "answered", "completed", "missed", "voicemail"]);
        assert_names::<CallDirection>(&["unspecified", "inbound", "outbound"]);
        assert_names::<ConsentState>(&["unspecified", "given", "not_given"]);
        assert_names::<ConsentMode>(&["unspecified", "implicit", "explicit"]);
        assert_names::<WithheldReason>(&["unspecified", "channel_off", "awaiting_consent", "unknown_channel"]);
        assert_names::<CloseReason>(&["unspecified", "agent", "ticket_closed"]);
        assert_names::<TicketOwnerSource>(&["unspecified", "conversation_assignee", "fixed", "none"]);
        assert_names::<TicketNotCreatedReason>(&["unspecified", "contact_at_association_limit"]);
        assert_names::<ConversationStatus>(&["unspecified", "open", "closed"]);
    }

    #[test]
    fn unset_and_unknown_values_read_as_unspecified_or_the_default() {
        assert_eq!(name_of::<ChannelType>(99), "unspecified");
        assert_eq!(name_of::<AssignmentStrategy>(99), "");
        assert_eq!(name_of_or(0, MessageKind::Text), "text");
        assert_eq!(name_of_or(99, InboxKind::Conversations), "conversations");
        assert_eq!(name_of_or(InboxKind::HelpDesk as i32, InboxKind::Conversations), "help_desk");
    }

    #[test]
    fn only_exact_short_names_parse() {
        assert_eq!(parse::<ChannelType>("team_email"), Some(ChannelType::TeamEmail));
        for not_a_name in
            ["TEAM_EMAIL", "Team_Email", "CHANNEL_TYPE_TEAM_EMAIL", "team-email", " chat", "", "unspecified"]
        {
            assert_eq!(parse::<ChannelType>(not_a_name), None, "{not_a_name:?}");
        }
        assert_eq!(parse::<UnassignedReason>("unassigned"), None, "the unspecified value, by its exception name");
        assert_eq!(parse::<AssignmentStrategy>(""), None);
    }
}
