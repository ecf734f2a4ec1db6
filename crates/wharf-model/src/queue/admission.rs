//! The queue's identity among the queues of its name (its incarnation, which its timers carry),
//! its side of admitting a publish (the de-duplication window), and its message counters for
//! the management interface's rates. Kept apart from where its messages are (`queue.rs`).

use super::Queue;
use crate::message::Message;

impl Queue {
    /// Which queue this is among those of its name (timers name it, so a timer of an earlier
    /// queue of the same name leaves this one alone).
    pub(crate) fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Numbers the queue among those of its name; its vhost does it once, when it adds it.
    pub(crate) fn set_incarnation(&mut self, incarnation: u64) {
        self.incarnation = incarnation;
    }

    /// Looks a published message up in the queue's de-duplication window (forgetting the keys
    /// that fell out of it first). Only looks: see [`Queue::remember_dedup_key`].
    pub(crate) fn dedup_lookup(&mut self, message: &Message, now_ms: u64) -> DedupLookup {
        let Some(index) = self.dedup.as_mut() else { return DedupLookup::Unkeyed };
        let Some(key) = index.key_of(message) else { return DedupLookup::Unkeyed };
        index.expire(now_ms);
        if index.contains(&key) { DedupLookup::Seen } else { DedupLookup::New(key) }
    }

    /// Remembers the de-duplication key of a message the queue took, seen at `now_ms`.
    pub(crate) fn remember_dedup_key(&mut self, key: &[u8], now_ms: u64) {
        if let Some(index) = self.dedup.as_mut() {
            index.check_and_insert(key, now_ms);
        }
    }
}

/// A publish looked up in a queue's de-duplication window.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DedupLookup {
    /// The queue does not de-duplicate, or the message has no key.
    Unkeyed,
    /// Its key was seen within the window: a duplicate.
    Seen,
    /// A key not seen within the window (to remember once the message is in).
    New(Vec<u8>),
}

/// What passed through a queue, counted for the management interface's rates (RabbitMQ's
/// per-queue `message_stats` and its `queue_delivery_metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages that entered the queue from a publish (or a dead-letter, replay or move).
    pub publish: u64,
    /// Deliveries to consumers that acknowledge.
    pub deliver: u64,
    /// Deliveries to `no-ack` consumers.
    pub deliver_no_ack: u64,
    /// `basic.get`s answered with a message, to be acknowledged.
    pub get: u64,
    /// `basic.get`s answered with a message, `no-ack`.
    pub get_no_ack: u64,
    /// `basic.get`s answered with get-empty.
    pub get_empty: u64,
    /// Deliveries (consumer or get) of messages delivered before.
    pub redeliver: u64,
    /// Deliveries acknowledged.
    pub ack: u64,
}

impl Queue {
    /// Takes the settings a policy change derived, except what the queue's structure was built
    /// for at declaration (`max-priority`, `ordered-by`, `deduplication`, single active
    /// consumer), which stays as declared (see `broker/policies.rs`).
    pub(crate) fn apply_policy_settings(&mut self, settings: crate::settings::QueueSettings) {
        let kept = &self.settings;
        let settings = crate::settings::QueueSettings {
            max_priority: kept.max_priority,
            ordered_by: kept.ordered_by.clone(),
            deduplication: kept.deduplication.clone(),
            single_active_consumer: kept.single_active_consumer,
            ..settings
        };
        self.settings = settings;
    }

    /// What passed through the queue since it was declared (or since the broker started).
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// Counts a delivery: to a consumer (or a get), acknowledged or not, redelivered or not.
    pub(crate) fn count_delivery(&mut self, consumer: bool, acknowledged: bool, redelivered: bool) {
        let counter = match (consumer, acknowledged) {
            (true, true) => &mut self.stats.deliver,
            (true, false) => &mut self.stats.deliver_no_ack,
            (false, true) => &mut self.stats.get,
            (false, false) => &mut self.stats.get_no_ack,
        };
        *counter += 1;
        self.stats.redeliver += u64::from(redelivered);
    }

    pub(crate) fn count_ack(&mut self) {
        self.stats.ack += 1;
    }

    pub(crate) fn count_get_empty(&mut self) {
        self.stats.get_empty += 1;
    }
}
