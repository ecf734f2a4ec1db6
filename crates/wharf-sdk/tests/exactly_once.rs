//! The outbox, the relay and the inbox together, on PostgreSQL, SQLite and MySQL, against a real
//! broker: every order placed leads to exactly one payment, whatever is killed or restarted on
//! the way (the relay between publish and mark, the consumer between commit and ack, the broker
//! while the relay publishes), with two relays racing on one table, and with per-key order kept
//! on the consumer side. A relay told to stop finishes its round.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use wharf_sdk::{ConsumerConfig, Handler, Incoming, OutboxRow, OutboxStore, Outcome, run_consumer};

/// The payment consumer: charges through the inbox.
#[derive(Clone)]
struct Payments<S: Shop> {
    shop: S,
    handled: Arc<AtomicUsize>,
}

impl<S: Shop> Handler for Payments<S> {
    async fn handle(&self, message: Incoming) -> Outcome {
        self.handled.fetch_add(1, Ordering::Relaxed);
        match self.shop.charge(&message).await {
            Ok(_) => Outcome::Ack,
            Err(_) => Outcome::Retry,
        }
    }
}

/// Every order has exactly one payment, and the outbox is empty of unsent rows.
async fn assert_exactly_once<S: Shop>(shop: &S, orders: &[String]) {
    let expected: BTreeSet<String> = orders.iter().cloned().collect();
    eventually("a payment for every order", || async { shop.payments().await.len() >= orders.len() }).await;
    let payments = shop.payments().await;
    let mut per_order: BTreeMap<String, usize> = BTreeMap::new();
    for (_, order) in &payments {
        *per_order.entry(order.clone()).or_default() += 1;
    }
    assert_eq!(per_order.keys().cloned().collect::<BTreeSet<_>>(), expected, "every order paid");
    assert!(per_order.values().all(|count| *count == 1), "no order paid twice: {per_order:?}");
    // The relay marks a batch sent after all of its confirms: the last marks may trail the
    // consumer's effects by a moment.
    eventually("nothing left unsent in the outbox", || async { shop.unsent().await == 0 }).await;
}

fn orders(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|index| format!("{prefix}-{index}")).collect()
}

async fn place<S: Shop>(shop: &S, orders: &[String]) {
    for (index, order) in orders.iter().enumerate() {
        shop.place_order(order, &format!("customer-{}", index % 7)).await;
    }
}

fn consumer<S: Shop>(
    broker: &TestBroker,
    shop: &S,
    queue: &str,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let handler = Payments { shop: shop.clone(), handled: Arc::new(AtomicUsize::new(0)) };
    let config = ConsumerConfig::new(broker.url(), queue);
    tokio::spawn(async move { run_consumer(config, handler, stop).await.unwrap() })
}

async fn outbox_relay_inbox<S: Shop>(shop: S) {
    let broker = TestBroker::start().await;
    broker.declare("payments", false).await;
    shop.setup().await;
    let (stop, stopped) = watch::channel(false);
    let relay = tokio::spawn(shop.relay(relay_config(&broker.url())).run(stopped.clone()));
    let consuming = consumer(&broker, &shop, "payments", stopped);
    let placed = orders("order", 200);
    place(&shop, &placed).await;
    assert_exactly_once(&shop, &placed).await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    consuming.await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_relay_and_inbox_on_postgres() {
    let Some(pool) = postgres().await else { return };
    outbox_relay_inbox(PgShop { pool }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_relay_and_inbox_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    outbox_relay_inbox(SqliteShop { pool: sqlite(dir.path()).await }).await;
}

/// An outbox store whose first `mark_sent` never returns: the relay published and got its
/// confirms, then "dies" before recording it (the task is aborted while stuck here).
struct DiesBeforeMark<S: OutboxStore> {
    inner: S,
    stuck: Arc<tokio::sync::Notify>,
}

impl<S: OutboxStore> OutboxStore for DiesBeforeMark<S> {
    async fn claim(&self, relay: &str, now_ms: i64, lease_ms: i64, limit: i64) -> wharf_sdk::Result<Vec<OutboxRow>> {
        self.inner.claim(relay, now_ms, lease_ms, limit).await
    }
    async fn mark_sent(&self, _seqs: &[i64], _now_ms: i64) -> wharf_sdk::Result<()> {
        self.stuck.notify_one();
        std::future::pending().await
    }
    async fn mark_failed(&self, seq: i64, reason: &str) -> wharf_sdk::Result<()> {
        self.inner.mark_failed(seq, reason).await
    }
    async fn release(&self, relay: &str, seqs: &[i64]) -> wharf_sdk::Result<()> {
        self.inner.release(relay, seqs).await
    }
    async fn refuse(&self, seq: i64, reason: &str, limit: i32) -> wharf_sdk::Result<bool> {
        self.inner.refuse(seq, reason, limit).await
    }
    async fn purge_sent(&self, sent_before_ms: i64) -> wharf_sdk::Result<u64> {
        self.inner.purge_sent(sent_before_ms).await
    }
    async fn wait_for_work(&self, timeout: Duration) {
        self.inner.wait_for_work(timeout).await
    }
}

/// An outbox store whose `mark_sent` waits until the test releases it: the relay is between
/// publish and mark for as long as the test likes.
struct HeldMark<S: OutboxStore> {
    inner: S,
    entered: Arc<tokio::sync::Notify>,
    release: Arc<tokio::sync::Notify>,
    /// Seqs claimed, and seqs marked sent.
    claimed: Arc<std::sync::Mutex<Vec<i64>>>,
    marked: Arc<std::sync::Mutex<Vec<i64>>>,
}

impl<S: OutboxStore> OutboxStore for HeldMark<S> {
    async fn claim(&self, relay: &str, now_ms: i64, lease_ms: i64, limit: i64) -> wharf_sdk::Result<Vec<OutboxRow>> {
        let rows = self.inner.claim(relay, now_ms, lease_ms, limit).await?;
        self.claimed.lock().unwrap().extend(rows.iter().map(|row| row.seq));
        Ok(rows)
    }
    async fn mark_sent(&self, seqs: &[i64], now_ms: i64) -> wharf_sdk::Result<()> {
        self.entered.notify_one();
        self.release.notified().await;
        self.inner.mark_sent(seqs, now_ms).await?;
        self.marked.lock().unwrap().extend_from_slice(seqs);
        Ok(())
    }
    async fn mark_failed(&self, seq: i64, reason: &str) -> wharf_sdk::Result<()> {
        self.inner.mark_failed(seq, reason).await
    }
    async fn release(&self, relay: &str, seqs: &[i64]) -> wharf_sdk::Result<()> {
        self.inner.release(relay, seqs).await
    }
    async fn refuse(&self, seq: i64, reason: &str, limit: i32) -> wharf_sdk::Result<bool> {
        self.inner.refuse(seq, reason, limit).await
    }
    async fn purge_sent(&self, sent_before_ms: i64) -> wharf_sdk::Result<u64> {
        self.inner.purge_sent(sent_before_ms).await
    }
    async fn wait_for_work(&self, timeout: Duration) {
        self.inner.wait_for_work(timeout).await
    }
}

/// A relay told to stop while a round is between publish and mark finishes the round: its rows
/// end marked sent, not claimed and waiting out their lease to go out again.
async fn relay_stopped_mid_round<S: Shop>(shop: S) {
    let broker = TestBroker::start().await;
    broker.declare("payments", false).await;
    shop.setup().await;
    place(&shop, &orders("order", 10)).await;
    let (entered, release) = (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()));
    let (claimed, marked) = (Arc::default(), Arc::default());
    let store = HeldMark {
        inner: shop.store(),
        entered: Arc::clone(&entered),
        release: Arc::clone(&release),
        claimed: Arc::clone(&claimed),
        marked: Arc::clone(&marked),
    };
    let (stop, stopped) = watch::channel(false);
    let relay = tokio::spawn(wharf_sdk::Relay::new(store, relay_config(&broker.url())).unwrap().run(stopped));
    entered.notified().await;
    stop.send(true).unwrap();
    release.notify_one();
    relay.await.unwrap().unwrap();
    let (mut claimed, mut marked) = (claimed.lock().unwrap().clone(), marked.lock().unwrap().clone());
    claimed.sort_unstable();
    marked.sort_unstable();
    assert!(!claimed.is_empty());
    assert_eq!(marked, claimed, "the round in progress marked every row it claimed sent before the relay stopped");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stopped_mid_round_finishes_it_on_postgres() {
    let Some(pool) = postgres().await else { return };
    relay_stopped_mid_round(PgShop { pool }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stopped_mid_round_finishes_it_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    relay_stopped_mid_round(SqliteShop { pool: sqlite(dir.path()).await }).await;
}

async fn relay_killed_between_publish_and_mark<S: Shop>(shop: S) {
    let broker = TestBroker::start().await;
    broker.declare("payments", false).await;
    shop.setup().await;
    let placed = orders("order", 40);
    place(&shop, &placed).await;
    let stuck = Arc::new(tokio::sync::Notify::new());
    let dying = wharf_sdk::Relay::new(
        DiesBeforeMark { inner: shop.store(), stuck: Arc::clone(&stuck) },
        relay_config(&broker.url()),
    )
    .unwrap();
    let (stop, stopped) = watch::channel(false);
    let doomed = tokio::spawn(dying.run(stopped.clone()));
    stuck.notified().await;
    doomed.abort();
    let _ = doomed.await;
    // A new relay finds the rows still claimed; once the lease is over it publishes them again.
    let relay = tokio::spawn(shop.relay(relay_config(&broker.url())).run(stopped.clone()));
    let consuming = consumer(&broker, &shop, "payments", stopped);
    assert_exactly_once(&shop, &placed).await;
    if let Some(dropped) = broker.duplicates_dropped() {
        assert!(dropped > 0, "the broker dropped the re-published copies");
    }
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    consuming.await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_between_publish_and_mark_on_postgres() {
    let Some(pool) = postgres().await else { return };
    relay_killed_between_publish_and_mark(PgShop { pool }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_between_publish_and_mark_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    relay_killed_between_publish_and_mark(SqliteShop { pool: sqlite(dir.path()).await }).await;
}

/// A consumer that commits its transaction, then dies before acknowledging (it never returns
/// from the handler; the test aborts it).
#[derive(Clone)]
struct DiesAfterCommit<S: Shop> {
    shop: S,
    committed: Arc<tokio::sync::Notify>,
}

impl<S: Shop> Handler for DiesAfterCommit<S> {
    async fn handle(&self, message: Incoming) -> Outcome {
        self.shop.charge(&message).await.unwrap();
        self.committed.notify_one();
        std::future::pending().await
    }
}

async fn consumer_killed_after_commit<S: Shop>(shop: S) {
    let broker = TestBroker::start().await;
    broker.declare("payments", false).await;
    shop.setup().await;
    let placed = orders("order", 1);
    place(&shop, &placed).await;
    let (stop, stopped) = watch::channel(false);
    let relay = tokio::spawn(shop.relay(relay_config(&broker.url())).run(stopped.clone()));
    let committed = Arc::new(tokio::sync::Notify::new());
    let dying = DiesAfterCommit { shop: shop.clone(), committed: Arc::clone(&committed) };
    let config = ConsumerConfig::new(broker.url(), "payments");
    let doomed = tokio::spawn(run_consumer(config, dying, stopped.clone()));
    committed.notified().await;
    doomed.abort();
    let _ = doomed.await;
    // Its connection is gone with it: the broker redelivers; the inbox says "again".
    let handler = Payments { shop: shop.clone(), handled: Arc::new(AtomicUsize::new(0)) };
    let handled = Arc::clone(&handler.handled);
    let config = ConsumerConfig::new(broker.url(), "payments");
    let consuming = tokio::spawn(run_consumer(config, handler, stopped));
    eventually("the redelivery is handled", || async { handled.load(Ordering::Relaxed) >= 1 }).await;
    assert_exactly_once(&shop, &placed).await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    consuming.await.unwrap().unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_after_commit_before_ack_on_postgres() {
    let Some(pool) = postgres().await else { return };
    consumer_killed_after_commit(PgShop { pool }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_after_commit_before_ack_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    consumer_killed_after_commit(SqliteShop { pool: sqlite(dir.path()).await }).await;
}

async fn two_relays_race<S: Shop>(shop: S) {
    let broker = TestBroker::start().await;
    broker.declare("payments", false).await;
    shop.setup().await;
    let placed = orders("order", 300);
    let (stop, stopped) = watch::channel(false);
    let mut relay_config = relay_config(&broker.url());
    relay_config.batch_size = 10;
    // A lease no slow round on a busy machine outlasts: any double publish is then a bug.
    relay_config.lease_ms = 60_000;
    let first = tokio::spawn(shop.relay(relay_config.clone()).run(stopped.clone()));
    let second = tokio::spawn(shop.relay(relay_config).run(stopped.clone()));
    let consuming = consumer(&broker, &shop, "payments", stopped);
    place(&shop, &placed).await;
    assert_exactly_once(&shop, &placed).await;
    if let Some(dropped) = broker.duplicates_dropped() {
        assert_eq!(dropped, 0, "no row was claimed (and published) by both relays");
    }
    stop.send(true).unwrap();
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    consuming.await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_racing_on_postgres() {
    let Some(pool) = postgres().await else { return };
    two_relays_race(PgShop { pool }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_racing_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    two_relays_race(SqliteShop { pool: sqlite(dir.path()).await }).await;
}

async fn broker_restarted_while_relaying<S: Shop>(shop: S) {
    let mut broker = TestBroker::start().await;
    if broker.external.is_some() {
        return; // an external broker is not ours to restart
    }
    broker.declare("payments", false).await;
    shop.setup().await;
    let (stop, stopped) = watch::channel(false);
    let relay = tokio::spawn(shop.relay(relay_config(&broker.url())).run(stopped.clone()));
    let consuming = consumer(&broker, &shop, "payments", stopped);
    let placed = orders("order", 150);
    // Three restarts, each while the relay has rows to publish (written just before).
    for chunk in placed.chunks(50) {
        place(&shop, chunk).await;
        assert!(shop.unsent().await > 0, "the relay has work when the broker goes down");
        broker.restart().await;
    }
    assert_exactly_once(&shop, &placed).await;
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    consuming.await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_restarted_while_the_relay_publishes_on_postgres() {
    let Some(pool) = postgres().await else { return };
    broker_restarted_while_relaying(PgShop { pool }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_restarted_while_the_relay_publishes_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    broker_restarted_while_relaying(SqliteShop { pool: sqlite(dir.path()).await }).await;
}

/// Records the order in which each customer's orders are handled.
#[derive(Clone)]
struct RecordsOrder<S: Shop> {
    shop: S,
    seen: Arc<std::sync::Mutex<BTreeMap<String, Vec<String>>>>,
}

impl<S: Shop> Handler for RecordsOrder<S> {
    async fn handle(&self, message: Incoming) -> Outcome {
        // Vary the handling time so that, without per-key order, later orders would overtake.
        let order = message.headers.get("order-id").cloned().unwrap_or_default();
        let pause = order.bytes().map(u64::from).sum::<u64>() % 5;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let first = self.shop.charge(&message).await.unwrap();
        if first {
            let customer = message.headers.get(wharf_sdk::ORDERING_KEY_HEADER).cloned().unwrap_or_default();
            self.seen.lock().unwrap().entry(customer).or_default().push(order);
        }
        Outcome::Ack
    }
}

async fn per_key_order<S: Shop>(shop: S) {
    let broker = TestBroker::start().await;
    if broker.external.is_some() {
        return; // x-ordered-by is Wharf's
    }
    broker.declare("payments", true).await;
    shop.setup().await;
    let placed = orders("order", 140);
    place(&shop, &placed).await;
    let (stop, stopped) = watch::channel(false);
    let relay = tokio::spawn(shop.relay(relay_config(&broker.url())).run(stopped.clone()));
    let seen = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let handler = RecordsOrder { shop: shop.clone(), seen: Arc::clone(&seen) };
    let mut config = ConsumerConfig::new(broker.url(), "payments");
    config.concurrency = 8;
    let consuming = tokio::spawn(run_consumer(config, handler, stopped));
    assert_exactly_once(&shop, &placed).await;
    let seen = seen.lock().unwrap().clone();
    for (customer, handled) in &seen {
        let index = |order: &String| order.rsplit('-').next().unwrap().parse::<usize>().unwrap();
        let positions: Vec<usize> = handled.iter().map(index).collect();
        let mut sorted = positions.clone();
        sorted.sort_unstable();
        assert_eq!(positions, sorted, "{customer}'s orders were handled in the order they were placed");
    }
    stop.send(true).unwrap();
    relay.await.unwrap().unwrap();
    consuming.await.unwrap().unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_on_the_consumer_side_on_postgres() {
    let Some(pool) = postgres().await else { return };
    per_key_order(PgShop { pool }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_on_the_consumer_side_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    per_key_order(SqliteShop { pool: sqlite(dir.path()).await }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_relay_and_inbox_on_mysql() {
    let Some(pool) = mysql().await else { return };
    outbox_relay_inbox(MySqlShop { pool }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stopped_mid_round_finishes_it_on_mysql() {
    let Some(pool) = mysql().await else { return };
    relay_stopped_mid_round(MySqlShop { pool }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_between_publish_and_mark_on_mysql() {
    let Some(pool) = mysql().await else { return };
    relay_killed_between_publish_and_mark(MySqlShop { pool }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_after_commit_before_ack_on_mysql() {
    let Some(pool) = mysql().await else { return };
    consumer_killed_after_commit(MySqlShop { pool }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_racing_on_mysql() {
    let Some(pool) = mysql().await else { return };
    two_relays_race(MySqlShop { pool }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_restarted_while_the_relay_publishes_on_mysql() {
    let Some(pool) = mysql().await else { return };
    broker_restarted_while_relaying(MySqlShop { pool }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_on_the_consumer_side_on_mysql() {
    let Some(pool) = mysql().await else { return };
    per_key_order(MySqlShop { pool }).await;
}
