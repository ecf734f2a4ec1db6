//! Queues as a whole: `queue.purge` and `queue.delete` (and deletion as a side effect of a
//! consumer or connection going), the pass after recovery, paging bodies out to the store, and
//! inspection.

use super::timers::Timer;
use super::{
    BrokerModel, CancelledConsumer, DeletedExchange, DeletedQueue, Effects, Removed, TraceSource, channel_not_open,
    dead_letter,
};
use crate::deadletter::DeathReason;
use crate::error::{ModelError, Result};
use crate::exchange::ExchangeKind;
use crate::message::{Message, PagedBody};
use crate::queue::{ChannelKey, Entry};
use std::sync::Arc;

impl BrokerModel {
    /// `queue.purge`: removes the ready messages. Returns how many.
    pub fn purge(&mut self, key: ChannelKey, queue_name: &str) -> Result<(u32, Effects)> {
        let vhost_name = self.channel_vhost(key)?;
        let vhost = self.vhosts.get_mut(&vhost_name).ok_or_else(|| channel_not_open(key))?;
        vhost.usable_queue(queue_name, key.connection)?;
        let Some(queue) = vhost.queue_mut(queue_name) else { return Ok((0, Effects::default())) };
        let purged = queue.take_ready_all();
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
        // "Empty" as RabbitMQ counts it: no ready messages. Unacknowledged deliveries do not
        // count (clients delete with if-empty right after a get they have not acked yet), and
        // go with the queue, as in RabbitMQ.
        if if_empty && queue.ready_count() > 0 {
            return Err(ModelError::precondition_failed(format!(
                "queue '{queue_name}' in vhost '{vhost_name}' not empty"
            )));
        }
        let count = queue.ready_count() as u32;
        Ok((count, self.remove_queue(&vhost_name, queue_name)))
    }

    /// Removes a queue: its messages leave for good, its consumers are cancelled by the server.
    pub(super) fn remove_queue(&mut self, vhost_name: &str, queue_name: &str) -> Effects {
        let mut effects = Effects::default();
        let Some(vhost) = self.vhosts.get_mut(vhost_name) else { return effects };
        let Some(mut queue) = vhost.remove_queue(queue_name) else { return effects };
        for exchange in vhost.take_auto_deleted() {
            effects.deleted_exchanges.push(DeletedExchange { vhost: vhost_name.to_owned(), exchange });
        }
        for (key, tag) in queue.take_consumers() {
            if let Some(channel) = self.channels.get_mut(&key) {
                channel.consumers.remove(&tag);
            }
            effects.cancelled.push(CancelledConsumer { channel: key, consumer_tag: tag });
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
            store_log: queue.store_log,
            dedup_log: queue.dedup_log,
            transient_log: queue.transient_log,
        });
        effects
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
                let source = Removed::of(&vhost, queue, &entry);
                dead_letter(
                    &vhost,
                    queue,
                    &entry.message,
                    entry.delivery_count,
                    TraceSource::of(&entry, self.trace_events_max),
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

    /// For a publish that found `queue` over its memory bound without a transient log: the
    /// queue's incarnation the first time (the runtime then creates the log and attaches it with
    /// [`BrokerModel::attach_transient_log`]), `None` after that.
    pub fn wants_transient_log(&mut self, vhost: &str, queue: &str) -> Option<u64> {
        let queue = self.vhosts.get_mut(vhost)?.queue_mut(queue)?;
        queue.wants_transient_log().then(|| queue.incarnation())
    }

    /// Gives a queue the transient log the runtime created for it. False if the queue is gone
    /// (or is a later queue of the same name): the runtime then deletes the log.
    pub fn attach_transient_log(&mut self, vhost: &str, queue: &str, incarnation: u64, log: u64) -> bool {
        let Some(queue) = self.vhosts.get_mut(vhost).and_then(|found| found.queue_mut(queue)) else { return false };
        if queue.incarnation() != incarnation || queue.transient_log.is_some() {
            return false;
        }
        queue.transient_log = Some(log);
        true
    }

    /// Counts a transient body kept in memory because its transient log could not take it.
    pub fn count_transient_page_out_failure(&mut self) {
        self.counters.transient_page_out_failures += 1;
    }

    /// Counts bodies recovery left on disk.
    pub fn count_paged_out(&mut self, count: u64) {
        self.counters.paged_out += count;
    }

    /// Counts store logs recovery kept as orphaned-log queues.
    pub fn count_orphaned_logs_kept(&mut self, count: u64) {
        self.counters.orphaned_logs_kept += count;
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
