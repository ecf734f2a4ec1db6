//! Delivery limits: counted when a message is delivered and stored, so a consumer that dies every
//! time (even across broker crashes) exhausts it; `x-delivery-count` on redeliveries; an exhausted
//! message goes to the dead-letter exchange, or without one to the queue's automatic `<queue>.dlq`,
//! never dropped.

use crate::common;

use common::*;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use wharf_store::CrashMode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_dies_25_times_across_3_crashes_sends_the_message_to_the_automatic_dlq() {
    let mut broker = CrashableBroker::start(21, |_| {}).await;
    {
        let connection = broker.connect().await;
        let channel = confirm_channel(&connection).await;
        durable_queue(&channel, "payments", FieldTable::default()).await;
        let properties = BasicProperties::default().with_message_id("charge-7".into());
        assert!(publish_confirmed(&channel, "", "payments", b"charge order 7", properties).await);
        connection.close(200, "bye".into()).await.unwrap();
    }
    let mut delivered = 0;
    for attempt in 1..=25 {
        let connection = broker.connect().await;
        let channel = connection.create_channel().await.unwrap();
        let got = channel.basic_get("payments".into(), BasicGetOptions { no_ack: false }).await.unwrap();
        if let Some(message) = &got {
            delivered += 1;
            assert_eq!(message.delivery.data, b"charge order 7");
            let previous =
                message.delivery.properties.headers().as_ref().and_then(|h| header_integer(h, "x-delivery-count"));
            if attempt == 1 {
                assert_eq!(previous, None, "a first delivery has no x-delivery-count");
                assert!(!message.delivery.redelivered);
            } else {
                assert_eq!(previous, Some(attempt - 1), "attempt {attempt}");
                assert!(message.delivery.redelivered);
            }
        }
        if [7, 14, 20].contains(&attempt) {
            // The broker is killed while the consumer still holds the message.
            broker.crash(CrashMode::KeepUnsynced).await;
        } else {
            // The consumer dies without acknowledging.
            drop(got);
            connection.close(200, "dying".into()).await.unwrap();
        }
    }
    assert_eq!(delivered, 20, "delivered exactly as many times as the default limit allows");
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    let empty = channel.basic_get("payments".into(), BasicGetOptions { no_ack: false }).await.unwrap();
    assert!(empty.is_none(), "the source queue no longer holds it");
    let mut dlq = consumer(&channel, "payments.dlq").await;
    let dead = next(&mut dlq).await;
    assert_eq!(dead.data, b"charge order 7");
    assert_eq!(dead.properties.message_id().as_ref().unwrap().as_str(), "charge-7");
    assert_eq!(dead.properties.delivery_mode(), &Some(2), "still persistent");
    let deaths = x_death(&dead.properties);
    assert_eq!(deaths.len(), 1);
    assert_eq!(header_integer(&deaths[0], "count"), Some(1));
    assert_eq!(header_text(&deaths[0], "reason").as_deref(), Some("delivery_limit"));
    assert_eq!(header_text(&deaths[0], "queue").as_deref(), Some("payments"));
    let headers = dead.properties.headers().as_ref().unwrap();
    assert_eq!(header_integer(headers, "x-delivery-count"), Some(20));
    dead.ack(BasicAckOptions::default()).await.unwrap();
    // The automatic DLQ is durable like its source: it is still there after a restart.
    drop(dlq);
    connection.close(200, "bye".into()).await.unwrap();
    broker.restart().await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_declare(
            "payments.dlq".into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacks_count_too_and_the_limit_goes_through_the_dead_letter_exchange_when_there_is_one() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    channel
        .exchange_declare(
            "dlx".into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    durable_queue(&channel, "parked", FieldTable::default()).await;
    channel
        .queue_bind("parked".into(), "dlx".into(), "".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let text = |value: &str| AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()));
    durable_queue(
        &channel,
        "work",
        arguments(&[("x-delivery-limit", AMQPValue::LongInt(3)), ("x-dead-letter-exchange", text("dlx"))]),
    )
    .await;
    assert!(publish_confirmed(&channel, "", "work", b"poison", BasicProperties::default()).await);
    let mut work = consumer(&channel, "work").await;
    for _ in 0..3 {
        next(&mut work).await.nack(BasicNackOptions { multiple: false, requeue: true }).await.unwrap();
    }
    let mut parked = consumer(&channel, "parked").await;
    let dead = next(&mut parked).await;
    assert_eq!(header_text(&x_death(&dead.properties)[0], "reason").as_deref(), Some("delivery_limit"));
    // Had the third nack requeued it, it would be ahead of a message published now, and the
    // consumer (no prefetch limit) would get it first.
    assert!(publish_confirmed(&channel, "", "work", b"marker", BasicProperties::default()).await);
    assert_eq!(next(&mut work).await.data, b"marker", "not delivered a 4th time");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_of_minus_one_means_no_limit() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    durable_queue(&channel, "work", arguments(&[("x-delivery-limit", AMQPValue::LongInt(-1))])).await;
    assert!(publish_confirmed(&channel, "", "work", b"again", BasicProperties::default()).await);
    let mut work = consumer(&channel, "work").await;
    for _ in 0..30 {
        next(&mut work).await.nack(BasicNackOptions { multiple: false, requeue: true }).await.unwrap();
    }
    let last = next(&mut work).await;
    assert_eq!(header_integer(last.properties.headers().as_ref().unwrap(), "x-delivery-count"), Some(30));
    last.ack(BasicAckOptions::default()).await.unwrap();
    broker.stop().await;
}
