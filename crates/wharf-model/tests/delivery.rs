//! Consumers, prefetch, acknowledgements, requeues and channel loss, and a property test that no
//! sequence of operations loses or duplicates a message. Every operation goes through
//! `support::CheckedBroker`, which checks the model's own invariants after it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bytes::Bytes;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use support::CheckedBroker;
use wharf_model::{ChannelKey, ConnectionId, Effects, Message, QueueDeclare};
use wharf_wire::protocol::BasicProperties;
use wharf_wire::reply_code;
use wharf_wire::types::FieldTable;

fn key(connection: u64, channel: u16) -> ChannelKey {
    ChannelKey { connection: ConnectionId(connection), channel }
}

fn message(body: &str) -> Arc<Message> {
    Arc::new(Message::new(
        String::new(),
        "q".into(),
        std::sync::Arc::new(BasicProperties::default()),
        Bytes::new(),
        Bytes::from(body.to_owned()),
    ))
}

/// Declares a queue on connection 1 (the model's rules apply; panics if refused).
fn declare(broker: &mut CheckedBroker, name: &str, durable: bool, exclusive: bool, auto_delete: bool) {
    let none = FieldTable::default();
    broker
        .vhost_mut("/")
        .unwrap()
        .declare_queue(&QueueDeclare {
            name,
            passive: false,
            durable,
            exclusive,
            auto_delete,
            arguments: &none,
            connection: ConnectionId(1),
            // A durable queue has a store log (the tests enqueue with store seqs, and removals
            // name where the message was stored).
            store_log: durable.then_some(1),
            dedup_log: None,
            server_named: false,
        })
        .unwrap();
}

fn broker_with_queue(name: &str) -> CheckedBroker {
    let mut broker = CheckedBroker::new(7);
    declare(&mut broker, name, true, false, false);
    broker
}

fn bodies(effects: &Effects) -> Vec<String> {
    effects
        .deliveries
        .iter()
        .map(|delivery| String::from_utf8(delivery.message.bytes_in_memory().unwrap().to_vec()).unwrap())
        .collect()
}

#[test]
fn prefetch_limits_each_consumer_and_acks_make_room() {
    let mut broker = broker_with_queue("q");
    let channel = key(1, 1);
    broker.open_channel(channel, "/").unwrap();
    broker.qos(channel, 2, false).unwrap();
    for index in 0..5 {
        broker.enqueue("/", "q", message(&format!("m{index}")), None);
    }
    let (tag, effects) = broker.consume(channel, "q", "", false, false).unwrap();
    assert!(tag.starts_with("amq.ctag-"));
    assert_eq!(bodies(&effects), vec!["m0", "m1"], "prefetch 2");
    let effects = broker.ack(channel, 1, false).unwrap();
    assert_eq!(bodies(&effects), vec!["m2"]);
    assert_eq!(effects.removed.len(), 1);
    let effects = broker.ack(channel, 3, true).unwrap();
    assert_eq!(bodies(&effects), vec!["m3", "m4"], "multiple ack frees two");
    assert_eq!(broker.ack(channel, 99, false).unwrap_err().code, reply_code::PRECONDITION_FAILED);
}

#[test]
fn global_prefetch_is_shared_by_the_channel_and_dispatch_is_round_robin() {
    let mut broker = broker_with_queue("q");
    let channel = key(1, 1);
    broker.open_channel(channel, "/").unwrap();
    broker.qos(channel, 3, true).unwrap();
    broker.consume(channel, "q", "a", false, false).unwrap();
    broker.consume(channel, "q", "b", false, false).unwrap();
    let mut effects = Effects::default();
    for index in 0..6 {
        let more = broker.enqueue("/", "q", message(&format!("m{index}")), None);
        effects.deliveries.extend(more.deliveries);
    }
    let tags: Vec<&str> = effects.deliveries.iter().map(|d| d.consumer_tag.as_deref().unwrap()).collect();
    assert_eq!(tags, vec!["a", "b", "a"], "three in flight across the channel, alternating");
}

#[test]
fn nack_requeues_in_place_marked_redelivered_and_reject_discards() {
    let mut broker = broker_with_queue("q");
    let channel = key(1, 1);
    broker.open_channel(channel, "/").unwrap();
    for index in 0..3 {
        broker.enqueue("/", "q", message(&format!("m{index}")), None);
    }
    let (first, _) = broker.get(channel, "q", false).unwrap();
    let first = first.unwrap();
    assert!(!first.redelivered);
    assert_eq!(first.message_count, 2);
    broker.reject(channel, first.delivery_tag, false, true).unwrap();
    let (again, _) = broker.get(channel, "q", false).unwrap();
    let again = again.unwrap();
    assert_eq!(again.message.bytes_in_memory().unwrap(), "m0", "requeued at its original place, ahead of m1");
    assert!(again.redelivered);
    assert_eq!(again.delivery_count, 2);
    let effects = broker.reject(channel, again.delivery_tag, false, false).unwrap();
    assert_eq!(effects.removed.len(), 1, "rejected without requeue: gone");
    assert_eq!(broker.queue_entries("/", "q").len(), 2);
}

#[test]
fn a_dead_channel_gives_its_messages_to_another_consumer_as_redeliveries() {
    let mut broker = broker_with_queue("q");
    let (dying, alive) = (key(1, 1), key(2, 1));
    broker.open_channel(dying, "/").unwrap();
    broker.open_channel(alive, "/").unwrap();
    broker.qos(alive, 1, false).unwrap();
    broker.enqueue("/", "q", message("m0"), None);
    broker.enqueue("/", "q", message("m1"), None);
    let (_, effects) = broker.consume(dying, "q", "d", false, false).unwrap();
    assert_eq!(effects.deliveries.len(), 2);
    let (_, effects) = broker.consume(alive, "q", "a", false, false).unwrap();
    assert!(effects.deliveries.is_empty());
    let effects = broker.close_connection(ConnectionId(1));
    assert_eq!(bodies(&effects), vec!["m0"], "prefetch 1 on the surviving consumer");
    assert!(effects.deliveries[0].redelivered);
    let effects = broker.ack(alive, 1, false).unwrap();
    assert_eq!(bodies(&effects), vec!["m1"]);
    assert!(effects.deliveries[0].redelivered);
}

#[test]
fn consumer_errors() {
    let mut broker = broker_with_queue("q");
    let channel = key(1, 1);
    broker.open_channel(channel, "/").unwrap();
    assert_eq!(broker.consume(channel, "missing", "", false, false).unwrap_err().code, reply_code::NOT_FOUND);
    broker.consume(channel, "q", "tag", false, true).unwrap();
    let reused = broker.consume(channel, "q", "tag", false, false).unwrap_err();
    assert_eq!(reused.code, reply_code::ACCESS_REFUSED, "exclusive consumer holds the queue");
    broker.cancel(channel, "tag").unwrap();
    broker.consume(channel, "q", "tag", false, false).unwrap();
    assert_eq!(broker.consume(channel, "q", "tag", false, false).unwrap_err().code, reply_code::NOT_ALLOWED);
    assert_eq!(broker.recover(channel, false).unwrap_err().code, reply_code::NOT_IMPLEMENTED);
}

#[test]
fn auto_delete_queues_go_with_their_last_consumer_and_exclusive_ones_with_their_connection() {
    let mut broker = CheckedBroker::new(1);
    let channel = key(1, 1);
    broker.open_channel(channel, "/").unwrap();
    for (name, exclusive, auto_delete) in [("auto", false, true), ("mine", true, false)] {
        declare(&mut broker, name, false, exclusive, auto_delete);
    }
    broker.enqueue("/", "auto", message("x"), Some(9));
    broker.consume(channel, "auto", "c", false, false).unwrap();
    let effects = broker.cancel(channel, "c").unwrap();
    assert_eq!(effects.deleted_queues.len(), 1);
    assert_eq!(effects.removed.len(), 1, "its messages leave with it");
    let effects = broker.close_connection(ConnectionId(1));
    assert_eq!(effects.deleted_queues.iter().map(|queue| queue.name.as_str()).collect::<Vec<_>>(), vec!["mine"]);
}

#[test]
fn a_slow_reader_gets_no_more_than_the_connection_byte_limit_until_bytes_are_written() {
    let mut broker = broker_with_queue("q");
    let channel = key(1, 1);
    broker.open_channel(channel, "/").unwrap();
    let body = "x".repeat(1024 * 1024);
    for _ in 0..40 {
        broker.enqueue("/", "q", message(&body), None);
    }
    // A no-ack consumer has no prefetch limit; only the connection's byte budget holds it back.
    let (_, effects) = broker.consume(channel, "q", "c", true, false).unwrap();
    let limit = wharf_model::broker::CONNECTION_PENDING_BYTES_MAX;
    let delivered: u64 =
        effects.deliveries.iter().map(|delivery| wharf_model::broker::delivery_bytes(&delivery.message)).sum();
    assert!(delivered >= limit && delivered < limit + 2 * 1024 * 1024, "{delivered}");
    assert!(broker.enqueue("/", "q", message("more"), None).deliveries.is_empty(), "paused");
    // The runtime wrote half of it to the socket: dispatching resumes up to the limit again.
    let resumed = broker.written(ConnectionId(1), delivered / 2);
    assert!(!resumed.deliveries.is_empty());
    let remaining = broker.vhost("/").unwrap().queue("q").unwrap().ready_count();
    assert!(remaining > 0, "still bounded: {remaining} left waiting");
}

#[derive(Debug, Clone)]
enum Op {
    Publish,
    Consume { channel: u16, prefetch: u16 },
    Cancel { channel: u16 },
    Get { channel: u16 },
    Ack { channel: u16, pick: usize, multiple: bool },
    Nack { channel: u16, pick: usize, requeue: bool },
    CloseChannel { channel: u16 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Publish),
        1 => (1u16..4, 0u16..4).prop_map(|(channel, prefetch)| Op::Consume { channel, prefetch }),
        1 => (1u16..4).prop_map(|channel| Op::Cancel { channel }),
        1 => (1u16..4).prop_map(|channel| Op::Get { channel }),
        3 => (1u16..4, any::<usize>(), any::<bool>()).prop_map(|(channel, pick, multiple)| Op::Ack { channel, pick, multiple }),
        2 => (1u16..4, any::<usize>(), any::<bool>()).prop_map(|(channel, pick, requeue)| Op::Nack { channel, pick, requeue }),
        1 => (1u16..4).prop_map(|channel| Op::CloseChannel { channel }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// Every published message is, at every moment, in exactly one place: ready, unacknowledged
    /// on exactly one channel, or removed exactly once. Prefetch limits are never exceeded.
    #[test]
    fn no_message_is_lost_or_duplicated(ops in proptest::collection::vec(op(), 1..150)) {
        let mut broker = broker_with_queue("q");
        let mut published = 0u64;
        let mut removed: BTreeMap<u64, u32> = BTreeMap::new();
        // delivery tag -> message number, per channel
        let mut outstanding: BTreeMap<u16, BTreeMap<u64, u64>> = BTreeMap::new();
        // channel -> (consumer generation, prefetch); deliveries to the current consumer are
        // counted against its prefetch.
        let mut prefetch: BTreeMap<u16, (u64, u16)> = BTreeMap::new();
        let mut generation = 0u64;
        let mut by_consumer: BTreeMap<u16, BTreeMap<u64, u64>> = BTreeMap::new();
        let number = |message: &Message| String::from_utf8(message.bytes_in_memory().unwrap().to_vec()).unwrap().parse::<u64>().unwrap();
        let apply = |effects: Effects,
                     outstanding: &mut BTreeMap<u16, BTreeMap<u64, u64>>,
                     removed: &mut BTreeMap<u64, u32>,
                     by_consumer: &mut BTreeMap<u16, BTreeMap<u64, u64>>,
                     prefetch: &BTreeMap<u16, (u64, u16)>| {
            for delivery in effects.deliveries {
                let channel = delivery.channel.channel;
                outstanding.entry(channel).or_default().insert(delivery.delivery_tag, number(&delivery.message));
                if let Some((current, _)) = prefetch.get(&channel) {
                    by_consumer.entry(channel).or_default().insert(delivery.delivery_tag, *current);
                }
            }
            for gone in effects.removed {
                *removed.entry(gone.stored.unwrap().seq).or_default() += 1;
            }
        };
        for channel in 1..4 {
            broker.open_channel(key(1, channel), "/").unwrap();
        }
        for op in ops {
            match op {
                Op::Publish => {
                    let effects = broker.enqueue("/", "q", message(&published.to_string()), Some(published));
                    published += 1;
                    apply(effects, &mut outstanding, &mut removed, &mut by_consumer, &prefetch);
                }
                Op::Consume { channel, prefetch: limit } => {
                    if prefetch.contains_key(&channel) { continue; }
                    broker.qos(key(1, channel), limit, false).unwrap();
                    generation += 1;
                    prefetch.insert(channel, (generation, limit));
                    if let Ok((_, effects)) = broker.consume(key(1, channel), "q", "c", false, false) {
                        apply(effects, &mut outstanding, &mut removed, &mut by_consumer, &prefetch);
                    }
                }
                Op::Cancel { channel } => {
                    if let Ok(effects) = broker.cancel(key(1, channel), "c") {
                        prefetch.remove(&channel);
                        apply(effects, &mut outstanding, &mut removed, &mut by_consumer, &prefetch);
                    }
                }
                Op::Get { channel } => {
                    if let Ok((Some(delivery), effects)) = broker.get(key(1, channel), "q", false) {
                        outstanding.entry(channel).or_default().insert(delivery.delivery_tag, number(&delivery.message));
                        apply(effects, &mut outstanding, &mut removed, &mut by_consumer, &prefetch);
                    }
                }
                Op::Ack { channel, pick, multiple } => {
                    let tags: Vec<u64> = outstanding.get(&channel).map(|tags| tags.keys().copied().collect()).unwrap_or_default();
                    if tags.is_empty() || !broker.channel_open(key(1, channel)) { continue; }
                    let tag = tags[pick % tags.len()];
                    let effects = broker.ack(key(1, channel), tag, multiple).unwrap();
                    let acked: Vec<u64> = outstanding[&channel].range(..=if multiple { tag } else { 0 }).map(|(t, _)| *t).chain(std::iter::once(tag)).collect();
                    for acked_tag in acked {
                        outstanding.get_mut(&channel).unwrap().remove(&acked_tag);
                        by_consumer.entry(channel).or_default().remove(&acked_tag);
                    }
                    apply(effects, &mut outstanding, &mut removed, &mut by_consumer, &prefetch);
                }
                Op::Nack { channel, pick, requeue } => {
                    let tags: Vec<u64> = outstanding.get(&channel).map(|tags| tags.keys().copied().collect()).unwrap_or_default();
                    if tags.is_empty() || !broker.channel_open(key(1, channel)) { continue; }
                    let tag = tags[pick % tags.len()];
                    outstanding.get_mut(&channel).unwrap().remove(&tag);
                    by_consumer.entry(channel).or_default().remove(&tag);
                    let effects = broker.reject(key(1, channel), tag, false, requeue).unwrap();
                    apply(effects, &mut outstanding, &mut removed, &mut by_consumer, &prefetch);
                }
                Op::CloseChannel { channel } => {
                    let effects = broker.close_channel(key(1, channel));
                    outstanding.remove(&channel);
                    by_consumer.remove(&channel);
                    prefetch.remove(&channel);
                    apply(effects, &mut outstanding, &mut removed, &mut by_consumer, &prefetch);
                    broker.open_channel(key(1, channel), "/").unwrap();
                }
            }
            // Conservation: every message is in exactly one place.
            let in_queue: Vec<u64> = broker.queue_entries("/", "q").iter().map(|entry| entry.store_seq.unwrap()).collect();
            let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
            for seq in in_queue { *seen.entry(seq).or_default() += 1; }
            for (seq, count) in &removed { *seen.entry(*seq).or_default() += count; }
            prop_assert_eq!(seen.len() as u64, published, "every message accounted for");
            prop_assert!(seen.values().all(|count| *count == 1), "no message in two places: {:?}", seen);
            // Unacked deliveries the client holds are exactly the queue's unacked entries.
            let held: usize = outstanding.values().map(|tags| tags.len()).sum();
            let unacked = broker.vhost("/").unwrap().queue("q").unwrap().unacked_count();
            prop_assert_eq!(held, unacked);
            for (channel, (current, limit)) in &prefetch {
                let in_flight = by_consumer.get(channel).map_or(0, |tags| tags.values().filter(|g| *g == current).count());
                prop_assert!(*limit == 0 || in_flight <= *limit as usize, "consumer on channel {} holds {} > prefetch {}", channel, in_flight, limit);
            }
        }
    }
}

#[test]
fn deleting_a_queue_frees_prefetch_and_late_acks_of_its_deliveries_are_accepted() {
    let mut broker = CheckedBroker::new(1);
    let channel = key(1, 1);
    broker.open_channel(channel, "/").unwrap();
    for name in ["q1", "q2"] {
        declare(&mut broker, name, false, false, false);
    }
    broker.qos(channel, 1, true).unwrap();
    broker.enqueue("/", "q1", message("from q1"), None);
    let (_, effects) = broker.consume(channel, "q1", "c1", false, false).unwrap();
    assert_eq!(effects.deliveries.len(), 1);
    broker.consume(channel, "q2", "c2", false, false).unwrap();
    broker.delete_queue(channel, "q1", false, false).unwrap();
    // A queue of the same name again: the old delivery must never touch it.
    declare(&mut broker, "q1", false, false, false);
    broker.enqueue("/", "q1", message("new q1"), None);
    // The late ack is accepted and frees the channel's one prefetch slot for q2.
    broker.enqueue("/", "q2", message("from q2"), None);
    let effects = broker.ack(channel, 1, false).unwrap();
    assert_eq!(bodies(&effects), vec!["from q2"]);
    assert_eq!(broker.vhost("/").unwrap().queue("q1").unwrap().ready_count(), 1, "the new q1 is untouched");
}

#[test]
fn a_closing_connection_never_gets_its_own_freed_messages_back() {
    let mut broker = broker_with_queue("q");
    let (first, second) = (key(1, 1), key(1, 2));
    broker.open_channel(first, "/").unwrap();
    broker.open_channel(second, "/").unwrap();
    broker.enqueue("/", "q", message("m0"), None);
    let (message_held, _) = broker.get(first, "q", false).unwrap();
    assert!(message_held.is_some());
    broker.consume(second, "q", "c", false, false).unwrap();
    let effects = broker.close_connection(ConnectionId(1));
    assert!(effects.deliveries.is_empty(), "nothing goes to the dying connection's other channel");
    assert_eq!(broker.vhost("/").unwrap().queue("q").unwrap().ready_count(), 1, "m0 waits, redelivered, for others");
}

#[test]
fn paging_out_drops_only_the_named_ready_body_and_keeps_its_size_for_limits() {
    use wharf_model::PagedBody;
    let mut broker = broker_with_queue("q");
    broker.vhost_mut("/").unwrap().queue_mut("q").unwrap().store_log = Some(9);
    for (seq, body) in [(1, "first"), (2, "second!")] {
        broker.enqueue("/", "q", message(body), Some(seq));
    }
    let queue = broker.vhost("/").unwrap().queue("q").unwrap();
    assert_eq!(queue.resident_bytes(), 12);
    let paged = |body_bytes| PagedBody { store_log: 9, segment_id: 1, offset: 64, record_bytes: 90, body_bytes };
    assert!(!broker.page_out("/", "q", 2, 1, paged(7)), "entry 2 is not stored under seq 1");
    assert!(!broker.page_out("/", "q", 3, 3, paged(7)), "no entry 3");
    assert!(!broker.page_out("/", "q", 2, 2, paged(6)), "a size that does not match is refused");
    let other_log = PagedBody { store_log: 8, ..paged(7) };
    assert!(!broker.page_out("/", "q", 2, 2, other_log), "a record of another log (an earlier queue) is refused");
    assert!(broker.page_out("/", "q", 2, 2, paged(7)));
    assert!(!broker.page_out("/", "q", 2, 2, paged(7)), "already paged");
    assert_eq!(broker.counters().paged_out, 1);
    let queue = broker.vhost("/").unwrap().queue("q").unwrap();
    assert_eq!(queue.resident_bytes(), 5, "only the first body is still in memory");

    // Delivered, the paged entry carries where to read its body; its weight is the real size.
    broker.open_channel(key(1, 1), "/").unwrap();
    let (_, effects) = broker.consume(key(1, 1), "q", "c", false, false).unwrap();
    assert_eq!(effects.deliveries.len(), 2);
    let delivery = &effects.deliveries[1];
    assert!(delivery.message.bytes_in_memory().is_none());
    assert_eq!(delivery.message.paged(), Some(paged(7)));
    assert_eq!(delivery.message.body_bytes(), 7);
    assert_eq!(wharf_model::broker::delivery_bytes(&delivery.message), 7);
    // An unacknowledged entry is not ready: a late page-out of it does nothing.
    assert!(!broker.page_out("/", "q", 1, 1, paged(5)));
}

#[test]
fn a_no_ack_delivery_of_a_paged_message_is_removed_after_its_read_and_a_resident_one_at_once() {
    use wharf_model::{PagedBody, StoredAt};
    let mut broker = broker_with_queue("q");
    broker.vhost_mut("/").unwrap().queue_mut("q").unwrap().store_log = Some(9);
    broker.enqueue("/", "q", message("resident"), Some(1));
    broker.enqueue("/", "q", message("paged"), Some(2));
    let paged = PagedBody { store_log: 9, segment_id: 1, offset: 64, record_bytes: 90, body_bytes: 5 };
    assert!(broker.page_out("/", "q", 2, 2, paged));
    broker.open_channel(key(1, 1), "/").unwrap();
    let (_, effects) = broker.consume(key(1, 1), "q", "c", true, false).unwrap();
    assert_eq!(effects.deliveries.len(), 2);
    let (resident, paged) = (&effects.deliveries[0], &effects.deliveries[1]);
    assert!(!resident.remove_record_after_read, "a body in memory needs no read");
    assert!(paged.remove_record_after_read, "the record must outlive the read of its body");
    assert_eq!(paged.store, Some(StoredAt { log: 9, seq: 2 }));
    let removed: Vec<_> = effects.removed.iter().map(|removed| removed.stored).collect();
    assert_eq!(removed, vec![Some(StoredAt { log: 9, seq: 1 })], "only the resident one is removed at once");
}
