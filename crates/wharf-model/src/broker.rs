//! [`BrokerModel`]: the whole broker's state machine: vhosts, channels, consumers, prefetch,
//! deliveries and acknowledgements. Every operation returns the [`Effects`] the runtime must carry
//! out (deliveries to send, messages to remove from the store, consumers cancelled by the server,
//! queues deleted). No I/O and no clock, so it can be driven exhaustively by tests.
//!
//! Prefetch follows RabbitMQ: `basic.qos` with `global = false` limits each consumer created
//! afterwards on the channel; with `global = true` it limits all consumers of the channel
//! together. `0` means no limit. Dispatch is round-robin over consumers that have room.

use crate::error::{ModelError, Result};
use crate::exchange::Exchange;
use crate::message::Message;
use crate::queue::{ChannelKey, ConnectionId, Entry, Queue};
use crate::vhost::VirtualHost;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

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
    fn of(vhost: &str, queue: &Queue, entry: &Entry) -> Removed {
        Removed {
            vhost: vhost.to_owned(),
            queue: queue.name.clone(),
            store_queue: queue.store_queue,
            store_seq: entry.store_seq,
        }
    }
}

/// Takes the head of a queue's ready messages for a delivery on `channel`: counts the delivery,
/// charges the connection's pending bytes and assigns the channel's next delivery tag.
fn take_for_delivery(
    queue: &mut Queue,
    channel: &mut Channel,
    pending_bytes: &mut HashMap<ConnectionId, u64>,
    key: ChannelKey,
    consumer_tag: Option<String>,
) -> Option<(Entry, Delivery)> {
    let (_, mut entry) = queue.ready.pop_first()?;
    entry.delivery_count += 1;
    *pending_bytes.entry(key.connection).or_insert(0) += delivery_bytes(&entry.message);
    let delivery_tag = channel.next_delivery_tag;
    channel.next_delivery_tag += 1;
    let delivery = Delivery {
        channel: key,
        consumer_tag,
        delivery_tag,
        redelivered: entry.redelivered,
        queue: queue.name.clone(),
        message: Arc::clone(&entry.message),
        message_count: queue.ready.len() as u32,
        delivery_count: entry.delivery_count,
        store: queue.store_queue.zip(entry.store_seq),
    };
    Some((entry, delivery))
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
}

impl Effects {
    fn merge(&mut self, other: Effects) {
        self.deliveries.extend(other.deliveries);
        self.removed.extend(other.removed);
        self.cancelled.extend(other.cancelled);
        self.deleted_queues.extend(other.deleted_queues);
        self.deleted_exchanges.extend(other.deleted_exchanges);
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
}

/// The broker's state.
#[derive(Debug)]
pub struct BrokerModel {
    vhosts: BTreeMap<String, VirtualHost>,
    channels: HashMap<ChannelKey, Channel>,
    seed: u64,
    /// Message bytes dispatched to each connection and not yet reported written.
    pending_bytes: HashMap<ConnectionId, u64>,
}

/// What a delivery weighs against `CONNECTION_PENDING_BYTES_MAX`.
pub fn delivery_bytes(message: &Message) -> u64 {
    (message.body.len() + message.raw_properties.len()) as u64
}

fn channel_not_open(key: ChannelKey) -> ModelError {
    ModelError::command_invalid(format!("channel {} is not open", key.channel))
}

impl BrokerModel {
    /// A broker with the default vhost `/`. `seed` makes generated names unique across restarts.
    pub fn new(seed: u64) -> Self {
        let mut model =
            BrokerModel { vhosts: BTreeMap::new(), channels: HashMap::new(), seed, pending_bytes: HashMap::new() };
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
            for outstanding in channel.unacked.into_values().filter(|outstanding| !outstanding.gone) {
                if let Some(queue) =
                    self.vhosts.get_mut(&channel.vhost).and_then(|vhost| vhost.queue_mut(&outstanding.queue))
                {
                    queue.requeue(outstanding.entry_id);
                    touched.insert((channel.vhost.clone(), outstanding.queue));
                }
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
        if queue.exclusive_consumer.is_some() || (exclusive && queue.consumer_count() > 0) {
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
            queue.consumers.push((key, tag.clone()));
            queue.had_consumer = true;
            if exclusive {
                queue.exclusive_consumer = Some((key, tag.clone()));
            }
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
        queue.consumers.retain(|(owner, consumer_tag)| !(*owner == key && consumer_tag == tag));
        if queue.exclusive_consumer.as_ref().is_some_and(|(owner, consumer_tag)| *owner == key && consumer_tag == tag) {
            queue.exclusive_consumer = None;
        }
        if queue.next_consumer >= queue.consumers.len() {
            queue.next_consumer = 0;
        }
        if queue.auto_delete && queue.had_consumer && queue.consumers.is_empty() {
            effects.merge(self.remove_queue(vhost, queue_name));
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
        for (key, tag) in std::mem::take(&mut queue.consumers) {
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
            effects.removed.push(Removed::of(vhost_name, &queue, &entry));
        }
        effects.deleted_queues.push(DeletedQueue {
            vhost: vhost_name.to_owned(),
            name: queue_name.to_owned(),
            durable: queue.durable,
            store_queue: queue.store_queue,
        });
        effects
    }

    /// Puts a routed message in a queue and dispatches. `store_seq` is set when the store holds it.
    pub fn enqueue(&mut self, vhost: &str, queue_name: &str, message: Arc<Message>, store_seq: Option<u64>) -> Effects {
        match self.vhosts.get_mut(vhost).and_then(|vhost| vhost.queue_mut(queue_name)) {
            Some(queue) => {
                queue.enqueue(message, store_seq);
                self.dispatch(vhost, queue_name)
            }
            None => Effects::default(),
        }
    }

    /// Delivers ready messages of a queue to consumers with room, round-robin.
    pub fn dispatch(&mut self, vhost_name: &str, queue_name: &str) -> Effects {
        let mut effects = Effects::default();
        let Some(queue) = self.vhosts.get_mut(vhost_name).and_then(|vhost| vhost.queue_mut(queue_name)) else {
            return effects;
        };
        while !queue.ready.is_empty() && !queue.consumers.is_empty() {
            // Find the next consumer with room, starting after the last one served.
            let count = queue.consumers.len();
            let mut chosen = None;
            for step in 0..count {
                let index = (queue.next_consumer + step) % count;
                let (key, tag) = &queue.consumers[index];
                let Some(channel) = self.channels.get(key) else { continue };
                let Some(consumer) = channel.consumers.get(tag) else { continue };
                let consumer_room = consumer.prefetch == 0 || consumer.unacked < u32::from(consumer.prefetch);
                let channel_room =
                    channel.prefetch_channel == 0 || channel.consumer_unacked < u32::from(channel.prefetch_channel);
                let bounded = channel.unacked.len() < UNACKED_PER_CHANNEL_MAX;
                let socket_room =
                    self.pending_bytes.get(&key.connection).copied().unwrap_or(0) < CONNECTION_PENDING_BYTES_MAX;
                if socket_room && (consumer.no_ack || (consumer_room && channel_room && bounded)) {
                    chosen = Some(index);
                    break;
                }
            }
            let Some(index) = chosen else { break };
            queue.next_consumer = (index + 1) % count;
            let (key, tag) = queue.consumers[index].clone();
            let Some(channel) = self.channels.get_mut(&key) else { break };
            if !channel.consumers.contains_key(&tag) {
                break;
            }
            let Some((entry, delivery)) =
                take_for_delivery(queue, channel, &mut self.pending_bytes, key, Some(tag.clone()))
            else {
                break;
            };
            let delivery_tag = delivery.delivery_tag;
            effects.deliveries.push(delivery);
            let Some(consumer) = channel.consumers.get_mut(&tag) else { break };
            if consumer.no_ack {
                effects.removed.push(Removed::of(vhost_name, queue, &entry));
            } else {
                consumer.unacked += 1;
                channel.consumer_unacked += 1;
                let instance = consumer.instance;
                channel.unacked.insert(
                    delivery_tag,
                    Outstanding {
                        queue: queue_name.to_owned(),
                        entry_id: entry.id,
                        consumer: Some((tag, instance)),
                        gone: false,
                    },
                );
                queue.unacked.insert(entry.id, entry);
            }
        }
        effects
    }

    /// `basic.get`: one message or `None` (get-empty).
    pub fn get(&mut self, key: ChannelKey, queue_name: &str, no_ack: bool) -> Result<(Option<Delivery>, Effects)> {
        let vhost_name = self.channel_vhost(key)?;
        let vhost = self.vhosts.get_mut(&vhost_name).ok_or_else(|| channel_not_open(key))?;
        vhost.usable_queue(queue_name, key.connection)?;
        let Some(queue) = vhost.queue_mut(queue_name) else { return Ok((None, Effects::default())) };
        let channel = self.channels.get_mut(&key).ok_or_else(|| channel_not_open(key))?;
        if !no_ack && channel.unacked.len() >= UNACKED_PER_CHANNEL_MAX {
            return Err(ModelError::resource_error(format!(
                "channel {} holds {UNACKED_PER_CHANNEL_MAX} unacknowledged messages",
                key.channel
            )));
        }
        let Some((entry, delivery)) = take_for_delivery(queue, channel, &mut self.pending_bytes, key, None) else {
            return Ok((None, Effects::default()));
        };
        let mut effects = Effects::default();
        if no_ack {
            effects.removed.push(Removed::of(&vhost_name, queue, &entry));
        } else {
            channel.unacked.insert(
                delivery.delivery_tag,
                Outstanding { queue: queue_name.to_owned(), entry_id: entry.id, consumer: None, gone: false },
            );
            queue.unacked.insert(entry.id, entry);
        }
        Ok((Some(delivery), effects))
    }

    /// Takes the outstanding deliveries `delivery_tag` names (all up to it with `multiple`; all
    /// with tag 0 and `multiple`). An unknown tag is 406, as in RabbitMQ.
    fn take_outstanding(&mut self, key: ChannelKey, delivery_tag: u64, multiple: bool) -> Result<Vec<Outstanding>> {
        let channel = self.channels.get_mut(&key).ok_or_else(|| channel_not_open(key))?;
        let tags: Vec<u64> = if multiple {
            let upper = if delivery_tag == 0 { u64::MAX } else { delivery_tag };
            if delivery_tag != 0
                && !channel.unacked.contains_key(&delivery_tag)
                && channel.unacked.range(..=upper).next().is_none()
            {
                return Err(ModelError::precondition_failed(format!("unknown delivery tag {delivery_tag}")));
            }
            channel.unacked.range(..=upper).map(|(tag, _)| *tag).collect()
        } else if channel.unacked.contains_key(&delivery_tag) {
            vec![delivery_tag]
        } else {
            return Err(ModelError::precondition_failed(format!("unknown delivery tag {delivery_tag}")));
        };
        let mut taken = Vec::with_capacity(tags.len());
        for tag in tags {
            if let Some(outstanding) = channel.unacked.remove(&tag) {
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
        let mut open: BTreeSet<u64> = channel.unacked.keys().copied().collect();
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
                && let Some(entry) = queue.unacked.remove(&outstanding.entry_id)
            {
                effects.removed.push(Removed::of(&vhost, queue, &entry));
            }
        }
        effects.merge(self.redispatch_channel(key, &BTreeSet::new()));
        Ok(effects)
    }

    /// `basic.nack` and `basic.reject`: back to the queue (redelivered) with `requeue`, else the
    /// message leaves (dead-lettering arrives with the delivery-guarantees work).
    pub fn reject(&mut self, key: ChannelKey, delivery_tag: u64, multiple: bool, requeue: bool) -> Result<Effects> {
        let vhost = self.channel_vhost(key)?;
        let taken = self.take_outstanding(key, delivery_tag, multiple)?;
        let mut effects = Effects::default();
        let mut touched = BTreeSet::new();
        for outstanding in taken.into_iter().filter(|outstanding| !outstanding.gone) {
            let Some(queue) = self.vhosts.get_mut(&vhost).and_then(|vhost| vhost.queue_mut(&outstanding.queue)) else {
                continue;
            };
            if requeue {
                queue.requeue(outstanding.entry_id);
                touched.insert(outstanding.queue);
            } else if let Some(entry) = queue.unacked.remove(&outstanding.entry_id) {
                effects.removed.push(Removed::of(&vhost, queue, &entry));
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
        let purged = queue.take_ready();
        let mut effects = Effects::default();
        for entry in &purged {
            effects.removed.push(Removed::of(&vhost_name, queue, entry));
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

    /// The entries of a queue, ready and unacknowledged (for inspection and tests).
    pub fn queue_entries(&self, vhost: &str, queue: &str) -> Vec<Entry> {
        self.vhosts
            .get(vhost)
            .and_then(|vhost| vhost.queue(queue))
            .map(|queue| queue.ready.values().chain(queue.unacked.values()).cloned().collect())
            .unwrap_or_default()
    }
}
