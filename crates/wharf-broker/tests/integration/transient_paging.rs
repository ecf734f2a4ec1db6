//! Paging of transient messages: beyond `queue_body_memory_bytes_max`, a queue writes further
//! transient bodies (`delivery_mode` 1, or any message of a non-durable queue) to a transient log
//! of its own and drops them from memory, so a backlog nobody consumes cannot fill the broker's
//! memory. Every message is delivered intact and in order; a restart keeps none of them and takes
//! no transient log for an orphan; deleting the queue deletes its log.
//!
//! No confirm waits on a transient record, so tests wait for the records with a barrier: a
//! persistent publish to a durable queue is confirmed once the store has written everything
//! submitted before it (one writer, in order), the transient records included.

use crate::common;

use common::*;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use std::path::Path;
use wharf_store::{CrashMode, Fs};

const BODY_BYTES: usize = 1024;
/// Four 1 KiB bodies fit in memory.
const BUDGET_BYTES: u64 = 4 * BODY_BYTES as u64;
/// The fifth message finds the queue at its bound with no transient log yet: it stays in memory
/// while the log is created; the rest are paged.
const RESIDENT_MESSAGES: usize = 5;

fn body(index: usize) -> Vec<u8> {
    let mut body = format!("transient {index:05} ").into_bytes();
    body.extend((0..BODY_BYTES - body.len()).map(|offset| b'a' + ((index + offset) % 26) as u8));
    body
}

fn properties(index: usize, delivery_mode: u8) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("order".into(), AMQPValue::LongLongInt(index as i64));
    BasicProperties::default()
        .with_message_id(format!("id-{index}").into())
        .with_headers(headers)
        .with_delivery_mode(delivery_mode)
}

fn assert_message(delivery: &lapin::message::Delivery, index: usize) {
    assert_eq!(delivery.data, body(index), "body of message {index}");
    let id = delivery.properties.message_id().as_ref().map(|id| id.as_str().to_owned());
    assert_eq!(id, Some(format!("id-{index}")));
    let order = delivery.properties.headers().as_ref().and_then(|headers| header_integer(headers, "order"));
    assert_eq!(order, Some(index as i64), "headers of message {index}");
}

fn paging(config: &mut wharf_broker::BrokerConfig) {
    config.queue_body_memory_bytes_max = BUDGET_BYTES;
}

/// Publishes `count` messages with `delivery_mode` to `queue` (each confirmed: for a transient
/// message that says only that the broker took it), then waits until the store has written
/// every record submitted so far (see the module doc).
async fn publish_all(channel: &lapin::Channel, queue: &str, count: usize, delivery_mode: u8) {
    for index in 0..count {
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body(index),
                properties(index, delivery_mode),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }
    durable_queue(channel, "barrier", FieldTable::default()).await;
    assert!(publish_confirmed(channel, "", "barrier", b"barrier", BasicProperties::default()).await);
}

/// Store logs on disk (one directory each).
fn store_logs(broker: &CrashableBroker) -> usize {
    broker.fs.read_dir(Path::new("/data/queues")).unwrap().iter().filter(|entry| entry.is_dir).count()
}

async fn consume_in_order(channel: &lapin::Channel, queue: &str, count: usize) {
    channel.basic_qos(50, BasicQosOptions::default()).await.unwrap();
    let mut deliveries = consumer(channel, queue).await;
    for index in 0..count {
        let delivery = next(&mut deliveries).await;
        assert_message(&delivery, index);
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_backlog_beyond_the_bound_is_paged_and_delivered_intact_in_order() {
    let broker = CrashableBroker::start(21, paging).await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    durable_queue(&channel, "scratch", FieldTable::default()).await;
    publish_all(&channel, "scratch", 200, 1).await;
    assert_eq!(broker.broker().counters().paged_out, 200 - RESIDENT_MESSAGES as u64, "the backlog left memory");
    assert_eq!(broker.broker().counters().transient_page_out_failures, 0);
    consume_in_order(&channel, "scratch", 200).await;
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_durable_queue_pages_too_persistent_messages_included() {
    let broker = CrashableBroker::start(22, paging).await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    channel.queue_declare("fleeting".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    // `delivery_mode` 2 in a non-durable queue is transient all the same.
    publish_all(&channel, "fleeting", 100, 2).await;
    assert_eq!(broker.broker().counters().paged_out, 100 - RESIDENT_MESSAGES as u64);
    // A `basic.get` reads a paged body back as a consumer does.
    let got = channel.basic_get("fleeting".into(), BasicGetOptions::default()).await.unwrap().unwrap();
    assert_message(&got.delivery, 0);
    got.delivery.ack(BasicAckOptions::default()).await.unwrap();
    channel.basic_qos(50, BasicQosOptions::default()).await.unwrap();
    let mut deliveries = consumer(&channel, "fleeting").await;
    for index in 1..100 {
        let delivery = next(&mut deliveries).await;
        assert_message(&delivery, index);
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_alarm_does_not_trip_for_a_paged_transient_backlog() {
    let broker = CrashableBroker::start(23, |config| {
        paging(config);
        // Ten bodies: well under the 200 published, well over what stays in memory.
        config.memory_high_watermark_bytes = 10 * BODY_BYTES as u64;
    })
    .await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    durable_queue(&channel, "scratch", FieldTable::default()).await;
    publish_all(&channel, "scratch", 200, 1).await;
    assert!(!broker.broker().check_alarms().await.memory, "the paged backlog is not held in memory");
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_no_transient_message_and_no_orphaned_log() {
    for crash in [false, true] {
        let mut broker = CrashableBroker::start(24, paging).await;
        {
            let connection = broker.connect().await;
            let channel = confirm_channel(&connection).await;
            durable_queue(&channel, "mixed", FieldTable::default()).await;
            publish_all(&channel, "mixed", 50, 1).await;
            assert!(publish_confirmed(&channel, "", "mixed", b"kept", BasicProperties::default()).await);
            connection.close(200, "bye".into()).await.unwrap();
        }
        assert_eq!(store_logs(&broker), 3, "the queue's log, its transient log and the barrier's");
        if crash {
            broker.crash(CrashMode::LoseUnsynced).await;
        } else {
            broker.restart().await;
        }
        assert_eq!(broker.broker().counters().orphaned_logs_kept, 0, "a transient log is no orphan");
        assert_eq!(store_logs(&broker), 2, "the transient log was deleted");
        let connection = broker.connect().await;
        let channel = connection.create_channel().await.unwrap();
        assert_eq!(message_count(&channel, "mixed").await, 1, "only the persistent message survives");
        let got = channel.basic_get("mixed".into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
        assert_eq!(got.delivery.data, b"kept");
        let orphan = "wharf.orphaned-log-0000000000000002";
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let error = channel.queue_declare(orphan.into(), passive, FieldTable::default()).await.unwrap_err();
        assert_eq!(reply_code(&error), Some(404), "no orphaned-log queue");
        connection.close(200, "bye".into()).await.unwrap();
        // The transient log's record went with it: a further start deletes nothing more.
        broker.restart().await;
        assert_eq!(store_logs(&broker), 2);
        assert_eq!(broker.broker().counters().orphaned_logs_kept, 0);
        broker.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_queue_deletes_its_transient_log() {
    let broker = CrashableBroker::start(25, paging).await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    channel.queue_declare("fleeting".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    publish_all(&channel, "fleeting", 20, 1).await;
    assert_eq!(store_logs(&broker), 2, "the transient log and the barrier's");
    channel.queue_delete("fleeting".into(), QueueDeleteOptions::default()).await.unwrap();
    assert_eq!(store_logs(&broker), 1, "the transient log went with its queue");
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_transient_messages_are_dead_lettered_with_their_bodies() {
    let broker = CrashableBroker::start(26, paging).await;
    let connection = broker.connect().await;
    let channel = confirm_channel(&connection).await;
    channel.queue_declare("dead".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    let mut dead_letter = FieldTable::default();
    dead_letter.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(LongString::from(&b""[..])));
    dead_letter.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(LongString::from(&b"dead"[..])));
    channel.queue_declare("work".into(), QueueDeclareOptions::default(), dead_letter).await.unwrap();
    publish_all(&channel, "work", 30, 1).await;
    assert_eq!(broker.broker().counters().paged_out, 30 - RESIDENT_MESSAGES as u64);
    let mut work = consumer(&channel, "work").await;
    for _ in 0..30 {
        let delivery = next(&mut work).await;
        delivery.reject(BasicRejectOptions { requeue: false }).await.unwrap();
    }
    let mut dead = consumer(&channel, "dead").await;
    for index in 0..30 {
        let delivery = next(&mut dead).await;
        assert_message(&delivery, index);
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}
