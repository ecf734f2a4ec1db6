//! Publisher confirms and transactions against the fault-injecting file system: a confirm is
//! never sent before the message is on disk (a power loss right after the confirm keeps it), a
//! failed fsync nacks and stops the broker, and a transaction's publishes and acks take effect
//! together at commit, or not at all.

use crate::common;

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use wharf_broker::{Broker, BrokerConfig};
use wharf_store::{CrashMode, SimFs};

async fn start_on(fs: &SimFs) -> Broker {
    let mut config = BrokerConfig::new("/data");
    config.amqp_listen = "127.0.0.1:0".parse().unwrap();
    config.fs = fs.shared();
    Broker::start(config).await.unwrap()
}

async fn connect(broker: &Broker) -> Connection {
    Connection::connect(&format!("amqp://guest:guest@{}/%2f", broker.local_addr()), ConnectionProperties::default())
        .await
        .unwrap()
}

async fn publish(channel: &Channel, body: &str) -> Confirmation {
    channel
        .basic_publish(
            "".into(),
            "q".into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap()
}

async fn bodies(channel: &Channel) -> Vec<String> {
    let mut bodies = Vec::new();
    while let Some(message) = channel.basic_get("q".into(), BasicGetOptions { no_ack: true }).await.unwrap() {
        bodies.push(String::from_utf8(message.delivery.data.clone()).unwrap());
    }
    bodies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_message_survives_a_power_loss_right_after_the_confirm() {
    let fs = SimFs::new(1);
    let broker = start_on(&fs).await;
    let connection = connect(&broker).await;
    let channel = connection.create_channel().await.unwrap();
    channel.queue_declare("q".into(), QueueDeclareOptions::durable(), FieldTable::default()).await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for index in 0..20 {
        assert!(publish(&channel, &format!("m{index}")).await.is_ack());
    }
    // The power goes out the instant the last confirm arrives: nothing unsynced survives.
    fs.crash(CrashMode::LoseUnsynced);
    drop(connection);
    broker.shutdown().await;

    let broker = start_on(&fs.remount()).await;
    let connection = connect(&broker).await;
    let channel = connection.create_channel().await.unwrap();
    let expected: Vec<String> = (0..20).map(|index| format!("m{index}")).collect();
    assert_eq!(bodies(&channel).await, expected);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_nacks_and_stops_the_broker() {
    let fs = SimFs::new(2);
    let broker = start_on(&fs).await;
    let connection = connect(&broker).await;
    let channel = connection.create_channel().await.unwrap();
    channel.queue_declare("q".into(), QueueDeclareOptions::durable(), FieldTable::default()).await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    assert!(publish(&channel, "before").await.is_ack());
    fs.fail_next_syncs(1);
    let confirm = publish(&channel, "during").await;
    assert!(matches!(confirm, Confirmation::Nack(_)), "{confirm:?}");
    let reason = broker.fatal_error().await;
    assert!(reason.contains("fdatasync"), "{reason}");
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_commit_together_or_roll_back() {
    let fs = SimFs::new(3);
    let broker = start_on(&fs).await;
    let connection = connect(&broker).await;
    let observer = connection.create_channel().await.unwrap();
    observer.queue_declare("q".into(), QueueDeclareOptions::durable(), FieldTable::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.tx_select().await.unwrap();
    for body in ["a", "b"] {
        channel
            .basic_publish(
                "".into(),
                "q".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
    }
    assert!(
        observer.basic_get("q".into(), BasicGetOptions::default()).await.unwrap().is_none(),
        "nothing before commit"
    );
    channel.tx_rollback().await.unwrap();
    channel
        .basic_publish(
            "".into(),
            "q".into(),
            BasicPublishOptions::default(),
            b"c",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    channel.tx_commit().await.unwrap();
    // Committed means durable: a power loss right after commit-ok keeps it.
    fs.crash(CrashMode::LoseUnsynced);
    drop(connection);
    broker.shutdown().await;

    let broker = start_on(&fs.remount()).await;
    let connection = connect(&broker).await;
    let channel = connection.create_channel().await.unwrap();
    channel.tx_select().await.unwrap();
    let message = channel.basic_get("q".into(), BasicGetOptions::default()).await.unwrap().unwrap();
    assert_eq!(message.delivery.data, b"c", "the rolled-back publishes never happened");
    // An ack inside a rolled-back transaction does not happen either.
    message.delivery.ack(BasicAckOptions::default()).await.unwrap();
    channel.tx_rollback().await.unwrap();
    channel.close(200, "bye".into()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.tx_select().await.unwrap();
    let message = channel.basic_get("q".into(), BasicGetOptions::default()).await.unwrap().unwrap();
    assert!(message.delivery.redelivered);
    message.delivery.ack(BasicAckOptions::default()).await.unwrap();
    channel.tx_commit().await.unwrap();
    // The committed ack is durable too.
    fs.crash(CrashMode::LoseUnsynced);
    drop(connection);
    broker.shutdown().await;
    let broker = start_on(&fs.remount()).await;
    let connection = connect(&broker).await;
    let channel = connection.create_channel().await.unwrap();
    assert!(bodies(&channel).await.is_empty());
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_cannot_apply_fully_applies_nothing() {
    let fs = SimFs::new(4);
    let broker = start_on(&fs).await;
    let connection = connect(&broker).await;
    let observer = connection.create_channel().await.unwrap();
    observer.queue_declare("q".into(), QueueDeclareOptions::durable(), FieldTable::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.tx_select().await.unwrap();
    channel
        .basic_publish(
            "".into(),
            "q".into(),
            BasicPublishOptions::default(),
            b"first",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    channel
        .basic_publish(
            "no-such-exchange".into(),
            "q".into(),
            BasicPublishOptions::default(),
            b"second",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    let error = channel.tx_commit().await.unwrap_err();
    assert_eq!(common::reply_code(&error), Some(404), "{error}");
    assert!(observer.basic_get("q".into(), BasicGetOptions::default()).await.unwrap().is_none(), "nothing was applied");
    broker.shutdown().await;
}
