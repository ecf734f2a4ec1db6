//! Typed messages and the exactly-once handler, on PostgreSQL, SQLite and MySQL, against a real
//! broker: typed events go out through the outbox and come back decoded; each order is charged
//! once though a copy of one is delivered again; a transient failure is retried; a permanent
//! failure, a message without an id and a message of another type are dead-lettered with their
//! reason and never retried; a keyed publish is refused the second time and leaves the
//! transaction usable; a handler sees every AMQP property and non-string header.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use wharf_sdk::{
    ConfirmedPublisher, ConsumerConfig, EffectHandler, Event, HandleError, Handler, Inbox, Incoming, Message, Outbox,
    Outcome, PgInbox, PgOutbox, PublisherConfig, REJECT_REASON_HEADER, REJECTED_FROM_HEADER, SdkError, SqliteInbox,
    SqliteOutbox, TypedHandler, exactly_once, run_consumer, typed,
};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct OrderReceived {
    order_id: String,
    cents: i64,
}

impl Message for OrderReceived {
    const TYPE: &'static str = "OrderReceived";
    const EXCHANGE: &'static str = "orders";

    fn routing_key(&self) -> String {
        "order.received".into()
    }

    fn ordering_key(&self) -> Option<String> {
        Some(self.order_id.clone())
    }
}

/// Charges an order; a negative amount is refused for good, and an order whose id starts with
/// `flaky` fails for now the first time it is seen.
#[derive(Clone, Default)]
struct Charge {
    seen: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl Charge {
    fn check(&self, order: &OrderReceived) -> Result<(), HandleError> {
        let times = {
            let mut seen = self.seen.lock().unwrap();
            let times = seen.entry(order.order_id.clone()).or_insert(0);
            *times += 1;
            *times
        };
        if order.cents < 0 {
            return Err(HandleError::Permanent(format!("negative amount {}", order.cents)));
        }
        if order.order_id.starts_with("flaky") && times == 1 {
            return Err(HandleError::Transient("the card processor is down".into()));
        }
        Ok(())
    }
}

impl EffectHandler<OrderReceived, sqlx::Postgres> for Charge {
    async fn handle(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        order: OrderReceived,
        _incoming: &Incoming,
    ) -> Result<(), HandleError> {
        self.check(&order)?;
        sqlx::query("INSERT INTO payments (order_id, cents) VALUES ($1, $2)")
            .bind(&order.order_id)
            .bind(order.cents)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

impl EffectHandler<OrderReceived, sqlx::MySql> for Charge {
    async fn handle(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::MySql>,
        order: OrderReceived,
        _incoming: &Incoming,
    ) -> Result<(), HandleError> {
        self.check(&order)?;
        sqlx::query("INSERT INTO payments (order_id, cents) VALUES (?, ?)")
            .bind(&order.order_id)
            .bind(order.cents)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

impl EffectHandler<OrderReceived, sqlx::Sqlite> for Charge {
    async fn handle(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
        order: OrderReceived,
        _incoming: &Incoming,
    ) -> Result<(), HandleError> {
        self.check(&order)?;
        sqlx::query("INSERT INTO payments (order_id, cents) VALUES (?, ?)")
            .bind(&order.order_id)
            .bind(order.cents)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// Each outcome with its message id.
type Outcomes = Arc<Mutex<Vec<(Option<String>, Outcome)>>>;

/// Wraps a handler and records each outcome with its message id.
struct Recorded<H> {
    inner: Arc<H>,
    outcomes: Outcomes,
}

impl<H> Clone for Recorded<H> {
    fn clone(&self) -> Self {
        Recorded { inner: Arc::clone(&self.inner), outcomes: Arc::clone(&self.outcomes) }
    }
}

impl<H: Handler> Handler for Recorded<H> {
    async fn handle(&self, message: Incoming) -> Outcome {
        let id = message.message_id.clone();
        let outcome = self.inner.handle(message).await;
        self.outcomes.lock().unwrap().push((id, outcome.clone()));
        outcome
    }
}

fn order(order_id: &str, cents: i64) -> OrderReceived {
    OrderReceived { order_id: order_id.into(), cents }
}

async fn channel(broker: &TestBroker) -> (lapin::Connection, lapin::Channel) {
    let connection = lapin::Connection::connect(&broker.url(), lapin::ConnectionProperties::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

/// Takes every message from `queue`: (message id, headers as text).
async fn drain(broker: &TestBroker, queue: &str) -> Vec<(Option<String>, BTreeMap<String, String>)> {
    let (connection, channel) = channel(broker).await;
    let mut taken = Vec::new();
    while let Some(message) = channel.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap() {
        let headers = message.properties.headers().clone().unwrap_or_default();
        let text = headers
            .inner()
            .iter()
            .filter_map(|(name, value)| match value {
                AMQPValue::LongString(text) => {
                    Some((name.to_string(), String::from_utf8_lossy(text.as_bytes()).into()))
                }
                _ => None,
            })
            .collect();
        taken.push((message.properties.message_id().as_ref().map(|id| id.to_string()), text));
    }
    connection.close(200, "drained".into()).await.unwrap();
    taken
}

/// The whole flow on one database. `place` writes an order through the outbox in a transaction
/// of its own and returns the event id; `payments` lists the order ids charged.
async fn typed_and_exactly_once<O, I, P, PF, L, LF>(outbox: O, inbox: I, place: P, payments: L)
where
    O: Outbox,
    I: Inbox<Db = O::Db>,
    Charge: EffectHandler<OrderReceived, O::Db>,
    P: Fn(OrderReceived) -> PF,
    PF: Future<Output = String>,
    L: Fn() -> LF,
    LF: Future<Output = Vec<String>>,
{
    let broker = TestBroker::start().await;
    broker.declare("payments", false).await;
    {
        let (connection, channel) = channel(&broker).await;
        channel
            .queue_declare("payments.dead".into(), QueueDeclareOptions::durable(), FieldTable::default())
            .await
            .unwrap();
        connection.close(200, "declared".into()).await.unwrap();
    }
    outbox.migrate().await.unwrap();
    inbox.migrate().await.unwrap();
    let (stop, stopped) = watch::channel(false);
    let relay =
        tokio::spawn(wharf_sdk::Relay::new(outbox.clone(), relay_config(&broker.url())).unwrap().run(stopped.clone()));

    let first_id = place(order("o-1", 100)).await;
    place(order("o-2", 250)).await;
    place(order("flaky-3", 300)).await;
    place(order("bad-4", -5)).await;
    eventually("the relay sent every order", || async { outbox.unsent_count().await.unwrap() == 0 }).await;

    // Straight to the queue, past the exchange's de-duplication: a second copy of o-1, a message
    // without an id, and a message of another type.
    let copy = Event::from_message(&order("o-1", 100)).unwrap().with_id(first_id.clone());
    let mut copy_to_queue = copy.clone();
    copy_to_queue.exchange = String::new();
    copy_to_queue.routing_key = "payments".into();
    let mut other_type = Event::new("", "payments", r#"{"order_id":"x","cents":1}"#).with_type("RefundIssued");
    other_type.id = "other-type".into();
    let mut publisher = ConfirmedPublisher::new(PublisherConfig::new(broker.url())).unwrap();
    for outcome in publisher.publish_all(&[copy_to_queue, other_type]).await {
        outcome.unwrap();
    }
    {
        let (connection, channel) = channel(&broker).await;
        channel
            .basic_publish(
                "".into(),
                "payments".into(),
                BasicPublishOptions::default(),
                br#"{"order_id":"no-id","cents":1}"#,
                lapin::BasicProperties::default().with_type(ShortString::from("OrderReceived")),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        connection.close(200, "published".into()).await.unwrap();
    }

    let charge = Charge::default();
    let config = ConsumerConfig::new(broker.url(), "payments").dead_letter_to("", "payments.dead");
    let recorded = Recorded { inner: Arc::new(exactly_once(inbox.clone(), charge.clone())), outcomes: Arc::default() };
    let consuming = tokio::spawn(run_consumer(config, recorded.clone(), stopped.clone()));
    eventually("three orders charged", || async { payments().await.len() == 3 }).await;
    eventually("o-1 and its copy both acknowledged", || async {
        let outcomes = recorded.outcomes.lock().unwrap();
        outcomes.iter().filter(|(id, outcome)| id.as_deref() == Some(&first_id) && *outcome == Outcome::Ack).count()
            == 2
    })
    .await;
    let mut dead = Vec::new();
    let started = std::time::Instant::now();
    while dead.len() < 3 {
        assert!(started.elapsed() < PATIENCE, "timed out waiting for three dead letters: {dead:?}");
        dead.extend(drain(&broker, "payments.dead").await);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.send(true).unwrap();
    consuming.await.unwrap().unwrap();
    relay.await.unwrap().unwrap();

    let mut charged = payments().await;
    charged.sort();
    assert_eq!(charged, vec!["flaky-3", "o-1", "o-2"], "each order charged once; the refused one not at all");
    assert_eq!(charge.seen.lock().unwrap().get("flaky-3"), Some(&2), "the transient failure was retried once");
    assert_eq!(charge.seen.lock().unwrap().get("bad-4"), Some(&1), "the permanent failure was not retried");
    assert_eq!(charge.seen.lock().unwrap().get("o-1"), Some(&1), "the copy never reached the effect");
    assert_eq!(dead.len(), 3, "{dead:?}");
    let reason_of = |id: Option<&str>| {
        let (_, headers) = dead.iter().find(|(message_id, _)| message_id.as_deref() == id).unwrap();
        assert_eq!(headers.get(REJECTED_FROM_HEADER).map(String::as_str), Some("payments"));
        headers.get(REJECT_REASON_HEADER).cloned().unwrap_or_default()
    };
    assert!(reason_of(None).contains("no message-id"), "{dead:?}");
    assert!(reason_of(Some("other-type")).contains("message type 'RefundIssued'"), "{dead:?}");
    let bad = dead.iter().find(|(_, headers)| headers.values().any(|value| value.contains("negative amount")));
    assert!(bad.is_some(), "the refused order is dead-lettered with its reason: {dead:?}");

    // Nothing was recorded for the refused order: re-driven after a fix, it is processed.
    let bad_id = bad.and_then(|(id, _)| id.clone()).unwrap();
    let pool = inbox.pool().clone();
    let mut tx = pool.begin().await.unwrap();
    assert_eq!(inbox.handle(&mut tx, &bad_id).await.unwrap(), wharf_sdk::Seen::First);
    assert_eq!(inbox.handle(&mut tx, &first_id).await.unwrap(), wharf_sdk::Seen::Again);
    tx.rollback().await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_messages_handled_exactly_once_on_postgres() {
    let Some(pool) = postgres().await else { return };
    let outbox = PgOutbox::new(pool.clone());
    sqlx::query("CREATE TABLE payments (order_id TEXT NOT NULL, cents BIGINT NOT NULL)").execute(&pool).await.unwrap();
    let place = |order: OrderReceived| {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            let id = outbox.publish(&mut tx, &order).await.unwrap();
            tx.commit().await.unwrap();
            id
        }
    };
    let payments = || {
        let pool = pool.clone();
        async move { sqlx::query_scalar("SELECT order_id FROM payments").fetch_all(&pool).await.unwrap() }
    };
    typed_and_exactly_once(outbox.clone(), PgInbox::new(pool.clone(), "payments"), place, payments).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_messages_handled_exactly_once_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite(dir.path()).await;
    let outbox = SqliteOutbox::new(pool.clone());
    sqlx::query("CREATE TABLE payments (order_id TEXT NOT NULL, cents BIGINT NOT NULL)").execute(&pool).await.unwrap();
    let place = |order: OrderReceived| {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            let id = outbox.publish(&mut tx, &order).await.unwrap();
            tx.commit().await.unwrap();
            id
        }
    };
    let payments = || {
        let pool = pool.clone();
        async move { sqlx::query_scalar("SELECT order_id FROM payments").fetch_all(&pool).await.unwrap() }
    };
    typed_and_exactly_once(outbox.clone(), SqliteInbox::new(pool.clone(), "payments"), place, payments).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_messages_handled_exactly_once_on_mysql() {
    let Some(pool) = mysql().await else { return };
    let outbox = wharf_sdk::MySqlOutbox::new(pool.clone());
    sqlx::query("CREATE TABLE payments (order_id VARCHAR(255) NOT NULL, cents BIGINT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let place = |order: OrderReceived| {
        let (pool, outbox) = (pool.clone(), outbox.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            let id = outbox.publish(&mut tx, &order).await.unwrap();
            tx.commit().await.unwrap();
            id
        }
    };
    let payments = || {
        let pool = pool.clone();
        async move { sqlx::query_scalar("SELECT order_id FROM payments").fetch_all(&pool).await.unwrap() }
    };
    typed_and_exactly_once(outbox.clone(), wharf_sdk::MySqlInbox::new(pool.clone(), "payments"), place, payments).await;
}

/// A keyed publish gives the same id for the same key; the second is refused as a duplicate, and
/// the transaction it was refused in still commits its other writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_publish_is_refused_the_second_time_and_the_transaction_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite(dir.path()).await;
    let outbox = SqliteOutbox::new(pool.clone());
    outbox.migrate().await.unwrap();
    sqlx::query("CREATE TABLE notes (text TEXT NOT NULL)").execute(&pool).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let first = outbox.publish_keyed(&mut tx, &order("o-9", 1), "request-17").await.unwrap();
    tx.commit().await.unwrap();

    let mut tx = pool.begin().await.unwrap();
    let again = outbox.publish_keyed(&mut tx, &order("o-9", 1), "request-17").await;
    assert!(matches!(&again, Err(SdkError::Duplicate { id }) if *id == first), "{again:?}");
    sqlx::query("INSERT INTO notes (text) VALUES ('still usable')").execute(&mut *tx).await.unwrap();
    let other = outbox.publish_keyed(&mut tx, &order("o-9", 1), "request-18").await.unwrap();
    assert_ne!(other, first, "another key, another id");
    tx.commit().await.unwrap();
    assert_eq!(outbox.unsent_count().await.unwrap(), 2);
    let notes: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM notes").fetch_one(&pool).await.unwrap();
    assert_eq!(notes, 1);
    let same = Event::from_message(&order("o-9", 1)).unwrap().with_idempotency_key("request-17");
    assert_eq!(same.id, first, "the id depends on the type and the key only");
}

/// Records what the handler saw.
#[derive(Clone, Default)]
struct Sees(Arc<Mutex<Vec<(OrderReceived, Incoming)>>>);

impl TypedHandler<OrderReceived> for Sees {
    async fn handle(&self, message: OrderReceived, incoming: &Incoming) -> Result<(), HandleError> {
        self.0.lock().unwrap().push((message, incoming.clone()));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typed_handler_sees_every_property_and_header() {
    let broker = TestBroker::start().await;
    let (connection, channel) = channel(&broker).await;
    channel.queue_declare("seen".into(), QueueDeclareOptions::durable(), FieldTable::default()).await.unwrap();
    let mut headers = FieldTable::default();
    headers.insert("attempt".into(), AMQPValue::LongLongInt(3));
    headers.insert("tenant".into(), AMQPValue::LongString(LongString::from(b"acme".to_vec())));
    let properties = lapin::BasicProperties::default()
        .with_message_id("m-1".into())
        .with_type("OrderReceived".into())
        .with_correlation_id("c-1".into())
        .with_reply_to("replies".into())
        .with_content_type("application/json".into())
        .with_timestamp(1_700_000_000)
        .with_headers(headers);
    let body = serde_json::to_vec(&order("o-1", 5)).unwrap();
    channel.basic_publish("".into(), "seen".into(), BasicPublishOptions::default(), &body, properties).await.unwrap();
    connection.close(200, "published".into()).await.unwrap();

    let sees = Sees::default();
    let (stop, stopped) = watch::channel(false);
    let consuming = tokio::spawn(run_consumer(ConsumerConfig::new(broker.url(), "seen"), typed(sees.clone()), stopped));
    eventually("the message handled", || async { !sees.0.lock().unwrap().is_empty() }).await;
    stop.send(true).unwrap();
    consuming.await.unwrap().unwrap();
    let (message, incoming) = sees.0.lock().unwrap()[0].clone();
    assert_eq!(message, order("o-1", 5));
    assert_eq!(incoming.id().unwrap(), "m-1");
    assert_eq!(incoming.message_type.as_deref(), Some("OrderReceived"));
    assert_eq!(incoming.correlation_id.as_deref(), Some("c-1"));
    assert_eq!(incoming.reply_to.as_deref(), Some("replies"));
    assert_eq!(incoming.content_type.as_deref(), Some("application/json"));
    assert_eq!(incoming.timestamp_s, Some(1_700_000_000));
    assert_eq!(incoming.queue, "seen");
    assert_eq!(incoming.headers.get("tenant").map(String::as_str), Some("acme"));
    let raw = incoming.properties.headers().clone().unwrap();
    assert_eq!(raw.inner().get("attempt"), Some(&AMQPValue::LongLongInt(3)), "non-string headers stay available");
    broker.stop().await;
}

/// A delayed event stays in the outbox until it is due, and later events of its ordering key wait
/// behind it; events of other keys go at once. (Claims are asked at chosen times: no waiting.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_event_is_claimed_only_once_it_is_due() {
    use wharf_sdk::OutboxStore;
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite(dir.path()).await;
    let outbox = SqliteOutbox::new(pool.clone());
    outbox.migrate().await.unwrap();
    let hour = std::time::Duration::from_secs(3600);
    let mut tx = pool.begin().await.unwrap();
    let delayed = Event::from_message(&order("o-1", 1)).unwrap().deliver_after(hour);
    let behind = Event::from_message(&order("o-1", 2)).unwrap();
    let other = Event::from_message(&order("o-2", 3)).unwrap();
    for event in [&delayed, &behind, &other] {
        outbox.enqueue(&mut tx, event).await.unwrap();
    }
    tx.commit().await.unwrap();
    let now = delayed.available_at_ms.unwrap() - 3_600_000;
    // A lease longer than the test's hours: the row claimed now stays claimed.
    let claimed = outbox.claim("relay", now + 1_000, 36_000_000, 10).await.unwrap();
    assert_eq!(claimed.iter().map(|row| row.event.id.clone()).collect::<Vec<_>>(), vec![other.id.clone()]);
    let due = delayed.available_at_ms.unwrap();
    let claimed = outbox.claim("relay", due, 1, 10).await.unwrap();
    assert_eq!(claimed.iter().map(|row| row.event.id.clone()).collect::<Vec<_>>(), vec![delayed.id.clone()]);
    assert_eq!(claimed[0].event.available_at_ms, Some(due));
}
