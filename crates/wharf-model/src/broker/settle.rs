//! Settlement: `basic.ack`, `basic.nack` / `basic.reject` and `basic.recover`, and what becomes
//! of a delivery that comes back unsettled (requeued in its place, held for its retry backoff,
//! or dead-lettered over its delivery limit). Settling frees prefetch room, so each settlement
//! ends by dispatching again.

use super::channels::Outstanding;
use super::timers::Timer;
use super::{
    BrokerModel, Effects, Removed, ReplicatedOp, ReplicatedOutcome, TraceSource, channel_not_open, dead_letter,
};
use crate::deadletter::DeathReason;
use crate::error::{ModelError, Result};
use crate::queue::{ChannelKey, Returned};
use crate::trace::{Refusal, RequeueCause, TraceKind};
use std::collections::BTreeSet;

impl BrokerModel {
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
            if outstanding.replicated {
                effects.replicated.push(ReplicatedOp::settle(&vhost, key, outstanding, ReplicatedOutcome::Settled));
                continue;
            }
            if let Some(queue) = self.vhosts.get_mut(&vhost).and_then(|vhost| vhost.queue_mut(&outstanding.queue))
                && let Some(entry) = queue.remove_unacked(outstanding.entry_id)
            {
                effects.removed.push(Removed::of(&vhost, queue, &entry));
                queue.count_ack();
                self.counters.acknowledged += 1;
            }
        }
        effects.merge(self.redispatch_channel(key, &BTreeSet::new()));
        Ok(effects)
    }

    /// `basic.nack` and `basic.reject`: with `requeue` back to the queue (redelivered; after the
    /// queue's retry backoff step, if it has one; dead-lettered once over the delivery limit),
    /// else the message leaves, dead-lettered if the queue has a dead-letter exchange.
    pub fn reject(&mut self, key: ChannelKey, delivery_tag: u64, multiple: bool, requeue: bool) -> Result<Effects> {
        self.refuse(key, delivery_tag, multiple, requeue, Refusal::Reject)
    }

    /// [`BrokerModel::reject`], saying for the message's trace how it was refused
    /// (`basic.nack`, `basic.reject`, `basic.recover`, or a delivery that never reached its
    /// connection).
    pub fn refuse(
        &mut self,
        key: ChannelKey,
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
        how: Refusal,
    ) -> Result<Effects> {
        let vhost = self.channel_vhost(key)?;
        let taken = self.take_outstanding(key, delivery_tag, multiple)?;
        let now_ms = self.now_ms;
        let mut effects = Effects::default();
        let mut touched = BTreeSet::new();
        for outstanding in taken.into_iter().filter(|outstanding| !outstanding.gone) {
            if outstanding.replicated {
                let outcome = if requeue { ReplicatedOutcome::Returned } else { ReplicatedOutcome::Discarded };
                effects.replicated.push(ReplicatedOp::settle(&vhost, key, outstanding, outcome));
                continue;
            }
            if requeue {
                let cause = match how {
                    Refusal::Nack => RequeueCause::Nack,
                    Refusal::Reject => RequeueCause::Reject,
                    Refusal::Recover => RequeueCause::Recover,
                    Refusal::Undelivered => RequeueCause::ChannelClosed,
                };
                self.note_delivery(&vhost, key, &outstanding, TraceKind::Requeued(cause));
                self.return_delivery(&vhost, &outstanding.queue, outstanding.entry_id, true, &mut effects);
                touched.insert(outstanding.queue);
                continue;
            }
            self.note_delivery(&vhost, key, &outstanding, TraceKind::Rejected { by_nack: how == Refusal::Nack });
            let trace_events_max = self.trace_events_max;
            let Some(queue) = self.vhosts.get_mut(&vhost).and_then(|vhost| vhost.queue_mut(&outstanding.queue)) else {
                continue;
            };
            if let Some(entry) = queue.remove_unacked(outstanding.entry_id) {
                let source = Removed::of(&vhost, queue, &entry);
                dead_letter(
                    &vhost,
                    queue,
                    &entry.message,
                    entry.delivery_count,
                    TraceSource::of(&entry, trace_events_max),
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
            return Err(ModelError::not_implemented("requeue=false"));
        }
        self.refuse(key, 0, true, true, Refusal::Recover)
    }

    /// Takes the outstanding deliveries `delivery_tag` names (all up to it with `multiple`; all
    /// with tag 0 and `multiple`). An unknown tag is 406, as in RabbitMQ.
    pub(super) fn take_outstanding(
        &mut self,
        key: ChannelKey,
        delivery_tag: u64,
        multiple: bool,
    ) -> Result<Vec<Outstanding>> {
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
            if let Some(due_ms) = outstanding.lease_due_ms.filter(|_| outstanding.own_lease_timer) {
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

    /// A delivery came back unsettled: by `nack`/`reject` with requeue (`explicit`), its channel
    /// closing, or its lease running out. Over the delivery limit it is dead-lettered; after an
    /// explicit requeue on a queue with `x-retry-backoff` it waits its step; otherwise it goes
    /// back to its place.
    pub(super) fn return_delivery(
        &mut self,
        vhost: &str,
        queue_name: &str,
        entry_id: u64,
        explicit: bool,
        effects: &mut Effects,
    ) {
        let now_ms = self.now_ms;
        let trace_events_max = self.trace_events_max;
        let Some(queue) = self.vhosts.get_mut(vhost).and_then(|vhost| vhost.queue_mut(queue_name)) else { return };
        match queue.return_unacked(entry_id, explicit) {
            Some(Returned::OverLimit(entry)) => {
                let source = Removed::of(vhost, queue, &entry);
                dead_letter(
                    vhost,
                    queue,
                    &entry.message,
                    entry.delivery_count,
                    TraceSource::of(&entry, trace_events_max),
                    Some(source),
                    DeathReason::DeliveryLimit,
                    now_ms,
                    effects,
                    &mut self.counters,
                );
            }
            Some(Returned::Backoff { wait_ms }) => {
                self.counters.backoff_waits += 1;
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

    /// Re-dispatches every queue the channel's consumers read from (after room was freed).
    pub(super) fn redispatch_channel(&mut self, key: ChannelKey, extra: &BTreeSet<String>) -> Effects {
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
}
