//! The process-level crash test: the real `wharf` binary is killed with SIGKILL while a publisher
//! streams confirmed persistent messages and a consumer acks them; it is restarted on the same
//! data directory, five times over. Every confirmed message must be delivered, first deliveries
//! must come in publish order, and a message delivered twice must be marked redelivered.
//!
//! Each publish carries a unique publish index. After a kill the publisher publishes its
//! unconfirmed messages again (as any confirming publisher does), under new indices: those copies
//! are new messages, so "delivered twice" is judged per publish index.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/ports.rs"]
mod ports;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use ports::free_port;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const QUEUE: &str = "orders";
const MESSAGES: u64 = 20_000;
const ROUNDS: usize = 5;

/// Starts the binary and waits for its "accepting AMQP connections" log line.
async fn start_wharf(data_dir: &Path, address: SocketAddr) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["serve", "--http-listen", "127.0.0.1:0", "--mqtt-listen", "none", "--data-dir"])
        .arg(data_dir)
        .args(["--amqp-listen", &address.to_string(), "--log", "info"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        let line = lines.next_line().await.unwrap().expect("wharf exited before it was ready");
        if line.contains("accepting AMQP connections") {
            break;
        }
    }
    // Keep draining the log so the child never blocks on a full pipe (and show it on failure).
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("wharf: {line}");
        }
    });
    child
}

#[derive(Default)]
struct Observed {
    /// Publish indices confirmed.
    confirmed: BTreeSet<u64>,
    /// Logical messages (0..MESSAGES) with at least one confirmed publish.
    confirmed_logical: BTreeSet<u64>,
    /// The next publish index.
    next_index: u64,
    /// Confirmed publish indices not delivered yet.
    awaiting_delivery: BTreeSet<u64>,
    /// seq -> number of deliveries
    deliveries: BTreeMap<u64, u32>,
    first_delivery_order: Vec<u64>,
    problems: Vec<String>,
}

/// What the clients saw, and a signal for every change to it.
#[derive(Default)]
struct Shared {
    observed: Mutex<Observed>,
    progress: tokio::sync::Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Observed> {
        self.observed.lock().unwrap()
    }

    /// Waits until `done` holds, re-checking after every change (no polling).
    async fn wait_until(&self, done: impl Fn(&Observed) -> bool) {
        loop {
            let changed = self.progress.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if done(&self.lock()) {
                return;
            }
            changed.await;
        }
    }
}

async fn connect(address: SocketAddr) -> Connection {
    Connection::connect(&format!("amqp://guest:guest@{address}/%2f"), ConnectionProperties::default()).await.unwrap()
}

/// Consumes and acks until the connection breaks or `stop` fires, recording what arrives. (A
/// client does not always notice at once that a killed server's socket is gone; the test tells
/// the consumer the broker is dead instead of waiting for the client to find out.)
async fn consume(address: SocketAddr, shared: Arc<Shared>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let connection = connect(address).await;
    let channel = connection.create_channel().await.unwrap();
    channel.basic_qos(200, BasicQosOptions::default()).await.unwrap();
    let Ok(mut consumer) =
        channel.basic_consume(QUEUE.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await
    else {
        return;
    };
    loop {
        let next = tokio::select! {
            next = consumer.next() => next,
            _ = stop.changed() => return,
        };
        let Some(Ok(delivery)) = next else { return };
        let seq: u64 = String::from_utf8_lossy(&delivery.data[..20]).trim().parse().unwrap();
        {
            let mut observed = shared.lock();
            observed.awaiting_delivery.remove(&seq);
            let count = observed.deliveries.entry(seq).or_insert(0);
            *count += 1;
            if *count == 1 {
                observed.first_delivery_order.push(seq);
            } else if !delivery.redelivered {
                observed.problems.push(format!("message {seq} delivered again without redelivered=true"));
            }
        }
        shared.progress.notify_waiters();
        let acked = tokio::select! {
            acked = delivery.ack(BasicAckOptions::default()) => acked,
            _ = stop.changed() => return,
        };
        if acked.is_err() {
            return;
        }
    }
}

/// Publishes logical messages from `first` on, up to 1,000 unconfirmed at a time, recording
/// confirms, until the connection breaks or everything is confirmed. Returns the first logical
/// message not known to be confirmed.
async fn publish(address: SocketAddr, first: u64, shared: Arc<Shared>) -> u64 {
    let next = publish_until_broken(address, first, &shared).await;
    shared.progress.notify_waiters();
    next
}

async fn publish_until_broken(address: SocketAddr, first: u64, shared: &Shared) -> u64 {
    let connection = connect(address).await;
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut in_flight = std::collections::VecDeque::new();
    let mut next = first;
    let body_tail = vec![b'x'; 1024 - 20];
    loop {
        while next < MESSAGES && in_flight.len() < 1_000 {
            let index = {
                let mut observed = shared.lock();
                observed.next_index += 1;
                observed.next_index
            };
            let mut body = format!("{index:>20}").into_bytes();
            body.extend_from_slice(&body_tail);
            match channel
                .basic_publish(
                    "".into(),
                    QUEUE.into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
            {
                Ok(confirm) => in_flight.push_back((next, index, confirm)),
                Err(error) => {
                    eprintln!("publish {next} failed: {error}");
                    return in_flight.front().map_or(next, |(first_unconfirmed, _, _)| *first_unconfirmed);
                }
            }
            next += 1;
        }
        let Some((seq, index, confirm)) = in_flight.pop_front() else { return next };
        match confirm.await {
            Ok(confirmation) if confirmation.is_ack() => {
                let mut observed = shared.lock();
                observed.confirmed.insert(index);
                observed.confirmed_logical.insert(seq);
                if !observed.deliveries.contains_key(&index) {
                    observed.awaiting_delivery.insert(index);
                }
                drop(observed);
                shared.progress.notify_waiters();
            }
            // Broken connection: what was not confirmed is published again next round.
            other => {
                eprintln!("confirm of {seq}: {other:?}");
                return seq;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_repeated_kill_9() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let observed = Arc::new(Shared::default());
    let mut next = 0;
    let started = std::time::Instant::now();
    for round in 0..ROUNDS {
        let address = free_port();
        let mut wharf = start_wharf(&data_dir, address).await;
        let connection = connect(address).await;
        let channel = connection.create_channel().await.unwrap();
        channel.queue_declare(QUEUE.into(), QueueDeclareOptions::durable(), FieldTable::default()).await.unwrap();
        drop(connection);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let consumer = tokio::spawn(consume(address, Arc::clone(&observed), stopped));
        let publisher = tokio::spawn(publish(address, next, Arc::clone(&observed)));
        // Kill once this round has seen a share of its messages confirmed (or all are).
        let target = ((round as u64 + 1) * MESSAGES / ROUNDS as u64).min(MESSAGES);
        // The publisher notifies when it stops too, so this cannot wait forever.
        let publisher_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let publisher = {
            let publisher_done = Arc::clone(&publisher_done);
            let observed = Arc::clone(&observed);
            tokio::spawn(async move {
                let next = publisher.await.unwrap();
                publisher_done.store(true, std::sync::atomic::Ordering::SeqCst);
                observed.progress.notify_waiters();
                next
            })
        };
        observed
            .wait_until(|seen| {
                seen.confirmed_logical.len() as u64 >= target * 3 / 4
                    || publisher_done.load(std::sync::atomic::Ordering::SeqCst)
            })
            .await;
        wharf.start_kill().unwrap();
        wharf.wait().await.unwrap();
        stop.send_replace(true);
        next = publisher.await.unwrap();
        consumer.await.unwrap();
        eprintln!(
            "round {round} done at {:?}: next {next}, confirmed {}",
            started.elapsed(),
            observed.lock().confirmed_logical.len()
        );
    }
    // A last life: publish what is left, then drain the queue.
    let address = free_port();
    let mut wharf = start_wharf(&data_dir, address).await;
    next = publish(address, next, Arc::clone(&observed)).await;
    assert_eq!(next, MESSAGES);
    eprintln!("all published at {:?}", started.elapsed());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let consumer = tokio::spawn(consume(address, Arc::clone(&observed), stopped));
    observed.wait_until(|seen| seen.awaiting_delivery.is_empty()).await;
    eprintln!("all delivered at {:?}", started.elapsed());
    wharf.start_kill().unwrap();
    wharf.wait().await.unwrap();
    stop.send_replace(true);
    consumer.await.unwrap();

    let observed = observed.lock();
    assert_eq!(observed.confirmed_logical.len() as u64, MESSAGES, "everything was eventually confirmed");
    assert!(observed.problems.is_empty(), "{:?}", observed.problems);
    let missing: Vec<&u64> = observed.confirmed.iter().filter(|seq| !observed.deliveries.contains_key(seq)).collect();
    assert!(missing.is_empty(), "confirmed but never delivered: {missing:?}");
    let out_of_order = observed.first_delivery_order.windows(2).filter(|pair| pair[0] >= pair[1]).count();
    assert_eq!(out_of_order, 0, "first deliveries follow publish order");
}
