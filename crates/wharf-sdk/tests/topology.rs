//! The typed topology and request/reply against a real broker: a declared queue has its
//! guarantees (refused when redeclared without them, its dead-letter and wait queues there, its
//! exchange de-duplicating) and its consumer config dead-letters with the reason; a typed request
//! gets its typed reply over direct reply-to, a refused request gets none in time, and one no
//! queue takes fails at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use std::time::Duration;
use tokio::sync::watch;
use wharf_sdk::topology::{Exchange, ExchangeKind, Queue, Topology};
use wharf_sdk::{
    ConfirmedPublisher, Event, HandleError, Handler, Incoming, Message, Outcome, PublisherConfig, Requester, Responder,
    RetryPolicy, SdkError, responding, run_consumer,
};

async fn exists(channel: &lapin::Channel, queue: &str) -> bool {
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    channel.queue_declare(queue.into(), passive, FieldTable::default()).await.is_ok()
}

struct RejectsAll;

impl Handler for RejectsAll {
    async fn handle(&self, _message: Incoming) -> Outcome {
        Outcome::Reject("not today".into())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_topology_has_its_guarantees() {
    let broker = TestBroker::start().await;
    if broker.external.is_some() {
        return; // Wharf's own arguments (x-ordered-by, x-retry-backoff, x-deduplication).
    }
    let payments = Queue::new("payments")
        .bind("orders", "order.#")
        .dead_letter_queue("payments.dlq")
        .delivery_limit(3)
        .retry_backoff_ms([10, 20])
        .retry(RetryPolicy::new(0, [20]));
    // Per-key order on a queue of its own (the SDK's retries cannot go with it).
    let ordered = Queue::new("payments.ordered").bind("orders", "order.#").ordered_by_key();
    let topology = Topology::new()
        .with_exchange(Exchange::new("orders", ExchangeKind::Topic).deduplicated())
        .queue(payments.clone())
        .queue(ordered);
    topology.declare(&broker.url()).await.unwrap();
    topology.declare(&broker.url()).await.unwrap();

    let connection = lapin::Connection::connect(&broker.url(), lapin::ConnectionProperties::default()).await.unwrap();
    for queue in ["payments", "payments.dlq", "payments.retry.20", "payments.ordered"] {
        let channel = connection.create_channel().await.unwrap();
        assert!(exists(&channel, queue).await, "{queue}");
    }
    let channel = connection.create_channel().await.unwrap();
    let plain = channel.queue_declare("payments".into(), QueueDeclareOptions::durable(), FieldTable::default()).await;
    assert!(format!("{:?}", plain.unwrap_err()).contains("PRECONDITION"), "declared with its arguments");

    // The exchange drops a copy; the queue's consumer dead-letters with the reason.
    let mut publisher = ConfirmedPublisher::new(PublisherConfig::new(broker.url())).unwrap();
    let event = Event::new("orders", "order.received", "o-1").with_id("e-1");
    for outcome in publisher.publish_all(&[event.clone(), event]).await {
        outcome.unwrap();
    }
    let (stop, stopped) = watch::channel(false);
    let consuming = tokio::spawn(run_consumer(payments.consumer(broker.url()), RejectsAll, stopped));
    let channel = connection.create_channel().await.unwrap();
    let started = std::time::Instant::now();
    let dead = loop {
        if let Some(message) = channel.basic_get("payments.dlq".into(), BasicGetOptions { no_ack: true }).await.unwrap()
        {
            break message;
        }
        assert!(started.elapsed() < PATIENCE, "nothing dead-lettered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let headers = dead.properties.headers().clone().unwrap();
    let reason = match headers.inner().get(wharf_sdk::REJECT_REASON_HEADER) {
        Some(lapin::types::AMQPValue::LongString(text)) => String::from_utf8_lossy(text.as_bytes()).into_owned(),
        other => panic!("no reason: {other:?}"),
    };
    assert_eq!(reason, "not today");
    stop.send(true).unwrap();
    consuming.await.unwrap().unwrap();
    let empty = channel.basic_get("payments.dlq".into(), BasicGetOptions { no_ack: true }).await.unwrap();
    assert!(empty.is_none(), "the exchange dropped the copy: one dead letter, not two");
    connection.close(200, "done".into()).await.unwrap();
    broker.stop().await;
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PriceAsked {
    sku: String,
}

impl Message for PriceAsked {
    const TYPE: &'static str = "PriceAsked";
    fn routing_key(&self) -> String {
        "prices".into()
    }
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct PriceQuoted {
    sku: String,
    cents: i64,
}

impl Message for PriceQuoted {
    const TYPE: &'static str = "PriceQuoted";
}

struct Prices;

impl Responder<PriceAsked, PriceQuoted> for Prices {
    async fn respond(&self, request: PriceAsked, _incoming: &Incoming) -> Result<PriceQuoted, HandleError> {
        match request.sku.as_str() {
            "pizza" => Ok(PriceQuoted { sku: request.sku, cents: 1250 }),
            other => Err(HandleError::Permanent(format!("no price for '{other}'"))),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typed_request_gets_its_typed_reply() {
    let broker = TestBroker::start().await;
    Topology::new().queue(Queue::new("prices")).declare(&broker.url()).await.unwrap();
    let (stop, stopped) = watch::channel(false);
    let config = wharf_sdk::ConsumerConfig::new(broker.url(), "prices");
    let serving = tokio::spawn(run_consumer(config, responding(Prices), stopped));
    let requester = Requester::connect(&broker.url()).await.unwrap();

    let quoted: PriceQuoted = requester.request(&PriceAsked { sku: "pizza".into() }, PATIENCE).await.unwrap();
    assert_eq!(quoted, PriceQuoted { sku: "pizza".into(), cents: 1250 });
    let twice: PriceQuoted = requester.request(&PriceAsked { sku: "pizza".into() }, PATIENCE).await.unwrap();
    assert_eq!(twice.cents, 1250, "the requester serves more than one request");

    // Refused by the responder: no reply, so the request times out (waiting is the point here).
    let refused =
        requester.request::<_, PriceQuoted>(&PriceAsked { sku: "sushi".into() }, Duration::from_millis(300)).await;
    assert!(matches!(refused, Err(SdkError::NoReply { .. })), "{refused:?}");
    // No queue takes it: refused at once, not after the timeout.
    let event = Event::new("", "no-such-queue", "{}");
    let unroutable = requester.request_event(&event, PATIENCE).await;
    assert!(matches!(unroutable, Err(SdkError::Unroutable { .. })), "{unroutable:?}");

    // A request that carries its own correlation id is answered on it.
    let own = Event::from_message(&PriceAsked { sku: "pizza".into() }).unwrap().with_correlation_id("c-9");
    let reply = requester.request_event(&own, PATIENCE).await.unwrap();
    assert_eq!(reply.properties.correlation_id().as_ref().map(|id| id.as_str()), Some("c-9"));
    requester.close().await.unwrap();
    stop.send(true).unwrap();
    serving.await.unwrap().unwrap();
    broker.stop().await;
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct OrderPlaced {
    order_id: String,
}

impl Message for OrderPlaced {
    const TYPE: &'static str = "OrderPlaced";
    fn routing_key(&self) -> String {
        "placed".into()
    }
}

struct Record;

impl wharf_sdk::EffectHandler<OrderPlaced, sqlx::Sqlite> for Record {
    async fn handle(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
        order: OrderPlaced,
        _incoming: &Incoming,
    ) -> Result<(), HandleError> {
        sqlx::query("INSERT INTO seen (order_id) VALUES (?)").bind(order.order_id).execute(&mut **tx).await?;
        Ok(())
    }
}

/// One builder starts the migrations, the relay, the purger and the consumer; they work; one
/// shutdown stops them all cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_builder_starts_everything_and_one_shutdown_drains_it() {
    use wharf_sdk::{Outbox, SqliteInbox, SqliteOutbox, Wharf, exactly_once};
    let broker = TestBroker::start().await;
    Topology::new().queue(Queue::new("placed")).declare(&broker.url()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite(dir.path()).await;
    sqlx::query("CREATE TABLE seen (order_id TEXT NOT NULL)").execute(&pool).await.unwrap();
    let outbox = SqliteOutbox::new(pool.clone());
    let inbox = SqliteInbox::new(pool.clone(), "orders");
    let wharf = Wharf::builder(broker.url())
        .outbox_with(outbox.clone(), relay_config(&broker.url()))
        .inbox(inbox.clone())
        .consumer(wharf_sdk::ConsumerConfig::new(broker.url(), "placed"), exactly_once(inbox, Record))
        .start()
        .await
        .unwrap();
    // The migrations ran before start returned: the outbox takes a write at once.
    let mut tx = pool.begin().await.unwrap();
    for index in 0..20 {
        outbox.publish(&mut tx, &OrderPlaced { order_id: format!("o-{index}") }).await.unwrap();
    }
    tx.commit().await.unwrap();
    eventually("every order recorded", || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM seen").fetch_one(&pool).await.unwrap() == 20
    })
    .await;
    eventually("everything healthy", || async { wharf.is_healthy() }).await;
    let names: Vec<&str> = wharf.health().iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, vec!["relay:wharf_outbox", "consumer:placed"]);
    wharf.shutdown().await.unwrap();
    assert_eq!(outbox.unsent_count().await.unwrap(), 0);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_cannot_work_are_refused_before_anything_starts() {
    let broker = TestBroker::start().await;
    let both = Topology::new().queue(Queue::new("deduplicated").deduplicated().retry(RetryPolicy::new(1, [])));
    let refused = both.declare(&broker.url()).await;
    assert!(matches!(&refused, Err(SdkError::Config(reason)) if reason.contains("retry policy")), "{refused:?}");
    let mut config = wharf_sdk::ConsumerConfig::new(broker.url(), "anything");
    config.concurrency = 0;
    let refused = wharf_sdk::Wharf::builder(broker.url()).consumer(config, RejectsAll).start().await;
    assert!(matches!(&refused, Err(SdkError::Config(reason)) if reason.contains("concurrency")), "{:?}", refused.err());
    broker.stop().await;
}
