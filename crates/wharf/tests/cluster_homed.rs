//! Classic queues on a cluster of three `wharf` processes (issue #19): a durable classic queue
//! lives on the node that declared it (its home), and clients on the other nodes reach it:
//! publishes with confirms through one node, a consumer with acks on another, `basic.get`,
//! purge and delete through a third; while its home is down, publishes to it are nacked and
//! declares and consumes of it are refused with 404, and what was confirmed is there once the
//! home is back; a consumer's node that dies has what its consumer held redelivered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{connect, eventually, next, start_node};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use std::net::SocketAddr;

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() }
}

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions { passive: true, durable: true, ..QueueDeclareOptions::default() }
}

/// Publishes one persistent message and returns whether it was confirmed (ack) or not (nack).
async fn publish(channel: &Channel, exchange: &str, routing_key: &str, body: &str) -> bool {
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap()
        .is_ack()
}

/// The queue's (ready messages, consumers) by a passive declare on `amqp`, or the refusal's
/// reply code.
async fn counts(amqp: SocketAddr, queue: &str) -> Result<(u32, u32), u16> {
    let connection = connect(amqp).await;
    let channel = connection.create_channel().await.unwrap();
    let declared = channel.queue_declare(queue.into(), passive(), FieldTable::default()).await;
    let _ = connection.close(200, "done".into()).await;
    match declared {
        Ok(queue) => Ok((queue.message_count(), queue.consumer_count())),
        Err(error) => Err(reply_code(&error).unwrap_or_else(|| panic!("{error:?}"))),
    }
}

fn reply_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

async fn confirming(amqp: SocketAddr) -> (lapin::Connection, Channel) {
    let connection = connect(amqp).await;
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    (connection, channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_queue_is_reached_through_every_node() {
    let temp = tempfile::tempdir().unwrap();
    let (_, nodes) = common::three_nodes(temp.path(), &[]).await;
    let home = connect(nodes[0].amqp).await;
    let channel = home.create_channel().await.unwrap();
    channel.queue_declare("orders".into(), durable(), FieldTable::default()).await.unwrap();
    channel
        .queue_bind(
            "orders".into(),
            "amq.direct".into(),
            "o".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for node in &nodes[1..] {
        let amqp = node.amqp;
        eventually("the queue is known on every node", || async move { counts(amqp, "orders").await.is_ok() }).await;
    }

    // Published through node 2 (to the queue and through the binding), confirmed by the home.
    let (_publishing, publisher) = confirming(nodes[1].amqp).await;
    for n in 0..40 {
        assert!(publish(&publisher, "", "orders", &format!("m-{n}")).await, "m-{n} was nacked");
    }
    for n in 40..50 {
        assert!(publish(&publisher, "amq.direct", "o", &format!("m-{n}")).await, "m-{n} was nacked");
    }
    // Counted alike through the home and through another node.
    assert_eq!(counts(nodes[0].amqp, "orders").await, Ok((50, 0)));
    assert_eq!(counts(nodes[2].amqp, "orders").await, Ok((50, 0)));

    // Consumed on node 3 with acks: every message once, in order.
    let consuming = connect(nodes[2].amqp).await;
    let consumer_channel = consuming.create_channel().await.unwrap();
    consumer_channel.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let mut consumer = consumer_channel
        .basic_consume("orders".into(), "c".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    for n in 0..50 {
        let delivery = next(&mut consumer).await;
        assert_eq!(String::from_utf8_lossy(&delivery.data), format!("m-{n}"));
        assert!(!delivery.redelivered);
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    let home_amqp = nodes[0].amqp;
    eventually("the home has every message acked", || async move { counts(home_amqp, "orders").await == Ok((0, 1)) })
        .await;
    consumer_channel.basic_cancel("c".into(), Default::default()).await.unwrap();
    eventually("the cancel reached the home", || async move { counts(home_amqp, "orders").await == Ok((0, 0)) }).await;

    // basic.get through node 2: a nack with requeue brings it back, redelivered.
    assert!(publish(&publisher, "", "orders", "got").await);
    let getter = connect(nodes[1].amqp).await.create_channel().await.unwrap();
    let got = getter.basic_get("orders".into(), BasicGetOptions::default()).await.unwrap().unwrap();
    assert_eq!(String::from_utf8_lossy(&got.delivery.data), "got");
    assert!(!got.delivery.redelivered);
    got.delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await.unwrap();
    let again = loop {
        if let Some(again) = getter.basic_get("orders".into(), BasicGetOptions::default()).await.unwrap() {
            break again;
        }
    };
    assert_eq!(String::from_utf8_lossy(&again.delivery.data), "got");
    assert!(again.delivery.redelivered);
    again.delivery.ack(BasicAckOptions::default()).await.unwrap();
    eventually("the get's ack reached the home", || async move { counts(home_amqp, "orders").await == Ok((0, 0)) })
        .await;
    assert!(getter.basic_get("orders".into(), BasicGetOptions::default()).await.unwrap().is_none());
    // A get left unacknowledged when its channel closes goes back, redelivered.
    assert!(publish(&publisher, "", "orders", "held-by-get").await);
    let held = getter.basic_get("orders".into(), BasicGetOptions::default()).await.unwrap().unwrap();
    assert_eq!(String::from_utf8_lossy(&held.delivery.data), "held-by-get");
    getter.close(200, "done".into()).await.unwrap();
    let getter = connect(nodes[2].amqp).await.create_channel().await.unwrap();
    let back = loop {
        if let Some(back) = getter.basic_get("orders".into(), BasicGetOptions::default()).await.unwrap() {
            break back;
        }
    };
    assert_eq!(String::from_utf8_lossy(&back.delivery.data), "held-by-get");
    assert!(back.delivery.redelivered);
    back.delivery.ack(BasicAckOptions::default()).await.unwrap();

    // Purged through node 3; deleted through node 2 (refused while not empty with if-empty).
    for n in 0..3 {
        assert!(publish(&publisher, "", "orders", &format!("p-{n}")).await);
    }
    let third = connect(nodes[2].amqp).await.create_channel().await.unwrap();
    assert_eq!(third.queue_purge("orders".into(), QueuePurgeOptions::default()).await.unwrap(), 3);
    // Without confirms, a get through the same node right after a publish sees it: the get
    // goes after the publish in the node's ordered stream to the home.
    let plain = connect(nodes[1].amqp).await.create_channel().await.unwrap();
    plain
        .basic_publish(
            "".into(),
            "orders".into(),
            BasicPublishOptions::default(),
            b"unconfirmed",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    let seen = plain.basic_get("orders".into(), BasicGetOptions { no_ack: true }).await.unwrap();
    assert_eq!(seen.map(|got| got.delivery.data), Some(b"unconfirmed".to_vec()));
    assert!(publish(&publisher, "", "orders", "left").await);
    let deleting = connect(nodes[1].amqp).await;
    let refused = deleting.create_channel().await.unwrap();
    let error =
        refused.queue_delete("orders".into(), QueueDeleteOptions { if_empty: true, ..Default::default() }).await;
    assert_eq!(reply_code(&error.unwrap_err()), Some(406));
    let deleter = deleting.create_channel().await.unwrap();
    assert_eq!(deleter.queue_delete("orders".into(), QueueDeleteOptions::default()).await.unwrap(), 1);
    for node in &nodes {
        let amqp = node.amqp;
        eventually("the queue is gone on every node", || async move { counts(amqp, "orders").await == Err(404) }).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_queue_waits_for_its_home_and_outlives_a_consumers_node() {
    let temp = tempfile::tempdir().unwrap();
    let (cluster, mut nodes) = common::three_nodes(temp.path(), &[]).await;
    let home = connect(nodes[0].amqp).await;
    home.create_channel().await.unwrap().queue_declare("jobs".into(), durable(), FieldTable::default()).await.unwrap();
    for node in &nodes[1..] {
        let amqp = node.amqp;
        eventually("the queue is known on every node", || async move { counts(amqp, "jobs").await.is_ok() }).await;
    }
    let (_publishing, publisher) = confirming(nodes[1].amqp).await;
    for n in 0..10 {
        assert!(publish(&publisher, "", "jobs", &format!("j-{n}")).await);
    }

    // A consumer on node 3 holds five unacknowledged; node 3 dies: the home redelivers them to
    // a consumer on node 2.
    let doomed_connection = connect(nodes[2].amqp).await;
    let doomed_channel = doomed_connection.create_channel().await.unwrap();
    doomed_channel.basic_qos(5, BasicQosOptions::default()).await.unwrap();
    let mut doomed = doomed_channel
        .basic_consume("jobs".into(), "held".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(String::from_utf8_lossy(&next(&mut doomed).await.data).into_owned());
    }
    nodes[2].child.kill().await.unwrap();
    let surviving = connect(nodes[1].amqp).await;
    let survivor_channel = surviving.create_channel().await.unwrap();
    let mut survivor = survivor_channel
        .basic_consume("jobs".into(), "survivor".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let mut seen = std::collections::BTreeMap::new();
    while seen.len() < 10 {
        let delivery = next(&mut survivor).await;
        let body = String::from_utf8_lossy(&delivery.data).into_owned();
        // What the dead node's consumer held comes back marked redelivered; the rest does not.
        assert_eq!(delivery.redelivered, held.contains(&body), "{body}");
        *seen.entry(body).or_insert(0) += 1;
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert!(seen.values().all(|count| *count == 1), "{seen:?}");
    survivor_channel.basic_cancel("survivor".into(), Default::default()).await.unwrap();
    let data_dir = temp.path().join("node-3");
    nodes[2] = start_node(&data_dir, 3, &cluster, &[]).await;

    // The home dies: publishes to its queue are nacked, declares and consumes refused with 404.
    for n in 0..5 {
        assert!(publish(&publisher, "", "jobs", &format!("k-{n}")).await);
    }
    nodes[0].child.kill().await.unwrap();
    let (_nacked_connection, nacked) = confirming(nodes[1].amqp).await;
    assert!(!publish(&nacked, "", "jobs", "while-down").await, "a publish to a queue whose home is down was confirmed");
    assert_eq!(counts(nodes[1].amqp, "jobs").await, Err(404));
    let refusing = connect(nodes[2].amqp).await.create_channel().await.unwrap();
    let refused =
        refusing.basic_consume("jobs".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await;
    assert_eq!(reply_code(&refused.unwrap_err()), Some(404));

    // Back, the home has what was confirmed, and serves every node again.
    nodes[0] = start_node(&temp.path().join("node-1"), 1, &cluster, &[]).await;
    let amqp = nodes[2].amqp;
    eventually("the home is reachable again", || async move { counts(amqp, "jobs").await.is_ok() }).await;
    let after = connect(nodes[2].amqp).await.create_channel().await.unwrap();
    let mut consumer = after
        .basic_consume("jobs".into(), "after".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    for n in 0..5 {
        let delivery = next(&mut consumer).await;
        assert_eq!(String::from_utf8_lossy(&delivery.data), format!("k-{n}"));
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    let home_amqp = nodes[0].amqp;
    // Nothing else: the nacked publish never reached the queue.
    eventually("everything was acked", || async move { counts(home_amqp, "jobs").await == Ok((0, 1)) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_queue_that_expires_on_its_home_goes_from_every_node() {
    let temp = tempfile::tempdir().unwrap();
    let (_, nodes) = common::three_nodes(temp.path(), &[]).await;
    let home = connect(nodes[0].amqp).await;
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), lapin::types::AMQPValue::LongInt(2_000));
    home.create_channel().await.unwrap().queue_declare("brief".into(), durable(), arguments).await.unwrap();
    for node in &nodes {
        let url = node.http.clone();
        eventually("the queue is on every node", || {
            let url = url.clone();
            async move { common::call(&url, "GET", "/api/queues/%2F/brief", None).await.0 == 200 }
        })
        .await;
    }
    // Unused, it expires on its home; the other nodes forget it too (their management API
    // lists it no more), so it can be declared again from any of them.
    for node in &nodes {
        let url = node.http.clone();
        eventually("the expired queue is gone from every node", || {
            let url = url.clone();
            async move { common::call(&url, "GET", "/api/queues/%2F/brief", None).await.0 == 404 }
        })
        .await;
    }
    let again = connect(nodes[2].amqp).await;
    again
        .create_channel()
        .await
        .unwrap()
        .queue_declare("brief".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    assert_eq!(counts(nodes[2].amqp, "brief").await, Ok((0, 0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_its_home_does_not_serve_is_cancelled_by_the_server() {
    let temp = tempfile::tempdir().unwrap();
    let (_, nodes) = common::three_nodes(temp.path(), &[]).await;
    let home = connect(nodes[0].amqp).await;
    let home_channel = home.create_channel().await.unwrap();
    home_channel.queue_declare("solo".into(), durable(), FieldTable::default()).await.unwrap();
    let amqp = nodes[2].amqp;
    eventually("the queue is known on node 3", || async move { counts(amqp, "solo").await.is_ok() }).await;
    // An exclusive consumer on the home: the home refuses any other.
    let exclusive = BasicConsumeOptions { exclusive: true, ..BasicConsumeOptions::default() };
    let _owner =
        home_channel.basic_consume("solo".into(), "owner".into(), exclusive, FieldTable::default()).await.unwrap();
    // Through node 3 the consume is answered at once; the home refuses it, and node 3 learns so
    // when it next names its consumers to the home: the server cancels the consumer, and the
    // client's consumer ends.
    let remote = connect(nodes[2].amqp).await.create_channel().await.unwrap();
    let mut consumer = remote
        .basic_consume("solo".into(), "refused".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(120), consumer.next()).await;
    assert!(matches!(ended, Ok(None)), "the refused consumer was not cancelled: {ended:?}");
}
