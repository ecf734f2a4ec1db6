//! Leases (`x-consumer-timeout`): when a delivery's lease runs out only that message is requeued
//! (its delivery counted), the channel stays open, and a late ack of the old delivery tag is
//! ignored and counted, not a channel error. Leases apply again after a crash. Time is the test's
//! [`ManualClock`]: a lease is shown running one millisecond before its end and over at its end.

use crate::common;

use common::*;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use std::sync::Arc;
use wharf_broker::ManualClock;
use wharf_store::CrashMode;

/// Thirty minutes, RabbitMQ's default consumer timeout: no time passes unless the test says so.
const LEASE_MS: u64 = 1_800_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_requeues_only_that_message_and_a_late_ack_is_ignored() {
    let clock = Arc::new(ManualClock::starting_now());
    let broker = TestBroker::start_on(&clock).await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    durable_queue(&channel, "work", arguments(&[("x-consumer-timeout", AMQPValue::LongInt(LEASE_MS as i32))])).await;
    for body in ["slow", "fast"] {
        assert!(publish_confirmed(&channel, "", "work", body.as_bytes(), BasicProperties::default()).await);
    }
    channel.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let mut work = consumer(&channel, "work").await;
    let slow = next(&mut work).await;
    let fast = next(&mut work).await;
    assert_eq!(slow.data, b"slow");
    fast.ack(BasicAckOptions::default()).await.unwrap();
    advance(broker.broker(), &clock, LEASE_MS - 1).await;
    assert!(nothing_received(&channel, "work", &mut work).await, "back before its lease ran out");
    assert_eq!(broker.broker().counters().leases_expired, 0);
    // The slow one's lease runs out: it comes back, on the same (still open) channel.
    advance(broker.broker(), &clock, 1).await;
    let again = next(&mut work).await;
    assert_eq!(again.data, b"slow");
    assert!(again.redelivered);
    assert_eq!(header_integer(again.properties.headers().as_ref().unwrap(), "x-delivery-count"), Some(1));
    assert_ne!(again.delivery_tag, slow.delivery_tag);
    // The worker finally acks the old delivery: ignored, counted, no channel error.
    slow.ack(BasicAckOptions::default()).await.unwrap();
    again.ack(BasicAckOptions::default()).await.unwrap();
    let declared = channel
        .queue_declare(
            "work".into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .expect("the channel is still open");
    assert_eq!(declared.message_count(), 0);
    let counters = broker.broker.as_ref().unwrap().counters();
    assert_eq!(counters.leases_expired, 1);
    assert_eq!(counters.late_settles_ignored, 1);
    assert!(channel.status().connected());
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_delivery_tag_is_still_refused() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    durable_queue(&channel, "work", arguments(&[("x-consumer-timeout", AMQPValue::LongInt(60_000))])).await;
    channel.basic_ack(999, BasicAckOptions::default()).await.unwrap();
    // The 406 closes the channel; the next call on it fails.
    let error = channel
        .queue_declare(
            "work".into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert!(!channel.status().connected(), "{error}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_apply_again_after_a_crash() {
    // The clock lives here, not in the broker: it goes on across the crash.
    let clock = Arc::new(ManualClock::starting_now());
    let mut broker = CrashableBroker::start(31, on_clock(&clock)).await;
    {
        let connection = broker.connect().await;
        let channel = confirm_channel(&connection).await;
        durable_queue(&channel, "work", arguments(&[("x-consumer-timeout", AMQPValue::LongInt(LEASE_MS as i32))]))
            .await;
        assert!(publish_confirmed(&channel, "", "work", b"job", BasicProperties::default()).await);
        let mut work = consumer(&channel, "work").await;
        let first = next(&mut work).await;
        assert!(!first.redelivered);
        first.nack(BasicNackOptions { multiple: false, requeue: true }).await.unwrap();
        // A redelivery goes out only once its count is written, so the crash cannot lose it.
        // (A first delivery's count is written lazily: see the design note.)
        let held = next(&mut work).await;
        assert!(held.redelivered);
        // Killed while the consumer holds it.
        broker.crash(CrashMode::KeepUnsynced).await;
    }
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    let mut work = consumer(&channel, "work").await;
    let after_crash = next(&mut work).await;
    assert!(after_crash.redelivered);
    assert_eq!(header_integer(after_crash.properties.headers().as_ref().unwrap(), "x-delivery-count"), Some(2));
    // Not acked: the lease (from this delivery) runs out and it comes back once more.
    advance(broker.broker(), &clock, LEASE_MS - 1).await;
    assert!(nothing_received(&channel, "work", &mut work).await, "back before its lease ran out");
    advance(broker.broker(), &clock, 1).await;
    let after_lease = next(&mut work).await;
    assert_eq!(after_lease.data, b"job");
    assert_eq!(header_integer(after_lease.properties.headers().as_ref().unwrap(), "x-delivery-count"), Some(3));
    after_lease.ack(BasicAckOptions::default()).await.unwrap();
    drop(after_crash);
    assert_eq!(broker.broker().counters().leases_expired, 1);
    broker.stop().await;
}
