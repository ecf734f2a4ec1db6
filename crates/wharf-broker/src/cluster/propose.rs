//! Proposing a command to a group from any of its members: written on the leader directly, or
//! forwarded to the leader over the cluster's links by a follower (the metadata group on
//! [`super::SERVICE_META`], queue groups on [`super::SERVICE_QUEUE`]). A forwarded call names
//! its group (8 bytes, big-endian) and carries the command's bytes; the leader answers with the
//! entry's index and the state machine's answer once it is applied there.
//!
//! A command is sent again only when it certainly was not taken (the node asked was not the
//! leader, or the link to it was not up): one whose call timed out may have been committed, and
//! the caller is told so rather than risk it twice. A write on this node is bounded by the
//! caller's deadline too: openraft answers a waiting write when its entry is applied or
//! truncated here, and an entry this node appended as leader, that another leader then
//! committed and that a snapshot installed here covered, is neither, so the write would wait
//! for ever, and every command its proposer holds behind it (a `NodeDown` that returns a
//! consumer's messages among them) with it.

use super::ReplicationError;
use bytes::Bytes;
use openraft::Raft;
use openraft::error::{ClientWriteError, RaftError};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use wharf_cluster::{ClusterError, NodeId, Transport};
use wharf_raft::{Command, GroupTypes};

/// A committed and applied command: its index in the group's log and the state machine's answer.
#[derive(Debug)]
pub(crate) struct Proposed {
    pub index: u64,
    pub answer: Vec<u8>,
}

/// The leader's reply to a forwarded command.
#[derive(Debug, Serialize, Deserialize)]
enum ForwardReply {
    Proposed { index: u64, answer: Vec<u8> },
    NotLeader,
    Failed(String),
}

/// Proposes `command` to `raft`'s group, forwarding it to the leader on `service` if this node
/// is not the leader; gives up at `deadline`.
pub(crate) async fn propose(
    raft: &Raft<GroupTypes>,
    transport: &Transport,
    service: u16,
    group: u64,
    command: Vec<u8>,
    deadline: Instant,
) -> Result<Proposed, ReplicationError> {
    let node = transport.node_id();
    let mut forwarded: Option<Bytes> = None;
    loop {
        let within = deadline.saturating_duration_since(Instant::now());
        let Ok(written) = tokio::time::timeout(within, raft.client_write(Command(command.clone()))).await else {
            return Err(ReplicationError::Unanswered { leader: node });
        };
        let leader = match written {
            Ok(written) => return Ok(Proposed { index: written.log_id.index, answer: written.data.0 }),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => forward.leader_id,
            Err(error) => return Err(ReplicationError::Failed(error.to_string())),
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(ReplicationError::NoLeader { node });
        }
        let Some(leader) = leader.filter(|leader| *leader != node) else {
            let _ = raft.wait(Some(remaining)).metrics(|metrics| metrics.current_leader.is_some(), "a leader").await;
            continue;
        };
        let payload = forwarded
            .get_or_insert_with(|| {
                let mut payload = Vec::with_capacity(8 + command.len());
                payload.extend_from_slice(&group.to_be_bytes());
                payload.extend_from_slice(&command);
                Bytes::from(payload)
            })
            .clone();
        match transport.call_within(leader, service, payload, remaining).await {
            Ok(reply) => match serde_json::from_slice::<ForwardReply>(&reply) {
                Ok(ForwardReply::Proposed { index, answer }) => return Ok(Proposed { index, answer }),
                Ok(ForwardReply::NotLeader) => await_leader_change(raft, leader, deadline).await,
                Ok(ForwardReply::Failed(text)) => return Err(ReplicationError::Failed(text)),
                Err(error) => return Err(ReplicationError::Failed(format!("an unreadable reply: {error}"))),
            },
            // Not sent at all: try again once a leader is known again.
            Err(ClusterError::Unreachable { .. } | ClusterError::UnknownNode(_)) => {
                await_leader_change(raft, leader, deadline).await
            }
            Err(ClusterError::Timeout { .. } | ClusterError::Disconnected(_)) => {
                return Err(ReplicationError::Unanswered { leader });
            }
            Err(error) => return Err(ReplicationError::Failed(error.to_string())),
        }
    }
}

/// Waits (until `deadline`, and at most a quarter second) until this node's leader is another
/// than `old`: a leader that cannot be reached is usually about to be replaced.
async fn await_leader_change(raft: &Raft<GroupTypes>, old: NodeId, deadline: Instant) {
    let within = deadline.saturating_duration_since(Instant::now()).min(Duration::from_millis(250));
    let _ = raft
        .wait(Some(within))
        .metrics(|metrics| metrics.current_leader.is_some_and(|leader| leader != old), "another leader")
        .await;
}

/// The group a forwarded call names, and its command.
pub(crate) fn split_forwarded(payload: &[u8]) -> Result<(u64, &[u8]), String> {
    if payload.len() < 8 {
        return Err(format!("a forwarded command of {} bytes is too short", payload.len()));
    }
    let (group, command) = payload.split_at(8);
    let group = u64::from_be_bytes(group.try_into().map_err(|_| "no group id".to_owned())?);
    Ok((group, command))
}

/// The reply to a forwarded command this node will not write (it is handing its group over):
/// the sender waits for another leader and sends it there.
pub(crate) fn not_leader_reply() -> Result<Bytes, String> {
    serde_json::to_vec(&ForwardReply::NotLeader).map(Bytes::from).map_err(|error| error.to_string())
}

/// How long a forwarded command's write may wait here. The sender stops waiting for the answer
/// at its own deadline (at most this); the bound only keeps a write that would never be
/// answered (see the module's doc) from holding its task for ever.
const FORWARDED_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Writes a forwarded command on this node (the leader, if the sender was right) and answers.
pub(crate) async fn write_forwarded(raft: &Raft<GroupTypes>, command: &[u8]) -> Result<Bytes, String> {
    let written = tokio::time::timeout(FORWARDED_WRITE_TIMEOUT, raft.client_write(Command(command.to_vec()))).await;
    let reply = match written {
        Ok(Ok(written)) => ForwardReply::Proposed { index: written.log_id.index, answer: written.data.0 },
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => ForwardReply::NotLeader,
        Ok(Err(error)) => ForwardReply::Failed(error.to_string()),
        Err(_) => ForwardReply::Failed(format!(
            "not answered within {} s; it may or may not have been made",
            FORWARDED_WRITE_TIMEOUT.as_secs()
        )),
    };
    serde_json::to_vec(&reply).map(Bytes::from).map_err(|error| error.to_string())
}
