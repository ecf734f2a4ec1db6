//! The IoT telemetry reference system on Wharf, the second use case beside food delivery:
//!
//! - devices ([`devices`]) publish readings over MQTT QoS 1, each with its own client id and a
//!   persistent session; a reading is acknowledged (PUBACK) only once the broker has it on disk;
//! - `ingestion` consumes the readings over AMQP (the MQTT publishes reach `amq.topic` with `/` as
//!   `.`) and stores each one exactly once: its inbox key is the reading's own (device, sequence
//!   number), recorded in the same database transaction as the row (SQLite by default,
//!   PostgreSQL when given a `postgres://` URL: [`Database`]);
//! - `alerting` consumes them too and, when a reading crosses the threshold, raises an [`Alert`]
//!   through its outbox in the same transaction as its inbox entry, so each alert is raised once;
//!   alerts go to a de-duplicating exchange and the `telemetry.alerts` queue;
//! - `telemetry-chaos` runs the broker and both services as separate processes, SIGKILLs them at random
//!   while the devices publish, and checks that every acknowledged reading is stored exactly once
//!   and every alert raised once.

pub mod devices;
pub mod services;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use std::path::{Path, PathBuf};
use std::time::Duration;
use wharf_sdk::Message;
use wharf_sdk::topology::{Exchange, ExchangeKind, Queue, Topology};

/// The MQTT topic of a device's readings: `telemetry/<device>/reading`.
pub fn reading_topic(device: &str) -> String {
    format!("telemetry/{device}/reading")
}

/// The AMQP binding key matching every device's readings (`telemetry/+/reading` as RabbitMQ's
/// MQTT plugin maps it).
pub const READINGS_BINDING: &str = "telemetry.*.reading";
/// The ingestion service's queue of readings.
pub const INGESTION_QUEUE: &str = "telemetry.ingestion";
/// The alerting service's queue of readings.
pub const ALERTING_QUEUE: &str = "telemetry.alerting";
/// Where alerts are published (topic, de-duplicating: a relay's re-publish is dropped).
pub const ALERTS_EXCHANGE: &str = "telemetry.alerts";
/// Where alerts end up (de-duplicating too), for whoever handles them (the chaos run counts them).
pub const ALERTS_QUEUE: &str = "telemetry.alerts";
/// A reading above this raises an alert.
pub const ALERT_THRESHOLD: f64 = 90.0;

/// What a device publishes (JSON, the MQTT payload).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// The device (its MQTT client id).
    pub device: String,
    /// The reading's number, from 1, per device: with `device`, its identity.
    pub seq: u64,
    /// The measured value.
    pub value: f64,
}

impl Reading {
    /// The reading's identity, the inbox key of both services.
    pub fn key(&self) -> String {
        format!("{}/{}", self.device, self.seq)
    }

    /// A device's `seq`th value: deterministic, about one in twenty over [`ALERT_THRESHOLD`].
    pub fn simulated(device: &str, seq: u64) -> Reading {
        let mut hash = 0xcbf2_9ce4_8422_2325_u64;
        for byte in device.bytes().chain(seq.to_le_bytes()) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        let value = 20.0 + (hash % 7400) as f64 / 100.0;
        Reading { device: device.to_owned(), seq, value }
    }

    pub fn crosses_threshold(&self) -> bool {
        self.value > ALERT_THRESHOLD
    }
}

/// An alert for a reading over the threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub device: String,
    pub seq: u64,
    pub value: f64,
}

impl Message for Alert {
    const TYPE: &'static str = "Alert";
    const EXCHANGE: &'static str = ALERTS_EXCHANGE;

    fn routing_key(&self) -> String {
        format!("alert.{}", self.device)
    }
}

impl Alert {
    /// One alert per reading: its event id is stable across a handler's retries.
    pub fn idempotency_key(&self) -> String {
        format!("{}/{}", self.device, self.seq)
    }
}

/// The exchanges and queues the services use (readings arrive through `amq.topic`).
pub fn topology() -> Topology {
    let backoff_ms = [100, 500, 2000];
    Topology::new()
        .with_exchange(Exchange::new(ALERTS_EXCHANGE, ExchangeKind::Topic).deduplicated())
        .queue(Queue::new(INGESTION_QUEUE).bind("amq.topic", READINGS_BINDING).retry_backoff_ms(backoff_ms))
        .queue(Queue::new(ALERTING_QUEUE).bind("amq.topic", READINGS_BINDING).retry_backoff_ms(backoff_ms))
        .queue(Queue::new(ALERTS_QUEUE).bind(ALERTS_EXCHANGE, "alert.*").deduplicated().delivery_limit(-1))
}

/// Declares the topology, retrying while the broker is not up yet.
pub async fn declare_topology_when_up(url: &str) -> Result<()> {
    let started = std::time::Instant::now();
    loop {
        match topology().declare(url).await {
            Ok(()) => return Ok(()),
            Err(error) if started.elapsed() < Duration::from_secs(120) => {
                tracing::info!(%error, "broker not ready; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => return Err(error).with_context(|| format!("declaring the topology on {url}")),
        }
    }
}

/// A service's SQLite database (WAL, synchronous FULL: a commit is on disk when it returns).
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

/// Where a service keeps its data: a SQLite file (the default), or a PostgreSQL database given
/// by its `postgres://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    Sqlite(PathBuf),
    Postgres(String),
}

impl std::str::FromStr for Database {
    type Err = std::convert::Infallible;

    /// A `postgres://` or `postgresql://` URL is PostgreSQL; anything else is a SQLite file.
    fn from_str(text: &str) -> std::result::Result<Database, Self::Err> {
        Ok(if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            Database::Postgres(text.to_owned())
        } else {
            Database::Sqlite(PathBuf::from(text.strip_prefix("sqlite:").unwrap_or(text)))
        })
    }
}

impl std::fmt::Display for Database {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(path) => write!(formatter, "{}", path.display()),
            Database::Postgres(url) => formatter.write_str(url),
        }
    }
}

/// An open connection pool on either database.
#[derive(Debug, Clone)]
pub enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Database {
    pub async fn open(&self) -> Result<Pool> {
        Ok(match self {
            Database::Sqlite(path) => Pool::Sqlite(open_sqlite(path).await?),
            Database::Postgres(url) => Pool::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(4)
                    .connect(url)
                    .await
                    .with_context(|| format!("connecting to {url}"))?,
            ),
        })
    }
}

impl Pool {
    /// The first column of the one row `sql` returns, as an integer (a count, say).
    pub async fn integer(&self, sql: &str) -> Result<i64> {
        use sqlx::Row;
        Ok(match self {
            Pool::Sqlite(pool) => sqlx::query(sql).fetch_one(pool).await?.try_get(0)?,
            Pool::Postgres(pool) => sqlx::query(sql).fetch_one(pool).await?.try_get(0)?,
        })
    }

    /// The (text, integer) pairs `sql` returns (its first two columns).
    pub async fn pairs(&self, sql: &str) -> Result<Vec<(String, i64)>> {
        Ok(match self {
            Pool::Sqlite(pool) => sqlx::query_as(sql).fetch_all(pool).await?,
            Pool::Postgres(pool) => sqlx::query_as(sql).fetch_all(pool).await?,
        })
    }

    /// The (text, bytes) pairs `sql` returns (its first two columns).
    pub async fn blobs(&self, sql: &str) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(match self {
            Pool::Sqlite(pool) => sqlx::query_as(sql).fetch_all(pool).await?,
            Pool::Postgres(pool) => sqlx::query_as(sql).fetch_all(pool).await?,
        })
    }
}

/// Installs logging to stderr (filter from `WHARF_LOG`, default `info`).
pub fn init_logging(service: &str) {
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
