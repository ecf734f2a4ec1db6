//! Quorum queues across three `wharf` processes (issue #19): a queue declared with
//! `x-queue-type: quorum` on one node is replicated to all three; a publisher with confirms on
//! one node and consumers on the others see every message once, in order; when the queue's
//! leader is killed, the others elect a new one, publishes are confirmed again, the consumers go
//! on, and what the killed node's consumer held comes back redelivered once it restarts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{call, connect, eventually, next, start_node};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};

async fn declare_quorum(channel: &Channel, name: &str) {
    declare_quorum_with(channel, name, &[]).await;
}

/// Publishes `bodies` to `queue` through the default exchange and waits for each confirm.
async fn publish_confirmed(channel: &Channel, queue: &str, bodies: impl IntoIterator<Item = String>) {
    for body in bodies {
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "{body} was not confirmed");
    }
}

/// The queue's group as node `url` sees it.
async fn queue_group(url: &str, name: &str) -> Option<serde_json::Value> {
    let (status, body) = call(url, "GET", "/api/cluster/queues", None).await;
    assert_eq!(status, 200, "{body}");
    body.as_array().unwrap().iter().find(|queue| queue["name"] == name).cloned()
}

/// Waits until every node of `urls` has the queue's group and names the same leader.
async fn agreed_queue_leader(urls: &[String], name: &str) -> u64 {
    let mut leader = 0;
    for _ in 0..2 {
        for url in urls {
            eventually(&format!("{url} knows the leader of {name}"), || async move {
                queue_group(url, name).await.is_some_and(|group| group["leader"].as_u64().is_some())
            })
            .await;
        }
        let first = queue_group(&urls[0], name).await.unwrap()["leader"].as_u64().unwrap();
        let mut all = true;
        for url in urls {
            all &= queue_group(url, name).await.unwrap()["leader"].as_u64() == Some(first);
        }
        if all {
            leader = first;
            break;
        }
    }
    assert_ne!(leader, 0, "the nodes did not agree on the queue's leader");
    leader
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_serves_every_node_and_survives_its_leader() {
    let temp = tempfile::tempdir().unwrap();
    let (cluster, mut nodes) = common::three_nodes(temp.path(), &[]).await;
    let urls: Vec<String> = nodes.iter().map(|node| node.http.clone()).collect();

    let declaring = connect(nodes[0].amqp).await;
    let channel = declaring.create_channel().await.unwrap();
    declare_quorum(&channel, "orders").await;
    // Declared again on another node: the same queue.
    let again = connect(nodes[1].amqp).await;
    declare_quorum(&again.create_channel().await.unwrap(), "orders").await;
    let leader = agreed_queue_leader(&urls, "orders").await;
    let others: Vec<usize> = (0..3).filter(|index| cluster[*index].0 != leader).collect();
    let leader_index = (0..3).find(|index| cluster[*index].0 == leader).unwrap();

    // A publisher on one follower, a consumer on the other: every message once, in order.
    let publisher_connection = connect(nodes[others[0]].amqp).await;
    let publisher = publisher_connection.create_channel().await.unwrap();
    publisher.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    publish_confirmed(&publisher, "orders", (0..50).map(|n| format!("first-{n}"))).await;
    let consumer_connection = connect(nodes[others[1]].amqp).await;
    let consumer_channel = consumer_connection.create_channel().await.unwrap();
    consumer_channel.basic_qos(20, BasicQosOptions::default()).await.unwrap();
    let mut consumer = consumer_channel
        .basic_consume("orders".into(), "c1".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    for n in 0..50 {
        let delivery = next(&mut consumer).await;
        assert_eq!(String::from_utf8_lossy(&delivery.data), format!("first-{n}"));
        assert!(!delivery.redelivered);
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }

    // A consumer on the leader's node takes some and holds them unacknowledged.
    let doomed_connection = connect(nodes[leader_index].amqp).await;
    let doomed_channel = doomed_connection.create_channel().await.unwrap();
    doomed_channel.basic_qos(5, BasicQosOptions::default()).await.unwrap();
    let mut doomed = doomed_channel
        .basic_consume("orders".into(), "held".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    publish_confirmed(&publisher, "orders", (0..10).map(|n| format!("second-{n}"))).await;
    let mut held = Vec::new();
    let mut seen = std::collections::BTreeMap::<String, u32>::new();
    // The 10 go round robin between c1 and the doomed consumer (prefetch 5): take what each gets.
    while held.len() + seen.len() < 10 {
        tokio::select! {
            Some(Ok(delivery)) = doomed.next() => held.push(String::from_utf8_lossy(&delivery.data).into_owned()),
            Some(Ok(delivery)) = consumer.next() => {
                *seen.entry(String::from_utf8_lossy(&delivery.data).into_owned()).or_default() += 1;
                delivery.ack(BasicAckOptions::default()).await.unwrap();
            }
        }
    }
    assert!(!held.is_empty(), "the consumer on the leader's node got nothing");

    // The leader dies; the others elect a new one and confirm publishes again.
    nodes[leader_index].child.kill().await.unwrap();
    publish_confirmed(&publisher, "orders", (0..10).map(|n| format!("third-{n}"))).await;
    let mut third = Vec::new();
    let mut redelivered = Vec::new();
    // What the killed node's consumer held comes back, redelivered, once the new leader counts
    // the node as gone (its link down for five seconds); the third batch arrives meanwhile.
    while third.len() < 10 || redelivered.len() < held.len() {
        let delivery = next(&mut consumer).await;
        let body = String::from_utf8_lossy(&delivery.data).into_owned();
        if body.starts_with("third-") {
            assert!(!delivery.redelivered);
            third.push(body);
        } else {
            assert!(held.contains(&body), "{body} was not held by the killed node's consumer");
            assert!(delivery.redelivered, "{body} came back without the redelivered flag");
            *seen.entry(body.clone()).or_default() += 1;
            redelivered.push(body);
        }
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(third, (0..10).map(|n| format!("third-{n}")).collect::<Vec<_>>());
    let survivors: Vec<String> = others.iter().map(|index| urls[*index].clone()).collect();
    let new_leader = agreed_queue_leader(&survivors, "orders").await;
    assert_ne!(new_leader, leader);
    // The killed leader's links closed and it did not answer: a survivor elected at once rather
    // than after an election timeout (cluster/failover.rs).
    let mut early = 0;
    for url in &survivors {
        early += queue_group(url, "orders").await.unwrap()["early_elections"].as_u64().unwrap();
    }
    assert!(early >= 1, "no survivor started an election when the leader's links closed");

    // Back, the killed node rebuilds its replica from the log and catches up.
    let data_dir = temp.path().join(format!("node-{leader}"));
    nodes[leader_index] = start_node(&data_dir, leader, &cluster, &[]).await;
    // Every one of the second batch reached c1 exactly once in the end.
    assert_eq!(seen.len(), 10, "{seen:?}");
    assert!(seen.values().all(|count| *count == 1), "{seen:?}");
    for node in &nodes {
        let url = &node.http;
        eventually(&format!("the queue is empty on {url}"), || async move {
            let group = queue_group(url, "orders").await;
            group.is_some_and(|group| group["ready"] == 0 && group["unacked"] == 0)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_is_bound_purged_and_deleted_on_every_node() {
    let temp = tempfile::tempdir().unwrap();
    let (_, nodes) = common::three_nodes(temp.path(), &[]).await;
    let urls: Vec<String> = nodes.iter().map(|node| node.http.clone()).collect();
    let first = connect(nodes[0].amqp).await;
    let channel = first.create_channel().await.unwrap();
    declare_quorum(&channel, "jobs").await;
    channel
        .queue_bind("jobs".into(), "amq.direct".into(), "job".into(), Default::default(), FieldTable::default())
        .await
        .unwrap();
    agreed_queue_leader(&urls, "jobs").await;
    // Published to the exchange on another node: routed by the replicated binding.
    let second = connect(nodes[1].amqp).await;
    let publisher = second.create_channel().await.unwrap();
    publisher.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for n in 0..5 {
        let confirm = publisher
            .basic_publish(
                "amq.direct".into(),
                "job".into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                format!("job-{n}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack() && confirm.take_message().is_none(), "job-{n} was not routed and confirmed");
    }
    for url in &urls {
        eventually(&format!("five ready on {url}"), || async move {
            queue_group(url, "jobs").await.is_some_and(|group| group["ready"] == 5)
        })
        .await;
    }
    // Purged on the third node: all five, on every replica.
    let third = connect(nodes[2].amqp).await;
    let purger = third.create_channel().await.unwrap();
    assert_eq!(purger.queue_purge("jobs".into(), Default::default()).await.unwrap(), 5);
    for url in &urls {
        eventually(&format!("none ready on {url}"), || async move {
            queue_group(url, "jobs").await.is_some_and(|group| group["ready"] == 0)
        })
        .await;
    }
    // Deleted if empty: gone from every node, its group stopped.
    publish_confirmed(&publisher, "jobs", ["last".to_owned()]).await;
    for url in &urls {
        eventually(&format!("one ready on {url}"), || async move {
            queue_group(url, "jobs").await.is_some_and(|group| group["ready"] == 1)
        })
        .await;
    }
    let refused = purger
        .queue_delete("jobs".into(), lapin::options::QueueDeleteOptions { if_empty: true, ..Default::default() })
        .await;
    assert!(format!("{:?}", refused.unwrap_err()).contains("PRECONDITION_FAILED"));
    let deleter = third.create_channel().await.unwrap();
    assert_eq!(deleter.queue_delete("jobs".into(), Default::default()).await.unwrap(), 1);
    for url in &urls {
        eventually(&format!("jobs gone from {url}"), || async move {
            queue_group(url, "jobs").await.is_none() && call(url, "GET", "/api/queues/%2F/jobs", None).await.0 == 404
        })
        .await;
    }
    // A rejected message goes to the dead-letter exchange, here into another quorum queue, with
    // RabbitMQ's `x-death` header.
    declare_quorum(&deleter, "dead").await;
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
    arguments.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString("dead".into()));
    let options = QueueDeclareOptions { durable: true, ..Default::default() };
    deleter.queue_declare("risky".into(), options, arguments).await.unwrap();
    publish_confirmed(&publisher, "risky", ["poison".to_owned()]).await;
    let reader = connect(nodes[2].amqp).await;
    let rejecting = reader.create_channel().await.unwrap();
    let mut risky = rejecting
        .basic_consume("risky".into(), "r".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let poison = next(&mut risky).await;
    poison.reject(lapin::options::BasicRejectOptions { requeue: false }).await.unwrap();
    let mut dead = rejecting
        .basic_consume("dead".into(), "d".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let dead_letter = next(&mut dead).await;
    assert_eq!(&dead_letter.data[..], b"poison");
    let headers = dead_letter.properties.headers().clone().unwrap();
    let reason = headers.inner().get("x-first-death-reason").cloned();
    assert_eq!(reason, Some(AMQPValue::LongString("rejected".into())), "{headers:?}");
    dead_letter.ack(BasicAckOptions::default()).await.unwrap();

    // A classic queue of the same name can be declared again.
    let options = QueueDeclareOptions { durable: true, ..Default::default() };
    deleter.queue_declare("jobs".into(), options, FieldTable::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_expires_messages_and_dead_letters_past_the_delivery_limit() {
    let temp = tempfile::tempdir().unwrap();
    let (_, nodes) = common::three_nodes(temp.path(), &[]).await;
    let urls: Vec<String> = nodes.iter().map(|node| node.http.clone()).collect();
    let first = connect(nodes[0].amqp).await;
    let channel = first.create_channel().await.unwrap();
    declare_quorum(&channel, "expired").await;
    let quorum_with = |pairs: &[(&str, AMQPValue)]| {
        let mut arguments = FieldTable::default();
        arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        for (key, value) in pairs {
            arguments.insert((*key).into(), value.clone());
        }
        arguments
    };
    let options = QueueDeclareOptions { durable: true, ..Default::default() };
    // A queue TTL, dead-lettered into "expired".
    let arguments = quorum_with(&[
        ("x-message-ttl", AMQPValue::LongUInt(50)),
        ("x-dead-letter-exchange", AMQPValue::LongString("".into())),
        ("x-dead-letter-routing-key", AMQPValue::LongString("expired".into())),
    ]);
    channel.queue_declare("short".into(), options, arguments).await.unwrap();
    // No TTL of its own, but a message's `expiration`; and a delivery limit of 1.
    let arguments = quorum_with(&[
        ("x-delivery-limit", AMQPValue::LongUInt(1)),
        ("x-dead-letter-exchange", AMQPValue::LongString("".into())),
        ("x-dead-letter-routing-key", AMQPValue::LongString("expired".into())),
    ]);
    channel.queue_declare("limited".into(), options, arguments).await.unwrap();
    for queue in ["expired", "short", "limited"] {
        agreed_queue_leader(&urls, queue).await;
    }
    // An argument a quorum queue does not carry out is refused, as RabbitMQ refuses it, rather
    // than taken and ignored.
    let refused = channel
        .queue_declare("priority".into(), options, quorum_with(&[("x-max-priority", AMQPValue::LongUInt(5))]))
        .await
        .unwrap_err();
    let text = format!("{refused:?}");
    assert!(text.contains("PRECONDITION_FAILED") && text.contains("x-max-priority"), "{text}");
    let channel = first.create_channel().await.unwrap();
    assert!(channel.queue_declare("priority".into(), options, quorum_with(&[])).await.is_ok());

    // Published on another node, with nobody consuming: expired, dead-lettered.
    let second = connect(nodes[1].amqp).await;
    let publisher = second.create_channel().await.unwrap();
    publisher.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    publish_confirmed(&publisher, "short", ["by the queue's ttl".to_owned()]).await;
    let by_expiration = BasicProperties::default().with_delivery_mode(2).with_expiration("30".into());
    let confirm = publisher
        .basic_publish("".into(), "limited".into(), BasicPublishOptions::default(), b"by its expiration", by_expiration)
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    let third = connect(nodes[2].amqp).await;
    let reader = third.create_channel().await.unwrap();
    let mut dead = reader
        .basic_consume("expired".into(), "dead".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let mut reasons = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let delivery = next(&mut dead).await;
        let headers = delivery.properties.headers().clone().unwrap();
        let reason = headers.inner().get("x-first-death-reason").cloned();
        reasons.insert(String::from_utf8_lossy(&delivery.data).into_owned(), reason);
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    let expired = Some(AMQPValue::LongString("expired".into()));
    assert_eq!(reasons.get("by the queue's ttl"), Some(&expired), "{reasons:?}");
    assert_eq!(reasons.get("by its expiration"), Some(&expired), "{reasons:?}");
    for url in &urls {
        eventually(&format!("nothing left in short and limited on {url}"), || async move {
            let short = queue_group(url, "short").await.unwrap();
            let limited = queue_group(url, "limited").await.unwrap();
            short["ready"] == 0 && limited["ready"] == 0
        })
        .await;
    }

    // Past the delivery limit (1: a second return is one too many), dead-lettered with its reason.
    publish_confirmed(&publisher, "limited", ["poison".to_owned()]).await;
    let rejecting = third.create_channel().await.unwrap();
    let mut limited = rejecting
        .basic_consume("limited".into(), "r".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    for attempt in 0..2 {
        let delivery = next(&mut limited).await;
        assert_eq!(&delivery.data[..], b"poison");
        assert_eq!(delivery.redelivered, attempt > 0);
        delivery.nack(lapin::options::BasicNackOptions { requeue: true, ..Default::default() }).await.unwrap();
    }
    let delivery = next(&mut dead).await;
    assert_eq!(&delivery.data[..], b"poison");
    let headers = delivery.properties.headers().clone().unwrap();
    let reason = headers.inner().get("x-first-death-reason").cloned();
    assert_eq!(reason, Some(AMQPValue::LongString("delivery_limit".into())), "{headers:?}");
    delivery.ack(BasicAckOptions::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_drops_a_duplicate_published_on_any_node() {
    let temp = tempfile::tempdir().unwrap();
    let (_, nodes) = common::three_nodes(temp.path(), &[]).await;
    let urls: Vec<String> = nodes.iter().map(|node| node.http.clone()).collect();
    let first = connect(nodes[0].amqp).await;
    let channel = first.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    arguments.insert("x-deduplication".into(), AMQPValue::Boolean(true));
    let options = QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare("payments".into(), options, arguments).await.unwrap();
    agreed_queue_leader(&urls, "payments").await;

    // The same message id published through every node (a publisher retrying after a failover,
    // say): each publish is confirmed, one copy is kept; another id is another message.
    for (index, (node, id)) in [(0, "order-1"), (1, "order-1"), (2, "order-1"), (1, "order-2")].into_iter().enumerate()
    {
        let connection = connect(nodes[node].amqp).await;
        let publisher = connection.create_channel().await.unwrap();
        publisher.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        let properties = BasicProperties::default().with_delivery_mode(2).with_message_id(id.into());
        let body = format!("{id} try {index}");
        let confirm = publisher
            .basic_publish("".into(), "payments".into(), BasicPublishOptions::default(), body.as_bytes(), properties)
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "{body} was not confirmed");
    }
    for url in &urls {
        eventually(&format!("two ready on {url}"), || async move {
            queue_group(url, "payments").await.is_some_and(|group| group["ready"] == 2)
        })
        .await;
    }
    let reader = connect(nodes[2].amqp).await;
    let consuming = reader.create_channel().await.unwrap();
    let mut consumer = consuming
        .basic_consume("payments".into(), "c".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    for expected in ["order-1 try 0", "order-2 try 3"] {
        let delivery = next(&mut consumer).await;
        assert_eq!(String::from_utf8_lossy(&delivery.data), expected);
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_get_takes_from_a_quorum_queue_on_any_node() {
    let temp = tempfile::tempdir().unwrap();
    let (_, nodes) = common::three_nodes(temp.path(), &[]).await;
    let urls: Vec<String> = nodes.iter().map(|node| node.http.clone()).collect();
    let first = connect(nodes[0].amqp).await;
    let channel = first.create_channel().await.unwrap();
    declare_quorum(&channel, "polled").await;
    agreed_queue_leader(&urls, "polled").await;
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    publish_confirmed(&channel, "polled", ["one".to_owned(), "two".to_owned()]).await;

    let third = connect(nodes[2].amqp).await;
    let getter = third.create_channel().await.unwrap();
    let got = getter.basic_get("polled".into(), Default::default()).await.unwrap().expect("a message");
    assert_eq!((&got.delivery.data[..], got.delivery.redelivered, got.message_count), (&b"one"[..], false, 1));
    // Nacked with requeue: back first, redelivered.
    got.delivery.nack(lapin::options::BasicNackOptions { requeue: true, ..Default::default() }).await.unwrap();
    let again = getter.basic_get("polled".into(), Default::default()).await.unwrap().expect("the message again");
    assert_eq!((&again.delivery.data[..], again.delivery.redelivered), (&b"one"[..], true));
    again.delivery.ack(BasicAckOptions::default()).await.unwrap();
    // Held by a get whose channel closes: back to the queue.
    let held = getter.basic_get("polled".into(), Default::default()).await.unwrap().expect("the second");
    assert_eq!(&held.delivery.data[..], b"two");
    getter.close(200, "done".into()).await.unwrap();
    let second = connect(nodes[1].amqp).await;
    let other = second.create_channel().await.unwrap();
    let options = lapin::options::BasicGetOptions { no_ack: true };
    let back = other.basic_get("polled".into(), options).await.unwrap().expect("the second, back");
    assert_eq!((&back.delivery.data[..], back.delivery.redelivered, back.message_count), (&b"two"[..], true, 0));
    assert!(other.basic_get("polled".into(), options).await.unwrap().is_none(), "get-empty");
    for url in &urls {
        eventually(&format!("nothing left on {url}"), || async move {
            queue_group(url, "polled").await.is_some_and(|group| group["ready"] == 0 && group["unacked"] == 0)
        })
        .await;
    }
}

/// A consumer cancelled and its channel closed before its checkout reached its node: the group
/// had given it messages its channel never saw, and the close proposed no `Down` (the channel no
/// longer had the consumer, nor any of its deliveries). Those messages must come back to the
/// queue, not stay held by a consumer nobody serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_cancelled_and_closed_at_once_holds_nothing() {
    let temp = tempfile::tempdir().unwrap();
    let (_, nodes) = common::three_nodes(temp.path(), &[]).await;
    let urls: Vec<String> = nodes.iter().map(|node| node.http.clone()).collect();
    let first = connect(nodes[0].amqp).await;
    let channel = first.create_channel().await.unwrap();
    declare_quorum(&channel, "abandoned").await;
    agreed_queue_leader(&urls, "abandoned").await;
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let total = 200;
    publish_confirmed(&channel, "abandoned", (0..total).map(|number| format!("m{number}"))).await;

    let third = connect(nodes[2].amqp).await;
    for round in 0..10 {
        let fleeting = third.create_channel().await.unwrap();
        fleeting.basic_qos(20, BasicQosOptions::default()).await.unwrap();
        let tag = format!("fleeting-{round}");
        let _holder = fleeting
            .basic_consume(
                "abandoned".into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        fleeting.basic_cancel(tag.as_str().into(), Default::default()).await.unwrap();
        fleeting.close(200, "gone".into()).await.unwrap();
    }

    let second = connect(nodes[1].amqp).await;
    let drain = second.create_channel().await.unwrap();
    let mut consumer = drain
        .basic_consume("abandoned".into(), "drain".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < total {
        let delivery = next(&mut consumer).await;
        seen.insert(String::from_utf8(delivery.data.clone()).unwrap());
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    for url in &urls {
        eventually(&format!("nothing held on {url}"), || async move {
            queue_group(url, "abandoned")
                .await
                .is_some_and(|group| group["ready"] == 0 && group["unacked"] == 0 && group["consumers"] == 1)
        })
        .await;
    }
}

/// An admin moves a quorum queue's leader to another replica, through the API and the CLI,
/// while a publisher with confirms and a consumer go on: every node then names the new leader,
/// and the consumer gets every message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_moves_a_quorum_queues_leader_while_it_serves() {
    let temp = tempfile::tempdir().unwrap();
    let (_, nodes) = common::three_nodes(temp.path(), &[]).await;
    let urls: Vec<String> = nodes.iter().map(|node| node.http.clone()).collect();
    let first = connect(nodes[0].amqp).await;
    let channel = first.create_channel().await.unwrap();
    declare_quorum(&channel, "moving").await;
    let leader = agreed_queue_leader(&urls, "moving").await;

    let second = connect(nodes[1].amqp).await;
    let consuming = second.create_channel().await.unwrap();
    let mut consumer = consuming
        .basic_consume("moving".into(), "stays".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let third = connect(nodes[2].amqp).await;
    let publishing = third.create_channel().await.unwrap();
    publishing.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let total = 300;
    let publisher =
        tokio::spawn(
            async move { publish_confirmed(&publishing, "moving", (0..total).map(|n| format!("m{n}"))).await },
        );

    // Through the API, to the next node round; and through the CLI, on to the one after.
    let target = leader % 3 + 1;
    let (status, body) =
        call(&urls[0], "POST", "/api/queues/quorum/%2F/moving/leader", Some(serde_json::json!({"node": target}))).await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(agreed_queue_leader(&urls, "moving").await, target);
    let last = target % 3 + 1;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["admin", "--url", &urls[1], "replica", "leader", "moving", &last.to_string()])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("now the leader"), "{stdout}");
    assert_eq!(agreed_queue_leader(&urls, "moving").await, last);
    // Asked of the leader it names already: done, nothing moves.
    let (status, body) =
        call(&urls[2], "POST", "/api/queues/quorum/%2F/moving/leader", Some(serde_json::json!({"node": last}))).await;
    assert_eq!(status, 204, "{body}");

    publisher.await.unwrap();
    for number in 0..total {
        let delivery = next(&mut consumer).await;
        assert_eq!(String::from_utf8_lossy(&delivery.data), format!("m{number}"));
        assert!(!delivery.redelivered, "m{number} was redelivered");
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }

    // Bad requests are named.
    let (status, body) =
        call(&urls[0], "POST", "/api/queues/quorum/%2F/moving/leader", Some(serde_json::json!({"node": 9}))).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("holds no replica"), "{body}");
    let (status, body) =
        call(&urls[0], "POST", "/api/queues/quorum/%2F/nowhere/leader", Some(serde_json::json!({"node": 1}))).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) =
        call(&urls[0], "POST", "/api/queues/quorum/%2F/moving/leader", Some(serde_json::json!({}))).await;
    assert_eq!(status, 400, "{body}");
}

async fn declare_quorum_with(channel: &Channel, name: &str, extra: &[(&str, AMQPValue)]) {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    for (key, value) in extra {
        arguments.insert((*key).into(), value.clone());
    }
    let options = QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare(name.into(), options, arguments).await.unwrap();
}

/// Leases, retry backoff, single active consumer and per-key ordering on a quorum queue,
/// carried out by its group whichever node the consumer is on: a delivery left unsettled past
/// its lease comes back (after the backoff) marked redelivered, as does one nacked with requeue;
/// with single active consumer the first consumer attached gets everything until it goes; with
/// `x-ordered-by` one message of a key is out at a time, in publish order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_leases_backs_off_orders_by_key_and_serves_one_active_consumer() {
    let temp = tempfile::tempdir().unwrap();
    let (_, nodes) = common::three_nodes(temp.path(), &[]).await;
    let urls: Vec<String> = nodes.iter().map(|node| node.http.clone()).collect();
    let first = connect(nodes[0].amqp).await;
    let channel = first.create_channel().await.unwrap();
    let backoff = AMQPValue::FieldArray(vec![AMQPValue::LongLongInt(100), AMQPValue::LongLongInt(200)].into());
    // A lease long enough for each ack below to come well within it on a loaded machine.
    let lease = ("x-consumer-timeout", AMQPValue::LongLongInt(2_000));
    declare_quorum_with(&channel, "timed", &[lease, ("x-retry-backoff", backoff)]).await;
    agreed_queue_leader(&urls, "timed").await;
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    publish_confirmed(&channel, "timed", ["leased".to_owned()]).await;

    let second = connect(nodes[1].amqp).await;
    let consuming = second.create_channel().await.unwrap();
    let mut consumer = consuming
        .basic_consume("timed".into(), "slow".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let held = next(&mut consumer).await;
    assert_eq!((&held.data[..], held.redelivered), (&b"leased"[..], false));
    // Not settled: the lease runs out, the backoff passes, and it comes again, flagged.
    let again = next(&mut consumer).await;
    assert_eq!((&again.data[..], again.redelivered), (&b"leased"[..], true));
    // Nacked with requeue: back after the backoff's second step.
    again.nack(lapin::options::BasicNackOptions { requeue: true, ..Default::default() }).await.unwrap();
    let third_time = next(&mut consumer).await;
    assert_eq!((&third_time.data[..], third_time.redelivered), (&b"leased"[..], true));
    third_time.ack(BasicAckOptions::default()).await.unwrap();
    drop(held);
    for url in &urls {
        eventually(&format!("timed settled on {url}"), || async move {
            queue_group(url, "timed").await.is_some_and(|group| group["ready"] == 0 && group["unacked"] == 0)
        })
        .await;
    }

    declare_quorum_with(&channel, "solo", &[("x-single-active-consumer", AMQPValue::Boolean(true))]).await;
    agreed_queue_leader(&urls, "solo").await;
    let active_channel = second.create_channel().await.unwrap();
    let mut active = active_channel
        .basic_consume("solo".into(), "active".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    for url in &urls {
        eventually(&format!("the first consumer attached on {url}"), || async move {
            queue_group(url, "solo").await.is_some_and(|group| group["consumers"] == 1)
        })
        .await;
    }
    let third = connect(nodes[2].amqp).await;
    let standby_channel = third.create_channel().await.unwrap();
    let mut standby = standby_channel
        .basic_consume("solo".into(), "standby".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    for url in &urls {
        eventually(&format!("both consumers attached on {url}"), || async move {
            queue_group(url, "solo").await.is_some_and(|group| group["consumers"] == 2)
        })
        .await;
    }
    publish_confirmed(&channel, "solo", (0..10).map(|n| format!("s{n}"))).await;
    for number in 0..10 {
        let delivery = next(&mut active).await;
        assert_eq!(String::from_utf8_lossy(&delivery.data), format!("s{number}"));
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    // The active consumer goes: the standby takes over, and had been given nothing before.
    active_channel.close(200, "done".into()).await.unwrap();
    publish_confirmed(&channel, "solo", ["after".to_owned()]).await;
    let delivery = next(&mut standby).await;
    assert_eq!(&delivery.data[..], b"after");

    // Per-key ordering: of each customer's messages one is out at a time, in publish order.
    declare_quorum_with(&channel, "ordered", &[("x-ordered-by", AMQPValue::LongString("customer".into()))]).await;
    agreed_queue_leader(&urls, "ordered").await;
    for (body, customer) in [("c1-a", "c1"), ("c1-b", "c1"), ("c2-a", "c2")] {
        let mut headers = FieldTable::default();
        headers.insert("customer".into(), AMQPValue::LongString(customer.into()));
        let properties = BasicProperties::default().with_delivery_mode(2).with_headers(headers);
        let confirm = channel
            .basic_publish("".into(), "ordered".into(), BasicPublishOptions::default(), body.as_bytes(), properties)
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }
    let ordered_channel = third.create_channel().await.unwrap();
    ordered_channel.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let mut ordered = ordered_channel
        .basic_consume("ordered".into(), "ordered".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    // c1-b waits behind c1-a, so c2-a comes second.
    let first_c1 = next(&mut ordered).await;
    assert_eq!(&first_c1.data[..], b"c1-a");
    let c2 = next(&mut ordered).await;
    assert_eq!(&c2.data[..], b"c2-a");
    // Returned, c1-a is still its key's first: it comes again before c1-b.
    first_c1.nack(lapin::options::BasicNackOptions { requeue: true, ..Default::default() }).await.unwrap();
    let again = next(&mut ordered).await;
    assert_eq!((&again.data[..], again.redelivered), (&b"c1-a"[..], true));
    again.ack(BasicAckOptions::default()).await.unwrap();
    let last = next(&mut ordered).await;
    assert_eq!(&last.data[..], b"c1-b");
}
