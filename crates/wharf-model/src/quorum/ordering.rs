//! Per-key ordering on a quorum queue (`x-ordered-by`), as a classic queue's: a message may carry
//! a key (the value of the queue's ordering header, read by the node the publish arrived on and
//! sent in its enqueue), and of each key only the oldest message still in the queue (its
//! *holder*: ready, checked out or waiting out a backoff) can be delivered; the others wait in
//! the ready list behind it until it leaves the queue for good (settled, dead-lettered, purged),
//! so one key's messages go out one at a time, in the order their enqueues were committed,
//! whatever happens to the holder (returned, redelivered, its lease run out).
//!
//! `deliverable` is the ready messages that may go out (unkeyed ones and ready holders), the one
//! list dispatch and `basic.get` take from; every message enters and leaves the ready list, and
//! the queue, through the functions here, which keep it and the per-key lists in step.

use super::{Held, QuorumMessageId, QuorumQueue};
use std::sync::Arc;

impl QuorumQueue {
    /// Whether `id` is unkeyed or the holder of its key.
    fn is_holder(&self, id: QuorumMessageId) -> bool {
        match self.messages.get(&id).and_then(|held| held.order_key.as_ref()) {
            None => true,
            Some(key) => self.by_key.get(key).and_then(|ids| ids.first()) == Some(&id),
        }
    }

    /// Puts `id` (in the queue) in the ready list, deliverable if it may go out.
    pub(super) fn make_ready(&mut self, id: QuorumMessageId) {
        let Some(held) = self.messages.get(&id) else { return };
        if self.ready.insert(id) {
            self.ready_bytes += held.payload.len() as u64;
        }
        if self.is_holder(id) {
            self.deliverable.insert(id);
        }
    }

    /// Takes `id` out of the ready list (it stays in the queue).
    pub(super) fn take_ready(&mut self, id: QuorumMessageId) {
        self.deliverable.remove(&id);
        if self.ready.remove(&id) {
            let bytes = self.messages.get(&id).map_or(0, |held| held.payload.len() as u64);
            self.ready_bytes = self.ready_bytes.saturating_sub(bytes);
        }
    }

    /// Adds a message to the queue (not yet ready), behind the other messages of its key.
    pub(super) fn insert_message(&mut self, id: QuorumMessageId, held: Held) {
        if let Some(key) = &held.order_key {
            self.by_key.entry(Arc::clone(key)).or_default().insert(id);
        }
        self.messages.insert(id, held);
    }

    /// Removes `id` from the queue for good (it must be out of the ready list): the next
    /// message of its key becomes its holder, deliverable if ready.
    pub(super) fn remove_message(&mut self, id: QuorumMessageId) -> Option<Held> {
        let held = self.messages.remove(&id)?;
        if let Some(key) = &held.order_key
            && let Some(ids) = self.by_key.get_mut(key)
        {
            ids.remove(&id);
            match ids.first().copied() {
                Some(next) if self.ready.contains(&next) => {
                    self.deliverable.insert(next);
                }
                Some(_) => {}
                None => {
                    self.by_key.remove(key);
                }
            }
        }
        Some(held)
    }

    /// Rebuilds the per-key lists and the deliverable list from the messages and the ready list
    /// (after a snapshot is read).
    pub(super) fn rebuild_ordering(&mut self) {
        self.by_key.clear();
        self.deliverable.clear();
        for (id, held) in &self.messages {
            if let Some(key) = &held.order_key {
                self.by_key.entry(Arc::clone(key)).or_default().insert(*id);
            }
        }
        let ready: Vec<QuorumMessageId> = self.ready.iter().copied().collect();
        for id in ready {
            if self.is_holder(id) {
                self.deliverable.insert(id);
            }
        }
    }
}
