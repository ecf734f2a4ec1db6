//! Publishing into queues: whether a queue (or an exchange) takes a publish (de-duplication and
//! `x-overflow`), enqueueing it (with `drop-head`), dead-lettering a refused one, and holding a
//! message for a delayed-message exchange. The runtime asks before it stores a message and
//! enqueues after, so a refused or failed publish leaves nothing behind.

use super::timers::Timer;
use super::{BrokerModel, Effects, Removed, TraceSource, dead_letter};
use crate::deadletter::DeathReason;
use crate::message::Message;
use crate::queue::DedupLookup;
use crate::settings::Overflow;
use crate::vhost::DelayedEntry;
use std::sync::Arc;

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

impl BrokerModel {
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

    /// Puts a routed message in a queue (admitted by `admit`) and dispatches. `store_seq` is set
    /// when the store holds it. With `drop-head`, the oldest ready messages beyond the queue's
    /// length limits leave (dead-lettered if the queue has a dead-letter exchange).
    pub fn enqueue(&mut self, vhost: &str, queue_name: &str, message: Arc<Message>, store_seq: Option<u64>) -> Effects {
        self.enqueue_stored(vhost, queue_name, message, store_seq, false)
    }

    /// Like [`BrokerModel::enqueue`]; with `transient_record`, `store_seq` is a record in the
    /// queue's transient log (a transient body paged out beyond the memory bound).
    pub fn enqueue_stored(
        &mut self,
        vhost: &str,
        queue_name: &str,
        message: Arc<Message>,
        store_seq: Option<u64>,
        transient_record: bool,
    ) -> Effects {
        let now_ms = self.now_ms;
        let mut effects = Effects::default();
        let Some(queue) = self.vhosts.get_mut(vhost).and_then(|vhost| vhost.queue_mut(queue_name)) else {
            return effects;
        };
        queue.enqueue(message, store_seq, transient_record, now_ms);
        self.drop_head_over_limits(vhost, queue_name, &mut effects);
        effects.merge(self.dispatch(vhost, queue_name));
        effects
    }

    /// With `x-overflow: drop-head`, drops (or dead-letters, reason `maxlen`) a queue's oldest
    /// ready messages while it holds more than its length limits allow: after an enqueue, and
    /// after a policy lowered its limits.
    pub(super) fn drop_head_over_limits(&mut self, vhost: &str, queue_name: &str, effects: &mut Effects) {
        let (now_ms, trace_events_max) = (self.now_ms, self.trace_events_max);
        let Some(queue) = self.vhosts.get_mut(vhost).and_then(|vhost| vhost.queue_mut(queue_name)) else { return };
        while let Some(entry) = queue.drop_head_over_limits() {
            self.counters.dropped_by_length += 1;
            let source = Removed::of(vhost, queue, &entry);
            dead_letter(
                vhost,
                queue,
                &entry.message,
                entry.delivery_count,
                TraceSource::of(&entry, trace_events_max),
                Some(source),
                DeathReason::MaxLen,
                now_ms,
                effects,
                &mut self.counters,
            );
        }
    }

    /// A publish `reject-publish-dlx` refused: dead-letter it (reason `maxlen`).
    pub fn dead_letter_refused(&mut self, vhost: &str, queue_name: &str, message: &Message) -> Effects {
        let now_ms = self.now_ms;
        let mut effects = Effects::default();
        if let Some(queue) = self.vhosts.get(vhost).and_then(|vhost| vhost.queue(queue_name)) {
            let trace = TraceSource { entered_ms: now_ms, own: None, max: self.trace_events_max };
            dead_letter(
                vhost,
                queue,
                message,
                0,
                trace,
                None,
                DeathReason::MaxLen,
                now_ms,
                &mut effects,
                &mut self.counters,
            );
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
}
