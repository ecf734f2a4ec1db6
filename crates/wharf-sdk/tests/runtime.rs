//! The consumer runtime and housekeeping: a stop lets in-flight handlers finish and settle; a
//! rejected message goes to the queue's dead-letter queue; the consumer reconnects when the
//! broker restarts under it; sent outbox rows and old inbox entries are deleted after their
//! retention.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use wharf_sdk::{
    ConfirmedPublisher, ConsumerConfig, Event, Handler, Inbox, Incoming, Outbox, Outcome, PublisherConfig, SqliteInbox,
    SqliteOutbox, run_consumer,
};

/// Holds every message until released, then acks; counts starts and finishes.
#[derive(Clone)]
struct Slow {
    started: Arc<AtomicUsize>,
    finished: Arc<AtomicUsize>,
    release: Arc<Notify>,
}

impl Handler for Slow {
    async fn handle(&self, _message: Incoming) -> Outcome {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.release.notified().await;
        self.finished.fetch_add(1, Ordering::SeqCst);
        Outcome::Ack
    }
}

async fn publish(broker: &TestBroker, routing_key: &str, count: usize) {
    let mut publisher = ConfirmedPublisher::new(PublisherConfig::new(broker.url())).unwrap();
    let events: Vec<Event> = (0..count).map(|index| Event::new("", routing_key, format!("m{index}"))).collect();
    for outcome in publisher.publish_all(&events).await {
        outcome.unwrap();
    }
}

async fn queue_depth(broker: &TestBroker, queue: &str) -> u32 {
    use lapin::options::QueueDeclareOptions;
    let connection = lapin::Connection::connect(&broker.url(), lapin::ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    connection.close(200, "done".into()).await.unwrap();
    declared.message_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_lets_in_flight_handlers_finish_and_acks_them() {
    let broker = TestBroker::start().await;
    broker.declare("work", false).await;
    publish(&broker, "work", 3).await;
    let handler = Slow { started: Arc::default(), finished: Arc::default(), release: Arc::new(Notify::new()) };
    let (stop, stopped) = watch::channel(false);
    let mut config = ConsumerConfig::new(broker.url(), "work");
    config.concurrency = 3;
    let running = tokio::spawn(run_consumer(config, handler.clone(), stopped));
    eventually("three handlers running", || async { handler.started.load(Ordering::SeqCst) == 3 }).await;
    stop.send(true).unwrap();
    // The stop waits for them: let them finish now.
    for _ in 0..3 {
        handler.release.notify_one();
    }
    running.await.unwrap().unwrap();
    assert_eq!(handler.finished.load(Ordering::SeqCst), 3);
    assert_eq!(queue_depth(&broker, "work").await, 0, "all three were acked before the runtime returned");
    broker.stop().await;
}

struct RejectsAll;

impl Handler for RejectsAll {
    async fn handle(&self, _message: Incoming) -> Outcome {
        Outcome::Reject("this handler rejects everything".into())
    }
}

struct CountsAll(Arc<AtomicUsize>);

impl Handler for CountsAll {
    async fn handle(&self, _message: Incoming) -> Outcome {
        self.0.fetch_add(1, Ordering::SeqCst);
        Outcome::Ack
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_message_goes_to_the_dead_letter_queue_and_the_consumer_survives_a_broker_restart() {
    let mut broker = TestBroker::start().await;
    if broker.external.is_some() {
        return;
    }
    {
        use lapin::options::QueueDeclareOptions;
        use lapin::types::{AMQPValue, FieldTable, LongString};
        let connection =
            lapin::Connection::connect(&broker.url(), lapin::ConnectionProperties::default()).await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        let mut arguments = FieldTable::default();
        arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(LongString::from(b"".to_vec())));
        arguments
            .insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(LongString::from(b"parked".to_vec())));
        channel.queue_declare("poison".into(), QueueDeclareOptions::durable(), arguments).await.unwrap();
        channel.queue_declare("parked".into(), QueueDeclareOptions::durable(), FieldTable::default()).await.unwrap();
        channel.queue_declare("steady".into(), QueueDeclareOptions::durable(), FieldTable::default()).await.unwrap();
        connection.close(200, "declared".into()).await.unwrap();
    }
    let (stop, stopped) = watch::channel(false);
    let rejecting =
        tokio::spawn(run_consumer(ConsumerConfig::new(broker.url(), "poison"), RejectsAll, stopped.clone()));
    publish(&broker, "poison", 2).await;
    eventually("both in the dead-letter queue", || async { queue_depth(&broker, "parked").await == 2 }).await;
    // A consumer that keeps running while the broker restarts under it.
    let counted = Arc::new(AtomicUsize::new(0));
    let steady = tokio::spawn(run_consumer(
        ConsumerConfig::new(broker.url(), "steady"),
        CountsAll(Arc::clone(&counted)),
        stopped.clone(),
    ));
    publish(&broker, "steady", 5).await;
    eventually("the first five consumed", || async { counted.load(Ordering::SeqCst) >= 5 }).await;
    broker.restart().await;
    publish(&broker, "steady", 5).await;
    eventually("the consumer reconnected and consumed five more", || async { counted.load(Ordering::SeqCst) >= 10 })
        .await;
    stop.send(true).unwrap();
    rejecting.await.unwrap().unwrap();
    steady.await.unwrap().unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_rows_and_old_inbox_entries_are_deleted_after_their_retention() {
    let dir = tempfile::tempdir().unwrap();
    let shop = SqliteShop { pool: sqlite(dir.path()).await };
    let broker = TestBroker::start().await;
    broker.declare("payments", false).await;
    shop.setup().await;
    for index in 0..5 {
        // Five customers: five ordering keys, all claimable in one round.
        shop.place_order(&format!("order-{index}"), &format!("customer-{index}")).await;
    }
    let (stop, stopped) = watch::channel(false);
    let mut config = relay_config(&broker.url());
    // Sent rows are kept 0 ms and looked for every 50 ms: the relay's housekeeping deletes them.
    config.retention_ms = 0;
    config.housekeeping_interval_ms = 50;
    let relay = shop.relay(config);
    let rows = || async {
        use sqlx::Row;
        sqlx::query("SELECT COUNT(*) AS n FROM wharf_outbox").fetch_one(&shop.pool).await.unwrap().get::<i64, _>("n")
    };
    let mut relay = relay;
    let report = relay.round().await.unwrap();
    assert_eq!(report.sent, 5);
    assert_eq!(rows().await, 5, "sent rows are kept until their retention ends");
    let running = tokio::spawn(relay.run(stopped));
    eventually("sent rows deleted", || async { rows().await == 0 }).await;
    stop.send(true).unwrap();
    running.await.unwrap().unwrap();
    assert_eq!(SqliteOutbox::new(shop.pool.clone()).unsent_count().await.unwrap(), 0);

    let inbox = SqliteInbox::new(shop.pool.clone(), "payments");
    let mut tx = shop.pool.begin().await.unwrap();
    assert_eq!(inbox.handle(&mut tx, "m-1").await.unwrap(), wharf_sdk::Seen::First);
    tx.commit().await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(inbox.purge(60_000).await.unwrap(), 0, "young entries stay");
    assert_eq!(inbox.purge(1).await.unwrap(), 1, "entries past the retention go");
    broker.stop().await;
}
