//! [`ReadyList`]: a queue's ready messages in arrival order, with the paged-out ones packed small.
//!
//! A backlog of a million persistent messages is mostly paged out: its bodies are on disk only.
//! Kept as ordinary entries (a `BTreeMap` node slot, an `Arc<Message>` shell, its routing key and
//! raw properties as separate allocations), each of them still cost ~500 bytes of memory. So a
//! paged entry that holds no ordering key is kept instead as one flat [`PackedEntry`] (~100
//! bytes: its place, where its record is, its counters and one allocation holding its exchange,
//! routing key and raw properties) in a `VecDeque` sorted by id. It becomes an ordinary
//! [`Entry`] again, with the same paged-out stand-in message it had, when it is taken out.
//!
//! The ready messages are the union of the map and the packed list; both are ordered by id and
//! ids are unique across them, so the first ready message is the smaller of their two fronts.
//! Page-outs arrive in id order (a queue's appends complete in order), so a packed entry is
//! almost always pushed at the back; a requeued one goes back to its place near the front.
//! Taking an entry from the middle (a per-message TTL that expires out of order, a delivery
//! limit after recovery) leaves a tombstone rather than shifting up to a million entries under
//! the model lock; tombstones are swept out once they are half the list, and never stay at the
//! front.

use crate::message::{Message, PagedBody};
use crate::queue::Entry;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// Longest exchange name or routing key packed (one length byte each); anything longer stays an
/// ordinary entry.
const PACKED_NAME_BYTES_MAX: usize = u8::MAX as usize;

/// A packed entry's `expires_at_ms` when it does not expire.
const NEVER: u64 = u64::MAX;

/// A paged-out ready entry without an ordering key, packed flat.
#[derive(Debug, Clone)]
struct PackedEntry {
    id: u64,
    store_seq: u64,
    paged: PagedBody,
    enqueued_ms: u64,
    /// When it expires; [`NEVER`] if it does not (a sentinel rather than an `Option`, which
    /// would take 8 bytes more of every packed entry).
    expires_at_ms: u64,
    delivery_count: u32,
    redelivered: bool,
    /// `store_seq` is in the queue's transient log.
    transient_record: bool,
    /// Taken out of the list (a tombstone, skipped by every reader).
    removed: bool,
    /// `[exchange length][exchange][routing key length][routing key][raw properties]`.
    envelope: Box<[u8]>,
    /// The message's provenance and the entry's own trace (`trace.rs`), if any.
    provenance: Option<Arc<crate::trace::Provenance>>,
    trace: Option<Box<crate::trace::TraceLog>>,
}

impl PackedEntry {
    /// Packs `entry` if it is paged out, has no ordering key and its names fit.
    fn pack(entry: &Entry) -> Option<PackedEntry> {
        let message = &entry.message;
        let paged = message.paged()?;
        if entry.order_key.is_some()
            // An expiry at the sentinel itself stays whole, so it comes back exactly as it went.
            || entry.expires_at_ms == Some(NEVER)
            || message.exchange.len() > PACKED_NAME_BYTES_MAX
            || message.routing_key.len() > PACKED_NAME_BYTES_MAX
        {
            return None;
        }
        Some(PackedEntry {
            id: entry.id,
            store_seq: entry.store_seq?,
            paged,
            enqueued_ms: entry.enqueued_ms,
            expires_at_ms: entry.expires_at_ms.unwrap_or(NEVER),
            delivery_count: entry.delivery_count,
            redelivered: entry.redelivered,
            transient_record: entry.transient_record,
            removed: false,
            envelope: envelope(message),
            provenance: message.trace.clone(),
            trace: entry.trace.clone(),
        })
    }

    /// The ordinary entry again, with the paged-out stand-in it was packed from.
    fn unpack(&self) -> Entry {
        let exchange_end = 1 + usize::from(self.envelope[0]);
        let routing_key_end = exchange_end + 1 + usize::from(self.envelope[exchange_end]);
        let message = Message::paged_from_parts(
            String::from_utf8_lossy(&self.envelope[1..exchange_end]).into_owned(),
            String::from_utf8_lossy(&self.envelope[exchange_end + 1..routing_key_end]).into_owned(),
            bytes::Bytes::copy_from_slice(&self.envelope[routing_key_end..]),
            self.paged,
            self.provenance.clone(),
        );
        Entry {
            id: self.id,
            message: Arc::new(message),
            store_seq: Some(self.store_seq),
            transient_record: self.transient_record,
            redelivered: self.redelivered,
            delivery_count: self.delivery_count,
            enqueued_ms: self.enqueued_ms,
            expires_at_ms: (self.expires_at_ms != NEVER).then_some(self.expires_at_ms),
            order_key: None,
            trace: self.trace.clone(),
        }
    }
}

/// Exchange, routing key and raw properties in one allocation (the names fit one length byte).
fn envelope(message: &Message) -> Box<[u8]> {
    let mut packed =
        Vec::with_capacity(2 + message.exchange.len() + message.routing_key.len() + message.raw_properties.len());
    packed.push(message.exchange.len() as u8);
    packed.extend_from_slice(message.exchange.as_bytes());
    packed.push(message.routing_key.len() as u8);
    packed.extend_from_slice(message.routing_key.as_bytes());
    packed.extend_from_slice(&message.raw_properties);
    packed.into_boxed_slice()
}

/// A queue's ready entries, ordered by id.
#[derive(Debug, Default)]
pub(crate) struct ReadyList {
    /// Entries kept whole: those in memory, and paged ones that cannot be packed.
    whole: BTreeMap<u64, Entry>,
    /// Packed paged-out entries, ascending by id (tombstones included; never one at the front).
    packed: VecDeque<PackedEntry>,
    /// Tombstones in `packed`.
    tombstones: usize,
}

impl ReadyList {
    /// Adds an entry (packed if it is paged out and can be).
    pub(crate) fn insert(&mut self, entry: Entry) {
        match PackedEntry::pack(&entry) {
            Some(packed) => self.insert_packed(packed),
            None => {
                self.whole.insert(entry.id, entry);
            }
        }
    }

    fn insert_packed(&mut self, packed: PackedEntry) {
        if self.packed.back().is_none_or(|last| last.id < packed.id) {
            self.packed.push_back(packed);
            return;
        }
        let at = self.packed.partition_point(|other| other.id < packed.id);
        match self.packed.get_mut(at) {
            // The entry comes back to where it was taken from: its tombstone is still there.
            Some(tombstone) if tombstone.id == packed.id => {
                *tombstone = packed;
                self.tombstones -= 1;
            }
            _ => self.packed.insert(at, packed),
        }
    }

    /// Where `id` is in the packed list, if it is there (and not a tombstone).
    fn packed_index(&self, id: u64) -> Option<usize> {
        let index = if self.packed.front().is_some_and(|first| first.id == id) {
            0
        } else {
            self.packed.binary_search_by_key(&id, |packed| packed.id).ok()?
        };
        (!self.packed[index].removed).then_some(index)
    }

    /// Takes the packed entry at `index` out: the front and the back are popped, anything else
    /// becomes a tombstone.
    fn take_packed(&mut self, index: usize) -> Option<Entry> {
        let entry = if index == 0 {
            let entry = self.packed.pop_front()?.unpack();
            while self.packed.front().is_some_and(|first| first.removed) {
                self.packed.pop_front();
                self.tombstones -= 1;
            }
            entry
        } else if index + 1 == self.packed.len() {
            self.packed.pop_back()?.unpack()
        } else {
            let packed = self.packed.get_mut(index)?;
            packed.removed = true;
            self.tombstones += 1;
            packed.unpack()
        };
        if self.tombstones * 2 > self.packed.len() {
            self.packed.retain(|packed| !packed.removed);
            self.tombstones = 0;
        }
        Some(entry)
    }

    /// The packed entries that are in the list (not tombstones).
    fn live_packed(&self) -> impl Iterator<Item = &PackedEntry> {
        self.packed.iter().filter(|packed| !packed.removed)
    }

    /// The first (oldest) ready entry's id.
    pub(crate) fn first_id(&self) -> Option<u64> {
        let whole = self.whole.keys().next().copied();
        let packed = self.packed.front().map(|packed| packed.id);
        match (whole, packed) {
            (Some(whole), Some(packed)) => Some(whole.min(packed)),
            (whole, packed) => whole.or(packed),
        }
    }

    pub(crate) fn contains(&self, id: u64) -> bool {
        self.whole.contains_key(&id) || self.packed_index(id).is_some()
    }

    pub(crate) fn len(&self) -> usize {
        self.whole.len() + self.packed.len() - self.tombstones
    }

    /// A copy of an entry (unpacked), left in place.
    pub(crate) fn get(&self, id: u64) -> Option<Entry> {
        if let Some(entry) = self.whole.get(&id) {
            return Some(entry.clone());
        }
        self.packed_index(id).map(|index| self.packed[index].unpack())
    }

    /// Takes an entry out (unpacked).
    pub(crate) fn remove(&mut self, id: u64) -> Option<Entry> {
        if let Some(entry) = self.whole.remove(&id) {
            return Some(entry);
        }
        let index = self.packed_index(id)?;
        self.take_packed(index)
    }

    /// Replaces a whole entry's message with its paged-out stand-in, packing the entry if it can
    /// be. `check` decides whether this entry may be paged out; returns whether it was.
    pub(crate) fn page_out(&mut self, id: u64, paged: PagedBody, check: impl FnOnce(&Entry) -> bool) -> bool {
        let Some(entry) = self.whole.get_mut(&id) else { return false };
        if !check(entry) {
            return false;
        }
        entry.message = Arc::new(entry.message.paged_out(paged));
        if let Some(packed) = PackedEntry::pack(entry) {
            self.whole.remove(&id);
            self.insert_packed(packed);
        }
        true
    }

    /// Every id, ascending.
    pub(crate) fn ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.whole.keys().copied().chain(self.live_packed().map(|packed| packed.id)).collect();
        ids.sort_unstable();
        ids
    }

    /// Every entry's id and delivery count, in no particular order.
    pub(crate) fn delivery_counts(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.whole
            .values()
            .map(|entry| (entry.id, entry.delivery_count))
            .chain(self.live_packed().map(|packed| (packed.id, packed.delivery_count)))
    }

    /// `take` entries from position `skip` (ascending by id), unpacking only those: a page of a
    /// long backlog costs a walk to its start, not a copy of the backlog.
    pub(crate) fn entries_page(&self, skip: usize, take: usize) -> Vec<Entry> {
        let mut whole = self.whole.values().peekable();
        let mut packed = self.live_packed().peekable();
        let mut page = Vec::with_capacity(take.min(self.len()));
        let mut position = 0;
        while page.len() < take {
            let whole_first = match (whole.peek(), packed.peek()) {
                (Some(entry), Some(next)) => entry.id < next.id,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let wanted = position >= skip;
            if whole_first {
                if let Some(entry) = whole.next().filter(|_| wanted) {
                    page.push(entry.clone());
                }
            } else if let Some(next) = packed.next().filter(|_| wanted) {
                page.push(next.unpack());
            }
            position += 1;
        }
        page
    }

    /// Every entry (packed ones unpacked), ascending by id.
    pub(crate) fn entries(&self) -> Vec<Entry> {
        let mut entries: Vec<Entry> =
            self.whole.values().cloned().chain(self.live_packed().map(PackedEntry::unpack)).collect();
        entries.sort_unstable_by_key(|entry| entry.id);
        entries
    }

    /// Panics, naming the broken invariant, unless the list is as the module doc describes: each
    /// whole entry filed under its own id, the packed list ascending by id with no tombstone at
    /// its front, its tombstone count right and at most half of it, and no id both whole and
    /// packed. Part of [`crate::queue::Queue::check_invariants`].
    pub(crate) fn check_invariants(&self, queue: &str) {
        for (id, entry) in &self.whole {
            assert_eq!(
                *id, entry.id,
                "invariant broken in queue '{queue}': ready entry {} filed under id {id}",
                entry.id
            );
        }
        let ascending = self.packed.iter().zip(self.packed.iter().skip(1)).all(|(first, next)| first.id < next.id);
        assert!(ascending, "invariant broken in queue '{queue}': packed ready entries are not in ascending id order");
        assert!(
            self.packed.front().is_none_or(|first| !first.removed),
            "invariant broken in queue '{queue}': a tombstone is at the front of the packed ready entries"
        );
        let tombstones = self.packed.iter().filter(|packed| packed.removed).count();
        assert_eq!(
            tombstones, self.tombstones,
            "invariant broken in queue '{queue}': the packed list holds {tombstones} tombstones but counts {}",
            self.tombstones
        );
        assert!(
            tombstones * 2 <= self.packed.len(),
            "invariant broken in queue '{queue}': {tombstones} of {} packed ready entries are tombstones (not swept)",
            self.packed.len()
        );
        if let Some(twice) = self.live_packed().find(|packed| self.whole.contains_key(&packed.id)) {
            panic!("invariant broken in queue '{queue}': ready entry {} is both whole and packed", twice.id);
        }
    }

    /// How many entries are packed (for tests of the representation).
    #[cfg(test)]
    fn packed_len(&self) -> usize {
        self.packed.len() - self.tombstones
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entry(id: u64, paged: bool) -> Entry {
        let message = Message::new(
            "orders".to_owned(),
            format!("order.{id}"),
            Arc::new(wharf_wire::protocol::BasicProperties::default()),
            Bytes::from_static(&[0x10, 0x00, 0x02]),
            Bytes::from(vec![7u8; 10]),
        );
        let message = if paged {
            message.into_paged_out(PagedBody {
                store_log: 3,
                segment_id: id / 4,
                offset: id * 64,
                record_bytes: 64,
                body_bytes: 10,
            })
        } else {
            message
        };
        Entry {
            id,
            message: Arc::new(message),
            store_seq: Some(id + 100),
            transient_record: id.is_multiple_of(3),
            redelivered: id.is_multiple_of(2),
            delivery_count: (id % 3) as u32,
            enqueued_ms: 1_000 + id,
            expires_at_ms: id.is_multiple_of(5).then_some(9_000 + id),
            order_key: None,
            trace: id.is_multiple_of(4).then(|| {
                let event = crate::trace::TraceEvent {
                    at_ms: id,
                    queue: None,
                    kind: crate::trace::TraceKind::Requeued(crate::trace::RequeueCause::Reject),
                };
                Box::new(crate::trace::TraceLog { events: vec![event], dropped: 0 })
            }),
        }
    }

    fn same(left: &Entry, right: &Entry) -> bool {
        left.id == right.id
            && left.message == right.message
            && left.store_seq == right.store_seq
            && left.transient_record == right.transient_record
            && left.redelivered == right.redelivered
            && left.delivery_count == right.delivery_count
            && left.enqueued_ms == right.enqueued_ms
            && left.expires_at_ms == right.expires_at_ms
            && left.order_key == right.order_key
            && left.trace == right.trace
    }

    #[test]
    fn a_packed_entry_stays_small() {
        // What the module doc and the paging design note promise (one allocation aside).
        assert!(std::mem::size_of::<PackedEntry>() <= 112, "{} bytes", std::mem::size_of::<PackedEntry>());
    }

    #[test]
    fn a_packed_entry_comes_back_as_it_went_in() {
        let mut ready = ReadyList::default();
        for id in 1..=20 {
            ready.insert(entry(id, id % 4 != 0));
        }
        assert_eq!(ready.packed_len(), 15);
        assert_eq!(ready.len(), 20);
        for id in 1..=20 {
            let taken = ready.remove(id).expect("present");
            assert!(same(&taken, &entry(id, id % 4 != 0)), "entry {id} changed: {taken:?}");
        }
        assert_eq!(ready.len(), 0);
        assert_eq!(ready.first_id(), None);
    }

    #[test]
    fn order_is_by_id_across_whole_and_packed_entries() {
        let mut ready = ReadyList::default();
        for id in [5, 9, 2, 7, 1, 8] {
            ready.insert(entry(id, id % 2 == 1));
        }
        // A requeued packed entry goes back to its place, not to the end.
        ready.insert(entry(3, true));
        assert_eq!(ready.ids(), vec![1, 2, 3, 5, 7, 8, 9]);
        let mut order = Vec::new();
        while let Some(id) = ready.first_id() {
            assert!(ready.contains(id));
            ready.remove(id);
            assert!(!ready.contains(id));
            order.push(id);
        }
        assert_eq!(order, vec![1, 2, 3, 5, 7, 8, 9]);
    }

    #[test]
    fn taking_from_the_middle_leaves_tombstones_that_readers_skip_and_requeues_revive() {
        let mut ready = ReadyList::default();
        for id in 1..=10 {
            ready.insert(entry(id, true));
        }
        for id in [4, 5, 7] {
            assert!(same(&ready.remove(id).expect("present"), &entry(id, true)));
            assert!(!ready.contains(id));
            assert!(ready.remove(id).is_none(), "a tombstone is not taken twice");
        }
        assert_eq!(ready.len(), 7);
        assert_eq!(ready.ids(), vec![1, 2, 3, 6, 8, 9, 10]);
        assert_eq!(ready.delivery_counts().count(), 7);
        assert_eq!(ready.entries().iter().map(|entry| entry.id).collect::<Vec<_>>(), vec![1, 2, 3, 6, 8, 9, 10]);
        // A requeue brings an entry back in its tombstone's place.
        ready.insert(entry(5, true));
        assert_eq!(ready.ids(), vec![1, 2, 3, 5, 6, 8, 9, 10]);
        // Draining from the front never stops at a tombstone, and the count stays right.
        let mut order = Vec::new();
        while let Some(id) = ready.first_id() {
            assert!(same(&ready.remove(id).expect("present"), &entry(id, true)));
            order.push(id);
            assert_eq!(ready.len(), 8 - order.len());
        }
        assert_eq!(order, vec![1, 2, 3, 5, 6, 8, 9, 10]);
        assert_eq!(ready.tombstones, 0);
        assert!(ready.packed.is_empty());
    }

    #[test]
    fn tombstones_are_swept_once_they_are_half_the_list() {
        let mut ready = ReadyList::default();
        for id in 1..=100 {
            ready.insert(entry(id, true));
        }
        for id in 2..100 {
            assert!(ready.remove(id).is_some());
            assert!(ready.tombstones * 2 <= ready.packed.len());
        }
        assert_eq!(ready.len(), 2);
        assert!(ready.packed.len() < 100, "swept at least once");
        assert_eq!(ready.ids(), vec![1, 100]);
    }

    #[test]
    fn paging_out_packs_a_whole_entry_unless_it_holds_a_key_or_a_long_name() {
        let mut ready = ReadyList::default();
        let location = PagedBody { store_log: 3, segment_id: 0, offset: 0, record_bytes: 64, body_bytes: 10 };
        ready.insert(entry(1, false));
        let mut keyed = entry(2, false);
        keyed.order_key = Some(Arc::from("customer-1"));
        ready.insert(keyed);
        let mut long = entry(3, false);
        Arc::make_mut(&mut long.message).routing_key = "k".repeat(300);
        ready.insert(long);

        assert!(!ready.page_out(1, location, |_| false), "the check refuses");
        for id in 1..=3 {
            assert!(ready.page_out(id, location, |_| true));
        }
        assert!(!ready.page_out(4, location, |_| true), "no such entry");
        assert_eq!(ready.packed_len(), 1);
        let mut counts: Vec<(u64, u32)> = ready.delivery_counts().collect();
        counts.sort_unstable();
        assert_eq!(counts, vec![(1, 1), (2, 2), (3, 0)]);
        assert_eq!(ready.entries().len(), 3);
        for id in 1..=3 {
            let taken = ready.remove(id).expect("present");
            assert_eq!(taken.message.paged(), Some(location));
            assert!(taken.message.bytes_in_memory().is_none());
        }
        assert_eq!(ready.delivery_counts().count(), 0);
    }
}
