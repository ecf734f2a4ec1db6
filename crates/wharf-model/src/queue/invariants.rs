//! [`Queue::check_invariants`]: a test assertion that the queue's bookkeeping agrees with its
//! entries. The model keeps that bookkeeping incrementally (counters, indexes, key holders
//! updated on every move), so a mistake in one move would otherwise show only much later, as a
//! message delivered twice, never, or out of key order. The tests run this after every model
//! operation, so the operation that broke an invariant is the one that fails.
//!
//! It is always compiled, not only under `cfg(test)`: the integration tests in `tests/` link
//! the library as it is built for anyone else (without `cfg(test)`), and gating it on
//! `debug_assertions` would break `cargo test --release`. Nothing outside the tests calls it,
//! so it costs the broker nothing; it is `#[doc(hidden)]` because it is not part of the model's
//! interface.

use super::{Entry, Queue};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// Where an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Ready,
    Waiting,
    Unacked,
}

impl Queue {
    /// Panics, naming the broken invariant, unless: every entry is in exactly one place (ready,
    /// waiting or unacknowledged) under its own id, below the next id to give out; `held_bytes`
    /// and `resident_bytes` are the body bytes of the ready and waiting entries (all of them, and
    /// those in memory); the expiry index lists exactly the ready entries that expire; with
    /// `x-ordered-by`, each key with entries has one holder (its oldest entry, by arrival whatever
    /// the priorities), every other entry of the key is ready and queued behind it in arrival order, and the deliverable set is exactly the ready
    /// entries that hold their key or have none; and the consumer list is consistent.
    #[doc(hidden)]
    pub fn check_invariants(&self) {
        let name = self.name.as_str();
        self.ready.check_invariants(name);
        let ready = self.ready.entries();
        let mut places: BTreeMap<u64, Place> = BTreeMap::new();
        let all = ready
            .iter()
            .map(|entry| (entry.id, entry, Place::Ready))
            .chain(self.waiting.iter().map(|(id, entry)| (*id, entry, Place::Waiting)))
            .chain(self.unacked.iter().map(|(id, entry)| (*id, entry, Place::Unacked)));
        for (id, entry, place) in all {
            assert_eq!(
                id, entry.id,
                "invariant broken in queue '{name}': {place:?} entry {} filed under id {id}",
                entry.id
            );
            assert!(
                id & crate::priority::ID_ARRIVAL_MASK < self.next_id,
                "invariant broken in queue '{name}': entry {id} is not below the next id {}",
                self.next_id
            );
            if let Some(other) = places.insert(id, place) {
                panic!(
                    "invariant broken in queue '{name}': entry {id} is in more than one place ({other:?} and {place:?})"
                );
            }
        }

        let held = ready.iter().chain(self.waiting.values());
        let (held_bytes, resident_bytes) = held.fold((0, 0), |(held_bytes, resident_bytes), entry| {
            let body_bytes = entry.message.body_bytes();
            let resident = if entry.message.paged().is_none() { body_bytes } else { 0 };
            (held_bytes + body_bytes, resident_bytes + resident)
        });
        assert_eq!(
            self.held_bytes, held_bytes,
            "invariant broken in queue '{name}': held_bytes is {} but its ready and waiting entries hold {held_bytes} body bytes",
            self.held_bytes
        );
        assert_eq!(
            self.resident_bytes, resident_bytes,
            "invariant broken in queue '{name}': resident_bytes is {} but {resident_bytes} body bytes of its ready and waiting entries are in memory",
            self.resident_bytes
        );

        let unacked_resident: u64 = self
            .unacked
            .values()
            .filter(|entry| entry.message.paged().is_none())
            .map(|entry| entry.message.body_bytes())
            .sum();
        assert_eq!(
            self.unacked_resident_bytes, unacked_resident,
            "invariant broken in queue '{name}': unacked_resident_bytes is {} but its unacknowledged entries hold {unacked_resident} body bytes in memory",
            self.unacked_resident_bytes
        );

        let expiring: BTreeSet<(u64, u64)> =
            ready.iter().filter_map(|entry| entry.expires_at_ms.map(|at| (at, entry.id))).collect();
        assert!(
            self.expiry == expiring,
            "invariant broken in queue '{name}': the expiry index {:?} does not list exactly the expiring ready entries {expiring:?}",
            self.expiry
        );

        self.check_ordering(&ready, &places);
        self.check_consumers();
    }

    /// The `x-ordered-by` part of [`Queue::check_invariants`].
    fn check_ordering(&self, ready: &[Entry], places: &BTreeMap<u64, Place>) {
        let name = self.name.as_str();
        let entries = ready.iter().chain(self.waiting.values()).chain(self.unacked.values());
        let Some(ordering) = &self.ordering else {
            if let Some(keyed) = entries.filter(|entry| entry.order_key.is_some()).map(|entry| entry.id).next() {
                panic!(
                    "invariant broken in queue '{name}': entry {keyed} has an ordering key but the queue is not ordered"
                );
            }
            return;
        };
        // Per key, by arrival (the low bits of an id; the high ones are the priority level).
        let arrival = |id: u64| id & crate::priority::ID_ARRIVAL_MASK;
        let mut by_key: HashMap<Arc<str>, BTreeSet<u64>> = HashMap::new();
        for entry in entries {
            if let Some(key) = &entry.order_key {
                by_key.entry(Arc::clone(key)).or_default().insert(entry.id);
            }
        }
        for (key, ids) in &by_key {
            let Some(&holder) = ordering.holders.get(key) else {
                panic!("invariant broken in queue '{name}': key '{key}' has entries {ids:?} but no holder");
            };
            assert_eq!(
                ids.iter().copied().min_by_key(|id| arrival(*id)),
                Some(holder),
                "invariant broken in queue '{name}': key '{key}' is held by entry {holder}, not by its oldest entry (of {ids:?})"
            );
            let behind: BTreeSet<u64> = ordering
                .blocked
                .get(key)
                .map(|(blocked, _)| blocked.iter().copied().filter(|id| places.contains_key(id)).collect())
                .unwrap_or_default();
            let others: BTreeSet<u64> = ids.iter().copied().filter(|id| *id != holder).collect();
            assert!(
                behind == others,
                "invariant broken in queue '{name}': key '{key}' queues {behind:?} behind its holder {holder}, but its other entries are {others:?}"
            );
            if let Some(not_ready) = others.iter().find(|id| places.get(id) != Some(&Place::Ready)) {
                panic!(
                    "invariant broken in queue '{name}': entry {not_ready} waits behind key '{key}''s holder but is not ready"
                );
            }
        }
        if let Some((key, holder)) = ordering.holders.iter().find(|(key, _)| !by_key.contains_key(*key)) {
            panic!(
                "invariant broken in queue '{name}': key '{key}' is held by entry {holder}, which is not in the queue"
            );
        }
        for (key, (blocked, stale)) in &ordering.blocked {
            assert!(
                ordering.holders.contains_key(key),
                "invariant broken in queue '{name}': entries {blocked:?} wait behind key '{key}', which has no holder"
            );
            let ascending =
                blocked.iter().zip(blocked.iter().skip(1)).all(|(first, next)| arrival(*first) < arrival(*next));
            assert!(
                ascending,
                "invariant broken in queue '{name}': the entries behind key '{key}' are out of order: {blocked:?}"
            );
            let left = blocked.iter().filter(|id| !places.contains_key(id)).count();
            assert_eq!(
                left, *stale,
                "invariant broken in queue '{name}': {left} of the ids behind key '{key}' left the queue but {stale} are counted stale"
            );
        }
        let deliverable: BTreeSet<u64> = ready
            .iter()
            .filter(|entry| entry.order_key.as_ref().is_none_or(|key| ordering.holders.get(key) == Some(&entry.id)))
            .map(|entry| entry.id)
            .collect();
        assert!(
            ordering.deliverable == deliverable,
            "invariant broken in queue '{name}': the deliverable set {:?} is not the ready entries that hold their key or have none {deliverable:?}",
            ordering.deliverable
        );
    }

    /// The consumer part of [`Queue::check_invariants`].
    fn check_consumers(&self) {
        let name = self.name.as_str();
        let distinct: BTreeSet<&(super::ChannelKey, String)> = self.consumers.iter().collect();
        assert_eq!(
            distinct.len(),
            self.consumers.len(),
            "invariant broken in queue '{name}': a consumer is attached twice"
        );
        assert_eq!(
            self.consumer_priorities.len(),
            self.consumers.len(),
            "invariant broken in queue '{name}': consumer priorities and consumers differ in number"
        );
        assert!(
            self.next_consumer == 0 || self.next_consumer < self.consumers.len(),
            "invariant broken in queue '{name}': the round-robin position {} is past its {} consumers",
            self.next_consumer,
            self.consumers.len()
        );
        if let Some(exclusive) = &self.exclusive_consumer {
            assert!(
                self.consumers.contains(exclusive),
                "invariant broken in queue '{name}': its exclusive consumer {exclusive:?} is not attached"
            );
        }
        assert!(
            self.had_consumer || self.consumers.is_empty(),
            "invariant broken in queue '{name}': it has consumers but does not count as having had one"
        );
    }

    /// Ids of the unacknowledged entries (for the broker's cross-check against its channels).
    pub(crate) fn unacked_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.unacked.keys().copied()
    }

    /// Ids of the entries waiting out a retry backoff (each must have its timer).
    pub(crate) fn waiting_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.waiting.keys().copied()
    }

    /// The attached consumers, in round-robin order.
    pub(crate) fn consumers(&self) -> &[(super::ChannelKey, String)] {
        &self.consumers
    }

    /// When the earliest ready entry expires, and when the expiry timer is armed for.
    pub(crate) fn expiry_timing(&self) -> (Option<u64>, Option<u64>) {
        (self.expiry.first().map(|(at, _)| *at), self.expiry_timer_ms)
    }

    /// When the `x-expires` timer is armed for, if it is.
    pub(crate) fn expires_timer_ms(&self) -> Option<u64> {
        self.expires_timer_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;
    use crate::settings::QueueSettings;
    use bytes::Bytes;
    use wharf_wire::protocol::BasicProperties;
    use wharf_wire::types::{AMQPValue, FieldTable, LongString};

    fn ordered_queue() -> Queue {
        let settings = QueueSettings { ordered_by: Some("k".to_owned()), ..QueueSettings::default() };
        Queue::new("orders".to_owned(), true, None, false, FieldTable::default(), settings)
    }

    fn keyed(body: &str, order_key: &str) -> Arc<Message> {
        let mut headers = FieldTable::default();
        headers.insert("k".into(), AMQPValue::LongString(LongString::from(order_key.as_bytes().to_vec())));
        let properties = BasicProperties::default().with_headers(headers).with_expiration("60000".into());
        Arc::new(Message::new(
            String::new(),
            "orders".into(),
            std::sync::Arc::new(properties.clone()),
            wharf_wire::frame::encode_properties(&properties),
            Bytes::from(body.to_owned()),
        ))
    }

    /// A queue that has been through every move: delivered, requeued, held for backoff, woken.
    fn busy_queue() -> Queue {
        let mut queue = ordered_queue();
        for (index, (body, order_key)) in [("A1", "A"), ("B1", "B"), ("A2", "A"), ("C1", "C")].into_iter().enumerate() {
            queue.enqueue(keyed(body, order_key), Some(index as u64 + 1), false, 1_000);
        }
        let first = queue.deliver_next(true).unwrap();
        queue.deliver_next(true).unwrap();
        queue.return_unacked(first.id, false).unwrap();
        queue.check_invariants();
        queue
    }

    #[test]
    fn a_queue_moved_through_every_place_passes() {
        let mut queue = busy_queue();
        let first = queue.deliver_next(true).unwrap();
        let entry = queue.unacked.remove(&first.id).unwrap();
        queue.unacked_resident_bytes -= entry.message.body_bytes();
        queue.hold_for_backoff(entry);
        queue.check_invariants();
        assert!(queue.wake(first.id));
        queue.check_invariants();
        assert_eq!(queue.take_all().len(), 4);
        queue.check_invariants();
    }

    #[test]
    #[should_panic(expected = "held_bytes is")]
    fn a_miscounted_held_byte_total_is_caught() {
        let mut queue = busy_queue();
        queue.held_bytes += 1;
        queue.check_invariants();
    }

    #[test]
    #[should_panic(expected = "resident_bytes is")]
    fn a_miscounted_resident_byte_total_is_caught() {
        let mut queue = busy_queue();
        queue.resident_bytes -= 1;
        queue.check_invariants();
    }

    #[test]
    #[should_panic(expected = "is in more than one place")]
    fn an_entry_in_two_places_is_caught() {
        let mut queue = busy_queue();
        let (id, entry) = queue.unacked.iter().next().map(|(id, entry)| (*id, entry.clone())).unwrap();
        queue.waiting.insert(id, entry);
        queue.check_invariants();
    }

    #[test]
    #[should_panic(expected = "the expiry index")]
    fn an_expiry_index_that_misses_an_entry_is_caught() {
        let mut queue = busy_queue();
        queue.expiry.pop_first();
        queue.check_invariants();
    }

    #[test]
    #[should_panic(expected = "not by its oldest entry")]
    fn a_key_held_by_the_wrong_entry_is_caught() {
        let mut queue = busy_queue();
        let ordering = queue.ordering.as_mut().unwrap();
        let blocked = ordering.blocked.get(&Arc::from("A")).unwrap().0[0];
        ordering.holders.insert(Arc::from("A"), blocked);
        queue.check_invariants();
    }
}
