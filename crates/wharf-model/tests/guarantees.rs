//! The delivery guarantees in the model, driven with explicit time: dead-lettering, delivery
//! limits, leases, retry backoff, TTLs, length limits, de-duplication, per-key ordering and
//! delayed messages; and a property test comparing a queue with a simple reference model under
//! random publish / deliver / ack / nack / expire / crash sequences, with and without priorities. Every operation goes through
//! `support::CheckedBroker`, which checks the model's own invariants after it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bytes::Bytes;
use std::sync::Arc;
use support::CheckedBroker;
use wharf_model::{BrokerModel, ChannelKey, ConnectionId, Effects, Message, QueueDeclare};
use wharf_wire::protocol::BasicProperties;
use wharf_wire::types::{AMQPValue, FieldArray, FieldTable, LongString};

fn key(connection: u64, channel: u16) -> ChannelKey {
    ChannelKey { connection: ConnectionId(connection), channel }
}

fn message_with(body: &str, properties: BasicProperties) -> Arc<Message> {
    Arc::new(Message::new(
        String::new(),
        "q".into(),
        std::sync::Arc::new(properties.clone()),
        wharf_wire::frame::encode_properties(&properties),
        Bytes::from(body.to_owned()),
    ))
}

fn keyed(body: &str, order_key: &str) -> Arc<Message> {
    let mut headers = FieldTable::default();
    headers.insert("k".into(), AMQPValue::LongString(LongString::from(order_key.as_bytes().to_vec())));
    message_with(body, BasicProperties::default().with_headers(headers))
}

fn table(pairs: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in pairs {
        table.insert(name.into(), value);
    }
    table
}

fn declare(broker: &mut CheckedBroker, name: &str, arguments: FieldTable) {
    broker
        .vhost_mut("/")
        .unwrap()
        .declare_queue(&QueueDeclare {
            name,
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: &arguments,
            connection: ConnectionId(1),
            store_log: None,
            dedup_log: None,
            server_named: false,
        })
        .unwrap();
}

fn bodies(effects: &Effects) -> Vec<String> {
    effects
        .deliveries
        .iter()
        .map(|delivery| String::from_utf8(delivery.message.bytes_in_memory().unwrap().to_vec()).unwrap())
        .collect()
}

#[test]
fn ordered_keys_go_one_at_a_time_across_backoff() {
    let mut broker = CheckedBroker::new(1);
    broker.set_now(1_000);
    let ordered_by = AMQPValue::LongString(LongString::from(b"k".to_vec()));
    let backoff = AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongInt(300)]));
    declare(&mut broker, "q", table(vec![("x-ordered-by", ordered_by), ("x-retry-backoff", backoff)]));
    for (body, order_key) in [("A1", "A"), ("B1", "B"), ("A2", "A"), ("B2", "B"), ("A3", "A")] {
        broker.enqueue("/", "q", keyed(body, order_key), None);
    }
    let one = key(1, 1);
    broker.open_channel(one, "/").unwrap();
    let (_, effects) = broker.consume(one, "q", "c", false, false).unwrap();
    assert_eq!(bodies(&effects), ["A1", "B1"]);
    // A1 nacked: waits 300 ms; B1 acked: B2 goes.
    let effects = broker.reject(one, 1, false, true).unwrap();
    assert!(bodies(&effects).is_empty(), "{:?}", bodies(&effects));
    let effects = broker.ack(one, 2, false).unwrap();
    assert_eq!(bodies(&effects), ["B2"]);
    broker.set_now(1_299);
    assert!(bodies(&broker.tick()).is_empty());
    broker.set_now(1_300);
    assert_eq!(bodies(&broker.tick()), ["A1"]);
    let effects = broker.ack(one, 4, false).unwrap();
    assert_eq!(bodies(&effects), ["A2"]);
}

// ---------------------------------------------------------------------------------------------
// The property test: one queue against a reference model written as plainly as possible.
// ---------------------------------------------------------------------------------------------

use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Publish {
        order_key: Option<u8>,
        ttl_ms: Option<u16>,
        /// The `priority` property (priority queues deliver the highest first).
        priority: Option<u8>,
    },
    Get,
    Ack(usize),
    Nack {
        pick: usize,
        requeue: bool,
    },
    CloseChannel,
    Advance(u16),
    Crash,
    /// The runtime drops a queued message's body from memory (it is read back from the store
    /// when needed): nothing observable may change.
    PageOut(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (
            prop::option::of(0u8..3),
            prop::option::of(prop_oneof![Just(0u16), 1u16..400]),
            prop::option::of(0u8..6),
        )
            .prop_map(|(order_key, ttl_ms, priority)| Op::Publish { order_key, ttl_ms, priority }),
        4 => Just(Op::Get),
        2 => any::<usize>().prop_map(Op::Ack),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(pick, requeue)| Op::Nack { pick, requeue }),
        1 => Just(Op::CloseChannel),
        2 => (1u16..300).prop_map(Op::Advance),
        1 => Just(Op::Crash),
        2 => any::<usize>().prop_map(Op::PageOut),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Ready,
    Unacked,
    Waiting(u64),
}

#[derive(Debug, Clone)]
struct RefMessage {
    id: u64,
    order_key: Option<u8>,
    /// Its effective priority: 0 without one or in a queue without priorities, at most the
    /// queue's maximum.
    priority: u8,
    count: u32,
    expires_at: Option<u64>,
    state: State,
}

/// What happened to a message that left the queue: `None` acked or dropped, `Some(reason)`
/// dead-lettered.
type Outcome = (u64, Option<&'static str>);

#[derive(Debug)]
struct Reference {
    now: u64,
    limit: u32,
    backoff: Vec<u64>,
    dead_letter_exchange: bool,
    ordered: bool,
    messages: Vec<RefMessage>,
}

impl Reference {
    fn leave(&mut self, id: u64, reason: &'static str, outcomes: &mut Vec<Outcome>) {
        self.messages.retain(|message| message.id != id);
        let dead_lettered = self.dead_letter_exchange || reason == "delivery_limit";
        outcomes.push((id, dead_lettered.then_some(reason)));
    }

    fn expire(&mut self, outcomes: &mut Vec<Outcome>) {
        let now = self.now;
        let expired: Vec<u64> = self
            .messages
            .iter()
            .filter(|message| message.state == State::Ready && message.expires_at.is_some_and(|at| at <= now))
            .map(|message| message.id)
            .collect();
        for id in expired {
            self.leave(id, "expired", outcomes);
        }
    }

    fn wake(&mut self) {
        for message in &mut self.messages {
            if let State::Waiting(until) = message.state
                && until <= self.now
            {
                message.state = State::Ready;
            }
        }
    }

    /// Deliverable: ready, and (ordered) no older message of its key is still in the queue.
    fn deliverable(&self, index: usize) -> bool {
        let message = &self.messages[index];
        message.state == State::Ready
            && (!self.ordered
                || message.order_key.is_none()
                || !self.messages[..index].iter().any(|older| older.order_key == message.order_key))
    }

    /// The highest priority first; within a priority, the oldest.
    fn get(&mut self, outcomes: &mut Vec<Outcome>) -> Option<u64> {
        self.expire(outcomes);
        let deliverable = (0..self.messages.len()).filter(|&index| self.deliverable(index));
        let index = deliverable.min_by_key(|&index| (std::cmp::Reverse(self.messages[index].priority), index))?;
        let message = &mut self.messages[index];
        message.count += 1;
        message.state = State::Unacked;
        Some(message.id)
    }

    fn step(&self, count: u32) -> u64 {
        match self.backoff.len() {
            0 => 0,
            len => self.backoff[((count.max(1) - 1) as usize).min(len - 1)],
        }
    }

    fn give_back(&mut self, id: u64, explicit: bool, outcomes: &mut Vec<Outcome>) {
        let Some(count) = self.messages.iter().find(|message| message.id == id).map(|message| message.count) else {
            return;
        };
        if count >= self.limit {
            self.leave(id, "delivery_limit", outcomes);
            return;
        }
        let wait = if explicit { self.step(count) } else { 0 };
        let message = self.messages.iter_mut().find(|message| message.id == id).unwrap();
        message.state = if wait > 0 { State::Waiting(self.now + wait) } else { State::Ready };
    }

    fn crash(&mut self, outcomes: &mut Vec<Outcome>) {
        for message in &mut self.messages {
            message.state = State::Ready;
        }
        let exhausted: Vec<u64> =
            self.messages.iter().filter(|message| message.count >= self.limit).map(|message| message.id).collect();
        for id in exhausted {
            self.leave(id, "delivery_limit", outcomes);
        }
        if !self.backoff.is_empty() {
            for index in 0..self.messages.len() {
                let count = self.messages[index].count;
                let wait = self.step(count);
                if count > 0 && wait > 0 && self.deliverable(index) {
                    self.messages[index].state = State::Waiting(self.now + wait);
                }
            }
        }
        self.expire(outcomes);
    }
}

fn outcomes_of(effects: &Effects) -> Vec<Outcome> {
    let mut outcomes: Vec<Outcome> =
        effects.removed.iter().map(|removed| (removed.stored.unwrap().seq, None)).collect();
    // A no-ack delivery of a paged message is removed once its body is read: a removal too.
    outcomes.extend(
        effects
            .deliveries
            .iter()
            .filter(|delivery| delivery.remove_record_after_read)
            .map(|delivery| (delivery.store.unwrap().seq, None)),
    );
    for transfer in &effects.transfers {
        // A dead letter, paged or not, carries its x-death (re-parsed for a paged-out one).
        let properties = transfer.message.full_properties();
        assert!(properties.headers().as_ref().is_some_and(|headers| headers.contains_key("x-death")));
        let source = transfer.source.as_ref().unwrap().stored.unwrap().seq;
        outcomes.push((source, transfer.reason.map(|reason| reason.as_str())));
    }
    outcomes
}

/// A delivery the harness holds: its tag, message, lease due time, and whether the lease ran out.
#[derive(Debug, Clone)]
struct Held {
    tag: u64,
    id: u64,
    lease_due: Option<u64>,
    expired: bool,
}

struct Harness {
    broker: CheckedBroker,
    arguments: FieldTable,
    channel: ChannelKey,
    /// Deliveries on the current channel.
    outstanding: Vec<Held>,
    /// Every message published, by id (= store seq): what the store would give back.
    originals: std::collections::HashMap<u64, Arc<Message>>,
}

/// The store log id the harness's queue pretends to have (paged bodies point into it).
const STORE_QUEUE: u64 = 1;

/// Where the harness pretends message `id`'s record is.
fn paged_body(id: u64, body_bytes: u64) -> wharf_model::PagedBody {
    wharf_model::PagedBody { store_log: STORE_QUEUE, segment_id: 1, offset: id * 100, record_bytes: 90, body_bytes }
}

impl Harness {
    fn new(arguments: FieldTable, now: u64) -> Harness {
        let mut broker = CheckedBroker::new(3);
        broker.set_now(now);
        declare(&mut broker, "q", arguments.clone());
        broker.vhost_mut("/").unwrap().queue_mut("q").unwrap().store_log = Some(STORE_QUEUE);
        let channel = key(1, 1);
        broker.open_channel(channel, "/").unwrap();
        Harness { broker, arguments, channel, outstanding: Vec::new(), originals: Default::default() }
    }

    /// Opens the channel again with the same number (as clients reuse channel numbers): timers of
    /// the old one must not touch the new one's deliveries.
    fn reopen(&mut self) {
        self.broker.open_channel(self.channel, "/").unwrap();
        self.outstanding.clear();
    }

    fn crash(&mut self, now: u64) -> Effects {
        let mut entries = self.broker.queue_entries("/", "q");
        entries.sort_by_key(|entry| entry.store_seq);
        let mut broker = CheckedBroker::new(4);
        broker.set_now(now);
        declare(&mut broker, "q", self.arguments.clone());
        let originals = &self.originals;
        let effects = broker.recover_with(|model: &mut BrokerModel| {
            let queue = model.vhost_mut("/").unwrap().queue_mut("q").unwrap();
            queue.store_log = Some(STORE_QUEUE);
            for entry in entries {
                // As the runtime recovers: the whole message from the store, its body left there
                // for what was paged out before the crash.
                let id = entry.store_seq.unwrap();
                let whole = Arc::clone(&originals[&id]);
                match entry.message.paged() {
                    Some(paged) => {
                        queue.enqueue_recovered_paged(
                            (*whole).clone(),
                            paged,
                            id,
                            entry.enqueued_ms,
                            entry.delivery_count,
                            true,
                        );
                    }
                    None => {
                        queue.enqueue_recovered(whole, Some(id), entry.enqueued_ms, entry.delivery_count, true);
                    }
                }
            }
        });
        self.broker = broker;
        self.reopen();
        effects
    }
}

fn sorted(mut outcomes: Vec<Outcome>) -> Vec<Outcome> {
    outcomes.sort();
    outcomes
}

/// Cases per run: 500 in CI; `WHARF_PROPTEST_CASES` for longer runs.
fn cases() -> u32 {
    std::env::var("WHARF_PROPTEST_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(500)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn a_queue_behaves_like_the_reference_model(
        limit in 1u32..4,
        backoff in prop::collection::vec(prop_oneof![Just(0u64), Just(50u64), Just(200u64)], 0..3),
        dead_letter_exchange in any::<bool>(),
        ordered in any::<bool>(),
        max_priority in prop::option::of(0u8..4),
        lease_ms in prop::option::of(prop_oneof![Just(100u64), Just(250u64)]),
        ops in prop::collection::vec(op(), 1..70),
    ) {
        let mut pairs = vec![("x-delivery-limit", AMQPValue::LongInt(limit as i32))];
        if let Some(lease_ms) = lease_ms {
            pairs.push(("x-consumer-timeout", AMQPValue::LongLongInt(lease_ms as i64)));
        }
        if !backoff.is_empty() {
            let steps = backoff.iter().map(|ms| AMQPValue::LongLongInt(*ms as i64)).collect::<Vec<_>>();
            pairs.push(("x-retry-backoff", AMQPValue::FieldArray(FieldArray::from(steps))));
        }
        if dead_letter_exchange {
            pairs.push(("x-dead-letter-exchange", AMQPValue::LongString(LongString::from(b"dlx".to_vec()))));
        }
        if ordered {
            pairs.push(("x-ordered-by", AMQPValue::LongString(LongString::from(b"k".to_vec()))));
        }
        if let Some(max_priority) = max_priority {
            pairs.push(("x-max-priority", AMQPValue::ShortShortUInt(max_priority)));
        }
        let mut now = 1_000_000u64;
        let mut harness = Harness::new(table(pairs), now);
        let mut reference = Reference { now, limit, backoff, dead_letter_exchange, ordered, messages: Vec::new() };
        let mut next_id = 1u64;
        for op in ops {
            let mut expected = Vec::new();
            let actual: Effects;
            match op {
                Op::Publish { order_key, ttl_ms, priority } => {
                    let id = next_id;
                    next_id += 1;
                    let mut properties = BasicProperties::default();
                    if let Some(order_key) = order_key {
                        let mut headers = FieldTable::default();
                        headers.insert("k".into(), AMQPValue::LongString(LongString::from(vec![b'a' + order_key])));
                        properties = properties.with_headers(headers);
                    }
                    if let Some(ttl_ms) = ttl_ms {
                        properties = properties.with_expiration(ttl_ms.to_string().into());
                    }
                    if let Some(priority) = priority {
                        properties = properties.with_priority(priority);
                    }
                    let message = message_with(&id.to_string(), properties);
                    harness.originals.insert(id, Arc::clone(&message));
                    actual = harness.broker.enqueue("/", "q", message, Some(id));
                    reference.messages.push(RefMessage {
                        id,
                        order_key,
                        priority: max_priority.map_or(0, |max| priority.unwrap_or(0).min(max)),
                        count: 0,
                        expires_at: ttl_ms.map(|ttl| now + u64::from(ttl)),
                        state: State::Ready,
                    });
                    // An enqueue may expire messages already due (it dispatches).
                    reference.expire(&mut expected);
                }
                Op::Get => {
                    let (delivery, effects) = harness.broker.get(harness.channel, "q", false).unwrap();
                    let got = delivery.map(|delivery| {
                        let id = delivery.store.unwrap().seq;
                        match delivery.message.paged() {
                            // A paged-out delivery names its record, and keeps its properties.
                            Some(paged) => {
                                assert_eq!(paged, paged_body(id, harness.originals[&id].body_bytes()));
                                let properties = delivery.message.full_properties();
                                let original = harness.originals[&id].full_properties();
                                assert_eq!(properties.expiration(), original.expiration());
                            }
                            None => assert_eq!(delivery.message.bytes_in_memory(), harness.originals[&id].bytes_in_memory()),
                        }
                        let lease_due = lease_ms.map(|lease| now + lease);
                        harness.outstanding.push(Held { tag: delivery.delivery_tag, id, lease_due, expired: false });
                        id
                    });
                    prop_assert_eq!(got, reference.get(&mut expected), "get");
                    actual = effects;
                }
                Op::Ack(pick) | Op::Nack { pick, .. } if harness.outstanding.is_empty() => {
                    let _ = pick;
                    continue;
                }
                Op::Ack(pick) => {
                    let held = harness.outstanding.remove(pick % harness.outstanding.len());
                    actual = harness.broker.ack(harness.channel, held.tag, false).unwrap();
                    // A late ack of a delivery whose lease ran out is ignored.
                    if !held.expired {
                        reference.messages.retain(|message| message.id != held.id);
                        expected.push((held.id, None));
                    }
                }
                Op::Nack { pick, requeue } => {
                    let held = harness.outstanding.remove(pick % harness.outstanding.len());
                    actual = harness.broker.reject(harness.channel, held.tag, false, requeue).unwrap();
                    let id = held.id;
                    if held.expired {
                        // Ignored, like a late ack.
                    } else if requeue {
                        reference.give_back(id, true, &mut expected);
                    } else {
                        reference.leave(id, "rejected", &mut expected);
                    }
                    // The queue is dispatched again: whatever is due expires (a requeued message
                    // past its TTL too, as RabbitMQ).
                    reference.expire(&mut expected);
                }
                Op::CloseChannel => {
                    actual = harness.broker.close_channel(harness.channel);
                    for held in std::mem::take(&mut harness.outstanding) {
                        if !held.expired {
                            reference.give_back(held.id, false, &mut expected);
                        }
                    }
                    reference.expire(&mut expected);
                    harness.reopen();
                }
                Op::Advance(ms) => {
                    now += u64::from(ms);
                    reference.now = now;
                    harness.broker.set_now(now);
                    actual = harness.broker.tick();
                    // Leases that ran out give their message back (delivery limit applies).
                    for held in harness.outstanding.iter_mut() {
                        if !held.expired && held.lease_due.is_some_and(|due| due <= now) {
                            held.expired = true;
                            reference.give_back(held.id, false, &mut expected);
                        }
                    }
                    reference.wake();
                    reference.expire(&mut expected);
                }
                Op::Crash => {
                    actual = harness.crash(now);
                    reference.crash(&mut expected);
                }
                Op::PageOut(pick) => {
                    let entries = harness.broker.queue_entries("/", "q");
                    if entries.is_empty() {
                        continue;
                    }
                    let entry = &entries[pick % entries.len()];
                    let id = entry.store_seq.unwrap();
                    let paged = paged_body(id, harness.originals[&id].body_bytes());
                    // Refused for an entry that is delivered or already paged; either way no effect.
                    harness.broker.page_out("/", "q", entry.id, id, paged);
                    actual = Effects::default();
                }
            }
            prop_assert!(actual.deliveries.is_empty(), "no consumers: nothing is pushed");
            prop_assert_eq!(sorted(outcomes_of(&actual)), sorted(expected), "outcomes after {:?}", op);
            let mut in_model: Vec<(u64, u32)> = harness
                .broker
                .queue_entries("/", "q")
                .iter()
                .map(|entry| (entry.store_seq.unwrap(), entry.delivery_count))
                .collect();
            in_model.sort();
            let in_reference: Vec<(u64, u32)> = reference.messages.iter().map(|message| (message.id, message.count)).collect();
            prop_assert_eq!(in_model, in_reference, "contents after {:?}", op);
        }
    }
}
