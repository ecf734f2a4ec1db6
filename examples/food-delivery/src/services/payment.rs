//! `payment-service`: charges each order once. The payment provider is simulated as real ones
//! work: its own ledger (a database of its own) that accepts an idempotency key, so a charge
//! retried after a crash returns the first charge instead of taking the money twice. The payment
//! is recorded through the inbox, and `PaymentCaptured` (or `PaymentFailed`) reported through the
//! outbox, in one transaction.

use crate::*;
use anyhow::Result;
use clap::Parser;
use sqlx::Row;
use sqlx::sqlite::SqlitePool;
use std::path::PathBuf;
use wharf_sdk::{Event, Handler, Inbox, Incoming, Outbox, Outcome, SqliteInbox, SqliteOutbox};

#[derive(Debug, Parser)]
pub struct Args {
    /// The broker.
    #[arg(long, env = "BROKER_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    broker_url: String,
    /// The service's database.
    #[arg(long, default_value = "payment-service.db")]
    database: PathBuf,
    /// The simulated payment provider's ledger.
    #[arg(long, default_value = "payment-provider.db")]
    provider: PathBuf,
}

/// Orders above this are declined by the provider (the failure path).
const DECLINED_ABOVE_CENTS: i64 = 500_000;

/// The simulated provider: `charge` with an idempotency key returns the existing charge when
/// the key was used before.
#[derive(Debug)]
pub struct Provider {
    ledger: SqlitePool,
}

impl Provider {
    async fn charge(&self, idempotency_key: &str, amount_cents: i64) -> Result<i64> {
        sqlx::query(
            "INSERT INTO charges (idempotency_key, amount_cents, charged_at) VALUES (?, ?, ?)
             ON CONFLICT (idempotency_key) DO NOTHING",
        )
        .bind(idempotency_key)
        .bind(amount_cents)
        .bind(now_ms())
        .execute(&self.ledger)
        .await?;
        let row = sqlx::query("SELECT id FROM charges WHERE idempotency_key = ?")
            .bind(idempotency_key)
            .fetch_one(&self.ledger)
            .await?;
        Ok(row.get("id"))
    }
}

/// The handler of `OrderReceived`.
#[derive(Debug)]
pub struct Payments {
    pool: SqlitePool,
    provider: Provider,
}

impl Payments {
    async fn process(&self, message: &Incoming, order: &OrderReceived) -> Result<()> {
        let declined = order.total_cents > DECLINED_ABOVE_CENTS;
        // The provider is called before our transaction opens (a remote call must not hold the
        // database's write lock); its idempotency key makes a second call after a crash, or for
        // a redelivery, return the first charge.
        let charge = if declined {
            None
        } else {
            Some(self.provider.charge(&format!("order-{}", order.order_id), order.total_cents).await?)
        };
        let Some(mut tx) = begin_first(&self.pool, "payment-service", message).await? else { return Ok(()) };
        let status = match charge {
            None => "failed",
            Some(charge) => {
                sqlx::query("INSERT INTO payments (order_id, charge_id, amount_cents, paid_at) VALUES (?, ?, ?, ?)")
                    .bind(&order.order_id)
                    .bind(charge)
                    .bind(order.total_cents)
                    .bind(now_ms())
                    .execute(&mut *tx)
                    .await?;
                "captured"
            }
        };
        let report =
            StatusReport { order_id: order.order_id.clone(), service: "payment".into(), status: status.into() };
        let event = Event::new(STATUS_EXCHANGE, format!("payment.{status}"), serde_json::to_vec(&report)?)
            .with_id(format!("payment-{}", order.order_id))
            .ordered_by(&order.order_id);
        SqliteOutbox::new(self.pool.clone()).enqueue(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }
}

impl Handler for Payments {
    async fn handle(&self, message: Incoming) -> Outcome {
        let Ok(order) = serde_json::from_slice::<OrderReceived>(&message.body) else {
            tracing::error!("an OrderReceived that does not parse; rejecting");
            return Outcome::Reject("the body is not an OrderReceived".into());
        };
        match self.process(&message, &order).await {
            Ok(()) => Outcome::Ack,
            Err(error) => {
                tracing::warn!(%error, order = %order.order_id, "payment failed for now; will retry");
                Outcome::Retry
            }
        }
    }
}

/// Opens (creating what is missing) the service's database and the provider's ledger.
pub async fn open(database: &std::path::Path, provider: &std::path::Path) -> Result<Payments> {
    let pool = open_sqlite(database).await?;
    create_counters(&pool).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS payments (order_id TEXT PRIMARY KEY, charge_id INTEGER NOT NULL,
         amount_cents INTEGER NOT NULL, paid_at INTEGER NOT NULL)",
    )
    .execute(&pool)
    .await?;
    SqliteOutbox::new(pool.clone()).migrate().await?;
    SqliteInbox::new(pool.clone(), "payment-service").migrate().await?;
    let ledger = open_sqlite(provider).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS charges (id INTEGER PRIMARY KEY AUTOINCREMENT, idempotency_key TEXT NOT NULL UNIQUE,
         amount_cents INTEGER NOT NULL, charged_at INTEGER NOT NULL)",
    )
    .execute(&ledger)
    .await?;
    Ok(Payments { pool, provider: Provider { ledger } })
}

/// Runs the service until SIGTERM/SIGINT.
pub async fn run(args: Args) -> Result<()> {
    init_logging("payment-service");
    let handler = open(&args.database, &args.provider).await?;
    let pool = handler.pool.clone();
    serve("payment-service", &args.broker_url, PAYMENT_QUEUE, pool, handler).await
}
