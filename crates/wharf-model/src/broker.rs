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

use crate::deadletter::{self, AutoDeadLetterQueue, DeathReason, Transfer, TransferTarget};
use crate::error::{ModelError, Result};
use crate::exchange::{Exchange, ExchangeKind};
use crate::message::{Message, PagedBody};
use crate::queue::{ChannelKey, ConnectionId, DedupLookup, Entry, Queue, Returned, Unused};
use crate::settings::Overflow;
use crate::vhost::{DelayedEntry, VirtualHost};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use wharf_wire::types::AMQPValue;

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
}

/// Whether a queue takes a published message (checked before the runtime stores it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Take it; `dedup_key` is the key to record in the queue's key log, if it de-duplicates.
    Accept {
        /// The de-duplication key.
        dedup_key: Option<Vec<u8>>,
    },
    /// Seen within the de-duplication window: confirm, but do not enqueue.
    Duplicate,
    /// Refused by `x-overflow`: nack the publisher; dead-letter it if `dead_letter`.
    Refused {
        /// `reject-publish-dlx`.
        dead_letter: bool,
    },
}

/// Something to look at when its time comes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// A queue's earliest message expiry.
    Expiry { vhost: String, queue: String, incarnation: u64 },
    /// A queue's `x-expires`.
    QueueExpires { vhost: String, queue: String, incarnation: u64 },
    /// A delivery's lease.
    Lease { channel: ChannelKey, generation: u64, delivery_tag: u64 },
    /// The end of a message's retry backoff.
    Backoff { vhost: String, queue: String, incarnation: u64, id: u64 },
    /// A delayed-message exchange's earliest due message.
    Delayed { vhost: String, exchange: String },
}
// Queue timers name the queue's incarnation and lease timers the channel's generation: a queue
// re-created under the same name numbers its entries from 1 again, and a reopened channel its
// delivery tags, so a timer of the old one must not touch the new one.

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
    /// The store's queue id and seq for it, when it is stored (to record the delivery count).
    pub store: Option<(u64, u64)>,
}

/// A message that left its queue for good: the runtime removes it from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The vhost.
    pub vhost: String,
    /// The queue.
    pub queue: String,
    /// The store's queue id.
    pub store_queue: Option<u64>,
    /// The store's seq for it.
    pub store_seq: Option<u64>,
}

impl Removed {
    /// The message stored under `store_seq` in `queue`'s log left it.
    fn of(vhost: &str, queue: &Queue, store_seq: Option<u64>) -> Removed {
        Removed { vhost: vhost.to_owned(), queue: queue.name.clone(), store_queue: queue.store_queue, store_seq }
    }
}

/// Takes the next deliverable message of a queue for a delivery on `channel` (kept as
/// unacknowledged if `acknowledged`; gone for good otherwise): the queue counts the delivery (a
/// redelivery carries `x-delivery-count`, the deliveries before it); the connection is charged
/// its pending bytes and the channel's next delivery tag assigned. Returns the entry's id and
/// store seq with the delivery.
fn take_for_delivery(
    queue: &mut Queue,
    channel: &mut Channel,
    pending_bytes: &mut foldhash::HashMap<ConnectionId, u64>,
    key: ChannelKey,
    consumer_tag: Option<String>,
    acknowledged: bool,
) -> Option<(u64, Option<u64>, Delivery)> {
    let delivered = queue.deliver_next(acknowledged)?;
    let deliveries_before = delivered.delivery_count - 1;
    let message = if deliveries_before > 0 {
        Arc::new(
            delivered.message.with_header("x-delivery-count", AMQPValue::LongLongInt(i64::from(deliveries_before))),
        )
    } else {
        delivered.message
    };
    *pending_bytes.entry(key.connection).or_insert(0) += delivery_bytes(&message);
    let delivery_tag = channel.next_delivery_tag;
    channel.next_delivery_tag += 1;
    let delivery = Delivery {
        channel: key,
        consumer_tag,
        delivery_tag,
        redelivered: delivered.redelivered,
        queue: queue.name.clone(),
        message,
        message_count: queue.ready_count() as u32,
        delivery_count: delivered.delivery_count,
        store: queue.store_queue.zip(delivered.store_seq),
    };
    Some((delivered.id, delivered.store_seq, delivery))
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
    pub store_queue: Option<u64>,
    /// Its de-duplication key log, to delete.
    pub dedup_store_queue: Option<u64>,
}

/// What the runtime must do after an operation.
#[derive(Debug, Default)]
pub struct Effects {
    /// Deliveries to send, in order.
    pub deliveries: Vec<Delivery>,
    /// Messages to remove from the store.
    pub removed: Vec<Removed>,
    /// Consumers the server cancelled (`basic.cancel` to send, for clients that accept it).
    pub cancelled: Vec<(ChannelKey, String)>,
    /// Queues deleted as a side effect.
    pub deleted_queues: Vec<DeletedQueue>,
    /// Exchanges auto-deleted as a side effect, as (vhost, exchange).
    pub deleted_exchanges: Vec<(String, Exchange)>,
    /// Messages to move into other queues (dead letters, due delayed messages).
    pub transfers: Vec<Transfer>,
}

impl Effects {
    fn merge(&mut self, other: Effects) {
        self.deliveries.extend(other.deliveries);
        self.removed.extend(other.removed);
        self.cancelled.extend(other.cancelled);
        self.deleted_queues.extend(other.deleted_queues);
        self.deleted_exchanges.extend(other.deleted_exchanges);
        self.transfers.extend(other.transfers);
    }
}

#[derive(Debug)]
struct Consumer {
    /// Distinguishes this consumer from an earlier one that had the same tag: deliveries made to
    /// a cancelled consumer must not count against its successor's prefetch.
    instance: u64,
    queue: String,
    no_ack: bool,
    prefetch: u16,
    unacked: u32,
}

#[derive(Debug)]
struct Outstanding {
    queue: String,
    entry_id: u64,
    /// The consumer (tag and instance) it was delivered to; `None` for `basic.get`.
    consumer: Option<(String, u64)>,
    /// Its queue was deleted: settling it only frees the slot.
    gone: bool,
    /// When its lease runs out (its timer is removed when it is settled).
    lease_due_ms: Option<u64>,
}

#[derive(Debug)]
struct Channel {
    vhost: String,
    prefetch_channel: u16,
    prefetch_consumer: u16,
    next_delivery_tag: u64,
    unacked: BTreeMap<u64, Outstanding>,
    consumers: HashMap<String, Consumer>,
    consumer_unacked: u32,
    generated_tags: u64,
    consumer_instances: u64,
    /// Delivery tags whose lease ran out (their message was requeued); settling one is ignored.
    expired_tags: BTreeSet<u64>,
    /// Distinguishes this opening of the channel from earlier ones with the same number.
    generation: u64,
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
    counters: Counters,
    channel_generations: u64,
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
            counters: Counters::default(),
            channel_generations: 0,
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

    /// All vhosts.
    pub fn vhosts(&self) -> impl Iterator<Item = &VirtualHost> {
        self.vhosts.values()
    }

    fn channel_vhost(&self, key: ChannelKey) -> Result<String> {
        self.channels.get(&key).map(|channel| channel.vhost.clone()).ok_or_else(|| channel_not_open(key))
    }

    /// Opens a channel on a connection bound to `vhost`.
    pub fn open_channel(&mut self, key: ChannelKey, vhost: &str) -> Result<()> {
        if !self.vhosts.contains_key(vhost) {
            return Err(ModelError::not_allowed(format!("vhost '{vhost}' not found")));
        }
        if self.channels.contains_key(&key) {
            return Err(ModelError {
                code: wharf_wire::reply_code::CHANNEL_ERROR,
                text: format!("CHANNEL_ERROR - channel {} already open", key.channel),
                scope: crate::error::Scope::Connection,
            });
        }
        self.channel_generations += 1;
        let generation = self.channel_generations;
        self.channels.insert(
            key,
            Channel {
                vhost: vhost.to_owned(),
                prefetch_channel: 0,
                prefetch_consumer: 0,
                next_delivery_tag: 1,
                unacked: BTreeMap::new(),
                consumers: HashMap::new(),
                consumer_unacked: 0,
                generated_tags: 0,
                consumer_instances: 0,
                expired_tags: BTreeSet::new(),
                generation,
            },
        );
        Ok(())
    }

    /// True if the channel is open.
    pub fn channel_open(&self, key: ChannelKey) -> bool {
        self.channels.contains_key(&key)
    }

    /// Closes a channel: its unacknowledged messages go back to their queues (redelivered), its
    /// consumers go (auto-delete queues left without consumers are deleted), and the freed
    /// messages are dispatched to other consumers.
    pub fn close_channel(&mut self, key: ChannelKey) -> Effects {
        let Some(channel) = self.channels.remove(&key) else { return Effects::default() };
        self.release_channels(vec![(key, channel)])
    }

    /// Gives back what closed channels held: unacknowledged messages to their queues (marked
    /// redelivered), consumers detached; then dispatches the freed messages. The channels are
    /// already out of the model, so nothing is dispatched back to them.
    fn release_channels(&mut self, closed: Vec<(ChannelKey, Channel)>) -> Effects {
        let mut effects = Effects::default();
        let mut touched = BTreeSet::new();
        for (key, channel) in closed {
            for (delivery_tag, outstanding) in channel.unacked {
                if let Some(due_ms) = outstanding.lease_due_ms {
                    self.timers
                        .remove(&(due_ms, Timer::Lease { channel: key, generation: channel.generation, delivery_tag }));
                }
                if outstanding.gone {
                    continue;
                }
                self.return_delivery(&channel.vhost, &outstanding.queue, outstanding.entry_id, false, &mut effects);
                touched.insert((channel.vhost.clone(), outstanding.queue));
            }
            for (tag, consumer) in channel.consumers {
                self.detach_consumer(&channel.vhost, &consumer.queue, key, &tag, &mut effects);
                touched.insert((channel.vhost.clone(), consumer.queue));
            }
        }
        for (vhost, queue) in touched {
            effects.merge(self.dispatch(&vhost, &queue));
        }
        effects
    }

    /// The runtime wrote `bytes` of deliveries to a connection's socket. If that makes room below
    /// the limit, dispatching to the connection resumes.
    pub fn written(&mut self, connection: ConnectionId, bytes: u64) -> Effects {
        let Some(pending) = self.pending_bytes.get_mut(&connection) else { return Effects::default() };
        let was_full = *pending >= CONNECTION_PENDING_BYTES_MAX;
        *pending = pending.saturating_sub(bytes);
        if !was_full || *pending >= CONNECTION_PENDING_BYTES_MAX {
            return Effects::default();
        }
        let mut queues = BTreeSet::new();
        for (key, channel) in &self.channels {
            if key.connection == connection {
                for consumer in channel.consumers.values() {
                    queues.insert((channel.vhost.clone(), consumer.queue.clone()));
                }
            }
        }
        let mut effects = Effects::default();
        for (vhost, queue) in queues {
            effects.merge(self.dispatch(&vhost, &queue));
        }
        effects
    }

    /// Closes every channel of a connection and deletes the queues it owned exclusively.
    pub fn close_connection(&mut self, connection: ConnectionId) -> Effects {
        self.pending_bytes.remove(&connection);
        // Every channel of the connection leaves the model before anything is requeued, so a
        // message freed by one of them is never dispatched to another of the same dying connection.
        let keys: Vec<ChannelKey> = self.channels.keys().filter(|key| key.connection == connection).copied().collect();
        let closed: Vec<(ChannelKey, Channel)> =
            keys.into_iter().filter_map(|key| self.channels.remove(&key).map(|channel| (key, channel))).collect();
        let mut effects = self.release_channels(closed);
        let vhost_names: Vec<String> = self.vhosts.keys().cloned().collect();
        for vhost in vhost_names {
            let owned: Vec<String> = self.vhosts[&vhost]
                .queues()
                .filter(|queue| queue.exclusive_owner == Some(connection))
                .map(|queue| queue.name.clone())
                .collect();
            for name in owned {
                effects.merge(self.remove_queue(&vhost, &name));
            }
        }
        effects
    }

    /// `basic.qos`.
    pub fn qos(&mut self, key: ChannelKey, prefetch_count: u16, global: bool) -> Result<Effects> {
        let channel = self.channels.get_mut(&key).ok_or_else(|| channel_not_open(key))?;
        if global {
            channel.prefetch_channel = prefetch_count;
        } else {
            channel.prefetch_consumer = prefetch_count;
        }
        let vhost = channel.vhost.clone();
        let queues: BTreeSet<String> = channel.consumers.values().map(|consumer| consumer.queue.clone()).collect();
        let mut effects = Effects::default();
        for queue in queues {
            effects.merge(self.dispatch(&vhost, &queue));
        }
        Ok(effects)
    }

    /// `basic.consume`. Returns the consumer tag (generated if empty) and the first deliveries.
    pub fn consume(
        &mut self,
        key: ChannelKey,
        queue_name: &str,
        tag: &str,
        no_ack: bool,
        exclusive: bool,
    ) -> Result<(String, Effects)> {
        let vhost_name = self.channel_vhost(key)?;
        let vhost = self.vhosts.get(&vhost_name).ok_or_else(|| channel_not_open(key))?;
        let queue = vhost.usable_queue(queue_name, key.connection)?;
        if queue.has_exclusive_consumer() || (exclusive && queue.consumer_count() > 0) {
            return Err(ModelError::access_refused(format!(
                "queue '{queue_name}' in vhost '{vhost_name}' in exclusive use"
            )));
        }
        let channel = self.channels.get_mut(&key).ok_or_else(|| channel_not_open(key))?;
        let tag = if tag.is_empty() {
            channel.generated_tags += 1;
            format!("amq.ctag-{:x}-{}-{}", key.connection.0, key.channel, channel.generated_tags)
        } else {
            tag.to_owned()
        };
        if channel.consumers.contains_key(&tag) {
            return Err(ModelError::not_allowed(format!("attempt to reuse consumer tag '{tag}'")));
        }
        if channel.consumers.len() >= CONSUMERS_PER_CHANNEL_MAX {
            return Err(ModelError::resource_error(format!(
                "channel {} already has {CONSUMERS_PER_CHANNEL_MAX} consumers",
                key.channel
            )));
        }
        channel.consumer_instances += 1;
        channel.consumers.insert(
            tag.clone(),
            Consumer {
                instance: channel.consumer_instances,
                queue: queue_name.to_owned(),
                no_ack,
                prefetch: channel.prefetch_consumer,
                unacked: 0,
            },
        );
        if let Some(queue) = self.vhosts.get_mut(&vhost_name).and_then(|vhost| vhost.queue_mut(queue_name)) {
            queue.attach_consumer(key, &tag, exclusive, self.now_ms);
        }
        let effects = self.dispatch(&vhost_name, queue_name);
        Ok((tag, effects))
    }

    /// `basic.cancel`. Cancelling an unknown tag is a no-op (as RabbitMQ). Unacknowledged
    /// deliveries of the consumer stay unacknowledged on the channel.
    pub fn cancel(&mut self, key: ChannelKey, tag: &str) -> Result<Effects> {
        let channel = self.channels.get_mut(&key).ok_or_else(|| channel_not_open(key))?;
        let Some(consumer) = channel.consumers.remove(tag) else { return Ok(Effects::default()) };
        let vhost = channel.vhost.clone();
        let mut effects = Effects::default();
        self.detach_consumer(&vhost, &consumer.queue, key, tag, &mut effects);
        Ok(effects)
    }

    fn detach_consumer(&mut self, vhost: &str, queue_name: &str, key: ChannelKey, tag: &str, effects: &mut Effects) {
        let Some(queue) = self.vhosts.get_mut(vhost).and_then(|vhost| vhost.queue_mut(queue_name)) else { return };
        queue.detach_consumer(key, tag);
        if queue.auto_delete_due() {
            effects.merge(self.remove_queue(vhost, queue_name));
        } else if queue.consumer_count() == 0 {
            self.touch_queue(vhost, queue_name);
        }
    }

    /// Removes a queue: its messages leave for good, its consumers are cancelled by the server.
    fn remove_queue(&mut self, vhost_name: &str, queue_name: &str) -> Effects {
        let mut effects = Effects::default();
        let Some(vhost) = self.vhosts.get_mut(vhost_name) else { return effects };
        let Some(mut queue) = vhost.remove_queue(queue_name) else { return effects };
        for exchange in vhost.take_auto_deleted() {
            effects.deleted_exchanges.push((vhost_name.to_owned(), exchange));
        }
        for (key, tag) in queue.take_consumers() {
            if let Some(channel) = self.channels.get_mut(&key) {
                channel.consumers.remove(&tag);
            }
            effects.cancelled.push((key, tag));
        }
        // Outstanding deliveries from this queue stay until the client settles them (an ack of
        // one is accepted quietly, as RabbitMQ does, and frees its prefetch slot), but they no
        // longer point at any queue: a new queue of the same name must never see them.
        for channel in self.channels.values_mut().filter(|channel| channel.vhost == vhost_name) {
            for outstanding in channel.unacked.values_mut() {
                if outstanding.queue == queue_name {
                    outstanding.gone = true;
                }
            }
        }
        for entry in queue.take_all() {
            effects.removed.push(Removed::of(vhost_name, &queue, entry.store_seq));
        }
        effects.deleted_queues.push(DeletedQueue {
            vhost: vhost_name.to_owned(),
            name: queue_name.to_owned(),
            durable: queue.durable,
            store_queue: queue.store_queue,
            dedup_store_queue: queue.dedup_store_queue,
        });
        effects
    }

    /// Puts a routed message in a queue (admitted by `admit`) and dispatches. `store_seq` is set
    /// when the store holds it. With `drop-head`, the oldest ready messages beyond the queue's
    /// length limits leave (dead-lettered if the queue has a dead-letter exchange).
    pub fn enqueue(&mut self, vhost: &str, queue_name: &str, message: Arc<Message>, store_seq: Option<u64>) -> Effects {
        let now_ms = self.now_ms;
        let mut effects = Effects::default();
        let Some(queue) = self.vhosts.get_mut(vhost).and_then(|vhost| vhost.queue_mut(queue_name)) else {
            return effects;
        };
        queue.enqueue(message, store_seq, now_ms);
        while let Some(entry) = queue.drop_head_over_limits() {
            self.counters.dropped_by_length += 1;
            let source = Removed::of(vhost, queue, entry.store_seq);
            dead_letter(
                vhost,
                queue,
                &entry.message,
                entry.delivery_count,
                Some(source),
                DeathReason::MaxLen,
                now_ms,
                &mut effects,
                &mut self.counters,
            );
        }
        effects.merge(self.dispatch(vhost, queue_name));
        effects
    }

    /// Whether `queue_name` takes a published `message`: not if its key was seen within the
    /// queue's de-duplication window, not if `x-overflow` refuses publishes beyond the queue's
    /// length limits. Only checks: the runtime calls `remember_key` once the message is in (a
    /// refused or failed publish must not leave its key behind). Transfers (dead letters, due
    /// delayed messages: `from_publisher` false) are neither de-duplicated nor refused: a copy
    /// of a message the queue once held is not a duplicate publish.
    pub fn admit(&mut self, vhost: &str, queue_name: &str, message: &Message, from_publisher: bool) -> Admission {
        let now_ms = self.now_ms;
        let Some(queue) = self.vhosts.get_mut(vhost).and_then(|vhost| vhost.queue_mut(queue_name)) else {
            return Admission::Accept { dedup_key: None };
        };
        if !from_publisher {
            return Admission::Accept { dedup_key: None };
        }
        let dedup_key = match queue.dedup_lookup(message, now_ms) {
            DedupLookup::Seen => {
                self.counters.duplicates_dropped += 1;
                return Admission::Duplicate;
            }
            DedupLookup::New(key) => Some(key),
            DedupLookup::Unkeyed => None,
        };
        if queue.settings.overflow != Overflow::DropHead && queue.would_overflow(message.body_bytes()) {
            self.counters.rejected_by_length += 1;
            return Admission::Refused { dead_letter: queue.settings.overflow == Overflow::RejectPublishDlx };
        }
        Admission::Accept { dedup_key }
    }

    /// Remembers a de-duplication key a queue admitted (the message is in).
    pub fn remember_key(&mut self, vhost: &str, queue_name: &str, key: &[u8]) {
        let now_ms = self.now_ms;
        if let Some(queue) = self.vhosts.get_mut(vhost).and_then(|vhost| vhost.queue_mut(queue_name)) {
            queue.remember_dedup_key(key, now_ms);
        }
    }

    /// Whether a publish to `exchange` goes on: not if its key was seen within the exchange's
    /// de-duplication window. Only checks; see `remember_exchange_key`.
    pub fn admit_to_exchange(&mut self, vhost: &str, exchange: &str, message: &Message) -> Admission {
        let now_ms = self.now_ms;
        let Some(index) = self.vhosts.get_mut(vhost).and_then(|vhost| vhost.exchange_dedup.get_mut(exchange)) else {
            return Admission::Accept { dedup_key: None };
        };
        let Some(key) = index.key_of(message) else { return Admission::Accept { dedup_key: None } };
        index.expire(now_ms);
        if index.contains(&key) {
            self.counters.duplicates_dropped += 1;
            return Admission::Duplicate;
        }
        Admission::Accept { dedup_key: Some(key) }
    }

    /// Remembers a de-duplication key an exchange admitted (the publish went through whole).
    pub fn remember_exchange_key(&mut self, vhost: &str, exchange: &str, key: &[u8]) {
        let now_ms = self.now_ms;
        if let Some(index) = self.vhosts.get_mut(vhost).and_then(|vhost| vhost.exchange_dedup.get_mut(exchange)) {
            index.check_and_insert(key, now_ms);
        }
    }

    /// A publish `reject-publish-dlx` refused: dead-letter it (reason `maxlen`).
    pub fn dead_letter_refused(&mut self, vhost: &str, queue_name: &str, message: &Message) -> Effects {
        let now_ms = self.now_ms;
        let mut effects = Effects::default();
        if let Some(queue) = self.vhosts.get(vhost).and_then(|vhost| vhost.queue(queue_name)) {
            dead_letter(vhost, queue, message, 0, None, DeathReason::MaxLen, now_ms, &mut effects, &mut self.counters);
        }
        effects
    }

    /// Holds a message published to a delayed-message exchange until `due_ms`; `store_seq` is
    /// its place in the exchange's log.
    pub fn hold_delayed(
        &mut self,
        vhost: &str,
        exchange: &str,
        message: Arc<Message>,
        store_seq: Option<u64>,
        due_ms: u64,
    ) {
        let Some(hold) = self.vhosts.get_mut(vhost).and_then(|vhost| vhost.delayed.get_mut(exchange)) else { return };
        let id = hold.next_id;
        hold.next_id += 1;
        hold.due.insert((due_ms, id), DelayedEntry { message, store_seq });
        if hold.timer_ms.is_none_or(|armed| due_ms < armed) {
            hold.timer_ms = Some(due_ms);
            self.timers.insert((due_ms, Timer::Delayed { vhost: vhost.to_owned(), exchange: exchange.to_owned() }));
        }
    }

    /// Marks a queue used now (declared, read): its `x-expires` countdown starts again.
    pub fn touch_queue(&mut self, vhost: &str, queue_name: &str) {
        let now_ms = self.now_ms;
        let Some(queue) = self.vhosts.get_mut(vhost).and_then(|vhost| vhost.queue_mut(queue_name)) else { return };
        if let Some(due_ms) = queue.touch(now_ms) {
            self.timers.insert((
                due_ms,
                Timer::QueueExpires {
                    vhost: vhost.to_owned(),
                    queue: queue_name.to_owned(),
                    incarnation: queue.incarnation(),
                },
            ));
        }
    }

    /// Tells the model the time (ms since the epoch); it never goes back.
    pub fn set_now(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    /// The time the model was last told.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Drops a queued message's body from memory (see [`Queue::page_out`]); counted.
    pub fn page_out(&mut self, vhost: &str, queue: &str, entry_id: u64, store_seq: u64, paged: PagedBody) -> bool {
        let paged_out = self
            .vhosts
            .get_mut(vhost)
            .and_then(|found| found.queue_mut(queue))
            .is_some_and(|found| found.page_out(entry_id, store_seq, paged));
        if paged_out {
            self.counters.paged_out += 1;
        }
        paged_out
    }

    /// Counts bodies recovery left on disk.
    pub fn count_paged_out(&mut self, count: u64) {
        self.counters.paged_out += count;
    }

    /// What the model counted.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// When the next timer is due, if any (the runtime calls `tick` then).
    pub fn next_timer_ms(&self) -> Option<u64> {
        self.timers.first().map(|(at, _)| *at)
    }

    /// Fires every timer due by now: expires messages and unused queues, ends leases and
    /// backoffs, releases delayed messages.
    pub fn tick(&mut self) -> Effects {
        let mut effects = Effects::default();
        while self.timers.first().is_some_and(|(at, _)| *at <= self.now_ms) {
            let Some((_, timer)) = self.timers.pop_first() else { break };
            match timer {
                Timer::Expiry { vhost, queue, incarnation } => {
                    let Some(found) = self.live_queue(&vhost, &queue, incarnation) else { continue };
                    found.expiry_timer_fired();
                    effects.merge(self.dispatch(&vhost, &queue));
                }
                Timer::QueueExpires { vhost, queue, incarnation } => {
                    let now_ms = self.now_ms;
                    let Some(found) = self.live_queue(&vhost, &queue, incarnation) else { continue };
                    match found.expires_timer_fired(now_ms) {
                        Unused::Keep => {}
                        Unused::Delete => effects.merge(self.remove_queue(&vhost, &queue)),
                        Unused::ArmAgain { due_ms } => {
                            self.timers.insert((due_ms, Timer::QueueExpires { vhost, queue, incarnation }));
                        }
                    }
                }
                Timer::Lease { channel, generation, delivery_tag } => {
                    if self.channels.get(&channel).is_some_and(|found| found.generation == generation) {
                        self.expire_lease(channel, delivery_tag, &mut effects);
                    }
                }
                Timer::Backoff { vhost, queue, incarnation, id } => {
                    if self.live_queue(&vhost, &queue, incarnation).is_some_and(|found| found.wake(id)) {
                        effects.merge(self.dispatch(&vhost, &queue));
                    }
                }
                Timer::Delayed { vhost, exchange } => self.release_delayed(&vhost, &exchange, &mut effects),
            }
        }
        effects
    }

    /// The queue, if it is still the incarnation a timer was set for.
    fn live_queue(&mut self, vhost: &str, queue_name: &str, incarnation: u64) -> Option<&mut Queue> {
        self.vhosts
            .get_mut(vhost)
            .and_then(|found| found.queue_mut(queue_name))
            .filter(|queue| queue.incarnation() == incarnation)
    }

    fn expire_lease(&mut self, key: ChannelKey, delivery_tag: u64, effects: &mut Effects) {
        let Some(channel) = self.channels.get_mut(&key) else { return };
        if !channel.unacked.contains_key(&delivery_tag) {
            return;
        }
        let vhost = channel.vhost.clone();
        channel.expired_tags.insert(delivery_tag);
        while channel.expired_tags.len() > EXPIRED_TAGS_PER_CHANNEL_MAX {
            channel.expired_tags.pop_first();
        }
        let Ok(taken) = self.take_outstanding(key, delivery_tag, false) else { return };
        self.counters.leases_expired += 1;
        let mut touched = BTreeSet::new();
        for outstanding in taken.into_iter().filter(|outstanding| !outstanding.gone) {
            self.return_delivery(&vhost, &outstanding.queue, outstanding.entry_id, false, effects);
            touched.insert(outstanding.queue);
        }
        effects.merge(self.redispatch_channel(key, &touched));
    }

    fn release_delayed(&mut self, vhost_name: &str, exchange_name: &str, effects: &mut Effects) {
        let now_ms = self.now_ms;
        let Some(vhost) = self.vhosts.get_mut(vhost_name) else { return };
        let store_queue = vhost.exchange(exchange_name).and_then(|exchange| exchange.store_queue);
        let Some(hold) = vhost.delayed.get_mut(exchange_name) else { return };
        hold.timer_ms = None;
        while let Some((&(due_ms, _), _)) = hold.due.first_key_value() {
            if due_ms > now_ms {
                hold.timer_ms = Some(due_ms);
                self.timers.insert((
                    due_ms,
                    Timer::Delayed { vhost: vhost_name.to_owned(), exchange: exchange_name.to_owned() },
                ));
                break;
            }
            let Some((_, entry)) = hold.due.pop_first() else { break };
            self.counters.delayed_released += 1;
            effects.transfers.push(Transfer {
                vhost: vhost_name.to_owned(),
                target: TransferTarget::Exchange {
                    exchange: exchange_name.to_owned(),
                    routing_keys: vec![entry.message.routing_key.clone()],
                    fallback: None,
                },
                message: entry.message,
                source: Some(Removed {
                    vhost: vhost_name.to_owned(),
                    queue: exchange_name.to_owned(),
                    store_queue,
                    store_seq: entry.store_seq,
                }),
                reason: None,
            });
        }
    }

    /// A delivery came back unsettled: by `nack`/`reject` with requeue (`explicit`), its channel
    /// closing, or its lease running out. Over the delivery limit it is dead-lettered; after an
    /// explicit requeue on a queue with `x-retry-backoff` it waits its step; otherwise it goes
    /// back to its place.
    fn return_delivery(&mut self, vhost: &str, queue_name: &str, entry_id: u64, explicit: bool, effects: &mut Effects) {
        let now_ms = self.now_ms;
        let Some(queue) = self.vhosts.get_mut(vhost).and_then(|vhost| vhost.queue_mut(queue_name)) else { return };
        match queue.return_unacked(entry_id, explicit) {
            Some(Returned::OverLimit(entry)) => {
                let source = Removed::of(vhost, queue, entry.store_seq);
                dead_letter(
                    vhost,
                    queue,
                    &entry.message,
                    entry.delivery_count,
                    Some(source),
                    DeathReason::DeliveryLimit,
                    now_ms,
                    effects,
                    &mut self.counters,
                );
            }
            Some(Returned::Backoff { wait_ms }) => {
                self.timers.insert((
                    now_ms.saturating_add(wait_ms),
                    Timer::Backoff {
                        vhost: vhost.to_owned(),
                        queue: queue_name.to_owned(),
                        incarnation: queue.incarnation(),
                        id: entry_id,
                    },
                ));
            }
            Some(Returned::Ready) | None => {}
        }
    }

    /// After recovery: messages already delivered as often as their queue's limit allows are
    /// dead-lettered; messages delivered before, in queues with a retry backoff, wait their step
    /// again (the time they had already waited is not known); expiries and `x-expires` are armed.
    pub fn after_recovery(&mut self) -> Effects {
        let now_ms = self.now_ms;
        let mut effects = Effects::default();
        let names: Vec<(String, String)> = self
            .vhosts
            .iter()
            .flat_map(|(vhost, found)| found.queues().map(move |queue| (vhost.clone(), queue.name.clone())))
            .collect();
        for (vhost, queue_name) in names {
            let Some(queue) = self.vhosts.get_mut(&vhost).and_then(|found| found.queue_mut(&queue_name)) else {
                continue;
            };
            for entry in queue.remove_exhausted() {
                let source = Removed::of(&vhost, queue, entry.store_seq);
                dead_letter(
                    &vhost,
                    queue,
                    &entry.message,
                    entry.delivery_count,
                    Some(source),
                    DeathReason::DeliveryLimit,
                    now_ms,
                    &mut effects,
                    &mut self.counters,
                );
            }
            for (id, wait_ms) in queue.hold_retried_for_backoff() {
                let timer = Timer::Backoff {
                    vhost: vhost.clone(),
                    queue: queue_name.clone(),
                    incarnation: queue.incarnation(),
                    id,
                };
                self.timers.insert((now_ms.saturating_add(wait_ms), timer));
            }
            self.touch_queue(&vhost, &queue_name);
            effects.merge(self.dispatch(&vhost, &queue_name));
        }
        effects
    }

    /// Expires a queue's ready messages whose time has come and arms the timer for the next.
    /// `inclusive`: also those due exactly now. Dispatching expires what is overdue first, then
    /// delivers, then expires what is due now: as in RabbitMQ, a message with TTL 0 reaches a
    /// consumer that can take it at once, and is dropped otherwise.
    fn expire_due(&mut self, vhost: &str, queue_name: &str, inclusive: bool, effects: &mut Effects) {
        let now_ms = self.now_ms;
        let Some(queue) = self.vhosts.get_mut(vhost).and_then(|found| found.queue_mut(queue_name)) else { return };
        while let Some(entry) = queue.pop_expired(now_ms, inclusive) {
            self.counters.expired += 1;
            let source = Removed::of(vhost, queue, entry.store_seq);
            dead_letter(
                vhost,
                queue,
                &entry.message,
                entry.delivery_count,
                Some(source),
                DeathReason::Expired,
                now_ms,
                effects,
                &mut self.counters,
            );
        }
        if let Some(at) = queue.arm_expiry_timer() {
            let timer = Timer::Expiry {
                vhost: vhost.to_owned(),
                queue: queue_name.to_owned(),
                incarnation: queue.incarnation(),
            };
            self.timers.insert((at, timer));
        }
    }

    /// Delivers ready messages of a queue to consumers with room, round-robin.
    pub fn dispatch(&mut self, vhost_name: &str, queue_name: &str) -> Effects {
        let mut effects = Effects::default();
        self.expire_due(vhost_name, queue_name, false, &mut effects);
        let now_ms = self.now_ms;
        let Some(queue) = self.vhosts.get_mut(vhost_name).and_then(|vhost| vhost.queue_mut(queue_name)) else {
            return effects;
        };
        let lease_ms = queue.settings.consumer_timeout_ms;
        while queue.has_deliverable() && queue.consumer_count() > 0 {
            let channels = &self.channels;
            let pending_bytes = &self.pending_bytes;
            let has_room = |key: &ChannelKey, tag: &str| {
                let Some(channel) = channels.get(key) else { return false };
                let Some(consumer) = channel.consumers.get(tag) else { return false };
                let consumer_room = consumer.prefetch == 0 || consumer.unacked < u32::from(consumer.prefetch);
                let channel_room =
                    channel.prefetch_channel == 0 || channel.consumer_unacked < u32::from(channel.prefetch_channel);
                let bounded = channel.unacked.len() < UNACKED_PER_CHANNEL_MAX;
                let socket_room =
                    pending_bytes.get(&key.connection).copied().unwrap_or(0) < CONNECTION_PENDING_BYTES_MAX;
                socket_room && (consumer.no_ack || (consumer_room && channel_room && bounded))
            };
            let Some((key, tag)) = queue.next_consumer_with_room(has_room) else { break };
            let Some(channel) = self.channels.get_mut(&key) else { break };
            // The consumer is looked up before its message is taken, so a message is never taken
            // for a consumer that is not there to count it.
            let Some(no_ack) = channel.consumers.get(&tag).map(|consumer| consumer.no_ack) else { break };
            let Some((entry_id, store_seq, delivery)) =
                take_for_delivery(queue, channel, &mut self.pending_bytes, key, Some(tag.clone()), !no_ack)
            else {
                break;
            };
            let delivery_tag = delivery.delivery_tag;
            effects.deliveries.push(delivery);
            if no_ack {
                effects.removed.push(Removed::of(vhost_name, queue, store_seq));
            } else {
                let Some(consumer) = channel.consumers.get_mut(&tag) else { break };
                consumer.unacked += 1;
                channel.consumer_unacked += 1;
                let instance = consumer.instance;
                let lease_due_ms = lease_ms.map(|lease_ms| now_ms.saturating_add(lease_ms));
                channel.unacked.insert(
                    delivery_tag,
                    Outstanding {
                        queue: queue_name.to_owned(),
                        entry_id,
                        consumer: Some((tag, instance)),
                        gone: false,
                        lease_due_ms,
                    },
                );
                if let Some(due_ms) = lease_due_ms {
                    let generation = channel.generation;
                    self.timers.insert((due_ms, Timer::Lease { channel: key, generation, delivery_tag }));
                }
            }
        }
        self.expire_due(vhost_name, queue_name, true, &mut effects);
        effects
    }

    /// `basic.get`: one message or `None` (get-empty).
    pub fn get(&mut self, key: ChannelKey, queue_name: &str, no_ack: bool) -> Result<(Option<Delivery>, Effects)> {
        let vhost_name = self.channel_vhost(key)?;
        let vhost = self.vhosts.get_mut(&vhost_name).ok_or_else(|| channel_not_open(key))?;
        vhost.usable_queue(queue_name, key.connection)?;
        if vhost.queue(queue_name).is_none() {
            return Ok((None, Effects::default()));
        }
        self.touch_queue(&vhost_name, queue_name);
        let mut effects = Effects::default();
        self.expire_due(&vhost_name, queue_name, true, &mut effects);
        let now_ms = self.now_ms;
        let Some(queue) = self.vhosts.get_mut(&vhost_name).and_then(|vhost| vhost.queue_mut(queue_name)) else {
            return Ok((None, effects));
        };
        let channel = self.channels.get_mut(&key).ok_or_else(|| channel_not_open(key))?;
        if !no_ack && channel.unacked.len() >= UNACKED_PER_CHANNEL_MAX {
            return Err(ModelError::resource_error(format!(
                "channel {} holds {UNACKED_PER_CHANNEL_MAX} unacknowledged messages",
                key.channel
            )));
        }
        let Some((entry_id, store_seq, delivery)) =
            take_for_delivery(queue, channel, &mut self.pending_bytes, key, None, !no_ack)
        else {
            return Ok((None, effects));
        };
        if no_ack {
            effects.removed.push(Removed::of(&vhost_name, queue, store_seq));
        } else {
            let lease_due_ms = queue.settings.consumer_timeout_ms.map(|lease_ms| now_ms.saturating_add(lease_ms));
            channel.unacked.insert(
                delivery.delivery_tag,
                Outstanding { queue: queue_name.to_owned(), entry_id, consumer: None, gone: false, lease_due_ms },
            );
            if let Some(due_ms) = lease_due_ms {
                let timer =
                    Timer::Lease { channel: key, generation: channel.generation, delivery_tag: delivery.delivery_tag };
                self.timers.insert((due_ms, timer));
            }
        }
        Ok((Some(delivery), effects))
    }

    /// Takes the outstanding deliveries `delivery_tag` names (all up to it with `multiple`; all
    /// with tag 0 and `multiple`). An unknown tag is 406, as in RabbitMQ.
    fn take_outstanding(&mut self, key: ChannelKey, delivery_tag: u64, multiple: bool) -> Result<Vec<Outstanding>> {
        let channel = self.channels.get_mut(&key).ok_or_else(|| channel_not_open(key))?;
        // Tags whose lease ran out were settled by the broker already: settling them again is
        // ignored and counted, not refused.
        // The tags settled here are the unacked ones up to `upper` (multiple) or `delivery_tag`
        // alone; taken straight out of the map, without collecting them first (once per ack).
        let (lowest, upper) = if multiple {
            let upper = if delivery_tag == 0 { u64::MAX } else { delivery_tag };
            let late = channel.expired_tags.range(..=upper).count();
            if delivery_tag != 0 && channel.unacked.range(..=upper).next().is_none() && late == 0 {
                return Err(ModelError::precondition_failed(format!("unknown delivery tag {delivery_tag}")));
            }
            if late > 0 {
                self.counters.late_settles_ignored += late as u64;
                channel.expired_tags = match upper.checked_add(1) {
                    Some(above) => channel.expired_tags.split_off(&above),
                    None => BTreeSet::new(),
                };
            }
            (0, upper)
        } else if channel.unacked.contains_key(&delivery_tag) {
            (delivery_tag, delivery_tag)
        } else if channel.expired_tags.remove(&delivery_tag) {
            self.counters.late_settles_ignored += 1;
            return Ok(Vec::new());
        } else {
            return Err(ModelError::precondition_failed(format!("unknown delivery tag {delivery_tag}")));
        };
        let mut taken = Vec::new();
        loop {
            let next = channel.unacked.range(lowest..=upper).next().map(|(tag, _)| *tag);
            let Some((tag, outstanding)) = next.and_then(|tag| channel.unacked.remove_entry(&tag)) else { break };
            if let Some(due_ms) = outstanding.lease_due_ms {
                let timer = Timer::Lease { channel: key, generation: channel.generation, delivery_tag: tag };
                self.timers.remove(&(due_ms, timer));
            }
            if let Some((consumer_tag, instance)) = &outstanding.consumer {
                channel.consumer_unacked = channel.consumer_unacked.saturating_sub(1);
                if let Some(consumer) =
                    channel.consumers.get_mut(consumer_tag).filter(|consumer| consumer.instance == *instance)
                {
                    consumer.unacked = consumer.unacked.saturating_sub(1);
                }
            }
            taken.push(outstanding);
        }
        Ok(taken)
    }

    /// Re-dispatches every queue the channel's consumers read from (after room was freed).
    fn redispatch_channel(&mut self, key: ChannelKey, extra: &BTreeSet<String>) -> Effects {
        let mut effects = Effects::default();
        let Some(channel) = self.channels.get(&key) else { return effects };
        let vhost = channel.vhost.clone();
        let mut queues: BTreeSet<String> = channel.consumers.values().map(|consumer| consumer.queue.clone()).collect();
        queues.extend(extra.iter().cloned());
        for queue in queues {
            effects.merge(self.dispatch(&vhost, &queue));
        }
        effects
    }

    /// Checks that a sequence of settlements (delivery tag, `multiple`) would all succeed, without
    /// changing anything: a transaction validates its acks before applying any of them.
    pub fn validate_settles(&self, key: ChannelKey, settles: &[(u64, bool)]) -> Result<()> {
        let channel = self.channels.get(&key).ok_or_else(|| channel_not_open(key))?;
        let mut open: BTreeSet<u64> = channel.unacked.keys().chain(channel.expired_tags.iter()).copied().collect();
        for &(delivery_tag, multiple) in settles {
            if multiple {
                let upper = if delivery_tag == 0 { u64::MAX } else { delivery_tag };
                if delivery_tag != 0 && open.range(..=upper).next().is_none() {
                    return Err(ModelError::precondition_failed(format!("unknown delivery tag {delivery_tag}")));
                }
                open = open.split_off(&upper.saturating_add(1));
            } else if !open.remove(&delivery_tag) {
                return Err(ModelError::precondition_failed(format!("unknown delivery tag {delivery_tag}")));
            }
        }
        Ok(())
    }

    /// `basic.ack`.
    pub fn ack(&mut self, key: ChannelKey, delivery_tag: u64, multiple: bool) -> Result<Effects> {
        let vhost = self.channel_vhost(key)?;
        let taken = self.take_outstanding(key, delivery_tag, multiple)?;
        let mut effects = Effects::default();
        for outstanding in taken.into_iter().filter(|outstanding| !outstanding.gone) {
            if let Some(queue) = self.vhosts.get_mut(&vhost).and_then(|vhost| vhost.queue_mut(&outstanding.queue))
                && let Some(entry) = queue.remove_unacked(outstanding.entry_id)
            {
                effects.removed.push(Removed::of(&vhost, queue, entry.store_seq));
            }
        }
        effects.merge(self.redispatch_channel(key, &BTreeSet::new()));
        Ok(effects)
    }

    /// `basic.nack` and `basic.reject`: with `requeue` back to the queue (redelivered; after the
    /// queue's retry backoff step, if it has one; dead-lettered once over the delivery limit),
    /// else the message leaves, dead-lettered if the queue has a dead-letter exchange.
    pub fn reject(&mut self, key: ChannelKey, delivery_tag: u64, multiple: bool, requeue: bool) -> Result<Effects> {
        let vhost = self.channel_vhost(key)?;
        let taken = self.take_outstanding(key, delivery_tag, multiple)?;
        let now_ms = self.now_ms;
        let mut effects = Effects::default();
        let mut touched = BTreeSet::new();
        for outstanding in taken.into_iter().filter(|outstanding| !outstanding.gone) {
            if requeue {
                self.return_delivery(&vhost, &outstanding.queue, outstanding.entry_id, true, &mut effects);
                touched.insert(outstanding.queue);
                continue;
            }
            let Some(queue) = self.vhosts.get_mut(&vhost).and_then(|vhost| vhost.queue_mut(&outstanding.queue)) else {
                continue;
            };
            if let Some(entry) = queue.remove_unacked(outstanding.entry_id) {
                let source = Removed::of(&vhost, queue, entry.store_seq);
                dead_letter(
                    &vhost,
                    queue,
                    &entry.message,
                    entry.delivery_count,
                    Some(source),
                    DeathReason::Rejected,
                    now_ms,
                    &mut effects,
                    &mut self.counters,
                );
                // With `x-ordered-by` the next message of the key may be deliverable now.
                touched.insert(outstanding.queue);
            }
        }
        effects.merge(self.redispatch_channel(key, &touched));
        Ok(effects)
    }

    /// `basic.recover` (requeue = true): every unacknowledged delivery of the channel goes back.
    /// RabbitMQ does not implement redelivery to the same consumer (requeue = false): 540.
    pub fn recover(&mut self, key: ChannelKey, requeue: bool) -> Result<Effects> {
        if !requeue {
            return Err(ModelError::not_implemented("basic.recover with requeue=false"));
        }
        self.reject(key, 0, true, true)
    }

    /// `queue.purge`: removes the ready messages. Returns how many.
    pub fn purge(&mut self, key: ChannelKey, queue_name: &str) -> Result<(u32, Effects)> {
        let vhost_name = self.channel_vhost(key)?;
        let vhost = self.vhosts.get_mut(&vhost_name).ok_or_else(|| channel_not_open(key))?;
        vhost.usable_queue(queue_name, key.connection)?;
        let Some(queue) = vhost.queue_mut(queue_name) else { return Ok((0, Effects::default())) };
        let purged = queue.take_ready_all();
        let mut effects = Effects::default();
        for entry in &purged {
            effects.removed.push(Removed::of(&vhost_name, queue, entry.store_seq));
        }
        Ok((purged.len() as u32, effects))
    }

    /// `queue.delete`: 406 if `if_unused` and it has consumers, or `if_empty` and it holds
    /// messages. Deleting a missing queue succeeds with 0 (as RabbitMQ). Returns the message count.
    pub fn delete_queue(
        &mut self,
        key: ChannelKey,
        queue_name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<(u32, Effects)> {
        let vhost_name = self.channel_vhost(key)?;
        let vhost = self.vhosts.get(&vhost_name).ok_or_else(|| channel_not_open(key))?;
        let Some(queue) = vhost.queue(queue_name) else { return Ok((0, Effects::default())) };
        vhost.check_exclusive(queue, key.connection)?;
        if if_unused && queue.consumer_count() > 0 {
            return Err(ModelError::precondition_failed(format!(
                "queue '{queue_name}' in vhost '{vhost_name}' in use"
            )));
        }
        if if_empty && queue.ready_count() + queue.unacked_count() > 0 {
            return Err(ModelError::precondition_failed(format!(
                "queue '{queue_name}' in vhost '{vhost_name}' not empty"
            )));
        }
        let count = queue.ready_count() as u32;
        Ok((count, self.remove_queue(&vhost_name, queue_name)))
    }

    /// The entries of a queue, ready, waiting and unacknowledged (for inspection and tests).
    pub fn queue_entries(&self, vhost: &str, queue: &str) -> Vec<Entry> {
        self.vhosts
            .get(vhost)
            .and_then(|vhost| vhost.queue(queue))
            .map(|queue| queue.entries().collect())
            .unwrap_or_default()
    }

    /// Messages a delayed-message exchange holds, with their due times (for inspection and tests).
    pub fn delayed_messages(&self, vhost: &str, exchange: &str) -> Vec<(u64, Arc<Message>)> {
        self.vhosts
            .get(vhost)
            .and_then(|vhost| vhost.delayed.get(exchange))
            .map(|hold| hold.due.iter().map(|((due_ms, _), entry)| (*due_ms, Arc::clone(&entry.message))).collect())
            .unwrap_or_default()
    }

    /// True if `exchange` is a delayed-message exchange.
    pub fn is_delayed_exchange(&self, vhost: &str, exchange: &str) -> bool {
        self.vhosts
            .get(vhost)
            .and_then(|vhost| vhost.exchange(exchange))
            .is_some_and(|exchange| exchange.kind == ExchangeKind::DelayedMessage)
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
    let moved =
        deadletter::dead_lettered(message, &queue.name, reason, now_ms, delivery_count, &exchange, &routing_key);
    effects.transfers.push(Transfer {
        vhost: vhost.to_owned(),
        message: Arc::new(moved),
        target,
        source,
        reason: Some(reason),
    });
}
