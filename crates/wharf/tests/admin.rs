//! `wharf admin` against the real binary: lists, peek, purge, delete, export and import, as a
//! table and as JSON, and the errors it reports (a wrong password, an unknown queue, a broker
//! that cannot be reached).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/ports.rs"]
mod ports;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use ports::free_port;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Starts `wharf serve` on free ports; returns it with its AMQP and HTTP addresses.
async fn start(data_dir: &std::path::Path) -> (Child, String, String) {
    let amqp = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args([
            "serve",
            "--http-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "none",
            "--amqp-listen",
            &amqp.to_string(),
            "--data-dir",
        ])
        .arg(data_dir)
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let http = loop {
        let line = lines.next_line().await.unwrap().expect("wharf exited before it was ready");
        if line.contains("management API listening") {
            let address = line.split("address=").nth(1).unwrap().split_whitespace().next().unwrap();
            break address.to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, format!("amqp://guest:guest@{amqp}/%2f"), format!("http://{http}"))
}

/// Runs `wharf admin --url URL ARGS…`: exit success, stdout, stderr.
async fn admin(url: &str, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["admin", "--url", url])
        .args(args)
        .env_remove("WHARF_ADMIN_USER")
        .env_remove("WHARF_ADMIN_PASSWORD")
        .output()
        .await
        .unwrap();
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap();
    (output.status.success(), text(output.stdout), text(output.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_lists_peeks_purges_deletes_exports_and_imports() {
    let temp = tempfile::tempdir().unwrap();
    let (mut wharf, amqp_url, url) = start(&temp.path().join("data")).await;
    let (ok, stdout, _) = admin(&url, &["queues"]).await;
    assert!(ok && stdout.contains("(none)"), "{stdout}");

    let properties = ConnectionProperties::default().with_connection_name("admin-test".into());
    let connection = Connection::connect(&amqp_url, properties).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel.queue_declare("orders.dlq".into(), durable, FieldTable::default()).await.unwrap();
    for index in 0..2 {
        let mut headers = FieldTable::default();
        headers.insert("x-failure-reason".into(), AMQPValue::LongString("card declined".into()));
        let properties = BasicProperties::default()
            .with_message_id(format!("m-{index}").into())
            .with_delivery_mode(2)
            .with_headers(headers);
        channel
            .basic_publish(
                "".into(),
                "orders.dlq".into(),
                BasicPublishOptions::default(),
                b"{\"order\": 7}",
                properties,
            )
            .await
            .unwrap();
    }
    channel.confirm_select(Default::default()).await.unwrap();
    channel
        .basic_publish("".into(), "nowhere".into(), BasicPublishOptions::default(), b"sync", BasicProperties::default())
        .await
        .unwrap()
        .await
        .unwrap();

    let (ok, stdout, stderr) = admin(&url, &["queues"]).await;
    assert!(ok, "{stderr}");
    let row = stdout.lines().find(|line| line.contains("orders.dlq")).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[..4], ["/", "orders.dlq", "2", "2"], "{stdout}");
    let (_, stdout, _) = admin(&url, &["--json", "queues"]).await;
    let queues: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(queues[0]["name"], "orders.dlq");
    let (_, stdout, _) = admin(&url, &["connections"]).await;
    assert!(stdout.contains("admin-test"), "{stdout}");

    let (ok, stdout, _) = admin(&url, &["peek", "orders.dlq"]).await;
    assert!(ok);
    assert!(stdout.contains("2 messages, page 1 of 1"), "{stdout}");
    assert!(stdout.contains("id m-0  ready  12 bytes  delivered 0 times"), "{stdout}");
    assert!(stdout.contains("failure: card declined"), "{stdout}");
    assert!(stdout.contains("body (string): {\"order\": 7}"), "{stdout}");

    let export = temp.path().join("definitions.json");
    let (ok, _, stderr) = admin(&url, &["export", export.to_str().unwrap()]).await;
    assert!(ok, "{stderr}");
    assert!(std::fs::read_to_string(&export).unwrap().contains("\"orders.dlq\""));

    let (ok, stdout, _) = admin(&url, &["purge", "orders.dlq"]).await;
    assert!(ok && stdout.contains("purged queue 'orders.dlq' in vhost '/'"), "{stdout}");
    let (ok, _, _) = admin(&url, &["delete", "queue", "orders.dlq"]).await;
    assert!(ok);
    let (ok, _, stderr) = admin(&url, &["delete", "queue", "orders.dlq"]).await;
    assert!(!ok);
    assert!(stderr.contains("not found: queue 'orders.dlq' in vhost '/'"), "{stderr}");
    let (ok, stdout, stderr) = admin(&url, &["import", export.to_str().unwrap()]).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("imported definitions"));
    let (_, stdout, _) = admin(&url, &["queues"]).await;
    assert!(stdout.contains("orders.dlq"), "the import declared the queue again: {stdout}");

    let (ok, _, stderr) = admin(&url, &["-p", "wrong", "queues"]).await;
    assert!(!ok);
    assert!(stderr.contains("refused the login of user 'guest'"), "{stderr}");
    let unreachable = format!("http://{}", std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap());
    let (ok, _, stderr) = admin(&unreachable, &["queues"]).await;
    assert!(!ok);
    assert!(stderr.contains("cannot reach the management API"), "{stderr}");
    let (ok, _, stderr) = admin(&url, &["import", "/nonexistent/definitions.json"]).await;
    assert!(!ok && stderr.contains("reading /nonexistent/definitions.json"), "{stderr}");

    connection.close(200, "done".into()).await.unwrap();
    wharf.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_traces_replays_moves_and_deletes_dead_letters() {
    let temp = tempfile::tempdir().unwrap();
    let (mut wharf, amqp_url, url) = start(&temp.path().join("data")).await;
    let properties = ConnectionProperties::default().with_connection_name("checkout".into());
    let connection = Connection::connect(&amqp_url, properties).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    let mut arguments = FieldTable::default();
    arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
    arguments.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString("orders.dlq".into()));
    channel.queue_declare("orders".into(), durable, arguments).await.unwrap();
    for queue in ["orders.dlq", "parked"] {
        channel.queue_declare(queue.into(), durable, FieldTable::default()).await.unwrap();
    }
    channel.confirm_select(Default::default()).await.unwrap();
    for id in ["order-9", "order-10"] {
        let properties = BasicProperties::default().with_message_id(id.into()).with_delivery_mode(2);
        channel
            .basic_publish("".into(), "orders".into(), BasicPublishOptions::default(), b"{}", properties)
            .await
            .unwrap()
            .await
            .unwrap();
    }
    for _ in 0..2 {
        let got = channel.basic_get("orders".into(), Default::default()).await.unwrap().unwrap();
        got.delivery.reject(lapin::options::BasicRejectOptions { requeue: false }).await.unwrap();
    }
    // The rejects are settled in order on this channel; a get answered after them sees them done.
    assert!(channel.basic_get("orders".into(), Default::default()).await.unwrap().is_none());

    let (ok, stdout, stderr) = admin(&url, &["trace", "order-9"]).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("message 'order-9' in queue 'orders.dlq'"), "{stdout}");
    assert!(stdout.contains("published by connection 'checkout' as user 'guest'"), "{stdout}");
    assert!(stdout.contains("delivered to a basic.get on connection 'checkout'"), "{stdout}");
    assert!(stdout.contains("rejected by the consumer with basic.reject"), "{stdout}");
    assert!(stdout.contains("dead-lettered (rejected) to exchange '' with routing key 'orders.dlq'"), "{stdout}");

    let (_, stdout, _) = admin(&url, &["--json", "peek", "orders.dlq"]).await;
    let peeked: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let first = peeked["items"][0]["entry_id"].as_u64().unwrap();
    let second = peeked["items"][1]["entry_id"].as_u64().unwrap();
    let (ok, stdout, stderr) = admin(&url, &["replay", "orders.dlq", "--ids", &first.to_string()]).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("1 messages of queue 'orders.dlq' replayed"), "{stdout}");
    let (_, stdout, _) = admin(&url, &["trace", "order-9"]).await;
    assert!(stdout.contains("message 'order-9' in queue 'orders'"), "{stdout}");
    assert!(stdout.contains("replayed by 'guest' to exchange '' with routing key 'orders'"), "{stdout}");

    let (ok, stdout, stderr) = admin(&url, &["move", "orders.dlq", "--to", "parked", "--all"]).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("1 messages of queue 'orders.dlq' moved to 'parked'"), "{stdout}");
    let (_, stdout, _) = admin(&url, &["--json", "peek", "parked"]).await;
    let parked: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(parked["items"][0]["message_id"], "order-10");
    let parked_entry = parked["items"][0]["entry_id"].as_u64().unwrap().to_string();
    let (ok, stdout, _) = admin(&url, &["delete", "message", "parked", &parked_entry]).await;
    assert!(ok && stdout.contains("deleted message"), "{stdout}");
    let (_, stdout, _) = admin(&url, &["trace", "order-10"]).await;
    assert!(stdout.contains("no message with id 'order-10'"), "{stdout}");

    // What cannot be done is said so.
    let (ok, _, stderr) = admin(&url, &["replay", "orders.dlq"]).await;
    assert!(!ok && stderr.contains("--ids"), "a selection is required: {stderr}");
    let (ok, _, stderr) = admin(&url, &["replay", "nope", "--all"]).await;
    assert!(!ok && stderr.contains("not found: queue 'nope' in vhost '/'"), "{stderr}");
    let (ok, stdout, _) = admin(&url, &["replay", "orders", "--ids", &second.to_string()]).await;
    assert!(ok, "a skipped message is reported, not an error");
    assert!(
        stdout.contains("0 messages of queue 'orders' replayed") && stdout.contains("left where they are"),
        "{stdout}"
    );

    connection.close(200, "done".into()).await.unwrap();
    wharf.kill().await.unwrap();
}
