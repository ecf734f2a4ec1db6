//! Quorum queues' consumers on this node's channels. The messages are the queue's replicated
//! state machine's (`crate::quorum`): a consumer of a quorum queue is attached to the model's
//! (empty) queue only to be counted, and what its channel does with it comes out as
//! [`ReplicatedOp`]s (checkout, cancel, down, settle) that the runtime turns into commands for
//! the queue's group. A delivery the group assigned to a consumer here comes in through
//! [`BrokerModel::deliver_replicated`], which gives it the channel's next delivery tag, so a
//! channel's tags, `multiple` acks and unacknowledged limit cover both kinds of queue alike.

use super::channels::Outstanding;
use super::{BrokerModel, Delivery, Effects, UNACKED_PER_CHANNEL_MAX, delivery_bytes};
use crate::message::Message;
use crate::queue::ChannelKey;
use std::sync::Arc;

/// How a delivery from a quorum queue was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicatedOutcome {
    /// Acknowledged (or delivered with no-ack).
    Settled,
    /// Rejected or nacked with requeue.
    Returned,
    /// Rejected or nacked without requeue.
    Discarded,
}

/// What a channel did with a quorum queue's consumer or delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicatedOp {
    /// `basic.consume`, with the consumer's prefetch (0: none).
    Checkout { vhost: String, queue: String, channel: ChannelKey, tag: String, prefetch: u16 },
    /// `basic.cancel`: no more deliveries; what it holds stays with it.
    Cancel { vhost: String, queue: String, channel: ChannelKey, tag: String },
    /// Its channel closed: what it held goes back.
    Down { vhost: String, queue: String, channel: ChannelKey, tag: String },
    /// A delivery settled.
    Settle { vhost: String, queue: String, channel: ChannelKey, tag: String, id: u64, outcome: ReplicatedOutcome },
}

impl ReplicatedOp {
    pub(super) fn settle(
        vhost: &str,
        channel: ChannelKey,
        outstanding: Outstanding,
        outcome: ReplicatedOutcome,
    ) -> Self {
        ReplicatedOp::Settle {
            vhost: vhost.to_owned(),
            queue: outstanding.queue,
            channel,
            tag: outstanding.consumer.map(|(tag, _)| tag).unwrap_or_default(),
            id: outstanding.entry_id,
            outcome,
        }
    }
}

/// Quorum queues' consumers on this node's channels by (vhost, queue): (channel, tag, prefetch).
pub type ConsumersByQueue = std::collections::HashMap<(String, String), Vec<(ChannelKey, String, u16)>>;

/// Quorum queues' deliveries unacknowledged on this node's channels by (vhost, queue): (channel,
/// consumer tag (`""` for a `basic.get`), message id).
pub type UnackedByQueue =
    std::collections::HashMap<(String, String), std::collections::HashSet<(ChannelKey, String, u64)>>;

/// Where a consumer a quorum queue's group names stands on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicatedStanding {
    /// Its channel is closed (what it holds goes back with a `Down`).
    ChannelGone,
    /// Its channel is open but has no such consumer of the queue (cancelled: it takes nothing
    /// more, and what it holds may still be settled on the channel).
    NotConsuming,
    /// A consumer of the queue on its channel.
    Consuming,
}

/// A quorum queue's message assigned to a consumer here, as the group decided it.
#[derive(Debug, Clone)]
pub struct ReplicatedDelivery {
    /// The queue's vhost.
    pub vhost: String,
    pub channel: ChannelKey,
    pub tag: String,
    pub queue: String,
    /// The message's id in its queue.
    pub id: u64,
    pub message: Arc<Message>,
    /// Deliveries so far, this one included.
    pub delivery_count: u32,
    pub redelivered: bool,
}

impl BrokerModel {
    /// Whether `queue` of `vhost` is a quorum queue.
    pub(super) fn is_replicated(&self, vhost: &str, queue: &str) -> bool {
        self.vhosts.get(vhost).and_then(|found| found.queue(queue)).is_some_and(|found| found.replicated)
    }

    /// The consumers of quorum queue `queue` on this node's channels: (channel, tag, prefetch).
    pub fn replicated_consumers(&self, vhost: &str, queue: &str) -> Vec<(ChannelKey, String, u16)> {
        let mut found = Vec::new();
        for (key, channel) in &self.channels {
            if channel.vhost != vhost {
                continue;
            }
            for (tag, consumer) in &channel.consumers {
                if consumer.queue == queue {
                    found.push((*key, tag.clone(), consumer.prefetch));
                }
            }
        }
        found.sort();
        found
    }

    /// The consumers of every quorum queue on this node's channels, by (vhost, queue): one walk
    /// of the channels for a sweep over all of them.
    pub fn replicated_consumers_by_queue(&self) -> ConsumersByQueue {
        let mut found = ConsumersByQueue::new();
        for (key, channel) in &self.channels {
            for (tag, consumer) in &channel.consumers {
                if self.is_replicated(&channel.vhost, &consumer.queue) {
                    found.entry((channel.vhost.clone(), consumer.queue.clone())).or_default().push((
                        *key,
                        tag.clone(),
                        consumer.prefetch,
                    ));
                }
            }
        }
        for consumers in found.values_mut() {
            consumers.sort();
        }
        found
    }

    /// Every quorum queue delivery unacknowledged on this node's channels, by queue: what the
    /// channels can still settle, to hold against what the groups say their consumers here hold
    /// (a message held by a consumer whose channel never had it would be held for ever).
    pub fn replicated_unacked_by_queue(&self) -> UnackedByQueue {
        let mut found = UnackedByQueue::new();
        for (key, channel) in &self.channels {
            // Not those of a deleted queue (`gone`): a queue declared again under the name
            // numbers its messages from 1 again.
            for outstanding in
                channel.unacked.values().filter(|outstanding| outstanding.replicated && !outstanding.gone)
            {
                let tag = outstanding.consumer.as_ref().map(|(tag, _)| tag.clone()).unwrap_or_default();
                found.entry((channel.vhost.clone(), outstanding.queue.clone())).or_default().insert((
                    *key,
                    tag,
                    outstanding.entry_id,
                ));
            }
        }
        found
    }

    /// Where a quorum queue's consumer named by its group stands on this node's channels (to
    /// set the group's record right when it names one that is gone, see
    /// [`ReplicatedStanding`]).
    pub fn replicated_standing(&self, channel: ChannelKey, tag: &str, queue: &str) -> ReplicatedStanding {
        let Some(found) = self.channels.get(&channel) else { return ReplicatedStanding::ChannelGone };
        match found.consumers.get(tag) {
            Some(consumer) if consumer.queue == queue => ReplicatedStanding::Consuming,
            _ => ReplicatedStanding::NotConsuming,
        }
    }

    /// A quorum queue's message left it dead (its group said so; the leader carries it out): the
    /// transfer to the queue's dead-letter exchange, or for an exhausted delivery limit to
    /// `<queue>.dlq`, as for any queue (`x-death` and all). Nothing without a target.
    pub fn dead_letter_replicated(
        &mut self,
        vhost: &str,
        queue: &str,
        message: &Message,
        delivery_count: u32,
        reason: crate::deadletter::DeathReason,
    ) -> Effects {
        let mut effects = Effects::default();
        let now_ms = self.now_ms;
        let Some(found) = self.vhosts.get(vhost).and_then(|found| found.queue(queue)) else { return effects };
        if !found.replicated {
            return effects;
        }
        let trace = super::TraceSource { entered_ms: now_ms, own: None, max: 0 };
        super::dead_letter(
            vhost,
            found,
            message,
            delivery_count,
            trace,
            None,
            reason,
            now_ms,
            &mut effects,
            &mut self.counters,
        );
        effects
    }

    /// Removes a quorum queue from the model (its group deleted it): its consumers are cancelled
    /// by the server and its unsettled deliveries point at no queue any more, as for any queue.
    pub fn remove_replicated_queue(&mut self, vhost: &str, queue: &str) -> Effects {
        if !self.is_replicated(vhost, queue) {
            return Effects::default();
        }
        self.remove_queue(vhost, queue)
    }

    /// Hands a quorum queue's delivery to its consumer's channel: the delivery to send, with the
    /// channel's next tag. A no-ack consumer's delivery is settled at once (the op is in the
    /// effects). `None` when the channel is gone (with the consumer's `Down`, to return what it held), or with the
    /// delivery given back as returned when the consumer was cancelled or the channel is at its
    /// bound.
    pub fn deliver_replicated(&mut self, delivery: ReplicatedDelivery) -> (Option<Delivery>, Effects) {
        let mut effects = Effects::default();
        let now_ms = self.now_ms;
        let Some(vhost) = self.channels.get(&delivery.channel).map(|channel| channel.vhost.clone()) else {
            // The channel closed. Its `Down` returns what the consumer held, but only if the
            // group applies it after this delivery's checkout: a consumer cancelled before its
            // channel closed, or a checkout committed late, would hold this message for ever
            // without one more `Down` (applied twice, it changes nothing).
            effects.replicated.push(ReplicatedOp::Down {
                vhost: delivery.vhost,
                queue: delivery.queue,
                channel: delivery.channel,
                tag: delivery.tag,
            });
            return (None, effects);
        };
        let Some(channel) = self.channels.get_mut(&delivery.channel) else { return (None, effects) };
        let Some(consumer) =
            channel.consumers.get_mut(&delivery.tag).filter(|consumer| consumer.queue == delivery.queue)
        else {
            // Cancelled before the group saw the cancel: nobody will settle it here, so it goes back.
            effects.replicated.push(ReplicatedOp::Settle {
                vhost,
                queue: delivery.queue,
                channel: delivery.channel,
                tag: delivery.tag,
                id: delivery.id,
                outcome: ReplicatedOutcome::Returned,
            });
            return (None, effects);
        };
        let settle = |outcome| ReplicatedOp::Settle {
            vhost: vhost.clone(),
            queue: delivery.queue.clone(),
            channel: delivery.channel,
            tag: delivery.tag.clone(),
            id: delivery.id,
            outcome,
        };
        if !consumer.no_ack && channel.unacked.len() >= UNACKED_PER_CHANNEL_MAX {
            effects.replicated.push(settle(ReplicatedOutcome::Returned));
            return (None, effects);
        }
        let delivery_tag = channel.next_delivery_tag;
        channel.next_delivery_tag += 1;
        // Counted against the connection's pending bytes like any delivery; the group, not this
        // node, decides when to deliver, so the consumer's prefetch is what bounds them.
        *self.pending_bytes.entry(delivery.channel.connection).or_default() += delivery_bytes(&delivery.message);
        if consumer.no_ack {
            self.counters.delivered_consume_auto_ack += 1;
            effects.replicated.push(settle(ReplicatedOutcome::Settled));
        } else {
            self.counters.delivered_consume_manual_ack += 1;
            consumer.unacked += 1;
            channel.consumer_unacked += 1;
            channel.unacked.insert(
                delivery_tag,
                Outstanding {
                    queue: delivery.queue.clone(),
                    entry_id: delivery.id,
                    consumer: Some((delivery.tag.clone(), consumer.instance)),
                    gone: false,
                    lease_due_ms: None,
                    own_lease_timer: false,
                    delivered_at_ms: now_ms,
                    replicated: true,
                },
            );
        }
        self.counters.redelivered += u64::from(delivery.redelivered);
        let sent = Delivery {
            channel: delivery.channel,
            consumer_tag: Some(delivery.tag),
            delivery_tag,
            redelivered: delivery.redelivered,
            queue: delivery.queue,
            message: delivery.message,
            message_count: 0,
            delivery_count: delivery.delivery_count,
            store: None,
            remove_record_after_read: false,
            store_transient: false,
        };
        (Some(sent), effects)
    }
}

/// A quorum queue's message its group dequeued for a channel's `basic.get`.
#[derive(Debug, Clone)]
pub struct ReplicatedGet {
    pub channel: ChannelKey,
    pub queue: String,
    pub id: u64,
    pub message: Arc<Message>,
    pub delivery_count: u32,
    pub redelivered: bool,
    /// Settled in the group already (no-ack).
    pub no_ack: bool,
    /// Ready messages left (the get-ok's message count).
    pub remaining: u32,
}

impl BrokerModel {
    /// The get-ok of a quorum queue's `basic.get`, with the channel's next tag; unless no-ack,
    /// the message stays outstanding on the channel, held in the group by the channel's get
    /// consumer (tag `""`), and its ack or nack goes to the group like a consumer's. `None` when
    /// the channel is gone: the caller gives the message back.
    pub fn deliver_replicated_get(&mut self, get: ReplicatedGet) -> Option<Delivery> {
        let now_ms = self.now_ms;
        let channel = self.channels.get_mut(&get.channel)?;
        let delivery_tag = channel.next_delivery_tag;
        channel.next_delivery_tag += 1;
        if get.no_ack {
            self.counters.delivered_get_auto_ack += 1;
        } else {
            self.counters.delivered_get_manual_ack += 1;
            channel.unacked.insert(
                delivery_tag,
                Outstanding {
                    queue: get.queue.clone(),
                    entry_id: get.id,
                    consumer: None,
                    gone: false,
                    lease_due_ms: None,
                    own_lease_timer: false,
                    delivered_at_ms: now_ms,
                    replicated: true,
                },
            );
        }
        *self.pending_bytes.entry(get.channel.connection).or_default() += delivery_bytes(&get.message);
        self.counters.redelivered += u64::from(get.redelivered);
        Some(Delivery {
            channel: get.channel,
            consumer_tag: None,
            delivery_tag,
            redelivered: get.redelivered,
            queue: get.queue,
            message: get.message,
            message_count: get.remaining,
            delivery_count: get.delivery_count,
            store: None,
            remove_record_after_read: false,
            store_transient: false,
        })
    }
}

#[cfg(test)]
mod tests;
