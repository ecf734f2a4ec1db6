//! [`Queue`]: one queue's definition, settings and messages, plus the consumers attached to it in
//! round-robin order.
//!
//! A message is in exactly one of three places: `ready` (ordered by arrival, so a requeued message
//! goes back to its original place), `waiting` (requeued by its consumer and held for the
//! `x-retry-backoff` step) or `unacked`. With `x-ordered-by`, only the oldest message of each key
//! (its *holder*) can be delivered; the others wait in `ready` behind it until the holder leaves
//! the queue for good, so one key's messages go out one at a time, in publish order, whatever
//! happens to the holder (redelivery, backoff, lease expiry).

use crate::dedup::DedupIndex;
use crate::message::Message;
use crate::ready::ReadyList;
use crate::settings::QueueSettings;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use wharf_wire::types::FieldTable;

/// Identifies a connection within the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(pub u64);

/// Identifies a channel: its connection and number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelKey {
    /// The connection.
    pub connection: ConnectionId,
    /// The channel number.
    pub channel: u16,
}

/// A message in a queue.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Position in the queue (increasing in arrival order).
    pub id: u64,
    /// The message.
    pub message: Arc<Message>,
    /// Where the store keeps it (persistent messages in durable queues), for removal.
    pub store_seq: Option<u64>,
    /// Delivered before and not acknowledged.
    pub redelivered: bool,
    /// How many times it was delivered.
    pub delivery_count: u32,
    /// When it entered the queue (ms since the epoch).
    pub enqueued_ms: u64,
    /// When it expires (`x-message-ttl` or its `expiration`), if ever.
    pub expires_at_ms: Option<u64>,
    /// Its `x-ordered-by` key.
    pub order_key: Option<Arc<str>>,
}

/// Per-key ordering state (`x-ordered-by`).
#[derive(Debug, Default)]
pub(crate) struct Ordering {
    /// Ready entries that may be delivered: unkeyed ones and ready key holders.
    deliverable: BTreeSet<u64>,
    /// The entry holding each key (ready, waiting or unacknowledged).
    holders: HashMap<Arc<str>, u64>,
    /// Entries waiting behind each key's holder, oldest first, with how many of those ids
    /// belong to entries that left the queue meanwhile (skipped when the next holder is chosen,
    /// and swept out once they are half the list, so a key whose holder hangs cannot make the
    /// list outgrow the queue).
    blocked: HashMap<Arc<str>, (VecDeque<u64>, usize)>,
}

/// A queue.
#[derive(Debug)]
pub struct Queue {
    /// Its name.
    pub name: String,
    /// Survives a restart (with its persistent messages).
    pub durable: bool,
    /// The connection it belongs to, for exclusive queues.
    pub exclusive_owner: Option<ConnectionId>,
    /// Deleted when its last consumer goes (once it has had one).
    pub auto_delete: bool,
    /// Declared arguments.
    pub arguments: FieldTable,
    /// Effective settings (arguments merged with the policy).
    pub settings: QueueSettings,
    /// The store's id for this queue's log, once the runtime created it.
    pub store_queue: Option<u64>,
    /// The store's id for this queue's de-duplication key log, if it de-duplicates.
    pub dedup_store_queue: Option<u64>,
    pub(crate) ready: ReadyList,
    pub(crate) waiting: BTreeMap<u64, Entry>,
    pub(crate) unacked: foldhash::HashMap<u64, Entry>,
    /// Body bytes of ready and waiting messages.
    pub(crate) held_bytes: u64,
    /// The part of `held_bytes` whose bodies are in memory (not paged out to the store).
    pub(crate) resident_bytes: u64,
    /// (expiry, id) of ready messages that expire.
    pub(crate) expiry: BTreeSet<(u64, u64)>,
    /// The earliest expiry a timer is set for.
    pub(crate) expiry_timer_ms: Option<u64>,
    /// When the `x-expires` timer is set for, if one is.
    pub(crate) expires_timer_ms: Option<u64>,
    /// Distinguishes this queue from earlier ones of the same name (for its timers).
    pub(crate) incarnation: u64,
    pub(crate) ordering: Option<Ordering>,
    pub(crate) dedup: Option<DedupIndex>,
    /// Last time it was used (declared, consumed from, read with `basic.get`), for `x-expires`.
    pub(crate) last_used_ms: u64,
    pub(crate) next_id: u64,
    /// Consumers in round-robin order (with single active consumer, the first is the active one).
    pub(crate) consumers: Vec<(ChannelKey, String)>,
    pub(crate) next_consumer: usize,
    pub(crate) had_consumer: bool,
    /// The consumer holding exclusive access, if any.
    pub(crate) exclusive_consumer: Option<(ChannelKey, String)>,
}

impl Queue {
    /// A new, empty queue.
    pub fn new(
        name: String,
        durable: bool,
        exclusive_owner: Option<ConnectionId>,
        auto_delete: bool,
        arguments: FieldTable,
        settings: QueueSettings,
    ) -> Self {
        let ordering = settings.ordered_by.as_ref().map(|_| Ordering::default());
        let dedup = settings.deduplication.as_ref().map(|dedup| DedupIndex::new(dedup.clone()));
        Queue {
            name,
            durable,
            exclusive_owner,
            auto_delete,
            arguments,
            settings,
            store_queue: None,
            dedup_store_queue: None,
            ready: ReadyList::default(),
            waiting: BTreeMap::new(),
            unacked: foldhash::HashMap::default(),
            held_bytes: 0,
            resident_bytes: 0,
            expiry: BTreeSet::new(),
            expiry_timer_ms: None,
            expires_timer_ms: None,
            incarnation: 0,
            ordering,
            dedup,
            last_used_ms: 0,
            next_id: 1,
            consumers: Vec::new(),
            next_consumer: 0,
            had_consumer: false,
            exclusive_consumer: None,
        }
    }

    /// Builds an entry for a message arriving now (or recovered, with the time it was stored).
    pub(crate) fn new_entry(
        &mut self,
        message: Arc<Message>,
        store_seq: Option<u64>,
        enqueued_ms: u64,
        delivery_count: u32,
        redelivered: bool,
    ) -> Entry {
        let (ttl_ms, order_key) = self.ttl_and_key(&message);
        self.entry_with(message, ttl_ms, order_key, store_seq, enqueued_ms, delivery_count, redelivered)
    }

    /// A message's TTL here (the queue's or its own, whichever is shorter) and its ordering key.
    fn ttl_and_key(&self, message: &Message) -> (Option<u64>, Option<Arc<str>>) {
        let ttl_ms = match (self.settings.message_ttl_ms, message.expiration_ms()) {
            (Some(queue), Some(message)) => Some(queue.min(message)),
            (queue, message) => queue.or(message),
        };
        let order_key =
            self.settings.ordered_by.as_deref().and_then(|header| message.header_text(header)).map(Arc::from);
        (ttl_ms, order_key)
    }

    #[allow(clippy::too_many_arguments)]
    fn entry_with(
        &mut self,
        message: Arc<Message>,
        ttl_ms: Option<u64>,
        order_key: Option<Arc<str>>,
        store_seq: Option<u64>,
        enqueued_ms: u64,
        delivery_count: u32,
        redelivered: bool,
    ) -> Entry {
        let id = self.next_id;
        self.next_id += 1;
        Entry {
            id,
            message,
            store_seq,
            redelivered: redelivered || delivery_count > 0,
            delivery_count,
            enqueued_ms,
            expires_at_ms: ttl_ms.map(|ttl| enqueued_ms.saturating_add(ttl)),
            order_key,
        }
    }

    /// Adds a new entry at the tail (behind its key's holder, with `x-ordered-by`).
    pub(crate) fn insert_new(&mut self, entry: Entry) {
        let id = entry.id;
        if let (Some(ordering), Some(key)) = (self.ordering.as_mut(), entry.order_key.as_ref()) {
            if ordering.holders.contains_key(key) {
                ordering.blocked.entry(Arc::clone(key)).or_default().0.push_back(id);
                self.insert_ready(entry, false);
                return;
            }
            ordering.holders.insert(Arc::clone(key), id);
        }
        self.insert_ready(entry, true);
    }

    /// Counts an entry that became ready or waiting.
    fn hold(&mut self, entry: &Entry) {
        self.held_bytes += entry.message.body_bytes();
        if entry.message.paged.is_none() {
            self.resident_bytes += entry.message.body_bytes();
        }
    }

    /// Stops counting an entry that is no longer ready or waiting.
    fn unhold(&mut self, entry: &Entry) {
        self.held_bytes = self.held_bytes.saturating_sub(entry.message.body_bytes());
        if entry.message.paged.is_none() {
            self.resident_bytes = self.resident_bytes.saturating_sub(entry.message.body_bytes());
        }
    }

    fn insert_ready(&mut self, entry: Entry, deliverable: bool) {
        self.hold(&entry);
        if let Some(at) = entry.expires_at_ms {
            self.expiry.insert((at, entry.id));
        }
        if deliverable && let Some(ordering) = self.ordering.as_mut() {
            ordering.deliverable.insert(entry.id);
        }
        self.ready.insert(entry);
    }

    /// Puts an entry that holds its key (or has none) back among the ready ones, in its place.
    pub(crate) fn return_ready(&mut self, entry: Entry) {
        self.insert_ready(entry, true);
    }

    /// The ready message to deliver next, if any.
    pub(crate) fn next_deliverable(&self) -> Option<u64> {
        match &self.ordering {
            Some(ordering) => ordering.deliverable.first().copied(),
            None => self.ready.first_id(),
        }
    }

    /// True if a ready entry may be delivered now (it holds its key, or has none).
    pub(crate) fn is_deliverable(&self, id: u64) -> bool {
        match &self.ordering {
            Some(ordering) => ordering.deliverable.contains(&id),
            None => self.ready.contains(id),
        }
    }

    /// Takes a ready entry out for delivery (it keeps holding its key).
    pub(crate) fn take_ready(&mut self, id: u64) -> Option<Entry> {
        let entry = self.ready.remove(id)?;
        self.unhold(&entry);
        if let Some(at) = entry.expires_at_ms {
            self.expiry.remove(&(at, id));
        }
        if let Some(ordering) = self.ordering.as_mut() {
            ordering.deliverable.remove(&id);
        }
        Some(entry)
    }

    /// Takes a ready entry out of the queue for good (expired, dropped, purged).
    pub(crate) fn remove_ready(&mut self, id: u64) -> Option<Entry> {
        let entry = self.take_ready(id)?;
        self.release_key(&entry);
        Some(entry)
    }

    /// Takes an unacknowledged entry out of the queue for good (acked, rejected, dead-lettered).
    pub(crate) fn remove_unacked(&mut self, id: u64) -> Option<Entry> {
        let entry = self.unacked.remove(&id)?;
        self.release_key(&entry);
        Some(entry)
    }

    /// Moves an unacknowledged entry to `waiting` (retry backoff); it keeps holding its key.
    pub(crate) fn hold_for_backoff(&mut self, entry: Entry) {
        self.hold(&entry);
        self.waiting.insert(entry.id, entry);
    }

    /// Ends an entry's backoff: back among the ready ones, in its place.
    pub(crate) fn wake(&mut self, id: u64) -> bool {
        let Some(entry) = self.waiting.remove(&id) else { return false };
        self.unhold(&entry);
        self.return_ready(entry);
        true
    }

    /// An entry left for good: the next entry of its key (if any) becomes deliverable.
    pub(crate) fn release_key(&mut self, entry: &Entry) {
        let (Some(ordering), Some(key)) = (self.ordering.as_mut(), entry.order_key.as_ref()) else { return };
        if ordering.holders.get(key) != Some(&entry.id) {
            // One of the entries waiting behind the holder left (expired, dropped, purged).
            if let Some((blocked, stale)) = ordering.blocked.get_mut(key) {
                *stale += 1;
                if *stale * 2 > blocked.len() {
                    blocked.retain(|id| self.ready.contains(*id) && *id != entry.id);
                    *stale = 0;
                }
            }
            return;
        }
        ordering.holders.remove(key);
        let Some((blocked, stale)) = ordering.blocked.get_mut(key) else { return };
        while let Some(next) = blocked.pop_front() {
            if self.ready.contains(next) {
                ordering.holders.insert(Arc::clone(key), next);
                ordering.deliverable.insert(next);
                break;
            }
            *stale = stale.saturating_sub(1);
        }
        if blocked.is_empty() {
            ordering.blocked.remove(key);
        }
    }

    /// Adds a message found by recovery, with its delivery count and the time it was stored.
    /// `redelivered` marks a message that may have been delivered before (after an unclean stop
    /// the runtime marks all of them).
    pub fn enqueue_recovered(
        &mut self,
        message: Arc<Message>,
        store_seq: Option<u64>,
        stored_ms: u64,
        delivery_count: u32,
        redelivered: bool,
    ) -> u64 {
        let entry = self.new_entry(message, store_seq, stored_ms, delivery_count, redelivered);
        let id = entry.id;
        self.insert_new(entry);
        id
    }

    /// Like [`Queue::enqueue_recovered`] for a message whose body stays on disk: `whole` (its
    /// parsed properties, no body) gives its TTL and ordering key; the queue keeps only the
    /// paged-out stand-in. Counted as held, not resident. Returns the entry id.
    pub fn enqueue_recovered_paged(
        &mut self,
        whole: Message,
        paged: crate::message::PagedBody,
        store_seq: u64,
        stored_ms: u64,
        delivery_count: u32,
        redelivered: bool,
    ) -> u64 {
        let (ttl_ms, order_key) = self.ttl_and_key(&whole);
        let stand_in = Arc::new(whole.into_paged_out(paged));
        let entry =
            self.entry_with(stand_in, ttl_ms, order_key, Some(store_seq), stored_ms, delivery_count, redelivered);
        let id = entry.id;
        self.insert_new(entry);
        id
    }

    /// Remembers a de-duplication key found by recovery (seen at `seen_ms`).
    pub fn restore_dedup_key(&mut self, key: &[u8], seen_ms: u64) {
        if let Some(dedup) = self.dedup.as_mut() {
            dedup.restore(key, seen_ms);
        }
    }

    /// Messages ready for delivery (including those waiting out a retry backoff or queued behind
    /// their key): what `queue.declare-ok` reports.
    pub fn ready_count(&self) -> usize {
        self.ready.len() + self.waiting.len()
    }

    /// Messages delivered and not yet acknowledged.
    pub fn unacked_count(&self) -> usize {
        self.unacked.len()
    }

    /// Body bytes of ready and waiting messages held in memory (not paged out).
    pub fn resident_bytes(&self) -> u64 {
        self.resident_bytes
    }

    /// The id the next message enqueued will get.
    pub fn next_entry_id(&self) -> u64 {
        self.next_id
    }

    /// Drops a ready or waiting entry's body from memory (the store holds it; `paged` says
    /// where). Only the entry `id` that is stored under `store_seq` in this queue's own log is
    /// touched, so a request about an entry that left meanwhile, or about an entry of an earlier
    /// queue of the same name (whose ids and seqs also started at 1), does nothing. Returns true
    /// if the body was dropped.
    pub fn page_out(&mut self, id: u64, store_seq: u64, paged: crate::message::PagedBody) -> bool {
        if self.store_queue != Some(paged.store_queue) {
            return false;
        }
        let pageable = |entry: &Entry| {
            entry.store_seq == Some(store_seq)
                && paged.body_bytes == entry.message.body_bytes()
                && entry.message.paged.is_none()
        };
        let paged_out = self.ready.page_out(id, paged, pageable)
            || match self.waiting.get_mut(&id) {
                Some(entry) if pageable(entry) => {
                    entry.message = Arc::new(entry.message.paged_out(paged));
                    true
                }
                _ => false,
            };
        if paged_out {
            self.resident_bytes = self.resident_bytes.saturating_sub(paged.body_bytes);
        }
        paged_out
    }

    /// Consumers attached.
    pub fn consumer_count(&self) -> usize {
        self.consumers.len()
    }

    /// True if one more message of `body_bytes` would go over `x-max-length` or
    /// `x-max-length-bytes`.
    pub(crate) fn would_overflow(&self, body_bytes: u64) -> bool {
        self.settings.max_length.is_some_and(|max| self.ready_count() as u64 >= max)
            || self.settings.max_length_bytes.is_some_and(|max| self.held_bytes + body_bytes > max)
    }

    /// True if the queue holds more than its length limits allow.
    pub(crate) fn over_limits(&self) -> bool {
        self.settings.max_length.is_some_and(|max| self.ready_count() as u64 > max)
            || self.settings.max_length_bytes.is_some_and(|max| self.held_bytes > max)
    }

    /// The oldest ready message (for `drop-head`).
    pub(crate) fn oldest_ready(&self) -> Option<u64> {
        self.ready.first_id()
    }

    /// Removes every ready and waiting message (purge); returns them.
    pub(crate) fn take_ready_all(&mut self) -> Vec<Entry> {
        let ids = self.ready.ids();
        let mut taken: Vec<Entry> = ids.into_iter().filter_map(|id| self.remove_ready(id)).collect();
        let waiting = std::mem::take(&mut self.waiting);
        for entry in waiting.into_values() {
            self.unhold(&entry);
            self.release_key(&entry);
            taken.push(entry);
        }
        taken
    }

    /// Removes every message, ready, waiting and unacknowledged (delete); returns them.
    pub(crate) fn take_all(&mut self) -> Vec<Entry> {
        let mut all = self.take_ready_all();
        all.extend(self.unacked.drain().map(|(_, entry)| entry));
        all
    }

    /// Every entry (ready ones first, in order; then waiting, then unacknowledged), for inspection.
    pub fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
        self.ready.entries().into_iter().chain(self.waiting.values().cloned()).chain(self.unacked.values().cloned())
    }
}
