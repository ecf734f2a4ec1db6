//! [`BrokerModel`]: the whole broker's state machine: vhosts, channels, consumers, prefetch,
//! deliveries and acknowledgements. Every operation returns the [`Effects`] the runtime must carry
//! out (deliveries to send, messages to remove from the store, consumers cancelled by the server,
//! queues deleted, messages to transfer into other queues). No I/O and no clock: the runtime
//! tells it the time (`set_now`) and fires its timers (`tick`), so it can be driven exhaustively
//! and deterministically by tests.
//!
//! Time-driven behaviour (message TTL, `x-expires`, leases, retry backoff, delayed messages) runs
//! on one ordered set of timers; a timer only says "look at this thing at this time", and what
//! it finds then decides (a stale timer does nothing).
//!
//! Prefetch follows RabbitMQ: `basic.qos` with `global = false` limits each consumer created
//! afterwards on the channel; with `global = true` it limits all consumers of the channel
//! together. `0` means no limit. Dispatch is round-robin over consumers that have room.
//!
//! The model is split by job: `channels` opens and closes channels and connections and attaches
//! consumers; `deliver` hands ready messages to consumers and answers `basic.get`; `settle`
//! takes acknowledgements, rejections and recoveries; `timers` runs everything that happens at a
//! time; `admission` decides whether a publish goes in and puts it in; `queues` purges, deletes,
//! recovers and inspects whole queues; `invariants` checks, for the tests, that all of their
//! structures agree. Where a message is inside its queue is the queue's own
//! business ([`Queue`]'s methods): the broker only asks it to move messages.

mod admission;
mod channels;
mod deliver;
mod direct_reply;
mod inspect;
mod invariants;
mod policies;
mod queues;
mod replicated;
mod settle;
mod timers;
mod workbench;

pub use admission::Admission;
pub use direct_reply::{DIRECT_REPLY_TO, DIRECT_REPLY_TO_PREFIX};
pub use inspect::{ChannelSummary, ConsumerSummary};
pub use replicated::{
    ReplicatedDelivery, ReplicatedGet, ReplicatedOp, ReplicatedOutcome, ReplicatedStanding, UnackedByQueue,
};
pub use workbench::{WithdrawRefusal, Withdrawn};

use crate::deadletter::{self, AutoDeadLetterQueue, DeathReason, Transfer, TransferTarget};
use crate::error::ModelError;
use crate::exchange::Exchange;
use crate::message::Message;
use crate::queue::{ChannelKey, ConnectionId, Queue};
use crate::trace::{TraceEvent, TraceKind, TraceLog};
use crate::vhost::VirtualHost;
use channels::Channel;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use timers::Timer;

/// Most consumers on one channel.
pub const CONSUMERS_PER_CHANNEL_MAX: usize = 10_000;
/// Most unacknowledged deliveries on one channel (beyond it nothing more is delivered there,
/// whatever the prefetch settings: a client that never acks cannot pin unbounded memory).
pub const UNACKED_PER_CHANNEL_MAX: usize = 1_000_000;
/// Most message bytes handed to one connection and not yet written to its socket. Beyond it
/// nothing more is dispatched to that connection (no-ack consumers included) until the runtime
/// reports the bytes written: a consumer that reads slowly cannot make the broker buffer without
/// bound.
pub const CONNECTION_PENDING_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// Most expired-lease delivery tags a channel remembers (so a late ack of one is ignored rather
/// than refused); beyond it the oldest are forgotten and a late ack of those is a 406 again.
pub const EXPIRED_TAGS_PER_CHANNEL_MAX: usize = 100_000;

/// What the model counts (for logs, metrics and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Messages dead-lettered (any reason).
    pub dead_lettered: u64,
    /// Messages whose TTL ran out.
    pub expired: u64,
    /// Messages dropped or dead-lettered by `drop-head`.
    pub dropped_by_length: u64,
    /// Publishes refused by `reject-publish` / `reject-publish-dlx`.
    pub rejected_by_length: u64,
    /// Publishes dropped as duplicates (queue or exchange de-duplication).
    pub duplicates_dropped: u64,
    /// Deliveries whose lease (`x-consumer-timeout`) ran out.
    pub leases_expired: u64,
    /// Acks, nacks and rejects of deliveries whose lease had run out, ignored.
    pub late_settles_ignored: u64,
    /// Delayed messages released to their exchange's bindings.
    pub delayed_released: u64,
    /// Queued messages whose bodies were dropped from memory (read back from the store when
    /// delivered or moved), at run time and at recovery.
    pub paged_out: u64,
    /// Store logs holding messages that no stored definition pointed at, kept at recovery as
    /// `wharf.orphaned-log-…` queues instead of deleted.
    pub orphaned_logs_kept: u64,
    /// Transient bodies over their queue's memory bound that could not be written to its
    /// transient log (a full disk, a failing store): kept in memory instead (see `publish.rs`).
    pub transient_page_out_failures: u64,
    /// Messages published by clients (RabbitMQ's `messages_received`), routed or not.
    pub published: u64,
    /// Published messages that reached at least one queue (or a delayed exchange's hold).
    pub routed: u64,
    /// Published messages that reached no queue and were dropped (not mandatory).
    pub unroutable_dropped: u64,
    /// Published messages that reached no queue and were returned (mandatory).
    pub unroutable_returned: u64,
    /// Deliveries to consumers that must acknowledge.
    pub delivered_consume_manual_ack: u64,
    /// Deliveries to `no-ack` consumers.
    pub delivered_consume_auto_ack: u64,
    /// `basic.get`s answered with a message, to be acknowledged.
    pub delivered_get_manual_ack: u64,
    /// `basic.get`s answered with a message, `no-ack`.
    pub delivered_get_auto_ack: u64,
    /// `basic.get`s answered with get-empty.
    pub get_empty: u64,
    /// Deliveries (consumer or get) of messages delivered before.
    pub redelivered: u64,
    /// Deliveries acknowledged.
    pub acknowledged: u64,
    /// Requeued messages held back for their queue's retry backoff step (`x-retry-backoff`).
    pub backoff_waits: u64,
    /// Dead letters by reason (their sum is `dead_lettered`).
    pub dead_lettered_delivery_limit: u64,
    pub dead_lettered_expired: u64,
    pub dead_lettered_maxlen: u64,
    pub dead_lettered_rejected: u64,
}

/// One delivery to send: `basic.deliver` (consumer) or `basic.get-ok` (no consumer tag).
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The channel to send on.
    pub channel: ChannelKey,
    /// The consumer, or `None` for `basic.get`.
    pub consumer_tag: Option<String>,
    /// The channel's delivery tag.
    pub delivery_tag: u64,
    /// Delivered before.
    pub redelivered: bool,
    /// The queue it came from.
    pub queue: String,
    /// The message.
    pub message: Arc<Message>,
    /// Messages left ready in the queue (for `basic.get-ok`).
    pub message_count: u32,
    /// How many times it has now been delivered.
    pub delivery_count: u32,
    /// Where the store holds it, when it is stored (to record the delivery count).
    pub store: Option<StoredAt>,
    /// A no-ack delivery of a paged-out message: it left the queue with this delivery, but its
    /// record must outlive the read of its body, so the runtime removes the record once it has
    /// read the body (or knows it never will), not at once. (A no-ack delivery of a message in
    /// memory is in `Effects::removed` like any other removal.)
    pub remove_record_after_read: bool,
    /// `store` is a record in the queue's transient log: no delivery count is recorded for it
    /// (transient records are deleted at restart, so the count would never be read).
    pub store_transient: bool,
}

/// Where a message is stored: the store log and the message's seq in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoredAt {
    /// The store log (a queue's, or a delayed-message exchange's).
    pub log: u64,
    /// The message's seq in that log.
    pub seq: u64,
}

/// A message that left its queue for good: the runtime removes it from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The vhost.
    pub vhost: String,
    /// The queue.
    pub queue: String,
    /// Where the store holds it, if it is stored.
    pub stored: Option<StoredAt>,
}

impl Removed {
    /// `entry` left `queue` for good: its record (if any) is removed from whichever of the
    /// queue's logs holds it.
    fn of(vhost: &str, queue: &Queue, entry: &crate::queue::Entry) -> Removed {
        let stored = queue.stored_at(entry.store_seq, entry.transient_record);
        Removed { vhost: vhost.to_owned(), queue: queue.name.clone(), stored }
    }
}

/// A consumer the server cancelled (its queue went away).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelledConsumer {
    /// The consumer's channel.
    pub channel: ChannelKey,
    /// Its tag.
    pub consumer_tag: String,
}

/// An exchange that auto-deleted as a side effect (its last binding went).
#[derive(Debug, Clone)]
pub struct DeletedExchange {
    /// Its vhost.
    pub vhost: String,
    /// The exchange as it was.
    pub exchange: Exchange,
}

/// A queue that was deleted as a side effect (auto-delete, exclusive owner gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedQueue {
    /// The vhost.
    pub vhost: String,
    /// The queue's name.
    pub name: String,
    /// It was durable (its definition must be removed).
    pub durable: bool,
    /// Its store log, to delete.
    pub store_log: Option<u64>,
    /// Its de-duplication key log, to delete.
    pub dedup_log: Option<u64>,
    /// Its transient log (bodies of transient messages paged out), to delete.
    pub transient_log: Option<u64>,
}

/// What the runtime must do after an operation.
#[derive(Debug, Default)]
pub struct Effects {
    /// Deliveries to send, in order.
    pub deliveries: Vec<Delivery>,
    /// Messages to remove from the store.
    pub removed: Vec<Removed>,
    /// Consumers the server cancelled (`basic.cancel` to send, for clients that accept it).
    pub cancelled: Vec<CancelledConsumer>,
    /// Queues deleted as a side effect.
    pub deleted_queues: Vec<DeletedQueue>,
    /// Exchanges auto-deleted as a side effect.
    pub deleted_exchanges: Vec<DeletedExchange>,
    /// Messages to move into other queues (dead letters, due delayed messages).
    pub transfers: Vec<Transfer>,
    /// What changed for quorum queues' consumers and deliveries: commands for their groups.
    pub replicated: Vec<ReplicatedOp>,
}

impl Effects {
    pub fn merge(&mut self, other: Effects) {
        self.deliveries.extend(other.deliveries);
        self.removed.extend(other.removed);
        self.cancelled.extend(other.cancelled);
        self.deleted_queues.extend(other.deleted_queues);
        self.deleted_exchanges.extend(other.deleted_exchanges);
        self.transfers.extend(other.transfers);
        self.replicated.extend(other.replicated);
    }
}

/// The broker's state.
#[derive(Debug)]
pub struct BrokerModel {
    vhosts: BTreeMap<String, VirtualHost>,
    channels: foldhash::HashMap<ChannelKey, Channel>,
    seed: u64,
    /// Message bytes dispatched to each connection and not yet reported written.
    pending_bytes: foldhash::HashMap<ConnectionId, u64>,
    /// The time as the runtime last reported it (ms since the epoch; never goes back).
    now_ms: u64,
    timers: BTreeSet<(u64, Timer)>,
    /// When the armed `Timer::DefaultLeases` fires (the earliest one, if several are set).
    default_leases_armed_ms: Option<u64>,
    counters: Counters,
    channel_generations: u64,
    /// The most events a message's delivery trace keeps (`trace.rs`); 0 turns traces off.
    trace_events_max: usize,
    /// Each logged-in connection's name, for delivery traces.
    connection_names: foldhash::HashMap<ConnectionId, String>,
}

/// What a delivery weighs against `CONNECTION_PENDING_BYTES_MAX`.
pub fn delivery_bytes(message: &Message) -> u64 {
    message.body_bytes() + message.raw_properties.len() as u64
}

fn channel_not_open(key: ChannelKey) -> ModelError {
    ModelError::command_invalid(format!("channel {} is not open", key.channel))
}

impl BrokerModel {
    /// A broker with the default vhost `/`. `seed` makes generated names unique across restarts.
    pub fn new(seed: u64) -> Self {
        let mut model = BrokerModel {
            vhosts: BTreeMap::new(),
            channels: foldhash::HashMap::default(),
            seed,
            pending_bytes: foldhash::HashMap::default(),
            now_ms: 0,
            timers: BTreeSet::new(),
            default_leases_armed_ms: None,
            counters: Counters::default(),
            channel_generations: 0,
            trace_events_max: 0,
            connection_names: foldhash::HashMap::default(),
        };
        model.add_vhost("/");
        model
    }

    /// Adds a vhost (no-op if it exists).
    pub fn add_vhost(&mut self, name: &str) {
        let seed = self.seed ^ (self.vhosts.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.vhosts.entry(name.to_owned()).or_insert_with(|| VirtualHost::new(name, seed));
    }

    /// A vhost.
    pub fn vhost(&self, name: &str) -> Option<&VirtualHost> {
        self.vhosts.get(name)
    }

    /// A vhost, mutable (declarations, bindings, routing).
    pub fn vhost_mut(&mut self, name: &str) -> Option<&mut VirtualHost> {
        self.vhosts.get_mut(name)
    }

    /// Message body bytes queued in memory, ready or unacknowledged: bodies not paged out, every
    /// transient one among them (for the memory alarm). A body routed to several queues is shared
    /// but counted in each (the alarm errs early, never late). Deliveries on their way to a connection are not counted here: each
    /// connection's are bounded by `CONNECTION_PENDING_BYTES_MAX`, and the count of them moves
    /// in steps, so it would hold an alarm up after the memory is gone.
    pub fn held_memory_bytes(&self) -> u64 {
        let queues = self.vhosts.values().flat_map(|vhost| vhost.queues());
        queues.map(|queue| queue.resident_bytes() + queue.unacked_resident_bytes()).sum()
    }

    /// Every vhost.
    pub fn vhosts(&self) -> impl Iterator<Item = &VirtualHost> {
        self.vhosts.values()
    }

    /// Counts a client's publish: `routed` if it reached a queue (or a delayed hold), else as
    /// returned (`mandatory`) or dropped.
    pub fn count_publish(&mut self, routed: bool, mandatory: bool) {
        self.counters.published += 1;
        match (routed, mandatory) {
            (true, _) => self.counters.routed += 1,
            (false, true) => self.counters.unroutable_returned += 1,
            (false, false) => self.counters.unroutable_dropped += 1,
        }
    }

    /// What the model counted.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Keeps at most `max` events in each message's delivery trace; 0 turns traces off.
    pub fn set_trace_events_max(&mut self, max: usize) {
        self.trace_events_max = max.min(crate::trace::TRACE_EVENTS_LIMIT);
    }

    /// The bound on delivery traces (0: off).
    pub fn trace_events_max(&self) -> usize {
        self.trace_events_max
    }

    /// Names a logged-in connection for the delivery traces of messages delivered on it
    /// (forgotten when it closes).
    pub fn name_connection(&mut self, connection: ConnectionId, name: String) {
        if self.trace_events_max > 0 {
            self.connection_names.insert(connection, name);
        }
    }

    /// Records in a delivered, unsettled message's trace its delivery and `outcome` (a delivery
    /// that ends in an ack records nothing: the message leaves with its trace).
    fn note_delivery(&mut self, vhost: &str, key: ChannelKey, outstanding: &channels::Outstanding, outcome: TraceKind) {
        let max = self.trace_events_max;
        if max == 0 {
            return;
        }
        let connection = self.connection_names.get(&key.connection).cloned();
        let now_ms = self.now_ms;
        let Some(queue) = self.vhosts.get_mut(vhost).and_then(|found| found.queue_mut(&outstanding.queue)) else {
            return;
        };
        let delivered = TraceEvent {
            at_ms: outstanding.delivered_at_ms,
            queue: None,
            kind: TraceKind::Delivered {
                connection,
                consumer_tag: outstanding.consumer.as_ref().map(|(tag, _)| tag.clone()),
            },
        };
        let settled = TraceEvent { at_ms: now_ms, queue: None, kind: outcome };
        queue.note_unacked(outstanding.entry_id, [delivered, settled], max);
    }
}

/// Where a message leaving its queue takes its trace from.
#[derive(Debug, Clone, Copy)]
pub(super) struct TraceSource<'a> {
    /// When it entered the queue (its publish time, for a fresh message).
    pub entered_ms: u64,
    /// Its events there.
    pub own: Option<&'a TraceLog>,
    /// The broker's bound (0: traces are off).
    pub max: usize,
}

impl TraceSource<'_> {
    pub(super) fn of(entry: &crate::queue::Entry, max: usize) -> TraceSource<'_> {
        TraceSource { entered_ms: entry.enqueued_ms, own: entry.trace.as_deref(), max }
    }
}

/// Sends a message that leaves `queue` for `reason` to the queue's dead-letter exchange, or, for
/// an exhausted delivery limit without one, to the queue's automatic dead-letter queue (a message
/// over its delivery limit is never dropped). Otherwise the message is just removed.
#[allow(clippy::too_many_arguments)]
fn dead_letter(
    vhost: &str,
    queue: &Queue,
    message: &Message,
    delivery_count: u32,
    trace: TraceSource<'_>,
    source: Option<Removed>,
    reason: DeathReason,
    now_ms: u64,
    effects: &mut Effects,
    counters: &mut Counters,
) {
    let auto =
        AutoDeadLetterQueue { name: deadletter::auto_dead_letter_queue_name(&queue.name), durable: queue.durable };
    let (exchange, routing_key, target) = match (&queue.settings.dead_letter_exchange, reason) {
        (Some(exchange), _) => {
            let routing_key =
                queue.settings.dead_letter_routing_key.clone().unwrap_or_else(|| message.routing_key.clone());
            let target = TransferTarget::Exchange {
                exchange: exchange.clone(),
                routing_keys: vec![routing_key.clone()],
                fallback: (reason == DeathReason::DeliveryLimit).then(|| auto.clone()),
            };
            (exchange.clone(), routing_key, target)
        }
        (None, DeathReason::DeliveryLimit) => (String::new(), auto.name.clone(), TransferTarget::Queue(auto)),
        (None, _) => {
            effects.removed.extend(source);
            return;
        }
    };
    counters.dead_lettered += 1;
    match reason {
        DeathReason::DeliveryLimit => counters.dead_lettered_delivery_limit += 1,
        DeathReason::Expired => counters.dead_lettered_expired += 1,
        DeathReason::MaxLen => counters.dead_lettered_maxlen += 1,
        DeathReason::Rejected => counters.dead_lettered_rejected += 1,
    }
    let mut moved =
        deadletter::dead_lettered(message, &queue.name, reason, now_ms, delivery_count, &exchange, &routing_key);
    if trace.max > 0 {
        let hop = TraceEvent {
            at_ms: now_ms,
            queue: None,
            kind: TraceKind::DeadLettered { reason, exchange: exchange.clone(), routing_key: routing_key.clone() },
        };
        let provenance =
            crate::trace::carried(message.trace.as_deref(), trace.entered_ms, trace.own, &queue.name, hop, trace.max);
        moved.trace = Some(Arc::new(provenance));
    }
    effects.transfers.push(Transfer {
        vhost: vhost.to_owned(),
        message: Arc::new(moved),
        target,
        source,
        reason: Some(reason),
    });
}
