//! Each service's handler on its own database: an effect happens once however often the event
//! is delivered, a declined payment is reported without a charge, an unknown item goes to the
//! dead-letter queue with its reason; and the order service's HTTP API refuses bad orders with a
//! clear 400, takes a retried order once, and serves `/health` and `/metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use food_delivery::services::{email, inventory, order, payment};
use food_delivery::{Item, OrderReceived, open_sqlite};
use sqlx::Row;
use wharf_sdk::{Handler, Incoming, Outcome};

fn delivery(order: &OrderReceived, redelivered: bool) -> Incoming {
    Incoming {
        message_id: Some(format!("order-received-{}", order.order_id)),
        exchange: "orders".into(),
        routing_key: "order.received".into(),
        headers: Default::default(),
        body: serde_json::to_vec(order).unwrap(),
        redelivered,
        delivery_count: u32::from(redelivered),
        ..Incoming::default()
    }
}

fn order(id: &str, skus: &[&str], total_cents: i64) -> OrderReceived {
    OrderReceived {
        order_id: id.into(),
        customer: "ada".into(),
        restaurant: "Trattoria".into(),
        items: skus.iter().map(|sku| Item { sku: (*sku).into(), quantity: 2 }).collect(),
        total_cents,
    }
}

async fn count(path: &std::path::Path, sql: &str) -> i64 {
    let pool = open_sqlite(path).await.unwrap();
    sqlx::query(sql).fetch_one(&pool).await.unwrap().get::<i64, _>(0)
}

#[tokio::test]
async fn a_payment_is_charged_once_however_often_it_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let (database, provider) = (dir.path().join("payment.db"), dir.path().join("provider.db"));
    let handler = payment::open(&database, &provider).await.unwrap().exactly_once();
    let paid = order("o-1", &["tiramisu"], 1250);
    assert_eq!(handler.handle(delivery(&paid, false)).await, Outcome::Ack);
    assert_eq!(handler.handle(delivery(&paid, true)).await, Outcome::Ack);
    assert_eq!(count(&provider, "SELECT COUNT(*) FROM charges").await, 1, "the provider charged once");
    assert_eq!(count(&database, "SELECT COUNT(*) FROM payments").await, 1);
    assert_eq!(count(&database, "SELECT value FROM counters WHERE name = 'inbox_duplicates'").await, 1);
    assert_eq!(count(&database, "SELECT COUNT(*) FROM wharf_outbox WHERE routing_key = 'payment.captured'").await, 1);
    // Above the provider's limit: declined, reported, nothing charged.
    let declined = order("o-2", &["tiramisu"], 9_000_000);
    assert_eq!(handler.handle(delivery(&declined, false)).await, Outcome::Ack);
    assert_eq!(count(&provider, "SELECT COUNT(*) FROM charges").await, 1);
    assert_eq!(count(&database, "SELECT COUNT(*) FROM wharf_outbox WHERE routing_key = 'payment.failed'").await, 1);
}

#[tokio::test]
async fn stock_is_reserved_once_and_an_unknown_item_is_dead_lettered_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("inventory.db");
    let handler = inventory::open(&database).await.unwrap().exactly_once();
    let good = order("o-1", &["tiramisu", "lemonade", "tiramisu"], 2000);
    for redelivered in [false, true, true] {
        assert_eq!(handler.handle(delivery(&good, redelivered)).await, Outcome::Ack);
    }
    assert_eq!(count(&database, "SELECT quantity FROM reservations WHERE sku = 'tiramisu'").await, 4, "2 + 2, once");
    assert_eq!(count(&database, "SELECT reserved FROM stock WHERE sku = 'lemonade'").await, 2);
    let bad = order("o-2", &["tiramisu", "mystery-dish"], 2000);
    assert_eq!(handler.handle(delivery(&bad, false)).await, Outcome::Ack, "a permanent failure does not loop");
    assert_eq!(handler.handle(delivery(&bad, true)).await, Outcome::Ack);
    assert_eq!(count(&database, "SELECT COUNT(*) FROM reservations WHERE order_id = 'o-2'").await, 0);
    let pool = open_sqlite(&database).await.unwrap();
    let parked = sqlx::query("SELECT routing_key, headers FROM wharf_outbox WHERE routing_key = 'inventory.dlq'")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(parked.len(), 1, "dead-lettered once");
    let headers: String = parked[0].get("headers");
    assert!(headers.contains("unknown item 'mystery-dish'"), "{headers}");
    // A body that is not an order at all is rejected (to the queue's dead-letter queue).
    let mut garbage = delivery(&good, false);
    garbage.body = b"not json".to_vec();
    assert!(matches!(handler.handle(garbage).await, Outcome::Reject(reason) if reason.contains("OrderReceived")));
}

#[tokio::test]
async fn one_email_per_order() {
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("email.db");
    let handler = email::open(&database).await.unwrap().exactly_once();
    let placed = order("o-1", &["green-salad"], 900);
    for redelivered in [false, true] {
        assert_eq!(handler.handle(delivery(&placed, redelivered)).await, Outcome::Ack);
    }
    assert_eq!(count(&database, "SELECT COUNT(*) FROM mailbox").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_api_refuses_bad_orders_and_takes_a_retried_one_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = wharf_broker::BrokerConfig::new(dir.path().join("broker"));
    config.amqp_listen = "127.0.0.1:0".parse().unwrap();
    let broker = wharf_broker::Broker::start(config).await.unwrap();
    let http_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let args = <order::Args as clap::Parser>::parse_from([
        "order-service".to_owned(),
        "--broker-url".into(),
        format!("amqp://guest:guest@{}/%2f", broker.local_addr()),
        "--database".into(),
        dir.path().join("orders.db").to_string_lossy().into_owned(),
        "--http".into(),
        http_port.to_string(),
    ]);
    let service = tokio::spawn(order::run(args));
    let started = std::time::Instant::now();
    while tokio::net::TcpStream::connect(http_port).await.is_err() {
        assert!(started.elapsed().as_secs() < 60, "the order service did not start");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let post = |body: &str| food_delivery::http::request(http_port, "POST", "/orders", Some(body.to_owned()));
    for (body, expected) in [
        (r#"{"customer":"","restaurant":"r","items":[{"sku":"tiramisu","quantity":1}],"total_cents":100}"#, "customer"),
        (r#"{"customer":"ada","restaurant":"r","items":[],"total_cents":100}"#, "1 to 50 items"),
        (
            r#"{"customer":"ada","restaurant":"r","items":[{"sku":"tiramisu","quantity":0}],"total_cents":100}"#,
            "quantity",
        ),
        (
            r#"{"customer":"ada","restaurant":"r","items":[{"sku":"tiramisu","quantity":1}],"total_cents":-5}"#,
            "total_cents",
        ),
        (r#"{"customer":"ada""#, "invalid order"),
        (
            r#"{"customer":"ada","restaurant":"r","items":[{"sku":"tiramisu","quantity":1}],"total_cents":100,"extra":1}"#,
            "invalid order",
        ),
    ] {
        let (status, text) = post(body).await.unwrap();
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains(expected), "{body}: {text}");
    }
    let good =
        r#"{"id":"o-7","customer":"ada","restaurant":"r","items":[{"sku":"tiramisu","quantity":1}],"total_cents":100}"#;
    assert_eq!(post(good).await.unwrap().0, 201);
    assert_eq!(post(good).await.unwrap().0, 200, "a retried order is taken once");
    let (status, text) = food_delivery::http::request(http_port, "GET", "/orders/o-7", None).await.unwrap();
    assert_eq!(status, 200);
    assert!(text.contains("\"customer\":\"ada\""), "{text}");
    assert_eq!(food_delivery::http::request(http_port, "GET", "/orders/nope", None).await.unwrap().0, 404);
    assert_eq!(count(&dir.path().join("orders.db"), "SELECT COUNT(*) FROM wharf_outbox").await, 1, "one event");
    // `/health` turns up once the relay and the consumer work; `/metrics` counts the relayed event.
    fn relayed_events(metrics: &str) -> u64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("wharf_relay_published_total "))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0)
    }
    let get = |path: &'static str| food_delivery::http::request(http_port, "GET", path, None);
    let started = std::time::Instant::now();
    loop {
        let (status, health) = get("/health").await.unwrap();
        let (_, metrics) = get("/metrics").await.unwrap();
        // The recorder is the process's: another test in this binary may have relayed too.
        if status == 200 && relayed_events(&metrics) >= 1 {
            assert!(
                health.contains("\"relay:wharf_outbox\"") && health.contains("\"consumer:order-service.status\""),
                "{health}"
            );
            assert!(metrics.contains("wharf_outbox_unsent_rows"), "{metrics}");
            break;
        }
        assert!(started.elapsed().as_secs() < 60, "health {status} {health}; metrics {metrics}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    service.abort();
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_service_keeps_orders_and_their_events_in_postgres_when_given_a_url() {
    // Skips without a database URL, unless scripts/test.sh (which starts one) asked for it.
    let Ok(url) = std::env::var("WHARF_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var_os("WHARF_TEST_POSTGRES_REQUIRED").is_none(),
            "WHARF_TEST_POSTGRES_REQUIRED is set but WHARF_TEST_POSTGRES_URL is not"
        );
        eprintln!("skipped: WHARF_TEST_POSTGRES_URL is not set (scripts/test.sh starts a throwaway PostgreSQL)");
        return;
    };
    let database =
        format!("food{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {database}")).execute(&admin).await.unwrap();
    let database_url = format!("{}/{database}", url.rsplit_once('/').unwrap().0);
    let dir = tempfile::tempdir().unwrap();
    let mut config = wharf_broker::BrokerConfig::new(dir.path().join("broker"));
    config.amqp_listen = "127.0.0.1:0".parse().unwrap();
    let broker = wharf_broker::Broker::start(config).await.unwrap();
    let http_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let args = <order::Args as clap::Parser>::parse_from([
        "order-service".to_owned(),
        "--broker-url".into(),
        format!("amqp://guest:guest@{}/%2f", broker.local_addr()),
        "--database-url".into(),
        database_url.clone(),
        "--http".into(),
        http_port.to_string(),
    ]);
    let service = tokio::spawn(order::run(args));
    let started = std::time::Instant::now();
    while tokio::net::TcpStream::connect(http_port).await.is_err() {
        assert!(started.elapsed().as_secs() < 60, "the order service did not start");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let body = r#"{"id":"pg-1","customer":"ada","restaurant":"r","items":[{"sku":"tiramisu","quantity":1}],"total_cents":100}"#;
    let (status, text) = food_delivery::http::request(http_port, "POST", "/orders", Some(body.into())).await.unwrap();
    assert_eq!(status, 201, "{text}");
    let (status, text) = food_delivery::http::request(http_port, "GET", "/orders/pg-1", None).await.unwrap();
    assert_eq!(status, 200, "{text}");
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    let orders: i64 = sqlx::query("SELECT COUNT(*) FROM orders").fetch_one(&pool).await.unwrap().get(0);
    let events: i64 = sqlx::query("SELECT COUNT(*) FROM wharf_outbox").fetch_one(&pool).await.unwrap().get(0);
    assert_eq!((orders, events), (1, 1), "the order and its event, in PostgreSQL");
    service.abort();
    pool.close().await;
    broker.shutdown().await;
}
