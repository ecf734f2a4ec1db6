//! Paging: beyond `queue_body_memory_bytes_max`, a durable queue keeps persistent messages'
//! bodies on disk only and reads them back to deliver or move them. Every path a paged message
//! can take (delivery, redelivery, `basic.get`, dead-lettering by reject and by TTL, a restart
//! after a crash, fan-out to several queues) must hand out exactly the bytes that were published.

use crate::common;

use common::*;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use wharf_store::CrashMode;

const BODY_BYTES: usize = 1024;
/// Four 1 KiB bodies fit; the fifth message onwards is paged.
const BUDGET_BYTES: u64 = 4 * BODY_BYTES as u64;

/// A distinct 1 KiB body for message `index`.
fn body(index: usize) -> Vec<u8> {
    let mut body = format!("message {index:05} ").into_bytes();
    body.extend((0..BODY_BYTES - body.len()).map(|offset| b'a' + ((index + offset) % 26) as u8));
    body
}

/// Properties that must survive paging: an id, a content type and a header.
fn properties(index: usize) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("order".into(), AMQPValue::LongLongInt(index as i64));
    BasicProperties::default()
        .with_message_id(format!("id-{index}").into())
        .with_content_type("text/plain".into())
        .with_headers(headers)
}

/// The delivery is message `index`, body and properties.
fn assert_message(data: &[u8], delivered: &BasicProperties, index: usize) {
    assert_eq!(data, body(index), "body of message {index}");
    assert_eq!(delivered.message_id().as_ref().map(|id| id.as_str().to_owned()), Some(format!("id-{index}")));
    assert_eq!(delivered.content_type().as_ref().map(|kind| kind.as_str()), Some("text/plain"));
    let order = delivered.headers().as_ref().and_then(|headers| header_integer(headers, "order"));
    assert_eq!(order, Some(index as i64), "headers of message {index}");
}

async fn publish_all(broker: &CrashableBroker, queue: &str, count: usize) {
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    for index in 0..count {
        assert!(publish_confirmed(&channel, "", queue, &body(index), properties(index)).await);
    }
    connection.close(200, "bye".into()).await.unwrap();
}

fn paging(config: &mut wharf_broker::BrokerConfig) {
    config.queue_body_memory_bytes_max = BUDGET_BYTES;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_beyond_the_budget_is_paged_and_delivered_intact_in_order() {
    let broker = CrashableBroker::start(1, paging).await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    durable_queue(&channel, "backlog", FieldTable::default()).await;
    publish_all(&broker, "backlog", 200).await;
    assert_eq!(broker.broker().counters().paged_out, 196, "all but the first four bodies left memory");

    channel.basic_qos(50, BasicQosOptions::default()).await.unwrap();
    let mut deliveries = consumer(&channel, "backlog").await;
    for index in 0..200 {
        let delivery = next(&mut deliveries).await;
        assert_message(&delivery.data, &delivery.properties, index);
        assert!(!delivery.redelivered);
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_message_requeued_and_fetched_again_keeps_its_body() {
    let broker = CrashableBroker::start(2, paging).await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    durable_queue(&channel, "retry", FieldTable::default()).await;
    publish_all(&broker, "retry", 10).await;
    assert_eq!(broker.broker().counters().paged_out, 6);

    // Take the four resident ones off the head, then the first paged one, and requeue it.
    for index in 0..4 {
        let got = channel.basic_get("retry".into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
        assert_message(&got.delivery.data, &got.delivery.properties, index);
    }
    let got = channel.basic_get("retry".into(), BasicGetOptions { no_ack: false }).await.unwrap().unwrap();
    assert_message(&got.delivery.data, &got.delivery.properties, 4);
    got.delivery.nack(BasicNackOptions { requeue: true, multiple: false }).await.unwrap();
    let again = channel.basic_get("retry".into(), BasicGetOptions { no_ack: false }).await.unwrap().unwrap();
    // The redelivery reads the body back again, and its added x-delivery-count keeps the rest.
    assert_message(&again.delivery.data, &again.delivery.properties, 4);
    assert!(again.delivery.redelivered);
    let count =
        again.delivery.properties.headers().as_ref().and_then(|headers| header_integer(headers, "x-delivery-count"));
    assert_eq!(count, Some(1));
    again.delivery.ack(BasicAckOptions::default()).await.unwrap();
    for index in 5..10 {
        let got = channel.basic_get("retry".into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
        assert_message(&got.delivery.data, &got.delivery.properties, index);
    }
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_messages_are_dead_lettered_with_their_bodies_when_rejected_or_expired() {
    let broker = CrashableBroker::start(3, paging).await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    durable_queue(&channel, "dead", FieldTable::default()).await;
    let dead_letter_to = |ttl: Option<i32>| {
        let mut pairs = vec![
            ("x-dead-letter-exchange", AMQPValue::LongString(LongString::from(""))),
            ("x-dead-letter-routing-key", AMQPValue::LongString(LongString::from("dead"))),
        ];
        if let Some(ttl) = ttl {
            pairs.push(("x-message-ttl", AMQPValue::LongInt(ttl)));
        }
        arguments(&pairs)
    };
    durable_queue(&channel, "rejecting", dead_letter_to(None)).await;
    publish_all(&broker, "rejecting", 8).await;
    let paged_before = broker.broker().counters().paged_out;
    assert_eq!(paged_before, 4);
    for index in 0..8 {
        let got = channel.basic_get("rejecting".into(), BasicGetOptions { no_ack: false }).await.unwrap().unwrap();
        assert_message(&got.delivery.data, &got.delivery.properties, index);
        got.delivery.reject(BasicRejectOptions { requeue: false }).await.unwrap();
    }
    // Expired while waiting: nobody consumes this queue; the TTL moves all of them.
    durable_queue(&channel, "expiring", dead_letter_to(Some(50))).await;
    publish_all(&broker, "expiring", 8).await;

    let mut dead = consumer(&channel, "dead").await;
    for index in (0..8).chain(0..8) {
        let delivery = next(&mut dead).await;
        assert_message(&delivery.data, &delivery.properties, index);
        let reason = x_death(&delivery.properties).first().and_then(|death| header_text(death, "reason")).unwrap();
        assert!(reason == "rejected" || reason == "expired", "{reason}");
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_recovery_leaves_the_backlog_on_disk_and_serves_it_intact() {
    let mut broker = CrashableBroker::start(4, paging).await;
    {
        let connection = broker.connect().await;
        let channel = connection.create_channel().await.unwrap();
        durable_queue(&channel, "kept", FieldTable::default()).await;
        connection.close(200, "bye".into()).await.unwrap();
    }
    publish_all(&broker, "kept", 50).await;
    broker.crash(CrashMode::LoseUnsynced).await;
    assert_eq!(broker.broker().counters().paged_out, 46, "recovery reads back only the first four bodies' worth");

    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    let mut deliveries = consumer(&channel, "kept").await;
    for index in 0..50 {
        let delivery = next(&mut deliveries).await;
        assert_message(&delivery.data, &delivery.properties, index);
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_budget_every_copy_of_a_fanned_out_message_is_paged_and_intact() {
    let broker = CrashableBroker::start(5, |config| config.queue_body_memory_bytes_max = 0).await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    channel
        .exchange_declare(
            "events".into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    for queue in ["first", "second"] {
        durable_queue(&channel, queue, FieldTable::default()).await;
        channel
            .queue_bind(queue.into(), "events".into(), "".into(), QueueBindOptions::default(), FieldTable::default())
            .await
            .unwrap();
    }
    for index in 0..20 {
        assert!(publish_confirmed(&channel, "events", "", &body(index), properties(index)).await);
    }
    assert_eq!(broker.broker().counters().paged_out, 40);
    for queue in ["first", "second"] {
        for index in 0..20 {
            let got = channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
            assert_message(&got.delivery.data, &got.delivery.properties, index);
        }
    }
    // Transient messages are never paged: nothing on disk to read them back from.
    channel
        .basic_publish(
            "events".into(),
            "".into(),
            BasicPublishOptions::default(),
            b"transient",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(broker.broker().counters().paged_out, 40);
    let got = channel.basic_get("first".into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
    assert_eq!(got.delivery.data, b"transient");
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ack_consumers_and_gets_receive_every_paged_body_while_segments_are_deleted_behind_them() {
    // Small segments, so draining deletes segments while deliveries are still being written.
    let broker = CrashableBroker::start(6, |config| {
        config.queue_body_memory_bytes_max = 0;
        config.store.segment_bytes_max = 16 * 1024;
    })
    .await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    durable_queue(&channel, "firehose", FieldTable::default()).await;
    publish_all(&broker, "firehose", 300).await;
    assert_eq!(broker.broker().counters().paged_out, 300);
    for index in 0..50 {
        let got = channel.basic_get("firehose".into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
        assert_message(&got.delivery.data, &got.delivery.properties, index);
    }
    let mut deliveries = channel
        .basic_consume(
            "firehose".into(),
            "".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    for index in 50..300 {
        let delivery = next(&mut deliveries).await;
        assert_message(&delivery.data, &delivery.properties, index);
    }
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}
