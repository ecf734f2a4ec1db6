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
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use std::path::Path;
use std::time::Duration;
use wharf_sdk::topology::{Exchange, ExchangeKind, Queue, Topology};
use wharf_sdk::{HandleError, Incoming, Message};

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

impl Message for OrderReceived {
    const TYPE: &'static str = "OrderReceived";
    const EXCHANGE: &'static str = ORDERS_EXCHANGE;

    fn routing_key(&self) -> String {
        ORDER_RECEIVED.into()
    }

    fn ordering_key(&self) -> Option<String> {
        Some(self.order_id.clone())
    }
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

impl Message for StatusReport {
    const TYPE: &'static str = "StatusReport";
    const EXCHANGE: &'static str = STATUS_EXCHANGE;

    fn routing_key(&self) -> String {
        format!("{}.{}", self.service, self.status)
    }

    fn ordering_key(&self) -> Option<String> {
        Some(self.order_id.clone())
    }
}

impl StatusReport {
    /// The key that makes the report's event id stable: one report per service and order, so a
    /// handler that runs again after a crash writes the same id (refused by the outbox, dropped by
    /// the broker's de-duplication, absorbed by the order service's inbox).
    pub fn idempotency_key(&self) -> String {
        format!("{}/{}", self.service, self.order_id)
    }
}

/// The exchanges and queues.
pub fn topology() -> Topology {
    // A message that keeps failing is retried with backoff, then parked in `<queue>.dlq`.
    let backoff_ms = [100, 500, 2000];
    let mut topology = Topology::new()
        .with_exchange(Exchange::new(ORDERS_EXCHANGE, ExchangeKind::Topic).deduplicated())
        .with_exchange(Exchange::new(STATUS_EXCHANGE, ExchangeKind::Topic).deduplicated());
    for queue in [PAYMENT_QUEUE, INVENTORY_QUEUE, EMAIL_QUEUE] {
        topology = topology.queue(Queue::new(queue).bind(ORDERS_EXCHANGE, ORDER_RECEIVED).retry_backoff_ms(backoff_ms));
    }
    // The dead-letter queue de-duplicates (a relay re-publishing after a crash must not park an
    // order twice) and has no delivery limit (inspecting it must not move its messages on).
    topology
        .queue(Queue::new(STATUS_QUEUE).bind(STATUS_EXCHANGE, "#").retry_backoff_ms(backoff_ms))
        .queue(Queue::new(INVENTORY_DLQ).deduplicated().delivery_limit(-1))
}

/// Declares the exchanges and queues (idempotent; every service does it at start).
pub async fn declare_topology(url: &str) -> Result<()> {
    topology().declare(url).await.with_context(|| format!("declaring the topology on {url}"))
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

/// Installs logging (to stderr, `RUST_LOG`-style filter from `WHARF_LOG`, default `info`). Each
/// handled message's span is printed when it closes, with its W3C trace id: one order's trace id
/// shows up in every service's log.
pub fn init_logging(service: &str) {
    // lapin reports every connection a killed broker breaks as an error; the services handle
    // those (reconnect, redelivery), so only its warnings and worse from the SDK are shown.
    let filter = std::env::var("WHARF_LOG").unwrap_or_else(|_| "info,lapin=off".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
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

/// Counts, in a handler's transaction, that this is an effect (and a redelivery, if it is one):
/// the chaos run checks one effect per order.
pub async fn count_effect(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    message: &Incoming,
) -> Result<(), HandleError> {
    if message.redelivered {
        count(tx, "redeliveries").await.map_err(|error| HandleError::Transient(error.to_string()))?;
    }
    count(tx, "effects").await.map_err(|error| HandleError::Transient(error.to_string()))
}

/// Counts, in the duplicate's own transaction, a redelivery the inbox absorbed.
pub async fn count_duplicate(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    message: &Incoming,
) -> Result<(), HandleError> {
    if message.redelivered {
        count(tx, "redeliveries").await.map_err(|error| HandleError::Transient(error.to_string()))?;
    }
    count(tx, "inbox_duplicates").await.map_err(|error| HandleError::Transient(error.to_string()))
}

/// The relay settings the services use: a short poll and lease, so the chaos run's kills heal
/// fast.
pub fn relay_config(broker_url: &str) -> wharf_sdk::RelayConfig {
    let mut config = wharf_sdk::RelayConfig::new(broker_url);
    config.poll_interval_ms = 100;
    config.lease_ms = 5_000;
    config
}

/// Runs a consuming service until SIGTERM/SIGINT: the topology, then (through one
/// `Wharf::builder`) its outbox's relay, its inbox's migration and purger, and its exactly-once
/// consumer; then one shutdown drains them.
pub async fn serve<H: wharf_sdk::EffectHandler<OrderReceived, sqlx::Sqlite>>(
    consumer: &str,
    broker_url: &str,
    queue: &str,
    pool: SqlitePool,
    handler: H,
    metrics_listen: Option<std::net::SocketAddr>,
) -> Result<()> {
    declare_topology_when_up(broker_url).await?;
    let inbox = wharf_sdk::SqliteInbox::new(pool.clone(), consumer);
    let wharf = wharf_sdk::Wharf::builder(broker_url)
        .outbox_with(wharf_sdk::SqliteOutbox::new(pool), relay_config(broker_url))
        .inbox(inbox.clone())
        .consumer(wharf_sdk::ConsumerConfig::new(broker_url, queue), wharf_sdk::exactly_once(inbox, handler))
        .start()
        .await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    if let Some(address) = metrics_listen {
        let mut stopped = stopped.clone();
        serve_observability(address, wharf.health().to_vec(), async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        })
        .await?;
    }
    terminated().await;
    let _ = stop.send(true);
    wharf.shutdown().await?;
    Ok(())
}

/// Installs the Prometheus recorder the SDK's metrics go to (once per process; later calls reuse
/// it) and returns its handle.
pub fn metrics_recorder() -> Result<metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> = std::sync::OnceLock::new();
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// The routes every service serves: `/metrics` (Prometheus text: the SDK's outbox, relay,
/// handler and inbox metrics) and `/health` (each relay and consumer: up, last progress, last
/// error; 503 while any is down).
pub fn observability_routes(health: Vec<(String, wharf_sdk::Health)>) -> Result<axum::Router> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let handle = metrics_recorder()?;
    let health = std::sync::Arc::new(health);
    Ok(axum::Router::new().route("/metrics", get(move || std::future::ready(handle.render()))).route(
        "/health",
        get(move || {
            let health = std::sync::Arc::clone(&health);
            async move {
                let parts: Vec<serde_json::Value> = health
                    .iter()
                    .map(|(name, health)| {
                        serde_json::json!({
                            "name": name, "up": health.is_up(),
                            "last_progress_ms": health.last_progress_ms(), "last_error": health.last_error(),
                        })
                    })
                    .collect();
                let up = health.iter().all(|(_, health)| health.is_up());
                let status = if up { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                (status, axum::Json(serde_json::json!({ "up": up, "parts": parts })))
            }
        }),
    ))
}

/// Serves [`observability_routes`] on `address` until `stopped` resolves; returns the address
/// bound (for port 0).
pub async fn serve_observability(
    address: std::net::SocketAddr,
    health: Vec<(String, wharf_sdk::Health)>,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<std::net::SocketAddr> {
    let routes = observability_routes(health)?;
    let listener = tokio::net::TcpListener::bind(address).await.with_context(|| format!("binding {address}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(address = %bound, "serving /metrics and /health");
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, routes).with_graceful_shutdown(stopped).await {
            tracing::warn!(%error, "the metrics server stopped");
        }
    });
    Ok(bound)
}
