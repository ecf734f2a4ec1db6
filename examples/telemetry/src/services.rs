//! The two services that consume readings, each a `wharf_sdk::Handler` over its own database,
//! SQLite or PostgreSQL ([`Database`]): the same statements on both but for the placeholders and
//! column types, written once per database by a macro over the pool and inbox types. A reading from MQTT has no AMQP `message-id` (MQTT 3.1.1 has no such property), so
//! the inbox key is the reading's own identity, (device, sequence number), which a device sends
//! again unchanged when it publishes the same reading after a reconnect.

use crate::*;
use wharf_sdk::{Inbox, Incoming, Outbox, Outcome, PgInbox, PgOutbox, Seen, SqliteInbox, SqliteOutbox};

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

/// The readings table: no uniqueness on (device, seq), since a reading stored twice must show
/// (the chaos run looks for exactly that).
const READINGS_SQLITE: &str = "CREATE TABLE IF NOT EXISTS readings (id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL, seq INTEGER NOT NULL, value REAL NOT NULL, redelivered INTEGER NOT NULL)";
const READINGS_POSTGRES: &str = "CREATE TABLE IF NOT EXISTS readings (id BIGSERIAL PRIMARY KEY,
    device TEXT NOT NULL, seq BIGINT NOT NULL, value DOUBLE PRECISION NOT NULL, redelivered BOOLEAN NOT NULL)";
const ALERTS_SQLITE: &str = "CREATE TABLE IF NOT EXISTS alerts (id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL, seq INTEGER NOT NULL, value REAL NOT NULL)";
const ALERTS_POSTGRES: &str = "CREATE TABLE IF NOT EXISTS alerts (id BIGSERIAL PRIMARY KEY,
    device TEXT NOT NULL, seq BIGINT NOT NULL, value DOUBLE PRECISION NOT NULL)";

/// A service's pool with its inbox (and outbox), on one database or the other.
#[derive(Debug, Clone)]
enum Store<S, P> {
    Sqlite(SqlitePool, SqliteInbox, S),
    Postgres(sqlx::PgPool, PgInbox, P),
}

impl<S, P> Store<S, P> {
    fn pool(&self) -> Pool {
        match self {
            Store::Sqlite(pool, ..) => Pool::Sqlite(pool.clone()),
            Store::Postgres(pool, ..) => Pool::Postgres(pool.clone()),
        }
    }
}

/// Stores each reading once: the inbox entry and the row commit together.
#[derive(Debug, Clone)]
pub struct Ingestion {
    store: Store<(), ()>,
}

/// One reading's transaction on `$pool` with `$inbox`, `$insert` the statement for its row.
macro_rules! store_reading {
    ($pool:expr, $inbox:expr, $insert:expr, $reading:expr, $redelivered:expr) => {{
        let mut tx = $pool.begin().await?;
        if $inbox.handle(&mut tx, &$reading.key()).await? == Seen::Again {
            return Ok(tx.commit().await?);
        }
        sqlx::query($insert)
            .bind(&$reading.device)
            .bind($reading.seq as i64)
            .bind($reading.value)
            .bind($redelivered)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }};
}

impl Ingestion {
    pub async fn open(database: &Database) -> Result<Ingestion> {
        let store = match database.open().await? {
            Pool::Sqlite(pool) => {
                sqlx::query(READINGS_SQLITE).execute(&pool).await?;
                let inbox = SqliteInbox::new(pool.clone(), "ingestion");
                inbox.migrate().await?;
                Store::Sqlite(pool, inbox, ())
            }
            Pool::Postgres(pool) => {
                sqlx::query(READINGS_POSTGRES).execute(&pool).await?;
                let inbox = PgInbox::new(pool.clone(), "ingestion");
                inbox.migrate().await?;
                Store::Postgres(pool, inbox, ())
            }
        };
        Ok(Ingestion { store })
    }

    /// Its database.
    pub fn pool(&self) -> Pool {
        self.store.pool()
    }

    async fn store(&self, message: &Incoming) -> std::result::Result<(), Failure> {
        let reading = reading_of(message)?;
        match &self.store {
            Store::Sqlite(pool, inbox, ()) => store_reading!(
                pool,
                inbox,
                "INSERT INTO readings (device, seq, value, redelivered) VALUES (?, ?, ?, ?)",
                reading,
                message.redelivered
            ),
            Store::Postgres(pool, inbox, ()) => store_reading!(
                pool,
                inbox,
                "INSERT INTO readings (device, seq, value, redelivered) VALUES ($1, $2, $3, $4)",
                reading,
                message.redelivered
            ),
        }
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
    store: Store<SqliteOutbox, PgOutbox>,
}

/// One reading's transaction on `$pool` with `$inbox` and `$outbox`.
macro_rules! check_reading {
    ($pool:expr, $inbox:expr, $outbox:expr, $insert:expr, $reading:expr) => {{
        let mut tx = $pool.begin().await?;
        if $inbox.handle(&mut tx, &$reading.key()).await? == Seen::Again || !$reading.crosses_threshold() {
            return Ok(tx.commit().await?);
        }
        let alert = Alert { device: $reading.device, seq: $reading.seq, value: $reading.value };
        sqlx::query($insert).bind(&alert.device).bind(alert.seq as i64).bind(alert.value).execute(&mut *tx).await?;
        $outbox.publish_keyed(&mut tx, &alert, &alert.idempotency_key()).await?;
        tx.commit().await?;
        Ok(())
    }};
}

impl Alerting {
    pub async fn open(database: &Database) -> Result<Alerting> {
        let store = match database.open().await? {
            Pool::Sqlite(pool) => {
                sqlx::query(ALERTS_SQLITE).execute(&pool).await?;
                let inbox = SqliteInbox::new(pool.clone(), "alerting");
                inbox.migrate().await?;
                let outbox = SqliteOutbox::new(pool.clone());
                outbox.migrate().await?;
                Store::Sqlite(pool, inbox, outbox)
            }
            Pool::Postgres(pool) => {
                sqlx::query(ALERTS_POSTGRES).execute(&pool).await?;
                let inbox = PgInbox::new(pool.clone(), "alerting");
                inbox.migrate().await?;
                let outbox = PgOutbox::new(pool.clone());
                outbox.migrate().await?;
                Store::Postgres(pool, inbox, outbox)
            }
        };
        Ok(Alerting { store })
    }

    /// Its database.
    pub fn pool(&self) -> Pool {
        self.store.pool()
    }

    async fn check(&self, message: &Incoming) -> std::result::Result<(), Failure> {
        let reading = reading_of(message)?;
        match &self.store {
            Store::Sqlite(pool, inbox, outbox) => {
                check_reading!(pool, inbox, outbox, "INSERT INTO alerts (device, seq, value) VALUES (?, ?, ?)", reading)
            }
            Store::Postgres(pool, inbox, outbox) => check_reading!(
                pool,
                inbox,
                outbox,
                "INSERT INTO alerts (device, seq, value) VALUES ($1, $2, $3)",
                reading
            ),
        }
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
pub async fn run_ingestion(broker_url: &str, database: &Database) -> Result<()> {
    init_logging("ingestion");
    declare_topology_when_up(broker_url).await?;
    let handler = Ingestion::open(database).await?;
    let consumer = wharf_sdk::ConsumerConfig::new(broker_url, INGESTION_QUEUE);
    let builder = wharf_sdk::Wharf::builder(broker_url);
    let wharf = match &handler.store {
        Store::Sqlite(_, inbox, ()) => builder.inbox(inbox.clone()).consumer(consumer, handler.clone()).start().await?,
        Store::Postgres(_, inbox, ()) => {
            builder.inbox(inbox.clone()).consumer(consumer, handler.clone()).start().await?
        }
    };
    terminated().await;
    wharf.shutdown().await?;
    Ok(())
}

/// Runs the alerting service until SIGTERM/SIGINT.
pub async fn run_alerting(broker_url: &str, database: &Database) -> Result<()> {
    init_logging("alerting");
    declare_topology_when_up(broker_url).await?;
    let handler = Alerting::open(database).await?;
    let consumer = wharf_sdk::ConsumerConfig::new(broker_url, ALERTING_QUEUE);
    let builder = wharf_sdk::Wharf::builder(broker_url);
    let wharf = match &handler.store {
        Store::Sqlite(_, inbox, outbox) => {
            builder
                .outbox_with(outbox.clone(), relay_config(broker_url))
                .inbox(inbox.clone())
                .consumer(consumer, handler.clone())
                .start()
                .await?
        }
        Store::Postgres(_, inbox, outbox) => {
            builder
                .outbox_with(outbox.clone(), relay_config(broker_url))
                .inbox(inbox.clone())
                .consumer(consumer, handler.clone())
                .start()
                .await?
        }
    };
    terminated().await;
    wharf.shutdown().await?;
    Ok(())
}
