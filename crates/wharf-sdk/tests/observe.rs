//! Observability against a real broker: a trace follows an event from the outbox through the
//! broker into the handler and on into the events the handler writes (W3C `traceparent`); the
//! metrics count what the relay published, the handler outcomes and the duplicates the inbox
//! absorbed, and the gauges show an empty outbox at the end; the relay's and the consumer's health
//! handles report up. (Its own test binary: the metrics recorder is process-wide.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::watch;
use wharf_sdk::{
    ConfirmedPublisher, ConsumerConfig, EffectHandler, Event, HandleError, Inbox, Incoming, Message, Outbox,
    OutboxStore, PublisherConfig, SqliteInbox, SqliteOutbox, TRACEPARENT_HEADER, TraceContext, exactly_once,
    run_consumer,
};

/// A metrics recorder that keeps every counter's and gauge's value by name and labels.
#[derive(Default)]
struct Recorded {
    values: Mutex<BTreeMap<String, Arc<Value>>>,
}

#[derive(Default)]
struct Value(AtomicU64);

impl metrics::CounterFn for Value {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }
}

impl metrics::GaugeFn for Value {
    fn increment(&self, value: f64) {
        self.set(f64::from_bits(self.0.load(Ordering::Relaxed)) + value);
    }
    fn decrement(&self, value: f64) {
        self.set(f64::from_bits(self.0.load(Ordering::Relaxed)) - value);
    }
    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }
}

impl metrics::HistogramFn for Value {
    fn record(&self, _value: f64) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn key_name(key: &metrics::Key) -> String {
    let mut labels: Vec<String> = key.labels().map(|label| format!("{}={}", label.key(), label.value())).collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl Recorded {
    fn value(&self, key: &metrics::Key) -> Arc<Value> {
        Arc::clone(self.values.lock().unwrap().entry(key_name(key)).or_default())
    }
    fn count(&self, name: &str) -> u64 {
        self.values.lock().unwrap().get(name).map_or(0, |value| value.0.load(Ordering::Relaxed))
    }
    fn gauge(&self, name: &str) -> Option<f64> {
        self.values.lock().unwrap().get(name).map(|value| f64::from_bits(value.0.load(Ordering::Relaxed)))
    }
}

struct Recorder(&'static Recorded);

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::from_arc(self.0.value(key))
    }
    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::from_arc(self.0.value(key))
    }
    fn register_histogram(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
        metrics::Histogram::from_arc(self.0.value(key))
    }
}

fn recorded() -> &'static Recorded {
    static RECORDED: OnceLock<&'static Recorded> = OnceLock::new();
    RECORDED.get_or_init(|| {
        let recorded: &'static Recorded = Box::leak(Box::default());
        metrics::set_global_recorder(Recorder(recorded)).unwrap();
        recorded
    })
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct OrderReceived {
    order_id: String,
}

impl Message for OrderReceived {
    const TYPE: &'static str = "OrderReceived";
    const EXCHANGE: &'static str = "orders";
    fn routing_key(&self) -> String {
        "order.received".into()
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct PaymentTaken {
    order_id: String,
}

impl Message for PaymentTaken {
    const TYPE: &'static str = "PaymentTaken";
}

/// Charges an order and writes its `PaymentTaken` to the outbox, in the handler's transaction.
#[derive(Clone)]
struct Charge(SqliteOutbox);

impl EffectHandler<OrderReceived, sqlx::Sqlite> for Charge {
    async fn handle(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
        order: OrderReceived,
        _incoming: &Incoming,
    ) -> Result<(), HandleError> {
        self.0.publish(tx, &PaymentTaken { order_id: order.order_id }).await?;
        Ok(())
    }
}

fn traceparent_of(headers_json: &str) -> TraceContext {
    let headers: BTreeMap<String, String> = serde_json::from_str(headers_json).unwrap();
    TraceContext::parse(&headers[TRACEPARENT_HEADER]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_follows_an_order_and_the_metrics_count_what_happened() {
    let recorded = recorded();
    let broker = TestBroker::start().await;
    broker.declare("payments", false).await;
    {
        // Where the payment events go (the default exchange routes by queue name).
        let connection =
            lapin::Connection::connect(&broker.url(), lapin::ConnectionProperties::default()).await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        let durable = lapin::options::QueueDeclareOptions::durable();
        channel.queue_declare("PaymentTaken".into(), durable, lapin::types::FieldTable::default()).await.unwrap();
        connection.close(200, "declared".into()).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let pool = sqlite(dir.path()).await;
    let outbox = SqliteOutbox::new(pool.clone());
    let inbox = SqliteInbox::new(pool.clone(), "payments");
    outbox.migrate().await.unwrap();
    inbox.migrate().await.unwrap();

    // The order service's write, in a trace an HTTP request started.
    let request = TraceContext::new_root();
    let mut tx = pool.begin().await.unwrap();
    let order_id =
        wharf_sdk::trace::in_context(request, outbox.publish(&mut tx, &OrderReceived { order_id: "o-1".into() }))
            .await
            .unwrap();
    tx.commit().await.unwrap();
    let written: String = sqlx::query_scalar("SELECT headers FROM wharf_outbox WHERE id = ?")
        .bind(&order_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    let order_trace = traceparent_of(&written);
    assert_eq!(order_trace.trace_id, request.trace_id, "the event joins the request's trace");
    assert_ne!(order_trace.span_id, request.span_id, "as a span of its own");

    let mut config = relay_config(&broker.url());
    let relay_health = config.health.clone();
    config.poll_interval_ms = 20;
    let (stop, stopped) = watch::channel(false);
    let relay = tokio::spawn(wharf_sdk::Relay::new(outbox.clone(), config).unwrap().run(stopped.clone()));
    let consumer_config = ConsumerConfig::new(broker.url(), "payments");
    let consumer_health = consumer_config.health.clone();
    let consuming = tokio::spawn(run_consumer(
        consumer_config,
        exactly_once(inbox.clone(), Charge(outbox.clone())),
        stopped.clone(),
    ));
    // A copy of the order, straight to the queue: the inbox absorbs it.
    eventually("the order handled", || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM wharf_outbox WHERE message_type = 'PaymentTaken'")
            .fetch_one(&pool)
            .await
            .unwrap()
            == 1
    })
    .await;
    let mut copy = Event::from_message(&OrderReceived { order_id: "o-1".into() }).unwrap().with_id(order_id.clone());
    copy.exchange = String::new();
    copy.routing_key = "payments".into();
    let mut publisher = ConfirmedPublisher::new(PublisherConfig::new(broker.url())).unwrap();
    publisher.publish_all(&[copy]).await.into_iter().for_each(|outcome| outcome.unwrap());
    eventually("the copy absorbed", || async {
        recorded.count("wharf_inbox_duplicates_total{consumer=payments}") == 1
    })
    .await;
    eventually("the outbox empty on the gauge", || async {
        recorded.gauge("wharf_outbox_unsent_rows{table=wharf_outbox}") == Some(0.0)
            && outbox.unsent_count().await.unwrap() == 0
    })
    .await;

    // The payment event is a child of the handler's span, in the same trace as the request.
    let payment: String = sqlx::query_scalar("SELECT headers FROM wharf_outbox WHERE message_type = 'PaymentTaken'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let payment_trace = traceparent_of(&payment);
    assert_eq!(payment_trace.trace_id, request.trace_id, "one trace from the request to the payment");
    assert_ne!(payment_trace.span_id, order_trace.span_id);

    assert!(relay_health.is_up() && relay_health.last_progress_ms().is_some(), "{:?}", relay_health.last_error());
    assert!(consumer_health.is_up(), "{:?}", consumer_health.last_error());
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    consuming.await.unwrap().unwrap();
    assert_eq!(recorded.count("wharf_relay_published_total{}"), 2, "the order and the payment");
    assert_eq!(recorded.count("wharf_relay_lag_seconds{}"), 2, "a lag recorded for each");
    assert_eq!(recorded.count("wharf_handler_outcomes_total{outcome=ack,queue=payments}"), 2, "the order and its copy");
    assert_eq!(recorded.gauge("wharf_outbox_failed_rows{table=wharf_outbox}"), Some(0.0));
    let stats = outbox.stats().await.unwrap().unwrap();
    assert_eq!((stats.unsent, stats.failed, stats.oldest_unsent_created_at_ms), (0, 0, None));
    broker.stop().await;
}
