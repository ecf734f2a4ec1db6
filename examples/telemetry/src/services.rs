//! The two services that consume readings, each a `wharf_sdk::Handler` over its own SQLite
//! database. A reading from MQTT has no AMQP `message-id` (MQTT 3.1.1 has no such property), so
//! the inbox key is the reading's own identity, (device, sequence number), which a device sends
//! again unchanged when it publishes the same reading after a reconnect.

use crate::*;
use sqlx::{Sqlite, Transaction};
use wharf_sdk::{Inbox, Incoming, Outbox, Outcome, Seen, SqliteInbox, SqliteOutbox};

/// What a handler's attempt came to.
enum Failure {
    /// Try again (requeued with backoff).
    Transient(String),
    /// Never: rejected with the reason.
    Permanent(String),
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(error: E) -> Self {
        Failure::Transient(error.to_string())
    }
}

fn outcome(result: std::result::Result<(), Failure>) -> Outcome {
    match result {
        Ok(()) => Outcome::Ack,
        Err(Failure::Transient(reason)) => {
            tracing::warn!(%reason, "reading not handled; it will be retried");
            Outcome::Retry
        }
        Err(Failure::Permanent(reason)) => Outcome::Reject(reason),
    }
}

fn reading_of(message: &Incoming) -> std::result::Result<Reading, Failure> {
    serde_json::from_slice(&message.body).map_err(|error| {
        Failure::Permanent(format!("not a reading ({error}): {}", String::from_utf8_lossy(&message.body)))
    })
}

/// Stores each reading once: the inbox entry and the row commit together.
#[derive(Debug, Clone)]
pub struct Ingestion {
    pub pool: SqlitePool,
    inbox: SqliteInbox,
}

impl Ingestion {
    pub async fn open(database: &Path) -> Result<Ingestion> {
        let pool = open_sqlite(database).await?;
        // No uniqueness on (device, seq): a reading stored twice would show, and the chaos run
        // looks for exactly that.
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS readings (id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL,
             seq INTEGER NOT NULL, value REAL NOT NULL, redelivered INTEGER NOT NULL)",
        )
        .execute(&pool)
        .await?;
        let inbox = SqliteInbox::new(pool.clone(), "ingestion");
        inbox.migrate().await?;
        Ok(Ingestion { pool, inbox })
    }

    async fn store(&self, message: &Incoming) -> std::result::Result<(), Failure> {
        let reading = reading_of(message)?;
        let mut tx: Transaction<'static, Sqlite> = self.pool.begin().await?;
        if self.inbox.handle(&mut tx, &reading.key()).await? == Seen::Again {
            return Ok(tx.commit().await?);
        }
        sqlx::query("INSERT INTO readings (device, seq, value, redelivered) VALUES (?, ?, ?, ?)")
            .bind(&reading.device)
            .bind(reading.seq as i64)
            .bind(reading.value)
            .bind(message.redelivered)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

impl wharf_sdk::Handler for Ingestion {
    async fn handle(&self, message: Incoming) -> Outcome {
        outcome(self.store(&message).await)
    }
}

/// Raises an alert for each reading over the threshold, once: the inbox entry, the alert row and
/// the outbox row commit together.
#[derive(Debug, Clone)]
pub struct Alerting {
    pub pool: SqlitePool,
    inbox: SqliteInbox,
    outbox: SqliteOutbox,
}

impl Alerting {
    pub async fn open(database: &Path) -> Result<Alerting> {
        let pool = open_sqlite(database).await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS alerts (id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL,
             seq INTEGER NOT NULL, value REAL NOT NULL)",
        )
        .execute(&pool)
        .await?;
        let inbox = SqliteInbox::new(pool.clone(), "alerting");
        inbox.migrate().await?;
        let outbox = SqliteOutbox::new(pool.clone());
        outbox.migrate().await?;
        Ok(Alerting { pool, inbox, outbox })
    }

    async fn check(&self, message: &Incoming) -> std::result::Result<(), Failure> {
        let reading = reading_of(message)?;
        let mut tx: Transaction<'static, Sqlite> = self.pool.begin().await?;
        if self.inbox.handle(&mut tx, &reading.key()).await? == Seen::Again || !reading.crosses_threshold() {
            return Ok(tx.commit().await?);
        }
        let alert = Alert { device: reading.device, seq: reading.seq, value: reading.value };
        sqlx::query("INSERT INTO alerts (device, seq, value) VALUES (?, ?, ?)")
            .bind(&alert.device)
            .bind(alert.seq as i64)
            .bind(alert.value)
            .execute(&mut *tx)
            .await?;
        self.outbox.publish_keyed(&mut tx, &alert, &alert.idempotency_key()).await?;
        tx.commit().await?;
        Ok(())
    }
}

impl wharf_sdk::Handler for Alerting {
    async fn handle(&self, message: Incoming) -> Outcome {
        outcome(self.check(&message).await)
    }
}

/// The relay settings: a short poll and lease, so the chaos run's kills heal fast.
fn relay_config(broker_url: &str) -> wharf_sdk::RelayConfig {
    let mut config = wharf_sdk::RelayConfig::new(broker_url);
    config.poll_interval_ms = 100;
    config.lease_ms = 5_000;
    config
}

/// Runs the ingestion service until SIGTERM/SIGINT.
pub async fn run_ingestion(broker_url: &str, database: &Path) -> Result<()> {
    init_logging("ingestion");
    declare_topology_when_up(broker_url).await?;
    let handler = Ingestion::open(database).await?;
    let wharf = wharf_sdk::Wharf::builder(broker_url)
        .inbox(handler.inbox.clone())
        .consumer(wharf_sdk::ConsumerConfig::new(broker_url, INGESTION_QUEUE), handler)
        .start()
        .await?;
    terminated().await;
    wharf.shutdown().await?;
    Ok(())
}

/// Runs the alerting service until SIGTERM/SIGINT.
pub async fn run_alerting(broker_url: &str, database: &Path) -> Result<()> {
    init_logging("alerting");
    declare_topology_when_up(broker_url).await?;
    let handler = Alerting::open(database).await?;
    let wharf = wharf_sdk::Wharf::builder(broker_url)
        .outbox_with(handler.outbox.clone(), relay_config(broker_url))
        .inbox(handler.inbox.clone())
        .consumer(wharf_sdk::ConsumerConfig::new(broker_url, ALERTING_QUEUE), handler)
        .start()
        .await?;
    terminated().await;
    wharf.shutdown().await?;
    Ok(())
}
