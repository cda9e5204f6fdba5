//! Identifiers. Ids derived from other ids are deterministic so that a replay of the log
//! reproduces them byte for byte (B4) and every retry of a provider message maps to one id (B1).

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Namespace for Switchboard's UUIDv5 ids (a fixed random UUID; never change it).
const SWITCHBOARD_NAMESPACE: Uuid = Uuid::from_u128(0x5b0a_7d1e_93c4_4f0e_a1f2_2c6e_8b7d_3e91);

/// Switchboard's id for a provider message: every retry of the same provider message (same
/// account, channel and provider message id) gets the same id (B1). The account is part of it
/// because channel ids are unique within an account only (M1): one mail sent to two accounts'
/// `mail` channels is two messages.
pub fn message_id_for(account_id: &str, channel_id: &str, provider_message_id: &str) -> Uuid {
    // The account's length first: no choice of ids can make two different triples give the
    // same name (account ids may contain ':'; channel ids never do). Built without `format!`:
    // ingest and the router's benchmarks derive one per message.
    let mut name = Vec::with_capacity(16 + account_id.len() + channel_id.len() + provider_message_id.len());
    name.extend_from_slice(b"message:");
    name.extend_from_slice(&(account_id.len() as u32).to_be_bytes());
    name.extend_from_slice(account_id.as_bytes());
    name.push(b':');
    name.extend_from_slice(channel_id.as_bytes());
    name.push(b':');
    name.extend_from_slice(provider_message_id.as_bytes());
    Uuid::new_v5(&SWITCHBOARD_NAMESPACE, &name)
}

/// A UUIDv5 named by `kind` and `parts`, each part length-prefixed so that no choice of parts
/// can make two different lists give the same name.
pub fn name_based_id(kind: &str, parts: &[&str]) -> Uuid {
    let mut name = Vec::with_capacity(kind.len() + 1 + parts.iter().map(|part| part.len() + 4).sum::<usize>());
    name.extend_from_slice(kind.as_bytes());
    name.push(b':');
    for part in parts {
        name.extend_from_slice(&(part.len() as u32).to_be_bytes());
        name.extend_from_slice(part.as_bytes());
    }
    Uuid::new_v5(&SWITCHBOARD_NAMESPACE, &name)
}

/// A UUIDv7 whose timestamp is `unix_millis` and whose "random" bits are a hash of `seed`.
/// Events derived from a cause get `derived_v7(cause_time, "cause-id/purpose/index")`: time
/// ordered like any UUIDv7, yet a pure function of the log.
pub fn derived_v7(unix_millis: u64, seed: &str) -> Uuid {
    let digest = Sha256::digest(seed.as_bytes());
    let mut random_bytes = [0u8; 10];
    random_bytes.copy_from_slice(&digest[..10]);
    uuid::Builder::from_unix_timestamp_millis(unix_millis, &random_bytes).into_uuid()
}

/// A fresh UUIDv7 for events entering the system (ingest, admin commands).
pub fn new_event_id() -> Uuid {
    Uuid::now_v7()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b1_message_id_is_stable_across_retries_and_distinct_across_channels() {
        assert_eq!(message_id_for("a", "chat-1", "m-1"), message_id_for("a", "chat-1", "m-1"));
        assert_ne!(message_id_for("a", "chat-1", "m-1"), message_id_for("a", "chat-2", "m-1"));
        assert_ne!(message_id_for("a", "chat-1", "m-1"), message_id_for("a", "chat-1", "m-2"));
        // M1: the same channel id and provider id in two accounts are two messages.
        assert_ne!(message_id_for("a", "chat-1", "m-1"), message_id_for("b", "chat-1", "m-1"));
        assert_ne!(message_id_for("a:b", "c", "m"), message_id_for("a", "b:c", "m"));
    }

    #[test]
    fn b4_derived_ids_are_deterministic_time_ordered_v7() {
        let first = derived_v7(1_000, "event-a/conversation");
        assert_eq!(first, derived_v7(1_000, "event-a/conversation"));
        assert_eq!(first.get_version_num(), 7);
        assert_ne!(first, derived_v7(1_000, "event-b/conversation"));
        assert!(derived_v7(2_000, "zzz") > derived_v7(1_000, "zzz"));
    }
}
