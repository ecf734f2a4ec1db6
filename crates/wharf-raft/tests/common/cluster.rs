//! Three Raft nodes on loopback, each with its own store on its own fault-injecting file system
//! and its own links, every directed link through a fault proxy the test controls. A node can be
//! crashed (its Raft stopped, its file system crashed as a power loss or as `kill -9`, its links
//! cut) and restarted from what its store kept.

use super::Machine;
use bytes::Bytes;
use openraft::{BasicNode, Config, Raft, SnapshotPolicy};
use std::collections::BTreeMap;
use std::sync::Arc;
use wharf_cluster::{ClusterConfig, FaultProxy, Transport};
use wharf_raft::{Command, GroupLog, GroupNetwork, GroupTypes, Groups, SERVICE_RAFT};
use wharf_store::{CrashMode, LogId, SimFs, Store, StoreConfig};

/// The group the tests run (the metadata group's id).
pub const GROUP: u64 = 0;

pub struct Node {
    pub id: u64,
    pub transport: Arc<Transport>,
    pub groups: Groups,
    pub raft: Raft<GroupTypes>,
    pub machine: Machine,
    pub fs: SimFs,
    pub log: LogId,
}

fn raft_config() -> Arc<Config> {
    let config = Config {
        cluster_name: "wharf-test".into(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        // Snapshots often, and few entries kept behind them: restarts start from snapshots, and
        // a node that fell behind past the purge point gets one over its link.
        snapshot_policy: SnapshotPolicy::LogsSinceLast(200),
        max_in_snapshot_log_to_keep: 20,
        purge_batch_size: 1,
        ..Default::default()
    };
    Arc::new(config.validate().unwrap())
}

async fn start_raft(
    id: u64,
    transport: &Arc<Transport>,
    groups: &Groups,
    log: GroupLog,
) -> (Raft<GroupTypes>, Machine) {
    let machine = Machine::new(log.snapshots());
    let network = GroupNetwork::new(Arc::clone(transport), GROUP);
    let raft = Raft::new(id, raft_config(), network, log, machine.clone()).await.unwrap();
    groups.insert(GROUP, raft.clone());
    (raft, machine)
}

pub async fn start_node(id: u64, seed: u64) -> Node {
    let fs = SimFs::new(seed);
    let (store, _) = Store::open(fs.shared(), "/data", StoreConfig::default()).unwrap();
    let log = GroupLog::create(&store).await.unwrap();
    let store_log = log.store_log();
    let groups = Groups::default();
    let handling = groups.clone();
    let handler: wharf_cluster::Handler = Arc::new(move |_from, service, payload: Bytes| {
        let groups = handling.clone();
        Box::pin(async move {
            if service != SERVICE_RAFT {
                return Err(format!("no service {service}"));
            }
            groups.handle(&payload).await.map(Bytes::from)
        })
    });
    let mut cluster = ClusterConfig::new(id, "127.0.0.1:0".parse().unwrap(), Vec::new()).unwrap();
    cluster.heartbeat_interval_ms = 0;
    cluster.call_timeout_ms = 2_000;
    let transport = Arc::new(Transport::start(&cluster, handler).await.unwrap());
    let (raft, machine) = start_raft(id, &transport, &groups, log).await;
    Node { id, transport, groups, raft, machine, fs, log: store_log }
}

impl Node {
    /// Stops the node's Raft as a crash would (`mode`: what of its unsynced writes survive) and
    /// starts it again from what its store kept; its machine starts empty.
    pub async fn crash_and_restart(&mut self, mode: CrashMode) {
        // The crash first (nothing more reaches the disk, held syncs fail), then what is left
        // of the old process is stopped.
        self.fs.crash(mode);
        self.fs.release_syncs();
        self.groups.remove(GROUP);
        let _ = self.raft.shutdown().await;
        self.fs = self.fs.remount();
        let (store, recovered) = Store::open(self.fs.shared(), "/data", StoreConfig::default()).unwrap();
        let log = GroupLog::open(&store, self.log, &recovered).unwrap();
        let (raft, machine) = start_raft(self.id, &self.transport, &self.groups, log).await;
        self.raft = raft;
        self.machine = machine;
    }

    /// Makes the node's disk stop finishing syncs (writes still go in) until it crashes.
    pub fn stall_disk(&self) {
        self.fs.hold_syncs();
    }

    pub async fn stop(&self) {
        self.raft.shutdown().await.unwrap();
        self.transport.shutdown().await;
    }
}

/// Three nodes, every directed link through its own proxy, by (from, to); node 1 initialises the
/// group with all three.
pub async fn three_nodes(seed: u64) -> (Vec<Node>, BTreeMap<(u64, u64), FaultProxy>) {
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(start_node(id, seed.wrapping_mul(31).wrapping_add(id)).await);
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
pub async fn leader_of(nodes: &[Node], among: &[u64]) -> u64 {
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

pub async fn write(node: &Node, text: &str) {
    node.raft.client_write(Command(text.as_bytes().to_vec())).await.unwrap();
}

/// Waits until `node` applied the log up to `index`.
pub async fn applied_up_to(node: &Node, index: u64) {
    node.raft.wait(None).applied_index_at_least(Some(index), "applied").await.unwrap();
}

pub fn node(nodes: &[Node], id: u64) -> &Node {
    nodes.iter().find(|node| node.id == id).unwrap()
}

pub fn texts(machine: &Machine) -> Vec<String> {
    machine.applied().into_iter().map(|bytes| String::from_utf8(bytes).unwrap()).collect()
}
