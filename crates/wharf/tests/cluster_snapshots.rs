//! Snapshots of quorum queues on a cluster of three `wharf` processes (issue #19): each member
//! snapshots its replica every `--quorum-snapshot-entries` entries and purges its log before the
//! snapshot; a member down while the others went far past its log catches up from the leader's
//! snapshot; a member restarted starts from its own snapshot and the log after it; either way
//! every replica holds the same messages and a consumer gets each one once, in order. A member
//! whose consumer was given messages in entries the snapshot it installs skips still delivers
//! them all.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Node, call, connect, eventually, next, start_node};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use serde_json::Value;

/// Publishes `bodies` to `queue` one at a time (each its own Raft entry), each confirmed before
/// the next.
async fn publish_confirmed(channel: &Channel, queue: &str, bodies: impl IntoIterator<Item = String>) {
    for body in bodies {
        let properties = BasicProperties::default().with_delivery_mode(2);
        let confirm = channel
            .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body.as_bytes(), properties)
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "{body} was not confirmed");
    }
}

/// The queue's group as node `url` sees it.
async fn group(url: &str) -> Option<Value> {
    group_of(url, "snap").await
}

/// Queue `queue`'s group as node `url` sees it.
async fn group_of(url: &str, queue: &str) -> Option<Value> {
    let (status, body) = call(url, "GET", "/api/cluster/queues", None).await;
    assert_eq!(status, 200, "{body}");
    body.as_array().unwrap().iter().find(|found| found["name"] == queue).cloned()
}

/// Waits until node `url`'s replica holds `ready` ready messages and has applied at least up to
/// `index`.
async fn replica_at(url: &str, ready: u64, index: u64) {
    eventually(&format!("{url} holds {ready} ready, applied to {index}"), || async move {
        group(url).await.is_some_and(|group| {
            group["ready"] == ready && group["applied_index"].as_u64().is_some_and(|applied| applied >= index)
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_behind_catch_up_from_snapshots_and_restarts_start_from_them() {
    let temp = tempfile::tempdir().unwrap();
    let extra: Vec<std::ffi::OsString> = vec!["--quorum-snapshot-entries".into(), "8".into()];
    let data_dir = |id: u64| temp.path().join(format!("node-{id}"));
    let (cluster, started) = common::three_nodes(temp.path(), &extra).await;
    let mut nodes: Vec<Option<Node>> = started.into_iter().map(Some).collect();
    let url = |nodes: &[Option<Node>], index: usize| nodes[index].as_ref().unwrap().http.clone();

    let declaring = connect(nodes[0].as_ref().unwrap().amqp).await;
    let channel = declaring.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    let options = QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare("snap".into(), options, arguments).await.unwrap();
    let first = url(&nodes, 0);
    eventually("the queue's group has a leader", || {
        let first = first.clone();
        async move { group(&first).await.is_some_and(|group| group["leader"].as_u64().is_some()) }
    })
    .await;
    // Every member has the queue before one goes down: a member that learnt of it only from
    // the metadata leader killed next would meanwhile take publishes for an unknown queue.
    for index in 0..3 {
        let member = url(&nodes, index);
        eventually(&format!("{member} has the queue's group"), || {
            let member = member.clone();
            async move { group(&member).await.is_some_and(|group| group["leader"].as_u64().is_some()) }
        })
        .await;
    }
    let leader = group(&first).await.unwrap()["leader"].as_u64().unwrap() as usize - 1;
    let behind = (leader + 1) % 3;
    let publishing = (leader + 2) % 3;

    // A follower goes down; the others go on for far more entries than it has.
    nodes[behind].take().unwrap().child.kill().await.unwrap();
    let publisher_connection = connect(nodes[publishing].as_ref().unwrap().amqp).await;
    let publisher = publisher_connection.create_channel().await.unwrap();
    publisher.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    publish_confirmed(&publisher, "snap", (0..200).map(|n| format!("m-{n}"))).await;
    // Some are consumed meanwhile, so the snapshot holds settled and ready messages alike.
    let reader_connection = connect(nodes[publishing].as_ref().unwrap().amqp).await;
    let reader = reader_connection.create_channel().await.unwrap();
    reader.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let mut consumer = reader
        .basic_consume("snap".into(), "early".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    for n in 0..50 {
        let delivery = next(&mut consumer).await;
        assert_eq!(String::from_utf8_lossy(&delivery.data), format!("m-{n}"));
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    reader.close(200, "done".into()).await.unwrap();
    let leader_url = url(&nodes, leader);
    replica_at(&leader_url, 150, 0).await;
    // Snapshots are built, and the log purged, in the background.
    eventually("the leader purges its log after a snapshot", || {
        let leader_url = leader_url.clone();
        async move { group(&leader_url).await.is_some_and(|group| group["purged_index"].as_u64().is_some()) }
    })
    .await;
    let leader_group = group(&leader_url).await.unwrap();
    let purged = leader_group["purged_index"].as_u64().unwrap();
    // Far past anything the follower had: it went down before the first publish.
    assert!(purged >= 100, "{leader_group}");
    assert!(leader_group["snapshot_index"].as_u64().unwrap() >= purged, "{leader_group}");
    let last_index = leader_group["last_log_index"].as_u64().unwrap();

    // Back, the follower needs entries the others purged: it installs the leader's snapshot.
    nodes[behind] = Some(start_node(&data_dir(behind as u64 + 1), behind as u64 + 1, &cluster, &extra).await);
    let behind_url = url(&nodes, behind);
    replica_at(&behind_url, 150, last_index).await;
    let behind_group = group(&behind_url).await.unwrap();
    assert!(behind_group["snapshot_index"].as_u64().is_some(), "{behind_group}");

    // The leader restarts too: its replica comes back from its own snapshot and log.
    nodes[leader].take().unwrap().child.kill().await.unwrap();
    nodes[leader] = Some(start_node(&data_dir(leader as u64 + 1), leader as u64 + 1, &cluster, &extra).await);
    let restarted_url = url(&nodes, leader);
    replica_at(&restarted_url, 150, last_index).await;

    // A consumer on the node that was behind gets the other 150, once each, in order.
    let last_connection = connect(nodes[behind].as_ref().unwrap().amqp).await;
    let last = last_connection.create_channel().await.unwrap();
    last.basic_qos(20, BasicQosOptions::default()).await.unwrap();
    let mut consumer = last
        .basic_consume("snap".into(), "late".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    for n in 50..200 {
        let delivery = next(&mut consumer).await;
        assert_eq!(String::from_utf8_lossy(&delivery.data), format!("m-{n}"));
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    for node in nodes.iter().flatten() {
        let url = node.http.clone();
        eventually(&format!("the queue is empty on {url}"), || {
            let url = url.clone();
            async move { group(&url).await.is_some_and(|group| group["ready"] == 0 && group["unacked"] == 0) }
        })
        .await;
    }
}

/// Sends `signal` (`STOP`, `CONT`) to a node's process.
fn signal(node: &Node, signal: &str) {
    let pid = node.child.id().unwrap().to_string();
    let status = std::process::Command::new("kill").args([&format!("-{signal}"), &pid]).status().unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// A follower with a consumer is stopped (SIGSTOP: its links stay open, so nobody counts it
/// down) while the leader gives that consumer messages and goes far past the follower's log.
/// Back, the follower installs the leader's snapshot, which says its consumer holds messages
/// it never delivered (they were decided in the entries the snapshot skips): they go back and
/// come again, and the consumer gets every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_on_a_member_that_installs_a_snapshot_gets_what_it_was_given_meanwhile() {
    let temp = tempfile::tempdir().unwrap();
    let extra: Vec<std::ffi::OsString> = vec!["--quorum-snapshot-entries".into(), "8".into()];
    let (_cluster, nodes) = common::three_nodes(temp.path(), &extra).await;

    let declaring = connect(nodes[0].amqp).await;
    let channel = declaring.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    let options = QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare("held".into(), options, arguments).await.unwrap();
    let first = nodes[0].http.clone();
    eventually("the queue's group has a leader", || {
        let first = first.clone();
        async move { group_of(&first, "held").await.is_some_and(|group| group["leader"].as_u64().is_some()) }
    })
    .await;
    let leader = group_of(&first, "held").await.unwrap()["leader"].as_u64().unwrap() as usize - 1;
    let follower = (leader + 1) % 3;
    let leader_url = nodes[leader].http.clone();
    let follower_url = nodes[follower].http.clone();
    eventually("the follower has the queue's group", || {
        let follower_url = follower_url.clone();
        async move { group_of(&follower_url, "held").await.is_some_and(|group| group["leader"].as_u64().is_some()) }
    })
    .await;

    // The only consumer, on the follower, takes ten at a time.
    let consuming_connection = connect(nodes[follower].amqp).await;
    let consuming = consuming_connection.create_channel().await.unwrap();
    consuming.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let mut consumer = consuming
        .basic_consume("held".into(), "far".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    eventually("the leader records the consumer", || {
        let leader_url = leader_url.clone();
        async move { group_of(&leader_url, "held").await.is_some_and(|group| group["consumers"] == 1) }
    })
    .await;

    let follower_last = group_of(&follower_url, "held").await.unwrap()["last_log_index"].as_u64().unwrap();
    signal(&nodes[follower], "STOP");
    let publisher_connection = connect(nodes[leader].amqp).await;
    let publisher = publisher_connection.create_channel().await.unwrap();
    publisher.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    publish_confirmed(&publisher, "held", (0..100).map(|n| format!("h-{n}"))).await;
    // The leader gave the follower's consumer its ten, and purged its log past the follower's
    // last entry: the follower can only catch up from the leader's snapshot.
    eventually("the leader checks out ten to the stopped consumer and purges its log", || {
        let leader_url = leader_url.clone();
        async move {
            group_of(&leader_url, "held").await.is_some_and(|group| {
                group["unacked"] == 10 && group["purged_index"].as_u64().is_some_and(|purged| purged > follower_last)
            })
        }
    })
    .await;
    signal(&nodes[follower], "CONT");

    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 100 {
        let delivery = next(&mut consumer).await;
        seen.insert(String::from_utf8_lossy(&delivery.data).into_owned());
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(seen, (0..100).map(|n| format!("h-{n}")).collect());
    for node in &nodes {
        let url = node.http.clone();
        eventually(&format!("the queue is empty on {url}"), || {
            let url = url.clone();
            async move { group_of(&url, "held").await.is_some_and(|group| group["ready"] == 0 && group["unacked"] == 0) }
        })
        .await;
    }
}
