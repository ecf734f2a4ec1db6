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

/// Fails every delivery of a message whose body starts with `doomed`, and the first two of any
/// other; counts the deliveries of each.
#[derive(Clone, Default)]
struct FailsForAWhile(Arc<std::sync::Mutex<std::collections::BTreeMap<String, usize>>>);

impl Handler for FailsForAWhile {
    async fn handle(&self, message: Incoming) -> Outcome {
        let body = String::from_utf8(message.body.clone()).unwrap();
        let calls = {
            let mut calls = self.0.lock().unwrap();
            let count = calls.entry(body.clone()).or_insert(0);
            *count += 1;
            *count
        };
        if body.starts_with("doomed") || calls <= 2 { Outcome::Retry } else { Outcome::Ack }
    }
}

/// A retry policy works on any broker: a failing message is tried again at once, then after each
/// delay (through wait queues), then dead-lettered with the reason; one that recovers is
/// acknowledged on the try that worked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_policy_tries_at_once_then_after_each_delay_then_dead_letters_with_the_reason() {
    use lapin::options::{BasicGetOptions, QueueDeclareOptions};
    let broker = TestBroker::start().await;
    let connection = lapin::Connection::connect(&broker.url(), lapin::ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    for queue in ["work", "work.dead"] {
        let _ = channel.queue_delete(queue.into(), Default::default()).await;
        channel
            .queue_declare(queue.into(), QueueDeclareOptions::durable(), lapin::types::FieldTable::default())
            .await
            .unwrap();
    }
    let handler = FailsForAWhile::default();
    let config = ConsumerConfig::new(broker.url(), "work")
        .retry(wharf_sdk::RetryPolicy::new(1, [20, 40]))
        .dead_letter_to("", "work.dead");
    let (stop, stopped) = watch::channel(false);
    let consuming = tokio::spawn(run_consumer(config, handler.clone(), stopped));
    let mut publisher = ConfirmedPublisher::new(PublisherConfig::new(broker.url())).unwrap();
    let events = [Event::new("", "work", "doomed-1").with_id("d-1"), Event::new("", "work", "flaky-1").with_id("f-1")];
    // The consumer declares the wait queues when it starts: publish once it has.
    eventually("the wait queues declared", || async { queue_exists(&broker, "work.retry.40").await }).await;
    for outcome in publisher.publish_all(&events).await {
        outcome.unwrap();
    }
    let started = std::time::Instant::now();
    let dead = loop {
        if let Some(message) = channel.basic_get("work.dead".into(), BasicGetOptions { no_ack: true }).await.unwrap() {
            break message;
        }
        assert!(started.elapsed() < PATIENCE, "nothing was dead-lettered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eventually("the flaky message acknowledged", || async { handler.0.lock().unwrap().get("flaky-1") == Some(&3) })
        .await;
    stop.send(true).unwrap();
    consuming.await.unwrap().unwrap();
    let calls = handler.0.lock().unwrap().clone();
    assert_eq!(calls.get("doomed-1"), Some(&4), "1 + 1 at once + 2 delayed: {calls:?}");
    assert_eq!(calls.get("flaky-1"), Some(&3), "it worked on its third try and was not tried again: {calls:?}");
    assert_eq!(dead.properties.message_id().as_ref().map(|id| id.as_str()), Some("d-1"));
    let headers = dead.properties.headers().clone().unwrap();
    let text = |name: &str| match headers.inner().get(name) {
        Some(lapin::types::AMQPValue::LongString(text)) => String::from_utf8_lossy(text.as_bytes()).into_owned(),
        other => panic!("{name}: {other:?}"),
    };
    assert!(text(wharf_sdk::REJECT_REASON_HEADER).contains("failed 4 times"), "{headers:?}");
    assert_eq!(headers.inner().get(wharf_sdk::RETRY_ATTEMPT_HEADER), None, "re-driven, it gets its retries again");
    assert_eq!(queue_depth(&broker, "work").await, 0);
    connection.close(200, "done".into()).await.unwrap();
    broker.stop().await;
}

async fn queue_exists(broker: &TestBroker, queue: &str) -> bool {
    use lapin::options::QueueDeclareOptions;
    let connection = lapin::Connection::connect(&broker.url(), lapin::ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let exists = channel.queue_declare(queue.into(), passive, lapin::types::FieldTable::default()).await.is_ok();
    let _ = connection.close(200, "done".into()).await;
    exists
}

/// Rejects `bad-*` bodies; asks once for a retry of anything else, then acknowledges it.
#[derive(Clone, Default)]
struct RejectsBadRetriesOnce(Arc<std::sync::Mutex<std::collections::BTreeMap<String, usize>>>);

impl Handler for RejectsBadRetriesOnce {
    async fn handle(&self, message: Incoming) -> Outcome {
        let body = String::from_utf8(message.body.clone()).unwrap();
        let calls = {
            let mut calls = self.0.lock().unwrap();
            let count = calls.entry(body.clone()).or_insert(0);
            *count += 1;
            *count
        };
        match (body.starts_with("bad"), calls) {
            (true, _) => Outcome::Reject("bad".into()),
            (false, 1) => Outcome::Retry,
            (false, _) => Outcome::Ack,
        }
    }
}

/// A dead-letter target that does not exist makes the broker close the runtime's publishing
/// channel; the runtime falls back to a plain reject for that message, and reopens the channel
/// for the next copy (a retry here), instead of failing every later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publishing_channel_the_broker_closed_is_reopened() {
    use lapin::options::QueueDeclareOptions;
    let broker = TestBroker::start().await;
    let connection = lapin::Connection::connect(&broker.url(), lapin::ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let _ = channel.queue_delete("fragile".into(), Default::default()).await;
    channel
        .queue_declare("fragile".into(), QueueDeclareOptions::durable(), lapin::types::FieldTable::default())
        .await
        .unwrap();
    connection.close(200, "declared".into()).await.unwrap();
    let handler = RejectsBadRetriesOnce::default();
    let config = ConsumerConfig::new(broker.url(), "fragile")
        .dead_letter_to("no-such-exchange", "anything")
        .retry(wharf_sdk::RetryPolicy::new(1, []));
    let (stop, stopped) = watch::channel(false);
    let consuming = tokio::spawn(run_consumer(config, handler.clone(), stopped));
    let mut publisher = ConfirmedPublisher::new(PublisherConfig::new(broker.url())).unwrap();
    for outcome in publisher.publish_all(&[Event::new("", "fragile", "bad-1")]).await {
        outcome.unwrap();
    }
    eventually("the bad message rejected", || async { handler.0.lock().unwrap().get("bad-1") == Some(&1) }).await;
    for outcome in publisher.publish_all(&[Event::new("", "fragile", "good-1")]).await {
        outcome.unwrap();
    }
    eventually("the good message retried once, then acknowledged", || async {
        handler.0.lock().unwrap().get("good-1") == Some(&2) && queue_depth(&broker, "fragile").await == 0
    })
    .await;
    stop.send(true).unwrap();
    consuming.await.unwrap().unwrap();
    assert_eq!(handler.0.lock().unwrap().get("good-1"), Some(&2), "not requeued over and over");
    assert_eq!(handler.0.lock().unwrap().get("bad-1"), Some(&1), "rejected once, not looping");
    broker.stop().await;
}
