//! [`Queue`]: one queue's definition, settings and messages, plus the consumers attached to it in
//! round-robin order.
//!
//! A message is in exactly one of three places: `ready` (ordered by arrival, so a requeued message
//! goes back to its original place), `waiting` (requeued by its consumer and held for the
//! `x-retry-backoff` step) or `unacked`. With `x-ordered-by`, only the oldest message of each key
//! (its *holder*) can be delivered; the others wait in `ready` behind it until the holder leaves
//! the queue for good, so one key's messages go out one at a time, in publish order, whatever
//! happens to the holder (redelivery, backoff, lease expiry).
//!
//! That bookkeeping (the three places, the byte counters, the expiry index, the key holders) is
//! kept here and nowhere else: the broker moves a message only through the named operations
//! below, each of which leaves it in exactly one place with every counter and index agreeing.

use crate::dedup::DedupIndex;
use crate::message::Message;
use crate::priority::ReadyLevels;
use crate::settings::{Overflow, QueueSettings};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use wharf_wire::types::FieldTable;

mod admission;
mod consumers;
mod inspect;
mod workbench;

pub use inspect::{EntryState, QueueConsumer};
mod invariants;

pub(crate) use admission::DedupLookup;
pub use admission::QueueStats;
pub(crate) use consumers::Unused;

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
    /// Position in the queue: its priority level, then its arrival (`priority.rs`); the smallest
    /// id is delivered first.
    pub id: u64,
    /// The message.
    pub message: Arc<Message>,
    /// Where the store keeps it (persistent messages in durable queues; transient ones paged
    /// out beyond the memory bound), for removal.
    pub store_seq: Option<u64>,
    /// `store_seq` is a record in the queue's transient log, not in its message log.
    pub transient_record: bool,
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
    /// What happened to it in this queue, for its delivery trace (`trace.rs`): deliveries that
    /// did not end in an ack, and what became of them. `None` until the first.
    pub trace: Option<Box<crate::trace::TraceLog>>,
}

/// Per-key ordering state (`x-ordered-by`).
#[derive(Debug, Default)]
struct Ordering {
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
    /// A quorum queue on a cluster: its messages are held by its replicated state machine
    /// (`crate::quorum`), not here; its consumers are attached here only to be counted, and its
    /// deliveries, settlements and consumers become [`crate::broker::ReplicatedOp`]s.
    pub replicated: bool,
    /// Declared arguments.
    pub arguments: FieldTable,
    /// Effective settings (arguments merged with the policy).
    pub settings: QueueSettings,
    /// The store's id for this queue's log, once the runtime created it.
    pub store_log: Option<u64>,
    /// The store's id for this queue's de-duplication key log, if it de-duplicates.
    pub dedup_log: Option<u64>,
    /// The store's id for this queue's transient log (transient bodies paged out beyond the
    /// memory bound; deleted with the queue and at every start), once the runtime created it.
    pub transient_log: Option<u64>,
    /// The runtime was asked to create the transient log (so it is asked once).
    transient_log_requested: bool,
    ready: ReadyLevels,
    /// Its priorities go up to this (`x-max-priority`, fixed at declaration: entry ids encode
    /// the level, see `priority.rs`).
    max_priority: Option<u8>,
    waiting: BTreeMap<u64, Entry>,
    unacked: foldhash::HashMap<u64, Entry>,
    /// Body bytes of the unacknowledged entries held in memory (for the memory alarm).
    unacked_resident_bytes: u64,
    /// Body bytes of ready and waiting messages.
    held_bytes: u64,
    /// The part of `held_bytes` whose bodies are in memory (not paged out to the store).
    resident_bytes: u64,
    /// (expiry, id) of ready messages that expire.
    expiry: BTreeSet<(u64, u64)>,
    /// The earliest expiry a timer is set for.
    expiry_timer_ms: Option<u64>,
    /// When the `x-expires` timer is set for, if one is.
    expires_timer_ms: Option<u64>,
    /// Distinguishes this queue from earlier ones of the same name (for its timers).
    incarnation: u64,
    ordering: Option<Ordering>,
    dedup: Option<DedupIndex>,
    /// Last time it was used (declared, consumed from, read with `basic.get`), for `x-expires`.
    last_used_ms: u64,
    /// The arrival number the next entry gets (the low bits of its id).
    next_id: u64,
    /// Consumers in round-robin order (with single active consumer, the first is the active one).
    consumers: Vec<(ChannelKey, String)>,
    /// Each consumer's `x-priority`, in the order of `consumers`.
    consumer_priorities: Vec<i32>,
    next_consumer: usize,
    had_consumer: bool,
    /// The consumer holding exclusive access, if any.
    exclusive_consumer: Option<(ChannelKey, String)>,
    /// What passed through it (`admission.rs`).
    stats: QueueStats,
}

impl Queue {
    /// The same queue with the store logs it owns: its messages', and its de-duplication keys'
    /// if it de-duplicates (a durable queue's, declared or recovered).
    pub fn with_store_logs(mut self, store_log: Option<u64>, dedup_log: Option<u64>) -> Self {
        self.store_log = store_log;
        self.dedup_log = dedup_log;
        self
    }

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
        let max_priority = settings.max_priority;
        Queue {
            name,
            durable,
            exclusive_owner,
            auto_delete,
            replicated: false,
            arguments,
            settings,
            store_log: None,
            dedup_log: None,
            transient_log: None,
            transient_log_requested: false,
            ready: ReadyLevels::new(max_priority),
            max_priority,
            waiting: BTreeMap::new(),
            unacked: foldhash::HashMap::default(),
            unacked_resident_bytes: 0,
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
            consumer_priorities: Vec::new(),
            next_consumer: 0,
            had_consumer: false,
            exclusive_consumer: None,
            stats: QueueStats::default(),
        }
    }

    // Entries in and out. The private helpers below each move an entry one step; the
    // `pub(crate)` operations further down combine them so that every operation the broker
    // calls leaves each entry in exactly one place, with the counters and indexes that follow.

    /// Builds an entry for a message arriving now (or recovered, with the time it was stored).
    fn new_entry(
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

    /// The key this queue de-duplicates `message` by, if it de-duplicates and the message has
    /// one.
    pub fn dedup_key_of(&self, message: &Message) -> Option<Vec<u8>> {
        self.dedup.as_ref()?.key_of(message)
    }

    /// A message's TTL here: the queue's or its own, whichever is shorter.
    pub fn ttl_ms_for(&self, message: &Message) -> Option<u64> {
        self.ttl_and_key(message).0
    }

    /// A message's TTL here (the queue's or its own, whichever is shorter) and its ordering key.
    fn ttl_and_key(&self, message: &Message) -> (Option<u64>, Option<Arc<str>>) {
        let ttl_ms = match (self.settings.message_ttl_ms, message.expiration_ms()) {
            (Some(queue), Some(message)) => Some(queue.min(message)),
            (queue, message) => queue.or(message),
        };
        (ttl_ms, self.order_key_of(message))
    }

    /// A message's `x-ordered-by` key here: its ordering header's value, if the queue orders by
    /// key and the message has that header.
    pub fn order_key_of(&self, message: &Message) -> Option<Arc<str>> {
        self.settings.ordered_by.as_deref().and_then(|header| message.header_text(header)).map(Arc::from)
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
        let id = crate::priority::entry_id(self.max_priority, &message, self.next_id);
        self.next_id += 1;
        Entry {
            id,
            message,
            store_seq,
            transient_record: false,
            redelivered: redelivered || delivery_count > 0,
            delivery_count,
            enqueued_ms,
            expires_at_ms: ttl_ms.map(|ttl| enqueued_ms.saturating_add(ttl)),
            order_key,
            trace: None,
        }
    }

    /// Adds a new entry at the tail (behind its key's holder, with `x-ordered-by`).
    fn insert_new(&mut self, entry: Entry) {
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
        if entry.message.paged().is_none() {
            self.resident_bytes += entry.message.body_bytes();
        }
    }

    /// Stops counting an entry that is no longer ready or waiting.
    fn unhold(&mut self, entry: &Entry) {
        self.held_bytes = self.held_bytes.saturating_sub(entry.message.body_bytes());
        if entry.message.paged().is_none() {
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
    fn return_ready(&mut self, entry: Entry) {
        self.insert_ready(entry, true);
    }

    /// The ready message to deliver next, if any.
    fn next_deliverable(&self) -> Option<u64> {
        match &self.ordering {
            Some(ordering) => ordering.deliverable.first().copied(),
            None => self.ready.first_id(),
        }
    }

    /// True if a ready entry may be delivered now (it holds its key, or has none).
    fn is_deliverable(&self, id: u64) -> bool {
        match &self.ordering {
            Some(ordering) => ordering.deliverable.contains(&id),
            None => self.ready.contains(id),
        }
    }

    /// Takes a ready entry out (it keeps holding its key): the caller puts it in another place.
    fn take_ready(&mut self, id: u64) -> Option<Entry> {
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
    fn remove_ready(&mut self, id: u64) -> Option<Entry> {
        let entry = self.take_ready(id)?;
        self.release_key(&entry);
        Some(entry)
    }

    /// Moves an entry taken out of `ready` or `unacked` to `waiting` (retry backoff); it keeps
    /// holding its key.
    fn hold_for_backoff(&mut self, entry: Entry) {
        self.hold(&entry);
        self.waiting.insert(entry.id, entry);
    }

    /// An entry left for good: the next entry of its key (if any) becomes deliverable.
    fn release_key(&mut self, entry: &Entry) {
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

    /// Adds a message published now at the tail (behind its key's holder, with `x-ordered-by`);
    /// its TTL counts from `now_ms`. `transient_record`: `store_seq` is in the transient log.
    pub(crate) fn enqueue(
        &mut self,
        message: Arc<Message>,
        store_seq: Option<u64>,
        transient_record: bool,
        now_ms: u64,
    ) {
        let mut entry = self.new_entry(message, store_seq, now_ms, 0, false);
        entry.transient_record = transient_record && store_seq.is_some();
        self.stats.publish += 1;
        self.insert_new(entry);
    }

    /// With `x-overflow: drop-head`, while the queue holds more than its length limits allow,
    /// takes its oldest ready entry out for good, for the broker to drop or dead-letter. `None`
    /// once it is within its limits, or if it does not drop its head.
    pub(crate) fn drop_head_over_limits(&mut self) -> Option<Entry> {
        if self.settings.overflow != Overflow::DropHead || !self.over_limits() {
            return None;
        }
        let id = self.oldest_ready()?;
        self.remove_ready(id)
    }

    /// True if a ready message may be delivered now.
    pub(crate) fn has_deliverable(&self) -> bool {
        self.next_deliverable().is_some()
    }

    /// Takes the next deliverable message for a delivery and counts the delivery. With
    /// `acknowledged` its entry stays in the queue as unacknowledged (still holding its key)
    /// until it is settled; without (no-ack) it leaves the queue for good, so the next message
    /// of its key becomes deliverable. `None` if nothing is deliverable.
    pub(crate) fn deliver_next(&mut self, acknowledged: bool) -> Option<Delivered> {
        let id = self.next_deliverable()?;
        let mut entry = self.take_ready(id)?;
        entry.delivery_count += 1;
        let delivered = Delivered {
            id,
            message: Arc::clone(&entry.message),
            store_seq: entry.store_seq,
            transient_record: entry.transient_record,
            redelivered: entry.redelivered,
            delivery_count: entry.delivery_count,
        };
        if acknowledged {
            self.unacked_resident_bytes += resident_body_bytes(&entry);
            self.unacked.insert(id, entry);
        } else {
            self.release_key(&entry);
        }
        Some(delivered)
    }

    /// Takes an unacknowledged entry out of the queue for good (acked, rejected, dead-lettered).
    pub(crate) fn remove_unacked(&mut self, id: u64) -> Option<Entry> {
        let entry = self.unacked.remove(&id)?;
        self.unacked_resident_bytes = self.unacked_resident_bytes.saturating_sub(resident_body_bytes(&entry));
        self.release_key(&entry);
        Some(entry)
    }

    /// An unacknowledged entry came back unsettled: by `nack`/`reject` with requeue
    /// (`explicit`), its channel closing, or its lease running out. Delivered as often as the
    /// delivery limit allows, it leaves for good (to be dead-lettered); after an explicit requeue
    /// on a queue with `x-retry-backoff` it waits its step; otherwise it goes back to its place,
    /// marked redelivered. `None` if the queue holds no such unacknowledged entry.
    pub(crate) fn return_unacked(&mut self, id: u64, explicit: bool) -> Option<Returned> {
        let count = self.unacked.get(&id)?.delivery_count;
        if self.settings.delivery_limit.is_some_and(|limit| count >= limit) {
            return self.remove_unacked(id).map(Returned::OverLimit);
        }
        let mut entry = self.unacked.remove(&id)?;
        self.unacked_resident_bytes = self.unacked_resident_bytes.saturating_sub(resident_body_bytes(&entry));
        entry.redelivered = true;
        match self.settings.backoff_ms(count).filter(|wait_ms| explicit && *wait_ms > 0) {
            Some(wait_ms) => {
                self.hold_for_backoff(entry);
                Some(Returned::Backoff { wait_ms })
            }
            None => {
                self.return_ready(entry);
                Some(Returned::Ready)
            }
        }
    }

    /// Ends an entry's backoff: back among the ready ones, in its place. False if it is not
    /// waiting (a stale timer).
    pub(crate) fn wake(&mut self, id: u64) -> bool {
        let Some(entry) = self.waiting.remove(&id) else { return false };
        self.unhold(&entry);
        self.return_ready(entry);
        true
    }

    /// Takes out for good the ready entry that expires first, if it is due by `now_ms`
    /// (`inclusive`: also if it is due exactly at `now_ms`), for the broker to drop or
    /// dead-letter. Called until `None`.
    pub(crate) fn pop_expired(&mut self, now_ms: u64, inclusive: bool) -> Option<Entry> {
        while let Some(&(at, id)) = self.expiry.first() {
            if at > now_ms || (at == now_ms && !inclusive) {
                return None;
            }
            match self.remove_ready(id) {
                Some(entry) => return Some(entry),
                // Not ready any more: an index entry left behind, dropped so it cannot block the
                // ones after it.
                None => {
                    self.expiry.remove(&(at, id));
                }
            }
        }
        None
    }

    /// The earliest expiry, if a timer must be armed for it (none is armed, or the armed one is
    /// later); it is then recorded as armed.
    pub(crate) fn arm_expiry_timer(&mut self) -> Option<u64> {
        let &(at, _) = self.expiry.first()?;
        if self.expiry_timer_ms.is_some_and(|armed| at >= armed) {
            return None;
        }
        self.expiry_timer_ms = Some(at);
        Some(at)
    }

    /// The expiry timer fired: none is armed any more (the dispatch that follows arms the next).
    pub(crate) fn expiry_timer_fired(&mut self) {
        self.expiry_timer_ms = None;
    }

    /// After recovery: takes out for good, oldest first, the ready entries already delivered as
    /// often as the delivery limit allows, for the broker to dead-letter (a message over its
    /// delivery limit is never delivered again, even across a restart).
    pub(crate) fn remove_exhausted(&mut self) -> Vec<Entry> {
        let limit = self.settings.delivery_limit;
        let mut exhausted: Vec<u64> = self
            .ready
            .delivery_counts()
            .filter(|(_, delivery_count)| limit.is_some_and(|limit| *delivery_count >= limit))
            .map(|(id, _)| id)
            .collect();
        exhausted.sort_unstable();
        exhausted.into_iter().filter_map(|id| self.remove_ready(id)).collect()
    }

    /// After recovery, with `x-retry-backoff`: every deliverable entry delivered before waits
    /// its backoff step again (how long it had already waited is not known). Returns each moved
    /// entry's id and wait, oldest first, for the broker to arm their timers.
    pub(crate) fn hold_retried_for_backoff(&mut self) -> Vec<(u64, u64)> {
        if self.settings.retry_backoff_ms.is_empty() {
            return Vec::new();
        }
        let mut retried: Vec<(u64, u32)> =
            self.ready.delivery_counts().filter(|(_, delivery_count)| *delivery_count > 0).collect();
        retried.sort_unstable();
        let mut held = Vec::new();
        for (id, count) in retried {
            let Some(wait_ms) = self.settings.backoff_ms(count).filter(|wait_ms| *wait_ms > 0) else { continue };
            if !self.is_deliverable(id) {
                continue;
            }
            if let Some(entry) = self.take_ready(id) {
                self.hold_for_backoff(entry);
                held.push((id, wait_ms));
            }
        }
        held
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
        let unacked: Vec<Entry> = self.unacked.drain().map(|(_, entry)| entry).collect();
        self.unacked_resident_bytes = 0;
        for entry in unacked {
            self.release_key(&entry);
            all.push(entry);
        }
        all
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

    /// Recovery, for a message found in the queue: its de-duplication key, if the index does not
    /// hold it yet (remembered now, as seen at `seen_ms`), for the runtime to write to the key
    /// log. A crash between a message becoming durable and its key record doing so keeps the
    /// message without its key; its publisher, never confirmed, sends it again, and the key
    /// must be known by then or the queue would take it twice.
    /// Not for a dead-lettered copy (its key was never admitted here), nor for a key whose
    /// window ended by `now_ms`.
    pub fn recover_dedup_key_of(&mut self, message: &Message, seen_ms: u64, now_ms: u64) -> Option<Vec<u8>> {
        let dedup = self.dedup.as_mut()?;
        if message.is_dead_lettered() || seen_ms.saturating_add(dedup.ttl_ms()) <= now_ms {
            return None;
        }
        let key = dedup.key_of(message)?;
        if dedup.contains(&key) {
            return None;
        }
        dedup.restore(&key, seen_ms);
        Some(key)
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

    /// Body bytes of unacknowledged messages held in memory.
    pub fn unacked_resident_bytes(&self) -> u64 {
        self.unacked_resident_bytes
    }

    /// Where the store keeps a record of this queue: `store_seq` in its transient log if
    /// `transient_record`, else in its message log.
    pub fn stored_at(&self, store_seq: Option<u64>, transient_record: bool) -> Option<crate::StoredAt> {
        let log = if transient_record { self.transient_log } else { self.store_log };
        log.zip(store_seq).map(|(log, seq)| crate::StoredAt { log, seq })
    }

    /// True once, for the publish that first finds the queue over its memory bound without a
    /// transient log: the runtime then creates one (see [`Queue::transient_log`]).
    pub(crate) fn wants_transient_log(&mut self) -> bool {
        let wanted = self.transient_log.is_none() && !self.transient_log_requested;
        self.transient_log_requested |= wanted;
        wanted
    }

    /// The id `message` gets if it is the next one enqueued.
    pub fn next_entry_id(&self, message: &Message) -> u64 {
        crate::priority::entry_id(self.max_priority, message, self.next_id)
    }

    /// Drops a ready or waiting entry's body from memory (the store holds it; `paged` says
    /// where). Only the entry `id` that is stored under `store_seq` in this queue's own log is
    /// touched, so a request about an entry that left meanwhile, or about an entry of an earlier
    /// queue of the same name (whose ids and seqs also started at 1), does nothing. Returns true
    /// if the body was dropped.
    pub fn page_out(&mut self, id: u64, store_seq: u64, paged: crate::message::PagedBody) -> bool {
        let transient = self.transient_log == Some(paged.store_log);
        if self.store_log != Some(paged.store_log) && !transient {
            return false;
        }
        let pageable = |entry: &Entry| {
            entry.store_seq == Some(store_seq)
                && entry.transient_record == transient
                && paged.body_bytes == entry.message.body_bytes()
                && entry.message.paged().is_none()
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
    fn over_limits(&self) -> bool {
        self.settings.max_length.is_some_and(|max| self.ready_count() as u64 > max)
            || self.settings.max_length_bytes.is_some_and(|max| self.held_bytes > max)
    }

    /// The oldest ready message (for `drop-head`).
    fn oldest_ready(&self) -> Option<u64> {
        self.ready.first_id()
    }

    /// Every entry (ready ones first, in order; then waiting, then unacknowledged), for inspection.
    pub fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
        self.ready.entries().into_iter().chain(self.waiting.values().cloned()).chain(self.unacked.values().cloned())
    }
}

/// What a delivery took from its queue: the entry itself stayed behind as unacknowledged, or
/// (no-ack) left the queue for good.
#[derive(Debug)]
pub(crate) struct Delivered {
    /// The entry's id (unacknowledged entries are settled by it).
    pub(crate) id: u64,
    /// The message as stored (without `x-delivery-count`).
    pub(crate) message: Arc<Message>,
    /// Where the store keeps it.
    pub(crate) store_seq: Option<u64>,
    /// `store_seq` is in the queue's transient log.
    pub(crate) transient_record: bool,
    /// Delivered before.
    pub(crate) redelivered: bool,
    /// Deliveries so far, this one included.
    pub(crate) delivery_count: u32,
}

/// Where an unacknowledged entry that came back unsettled went.
#[derive(Debug)]
pub(crate) enum Returned {
    /// Over its delivery limit: out of the queue for good, to be dead-lettered.
    OverLimit(Entry),
    /// Waiting out its retry backoff step for `wait_ms`.
    Backoff {
        /// How long it waits.
        wait_ms: u64,
    },
    /// Ready again, in its place.
    Ready,
}

/// An entry's body bytes held in memory (none once paged out).
fn resident_body_bytes(entry: &Entry) -> u64 {
    if entry.message.paged().is_none() { entry.message.body_bytes() } else { 0 }
}
