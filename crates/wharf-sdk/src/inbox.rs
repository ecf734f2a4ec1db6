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

use crate::Result;

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

/// Deletes old entries every `interval` until `shutdown` turns true (run it next to the
/// consumer).
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
    }

    impl PgInbox {
        /// The inbox of `consumer` (a name that stays the same across restarts, such as
        /// `payment-service`).
        pub fn new(pool: PgPool, consumer: impl Into<String>) -> PgInbox {
            PgInbox { pool, consumer: consumer.into() }
        }

        /// Creates the inbox table if it is missing (idempotent).
        pub async fn migrate(&self) -> Result<()> {
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS wharf_inbox (
                    consumer TEXT NOT NULL,
                    message_id TEXT NOT NULL,
                    processed_at BIGINT NOT NULL,
                    PRIMARY KEY (consumer, message_id))",
            )
            .execute(&self.pool)
            .await?;
            sqlx::query("CREATE INDEX IF NOT EXISTS wharf_inbox_processed ON wharf_inbox (processed_at)")
                .execute(&self.pool)
                .await?;
            Ok(())
        }

        /// Records `message_id` for this consumer inside the caller's transaction and says
        /// whether it was new. A concurrent transaction recording the same id waits for the first
        /// one and then sees `Again` (or `First`, if the first rolled back).
        pub async fn handle(&self, tx: &mut Transaction<'_, Postgres>, message_id: &str) -> Result<Seen> {
            check_id(message_id)?;
            let inserted = sqlx::query(
                "INSERT INTO wharf_inbox (consumer, message_id, processed_at) VALUES ($1, $2, $3)
                 ON CONFLICT (consumer, message_id) DO NOTHING",
            )
            .bind(&self.consumer)
            .bind(message_id)
            .bind(now_ms())
            .execute(&mut **tx)
            .await?;
            Ok(if inserted.rows_affected() == 1 { Seen::First } else { Seen::Again })
        }

        /// Deletes entries older than `retention_ms`; returns how many.
        pub async fn purge(&self, retention_ms: i64) -> Result<u64> {
            let done = sqlx::query("DELETE FROM wharf_inbox WHERE consumer = $1 AND processed_at < $2")
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
    }

    impl SqliteInbox {
        /// The inbox of `consumer`.
        pub fn new(pool: SqlitePool, consumer: impl Into<String>) -> SqliteInbox {
            SqliteInbox { pool, consumer: consumer.into() }
        }

        /// Creates the inbox table if it is missing (idempotent).
        pub async fn migrate(&self) -> Result<()> {
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS wharf_inbox (
                    consumer TEXT NOT NULL,
                    message_id TEXT NOT NULL,
                    processed_at INTEGER NOT NULL,
                    PRIMARY KEY (consumer, message_id))",
            )
            .execute(&self.pool)
            .await?;
            sqlx::query("CREATE INDEX IF NOT EXISTS wharf_inbox_processed ON wharf_inbox (processed_at)")
                .execute(&self.pool)
                .await?;
            Ok(())
        }

        /// Records `message_id` for this consumer inside the caller's transaction and says
        /// whether it was new.
        pub async fn handle(&self, tx: &mut Transaction<'_, Sqlite>, message_id: &str) -> Result<Seen> {
            check_id(message_id)?;
            let inserted = sqlx::query(
                "INSERT INTO wharf_inbox (consumer, message_id, processed_at) VALUES (?, ?, ?)
                 ON CONFLICT (consumer, message_id) DO NOTHING",
            )
            .bind(&self.consumer)
            .bind(message_id)
            .bind(now_ms())
            .execute(&mut **tx)
            .await?;
            Ok(if inserted.rows_affected() == 1 { Seen::First } else { Seen::Again })
        }

        /// Deletes entries older than `retention_ms`; returns how many.
        pub async fn purge(&self, retention_ms: i64) -> Result<u64> {
            let done = sqlx::query("DELETE FROM wharf_inbox WHERE consumer = ? AND processed_at < ?")
                .bind(&self.consumer)
                .bind(now_ms().saturating_sub(retention_ms))
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected())
        }
    }
}
