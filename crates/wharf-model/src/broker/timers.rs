//! Time: the one ordered set of timers (message TTL, `x-expires`, leases, retry backoff, delayed
//! messages) and what each does when it fires. The model reads no clock: the runtime reports
//! the time (`set_now`) and calls `tick` when `next_timer_ms` is due.

use super::{BrokerModel, EXPIRED_TAGS_PER_CHANNEL_MAX, Effects, Removed, StoredAt, TraceSource, dead_letter};
use crate::deadletter::{DeathReason, Transfer, TransferTarget};
use crate::queue::{ChannelKey, Queue, Unused};
use crate::trace::{RequeueCause, TraceKind};
use std::collections::BTreeSet;

/// Something to look at when its time comes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Timer {
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
    /// The earliest lease by the default consumer timeout: one timer for all of them, so a
    /// delivery under the default costs no timer of its own (see `sweep_default_leases`).
    DefaultLeases,
}
impl Timer {
    /// The vhost it belongs to (none for channel leases and the default-lease sweep).
    pub(super) fn vhost(&self) -> Option<&str> {
        match self {
            Timer::Expiry { vhost, .. }
            | Timer::QueueExpires { vhost, .. }
            | Timer::Backoff { vhost, .. }
            | Timer::Delayed { vhost, .. } => Some(vhost),
            Timer::Lease { .. } | Timer::DefaultLeases => None,
        }
    }
}

// Queue timers name the queue's incarnation and lease timers the channel's generation: a queue
// re-created under the same name numbers its entries from 1 again, and a reopened channel its
// delivery tags, so a timer of the old one must not touch the new one.

impl BrokerModel {
    /// Tells the model the time (ms since the epoch); it never goes back.
    pub fn set_now(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
    }

    /// The time the model was last told.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// When the next timer is due, if any (the runtime calls `tick` then).
    pub fn next_timer_ms(&self) -> Option<u64> {
        self.timers.first().map(|(at, _)| *at)
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
                    // A queue held elsewhere (a quorum queue's or a homed queue's stand-in on
                    // this node) is never deleted here by its own timer: only where it is held,
                    // through the cluster, so that every node deletes it alike.
                    if found.replicated {
                        continue;
                    }
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
                Timer::DefaultLeases => {
                    if self.default_leases_armed_ms.is_some_and(|armed_ms| armed_ms <= self.now_ms) {
                        self.default_leases_armed_ms = None;
                    }
                    self.sweep_default_leases(&mut effects);
                }
            }
        }
        effects
    }

    /// Makes sure the sweep timer fires by `due_ms` (a lease by the default timeout is due then).
    /// Deliveries under the default come due in the order they were made, so after the first only
    /// a comparison is needed.
    pub(super) fn arm_default_leases(&mut self, due_ms: u64) {
        if self.default_leases_armed_ms.is_none_or(|armed_ms| due_ms < armed_ms) {
            self.default_leases_armed_ms = Some(due_ms);
            self.timers.insert((due_ms, Timer::DefaultLeases));
        }
    }

    /// Ends every lease by the default timeout that is due, and arms the sweep for the next. A
    /// channel's default leases come due in delivery-tag order (the same timeout from a clock that
    /// never goes back), so each channel is read only up to its first lease not yet due; leases of
    /// a queue's own timeout are skipped (they have their own timers).
    fn sweep_default_leases(&mut self, effects: &mut Effects) {
        let now_ms = self.now_ms;
        let mut due = Vec::new();
        let mut next_ms: Option<u64> = None;
        for (key, channel) in &self.channels {
            for (tag, outstanding) in &channel.unacked {
                let Some(due_ms) = outstanding.lease_due_ms.filter(|_| !outstanding.own_lease_timer) else { continue };
                if due_ms <= now_ms {
                    due.push((*key, *tag));
                } else {
                    next_ms = Some(next_ms.map_or(due_ms, |next| next.min(due_ms)));
                    break;
                }
            }
        }
        for (key, tag) in due {
            self.expire_lease(key, tag, effects);
        }
        if let Some(next_ms) = next_ms {
            self.arm_default_leases(next_ms);
        }
    }

    /// The queue, if it is still the incarnation a timer was set for.
    fn live_queue(&mut self, vhost: &str, queue_name: &str, incarnation: u64) -> Option<&mut Queue> {
        self.vhosts
            .get_mut(vhost)
            .and_then(|found| found.queue_mut(queue_name))
            .filter(|queue| queue.incarnation() == incarnation)
    }

    /// Expires a queue's ready messages whose time has come and arms the timer for the next.
    /// `inclusive`: also those due exactly now. Dispatching expires what is overdue first, then
    /// delivers, then expires what is due now: as in RabbitMQ, a message with TTL 0 reaches a
    /// consumer that can take it at once, and is dropped otherwise.
    pub(super) fn expire_due(&mut self, vhost: &str, queue_name: &str, inclusive: bool, effects: &mut Effects) {
        let now_ms = self.now_ms;
        let trace_events_max = self.trace_events_max;
        let Some(queue) = self.vhosts.get_mut(vhost).and_then(|found| found.queue_mut(queue_name)) else { return };
        while let Some(entry) = queue.pop_expired(now_ms, inclusive) {
            self.counters.expired += 1;
            let source = Removed::of(vhost, queue, &entry);
            dead_letter(
                vhost,
                queue,
                &entry.message,
                entry.delivery_count,
                TraceSource::of(&entry, trace_events_max),
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
            self.note_delivery(&vhost, key, &outstanding, TraceKind::Requeued(RequeueCause::LeaseExpired));
            self.return_delivery(&vhost, &outstanding.queue, outstanding.entry_id, false, effects);
            touched.insert(outstanding.queue);
        }
        effects.merge(self.redispatch_channel(key, &touched));
    }

    fn release_delayed(&mut self, vhost_name: &str, exchange_name: &str, effects: &mut Effects) {
        let now_ms = self.now_ms;
        let Some(vhost) = self.vhosts.get_mut(vhost_name) else { return };
        let store_log = vhost.exchange(exchange_name).and_then(|exchange| exchange.store_log);
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
                    stored: store_log.zip(entry.store_seq).map(|(log, seq)| StoredAt { log, seq }),
                }),
                reason: None,
            });
        }
    }
}
