//! Delivery: handing ready messages to consumers with room (round-robin, prefetch, the
//! per-channel and per-connection bounds) and answering `basic.get`. Every delivery is made
//! here, so what a delivery carries and what it counts against are decided in one place.

use super::channels::Outstanding;
use super::timers::Timer;
use super::{
    BrokerModel, CONNECTION_PENDING_BYTES_MAX, Delivery, Effects, Removed, UNACKED_PER_CHANNEL_MAX, channel_not_open,
    delivery_bytes,
};
use crate::error::{ModelError, Result};
use crate::queue::{ChannelKey, ConnectionId, Queue};
use std::sync::Arc;
use wharf_wire::types::AMQPValue;

impl BrokerModel {
    /// Delivers ready messages of a queue to consumers with room, round-robin.
    pub fn dispatch(&mut self, vhost_name: &str, queue_name: &str) -> Effects {
        let mut effects = Effects::default();
        self.expire_due(vhost_name, queue_name, false, &mut effects);
        let now_ms = self.now_ms;
        let Some(vhost) = self.vhosts.get_mut(vhost_name) else { return effects };
        let default_lease_ms = vhost.default_consumer_timeout_ms();
        let Some(queue) = vhost.queue_mut(queue_name) else { return effects };
        let (lease_ms, own_lease_timer) = lease_of(queue, default_lease_ms);
        let mut default_lease_due_ms = None;
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
            // The consumer is found before its message is taken, so a message is never taken for
            // a consumer that is not there to count it.
            let Some(consumer) = channel.consumers.get_mut(&tag) else { break };
            let Some((entry_id, delivery)) = take_for_delivery(
                queue,
                &mut channel.next_delivery_tag,
                &mut self.pending_bytes,
                key,
                Some(tag.clone()),
                !consumer.no_ack,
            ) else {
                break;
            };
            let mut delivery = delivery;
            let delivery_tag = delivery.delivery_tag;
            if consumer.no_ack {
                self.counters.delivered_consume_auto_ack += 1;
            } else {
                self.counters.delivered_consume_manual_ack += 1;
            }
            self.counters.redelivered += u64::from(delivery.redelivered);
            if consumer.no_ack {
                remove_no_ack(vhost_name, queue, &mut delivery, &mut effects);
            }
            effects.deliveries.push(delivery);
            if !consumer.no_ack {
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
                        own_lease_timer,
                        delivered_at_ms: now_ms,
                        replicated: false,
                    },
                );
                match lease_due_ms {
                    Some(due_ms) if own_lease_timer => {
                        let generation = channel.generation;
                        self.timers.insert((due_ms, Timer::Lease { channel: key, generation, delivery_tag }));
                    }
                    Some(due_ms) => default_lease_due_ms = default_lease_due_ms.or(Some(due_ms)),
                    None => {}
                }
            }
        }
        if let Some(due_ms) = default_lease_due_ms {
            self.arm_default_leases(due_ms);
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
        let Some(vhost) = self.vhosts.get_mut(&vhost_name) else { return Ok((None, effects)) };
        let default_lease_ms = vhost.default_consumer_timeout_ms();
        let Some(queue) = vhost.queue_mut(queue_name) else { return Ok((None, effects)) };
        let channel = self.channels.get_mut(&key).ok_or_else(|| channel_not_open(key))?;
        if !no_ack && channel.unacked.len() >= UNACKED_PER_CHANNEL_MAX {
            return Err(ModelError::resource_error(format!(
                "channel {} holds {UNACKED_PER_CHANNEL_MAX} unacknowledged messages",
                key.channel
            )));
        }
        let Some((entry_id, mut delivery)) =
            take_for_delivery(queue, &mut channel.next_delivery_tag, &mut self.pending_bytes, key, None, !no_ack)
        else {
            self.counters.get_empty += 1;
            queue.count_get_empty();
            return Ok((None, effects));
        };
        if no_ack {
            self.counters.delivered_get_auto_ack += 1;
        } else {
            self.counters.delivered_get_manual_ack += 1;
        }
        self.counters.redelivered += u64::from(delivery.redelivered);
        if no_ack {
            remove_no_ack(&vhost_name, queue, &mut delivery, &mut effects);
        } else {
            let (lease_ms, own_lease_timer) = lease_of(queue, default_lease_ms);
            let lease_due_ms = lease_ms.map(|lease_ms| now_ms.saturating_add(lease_ms));
            let outstanding = Outstanding {
                queue: queue_name.to_owned(),
                entry_id,
                consumer: None,
                gone: false,
                lease_due_ms,
                own_lease_timer,
                delivered_at_ms: now_ms,
                replicated: false,
            };
            channel.unacked.insert(delivery.delivery_tag, outstanding);
            match lease_due_ms {
                Some(due_ms) if own_lease_timer => {
                    let timer = Timer::Lease {
                        channel: key,
                        generation: channel.generation,
                        delivery_tag: delivery.delivery_tag,
                    };
                    self.timers.insert((due_ms, timer));
                }
                Some(due_ms) => self.arm_default_leases(due_ms),
                None => {}
            }
        }
        Ok((Some(delivery), effects))
    }
}

/// A queue's lease: its own `x-consumer-timeout` (with a timer per delivery), or the vhost's
/// default (served by the sweep timer).
fn lease_of(queue: &Queue, default_lease_ms: Option<u64>) -> (Option<u64>, bool) {
    match queue.settings.consumer_timeout_ms {
        Some(lease_ms) => (Some(lease_ms), true),
        None => (default_lease_ms, false),
    }
}

/// A no-ack delivery takes its message out of the queue for good: a message in memory is removed
/// from the store at once; a paged-out one once its body was read for the delivery (the delivery
/// says so), so its record cannot be deleted before the read.
fn remove_no_ack(vhost: &str, queue: &Queue, delivery: &mut Delivery, effects: &mut Effects) {
    if delivery.message.paged().is_some() && delivery.store.is_some() {
        delivery.remove_record_after_read = true;
    } else {
        effects.removed.push(Removed { vhost: vhost.to_owned(), queue: queue.name.clone(), stored: delivery.store });
    }
}

/// Takes the next deliverable message of a queue for a delivery on channel `key` (kept as
/// unacknowledged if `acknowledged`; gone for good otherwise): the queue counts the delivery (a
/// redelivery carries `x-delivery-count`, the deliveries before it); the connection is charged
/// its pending bytes and the channel's next delivery tag assigned. Returns the entry's id with
/// the delivery.
fn take_for_delivery(
    queue: &mut Queue,
    next_delivery_tag: &mut u64,
    pending_bytes: &mut foldhash::HashMap<ConnectionId, u64>,
    key: ChannelKey,
    consumer_tag: Option<String>,
    acknowledged: bool,
) -> Option<(u64, Delivery)> {
    let delivered = queue.deliver_next(acknowledged)?;
    queue.count_delivery(consumer_tag.is_some(), acknowledged, delivered.redelivered);
    let deliveries_before = delivered.delivery_count - 1;
    let message = if deliveries_before > 0 {
        Arc::new(
            delivered.message.with_header("x-delivery-count", AMQPValue::LongLongInt(i64::from(deliveries_before))),
        )
    } else {
        delivered.message
    };
    *pending_bytes.entry(key.connection).or_insert(0) += delivery_bytes(&message);
    let delivery_tag = *next_delivery_tag;
    *next_delivery_tag += 1;
    let delivery = Delivery {
        channel: key,
        consumer_tag,
        delivery_tag,
        redelivered: delivered.redelivered,
        queue: queue.name.clone(),
        message,
        message_count: queue.ready_count() as u32,
        delivery_count: delivered.delivery_count,
        store: queue.stored_at(delivered.store_seq, delivered.transient_record),
        remove_record_after_read: false,
        store_transient: delivered.transient_record,
    };
    Some((delivered.id, delivery))
}
