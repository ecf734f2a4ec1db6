//! The metadata group across three `wharf` processes (issue #19): vhosts, users, permissions,
//! policies, durable exchanges and the bindings between them, changed on any node (through the
//! management API or AMQP), reach every node; a refusal is the same wherever it is asked; a node
//! that was killed catches up with what changed while it was down; a node cut off from the
//! majority refuses changes instead of making them alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Node, call, eventually, start_node};
use lapin::options::{ExchangeBindOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use serde_json::json;

/// Waits until every node of `urls` names the same leader of the metadata group; returns it.
async fn agreed_leader(urls: &[&str]) -> u64 {
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let mut seen = Vec::new();
        for url in urls {
            let (status, body) = call(url, "GET", "/api/cluster/metadata", None).await;
            assert_eq!(status, 200, "{body}");
            seen.push(body["leader"].as_u64());
        }
        if let Some(first) = seen[0]
            && seen.iter().all(|found| *found == Some(first))
        {
            return first;
        }
        assert!(std::time::Instant::now() < give_up, "the nodes never agreed on a leader: {seen:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn status_of(url: &str, path: &str) -> u16 {
    call(url, "GET", path, None).await.0
}

async fn amqp_login(node: &Node, user: &str, password: &str, vhost: &str) -> Result<Connection, lapin::Error> {
    let uri = format!("amqp://{user}:{password}@{}/{vhost}", node.amqp);
    Connection::connect(&uri, ConnectionProperties::default()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_made_on_any_node_reach_every_node_and_one_that_was_down() {
    let temp = tempfile::tempdir().unwrap();
    let (cluster, mut nodes) = common::three_nodes(temp.path(), &[]).await;
    let urls: Vec<String> = nodes.iter().map(|node| node.http.clone()).collect();
    let url_refs: Vec<&str> = urls.iter().map(String::as_str).collect();
    let leader = agreed_leader(&url_refs).await;
    let followers: Vec<usize> = (0..3).filter(|index| cluster[*index].0 != leader).collect();
    let (asked, other) = (&urls[followers[0]], followers[1]);

    // Management changes asked of a follower: forwarded to the leader, answered once applied.
    let created = [
        ("PUT", "/api/vhosts/orders", json!({})),
        ("PUT", "/api/users/alice", json!({"password": "s3cret", "tags": ""})),
        ("PUT", "/api/permissions/orders/alice", json!({"configure": ".*", "write": ".*", "read": ".*"})),
        ("PUT", "/api/permissions/orders/guest", json!({"configure": ".*", "write": ".*", "read": ".*"})),
        (
            "PUT",
            "/api/policies/orders/ttl",
            json!({"pattern": "^q", "definition": {"message-ttl": 60000}, "apply-to": "queues"}),
        ),
    ];
    for (method, path, body) in created {
        let (status, answer) = call(asked, method, path, Some(body)).await;
        assert_eq!(status, 201, "{path}: {answer}");
        // Read-your-writes on the node that was asked.
        assert_eq!(status_of(asked, path).await, 200, "{path}");
    }
    // Asked again: the leader's answer says it exists already (204, not created).
    let (status, _) = call(asked, "PUT", "/api/vhosts/orders", Some(json!({}))).await;
    assert_eq!(status, 204);

    // Over AMQP on the other follower, as the new user: durable exchanges and a binding.
    let connection = amqp_login(&nodes[other], "alice", "s3cret", "orders").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    channel.exchange_declare("events".into(), ExchangeKind::Topic, durable, FieldTable::default()).await.unwrap();
    channel.exchange_declare("audit".into(), ExchangeKind::Fanout, durable, FieldTable::default()).await.unwrap();
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
    // Refused as the leader refused it: another kind for an existing exchange is 406 on the channel.
    let refused = channel.exchange_declare("events".into(), ExchangeKind::Direct, durable, FieldTable::default()).await;
    let text = format!("{:?}", refused.unwrap_err());
    assert!(text.contains("PRECONDITION_FAILED"), "{text}");
    let _ = connection.close(200, "done".into()).await;

    // Every node has all of it, and the user logs in everywhere with the same password hash.
    let mut hashes = Vec::new();
    for (index, url) in urls.iter().enumerate() {
        for path in [
            "/api/vhosts/orders",
            "/api/permissions/orders/alice",
            "/api/policies/orders/ttl",
            "/api/exchanges/orders/events",
            "/api/exchanges/orders/audit",
        ] {
            eventually(&format!("{path} on {url}"), || async move { status_of(url, path).await == 200 }).await;
        }
        eventually(&format!("the exchange binding on {url}"), || async move {
            let (_, bindings) = call(url, "GET", "/api/bindings/orders/e/events/e/audit", None).await;
            bindings.as_array().is_some_and(|found| found.len() == 1)
        })
        .await;
        let (_, user) = call(url, "GET", "/api/users/alice", None).await;
        hashes.push(user["password_hash"].clone());
        let connection = amqp_login(&nodes[index], "alice", "s3cret", "orders").await.unwrap();
        let _ = connection.close(200, "done".into()).await;
    }
    assert!(hashes.iter().all(|hash| *hash == hashes[0] && hash.as_str().is_some_and(|hash| !hash.is_empty())));

    // A node killed while things change catches up when it is back.
    let down = followers[1];
    nodes[down].child.kill().await.unwrap();
    let up = followers[0];
    let (status, answer) = call(&urls[up], "DELETE", "/api/users/alice", None).await;
    assert_eq!(status, 204, "{answer}");
    let (status, answer) = call(&urls[up], "DELETE", "/api/exchanges/orders/audit", None).await;
    assert_eq!(status, 204, "{answer}");
    let (status, answer) = call(&urls[up], "PUT", "/api/vhosts/later", Some(json!({}))).await;
    assert_eq!(status, 201, "{answer}");
    let data_dir = temp.path().join(format!("node-{}", cluster[down].0));
    nodes[down] = start_node(&data_dir, cluster[down].0, &cluster, &[]).await;
    let back = nodes[down].http.clone();
    eventually("the restarted node has the vhost made while it was down", || {
        let back = back.clone();
        async move { status_of(&back, "/api/vhosts/later").await == 200 }
    })
    .await;
    assert_eq!(status_of(&back, "/api/users/alice").await, 404);
    assert_eq!(status_of(&back, "/api/exchanges/orders/audit").await, 404);
    assert_eq!(status_of(&back, "/api/exchanges/orders/events").await, 200);
    assert!(amqp_login(&nodes[down], "alice", "s3cret", "orders").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_majority_refuses_changes() {
    let temp = tempfile::tempdir().unwrap();
    let (_cluster, mut nodes) = common::three_nodes(temp.path(), &[]).await;
    let urls: Vec<String> = nodes.iter().map(|node| node.http.clone()).collect();
    let url_refs: Vec<&str> = urls.iter().map(String::as_str).collect();
    agreed_leader(&url_refs).await;
    for node in &mut nodes[1..] {
        node.child.kill().await.unwrap();
    }
    let (status, answer) = call(&urls[0], "PUT", "/api/vhosts/alone", Some(json!({}))).await;
    assert_eq!(status, 503, "{answer}");
    assert!(answer["reason"].as_str().unwrap().contains("majority"), "{answer}");
    assert_eq!(status_of(&urls[0], "/api/vhosts/alone").await, 404);
    // What needs no agreement still works on it: reading, and a transient exchange of its own.
    let (status, body) = call(&urls[0], "GET", "/api/vhosts", None).await;
    assert_eq!(status, 200);
    assert!(body.as_array().unwrap().iter().all(|vhost| vhost["name"] != "alone"));
    let connection = amqp_login(&nodes[0], "guest", "guest", "%2f").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let transient = ExchangeDeclareOptions::default();
    channel.exchange_declare("scratch".into(), ExchangeKind::Fanout, transient, FieldTable::default()).await.unwrap();
    let _ = connection.close(200, "done".into()).await;
}
