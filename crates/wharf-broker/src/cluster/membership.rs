//! Nodes added to and removed from a running cluster (`PUT` and `DELETE
//! /api/cluster/members/{node}`, `wharf admin cluster add|remove`), through the metadata group's
//! membership (openraft's joint consensus).
//!
//! Adding node N at ADDR: N is started with `--cluster-join` (it waits to be added instead of
//! forming a group of its own) and `--cluster-node` naming the members and itself; any node is
//! asked, and the metadata group's leader (a follower forwards the request, cluster service
//! [`SERVICE_MEMBERS`]) links to N, adds it as a learner, waits until it has caught up with the
//! log (every definition reaches it by replay), then makes it a voter. Removing N makes the
//! group drop it. Every node follows the group's membership as openraft reports it: it links to a
//! node added and forgets one removed ([`follow_membership`]), and after a restart it links to
//! every member of the membership it recovered, so a node added at run time needs no change to the
//! others' `--cluster-node` flags.
//!
//! Quorum queues keep their replicas: a node added holds none of the queues declared before it
//! joined (as in RabbitMQ, where `rabbitmq-queues grow` adds them), and new queues declared on
//! "every node" include it; a node that holds a replica cannot be removed (its queues would lose
//! one replica of their majority without anyone deciding it), and the refusal names them.

use super::MetaGroup;
use crate::core::Core;
use bytes::Bytes;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wharf_cluster::{ClusterError, NodeId, Transport};

/// The cluster service that takes membership changes forwarded to the metadata group's leader.
pub(crate) const SERVICE_MEMBERS: u16 = 4;

/// How long adding a node may take, most of it the new node catching up with the log (within
/// `wharf admin`'s 60 s per request).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(45);

/// A change asked for: `address` to add (or move) `node`, none to remove it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MemberChange {
    node: NodeId,
    address: Option<String>,
}

/// What the leader answers.
#[derive(Debug, Serialize, Deserialize)]
enum ChangeReply {
    Done,
    NotLeader,
    Refused(String),
    Failed(String),
}

/// Why a membership change was not made.
#[derive(Debug)]
pub(crate) enum MemberChangeError {
    /// The request cannot be carried out as asked (an unknown node, one holding replicas).
    Refused(String),
    /// No leader could make it now, or it did not finish in time.
    Unavailable(String),
}

impl MetaGroup {
    /// Adds `node` at `address`, or removes it (`None`); asked on any node.
    pub(crate) async fn change_member(
        &self,
        core: &Core,
        node: NodeId,
        address: Option<String>,
    ) -> Result<(), MemberChangeError> {
        if node == 0 {
            return Err(MemberChangeError::Refused("node ids start at 1".into()));
        }
        if let Some(address) = &address {
            wharf_cluster::parse_cluster_node(&format!("{node}={address}"))
                .map_err(|error| MemberChangeError::Refused(error.to_string()))?;
        }
        let change = MemberChange { node, address };
        let deadline = Instant::now() + CHANGE_TIMEOUT;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(MemberChangeError::Unavailable(
                    "no leader of the metadata group made the change in time".into(),
                ));
            }
            let leader = self.raft().metrics().borrow().current_leader;
            let reply = match leader {
                Some(leader) if leader == self.node_id => self.change_here(core, &change).await,
                Some(leader) => {
                    let payload = serde_json::to_vec(&change)
                        .map_err(|error| MemberChangeError::Unavailable(error.to_string()))?;
                    match self.transport().call_within(leader, SERVICE_MEMBERS, Bytes::from(payload), remaining).await {
                        Ok(reply) => serde_json::from_slice(&reply)
                            .unwrap_or_else(|error| ChangeReply::Failed(format!("an unreadable reply: {error}"))),
                        Err(ClusterError::Unreachable { .. }) => ChangeReply::NotLeader,
                        Err(error) => ChangeReply::Failed(error.to_string()),
                    }
                }
                None => ChangeReply::NotLeader,
            };
            match reply {
                ChangeReply::Done => return Ok(()),
                ChangeReply::Refused(text) => return Err(MemberChangeError::Refused(text)),
                ChangeReply::Failed(text) => return Err(MemberChangeError::Unavailable(text)),
                ChangeReply::NotLeader => {
                    let within = remaining.min(Duration::from_millis(250));
                    let _ = self
                        .raft()
                        .wait(Some(within))
                        .metrics(
                            |metrics| metrics.current_leader.is_some() && metrics.current_leader != leader,
                            "a leader",
                        )
                        .await;
                }
            }
        }
    }

    /// Answers a [`SERVICE_MEMBERS`] call: a change forwarded to this node as the leader.
    pub(crate) async fn handle_member_change(&self, core: &Core, payload: &[u8]) -> Result<Bytes, String> {
        let change: MemberChange =
            serde_json::from_slice(payload).map_err(|error| format!("an unreadable membership change: {error}"))?;
        let reply = self.change_here(core, &change).await;
        serde_json::to_vec(&reply).map(Bytes::from).map_err(|error| error.to_string())
    }

    /// Makes the change as the leader.
    async fn change_here(&self, core: &Core, change: &MemberChange) -> ChangeReply {
        let membership = self.raft().metrics().borrow().membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let node = change.node;
        let outcome = match &change.address {
            Some(address) => {
                if voters.contains(&node) {
                    return ChangeReply::Done;
                }
                if node != self.node_id {
                    link_to(self.transport(), node, address).await;
                }
                let learner = tokio::time::timeout(
                    CHANGE_TIMEOUT,
                    self.raft().add_learner(node, BasicNode::new(address.clone()), true),
                )
                .await;
                match learner {
                    Err(_) => {
                        return ChangeReply::Failed(format!(
                            "node {node} was added as a learner but did not catch up within {} s: is it running, with --cluster-join, and reachable at {address}? Ask again to finish",
                            CHANGE_TIMEOUT.as_secs()
                        ));
                    }
                    Ok(Err(error)) => Err(error),
                    Ok(Ok(_)) => {
                        self.raft().change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([node])), false).await
                    }
                }
            }
            None => {
                if !membership.nodes().any(|(member, _)| *member == node) {
                    return ChangeReply::Refused(format!("node {node} is not a member of the cluster"));
                }
                if voters.len() == 1 && voters.contains(&node) {
                    return ChangeReply::Refused(format!("node {node} is the cluster's last voter"));
                }
                let queues = super::quorum_declare::queues_on(&core.meta, node);
                if !queues.is_empty() {
                    return ChangeReply::Refused(format!(
                        "node {node} holds a replica of quorum queues {}: delete them (or move their replicas) first",
                        queues.join(", ")
                    ));
                }
                let removal = if voters.contains(&node) {
                    ChangeMembers::RemoveVoters(BTreeSet::from([node]))
                } else {
                    ChangeMembers::RemoveNodes(BTreeSet::from([node]))
                };
                self.raft().change_membership(removal, false).await
            }
        };
        match outcome {
            Ok(_) => ChangeReply::Done,
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => ChangeReply::NotLeader,
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(error))) => {
                ChangeReply::Refused(error.to_string())
            }
            Err(error) => ChangeReply::Failed(error.to_string()),
        }
    }
}

/// Links this node to `node` at `address`, unless it already is (a link replaced is cut).
pub(crate) async fn link_to(transport: &Transport, node: NodeId, address: &str) {
    let known = transport.members().into_iter().any(|member| member.node == node && member.address == address);
    if !known && let Err(error) = transport.add_member(node, address.to_owned()).await {
        tracing::warn!(node, %error, "a member could not be linked to");
    }
}

/// Keeps this node's links in line with the metadata group's membership, as openraft reports
/// it (recovered at start, then each change as it is appended): links to every member it does
/// not know (a node added at run time), forgets a node the membership no longer holds (one
/// removed). Ends when the group stops.
pub(crate) async fn follow_membership(
    mut metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, BasicNode>>,
    transport: Arc<Transport>,
) {
    let own = transport.node_id();
    let mut known: Vec<(NodeId, String)> = Vec::new();
    loop {
        let now = super::machine::nodes_of(metrics.borrow_and_update().membership_config.membership());
        if now != known {
            // Only a node this one has no link to at all: a member it knows keeps the address
            // its own flags give (which may differ from the leader's view behind a proxy or NAT).
            let linked: Vec<NodeId> = transport.members().into_iter().map(|member| member.node).collect();
            for (node, address) in now.iter().filter(|(node, _)| *node != own && !linked.contains(node)) {
                link_to(&transport, *node, address).await;
            }
            for (node, _) in known.iter().filter(|(node, _)| *node != own && !now.iter().any(|(kept, _)| kept == node))
            {
                tracing::info!(node, "a node left the cluster; its link is closed");
                let _ = transport.remove_member(*node).await;
            }
            known = now;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
