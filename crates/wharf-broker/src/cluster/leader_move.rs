//! Moving a quorum queue's leader to another of its replicas (RabbitMQ's
//! `rabbitmq-queues transfer_leadership` for one queue): `POST
//! /api/queues/quorum/{vhost}/{name}/leader` with `{"node": N}`, `wharf admin replica leader
//! QUEUE NODE`. An admin moves leaders to spread the work of many queues over the nodes, or off
//! a node about to be restarted.
//!
//! openraft 0.9 has no leadership transfer, so the leader hands over the way Raft's own rules
//! allow: (1) it stops writing to the group (its proposer waits, forwarded commands are told to
//! look for the next leader, the writes under way finish); (2) it waits until the new leader's
//! replica has every entry, so that one can win the election, and stops its heartbeats; (3) it
//! asks that node to stand:
//! the node waits out the leader lease (a voter that heard from its leader within
//! [`ELECTION_TIMEOUT_MAX_MS`] refuses to vote for another) and starts an election, which it wins
//! before any other member's own election timer runs out (that timer is the lease plus a random
//! election timeout); (4) the old leader resumes, as a follower, and what waited is proposed to
//! the new leader. Publishes wait while the group changes hands (about two seconds); none is
//! lost or refused. If the node does not take over in time, the old leader resumes leading and
//! the request fails (503), to be asked again.

use super::quorum::{ELECTION_TIMEOUT_MAX_MS, QueueGroup};
use super::replicas::{ChangeKind, ChangeReply, ReplicaChange, SERVICE_REPLICAS};
use crate::core::Core;
use crate::manage::ManagementError;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use wharf_cluster::NodeId;

/// How long the new leader's replica may take to catch up once writes stopped.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(5);

/// Waited past the leader lease before standing (the last heartbeat may have reached a voter a
/// little after writes stopped).
const LEASE_MARGIN: Duration = Duration::from_millis(200);

/// How long the standing node waits to have won (one election, and one more if a voter still
/// refused).
const TAKE_OVER_TIMEOUT: Duration = Duration::from_secs(4);

impl Core {
    /// Makes `node` the leader of quorum queue `name`'s group (see the module doc); done at once
    /// if it leads already.
    pub(crate) async fn move_quorum_leader(
        self: &Arc<Core>,
        vhost: &str,
        name: &str,
        node: NodeId,
    ) -> Result<(), ManagementError> {
        if self.metadata_group().is_none() {
            return Err(ManagementError::BadRequest("this broker is not a cluster's node".into()));
        }
        let definition = super::quorum_declare::managed_record(&self.meta, vhost, name)?;
        if !definition.members.contains(&node) {
            return Err(ManagementError::BadRequest(format!(
                "node {node} holds no replica of queue '{name}' in vhost '{vhost}' (its replicas: {:?})",
                definition.members
            )));
        }
        let change = ReplicaChange { group: definition.group, node, kind: ChangeKind::Lead };
        self.change_group(definition.group, &definition.members, change).await
    }
}

/// Whether this node writes to a group (its proposer and the forwarded commands it takes), and
/// how many of those writes are under way: handing the group over closes it and waits for the
/// writes under way, so that none reaches the log (and renews the voters' lease) afterwards.
#[derive(Debug, Default)]
pub(crate) struct WriteGate {
    /// Closed, and writes under way.
    state: std::sync::Mutex<(bool, usize)>,
    opened: tokio::sync::Notify,
}

/// A write under way; counted until dropped.
pub(crate) struct Writing<'a> {
    gate: &'a WriteGate,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.gate.lock().1 -= 1;
    }
}

impl WriteGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, (bool, usize)> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A write, once the gate is open.
    pub(crate) async fn enter(&self) -> Writing<'_> {
        loop {
            // Registered before the look, so an opening in between is not missed.
            let opened = self.opened.notified();
            if let Some(writing) = self.try_enter() {
                return writing;
            }
            opened.await;
        }
    }

    /// A write, if the gate is open.
    pub(crate) fn try_enter(&self) -> Option<Writing<'_>> {
        let mut state = self.lock();
        if state.0 {
            return None;
        }
        state.1 += 1;
        Some(Writing { gate: self })
    }

    /// Closes the gate; false if it was closed already.
    fn close(&self) -> bool {
        let mut state = self.lock();
        !std::mem::replace(&mut state.0, true)
    }

    fn open(&self) {
        self.lock().0 = false;
        self.opened.notify_waiters();
    }

    fn under_way(&self) -> usize {
        self.lock().1
    }
}

/// Keeps a group's writes stopped (and, once set, its heartbeats) for as long as it lives.
struct Handing<'a> {
    group: &'a QueueGroup,
}

impl Drop for Handing<'_> {
    fn drop(&mut self) {
        self.group.raft().runtime_config().heartbeat(true);
        self.group.writes().open();
    }
}

/// On the group's leader: hands the group over to `target` (steps 1 to 4 of the module doc).
pub(super) async fn hand_over(core: &Arc<Core>, group: &Arc<QueueGroup>, target: NodeId) -> ChangeReply {
    let raft = group.raft();
    let metrics = raft.metrics().borrow().clone();
    if target == metrics.id {
        return ChangeReply::Done;
    }
    if !metrics.membership_config.membership().voter_ids().any(|voter| voter == target) {
        return ChangeReply::Refused(format!("node {target} is not a voting replica of queue '{}'", group.name));
    }
    let Some((transport, _)) = core.cluster_links.get() else {
        return ChangeReply::Failed("the cluster's links are not up".into());
    };
    if !group.writes().close() {
        return ChangeReply::Failed(format!("queue '{}' is being handed over already", group.name));
    }
    let handing = Handing { group };
    // The writes under way finish (each takes a commit at most) before the catch-up is judged.
    let writes_done = tokio::time::timeout(CATCH_UP_TIMEOUT, async {
        while group.writes().under_way() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    if writes_done.is_err() {
        return ChangeReply::Failed(format!("writes to queue '{}' did not finish", group.name));
    }
    let caught_up = raft
        .wait(Some(CATCH_UP_TIMEOUT))
        .metrics(
            |metrics| {
                let matched = metrics.replication.as_ref().and_then(|replication| replication.get(&target)).cloned();
                matched.flatten().map(|log_id| log_id.index) >= metrics.last_log_index
            },
            "the next leader has every entry",
        )
        .await;
    if caught_up.is_err() {
        return ChangeReply::Failed(format!("node {target}'s replica of queue '{}' did not catch up", group.name));
    }
    // Heartbeats stop only now, so the voters' lease and the target's wait start together:
    // the target stands well before any other member's own election timer runs out.
    raft.runtime_config().heartbeat(false);
    let request = ReplicaChange { group: group.group, node: target, kind: ChangeKind::Elect };
    let asked = match serde_json::to_vec(&request) {
        Ok(payload) => {
            let within = Duration::from_millis(ELECTION_TIMEOUT_MAX_MS) + LEASE_MARGIN + TAKE_OVER_TIMEOUT * 2;
            transport.call_within(target, SERVICE_REPLICAS, Bytes::from(payload), within).await.map(|_| ())
        }
        Err(error) => {
            drop(handing);
            return ChangeReply::Failed(error.to_string());
        }
    };
    // The target answers once it leads; this node learns it from the target's first append.
    let _ = raft
        .wait(Some(TAKE_OVER_TIMEOUT))
        .metrics(|metrics| metrics.current_leader == Some(target), "the target leading")
        .await;
    // Resumed either way: as a follower once the target won, or as the leader still.
    let leader = raft.metrics().borrow().current_leader;
    drop(handing);
    if leader == Some(target) {
        tracing::info!(queue = %group.name, node = target, "queue leader moved");
        return ChangeReply::Done;
    }
    let why = asked.err().map(|error| format!(" ({error})")).unwrap_or_default();
    ChangeReply::Failed(format!("node {target} did not take queue '{}' over{why}", group.name))
}

/// On the node the leader hands over to: waits out the leader lease, then stands for election
/// and waits to have won.
pub(super) async fn stand_for_election(group: &Arc<QueueGroup>) -> ChangeReply {
    let raft = group.raft();
    tokio::time::sleep(Duration::from_millis(ELECTION_TIMEOUT_MAX_MS) + LEASE_MARGIN).await;
    if let Err(error) = raft.trigger().elect().await {
        return ChangeReply::Failed(error.to_string());
    }
    let own = raft.metrics().borrow().id;
    let won = raft
        .wait(Some(TAKE_OVER_TIMEOUT))
        .metrics(
            |metrics| metrics.state == openraft::ServerState::Leader && metrics.current_leader == Some(own),
            "leading",
        )
        .await;
    match won {
        Ok(_) => ChangeReply::Done,
        Err(error) => ChangeReply::Failed(format!("the election was not won: {error}")),
    }
}
