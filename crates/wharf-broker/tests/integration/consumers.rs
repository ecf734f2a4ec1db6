//! Consumers with a stock client: prefetch and fair dispatch, ack/nack/reject with `multiple` and
//! `requeue`, redelivery marked `redelivered` when a consumer's channel or connection dies,
//! `basic.get`, and `mandatory` returns.

use crate::common;

use common::TestBroker;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation};

async fn queue_with(channel: &Channel, name: &str, messages: usize) {
    channel.queue_declare(name.into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for index in 0..messages {
        channel
            .basic_publish(
                "".into(),
                name.into(),
                BasicPublishOptions::default(),
                format!("m{index}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

async fn get(channel: &Channel, queue: &str) -> Option<lapin::message::BasicGetMessage> {
    channel.basic_get(queue.into(), BasicGetOptions::default()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_bounds_unacked_deliveries_and_dispatch_is_fair() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let setup = connection.create_channel().await.unwrap();
    queue_with(&setup, "work", 6).await;
    let slow = connection.create_channel().await.unwrap();
    let fast = connection.create_channel().await.unwrap();
    slow.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    fast.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut slow_consumer = slow
        .basic_consume("work".into(), "slow".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let mut fast_consumer = fast
        .basic_consume("work".into(), "fast".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    // The slow consumer holds its one message unacked; the fast one gets everything else.
    let held = slow_consumer.next().await.unwrap().unwrap();
    let mut fast_bodies = Vec::new();
    for _ in 0..5 {
        let delivery = fast_consumer.next().await.unwrap().unwrap();
        fast_bodies.push(String::from_utf8(delivery.data.clone()).unwrap());
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(fast_bodies.len(), 5);
    assert!(!fast_bodies.contains(&String::from_utf8(held.data.clone()).unwrap()));
    held.ack(BasicAckOptions::default()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_requeues_as_redelivered_reject_discards_and_ack_multiple_settles_many() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    queue_with(&channel, "q", 5).await;
    let first = get(&channel, "q").await.unwrap();
    assert_eq!(first.delivery.data, b"m0");
    assert!(!first.delivery.redelivered);
    first.delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await.unwrap();
    let again = get(&channel, "q").await.unwrap();
    assert_eq!(again.delivery.data, b"m0", "requeued to its original place");
    assert!(again.delivery.redelivered);
    again.delivery.reject(BasicRejectOptions { requeue: false }).await.unwrap();
    let mut last = None;
    for expected in ["m1", "m2", "m3"] {
        let message = get(&channel, "q").await.unwrap();
        assert_eq!(message.delivery.data, expected.as_bytes());
        last = Some(message);
    }
    // One nack with `multiple` and `requeue` puts m1..m3 back, in order, marked redelivered.
    last.take().unwrap().delivery.nack(BasicNackOptions { multiple: true, requeue: true }).await.unwrap();
    for expected in ["m1", "m2", "m3"] {
        let message = get(&channel, "q").await.unwrap();
        assert_eq!(message.delivery.data, expected.as_bytes());
        assert!(message.delivery.redelivered);
        last = Some(message);
    }
    // One ack with `multiple` settles m1..m3.
    last.unwrap().delivery.ack(BasicAckOptions { multiple: true }).await.unwrap();
    let remaining = get(&channel, "q").await.unwrap();
    assert_eq!(remaining.delivery.data, b"m4");
    assert_eq!(remaining.message_count, 0);
    remaining.delivery.ack(BasicAckOptions::default()).await.unwrap();
    assert!(get(&channel, "q").await.is_none(), "basic.get-empty");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dying_consumer_connection_gives_its_messages_back_as_redelivered() {
    let broker = TestBroker::start().await;
    let survivor_connection = broker.connect().await;
    let channel = survivor_connection.create_channel().await.unwrap();
    queue_with(&channel, "q", 3).await;
    {
        let doomed = broker.connect().await;
        let doomed_channel = doomed.create_channel().await.unwrap();
        let mut consumer = doomed_channel
            .basic_consume("q".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .unwrap();
        for _ in 0..3 {
            consumer.next().await.unwrap().unwrap();
        }
        doomed.close(200, "gone without acking".into()).await.unwrap();
    }
    let mut consumer = channel
        .basic_consume("q".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    for expected in ["m0", "m1", "m2"] {
        let delivery = consumer.next().await.unwrap().unwrap();
        assert_eq!(delivery.data, expected.as_bytes());
        assert!(delivery.redelivered, "{expected} was delivered before");
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_channel_requeues_its_unacked_messages() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    queue_with(&channel, "q", 2).await;
    let other = connection.create_channel().await.unwrap();
    get(&other, "q").await.unwrap();
    get(&other, "q").await.unwrap();
    other.close(200, "bye".into()).await.unwrap();
    let back = get(&channel, "q").await.unwrap();
    assert!(back.delivery.redelivered);
    assert_eq!(back.message_count, 1);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_mandatory_messages_are_returned() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let confirm = channel
        .basic_publish(
            "amq.direct".into(),
            "nobody-listens".into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            b"lost?",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    match confirm {
        Confirmation::Ack(Some(returned)) => {
            assert_eq!(returned.reply_code, 312);
            assert_eq!(returned.delivery.data, b"lost?");
        }
        other => panic!("expected a return before the ack, got {other:?}"),
    }
    // Without `mandatory` the message is dropped silently (and still confirmed).
    let confirm = channel
        .basic_publish(
            "amq.direct".into(),
            "nobody-listens".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(matches!(confirm, Confirmation::Ack(None)), "{confirm:?}");
    broker.stop().await;
}
