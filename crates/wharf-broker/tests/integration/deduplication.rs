//! Broker-side de-duplication (`x-deduplication`, `-ttl`, `-header`) on queues and exchanges: a
//! publish whose key was seen within the window is confirmed but not enqueued again, and counted;
//! the key outlives the message; keys survive a power loss right after the confirm and a restart,
//! and expire after the window (crossed on the test's [`ManualClock`], checked one millisecond
//! before and at its end).

use crate::common;

use common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, ExchangeKind};
use std::sync::Arc;
use wharf_broker::ManualClock;
use wharf_store::CrashMode;

fn with_id(id: &str) -> BasicProperties {
    BasicProperties::default().with_message_id(id.into())
}

async fn count(channel: &lapin::Channel, queue: &str) -> u32 {
    channel
        .queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap()
        .message_count()
}

fn dedup(extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut pairs = vec![("x-deduplication", AMQPValue::Boolean(true))];
    pairs.extend(extra.iter().cloned());
    arguments(&pairs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_is_confirmed_but_not_enqueued_even_after_the_first_was_acked() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    durable_queue(&channel, "orders", dedup(&[])).await;
    assert!(publish_confirmed(&channel, "", "orders", b"first", with_id("order-1")).await);
    assert!(publish_confirmed(&channel, "", "orders", b"again", with_id("order-1")).await, "a duplicate is confirmed");
    assert!(publish_confirmed(&channel, "", "orders", b"other", with_id("order-2")).await);
    // Without a message id there is nothing to de-duplicate by.
    assert!(publish_confirmed(&channel, "", "orders", b"anonymous", BasicProperties::default()).await);
    assert!(publish_confirmed(&channel, "", "orders", b"anonymous", BasicProperties::default()).await);
    assert_eq!(count(&channel, "orders").await, 4);
    while let Some(message) = channel.basic_get("orders".into(), BasicGetOptions { no_ack: true }).await.unwrap() {
        assert_ne!(message.delivery.data, b"again");
    }
    // The key outlives the message: a relay re-sending after the ack is still caught.
    assert!(publish_confirmed(&channel, "", "orders", b"late copy", with_id("order-1")).await);
    assert_eq!(count(&channel, "orders").await, 0);
    assert_eq!(broker.broker.as_ref().unwrap().counters().duplicates_dropped, 2);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_can_be_the_key_and_keys_expire_after_the_window() {
    const WINDOW_MS: u64 = 600_000;
    let clock = Arc::new(ManualClock::starting_now());
    let broker = TestBroker::start_on(&clock).await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    let header = AMQPValue::LongString(LongString::from(b"order-id".to_vec()));
    durable_queue(
        &channel,
        "orders",
        dedup(&[("x-deduplication-header", header), ("x-deduplication-ttl", AMQPValue::LongInt(WINDOW_MS as i32))]),
    )
    .await;
    let keyed =
        |key: i64| BasicProperties::default().with_headers(arguments(&[("order-id", AMQPValue::LongLongInt(key))]));
    assert!(publish_confirmed(&channel, "", "orders", b"a", keyed(7)).await);
    assert!(publish_confirmed(&channel, "", "orders", b"b", keyed(7)).await);
    assert_eq!(count(&channel, "orders").await, 1);
    // The window runs from when the key was first seen: its last millisecond still catches a
    // copy (a copy does not extend it).
    advance(broker.broker(), &clock, WINDOW_MS - 1).await;
    assert!(publish_confirmed(&channel, "", "orders", b"b again", keyed(7)).await);
    assert_eq!(count(&channel, "orders").await, 1, "a copy one millisecond before the window ends is dropped");
    // Once the window has passed the key is new again.
    advance(broker.broker(), &clock, 1).await;
    assert!(publish_confirmed(&channel, "", "orders", b"c", keyed(7)).await);
    assert_eq!(count(&channel, "orders").await, 2);
    assert_eq!(broker.broker().counters().duplicates_dropped, 2);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_de_duplicates_before_routing() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    channel
        .exchange_declare(
            "events".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            dedup(&[]),
        )
        .await
        .unwrap();
    for queue in ["email", "payment"] {
        durable_queue(&channel, queue, FieldTable::default()).await;
        channel
            .queue_bind(queue.into(), "events".into(), "".into(), QueueBindOptions::default(), FieldTable::default())
            .await
            .unwrap();
    }
    for _ in 0..3 {
        assert!(publish_confirmed(&channel, "events", "", b"OrderReceived", with_id("order-5")).await);
    }
    assert_eq!(count(&channel, "email").await, 1);
    assert_eq!(count(&channel, "payment").await, 1);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_survive_a_power_loss_right_after_the_confirm() {
    let mut broker = CrashableBroker::start(71, |_| {}).await;
    {
        let connection = broker.connect().await;
        let channel = confirm_channel(&connection).await;
        durable_queue(&channel, "orders", dedup(&[])).await;
        channel
            .exchange_declare(
                "events".into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                dedup(&[]),
            )
            .await
            .unwrap();
        durable_queue(&channel, "fanned", FieldTable::default()).await;
        channel
            .queue_bind("fanned".into(), "events".into(), "".into(), QueueBindOptions::default(), FieldTable::default())
            .await
            .unwrap();
        assert!(publish_confirmed(&channel, "", "orders", b"charge", with_id("order-9")).await);
        assert!(publish_confirmed(&channel, "events", "", b"event", with_id("event-9")).await);
        broker.crash(CrashMode::LoseUnsynced).await;
    }
    for round in 0..2 {
        let connection = broker.connect().await;
        let channel = confirm_channel(&connection).await;
        // A relay that restarted re-sends what it is not sure about.
        assert!(publish_confirmed(&channel, "", "orders", b"charge", with_id("order-9")).await);
        assert!(publish_confirmed(&channel, "events", "", b"event", with_id("event-9")).await);
        assert_eq!(count(&channel, "orders").await, 1, "round {round}");
        assert_eq!(count(&channel, "fanned").await, 1, "round {round}");
        connection.close(200, "bye".into()).await.unwrap();
        broker.restart().await;
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_publish_leaves_no_key_behind() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    let reject = AMQPValue::LongString(LongString::from(b"reject-publish".to_vec()));
    durable_queue(&channel, "orders", dedup(&[("x-max-length", AMQPValue::LongInt(1)), ("x-overflow", reject)])).await;
    assert!(publish_confirmed(&channel, "", "orders", b"a", with_id("a")).await);
    assert!(!publish_confirmed(&channel, "", "orders", b"b", with_id("b")).await, "full: nacked");
    channel.basic_get("orders".into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
    // The publisher retries the nacked message: it is new, not a duplicate.
    assert!(publish_confirmed(&channel, "", "orders", b"b", with_id("b")).await);
    let retried = channel.basic_get("orders".into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
    assert_eq!(retried.delivery.data, b"b");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_coming_back_is_not_a_duplicate() {
    // work (de-duplicating) --rejected--> retry (TTL) --expired--> work: the retry loop must
    // bring the message back, not drop it as a duplicate of itself.
    const RETRY_MS: u64 = 60_000;
    let clock = Arc::new(ManualClock::starting_now());
    let broker = TestBroker::start_on(&clock).await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    for name in ["to-retry", "to-work"] {
        channel
            .exchange_declare(
                name.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
    let text = |value: &str| AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()));
    durable_queue(&channel, "work", dedup(&[("x-dead-letter-exchange", text("to-retry"))])).await;
    // A minute in the retry queue: well within the 24-hour default window, so the key is still
    // remembered when the message comes back.
    durable_queue(
        &channel,
        "retry",
        arguments(&[
            ("x-dead-letter-exchange", text("to-work")),
            ("x-message-ttl", AMQPValue::LongInt(RETRY_MS as i32)),
        ]),
    )
    .await;
    channel
        .queue_bind("retry".into(), "to-retry".into(), "".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap();
    channel
        .queue_bind("work".into(), "to-work".into(), "".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap();
    assert!(publish_confirmed(&channel, "", "work", b"job", with_id("job-1")).await);
    let mut work = consumer(&channel, "work").await;
    next(&mut work).await.reject(BasicRejectOptions { requeue: false }).await.unwrap();
    // The round trip makes sure the reject was handled (the message is in "retry") before the
    // clock moves.
    assert_eq!(count(&channel, "retry").await, 1);
    advance(broker.broker(), &clock, RETRY_MS).await;
    let back = next(&mut work).await;
    assert_eq!(back.data, b"job");
    assert_eq!(back.properties.message_id().as_ref().unwrap().as_str(), "job-1");
    back.ack(BasicAckOptions::default()).await.unwrap();
    broker.stop().await;
}

/// A crash after a message became durable but before its key record did: the publisher was
/// never confirmed and sends it again after the restart; the queue knows the key from the
/// message it holds and takes it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_key_record_a_crash_lost_is_still_not_taken_twice() {
    let mut broker = CrashableBroker::start(73, |_| {}).await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    durable_queue(&channel, "alerts", dedup(&[])).await;
    // The queue's and the key log's files exist: each later batch is one sync of one file.
    assert!(publish_confirmed(&channel, "", "alerts", b"warm-up", with_id("alert-0")).await);
    // The message's sync goes through, the key's fails (the store stops there, as in a crash).
    broker.fs.fail_syncs_after(1, 1);
    let confirmed = publish_confirmed(&channel, "", "alerts", b"hot", with_id("alert-1")).await;
    assert!(!confirmed, "not confirmed: its key is not durable");
    drop(connection);
    broker.crash(CrashMode::LoseUnsynced).await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    assert_eq!(count(&channel, "alerts").await, 2, "the message itself was durable");
    assert!(publish_confirmed(&channel, "", "alerts", b"hot", with_id("alert-1")).await);
    assert_eq!(count(&channel, "alerts").await, 2, "the publisher's second try is a duplicate");
    // And the key is durable now: it survives another crash once the message is consumed.
    while channel.basic_get("alerts".into(), BasicGetOptions { no_ack: true }).await.unwrap().is_some() {}
    drop(connection);
    broker.restart().await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    assert!(publish_confirmed(&channel, "", "alerts", b"hot", with_id("alert-1")).await);
    assert_eq!(count(&channel, "alerts").await, 0);
    broker.stop().await;
}

/// The same for a de-duplicating exchange: its key is found again from the message in the
/// (plain) queue it was routed to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchanges_key_record_lost_in_a_crash_is_found_again_from_the_routed_message() {
    let mut broker = CrashableBroker::start(74, |_| {}).await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    let options = ExchangeDeclareOptions { durable: true, ..Default::default() };
    channel.exchange_declare("alerts".into(), ExchangeKind::Fanout, options, dedup(&[])).await.unwrap();
    durable_queue(&channel, "alert-log", FieldTable::default()).await;
    channel
        .queue_bind("alert-log".into(), "alerts".into(), "".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap();
    assert!(publish_confirmed(&channel, "alerts", "", b"warm-up", with_id("alert-0")).await);
    broker.fs.fail_syncs_after(1, 1);
    assert!(!publish_confirmed(&channel, "alerts", "", b"hot", with_id("alert-1")).await);
    drop(connection);
    broker.crash(CrashMode::LoseUnsynced).await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    assert_eq!(count(&channel, "alert-log").await, 2, "the message itself was durable");
    assert!(publish_confirmed(&channel, "alerts", "", b"hot", with_id("alert-1")).await);
    assert_eq!(count(&channel, "alert-log").await, 2, "the publisher's second try is a duplicate");
    broker.stop().await;
}
