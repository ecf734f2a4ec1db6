//! The food-delivery shape end to end with a stock client: a topic exchange `orders` fanned out
//! to `email`, `inventory` and `payment`; confirmed persistent publishes; acked consumes; and the
//! same after a restart.

use crate::common;

use common::TestBroker;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, ExchangeKind};

const SERVICES: [&str; 3] = ["email", "inventory", "payment"];

async fn declare_topology(channel: &lapin::Channel) {
    channel
        .exchange_declare(
            "orders".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    for service in SERVICES {
        channel.queue_declare(service.into(), QueueDeclareOptions::durable(), FieldTable::default()).await.unwrap();
        channel
            .queue_bind(
                service.into(),
                "orders".into(),
                "order.received".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }
}

async fn publish_orders(channel: &lapin::Channel, orders: std::ops::Range<u32>) {
    for order in orders {
        let confirm = channel
            .basic_publish(
                "orders".into(),
                "order.received".into(),
                BasicPublishOptions::default(),
                format!("order-{order}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2).with_message_id(format!("order-{order}").into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(matches!(confirm, Confirmation::Ack(_)), "order {order}: {confirm:?}");
    }
}

async fn consume(channel: &lapin::Channel, queue: &str, count: usize) -> Vec<String> {
    let mut consumer = channel
        .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let mut bodies = Vec::new();
    while bodies.len() < count {
        let delivery = consumer.next().await.unwrap().unwrap();
        bodies.push(String::from_utf8(delivery.data.clone()).unwrap());
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    bodies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_receives_each_order_once() {
    let broker = TestBroker::start().await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    declare_topology(&channel).await;
    publish_orders(&channel, 0..50).await;
    let expected: Vec<String> = (0..50).map(|order| format!("order-{order}")).collect();
    // Kept until the connection closes: lapin closes a dropped channel in the background, which
    // would race the connection's own close below.
    let mut consumer_channels = Vec::new();
    for service in SERVICES {
        let consumer_channel = connection.create_channel().await.unwrap();
        assert_eq!(consume(&consumer_channel, service, 50).await, expected, "{service}");
        consumer_channels.push(consumer_channel);
    }
    // Nothing left: every queue is empty once acked.
    for service in SERVICES {
        let declared = channel
            .queue_declare(
                service.into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
        assert_eq!(declared.message_count(), 0, "{service}");
    }
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_orders_and_the_topology_survive_a_restart() {
    let mut broker = TestBroker::start().await;
    {
        let connection = broker.connect().await;
        let channel = connection.create_channel().await.unwrap();
        channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        declare_topology(&channel).await;
        publish_orders(&channel, 0..20).await;
        // Half of the payment queue is processed before the restart.
        let consumer_channel = connection.create_channel().await.unwrap();
        let mut consumer = consumer_channel
            .basic_consume("payment".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .unwrap();
        for _ in 0..10 {
            let delivery = consumer.next().await.unwrap().unwrap();
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        connection.close(200, "bye".into()).await.unwrap();
    }
    broker.restart().await;
    let connection = broker.connect().await;
    let channel = connection.create_channel().await.unwrap();
    // The exchange and bindings came back: a new publish still fans out.
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    publish_orders(&channel, 20..21).await;
    let all: Vec<String> = (0..21).map(|order| format!("order-{order}")).collect();
    assert_eq!(consume(&channel, "email", 21).await, all);
    assert_eq!(consume(&channel, "payment", 11).await, all[10..].to_vec(), "acked before the restart: gone");
    connection.close(200, "bye".into()).await.unwrap();
    broker.stop().await;
}
