//! Priority queues (`x-max-priority`, RabbitMQ's model): a queue's ready messages kept in one
//! [`ReadyList`] per priority level, the highest level delivered first and arrival order kept
//! within a level.
//!
//! The priority is folded into the entry id: `id = level << ID_LEVEL_SHIFT | arrival`, where
//! level 0 is the highest priority. So "the smallest id first" — the order every part of the
//! queue already uses (the ready list, the deliverable set of `x-ordered-by`, the waiting set of
//! retry backoff, the expiry index, drop-head) — is priority order, then arrival order, and none
//! of them needs to know about priorities. Per-key ordering still holds: the entries waiting
//! behind a key's holder are released in arrival order whatever their priorities. A requeued
//! entry keeps its id, so it goes back to its place in its own level. Each level is its own
//! [`ReadyList`] (rather than one list keyed by these ids) so that page-outs keep arriving at the
//! back of each level's packed list: one list would insert a high-priority page-out in the middle
//! of a long packed backlog, shifting it.
//!
//! As in RabbitMQ: a message without a priority has priority 0, one above the queue's maximum
//! counts as the maximum, and a queue declared without `x-max-priority` has a single level.

use crate::message::{Message, PagedBody};
use crate::queue::Entry;
use crate::ready::ReadyList;

/// Where the level sits in an entry id: below it, 2^48 arrivals per queue incarnation.
pub(crate) const ID_LEVEL_SHIFT: u32 = 48;
/// The arrival part of an entry id.
pub(crate) const ID_ARRIVAL_MASK: u64 = (1 << ID_LEVEL_SHIFT) - 1;

/// The entry id of the `arrival`-th message of a queue whose priorities go up to `max_priority`
/// (`None`: not a priority queue).
pub(crate) fn entry_id(max_priority: Option<u8>, message: &Message, arrival: u64) -> u64 {
    let level = match max_priority {
        Some(max) => u64::from(max - message.priority().min(max)),
        None => 0,
    };
    level << ID_LEVEL_SHIFT | (arrival & ID_ARRIVAL_MASK)
}

/// A queue's ready entries, by priority level, each level ordered by id.
#[derive(Debug)]
pub(crate) struct ReadyLevels {
    /// Level 0 is the highest priority.
    levels: Vec<ReadyList>,
}

impl ReadyLevels {
    /// The levels for priorities 0 to `max_priority` (one level without).
    pub(crate) fn new(max_priority: Option<u8>) -> Self {
        let count = max_priority.map_or(1, |max| usize::from(max) + 1);
        ReadyLevels { levels: (0..count).map(|_| ReadyList::default()).collect() }
    }

    fn level(&self, id: u64) -> usize {
        // Ids are made by `entry_id` for this queue, so the level is always in range; the clamp
        // only keeps a broken id from panicking.
        ((id >> ID_LEVEL_SHIFT) as usize).min(self.levels.len() - 1)
    }

    pub(crate) fn insert(&mut self, entry: Entry) {
        let level = self.level(entry.id);
        self.levels[level].insert(entry);
    }

    /// The next entry's id: the first of the highest level that has one.
    pub(crate) fn first_id(&self) -> Option<u64> {
        self.levels.iter().find_map(ReadyList::first_id)
    }

    pub(crate) fn contains(&self, id: u64) -> bool {
        self.levels[self.level(id)].contains(id)
    }

    pub(crate) fn len(&self) -> usize {
        self.levels.iter().map(ReadyList::len).sum()
    }

    pub(crate) fn get(&self, id: u64) -> Option<Entry> {
        self.levels[self.level(id)].get(id)
    }

    pub(crate) fn remove(&mut self, id: u64) -> Option<Entry> {
        let level = self.level(id);
        self.levels[level].remove(id)
    }

    pub(crate) fn page_out(&mut self, id: u64, paged: PagedBody, check: impl FnOnce(&Entry) -> bool) -> bool {
        let level = self.level(id);
        self.levels[level].page_out(id, paged, check)
    }

    /// Every id, ascending (so in delivery order).
    pub(crate) fn ids(&self) -> Vec<u64> {
        self.levels.iter().flat_map(ReadyList::ids).collect()
    }

    /// Every entry's id and delivery count, in no particular order.
    pub(crate) fn delivery_counts(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.levels.iter().flat_map(ReadyList::delivery_counts)
    }

    /// `take` entries from position `skip`, in delivery order.
    pub(crate) fn entries_page(&self, mut skip: usize, take: usize) -> Vec<Entry> {
        let mut page = Vec::new();
        for level in &self.levels {
            if page.len() >= take {
                break;
            }
            let length = level.len();
            if skip >= length {
                skip -= length;
                continue;
            }
            page.extend(level.entries_page(skip, take - page.len()));
            skip = 0;
        }
        page
    }

    /// Every entry, ascending by id.
    pub(crate) fn entries(&self) -> Vec<Entry> {
        self.levels.iter().flat_map(ReadyList::entries).collect()
    }

    /// Each level's own invariants, and every entry in the level its id names.
    pub(crate) fn check_invariants(&self, queue: &str) {
        for (level, list) in self.levels.iter().enumerate() {
            list.check_invariants(queue);
            if let Some(id) = list.ids().into_iter().find(|id| (id >> ID_LEVEL_SHIFT) as usize != level) {
                panic!("invariant broken in queue '{queue}': ready entry {id} is in priority level {level}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::Arc;
    use wharf_wire::protocol::BasicProperties;

    fn message(priority: Option<u8>) -> Message {
        let mut properties = BasicProperties::default();
        if let Some(priority) = priority {
            properties = properties.with_priority(priority);
        }
        let raw = wharf_wire::frame::encode_properties(&properties);
        Message::new(String::new(), "q".into(), Arc::new(properties), raw, Bytes::from_static(b"x"))
    }

    #[test]
    fn ids_order_by_priority_then_arrival() {
        let max = Some(5);
        let low = entry_id(max, &message(None), 1);
        let high = entry_id(max, &message(Some(5)), 2);
        let middle = entry_id(max, &message(Some(2)), 3);
        let above_max = entry_id(max, &message(Some(200)), 4);
        assert!(high < above_max, "above the maximum counts as the maximum, behind earlier ones");
        assert!(above_max < middle && middle < low);
        assert_eq!(entry_id(None, &message(Some(9)), 7), 7, "no levels without x-max-priority");
        assert_eq!(entry_id(Some(0), &message(Some(9)), 7), 7, "x-max-priority 0 has one level");
    }
}
