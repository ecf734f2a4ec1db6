//! The outbox on SQLite: a claim is one `UPDATE … RETURNING`, which SQLite serialises with every
//! other write, so relays sharing the file never claim the same row. SQLite has no
//! notifications: relays poll.

use super::{CLAIMED_COLUMNS, FAILED, Outbox, OutboxConfig, OutboxRow, OutboxStore, PENDING, SENT, claimable};
use crate::event::Event;
use crate::names::TableName;
use crate::{Result, migrate};
use sqlx::sqlite::SqlitePool;
use sqlx::{Row, Sqlite, Transaction};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// Most `?` placeholders in one statement (SQLite's default limit is far above; chunks keep
/// statements short).
const SEQS_PER_STATEMENT: usize = 500;

/// Every statement with a fixed text, built once from the configured name.
#[derive(Debug)]
struct Statements {
    table: String,
    insert: String,
    claim: String,
    mark_failed: String,
    refuse: String,
    purge_sent: String,
    retry_failed: String,
    failed: String,
    unsent: String,
    stats: String,
}

impl Statements {
    fn new(table: &str) -> Statements {
        Statements {
            table: table.to_owned(),
            insert: format!(
                "INSERT INTO {table} (id, exchange, routing_key, ordering_key, headers, content_type, message_type,
                    correlation_id, reply_to, available_at, body, created_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
            ),
            claim: format!(
                "UPDATE {table} SET claimed_by = ?, claimed_until = ?, attempts = attempts + 1
                 WHERE seq IN (SELECT o.seq FROM {table} o WHERE {} ORDER BY o.seq LIMIT ?)
                 RETURNING {CLAIMED_COLUMNS}",
                claimable(table).replace("{now}", "?")
            ),
            mark_failed: format!(
                "UPDATE {table} SET status = ?, failure = ?, claimed_by = NULL, claimed_until = NULL WHERE seq = ?"
            ),
            refuse: format!(
                "UPDATE {table} SET refusals = refusals + 1, claimed_by = NULL, claimed_until = NULL,
                    status = CASE WHEN refusals + 1 >= ? THEN ? ELSE status END,
                    failure = CASE WHEN refusals + 1 >= ? THEN ? ELSE failure END
                 WHERE seq = ? RETURNING status"
            ),
            purge_sent: format!("DELETE FROM {table} WHERE status = ? AND sent_at < ?"),
            retry_failed: format!(
                "UPDATE {table} SET status = 0, failure = NULL, claimed_by = NULL, claimed_until = NULL
                 WHERE id = ? AND status = 2"
            ),
            failed: format!("SELECT id, COALESCE(failure, '') AS failure FROM {table} WHERE status = ? ORDER BY seq"),
            unsent: format!("SELECT COUNT(*) AS n FROM {table} WHERE status <> ?"),
            stats: format!(
                "SELECT COALESCE(SUM(CASE WHEN status = 0 THEN 1 ELSE 0 END), 0) AS unsent,
                    COALESCE(SUM(CASE WHEN status = 2 THEN 1 ELSE 0 END), 0) AS failed,
                    MIN(CASE WHEN status = 0 THEN created_at END) AS oldest
                 FROM {table} WHERE status <> 1"
            ),
        }
    }
}

fn placeholders(count: usize) -> String {
    vec!["?"; count].join(", ")
}

/// The outbox in a SQLite database file.
#[derive(Debug, Clone)]
pub struct SqliteOutbox {
    pool: SqlitePool,
    table: TableName,
    sql: Arc<Statements>,
}

impl SqliteOutbox {
    /// The outbox `wharf_outbox` in the database `pool` opens (use WAL mode and a busy timeout
    /// when several processes share the file).
    pub fn new(pool: SqlitePool) -> SqliteOutbox {
        SqliteOutbox::build(pool, TableName::default_name("wharf_outbox"))
    }

    /// The outbox with the table name of `config` (SQLite has no schemas, and no notification
    /// channel to name); refuses names that are not plain SQL names.
    pub fn with_config(pool: SqlitePool, config: &OutboxConfig) -> Result<SqliteOutbox> {
        let (table, _) = config.checked()?;
        if table.schema().is_some() {
            return Err(crate::SdkError::Config(format!(
                "'{}': SQLite has no schemas; name the table without one",
                config.table
            )));
        }
        Ok(SqliteOutbox::build(pool, table))
    }

    fn build(pool: SqlitePool, table: TableName) -> SqliteOutbox {
        let sql = Arc::new(Statements::new(&table.qualified()));
        SqliteOutbox { pool, table, sql }
    }

    /// The pool it uses.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

impl Outbox for SqliteOutbox {
    type Db = Sqlite;

    async fn migrate(&self) -> Result<()> {
        migrate::sqlite(&self.pool, migrate::Object::Outbox, &self.table).await
    }

    async fn enqueue(&self, tx: &mut Transaction<'_, Sqlite>, event: &Event) -> Result<()> {
        event.check()?;
        let (headers, trace) = event.headers_json_traced();
        let span = super::enqueue_span(event, trace.as_ref());
        async {
            let inserted = sqlx::query(&self.sql.insert)
                .bind(&event.id)
                .bind(&event.exchange)
                .bind(&event.routing_key)
                .bind(&event.ordering_key)
                .bind(headers)
                .bind(&event.content_type)
                .bind(&event.message_type)
                .bind(&event.correlation_id)
                .bind(&event.reply_to)
                .bind(event.available_at_ms)
                .bind(&event.body)
                .bind(super::now_ms())
                .execute(&mut **tx)
                .await?;
            if inserted.rows_affected() == 0 {
                return Err(super::duplicate(event));
            }
            Ok(())
        }
        .instrument(span)
        .await
    }

    async fn retry_failed(&self, id: &str) -> Result<bool> {
        let done = sqlx::query(&self.sql.retry_failed).bind(id).execute(&self.pool).await?;
        Ok(done.rows_affected() == 1)
    }

    async fn failed(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query(&self.sql.failed).bind(FAILED).fetch_all(&self.pool).await?;
        rows.iter().map(|row| Ok((row.try_get("id")?, row.try_get("failure")?))).collect()
    }

    async fn unsent_count(&self) -> Result<i64> {
        Ok(sqlx::query(&self.sql.unsent).bind(SENT).fetch_one(&self.pool).await?.try_get("n")?)
    }
}

impl OutboxStore for SqliteOutbox {
    async fn claim(&self, relay: &str, now_ms: i64, lease_ms: i64, limit: i64) -> Result<Vec<OutboxRow>> {
        let rows = sqlx::query(&self.sql.claim)
            .bind(relay)
            .bind(now_ms.saturating_add(lease_ms))
            // Twice: the lease's end and the time a delayed row comes due.
            .bind(now_ms)
            .bind(now_ms)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let mut claimed = rows.iter().map(super::claimed_row).collect::<Result<Vec<_>>>()?;
        claimed.sort_by_key(|row| row.seq);
        Ok(claimed)
    }

    async fn mark_sent(&self, seqs: &[i64], now_ms: i64) -> Result<()> {
        for chunk in seqs.chunks(SEQS_PER_STATEMENT) {
            let sql = format!(
                "UPDATE {} SET status = ?, sent_at = ?, claimed_by = NULL, claimed_until = NULL WHERE seq IN ({})",
                self.sql.table,
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
        sqlx::query(&self.sql.mark_failed).bind(FAILED).bind(reason).bind(seq).execute(&self.pool).await?;
        Ok(())
    }

    async fn release(&self, relay: &str, seqs: &[i64]) -> Result<()> {
        for chunk in seqs.chunks(SEQS_PER_STATEMENT) {
            let sql = format!(
                "UPDATE {} SET claimed_by = NULL, claimed_until = NULL WHERE status = ? AND claimed_by = ? AND seq IN ({})",
                self.sql.table,
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
        let row = sqlx::query(&self.sql.refuse)
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
        let done = sqlx::query(&self.sql.purge_sent).bind(SENT).bind(sent_before_ms).execute(&self.pool).await?;
        Ok(done.rows_affected())
    }

    async fn stats(&self) -> Result<Option<crate::observe::OutboxStats>> {
        let row = sqlx::query(&self.sql.stats).fetch_one(&self.pool).await?;
        Ok(Some(crate::observe::OutboxStats {
            unsent: row.try_get("unsent")?,
            failed: row.try_get("failed")?,
            oldest_unsent_created_at_ms: row.try_get("oldest")?,
        }))
    }

    fn table_name(&self) -> String {
        self.table.qualified()
    }

    async fn wait_for_work(&self, timeout: Duration) {
        tokio::time::sleep(timeout).await;
    }
}
