//! A Raft group of three nodes on loopback, each with its own store, its links through fault
//! proxies the test controls: commands commit on a majority and every member applies them in
//! order; a partitioned leader is replaced and the group goes on, and the old leader catches up
//! once the partition heals. Waits are on openraft's metrics (events), never on time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use openraft::{BasicNode, Config, Raft, ServerState};
use std::collections::BTreeMap;
use std::sync::Arc;
use wharf_cluster::{ClusterConfig, FaultProxy, Transport};
use wharf_raft::{Command, GroupLog, GroupNetwork, GroupTypes, Groups, SERVICE_RAFT};
use wharf_store::{RealFs, Store, StoreConfig};

mod common;
use common::Machine;

/// The metadata group's id, which this test's group borrows.
const GROUP: u64 = 0;

struct Node {
    id: u64,
    transport: Arc<Transport>,
    raft: Raft<GroupTypes>,
    machine: Machine,
    _dir: tempfile::TempDir,
}

fn raft_config() -> Arc<Config> {
    let config = Config {
        cluster_name: "wharf-test".into(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        ..Default::default()
    };
    Arc::new(config.validate().unwrap())
}

async fn start_node(id: u64) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(RealFs::shared(), dir.path(), StoreConfig::default()).unwrap();
    let log = GroupLog::create(&store).await.unwrap();
    let groups = Groups::default();
    let handling = groups.clone();
    let handler: wharf_cluster::Handler = Arc::new(move |_from, service, payload: Bytes| {
        let groups = handling.clone();
        Box::pin(async move {
            assert_eq!(service, SERVICE_RAFT);
            groups.handle(&payload).await.map(Bytes::from)
        })
    });
    let mut cluster = ClusterConfig::new(id, "127.0.0.1:0".parse().unwrap(), Vec::new()).unwrap();
    cluster.heartbeat_interval_ms = 0;
    let transport = Arc::new(Transport::start(&cluster, handler).await.unwrap());
    let machine = Machine::default();
    let network = GroupNetwork::new(Arc::clone(&transport), GROUP);
    let raft = Raft::new(id, raft_config(), network, log, machine.clone()).await.unwrap();
    groups.insert(GROUP, raft.clone());
    Node { id, transport, raft, machine, _dir: dir }
}

/// Three nodes; every directed link goes through its own proxy, by (from, to).
async fn three_nodes() -> (Vec<Node>, BTreeMap<(u64, u64), FaultProxy>) {
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start_node(id).await);
    }
    let mut proxies = BTreeMap::new();
    for from in &nodes {
        for to in &nodes {
            if from.id != to.id {
                let proxy = FaultProxy::start(to.transport.local_addr()).await.unwrap();
                from.transport.add_member(to.id, proxy.local_addr().to_string()).await.unwrap();
                proxies.insert((from.id, to.id), proxy);
            }
        }
    }
    let members: BTreeMap<u64, BasicNode> =
        nodes.iter().map(|node| (node.id, BasicNode::new(node.transport.local_addr().to_string()))).collect();
    nodes[0].raft.initialize(members).await.unwrap();
    (nodes, proxies)
}

/// Waits until some node of `among` is leader and every node of `among` knows it.
async fn leader_of(nodes: &[Node], among: &[u64]) -> u64 {
    let first = nodes.iter().find(|node| among.contains(&node.id)).unwrap();
    let metrics = first
        .raft
        .wait(None)
        .metrics(|metrics| metrics.current_leader.is_some_and(|leader| among.contains(&leader)), "a leader")
        .await
        .unwrap();
    let leader = metrics.current_leader.unwrap();
    for node in nodes.iter().filter(|node| among.contains(&node.id)) {
        node.raft.wait(None).current_leader(leader, "the same leader").await.unwrap();
    }
    leader
}

async fn write(node: &Node, text: &str) {
    node.raft.client_write(Command(text.as_bytes().to_vec())).await.unwrap();
}

/// Waits until `node` applied the log up to `index`.
async fn applied_up_to(node: &Node, index: u64) {
    node.raft.wait(None).applied_index_at_least(Some(index), "applied").await.unwrap();
}

fn node(nodes: &[Node], id: u64) -> &Node {
    nodes.iter().find(|node| node.id == id).unwrap()
}

fn texts(machine: &Machine) -> Vec<String> {
    machine.applied().into_iter().map(|bytes| String::from_utf8(bytes).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_commit_on_a_majority_and_every_member_applies_them_in_order() {
    let (nodes, _proxies) = three_nodes().await;
    let leader = leader_of(&nodes, &[1, 2, 3]).await;
    for index in 0..20 {
        write(node(&nodes, leader), &format!("command {index}")).await;
    }
    let last = node(&nodes, leader).raft.metrics().borrow().last_log_index.unwrap();
    let expected: Vec<String> = (0..20).map(|index| format!("command {index}")).collect();
    for member in &nodes {
        applied_up_to(member, last).await;
        assert_eq!(texts(&member.machine), expected, "node {}", member.id);
    }
    for member in &nodes {
        member.raft.shutdown().await.unwrap();
        member.transport.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_is_replaced_and_catches_up_after_the_heal() {
    let (nodes, proxies) = three_nodes().await;
    let old = leader_of(&nodes, &[1, 2, 3]).await;
    write(node(&nodes, old), "before").await;
    for ((from, to), proxy) in &proxies {
        if *from == old || *to == old {
            proxy.partition();
        }
    }
    let rest: Vec<u64> = (1..=3).filter(|id| *id != old).collect();
    let new = leader_of(&nodes, &rest).await;
    assert_ne!(new, old);
    write(node(&nodes, new), "during").await;
    for proxy in proxies.values() {
        proxy.heal();
    }
    let last = node(&nodes, new).raft.metrics().borrow().last_log_index.unwrap();
    for member in &nodes {
        applied_up_to(member, last).await;
        assert_eq!(texts(&member.machine), vec!["before", "during"], "node {}", member.id);
    }
    let state = node(&nodes, old).raft.metrics().borrow().state;
    assert_ne!(state, ServerState::Leader, "the old leader stepped down");
    for member in &nodes {
        member.raft.shutdown().await.unwrap();
        member.transport.shutdown().await;
    }
}
