//! Outbound messages (O1-O6): the ids, keys and addresses that every service must compute the
//! same way. Pure functions; the API (agent replies), the router (automated messages) and the
//! delivery service all call these, so a reply's id, its partition and its email identity never
//! depend on who built it.

use switchboard_proto::events::v1::InboxConfigured;
use uuid::Uuid;

/// The mail domain of fallback addresses (C12) for inboxes whose config event predates
/// `InboxConfigured.fallback_address`. New inboxes get their address from the API's setting.
pub const DEFAULT_FALLBACK_DOMAIN: &str = "fallback.switchboard.invalid";

/// The id of an agent's reply or note: every retry of the same request (same account and
/// `request_id`) names the same reply, so the delivery service and the read models see one.
pub fn reply_id_for(account_id: &str, request_id: &str) -> Uuid {
    crate::ids::name_based_id("reply", &[account_id, request_id])
}

/// Partition key of `outbound.v1` and `delivery.v1`: a conversation's outbound messages and
/// their outcomes stay in order on one partition, and conversations spread over all of them.
/// Owner notifications (R4) are keyed by the conversation they are about.
pub fn outbound_partition_key(account_id: &str, conversation_id: &str) -> String {
    format!("{account_id}/{conversation_id}")
}

/// RFC 5322 Message-ID (without angle brackets) of an outbound email: stable for the reply, so
/// a second send after a crash carries the same one and the receiver can recognise it (O5).
pub fn email_message_id(reply_id: Uuid, from_address: &str) -> String {
    let domain = from_address.rsplit_once('@').map_or("switchboard.invalid", |(_, domain)| domain);
    format!("{}@{}", reply_id.simple(), domain.to_ascii_lowercase())
}

/// The inbox's fallback address and from-name (C12): as configured, or derived for inboxes
/// configured before the fallback fields existed.
pub fn fallback_identity(account_id: &str, inbox: &InboxConfigured) -> (String, String) {
    let address = if inbox.fallback_address.is_empty() {
        default_fallback_address(account_id, &inbox.inbox_id, DEFAULT_FALLBACK_DOMAIN)
    } else {
        inbox.fallback_address.clone()
    };
    let from_name =
        if inbox.fallback_from_name.is_empty() { inbox.name.clone() } else { inbox.fallback_from_name.clone() };
    (address, from_name)
}

/// `<inbox>.<account>@<domain>`, lower-case, with every character that is not a letter, digit,
/// `-` or `_` replaced by `-` (ids may contain characters a local part cannot).
pub fn default_fallback_address(account_id: &str, inbox_id: &str, domain: &str) -> String {
    let clean = |text: &str| -> String {
        text.chars()
            .map(|character| {
                if character.is_ascii_alphanumeric() || character == '-' || character == '_' {
                    character.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect()
    };
    format!("{}.{}@{}", clean(inbox_id), clean(account_id), domain.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_ids_are_stable_per_account_and_request() {
        assert_eq!(reply_id_for("acme", "r-1"), reply_id_for("acme", "r-1"));
        assert_ne!(reply_id_for("acme", "r-1"), reply_id_for("globex", "r-1"));
        assert_ne!(reply_id_for("acme", "r-1"), reply_id_for("acme", "r-2"));
    }

    #[test]
    fn email_message_ids_use_the_sender_domain() {
        let reply_id = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        assert_eq!(email_message_id(reply_id, "Help@Acme.Example"), "0123456789abcdef0123456789abcdef@acme.example");
    }

    #[test]
    fn c12_fallback_identity_is_configured_or_derived() {
        let legacy = InboxConfigured { inbox_id: "Support EU".into(), name: "Support".into(), ..Default::default() };
        assert_eq!(
            fallback_identity("acme", &legacy),
            ("support-eu.acme@fallback.switchboard.invalid".to_owned(), "Support".to_owned())
        );
        let configured = InboxConfigured {
            fallback_address: "support.acme@replies.example".into(),
            fallback_from_name: "Acme Support".into(),
            ..legacy
        };
        assert_eq!(
            fallback_identity("acme", &configured),
            ("support.acme@replies.example".to_owned(), "Acme Support".to_owned())
        );
    }
}
