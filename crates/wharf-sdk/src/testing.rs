//! A test harness for services built on the SDK: the outbox, the relay and the handlers run in
//! one process on SQLite in memory, with no broker. Faults a real deployment meets can be asked
//! for, so a handler's exactly-once property is tested where it is written:
//!
//! - [`Fault::DieBeforeMark`]: the relay published a round and died before marking it sent, so
//!   every event of the round is delivered again, with the same id;
//! - [`Fault::DieAfterCommitBeforeAck`]: each handler's work committed and its process died before
//!   the ack, so each message is redelivered (`redelivered`, `delivery_count` 1).
//!
//! ```
//! # async fn example() -> wharf_sdk::Result<()> {
//! use wharf_sdk::testing::{Fault, TestBus};
//! use wharf_sdk::{Handler, Incoming, Outbox, Outcome};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct OrderReceived { id: u32 }
//! # impl wharf_sdk::Message for OrderReceived { const TYPE: &'static str = "OrderReceived"; }
//! # struct Charge; impl Handler for Charge { async fn handle(&self, _: Incoming) -> Outcome { Outcome::Ack } }
//! let mut bus = TestBus::new().await?;
//! bus.route("", "OrderReceived", Charge);
//! let mut tx = bus.pool().begin().await?;
//! bus.outbox().publish(&mut tx, &OrderReceived { id: 1 }).await?;
//! tx.commit().await?;
//! let report = bus.run_with(Fault::DieAfterCommitBeforeAck).await?;
//! assert_eq!(report.deliveries, 2);
//! assert_eq!(bus.published::<OrderReceived>().len(), 1);
//! # Ok(())
//! # }
//! ```

use crate::consumer::{Handler, Incoming, Outcome};
use crate::event::Event;
use crate::inbox::{Inbox, SqliteInbox};
use crate::message::Message;
use crate::outbox::{Outbox, OutboxStore, SqliteOutbox, now_ms};
use crate::{Result, SdkError};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

type Deliver = Arc<dyn Fn(Incoming) -> Pin<Box<dyn Future<Output = Outcome> + Send>> + Send + Sync>;

/// Most deliveries of one message before the harness gives up on it (a handler that keeps
/// asking for a retry), as a broker's delivery limit would.
pub const DELIVERIES_MAX: u32 = 20;

/// A fault to inject into a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// None: every event is delivered once (more if its handler asks for a retry).
    None,
    /// The relay dies after publishing a round and before marking it: the round goes out again.
    DieBeforeMark,
    /// Every handler's process dies after its commit and before its ack: each message is
    /// delivered again, marked redelivered.
    DieAfterCommitBeforeAck,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Handler calls.
    pub deliveries: usize,
    /// Events no route took.
    pub unrouted: Vec<String>,
    /// (event id, reason) of messages the handlers rejected, or retried until the limit.
    pub dead_lettered: Vec<(String, String)>,
}

/// The in-process bus: an outbox on SQLite in memory, its relay, and handlers routed by exchange
/// and routing key (topic patterns: `*` one word, `#` any number).
pub struct TestBus {
    pool: sqlx::SqlitePool,
    outbox: SqliteOutbox,
    routes: Vec<(String, String, Deliver)>,
    published: Vec<Event>,
}

impl std::fmt::Debug for TestBus {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("TestBus").field("routes", &self.routes.len()).finish_non_exhaustive()
    }
}

/// True if `routing_key` matches the topic `pattern`.
pub fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    fn matches(pattern: &[&str], words: &[&str]) -> bool {
        match pattern.split_first() {
            None => words.is_empty(),
            Some((&"#", rest)) => (0..=words.len()).any(|skip| matches(rest, &words[skip..])),
            Some((&"*", rest)) => !words.is_empty() && matches(rest, &words[1..]),
            Some((word, rest)) => words.first() == Some(word) && matches(rest, &words[1..]),
        }
    }
    let pattern: Vec<&str> = pattern.split('.').collect();
    let words: Vec<&str> = if routing_key.is_empty() { Vec::new() } else { routing_key.split('.').collect() };
    matches(&pattern, &words)
}

fn incoming(event: &Event, delivery_count: u32) -> Incoming {
    let mut headers = event.headers.clone();
    if let Some(key) = &event.ordering_key {
        headers.insert(crate::event::ORDERING_KEY_HEADER.to_owned(), key.clone());
    }
    Incoming {
        message_id: Some(event.id.clone()),
        exchange: event.exchange.clone(),
        routing_key: event.routing_key.clone(),
        headers,
        body: event.body.clone(),
        redelivered: delivery_count > 0,
        delivery_count,
        message_type: event.message_type.clone(),
        correlation_id: event.correlation_id.clone(),
        reply_to: event.reply_to.clone(),
        content_type: event.content_type.clone(),
        ..Incoming::default()
    }
}

impl TestBus {
    /// A bus on a fresh in-memory database, its outbox migrated.
    pub async fn new() -> Result<TestBus> {
        // One connection: an in-memory SQLite database lives and dies with its connection.
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect("sqlite::memory:")
            .await?;
        let outbox = SqliteOutbox::new(pool.clone());
        outbox.migrate().await?;
        Ok(TestBus { pool, outbox, routes: Vec::new(), published: Vec::new() })
    }

    /// The database: the application's tables go here too, so its transactions cover them and
    /// the outbox. Hold at most one transaction at a time (one connection).
    pub fn pool(&self) -> &sqlx::SqlitePool {
        &self.pool
    }

    /// The outbox.
    pub fn outbox(&self) -> &SqliteOutbox {
        &self.outbox
    }

    /// An inbox for `consumer` in the same database, migrated.
    pub async fn inbox(&self, consumer: &str) -> Result<SqliteInbox> {
        let inbox = SqliteInbox::new(self.pool.clone(), consumer);
        inbox.migrate().await?;
        Ok(inbox)
    }

    /// Delivers events published to `exchange` whose routing key matches `pattern` to `handler`.
    pub fn route<H: Handler>(&mut self, exchange: &str, pattern: &str, handler: H) {
        let handler = Arc::new(handler);
        let deliver: Deliver = Arc::new(move |message| {
            let handler = Arc::clone(&handler);
            Box::pin(async move { handler.handle(message).await })
        });
        self.routes.push((exchange.to_owned(), pattern.to_owned(), deliver));
    }

    /// Relays and delivers until the outbox is empty (events the handlers publish included).
    pub async fn run(&mut self) -> Result<RunReport> {
        self.run_with(Fault::None).await
    }

    /// As [`TestBus::run`], with `fault` injected into every round.
    pub async fn run_with(&mut self, fault: Fault) -> Result<RunReport> {
        let mut report = RunReport::default();
        for round in 0.. {
            if round > 10_000 {
                return Err(SdkError::Config(
                    "the test bus ran 10,000 rounds: do the handlers publish forever?".into(),
                ));
            }
            let rows = self.outbox.claim("test-bus", now_ms(), 60_000, 500).await?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                self.published.push(row.event.clone());
                self.deliver(&row.event, fault, &mut report).await;
            }
            let seqs: Vec<i64> = rows.iter().map(|row| row.seq).collect();
            if fault == Fault::DieBeforeMark && round == 0 {
                // The relay died: its claims lapse and the round goes out again, same ids.
                self.outbox.release("test-bus", &seqs).await?;
                continue;
            }
            self.outbox.mark_sent(&seqs, now_ms()).await?;
        }
        Ok(report)
    }

    async fn deliver(&self, event: &Event, fault: Fault, report: &mut RunReport) {
        let routes: Vec<Deliver> = self
            .routes
            .iter()
            .filter(|(exchange, pattern, _)| *exchange == event.exchange && topic_matches(pattern, &event.routing_key))
            .map(|(_, _, deliver)| Arc::clone(deliver))
            .collect();
        if routes.is_empty() {
            report.unrouted.push(event.id.clone());
            return;
        }
        for deliver in routes {
            let mut delivery_count = 0;
            loop {
                report.deliveries += 1;
                let outcome = deliver(incoming(event, delivery_count)).await;
                delivery_count += 1;
                let crashed = fault == Fault::DieAfterCommitBeforeAck && delivery_count == 1;
                match outcome {
                    _ if crashed => continue,
                    Outcome::Ack | Outcome::Reply(_) => break,
                    Outcome::Reject(reason) => {
                        report.dead_lettered.push((event.id.clone(), reason));
                        break;
                    }
                    Outcome::Retry if delivery_count >= DELIVERIES_MAX => {
                        report.dead_lettered.push((event.id.clone(), format!("retried {DELIVERIES_MAX} times")));
                        break;
                    }
                    Outcome::Retry => continue,
                }
            }
        }
    }

    /// Every event of type `M` relayed so far, decoded, in relay order (each once, even when a
    /// fault made the relay send it twice).
    pub fn published<M: Message>(&self) -> Vec<M> {
        let mut seen = std::collections::HashSet::new();
        self.published
            .iter()
            .filter(|event| event.message_type.as_deref() == Some(M::TYPE) && seen.insert(event.id.clone()))
            .filter_map(|event| serde_json::from_slice(&event.body).ok())
            .collect()
    }
}

/// The events of type `M` the bus relayed; panics, naming the type, if there were none.
pub fn assert_published<M: Message>(bus: &TestBus) -> Vec<M> {
    let published = bus.published::<M>();
    assert!(!published.is_empty(), "no {} was published", M::TYPE);
    published
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns_match_as_amqp_says() {
        for (pattern, key, expected) in [
            ("order.*", "order.received", true),
            ("order.*", "order.received.late", false),
            ("order.#", "order", true),
            ("order.#", "order.received.late", true),
            ("#", "", true),
            ("*.received", "order.received", true),
            ("order.received", "order.received", true),
            ("order.received", "order.sent", false),
            ("#.late", "order.received.late", true),
        ] {
            assert_eq!(topic_matches(pattern, key), expected, "{pattern} ~ {key}");
        }
    }
}
