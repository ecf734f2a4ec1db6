//! Delayed delivery through an `x-delayed-message` exchange (used as RabbitMQ's plugin is): the
//! `x-delay` header holds a message back, it is routed by the `x-delayed-type` when due, the
//! waiting messages are stored in the log (a confirmed delayed message survives a power loss and
//! is delivered after the restart, not before its time), and thousands can wait at once. Time is
//! the test's [`ManualClock`]: each message is shown absent one millisecond before it is due and
//! delivered when it is due.

use crate::common;

use common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, ExchangeKind};
use std::sync::Arc;
use wharf_broker::ManualClock;
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
    let clock = Arc::new(ManualClock::starting_now());
    let broker = TestBroker::start_on(&clock).await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    declare_delayed(&channel).await;
    for (body, delay_ms) in [("late", 600_000), ("soon", 300_000), ("now", 0)] {
        assert!(publish_confirmed(&channel, "later", "k", body.as_bytes(), delayed(delay_ms)).await);
    }
    let mut q = consumer(&channel, "q").await;
    let mut advanced_ms = 0;
    for (body, delay_ms) in [("now", 0), ("soon", 300_000), ("late", 600_000)] {
        if delay_ms > advanced_ms {
            advance(broker.broker(), &clock, delay_ms - advanced_ms - 1).await;
            assert!(nothing_received(&channel, "q", &mut q).await, "{body} arrived before it was due");
            advance(broker.broker(), &clock, 1).await;
            advanced_ms = delay_ms;
        }
        let delivery = next(&mut q).await;
        assert_eq!(String::from_utf8_lossy(&delivery.data), body);
        assert_eq!(delivery.exchange.as_str(), "later");
        assert_eq!(delivery.routing_key.as_str(), "k");
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(broker.broker().counters().delayed_released, 2);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_delayed_messages_wait_and_all_arrive() {
    const SPREAD_S: u64 = 300;
    // Due one to 300 seconds after publishing, ten messages each second.
    let due_ms = |index: u64| (SPREAD_S - index % SPREAD_S) * 1000;
    let clock = Arc::new(ManualClock::starting_now());
    let broker = TestBroker::start_on(&clock).await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    declare_delayed(&channel).await;
    let count = 3000;
    let mut confirms = Vec::new();
    // Published in reverse due order.
    for index in 0..count {
        let confirm = channel
            .basic_publish(
                "later".into(),
                "k".into(),
                BasicPublishOptions::default(),
                format!("{index}").as_bytes(),
                delayed(due_ms(index) as i64).with_delivery_mode(2),
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
    for second in 1..=SPREAD_S {
        // Nothing due at the next second arrives a millisecond before it; at that second exactly
        // the ten due then arrive.
        advance(broker.broker(), &clock, 999).await;
        assert!(nothing_received(&channel, "q", &mut q).await, "a message arrived before second {second}");
        advance(broker.broker(), &clock, 1).await;
        for _ in 0..count / SPREAD_S {
            let delivery = next(&mut q).await;
            let index: u64 = String::from_utf8_lossy(&delivery.data).parse().unwrap();
            assert_eq!(due_ms(index), second * 1000, "message {index} arrived at second {second}");
            received.insert(index);
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
    }
    assert_eq!(received.len() as u64, count);
    assert!(nothing_received(&channel, "q", &mut q).await, "nothing beyond the messages published");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_confirmed_before_a_power_loss_is_delivered_after_it_not_before_its_time() {
    const DELAY_MS: u64 = 900_000;
    const DOWN_MS: u64 = 300_000;
    // The clock lives here, not in the broker: it goes on while the broker is down.
    let clock = Arc::new(ManualClock::starting_now());
    let mut broker = CrashableBroker::start(51, on_clock(&clock)).await;
    {
        let connection = broker.connect().await;
        let channel = confirm_channel(&connection).await;
        declare_delayed(&channel).await;
        assert!(publish_confirmed(&channel, "later", "k", b"reminder", delayed(DELAY_MS as i64)).await);
        // The power goes out right after the confirm, for five minutes.
        broker.crash_for(CrashMode::LoseUnsynced, &clock, DOWN_MS).await;
    }
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    let mut q = consumer(&channel, "q").await;
    // Due when the delay has passed since publishing (the downtime counts), not since the restart.
    advance(broker.broker(), &clock, DELAY_MS - DOWN_MS - 1).await;
    assert!(nothing_received(&channel, "q", &mut q).await, "delivered before its time");
    advance(broker.broker(), &clock, 1).await;
    let delivery = next(&mut q).await;
    assert_eq!(delivery.data, b"reminder");
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
