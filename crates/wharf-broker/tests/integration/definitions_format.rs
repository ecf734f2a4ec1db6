//! The definitions format across releases: a data directory written before the broker had its
//! own definitions encoding (JSON values through amq-protocol's serde derives, up to commit
//! 2ed643c) opens with every vhost, exchange, queue, binding, stored message, delayed message and
//! de-duplication key in place, and keeps working after a restart on the migrated log.
//!
//! The fixture under `tests/fixtures/data-dir-json-definitions/` was made by
//! `make_data_dir_fixture` below, run with that commit's code
//! (`WHARF_FIXTURE_DIR=... cargo test -p wharf-broker --test integration make_data_dir_fixture -- --ignored`).

use crate::common;

/// Just after the fixture's data directory was written (2026-12-03 21:37:00 UTC, ms since the
/// Unix epoch); everything in it is older.
const FIXTURE_MADE_MS: u64 = 1_796_333_820_000;

use common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, ExchangeKind};
use std::path::Path;
use std::sync::Arc;
use wharf_broker::{Broker, BrokerConfig, ManualClock};

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

async fn durable_exchange(channel: &lapin::Channel, name: &str, kind: ExchangeKind, arguments: FieldTable) {
    let options = ExchangeDeclareOptions { durable: true, ..Default::default() };
    channel.exchange_declare(name.into(), kind, options, arguments).await.unwrap();
}

async fn bind(channel: &lapin::Channel, queue: &str, exchange: &str, routing_key: &str) {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

fn with_id(id: &str) -> BasicProperties {
    BasicProperties::default().with_message_id(id.into())
}

/// What the fixture holds, declared and published through a stock client.
async fn populate(url: &str) {
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await.unwrap();
    let channel = confirm_channel(&connection).await;
    durable_exchange(&channel, "orders", ExchangeKind::Topic, FieldTable::default()).await;
    durable_exchange(&channel, "dlx", ExchangeKind::Fanout, FieldTable::default()).await;
    durable_exchange(&channel, "audit", ExchangeKind::Fanout, FieldTable::default()).await;
    durable_exchange(
        &channel,
        "later",
        ExchangeKind::Custom("x-delayed-message".into()),
        arguments(&[("x-delayed-type", text("direct")), ("x-deduplication", AMQPValue::Boolean(true))]),
    )
    .await;
    durable_queue(
        &channel,
        "orders.email",
        arguments(&[
            ("x-dead-letter-exchange", text("dlx")),
            ("x-delivery-limit", AMQPValue::LongInt(5)),
            ("x-retry-backoff", AMQPValue::FieldArray(vec![AMQPValue::LongInt(1000), AMQPValue::LongInt(5000)].into())),
        ]),
    )
    .await;
    durable_queue(&channel, "dead", FieldTable::default()).await;
    durable_queue(&channel, "audit.log", FieldTable::default()).await;
    durable_queue(&channel, "deduplicated", arguments(&[("x-deduplication", AMQPValue::Boolean(true))])).await;
    durable_queue(&channel, "due", FieldTable::default()).await;
    bind(&channel, "orders.email", "orders", "order.#").await;
    bind(&channel, "dead", "dlx", "").await;
    bind(&channel, "audit.log", "audit", "").await;
    bind(&channel, "due", "later", "k").await;
    channel
        .exchange_bind(
            "audit".into(),
            "orders".into(),
            "order.*".into(),
            ExchangeBindOptions::default(),
            arguments(&[("x-note", text("exchange to exchange"))]),
        )
        .await
        .unwrap();
    for order in ["order.1", "order.2"] {
        assert!(publish_confirmed(&channel, "orders", "order.placed", order.as_bytes(), with_id(order)).await);
    }
    assert!(publish_confirmed(&channel, "", "deduplicated", b"once", with_id("m-1")).await);
    let delayed = BasicProperties::default()
        .with_message_id("d-1".into())
        .with_headers(arguments(&[("x-delay", AMQPValue::LongLongInt(3_600_000))]));
    assert!(publish_confirmed(&channel, "later", "k", b"in an hour", delayed).await);
    let staging = lapin::Connection::connect(&url.replace("%2f", "staging"), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let staging_channel = staging.create_channel().await.unwrap();
    durable_queue(&staging_channel, "staging.work", FieldTable::default()).await;
    staging.close(200, "done".into()).await.unwrap();
    connection.close(200, "done".into()).await.unwrap();
}

fn fixture_config(data_dir: &Path) -> BrokerConfig {
    let mut config = common::config(data_dir);
    config.vhosts.push("staging".into());
    config.grant_full_access("guest");
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "makes the fixture; run by hand with WHARF_FIXTURE_DIR set"]
async fn make_data_dir_fixture() {
    let target = std::env::var("WHARF_FIXTURE_DIR").expect("WHARF_FIXTURE_DIR: where to write the data directory");
    let broker = Broker::start(fixture_config(Path::new(&target))).await.unwrap();
    populate(&format!("amqp://guest:guest@{}/%2f", broker.local_addr())).await;
    broker.shutdown().await;
}

/// Copies a directory tree (the fixture, so the test never changes the checked-in files).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

async fn message_count(channel: &lapin::Channel, queue: &str) -> u32 {
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    channel.queue_declare(queue.into(), passive, FieldTable::default()).await.unwrap().message_count()
}

/// Everything the fixture holds is there and behaves: routing through topic and
/// exchange-to-exchange bindings, de-duplication keys, the delayed message, the second vhost.
async fn check_everything_is_there(broker: &Broker, clock: &ManualClock, published_since: u32) {
    let url = format!("amqp://guest:guest@{}/%2f", broker.local_addr());
    let connection = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await.unwrap();
    let channel = confirm_channel(&connection).await;
    assert_eq!(message_count(&channel, "orders.email").await, 2 + published_since);
    assert_eq!(message_count(&channel, "audit.log").await, 2 + published_since);
    assert_eq!(message_count(&channel, "deduplicated").await, 1);
    assert_eq!(message_count(&channel, "dead").await, 0);
    // The de-duplication key came back with the queue: the same id again is confirmed, dropped.
    assert!(publish_confirmed(&channel, "", "deduplicated", b"once", with_id("m-1")).await);
    assert_eq!(message_count(&channel, "deduplicated").await, 1, "a duplicate of a stored key is dropped");
    // The bindings route as before.
    assert!(publish_confirmed(&channel, "orders", "order.placed", b"order.3", with_id("order.3")).await);
    assert_eq!(message_count(&channel, "orders.email").await, 3 + published_since);
    assert_eq!(message_count(&channel, "audit.log").await, 3 + published_since);
    // The delayed message waits in its exchange until due, then goes where it is bound.
    clock.advance(2 * 3_600_000);
    broker.fire_due_timers().await;
    let mut due = consumer(&channel, "due").await;
    assert_eq!(next(&mut due).await.data, b"in an hour");
    let staging_url = url.replace("%2f", "staging");
    let staging = lapin::Connection::connect(&staging_url, lapin::ConnectionProperties::default()).await.unwrap();
    let staging_channel = staging.create_channel().await.unwrap();
    assert_eq!(message_count(&staging_channel, "staging.work").await, 0);
    staging.close(200, "done".into()).await.unwrap();
    connection.close(200, "done".into()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_with_json_definitions_opens_whole_and_keeps_working_after_a_restart() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data-dir-json-definitions");
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    copy_tree(&fixture, &data_dir);
    // The broker's clock stands just after the fixture was made (committed 2026-12-03 21:36:17
    // UTC), not at the wall clock: the fixture's de-duplication key lives 24 hours, and a clock
    // at "now" made this test fail for good from a day after the fixture was written.
    let clock = Arc::new(ManualClock::new(FIXTURE_MADE_MS));
    let mut config = fixture_config(&data_dir);
    config.clock = Arc::clone(&clock) as Arc<dyn wharf_broker::Clock>;
    let broker = Broker::start(config.clone()).await.unwrap();
    check_everything_is_there(&broker, &clock, 0).await;
    broker.shutdown().await;
    // Started again on what the first start left (the definitions as they are now written).
    let broker = Broker::start(config).await.unwrap();
    let url = format!("amqp://guest:guest@{}/%2f", broker.local_addr());
    let connection = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    assert_eq!(message_count(&channel, "orders.email").await, 3);
    assert_eq!(message_count(&channel, "audit.log").await, 3);
    assert_eq!(message_count(&channel, "due").await, 1, "the delayed message, delivered and never acked, is back");
    connection.close(200, "done".into()).await.unwrap();
    broker.shutdown().await;
}
