//! [`QuorumQueue`]: the state machine of a replicated (quorum) queue. Every replica applies the
//! same committed [`QuorumCommand`]s in the same order and so holds the same messages, the same
//! consumers and the same decision of which consumer each message went to: a node carries out
//! only the [`QuorumEffect`]s that are its own (deliveries to its consumers), so a consumer on
//! any node is served from that node's replica and nothing but the commands crosses the network
//! (`docs/design/20261205_replication.md`, the quorum queue section).
//!
//! Determinism is the whole contract: no clock (time comes in commands, stamped by whoever
//! proposed them), no hash-ordered collections, no randomness. Message ids are given in the
//! order enqueues are applied, so they are the same on every replica.
//!
//! Semantics follow RabbitMQ's quorum queues (`rabbit_fifo`): a message is checked out to one
//! consumer at a time, within that consumer's prefetch; a settle removes it; a return (a nack or
//! reject with requeue, a consumer's channel closed, its node gone) puts it back at the head
//! in id order with its delivery count raised, and it is redelivered with the flag set; past the
//! delivery limit, or rejected without requeue, or expired, or pushed out by a length limit, it
//! is dead-lettered (an effect; the dead-letter target is the caller's business).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// A message's id in its quorum queue: the same on every replica.
pub type QuorumMessageId = u64;

/// A consumer of a quorum queue, named the same on every node: the node it is attached to and
/// that node's incarnation (a restarted node's connection ids start again), its connection and
/// channel there, and its tag.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QuorumConsumer {
    pub node: u64,
    pub incarnation: u32,
    pub connection: u64,
    pub channel: u16,
    pub tag: String,
}

/// What a quorum queue's settings say (from its arguments and policies, fixed at declare).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QuorumSettings {
    /// Deliveries a message may have; one more returns it as dead (RabbitMQ's `delivery-limit`).
    pub delivery_limit: Option<u32>,
    /// Ready messages at most (`x-max-length`).
    pub max_length: Option<u64>,
    /// Ready message bytes at most (`x-max-length-bytes`).
    pub max_length_bytes: Option<u64>,
    /// Past a length limit, refuse the new message instead of dropping the oldest.
    pub reject_publish: bool,
    /// De-duplication (`x-deduplication`): how long a key counts after the enqueue that
    /// brought it; `None` when the queue does not de-duplicate.
    pub dedup_ttl_ms: Option<u64>,
    /// `x-retry-backoff`: how long a returned message waits before it is ready again, by
    /// attempt (the last step repeating); empty: not at all.
    pub retry_backoff_ms: Vec<u64>,
    /// `x-consumer-timeout`: how long a delivery may stay unsettled before it goes back (a
    /// lease).
    pub lease_ms: Option<u64>,
    /// `x-single-active-consumer`: only the longest-attached consumer gets messages.
    pub single_active_consumer: bool,
}

/// A command, as committed to the queue's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuorumCommand {
    /// A message: its bytes (opaque here), when it expires, if it does (stamped by the node
    /// that proposed it, from the message's and the queue's TTL), and its ordering key, if the
    /// queue orders by key (`quorum/ordering.rs`).
    Enqueue { payload: Arc<[u8]>, expires_at_ms: Option<u64>, order_key: Option<Arc<[u8]>> },
    /// A message with a de-duplication key, stamped with the proposing node's time: taken
    /// unless the key came within the queue's window, then answered [`QuorumAnswer::Duplicate`].
    EnqueueKeyed {
        payload: Arc<[u8]>,
        expires_at_ms: Option<u64>,
        key: Arc<[u8]>,
        now_ms: u64,
        order_key: Option<Arc<[u8]>>,
    },
    /// `basic.get`: the oldest ready message, checked out to `consumer` (a channel's get
    /// consumer, tag `""`) until settled, or removed at once with `settle` (no-ack); answered
    /// [`QuorumAnswer::Dequeued`] or [`QuorumAnswer::Empty`].
    Dequeue { consumer: QuorumConsumer, settle: bool },
    /// A consumer starts, with a prefetch (0: no limit).
    Checkout { consumer: QuorumConsumer, prefetch: u32 },
    /// A consumer stops taking messages (`basic.cancel`); what it holds stays with it until it
    /// settles it or goes down, as AMQP has it.
    Cancel { consumer: QuorumConsumer },
    /// A consumer is gone (its channel or connection closed): what it holds is returned.
    Down { consumer: QuorumConsumer },
    /// Acknowledged: removed.
    Settle { consumer: QuorumConsumer, ids: Vec<QuorumMessageId> },
    /// Rejected or nacked with requeue: back to the head, delivery count raised.
    Return { consumer: QuorumConsumer, ids: Vec<QuorumMessageId> },
    /// Rejected or nacked without requeue: dead-lettered.
    Discard { consumer: QuorumConsumer, ids: Vec<QuorumMessageId> },
    /// Every consumer of `node` is gone (the node left, or restarted): their messages are
    /// returned.
    NodeDown { node: u64 },
    /// `node` started again as `incarnation`: its consumers of earlier incarnations are gone.
    NodeRestarted { node: u64, incarnation: u32 },
    /// The time is `now_ms`: ready messages expired by then are dead-lettered.
    Tick { now_ms: u64 },
    /// Every ready message is removed.
    Purge,
}

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuorumDeathReason {
    Rejected,
    DeliveryLimit,
    Expired,
    MaxLength,
}

/// What applying a command asks of the nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuorumEffect {
    /// Deliver message `id` to `consumer` (its node does); `redelivered` if it was delivered
    /// before.
    Deliver {
        consumer: QuorumConsumer,
        id: QuorumMessageId,
        payload: Arc<[u8]>,
        delivery_count: u32,
        redelivered: bool,
    },
    /// The message left the queue dead.
    DeadLetter { id: QuorumMessageId, payload: Arc<[u8]>, reason: QuorumDeathReason, delivery_count: u32 },
}

/// What a command came to for whoever proposed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuorumAnswer {
    /// Taken (an enqueue: with its id).
    Done { id: Option<QuorumMessageId> },
    /// An enqueue refused by a length limit with `reject-publish` (the publisher is nacked).
    Rejected,
    /// A keyed enqueue whose key came within the window: not taken again (the publisher is
    /// acked, as for a classic queue's duplicate).
    Duplicate,
    /// Messages removed (a purge: how many).
    Removed { count: u64 },
    /// A dequeued message, and how many stay ready.
    Dequeued { id: QuorumMessageId, payload: Arc<[u8]>, delivery_count: u32, redelivered: bool, remaining: u64 },
    /// Nothing was ready to dequeue.
    Empty,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    payload: Arc<[u8]>,
    expires_at_ms: Option<u64>,
    delivery_count: u32,
    checked_out_to: Option<QuorumConsumer>,
    /// When its timer runs out, once the first `Tick` after it started stamped it: a waiting
    /// message's backoff, a leased delivery's lease (see `timers.rs`).
    due_ms: Option<u64>,
    /// Its `x-ordered-by` key.
    order_key: Option<Arc<[u8]>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ConsumerState {
    prefetch: u32,
    holds: BTreeSet<QuorumMessageId>,
    /// Cancelled: takes nothing more; forgotten once it holds nothing.
    cancelled: bool,
}

impl ConsumerState {
    fn has_credit(&self) -> bool {
        !self.cancelled && (self.prefetch == 0 || (self.holds.len() as u64) < u64::from(self.prefetch))
    }
}

/// A consumer as a replica records it (see [`QuorumQueue::consumers_at`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    pub consumer: QuorumConsumer,
    /// Cancelled: it takes nothing more and only holds what it has.
    pub cancelled: bool,
    /// The messages checked out to it, lowest id first.
    pub holds: Vec<QuorumMessageId>,
}

/// A quorum queue's replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuorumQueue {
    settings: QuorumSettings,
    next_id: QuorumMessageId,
    messages: BTreeMap<QuorumMessageId, Held>,
    /// Ready messages, oldest (lowest id) first; returned ones go back in id order.
    ready: BTreeSet<QuorumMessageId>,
    ready_bytes: u64,
    consumers: BTreeMap<QuorumConsumer, ConsumerState>,
    /// The order consumers are served in (round robin).
    service_order: VecDeque<QuorumConsumer>,
    /// De-duplication keys within their window, with when each stops counting; and the same
    /// by that time, to forget them in order. At most [`crate::dedup::DEDUP_KEYS_MAX`].
    dedup_keys: BTreeMap<Arc<[u8]>, u64>,
    dedup_order: BTreeSet<(u64, Arc<[u8]>)>,
    /// Returned messages waiting out their backoff step before they are ready again.
    waiting: BTreeSet<QuorumMessageId>,
    /// Checked-out messages under a lease.
    leased: BTreeSet<QuorumMessageId>,
    /// The ready messages that may go out now (see `ordering.rs`); all ready ones when no
    /// message has an ordering key.
    deliverable: BTreeSet<QuorumMessageId>,
    /// The messages of each ordering key in the queue, oldest (the key's holder) first.
    by_key: BTreeMap<Arc<[u8]>, BTreeSet<QuorumMessageId>>,
    /// A lease or a backoff may have started since the last `Tick` (see `timers.rs`).
    unstamped: UnstampedHint,
}

/// Whether a lease or backoff may wait for its stamp: set when one starts, cleared by the `Tick`
/// that stamps them all, so the leader asks in O(1) after every entry instead of scanning. A
/// hint about the state, not part of it (it may say yes when the message has gone since, which
/// costs one `Tick`): replicas equal in state are equal whatever their hints say.
#[derive(Debug, Clone, Copy, Default)]
struct UnstampedHint(bool);

impl PartialEq for UnstampedHint {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for UnstampedHint {}

impl QuorumQueue {
    pub fn new(settings: QuorumSettings) -> QuorumQueue {
        QuorumQueue { settings, next_id: 1, ..Default::default() }
    }

    /// Ready messages.
    pub fn ready_count(&self) -> u64 {
        self.ready.len() as u64
    }

    /// Messages checked out to consumers.
    pub fn checked_out_count(&self) -> u64 {
        (self.messages.len() - self.ready.len() - self.waiting.len()) as u64
    }

    /// Returned messages waiting out their backoff.
    pub fn waiting_count(&self) -> u64 {
        self.waiting.len() as u64
    }

    /// When the first ready message expires, if any does (a scan of the ready messages: called
    /// by the leader's expiry timer, not per command).
    pub fn earliest_ready_expiry_ms(&self) -> Option<u64> {
        self.ready.iter().filter_map(|id| self.messages.get(id).and_then(|held| held.expires_at_ms)).min()
    }

    /// Consumers attached to `node`.
    pub fn consumers_on(&self, node: u64) -> usize {
        self.consumers.keys().filter(|consumer| consumer.node == node).count()
    }

    /// The consumers attached to `node`: whether each was cancelled (it takes nothing more and
    /// only holds what it has), and what each holds.
    pub fn consumers_at(&self, node: u64) -> Vec<ConsumerRecord> {
        self.consumers
            .iter()
            .filter(|(consumer, _)| consumer.node == node)
            .map(|(consumer, state)| ConsumerRecord {
                consumer: consumer.clone(),
                cancelled: state.cancelled,
                holds: state.holds.iter().copied().collect(),
            })
            .collect()
    }

    /// Consumers.
    pub fn consumer_count(&self) -> usize {
        self.consumers.len()
    }

    /// Applies one committed command; returns its answer and what the nodes must do.
    pub fn apply(&mut self, command: QuorumCommand) -> (QuorumAnswer, Vec<QuorumEffect>) {
        let mut effects = Vec::new();
        let answer = match command {
            QuorumCommand::Enqueue { payload, expires_at_ms, order_key } => {
                self.enqueue(payload, expires_at_ms, order_key, &mut effects)
            }
            QuorumCommand::EnqueueKeyed { payload, expires_at_ms, key, now_ms, order_key } => {
                self.enqueue_keyed(payload, expires_at_ms, key, now_ms, order_key, &mut effects)
            }
            QuorumCommand::Dequeue { consumer, settle } => self.dequeue(consumer, settle),
            QuorumCommand::Checkout { consumer, prefetch } => {
                if !self.service_order.contains(&consumer) {
                    self.service_order.push_back(consumer.clone());
                }
                let state = self.consumers.entry(consumer).or_insert(ConsumerState {
                    prefetch,
                    holds: BTreeSet::new(),
                    cancelled: false,
                });
                state.prefetch = prefetch;
                state.cancelled = false;
                QuorumAnswer::Done { id: None }
            }
            QuorumCommand::Cancel { consumer } => {
                if let Some(state) = self.consumers.get_mut(&consumer) {
                    state.cancelled = true;
                }
                self.service_order.retain(|found| *found != consumer);
                self.forget_if_done(&consumer);
                QuorumAnswer::Done { id: None }
            }
            QuorumCommand::Down { consumer } => {
                self.remove_consumer(&consumer, &mut effects);
                QuorumAnswer::Done { id: None }
            }
            QuorumCommand::Settle { consumer, ids } => {
                for id in ids {
                    if self.held_by(&consumer, id) {
                        self.release(&consumer, id);
                        self.remove_message(id);
                    }
                }
                self.forget_if_done(&consumer);
                QuorumAnswer::Done { id: None }
            }
            QuorumCommand::Return { consumer, ids } => {
                for id in ids {
                    if self.held_by(&consumer, id) {
                        self.release(&consumer, id);
                        self.requeue(id, &mut effects);
                    }
                }
                self.forget_if_done(&consumer);
                QuorumAnswer::Done { id: None }
            }
            QuorumCommand::Discard { consumer, ids } => {
                for id in ids {
                    if self.held_by(&consumer, id) {
                        self.release(&consumer, id);
                        self.dead_letter(id, QuorumDeathReason::Rejected, &mut effects);
                    }
                }
                self.forget_if_done(&consumer);
                QuorumAnswer::Done { id: None }
            }
            QuorumCommand::NodeDown { node } => {
                let gone: Vec<QuorumConsumer> =
                    self.consumers.keys().filter(|consumer| consumer.node == node).cloned().collect();
                for consumer in gone {
                    self.remove_consumer(&consumer, &mut effects);
                }
                QuorumAnswer::Done { id: None }
            }
            QuorumCommand::NodeRestarted { node, incarnation } => {
                let gone: Vec<QuorumConsumer> = self
                    .consumers
                    .keys()
                    .filter(|consumer| consumer.node == node && consumer.incarnation != incarnation)
                    .cloned()
                    .collect();
                for consumer in gone {
                    self.remove_consumer(&consumer, &mut effects);
                }
                QuorumAnswer::Done { id: None }
            }
            QuorumCommand::Tick { now_ms } => {
                self.tick(now_ms, &mut effects);
                QuorumAnswer::Done { id: None }
            }
            QuorumCommand::Purge => {
                // What no consumer holds goes: the ready messages and those waiting out a backoff.
                let ready: Vec<QuorumMessageId> = self.ready.iter().chain(&self.waiting).copied().collect();
                for id in &ready {
                    self.take_ready(*id);
                    self.waiting.remove(id);
                    self.remove_message(*id);
                }
                QuorumAnswer::Removed { count: ready.len() as u64 }
            }
        };
        self.dispatch(&mut effects);
        (answer, effects)
    }

    fn enqueue(
        &mut self,
        payload: Arc<[u8]>,
        expires_at_ms: Option<u64>,
        order_key: Option<Arc<[u8]>>,
        effects: &mut Vec<QuorumEffect>,
    ) -> QuorumAnswer {
        let bytes = payload.len() as u64;
        let over = |queue: &QuorumQueue, extra_messages: u64, extra_bytes: u64| {
            queue.settings.max_length.is_some_and(|max| queue.ready_count() + extra_messages > max)
                || queue.settings.max_length_bytes.is_some_and(|max| queue.ready_bytes + extra_bytes > max)
        };
        if self.settings.reject_publish && over(self, 1, bytes) {
            return QuorumAnswer::Rejected;
        }
        let id = self.next_id;
        self.next_id += 1;
        let held = Held { payload, expires_at_ms, delivery_count: 0, checked_out_to: None, due_ms: None, order_key };
        self.insert_message(id, held);
        self.make_ready(id);
        // Drop-head: the oldest ready messages leave until the queue is within its limits.
        while over(self, 0, 0) {
            let Some(oldest) = self.ready.first().copied() else { break };
            self.take_ready(oldest);
            self.dead_letter(oldest, QuorumDeathReason::MaxLength, effects);
        }
        QuorumAnswer::Done { id: Some(id) }
    }

    fn enqueue_keyed(
        &mut self,
        payload: Arc<[u8]>,
        expires_at_ms: Option<u64>,
        key: Arc<[u8]>,
        now_ms: u64,
        order_key: Option<Arc<[u8]>>,
        effects: &mut Vec<QuorumEffect>,
    ) -> QuorumAnswer {
        let Some(ttl_ms) = self.settings.dedup_ttl_ms else {
            return self.enqueue(payload, expires_at_ms, order_key, effects);
        };
        while let Some((until, _)) = self.dedup_order.first()
            && *until <= now_ms
        {
            if let Some((_, old)) = self.dedup_order.pop_first() {
                self.dedup_keys.remove(&old);
            }
        }
        if self.dedup_keys.contains_key(&key) {
            return QuorumAnswer::Duplicate;
        }
        let answer = self.enqueue(payload, expires_at_ms, order_key, effects);
        if matches!(answer, QuorumAnswer::Done { .. }) {
            if self.dedup_keys.len() >= crate::dedup::DEDUP_KEYS_MAX
                && let Some((_, oldest)) = self.dedup_order.pop_first()
            {
                self.dedup_keys.remove(&oldest);
            }
            let until = now_ms.saturating_add(ttl_ms);
            self.dedup_keys.insert(Arc::clone(&key), until);
            self.dedup_order.insert((until, key));
        }
        answer
    }

    /// The oldest ready message for `basic.get` (see [`QuorumCommand::Dequeue`]). The get
    /// consumer is kept as a cancelled one: never dispatched to, forgotten once it holds
    /// nothing, and its holdings returned when its channel goes (`Down`).
    fn dequeue(&mut self, consumer: QuorumConsumer, settle: bool) -> QuorumAnswer {
        let Some(id) = self.deliverable.first().copied() else { return QuorumAnswer::Empty };
        self.take_ready(id);
        let Some(held) = self.messages.get_mut(&id) else { return QuorumAnswer::Empty };
        let redelivered = held.delivery_count > 0;
        held.delivery_count += 1;
        let (payload, delivery_count) = (Arc::clone(&held.payload), held.delivery_count);
        if settle {
            self.remove_message(id);
        } else {
            held.checked_out_to = Some(consumer.clone());
            held.due_ms = None;
            if self.settings.lease_ms.is_some() {
                self.leased.insert(id);
                self.unstamped = UnstampedHint(true);
            }
            let state = self.consumers.entry(consumer).or_insert(ConsumerState {
                prefetch: 0,
                holds: BTreeSet::new(),
                cancelled: true,
            });
            state.holds.insert(id);
        }
        QuorumAnswer::Dequeued { id, payload, delivery_count, redelivered, remaining: self.ready_count() }
    }

    fn held_by(&self, consumer: &QuorumConsumer, id: QuorumMessageId) -> bool {
        self.consumers.get(consumer).is_some_and(|state| state.holds.contains(&id))
    }

    /// The consumer no longer holds `id` (the message stays where it is).
    fn release(&mut self, consumer: &QuorumConsumer, id: QuorumMessageId) {
        if let Some(state) = self.consumers.get_mut(consumer) {
            state.holds.remove(&id);
        }
        if let Some(held) = self.messages.get_mut(&id) {
            held.checked_out_to = None;
            held.due_ms = None;
        }
        self.leased.remove(&id);
    }

    /// A returned message: dead past the delivery limit; else waiting out its backoff step on
    /// a queue with `x-retry-backoff` (stamped by the next `Tick`), ready again otherwise.
    fn requeue(&mut self, id: QuorumMessageId, effects: &mut Vec<QuorumEffect>) {
        let Some(held) = self.messages.get(&id) else { return };
        if self.settings.delivery_limit.is_some_and(|limit| held.delivery_count > limit) {
            self.dead_letter(id, QuorumDeathReason::DeliveryLimit, effects);
            return;
        }
        self.leased.remove(&id);
        if !self.settings.retry_backoff_ms.is_empty() {
            if let Some(held) = self.messages.get_mut(&id) {
                held.due_ms = None;
            }
            self.waiting.insert(id);
            self.unstamped = UnstampedHint(true);
            return;
        }
        self.make_ready(id);
    }

    fn dead_letter(&mut self, id: QuorumMessageId, reason: QuorumDeathReason, effects: &mut Vec<QuorumEffect>) {
        self.leased.remove(&id);
        self.waiting.remove(&id);
        if let Some(held) = self.remove_message(id) {
            effects.push(QuorumEffect::DeadLetter {
                id,
                payload: held.payload,
                reason,
                delivery_count: held.delivery_count,
            });
        }
    }

    /// A cancelled consumer that holds nothing more is forgotten.
    fn forget_if_done(&mut self, consumer: &QuorumConsumer) {
        if self.consumers.get(consumer).is_some_and(|state| state.cancelled && state.holds.is_empty()) {
            self.consumers.remove(consumer);
        }
    }

    fn remove_consumer(&mut self, consumer: &QuorumConsumer, effects: &mut Vec<QuorumEffect>) {
        let Some(state) = self.consumers.remove(consumer) else { return };
        self.service_order.retain(|found| found != consumer);
        for id in state.holds {
            if let Some(held) = self.messages.get_mut(&id) {
                held.checked_out_to = None;
                held.due_ms = None;
            }
            self.requeue(id, effects);
        }
    }

    /// Hands ready messages, oldest first, to consumers with credit, in turn; with single
    /// active consumer, to the longest-attached consumer that takes messages alone (the
    /// service order is then never turned, so it stays the order of attaching).
    fn dispatch(&mut self, effects: &mut Vec<QuorumEffect>) {
        if self.settings.single_active_consumer {
            let active = self
                .service_order
                .iter()
                .find(|consumer| self.consumers.get(*consumer).is_some_and(|state| !state.cancelled))
                .cloned();
            let Some(active) = active else { return };
            while !self.deliverable.is_empty() && self.consumers.get(&active).is_some_and(ConsumerState::has_credit) {
                self.deliver_first_ready(&active, effects);
            }
            return;
        }
        let mut idle_in_a_row = 0;
        while !self.deliverable.is_empty() && idle_in_a_row < self.service_order.len() {
            let Some(consumer) = self.service_order.pop_front() else { break };
            self.service_order.push_back(consumer.clone());
            let has_credit = self.consumers.get(&consumer).is_some_and(ConsumerState::has_credit);
            if !has_credit {
                idle_in_a_row += 1;
                continue;
            }
            idle_in_a_row = 0;
            self.deliver_first_ready(&consumer, effects);
        }
    }

    /// Checks the oldest deliverable message out to `consumer` (under a lease, if the queue has
    /// one).
    fn deliver_first_ready(&mut self, consumer: &QuorumConsumer, effects: &mut Vec<QuorumEffect>) {
        let Some(id) = self.deliverable.first().copied() else { return };
        self.take_ready(id);
        let Some(held) = self.messages.get_mut(&id) else { return };
        let redelivered = held.delivery_count > 0;
        held.delivery_count += 1;
        held.checked_out_to = Some(consumer.clone());
        held.due_ms = None;
        effects.push(QuorumEffect::Deliver {
            consumer: consumer.clone(),
            id,
            payload: Arc::clone(&held.payload),
            delivery_count: held.delivery_count,
            redelivered,
        });
        if self.settings.lease_ms.is_some() {
            self.leased.insert(id);
            self.unstamped = UnstampedHint(true);
        }
        if let Some(state) = self.consumers.get_mut(consumer) {
            state.holds.insert(id);
        }
    }
}

mod ordering;
mod snapshot;
mod timers;

#[cfg(test)]
mod tests;
