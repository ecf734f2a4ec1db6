//! Delayed delivery through an `x-delayed-message` exchange (used as RabbitMQ's plugin is): the
//! `x-delay` header holds a message back, it is routed by the `x-delayed-type` when due, the
//! waiting messages are stored in the log (a confirmed delayed message survives a power loss and
//! is delivered after the restart, not before its time), and thousands can wait at once.

use crate::common;

use common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, ExchangeKind};
use std::time::{Duration, Instant};
use wharf_store::CrashMode;

async fn declare_delayed(channel: &lapin::Channel) {
    let delayed_type = AMQPValue::LongString(LongString::from(b"direct".to_vec()));
    channel
        .exchange_declare(
            "later".into(),
            ExchangeKind::Custom("x-delayed-message".into()),
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            arguments(&[("x-delayed-type", delayed_type)]),
        )
        .await
        .unwrap();
    durable_queue(channel, "q", FieldTable::default()).await;
    channel
        .queue_bind("q".into(), "later".into(), "k".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap();
}

fn delayed(ms: i64) -> BasicProperties {
    BasicProperties::default().with_headers(arguments(&[("x-delay", AMQPValue::LongLongInt(ms))]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_are_routed_when_due_in_due_order() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    declare_delayed(&channel).await;
    let published_at = Instant::now();
    for (body, delay_ms) in [("late", 500), ("soon", 250), ("now", 0)] {
        assert!(publish_confirmed(&channel, "later", "k", body.as_bytes(), delayed(delay_ms)).await);
    }
    let mut q = consumer(&channel, "q").await;
    for (body, delay_ms) in [("now", 0), ("soon", 250), ("late", 500)] {
        let delivery = next(&mut q).await;
        assert_eq!(String::from_utf8_lossy(&delivery.data), body);
        assert!(
            published_at.elapsed() >= Duration::from_millis(delay_ms),
            "{body} came {:?} after publishing",
            published_at.elapsed()
        );
        assert_eq!(delivery.exchange.as_str(), "later");
        assert_eq!(delivery.routing_key.as_str(), "k");
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(broker.broker.as_ref().unwrap().counters().delayed_released, 2);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_delayed_messages_wait_and_all_arrive() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    declare_delayed(&channel).await;
    let count = 3000;
    let published_at = Instant::now();
    let mut confirms = Vec::new();
    for index in 0..count {
        // Spread over 300 ms, published in reverse due order.
        let delay_ms = 300 - (index % 300);
        let confirm = channel
            .basic_publish(
                "later".into(),
                "k".into(),
                BasicPublishOptions::default(),
                format!("{index}").as_bytes(),
                delayed(delay_ms).with_delivery_mode(2),
            )
            .await
            .unwrap();
        confirms.push(confirm);
    }
    for confirm in confirms {
        assert!(confirm.await.unwrap().is_ack());
    }
    let mut q = consumer(&channel, "q").await;
    let mut received = std::collections::BTreeSet::new();
    while received.len() < count as usize {
        let delivery = next(&mut q).await;
        let index: i64 = String::from_utf8_lossy(&delivery.data).parse().unwrap();
        let due = Duration::from_millis((300 - (index % 300)) as u64);
        assert!(published_at.elapsed() >= due, "message {index} arrived before it was due");
        received.insert(index);
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_confirmed_before_a_power_loss_is_delivered_after_it_not_before_its_time() {
    let mut broker = CrashableBroker::start(51, |_| {}).await;
    let published_at;
    {
        let connection = broker.connect().await;
        let channel = confirm_channel(&connection).await;
        declare_delayed(&channel).await;
        published_at = Instant::now();
        assert!(publish_confirmed(&channel, "later", "k", b"reminder", delayed(1500)).await);
        // The power goes out right after the confirm.
        broker.crash(CrashMode::LoseUnsynced).await;
    }
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    let mut q = consumer(&channel, "q").await;
    let delivery = next(&mut q).await;
    assert_eq!(delivery.data, b"reminder");
    assert!(
        published_at.elapsed() >= Duration::from_millis(1500),
        "delivered {:?} after publishing",
        published_at.elapsed()
    );
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_exchange_needs_a_delayed_type() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    let error = channel
        .exchange_declare(
            "later".into(),
            ExchangeKind::Custom("x-delayed-message".into()),
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(reply_code(&error), Some(406), "{error}");
    assert!(error.to_string().contains("x-delayed-type"), "{error}");
    broker.stop().await;
}
