//! `inventory-service`: reserves stock for each order's items once (through the inbox). An order
//! with an item the restaurants do not sell is a permanent failure: it goes to `inventory.dlq`
//! with the reason in `x-failure-reason` (through the outbox, in the same transaction as the
//! inbox entry, so exactly once), and is reported `rejected`; it never loops.

use crate::*;
use clap::Parser;
use sqlx::sqlite::SqlitePool;
use sqlx::{Sqlite, Transaction};
use std::path::PathBuf;
use wharf_sdk::{EffectHandler, Event, HandleError, Incoming, Outbox, SqliteOutbox};

type Result<T, E = anyhow::Error> = std::result::Result<T, E>;

#[derive(Debug, Parser)]
pub struct Args {
    /// The broker.
    #[arg(long, env = "BROKER_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    broker_url: String,
    /// Where to serve `/metrics` and `/health` (off unless given; port 0 picks one).
    #[arg(long, env = "METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// The service's database.
    #[arg(long, default_value = "inventory-service.db")]
    database: PathBuf,
}

/// The handler of `OrderReceived`: its effect, in the transaction `exactly_once` opens after the
/// inbox recognised the order as new.
#[derive(Debug)]
pub struct Inventory {
    pool: SqlitePool,
}

impl EffectHandler<OrderReceived, Sqlite> for Inventory {
    async fn handle(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        order: OrderReceived,
        message: &Incoming,
    ) -> Result<(), HandleError> {
        count_effect(tx, message).await?;
        let outbox = SqliteOutbox::new(self.pool.clone());
        let unknown = order.items.iter().find(|item| !CATALOG.contains(&item.sku.as_str()));
        let status = match unknown {
            Some(item) => {
                // A business outcome, not a failed message: the order is rejected (and reported
                // so), and parked for a person to look at, both with the inbox entry in one
                // transaction. A `HandleError::Permanent` would dead-letter the message with its
                // reason too, but it rolls back, so the rejection could not be reported.
                let reason = format!("unknown item '{}'", item.sku);
                let mut parked = Event::from_message(&order)?
                    .with_id(format!("inventory-dlq-{}", order.order_id))
                    .with_header(FAILURE_REASON_HEADER, &reason)
                    .with_header("order-id", &order.order_id);
                parked.exchange = String::new();
                parked.routing_key = INVENTORY_DLQ.into();
                outbox.enqueue(tx, &parked).await?;
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
                    .execute(&mut **tx)
                    .await?;
                    sqlx::query(
                        "INSERT INTO stock (sku, reserved) VALUES (?, ?) ON CONFLICT (sku) DO UPDATE SET reserved = reserved + excluded.reserved",
                    )
                    .bind(&item.sku)
                    .bind(i64::from(item.quantity))
                    .execute(&mut **tx)
                    .await?;
                }
                "reserved"
            }
        };
        let report = StatusReport { order_id: order.order_id, service: "inventory".into(), status: status.into() };
        outbox.publish_keyed(tx, &report, &report.idempotency_key()).await?;
        Ok(())
    }

    async fn on_duplicate(&self, tx: &mut Transaction<'static, Sqlite>, message: &Incoming) -> Result<(), HandleError> {
        count_duplicate(tx, message).await
    }
}

impl Inventory {
    /// The handler the consumer runs: this effect, exactly once per message, through the
    /// service's inbox.
    pub fn exactly_once(self) -> wharf_sdk::ExactlyOnce<OrderReceived, wharf_sdk::SqliteInbox, Inventory> {
        let inbox = wharf_sdk::SqliteInbox::new(self.pool.clone(), "inventory-service");
        wharf_sdk::exactly_once(inbox, self)
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
    wharf_sdk::Inbox::migrate(&wharf_sdk::SqliteInbox::new(pool.clone(), "inventory-service")).await?;
    Ok(Inventory { pool })
}

/// Runs the service until SIGTERM/SIGINT.
pub async fn run(args: Args) -> Result<()> {
    init_logging("inventory-service");
    let handler = open(&args.database).await?;
    let pool = handler.pool.clone();
    serve("inventory-service", &args.broker_url, INVENTORY_QUEUE, pool, handler, args.metrics_listen).await
}
