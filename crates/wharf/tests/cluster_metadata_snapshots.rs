//! Snapshots of the metadata group on three `wharf` processes (issue #19): every
//! `--metadata-snapshot-entries` definition changes each node snapshots the replicated
//! definitions and purges its log before the snapshot; a node down while the others went past
//! its log installs the leader's snapshot when it is back: it then has every definition made
//! meanwhile (vhosts, users, permissions, topic permissions, policies, exchanges, quorum queues,
//! bindings), none of those deleted meanwhile, and the changed ones as they are now; its quorum
//! queue replicas work; restarted, it starts from the snapshot it saved. A node that joins the
//! cluster afterwards gets the definitions from a snapshot too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Node, call, eventually, free_port, next, start_node};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeBindOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Value, json};

/// The metadata group as node `url` sees it.
async fn metadata(url: &str) -> Value {
    let (status, body) = call(url, "GET", "/api/cluster/metadata", None).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Waits until node `url` applied the metadata group's log up to `index`.
async fn applied_up_to(url: &str, index: u64, what: &str) {
    eventually(what, || async move {
        metadata(url).await["applied_index"].as_u64().is_some_and(|applied| applied >= index)
    })
    .await;
}

async fn status_of(url: &str, path: &str) -> u16 {
    call(url, "GET", path, None).await.0
}

/// Asks `url` for a change and checks it was made.
async fn change(url: &str, method: &str, path: &str, body: Option<Value>) {
    let (status, answer) = call(url, method, path, body).await;
    assert!(matches!(status, 201 | 204), "{method} {path}: {status} {answer}");
}

async fn amqp(node: &Node, user: &str, password: &str, vhost: &str) -> Result<Connection, lapin::Error> {
    let uri = format!("amqp://{user}:{password}@{}/{vhost}", node.amqp);
    Connection::connect(&uri, ConnectionProperties::default()).await
}

fn quorum() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    arguments
}

/// Quorum queue `queue` of `vhost` as node `url` sees it.
async fn quorum_queue(url: &str, vhost: &str, queue: &str) -> Option<Value> {
    let (status, body) = call(url, "GET", "/api/cluster/queues", None).await;
    assert_eq!(status, 200, "{body}");
    body.as_array().unwrap().iter().find(|found| found["name"] == queue && found["vhost"] == vhost).cloned()
}

/// The count of bindings `path` lists on `url`.
async fn bindings(url: &str, path: &str) -> usize {
    let (status, body) = call(url, "GET", path, None).await;
    assert_eq!(status, 200, "{path}: {body}");
    body.as_array().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_the_purge_installs_the_definitions_and_starts_from_them() {
    let temp = tempfile::tempdir().unwrap();
    let extra: Vec<std::ffi::OsString> = vec!["--metadata-snapshot-entries".into(), "8".into()];
    let (cluster, mut nodes) = common::three_nodes(temp.path(), &extra).await;
    let urls: Vec<String> = nodes.iter().map(|node| node.http.clone()).collect();
    eventually("the nodes agree on a metadata leader", || {
        let urls = urls.clone();
        async move {
            let mut leaders = Vec::new();
            for url in &urls {
                leaders.push(metadata(url).await["leader"].as_u64());
            }
            leaders[0].is_some() && leaders.iter().all(|leader| *leader == leaders[0])
        }
    })
    .await;
    let leader = metadata(&urls[0]).await["leader"].as_u64().unwrap() as usize - 1;
    let (down, up) = ((leader + 1) % 3, leader);

    // What the node that goes down will have, and what changes or goes while it is down.
    change(&urls[up], "PUT", "/api/vhosts/doomed", Some(json!({}))).await;
    change(&urls[up], "PUT", "/api/users/leaving", Some(json!({"password": "p", "tags": ""}))).await;
    change(
        &urls[up],
        "PUT",
        "/api/permissions/%2f/leaving",
        Some(json!({"configure": ".*", "write": ".*", "read": ".*"})),
    )
    .await;
    let capped = |max: u64| json!({"pattern": "^capped", "definition": {"max-length": max}, "apply-to": "queues"});
    change(&urls[up], "PUT", "/api/policies/%2f/capped", Some(capped(10))).await;
    let connection = amqp(&nodes[up], "guest", "guest", "%2f").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    channel.exchange_declare("old.x".into(), ExchangeKind::Fanout, durable, FieldTable::default()).await.unwrap();
    let durable_queue = QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare("old.q".into(), durable_queue, quorum()).await.unwrap();
    channel
        .queue_bind("old.q".into(), "old.x".into(), "".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let down_url = urls[down].clone();
    eventually("the node about to go down has the old definitions", || {
        let down_url = down_url.clone();
        async move {
            status_of(&down_url, "/api/exchanges/%2f/old.x").await == 200
                && quorum_queue(&down_url, "/", "old.q").await.is_some()
                && bindings(&down_url, "/api/bindings/%2f/e/old.x/q/old.q").await == 1
        }
    })
    .await;
    let down_last = metadata(&down_url).await["last_log_index"].as_u64().unwrap();
    nodes[down].child.kill().await.unwrap();

    // While it is down: deletions, a change, new definitions of every kind, and enough churn
    // for the others to purge their logs far past its last entry.
    change(&urls[up], "DELETE", "/api/vhosts/doomed", None).await;
    change(&urls[up], "DELETE", "/api/users/leaving", None).await;
    change(&urls[up], "PUT", "/api/policies/%2f/capped", Some(capped(20))).await;
    channel.queue_delete("old.q".into(), QueueDeleteOptions::default()).await.unwrap();
    channel.exchange_delete("old.x".into(), ExchangeDeleteOptions::default()).await.unwrap();
    let _ = connection.close(200, "done".into()).await;
    change(&urls[up], "PUT", "/api/vhosts/orders", Some(json!({}))).await;
    change(&urls[up], "PUT", "/api/users/alice", Some(json!({"password": "s3cret", "tags": "management"}))).await;
    let all = json!({"configure": ".*", "write": ".*", "read": ".*"});
    change(&urls[up], "PUT", "/api/permissions/orders/alice", Some(all.clone())).await;
    change(&urls[up], "PUT", "/api/permissions/orders/guest", Some(all)).await;
    let topic = json!({"exchange": "amq.topic", "write": "^order", "read": ".*"});
    change(&urls[up], "PUT", "/api/topic-permissions/orders/alice", Some(topic)).await;
    let connection = amqp(&nodes[up], "guest", "guest", "orders").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.exchange_declare("events".into(), ExchangeKind::Topic, durable, FieldTable::default()).await.unwrap();
    channel.exchange_declare("audit".into(), ExchangeKind::Fanout, durable, FieldTable::default()).await.unwrap();
    channel.queue_declare("orders.q".into(), durable_queue, quorum()).await.unwrap();
    channel
        .queue_bind(
            "orders.q".into(),
            "events".into(),
            "order.*".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .exchange_bind(
            "audit".into(),
            "events".into(),
            "order.#".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
    for n in 0..30 {
        change(&urls[up], "PUT", &format!("/api/vhosts/churn-{n}"), Some(json!({}))).await;
        change(&urls[up], "DELETE", &format!("/api/vhosts/churn-{n}"), None).await;
    }
    for index in [0, 1, 2].into_iter().filter(|index| *index != down) {
        let url = urls[index].clone();
        eventually(&format!("{url} purges its metadata log past the node that is down"), || {
            let url = url.clone();
            async move { metadata(&url).await["purged_index"].as_u64().is_some_and(|purged| purged > down_last) }
        })
        .await;
    }
    let last = metadata(&urls[up]).await["last_log_index"].as_u64().unwrap();

    // Back, it installs the leader's snapshot: the entries it lacks are gone from every log.
    let data_dir = temp.path().join(format!("node-{}", cluster[down].0));
    nodes[down] = start_node(&data_dir, cluster[down].0, &cluster, &extra).await;
    let down_url = nodes[down].http.clone();
    applied_up_to(&down_url, last, "the node that was down catches up").await;
    assert!(metadata(&down_url).await["snapshot_index"].as_u64().is_some_and(|index| index > down_last));
    check_definitions(&nodes, down, &urls[up]).await;

    // Restarted, it starts from the snapshot it saved, and has the same.
    nodes[down].child.kill().await.unwrap();
    nodes[down] = start_node(&data_dir, cluster[down].0, &cluster, &extra).await;
    let down_url = nodes[down].http.clone();
    applied_up_to(&down_url, last, "the restarted node applied the log again").await;
    check_definitions(&nodes, down, &urls[up]).await;

    // A fourth node joins: the log it would need is gone, so it starts from a snapshot.
    let fourth_address = free_port();
    let mut with_fourth = cluster.clone();
    with_fourth.push((4, fourth_address));
    let mut joining = extra.clone();
    joining.push("--cluster-join".into());
    nodes.push(start_node(&temp.path().join("node-4"), 4, &with_fourth, &joining).await);
    change(&urls[up], "PUT", "/api/cluster/members/4", Some(json!({"address": fourth_address.to_string()}))).await;
    let fourth_url = nodes[3].http.clone();
    applied_up_to(&fourth_url, last, "the fourth node catches up").await;
    assert!(metadata(&fourth_url).await["snapshot_index"].as_u64().is_some());
    // The quorum queue it installed a placeholder of grows a replica on it (a node with no replica
    // of a quorum queue cannot publish to it or consume from it), once it links to every member.
    for node in 1..=3u64 {
        let fourth_url = fourth_url.clone();
        eventually(&format!("the fourth node links to node {node}"), || {
            let fourth_url = fourth_url.clone();
            async move {
                let (_, members) = call(&fourth_url, "GET", "/api/cluster/members", None).await;
                members
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|member| member["node"] == node && member["outbound_connected"] == true)
            }
        })
        .await;
    }
    let add = json!({"node": 4});
    let (status, body) = call(&urls[up], "POST", "/api/queues/quorum/orders/orders.q/replicas/add", Some(add)).await;
    assert!(status < 300, "{status} {body}");
    check_definitions(&nodes, 3, &urls[up]).await;
}

/// Node `down` has what the snapshot holds and nothing deleted meanwhile; a message published
/// through it reaches the quorum queue through the bindings it installed, whose replica on it runs.
async fn check_definitions(nodes: &[Node], down: usize, up_url: &str) {
    let url = nodes[down].http.as_str();
    for path in [
        "/api/vhosts/orders",
        "/api/users/alice",
        "/api/permissions/orders/alice",
        "/api/permissions/orders/guest",
        "/api/exchanges/orders/events",
        "/api/exchanges/orders/audit",
    ] {
        assert_eq!(status_of(url, path).await, 200, "{path} on the node that was down");
    }
    for path in ["/api/vhosts/doomed", "/api/vhosts/churn-0", "/api/users/leaving", "/api/exchanges/%2f/old.x"] {
        assert_eq!(status_of(url, path).await, 404, "{path} on the node that was down");
    }
    let (_, user) = call(url, "GET", "/api/users/alice", None).await;
    let (_, user_there) = call(up_url, "GET", "/api/users/alice", None).await;
    assert_eq!(user["password_hash"], user_there["password_hash"]);
    let (_, topic) = call(url, "GET", "/api/topic-permissions/orders/alice", None).await;
    assert_eq!(topic[0]["write"], "^order", "{topic}");
    let (_, policy) = call(url, "GET", "/api/policies/%2f/capped", None).await;
    assert_eq!(policy["definition"]["max-length"], 20, "{policy}");
    assert_eq!(bindings(url, "/api/bindings/orders/e/events/q/orders.q").await, 1);
    assert_eq!(bindings(url, "/api/bindings/orders/e/events/e/audit").await, 1);
    assert!(quorum_queue(url, "/", "old.q").await.is_none());
    eventually("the node has a replica of the new quorum queue", || async move {
        quorum_queue(url, "orders", "orders.q").await.is_some_and(|group| group["leader"].as_u64().is_some())
    })
    .await;

    // As alice, whose password hash it installed: publish to the exchange, consume the queue.
    let connection = amqp(&nodes[down], "alice", "s3cret", "orders").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let properties = BasicProperties::default().with_delivery_mode(2);
    let confirm = channel
        .basic_publish("events".into(), "order.1".into(), BasicPublishOptions::default(), b"placed", properties)
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    let mut consumer = channel
        .basic_consume("orders.q".into(), "check".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let delivery = next(&mut consumer).await;
    assert_eq!(delivery.data, b"placed");
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    let _ = connection.close(200, "done".into()).await;
}
