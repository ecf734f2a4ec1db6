//! The food-delivery reference system on Wharf: what our users build, and the proof that nothing
//! is lost or done twice whatever crashes.
//!
//! - `order-service` takes orders over HTTP and writes each order and its `OrderReceived` event
//!   in one transaction (the outbox); its relay publishes the events; it also consumes the other
//!   services' status reports to answer `GET /orders/{id}`.
//! - `payment-service`, `inventory-service` and `email-service` each consume `OrderReceived`
//!   from their own queue and record what they did through their inbox, in the same transaction
//!   as the effect, and report back through their own outbox. The payment provider is simulated
//!   with its own ledger and idempotency keys, as real providers work; an unknown item is a
//!   permanent failure that ends in `inventory.dlq` with its reason; emails go to a mailbox
//!   keyed by an idempotency key.
//! - `chaos` runs the lot as separate processes, kills any of them (the broker too) with SIGKILL
//!   every few seconds, and checks the outcome from the services' own databases.
//!
//! This library holds what they share: the topology, the events, database helpers.

pub mod http;
pub mod services;

use anyhow::{Context, Result};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use std::path::Path;
use std::time::Duration;
use wharf_sdk::Inbox;

/// Where `OrderReceived` is published (topic, de-duplicating: a relay's re-publish is dropped).
pub const ORDERS_EXCHANGE: &str = "orders";
/// Where the services report back (topic, de-duplicating).
pub const STATUS_EXCHANGE: &str = "order-status";
/// Routing key of `OrderReceived`.
pub const ORDER_RECEIVED: &str = "order.received";
/// Each service's queue of `OrderReceived`.
pub const PAYMENT_QUEUE: &str = "payment.order-received";
/// See [`PAYMENT_QUEUE`].
pub const INVENTORY_QUEUE: &str = "inventory.order-received";
/// See [`PAYMENT_QUEUE`].
pub const EMAIL_QUEUE: &str = "email.order-received";
/// The order service's queue of status reports.
pub const STATUS_QUEUE: &str = "order-service.status";
/// Orders the inventory can never fill, with the reason in `x-failure-reason`.
pub const INVENTORY_DLQ: &str = "inventory.dlq";
/// The header carrying why an order ended in the dead-letter queue.
pub const FAILURE_REASON_HEADER: &str = "x-failure-reason";

/// The items the restaurants sell (anything else is an unknown item).
pub const CATALOG: &[&str] = &["pizza-margherita", "pasta-carbonara", "tiramisu", "green-salad", "lemonade"];

/// An item of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// What.
    pub sku: String,
    /// How many.
    pub quantity: u32,
}

/// The event every order produces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderReceived {
    /// The order.
    pub order_id: String,
    /// Who ordered.
    pub customer: String,
    /// From where.
    pub restaurant: String,
    /// What.
    pub items: Vec<Item>,
    /// What it costs, in cents.
    pub total_cents: i64,
}

/// A service's report on an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The order.
    pub order_id: String,
    /// `payment`, `inventory` or `email`.
    pub service: String,
    /// `captured`, `failed`, `reserved`, `rejected`, `sent`.
    pub status: String,
}

/// Declares the exchanges and queues (idempotent; every service does it at start).
pub async fn declare_topology(url: &str) -> Result<()> {
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let channel = connection.create_channel().await?;
    let mut dedup = FieldTable::default();
    dedup.insert("x-deduplication".into(), AMQPValue::Boolean(true));
    for exchange in [ORDERS_EXCHANGE, STATUS_EXCHANGE] {
        channel
            .exchange_declare(
                exchange.into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                dedup.clone(),
            )
            .await?;
    }
    let mut ordered = FieldTable::default();
    // A message that keeps failing is retried with backoff, then parked in `<queue>.dlq`.
    ordered.insert(
        "x-retry-backoff".into(),
        AMQPValue::FieldArray(vec![AMQPValue::LongInt(100), AMQPValue::LongInt(500), AMQPValue::LongInt(2000)].into()),
    );
    for queue in [PAYMENT_QUEUE, INVENTORY_QUEUE, EMAIL_QUEUE] {
        channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), ordered.clone()).await?;
        channel
            .queue_bind(
                queue.into(),
                ORDERS_EXCHANGE.into(),
                ORDER_RECEIVED.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    channel.queue_declare(STATUS_QUEUE.into(), QueueDeclareOptions::durable(), ordered).await?;
    channel
        .queue_bind(
            STATUS_QUEUE.into(),
            STATUS_EXCHANGE.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // The dead-letter queue de-duplicates (a relay re-publishing after a crash must not park an
    // order twice) and has no delivery limit (inspecting it must not move its messages on).
    let mut parked = dedup.clone();
    parked.insert("x-delivery-limit".into(), AMQPValue::LongInt(-1));
    channel.queue_declare(INVENTORY_DLQ.into(), QueueDeclareOptions::durable(), parked).await?;
    connection.close(200, "topology declared".into()).await?;
    Ok(())
}

/// Declares the topology, retrying while the broker is not up yet (services start in any order).
pub async fn declare_topology_when_up(url: &str) -> Result<()> {
    let started = std::time::Instant::now();
    loop {
        match declare_topology(url).await {
            Ok(()) => return Ok(()),
            Err(error) if started.elapsed() < Duration::from_secs(120) => {
                tracing::info!(%error, "broker not ready; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// A service's SQLite database (WAL, synchronous FULL: a commit is on disk when it returns, so a
/// SIGKILL right after loses nothing).
pub async fn open_sqlite(path: &Path) -> Result<SqlitePool> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(30));
    SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .with_context(|| format!("opening {}", path.display()))
}

/// Adds to a named counter in the service's own database, in the caller's transaction
/// (redeliveries seen, duplicates suppressed).
pub async fn count(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>, name: &str) -> Result<()> {
    sqlx::query("INSERT INTO counters (name, value) VALUES (?, 1) ON CONFLICT (name) DO UPDATE SET value = value + 1")
        .bind(name)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Creates the counters table.
pub async fn create_counters(pool: &SqlitePool) -> Result<()> {
    sqlx::query("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        .execute(pool)
        .await?;
    Ok(())
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as i64)
}

/// Installs logging (to stderr, `RUST_LOG`-style filter from `WHARF_LOG`, default `info`).
pub fn init_logging(service: &str) {
    // lapin reports every connection a killed broker breaks as an error; the services handle
    // those (reconnect, redelivery), so only its warnings and worse from the SDK are shown.
    let filter = std::env::var("WHARF_LOG").unwrap_or_else(|_| "info,lapin=off".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .try_init();
    tracing::info!(service, "starting");
}

/// Resolves on SIGTERM or SIGINT.
pub async fn terminated() {
    let Ok(mut terminate) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

/// Deletes inbox entries older than [`wharf_sdk::INBOX_RETENTION_MS_DEFAULT`] once an hour until
/// `stopped`.
pub fn spawn_inbox_purger(inbox: wharf_sdk::SqliteInbox, stopped: tokio::sync::watch::Receiver<bool>) {
    tokio::spawn(wharf_sdk::purge_periodically(
        move || {
            let inbox = inbox.clone();
            async move { inbox.purge(wharf_sdk::INBOX_RETENTION_MS_DEFAULT).await }
        },
        Duration::from_secs(3600),
        stopped,
    ));
}

/// Opens the transaction a service handles a message in, through its inbox: `None` if this
/// consumer handled the message before (the duplicate is counted and committed, and the message
/// should be acknowledged); otherwise the open transaction, with the effect counted in it.
pub async fn begin_first(
    pool: &sqlx::SqlitePool,
    consumer: &str,
    message: &wharf_sdk::Incoming,
) -> Result<Option<sqlx::Transaction<'static, sqlx::Sqlite>>> {
    let id = message.message_id.clone().unwrap_or_default();
    let mut tx = pool.begin().await?;
    if message.redelivered {
        count(&mut tx, "redeliveries").await?;
    }
    if wharf_sdk::SqliteInbox::new(pool.clone(), consumer).handle(&mut tx, &id).await? == wharf_sdk::Seen::Again {
        count(&mut tx, "inbox_duplicates").await?;
        tx.commit().await?;
        return Ok(None);
    }
    count(&mut tx, "effects").await?;
    Ok(Some(tx))
}

/// Runs a consuming service until SIGTERM/SIGINT: the topology, its outbox's relay, its inbox's
/// purger and its consumer; then stops them gracefully.
pub async fn serve<H: wharf_sdk::Handler>(
    consumer: &str,
    broker_url: &str,
    queue: &str,
    pool: SqlitePool,
    handler: H,
) -> Result<()> {
    declare_topology_when_up(broker_url).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut relay_config = wharf_sdk::RelayConfig::new(broker_url);
    relay_config.poll_interval_ms = 100;
    relay_config.lease_ms = 5_000;
    let relay = wharf_sdk::Relay::new(wharf_sdk::SqliteOutbox::new(pool.clone()), relay_config)?;
    let relay = tokio::spawn(relay.run(stopped.clone()));
    spawn_inbox_purger(wharf_sdk::SqliteInbox::new(pool, consumer), stopped.clone());
    let consuming =
        tokio::spawn(wharf_sdk::run_consumer(wharf_sdk::ConsumerConfig::new(broker_url, queue), handler, stopped));
    terminated().await;
    let _ = stop.send(true);
    relay.await??;
    consuming.await??;
    Ok(())
}
