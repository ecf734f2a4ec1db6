//! A Jepsen-style checker of the broker as a cluster (issue #19): three `wharf` processes whose
//! links each go through a [`FaultProxy`]; publishers with confirms and consumers with acks on
//! every node, reconnecting whenever their node goes away; meanwhile a seeded schedule SIGKILLs
//! and restarts nodes, isolates them, cuts one direction of their links, drops their links and
//! slows them. At the end, with every fault healed: every confirmed message was delivered, nothing
//! was delivered that was never published, and every replica drains to empty.
//!
//! Duplicates are allowed (delivery is at least once: an ack lost with a node comes back as a
//! redelivery) and counted in the report. CI runs a bounded schedule; `WHARF_JEPSEN_SEED` and
//! `WHARF_JEPSEN_STEPS` run another one (`scripts/jepsen.sh` runs many, recorded in
//! `docs/jepsen.md`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Node, call, eventually, free_port, start_node};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wharf_cluster::{Direction, FaultProxy};

const QUEUE: &str = "jepsen";
/// How long a client waits for one answer before it takes its node for gone and reconnects.
const CLIENT_PATIENCE: Duration = Duration::from_secs(10);
/// Publishes per batch, each batch's confirms awaited before the next.
const BATCH: u64 = 10;

/// A small deterministic generator (xorshift64*): the schedule is the seed's.
struct Schedule(u64);

impl Schedule {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % bound
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|text| text.parse().ok()).unwrap_or(default)
}

/// What the clients saw, shared by all of them.
#[derive(Default)]
struct History {
    /// Every body a publisher handed to the broker, confirmed or not.
    attempted: BTreeSet<String>,
    /// Every body whose publish was confirmed (acked).
    confirmed: BTreeSet<String>,
    /// Every body delivered to a consumer, with how many times.
    delivered: BTreeMap<String, u32>,
}

/// The clients' view of the cluster: each node's current AMQP address (a restarted node gets a
/// new one), and when to stop.
struct Shared {
    amqp: Mutex<Vec<SocketAddr>>,
    history: Mutex<History>,
    confirmed_count: AtomicU64,
    stop_publishing: AtomicBool,
}

async fn connect(shared: &Shared, node: usize) -> Option<Connection> {
    let address = shared.amqp.lock().unwrap()[node];
    let url = format!("amqp://guest:guest@{address}/%2f");
    let connecting = Connection::connect(&url, ConnectionProperties::default());
    tokio::time::timeout(CLIENT_PATIENCE, connecting).await.ok()?.ok()
}

/// Publishes batches through node `node` until told to stop, reconnecting whenever a publish
/// fails or goes unanswered.
async fn publisher(shared: Arc<Shared>, node: usize, client: usize) {
    let mut sequence = 0u64;
    while !shared.stop_publishing.load(Ordering::SeqCst) {
        let Some(connection) = connect(&shared, node).await else {
            tokio::time::sleep(Duration::from_millis(100)).await; // its node is down: try again later
            continue;
        };
        let Ok(channel) = connection.create_channel().await else { continue };
        if channel.confirm_select(ConfirmSelectOptions::default()).await.is_err() {
            continue;
        }
        'batches: while !shared.stop_publishing.load(Ordering::SeqCst) {
            let mut pending = Vec::new();
            for _ in 0..BATCH {
                let body = format!("p{client}-{sequence}");
                sequence += 1;
                shared.history.lock().unwrap().attempted.insert(body.clone());
                let publishing = channel.basic_publish(
                    "".into(),
                    QUEUE.into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                );
                match tokio::time::timeout(CLIENT_PATIENCE, publishing).await {
                    Ok(Ok(confirm)) => pending.push((body, confirm)),
                    _ => break 'batches,
                }
            }
            for (body, confirm) in pending {
                match tokio::time::timeout(CLIENT_PATIENCE, confirm).await {
                    Ok(Ok(confirmation)) if confirmation.is_ack() => {
                        shared.history.lock().unwrap().confirmed.insert(body);
                        shared.confirmed_count.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Ok(_)) => {} // nacked: the broker did not take it, and said so
                    _ => break 'batches,
                }
            }
        }
        let _ = tokio::time::timeout(CLIENT_PATIENCE, connection.close(200, "done".into())).await;
    }
}

/// Consumes through node `node` for ever, recording each delivery before acking it, and
/// reconnecting whenever the connection ends.
async fn consumer(shared: Arc<Shared>, node: usize, client: usize) {
    loop {
        let Some(connection) = connect(&shared, node).await else {
            tokio::time::sleep(Duration::from_millis(100)).await; // its node is down: try again later
            continue;
        };
        let Ok(channel) = connection.create_channel().await else { continue };
        if channel.basic_qos(50, BasicQosOptions::default()).await.is_err() {
            continue;
        }
        let consuming = channel.basic_consume(
            QUEUE.into(),
            format!("c{client}").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        );
        let Ok(Ok(mut deliveries)) = tokio::time::timeout(CLIENT_PATIENCE, consuming).await else { continue };
        while let Some(Ok(delivery)) = deliveries.next().await {
            let body = String::from_utf8_lossy(&delivery.data).into_owned();
            *shared.history.lock().unwrap().delivered.entry(body).or_default() += 1;
            if delivery.ack(BasicAckOptions::default()).await.is_err() {
                break;
            }
        }
    }
}

/// One fault of the schedule, on one node's links or process.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill,
    Isolate,
    /// The node's messages to the others are lost; theirs to it arrive.
    MuteOutgoing,
    DropLinks,
    SlowLinks,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_kills_and_partitions() {
    let seed = env_u64("WHARF_JEPSEN_SEED", 20261205);
    let steps = env_u64("WHARF_JEPSEN_STEPS", 6);
    eprintln!("jepsen schedule: seed {seed}, {steps} steps (WHARF_JEPSEN_SEED, WHARF_JEPSEN_STEPS to run it again)");
    let mut schedule = Schedule(seed | 1);
    let temp = tempfile::tempdir().unwrap();
    let listen: Vec<SocketAddr> = (0..3).map(|_| free_port()).collect();
    // proxies[from][to]: node `from` dials node `to` through it.
    let mut proxies: Vec<Vec<Option<FaultProxy>>> = Vec::new();
    for from in 0..3 {
        let mut row = Vec::new();
        for (to, address) in listen.iter().enumerate() {
            row.push(if from == to { None } else { Some(FaultProxy::start(*address).await.unwrap()) });
        }
        proxies.push(row);
    }
    let view = |node: usize| -> Vec<(u64, SocketAddr)> {
        (0..3)
            .map(|other| {
                let address =
                    if other == node { listen[node] } else { proxies[node][other].as_ref().unwrap().local_addr() };
                (other as u64 + 1, address)
            })
            .collect()
    };
    let data_dir = |node: usize| temp.path().join(format!("node-{}", node + 1));
    let mut nodes: Vec<Option<Node>> = Vec::new();
    for node in 0..3 {
        nodes.push(Some(start_node(&data_dir(node), node as u64 + 1, &view(node), &[]).await));
    }
    let urls: Vec<String> = nodes.iter().map(|node| node.as_ref().unwrap().http.clone()).collect();
    let shared = Arc::new(Shared {
        amqp: Mutex::new(nodes.iter().map(|node| node.as_ref().unwrap().amqp).collect()),
        history: Mutex::default(),
        confirmed_count: AtomicU64::new(0),
        stop_publishing: AtomicBool::new(false),
    });

    let declaring = connect(&shared, 0).await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    let options = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
    declaring.create_channel().await.unwrap().queue_declare(QUEUE.into(), options, arguments).await.unwrap();
    for url in &urls {
        eventually(&format!("{url} has the queue's group"), || async move {
            let (_, queues) = call(url, "GET", "/api/cluster/queues", None).await;
            queues.as_array().is_some_and(|queues| queues.iter().any(|queue| queue["name"] == QUEUE))
        })
        .await;
    }
    declaring.close(200, "declared".into()).await.unwrap();

    let mut publishers = Vec::new();
    let mut consumers = Vec::new();
    for node in 0..3 {
        publishers.push(tokio::spawn(publisher(Arc::clone(&shared), node, node)));
        consumers.push(tokio::spawn(consumer(Arc::clone(&shared), node, node)));
    }
    let progress = |what: String| {
        let shared = Arc::clone(&shared);
        async move {
            let from = shared.confirmed_count.load(Ordering::SeqCst);
            eventually(&what, || {
                let shared = Arc::clone(&shared);
                async move { shared.confirmed_count.load(Ordering::SeqCst) >= from + 2 * BATCH }
            })
            .await;
        }
    };
    progress("publishes confirmed before any fault".into()).await;

    for step in 0..steps {
        let node = schedule.below(3) as usize;
        let fault = match schedule.below(5) {
            0 => Fault::Kill,
            1 => Fault::Isolate,
            2 => Fault::MuteOutgoing,
            3 => Fault::DropLinks,
            _ => Fault::SlowLinks,
        };
        // How long the fault lasts is the schedule's, not a wait for anything.
        let hold = Duration::from_millis(1_000 + schedule.below(6_000));
        eprintln!("step {step}: {fault:?} node {} for {} ms", node + 1, hold.as_millis());
        let links = |node: usize| {
            (0..3).filter(move |other| *other != node).flat_map(move |other| [(node, other), (other, node)])
        };
        match fault {
            Fault::Kill => {
                let mut killed = nodes[node].take().unwrap();
                killed.child.kill().await.unwrap();
            }
            Fault::Isolate => links(node).for_each(|(from, to)| proxies[from][to].as_ref().unwrap().partition()),
            Fault::MuteOutgoing => {
                for other in (0..3).filter(|other| *other != node) {
                    proxies[node][other].as_ref().unwrap().partition_one_way(Direction::ToTarget);
                    proxies[other][node].as_ref().unwrap().partition_one_way(Direction::FromTarget);
                }
            }
            Fault::DropLinks => {
                links(node).for_each(|(from, to)| proxies[from][to].as_ref().unwrap().drop_connections())
            }
            Fault::SlowLinks => links(node).for_each(|(from, to)| proxies[from][to].as_ref().unwrap().delay(200)),
        }
        tokio::time::sleep(hold).await;
        if nodes[node].is_none() {
            let restarted = start_node(&data_dir(node), node as u64 + 1, &view(node), &[]).await;
            shared.amqp.lock().unwrap()[node] = restarted.amqp;
            nodes[node] = Some(restarted);
        }
        links(node).for_each(|(from, to)| proxies[from][to].as_ref().unwrap().heal());
        progress(format!("publishes confirmed again after step {step} ({fault:?} node {})", node + 1)).await;
    }

    shared.stop_publishing.store(true, Ordering::SeqCst);
    for publishing in publishers {
        tokio::time::timeout(Duration::from_secs(120), publishing).await.expect("a publisher never stopped").unwrap();
    }
    // Every confirmed message reaches a consumer; after two minutes without that, the ones
    // missing are named.
    let give_up = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let all_delivered = {
            let history = shared.history.lock().unwrap();
            history.confirmed.iter().all(|body| history.delivered.contains_key(body))
        };
        if all_delivered || std::time::Instant::now() > give_up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = {
        let history = shared.history.lock().unwrap();
        let phantom: Vec<&String> =
            history.delivered.keys().filter(|body| !history.attempted.contains(*body)).collect();
        assert!(phantom.is_empty(), "delivered but never published: {phantom:?}");
        let lost: Vec<&String> =
            history.confirmed.iter().filter(|body| !history.delivered.contains_key(*body)).collect();
        assert!(
            lost.is_empty(),
            "confirmed but never delivered ({} of {}): {lost:?}",
            lost.len(),
            history.confirmed.len()
        );
        let duplicates = history.delivered.values().filter(|count| **count > 1).count();
        format!(
            "{} published, {} confirmed, {} delivered ({duplicates} more than once), 0 lost",
            history.attempted.len(),
            history.confirmed.len(),
            history.delivered.len()
        )
    };
    // What was published but never confirmed may still arrive: the replicas drain to empty.
    for node in nodes.iter().flatten() {
        let url = &node.http;
        eventually(&format!("the queue drains on {url}"), || async move {
            let (_, queues) = call(url, "GET", "/api/cluster/queues", None).await;
            queues.as_array().is_some_and(|queues| {
                queues.iter().any(|queue| queue["name"] == QUEUE && queue["ready"] == 0 && queue["unacked"] == 0)
            })
        })
        .await;
    }
    for consuming in consumers {
        consuming.abort();
    }
    eprintln!("jepsen result: seed {seed}, {steps} steps: {report}");
}
