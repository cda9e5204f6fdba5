//! The open conversations of a partition: stored once, in a slab, and found by id or by thread.
//!
//! Most inputs are follow-ups (R10): they find their conversation by (channel, thread key), and
//! the `MessageAppended` they produce finds it again in `evolve`. Both indexes give the
//! conversation's slot, so a follow-up reads two places (the thread entry and the slot) before
//! it has its conversation, and `evolve` re-reads the same two (docs/router.md, "state
//! layout").

use crate::compact::{InlineStr, MessageKeys};
use crate::fast_hash::FastMap;

/// One open conversation as routing needs it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConversationState {
    /// The id as written when it is not a canonical UUID (router-made ids always are, so this
    /// is `None` in practice and the id is printed from the key).
    pub noncanonical_id_opt: Option<Box<str>>,
    /// The account and channel as one [`InlineStr::scoped`] key (M1): it addresses the thread
    /// index and the backlog as it is, and one field keeps the state as small as when it held
    /// the channel id alone. Inline like the other short ids: closing and following up read
    /// it, and a heap string would be one more cache miss each time.
    pub channel_key: InlineStr,
    pub channel_type: i32,
    pub thread_key: InlineStr,
    pub contact_id: InlineStr,
    /// The contact's channel-scoped identity: a follow-up from the same sender needs no
    /// contact lookup (the contact is this one).
    pub contact_external_id: InlineStr,
    pub assignee_agent_id_opt: Option<InlineStr>,
    /// Recorded-at of the ConversationStarted event: the backlog is re-driven oldest first (B3).
    pub started_at_millis: u64,
    /// Message ids in the conversation; retired into the recent window when it closes (B1).
    pub message_keys: MessageKeys,
    pub ticket_id_opt: Option<String>,
}

impl ConversationState {
    /// The conversation's id, given its key.
    pub fn id(&self, key: u128) -> String {
        match &self.noncanonical_id_opt {
            Some(id) => id.to_string(),
            None => {
                let mut buffer = [0u8; uuid::fmt::Hyphenated::LENGTH];
                uuid::Uuid::from_u128(key).hyphenated().encode_lower(&mut buffer).to_owned()
            }
        }
    }

    pub fn assignee(&self) -> Option<&str> {
        self.assignee_agent_id_opt.as_ref().map(InlineStr::as_str)
    }

    pub fn account_id(&self) -> &str {
        self.channel_key.scope().0
    }

    pub fn channel_id(&self) -> &str {
        self.channel_key.scope().1
    }
}

/// Where a conversation lives in the slab.
type Slot = u32;

/// Slots per chunk. Chunks never grow, so adding conversations never moves the ones stored
/// (a single growing vector of states would copy all of them while routing waits).
const CHUNK_BITS: u32 = 10;
const CHUNK_SLOTS: usize = 1 << CHUNK_BITS;

#[derive(Debug, Clone)]
struct Entry {
    key: u128,
    conversation: ConversationState,
}

/// Open conversations by [`crate::ids::conversation_key`] and by (channel id, thread key).
#[derive(Debug, Clone, Default)]
pub struct OpenConversations {
    chunks: Vec<Vec<Option<Entry>>>,
    /// Slots freed by closed conversations, reused first (the slab stays as large as the most
    /// conversations ever open at once).
    vacant: Vec<Slot>,
    by_key: FastMap<u128, Slot>,
    /// R10: by [`InlineStr::scoped`] (account, channel id), then thread key (M1: two accounts'
    /// channels may share an id; two levels let lookups borrow).
    by_thread: FastMap<InlineStr, FastMap<InlineStr, Slot>>,
}

impl OpenConversations {
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Slots ever handed out: each is occupied (indexed by key) or vacant.
    fn slot_count(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }

    fn slot(&self, slot: Slot) -> &Option<Entry> {
        &self.chunks[(slot >> CHUNK_BITS) as usize][slot as usize & (CHUNK_SLOTS - 1)]
    }

    fn slot_mut(&mut self, slot: Slot) -> &mut Option<Entry> {
        &mut self.chunks[(slot >> CHUNK_BITS) as usize][slot as usize & (CHUNK_SLOTS - 1)]
    }

    fn entry(&self, slot: Slot) -> &Entry {
        self.slot(slot).as_ref().expect("indexes point at occupied slots")
    }

    fn entry_mut(&mut self, slot: Slot) -> &mut Entry {
        self.slot_mut(slot).as_mut().expect("indexes point at occupied slots")
    }

    fn thread_slot(&self, account_id: &str, channel_id: &str, thread_key: &str) -> Option<Slot> {
        self.by_thread
            .get(InlineStr::scoped(account_id, channel_id).as_bytes())
            .and_then(|threads| threads.get(thread_key.as_bytes()))
            .copied()
    }

    pub fn get(&self, key: u128) -> Option<&ConversationState> {
        let slot = *self.by_key.get(&key)?;
        Some(&self.entry(slot).conversation)
    }

    pub fn get_mut(&mut self, key: u128) -> Option<&mut ConversationState> {
        let slot = *self.by_key.get(&key)?;
        Some(&mut self.entry_mut(slot).conversation)
    }

    /// R10: the thread's open conversation, with its key.
    pub fn by_thread(
        &self,
        account_id: &str,
        channel_id: &str,
        thread_key: &str,
    ) -> Option<(u128, &ConversationState)> {
        let entry = self.entry(self.thread_slot(account_id, channel_id, thread_key)?);
        Some((entry.key, &entry.conversation))
    }

    /// The conversation `key`, looked up through its thread when the caller knows it (the
    /// entries a follow-up's decision just read), else by key.
    pub fn get_mut_in_thread(
        &mut self,
        key: u128,
        account_id: &str,
        channel_id: &str,
        thread_key: &str,
    ) -> Option<&mut ConversationState> {
        let slot = match self.thread_slot(account_id, channel_id, thread_key) {
            Some(slot) if self.entry(slot).key == key => slot,
            _ => *self.by_key.get(&key)?,
        };
        Some(&mut self.entry_mut(slot).conversation)
    }

    /// Records an open conversation; one already recorded under `key` is replaced.
    pub fn insert(&mut self, key: u128, conversation: ConversationState) {
        self.remove(key);
        let slot = match self.vacant.pop() {
            Some(slot) => slot,
            None => {
                if self.chunks.last().is_none_or(|chunk| chunk.len() == CHUNK_SLOTS) {
                    self.chunks.push(Vec::with_capacity(CHUNK_SLOTS));
                }
                let chunk_index = self.chunks.len() - 1;
                let chunk = &mut self.chunks[chunk_index];
                chunk.push(None);
                ((chunk_index << CHUNK_BITS) + chunk.len() - 1) as Slot
            }
        };
        let threads = match self.by_thread.get_mut(conversation.channel_key.as_bytes()) {
            Some(threads) => threads,
            None => self.by_thread.entry(conversation.channel_key.clone()).or_default(),
        };
        threads.insert(conversation.thread_key.clone(), slot);
        self.by_key.insert(key, slot);
        debug_assert!(self.slot(slot).is_none(), "a conversation takes a vacant slot");
        *self.slot_mut(slot) = Some(Entry { key, conversation });
        debug_assert_eq!(self.by_key.len() + self.vacant.len(), self.slot_count(), "slots are open or vacant");
    }

    /// Forgets an open conversation (it closed), returning its state.
    pub fn remove(&mut self, key: u128) -> Option<ConversationState> {
        let slot = self.by_key.remove(&key)?;
        let entry = self.slot_mut(slot).take().expect("indexes point at occupied slots");
        let channel_key = &entry.conversation.channel_key;
        if let Some(threads) = self.by_thread.get_mut(channel_key.as_bytes()) {
            // Only if the thread still points here: a conversation replaced under the same
            // thread must stay reachable.
            if threads.get(entry.conversation.thread_key.as_bytes()) == Some(&slot) {
                threads.remove(entry.conversation.thread_key.as_bytes());
            }
            if threads.is_empty() {
                self.by_thread.remove(channel_key.as_bytes());
            }
        }
        self.vacant.push(slot);
        debug_assert_eq!(self.by_key.len() + self.vacant.len(), self.slot_count(), "slots are open or vacant");
        Some(entry.conversation)
    }

    /// Every open conversation with its key, in slot order (deterministic for a given history).
    pub fn iter(&self) -> impl Iterator<Item = (u128, &ConversationState)> + '_ {
        self.chunks.iter().flatten().flatten().map(|entry| (entry.key, &entry.conversation))
    }

    /// Threads with an open conversation (one per conversation unless the log repeated a start).
    pub fn thread_count(&self) -> usize {
        self.by_thread.values().map(|threads| threads.len()).sum()
    }
}

/// Equal when the same conversations are open under the same keys and threads, wherever their
/// slots are (a state restored from a snapshot fills slots in another order).
impl PartialEq for OpenConversations {
    fn eq(&self, other: &OpenConversations) -> bool {
        self.len() == other.len()
            && self.thread_count() == other.thread_count()
            && self.iter().all(|(key, conversation)| {
                other.get(key) == Some(conversation)
                    && other
                        .by_thread(conversation.account_id(), conversation.channel_id(), &conversation.thread_key)
                        .map(|(thread_conversation_key, _)| thread_conversation_key)
                        == self
                            .by_thread(conversation.account_id(), conversation.channel_id(), &conversation.thread_key)
                            .map(|(k, _)| k)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation(channel_id: &str, thread_key: &str) -> ConversationState {
        in_account("acct", channel_id, thread_key)
    }

    fn in_account(account_id: &str, channel_id: &str, thread_key: &str) -> ConversationState {
        ConversationState {
            channel_key: InlineStr::scoped(account_id, channel_id),
            thread_key: thread_key.into(),
            ..Default::default()
        }
    }

    #[test]
    fn r10_a_conversation_is_found_by_key_and_by_thread_until_it_is_removed() {
        let mut open = OpenConversations::default();
        open.insert(7, conversation("chat", "visitor-1"));
        open.insert(8, conversation("chat", "visitor-2"));
        assert_eq!(open.by_thread("acct", "chat", "visitor-1").map(|(key, _)| key), Some(7));
        assert_eq!(open.get(8).map(|c| c.thread_key.as_str()), Some("visitor-2"));
        assert_eq!(open.remove(7).map(|c| c.thread_key.to_string()), Some("visitor-1".to_string()));
        assert!(open.by_thread("acct", "chat", "visitor-1").is_none() && open.get(7).is_none());
        assert_eq!((open.len(), open.thread_count()), (1, 1));
    }

    #[test]
    fn r10_slots_of_closed_conversations_are_reused_and_the_rest_never_move() {
        let mut open = OpenConversations::default();
        for key in 0..3 * CHUNK_SLOTS as u128 {
            open.insert(key, conversation("chat", &format!("visitor-{key}")));
        }
        for key in (0..3 * CHUNK_SLOTS as u128).step_by(2) {
            open.remove(key);
        }
        for key in 10_000..10_000 + (3 * CHUNK_SLOTS as u128).div_ceil(2) {
            open.insert(key, conversation("chat", &format!("visitor-{key}")));
        }
        assert_eq!(open.chunks.len(), 3, "freed slots were filled before any new chunk");
        assert!(open.chunks.iter().all(|chunk| chunk.capacity() == CHUNK_SLOTS), "chunks never reallocate");
        for key in (1..3 * CHUNK_SLOTS as u128).step_by(2) {
            assert_eq!(open.by_thread("acct", "chat", &format!("visitor-{key}")).map(|(k, _)| k), Some(key));
        }
    }

    #[test]
    fn r10_a_lookup_through_a_thread_that_moved_on_falls_back_to_the_key() {
        let mut open = OpenConversations::default();
        open.insert(1, conversation("chat", "visitor-1"));
        open.insert(2, conversation("chat", "visitor-2"));
        assert!(open.get_mut_in_thread(1, "acct", "chat", "visitor-2").is_some_and(|c| c.thread_key == *"visitor-1"));
        assert!(open.get_mut_in_thread(3, "acct", "chat", "visitor-2").is_none());
    }

    #[test]
    fn b4_states_with_the_same_conversations_are_equal_whatever_their_slots() {
        let (mut first, mut second) = (OpenConversations::default(), OpenConversations::default());
        first.insert(1, conversation("chat", "a"));
        first.insert(2, conversation("chat", "b"));
        second.insert(2, conversation("chat", "b"));
        second.insert(1, conversation("chat", "a"));
        assert_eq!(first, second);
        second.remove(1);
        second.insert(1, conversation("chat", "c"));
        assert_ne!(first, second);
    }

    #[test]
    fn m1_two_accounts_threads_on_channels_of_the_same_id_are_two_conversations() {
        let mut open = OpenConversations::default();
        open.insert(1, in_account("acme", "mail", "thread-1"));
        open.insert(2, in_account("globex", "mail", "thread-1"));
        assert_eq!(open.by_thread("acme", "mail", "thread-1").map(|(key, _)| key), Some(1));
        assert_eq!(open.by_thread("globex", "mail", "thread-1").map(|(key, _)| key), Some(2));
        assert!(open.by_thread("initech", "mail", "thread-1").is_none());
        open.remove(1);
        assert_eq!(open.by_thread("globex", "mail", "thread-1").map(|(key, _)| key), Some(2));
        assert_eq!(open.thread_count(), 1);
    }
}
