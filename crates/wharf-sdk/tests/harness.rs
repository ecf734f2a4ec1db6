//! The in-process harness (`wharf_sdk::testing`): its faults really redeliver (a handler without
//! an inbox does its effect twice under each), an `exactly_once` handler does its effect once
//! under both, the events a handler publishes are relayed and can be asserted, and a retrying or
//! rejecting handler's messages are reported dead-lettered.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use wharf_sdk::testing::{Fault, TestBus, assert_published};
use wharf_sdk::{EffectHandler, HandleError, Handler, Incoming, Message, Outbox, Outcome, SqliteOutbox, exactly_once};

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
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

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct PaymentTaken {
    order_id: String,
}

impl Message for PaymentTaken {
    const TYPE: &'static str = "PaymentTaken";
}

/// Charges and announces it, in the exactly-once transaction; counts the duplicates absorbed.
struct Charge(SqliteOutbox, Arc<AtomicUsize>);

impl EffectHandler<OrderReceived, sqlx::Sqlite> for Charge {
    async fn handle(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
        order: OrderReceived,
        _incoming: &Incoming,
    ) -> Result<(), HandleError> {
        sqlx::query("INSERT INTO payments (order_id) VALUES (?)").bind(&order.order_id).execute(&mut **tx).await?;
        self.0.publish(tx, &PaymentTaken { order_id: order.order_id }).await?;
        Ok(())
    }

    async fn on_duplicate(
        &self,
        _tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
        incoming: &Incoming,
    ) -> Result<(), HandleError> {
        assert!(incoming.message_id.is_some());
        self.1.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Counts every call: no inbox.
#[derive(Clone, Default)]
struct Naive(Arc<AtomicUsize>);

impl Handler for Naive {
    async fn handle(&self, _message: Incoming) -> Outcome {
        self.0.fetch_add(1, Ordering::SeqCst);
        Outcome::Ack
    }
}

async fn place(bus: &TestBus, count: usize) {
    let mut tx = bus.pool().begin().await.unwrap();
    for index in 0..count {
        bus.outbox().publish(&mut tx, &OrderReceived { order_id: format!("o-{index}") }).await.unwrap();
    }
    tx.commit().await.unwrap();
}

async fn payments(bus: &TestBus) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM payments").fetch_one(bus.pool()).await.unwrap()
}

#[tokio::test]
async fn exactly_once_holds_under_each_fault_and_a_naive_handler_shows_the_fault_is_real() {
    for fault in [Fault::DieBeforeMark, Fault::DieAfterCommitBeforeAck] {
        let mut bus = TestBus::new().await.unwrap();
        sqlx::query("CREATE TABLE payments (order_id TEXT NOT NULL)").execute(bus.pool()).await.unwrap();
        let inbox = bus.inbox("payments").await.unwrap();
        let duplicates = Arc::new(AtomicUsize::new(0));
        bus.route("orders", "order.*", exactly_once(inbox, Charge(bus.outbox().clone(), Arc::clone(&duplicates))));
        let naive = Naive::default();
        bus.route("orders", "order.#", naive.clone());
        place(&bus, 3).await;

        let report = bus.run_with(fault).await.unwrap();
        assert_eq!(naive.0.load(Ordering::SeqCst), 6, "{fault:?}: every message delivered twice");
        assert_eq!(payments(&bus).await, 3, "{fault:?}: one payment per order");
        assert_eq!(duplicates.load(Ordering::SeqCst), 3, "{fault:?}: each second delivery seen as a duplicate");
        let taken = assert_published::<PaymentTaken>(&bus);
        let mut ids: Vec<&str> = taken.iter().map(|payment| payment.order_id.as_str()).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec!["o-0", "o-1", "o-2"], "{fault:?}: one announcement per order");
        assert_eq!(report.unrouted.len(), 3, "{fault:?}: the announcements have no route here");
        assert!(report.dead_lettered.is_empty(), "{fault:?}: {report:?}");
        assert_eq!(bus.published::<OrderReceived>().len(), 3);
    }
}

struct Refuses;

impl Handler for Refuses {
    async fn handle(&self, message: Incoming) -> Outcome {
        if message.routing_key.ends_with("bad") { Outcome::Reject("bad order".into()) } else { Outcome::Retry }
    }
}

#[tokio::test]
async fn rejected_and_endlessly_retried_messages_are_reported_dead_lettered() {
    let mut bus = TestBus::new().await.unwrap();
    bus.route("", "#", Refuses);
    let mut tx = bus.pool().begin().await.unwrap();
    for (id, key) in [("r-1", "order.bad"), ("r-2", "order.flaky")] {
        bus.outbox().enqueue(&mut tx, &wharf_sdk::Event::new("", key, "{}").with_id(id)).await.unwrap();
    }
    tx.commit().await.unwrap();
    let report = bus.run().await.unwrap();
    assert_eq!(report.deliveries, 1 + wharf_sdk::testing::DELIVERIES_MAX as usize);
    assert_eq!(
        report.dead_lettered,
        vec![
            ("r-1".into(), "bad order".into()),
            ("r-2".into(), format!("retried {} times", wharf_sdk::testing::DELIVERIES_MAX))
        ]
    );
}
