//! Nodes added to and removed from a running cluster (issue #19): a fourth `wharf` process
//! started with `--cluster-join` is added with `wharf admin cluster add ID=HOST:PORT` on another
//! node, gets every definition made before it joined, links with every member (none of whose
//! flags name it), and takes part in quorum queues declared after; it cannot be removed while it
//! holds a replica, and once it holds none it is removed and forgotten. Requests that cannot
//! work are refused with a message naming the problem.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{call, connect, eventually, free_port, start_node};
use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};

/// `wharf admin --url URL cluster ARGS…`: (succeeded, stdout, stderr).
async fn admin_cluster(url: &str, arguments: &[&str]) -> (bool, String, String) {
    let mut all = vec!["cluster"];
    all.extend_from_slice(arguments);
    admin_cluster_args(url, &all).await
}

/// `wharf admin --url URL ARGS…`: (succeeded, stdout, stderr).
async fn admin_cluster_args(url: &str, arguments: &[&str]) -> (bool, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["admin", "--url", url])
        .args(arguments)
        .env_remove("WHARF_ADMIN_USER")
        .env_remove("WHARF_ADMIN_PASSWORD")
        .output()
        .await
        .unwrap();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.success(), text(&output.stdout), text(&output.stderr))
}

async fn voters(url: &str) -> Vec<u64> {
    let (_, metadata) = call(url, "GET", "/api/cluster/metadata", None).await;
    metadata["voters"].as_array().map(|voters| voters.iter().filter_map(Value::as_u64).collect()).unwrap_or_default()
}

/// Whether node `url` has a link up to `node`.
async fn linked_to(url: &str, node: u64) -> bool {
    let (_, members) = call(url, "GET", "/api/cluster/members", None).await;
    members.as_array().unwrap().iter().any(|member| member["node"] == node && member["outbound_connected"] == true)
}

/// Quorum queue `name` as node `url` sees it, if it holds a replica.
async fn quorum_queue(url: &str, name: &str) -> Option<Value> {
    let (_, queues) = call(url, "GET", "/api/cluster/queues", None).await;
    queues.as_array().unwrap().iter().find(|queue| queue["name"] == name).cloned()
}

/// Waits until every replica on `urls` counts no consumer of `name` (a closed channel's consumers
/// leave through the group).
async fn no_consumers(urls: &[String], name: &str) {
    for url in urls {
        eventually(&format!("no consumer of {name} on {url}"), || async move {
            quorum_queue(url, name).await.is_none_or(|queue| queue["consumers"] == 0)
        })
        .await;
    }
}

async fn knows(url: &str, node: u64) -> bool {
    let (_, members) = call(url, "GET", "/api/cluster/members", None).await;
    members.as_array().unwrap().iter().any(|member| member["node"] == node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_a_running_cluster_takes_part_and_leaves() {
    let temp = tempfile::tempdir().unwrap();
    let (cluster, mut nodes) = common::three_nodes(temp.path(), &[]).await;
    let mut urls: Vec<String> = nodes.iter().map(|node| node.http.clone()).collect();
    for url in &urls {
        eventually(&format!("{url} has the metadata group"), || async move { voters(url).await == [1, 2, 3] }).await;
    }
    let (status, body) = call(&urls[0], "PUT", "/api/vhosts/before", Some(json!({}))).await;
    assert!(status < 300, "{status} {body}");

    // Bad requests are refused, naming the problem.
    let (status, body) = call(&urls[1], "PUT", "/api/cluster/members/0", Some(json!({"address": "127.0.0.1:1"}))).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = call(&urls[1], "PUT", "/api/cluster/members/4", Some(json!({}))).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("address"), "{body}");
    let (status, body) = call(&urls[1], "DELETE", "/api/cluster/members/9", None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("not a member"), "{body}");
    let (added, _, stderr) = admin_cluster(&urls[1], &["add", "four"]).await;
    assert!(!added && stderr.contains("ID=HOST:PORT"), "{stderr}");

    // The fourth node, told of the others and of itself, waits to be added.
    let fourth_address = free_port();
    let mut with_fourth = cluster.clone();
    with_fourth.push((4, fourth_address));
    let fourth = start_node(&temp.path().join("node-4"), 4, &with_fourth, &["--cluster-join".into()]).await;
    let (added, stdout, stderr) = admin_cluster(&urls[1], &["add", &format!("4={fourth_address}")]).await;
    assert!(added, "{stdout}{stderr}");
    for url in urls.iter().chain([&fourth.http]) {
        eventually(&format!("{url} counts four voters"), || async move { voters(url).await == [1, 2, 3, 4] }).await;
    }
    // It holds what was defined before it joined, and every member links to it.
    let fourth_url = fourth.http.clone();
    eventually("the vhost defined before reaches the new node", || {
        let fourth_url = fourth_url.clone();
        async move { call(&fourth_url, "GET", "/api/vhosts/before", None).await.0 == 200 }
    })
    .await;
    for url in &urls {
        eventually(&format!("{url} links to node 4"), || async move { linked_to(url, 4).await }).await;
    }
    // Restarted with its old flags (which do not name node 4), a member links to it again from
    // the membership it recovered.
    nodes[0].child.kill().await.unwrap();
    nodes[0] = start_node(&temp.path().join("node-1"), 1, &cluster, &[]).await;
    urls[0] = nodes[0].http.clone();
    let restarted = urls[0].clone();
    eventually("the restarted node links to node 4", || {
        let restarted = restarted.clone();
        async move { linked_to(&restarted, 4).await }
    })
    .await;

    // A quorum queue declared on it now has a replica on all four; it serves through any node.
    let declaring = connect(fourth.amqp).await;
    let channel = declaring.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    let options = QueueDeclareOptions { durable: true, ..Default::default() };
    channel.queue_declare("four".into(), options, arguments).await.unwrap();
    let first_url = urls[0].clone();
    eventually("node 1 has the queue's group", || {
        let first_url = first_url.clone();
        async move {
            let (_, queues) = call(&first_url, "GET", "/api/cluster/queues", None).await;
            queues.as_array().unwrap().iter().any(|queue| queue["name"] == "four" && queue["leader"].is_u64())
        }
    })
    .await;
    let (_, queues) = call(&urls[0], "GET", "/api/cluster/queues", None).await;
    let members = queues.as_array().unwrap().iter().find(|queue| queue["name"] == "four").unwrap()["members"].clone();
    assert_eq!(members.as_array().unwrap().len(), 4, "{members}");
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let confirm = channel
        .basic_publish("".into(), "four".into(), BasicPublishOptions::default(), b"hello", BasicProperties::default())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    let reading = connect(nodes[0].amqp).await;
    let reader = reading.create_channel().await.unwrap();
    let mut consumer = reader
        .basic_consume(
            "four".into(),
            "c".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(std::time::Duration::from_secs(120), consumer.next()).await.unwrap();
    assert_eq!(&delivery.unwrap().unwrap().data[..], b"hello");

    // A queue on three of the four grows a replica on node 4, which catches up with what the
    // queue holds; then a replica is removed: refused while a consumer is attached through its
    // node, done once none is.
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    arguments.insert("x-quorum-initial-group-size".into(), AMQPValue::LongUInt(3));
    let first_channel = reading.create_channel().await.unwrap();
    first_channel.queue_declare("grow".into(), options, arguments).await.unwrap();
    first_channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    eventually("the three replicas have a leader", || {
        let first_url = first_url.clone();
        async move { quorum_queue(&first_url, "grow").await.is_some_and(|queue| queue["leader"].is_u64()) }
    })
    .await;
    assert_eq!(quorum_queue(&urls[0], "grow").await.unwrap()["members"], json!([1, 2, 3]));
    for n in 0..20 {
        let body = format!("grow-{n}");
        let confirm = first_channel
            .basic_publish(
                "".into(),
                "grow".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }
    // A queue's only replica is not removed.
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    arguments.insert("x-quorum-initial-group-size".into(), AMQPValue::LongUInt(1));
    first_channel.queue_declare("single".into(), options, arguments).await.unwrap();
    let (status, body) =
        call(&urls[0], "POST", "/api/queues/quorum/%2F/single/replicas/delete", Some(json!({"node": 1}))).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("only replica"), "{body}");
    let (refused, _, stderr) = admin_cluster_args(&urls[1], &["replica", "add", "grow", "9"]).await;
    assert!(!refused && stderr.contains("not a member"), "{stderr}");
    let (added, stdout, stderr) = admin_cluster_args(&urls[1], &["replica", "add", "grow", "4"]).await;
    assert!(added, "{stdout}{stderr}");
    let fourth_url = fourth.http.clone();
    eventually("node 4's new replica holds the 20", || {
        let fourth_url = fourth_url.clone();
        async move { quorum_queue(&fourth_url, "grow").await.is_some_and(|queue| queue["ready"] == 20) }
    })
    .await;
    assert_eq!(quorum_queue(&urls[2], "grow").await.unwrap()["members"], json!([1, 2, 3, 4]));
    let holding = reading.create_channel().await.unwrap();
    // Kept: lapin cancels a consumer whose stream is dropped.
    let _holder = holding
        .basic_consume("grow".into(), "holder".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    // The consumer reaches the group (and so its leader) through a command: wait for it there.
    for url in urls.iter().chain([&fourth.http]) {
        eventually(&format!("{url} counts the consumer"), || async move {
            quorum_queue(url, "grow").await.is_some_and(|queue| queue["consumers"] == 1)
        })
        .await;
    }
    let (status, body) =
        call(&urls[2], "POST", "/api/queues/quorum/%2F/grow/replicas/delete", Some(json!({"node": 1}))).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("consumers"), "{body}");
    holding.close(200, "done".into()).await.unwrap();
    no_consumers(&urls, "grow").await;
    let (removed, stdout, stderr) = admin_cluster_args(&urls[2], &["replica", "remove", "grow", "1"]).await;
    assert!(removed, "{stdout}{stderr}");
    eventually("node 1 holds no replica of grow", || {
        let first_url = first_url.clone();
        async move { quorum_queue(&first_url, "grow").await.is_none() }
    })
    .await;
    assert_eq!(quorum_queue(&urls[1], "grow").await.unwrap()["members"], json!([2, 3, 4]));
    // Consumed through node 4: all 20, those the first consumer held among them.
    let fourth_connection = connect(fourth.amqp).await;
    let fourth_reader = fourth_connection.create_channel().await.unwrap();
    let mut grown = fourth_reader
        .basic_consume(
            "grow".into(),
            "late".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 20 {
        let delivery = tokio::time::timeout(std::time::Duration::from_secs(120), grown.next()).await.unwrap();
        seen.insert(String::from_utf8_lossy(&delivery.unwrap().unwrap().data).into_owned());
    }
    fourth_reader.close(200, "done".into()).await.unwrap();
    no_consumers(&urls[1..], "grow").await;
    let (removed, stdout, stderr) = admin_cluster_args(&urls[2], &["replica", "remove", "grow", "4"]).await;
    assert!(removed, "{stdout}{stderr}");

    // While it holds a replica it cannot be removed; once it holds none it can.
    let (status, body) = call(&urls[2], "DELETE", "/api/cluster/members/4", None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["reason"].as_str().unwrap().contains("four"), "{body}");
    reader.queue_delete("four".into(), Default::default()).await.unwrap();
    let (removed, stdout, stderr) = admin_cluster(&urls[2], &["remove", "4"]).await;
    assert!(removed, "{stdout}{stderr}");
    for url in &urls {
        eventually(&format!("{url} counts three voters and forgot node 4"), || async move {
            voters(url).await == [1, 2, 3] && !knows(url, 4).await
        })
        .await;
    }
    // The three go on without it.
    let (status, body) = call(&urls[2], "PUT", "/api/vhosts/after", Some(json!({}))).await;
    assert!(status < 300, "{status} {body}");
    drop(fourth);
}
