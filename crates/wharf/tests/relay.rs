//! `wharf relay` against the real binary: rows that a service in another language wrote by plain
//! SQL, to tables made from the shipped migration files, are published as the contract says
//! (docs/outbox-contract.md): message id, type, headers, ordering key, persistent; the relay
//! migrates a PostgreSQL outbox itself; SIGTERM stops it cleanly; bad settings are refused with a
//! message naming them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/ports.rs"]
mod ports;
use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use ports::free_port;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Starts `wharf serve` on a free AMQP port; returns it with its AMQP URL.
async fn start_broker(data_dir: &Path) -> (Child, String) {
    let amqp = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args([
            "serve",
            "--http-listen",
            "none",
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
    while !lines.next_line().await.unwrap().expect("wharf exited before it was ready").contains("accepting AMQP") {}
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, format!("amqp://guest:guest@{amqp}/%2f"))
}

fn relay(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wharf"));
    command.arg("relay").args(args).env("NO_COLOR", "1").kill_on_drop(true);
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("WHARF_RELAY_")) {
        command.env_remove(name);
    }
    command
}

async fn stop(mut child: Child) {
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().await.unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "the relay stops cleanly on SIGTERM: {status}");
}

/// Declares `queue`, consumes `count` messages from it: (message id, type, headers, persistent).
async fn consume(url: &str, queue: &str, count: usize) -> Vec<(String, String, FieldTable, bool)> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(queue.into(), "test".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < count {
        let delivery = tokio::time::timeout(Duration::from_secs(60), consumer.next()).await.unwrap().unwrap().unwrap();
        let properties = &delivery.properties;
        got.push((
            properties.message_id().as_ref().unwrap().to_string(),
            properties.kind().as_ref().map(|kind| kind.to_string()).unwrap_or_default(),
            properties.headers().clone().unwrap_or_default(),
            *properties.delivery_mode() == Some(2),
        ));
        delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    connection.close(200, "done".into()).await.unwrap();
    got
}

async fn declare(url: &str, queue: &str) {
    let connection = Connection::connect(url, ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), FieldTable::default()).await.unwrap();
    connection.close(200, "declared".into()).await.unwrap();
}

/// The shipped migration files for `database`, in order, split into statements.
fn migration_statements(database: &str) -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wharf-sdk/migrations").join(database);
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|entry| entry.unwrap().path()).collect();
    files.sort();
    files
        .iter()
        .flat_map(|file| {
            let text = std::fs::read_to_string(file).unwrap();
            let without_comments: String =
                text.lines().filter(|line| !line.starts_with("--")).map(|line| format!("{line}\n")).collect();
            without_comments
                .split(';')
                .map(str::trim)
                .filter(|part| !part.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn header_text(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_by_plain_sql_to_a_sqlite_outbox_are_published_as_the_contract_says() {
    let temp = tempfile::tempdir().unwrap();
    let (broker, url) = start_broker(&temp.path().join("data")).await;
    declare(&url, "orders").await;
    // A team's own migration tool applied the shipped files; the relay must leave the schema alone.
    let database = temp.path().join("shop.db");
    let pool = sqlx::SqlitePool::connect_with(
        sqlx::sqlite::SqliteConnectOptions::new().filename(&database).create_if_missing(true),
    )
    .await
    .unwrap();
    for statement in migration_statements("sqlite") {
        sqlx::query(&statement).execute(&pool).await.unwrap();
    }
    for (id, key) in [("e-1", "order-7"), ("e-2", "order-7"), ("e-3", "order-8")] {
        sqlx::query(
            "INSERT INTO wharf_outbox (id, exchange, routing_key, ordering_key, headers, content_type, message_type, body, created_at)
             VALUES (?, '', 'orders', ?, '{\"tenant\":\"acme\"}', 'application/json', 'OrderReceived', ?, 1)",
        )
        .bind(id)
        .bind(key)
        .bind(format!("{{\"id\":\"{id}\"}}").into_bytes())
        .execute(&pool)
        .await
        .unwrap();
    }
    let database_url = format!("sqlite:{}", database.display());
    let relaying =
        relay(&["--database-url", &database_url, "--broker-url", &url, "--no-migrate", "--poll-interval-ms", "50"])
            .spawn()
            .unwrap();
    let got = consume(&url, "orders", 3).await;
    let ids: Vec<&str> = got.iter().map(|(id, ..)| id.as_str()).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec!["e-1", "e-2", "e-3"], "each row once");
    let position = |id: &str| ids.iter().position(|seen| *seen == id).unwrap();
    assert!(position("e-1") < position("e-2"), "one ordering key, published in write order: {ids:?}");
    for (id, kind, headers, persistent) in &got {
        assert_eq!(kind, "OrderReceived", "{id}");
        assert_eq!(header_text(headers, "tenant").as_deref(), Some("acme"), "{id}");
        assert!(header_text(headers, "x-ordering-key").is_some_and(|key| key.starts_with("order-")), "{id}");
        assert!(persistent, "{id}");
    }
    stop(relaying).await;
    let unsent: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM wharf_outbox WHERE status <> 1").fetch_one(&pool).await.unwrap();
    assert_eq!(unsent, 0, "every row marked sent");
    let versions: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_master WHERE name = 'wharf_schema_versions'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(versions, 0, "--no-migrate left the schema alone");
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_migrates_a_postgres_outbox_and_relays_it() {
    let Ok(admin_url) = std::env::var("WHARF_TEST_POSTGRES_URL") else {
        assert!(std::env::var_os("WHARF_TEST_POSTGRES_REQUIRED").is_none(), "WHARF_TEST_POSTGRES_URL is not set");
        eprintln!("skipped: WHARF_TEST_POSTGRES_URL is not set (scripts/test.sh sets it)");
        return;
    };
    // A database of its own: the relay migrates the default schema.
    let name =
        format!("relay_{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    let admin = sqlx::PgPool::connect(&admin_url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.unwrap();
    let database_url = format!("{}/{name}", admin_url.rsplit_once('/').unwrap().0);
    let temp = tempfile::tempdir().unwrap();
    let (broker, url) = start_broker(&temp.path().join("data")).await;
    declare(&url, "orders").await;
    let relaying = relay(&["--broker-url", &url])
        .env("WHARF_RELAY_DATABASE_URL", &database_url)
        .env("WHARF_RELAY_POLL_INTERVAL_MS", "50")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let started = std::time::Instant::now();
    loop {
        let migrated: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM wharf_schema_versions")
            .fetch_optional(&pool)
            .await
            .unwrap_or(None);
        if migrated == Some(4) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the relay did not migrate the outbox");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO wharf_outbox (id, exchange, routing_key, body, created_at, message_type) VALUES ('p-1', '', 'orders', 'x', 1, 'OrderReceived')",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("SELECT pg_notify('wharf_outbox', '')").execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    let got = consume(&url, "orders", 1).await;
    assert_eq!(got[0].0, "p-1");
    assert_eq!(got[0].1, "OrderReceived");
    stop(relaying).await;
    pool.close().await;
    sqlx::query(&format!("DROP DATABASE {name}")).execute(&admin).await.unwrap();
    drop(broker);
}

#[tokio::test]
async fn bad_settings_are_refused_with_a_message_naming_them() {
    let cases: [(&[&str], &str); 5] = [
        (&["--broker-url", "amqp://127.0.0.1"], "--database-url"),
        (&["--database-url", "sqlite:x.db"], "--broker-url"),
        (&["--database-url", "oracle://x", "--broker-url", "amqp://127.0.0.1"], "postgres://"),
        (&["--database-url", "sqlite:x.db", "--broker-url", "http://127.0.0.1"], "amqp://"),
        (
            &["--database-url", "sqlite::memory:", "--broker-url", "amqp://127.0.0.1", "--outbox-table", "x;drop"],
            "outbox table",
        ),
    ];
    for (args, named) in cases {
        let output = relay(args).stdin(Stdio::null()).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
    }
}
