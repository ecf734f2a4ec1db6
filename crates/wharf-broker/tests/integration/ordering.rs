//! Ordering: `x-single-active-consumer` as RabbitMQ (one consumer gets everything; the next takes
//! over when it goes), and `x-ordered-by`: messages with the same key go out one at a time in
//! publish order, also while the key's head is nacked with backoff or after a crash, while other
//! keys flow in parallel to every consumer. The backoff runs on the test's [`ManualClock`]; "nothing
//! arrives" is shown by a marker or a round trip on the consumer's connection, never by waiting.

use crate::common;

use common::*;
use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldArray, LongString};
use std::sync::Arc;
use wharf_broker::ManualClock;
use wharf_store::CrashMode;

fn keyed(key: &str) -> BasicProperties {
    BasicProperties::default()
        .with_headers(arguments(&[("order-id", AMQPValue::LongString(LongString::from(key.as_bytes().to_vec())))]))
}

fn ordered(extra: &[(&str, AMQPValue)]) -> lapin::types::FieldTable {
    let mut pairs = vec![("x-ordered-by", AMQPValue::LongString(LongString::from(b"order-id".to_vec())))];
    pairs.extend(extra.iter().cloned());
    arguments(&pairs)
}

fn body(delivery: &lapin::message::Delivery) -> String {
    String::from_utf8(delivery.data.clone()).unwrap()
}

/// The body of whichever consumer's next delivery comes first, acked.
async fn ack_next_of_either(one: &mut lapin::Consumer, two: &mut lapin::Consumer) -> String {
    let delivery = tokio::select! {
        delivery = next(one) => delivery,
        delivery = next(two) => delivery,
    };
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    body(&delivery)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_active_consumer_gets_everything_until_it_goes() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    durable_queue(&channel, "work", arguments(&[("x-single-active-consumer", AMQPValue::Boolean(true))])).await;
    let first_channel = connection.create_channel().await.unwrap();
    let second_channel = connection.create_channel().await.unwrap();
    let mut first = consumer(&first_channel, "work").await;
    let mut second = consumer(&second_channel, "work").await;
    for index in 0..4 {
        assert!(
            publish_confirmed(&channel, "", "work", format!("m{index}").as_bytes(), BasicProperties::default()).await
        );
    }
    for index in 0..4 {
        let delivery = next(&mut first).await;
        assert_eq!(body(&delivery), format!("m{index}"));
        if index < 3 {
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
    }
    // A marker published now also goes to the active consumer; the standby's connection is the
    // same, so whatever the broker had sent the standby before the marker has arrived by now.
    assert!(publish_confirmed(&channel, "", "work", b"marker", BasicProperties::default()).await);
    assert_eq!(body(&next(&mut first).await), "marker");
    assert!(futures_lite::future::poll_once(second.next()).await.is_none(), "the standby gets nothing");
    // The active consumer goes away holding m3 and the marker: the standby takes over, m3 first.
    first_channel.close(200, "bye".into()).await.unwrap();
    let taken_over = next(&mut second).await;
    assert_eq!(body(&taken_over), "m3");
    assert!(taken_over.redelivered);
    assert_eq!(body(&next(&mut second).await), "marker");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_at_a_time_in_order_across_backoff_while_other_keys_flow() {
    const BACKOFF_MS: u64 = 60_000;
    let clock = Arc::new(ManualClock::starting_now());
    let broker = TestBroker::start_on(&clock).await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    let backoff = AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongInt(BACKOFF_MS as i32)]));
    durable_queue(&channel, "orders", ordered(&[("x-retry-backoff", backoff)])).await;
    for (key, label) in [("A", "A1"), ("B", "B1"), ("A", "A2"), ("B", "B2"), ("A", "A3"), ("C", "C1")] {
        assert!(publish_confirmed(&channel, "", "orders", label.as_bytes(), keyed(key)).await);
    }
    let worker_one = connection.create_channel().await.unwrap();
    let worker_two = connection.create_channel().await.unwrap();
    for worker in [&worker_one, &worker_two] {
        worker.basic_qos(2, BasicQosOptions::default()).await.unwrap();
    }
    let mut one = consumer(&worker_one, "orders").await;
    let first_two = [next(&mut one).await, next(&mut one).await];
    let mut two = consumer(&worker_two, "orders").await;
    let third = next(&mut two).await;
    // Each key's head went out, spread over both consumers: A1 and B1 fill the first one's
    // prefetch, C1 goes to the second; A2, B2 and A3 are held back by their keys (the second
    // consumer has room for them).
    assert_eq!(first_two.iter().map(body).collect::<Vec<_>>(), ["A1", "B1"]);
    assert_eq!(body(&third), "C1");
    assert!(nothing_received(&worker_two, "orders", &mut two).await, "held back by their keys");
    let mut heads: Vec<_> = first_two.into_iter().chain([third]).collect();
    // A1 fails and backs off; B and C go on meanwhile, A2 must wait for A1.
    let a1 = heads.remove(heads.iter().position(|delivery| body(delivery) == "A1").unwrap());
    a1.nack(BasicNackOptions { multiple: false, requeue: true }).await.unwrap();
    for delivery in heads {
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    let mut order = Vec::new();
    // B2 arrives without the clock moving: it does not wait for A's backoff.
    order.push(ack_next_of_either(&mut one, &mut two).await);
    // One millisecond before A1's backoff ends neither A1 nor A2 (behind it) has gone out.
    advance(broker.broker(), &clock, BACKOFF_MS - 1).await;
    assert!(nothing_received(&worker_one, "orders", &mut one).await, "{order:?}");
    assert!(nothing_received(&worker_two, "orders", &mut two).await, "{order:?}");
    assert_eq!(message_count(&channel, "orders").await, 3, "A1 waiting, A2 and A3 behind it");
    // At its end A1 comes back, and A2 and A3 follow one at a time.
    advance(broker.broker(), &clock, 1).await;
    for _ in 0..3 {
        order.push(ack_next_of_either(&mut one, &mut two).await);
    }
    assert_eq!(order, ["B2", "A1", "A2", "A3"]);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_across_a_crash() {
    let mut broker = CrashableBroker::start(81, |_| {}).await;
    {
        let connection = broker.connect().await;
        let channel = confirm_channel(&connection).await;
        durable_queue(&channel, "orders", ordered(&[])).await;
        for label in ["A1", "A2", "A3"] {
            assert!(publish_confirmed(&channel, "", "orders", label.as_bytes(), keyed("A")).await);
        }
        let mut work = consumer(&channel, "orders").await;
        let held = next(&mut work).await;
        assert_eq!(body(&held), "A1");
        broker.crash(CrashMode::KeepUnsynced).await;
    }
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    let mut work = consumer(&channel, "orders").await;
    for label in ["A1", "A2", "A3"] {
        let delivery = next(&mut work).await;
        assert_eq!(body(&delivery), label);
        assert!(nothing_received(&channel, "orders", &mut work).await, "only one A at a time");
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    broker.stop().await;
}
