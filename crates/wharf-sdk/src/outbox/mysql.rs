//! The outbox on MySQL 8 or MariaDB 10.6+. A claim is a transaction: select the claimable rows
//! `FOR UPDATE SKIP LOCKED` (relays never wait on each other or claim the same row), mark them
//! claimed, read them back; MySQL has no `UPDATE … RETURNING`. Writers of one ordering key lock
//! its row in `<table>_keys` until their commit, so seq order is commit order (MySQL has no
//! transaction-scoped advisory lock; see migration 5). No notifications: relays poll.

use super::{CLAIMED_COLUMNS, FAILED, Outbox, OutboxConfig, OutboxRow, OutboxStore, PENDING, SENT, claimable};
use crate::event::Event;
use crate::names::TableName;
use crate::{Result, migrate};
use sqlx::mysql::MySqlPool;
use sqlx::{MySql, Row, Transaction};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// Seqs per `IN (…)` list.
const SEQS_PER_STATEMENT: usize = 500;

/// Every statement with a fixed text, built once from the configured name.
#[derive(Debug)]
struct Statements {
    table: String,
    insert: String,
    lock_key: String,
    select_claimable: String,
    mark_failed: String,
    refuse: String,
    refused_status: String,
    purge_sent: String,
    purge_keys: String,
    retry_failed: String,
    failed: String,
    unsent: String,
    stats: String,
}

impl Statements {
    fn new(table: &TableName) -> Statements {
        let keys = table.sibling(&format!("{}_keys", table.bare()));
        let table = table.qualified();
        Statements {
            insert: format!(
                "INSERT INTO {table} (id, exchange, routing_key, ordering_key, headers, content_type, message_type,
                    correlation_id, reply_to, available_at, body, created_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ),
            lock_key: format!(
                "INSERT INTO {keys} (ordering_key) VALUES (?) ON DUPLICATE KEY UPDATE ordering_key = ordering_key"
            ),
            select_claimable: format!(
                "SELECT o.seq FROM {table} o WHERE {} ORDER BY o.seq LIMIT ? FOR UPDATE SKIP LOCKED",
                claimable(&table).replace("{now}", "?")
            ),
            mark_failed: format!(
                "UPDATE {table} SET status = ?, failure = ?, claimed_by = NULL, claimed_until = NULL WHERE seq = ?"
            ),
            refuse: format!(
                // Status and failure before the increment: MySQL assigns left to right, each
                // seeing the ones before, so this order reads the count before this refusal
                // whether assignments are sequential or simultaneous (MariaDB's option).
                "UPDATE {table} SET claimed_by = NULL, claimed_until = NULL,
                    status = CASE WHEN refusals + 1 >= ? THEN ? ELSE status END,
                    failure = CASE WHEN refusals + 1 >= ? THEN ? ELSE failure END,
                    refusals = refusals + 1
                 WHERE seq = ?"
            ),
            refused_status: format!("SELECT status FROM {table} WHERE seq = ?"),
            purge_sent: format!("DELETE FROM {table} WHERE status = ? AND sent_at < ?"),
            purge_keys: format!(
                "DELETE k FROM {keys} k WHERE NOT EXISTS \
                 (SELECT 1 FROM {table} o WHERE o.ordering_key = k.ordering_key AND o.status <> 1)"
            ),
            retry_failed: format!(
                "UPDATE {table} SET status = 0, failure = NULL, claimed_by = NULL, claimed_until = NULL
                 WHERE id = ? AND status = 2"
            ),
            failed: format!(
                "SELECT CONVERT(id USING utf8mb4) AS id, COALESCE(failure, '') AS failure FROM {table} WHERE status = ? ORDER BY seq"
            ),
            unsent: format!("SELECT COUNT(*) AS n FROM {table} WHERE status <> ?"),
            stats: format!(
                "SELECT CAST(COALESCE(SUM(CASE WHEN status = 0 THEN 1 ELSE 0 END), 0) AS SIGNED) AS unsent,
                    CAST(COALESCE(SUM(CASE WHEN status = 2 THEN 1 ELSE 0 END), 0) AS SIGNED) AS failed,
                    MIN(CASE WHEN status = 0 THEN created_at END) AS oldest
                 FROM {table} WHERE status <> 1"
            ),
            table,
        }
    }
}

/// The claimed columns, with the byte-compared (`utf8mb4_bin`) ones read back as text: sqlx
/// takes a binary collation for a binary type and will not decode it as a `String`.
fn text_columns() -> String {
    CLAIMED_COLUMNS
        .split(", ")
        .map(|column| match column.trim() {
            name @ ("id" | "ordering_key") => format!("CONVERT({name} USING utf8mb4) AS {name}"),
            other => other.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn placeholders(count: usize) -> String {
    vec!["?"; count].join(", ")
}

/// The outbox in a MySQL (or MariaDB) database.
#[derive(Debug, Clone)]
pub struct MySqlOutbox {
    pool: MySqlPool,
    table: TableName,
    sql: Arc<Statements>,
}

impl MySqlOutbox {
    /// The outbox `wharf_outbox` in the database `pool` connects to.
    pub fn new(pool: MySqlPool) -> MySqlOutbox {
        MySqlOutbox::build(pool, TableName::default_name("wharf_outbox"))
    }

    /// The outbox with the table name of `config` (no database prefix: the URL chooses the
    /// database; no channel: MySQL has no notifications); refuses names that are not plain SQL
    /// names.
    pub fn with_config(pool: MySqlPool, config: &OutboxConfig) -> Result<MySqlOutbox> {
        let (table, _) = config.checked()?;
        if table.schema().is_some() {
            return Err(crate::SdkError::Config(format!(
                "'{}': name the table without a database; the connection URL chooses the database",
                config.table
            )));
        }
        Ok(MySqlOutbox::build(pool, table))
    }

    fn build(pool: MySqlPool, table: TableName) -> MySqlOutbox {
        let sql = Arc::new(Statements::new(&table));
        MySqlOutbox { pool, table, sql }
    }

    /// The pool it uses.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }
}

impl Outbox for MySqlOutbox {
    type Db = MySql;

    async fn migrate(&self) -> Result<()> {
        migrate::mysql(&self.pool, migrate::Object::Outbox, &self.table).await
    }

    async fn enqueue(&self, tx: &mut Transaction<'_, MySql>, event: &Event) -> Result<()> {
        event.check()?;
        let (headers, trace) = event.headers_json_traced();
        let span = super::enqueue_span(event, trace.as_ref());
        async {
            if let Some(key) = &event.ordering_key {
                sqlx::query(&self.sql.lock_key).bind(key).execute(&mut **tx).await?;
            }
            // A plain INSERT: IGNORE would also turn a value that does not fit into a warning and
            // store it cut short. MySQL rolls back only the refused statement, so a duplicate id
            // leaves the caller's transaction usable.
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
                .await;
            match inserted {
                Ok(_) => Ok(()),
                Err(sqlx::Error::Database(error)) if error.is_unique_violation() => Err(super::duplicate(event)),
                Err(error) => Err(error.into()),
            }
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

impl OutboxStore for MySqlOutbox {
    async fn claim(&self, relay: &str, now_ms: i64, lease_ms: i64, limit: i64) -> Result<Vec<OutboxRow>> {
        // READ COMMITTED, and the per-key condition checked again once the rows are locked: a
        // locking read sees the newest committed rows while its NOT EXISTS subquery may see an
        // older snapshot, so a row of a key whose earlier row committed during the scan (and is
        // locked by another relay) could otherwise be claimed beside it, out of order.
        let mut connection = self.pool.acquire().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED").execute(&mut *connection).await?;
        let mut tx = sqlx::Acquire::begin(&mut *connection).await?;
        let mut seqs: Vec<i64> = sqlx::query_scalar(&self.sql.select_claimable)
            // Twice: the lease's end and the time a delayed row comes due.
            .bind(now_ms)
            .bind(now_ms)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        if !seqs.is_empty() {
            let recheck = format!(
                "SELECT o.seq FROM {table} o WHERE o.seq IN ({}) AND o.ordering_key IS NOT NULL AND EXISTS \
                 (SELECT 1 FROM {table} e WHERE e.ordering_key = o.ordering_key AND e.seq < o.seq AND e.status <> 1)",
                placeholders(seqs.len()),
                table = self.sql.table
            );
            let mut query = sqlx::query_scalar::<_, i64>(&recheck);
            for seq in &seqs {
                query = query.bind(seq);
            }
            let behind: Vec<i64> = query.fetch_all(&mut *tx).await?;
            seqs.retain(|seq| !behind.contains(seq));
        }
        if seqs.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let list = placeholders(seqs.len());
        let mark = format!(
            "UPDATE {} SET claimed_by = ?, claimed_until = ?, attempts = attempts + 1 WHERE seq IN ({list})",
            self.sql.table
        );
        let mut query = sqlx::query(&mark).bind(relay).bind(now_ms.saturating_add(lease_ms));
        for seq in &seqs {
            query = query.bind(seq);
        }
        query.execute(&mut *tx).await?;
        let read = format!("SELECT {} FROM {} WHERE seq IN ({list}) ORDER BY seq", text_columns(), self.sql.table);
        let mut query = sqlx::query(&read);
        for seq in &seqs {
            query = query.bind(seq);
        }
        let rows = query.fetch_all(&mut *tx).await?;
        tx.commit().await?;
        rows.iter().map(super::claimed_row).collect()
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
        let mut tx = self.pool.begin().await?;
        sqlx::query(&self.sql.refuse)
            .bind(limit)
            .bind(FAILED)
            .bind(limit)
            .bind(reason)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        let status: Option<i16> =
            sqlx::query_scalar(&self.sql.refused_status).bind(seq).fetch_optional(&mut *tx).await?;
        tx.commit().await?;
        Ok(status == Some(FAILED))
    }

    async fn purge_sent(&self, sent_before_ms: i64) -> Result<u64> {
        let done = sqlx::query(&self.sql.purge_sent).bind(SENT).bind(sent_before_ms).execute(&self.pool).await?;
        // Key rows no unsent event needs (a writer upserting one meanwhile simply makes it again).
        sqlx::query(&self.sql.purge_keys).execute(&self.pool).await?;
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
