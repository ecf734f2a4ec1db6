//! `order-service`: `POST /orders` stores the order and its `OrderReceived` event in one
//! transaction (the outbox); `GET /orders/{id}` shows the order with its status as the other
//! services report it back. Its relay publishes the outbox; its consumer records the reports
//! through the inbox. SQLite by default (`--database`), PostgreSQL with `--database-url`.

use crate::*;
use anyhow::{Context, Result};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use serde::Deserialize;
use serde_json::json;
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;
use sqlx::{Postgres, Row, Sqlite, Transaction};
use std::net::SocketAddr;
use std::path::PathBuf;
use wharf_sdk::{
    ConsumerConfig, EffectHandler, HandleError, Incoming, Outbox, PgInbox, PgOutbox, SqliteInbox, SqliteOutbox, Wharf,
    exactly_once,
};

#[derive(Debug, Parser)]
pub struct Args {
    /// The broker.
    #[arg(long, env = "BROKER_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    broker_url: String,
    /// SQLite database file (the default store).
    #[arg(long, default_value = "order-service.db")]
    database: PathBuf,
    /// PostgreSQL URL (instead of SQLite).
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Where to serve HTTP.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
}

#[derive(Clone)]
enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS orders (
    id TEXT PRIMARY KEY, customer TEXT NOT NULL, restaurant TEXT NOT NULL, items TEXT NOT NULL,
    total_cents BIGINT NOT NULL, created_at BIGINT NOT NULL,
    payment TEXT, stock TEXT, email TEXT)";

/// The body of `POST /orders`. `id` is optional: a client that sends its own id can retry the
/// request safely (the same order is not created twice).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewOrder {
    id: Option<String>,
    customer: String,
    restaurant: String,
    items: Vec<Item>,
    total_cents: i64,
}

fn bad_request(message: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message.into() }))).into_response()
}

fn server_error(error: impl std::fmt::Display) -> Response {
    tracing::error!(%error, "request failed");
    (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": "storage unavailable, retry" }))).into_response()
}

fn validate(order: &NewOrder) -> Result<(), String> {
    let name_ok = |value: &str| !value.trim().is_empty() && value.len() <= 100 && !value.chars().any(char::is_control);
    if let Some(id) = &order.id
        && (id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    {
        return Err("id must be 1 to 64 characters of letters, digits, '-' and '_'".into());
    }
    if !name_ok(&order.customer) {
        return Err("customer must be 1 to 100 printable characters".into());
    }
    if !name_ok(&order.restaurant) {
        return Err("restaurant must be 1 to 100 printable characters".into());
    }
    if order.items.is_empty() || order.items.len() > 50 {
        return Err("an order has 1 to 50 items".into());
    }
    for item in &order.items {
        if item.sku.is_empty() || item.sku.len() > 64 {
            return Err("an item's sku must be 1 to 64 characters".into());
        }
        if !(1..=99).contains(&item.quantity) {
            return Err(format!("quantity of '{}' must be 1 to 99", item.sku));
        }
    }
    if !(1..=10_000_000).contains(&order.total_cents) {
        return Err("total_cents must be 1 to 10000000".into());
    }
    Ok(())
}

async fn create_order(State(db): State<Db>, body: Result<Json<NewOrder>, JsonRejection>) -> Response {
    let Json(order) = match body {
        Ok(body) => body,
        Err(rejection) => return bad_request(format!("invalid order: {}", rejection.body_text())),
    };
    if let Err(message) = validate(&order) {
        return bad_request(message);
    }
    let id = order.id.clone().unwrap_or_else(wharf_sdk::new_id);
    let event = OrderReceived {
        order_id: id.clone(),
        customer: order.customer.clone(),
        restaurant: order.restaurant.clone(),
        items: order.items.clone(),
        total_cents: order.total_cents,
    };
    let items = serde_json::to_string(&order.items).unwrap_or_default();
    let created = match &db {
        Db::Sqlite(pool) => create_sqlite(pool, &id, &order, &items, &event).await,
        Db::Postgres(pool) => create_postgres(pool, &id, &order, &items, &event).await,
    };
    match created {
        Ok(true) => (StatusCode::CREATED, Json(json!({ "id": id }))).into_response(),
        Ok(false) => (StatusCode::OK, Json(json!({ "id": id, "existing": true }))).into_response(),
        Err(error) => server_error(error),
    }
}

async fn create_sqlite(
    pool: &SqlitePool,
    id: &str,
    order: &NewOrder,
    items: &str,
    event: &OrderReceived,
) -> Result<bool> {
    let mut tx: Transaction<'_, Sqlite> = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO orders (id, customer, restaurant, items, total_cents, created_at) VALUES (?, ?, ?, ?, ?, ?)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(id)
    .bind(&order.customer)
    .bind(&order.restaurant)
    .bind(items)
    .bind(order.total_cents)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Ok(false);
    }
    // The event's id comes from the order's: a retried request can never publish a second event.
    SqliteOutbox::new(pool.clone()).publish_keyed(&mut tx, event, id).await?;
    tx.commit().await?;
    Ok(true)
}

async fn create_postgres(
    pool: &PgPool,
    id: &str,
    order: &NewOrder,
    items: &str,
    event: &OrderReceived,
) -> Result<bool> {
    let mut tx: Transaction<'_, Postgres> = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO orders (id, customer, restaurant, items, total_cents, created_at) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(id)
    .bind(&order.customer)
    .bind(&order.restaurant)
    .bind(items)
    .bind(order.total_cents)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Ok(false);
    }
    PgOutbox::new(pool.clone()).publish_keyed(&mut tx, event, id).await?;
    tx.commit().await?;
    Ok(true)
}

async fn show_order(State(db): State<Db>, Path(id): Path<String>) -> Response {
    let sql = match &db {
        Db::Sqlite(_) => {
            "SELECT id, customer, restaurant, items, total_cents, payment, stock, email FROM orders WHERE id = ?"
        }
        Db::Postgres(_) => {
            "SELECT id, customer, restaurant, items, total_cents, payment, stock, email FROM orders WHERE id = $1"
        }
    };
    let render = |id: String,
                  customer: String,
                  restaurant: String,
                  items: String,
                  total: i64,
                  payment: Option<String>,
                  stock: Option<String>,
                  email: Option<String>| {
        let items: serde_json::Value = serde_json::from_str(&items).unwrap_or_default();
        Json(json!({
            "id": id, "customer": customer, "restaurant": restaurant, "items": items, "total_cents": total,
            "status": { "payment": payment.unwrap_or_else(|| "pending".into()), "stock": stock.unwrap_or_else(|| "pending".into()), "confirmation": email.unwrap_or_else(|| "pending".into()) }
        }))
        .into_response()
    };
    macro_rules! fetch {
        ($pool:expr) => {
            match sqlx::query(sql).bind(&id).fetch_optional($pool).await {
                Ok(Some(row)) => render(
                    row.get("id"), row.get("customer"), row.get("restaurant"), row.get("items"), row.get("total_cents"),
                    row.get("payment"), row.get("stock"), row.get("email"),
                ),
                Ok(None) => (StatusCode::NOT_FOUND, Json(json!({ "error": format!("no order '{id}'") }))).into_response(),
                Err(error) => server_error(error),
            }
        };
    }
    match &db {
        Db::Sqlite(pool) => fetch!(pool),
        Db::Postgres(pool) => fetch!(pool),
    }
}

/// Records the services' reports on orders, once each (an `exactly_once` effect).
struct Reports;

fn column(report: &StatusReport) -> Result<&'static str, HandleError> {
    match report.service.as_str() {
        "payment" => Ok("payment"),
        "inventory" => Ok("stock"),
        "email" => Ok("email"),
        other => Err(HandleError::Permanent(format!("a report from an unknown service '{other}'"))),
    }
}

fn recorded(updated: u64, report: &StatusReport) -> Result<(), HandleError> {
    if updated == 1 {
        Ok(())
    } else {
        // The order's own transaction may not be visible yet on a replica; try again later.
        Err(HandleError::Transient(format!("no order '{}' to report on", report.order_id)))
    }
}

impl EffectHandler<StatusReport, Sqlite> for Reports {
    async fn handle(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        report: StatusReport,
        message: &Incoming,
    ) -> Result<(), HandleError> {
        if message.redelivered {
            count(tx, "redeliveries").await.map_err(|error| HandleError::Transient(error.to_string()))?;
        }
        let updated = sqlx::query(&format!("UPDATE orders SET {} = ? WHERE id = ?", column(&report)?))
            .bind(&report.status)
            .bind(&report.order_id)
            .execute(&mut **tx)
            .await?;
        recorded(updated.rows_affected(), &report)
    }

    async fn on_duplicate(&self, tx: &mut Transaction<'static, Sqlite>, message: &Incoming) -> Result<(), HandleError> {
        count_duplicate(tx, message).await
    }
}

impl EffectHandler<StatusReport, Postgres> for Reports {
    async fn handle(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        report: StatusReport,
        _message: &Incoming,
    ) -> Result<(), HandleError> {
        let updated = sqlx::query(&format!("UPDATE orders SET {} = $1 WHERE id = $2", column(&report)?))
            .bind(&report.status)
            .bind(&report.order_id)
            .execute(&mut **tx)
            .await?;
        recorded(updated.rows_affected(), &report)
    }
}

/// Runs the service until SIGTERM/SIGINT.
pub async fn run(args: Args) -> Result<()> {
    init_logging("order-service");
    let db = match &args.database_url {
        Some(url) => {
            let pool = PgPool::connect(url).await.with_context(|| format!("connecting to {url}"))?;
            sqlx::query(SCHEMA).execute(&pool).await?;
            // The outbox and inbox are migrated by `Wharf::builder` below.
            Db::Postgres(pool)
        }
        None => {
            let pool = open_sqlite(&args.database).await?;
            sqlx::query(SCHEMA).execute(&pool).await?;
            create_counters(&pool).await?;
            Db::Sqlite(pool)
        }
    };
    declare_topology_when_up(&args.broker_url).await?;
    // One builder per database: the relay, the inbox's purger (on both databases: the service
    // once purged only on SQLite, and its PostgreSQL inbox grew forever) and the consumer.
    let reports = ConsumerConfig::new(&args.broker_url, STATUS_QUEUE);
    let builder = Wharf::builder(&args.broker_url);
    let wharf = match &db {
        Db::Sqlite(pool) => {
            let inbox = SqliteInbox::new(pool.clone(), "order-status");
            builder
                .outbox_with(SqliteOutbox::new(pool.clone()), relay_config(&args.broker_url))
                .inbox(inbox.clone())
                .consumer(reports, exactly_once(inbox, Reports))
        }
        Db::Postgres(pool) => {
            let inbox = PgInbox::new(pool.clone(), "order-status");
            builder
                .outbox_with(PgOutbox::new(pool.clone()), relay_config(&args.broker_url))
                .inbox(inbox.clone())
                .consumer(reports, exactly_once(inbox, Reports))
        }
    }
    .start()
    .await?;
    // `/metrics` and `/health` beside the API.
    let app = Router::new()
        .route("/orders", post(create_order))
        .route("/orders/{id}", get(show_order))
        .with_state(db)
        .merge(observability_routes(wharf.health().to_vec())?);
    let listener = tokio::net::TcpListener::bind(args.http).await.with_context(|| format!("binding {}", args.http))?;
    tracing::info!(address = %args.http, "order-service listening");
    axum::serve(listener, app).with_graceful_shutdown(terminated()).await?;
    wharf.shutdown().await?;
    Ok(())
}
