//! Channels and consumers: opening and closing channels and whole connections, `basic.qos`,
//! `basic.consume` and `basic.cancel`. A channel owns its unacknowledged deliveries and its
//! consumers' prefetch counts, so closing one (or its connection) is where those deliveries go
//! back to their queues and those consumers leave them.

use super::timers::Timer;
use super::{
    BrokerModel, CONNECTION_PENDING_BYTES_MAX, CONSUMERS_PER_CHANNEL_MAX, Effects, ReplicatedOp, channel_not_open,
};
use crate::error::{ModelError, Result};
use crate::queue::{ChannelKey, ConnectionId};
use crate::trace::{RequeueCause, TraceKind};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A consumer, as its channel counts it.
#[derive(Debug)]
pub(super) struct Consumer {
    /// Distinguishes this consumer from an earlier one that had the same tag: deliveries made to
    /// a cancelled consumer must not count against its successor's prefetch.
    pub(super) instance: u64,
    pub(super) queue: String,
    pub(super) no_ack: bool,
    pub(super) prefetch: u16,
    pub(super) unacked: u32,
}

/// A delivery its channel has not settled yet, by delivery tag.
#[derive(Debug)]
pub(super) struct Outstanding {
    pub(super) queue: String,
    pub(super) entry_id: u64,
    /// The consumer (tag and instance) it was delivered to; `None` for `basic.get`.
    pub(super) consumer: Option<(String, u64)>,
    /// Its queue was deleted: settling it only frees the slot.
    pub(super) gone: bool,
    /// When its lease runs out.
    pub(super) lease_due_ms: Option<u64>,
    /// The lease is the queue's own (`x-consumer-timeout`): it has a timer of its own, removed when
    /// it is settled. A lease by the vhost's default timeout has none: one sweep timer serves them
    /// all (see `timers.rs`), which keeps the default off the per-message path.
    pub(super) own_lease_timer: bool,
    /// When it was delivered (for the message's trace, if it comes back unsettled).
    pub(super) delivered_at_ms: u64,
    /// From a quorum queue (`entry_id` is the message's id there): settling it is a command
    /// for the queue's group, not a change of the model's queue.
    pub(super) replicated: bool,
}

/// An open channel: its deliveries not yet settled, its consumers and their prefetch.
#[derive(Debug)]
pub(super) struct Channel {
    pub(super) vhost: String,
    pub(super) prefetch_channel: u16,
    pub(super) prefetch_consumer: u16,
    pub(super) next_delivery_tag: u64,
    pub(super) unacked: BTreeMap<u64, Outstanding>,
    pub(super) consumers: HashMap<String, Consumer>,
    pub(super) consumer_unacked: u32,
    pub(super) generated_tags: u64,
    pub(super) consumer_instances: u64,
    /// Delivery tags whose lease ran out (their message was requeued); settling one is ignored.
    pub(super) expired_tags: BTreeSet<u64>,
    /// Distinguishes this opening of the channel from earlier ones with the same number.
    pub(super) generation: u64,
    /// Its direct reply-to consumer (`direct_reply.rs`).
    pub(super) reply_consumer: Option<super::direct_reply::ReplyConsumer>,
    /// The queues held elsewhere (quorum or homed) it consumed from or got from: when it closes,
    /// each hears so (a `Down`), even if the channel holds nothing of theirs by then, so what the
    /// other side keeps for the channel (a cluster proxy, a get consumer) goes too.
    pub(super) replicated_queues: BTreeSet<String>,
}

impl BrokerModel {
    /// The vhost an open channel is bound to, or the error for a channel that is not open.
    pub(super) fn channel_vhost(&self, key: ChannelKey) -> Result<String> {
        self.channels.get(&key).map(|channel| channel.vhost.clone()).ok_or_else(|| channel_not_open(key))
    }

    /// Opens a channel on a connection bound to `vhost`.
    pub fn open_channel(&mut self, key: ChannelKey, vhost: &str) -> Result<()> {
        self.open_channel_from(key, vhost, 1)
    }

    /// Opens a channel whose first delivery tag is `first_delivery_tag`: a cluster's proxy
    /// channel opened again for the same remote channel continues above the tags it gave before,
    /// so a late settle of an earlier delivery can never name a later one.
    pub fn open_channel_from(&mut self, key: ChannelKey, vhost: &str, first_delivery_tag: u64) -> Result<()> {
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
                next_delivery_tag: first_delivery_tag.max(1),
                unacked: BTreeMap::new(),
                consumers: HashMap::new(),
                consumer_unacked: 0,
                generated_tags: 0,
                consumer_instances: 0,
                expired_tags: BTreeSet::new(),
                generation,
                reply_consumer: None,
                replicated_queues: BTreeSet::new(),
            },
        );
        Ok(())
    }

    /// Notes that an open channel is about to get from a queue held elsewhere (see
    /// `Channel::replicated_queues`): before the call, so that a get whose answer is lost is
    /// still followed by the channel's `Down` when it closes.
    pub fn touch_replicated(&mut self, key: ChannelKey, queue: &str) {
        if let Some(channel) = self.channels.get_mut(&key) {
            channel.replicated_queues.insert(queue.to_owned());
        }
    }

    /// The tag an open channel's next delivery will have.
    pub fn next_delivery_tag(&self, key: ChannelKey) -> Option<u64> {
        self.channels.get(&key).map(|channel| channel.next_delivery_tag)
    }

    /// Whether a consumer with `tag` is on an open channel.
    pub fn has_consumer(&self, key: ChannelKey, tag: &str) -> bool {
        self.channels.get(&key).is_some_and(|channel| channel.consumers.contains_key(tag))
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
    pub(super) fn release_channels(&mut self, closed: Vec<(ChannelKey, Channel)>) -> Effects {
        let mut effects = Effects::default();
        let mut touched = BTreeSet::new();
        for (key, channel) in closed {
            // Quorum queues' consumers of this channel, cancelled ones that still hold deliveries
            // included: each is down, and its group returns what it held.
            let mut replicated_down = BTreeSet::new();
            for (delivery_tag, outstanding) in channel.unacked {
                if let Some(due_ms) = outstanding.lease_due_ms.filter(|_| outstanding.own_lease_timer) {
                    self.timers
                        .remove(&(due_ms, Timer::Lease { channel: key, generation: channel.generation, delivery_tag }));
                }
                if outstanding.gone {
                    continue;
                }
                if outstanding.replicated {
                    // A get's message is held by the channel's get consumer, tag "".
                    let tag = outstanding.consumer.map(|(tag, _)| tag).unwrap_or_default();
                    replicated_down.insert((outstanding.queue, tag));
                    continue;
                }
                let requeued = TraceKind::Requeued(RequeueCause::ChannelClosed);
                self.note_delivery(&channel.vhost, key, &outstanding, requeued);
                self.return_delivery(&channel.vhost, &outstanding.queue, outstanding.entry_id, false, &mut effects);
                touched.insert((channel.vhost.clone(), outstanding.queue));
            }
            for (tag, consumer) in channel.consumers {
                if self.is_replicated(&channel.vhost, &consumer.queue) {
                    replicated_down.insert((consumer.queue.clone(), tag.clone()));
                }
                self.detach_consumer(&channel.vhost, &consumer.queue, key, &tag, &mut effects);
                touched.insert((channel.vhost.clone(), consumer.queue));
            }
            for queue in channel.replicated_queues {
                if !replicated_down.iter().any(|(downed, _)| *downed == queue) {
                    replicated_down.insert((queue, String::new()));
                }
            }
            for (queue, tag) in replicated_down {
                effects.replicated.push(ReplicatedOp::Down { vhost: channel.vhost.clone(), queue, channel: key, tag });
            }
        }
        for (vhost, queue) in touched {
            effects.merge(self.dispatch(&vhost, &queue));
        }
        effects
    }

    /// Closes every channel of a connection and deletes the queues it owned exclusively.
    pub fn close_connection(&mut self, connection: ConnectionId) -> Effects {
        self.pending_bytes.remove(&connection);
        // Its name (`connection_names`) stays until its deliveries are back in their queues:
        // their traces name it.
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
        self.connection_names.remove(&connection);
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

    /// `basic.consume` with the default consumer priority. Returns the consumer tag (generated
    /// if empty) and the first deliveries.
    pub fn consume(
        &mut self,
        key: ChannelKey,
        queue_name: &str,
        tag: &str,
        no_ack: bool,
        exclusive: bool,
    ) -> Result<(String, Effects)> {
        self.consume_with_priority(key, queue_name, tag, no_ack, exclusive, 0)
    }

    /// `basic.consume` with a consumer priority (its `x-priority` argument, see
    /// [`crate::settings::consumer_priority`]).
    pub fn consume_with_priority(
        &mut self,
        key: ChannelKey,
        queue_name: &str,
        tag: &str,
        no_ack: bool,
        exclusive: bool,
        priority: i32,
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
        let prefetch = channel.prefetch_consumer;
        if let Some(queue) = self.vhosts.get_mut(&vhost_name).and_then(|vhost| vhost.queue_mut(queue_name)) {
            queue.attach_consumer(key, &tag, exclusive, priority, self.now_ms);
        }
        let mut effects = self.dispatch(&vhost_name, queue_name);
        if self.is_replicated(&vhost_name, queue_name) {
            if let Some(channel) = self.channels.get_mut(&key) {
                channel.replicated_queues.insert(queue_name.to_owned());
            }
            effects.replicated.push(ReplicatedOp::Checkout {
                vhost: vhost_name,
                queue: queue_name.to_owned(),
                channel: key,
                tag: tag.clone(),
                prefetch,
            });
        }
        Ok((tag, effects))
    }

    /// `basic.cancel`. Cancelling an unknown tag is a no-op (as RabbitMQ). Unacknowledged
    /// deliveries of the consumer stay unacknowledged on the channel.
    pub fn cancel(&mut self, key: ChannelKey, tag: &str) -> Result<Effects> {
        if self.cancel_reply_consumer(key, tag) {
            return Ok(Effects::default());
        }
        let channel = self.channels.get_mut(&key).ok_or_else(|| channel_not_open(key))?;
        let Some(consumer) = channel.consumers.remove(tag) else { return Ok(Effects::default()) };
        let vhost = channel.vhost.clone();
        let mut effects = Effects::default();
        self.detach_consumer(&vhost, &consumer.queue, key, tag, &mut effects);
        if self.is_replicated(&vhost, &consumer.queue) {
            effects.replicated.push(ReplicatedOp::Cancel {
                vhost,
                queue: consumer.queue,
                channel: key,
                tag: tag.to_owned(),
            });
        }
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
}
