//! The broker as a cluster's node (issue #19, `docs/design/20261205_replication.md`): the
//! metadata group, a Raft group of every member (openraft through `wharf-raft`) that replicates
//! definition changes as commands (`command.rs`) and carries each committed one out on every
//! node (`machine.rs`).
//!
//! What goes through it: vhosts, users, permissions, topic permissions, policies, durable
//! exchanges, the bindings between two exchanges, quorum queues (each then a Raft group of its
//! own, `quorum.rs`), classic queues homed on one node and reached from the others
//! (`homed.rs`), and the bindings to both kinds. Transient exchanges stay on their node.
//!
//! A change asked for on any node is proposed to the group: on the leader directly, on a
//! follower by forwarding it to the leader over the cluster's links ([`SERVICE_META`]); the
//! caller is answered once the command is committed (on a majority's disks) *and* applied on
//! the node it asked, so what it does next on that node sees the change (read-your-writes). A
//! node that cannot reach a leader within [`PROPOSE_TIMEOUT`] refuses the change (541 on AMQP,
//! an error on the management API): a minority never changes definitions.

mod command;
mod exchanges;
mod failover;
mod homed;
mod homed_calls;
mod homed_link;
mod homed_proxy;
mod leader_move;
mod machine;
mod membership;
mod meta_snapshot;
mod propose;
mod quorum;
mod quorum_codec;
mod quorum_declare;
mod quorum_get;
mod quorum_liveness;
mod quorum_proposer;
mod quorum_timers;
mod replicas;

pub(crate) use command::{MetaAnswer, MetaCommand, StoredHash, table_bytes};
pub(crate) use failover::elect_on_link_loss;
pub(crate) use homed::{HomedQueues, is_record_kind as is_homed_record, restore as restore_homed};
pub(crate) use homed_link::{HomedLinks, SERVICE_HOMED};
pub(crate) use membership::{MemberChangeError, SERVICE_MEMBERS};
pub(crate) use quorum::{GroupStart, QuorumQueues, ReplicatedEnqueue, SERVICE_QUEUE, start_group};
pub(crate) use quorum_declare::{
    RecoveredQuorumQueue, is_record_kind as is_quorum_record, quorum_log, restore as restore_quorum,
};
pub(crate) use quorum_get::QuorumGet;
pub(crate) use quorum_liveness::{reconcile_consumers, watch_members};

use crate::core::Core;
use crate::error::BrokerError;
use bytes::Bytes;
use machine::{AppliedState, MetaMachine};
use openraft::error::RaftError;
use openraft::{BasicNode, Config, Raft, SnapshotPolicy};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wharf_cluster::{NodeId, Transport};
use wharf_raft::{GroupLog, GroupNetwork, GroupStatus, GroupTypes, Groups};
use wharf_store::{LogId, MetaStore, Recovered, Store};

/// The cluster service that takes metadata commands forwarded from followers.
pub(crate) const SERVICE_META: u16 = 2;

/// The metadata group's id on every node.
pub(crate) const METADATA_GROUP: u64 = 0;

/// How long a definition change may wait for a leader and its commit before it is refused.
pub(crate) const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The definitions-log key naming the store log of the metadata group's Raft log.
const LOG_KEY: &[u8] = b"cluster\0\0metadata-log";

/// The definitions-log record kind of the cluster's own records (never topology).
pub(crate) const KIND: &str = "cluster";

/// The store log of the metadata group's Raft log, if this data directory has one.
pub(crate) fn recorded_log(meta: &MetaStore) -> Option<LogId> {
    let value = meta.get(LOG_KEY)?;
    let (&version, id) = value.split_first()?;
    (version == crate::definition_format::DEFINITIONS_FORMAT_VERSION)
        .then(|| id.try_into().ok().map(|id| LogId(u64::from_be_bytes(id))))
        .flatten()
}

/// Opens the metadata group's Raft log as recovery found it, or makes one (and records where it
/// is before anything is written to it). Blocking.
pub(crate) fn open_log(store: &Store, meta: &MetaStore, recovered: &Recovered) -> Result<GroupLog, BrokerError> {
    let log = match recorded_log(meta) {
        Some(log) => log,
        None => {
            let log = store.create_log()?.wait()?;
            let mut value = vec![crate::definition_format::DEFINITIONS_FORMAT_VERSION];
            value.extend_from_slice(&log.0.to_be_bytes());
            meta.put(LOG_KEY, &value)?;
            log
        }
    };
    GroupLog::open(store, log, recovered)
        .map_err(|error| BrokerError::Startup(format!("the metadata group's log cannot be read: {error}")))
}

/// Why a definition change was not made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReplicationError {
    #[error("no leader of the cluster's metadata group is reachable from node {node} (is a majority of the nodes up?)")]
    NoLeader { node: NodeId },
    #[error("the change was sent to node {leader}, which did not answer in time; it may or may not have been made")]
    Unanswered { leader: NodeId },
    #[error("the cluster's metadata group failed: {0}")]
    Failed(String),
}

/// The metadata group on this node.
pub(crate) struct MetaGroup {
    raft: Raft<GroupTypes>,
    transport: Arc<Transport>,
    node_id: NodeId,
}

impl MetaGroup {
    /// The group's Raft handle.
    pub(crate) fn raft(&self) -> &Raft<GroupTypes> {
        &self.raft
    }

    /// This node's links.
    pub(crate) fn transport(&self) -> &Arc<Transport> {
        &self.transport
    }
}

impl std::fmt::Debug for MetaGroup {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("MetaGroup").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

/// Entries the metadata group's log keeps after a snapshot, for followers a little behind (they
/// catch up from the log rather than by installing the whole snapshot).
const METADATA_LOG_KEPT_AFTER_SNAPSHOT: u64 = 1_024;
/// How long a leader waits for a follower to install a metadata snapshot: the follower answers
/// once it changed its definitions (each change synced, quorum groups started), far longer than
/// openraft's 200 ms default allows for.
const METADATA_INSTALL_SNAPSHOT_TIMEOUT_MS: u64 = 60_000;

fn raft_config(snapshot_entries: u64) -> Result<Arc<Config>, BrokerError> {
    let config = Config {
        cluster_name: "wharf-metadata".into(),
        heartbeat_interval: 150,
        election_timeout_min: 750,
        election_timeout_max: 1_500,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_entries),
        max_in_snapshot_log_to_keep: METADATA_LOG_KEPT_AFTER_SNAPSHOT.min(snapshot_entries),
        // openraft purges in batches (256 entries by default); never wait for more than the
        // entries between two snapshots.
        purge_batch_size: snapshot_entries.clamp(1, 256),
        install_snapshot_timeout: METADATA_INSTALL_SNAPSHOT_TIMEOUT_MS,
        ..Default::default()
    };
    config.validate().map(Arc::new).map_err(|error| BrokerError::Startup(format!("Raft configuration: {error}")))
}

impl MetaGroup {
    /// Starts this node's member of the metadata group on `log`, with `members` (every node of
    /// the configuration, this one included) as its first membership; messages for it arrive
    /// through `groups`.
    pub async fn start(
        core: &Arc<Core>,
        transport: Arc<Transport>,
        groups: &Groups,
        log: GroupLog,
        members: BTreeMap<NodeId, String>,
        join: bool,
    ) -> Result<MetaGroup, BrokerError> {
        let state = AppliedState::read(&core.meta).map_err(BrokerError::Startup)?;
        let snapshots = log.snapshots();
        let state = machine::repair_interrupted_install(core, &snapshots, state).map_err(|error| {
            BrokerError::Startup(format!("the metadata snapshot being installed when the node stopped: {error}"))
        })?;
        let machine = MetaMachine::new(core, state, snapshots);
        let network = GroupNetwork::new(Arc::clone(&transport), METADATA_GROUP);
        let node_id = transport.node_id();
        let raft = Raft::new(node_id, raft_config(core.config.metadata_snapshot_entries)?, network, log, machine)
            .await
            .map_err(|error| BrokerError::Startup(format!("the metadata group did not start: {error}")))?;
        groups.insert(METADATA_GROUP, raft.clone());
        // Links follow the group's membership from now on: members added at run time are in it
        // (recovered after a restart), not in the flags.
        tokio::spawn(membership::follow_membership(raft.metrics(), Arc::clone(&transport)));
        // Every node initialises the group with the same members, which openraft allows; a node
        // that already holds the group's log is refused, which is what should happen. A node
        // joining a running cluster waits to be added instead (`membership.rs`).
        if join {
            tracing::info!(node = node_id, "waiting to be added to the cluster (--cluster-join)");
        } else {
            let members: BTreeMap<NodeId, BasicNode> =
                members.into_iter().map(|(node, address)| (node, BasicNode::new(address))).collect();
            match raft.initialize(members).await {
                Ok(()) => tracing::info!(node = node_id, "metadata group initialised"),
                Err(RaftError::APIError(error)) => tracing::debug!(%error, "metadata group already initialised"),
                Err(error) => return Err(BrokerError::Startup(format!("the metadata group did not start: {error}"))),
            }
        }
        Ok(MetaGroup { raft, transport, node_id })
    }

    /// The group as this node sees it.
    pub fn status(&self) -> GroupStatus {
        GroupStatus::of(&self.raft)
    }

    /// Stops this node's member of the group.
    pub async fn shutdown(&self) {
        if let Err(error) = self.raft.shutdown().await {
            tracing::warn!(%error, "the metadata group did not stop cleanly");
        }
    }

    /// Proposes `command` and returns its answer once it is committed and applied on this node.
    pub async fn propose(&self, command: MetaCommand) -> Result<MetaAnswer, ReplicationError> {
        let deadline = Instant::now() + PROPOSE_TIMEOUT;
        let bytes = serde_json::to_vec(&command).map_err(|error| ReplicationError::Failed(error.to_string()))?;
        let proposed =
            propose::propose(&self.raft, &self.transport, SERVICE_META, METADATA_GROUP, bytes, deadline).await?;
        let within = deadline.saturating_duration_since(Instant::now());
        self.raft
            .wait(Some(within))
            .applied_index_at_least(Some(proposed.index), "the change applied here")
            .await
            .map_err(|_| ReplicationError::NoLeader { node: self.node_id })?;
        decode_answer(&proposed.answer)
    }

    /// [`propose`](Self::propose) from blocking code (definition changes are called from
    /// synchronous paths); must run on the broker's multi-threaded runtime.
    pub fn propose_blocking(&self, command: MetaCommand) -> Result<MetaAnswer, ReplicationError> {
        let handle = tokio::runtime::Handle::current();
        crate::core::blocking(|| handle.block_on(self.propose(command)))
    }

    /// Answers a [`SERVICE_META`] call (on the leader, a follower's forwarded command).
    pub async fn handle(&self, payload: &[u8]) -> Result<Bytes, String> {
        let (_, command) = propose::split_forwarded(payload)?;
        propose::write_forwarded(&self.raft, command).await
    }
}

fn decode_answer(bytes: &[u8]) -> Result<MetaAnswer, ReplicationError> {
    serde_json::from_slice(bytes).map_err(|error| ReplicationError::Failed(format!("an unreadable answer: {error}")))
}

/// What a cluster's node answers on its links: Raft messages to their groups, forwarded metadata
/// commands to the metadata group once it runs.
pub(crate) fn handler(node_id: NodeId, groups: Groups, core: std::sync::Weak<Core>) -> wharf_cluster::Handler {
    Arc::new(move |from, service, payload: Bytes| {
        let groups = groups.clone();
        let core = core.upgrade();
        Box::pin(async move {
            let Some(core) = core else { return Err(format!("node {node_id} is stopping")) };
            match service {
                wharf_raft::SERVICE_RAFT => groups.handle(&payload).await.map(Bytes::from),
                SERVICE_META => match core.metadata_group() {
                    Some(group) => group.handle(&payload).await,
                    None => Err(format!("node {node_id}'s metadata group is not running yet")),
                },
                SERVICE_QUEUE => core.quorum.handle(&payload).await,
                SERVICE_HOMED => core.handle_homed(from, &payload).await,
                replicas::SERVICE_REPLICAS => core.handle_replica_change(&payload).await,
                SERVICE_MEMBERS => match core.metadata_group() {
                    Some(group) => group.handle_member_change(&core, &payload).await,
                    None => Err(format!("node {node_id}'s metadata group is not running yet")),
                },
                other => Err(format!("node {node_id} has no cluster service {other} (called by node {from})")),
            }
        })
    })
}
