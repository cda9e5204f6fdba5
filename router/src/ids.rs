//! How ids become map keys and how contact ids are derived.
//!
//! Switchboard writes every id as a UUID in canonical text form. The state keys conversations,
//! contacts, messages and requests by the 128-bit value, so lookups compare 16 bytes in place;
//! any other text is keyed by a hash of it. Every function here is deterministic: keys and
//! derived ids are the same in every process and after any restart.

/// A message id as a 128-bit key: Switchboard message ids are UUIDs (UUIDv5, see
/// `runtime::ids`); anything else is hashed with SHA-256 (truncated), still collision-free in
/// practice and deterministic.
pub fn message_key(message_id: &str) -> u128 {
    if let Some(key) = canonical_uuid(message_id) {
        return key;
    }
    match uuid::Uuid::try_parse(message_id) {
        Ok(uuid) => uuid.as_u128(),
        Err(_) => {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(message_id.as_bytes());
            u128::from_be_bytes(digest[..16].try_into().expect("16 bytes"))
        }
    }
}

/// Hex digit values by byte; `INVALID_HEX` for anything that is not `0-9` or `a-f`.
const HEX_VALUES: [u8; 256] = {
    let mut values = [INVALID_HEX; 256];
    let mut digit = 0;
    while digit < 10 {
        values[b'0' as usize + digit] = digit as u8;
        digit += 1;
    }
    let mut letter = 0;
    while letter < 6 {
        values[b'a' as usize + letter] = 10 + letter as u8;
        letter += 1;
    }
    values
};
const INVALID_HEX: u8 = 0xff;

/// The UUID of an id in canonical text form (36 characters, lowercase hex, hyphens at 8, 13,
/// 18 and 23), which is how Switchboard writes every id; `None` for any other text.
///
/// Every event carries ids as text and `evolve` keys them as numbers, several per event: a
/// direct parse of the one form in use is much cheaper than a general UUID parser.
pub fn canonical_uuid(id: &str) -> Option<u128> {
    /// Where the 32 hex digits are in `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    const DIGIT_POSITIONS: [usize; 32] = [
        0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15, 16, 17, 19, 20, 21, 22, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33,
        34, 35,
    ];
    let bytes: &[u8; 36] = id.as_bytes().try_into().ok()?;
    if bytes[8] != b'-' || bytes[13] != b'-' || bytes[18] != b'-' || bytes[23] != b'-' {
        return None;
    }
    // Two 64-bit halves built side by side: independent chains of cheap shifts, where one
    // 128-bit accumulator would serialise 32 multi-instruction shifts.
    let (mut high, mut low, mut invalid) = (0u64, 0u64, 0u8);
    for index in 0..16 {
        let high_digit = HEX_VALUES[bytes[DIGIT_POSITIONS[index]] as usize];
        let low_digit = HEX_VALUES[bytes[DIGIT_POSITIONS[index + 16]] as usize];
        invalid |= high_digit | low_digit;
        high = (high << 4) | u64::from(high_digit & 0x0f);
        low = (low << 4) | u64::from(low_digit & 0x0f);
    }
    // A valid digit is at most 0x0f, so any invalid byte sets the high bits.
    (invalid & 0xf0 == 0).then_some((u128::from(high) << 64) | u128::from(low))
}

/// A command's request id as a 128-bit key, made like a message id's ([`message_key`]): the
/// idempotency window holds 100,000 of them and is asked by every command, so numbers rather
/// than heap strings.
pub fn request_key(request_id: &str) -> u128 {
    message_key(request_id)
}

/// A conversation id as a map key: router-made conversation ids are UUIDs, so the key is the
/// UUID itself (anything else is hashed like a message id, see [`message_key`]). A 16-byte key
/// stored in the table makes the lookups of every follow-up compare in place instead of
/// chasing a heap string (docs/router.md, "state layout").
pub fn conversation_key(conversation_id: &str) -> u128 {
    message_key(conversation_id)
}

/// What [`crate::conversations::ConversationState::noncanonical_id_opt`] keeps of a conversation id: nothing when it
/// is a UUID in its canonical text form (lowercase, hyphenated), because the key alone gives it
/// back; the id as written otherwise.
pub fn noncanonical_id(conversation_id: &str) -> Option<Box<str>> {
    canonical_uuid(conversation_id).is_none().then(|| conversation_id.into())
}

/// [`conversation_key`] and [`noncanonical_id`] of one id, parsed once.
pub fn conversation_key_and_noncanonical_id(conversation_id: &str) -> (u128, Option<Box<str>>) {
    match canonical_uuid(conversation_id) {
        Some(key) => (key, None),
        None => (conversation_key(conversation_id), Some(conversation_id.into())),
    }
}

/// Namespace of contact ids: UUIDv5(namespace, "<account>\n<channel id>\n<external id>") (C4,
/// M1). A fixed random UUID; never change it.
const CONTACT_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x3c1f_0b2a_6d4e_4a71_9e5b_c0d8_17f2_a964);

/// The deterministic contact id of a channel identity (C4): the same sender on the same
/// channel of the same account is the same contact, also after a state loss; another
/// account's channel of the same id never shares it (M1).
pub fn contact_uuid_for(account_id: &str, channel_id: &str, external_id: &str) -> uuid::Uuid {
    let mut name = Vec::with_capacity(account_id.len() + channel_id.len() + external_id.len() + 2);
    name.extend_from_slice(account_id.as_bytes());
    name.push(b'\n');
    name.extend_from_slice(channel_id.as_bytes());
    name.push(b'\n');
    name.extend_from_slice(external_id.as_bytes());
    uuid::Uuid::new_v5(&CONTACT_NAMESPACE, &name)
}

/// Contact ids made before they named the account: UUIDv5(namespace,
/// `"<channel id>\n<external id>"`). Contacts the log created that way keep their id; they are still found by identity
/// (within their own account only, see [`crate::state::RouterState::contact`]).
pub fn legacy_contact_uuid_for(channel_id: &str, external_id: &str) -> uuid::Uuid {
    let mut name = Vec::with_capacity(channel_id.len() + external_id.len() + 1);
    name.extend_from_slice(channel_id.as_bytes());
    name.push(b'\n');
    name.extend_from_slice(external_id.as_bytes());
    uuid::Uuid::new_v5(&CONTACT_NAMESPACE, &name)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The fast parse reads exactly the canonical form, so keys are what the general
        /// parser gives (state and snapshots mean the same whichever parser keyed them).
        #[test]
        fn b4_ids_key_the_same_whichever_parser_reads_them(bits in any::<u128>(), noise in "[0-9a-fA-F{}:urn-]{0,40}") {
            let canonical = uuid::Uuid::from_u128(bits).hyphenated().to_string();
            prop_assert_eq!(canonical_uuid(&canonical), Some(bits));
            prop_assert_eq!(message_key(&canonical), bits);
            prop_assert_eq!(noncanonical_id(&canonical), None);
            let upper = canonical.to_uppercase();
            prop_assert_eq!(canonical_uuid(&upper).is_some(), upper == canonical);
            prop_assert_eq!(message_key(&upper), bits, "other UUID forms key as the UUID");
            let general = |text: &str| uuid::Uuid::try_parse(text).ok().map(|uuid| uuid.as_u128());
            if let Some(key) = general(&noise) {
                prop_assert_eq!(message_key(&noise), key);
            }
            prop_assert_eq!(canonical_uuid(&noise).is_some(), general(&noise).is_some_and(|key| {
                uuid::Uuid::from_u128(key).hyphenated().to_string() == noise
            }));
        }
    }
}
