//! The transactional outbox: a table the SDK creates (`migrate`), rows written by
//! `enqueue` inside the caller's own database transaction, and the operations the
//! [`Relay`](crate::Relay) runs on it ([`OutboxStore`]), for PostgreSQL ([`PgOutbox`]) and SQLite
//! ([`SqliteOutbox`]).
//!
//! Claiming is what keeps order and lets several relays share a table: a row can be claimed only
//! while it is pending, its claim lease (if any) has run out, and no earlier row with the same
//! ordering key is still unsent. So each ordering key has at most one row in flight, published
//! only after every earlier one was confirmed and marked sent; rows without a key go in bulk. On
//! PostgreSQL the claim takes `FOR UPDATE SKIP LOCKED`, so relays never wait on each other or
//! claim the same row; on SQLite the claim is one `UPDATE` statement, which SQLite serialises. A
//! relay that dies holding claims loses them when the lease runs out; another relay (or the same
//! one, restarted) publishes those rows again with the same message ids.
//!
//! A row the relay can never publish (unknown exchange, body too large) is marked failed with
//! the reason. It keeps blocking later rows with the same ordering key (they must not overtake
//! it), never rows of other keys; `retry_failed` puts it back.

use crate::Result;
use crate::event::Event;
use std::future::Future;
use std::time::Duration;

/// Row states.
const PENDING: i16 = 0;
const SENT: i16 = 1;
const FAILED: i16 = 2;

/// A claimed outbox row.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Position in the table (write order).
    pub seq: i64,
    /// The event it holds.
    pub event: Event,
    /// How many times it has been claimed (including this one).
    pub attempts: i32,
}

/// What the relay needs from an outbox table.
pub trait OutboxStore: Send + Sync + 'static {
    /// Claims up to `limit` publishable rows for `relay` until `now_ms + lease_ms`.
    fn claim(
        &self,
        relay: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: i64,
    ) -> impl Future<Output = Result<Vec<OutboxRow>>> + Send;
    /// Marks rows sent (their publishes were confirmed).
    fn mark_sent(&self, seqs: &[i64], now_ms: i64) -> impl Future<Output = Result<()>> + Send;
    /// Marks a row failed for good, with the reason.
    fn mark_failed(&self, seq: i64, reason: &str) -> impl Future<Output = Result<()>> + Send;
    /// Gives rows `relay` claimed back (their publish did not go through: the broker was
    /// unreachable), for another attempt. Rows another relay claimed since are left alone.
    fn release(&self, relay: &str, seqs: &[i64]) -> impl Future<Output = Result<()>> + Send;
    /// The broker refused a row (nack, or no queue took it): counts the refusal and gives the
    /// row back, or marks it failed with `reason` once it was refused `limit` times. Returns true
    /// if it is now failed.
    fn refuse(&self, seq: i64, reason: &str, limit: i32) -> impl Future<Output = Result<bool>> + Send;
    /// Deletes rows sent before `sent_before_ms`; returns how many.
    fn purge_sent(&self, sent_before_ms: i64) -> impl Future<Output = Result<u64>> + Send;
    /// Waits until new rows may be there (a notification, or `timeout`).
    fn wait_for_work(&self, timeout: Duration) -> impl Future<Output = ()> + Send;
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as i64)
}

fn row_event(
    id: String,
    exchange: String,
    routing_key: String,
    ordering_key: Option<String>,
    headers: String,
    content_type: Option<String>,
    body: Vec<u8>,
) -> Event {
    Event { id, exchange, routing_key, ordering_key, headers: Event::headers_from_json(&headers), content_type, body }
}

/// Claimable: pending, lease over, and no earlier unsent row with the same ordering key.
const CLAIMABLE: &str = "o.status = 0 AND (o.claimed_until IS NULL OR o.claimed_until < {now}) \
     AND (o.ordering_key IS NULL OR NOT EXISTS (SELECT 1 FROM wharf_outbox e \
     WHERE e.ordering_key = o.ordering_key AND e.seq < o.seq AND e.status <> 1))";

#[cfg(feature = "postgres")]
pub use postgres::PgOutbox;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteOutbox;

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use sqlx::postgres::{PgListener, PgPool};
    use sqlx::{Postgres, Row, Transaction};
    use tokio::sync::Mutex;

    /// The notification channel `enqueue` signals and relays listen on.
    const CHANNEL: &str = "wharf_outbox";

    const MIGRATION: &[&str] = &[
        "CREATE TABLE IF NOT EXISTS wharf_outbox (
            seq BIGSERIAL PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            exchange TEXT NOT NULL,
            routing_key TEXT NOT NULL,
            ordering_key TEXT,
            headers TEXT NOT NULL DEFAULT '{}',
            content_type TEXT,
            body BYTEA NOT NULL,
            created_at BIGINT NOT NULL,
            status SMALLINT NOT NULL DEFAULT 0,
            claimed_by TEXT,
            claimed_until BIGINT,
            attempts INTEGER NOT NULL DEFAULT 0,
            refusals INTEGER NOT NULL DEFAULT 0,
            sent_at BIGINT,
            failure TEXT)",
        "CREATE INDEX IF NOT EXISTS wharf_outbox_pending ON wharf_outbox (seq) WHERE status = 0",
        "CREATE INDEX IF NOT EXISTS wharf_outbox_unsent_by_key ON wharf_outbox (ordering_key, seq) WHERE status <> 1",
        "CREATE INDEX IF NOT EXISTS wharf_outbox_sent ON wharf_outbox (sent_at) WHERE status = 1",
    ];

    /// The outbox in a PostgreSQL database.
    #[derive(Debug)]
    pub struct PgOutbox {
        pool: PgPool,
        listener: Mutex<Option<PgListener>>,
    }

    impl PgOutbox {
        /// The outbox in the database `pool` connects to.
        pub fn new(pool: PgPool) -> PgOutbox {
            PgOutbox { pool, listener: Mutex::new(None) }
        }

        /// Creates the outbox table and its indexes if they are missing (idempotent).
        pub async fn migrate(&self) -> Result<()> {
            for statement in MIGRATION {
                sqlx::query(statement).execute(&self.pool).await?;
            }
            Ok(())
        }

        /// Writes `event` into the outbox inside the caller's transaction: it is published if and
        /// only if the transaction commits. Relays listening are woken at commit.
        pub async fn enqueue(&self, tx: &mut Transaction<'_, Postgres>, event: &Event) -> Result<()> {
            event.check()?;
            sqlx::query(
                "INSERT INTO wharf_outbox (id, exchange, routing_key, ordering_key, headers, content_type, body, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&event.id)
            .bind(&event.exchange)
            .bind(&event.routing_key)
            .bind(&event.ordering_key)
            .bind(event.headers_json())
            .bind(&event.content_type)
            .bind(&event.body)
            .bind(now_ms())
            .execute(&mut **tx)
            .await?;
            sqlx::query("SELECT pg_notify($1, '')").bind(CHANNEL).execute(&mut **tx).await?;
            Ok(())
        }

        /// Puts a failed row back to pending (after the cause was fixed, say the exchange now
        /// exists). Returns false if no failed row has that id.
        pub async fn retry_failed(&self, id: &str) -> Result<bool> {
            let done = sqlx::query(
                "UPDATE wharf_outbox SET status = 0, failure = NULL, claimed_by = NULL, claimed_until = NULL
                 WHERE id = $1 AND status = 2",
            )
            .bind(id)
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        }

        /// Failed rows: (id, reason).
        pub async fn failed(&self) -> Result<Vec<(String, String)>> {
            let rows = sqlx::query(
                "SELECT id, COALESCE(failure, '') AS failure FROM wharf_outbox WHERE status = $1 ORDER BY seq",
            )
            .bind(FAILED)
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(|row| Ok((row.try_get("id")?, row.try_get("failure")?))).collect()
        }

        /// Rows not yet sent (pending or failed).
        pub async fn unsent_count(&self) -> Result<i64> {
            Ok(sqlx::query("SELECT COUNT(*) AS n FROM wharf_outbox WHERE status <> $1")
                .bind(SENT)
                .fetch_one(&self.pool)
                .await?
                .try_get("n")?)
        }
    }

    impl OutboxStore for PgOutbox {
        async fn claim(&self, relay: &str, now_ms: i64, lease_ms: i64, limit: i64) -> Result<Vec<OutboxRow>> {
            let sql = format!(
                "WITH candidates AS (
                    SELECT o.seq FROM wharf_outbox o WHERE {}
                    ORDER BY o.seq LIMIT $4 FOR UPDATE SKIP LOCKED)
                 UPDATE wharf_outbox w SET claimed_by = $1, claimed_until = $3, attempts = w.attempts + 1
                 FROM candidates WHERE w.seq = candidates.seq
                 RETURNING w.seq, w.id, w.exchange, w.routing_key, w.ordering_key, w.headers, w.content_type, w.body, w.attempts",
                CLAIMABLE.replace("{now}", "$2")
            );
            let rows = sqlx::query(&sql)
                .bind(relay)
                .bind(now_ms)
                .bind(now_ms.saturating_add(lease_ms))
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
            let mut claimed = rows
                .iter()
                .map(|row| {
                    Ok(OutboxRow {
                        seq: row.try_get("seq")?,
                        attempts: row.try_get("attempts")?,
                        event: row_event(
                            row.try_get("id")?,
                            row.try_get("exchange")?,
                            row.try_get("routing_key")?,
                            row.try_get("ordering_key")?,
                            row.try_get("headers")?,
                            row.try_get("content_type")?,
                            row.try_get("body")?,
                        ),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            claimed.sort_by_key(|row| row.seq);
            Ok(claimed)
        }

        async fn mark_sent(&self, seqs: &[i64], now_ms: i64) -> Result<()> {
            if seqs.is_empty() {
                return Ok(());
            }
            sqlx::query(
                "UPDATE wharf_outbox SET status = $1, sent_at = $2, claimed_by = NULL, claimed_until = NULL
                 WHERE seq = ANY($3)",
            )
            .bind(SENT)
            .bind(now_ms)
            .bind(seqs)
            .execute(&self.pool)
            .await?;
            Ok(())
        }

        async fn mark_failed(&self, seq: i64, reason: &str) -> Result<()> {
            sqlx::query("UPDATE wharf_outbox SET status = $1, failure = $2, claimed_by = NULL, claimed_until = NULL WHERE seq = $3")
                .bind(FAILED)
                .bind(reason)
                .bind(seq)
                .execute(&self.pool)
                .await?;
            Ok(())
        }

        async fn release(&self, relay: &str, seqs: &[i64]) -> Result<()> {
            if seqs.is_empty() {
                return Ok(());
            }
            sqlx::query(
                "UPDATE wharf_outbox SET claimed_by = NULL, claimed_until = NULL
                 WHERE seq = ANY($1) AND status = $2 AND claimed_by = $3",
            )
            .bind(seqs)
            .bind(PENDING)
            .bind(relay)
            .execute(&self.pool)
            .await?;
            Ok(())
        }

        async fn refuse(&self, seq: i64, reason: &str, limit: i32) -> Result<bool> {
            let row = sqlx::query(
                "UPDATE wharf_outbox SET refusals = refusals + 1, claimed_by = NULL, claimed_until = NULL,
                    status = CASE WHEN refusals + 1 >= $1 THEN $2 ELSE status END,
                    failure = CASE WHEN refusals + 1 >= $1 THEN $3 ELSE failure END
                 WHERE seq = $4 RETURNING status",
            )
            .bind(limit)
            .bind(FAILED)
            .bind(reason)
            .bind(seq)
            .fetch_optional(&self.pool)
            .await?;
            Ok(match row {
                Some(row) => row.try_get::<i16, _>("status")? == FAILED,
                None => false,
            })
        }

        async fn purge_sent(&self, sent_before_ms: i64) -> Result<u64> {
            let done = sqlx::query("DELETE FROM wharf_outbox WHERE status = $1 AND sent_at < $2")
                .bind(SENT)
                .bind(sent_before_ms)
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected())
        }

        async fn wait_for_work(&self, timeout: Duration) {
            let mut listener = self.listener.lock().await;
            if listener.is_none() {
                match PgListener::connect_with(&self.pool).await {
                    Ok(mut connected) => match connected.listen(CHANNEL).await {
                        Ok(()) => *listener = Some(connected),
                        Err(error) => tracing::warn!(%error, "LISTEN failed; polling instead"),
                    },
                    Err(error) => tracing::warn!(%error, "could not open a listening connection; polling instead"),
                }
            }
            match listener.as_mut() {
                Some(connected) => match tokio::time::timeout(timeout, connected.recv()).await {
                    Ok(Ok(_)) | Err(_) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "the listening connection broke; reconnecting next time");
                        *listener = None;
                    }
                },
                None => tokio::time::sleep(timeout).await,
            }
        }
    }
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use sqlx::sqlite::SqlitePool;
    use sqlx::{Row, Sqlite, Transaction};

    const MIGRATION: &[&str] = &[
        "CREATE TABLE IF NOT EXISTS wharf_outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            exchange TEXT NOT NULL,
            routing_key TEXT NOT NULL,
            ordering_key TEXT,
            headers TEXT NOT NULL DEFAULT '{}',
            content_type TEXT,
            body BLOB NOT NULL,
            created_at INTEGER NOT NULL,
            status INTEGER NOT NULL DEFAULT 0,
            claimed_by TEXT,
            claimed_until INTEGER,
            attempts INTEGER NOT NULL DEFAULT 0,
            refusals INTEGER NOT NULL DEFAULT 0,
            sent_at INTEGER,
            failure TEXT)",
        "CREATE INDEX IF NOT EXISTS wharf_outbox_pending ON wharf_outbox (seq) WHERE status = 0",
        "CREATE INDEX IF NOT EXISTS wharf_outbox_unsent_by_key ON wharf_outbox (ordering_key, seq) WHERE status <> 1",
        "CREATE INDEX IF NOT EXISTS wharf_outbox_sent ON wharf_outbox (sent_at) WHERE status = 1",
    ];

    /// The outbox in a SQLite database file.
    #[derive(Debug, Clone)]
    pub struct SqliteOutbox {
        pool: SqlitePool,
    }

    fn placeholders(count: usize) -> String {
        vec!["?"; count].join(", ")
    }

    impl SqliteOutbox {
        /// The outbox in the database `pool` opens (use WAL mode and a busy timeout when several
        /// processes share the file).
        pub fn new(pool: SqlitePool) -> SqliteOutbox {
            SqliteOutbox { pool }
        }

        /// Creates the outbox table and its indexes if they are missing (idempotent).
        pub async fn migrate(&self) -> Result<()> {
            for statement in MIGRATION {
                sqlx::query(statement).execute(&self.pool).await?;
            }
            Ok(())
        }

        /// Writes `event` into the outbox inside the caller's transaction: it is published if and
        /// only if the transaction commits.
        pub async fn enqueue(&self, tx: &mut Transaction<'_, Sqlite>, event: &Event) -> Result<()> {
            event.check()?;
            sqlx::query(
                "INSERT INTO wharf_outbox (id, exchange, routing_key, ordering_key, headers, content_type, body, created_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&event.id)
            .bind(&event.exchange)
            .bind(&event.routing_key)
            .bind(&event.ordering_key)
            .bind(event.headers_json())
            .bind(&event.content_type)
            .bind(&event.body)
            .bind(now_ms())
            .execute(&mut **tx)
            .await?;
            Ok(())
        }

        /// Puts a failed row back to pending. Returns false if no failed row has that id.
        pub async fn retry_failed(&self, id: &str) -> Result<bool> {
            let done = sqlx::query(
                "UPDATE wharf_outbox SET status = 0, failure = NULL, claimed_by = NULL, claimed_until = NULL
                 WHERE id = ? AND status = 2",
            )
            .bind(id)
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() == 1)
        }

        /// Failed rows: (id, reason).
        pub async fn failed(&self) -> Result<Vec<(String, String)>> {
            let rows = sqlx::query(
                "SELECT id, COALESCE(failure, '') AS failure FROM wharf_outbox WHERE status = ? ORDER BY seq",
            )
            .bind(FAILED)
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(|row| Ok((row.try_get("id")?, row.try_get("failure")?))).collect()
        }

        /// Rows not yet sent (pending or failed).
        pub async fn unsent_count(&self) -> Result<i64> {
            Ok(sqlx::query("SELECT COUNT(*) AS n FROM wharf_outbox WHERE status <> ?")
                .bind(SENT)
                .fetch_one(&self.pool)
                .await?
                .try_get("n")?)
        }
    }

    impl OutboxStore for SqliteOutbox {
        async fn claim(&self, relay: &str, now_ms: i64, lease_ms: i64, limit: i64) -> Result<Vec<OutboxRow>> {
            let sql = format!(
                "UPDATE wharf_outbox SET claimed_by = ?, claimed_until = ?, attempts = attempts + 1
                 WHERE seq IN (SELECT o.seq FROM wharf_outbox o WHERE {} ORDER BY o.seq LIMIT ?)
                 RETURNING seq, id, exchange, routing_key, ordering_key, headers, content_type, body, attempts",
                CLAIMABLE.replace("{now}", "?")
            );
            let rows = sqlx::query(&sql)
                .bind(relay)
                .bind(now_ms.saturating_add(lease_ms))
                .bind(now_ms)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
            let mut claimed = rows
                .iter()
                .map(|row| {
                    Ok(OutboxRow {
                        seq: row.try_get("seq")?,
                        attempts: row.try_get("attempts")?,
                        event: row_event(
                            row.try_get("id")?,
                            row.try_get("exchange")?,
                            row.try_get("routing_key")?,
                            row.try_get("ordering_key")?,
                            row.try_get("headers")?,
                            row.try_get("content_type")?,
                            row.try_get("body")?,
                        ),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            claimed.sort_by_key(|row| row.seq);
            Ok(claimed)
        }

        async fn mark_sent(&self, seqs: &[i64], now_ms: i64) -> Result<()> {
            for chunk in seqs.chunks(500) {
                let sql = format!(
                    "UPDATE wharf_outbox SET status = ?, sent_at = ?, claimed_by = NULL, claimed_until = NULL WHERE seq IN ({})",
                    placeholders(chunk.len())
                );
                let mut query = sqlx::query(&sql).bind(SENT).bind(now_ms);
                for seq in chunk {
                    query = query.bind(seq);
                }
                query.execute(&self.pool).await?;
            }
            Ok(())
        }

        async fn mark_failed(&self, seq: i64, reason: &str) -> Result<()> {
            sqlx::query("UPDATE wharf_outbox SET status = ?, failure = ?, claimed_by = NULL, claimed_until = NULL WHERE seq = ?")
                .bind(FAILED)
                .bind(reason)
                .bind(seq)
                .execute(&self.pool)
                .await?;
            Ok(())
        }

        async fn release(&self, relay: &str, seqs: &[i64]) -> Result<()> {
            for chunk in seqs.chunks(500) {
                let sql = format!(
                    "UPDATE wharf_outbox SET claimed_by = NULL, claimed_until = NULL
                     WHERE status = ? AND claimed_by = ? AND seq IN ({})",
                    placeholders(chunk.len())
                );
                let mut query = sqlx::query(&sql).bind(PENDING).bind(relay);
                for seq in chunk {
                    query = query.bind(seq);
                }
                query.execute(&self.pool).await?;
            }
            Ok(())
        }

        async fn refuse(&self, seq: i64, reason: &str, limit: i32) -> Result<bool> {
            let row = sqlx::query(
                "UPDATE wharf_outbox SET refusals = refusals + 1, claimed_by = NULL, claimed_until = NULL,
                    status = CASE WHEN refusals + 1 >= ? THEN ? ELSE status END,
                    failure = CASE WHEN refusals + 1 >= ? THEN ? ELSE failure END
                 WHERE seq = ? RETURNING status",
            )
            .bind(limit)
            .bind(FAILED)
            .bind(limit)
            .bind(reason)
            .bind(seq)
            .fetch_optional(&self.pool)
            .await?;
            Ok(match row {
                Some(row) => row.try_get::<i64, _>("status")? == i64::from(FAILED),
                None => false,
            })
        }

        async fn purge_sent(&self, sent_before_ms: i64) -> Result<u64> {
            let done = sqlx::query("DELETE FROM wharf_outbox WHERE status = ? AND sent_at < ?")
                .bind(SENT)
                .bind(sent_before_ms)
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected())
        }

        async fn wait_for_work(&self, timeout: Duration) {
            // SQLite has no notifications: poll.
            tokio::time::sleep(timeout).await;
        }
    }
}
