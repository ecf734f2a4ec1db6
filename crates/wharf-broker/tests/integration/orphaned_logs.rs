//! What is stored must always read back: recovery never deletes a store log that holds messages
//! but belongs to no definition it could read. Such a log becomes the queue
//! `wharf.orphaned-log-<log id>`, is counted, and its messages can be read with any client.

use crate::common;

use common::*;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::FieldTable;
use wharf_broker::Broker;
use wharf_store::{MetaStore, RealFs};

/// A client connection to `broker`.
async fn connect_to(broker: &Broker) -> lapin::Connection {
    let url = format!("amqp://guest:guest@{}/%2f", broker.local_addr());
    lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await.unwrap()
}

/// Damages a stored queue definition (as a bug or a bad disk could), so nothing names its log.
fn damage_queue_definition(data_dir: &std::path::Path, queue: &str) {
    let (meta, _) = MetaStore::open(RealFs::shared(), data_dir.join("meta")).unwrap();
    meta.put(format!("queue\0/\0{queue}").as_bytes(), &[1, b'Q', 0xff]).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_whose_definition_is_unreadable_keeps_its_messages_as_an_orphaned_log_queue() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let broker = Broker::start(config(&data_dir)).await.unwrap();
    let connection = connect_to(&broker).await;
    let channel = confirm_channel(&connection).await;
    durable_queue(&channel, "precious", FieldTable::default()).await;
    assert!(publish_confirmed(&channel, "", "precious", b"confirmed, so kept", BasicProperties::default()).await);
    connection.close(200, "done".into()).await.unwrap();
    broker.shutdown().await;

    damage_queue_definition(&data_dir, "precious");

    let broker = Broker::start(config(&data_dir)).await.unwrap();
    assert_eq!(broker.counters().orphaned_logs_kept, 1);
    let connection = connect_to(&broker).await;
    let channel = connection.create_channel().await.unwrap();
    // The first log the store created has id 1.
    let orphan = "wharf.orphaned-log-0000000000000001";
    let got = channel.basic_get(orphan.into(), BasicGetOptions { no_ack: false }).await.unwrap();
    let message = got.expect("the confirmed message is still there");
    assert_eq!(message.delivery.data, b"confirmed, so kept");
    message.delivery.ack(BasicAckOptions::default()).await.unwrap();
    connection.close(200, "done".into()).await.unwrap();
    broker.shutdown().await;

    // It stays a queue across restarts (its definition is written), now empty.
    let broker = Broker::start(config(&data_dir)).await.unwrap();
    let connection = connect_to(&broker).await;
    let channel = connection.create_channel().await.unwrap();
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let declared = channel.queue_declare(orphan.into(), passive, FieldTable::default()).await.unwrap();
    assert_eq!(declared.message_count(), 0);
    assert_eq!(broker.counters().orphaned_logs_kept, 0, "no new orphan: the queue has its definition");
    connection.close(200, "done".into()).await.unwrap();
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_log_without_a_definition_is_deleted_as_before() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let broker = Broker::start(config(&data_dir)).await.unwrap();
    let connection = connect_to(&broker).await;
    let channel = connection.create_channel().await.unwrap();
    durable_queue(&channel, "empty", FieldTable::default()).await;
    connection.close(200, "done".into()).await.unwrap();
    broker.shutdown().await;
    damage_queue_definition(&data_dir, "empty");
    let broker = Broker::start(config(&data_dir)).await.unwrap();
    assert_eq!(broker.counters().orphaned_logs_kept, 0, "nothing to keep in an empty log");
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaned_log_never_takes_the_place_of_a_queue_a_client_declared() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let broker = Broker::start(config(&data_dir)).await.unwrap();
    let connection = connect_to(&broker).await;
    let channel = confirm_channel(&connection).await;
    // Log 1 is "precious"'s; a client happens to name a queue as its orphan would be named.
    durable_queue(&channel, "precious", FieldTable::default()).await;
    let clashing = "wharf.orphaned-log-0000000000000001";
    durable_queue(&channel, clashing, FieldTable::default()).await;
    assert!(publish_confirmed(&channel, "", "precious", b"orphaned", BasicProperties::default()).await);
    assert!(publish_confirmed(&channel, "", clashing, b"theirs", BasicProperties::default()).await);
    connection.close(200, "done".into()).await.unwrap();
    broker.shutdown().await;
    damage_queue_definition(&data_dir, "precious");

    let broker = Broker::start(config(&data_dir)).await.unwrap();
    let connection = connect_to(&broker).await;
    let channel = connection.create_channel().await.unwrap();
    let theirs = channel.basic_get(clashing.into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
    assert_eq!(theirs.delivery.data, b"theirs", "the client's queue is left as it was");
    let orphan = format!("{clashing}-2");
    let kept = channel.basic_get(orphan.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
    assert_eq!(kept.delivery.data, b"orphaned");
    connection.close(200, "done".into()).await.unwrap();
    broker.shutdown().await;
}
