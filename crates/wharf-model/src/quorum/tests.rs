//! The quorum queue's state machine: deliveries within prefetch in turn, returns and the
//! delivery limit, consumers and nodes going away, expiry, length limits; and, over random
//! command sequences, that no message is ever held by two consumers, none is lost or comes back
//! after it left, and two replicas fed the same commands decide the same.

use super::*;
use proptest::prelude::*;

fn consumer(node: u64, tag: &str) -> QuorumConsumer {
    QuorumConsumer { node, incarnation: 1, connection: 1, channel: 1, tag: tag.to_owned() }
}

fn enqueue(text: &str) -> QuorumCommand {
    QuorumCommand::Enqueue { payload: Arc::from(text.as_bytes()), expires_at_ms: None, order_key: None }
}

/// (consumer tag, message id, redelivered) of each delivery.
fn deliveries(effects: &[QuorumEffect]) -> Vec<(String, QuorumMessageId, bool)> {
    effects
        .iter()
        .filter_map(|effect| match effect {
            QuorumEffect::Deliver { consumer, id, redelivered, .. } => Some((consumer.tag.clone(), *id, *redelivered)),
            QuorumEffect::DeadLetter { .. } => None,
        })
        .collect()
}

fn dead(effects: &[QuorumEffect]) -> Vec<(QuorumMessageId, QuorumDeathReason)> {
    effects
        .iter()
        .filter_map(|effect| match effect {
            QuorumEffect::DeadLetter { id, reason, .. } => Some((*id, *reason)),
            QuorumEffect::Deliver { .. } => None,
        })
        .collect()
}

#[test]
fn messages_go_to_consumers_in_turn_within_their_prefetch() {
    let mut queue = QuorumQueue::new(QuorumSettings::default());
    for text in ["a", "b", "c", "d", "e"] {
        assert!(matches!(queue.apply(enqueue(text)).0, QuorumAnswer::Done { id: Some(_) }));
    }
    let (_, effects) = queue.apply(QuorumCommand::Checkout { consumer: consumer(1, "x"), prefetch: 2 });
    assert_eq!(deliveries(&effects), vec![("x".into(), 1, false), ("x".into(), 2, false)]);
    let (_, effects) = queue.apply(QuorumCommand::Checkout { consumer: consumer(2, "y"), prefetch: 2 });
    assert_eq!(deliveries(&effects), vec![("y".into(), 3, false), ("y".into(), 4, false)]);
    assert_eq!((queue.ready_count(), queue.checked_out_count()), (1, 4));
    // A settle frees credit: the next message goes to the one that settled.
    let (_, effects) = queue.apply(QuorumCommand::Settle { consumer: consumer(1, "x"), ids: vec![1] });
    assert_eq!(deliveries(&effects), vec![("x".into(), 5, false)]);
    // A settle by a consumer that does not hold the message changes nothing.
    queue.apply(QuorumCommand::Settle { consumer: consumer(2, "y"), ids: vec![2] });
    assert_eq!(queue.checked_out_count(), 4);
}

#[test]
fn a_returned_message_comes_back_first_marked_redelivered_until_its_delivery_limit() {
    let settings = QuorumSettings { delivery_limit: Some(2), ..Default::default() };
    let mut queue = QuorumQueue::new(settings);
    queue.apply(enqueue("a"));
    queue.apply(enqueue("b"));
    let x = consumer(1, "x");
    let (_, effects) = queue.apply(QuorumCommand::Checkout { consumer: x.clone(), prefetch: 1 });
    assert_eq!(deliveries(&effects), vec![("x".into(), 1, false)]);
    // Returned twice: delivered again ahead of "b", flagged.
    for _ in 0..2 {
        let (_, effects) = queue.apply(QuorumCommand::Return { consumer: x.clone(), ids: vec![1] });
        assert_eq!(deliveries(&effects), vec![("x".into(), 1, true)]);
    }
    // The third return is past the limit of two: dead, and "b" is next.
    let (_, effects) = queue.apply(QuorumCommand::Return { consumer: x.clone(), ids: vec![1] });
    assert_eq!(dead(&effects), vec![(1, QuorumDeathReason::DeliveryLimit)]);
    assert_eq!(deliveries(&effects), vec![("x".into(), 2, false)]);
    // Rejected without requeue: dead at once.
    let (_, effects) = queue.apply(QuorumCommand::Discard { consumer: x, ids: vec![2] });
    assert_eq!(dead(&effects), vec![(2, QuorumDeathReason::Rejected)]);
    assert_eq!((queue.ready_count(), queue.checked_out_count()), (0, 0));
}

#[test]
fn what_a_gone_consumer_or_node_held_goes_to_the_others_redelivered() {
    let mut queue = QuorumQueue::new(QuorumSettings::default());
    for text in ["a", "b", "c"] {
        queue.apply(enqueue(text));
    }
    queue.apply(QuorumCommand::Checkout { consumer: consumer(1, "x"), prefetch: 1 });
    queue.apply(QuorumCommand::Checkout { consumer: consumer(1, "z"), prefetch: 1 });
    queue.apply(QuorumCommand::Checkout { consumer: consumer(2, "y"), prefetch: 0 });
    assert_eq!(queue.checked_out_count(), 3);
    // Node 1 is gone: both its consumers' messages go to y, flagged, oldest first.
    let (_, effects) = queue.apply(QuorumCommand::NodeDown { node: 1 });
    assert_eq!(deliveries(&effects), vec![("y".into(), 1, true), ("y".into(), 2, true)]);
    assert_eq!(queue.consumer_count(), 1);
    // Cancelled, y keeps what it holds until it settles it or goes down, and gets nothing new.
    let (_, effects) = queue.apply(QuorumCommand::Cancel { consumer: consumer(2, "y") });
    assert!(deliveries(&effects).is_empty());
    queue.apply(QuorumCommand::Settle { consumer: consumer(2, "y"), ids: vec![3] });
    queue.apply(QuorumCommand::Checkout { consumer: consumer(3, "w"), prefetch: 0 });
    assert_eq!((queue.ready_count(), queue.checked_out_count()), (0, 2));
    let (_, effects) = queue.apply(QuorumCommand::Down { consumer: consumer(2, "y") });
    assert_eq!(deliveries(&effects), vec![("w".into(), 1, true), ("w".into(), 2, true)]);
    assert_eq!(queue.consumer_count(), 1);
    // Node 3 restarted: w (of its first incarnation) is gone, a consumer of the new one stays.
    let new_w = QuorumConsumer { incarnation: 2, ..consumer(3, "w") };
    queue.apply(QuorumCommand::Checkout { consumer: new_w, prefetch: 0 });
    let (_, effects) = queue.apply(QuorumCommand::NodeRestarted { node: 3, incarnation: 2 });
    assert_eq!(deliveries(&effects), vec![("w".into(), 1, true), ("w".into(), 2, true)]);
    assert_eq!(queue.consumer_count(), 1);
}

#[test]
fn expired_ready_messages_are_dead_lettered_when_the_time_comes() {
    let mut queue = QuorumQueue::new(QuorumSettings::default());
    queue.apply(QuorumCommand::Enqueue { payload: Arc::from(&b"soon"[..]), expires_at_ms: Some(100), order_key: None });
    queue.apply(QuorumCommand::Enqueue {
        payload: Arc::from(&b"later"[..]),
        expires_at_ms: Some(200),
        order_key: None,
    });
    queue.apply(enqueue("never"));
    assert!(dead(&queue.apply(QuorumCommand::Tick { now_ms: 99 }).1).is_empty());
    assert_eq!(dead(&queue.apply(QuorumCommand::Tick { now_ms: 150 }).1), vec![(1, QuorumDeathReason::Expired)]);
    // A message a consumer holds does not expire under it.
    queue.apply(QuorumCommand::Checkout { consumer: consumer(1, "x"), prefetch: 1 });
    assert!(dead(&queue.apply(QuorumCommand::Tick { now_ms: 1_000 }).1).is_empty());
    assert_eq!(queue.apply(QuorumCommand::Purge).0, QuorumAnswer::Removed { count: 1 });
}

#[test]
fn a_length_limit_drops_the_oldest_or_refuses_the_newest() {
    let mut queue = QuorumQueue::new(QuorumSettings { max_length: Some(2), ..Default::default() });
    for text in ["a", "b", "c"] {
        queue.apply(enqueue(text));
    }
    let mut refusing =
        QuorumQueue::new(QuorumSettings { max_length_bytes: Some(2), reject_publish: true, ..Default::default() });
    assert!(matches!(refusing.apply(enqueue("a")).0, QuorumAnswer::Done { .. }));
    assert!(matches!(refusing.apply(enqueue("b")).0, QuorumAnswer::Done { .. }));
    assert_eq!(refusing.apply(enqueue("c")).0, QuorumAnswer::Rejected);
    assert_eq!(queue.ready_count(), 2);
    let (_, effects) = queue.apply(enqueue("d"));
    assert_eq!(dead(&effects), vec![(2, QuorumDeathReason::MaxLength)]);
}

fn command_strategy() -> impl Strategy<Value = QuorumCommand> {
    let who = (1u64..=3, 0usize..2).prop_map(|(node, tag)| consumer(node, ["p", "q"][tag]));
    let ids = proptest::collection::vec(1u64..40, 1..4);
    let order_key = proptest::option::of((0u8..3).prop_map(|key| Arc::from(vec![key].as_slice())));
    prop_oneof![
        4 => (0u8..3, proptest::option::of(0u64..50), order_key.clone()).prop_map(|(size, expires_at_ms, order_key)| {
            QuorumCommand::Enqueue { payload: Arc::from(vec![7u8; usize::from(size)].as_slice()), expires_at_ms, order_key }
        }),
        2 => (0u8..3, proptest::option::of(0u64..50), 0u8..4, 0u64..60, order_key).prop_map(
            |(size, expires_at_ms, key, now_ms, order_key)| QuorumCommand::EnqueueKeyed {
                payload: Arc::from(vec![7u8; usize::from(size)].as_slice()),
                expires_at_ms,
                key: Arc::from(vec![key].as_slice()),
                now_ms,
                order_key,
            }
        ),
        2 => (who.clone(), 0u32..3).prop_map(|(consumer, prefetch)| QuorumCommand::Checkout { consumer, prefetch }),
        1 => who.clone().prop_map(|consumer| QuorumCommand::Cancel { consumer }),
        1 => who.clone().prop_map(|consumer| QuorumCommand::Down { consumer }),
        3 => (who.clone(), ids.clone()).prop_map(|(consumer, ids)| QuorumCommand::Settle { consumer, ids }),
        2 => (who.clone(), ids.clone()).prop_map(|(consumer, ids)| QuorumCommand::Return { consumer, ids }),
        1 => (who, ids).prop_map(|(consumer, ids)| QuorumCommand::Discard { consumer, ids }),
        1 => (1u64..=3).prop_map(|node| QuorumCommand::NodeDown { node }),
        1 => (1u64..=3, 1u32..=2).prop_map(|(node, incarnation)| QuorumCommand::NodeRestarted { node, incarnation }),
        1 => (0u64..60).prop_map(|now_ms| QuorumCommand::Tick { now_ms }),
        1 => Just(QuorumCommand::Purge),
        1 => ((1u64..=3), any::<bool>()).prop_map(|(node, settle)| QuorumCommand::Dequeue {
            consumer: QuorumConsumer { node, incarnation: 1, connection: 1, channel: 1, tag: String::new() },
            settle,
        }),
    ]
}

#[test]
fn a_key_seen_within_the_window_is_a_duplicate_and_counts_again_after_it() {
    let settings =
        QuorumSettings { dedup_ttl_ms: Some(100), max_length: Some(1), reject_publish: true, ..Default::default() };
    let mut queue = QuorumQueue::new(settings);
    let keyed = |body: &str, key: &str, now_ms: u64| QuorumCommand::EnqueueKeyed {
        payload: Arc::from(body.as_bytes()),
        expires_at_ms: None,
        key: Arc::from(key.as_bytes()),
        now_ms,
        order_key: None,
    };
    assert_eq!(queue.apply(keyed("a", "k1", 0)).0, QuorumAnswer::Done { id: Some(1) });
    assert_eq!(queue.apply(keyed("a again", "k1", 99)).0, QuorumAnswer::Duplicate);
    // Refused by the length limit: the key is not remembered, so the publisher's retry counts.
    assert_eq!(queue.apply(keyed("b", "k2", 10)).0, QuorumAnswer::Rejected);
    queue.apply(QuorumCommand::Purge);
    assert_eq!(queue.apply(keyed("b", "k2", 20)).0, QuorumAnswer::Done { id: Some(2) });
    queue.apply(QuorumCommand::Purge);
    // Past its window the first key counts again.
    assert_eq!(queue.apply(keyed("a later", "k1", 100)).0, QuorumAnswer::Done { id: Some(3) });
    let restored = QuorumQueue::decode_snapshot(&queue.encode_snapshot()).unwrap();
    assert_eq!(restored, queue);
    assert_eq!(queue.apply(keyed("again", "k2", 110)).0, QuorumAnswer::Duplicate);
}

#[test]
fn a_get_takes_the_oldest_ready_message_until_settled_or_its_channel_goes() {
    let mut queue = QuorumQueue::new(QuorumSettings::default());
    let getter = QuorumConsumer { node: 1, incarnation: 1, connection: 7, channel: 1, tag: String::new() };
    assert_eq!(queue.apply(QuorumCommand::Dequeue { consumer: getter.clone(), settle: false }).0, QuorumAnswer::Empty);
    queue.apply(enqueue("one"));
    queue.apply(enqueue("two"));
    let (answer, _) = queue.apply(QuorumCommand::Dequeue { consumer: getter.clone(), settle: false });
    assert!(
        matches!(answer, QuorumAnswer::Dequeued { id: 1, delivery_count: 1, redelivered: false, remaining: 1, .. }),
        "{answer:?}"
    );
    // A consumer that comes now gets the other one, not the one the get holds.
    queue.apply(QuorumCommand::Checkout { consumer: consumer(2, "c"), prefetch: 0 });
    assert_eq!(queue.checked_out_count(), 2);
    // The get's channel goes: its message comes back, to the consumer, redelivered.
    let (_, effects) = queue.apply(QuorumCommand::Down { consumer: getter.clone() });
    assert_eq!(deliveries(&effects), vec![("c".to_owned(), 1, true)]);
    // No-ack: removed at once.
    queue.apply(QuorumCommand::Cancel { consumer: consumer(2, "c") });
    queue.apply(QuorumCommand::Down { consumer: consumer(2, "c") });
    let (answer, _) = queue.apply(QuorumCommand::Dequeue { consumer: getter.clone(), settle: true });
    assert!(matches!(answer, QuorumAnswer::Dequeued { id: 1, redelivered: true, .. }), "{answer:?}");
    let (answer, _) = queue.apply(QuorumCommand::Dequeue { consumer: getter.clone(), settle: false });
    assert!(matches!(answer, QuorumAnswer::Dequeued { id: 2, .. }), "{answer:?}");
    queue.apply(QuorumCommand::Settle { consumer: getter, ids: vec![2] });
    assert_eq!((queue.ready_count(), queue.checked_out_count(), queue.consumer_count()), (0, 0, 0));
}

#[test]
fn a_snapshot_cut_short_or_damaged_is_refused() {
    let mut queue = QuorumQueue::new(QuorumSettings { delivery_limit: Some(2), ..Default::default() });
    queue.apply(QuorumCommand::Checkout { consumer: consumer(1, "a"), prefetch: 1 });
    queue.apply(enqueue("one"));
    queue.apply(enqueue("two"));
    let bytes = queue.encode_snapshot();
    assert_eq!(QuorumQueue::decode_snapshot(&bytes), Some(queue.clone()));
    for length in 0..bytes.len() {
        assert_eq!(QuorumQueue::decode_snapshot(&bytes[..length]), None, "cut at {length}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(QuorumQueue::decode_snapshot(&longer), None);
    // A snapshot of the first format (before leases, backoff, single active consumer and
    // ordering keys: the last 34 bytes) still reads.
    let mut first_format = bytes[..bytes.len() - 34].to_vec();
    first_format[0] = 1;
    assert_eq!(QuorumQueue::decode_snapshot(&first_format), Some(queue.clone()));
    let mut other_version = bytes;
    other_version[0] = 9;
    assert_eq!(QuorumQueue::decode_snapshot(&other_version), None);
}

#[test]
fn a_returned_message_waits_its_backoff_step_stamped_by_the_next_tick() {
    let settings = QuorumSettings { retry_backoff_ms: vec![100, 1_000], ..Default::default() };
    let mut queue = QuorumQueue::new(settings);
    let x = consumer(1, "x");
    queue.apply(QuorumCommand::Checkout { consumer: x.clone(), prefetch: 1 });
    assert_eq!(deliveries(&queue.apply(enqueue("a")).1), vec![("x".into(), 1, false)]);
    queue.apply(enqueue("b"));
    // Returned: not ready (the next message goes out instead), waiting for its stamp.
    let (_, effects) = queue.apply(QuorumCommand::Return { consumer: x.clone(), ids: vec![1] });
    assert_eq!(deliveries(&effects), vec![("x".into(), 2, false)]);
    assert_eq!((queue.ready_count(), queue.waiting_count(), queue.checked_out_count()), (0, 1, 1));
    assert_eq!(queue.next_timer_ms(), Some(0));
    assert!(queue.has_unstamped_timers());
    queue.apply(QuorumCommand::Settle { consumer: x.clone(), ids: vec![2] });
    // Stamped at 50: due at 150 (the first step).
    assert!(deliveries(&queue.apply(QuorumCommand::Tick { now_ms: 50 }).1).is_empty());
    assert_eq!(queue.next_timer_ms(), Some(150));
    assert!(deliveries(&queue.apply(QuorumCommand::Tick { now_ms: 149 }).1).is_empty());
    let (_, effects) = queue.apply(QuorumCommand::Tick { now_ms: 150 });
    assert_eq!(deliveries(&effects), vec![("x".into(), 1, true)]);
    // Its second return waits the second step.
    queue.apply(QuorumCommand::Return { consumer: x.clone(), ids: vec![1] });
    queue.apply(QuorumCommand::Tick { now_ms: 200 });
    assert!(deliveries(&queue.apply(QuorumCommand::Tick { now_ms: 1_199 }).1).is_empty());
    assert_eq!(deliveries(&queue.apply(QuorumCommand::Tick { now_ms: 1_200 }).1), vec![("x".into(), 1, true)]);
    // A purge removes a waiting message too.
    queue.apply(QuorumCommand::Return { consumer: x, ids: vec![1] });
    assert_eq!(queue.apply(QuorumCommand::Purge).0, QuorumAnswer::Removed { count: 1 });
    assert_eq!(queue.next_timer_ms(), None);
}

#[test]
fn a_delivery_unsettled_past_its_lease_goes_back_and_its_late_settle_is_ignored() {
    let settings = QuorumSettings { lease_ms: Some(100), delivery_limit: Some(1), ..Default::default() };
    let mut queue = QuorumQueue::new(settings);
    let (x, y) = (consumer(1, "x"), consumer(2, "y"));
    queue.apply(QuorumCommand::Checkout { consumer: x.clone(), prefetch: 1 });
    queue.apply(enqueue("a"));
    // x takes nothing more (it would be next in turn), but holds "a" until it settles it.
    queue.apply(QuorumCommand::Cancel { consumer: x.clone() });
    queue.apply(QuorumCommand::Checkout { consumer: y.clone(), prefetch: 1 });
    assert_eq!(queue.next_timer_ms(), Some(0), "the lease waits for its stamp");
    queue.apply(QuorumCommand::Tick { now_ms: 10 });
    assert_eq!(queue.next_timer_ms(), Some(110));
    assert!(deliveries(&queue.apply(QuorumCommand::Tick { now_ms: 109 }).1).is_empty());
    // Run out: back, and out again to the consumer with credit, redelivered.
    let (_, effects) = queue.apply(QuorumCommand::Tick { now_ms: 110 });
    assert_eq!(deliveries(&effects), vec![("y".into(), 1, true)]);
    assert!(!queue.consumers.contains_key(&x), "a cancelled consumer holding nothing more is forgotten");
    queue.apply(QuorumCommand::Settle { consumer: x, ids: vec![1] });
    assert_eq!(queue.checked_out_count(), 1, "the first holder's late settle changes nothing");
    // The second lease runs out past the delivery limit: dead.
    queue.apply(QuorumCommand::Tick { now_ms: 120 });
    let (_, effects) = queue.apply(QuorumCommand::Tick { now_ms: 220 });
    assert_eq!(dead(&effects), vec![(1, QuorumDeathReason::DeliveryLimit)]);
    queue.apply(QuorumCommand::Settle { consumer: y, ids: vec![1] });
    assert_eq!((queue.ready_count(), queue.checked_out_count(), queue.next_timer_ms()), (0, 0, None));
}

#[test]
fn messages_of_one_key_go_out_one_at_a_time_in_order() {
    let mut queue = QuorumQueue::new(QuorumSettings::default());
    let keyed = |text: &str, key: &str| QuorumCommand::Enqueue {
        payload: Arc::from(text.as_bytes()),
        expires_at_ms: None,
        order_key: Some(Arc::from(key.as_bytes())),
    };
    for (text, key) in [("a1", "a"), ("a2", "a"), ("b1", "b")] {
        queue.apply(keyed(text, key));
    }
    queue.apply(enqueue("free"));
    let x = consumer(1, "x");
    let (_, effects) = queue.apply(QuorumCommand::Checkout { consumer: x.clone(), prefetch: 10 });
    // a2 waits behind a1; b1 and the unkeyed message go out.
    assert_eq!(deliveries(&effects), vec![("x".into(), 1, false), ("x".into(), 3, false), ("x".into(), 4, false)]);
    // Returned, a1 is still the holder: out again before a2.
    let (_, effects) = queue.apply(QuorumCommand::Return { consumer: x.clone(), ids: vec![1] });
    assert_eq!(deliveries(&effects), vec![("x".into(), 1, true)]);
    // Settled, a1 leaves: a2 is next.
    let (_, effects) = queue.apply(QuorumCommand::Settle { consumer: x.clone(), ids: vec![1] });
    assert_eq!(deliveries(&effects), vec![("x".into(), 2, false)]);
    // basic.get skips a key's waiting messages too.
    queue.apply(keyed("b2", "b"));
    let getter = QuorumConsumer { node: 1, incarnation: 1, connection: 1, channel: 2, tag: String::new() };
    assert_eq!(queue.apply(QuorumCommand::Dequeue { consumer: getter, settle: true }).0, QuorumAnswer::Empty);
    // The snapshot keeps the keys: b2 still waits for b1 after a restore.
    let mut restored = QuorumQueue::decode_snapshot(&queue.encode_snapshot()).unwrap();
    assert_eq!(restored, queue);
    let (_, effects) = restored.apply(QuorumCommand::Settle { consumer: x, ids: vec![3] });
    assert_eq!(deliveries(&effects), vec![("x".into(), 5, false)]);
}

#[test]
fn a_single_active_consumer_takes_everything_until_it_goes() {
    let settings = QuorumSettings { single_active_consumer: true, ..Default::default() };
    let mut queue = QuorumQueue::new(settings);
    let (x, y) = (consumer(1, "x"), consumer(2, "y"));
    queue.apply(QuorumCommand::Checkout { consumer: x.clone(), prefetch: 2 });
    queue.apply(QuorumCommand::Checkout { consumer: y.clone(), prefetch: 2 });
    for text in ["a", "b", "c"] {
        queue.apply(enqueue(text));
    }
    assert_eq!((queue.ready_count(), queue.consumers[&x].holds.len()), (1, 2), "y waits while x has no credit");
    let (_, effects) = queue.apply(QuorumCommand::Settle { consumer: x.clone(), ids: vec![1] });
    assert_eq!(deliveries(&effects), vec![("x".into(), 3, false)]);
    // x goes: what it held goes to y, the next attached.
    let (_, effects) = queue.apply(QuorumCommand::Down { consumer: x });
    assert_eq!(deliveries(&effects), vec![("y".into(), 2, true), ("y".into(), 3, true)]);
    // A cancelled active consumer gives way too.
    let z = consumer(3, "z");
    queue.apply(QuorumCommand::Checkout { consumer: z, prefetch: 0 });
    queue.apply(QuorumCommand::Cancel { consumer: y });
    assert_eq!(deliveries(&queue.apply(enqueue("d")).1), vec![("z".into(), 4, false)]);
}

proptest! {
    #[test]
    fn no_message_is_held_twice_lost_or_back_after_it_left(
        commands in proptest::collection::vec(command_strategy(), 1..120),
        delivery_limit in proptest::option::of(0u32..3),
        max_length in proptest::option::of(1u64..6),
        snapshot_every in 1usize..12,
        dedup_ttl_ms in proptest::option::of(1u64..30),
        lease_ms in proptest::option::of(1u64..30),
        retry_backoff_ms in proptest::collection::vec(0u64..20, 0..3),
        single_active_consumer in proptest::bool::ANY,
    ) {
        let settings = QuorumSettings {
            delivery_limit,
            max_length,
            dedup_ttl_ms,
            lease_ms,
            retry_backoff_ms,
            single_active_consumer,
            ..Default::default()
        };
        let (mut queue, mut replica) = (QuorumQueue::new(settings.clone()), QuorumQueue::new(settings));
        let mut applied = 0usize;
        // Where each message is by the effects alone: holder, or gone.
        let mut holder: BTreeMap<QuorumMessageId, QuorumConsumer> = BTreeMap::new();
        let mut live: BTreeSet<QuorumMessageId> = BTreeSet::new();
        let mut gone: BTreeSet<QuorumMessageId> = BTreeSet::new();
        for command in commands {
            // What leaves the queue by the command itself (not by an effect).
            let settled: Vec<QuorumMessageId> = match &command {
                QuorumCommand::Settle { consumer, ids } => {
                    ids.iter().copied().filter(|id| holder.get(id) == Some(consumer)).collect()
                }
                _ => Vec::new(),
            };
            let ready_before: BTreeSet<QuorumMessageId> = queue.ready.union(&queue.waiting).copied().collect();
            let (answer, effects) = queue.apply(command.clone());
            prop_assert_eq!(replica.apply(command.clone()), (answer.clone(), effects.clone()));
            // The leader's O(1) hint never says "nothing to stamp" while something waits for
            // its stamp (it may say yes once too often).
            let waiting_for_stamp = queue
                .leased
                .iter()
                .chain(&queue.waiting)
                .any(|id| queue.messages.get(id).is_some_and(|held| held.due_ms.is_none()));
            prop_assert!(!waiting_for_stamp || queue.has_unstamped_timers());
            // The replica now and then restarts from a snapshot of itself: it must go on
            // deciding exactly as the queue that never did.
            applied += 1;
            if applied.is_multiple_of(snapshot_every) {
                replica = QuorumQueue::decode_snapshot(&replica.encode_snapshot()).expect("its own snapshot reads back");
                prop_assert_eq!(&replica, &queue);
            }
            if let QuorumAnswer::Done { id: Some(id) } = answer {
                prop_assert!(live.insert(id) && !gone.contains(&id));
            }
            if let QuorumAnswer::Removed { .. } = answer {
                for id in ready_before {
                    live.remove(&id);
                    gone.insert(id);
                }
            }
            for id in settled {
                holder.remove(&id);
                live.remove(&id);
                gone.insert(id);
            }
            // A get takes a ready message: to its consumer, or out of the queue (no-ack).
            if let (QuorumAnswer::Dequeued { id, .. }, QuorumCommand::Dequeue { consumer, settle }) = (&answer, &command) {
                prop_assert!(live.contains(id), "dequeued after it left: {}", id);
                prop_assert!(!holder.contains_key(id), "dequeued while held: {}", id);
                if *settle {
                    live.remove(id);
                    gone.insert(*id);
                } else {
                    holder.insert(*id, consumer.clone());
                }
            }
            // Returns, cancels and node-downs release what they name before anything new goes out.
            match &command {
                QuorumCommand::Return { consumer, ids } | QuorumCommand::Discard { consumer, ids } => {
                    for id in ids {
                        if holder.get(id) == Some(consumer) {
                            holder.remove(id);
                        }
                    }
                }
                QuorumCommand::Down { consumer } => holder.retain(|_, held_by| held_by != consumer),
                QuorumCommand::NodeDown { node } => holder.retain(|_, held_by| held_by.node != *node),
                QuorumCommand::NodeRestarted { node, incarnation } => {
                    holder.retain(|_, held_by| held_by.node != *node || held_by.incarnation == *incarnation)
                }
                // A lease run out takes the message back (it may go out again in the same tick).
                QuorumCommand::Tick { .. } => {
                    let again: BTreeSet<QuorumMessageId> = effects
                        .iter()
                        .filter_map(|effect| match effect {
                            QuorumEffect::Deliver { id, .. } => Some(*id),
                            QuorumEffect::DeadLetter { .. } => None,
                        })
                        .collect();
                    holder.retain(|id, held_by| {
                        !again.contains(id)
                            && queue.messages.get(id).and_then(|held| held.checked_out_to.as_ref()) == Some(held_by)
                    });
                }
                _ => {}
            }
            for effect in &effects {
                match effect {
                    QuorumEffect::DeadLetter { id, .. } => {
                        prop_assert!(live.remove(id), "dead-lettered twice or never enqueued: {}", id);
                        prop_assert!(!holder.contains_key(id), "dead-lettered while held: {}", id);
                        gone.insert(*id);
                    }
                    QuorumEffect::Deliver { consumer, id, .. } => {
                        prop_assert!(live.contains(id), "delivered after it left: {}", id);
                        prop_assert!(holder.insert(*id, consumer.clone()).is_none(), "held twice: {}", id);
                    }
                }
            }
            // A consumer given a message is within its prefetch (a lowered prefetch may leave
            // one above it, holding what it had).
            let served: BTreeSet<&QuorumConsumer> = effects
                .iter()
                .filter_map(|effect| match effect {
                    QuorumEffect::Deliver { consumer, .. } => Some(consumer),
                    QuorumEffect::DeadLetter { .. } => None,
                })
                .collect();
            for (consumer, state) in &queue.consumers {
                if served.contains(consumer) {
                    prop_assert!(state.prefetch == 0 || state.holds.len() as u64 <= u64::from(state.prefetch));
                }
                for id in &state.holds {
                    prop_assert_eq!(holder.get(id), Some(consumer));
                }
            }
            // Of each ordering key only the oldest message in the queue may be out; the others
            // are ready and not deliverable. Deliverable messages are ready ones.
            for ids in queue.by_key.values() {
                for id in ids.iter().skip(1) {
                    prop_assert!(queue.ready.contains(id) && !queue.deliverable.contains(id), "{} out of turn", id);
                }
            }
            prop_assert!(queue.deliverable.is_subset(&queue.ready));
            prop_assert_eq!(queue.messages.len() as u64, live.len() as u64);
            prop_assert_eq!(queue.checked_out_count(), holder.len() as u64);
        }
    }
}
