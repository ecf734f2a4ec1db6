//! Priority queues (`x-max-priority`) and consumer priorities (`x-priority`) through a real
//! client: the highest priority first and arrival order within one, for resident and paged
//! bodies, across a crash and for requeued messages; refused arguments; and deliveries going to
//! the highest-priority consumer with room.

use crate::common;

use common::*;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use wharf_store::CrashMode;

/// Two 1 KiB bodies fit in memory; the rest are paged out.
fn paging(config: &mut wharf_broker::BrokerConfig) {
    config.queue_body_memory_bytes_max = 2048;
}

fn body(index: usize) -> Vec<u8> {
    let mut body = format!("message {index:03} ").into_bytes();
    body.resize(1024, b'.');
    body
}

/// Message `index`'s priority: 0 to 12 (above the maximum of 9 for some, none for others).
fn priority_of(index: usize) -> Option<u8> {
    (!index.is_multiple_of(5)).then_some(((index * 7) % 13) as u8)
}

/// The order a priority queue with `x-max-priority: 9` delivers messages 0..count in.
fn expected_order(count: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..count).collect();
    order.sort_by_key(|&index| (std::cmp::Reverse(priority_of(index).unwrap_or(0).min(9)), index));
    order
}

fn index_of(data: &[u8]) -> usize {
    std::str::from_utf8(&data[8..11]).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_priority_queue_delivers_by_priority_then_arrival_across_paging_and_a_crash() {
    let mut broker = CrashableBroker::start(11, paging).await;
    let count = 40;
    {
        let connection = broker.connect().await;
        let channel = confirm_channel(&connection).await;
        durable_queue(&channel, "jobs", arguments(&[("x-max-priority", AMQPValue::ShortShortUInt(9))])).await;
        for index in 0..count {
            let mut properties = BasicProperties::default().with_delivery_mode(2);
            if let Some(priority) = priority_of(index) {
                properties = properties.with_priority(priority);
            }
            assert!(publish_confirmed(&channel, "", "jobs", &body(index), properties).await);
        }
        assert!(broker.broker().counters().paged_out > 30, "most bodies left memory");
        // The first delivery is the highest priority; requeued, it goes back to the head.
        let got = channel.basic_get("jobs".into(), BasicGetOptions { no_ack: false }).await.unwrap().unwrap();
        assert_eq!(index_of(&got.delivery.data), expected_order(count)[0]);
        got.delivery.nack(BasicNackOptions { requeue: true, multiple: false }).await.unwrap();
        let again = channel.basic_get("jobs".into(), BasicGetOptions { no_ack: false }).await.unwrap().unwrap();
        assert_eq!(index_of(&again.delivery.data), expected_order(count)[0]);
        assert!(again.delivery.redelivered);
        // Held unacknowledged when the broker dies.
    }
    broker.crash(CrashMode::LoseUnsynced).await;
    broker.restart().await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    let mut received = Vec::new();
    while let Some(got) = channel.basic_get("jobs".into(), BasicGetOptions { no_ack: true }).await.unwrap() {
        assert_eq!(got.delivery.data, body(index_of(&got.delivery.data)), "the body is intact");
        assert_eq!(
            got.delivery.properties.priority().as_ref().copied(),
            priority_of(index_of(&got.delivery.data)),
            "the priority property is delivered as published"
        );
        received.push(index_of(&got.delivery.data));
    }
    assert_eq!(received, expected_order(count));
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_priority_arguments_are_refused_with_406() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    for value in [AMQPValue::LongInt(256), AMQPValue::LongInt(-1), AMQPValue::LongString("high".into())] {
        let channel = connection.create_channel().await.unwrap();
        let error = channel
            .queue_declare(
                "bad-priority".into(),
                QueueDeclareOptions::default(),
                arguments(&[("x-max-priority", value)]),
            )
            .await
            .unwrap_err();
        assert_eq!(reply_code(&error), Some(406));
        assert!(message_of(&error).contains("x-max-priority"), "{}", message_of(&error));
    }
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_go_to_the_highest_priority_consumer_with_room() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    channel.queue_declare("work".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    // Each consumer on its own channel with a prefetch of 2.
    let mut consumers = Vec::new();
    for (tag, priority) in [("low", None), ("high", Some(10)), ("middle", Some(5))] {
        let consumer_channel = connection.create_channel().await.unwrap();
        consumer_channel.basic_qos(2, BasicQosOptions::default()).await.unwrap();
        let arguments = match priority {
            Some(priority) => arguments(&[("x-priority", AMQPValue::LongInt(priority))]),
            None => FieldTable::default(),
        };
        let consumer = consumer_channel
            .basic_consume("work".into(), tag.into(), BasicConsumeOptions::default(), arguments)
            .await
            .unwrap();
        consumers.push((tag, consumer_channel, consumer));
    }
    for index in 0..6 {
        channel
            .basic_publish(
                "".into(),
                "work".into(),
                BasicPublishOptions::default(),
                &body(index),
                BasicProperties::default(),
            )
            .await
            .unwrap();
    }
    // "high" takes the first two, then it has no room and "middle" takes two, then "low".
    for (tag, _, consumer) in &mut consumers {
        let expected: Vec<usize> = match *tag {
            "high" => vec![0, 1],
            "middle" => vec![2, 3],
            _ => vec![4, 5],
        };
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(index_of(&next(consumer).await.data));
        }
        assert_eq!(got, expected, "consumer {tag}");
    }
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}
