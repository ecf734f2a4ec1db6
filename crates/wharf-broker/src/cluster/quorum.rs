//! Quorum queues on a cluster (`x-queue-type: quorum`): one Raft group per queue, on its member
//! nodes, whose state machine is `wharf-model`'s [`QuorumQueue`]. Every member applies the same
//! commands, so every member knows which consumer each message went to; a node delivers only to
//! the consumers on its own channels, from its own replica. So a client on any member publishes
//! and consumes there, and nothing but commands crosses the links: a publish is an `Enqueue`
//! proposed to the group (forwarded to the leader by a follower) and confirmed once committed,
//! which is once a majority of the members has it on disk; what channels do with consumers and
//! deliveries ([`ReplicatedOp`]s from the model) becomes commands the same way.
//!
//! Each node proposes through one task per group ([`QueueGroup`]'s proposer), which takes what
//! is waiting and proposes it as one entry, in the order the model produced it: a consumer's
//! checkout always precedes its settles and its cancel.
//!
//! Each member snapshots its replica every `--quorum-snapshot-entries` entries (4,096 by
//! default: a snapshot costs the queue's size, every message it holds, so a deep queue is not
//! snapshotted often; under S1's load an entry carries tens of commands, so that is a snapshot
//! every few seconds of a busy queue) (the state
//! machine's bytes, `QuorumQueue::encode_snapshot`, saved in the group's store log), after which
//! openraft purges the log before it, so neither the log on disk nor its copy in memory grows
//! without bound. A restarted node starts each group's state machine from its latest snapshot
//! and the log after it, then proposes `NodeRestarted` so that what its consumers of before the
//! restart held goes back to the queue. A member too far behind is sent the leader's snapshot.

use super::leader_move::WriteGate;
use super::propose;
use super::quorum_codec;
use super::quorum_proposer::{Lanes, Proposer};
use crate::core::{Core, blocking};
use openraft::storage::RaftStateMachine;
use openraft::{
    BasicNode, Config, Entry, EntryPayload, LogId, Raft, RaftSnapshotBuilder, Snapshot, SnapshotMeta, SnapshotPolicy,
    StorageError, StorageIOError, StoredMembership,
};
use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::sync::{Arc, Mutex, RwLock, Weak};
use tokio::sync::oneshot;
use wharf_cluster::{NodeId, Transport};
use wharf_model::{
    ChannelKey, ConnectionId, DeathReason, QuorumAnswer, QuorumCommand, QuorumConsumer, QuorumDeathReason,
    QuorumEffect, QuorumQueue, QuorumSettings, ReplicatedDelivery, ReplicatedOp, ReplicatedOutcome,
};
use wharf_raft::{Answer, GroupLog, GroupNetwork, GroupSnapshotMeta, GroupSnapshots, GroupTypes, Groups};

/// The cluster service that takes queue commands forwarded from followers.
pub(crate) const SERVICE_QUEUE: u16 = 3;

/// Entries one Raft message carries at most (openraft's default is 300, which with full entries
/// is hundreds of MiB in one message).
const ENTRIES_PER_MESSAGE_MAX: u64 = 8;

/// Entries kept in the log after a snapshot (at most; no more than the entries between two
/// snapshots), so a follower a little behind catches up from the log rather than by a whole
/// snapshot.
const LOG_KEPT_AFTER_SNAPSHOT: u64 = 1_024;

/// A queue group's longest election timeout, which is also how long a voter that heard from its
/// leader refuses to vote for another (openraft's leader lease).
pub(super) const ELECTION_TIMEOUT_MAX_MS: u64 = 1_500;

/// One quorum queue's group on this node.
pub(crate) struct QueueGroup {
    pub group: u64,
    pub vhost: String,
    pub name: String,
    /// The nodes holding a replica (changed by `replicas.rs`).
    members: RwLock<Vec<NodeId>>,
    raft: Raft<GroupTypes>,
    /// Its proposers on this node (`quorum_proposer.rs`).
    proposals: Lanes,
    state: Arc<Mutex<QuorumQueue>>,
    /// Elections this node started as soon as the group's leader was gone.
    early_elections: std::sync::atomic::AtomicU64,
    /// Closed while this node, leading, hands the group over (`leader_move.rs`): nothing is
    /// written meanwhile, its own proposals wait and forwarded ones are told to look elsewhere.
    writes: Arc<WriteGate>,
    /// See [`QueueGroup::timers_changed`].
    timers_changed: Arc<tokio::sync::Notify>,
}

impl QueueGroup {
    /// The group's Raft handle.
    pub(crate) fn raft(&self) -> &Raft<GroupTypes> {
        &self.raft
    }

    /// The nodes holding a replica.
    pub fn members(&self) -> Vec<NodeId> {
        self.members.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// The nodes holding a replica are now `members`.
    pub(crate) fn set_members(&self, members: &[NodeId]) {
        *self.members.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = members.to_vec();
    }

    /// Counts an election this node started as soon as the leader was gone.
    pub(crate) fn count_early_election(&self) {
        self.early_elections.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Elections this node started as soon as the leader was gone.
    pub fn early_elections(&self) -> u64 {
        self.early_elections.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether this node writes to the group, and its writes under way.
    pub(crate) fn writes(&self) -> &WriteGate {
        &self.writes
    }
}

impl std::fmt::Debug for QueueGroup {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("QueueGroup").field("group", &self.group).field("name", &self.name).finish()
    }
}

impl QueueGroup {
    /// Proposes `command` behind everything this node proposed to the group before.
    pub(crate) fn submit(&self, command: QuorumCommand, answer: Option<oneshot::Sender<Result<QuorumAnswer, String>>>) {
        if !self.proposals.send(command, answer) {
            tracing::warn!(queue = %self.name, "a quorum queue's proposer stopped; a command was dropped");
        }
    }

    /// How many consumer commands this node proposed to the group so far (a mark).
    pub(crate) fn consumer_commands_submitted(&self) -> u64 {
        self.proposals.consumer_commands_submitted()
    }

    /// If the first `mark` consumer commands this node proposed were all answered: a log index
    /// by which they were applied.
    pub(crate) fn consumer_commands_applied_by(&self, mark: u64) -> Option<u64> {
        self.proposals.consumer_commands_applied_by(mark)
    }

    /// The index of the last entry this node's replica applied.
    pub(crate) fn applied_index(&self) -> u64 {
        self.raft.metrics().borrow().last_applied.map_or(0, |log_id| log_id.index)
    }

    /// Proposes `command` and hands back a receiver of its answer.
    pub fn propose_and_wait(&self, command: QuorumCommand) -> oneshot::Receiver<Result<QuorumAnswer, String>> {
        let (sender, receiver) = oneshot::channel();
        self.submit(command, Some(sender));
        receiver
    }

    /// The group as this node sees it.
    pub fn status(&self) -> wharf_raft::GroupStatus {
        wharf_raft::GroupStatus::of(&self.raft)
    }

    /// Ready and checked-out messages, and consumers, as this node's replica holds them.
    pub fn counts(&self) -> (u64, u64, usize) {
        let state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        (state.ready_count(), state.checked_out_count(), state.consumer_count())
    }

    /// Consumers attached to `node`, by this node's replica.
    pub(crate) fn consumers_on(&self, node: NodeId) -> usize {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).consumers_on(node)
    }

    /// Consumers attached to `node` by this node's replica: whether each was cancelled, and what
    /// each holds.
    pub(crate) fn consumers_at(&self, node: NodeId) -> Vec<wharf_model::ConsumerRecord> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).consumers_at(node)
    }

    /// When this node's replica's next timer (expiry, lease, backoff) is due, if any is.
    pub(crate) fn next_timer_ms(&self) -> Option<u64> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).next_timer_ms()
    }

    /// Woken when the replica starts a timer that waits for a `Tick` to stamp it.
    pub(crate) fn timers_changed(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.timers_changed)
    }

    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}

/// This node's quorum queue groups.
#[derive(Debug, Default)]
pub(crate) struct QuorumQueues {
    by_name: RwLock<HashMap<(String, String), Arc<QueueGroup>>>,
    by_group: RwLock<HashMap<u64, Arc<QueueGroup>>>,
}

impl QuorumQueues {
    pub fn get(&self, vhost: &str, name: &str) -> Option<Arc<QueueGroup>> {
        let groups = self.by_name.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        groups.get(&(vhost.to_owned(), name.to_owned())).cloned()
    }

    pub(crate) fn by_group(&self, group: u64) -> Option<Arc<QueueGroup>> {
        self.by_group.read().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&group).cloned()
    }

    /// Registers a started group; a group already registered under the name keeps its place
    /// unless this one is newer (a queue deleted and declared again gets a higher group id).
    fn insert(&self, group: Arc<QueueGroup>) {
        let key = (group.vhost.clone(), group.name.clone());
        if self.get(&group.vhost, &group.name).is_some_and(|found| found.group > group.group) {
            tracing::warn!(queue = %group.name, group = group.group, "an older group of a queue not registered");
            return;
        }
        self.by_group.write().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(group.group, Arc::clone(&group));
        self.by_name.write().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(key, group);
    }

    pub fn remove(&self, vhost: &str, name: &str) -> Option<Arc<QueueGroup>> {
        let key = (vhost.to_owned(), name.to_owned());
        let removed = self.by_name.write().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&key)?;
        self.by_group.write().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&removed.group);
        Some(removed)
    }

    pub fn all(&self) -> Vec<Arc<QueueGroup>> {
        self.by_group.read().unwrap_or_else(|poisoned| poisoned.into_inner()).values().cloned().collect()
    }

    /// Answers a [`SERVICE_QUEUE`] call: a follower's forwarded commands for one of the groups.
    pub async fn handle(&self, payload: &[u8]) -> Result<bytes::Bytes, String> {
        let (group, command) = propose::split_forwarded(payload)?;
        let Some(found) = self.by_group(group) else { return Err(format!("this node is not in queue group {group}")) };
        let Some(_writing) = found.writes.try_enter() else { return propose::not_leader_reply() };
        propose::write_forwarded(&found.raft, command).await
    }
}

/// The consumer a channel's op names, as the group knows it.
pub(super) fn consumer_of(node: NodeId, incarnation: u32, channel: ChannelKey, tag: String) -> QuorumConsumer {
    QuorumConsumer { node, incarnation, connection: channel.connection.0, channel: channel.channel, tag }
}

impl Core {
    /// Refuses to consume from a quorum queue this node holds no replica of (it was declared
    /// with an `x-quorum-initial-group-size` that left this node out): 540, naming the members.
    pub(crate) fn require_replica(&self, vhost: &str, queue: &str) -> Result<(), wharf_model::ModelError> {
        if self.config.cluster.is_none() {
            return Ok(());
        }
        let replicated =
            self.lock_model().vhost(vhost).and_then(|found| found.queue(queue)).is_some_and(|found| found.replicated);
        if !replicated || self.quorum.get(vhost, queue).is_some() {
            return Ok(());
        }
        if let Some(home) = self.remote_home(vhost, queue) {
            // Asked, not inferred from the link's state: a home killed a moment ago may still
            // look connected, and a consume it never hears of would wait for ever.
            return self.counts_at_home(home, vhost, queue).map(|_| ());
        }
        let members = super::quorum_declare::record_of(&self.meta, vhost, queue)
            .map(|definition| format!("{:?}", definition.members))
            .unwrap_or_else(|| "unknown".into());
        Err(wharf_model::ModelError::not_implemented(format!(
            "queue '{queue}' in vhost '{vhost}' has no replica on this node; consume through one of its nodes {members}"
        )))
    }

    /// Turns what channels did with quorum queues' consumers and deliveries into commands for
    /// their groups (in order, through each group's proposer). Non-blocking: called where
    /// deliveries are sent, under the model lock, so the order is the model's.
    pub(crate) fn propose_replicated(&self, ops: Vec<ReplicatedOp>) {
        let Some(node) = self.config.cluster.as_ref().map(|cluster| cluster.node_id) else { return };
        let incarnation = self.incarnation;
        for op in ops {
            let (ReplicatedOp::Checkout { vhost, queue, .. }
            | ReplicatedOp::Cancel { vhost, queue, .. }
            | ReplicatedOp::Down { vhost, queue, .. }
            | ReplicatedOp::Settle { vhost, queue, .. }) = &op;
            if let Some(home) = self.remote_home(vhost, queue) {
                self.op_to_home(home, op);
                continue;
            }
            let (vhost, queue, command) = match op {
                ReplicatedOp::Checkout { vhost, queue, channel, tag, prefetch } => {
                    let consumer = consumer_of(node, incarnation, channel, tag);
                    (vhost, queue, QuorumCommand::Checkout { consumer, prefetch: u32::from(prefetch) })
                }
                ReplicatedOp::Cancel { vhost, queue, channel, tag } => {
                    (vhost, queue, QuorumCommand::Cancel { consumer: consumer_of(node, incarnation, channel, tag) })
                }
                ReplicatedOp::Down { vhost, queue, channel, tag } => {
                    (vhost, queue, QuorumCommand::Down { consumer: consumer_of(node, incarnation, channel, tag) })
                }
                ReplicatedOp::Settle { vhost, queue, channel, tag, id, outcome } => {
                    let consumer = consumer_of(node, incarnation, channel, tag);
                    let ids = vec![id];
                    let command = match outcome {
                        ReplicatedOutcome::Settled => QuorumCommand::Settle { consumer, ids },
                        ReplicatedOutcome::Returned => QuorumCommand::Return { consumer, ids },
                        ReplicatedOutcome::Discarded => QuorumCommand::Discard { consumer, ids },
                    };
                    (vhost, queue, command)
                }
            };
            match self.quorum.get(&vhost, &queue) {
                Some(group) => group.submit(command, None),
                None => tracing::warn!(%vhost, %queue, "a quorum queue this node has no group of; a command dropped"),
            }
        }
    }

    /// Enqueues a message (its stored meta and body) into a quorum queue: resolves `Ok` once the
    /// enqueue is committed (on a majority's disks), with an error if the group refused it (a
    /// length limit with `reject-publish`) or could not take it.
    pub(crate) fn enqueue_replicated(&self, vhost: &str, queue: &str, enqueue: ReplicatedEnqueue<'_>) -> EnqueueAnswer {
        let (sender, receiver) = oneshot::channel();
        match self.quorum.get(vhost, queue) {
            Some(group) => {
                let payload = quorum_codec::encode_payload(enqueue.meta, enqueue.body);
                let expires_at_ms = enqueue.expires_at_ms;
                let order_key = enqueue.order_key.map(|key| Arc::from(key.as_bytes()));
                let command = match enqueue.dedup_key {
                    Some(key) => QuorumCommand::EnqueueKeyed {
                        payload,
                        expires_at_ms,
                        key: Arc::from(key),
                        now_ms: enqueue.now_ms,
                        order_key,
                    },
                    None => QuorumCommand::Enqueue { payload, expires_at_ms, order_key },
                };
                group.submit(command, Some(sender));
            }
            None => {
                let _ = sender.send(Err(format!("this node has no group of quorum queue '{queue}'")));
            }
        }
        receiver
    }
}

/// A publish to a quorum queue, as the node it arrived on stamps it.
pub(crate) struct ReplicatedEnqueue<'a> {
    /// The message's stored meta and its body.
    pub meta: &'a [u8],
    pub body: &'a [u8],
    /// When it expires (its TTL from now), if it does.
    pub expires_at_ms: Option<u64>,
    /// Its de-duplication key, if the queue de-duplicates and the message has one.
    pub dedup_key: Option<Vec<u8>>,
    /// Its ordering key (`x-ordered-by`), if the queue orders by key and the message has one.
    pub order_key: Option<Arc<str>>,
    /// This node's time.
    pub now_ms: u64,
}

/// The group's answer to an enqueue, when it comes.
pub(crate) type EnqueueAnswer = oneshot::Receiver<Result<QuorumAnswer, String>>;

fn raft_config(snapshot_entries: u64) -> Result<Arc<Config>, String> {
    let config = Config {
        cluster_name: "wharf-quorum-queue".into(),
        max_payload_entries: ENTRIES_PER_MESSAGE_MAX,
        heartbeat_interval: 150,
        election_timeout_min: 750,
        election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_entries),
        max_in_snapshot_log_to_keep: LOG_KEPT_AFTER_SNAPSHOT.min(snapshot_entries),
        // openraft purges in batches (256 entries by default); never wait for more than the
        // entries between two snapshots.
        purge_batch_size: snapshot_entries.clamp(1, 256),
        ..Default::default()
    };
    config.validate().map(Arc::new).map_err(|error| format!("Raft configuration: {error}"))
}

/// What a node needs to start a queue's group.
pub(crate) struct GroupStart<'a> {
    pub core: &'a Arc<Core>,
    pub transport: &'a Arc<Transport>,
    pub groups: &'a Groups,
    pub group: u64,
    pub vhost: &'a str,
    pub name: &'a str,
    pub members: &'a [NodeId],
    pub settings: QuorumSettings,
    pub log: GroupLog,
    /// Initialise the group with `members` (a replica made when the queue was declared); a
    /// replica added later only joins (see `QuorumDefinition::joined`).
    pub initialize: bool,
}

/// Starts this node's member of a queue's group and registers it; proposes `NodeRestarted` first.
pub(crate) async fn start_group(start: GroupStart<'_>) -> Result<Arc<QueueGroup>, String> {
    let node = start.transport.node_id();
    // A restarted member starts from its latest snapshot; the log holds only what came after.
    let snapshots = start.log.snapshots();
    let (replica, last_applied, membership) = match snapshots.current() {
        Some((meta, data)) => match QuorumQueue::decode_snapshot(&data) {
            Some(replica) => (replica, meta.last_log_id, meta.last_membership),
            None => return Err(format!("the snapshot of quorum queue '{}' is unreadable", start.name)),
        },
        None => (QuorumQueue::new(start.settings), None, StoredMembership::default()),
    };
    let state = Arc::new(Mutex::new(replica));
    let raft_handle = Arc::new(std::sync::OnceLock::new());
    let timers_changed = Arc::new(tokio::sync::Notify::new());
    let machine = QueueMachine {
        core: Arc::downgrade(start.core),
        node,
        incarnation: start.core.incarnation,
        vhost: start.vhost.to_owned(),
        name: start.name.to_owned(),
        state: Arc::clone(&state),
        last_applied,
        membership,
        raft: Arc::clone(&raft_handle),
        snapshots,
        timers_changed: Arc::clone(&timers_changed),
    };
    let network = GroupNetwork::new(Arc::clone(start.transport), start.group);
    let raft = Raft::new(node, raft_config(start.core.config.quorum_snapshot_entries)?, network, start.log, machine)
        .await
        .map_err(|error| format!("the group of quorum queue '{}' did not start: {error}", start.name))?;
    let _ = raft_handle.set(raft.clone());
    start.groups.insert(start.group, raft.clone());
    if start.initialize {
        let addresses: BTreeMap<NodeId, BasicNode> =
            start.members.iter().map(|member| (*member, BasicNode::new(member.to_string()))).collect();
        if let Err(error) = raft.initialize(addresses).await {
            tracing::debug!(queue = start.name, %error, "queue group already initialised");
        }
    }
    let writes = Arc::new(WriteGate::default());
    let proposer = Proposer { raft: raft.clone(), transport: Arc::clone(start.transport), group: start.group };
    let proposals = Lanes::start(proposer, Arc::clone(&writes));
    let group = Arc::new(QueueGroup {
        group: start.group,
        vhost: start.vhost.to_owned(),
        name: start.name.to_owned(),
        members: RwLock::new(start.members.to_vec()),
        raft,
        proposals,
        state,
        early_elections: Default::default(),
        writes,
        timers_changed,
    });
    group.submit(QuorumCommand::NodeRestarted { node, incarnation: start.core.incarnation }, None);
    start.core.quorum.insert(Arc::clone(&group));
    tokio::spawn(super::quorum_timers::run_timers(Arc::downgrade(&group), Arc::clone(&start.core.clock)));
    tracing::info!(queue = start.name, group = start.group, members = ?start.members, "quorum queue group started");
    Ok(group)
}

/// A queue group's state machine on this node.
struct QueueMachine {
    core: Weak<Core>,
    node: NodeId,
    incarnation: u32,
    vhost: String,
    name: String,
    state: Arc<Mutex<QuorumQueue>>,
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    /// The group's Raft, once started (the leader alone dead-letters).
    raft: Arc<std::sync::OnceLock<Raft<GroupTypes>>>,
    /// Where its snapshots are kept (the group's store log).
    snapshots: GroupSnapshots,
    /// Notified when an applied entry starts a timer that waits for its stamp.
    timers_changed: Arc<tokio::sync::Notify>,
}

fn storage_error(text: impl std::fmt::Display) -> StorageError<u64> {
    let error = std::io::Error::other(text.to_string());
    StorageError::IO { source: StorageIOError::write_state_machine(&error) }
}

impl QueueMachine {
    /// The replica as it stands, to be saved as a snapshot: taken now, between two applies, so
    /// the state and the log id it covers agree.
    fn snapshot_builder(&self) -> QueueSnapshots {
        let data = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).encode_snapshot();
        let meta = GroupSnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id: format!("{}-{}", self.last_applied.map_or(0, |log_id| log_id.index), data.len()),
        };
        QueueSnapshots { meta, data, snapshots: self.snapshots.clone() }
    }

    /// The group counted this node as gone (it was cut off) and forgot its consumers: those still
    /// here are checked out again (what they held went to others, and a settle of it now is
    /// ignored, so nothing is lost and what they get again is marked redelivered).
    fn check_out_again(&self) {
        let Some(core) = self.core.upgrade() else { return };
        let Some(group) = core.quorum.get(&self.vhost, &self.name) else { return };
        // Read and proposed under the model lock: a channel closing meanwhile proposes its
        // consumers' `Down` under the same lock, so it comes after these checkouts, never
        // before (a checkout after its consumer's `Down` would give messages to a consumer
        // nobody serves, held for ever).
        let model = core.lock_model();
        for (channel, tag, prefetch) in model.replicated_consumers(&self.vhost, &self.name) {
            let consumer = consumer_of(self.node, self.incarnation, channel, tag);
            group.submit(QuorumCommand::Checkout { consumer, prefetch: u32::from(prefetch) }, None);
        }
        drop(model);
    }

    /// Moves dead messages to the queue's dead-letter target, as a classic queue's.
    fn dead_letter(&self, dead: Vec<QuorumEffect>) {
        let Some(core) = self.core.upgrade() else { return };
        for effect in dead {
            let QuorumEffect::DeadLetter { id, payload, reason, delivery_count } = effect else { continue };
            let message = quorum_codec::split_payload(&payload)
                .and_then(|(meta, body)| crate::persist::decode_message(meta, bytes::Bytes::copy_from_slice(body)));
            let Some(message) = message else {
                tracing::error!(queue = %self.name, id, "a dead quorum queue message is unreadable");
                continue;
            };
            let reason = match reason {
                QuorumDeathReason::Rejected => DeathReason::Rejected,
                QuorumDeathReason::DeliveryLimit => DeathReason::DeliveryLimit,
                QuorumDeathReason::Expired => DeathReason::Expired,
                QuorumDeathReason::MaxLength => DeathReason::MaxLen,
            };
            let effects =
                core.lock_model().dead_letter_replicated(&self.vhost, &self.name, &message, delivery_count, reason);
            core.apply(effects);
        }
    }

    /// Hands the deliveries the group assigned to this node's consumers to their channels.
    fn deliver_here(&self, deliveries: Vec<QuorumEffect>) {
        if deliveries.is_empty() {
            return;
        }
        let Some(core) = self.core.upgrade() else { return };
        let mut model = core.lock_model();
        for effect in deliveries {
            let QuorumEffect::Deliver { consumer, id, payload, delivery_count, redelivered } = effect else { continue };
            let message = quorum_codec::split_payload(&payload)
                .and_then(|(meta, body)| crate::persist::decode_message(meta, bytes::Bytes::copy_from_slice(body)));
            let Some(message) = message else {
                // Not discarded: another node (a newer version, say) may read it. Held by a
                // consumer whose channel never got it, it is returned by the consumer sweep
                // (`quorum_liveness.rs`) and goes to another consumer.
                tracing::error!(queue = %self.name, id, "a quorum queue message is unreadable here; not delivered");
                continue;
            };
            let delivery = ReplicatedDelivery {
                vhost: self.vhost.clone(),
                channel: ChannelKey { connection: ConnectionId(consumer.connection), channel: consumer.channel },
                tag: consumer.tag,
                queue: self.name.clone(),
                id,
                message: Arc::new(message),
                delivery_count,
                redelivered,
            };
            let (sent, mut effects) = model.deliver_replicated(delivery);
            effects.deliveries.extend(sent);
            core.send(&mut effects);
        }
    }
}

/// A snapshot of a queue's replica, taken by [`QueueMachine::snapshot_builder`] and saved in
/// the group's store log when openraft asks for it to be built; the log before it can then be
/// purged (openraft keeps [`LOG_KEPT_AFTER_SNAPSHOT`] entries for followers a little behind).
struct QueueSnapshots {
    meta: GroupSnapshotMeta,
    data: Vec<u8>,
    snapshots: GroupSnapshots,
}

impl RaftSnapshotBuilder<GroupTypes> for QueueSnapshots {
    async fn build_snapshot(&mut self) -> Result<Snapshot<GroupTypes>, StorageError<u64>> {
        let data = std::mem::take(&mut self.data);
        self.snapshots.save(&self.meta, data.clone()).await?;
        Ok(Snapshot { meta: self.meta.clone(), snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<GroupTypes> for QueueMachine {
    type SnapshotBuilder = QueueSnapshots;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), StorageError<u64>> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Answer>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<GroupTypes>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut answers = Vec::new();
        let mut local = Vec::new();
        let mut counted_down = false;
        let mut dead = Vec::new();
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            let commands = match entry.payload {
                EntryPayload::Blank => Vec::new(),
                EntryPayload::Membership(membership) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), membership);
                    Vec::new()
                }
                EntryPayload::Normal(command) => match quorum_codec::decode_commands(&command.0) {
                    Ok(commands) => commands,
                    Err(error) => {
                        // Every replica refuses the same bytes alike, so they stay in step.
                        tracing::error!(queue = %self.name, index = entry.log_id.index, %error, "an entry is unreadable; skipped");
                        Vec::new()
                    }
                },
            };
            let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut entry_answers = Vec::with_capacity(commands.len());
            for command in commands {
                counted_down |= matches!(command, QuorumCommand::NodeDown { node } if node == self.node);
                let (answer, effects) = state.apply(command);
                entry_answers.push(answer);
                for effect in effects {
                    match effect {
                        QuorumEffect::Deliver { ref consumer, .. }
                            if consumer.node == self.node && consumer.incarnation == self.incarnation =>
                        {
                            local.push(effect);
                        }
                        QuorumEffect::Deliver { .. } => {}
                        QuorumEffect::DeadLetter { .. } => dead.push(effect),
                    }
                }
            }
            drop(state);
            answers.push(Answer(quorum_codec::encode_answers(&entry_answers)));
        }
        let machine = &*self;
        blocking(|| machine.deliver_here(local));
        if counted_down {
            self.check_out_again();
        }
        // The leader dead-letters, once (RabbitMQ's quorum queues' default, at most once: a
        // leader lost right after applying the entry loses the dead letter with it).
        let leading =
            self.raft.get().is_some_and(|raft| raft.metrics().borrow().state == openraft::ServerState::Leader);
        // The leader's timer loop stamps a new lease or backoff at once (followers only look).
        if leading && self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).has_unstamped_timers() {
            self.timers_changed.notify_one();
        }
        if leading && !dead.is_empty() {
            blocking(|| machine.dead_letter(dead));
        }
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> QueueSnapshots {
        self.snapshot_builder()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    /// A follower too far behind for the leader's log gets the leader's snapshot instead: the
    /// replica becomes it. What it says this node's consumers hold may include deliveries this
    /// node never carried out (they were decided in the entries the snapshot skips), so this
    /// node counts itself down in the group: its consumers' messages go back and the consumers
    /// are checked out again when that applies (`check_out_again`), redelivered, never lost.
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let data = snapshot.into_inner();
        let Some(replica) = QuorumQueue::decode_snapshot(&data) else {
            return Err(storage_error(format!("the snapshot of quorum queue '{}' is unreadable", self.name)));
        };
        self.snapshots.save(meta, data).await?;
        *self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = replica;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        tracing::info!(queue = %self.name, index = ?meta.last_log_id.map(|log_id| log_id.index), "replica installed from the leader's snapshot");
        if let Some(group) = self.core.upgrade().and_then(|core| core.quorum.get(&self.vhost, &self.name)) {
            group.submit(QuorumCommand::NodeDown { node: self.node }, None);
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<GroupTypes>>, StorageError<u64>> {
        Ok(self
            .snapshots
            .current()
            .map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data.to_vec())) }))
    }
}
