//! C6 and C8: how long a business may answer a customer on channels whose provider limits
//! replies, counted from the customer's latest message. The one statement of these windows: the
//! projector stores the standard window's end with the conversation, the API shows both ends,
//! and outbound delivery enforces them.

use chrono::{DateTime, Duration, Utc};
use switchboard_proto::events::v1::ChannelType;
use switchboard_proto::names;

/// Messenger and WhatsApp accept standard (free-form) replies for 24 hours after the customer's
/// latest message.
pub const STANDARD_WINDOW: Duration = Duration::hours(24);
/// Messenger accepts a human agent's reply, sent with the human-agent tag, for 7 days after the
/// customer's latest message (C6). WhatsApp has no such extension (C8).
pub const HUMAN_AGENT_WINDOW: Duration = Duration::days(7);

/// Whether replies on this channel type are limited to a window after the customer's message.
pub fn has_reply_window(channel_type: ChannelType) -> bool {
    matches!(channel_type, ChannelType::FacebookMessenger | ChannelType::Whatsapp)
}

/// [`has_reply_window`] for a channel type stored by its short name (`facebook_messenger`).
pub fn has_reply_window_named(channel_type_name: &str) -> bool {
    names::parse::<ChannelType>(channel_type_name).is_some_and(has_reply_window)
}

/// When the standard window that a customer message sent at `customer_message_at` opens ends.
pub fn standard_window_ends_at(customer_message_at: DateTime<Utc>) -> DateTime<Utc> {
    customer_message_at + STANDARD_WINDOW
}

/// When the human-agent window ends, given the end of the standard window (both count from the
/// same customer message); `None` where the channel type has no human-agent window.
pub fn human_agent_window_ends_at(
    channel_type: ChannelType,
    standard_window_ends_at: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    (channel_type == ChannelType::FacebookMessenger)
        .then(|| standard_window_ends_at - STANDARD_WINDOW + HUMAN_AGENT_WINDOW)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(hour: i64) -> DateTime<Utc> {
        DateTime::UNIX_EPOCH + Duration::hours(hour)
    }

    #[test]
    fn c6_c8_only_messenger_and_whatsapp_limit_replies() {
        for channel_type in [ChannelType::FacebookMessenger, ChannelType::Whatsapp] {
            assert!(has_reply_window(channel_type));
            assert!(has_reply_window_named(names::name(channel_type)));
        }
        for channel_type in
            [ChannelType::TeamEmail, ChannelType::Chat, ChannelType::Forms, ChannelType::Calling, ChannelType::Custom]
        {
            assert!(!has_reply_window(channel_type));
            assert!(!has_reply_window_named(names::name(channel_type)));
        }
        assert!(!has_reply_window_named("not_a_channel_type"));
    }

    #[test]
    fn c6_messenger_human_agents_may_answer_for_seven_days_whatsapp_for_one() {
        let standard_ends_at = standard_window_ends_at(at(10));
        assert_eq!(standard_ends_at, at(34));
        assert_eq!(human_agent_window_ends_at(ChannelType::FacebookMessenger, standard_ends_at), Some(at(10 + 7 * 24)));
        assert_eq!(human_agent_window_ends_at(ChannelType::Whatsapp, standard_ends_at), None, "24 h only (C8)");
    }
}
