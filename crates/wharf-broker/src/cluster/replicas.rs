//! A quorum queue's replicas changed at run time (RabbitMQ's `rabbitmq-queues add_member` and
//! `delete_member`): `POST /api/queues/quorum/{vhost}/{name}/replicas/add` and `…/delete` with
//! `{"node": N}`, `wharf admin replica add|remove QUEUE NODE`.
//!
//! Adding node N: (1) the metadata group records the longer member list (`QuorumMembers`):
//! every node updates its record, and N creates a log for its replica and starts its member of
//! the group without initialising it (it only joins); (2) the group's leader adds N as a learner,
//! waits until it has caught up (from the log, or from a snapshot), and makes it a voter.
//! Removing N: (1) the group's leader drops N from the voters and counts N's consumers down;
//! (2) the metadata group records the shorter list, and N stops its member and deletes its log.
//! Each step done again changes nothing, so a change cut short (a leader lost midway) is
//! finished by asking again. A replica is not removed while consumers are attached through its
//! node (they are served from that replica), nor the last one.

use super::{MetaAnswer, MetaCommand};
use crate::core::Core;
use crate::manage::ManagementError;
use bytes::Bytes;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wharf_cluster::NodeId;
use wharf_model::QuorumCommand;

/// The cluster service that takes a replica change to a queue group's leader.
pub(crate) const SERVICE_REPLICAS: u16 = 5;

/// How long a change may take, most of it a new replica catching up (within `wharf admin`'s
/// 60 s per request).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(45);

/// What is asked of a queue group's member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum ChangeKind {
    /// (To the leader) add `node`'s replica.
    Add,
    /// (To the leader) remove `node`'s replica.
    Remove,
    /// (To the leader) hand the group over to `node` (`leader_move.rs`).
    Lead,
    /// (To `node`, from the leader handing over) stand for election.
    Elect,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct ReplicaChange {
    pub group: u64,
    pub node: NodeId,
    pub kind: ChangeKind,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) enum ChangeReply {
    Done,
    NotLeader(Option<NodeId>),
    Refused(String),
    Failed(String),
}

impl Core {
    /// Adds a replica of quorum queue `name` on `node`, or removes it (see the module doc).
    pub(crate) async fn change_quorum_replica(
        self: &Arc<Core>,
        vhost: &str,
        name: &str,
        node: NodeId,
        add: bool,
    ) -> Result<(), ManagementError> {
        let Some(metadata) = self.metadata_group().cloned() else {
            return Err(ManagementError::BadRequest("this broker is not a cluster's node".into()));
        };
        let definition = super::quorum_declare::managed_record(&self.meta, vhost, name)?;
        let mut members = definition.members.clone();
        let set_members = |members: Vec<NodeId>| {
            let command = MetaCommand::QuorumMembers { vhost: vhost.to_owned(), name: name.to_owned(), members };
            let metadata = Arc::clone(&metadata);
            async move {
                match metadata.propose(command).await {
                    Ok(answer) => answer.into_model().map_err(ManagementError::from),
                    Err(error) => Err(ManagementError::Unavailable(error.to_string())),
                }
            }
        };
        if add {
            if !metadata.status().voters.contains(&node) {
                return Err(ManagementError::BadRequest(format!("node {node} is not a member of the cluster")));
            }
            if !members.contains(&node) {
                members.push(node);
                set_members(members.clone()).await?;
            }
            let change = ReplicaChange { group: definition.group, node, kind: ChangeKind::Add };
            self.change_group(definition.group, &members, change).await
        } else {
            if !members.contains(&node) {
                return Err(ManagementError::BadRequest(format!(
                    "node {node} holds no replica of queue '{name}' in vhost '{vhost}'"
                )));
            }
            if members.len() == 1 {
                return Err(ManagementError::BadRequest(format!(
                    "node {node} holds the only replica of queue '{name}' in vhost '{vhost}'"
                )));
            }
            let change = ReplicaChange { group: definition.group, node, kind: ChangeKind::Remove };
            self.change_group(definition.group, &members, change).await?;
            members.retain(|member| *member != node);
            set_members(members).await
        }
    }

    /// Has the group's leader make `change`, asking the members in turn until one leads.
    pub(super) async fn change_group(
        self: &Arc<Core>,
        group: u64,
        members: &[NodeId],
        change: ReplicaChange,
    ) -> Result<(), ManagementError> {
        let Some((transport, _)) = self.cluster_links.get() else {
            return Err(ManagementError::Unavailable("the cluster's links are not up".into()));
        };
        let own = transport.node_id();
        let candidates: Vec<NodeId> =
            members.iter().copied().filter(|member| *member != change.node || change.kind != ChangeKind::Add).collect();
        let deadline = Instant::now() + CHANGE_TIMEOUT;
        let mut next: Option<NodeId> = None;
        let mut turn = 0usize;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() || candidates.is_empty() {
                return Err(ManagementError::Unavailable(format!(
                    "no leader of the queue's group made the change within {} s; ask again to finish it",
                    CHANGE_TIMEOUT.as_secs()
                )));
            }
            let target = next.take().unwrap_or_else(|| {
                turn += 1;
                candidates[turn % candidates.len()]
            });
            let reply = if target == own {
                self.change_group_here(&change).await
            } else {
                let payload =
                    serde_json::to_vec(&change).map_err(|error| ManagementError::Unavailable(error.to_string()))?;
                match transport.call_within(target, SERVICE_REPLICAS, Bytes::from(payload), remaining).await {
                    Ok(reply) => serde_json::from_slice(&reply)
                        .unwrap_or_else(|error| ChangeReply::Failed(format!("an unreadable reply: {error}"))),
                    Err(error) => ChangeReply::Failed(error.to_string()),
                }
            };
            match reply {
                ChangeReply::Done => return Ok(()),
                ChangeReply::Refused(text) => return Err(ManagementError::BadRequest(text)),
                ChangeReply::NotLeader(leader) => next = leader.filter(|leader| candidates.contains(leader)),
                // Another member may lead, or this one again after an election.
                ChangeReply::Failed(text) => {
                    tracing::debug!(group, target, error = %text, "a replica change was not made; asking another member");
                    tokio::time::sleep(Duration::from_millis(50).min(remaining)).await;
                }
            }
        }
    }

    /// Answers a [`SERVICE_REPLICAS`] call.
    pub(crate) async fn handle_replica_change(self: &Arc<Core>, payload: &[u8]) -> Result<Bytes, String> {
        let change: ReplicaChange =
            serde_json::from_slice(payload).map_err(|error| format!("an unreadable replica change: {error}"))?;
        let reply = self.change_group_here(&change).await;
        serde_json::to_vec(&reply).map(Bytes::from).map_err(|error| error.to_string())
    }

    /// Makes the change if this node leads the group (or stands for election, asked to).
    async fn change_group_here(self: &Arc<Core>, change: &ReplicaChange) -> ChangeReply {
        let Some(group) = self.quorum.by_group(change.group) else {
            return ChangeReply::Failed(format!("this node holds no replica of group {}", change.group));
        };
        if change.kind == ChangeKind::Elect {
            return super::leader_move::stand_for_election(&group).await;
        }
        let raft = group.raft();
        let metrics = raft.metrics().borrow().clone();
        if metrics.state != openraft::ServerState::Leader {
            return ChangeReply::NotLeader(metrics.current_leader);
        }
        if change.kind == ChangeKind::Lead {
            return super::leader_move::hand_over(self, &group, change.node).await;
        }
        let membership = metrics.membership_config.membership().clone();
        let node = change.node;
        let outcome = if change.kind == ChangeKind::Add {
            if membership.voter_ids().any(|voter| voter == node) {
                return ChangeReply::Done;
            }
            let learner =
                tokio::time::timeout(CHANGE_TIMEOUT, raft.add_learner(node, BasicNode::new(node.to_string()), true))
                    .await;
            match learner {
                Err(_) => {
                    return ChangeReply::Failed(format!("node {node}'s replica did not catch up in time"));
                }
                Ok(Err(error)) => Err(error),
                Ok(Ok(_)) => raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([node])), false).await,
            }
        } else {
            if !membership.nodes().any(|(member, _)| *member == node) {
                return ChangeReply::Done;
            }
            let consumers = group.consumers_on(node);
            if consumers > 0 {
                return ChangeReply::Refused(format!(
                    "{consumers} consumers of queue '{}' are attached through node {node}, served from its replica: cancel them (or consume through another node) first",
                    group.name
                ));
            }
            let removal = if membership.voter_ids().any(|voter| voter == node) {
                ChangeMembers::RemoveVoters(BTreeSet::from([node]))
            } else {
                ChangeMembers::RemoveNodes(BTreeSet::from([node]))
            };
            let removed = raft.change_membership(removal, false).await;
            if removed.is_ok() {
                // Whatever its consumers held goes back (none are attached, but one may have
                // been between the check and the change).
                group.submit(QuorumCommand::NodeDown { node }, None);
            }
            removed
        };
        match outcome {
            Ok(_) => ChangeReply::Done,
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                ChangeReply::NotLeader(forward.leader_id)
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(error))) => {
                ChangeReply::Refused(error.to_string())
            }
            Err(error) => ChangeReply::Failed(error.to_string()),
        }
    }

    /// Carries out `QuorumMembers` on this node (the metadata group's state machine; blocking):
    /// the record's member list becomes `members`; a node now in it creates its replica and
    /// joins the group, a node no longer in it stops its member and deletes its log.
    pub(crate) fn set_quorum_members_here(self: &Arc<Core>, vhost: &str, name: &str, members: &[NodeId]) -> MetaAnswer {
        let key = super::quorum_declare::key(vhost, name);
        let Some(mut definition) = self.meta.get(&key).and_then(|value| super::quorum_declare::decode(&value)) else {
            return MetaAnswer::NotFound(format!("no quorum queue '{name}' in vhost '{vhost}'"));
        };
        let own = self.config.cluster.as_ref().map_or(0, |cluster| cluster.node_id);
        let (was, is) = (definition.members.contains(&own), members.contains(&own));
        definition.members = members.to_vec();
        let mut stop_log = None;
        let mut new_log = None;
        if is && !was && definition.log.is_none() {
            match self.store.create_log().and_then(|ticket| ticket.wait()) {
                Ok(log) => {
                    definition.log = Some(log.0);
                    definition.joined = true;
                    new_log = Some(log);
                }
                Err(error) => {
                    self.store_failed(&error);
                    return MetaAnswer::Failed(error.to_string());
                }
            }
        } else if was && !is {
            stop_log = definition.log.take();
            definition.joined = false;
        }
        let written = super::quorum_declare::encode(&definition).and_then(|value| {
            self.meta.put(&key, &value).map_err(|error| {
                self.store_failed(&error);
                error.to_string()
            })
        });
        if let Err(error) = written {
            return MetaAnswer::Failed(error);
        }
        if was && !is {
            self.stop_quorum_group(vhost, name, stop_log);
        } else if let Some(group) = self.quorum.get(vhost, name) {
            group.set_members(members);
        }
        if let Some(log) = new_log {
            let opened = wharf_raft::GroupLog::open(&self.store, log, &wharf_store::Recovered::default());
            let started = match opened {
                Ok(group_log) => {
                    let settings = definition.settings.clone().into();
                    self.start_quorum_group(vhost, name, &definition, settings, group_log).map_err(|error| error.text)
                }
                Err(error) => Err(error.to_string()),
            };
            if let Err(error) = started {
                tracing::error!(queue = name, %error, "a new replica's group did not start");
                return MetaAnswer::Failed(error);
            }
        }
        MetaAnswer::Done { created: false }
    }
}
