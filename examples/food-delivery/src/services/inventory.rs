//! `inventory-service`: reserves stock for each order's items once (through the inbox). An order
//! with an item the restaurants do not sell is a permanent failure: it goes to `inventory.dlq`
//! with the reason in `x-failure-reason` (through the outbox, in the same transaction as the
//! inbox entry, so exactly once), and is reported `rejected`; it never loops.

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
    /// The service's database.
    #[arg(long, default_value = "inventory-service.db")]
    database: PathBuf,
}

/// The handler of `OrderReceived`.
#[derive(Debug)]
pub struct Inventory {
    pool: SqlitePool,
}

impl Inventory {
    async fn process(&self, message: &Incoming, order: &OrderReceived) -> Result<()> {
        let Some(mut tx) = begin_first(&self.pool, "inventory-service", message).await? else { return Ok(()) };
        let outbox = SqliteOutbox::new(self.pool.clone());
        let unknown = order.items.iter().find(|item| !CATALOG.contains(&item.sku.as_str()));
        let status = match unknown {
            Some(item) => {
                let reason = format!("unknown item '{}'", item.sku);
                let parked = Event::new("", INVENTORY_DLQ, message.body.clone())
                    .with_id(format!("inventory-dlq-{}", order.order_id))
                    .with_header(FAILURE_REASON_HEADER, &reason)
                    .with_header("order-id", &order.order_id)
                    .with_content_type("application/json");
                outbox.enqueue(&mut tx, &parked).await?;
                tracing::warn!(order = %order.order_id, %reason, "order sent to the dead-letter queue");
                "rejected"
            }
            None => {
                for item in &order.items {
                    sqlx::query(
                        "INSERT INTO reservations (order_id, sku, quantity) VALUES (?, ?, ?)
                         ON CONFLICT (order_id, sku) DO UPDATE SET quantity = quantity + excluded.quantity",
                    )
                    .bind(&order.order_id)
                    .bind(&item.sku)
                    .bind(i64::from(item.quantity))
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "INSERT INTO stock (sku, reserved) VALUES (?, ?) ON CONFLICT (sku) DO UPDATE SET reserved = reserved + excluded.reserved",
                    )
                    .bind(&item.sku)
                    .bind(i64::from(item.quantity))
                    .execute(&mut *tx)
                    .await?;
                }
                "reserved"
            }
        };
        let report =
            StatusReport { order_id: order.order_id.clone(), service: "inventory".into(), status: status.into() };
        let event = Event::new(STATUS_EXCHANGE, format!("inventory.{status}"), serde_json::to_vec(&report)?)
            .with_id(format!("inventory-{}", order.order_id))
            .ordered_by(&order.order_id);
        outbox.enqueue(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }
}

impl Handler for Inventory {
    async fn handle(&self, message: Incoming) -> Outcome {
        let Ok(order) = serde_json::from_slice::<OrderReceived>(&message.body) else {
            return Outcome::Reject("the body is not an OrderReceived".into());
        };
        match self.process(&message, &order).await {
            Ok(()) => Outcome::Ack,
            Err(error) => {
                tracing::warn!(%error, order = %order.order_id, "reservation failed for now; will retry");
                Outcome::Retry
            }
        }
    }
}

/// Opens (creating what is missing) the service's database.
pub async fn open(database: &std::path::Path) -> Result<Inventory> {
    let pool = open_sqlite(database).await?;
    create_counters(&pool).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, reserved INTEGER NOT NULL)")
        .execute(&pool)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS reservations (order_id TEXT NOT NULL, sku TEXT NOT NULL, quantity INTEGER NOT NULL,
         PRIMARY KEY (order_id, sku))",
    )
    .execute(&pool)
    .await?;
    SqliteOutbox::new(pool.clone()).migrate().await?;
    SqliteInbox::new(pool.clone(), "inventory-service").migrate().await?;
    Ok(Inventory { pool })
}

/// Runs the service until SIGTERM/SIGINT.
pub async fn run(args: Args) -> Result<()> {
    init_logging("inventory-service");
    let handler = open(&args.database).await?;
    let pool = handler.pool.clone();
    serve("inventory-service", &args.broker_url, INVENTORY_QUEUE, pool, handler).await
}
