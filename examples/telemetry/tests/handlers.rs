//! The services' handlers against their databases, SQLite and PostgreSQL (the latter when
//! `WHARF_TEST_POSTGRES_URL` is set, as `scripts/test.sh` does): a reading delivered twice is
//! stored once; a reading over the threshold raises one alert (one row and one outbox event)
//! however often it comes; a payload that is not a reading is rejected, not retried.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use telemetry::services::{Alerting, Ingestion};
use telemetry::{ALERT_THRESHOLD, Database, Reading};
use wharf_sdk::{Handler, Incoming, Outcome};

fn delivery(body: Vec<u8>, redelivered: bool) -> Incoming {
    Incoming { body, redelivered, routing_key: "telemetry.device-1.reading".into(), ..Default::default() }
}

async fn count(pool: &telemetry::Pool, sql: &str) -> i64 {
    pool.integer(sql).await.unwrap()
}

/// A new PostgreSQL database of its own, or `None` (skipped) without `WHARF_TEST_POSTGRES_URL`.
async fn postgres_database(purpose: &str) -> Option<Database> {
    let Ok(admin_url) = std::env::var("WHARF_TEST_POSTGRES_URL") else {
        assert!(std::env::var_os("WHARF_TEST_POSTGRES_REQUIRED").is_none(), "WHARF_TEST_POSTGRES_URL is not set");
        eprintln!("skipped: WHARF_TEST_POSTGRES_URL is not set (scripts/test.sh sets it)");
        return None;
    };
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let name = format!("telemetry_{purpose}_{nanos:x}");
    let admin = sqlx::PgPool::connect(&admin_url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.unwrap();
    Some(Database::Postgres(format!("{}/{name}", admin_url.rsplit_once('/').unwrap().0)))
}

#[tokio::test]
async fn a_reading_delivered_twice_is_stored_once_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    a_reading_delivered_twice_is_stored_once(Database::Sqlite(dir.path().join("ingestion.db"))).await;
}

#[tokio::test]
async fn a_reading_delivered_twice_is_stored_once_on_postgres() {
    if let Some(database) = postgres_database("ingestion").await {
        a_reading_delivered_twice_is_stored_once(database).await;
    }
}

#[tokio::test]
async fn a_reading_over_the_threshold_raises_one_alert_however_often_it_comes_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    a_reading_over_the_threshold_raises_one_alert_however_often_it_comes(Database::Sqlite(
        dir.path().join("alerting.db"),
    ))
    .await;
}

#[tokio::test]
async fn a_reading_over_the_threshold_raises_one_alert_however_often_it_comes_on_postgres() {
    if let Some(database) = postgres_database("alerting").await {
        a_reading_over_the_threshold_raises_one_alert_however_often_it_comes(database).await;
    }
}

async fn a_reading_delivered_twice_is_stored_once(database: Database) {
    let ingestion = Ingestion::open(&database).await.unwrap();
    let reading = Reading { device: "device-1".into(), seq: 7, value: 21.5 };
    let body = serde_json::to_vec(&reading).unwrap();
    assert_eq!(ingestion.handle(delivery(body.clone(), false)).await, Outcome::Ack);
    assert_eq!(ingestion.handle(delivery(body, true)).await, Outcome::Ack);
    assert_eq!(count(&ingestion.pool(), "SELECT COUNT(*) FROM readings").await, 1);
    let other = serde_json::to_vec(&Reading { seq: 8, ..reading }).unwrap();
    assert_eq!(ingestion.handle(delivery(other, false)).await, Outcome::Ack);
    assert_eq!(count(&ingestion.pool(), "SELECT COUNT(*) FROM readings").await, 2, "a new reading is stored");
    assert!(
        matches!(ingestion.handle(delivery(b"21.5".to_vec(), false)).await, Outcome::Reject(reason) if reason.contains("not a reading"))
    );
}

async fn a_reading_over_the_threshold_raises_one_alert_however_often_it_comes(database: Database) {
    let alerting = Alerting::open(&database).await.unwrap();
    let hot = Reading { device: "device-2".into(), seq: 1, value: ALERT_THRESHOLD + 1.0 };
    let cold = Reading { device: "device-2".into(), seq: 2, value: ALERT_THRESHOLD - 1.0 };
    for redelivered in [false, true, true] {
        assert_eq!(alerting.handle(delivery(serde_json::to_vec(&hot).unwrap(), redelivered)).await, Outcome::Ack);
    }
    assert_eq!(alerting.handle(delivery(serde_json::to_vec(&cold).unwrap(), false)).await, Outcome::Ack);
    assert_eq!(count(&alerting.pool(), "SELECT COUNT(*) FROM alerts").await, 1);
    assert_eq!(count(&alerting.pool(), "SELECT COUNT(*) FROM wharf_outbox").await, 1, "one alert event");
}

#[test]
fn simulated_readings_are_deterministic_and_sometimes_cross_the_threshold() {
    assert_eq!(Reading::simulated("device-00001", 3), Reading::simulated("device-00001", 3));
    let crossing = (1..=1000).filter(|seq| Reading::simulated("device-00001", *seq).crosses_threshold()).count();
    assert!((10..200).contains(&crossing), "{crossing} of 1000 over the threshold");
}
