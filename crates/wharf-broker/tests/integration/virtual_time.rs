//! The clock seam: with a `ManualClock` in the configuration, TTLs and queue expiry follow the
//! test's clock, so a window of minutes is crossed without waiting, and "nothing happens before
//! the deadline" is shown at a known moment (`Broker::fire_due_timers` after advancing), not by
//! waiting and hoping. Also: the broker refuses a runtime it cannot run on.

use crate::common;

use common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, ExchangeKind};
use std::sync::Arc;
use wharf_broker::{Broker, BrokerConfig, ManualClock};

/// A broker whose time moves only when the test advances the returned clock.
async fn broker_on_a_manual_clock() -> (TestBroker, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::starting_now());
    let shared = Arc::clone(&clock);
    let broker = TestBroker::start_with(move |config| config.clock = shared).await;
    (broker, clock)
}

async fn message_count(channel: &lapin::Channel, queue: &str) -> Result<u32, lapin::Error> {
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    channel.queue_declare(queue.into(), passive, FieldTable::default()).await.map(|declared| declared.message_count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_ttl_of_an_hour_runs_out_exactly_when_the_clock_says() {
    const TTL_MS: u64 = 3_600_000;
    let (broker, clock) = broker_on_a_manual_clock().await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    channel
        .exchange_declare(
            "dlx".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    durable_queue(&channel, "dead", FieldTable::default()).await;
    channel
        .queue_bind("dead".into(), "dlx".into(), "".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let dead_letter_exchange = AMQPValue::LongString(LongString::from(&b"dlx"[..]));
    durable_queue(
        &channel,
        "work",
        arguments(&[
            ("x-message-ttl", AMQPValue::LongLongInt(TTL_MS as i64)),
            ("x-dead-letter-exchange", dead_letter_exchange),
        ]),
    )
    .await;
    assert!(publish_confirmed(&channel, "", "work", b"order 1", BasicProperties::default()).await);

    clock.advance(TTL_MS - 1);
    broker.broker.as_ref().unwrap().fire_due_timers().await;
    assert_eq!(message_count(&channel, "work").await.unwrap(), 1, "one millisecond before its TTL it is still there");
    assert_eq!(message_count(&channel, "dead").await.unwrap(), 0);

    clock.advance(1);
    broker.broker.as_ref().unwrap().fire_due_timers().await;
    assert_eq!(message_count(&channel, "work").await.unwrap(), 0, "at its TTL it has expired");
    let mut dead = consumer(&channel, "dead").await;
    let expired = next(&mut dead).await;
    assert_eq!(expired.data, b"order 1");
    assert_eq!(header_text(&x_death(&expired.properties)[0], "reason").as_deref(), Some("expired"));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_queue_expires_at_its_deadline_and_not_a_millisecond_before() {
    let (broker, clock) = broker_on_a_manual_clock().await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    let expires = arguments(&[("x-expires", AMQPValue::LongInt(600_000))]);
    channel.queue_declare("temp".into(), QueueDeclareOptions::default(), expires).await.unwrap();

    clock.advance(599_999);
    broker.broker.as_ref().unwrap().fire_due_timers().await;
    let probe = connection.create_channel().await.unwrap();
    // A passive declare does not count as use (RabbitMQ's rule), so probing leaves the deadline.
    assert_eq!(message_count(&probe, "temp").await.unwrap(), 0, "still there before its deadline");

    clock.advance(1);
    broker.broker.as_ref().unwrap().fire_due_timers().await;
    let error = message_count(&probe, "temp").await.unwrap_err();
    assert_eq!(reply_code(&error), Some(404), "gone at its deadline");
    broker.stop().await;
}

#[tokio::test]
async fn the_broker_refuses_a_current_thread_runtime_with_a_clear_error() {
    let temp = tempfile::tempdir().unwrap();
    let mut config = BrokerConfig::new(temp.path().join("data"));
    config.amqp_listen = "127.0.0.1:0".parse().unwrap();
    let error = Broker::start(config).await.unwrap_err();
    assert!(error.to_string().contains("multi-threaded runtime"), "{error}");
}
