//! Taking chosen messages out of a queue and putting them back: what the DLQ workbench's replay,
//! move and delete need. Only ready and waiting (retry backoff) messages can be taken; an
//! unacknowledged one is with a consumer, which decides its fate. Also the trace events noted on
//! an unacknowledged entry (`trace.rs`).

use super::{Entry, Queue};

impl Queue {
    /// Takes a ready or waiting entry out of the queue for good (its key, if any, passes to the
    /// next entry). `None` if no such entry is ready or waiting (unknown, gone, or unacknowledged).
    pub(crate) fn withdraw(&mut self, id: u64) -> Option<Entry> {
        if let Some(entry) = self.remove_ready(id) {
            return Some(entry);
        }
        // A waiting entry's backoff timer finds it gone and does nothing.
        let entry = self.waiting.remove(&id)?;
        self.unhold(&entry);
        self.release_key(&entry);
        Some(entry)
    }

    /// A copy of ready or waiting entry `id`, left where it is.
    pub fn peek(&self, id: u64) -> Option<Entry> {
        self.ready.get(id).or_else(|| self.waiting.get(&id).cloned())
    }

    /// A copy of entry `id` wherever it is in the queue, and where.
    pub fn entry(&self, id: u64) -> Option<(Entry, super::EntryState)> {
        if let Some(entry) = self.ready.get(id) {
            return Some((entry, super::EntryState::Ready));
        }
        if let Some(entry) = self.waiting.get(&id) {
            return Some((entry.clone(), super::EntryState::Waiting));
        }
        self.unacked.get(&id).map(|entry| (entry.clone(), super::EntryState::Unacknowledged))
    }

    /// True if `id` is delivered and not yet settled.
    pub fn is_unacked(&self, id: u64) -> bool {
        self.unacked.contains_key(&id)
    }

    /// The ids of the ready and waiting entries, in id order.
    pub fn movable_ids(&self) -> Vec<u64> {
        let mut ids = self.ready.ids();
        ids.extend(self.waiting.keys().copied());
        ids.sort_unstable();
        ids
    }

    /// Adds events to an unacknowledged entry's trace (bounded by `max`).
    pub(crate) fn note_unacked(
        &mut self,
        id: u64,
        events: impl IntoIterator<Item = crate::trace::TraceEvent>,
        max: usize,
    ) {
        let Some(entry) = self.unacked.get_mut(&id) else { return };
        let trace = entry.trace.get_or_insert_with(Box::default);
        for event in events {
            trace.push(event, max);
        }
    }

    /// Whether `extra_messages` more messages and `extra_bytes` more body bytes would pass the
    /// queue's length limits.
    pub(crate) fn would_overflow_with(&self, extra_messages: u64, extra_bytes: u64) -> bool {
        self.settings.max_length.is_some_and(|max| (self.ready_count() as u64).saturating_add(extra_messages) >= max)
            || self.settings.max_length_bytes.is_some_and(|max| self.held_bytes.saturating_add(extra_bytes) > max)
    }

    /// Puts back an entry [`Queue::withdraw`] took, when what it was taken for could not be
    /// done: ready again, in its place (behind its key's holder if another took the key).
    pub(crate) fn reinstate(&mut self, entry: Entry) {
        self.insert_new(entry);
    }
}
