//! [`DedupIndex`]: the keys a queue or exchange has seen within its de-duplication window.
//!
//! The index lives in memory and is rebuilt at start from the runtime's key log (one store record
//! per key, written only after the message it admitted is durable, so a remembered key never
//! stands for a message a crash lost). It is bounded: beyond `DEDUP_KEYS_MAX` keys the oldest are
//! forgotten early and counted, rather than letting one queue take unbounded memory.

use crate::message::Message;
use crate::settings::Deduplication;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Most keys one index remembers.
pub const DEDUP_KEYS_MAX: usize = 2_000_000;

/// Seen keys with the time they were first seen.
#[derive(Debug)]
pub struct DedupIndex {
    settings: Deduplication,
    seen: HashMap<Arc<[u8]>, u64>,
    /// Keys in the order they were seen (expiry and eviction order).
    order: VecDeque<(u64, Arc<[u8]>)>,
    keys_max: usize,
    /// Keys forgotten before their window ended because the index was full.
    pub evicted: u64,
}

impl DedupIndex {
    /// An empty index.
    pub fn new(settings: Deduplication) -> Self {
        DedupIndex { settings, seen: HashMap::new(), order: VecDeque::new(), keys_max: DEDUP_KEYS_MAX, evicted: 0 }
    }

    /// The key a message is de-duplicated by: the configured header, or its `message-id`.
    pub fn key_of(&self, message: &Message) -> Option<Vec<u8>> {
        match &self.settings.header {
            Some(header) => message.header_text(header).map(String::into_bytes),
            None => message.message_id().map(|id| id.as_bytes().to_vec()),
        }
    }

    /// The window.
    pub fn ttl_ms(&self) -> u64 {
        self.settings.ttl_ms
    }

    /// True if `key` was seen within the window; otherwise remembers it as seen `now_ms`.
    pub fn check_and_insert(&mut self, key: &[u8], now_ms: u64) -> bool {
        self.expire(now_ms);
        if self.seen.contains_key(key) {
            return true;
        }
        self.insert(key, now_ms);
        false
    }

    fn insert(&mut self, key: &[u8], seen_ms: u64) {
        while self.seen.len() >= self.keys_max {
            let Some((oldest_ms, oldest)) = self.order.pop_front() else { break };
            if self.seen.get(&oldest) == Some(&oldest_ms) {
                self.seen.remove(&oldest);
                self.evicted += 1;
            }
        }
        let key: Arc<[u8]> = Arc::from(key);
        self.seen.insert(Arc::clone(&key), seen_ms);
        self.order.push_back((seen_ms, key));
    }

    /// True if `key` is remembered (call `expire` first for an exact answer).
    pub fn contains(&self, key: &[u8]) -> bool {
        self.seen.contains_key(key)
    }

    /// Remembers a key from the key log (recovery), unless its window is over.
    pub fn restore(&mut self, key: &[u8], seen_ms: u64) {
        if !self.seen.contains_key(key) {
            self.insert(key, seen_ms);
        }
    }

    /// Forgets keys whose window ended by `now_ms`.
    pub fn expire(&mut self, now_ms: u64) {
        while let Some((seen_ms, _)) = self.order.front() {
            if seen_ms.saturating_add(self.settings.ttl_ms) > now_ms {
                break;
            }
            if let Some((seen_ms, key)) = self.order.pop_front()
                && self.seen.get(&key) == Some(&seen_ms)
            {
                self.seen.remove(&key);
            }
        }
    }

    /// Keys remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True if no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    #[cfg(test)]
    fn with_keys_max(mut self, keys_max: usize) -> Self {
        self.keys_max = keys_max;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_expire_after_the_window_and_the_index_is_bounded() {
        let mut index = DedupIndex::new(Deduplication { ttl_ms: 100, header: None }).with_keys_max(2);
        assert!(!index.check_and_insert(b"a", 0));
        assert!(index.check_and_insert(b"a", 99), "within the window");
        assert!(!index.check_and_insert(b"a", 100), "window over: seen anew");
        assert!(!index.check_and_insert(b"b", 101));
        assert!(!index.check_and_insert(b"c", 102));
        assert_eq!(index.len(), 2);
        assert_eq!(index.evicted, 1);
        assert!(!index.check_and_insert(b"a", 103), "the oldest was evicted");
    }
}
