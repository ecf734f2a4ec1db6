//! A full disk (issue #15, defect 3), on the fault-injecting file system's space limit: a
//! publish nacked for lack of space is never delivered, from any of the queues it was routed to;
//! a confirmed one is delivered from every one of them, is still there after a crash, and once
//! space is freed (consumed and acked) publishing works again without a restart.

use crate::common::CrashableBroker;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ExchangeKind};
use std::collections::BTreeSet;

const QUEUES: [&str; 2] = ["full-a", "full-b"];
const EXCHANGE: &str = "full-fanout";
const BODY_BYTES: usize = 4 * 1024;
/// Much more than the room left on the disk: most of these are nacked.
const PUBLISHES: u64 = 100;
/// Room on the disk when publishing starts.
const ROOM_BYTES: u64 = 256 * 1024;
/// A transient message (never stored, so a full disk takes it): once a consumer has it, it has
/// had everything enqueued before it.
const END: &[u8] = b"end";

fn body(id: u64) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    body.resize(BODY_BYTES, b'x');
    body
}

fn id_of(body: &[u8]) -> u64 {
    u64::from_be_bytes(body[..8].try_into().unwrap())
}

async fn publish(channel: &Channel, body: &[u8], delivery_mode: u8) -> Confirmation {
    channel
        .basic_publish(
            EXCHANGE.into(),
            "".into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(delivery_mode),
        )
        .await
        .unwrap()
        .await
        .unwrap()
}

/// What one consumer received up to the `END` marker, in order, left unacked (with the delivery
/// tag of the last one); the consumer is cancelled then.
async fn consume_until_end(connection: &Connection, queue: &str) -> (Channel, Vec<u64>, Option<u64>) {
    let channel = connection.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let (mut ids, mut last_tag) = (Vec::new(), None);
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.unwrap();
        if delivery.data == END {
            delivery.ack(BasicAckOptions::default()).await.unwrap();
            break;
        }
        ids.push(id_of(&delivery.data));
        last_tag = Some(delivery.delivery_tag);
    }
    channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await.unwrap();
    (channel, ids, last_tag)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_full_disk_no_nacked_publish_is_delivered_and_no_confirmed_one_is_lost() {
    let mut broker = CrashableBroker::start(15, |config| {
        // Small segments, so that acked messages free whole segments.
        config.store.segment_bytes_max = 64 * 1024;
    })
    .await;
    let connection = broker.connect().await;
    let setup = connection.create_channel().await.unwrap();
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    setup.exchange_declare(EXCHANGE.into(), ExchangeKind::Fanout, durable, FieldTable::default()).await.unwrap();
    for queue in QUEUES {
        setup.queue_declare(queue.into(), QueueDeclareOptions::durable(), FieldTable::default()).await.unwrap();
        setup
            .queue_bind(queue.into(), EXCHANGE.into(), "".into(), QueueBindOptions::default(), FieldTable::default())
            .await
            .unwrap();
    }
    let consumers: Vec<_> = QUEUES
        .iter()
        .map(|queue| {
            let connection_url = broker.url();
            let queue = queue.to_string();
            tokio::spawn(async move {
                let connection =
                    Connection::connect(&connection_url, lapin::ConnectionProperties::default()).await.unwrap();
                let (_channel, ids, _) = consume_until_end(&connection, &queue).await;
                connection.close(200, "done".into()).await.unwrap();
                ids
            })
        })
        .collect();

    broker.fs.set_space_bytes_max(Some(broker.fs.used_bytes() + ROOM_BYTES));
    let publisher = connection.create_channel().await.unwrap();
    publisher.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut pending = Vec::new();
    for id in 0..PUBLISHES {
        let properties = BasicProperties::default().with_delivery_mode(2);
        let confirm = publisher
            .basic_publish(EXCHANGE.into(), "".into(), BasicPublishOptions::default(), &body(id), properties)
            .await
            .unwrap();
        pending.push((id, confirm));
    }
    let (mut confirmed, mut nacked) = (Vec::new(), BTreeSet::new());
    for (id, confirm) in pending {
        match confirm.await.unwrap() {
            Confirmation::Ack(_) => confirmed.push(id),
            Confirmation::Nack(_) => {
                nacked.insert(id);
            }
            Confirmation::NotRequested => panic!("publish {id} got no confirm"),
        }
    }
    assert!(!nacked.is_empty(), "the disk never filled");
    assert!(!confirmed.is_empty(), "nothing fitted on the disk");
    assert!(publish(&publisher, END, 1).await.is_ack());
    for (queue, consumer) in QUEUES.iter().zip(consumers) {
        let delivered = consumer.await.unwrap();
        let nacked_delivered: Vec<_> = delivered.iter().filter(|id| nacked.contains(id)).collect();
        assert!(nacked_delivered.is_empty(), "{queue} delivered nacked publishes {nacked_delivered:?}");
        assert_eq!(delivered, confirmed, "{queue} delivered every confirmed publish, in order");
    }
    drop(connection);

    // `kill -9` on the full disk: every confirmed message comes back (unacked before), the
    // nacked ones never do.
    broker.crash(wharf_store::CrashMode::KeepUnsynced).await;
    let connection = broker.connect().await;
    let publisher = connection.create_channel().await.unwrap();
    publisher.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    assert!(publish(&publisher, END, 1).await.is_ack());
    let mut channels = Vec::new();
    for queue in QUEUES {
        let (channel, delivered, last_tag) = consume_until_end(&connection, queue).await;
        assert_eq!(delivered, confirmed, "{queue} kept every confirmed publish and nothing else");
        channels.push((channel, last_tag.unwrap()));
    }

    // Consumed and acked: the segments they filled are deleted (the transaction's commit makes
    // the acks durable), and the disk takes publishes again.
    for (channel, last_tag) in &channels {
        channel.tx_select().await.unwrap();
        channel.basic_ack(*last_tag, BasicAckOptions { multiple: true }).await.unwrap();
        channel.tx_commit().await.unwrap();
    }
    let after = PUBLISHES;
    assert!(publish(&publisher, &body(after), 2).await.is_ack(), "space came back");
    assert!(publish(&publisher, END, 1).await.is_ack());
    for queue in QUEUES {
        let (_channel, delivered, _) = consume_until_end(&connection, queue).await;
        assert_eq!(delivered, vec![after]);
    }
    drop(connection);
    broker.stop().await;
}
