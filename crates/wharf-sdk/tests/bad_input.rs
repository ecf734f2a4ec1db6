//! What cannot be published is marked failed with the reason and blocks nothing but its own
//! ordering key; a database that goes away makes the relay retry, never lose or skip rows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::time::Duration;
use tokio::sync::watch;
use wharf_sdk::{Event, Outbox, PgOutbox, SqliteOutbox};

async fn wait_failed(failed: impl AsyncFn() -> Vec<(String, String)>, count: usize) -> Vec<(String, String)> {
    let started = std::time::Instant::now();
    loop {
        let rows = failed().await;
        if rows.len() >= count {
            return rows;
        }
        assert!(started.elapsed() < PATIENCE, "rows were not marked failed: {rows:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_marked_failed_with_the_reason_and_block_only_their_own_key() {
    let dir = tempfile::tempdir().unwrap();
    let shop = SqliteShop { pool: sqlite(dir.path()).await };
    let broker = TestBroker::start().await;
    broker.declare("payments", false).await;
    shop.setup().await;
    let outbox = SqliteOutbox::new(shop.pool.clone());
    let write = |event: Event| {
        let pool = shop.pool.clone();
        let outbox = outbox.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            outbox.enqueue(&mut tx, &event).await.unwrap();
            tx.commit().await.unwrap();
        }
    };
    // Customer A: first an event to a missing exchange, then a good one (must wait behind it).
    write(Event::new("no-such-exchange", "x", "lost").with_id("bad-exchange").ordered_by("A")).await;
    write(Event::new("orders", "order.received", "{}").with_id("a-2").ordered_by("A").with_header("order-id", "a-2"))
        .await;
    // Customer B: a body over the relay's limit, then a good one (also waits behind it).
    write(Event::new("orders", "order.received", vec![b'x'; 5_000]).with_id("too-big").ordered_by("B")).await;
    write(Event::new("orders", "order.received", "{}").with_id("b-2").ordered_by("B").with_header("order-id", "b-2"))
        .await;
    // Other customers flow regardless.
    for index in 0..5 {
        let id = format!("c-{index}");
        write(
            Event::new("orders", "order.received", "{}")
                .with_id(&id)
                .ordered_by(format!("C{index}"))
                .with_header("order-id", &id),
        )
        .await;
    }
    // Customer D: routed nowhere (nothing is bound for this key): refused, not counted as sent.
    write(Event::new("orders", "nothing.is.bound.here", "{}").with_id("unrouted").ordered_by("D")).await;
    let (stop, stopped) = watch::channel(false);
    let mut config = relay_config(&broker.url());
    config.message_bytes_max = 4_096;
    config.refusals_max = 2;
    let relay = tokio::spawn(shop.relay(config).run(stopped.clone()));
    let failed = wait_failed(|| async { outbox.failed().await.unwrap() }, 3).await;
    assert_eq!(failed[0].0, "bad-exchange");
    assert!(failed[0].1.contains("unknown exchange 'no-such-exchange'"), "{failed:?}");
    assert_eq!(failed[1].0, "too-big");
    assert!(failed[1].1.contains("larger than the broker's limit of 4096 bytes"), "{failed:?}");
    assert_eq!(failed[2].0, "unrouted");
    assert!(failed[2].1.contains("reached no queue"), "{failed:?}");
    // The other customers' events went through; A's second event waits behind its failed first.
    let consuming = tokio::spawn(wharf_sdk::run_consumer(
        wharf_sdk::ConsumerConfig::new(broker.url(), "payments"),
        Charger { shop: shop.clone() },
        stopped.clone(),
    ));
    eventually("the other customers' events are consumed", || async { shop.payments().await.len() >= 5 }).await;
    let paid = shop.payments().await;
    assert!(!paid.iter().any(|(id, _)| id == "a-2"), "a-2 must not overtake its failed predecessor");
    assert!(!paid.iter().any(|(id, _)| id == "b-2"), "b-2 must not overtake its failed predecessor");
    // The operator fixes the cause and retries: A's events go, in order.
    {
        use lapin::options::ExchangeDeclareOptions;
        let connection =
            lapin::Connection::connect(&broker.url(), lapin::ConnectionProperties::default()).await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .exchange_declare(
                "no-such-exchange".into(),
                lapin::ExchangeKind::Fanout,
                ExchangeDeclareOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_declare(
                "rescued".into(),
                lapin::options::QueueDeclareOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                "rescued".into(),
                "no-such-exchange".into(),
                "".into(),
                lapin::options::QueueBindOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        connection.close(200, "done".into()).await.unwrap();
    }
    assert!(outbox.retry_failed("bad-exchange").await.unwrap());
    eventually("a-2 goes once its predecessor went", || async {
        shop.payments().await.iter().any(|(id, _)| id == "a-2")
    })
    .await;
    // The retried event itself reached a queue (publishes are mandatory: an unroutable one would
    // have been refused, not counted as sent).
    {
        let connection =
            lapin::Connection::connect(&broker.url(), lapin::ConnectionProperties::default()).await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        let got = channel.basic_get("rescued".into(), lapin::options::BasicGetOptions { no_ack: true }).await.unwrap();
        assert_eq!(got.expect("the retried event is in the queue").delivery.data, b"lost");
        connection.close(200, "done".into()).await.unwrap();
    }
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    consuming.await.unwrap().unwrap();
    broker.stop().await;
}

#[derive(Clone)]
struct Charger<S: Shop> {
    shop: S,
}

impl<S: Shop> wharf_sdk::Handler for Charger<S> {
    async fn handle(&self, message: wharf_sdk::Incoming) -> wharf_sdk::Outcome {
        match self.shop.charge(&message).await {
            Ok(_) => wharf_sdk::Outcome::Ack,
            Err(_) => wharf_sdk::Outcome::Retry,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_goes_away_makes_the_relay_retry_without_losing_rows() {
    let Some(pool) = postgres().await else { return };
    let shop = PgShop { pool };
    let broker = TestBroker::start().await;
    broker.declare("payments", false).await;
    shop.setup().await;
    let placed: Vec<String> = (0..120).map(|index| format!("order-{index}")).collect();
    for (index, order) in placed.iter().enumerate() {
        shop.place_order(order, &format!("customer-{}", index % 5)).await;
    }
    let (stop, stopped) = watch::channel(false);
    let relay = tokio::spawn(shop.relay(relay_config(&broker.url())).run(stopped.clone()));
    let consuming = tokio::spawn(wharf_sdk::run_consumer(
        wharf_sdk::ConsumerConfig::new(broker.url(), "payments"),
        Charger { shop: shop.clone() },
        stopped.clone(),
    ));
    // The database drops every other connection, again and again, while the relay works.
    let killer = {
        let url = common::postgres_url().unwrap();
        tokio::spawn(async move {
            let admin = sqlx::postgres::PgPool::connect(&url).await.unwrap();
            for _ in 0..10 {
                let _ = sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE pid <> pg_backend_pid() AND backend_type = 'client backend' AND usename = current_user
                       AND application_name <> 'psql'",
                )
                .execute(&admin)
                .await;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    killer.await.unwrap();
    eventually("every order paid despite the dropped connections", || async {
        shop.payments().await.len() >= placed.len()
    })
    .await;
    let payments = shop.payments().await;
    let mut paid: Vec<String> = payments.iter().map(|(_, order)| order.clone()).collect();
    paid.sort();
    paid.dedup();
    assert_eq!(paid.len(), placed.len(), "every order paid");
    assert_eq!(payments.len(), placed.len(), "none twice");
    assert_eq!(PgOutbox::new(shop.pool.clone()).unsent_count().await.unwrap(), 0);
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    consuming.await.unwrap().unwrap();
    broker.stop().await;
}
