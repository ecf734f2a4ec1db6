//! `payment-service`: charges each order once. The payment provider is simulated as real ones
//! work: its own ledger (a database of its own) that accepts an idempotency key, so a charge
//! retried after a crash returns the first charge instead of taking the money twice. The handler
//! is an `exactly_once` effect: the payment and its `StatusReport` (captured or failed) commit with
//! the inbox entry, in one transaction.

use crate::*;
use clap::Parser;
use sqlx::sqlite::SqlitePool;
use sqlx::{Row, Sqlite, Transaction};
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

/// The handler of `OrderReceived`: its effect, in the transaction `exactly_once` opens after the
/// inbox recognised the order as new.
#[derive(Debug)]
pub struct Payments {
    pool: SqlitePool,
    provider: Provider,
}

impl EffectHandler<OrderReceived, Sqlite> for Payments {
    async fn handle(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        order: OrderReceived,
        message: &Incoming,
    ) -> Result<(), HandleError> {
        count_effect(tx, message).await?;
        let declined = order.total_cents > DECLINED_ABOVE_CENTS;
        // The provider is a remote call made inside our transaction (its ledger is a database of
        // its own, so this holds our write lock, not its). Its idempotency key makes a second call
        // after a crash, or for a redelivery whose first attempt rolled back, return the first
        // charge instead of taking the money twice.
        let charge = if declined {
            None
        } else {
            let charged = self.provider.charge(&format!("order-{}", order.order_id), order.total_cents).await;
            Some(charged.map_err(|error| HandleError::Transient(format!("the payment provider: {error}")))?)
        };
        let status = match charge {
            None => "failed",
            Some(charge) => {
                sqlx::query("INSERT INTO payments (order_id, charge_id, amount_cents, paid_at) VALUES (?, ?, ?, ?)")
                    .bind(&order.order_id)
                    .bind(charge)
                    .bind(order.total_cents)
                    .bind(now_ms())
                    .execute(&mut **tx)
                    .await?;
                "captured"
            }
        };
        let report = StatusReport { order_id: order.order_id, service: "payment".into(), status: status.into() };
        SqliteOutbox::new(self.pool.clone()).publish_keyed(tx, &report, &report.idempotency_key()).await?;
        Ok(())
    }

    async fn on_duplicate(&self, tx: &mut Transaction<'static, Sqlite>, message: &Incoming) -> Result<(), HandleError> {
        count_duplicate(tx, message).await
    }
}

impl Payments {
    /// The handler the consumer runs: this effect, exactly once per message, through the
    /// service's inbox.
    pub fn exactly_once(self) -> wharf_sdk::ExactlyOnce<OrderReceived, wharf_sdk::SqliteInbox, Payments> {
        let inbox = wharf_sdk::SqliteInbox::new(self.pool.clone(), "payment-service");
        wharf_sdk::exactly_once(inbox, self)
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
    // The outbox and inbox are migrated by `serve` (`Wharf::builder`); the tests migrate them
    // here too (idempotent).
    SqliteOutbox::new(pool.clone()).migrate().await?;
    wharf_sdk::Inbox::migrate(&wharf_sdk::SqliteInbox::new(pool.clone(), "payment-service")).await?;
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
    serve("payment-service", &args.broker_url, PAYMENT_QUEUE, pool, handler, args.metrics_listen).await
}
