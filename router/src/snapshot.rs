//! Snapshots of a partition's [`RouterState`]: a compact binary encoding, split into chunks
//! that fit Kafka's record size limit, plus a manifest saying where the snapshot stands.
//!
//! Only what cannot be derived is stored: conversations, contacts, held messages, tickets,
//! agents' bookkeeping and the two recency windows (in order). Thread index, contact-id index,
//! waiting backlog and open message ids are rebuilt from those on decode, so they can never
//! disagree with the data they index. Pure code: the Kafka side lives in `crate::shell`.

use prost::Message;
use switchboard_proto::events::v1::InboundMessageReceived;

use crate::compact::InlineStr;
use crate::conversations::ConversationState;
use crate::ids::{conversation_key, message_key, noncanonical_id};
use crate::state::{
    AgentSlot, AgentWorkload, CHANNEL_TYPE_SLOTS, ContactState, HeldMessage, RouterState, TicketState, start_waiting,
};

const MAGIC: &[u8; 4] = b"SBRS";
/// 3: conversations, contacts, agents and round-robin positions name their account (M1: one
/// partition routes several accounts, which may use the same ids). A state snapshot of an
/// older version is refused ([`SnapshotError::UnknownFormat`]): it cannot say which account
/// its entries belong to, so the router rebuilds that partition's state once by folding its
/// output, whose events do. Manifests have not changed and are read in every version.
/// 4: an agent's open conversations per channel type are written with their slot count, so a
/// new channel type (a larger `CHANNEL_TYPE_SLOTS`) no longer changes the format. Version 3 is
/// refused like the older ones: the router rebuilds from its output once.
/// 5: each held message says whether the consent prompt was queued with it (C6). Version 4 is
/// still read, its held messages as not prompted: no router before version 5 sent prompts.
const FORMAT_VERSION: u8 = 5;
/// The oldest state format [`decode_state`] reads.
const OLDEST_STATE_VERSION: u8 = 4;
const OLDEST_MANIFEST_VERSION: u8 = 1;
/// Chunk payload size: well under Kafka's default 1 MB record limit, leaving room for the
/// chunk header and record overhead.
pub const CHUNK_BYTES: usize = 900 * 1024;
pub const MANIFEST_KEY: &str = "manifest";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("snapshot is truncated at byte {0}")]
    Truncated(usize),
    #[error("snapshot has an unknown format (magic/version)")]
    UnknownFormat,
    #[error("snapshot field is invalid: {0}")]
    Invalid(&'static str),
}

/// Where a snapshot stands, stored under [`MANIFEST_KEY`] after its chunks, in the same Kafka
/// transaction as the routing batch it precedes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    /// The state covers every input of the partition below this offset...
    pub input_next_offset: i64,
    /// ...which is everything in the output partition below this offset (its end when taken).
    pub output_next_offset: i64,
    pub chunk_count: u32,
    /// Records written before the manifest in its transaction (chunks and tombstones): the
    /// reader seeks back this far from the manifest to find the chunks.
    pub records_before_manifest: u32,
    pub state_bytes: u64,
}

pub fn chunk_key(index: u32) -> String {
    format!("chunk/{index}")
}

/// A chunk's value: the snapshot it belongs to (its input offset), its index, then the bytes.
pub fn chunk_value(input_next_offset: i64, index: u32, bytes: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(12 + bytes.len());
    value.extend_from_slice(&input_next_offset.to_le_bytes());
    value.extend_from_slice(&index.to_le_bytes());
    value.extend_from_slice(bytes);
    value
}

/// Splits a chunk value into (input offset, index, bytes).
pub fn parse_chunk(value: &[u8]) -> Result<(i64, u32, &[u8]), SnapshotError> {
    if value.len() < 12 {
        return Err(SnapshotError::Truncated(value.len()));
    }
    let offset = i64::from_le_bytes(value[..8].try_into().expect("8 bytes"));
    let index = u32::from_le_bytes(value[8..12].try_into().expect("4 bytes"));
    Ok((offset, index, &value[12..]))
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Writer::with_magic();
        out.i64(self.input_next_offset);
        out.i64(self.output_next_offset);
        out.u64(self.chunk_count as u64);
        out.u64(self.records_before_manifest as u64);
        out.u64(self.state_bytes);
        out.bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Manifest, SnapshotError> {
        let mut input = Reader::with_magic(bytes)?;
        Ok(Manifest {
            input_next_offset: input.i64()?,
            output_next_offset: input.i64()?,
            chunk_count: input.u32()?,
            records_before_manifest: input.u32()?,
            state_bytes: input.u64()?,
        })
    }
}

/// Encodes the state (see the module doc for what is stored).
pub fn encode_state(state: &RouterState) -> Vec<u8> {
    encode_state_as(state, FORMAT_VERSION)
}

/// [`encode_state`] in format `version` (tests write older formats to check they are read).
fn encode_state_as(state: &RouterState, version: u8) -> Vec<u8> {
    let mut out = Writer::with_magic();
    out.bytes[MAGIC.len()] = version;
    out.len(state.conversations.len());
    for (key, conversation) in state.conversations.iter() {
        out.str(&conversation.id(key));
        out.str(conversation.account_id());
        out.str(conversation.channel_id());
        out.i64(conversation.channel_type as i64);
        out.str(&conversation.thread_key);
        out.str(&conversation.contact_id);
        out.str(&conversation.contact_external_id);
        out.opt_str(conversation.assignee());
        out.u64(conversation.started_at_millis);
        out.len(conversation.message_keys.len());
        for key in conversation.message_keys.iter() {
            out.u128(key);
        }
        out.opt_str(conversation.ticket_id_opt.as_deref());
    }
    // Hash maps are written in key order: the bytes of a snapshot depend on the state alone,
    // never on the hasher's iteration order.
    let mut contacts: Vec<(&u128, &Box<ContactState>)> = state.contacts.iter().collect();
    contacts.sort_unstable_by_key(|(key, _)| **key);
    out.len(contacts.len());
    for (_, contact) in contacts {
        out.str(&contact.account_id);
        out.str(&contact.channel_id);
        out.str(&contact.external_id);
        out.str(&contact.contact_id);
        out.opt_str(contact.owner_agent_id_opt.as_deref());
        out.bool(contact.consent_granted);
        out.u64(contact.ticket_count as u64);
        out.bool(contact.legacy_id);
    }
    let mut held_by_contact: Vec<(&String, &Vec<HeldMessage>)> = state.held_by_contact.iter().collect();
    held_by_contact.sort_unstable_by_key(|(contact_id, _)| contact_id.as_str());
    out.len(held_by_contact.len());
    for (contact_id, held) in held_by_contact {
        out.str(contact_id);
        out.len(held.len());
        for message in held {
            out.blob(&message.message.encode_to_vec());
            out.str(&message.source_event_id);
            if version >= 5 {
                out.bool(message.consent_prompted);
            }
        }
    }
    let mut tickets: Vec<(&String, &TicketState)> = state.tickets.iter().collect();
    tickets.sort_unstable_by_key(|(ticket_id, _)| ticket_id.as_str());
    out.len(tickets.len());
    for (ticket_id, ticket) in tickets {
        out.str(ticket_id);
        out.str(&ticket.conversation_id);
        out.str(&ticket.pipeline);
        out.str(&ticket.stage);
    }
    let agents = &state.agents;
    // Agents by id, not by slot: slots follow the history of the book, not its content.
    let mut recorded: Vec<&AgentSlot> = agents.recorded().collect();
    recorded.sort_unstable_by(|left, right| {
        (left.account_id.as_bytes(), left.agent_id.as_bytes())
            .cmp(&(right.account_id.as_bytes(), right.agent_id.as_bytes()))
    });
    let with_workload: Vec<&AgentSlot> =
        recorded.iter().copied().filter(|slot| slot.workload != AgentWorkload::default()).collect();
    out.len(with_workload.len());
    for slot in with_workload {
        let workload = &slot.workload;
        out.str(&slot.account_id);
        out.str(&slot.agent_id);
        out.u64(workload.open_conversations as u64);
        out.len(workload.open_by_channel_type.len());
        for open in workload.open_by_channel_type {
            out.u64(open as u64);
        }
        out.opt_u64(workload.last_assigned_at_millis_opt);
    }
    let with_availability: Vec<(&AgentSlot, bool)> =
        recorded.iter().filter_map(|slot| slot.availability_opt.map(|available| (*slot, available))).collect();
    out.len(with_availability.len());
    for (slot, available) in with_availability {
        out.str(&slot.account_id);
        out.str(&slot.agent_id);
        out.bool(available);
    }
    // Keyed by the scoped (account, channel) key, written as it is.
    let mut last_round_robin: Vec<(&InlineStr, &InlineStr)> = agents.last_round_robin_agent_by_channel.iter().collect();
    last_round_robin.sort_unstable_by_key(|(channel_key, _)| channel_key.as_bytes());
    out.len(last_round_robin.len());
    for (channel_key, agent_id) in last_round_robin {
        out.str(channel_key);
        out.str(agent_id);
    }
    out.len(state.dedup.retired().len());
    for key in state.dedup.retired() {
        out.u128(key);
    }
    out.len(state.applied_requests.order.len());
    for request_key in &state.applied_requests.order {
        out.u128(*request_key);
    }
    out.bytes
}

/// Decodes a state written by [`encode_state`], rebuilding the derived indexes.
pub fn decode_state(bytes: &[u8]) -> Result<RouterState, SnapshotError> {
    let mut input = Reader::with_magic(bytes)?;
    if !(OLDEST_STATE_VERSION..=FORMAT_VERSION).contains(&input.version) {
        return Err(SnapshotError::UnknownFormat);
    }
    let version = input.version;
    let mut state = RouterState::default();
    for _ in 0..input.len()? {
        let conversation_id = input.string()?;
        let key = conversation_key(&conversation_id);
        let mut conversation = ConversationState {
            noncanonical_id_opt: noncanonical_id(&conversation_id),
            channel_key: InlineStr::scoped(&input.string()?, &input.string()?),
            channel_type: input.i64()? as i32,
            thread_key: input.string()?.into(),
            contact_id: InlineStr::new(&input.string()?),
            contact_external_id: input.string()?.into(),
            assignee_agent_id_opt: input.opt_string()?.map(InlineStr::from),
            started_at_millis: input.u64()?,
            ..Default::default()
        };
        let key_count = input.len()?;
        for _ in 0..key_count {
            let key = input.u128()?;
            state.dedup.open(key);
            conversation.message_keys.push(key);
        }
        conversation.ticket_id_opt = input.opt_string()?;
        if conversation.assignee_agent_id_opt.is_none() {
            start_waiting(
                &mut state.waiting_by_channel,
                key,
                &conversation.channel_key,
                conversation.started_at_millis,
            );
        }
        state.conversations.insert(key, conversation);
    }
    for _ in 0..input.len()? {
        let account_id = input.string()?;
        let channel_id = input.string()?;
        let external_id = input.string()?;
        let contact = ContactState {
            contact_id: input.string()?,
            account_id,
            channel_id,
            external_id: external_id.into(),
            owner_agent_id_opt: input.opt_string()?,
            consent_granted: input.bool()?,
            ticket_count: input.u32()?,
            legacy_id: input.bool()?,
        };
        state.insert_contact(contact);
    }
    for _ in 0..input.len()? {
        let contact_id = input.string()?;
        let count = input.len()?;
        let mut held = Vec::with_capacity(count);
        for _ in 0..count {
            let message = InboundMessageReceived::decode(input.blob()?)
                .map_err(|_| SnapshotError::Invalid("held message is not a valid InboundMessageReceived"))?;
            state.dedup.open(message_key(&message.message_id));
            let source_event_id = input.string()?;
            let consent_prompted = if version >= 5 { input.bool()? } else { false };
            held.push(HeldMessage { message, source_event_id, consent_prompted });
        }
        state.held_by_contact.insert(contact_id, held);
    }
    for _ in 0..input.len()? {
        let ticket_id = input.string()?;
        let ticket =
            TicketState { conversation_id: input.string()?, pipeline: input.string()?, stage: input.string()? };
        state.tickets.insert(ticket_id, ticket);
    }
    for _ in 0..input.len()? {
        let account_id = input.string()?;
        let agent_id = input.string()?;
        let mut workload = AgentWorkload { open_conversations: input.u32()?, ..Default::default() };
        let slot_count = input.len()?;
        if slot_count > CHANNEL_TYPE_SLOTS {
            // Written by a router that knows more channel types than this one (a downgrade).
            return Err(SnapshotError::Invalid("more channel types than this router knows"));
        }
        for slot in 0..slot_count {
            workload.open_by_channel_type[slot] = input.u32()?;
        }
        workload.last_assigned_at_millis_opt = input.opt_u64()?;
        state.agents.restore_workload(&account_id, &agent_id, workload);
    }
    for _ in 0..input.len()? {
        let account_id = input.string()?;
        let agent_id = input.string()?;
        state.agents.set_availability(&account_id, &agent_id, input.bool()?);
    }
    for _ in 0..input.len()? {
        let channel_key = InlineStr::new(&input.string()?);
        state.agents.last_round_robin_agent_by_channel.insert(channel_key, input.string()?.into());
    }
    for _ in 0..input.len()? {
        state.dedup.retire(input.u128()?);
    }
    for _ in 0..input.len()? {
        state.applied_requests.insert(input.u128()?);
    }
    if !input.is_at_end() {
        return Err(SnapshotError::Invalid("trailing bytes"));
    }
    Ok(state)
}

/// Splits encoded bytes into chunks of at most [`CHUNK_BYTES`].
pub fn split_into_chunks(bytes: &[u8]) -> Vec<&[u8]> {
    if bytes.is_empty() {
        return vec![bytes];
    }
    bytes.chunks(CHUNK_BYTES).collect()
}

struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    fn with_magic() -> Self {
        let mut bytes = Vec::with_capacity(1 << 16);
        bytes.extend_from_slice(MAGIC);
        bytes.push(FORMAT_VERSION);
        Writer { bytes }
    }

    fn u64(&mut self, mut value: u64) {
        // LEB128 varint: counts and small numbers take one byte.
        while value >= 0x80 {
            self.bytes.push((value as u8) | 0x80);
            value >>= 7;
        }
        self.bytes.push(value as u8);
    }

    fn i64(&mut self, value: i64) {
        self.u64(((value << 1) ^ (value >> 63)) as u64); // zig-zag
    }

    fn len(&mut self, value: usize) {
        self.u64(value as u64);
    }

    fn bool(&mut self, value: bool) {
        self.bytes.push(value as u8);
    }

    fn u128(&mut self, value: u128) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    fn blob(&mut self, value: &[u8]) {
        self.len(value.len());
        self.bytes.extend_from_slice(value);
    }

    fn str(&mut self, value: &str) {
        self.blob(value.as_bytes());
    }

    fn opt_str(&mut self, value: Option<&str>) {
        match value {
            Some(value) => {
                self.bool(true);
                self.str(value);
            }
            None => self.bool(false),
        }
    }

    fn opt_u64(&mut self, value: Option<u64>) {
        match value {
            Some(value) => {
                self.bool(true);
                self.u64(value);
            }
            None => self.bool(false),
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
    version: u8,
}

impl<'a> Reader<'a> {
    fn with_magic(bytes: &'a [u8]) -> Result<Self, SnapshotError> {
        if bytes.len() < 5 || &bytes[..4] != MAGIC || !(OLDEST_MANIFEST_VERSION..=FORMAT_VERSION).contains(&bytes[4]) {
            return Err(SnapshotError::UnknownFormat);
        }
        Ok(Reader { bytes, position: 5, version: bytes[4] })
    }

    fn is_at_end(&self) -> bool {
        self.position == self.bytes.len()
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8], SnapshotError> {
        let end = self.position.checked_add(count).filter(|end| *end <= self.bytes.len());
        let end = end.ok_or(SnapshotError::Truncated(self.position))?;
        let slice = &self.bytes[self.position..end];
        self.position = end;
        Ok(slice)
    }

    fn u64(&mut self) -> Result<u64, SnapshotError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1)?[0];
            value |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(SnapshotError::Invalid("varint too long"))
    }

    fn u32(&mut self) -> Result<u32, SnapshotError> {
        u32::try_from(self.u64()?).map_err(|_| SnapshotError::Invalid("number out of range"))
    }

    fn i64(&mut self) -> Result<i64, SnapshotError> {
        let raw = self.u64()?;
        Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64))
    }

    fn len(&mut self) -> Result<usize, SnapshotError> {
        let value = self.u64()? as usize;
        // A length can never exceed the bytes left: rejects garbage before allocating.
        if value > self.bytes.len() - self.position {
            return Err(SnapshotError::Invalid("length larger than the snapshot"));
        }
        Ok(value)
    }

    fn bool(&mut self) -> Result<bool, SnapshotError> {
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(SnapshotError::Invalid("boolean")),
        }
    }

    fn u128(&mut self) -> Result<u128, SnapshotError> {
        Ok(u128::from_le_bytes(self.take(16)?.try_into().expect("16 bytes")))
    }

    fn blob(&mut self) -> Result<&'a [u8], SnapshotError> {
        let length = self.len()?;
        self.take(length)
    }

    fn string(&mut self) -> Result<String, SnapshotError> {
        let bytes = self.blob()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| SnapshotError::Invalid("string is not UTF-8"))
    }

    fn opt_string(&mut self) -> Result<Option<String>, SnapshotError> {
        Ok(if self.bool()? { Some(self.string()?) } else { None })
    }

    fn opt_u64(&mut self) -> Result<Option<u64>, SnapshotError> {
        Ok(if self.bool()? { Some(self.u64()?) } else { None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::request_key;

    #[test]
    fn b4_manifest_and_chunks_round_trip() {
        let manifest = Manifest {
            input_next_offset: 1_234,
            output_next_offset: 98_765,
            chunk_count: 3,
            records_before_manifest: 5,
            state_bytes: 2_700_000,
        };
        assert_eq!(Manifest::decode(&manifest.encode()), Ok(manifest));
        let value = chunk_value(1_234, 2, b"state bytes");
        assert_eq!(parse_chunk(&value), Ok((1_234, 2, &b"state bytes"[..])));
        let big = vec![7u8; CHUNK_BYTES * 2 + 10];
        let chunks = split_into_chunks(&big);
        assert_eq!(chunks.iter().map(|chunk| chunk.len()).collect::<Vec<_>>(), [CHUNK_BYTES, CHUNK_BYTES, 10]);
        assert_eq!(split_into_chunks(&[]).len(), 1, "an empty state is still one chunk");
    }

    #[test]
    fn m1_state_snapshots_older_than_accounts_are_refused_and_manifests_still_read() {
        let mut state = RouterState::default();
        state.applied_requests.insert(request_key("close-1"));
        let current = encode_state(&state);
        assert_eq!(current[4], FORMAT_VERSION);
        for older in OLDEST_MANIFEST_VERSION..OLDEST_STATE_VERSION {
            let mut old = current.clone();
            old[4] = older;
            assert_eq!(decode_state(&old), Err(SnapshotError::UnknownFormat), "version {older}");
        }
        let manifest = Manifest { input_next_offset: 9, output_next_offset: 7, chunk_count: 1, ..Default::default() };
        let mut old_manifest = manifest.encode();
        old_manifest[4] = 2;
        assert_eq!(Manifest::decode(&old_manifest), Ok(manifest));
    }

    #[test]
    fn c6_held_messages_keep_whether_their_thread_was_prompted_and_version_4_reads_as_not_prompted() {
        let mut state = RouterState::default();
        let held = |id: &str, consent_prompted: bool| HeldMessage {
            message: InboundMessageReceived { message_id: id.into(), channel_id: "fb-1".into(), ..Default::default() },
            source_event_id: format!("event-{id}"),
            consent_prompted,
        };
        state.held_by_contact.insert("contact-1".into(), vec![held("m1", true), held("m2", false)]);
        let current = decode_state(&encode_state(&state)).expect("current format");
        assert_eq!(current.held_by_contact, state.held_by_contact);
        assert!(current.held_by_contact["contact-1"][0].consent_prompted);

        let version_4 = encode_state_as(&state, 4);
        assert_eq!(version_4[4], 4);
        let read = decode_state(&version_4).expect("version 4 is still read");
        let prompted: Vec<bool> = read.held_by_contact["contact-1"].iter().map(|held| held.consent_prompted).collect();
        assert_eq!(prompted, [false, false], "no router before version 5 sent a prompt");
        assert_eq!(read.held_by_contact["contact-1"][1].message.message_id, "m2");
    }

    #[test]
    fn damaged_snapshots_are_errors_never_panics() {
        let encoded = encode_state(&RouterState::default());
        assert_eq!(decode_state(&encoded), Ok(RouterState::default()));
        assert_eq!(decode_state(b"nope"), Err(SnapshotError::UnknownFormat));
        assert_eq!(decode_state(&encoded[..encoded.len() - 1]).err().map(|_| ()), Some(()), "truncated");
        let mut trailing = encoded.clone();
        trailing.push(0);
        assert_eq!(decode_state(&trailing), Err(SnapshotError::Invalid("trailing bytes")));
        // A huge length must be refused before anything is allocated.
        let mut huge_length = MAGIC.to_vec();
        huge_length.push(FORMAT_VERSION);
        huge_length.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(decode_state(&huge_length).is_err());
        assert!(parse_chunk(&[1, 2, 3]).is_err());
        assert!(Manifest::decode(&[]).is_err());
    }
}
