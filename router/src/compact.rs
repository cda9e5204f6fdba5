//! Compact containers of the routing state: short strings and short id lists kept inline, so
//! the hot tables hold their data in place instead of behind one heap pointer each.

/// Between the account and the id in [`InlineStr::scoped`] keys.
const SCOPE_SEPARATOR: u8 = 0x1f;

/// A short string stored inline (agent ids, thread keys, sender ids usually fit): hash tables
/// keyed or valued by it compare in the table's own memory instead of chasing one heap pointer
/// per probe (docs/router.md, "state layout"). Longer strings go to the heap.
/// Hashes and compares as the string's bytes, so maps are queried with `key.as_bytes()`.
#[derive(Clone)]
pub enum InlineStr {
    Inline { len: u8, bytes: [u8; InlineStr::INLINE] },
    Heap(Box<str>),
}

impl InlineStr {
    const INLINE: usize = 38;

    pub fn new(text: &str) -> InlineStr {
        if text.len() <= InlineStr::INLINE {
            let mut bytes = [0u8; InlineStr::INLINE];
            bytes[..text.len()].copy_from_slice(text.as_bytes());
            InlineStr::Inline { len: text.len() as u8, bytes }
        } else {
            InlineStr::Heap(text.into())
        }
    }

    /// The key of an id within its account (M1): one partition routes several accounts, and
    /// two of them may use the same channel or agent id. The separator (U+001F) never occurs in
    /// entity ids, so distinct pairs give distinct keys.
    pub fn scoped(account_id: &str, id: &str) -> InlineStr {
        let len = account_id.len() + 1 + id.len();
        if len <= InlineStr::INLINE {
            let mut bytes = [0u8; InlineStr::INLINE];
            bytes[..account_id.len()].copy_from_slice(account_id.as_bytes());
            bytes[account_id.len()] = SCOPE_SEPARATOR;
            bytes[account_id.len() + 1..len].copy_from_slice(id.as_bytes());
            InlineStr::Inline { len: len as u8, bytes }
        } else {
            InlineStr::Heap(format!("{account_id}{}{id}", SCOPE_SEPARATOR as char).into())
        }
    }

    /// The (account, id) of a [`InlineStr::scoped`] key. Ids never contain the separator, so
    /// the last one splits them.
    pub fn scope(&self) -> (&str, &str) {
        let text = self.as_str();
        match text.rfind(SCOPE_SEPARATOR as char) {
            Some(at) => (&text[..at], &text[at + 1..]),
            None => ("", text),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            InlineStr::Inline { len, bytes } => &bytes[..*len as usize],
            InlineStr::Heap(text) => text.as_bytes(),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            // Built from a `&str` prefix of the same length, so always valid UTF-8.
            InlineStr::Inline { .. } => std::str::from_utf8(self.as_bytes()).unwrap_or_default(),
            InlineStr::Heap(text) => text,
        }
    }
}

impl std::ops::Deref for InlineStr {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl Default for InlineStr {
    fn default() -> Self {
        InlineStr::new("")
    }
}

impl PartialEq for InlineStr {
    fn eq(&self, other: &InlineStr) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for InlineStr {}

impl PartialEq<str> for InlineStr {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl std::hash::Hash for InlineStr {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl std::borrow::Borrow<[u8]> for InlineStr {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl std::fmt::Debug for InlineStr {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), formatter)
    }
}

impl std::fmt::Display for InlineStr {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl From<&str> for InlineStr {
    fn from(text: &str) -> InlineStr {
        InlineStr::new(text)
    }
}

impl From<String> for InlineStr {
    fn from(text: String) -> InlineStr {
        InlineStr::new(&text)
    }
}

/// A conversation's message ids (retired into the dedup window when it closes). Most
/// conversations have a few messages: those are kept in the conversation's own memory, so
/// starting and closing one allocates nothing for them and chases no pointer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MessageKeys {
    inline: [u128; MessageKeys::INLINE],
    inline_len: u8,
    /// The ids after the first `INLINE`.
    spilled: Vec<u128>,
}

impl MessageKeys {
    const INLINE: usize = 4;

    pub fn push(&mut self, key: u128) {
        match self.inline.get_mut(self.inline_len as usize) {
            Some(slot) => {
                *slot = key;
                self.inline_len += 1;
            }
            None => self.spilled.push(key),
        }
    }

    pub fn len(&self) -> usize {
        self.inline_len as usize + self.spilled.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// In the order they were pushed.
    pub fn iter(&self) -> impl Iterator<Item = u128> + '_ {
        self.inline[..self.inline_len as usize].iter().chain(&self.spilled).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b1_a_conversations_message_ids_are_kept_in_order_past_the_inline_ones() {
        let mut keys = MessageKeys::default();
        assert!(keys.is_empty());
        for key in 1..=7u128 {
            keys.push(key);
        }
        assert_eq!(keys.len(), 7);
        assert_eq!(keys.iter().collect::<Vec<_>>(), (1..=7).collect::<Vec<_>>());
    }
}
