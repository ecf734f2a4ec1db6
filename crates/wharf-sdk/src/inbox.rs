//! The idempotent inbox: a table of (consumer, message id) recorded in the same transaction as
//! the handler's effect. `handle` tells the handler whether this consumer already processed the
//! message: if the transaction commits, the effect and the record are both there; if it rolls
//! back (or the process dies first), neither is, and the redelivery is processed as new. The
//! delivery is acknowledged only after the commit, so a crash between commit and ack only costs a
//! redelivery that `handle` recognises.
//!
//! Entries are kept for a retention period that must be longer than any redelivery can take
//! (the default, 7 days, is far beyond a queue's redelivery of a message its consumer keeps
//! failing on: the delivery limit sends it to the dead-letter queue long before).

use crate::names::TableName;
use crate::{Result, migrate};
use std::future::Future;
use std::sync::Arc;

/// Whether a message is new to this consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// First time: do the effect (in the same transaction).
    First,
    /// Already processed (and committed) before: skip the effect, acknowledge.
    Again,
}

/// A message without an id cannot be de-duplicated: refusing it beats treating every id-less
/// message as a duplicate of the first.
fn check_id(message_id: &str) -> Result<()> {
    if message_id.is_empty() {
        return Err(crate::SdkError::Invalid {
            id: String::new(),
            reason: "a message without a message id cannot go through the inbox".into(),
        });
    }
    Ok(())
}

/// What an exactly-once consumer needs from its inbox, on any database.
pub trait Inbox: Clone + Send + Sync + 'static {
    /// The database.
    type Db: sqlx::Database;

    /// The pool transactions are begun on (the effect's and the record's).
    fn pool(&self) -> &sqlx::Pool<Self::Db>;

    /// Creates the table or brings it to the newest version; safe to call from every replica.
    fn migrate(&self) -> impl Future<Output = Result<()>> + Send;

    /// Records `message_id` for this consumer inside the caller's transaction and says whether
    /// it was new. A concurrent transaction recording the same id waits for the first one and
    /// then sees `Again` (or `First`, if the first rolled back).
    fn handle(
        &self,
        tx: &mut sqlx::Transaction<'_, Self::Db>,
        message_id: &str,
    ) -> impl Future<Output = Result<Seen>> + Send;

    /// Deletes this consumer's entries older than `retention_ms`; returns how many.
    fn purge(&self, retention_ms: i64) -> impl Future<Output = Result<u64>> + Send;
}

/// Where an inbox lives in its database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxConfig {
    /// The table, `table` or `schema.table` (PostgreSQL). Default `wharf_inbox`.
    pub table: String,
}

impl Default for InboxConfig {
    fn default() -> InboxConfig {
        InboxConfig { table: "wharf_inbox".into() }
    }
}

/// Every statement, built once from the configured name.
#[derive(Debug)]
struct Statements {
    record: String,
    purge: String,
}

impl Statements {
    fn new(table: &TableName, placeholder: fn(usize) -> String) -> Arc<Statements> {
        let table = table.qualified();
        let [first, second, third] = [1, 2, 3].map(placeholder);
        Arc::new(Statements {
            record: format!(
                "INSERT INTO {table} (consumer, message_id, processed_at) VALUES ({first}, {second}, {third})
                 ON CONFLICT (consumer, message_id) DO NOTHING"
            ),
            purge: format!("DELETE FROM {table} WHERE consumer = {first} AND processed_at < {second}"),
        })
    }
}

/// Deletes old entries of `inbox` every `interval` until `shutdown` turns true (run it next to
/// the consumer), on any database.
pub async fn purge_inbox_periodically<I: Inbox>(
    inbox: I,
    retention_ms: i64,
    interval: std::time::Duration,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    purge_periodically(
        || {
            let inbox = inbox.clone();
            async move { inbox.purge(retention_ms).await }
        },
        interval,
        shutdown,
    )
    .await;
}

/// Runs `purge` every `interval` until `shutdown` turns true.
pub async fn purge_periodically<F, Fut>(
    mut purge: F,
    interval: std::time::Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64>>,
{
    loop {
        match purge().await {
            Ok(purged) if purged > 0 => tracing::debug!(purged, "old inbox entries deleted"),
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "purging the inbox failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = crate::relay::stopped(&mut shutdown) => return,
        }
    }
}

/// How long inbox entries are kept by default: 7 days.
pub const INBOX_RETENTION_MS_DEFAULT: i64 = 7 * 24 * 60 * 60 * 1000;

#[cfg(feature = "mysql")]
pub use mysql::MySqlInbox;
#[cfg(feature = "postgres")]
pub use postgres::PgInbox;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteInbox;

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use crate::outbox::now_ms;
    use sqlx::postgres::PgPool;
    use sqlx::{Postgres, Transaction};

    /// The inbox of one consumer in a PostgreSQL database.
    #[derive(Debug, Clone)]
    pub struct PgInbox {
        pool: PgPool,
        consumer: String,
        table: TableName,
        sql: Arc<Statements>,
    }

    impl PgInbox {
        /// The inbox of `consumer` (a name that stays the same across restarts, such as
        /// `payment-service`) in the table `wharf_inbox`.
        pub fn new(pool: PgPool, consumer: impl Into<String>) -> PgInbox {
            PgInbox::build(pool, consumer.into(), TableName::default_name("wharf_inbox"))
        }

        /// The inbox of `consumer` in the table `config` names; refuses a name that is not a
        /// plain SQL name.
        pub fn with_config(pool: PgPool, consumer: impl Into<String>, config: &InboxConfig) -> Result<PgInbox> {
            let table = TableName::parse("the inbox table", &config.table)?;
            Ok(PgInbox::build(pool, consumer.into(), table))
        }

        fn build(pool: PgPool, consumer: String, table: TableName) -> PgInbox {
            let sql = Statements::new(&table, |index| format!("${index}"));
            PgInbox { pool, consumer, table, sql }
        }
    }

    impl Inbox for PgInbox {
        type Db = Postgres;

        fn pool(&self) -> &PgPool {
            &self.pool
        }

        async fn migrate(&self) -> Result<()> {
            migrate::postgres(&self.pool, migrate::Object::Inbox, &self.table).await
        }

        async fn handle(&self, tx: &mut Transaction<'_, Postgres>, message_id: &str) -> Result<Seen> {
            check_id(message_id)?;
            let inserted = sqlx::query(&self.sql.record)
                .bind(&self.consumer)
                .bind(message_id)
                .bind(now_ms())
                .execute(&mut **tx)
                .await?;
            Ok(if inserted.rows_affected() == 1 {
                Seen::First
            } else {
                crate::observe::duplicate(&self.consumer);
                Seen::Again
            })
        }

        async fn purge(&self, retention_ms: i64) -> Result<u64> {
            let done = sqlx::query(&self.sql.purge)
                .bind(&self.consumer)
                .bind(now_ms().saturating_sub(retention_ms))
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected())
        }
    }
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use crate::outbox::now_ms;
    use sqlx::sqlite::SqlitePool;
    use sqlx::{Sqlite, Transaction};

    /// The inbox of one consumer in a SQLite database file.
    #[derive(Debug, Clone)]
    pub struct SqliteInbox {
        pool: SqlitePool,
        consumer: String,
        table: TableName,
        sql: Arc<Statements>,
    }

    impl SqliteInbox {
        /// The inbox of `consumer` in the table `wharf_inbox`.
        pub fn new(pool: SqlitePool, consumer: impl Into<String>) -> SqliteInbox {
            SqliteInbox::build(pool, consumer.into(), TableName::default_name("wharf_inbox"))
        }

        /// The inbox of `consumer` in the table `config` names (no schema: SQLite has none).
        pub fn with_config(pool: SqlitePool, consumer: impl Into<String>, config: &InboxConfig) -> Result<SqliteInbox> {
            let table = TableName::parse("the inbox table", &config.table)?;
            if table.schema().is_some() {
                return Err(crate::SdkError::Config(format!(
                    "'{}': SQLite has no schemas; name the table without one",
                    config.table
                )));
            }
            Ok(SqliteInbox::build(pool, consumer.into(), table))
        }

        fn build(pool: SqlitePool, consumer: String, table: TableName) -> SqliteInbox {
            let sql = Statements::new(&table, |_| "?".to_owned());
            SqliteInbox { pool, consumer, table, sql }
        }
    }

    impl Inbox for SqliteInbox {
        type Db = Sqlite;

        fn pool(&self) -> &SqlitePool {
            &self.pool
        }

        async fn migrate(&self) -> Result<()> {
            migrate::sqlite(&self.pool, migrate::Object::Inbox, &self.table).await
        }

        async fn handle(&self, tx: &mut Transaction<'_, Sqlite>, message_id: &str) -> Result<Seen> {
            check_id(message_id)?;
            let inserted = sqlx::query(&self.sql.record)
                .bind(&self.consumer)
                .bind(message_id)
                .bind(now_ms())
                .execute(&mut **tx)
                .await?;
            Ok(if inserted.rows_affected() == 1 {
                Seen::First
            } else {
                crate::observe::duplicate(&self.consumer);
                Seen::Again
            })
        }

        async fn purge(&self, retention_ms: i64) -> Result<u64> {
            let done = sqlx::query(&self.sql.purge)
                .bind(&self.consumer)
                .bind(now_ms().saturating_sub(retention_ms))
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected())
        }
    }
}

#[cfg(feature = "mysql")]
mod mysql {
    use super::*;
    use crate::outbox::now_ms;
    use sqlx::mysql::MySqlPool;
    use sqlx::{MySql, Transaction};

    /// The inbox of one consumer in a MySQL (or MariaDB) database.
    #[derive(Debug, Clone)]
    pub struct MySqlInbox {
        pool: MySqlPool,
        consumer: String,
        table: TableName,
        sql: Arc<Statements>,
    }

    impl MySqlInbox {
        /// The inbox of `consumer` in the table `wharf_inbox`.
        pub fn new(pool: MySqlPool, consumer: impl Into<String>) -> MySqlInbox {
            MySqlInbox::build(pool, consumer.into(), TableName::default_name("wharf_inbox"))
        }

        /// The inbox of `consumer` in the table `config` names (no database prefix: the URL
        /// chooses the database).
        pub fn with_config(pool: MySqlPool, consumer: impl Into<String>, config: &InboxConfig) -> Result<MySqlInbox> {
            let table = TableName::parse("the inbox table", &config.table)?;
            if table.schema().is_some() {
                return Err(crate::SdkError::Config(format!(
                    "'{}': name the table without a database; the connection URL chooses the database",
                    config.table
                )));
            }
            Ok(MySqlInbox::build(pool, consumer.into(), table))
        }

        fn build(pool: MySqlPool, consumer: String, table: TableName) -> MySqlInbox {
            let name = table.qualified();
            // A plain INSERT: a duplicate key is refused (after waiting, like PostgreSQL, for an
            // open transaction that inserted the same id), which MySQL rolls back alone, leaving
            // the transaction usable. (IGNORE would also store a value that does not fit cut
            // short.)
            let sql = Arc::new(Statements {
                record: format!("INSERT INTO {name} (consumer, message_id, processed_at) VALUES (?, ?, ?)"),
                purge: format!("DELETE FROM {name} WHERE consumer = ? AND processed_at < ?"),
            });
            MySqlInbox { pool, consumer, table, sql }
        }
    }

    impl Inbox for MySqlInbox {
        type Db = MySql;

        fn pool(&self) -> &MySqlPool {
            &self.pool
        }

        async fn migrate(&self) -> Result<()> {
            migrate::mysql(&self.pool, migrate::Object::Inbox, &self.table).await
        }

        async fn handle(&self, tx: &mut Transaction<'_, MySql>, message_id: &str) -> Result<Seen> {
            check_id(message_id)?;
            if message_id.chars().count() > 255 || self.consumer.chars().count() > 191 {
                return Err(crate::SdkError::Invalid {
                    id: message_id.to_owned(),
                    reason: "a message id over 255 characters, or a consumer name over 191, does not fit the inbox"
                        .into(),
                });
            }
            let inserted = sqlx::query(&self.sql.record)
                .bind(&self.consumer)
                .bind(message_id)
                .bind(now_ms())
                .execute(&mut **tx)
                .await;
            match inserted {
                Ok(_) => Ok(Seen::First),
                Err(sqlx::Error::Database(error)) if error.is_unique_violation() => {
                    crate::observe::duplicate(&self.consumer);
                    Ok(Seen::Again)
                }
                Err(error) => Err(error.into()),
            }
        }

        async fn purge(&self, retention_ms: i64) -> Result<u64> {
            let done = sqlx::query(&self.sql.purge)
                .bind(&self.consumer)
                .bind(now_ms().saturating_sub(retention_ms))
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected())
        }
    }
}
