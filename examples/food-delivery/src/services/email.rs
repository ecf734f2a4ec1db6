//! `email-service`: "sends" each order's confirmation by appending it to a mailbox table keyed by
//! an idempotency key (the order id), in the same transaction as its inbox entry, so a
//! redelivery never mails twice; reports `sent` through the outbox.

use crate::*;
use clap::Parser;
use sqlx::sqlite::SqlitePool;
use sqlx::{Sqlite, Transaction};
use std::path::PathBuf;
use wharf_sdk::{EffectHandler, HandleError, Incoming, Outbox, SqliteOutbox};

type Result<T, E = anyhow::Error> = std::result::Result<T, E>;

#[derive(Debug, Parser)]
pub struct Args {
    /// The broker.
    #[arg(long, env = "BROKER_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    broker_url: String,
    /// Where to serve `/metrics` and `/health` (off unless given; port 0 picks one).
    #[arg(long, env = "METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// The service's database (the mailbox is in it).
    #[arg(long, default_value = "email-service.db")]
    database: PathBuf,
}

/// The handler of `OrderReceived`: its effect, in the transaction `exactly_once` opens after the
/// inbox recognised the order as new.
#[derive(Debug)]
pub struct Mailer {
    pool: SqlitePool,
}

impl EffectHandler<OrderReceived, Sqlite> for Mailer {
    async fn handle(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        order: OrderReceived,
        message: &Incoming,
    ) -> Result<(), HandleError> {
        count_effect(tx, message).await?;
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
            .execute(&mut **tx)
            .await?;
        let report = StatusReport { order_id: order.order_id, service: "email".into(), status: "sent".into() };
        SqliteOutbox::new(self.pool.clone()).publish_keyed(tx, &report, &report.idempotency_key()).await?;
        Ok(())
    }

    async fn on_duplicate(&self, tx: &mut Transaction<'static, Sqlite>, message: &Incoming) -> Result<(), HandleError> {
        count_duplicate(tx, message).await
    }
}

impl Mailer {
    /// The handler the consumer runs: this effect, exactly once per message, through the
    /// service's inbox.
    pub fn exactly_once(self) -> wharf_sdk::ExactlyOnce<OrderReceived, wharf_sdk::SqliteInbox, Mailer> {
        let inbox = wharf_sdk::SqliteInbox::new(self.pool.clone(), "email-service");
        wharf_sdk::exactly_once(inbox, self)
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
    wharf_sdk::Inbox::migrate(&wharf_sdk::SqliteInbox::new(pool.clone(), "email-service")).await?;
    Ok(Mailer { pool })
}

/// Runs the service until SIGTERM/SIGINT.
pub async fn run(args: Args) -> Result<()> {
    init_logging("email-service");
    let handler = open(&args.database).await?;
    let pool = handler.pool.clone();
    serve("email-service", &args.broker_url, EMAIL_QUEUE, pool, handler, args.metrics_listen).await
}
