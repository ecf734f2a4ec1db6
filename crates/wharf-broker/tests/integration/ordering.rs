//! Ordering: `x-single-active-consumer` as RabbitMQ (one consumer gets everything; the next takes
//! over when it goes), and `x-ordered-by`: messages with the same key go out one at a time in
//! publish order, also while the key's head is nacked with backoff or after a crash, while other
//! keys flow in parallel to every consumer.

use crate::common;

use common::*;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldArray, LongString};
use std::time::Duration;
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
    assert!(nothing_within(&mut second, Duration::from_millis(100)).await, "the standby gets nothing");
    // The active consumer goes away holding m3: the standby takes over, m3 first.
    first_channel.close(200, "bye".into()).await.unwrap();
    let taken_over = next(&mut second).await;
    assert_eq!(body(&taken_over), "m3");
    assert!(taken_over.redelivered);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_at_a_time_in_order_across_backoff_while_other_keys_flow() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    let backoff = AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongInt(300)]));
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
    assert!(nothing_within(&mut two, Duration::from_millis(100)).await);
    let mut heads: Vec<_> = first_two.into_iter().chain([third]).collect();
    // A1 fails and backs off; B and C go on meanwhile, A2 must wait for A1.
    let a1 = heads.remove(heads.iter().position(|delivery| body(delivery) == "A1").unwrap());
    a1.nack(BasicNackOptions { multiple: false, requeue: true }).await.unwrap();
    for delivery in heads {
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    let mut order = Vec::new();
    // B2 arrives (it does not wait for A's backoff); A1 comes back after its backoff, and A2
    // never before it.
    while order.len() < 4 {
        let delivery = tokio::select! {
            delivery = next(&mut one) => delivery,
            delivery = next(&mut two) => delivery,
        };
        order.push(body(&delivery));
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    let a_order: Vec<&String> = order.iter().filter(|label| label.starts_with('A')).collect();
    assert_eq!(a_order, ["A1", "A2", "A3"], "{order:?}");
    assert!(order.contains(&"B2".to_owned()));
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
        assert!(nothing_within(&mut work, Duration::from_millis(50)).await, "only one A at a time");
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    broker.stop().await;
}
