//! `email-service`: "sends" each order's confirmation by appending it to a mailbox table keyed by
//! an idempotency key (the order id), in the same transaction as its inbox entry, so a
//! redelivery never mails twice; reports `sent` through the outbox.

use crate::*;
use anyhow::Result;
use clap::Parser;
use sqlx::sqlite::SqlitePool;
use std::path::PathBuf;
use wharf_sdk::{Event, Handler, Inbox, Incoming, Outbox, Outcome, SqliteInbox, SqliteOutbox};

#[derive(Debug, Parser)]
pub struct Args {
    /// The broker.
    #[arg(long, env = "BROKER_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    broker_url: String,
    /// The service's database (the mailbox is in it).
    #[arg(long, default_value = "email-service.db")]
    database: PathBuf,
}

/// The handler of `OrderReceived`.
#[derive(Debug)]
pub struct Mailer {
    pool: SqlitePool,
}

impl Mailer {
    async fn process(&self, message: &Incoming, order: &OrderReceived) -> Result<()> {
        let Some(mut tx) = begin_first(&self.pool, "email-service", message).await? else { return Ok(()) };
        let body = format!(
            "Hello {}, {} received your order {} ({} items, {:.2} EUR).",
            order.customer,
            order.restaurant,
            order.order_id,
            order.items.iter().map(|item| item.quantity).sum::<u32>(),
            order.total_cents as f64 / 100.0
        );
        sqlx::query("INSERT INTO mailbox (idempotency_key, order_id, recipient, body, sent_at) VALUES (?, ?, ?, ?, ?)")
            .bind(format!("confirmation-{}", order.order_id))
            .bind(&order.order_id)
            .bind(&order.customer)
            .bind(body)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        let report = StatusReport { order_id: order.order_id.clone(), service: "email".into(), status: "sent".into() };
        let event = Event::new(STATUS_EXCHANGE, "email.sent", serde_json::to_vec(&report)?)
            .with_id(format!("email-{}", order.order_id))
            .ordered_by(&order.order_id);
        SqliteOutbox::new(self.pool.clone()).enqueue(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }
}

impl Handler for Mailer {
    async fn handle(&self, message: Incoming) -> Outcome {
        let Ok(order) = serde_json::from_slice::<OrderReceived>(&message.body) else {
            return Outcome::Reject("the body is not an OrderReceived".into());
        };
        match self.process(&message, &order).await {
            Ok(()) => Outcome::Ack,
            Err(error) => {
                tracing::warn!(%error, order = %order.order_id, "mailing failed for now; will retry");
                Outcome::Retry
            }
        }
    }
}

/// Opens (creating what is missing) the service's database.
pub async fn open(database: &std::path::Path) -> Result<Mailer> {
    let pool = open_sqlite(database).await?;
    create_counters(&pool).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS mailbox (idempotency_key TEXT PRIMARY KEY, order_id TEXT NOT NULL,
         recipient TEXT NOT NULL, body TEXT NOT NULL, sent_at INTEGER NOT NULL)",
    )
    .execute(&pool)
    .await?;
    SqliteOutbox::new(pool.clone()).migrate().await?;
    SqliteInbox::new(pool.clone(), "email-service").migrate().await?;
    Ok(Mailer { pool })
}

/// Runs the service until SIGTERM/SIGINT.
pub async fn run(args: Args) -> Result<()> {
    init_logging("email-service");
    let handler = open(&args.database).await?;
    let pool = handler.pool.clone();
    serve("email-service", &args.broker_url, EMAIL_QUEUE, pool, handler).await
}
