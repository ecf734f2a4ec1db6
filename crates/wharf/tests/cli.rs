//! The binary's interface: SIGTERM closes client connections with 320 CONNECTION_FORCED and exits
//! cleanly, keeping confirmed messages; bad settings are refused with a message naming them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/ports.rs"]
mod ports;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use ports::free_port;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

async fn start(data_dir: &Path, address: SocketAddr) -> (Child, tokio::sync::mpsc::UnboundedReceiver<String>) {
    start_with(data_dir, address, &[]).await
}

async fn start_with(
    data_dir: &Path,
    address: SocketAddr,
    extra: &[&std::ffi::OsStr],
) -> (Child, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["serve", "--http-listen", "127.0.0.1:0", "--mqtt-listen", "none", "--amqp-listen", &address.to_string()])
        .args(extra)
        .env("WHARF_DATA_DIR", data_dir)
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    // Every line goes to the receiver, those written while starting too (warnings, say).
    loop {
        let line = lines.next_line().await.unwrap().expect("wharf exited before it was ready");
        let ready = line.contains("accepting AMQP connections");
        let _ = sender.send(line);
        if ready {
            break;
        }
    }
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = sender.send(line);
        }
    });
    (child, receiver)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_connections_with_320_and_keeps_confirmed_messages() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let address = free_port();
    let (mut wharf, mut log) = start(&data_dir, address).await;
    let connection = Connection::connect(&format!("amqp://guest:guest@{address}/%2f"), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.queue_declare("kept".into(), QueueDeclareOptions::durable(), FieldTable::default()).await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    channel
        .basic_publish(
            "".into(),
            "kept".into(),
            BasicPublishOptions::default(),
            b"safe",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    let pid = wharf.id().unwrap().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().await.unwrap();
    assert!(status.success());
    let exit = wharf.wait().await.unwrap();
    assert!(exit.success(), "a clean stop exits 0: {exit:?}");
    let mut lines = Vec::new();
    while let Some(line) = log.recv().await {
        lines.push(line);
    }
    assert!(
        lines.iter().any(|line| line.contains("connection closed by server") && line.contains("code=320")),
        "{lines:#?}"
    );
    assert!(lines.iter().any(|line| line.contains("store closed")), "{lines:#?}");

    let address = free_port();
    let (mut wharf, _log) = start(&data_dir, address).await;
    let connection = Connection::connect(&format!("amqp://guest:guest@{address}/%2f"), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let message = channel.basic_get("kept".into(), BasicGetOptions::default()).await.unwrap().unwrap();
    assert_eq!(message.delivery.data, b"safe");
    assert!(!message.delivery.redelivered, "after a clean stop, a never-delivered message is not marked redelivered");
    wharf.start_kill().unwrap();
    wharf.wait().await.unwrap();
}

#[tokio::test]
async fn bad_settings_are_refused_with_a_message_naming_them() {
    let temp = tempfile::tempdir().unwrap();
    let config = temp.path().join("wharf.toml");
    std::fs::write(&config, "frame_max = 100\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["serve", "--http-listen", "127.0.0.1:0", "--mqtt-listen", "none", "--config"])
        .arg(&config)
        .env("WHARF_DATA_DIR", temp.path().join("data"))
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("frame_max must be between 4096"), "{stderr}");

    std::fs::write(&config, "no_such_setting = 1\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["serve", "--http-listen", "127.0.0.1:0", "--mqtt-listen", "none", "--config"])
        .arg(&config)
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no_such_setting"), "{stderr}");

    let output = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["serve", "--http-listen", "127.0.0.1:0", "--mqtt-listen", "none", "--group-commit-delay-us", "5000000"])
        .env("WHARF_DATA_DIR", temp.path().join("data"))
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("group_commit_delay_us must be at most"));

    let output = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["serve", "--http-listen", "127.0.0.1:0", "--mqtt-listen", "none", "--amqp-listen", "not-an-address"])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--amqp-listen"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_come_from_the_configuration_file_and_the_command_line() {
    let temp = tempfile::tempdir().unwrap();
    let config = temp.path().join("wharf.toml");
    std::fs::write(
        &config,
        "[[policies]]\nname = \"one-try\"\npattern = \"^fragile$\"\napply_to = \"queues\"\ndefinition = { delivery-limit = 1 }\n",
    )
    .unwrap();
    let flag = r#"{"name": "two-tries", "pattern": "^sturdy$", "definition": {"delivery-limit": 2}}"#;
    let address = free_port();
    let extra = [
        std::ffi::OsStr::new("--config"),
        config.as_os_str(),
        std::ffi::OsStr::new("--policy"),
        std::ffi::OsStr::new(flag),
    ];
    let (mut wharf, _log) = start_with(&temp.path().join("data"), address, &extra).await;
    let connection = Connection::connect(&format!("amqp://guest:guest@{address}/%2f"), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    for (queue, allowed) in [("fragile", 1), ("sturdy", 2)] {
        channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), FieldTable::default()).await.unwrap();
        channel
            .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), b"job", BasicProperties::default())
            .await
            .unwrap();
        let mut deliveries = 0;
        while let Some(message) = channel.basic_get(queue.into(), BasicGetOptions::default()).await.unwrap() {
            deliveries += 1;
            message.nack(BasicNackOptions { multiple: false, requeue: true }).await.unwrap();
            assert!(deliveries <= 20);
        }
        assert_eq!(deliveries, allowed, "{queue}");
    }
    wharf.start_kill().unwrap();
    wharf.wait().await.unwrap();

    std::fs::write(&config, "[[policies]]\nname = \"broken\"\npattern = \".*\"\ndefinition = { delivery-limt = 1 }\n")
        .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["serve", "--http-listen", "127.0.0.1:0", "--mqtt-listen", "none", "--config"])
        .arg(&config)
        .env("WHARF_DATA_DIR", temp.path().join("data"))
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("policy 'broken'") && stderr.contains("delivery-limt"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_from_the_file_log_in_with_rabbitmqs_password_hashes_or_a_password() {
    let temp = tempfile::tempdir().unwrap();
    let config = temp.path().join("wharf.toml");
    // `imported` carries RabbitMQ's documented hash of "test12"; `typed` a password in clear.
    std::fs::write(
        &config,
        concat!(
            "[[users]]\nname = \"imported\"\npassword_hash = \"kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR\"\n",
            "hashing_algorithm = \"rabbit_password_hashing_sha256\"\n",
            "[[users]]\nname = \"typed\"\npassword = \"pw\"\n",
        ),
    )
    .unwrap();
    let address = free_port();
    let (mut wharf, _log) =
        start_with(&temp.path().join("data"), address, &[std::ffi::OsStr::new("--config"), config.as_os_str()]).await;
    let login = |user: &str, password: &str| {
        let url = format!("amqp://{user}:{password}@{address}/%2f");
        async move { Connection::connect(&url, ConnectionProperties::default()).await }
    };
    assert!(login("imported", "test12").await.is_ok());
    assert!(login("imported", "test13").await.is_err());
    assert!(login("typed", "pw").await.is_ok());
    assert!(login("guest", "guest").await.is_err(), "the file's users replace guest");
    wharf.start_kill().unwrap();
    wharf.wait().await.unwrap();

    // A user must give exactly one of password and password_hash, and a hash must be one.
    for (text, expected) in [
        (
            "[[users]]\nname = \"both\"\npassword = \"x\"\npassword_hash = \"kI3GCg==\"\n",
            "exactly one of password and password_hash",
        ),
        ("[[users]]\nname = \"bad\"\npassword_hash = \"kI3GCg==\"\n", "password_hash is not a base64 salt"),
        (
            "[[users]]\nname = \"odd\"\npassword_hash = \"kI3GCg==\"\nhashing_algorithm = \"bcrypt\"\n",
            "unknown hashing_algorithm 'bcrypt'",
        ),
    ] {
        std::fs::write(&config, text).unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args(["serve", "--http-listen", "127.0.0.1:0", "--mqtt-listen", "none", "--config"])
            .arg(&config)
            .env("WHARF_DATA_DIR", temp.path().join("data"))
            .output()
            .await
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{stderr}");
    }
}

/// A RabbitMQ export: a user with RabbitMQ's documented hash of "test12", scoped permissions, a
/// vhost with a queue limit, a policy with a key Wharf lacks, and a topology.
const RABBITMQ_EXPORT: &str = r##"{
  "rabbit_version": "3.10.8", "rabbitmq_version": "3.10.8", "product_name": "RabbitMQ", "product_version": "3.10.8",
  "users": [{"name": "test", "password_hash": "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR",
             "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ["administrator"], "limits": {}}],
  "vhosts": [{"name": "orders", "description": "", "tags": [], "metadata": {"description": "", "tags": []}}],
  "permissions": [{"user": "test", "vhost": "orders", "configure": "^app\\.", "write": ".*", "read": ".*"}],
  "topic_permissions": [],
  "parameters": [{"vhost": "orders", "component": "vhost-limits", "name": "limits", "value": {"max-queues": 3}}],
  "global_parameters": [{"name": "internal_cluster_id", "value": "rabbitmq-cluster-id-x"}],
  "policies": [{"vhost": "orders", "name": "retry", "pattern": "^app\\.", "apply-to": "queues",
                "definition": {"delivery-limit": 5, "ha-mode": "all"}, "priority": 0}],
  "queues": [{"name": "app.q", "vhost": "orders", "durable": true, "auto_delete": false,
              "arguments": {"x-queue-type": "quorum"}}],
  "exchanges": [{"name": "app.x", "vhost": "orders", "type": "topic", "durable": true, "auto_delete": false,
                 "internal": false, "arguments": {}}],
  "bindings": [{"source": "app.x", "vhost": "orders", "destination": "app.q", "destination_type": "queue",
                "routing_key": "#", "arguments": {}}]
}"##;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rabbitmq_definitions_file_loads_at_every_start_beside_the_files_users() {
    let temp = tempfile::tempdir().unwrap();
    let definitions = temp.path().join("definitions.json");
    std::fs::write(&definitions, RABBITMQ_EXPORT).unwrap();
    // A user of the configuration file, without permissions: every right on every vhost.
    let config = temp.path().join("wharf.toml");
    std::fs::write(&config, "[[users]]\nname = \"ops\"\npassword = \"pw\"\n").unwrap();
    let data_dir = temp.path().join("data");
    let args = [
        std::ffi::OsStr::new("--config"),
        config.as_os_str(),
        std::ffi::OsStr::new("--definitions"),
        definitions.as_os_str(),
    ];
    let address = free_port();
    let (mut wharf, mut log) = start_with(&data_dir, address, &args).await;
    let mut started = Vec::new();
    while let Ok(line) = log.try_recv() {
        started.push(line);
    }
    let started = started.join("\n");
    assert!(started.contains("key 'ha-mode' is not used by Wharf"), "{started}");
    assert!(started.contains("vhosts[].metadata is not used by Wharf"), "{started}");
    let connect = |user: &str, password: &str, vhost: &str| {
        let url = format!("amqp://{user}:{password}@{address}/{vhost}");
        async move { Connection::connect(&url, ConnectionProperties::default()).await }
    };
    let test = connect("test", "test12", "orders").await.unwrap();
    let channel = test.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let confirm = channel
        .basic_publish(
            "app.x".into(),
            "order.1".into(),
            BasicPublishOptions::default(),
            b"o",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let declared = channel.queue_declare("app.q".into(), passive, FieldTable::default()).await.unwrap();
    assert_eq!(declared.message_count(), 1, "the imported binding routed it");
    let refused = channel.queue_declare("other.q".into(), QueueDeclareOptions::default(), FieldTable::default()).await;
    assert!(refused.unwrap_err().to_string().contains("configure access to queue 'other.q'"));
    assert!(connect("test", "test12", "%2f").await.is_err(), "no permissions on /");
    assert!(connect("ops", "pw", "orders").await.is_ok() && connect("ops", "pw", "%2f").await.is_ok());
    assert!(connect("guest", "guest", "%2f").await.is_err());
    // The vhost's queue limit (3) came from its parameters: app.q and two more.
    let ops = connect("ops", "pw", "orders").await.unwrap();
    let channel = ops.create_channel().await.unwrap();
    for name in ["app.two", "app.three"] {
        channel.queue_declare(name.into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    }
    let refused = channel.queue_declare("app.four".into(), QueueDeclareOptions::default(), FieldTable::default()).await;
    assert!(refused.unwrap_err().to_string().contains("queue limit in vhost 'orders' (3) is reached"));
    wharf.start_kill().unwrap();
    wharf.wait().await.unwrap();

    // The same file again: nothing changes, nothing is refused, the message is still there.
    let (mut wharf, mut log) = start_with(&data_dir, address, &args).await;
    let test = connect("test", "test12", "orders").await.unwrap();
    let channel = test.create_channel().await.unwrap();
    let declared = channel.queue_declare("app.q".into(), passive, FieldTable::default()).await.unwrap();
    assert_eq!(declared.message_count(), 1);
    let mut restarted = Vec::new();
    while let Ok(line) = log.try_recv() {
        restarted.push(line);
    }
    assert!(!restarted.iter().any(|line| line.contains("not declared") || line.contains("not made")), "{restarted:?}");
    wharf.start_kill().unwrap();
    wharf.wait().await.unwrap();

    // A file that cannot be used as written stops the start, naming the item.
    std::fs::write(&definitions, r#"{"permissions": [{"user": "a", "vhost": "/", "configure": "("}]}"#).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["serve", "--http-listen", "127.0.0.1:0", "--mqtt-listen", "none", "--definitions"])
        .arg(&definitions)
        .env("WHARF_DATA_DIR", &data_dir)
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("permissions[0].write: is missing"), "{stderr}");
}
