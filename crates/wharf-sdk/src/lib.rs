//! `wharf-sdk`: every event handled, and handled once, end to end.
//!
//! The broker keeps what it was given; the two strategies that live in the application are here:
//!
//! - **Transactional outbox**: write the event in the same database transaction as the business
//!   change ([`Outbox::publish`] for a typed [`Message`], [`Outbox::enqueue`] for a raw
//!   [`Event`]); a [`Relay`] publishes it with
//!   publisher confirms and marks it sent only after the broker confirmed it. Events with the same
//!   ordering key are published in the order they were written; several relays may share a table.
//! - **Idempotent inbox**: record each processed message id in the same transaction as its effect
//!   ([`Inbox::handle`], or [`exactly_once`], which owns the whole prologue); a redelivery is
//!   recognised and has no second effect. The [`run_consumer`] runtime acknowledges only after the
//!   handler returned, so after the transaction committed; a handler's [`HandleError`] decides
//!   between a retry and a dead letter that carries the reason.
//!
//! It speaks plain AMQP 0-9-1 (lapin), so it runs against Wharf or RabbitMQ. With Wharf's
//! broker-side de-duplication (`x-deduplication` on the queue or exchange) a relay's re-publish
//! after a crash is dropped by the broker; without it the inbox still guarantees one effect.
//!
//! # Typed publish and an exactly-once handler
//!
//! ```no_run
//! use sqlx::{Sqlite, SqlitePool, Transaction};
//! use wharf_sdk::{ConsumerConfig, EffectHandler, HandleError, Incoming, Message, Outbox, SqliteInbox, SqliteOutbox};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct OrderReceived { order_id: String, total_cents: i64 }
//!
//! impl Message for OrderReceived {
//!     const TYPE: &'static str = "OrderReceived";
//!     const EXCHANGE: &'static str = "orders";
//! }
//!
//! // The order and its event commit together; the relay publishes the event after the commit.
//! async fn place_order(pool: &SqlitePool, outbox: &SqliteOutbox, order: OrderReceived) -> wharf_sdk::Result<()> {
//!     let mut tx = pool.begin().await?;
//!     sqlx::query("INSERT INTO orders (id) VALUES (?)").bind(&order.order_id).execute(&mut *tx).await?;
//!     outbox.publish(&mut tx, &order).await?;
//!     Ok(tx.commit().await?)
//! }
//!
//! // The charge is made once per event, however often the event is delivered.
//! struct Charge;
//!
//! impl EffectHandler<OrderReceived, Sqlite> for Charge {
//!     async fn handle(&self, tx: &mut Transaction<'static, Sqlite>, order: OrderReceived, _: &Incoming)
//!         -> Result<(), HandleError> {
//!         sqlx::query("INSERT INTO payments (order_id, cents) VALUES (?, ?)")
//!             .bind(order.order_id).bind(order.total_cents).execute(&mut **tx).await?;
//!         Ok(())
//!     }
//! }
//! # async fn run(pool: SqlitePool, stopped: tokio::sync::watch::Receiver<bool>) -> wharf_sdk::Result<()> {
//! # const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
//! # let outbox = SqliteOutbox::new(pool.clone());
//! # tokio::spawn(wharf_sdk::Relay::new(outbox, wharf_sdk::RelayConfig::new(BROKER))?.run(stopped.clone()));
//! let handler = wharf_sdk::exactly_once(SqliteInbox::new(pool, "payment-service"), Charge);
//! wharf_sdk::run_consumer(ConsumerConfig::new(BROKER, "payments"), handler, stopped).await
//! # }
//! ```
//!
//! The same code runs on PostgreSQL with [`PgOutbox`], [`PgInbox`] and `sqlx::Postgres`:
//! application code written against the [`Outbox`] and [`Inbox`] traits runs on both.
//! `migrate()` on each creates its table or brings it to the newest version
//! (`migrations/` holds the same SQL as files, for teams that run their own migration tool).

pub mod app;
pub mod consumer;
pub mod error;
pub mod event;
pub mod handler;
pub mod inbox;
pub mod message;
pub mod migrate;
pub mod names;
pub mod observe;
pub mod outbox;
pub mod publisher;
pub mod relay;
pub mod request;
pub mod settle;
#[cfg(feature = "sqlite")]
pub mod testing;
pub mod topology;
pub mod trace;

pub use app::{Wharf, WharfBuilder};
pub use consumer::{
    ConsumerConfig, DeadLetter, Handler, Incoming, Outcome, REJECT_REASON_HEADER, REJECTED_FROM_HEADER, Reply,
    run_consumer,
};
pub use error::{Result, SdkError};
pub use event::{Event, ORDERING_KEY_HEADER, new_id};
pub use handler::{EffectHandler, ExactlyOnce, HandleError, Typed, TypedHandler, exactly_once, typed};
#[cfg(feature = "mysql")]
pub use inbox::MySqlInbox;
#[cfg(feature = "postgres")]
pub use inbox::PgInbox;
#[cfg(feature = "sqlite")]
pub use inbox::SqliteInbox;
pub use inbox::{INBOX_RETENTION_MS_DEFAULT, Inbox, InboxConfig, Seen, purge_inbox_periodically, purge_periodically};
pub use message::{JSON, Message};
pub use observe::{Health, OutboxStats};
#[cfg(feature = "mysql")]
pub use outbox::MySqlOutbox;
#[cfg(feature = "postgres")]
pub use outbox::PgOutbox;
#[cfg(feature = "sqlite")]
pub use outbox::SqliteOutbox;
pub use outbox::{Outbox, OutboxConfig, OutboxRow, OutboxStore};
pub use publisher::{ConfirmedPublisher, PublisherConfig};
pub use relay::{Relay, RelayConfig, RoundReport};
pub use request::{DIRECT_REPLY_TO, Requester, Responder, Responding, responding};
pub use settle::{RETRY_ATTEMPT_HEADER, RetryPolicy};
pub use trace::{TRACEPARENT_HEADER, TraceContext};
