//! `wharf-sdk`: every event handled, and handled once, end to end.
//!
//! The broker keeps what it was given; the two strategies that live in the application are here:
//!
//! - **Transactional outbox**: write the event in the same database transaction as the business
//!   change ([`PgOutbox::enqueue`], [`SqliteOutbox::enqueue`]); a [`Relay`] publishes it with
//!   publisher confirms and marks it sent only after the broker confirmed it. Events with the same
//!   ordering key are published in the order they were written; several relays may share a table.
//! - **Idempotent inbox**: record each processed message id in the same transaction as its effect
//!   ([`PgInbox::handle`], [`SqliteInbox::handle`]); a redelivery is recognised and has no second
//!   effect. The [`run_consumer`] runtime acknowledges only after the handler returned, so after
//!   the transaction committed.
//!
//! It speaks plain AMQP 0-9-1 (lapin), so it runs against Wharf or RabbitMQ. With Wharf's
//! broker-side de-duplication (`x-deduplication` on the queue or exchange) a relay's re-publish
//! after a crash is dropped by the broker; without it the inbox still guarantees one effect.
//!
//! # A complete example: an order and its event in one transaction, a payment charged once
//!
//! ```no_run
//! use sqlx::postgres::PgPool;
//! use wharf_sdk::{
//!     ConsumerConfig, Event, Handler, Incoming, Outcome, PgInbox, PgOutbox, Relay, RelayConfig, Seen,
//!     run_consumer,
//! };
//!
//! const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
//!
//! // The order service: the order row and its `OrderReceived` event commit together.
//! async fn place_order(pool: &PgPool, outbox: &PgOutbox, order_id: &str, total_cents: i64) -> wharf_sdk::Result<()> {
//!     let mut tx = pool.begin().await?;
//!     sqlx::query("INSERT INTO orders (id, total_cents) VALUES ($1, $2)")
//!         .bind(order_id)
//!         .bind(total_cents)
//!         .execute(&mut *tx)
//!         .await?;
//!     let event = Event::new("orders", "order.received", format!(r#"{{"order":"{order_id}","total":{total_cents}}}"#))
//!         .ordered_by(order_id)
//!         .with_content_type("application/json");
//!     outbox.enqueue(&mut tx, &event).await?;
//!     tx.commit().await?;
//!     Ok(())
//! }
//!
//! // The payment service: the charge and the inbox entry commit together; a redelivery is
//! // recognised and acknowledged without charging again.
//! struct ChargeOnce {
//!     pool: PgPool,
//!     inbox: PgInbox,
//! }
//!
//! impl Handler for ChargeOnce {
//!     async fn handle(&self, message: Incoming) -> Outcome {
//!         let Some(id) = message.message_id.clone() else { return Outcome::Reject };
//!         let charged = async {
//!             let mut tx = self.pool.begin().await?;
//!             if self.inbox.handle(&mut tx, &id).await? == Seen::First {
//!                 sqlx::query("INSERT INTO payments (event_id, body) VALUES ($1, $2)")
//!                     .bind(&id)
//!                     .bind(&message.body)
//!                     .execute(&mut *tx)
//!                     .await?;
//!             }
//!             tx.commit().await?;
//!             Ok::<(), wharf_sdk::SdkError>(())
//!         };
//!         match charged.await {
//!             Ok(()) => Outcome::Ack,
//!             Err(_) => Outcome::Retry,
//!         }
//!     }
//! }
//!
//! # async fn example() -> wharf_sdk::Result<()> {
//! let pool = PgPool::connect("postgres://localhost/shop").await?;
//! let outbox = PgOutbox::new(pool.clone());
//! outbox.migrate().await?;
//! let inbox = PgInbox::new(pool.clone(), "payment-service");
//! inbox.migrate().await?;
//! let (stop, stopped) = tokio::sync::watch::channel(false);
//! let relay = Relay::new(PgOutbox::new(pool.clone()), RelayConfig::new(BROKER))?;
//! tokio::spawn(relay.run(stopped.clone()));
//! let consumer = ChargeOnce { pool: pool.clone(), inbox };
//! tokio::spawn(run_consumer(ConsumerConfig::new(BROKER, "payments"), consumer, stopped));
//! place_order(&pool, &outbox, "order-42", 2_550).await?;
//! // … and at shutdown: in-flight handlers finish, then everything stops.
//! let _ = stop.send(true);
//! # Ok(())
//! # }
//! ```

pub mod consumer;
pub mod error;
pub mod event;
pub mod inbox;
pub mod outbox;
pub mod publisher;
pub mod relay;

pub use consumer::{ConsumerConfig, Handler, Incoming, Outcome, run_consumer};
pub use error::{Result, SdkError};
pub use event::{Event, ORDERING_KEY_HEADER};
#[cfg(feature = "postgres")]
pub use inbox::PgInbox;
#[cfg(feature = "sqlite")]
pub use inbox::SqliteInbox;
pub use inbox::{INBOX_RETENTION_MS_DEFAULT, Seen, purge_periodically};
#[cfg(feature = "postgres")]
pub use outbox::PgOutbox;
#[cfg(feature = "sqlite")]
pub use outbox::SqliteOutbox;
pub use outbox::{OutboxRow, OutboxStore};
pub use publisher::{ConfirmedPublisher, PublisherConfig};
pub use relay::{Relay, RelayConfig, RoundReport};
