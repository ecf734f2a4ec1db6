//! The transactional outbox: a table the SDK creates and migrates (`migrate`), rows written by
//! `enqueue` or `publish` inside the caller's own database transaction ([`Outbox`], the trait
//! application code is written against), and the operations the [`Relay`](crate::Relay) runs on
//! it ([`OutboxStore`]), for PostgreSQL ([`PgOutbox`]), SQLite ([`SqliteOutbox`]) and
//! MySQL ([`MySqlOutbox`]).
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

use crate::event::Event;
use crate::message::Message;
use crate::names::{TableName, check_channel};
use crate::{Result, SdkError};
use std::future::Future;
use std::time::Duration;

#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(feature = "mysql")]
pub use mysql::MySqlOutbox;
#[cfg(feature = "postgres")]
pub use postgres::PgOutbox;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteOutbox;

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
    /// When it was written (ms since the Unix epoch).
    pub created_at_ms: i64,
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
    /// What the table holds, for the relay's gauges (`observe.rs`); `None` if the store cannot
    /// tell.
    fn stats(&self) -> impl Future<Output = Result<Option<crate::observe::OutboxStats>>> + Send {
        async { Ok(None) }
    }
    /// The table's name, the label of its gauges.
    fn table_name(&self) -> String {
        String::new()
    }
}

/// What application code does with an outbox, on any database: write events in its own
/// transaction, and look after the table.
pub trait Outbox: OutboxStore + Clone {
    /// The database.
    type Db: sqlx::Database;

    /// Creates the table or brings it to the newest version (see `migrate.rs`); safe to call
    /// from every replica at start.
    fn migrate(&self) -> impl Future<Output = Result<()>> + Send;

    /// Writes `event` inside the caller's transaction: it is published if and only if the
    /// transaction commits. An event whose id is already in the table is refused with
    /// [`SdkError::Duplicate`], leaving the transaction usable.
    fn enqueue(
        &self,
        tx: &mut sqlx::Transaction<'_, Self::Db>,
        event: &Event,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Writes a typed message inside the caller's transaction (a fresh id); returns its id.
    fn publish<M: Message>(
        &self,
        tx: &mut sqlx::Transaction<'_, Self::Db>,
        message: &M,
    ) -> impl Future<Output = Result<String>> + Send {
        let event = Event::from_message(message);
        async move {
            let event = event?;
            self.enqueue(tx, &event).await?;
            Ok(event.id)
        }
    }

    /// Writes a typed message whose id is stable for `idempotency_key` (see
    /// [`Event::with_idempotency_key`]); a second write with the same key is
    /// [`SdkError::Duplicate`]. Returns the id.
    fn publish_keyed<M: Message>(
        &self,
        tx: &mut sqlx::Transaction<'_, Self::Db>,
        message: &M,
        idempotency_key: &str,
    ) -> impl Future<Output = Result<String>> + Send {
        let event = Event::from_message(message).map(|event| event.with_idempotency_key(idempotency_key));
        async move {
            let event = event?;
            self.enqueue(tx, &event).await?;
            Ok(event.id)
        }
    }

    /// Puts a failed row back to pending (after the cause was fixed, say the exchange now
    /// exists). Returns false if no failed row has that id.
    fn retry_failed(&self, id: &str) -> impl Future<Output = Result<bool>> + Send;

    /// Failed rows: (id, reason), oldest first.
    fn failed(&self) -> impl Future<Output = Result<Vec<(String, String)>>> + Send;

    /// Rows not yet sent (pending or failed).
    fn unsent_count(&self) -> impl Future<Output = Result<i64>> + Send;
}

/// Where an outbox lives in its database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxConfig {
    /// The table, `table` or `schema.table` (PostgreSQL). Default `wharf_outbox`.
    pub table: String,
    /// The PostgreSQL `NOTIFY` channel `enqueue` signals and relays listen on. Default
    /// `wharf_outbox`.
    pub notify_channel: String,
}

impl Default for OutboxConfig {
    fn default() -> OutboxConfig {
        OutboxConfig { table: "wharf_outbox".into(), notify_channel: "wharf_outbox".into() }
    }
}

impl OutboxConfig {
    pub(crate) fn checked(&self) -> Result<(TableName, String)> {
        Ok((TableName::parse("the outbox table", &self.table)?, check_channel(&self.notify_channel)?))
    }
}

/// The claimable condition for `table` (aliased `o`), with `{now}` left for the placeholder.
fn claimable(table: &str) -> String {
    format!(
        "o.status = 0 AND (o.claimed_until IS NULL OR o.claimed_until < {{now}}) \
         AND (o.available_at IS NULL OR o.available_at <= {{now}}) \
         AND (o.ordering_key IS NULL OR NOT EXISTS (SELECT 1 FROM {table} e \
         WHERE e.ordering_key = o.ordering_key AND e.seq < o.seq AND e.status <> 1))"
    )
}

/// The columns a claim returns, in `row_event`'s order.
const CLAIMED_COLUMNS: &str = "seq, id, exchange, routing_key, ordering_key, headers, content_type, message_type, \
     correlation_id, reply_to, available_at, body, attempts, created_at";

/// Builds an [`OutboxRow`] from a claimed row of any database.
fn claimed_row<R>(row: &R) -> Result<OutboxRow>
where
    R: sqlx::Row,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let headers: String = row.try_get("headers")?;
    Ok(OutboxRow {
        seq: row.try_get("seq")?,
        attempts: row.try_get("attempts")?,
        created_at_ms: row.try_get("created_at")?,
        event: Event {
            id: row.try_get("id")?,
            exchange: row.try_get("exchange")?,
            routing_key: row.try_get("routing_key")?,
            ordering_key: row.try_get("ordering_key")?,
            headers: Event::headers_from_json(&headers),
            content_type: row.try_get("content_type")?,
            message_type: row.try_get("message_type")?,
            correlation_id: row.try_get("correlation_id")?,
            reply_to: row.try_get("reply_to")?,
            available_at_ms: row.try_get("available_at")?,
            body: row.try_get("body")?,
        },
    })
}

/// The refusal of an event whose id the table already holds (the insert said `ON CONFLICT (id)
/// DO NOTHING` and touched no row).
fn duplicate(event: &Event) -> SdkError {
    SdkError::Duplicate { id: event.id.clone() }
}

/// The span an enqueue runs in: the event and its place in its trace.
fn enqueue_span(event: &Event, trace: Option<&crate::trace::TraceContext>) -> tracing::Span {
    tracing::debug_span!(
        "wharf.outbox.enqueue",
        id = %event.id,
        exchange = %event.exchange,
        routing_key = %event.routing_key,
        trace_id = %trace.map(|trace| trace.trace_id_hex()).unwrap_or_default(),
        span_id = %trace.map(|trace| trace.span_id_hex()).unwrap_or_default(),
    )
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as i64)
}
