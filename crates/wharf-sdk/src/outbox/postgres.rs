//! The outbox on PostgreSQL: claims take `FOR UPDATE SKIP LOCKED`, so relays never wait on each
//! other or claim the same row; `enqueue` also `pg_notify`s, waking listening relays at commit.
//!
//! Per-key order needs `seq` order to be commit order. A `BIGSERIAL` is taken at insert, so two
//! open transactions writing the same ordering key could commit in the other order, and the
//! relay would see the later row first. `enqueue` therefore takes a transaction-scoped advisory
//! lock on (table, ordering key) before inserting: writers of one key queue up from their insert
//! to their commit, and their seqs follow their commits. Writers of different keys never wait
//! (but for a hash collision, which only makes two writers take turns).

use super::{CLAIMED_COLUMNS, FAILED, Outbox, OutboxConfig, OutboxRow, OutboxStore, PENDING, SENT, claimable};
use crate::event::Event;
use crate::names::TableName;
use crate::{Result, migrate};
use sqlx::postgres::{PgListener, PgPool};
use sqlx::{Postgres, Row, Transaction};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tracing::Instrument;

/// Every statement, built once from the configured names.
#[derive(Debug)]
struct Statements {
    insert: String,
    claim: String,
    mark_sent: String,
    mark_failed: String,
    release: String,
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
            insert: format!(
                "INSERT INTO {table} (id, exchange, routing_key, ordering_key, headers, content_type, message_type,
                    correlation_id, reply_to, available_at, body, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) ON CONFLICT (id) DO NOTHING"
            ),
            claim: format!(
                "WITH candidates AS (
                    SELECT o.seq FROM {table} o WHERE {}
                    ORDER BY o.seq LIMIT $4 FOR UPDATE SKIP LOCKED)
                 UPDATE {table} w SET claimed_by = $1, claimed_until = $3, attempts = w.attempts + 1
                 FROM candidates WHERE w.seq = candidates.seq
                 RETURNING {}",
                claimable(table).replace("{now}", "$2"),
                CLAIMED_COLUMNS.split(", ").map(|column| format!("w.{column}")).collect::<Vec<_>>().join(", ")
            ),
            mark_sent: format!(
                "UPDATE {table} SET status = $1, sent_at = $2, claimed_by = NULL, claimed_until = NULL WHERE seq = ANY($3)"
            ),
            mark_failed: format!(
                "UPDATE {table} SET status = $1, failure = $2, claimed_by = NULL, claimed_until = NULL WHERE seq = $3"
            ),
            release: format!(
                "UPDATE {table} SET claimed_by = NULL, claimed_until = NULL
                 WHERE seq = ANY($1) AND status = $2 AND claimed_by = $3"
            ),
            refuse: format!(
                "UPDATE {table} SET refusals = refusals + 1, claimed_by = NULL, claimed_until = NULL,
                    status = CASE WHEN refusals + 1 >= $1 THEN $2 ELSE status END,
                    failure = CASE WHEN refusals + 1 >= $1 THEN $3 ELSE failure END
                 WHERE seq = $4 RETURNING status"
            ),
            purge_sent: format!("DELETE FROM {table} WHERE status = $1 AND sent_at < $2"),
            retry_failed: format!(
                "UPDATE {table} SET status = 0, failure = NULL, claimed_by = NULL, claimed_until = NULL
                 WHERE id = $1 AND status = 2"
            ),
            failed: format!("SELECT id, COALESCE(failure, '') AS failure FROM {table} WHERE status = $1 ORDER BY seq"),
            unsent: format!("SELECT COUNT(*) AS n FROM {table} WHERE status <> $1"),
            stats: format!(
                "SELECT COALESCE(SUM(CASE WHEN status = 0 THEN 1 ELSE 0 END), 0) AS unsent,
                    COALESCE(SUM(CASE WHEN status = 2 THEN 1 ELSE 0 END), 0) AS failed,
                    MIN(CASE WHEN status = 0 THEN created_at END) AS oldest
                 FROM {table} WHERE status <> 1"
            ),
        }
    }
}

/// The outbox in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgOutbox {
    pool: PgPool,
    table: TableName,
    channel: String,
    sql: Arc<Statements>,
    listener: Arc<Mutex<Option<PgListener>>>,
}

impl PgOutbox {
    /// The outbox `wharf_outbox` in the database `pool` connects to.
    pub fn new(pool: PgPool) -> PgOutbox {
        let defaults = OutboxConfig::default();
        PgOutbox::build(pool, TableName::default_name("wharf_outbox"), defaults.notify_channel)
    }

    fn build(pool: PgPool, table: TableName, channel: String) -> PgOutbox {
        let sql = Arc::new(Statements::new(&table.qualified()));
        PgOutbox { pool, table, channel, sql, listener: Arc::new(Mutex::new(None)) }
    }

    /// The outbox with the table and channel names of `config`; refuses names that are not
    /// plain SQL names.
    pub fn with_config(pool: PgPool, config: &OutboxConfig) -> Result<PgOutbox> {
        let (table, channel) = config.checked()?;
        Ok(PgOutbox::build(pool, table, channel))
    }

    /// The pool it uses.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl Outbox for PgOutbox {
    type Db = Postgres;

    async fn migrate(&self) -> Result<()> {
        migrate::postgres(&self.pool, migrate::Object::Outbox, &self.table).await
    }

    async fn enqueue(&self, tx: &mut Transaction<'_, Postgres>, event: &Event) -> Result<()> {
        event.check()?;
        let (headers, trace) = event.headers_json_traced();
        let span = super::enqueue_span(event, trace.as_ref());
        async {
            if let Some(key) = &event.ordering_key {
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))")
                    .bind(self.table.qualified())
                    .bind(key)
                    .execute(&mut **tx)
                    .await?;
            }
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
            sqlx::query("SELECT pg_notify($1, '')").bind(&self.channel).execute(&mut **tx).await?;
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

impl OutboxStore for PgOutbox {
    async fn claim(&self, relay: &str, now_ms: i64, lease_ms: i64, limit: i64) -> Result<Vec<OutboxRow>> {
        let rows = sqlx::query(&self.sql.claim)
            .bind(relay)
            .bind(now_ms)
            .bind(now_ms.saturating_add(lease_ms))
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let mut claimed = rows.iter().map(super::claimed_row).collect::<Result<Vec<_>>>()?;
        claimed.sort_by_key(|row| row.seq);
        Ok(claimed)
    }

    async fn mark_sent(&self, seqs: &[i64], now_ms: i64) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        sqlx::query(&self.sql.mark_sent).bind(SENT).bind(now_ms).bind(seqs).execute(&self.pool).await?;
        Ok(())
    }

    async fn mark_failed(&self, seq: i64, reason: &str) -> Result<()> {
        sqlx::query(&self.sql.mark_failed).bind(FAILED).bind(reason).bind(seq).execute(&self.pool).await?;
        Ok(())
    }

    async fn release(&self, relay: &str, seqs: &[i64]) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        sqlx::query(&self.sql.release).bind(seqs).bind(PENDING).bind(relay).execute(&self.pool).await?;
        Ok(())
    }

    async fn refuse(&self, seq: i64, reason: &str, limit: i32) -> Result<bool> {
        let row = sqlx::query(&self.sql.refuse)
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
        let mut listener = self.listener.lock().await;
        if listener.is_none() {
            match PgListener::connect_with(&self.pool).await {
                Ok(mut connected) => match connected.listen(&self.channel).await {
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
