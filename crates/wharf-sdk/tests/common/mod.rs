//! Helpers for the SDK's tests: a real Wharf broker on a fixed loopback port (so it can be
//! restarted under a relay), and a small shop (orders written with their events through the
//! outbox, payments recorded through the inbox) on PostgreSQL or SQLite.
//!
//! PostgreSQL comes from `WHARF_TEST_POSTGRES_URL` (scripts/test.sh starts a throwaway cluster
//! and sets it); every test gets a schema of its own. `WHARF_SDK_TEST_BROKER_URL` points the
//! suite at another broker (RabbitMQ) instead of an embedded Wharf.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../wharf/tests/common/ports.rs"]
mod ports;
use ports::free_port;
use sqlx::Row;
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;
use wharf_broker::{Broker, BrokerConfig};
use wharf_sdk::{
    Event, Inbox, Incoming, MySqlInbox, MySqlOutbox, Outbox, PgInbox, PgOutbox, Relay, RelayConfig, Seen, SqliteInbox,
    SqliteOutbox,
};

/// The longest a test waits for something (far above what it takes).
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A broker for the tests: an embedded Wharf on a fixed port, or an external one.
pub struct TestBroker {
    pub broker: Option<Broker>,
    pub address: SocketAddr,
    pub data_dir: PathBuf,
    pub external: Option<String>,
    _temp: tempfile::TempDir,
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = temp.path().join("data");
        let external = std::env::var("WHARF_SDK_TEST_BROKER_URL").ok();
        let address = free_port();
        let broker = match external {
            Some(_) => None,
            None => Some(Self::boot(&data_dir, address).await),
        };
        TestBroker { broker, address, data_dir, external, _temp: temp }
    }

    async fn boot(data_dir: &std::path::Path, address: SocketAddr) -> Broker {
        let mut config = BrokerConfig::new(data_dir);
        config.amqp_listen = address;
        // The port was free a moment ago; retry briefly if another process took it meanwhile.
        let mut attempts = 0;
        loop {
            match Broker::start(config.clone()).await {
                Ok(broker) => return broker,
                Err(error) if attempts < 50 => {
                    attempts += 1;
                    tracing::debug!(%error, "broker start failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => panic!("could not start the broker: {error}"),
            }
        }
    }

    pub fn url(&self) -> String {
        match &self.external {
            Some(url) => url.clone(),
            None => format!("amqp://guest:guest@{}/%2f", self.address),
        }
    }

    /// Stops the broker cleanly and starts it again on the same port and data (embedded only).
    pub async fn restart(&mut self) {
        if let Some(broker) = self.broker.take() {
            broker.shutdown().await;
            self.broker = Some(Self::boot(&self.data_dir, self.address).await);
        }
    }

    /// Duplicates the broker dropped (embedded Wharf only).
    pub fn duplicates_dropped(&self) -> Option<u64> {
        self.broker.as_ref().map(|broker| broker.counters().duplicates_dropped)
    }

    pub async fn stop(mut self) {
        if let Some(broker) = self.broker.take() {
            broker.shutdown().await;
        }
    }

    /// Declares the shop's topology: a de-duplicating topic exchange `orders`, and a durable
    /// queue bound to it (ordered by the events' ordering key when `ordered`).
    pub async fn declare(&self, queue: &str, ordered: bool) {
        use lapin::options::*;
        use lapin::types::{AMQPValue, FieldTable, LongString};
        let connection = lapin::Connection::connect(&self.url(), lapin::ConnectionProperties::default()).await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        let mut exchange_arguments = FieldTable::default();
        if self.external.is_none() {
            exchange_arguments.insert("x-deduplication".into(), AMQPValue::Boolean(true));
        }
        channel
            .exchange_declare(
                "orders".into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                exchange_arguments,
            )
            .await
            .unwrap();
        // An external broker is shared by the tests (run them with --test-threads=1): start from
        // an empty queue.
        let _ = channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await;
        let mut arguments = FieldTable::default();
        if ordered {
            arguments.insert(
                "x-ordered-by".into(),
                AMQPValue::LongString(LongString::from(wharf_sdk::ORDERING_KEY_HEADER.as_bytes().to_vec())),
            );
        }
        channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), arguments).await.unwrap();
        channel
            .queue_bind(
                queue.into(),
                "orders".into(),
                "order.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        connection.close(200, "declared".into()).await.unwrap();
    }
}

/// The test database's URL, from `WHARF_TEST_POSTGRES_URL`. Without it the PostgreSQL tests skip
/// with a printed reason, so `cargo test --workspace` runs on its own; `scripts/test.sh` starts a
/// throwaway PostgreSQL, sets the URL and also sets `WHARF_TEST_POSTGRES_REQUIRED`, which turns a
/// missing URL into a failure (CI must never skip them silently).
pub fn postgres_url() -> Option<String> {
    match std::env::var("WHARF_TEST_POSTGRES_URL") {
        Ok(url) => Some(url),
        Err(_) if std::env::var_os("WHARF_TEST_POSTGRES_REQUIRED").is_some() => {
            panic!("WHARF_TEST_POSTGRES_REQUIRED is set but WHARF_TEST_POSTGRES_URL is not")
        }
        Err(_) => {
            eprintln!(
                "skipped: WHARF_TEST_POSTGRES_URL is not set (scripts/test.sh starts a throwaway PostgreSQL and sets it)"
            );
            None
        }
    }
}

/// A fresh PostgreSQL schema for one test, or `None` (the test skips) without a database URL.
pub async fn postgres() -> Option<PgPool> {
    let url = postgres_url()?;
    let schema = format!("t{}", uuid_like());
    let admin = PgPool::connect(&url).await.unwrap();
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&admin).await.unwrap();
    admin.close().await;
    let options = PgConnectOptions::from_str(&url).unwrap().options([("search_path", schema.as_str())]);
    Some(PgPoolOptions::new().max_connections(12).connect_with(options).await.unwrap())
}

/// A fresh MySQL (MariaDB) database for one test, from `WHARF_TEST_MYSQL_URL`, or `None` (the
/// test skips, saying why) without it; `WHARF_TEST_MYSQL_REQUIRED` makes a missing URL a failure.
pub async fn mysql() -> Option<MySqlPool> {
    let url = match std::env::var("WHARF_TEST_MYSQL_URL") {
        Ok(url) => url,
        Err(_) if std::env::var_os("WHARF_TEST_MYSQL_REQUIRED").is_some() => {
            panic!("WHARF_TEST_MYSQL_REQUIRED is set but WHARF_TEST_MYSQL_URL is not")
        }
        Err(_) => {
            eprintln!(
                "skipped: WHARF_TEST_MYSQL_URL is not set (scripts/test.sh starts a throwaway MariaDB and sets it)"
            );
            return None;
        }
    };
    let database = format!("t{}", uuid_like());
    let admin = MySqlPool::connect(&url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {database}")).execute(&admin).await.unwrap();
    admin.close().await;
    let (server, _) = url.rsplit_once('/').unwrap();
    Some(MySqlPoolOptions::new().max_connections(12).connect(&format!("{server}/{database}")).await.unwrap())
}

pub fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{:x}{:x}", nanos, std::process::id())
}

/// A SQLite database file in `dir` (WAL, a busy timeout: several connections share it).
pub async fn sqlite(dir: &std::path::Path) -> SqlitePool {
    let options = SqliteConnectOptions::new()
        .filename(dir.join("shop.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new().max_connections(4).connect_with(options).await.unwrap()
}

/// The shop's database side, on either database.
pub trait Shop: Send + Sync + Clone + 'static {
    type Store: wharf_sdk::OutboxStore;
    /// Creates the tables (outbox, inbox, orders, payments).
    fn setup(&self) -> impl Future<Output = ()> + Send;
    /// Writes an order and its `OrderReceived` event in one transaction.
    fn place_order(&self, order_id: &str, customer: &str) -> impl Future<Output = ()> + Send;
    /// Records the payment for a message through the inbox, in one transaction; true if it was
    /// new. `before_commit` runs inside the transaction (tests use it to wait or fail).
    fn charge(&self, message: &Incoming) -> impl Future<Output = wharf_sdk::Result<bool>> + Send;
    /// (event id, order id) of every payment recorded.
    fn payments(&self) -> impl Future<Output = Vec<(String, String)>> + Send;
    /// Outbox rows not yet sent.
    fn unsent(&self) -> impl Future<Output = i64> + Send;
    /// A relay over this shop's outbox.
    fn relay(&self, config: RelayConfig) -> Relay<Self::Store>;
    /// The outbox store (for wrapping in tests).
    fn store(&self) -> Self::Store;
}

fn order_event(order_id: &str, customer: &str) -> Event {
    Event::new("orders", "order.received", format!(r#"{{"order":"{order_id}","customer":"{customer}"}}"#))
        .ordered_by(customer)
        .with_header("order-id", order_id)
        .with_content_type("application/json")
}

#[derive(Clone)]
pub struct PgShop {
    pub pool: PgPool,
}

impl Shop for PgShop {
    type Store = PgOutbox;

    async fn setup(&self) {
        PgOutbox::new(self.pool.clone()).migrate().await.unwrap();
        PgInbox::new(self.pool.clone(), "payments").migrate().await.unwrap();
        sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY, customer TEXT NOT NULL)")
            .execute(&self.pool)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE payments (event_id TEXT NOT NULL, order_id TEXT NOT NULL, seq BIGSERIAL)")
            .execute(&self.pool)
            .await
            .unwrap();
    }

    async fn place_order(&self, order_id: &str, customer: &str) {
        let outbox = PgOutbox::new(self.pool.clone());
        let mut tx = self.pool.begin().await.unwrap();
        sqlx::query("INSERT INTO orders (id, customer) VALUES ($1, $2)")
            .bind(order_id)
            .bind(customer)
            .execute(&mut *tx)
            .await
            .unwrap();
        outbox.enqueue(&mut tx, &order_event(order_id, customer)).await.unwrap();
        tx.commit().await.unwrap();
    }

    async fn charge(&self, message: &Incoming) -> wharf_sdk::Result<bool> {
        let inbox = PgInbox::new(self.pool.clone(), "payments");
        let id = message.message_id.clone().unwrap_or_default();
        let order = message.headers.get("order-id").cloned().unwrap_or_default();
        let mut tx = self.pool.begin().await?;
        let first = inbox.handle(&mut tx, &id).await? == Seen::First;
        if first {
            sqlx::query("INSERT INTO payments (event_id, order_id) VALUES ($1, $2)")
                .bind(&id)
                .bind(&order)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(first)
    }

    async fn payments(&self) -> Vec<(String, String)> {
        sqlx::query("SELECT event_id, order_id FROM payments ORDER BY seq")
            .fetch_all(&self.pool)
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get("event_id"), row.get("order_id")))
            .collect()
    }

    async fn unsent(&self) -> i64 {
        PgOutbox::new(self.pool.clone()).unsent_count().await.unwrap()
    }

    fn relay(&self, config: RelayConfig) -> Relay<PgOutbox> {
        Relay::new(PgOutbox::new(self.pool.clone()), config).unwrap()
    }

    fn store(&self) -> PgOutbox {
        PgOutbox::new(self.pool.clone())
    }
}

#[derive(Clone)]
pub struct SqliteShop {
    pub pool: SqlitePool,
}

impl Shop for SqliteShop {
    type Store = SqliteOutbox;

    async fn setup(&self) {
        SqliteOutbox::new(self.pool.clone()).migrate().await.unwrap();
        SqliteInbox::new(self.pool.clone(), "payments").migrate().await.unwrap();
        sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY, customer TEXT NOT NULL)")
            .execute(&self.pool)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE payments (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL, order_id TEXT NOT NULL)")
            .execute(&self.pool)
            .await
            .unwrap();
    }

    async fn place_order(&self, order_id: &str, customer: &str) {
        let outbox = SqliteOutbox::new(self.pool.clone());
        let mut tx = self.pool.begin().await.unwrap();
        sqlx::query("INSERT INTO orders (id, customer) VALUES (?, ?)")
            .bind(order_id)
            .bind(customer)
            .execute(&mut *tx)
            .await
            .unwrap();
        outbox.enqueue(&mut tx, &order_event(order_id, customer)).await.unwrap();
        tx.commit().await.unwrap();
    }

    async fn charge(&self, message: &Incoming) -> wharf_sdk::Result<bool> {
        let inbox = SqliteInbox::new(self.pool.clone(), "payments");
        let id = message.message_id.clone().unwrap_or_default();
        let order = message.headers.get("order-id").cloned().unwrap_or_default();
        let mut tx = self.pool.begin().await?;
        let first = inbox.handle(&mut tx, &id).await? == Seen::First;
        if first {
            sqlx::query("INSERT INTO payments (event_id, order_id) VALUES (?, ?)")
                .bind(&id)
                .bind(&order)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(first)
    }

    async fn payments(&self) -> Vec<(String, String)> {
        sqlx::query("SELECT event_id, order_id FROM payments ORDER BY seq")
            .fetch_all(&self.pool)
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get("event_id"), row.get("order_id")))
            .collect()
    }

    async fn unsent(&self) -> i64 {
        SqliteOutbox::new(self.pool.clone()).unsent_count().await.unwrap()
    }

    fn relay(&self, config: RelayConfig) -> Relay<SqliteOutbox> {
        Relay::new(SqliteOutbox::new(self.pool.clone()), config).unwrap()
    }

    fn store(&self) -> SqliteOutbox {
        SqliteOutbox::new(self.pool.clone())
    }
}

/// A relay configuration for tests: short poll and lease so recoveries happen quickly.
pub fn relay_config(url: &str) -> RelayConfig {
    let mut config = RelayConfig::new(url);
    config.poll_interval_ms = 50;
    config.lease_ms = 1_000;
    config.publisher.reconnect_delay_ms_max = 500;
    config.batch_size = 100;
    config
}

/// Waits until `done` holds, checking every 20 ms (for effects that land in a database, which
/// offers nothing to await); panics after `PATIENCE`.
pub async fn eventually<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while !done().await {
        assert!(started.elapsed() < PATIENCE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Clone)]
pub struct MySqlShop {
    pub pool: MySqlPool,
}

impl Shop for MySqlShop {
    type Store = MySqlOutbox;

    async fn setup(&self) {
        MySqlOutbox::new(self.pool.clone()).migrate().await.unwrap();
        MySqlInbox::new(self.pool.clone(), "payments").migrate().await.unwrap();
        sqlx::query("CREATE TABLE orders (id VARCHAR(255) PRIMARY KEY, customer VARCHAR(255) NOT NULL)")
            .execute(&self.pool)
            .await
            .unwrap();
        sqlx::query(
            "CREATE TABLE payments (seq BIGINT AUTO_INCREMENT PRIMARY KEY, event_id VARCHAR(255) NOT NULL, order_id VARCHAR(255) NOT NULL)",
        )
        .execute(&self.pool)
        .await
        .unwrap();
    }

    async fn place_order(&self, order_id: &str, customer: &str) {
        let outbox = MySqlOutbox::new(self.pool.clone());
        let mut tx = self.pool.begin().await.unwrap();
        sqlx::query("INSERT INTO orders (id, customer) VALUES (?, ?)")
            .bind(order_id)
            .bind(customer)
            .execute(&mut *tx)
            .await
            .unwrap();
        outbox.enqueue(&mut tx, &order_event(order_id, customer)).await.unwrap();
        tx.commit().await.unwrap();
    }

    async fn charge(&self, message: &Incoming) -> wharf_sdk::Result<bool> {
        let inbox = MySqlInbox::new(self.pool.clone(), "payments");
        let id = message.message_id.clone().unwrap_or_default();
        let order = message.headers.get("order-id").cloned().unwrap_or_default();
        let mut tx = self.pool.begin().await?;
        let first = inbox.handle(&mut tx, &id).await? == Seen::First;
        if first {
            sqlx::query("INSERT INTO payments (event_id, order_id) VALUES (?, ?)")
                .bind(&id)
                .bind(&order)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(first)
    }

    async fn payments(&self) -> Vec<(String, String)> {
        sqlx::query("SELECT event_id, order_id FROM payments ORDER BY seq")
            .fetch_all(&self.pool)
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get("event_id"), row.get("order_id")))
            .collect()
    }

    async fn unsent(&self) -> i64 {
        MySqlOutbox::new(self.pool.clone()).unsent_count().await.unwrap()
    }

    fn relay(&self, config: RelayConfig) -> Relay<MySqlOutbox> {
        Relay::new(MySqlOutbox::new(self.pool.clone()), config).unwrap()
    }

    fn store(&self) -> MySqlOutbox {
        MySqlOutbox::new(self.pool.clone())
    }
}
