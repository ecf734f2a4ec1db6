//! Raft's messages between nodes, over the cluster's links (`wharf-cluster`): the sending side
//! ([`GroupNetwork`], openraft's network factory) and the receiving side ([`Groups`], which hands
//! each message to its group's [`openraft::Raft`]).
//!
//! Every Raft message of every group is one call on [`SERVICE_RAFT`]: its payload is the group's
//! id (8 bytes, big-endian), the message's kind (one byte), then the message: AppendEntries in
//! `codec.rs`'s binary encoding (it carries the message bodies), votes and snapshots as JSON;
//! the answer is the group's `Result` as JSON. A node's links are shared by all its groups.

use crate::GroupTypes;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, Raft};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use wharf_cluster::{ClusterError, Transport};

/// The cluster service number of Raft's messages.
pub const SERVICE_RAFT: u16 = 1;

/// AppendEntries as JSON (sent by earlier versions; still read).
const KIND_APPEND: u8 = 1;
const KIND_VOTE: u8 = 2;
const KIND_SNAPSHOT: u8 = 3;
/// AppendEntries in `codec.rs`'s encoding.
const KIND_APPEND_BINARY: u8 = 4;

/// A group's id: the same on every node (the metadata group is 0).
pub type GroupId = u64;

/// A message's payload: the group, the kind, then `body` writes the message.
fn encode(
    group: GroupId,
    kind: u8,
    body: impl FnOnce(&mut Vec<u8>) -> Result<(), serde_json::Error>,
) -> Result<Vec<u8>, serde_json::Error> {
    let mut payload = Vec::with_capacity(64);
    payload.extend_from_slice(&group.to_be_bytes());
    payload.push(kind);
    body(&mut payload)?;
    Ok(payload)
}

/// A message's payload with the message as JSON.
fn encode_json(group: GroupId, kind: u8, message: &impl Serialize) -> Result<Vec<u8>, serde_json::Error> {
    encode(group, kind, |payload| serde_json::to_writer(payload, message))
}

/// Sends one group's messages to the other nodes.
#[derive(Debug, Clone)]
pub struct GroupNetwork {
    transport: Arc<Transport>,
    group: GroupId,
}

impl GroupNetwork {
    /// The network of group `group` over `transport`.
    pub fn new(transport: Arc<Transport>, group: GroupId) -> GroupNetwork {
        GroupNetwork { transport, group }
    }
}

/// One group's messages to one node.
#[derive(Debug, Clone)]
pub struct GroupPeer {
    transport: Arc<Transport>,
    group: GroupId,
    target: u64,
}

impl RaftNetworkFactory<GroupTypes> for GroupNetwork {
    type Network = GroupPeer;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> GroupPeer {
        GroupPeer { transport: Arc::clone(&self.transport), group: self.group, target }
    }
}

impl GroupPeer {
    /// One call: the message's `payload` out (or why it could not be encoded), the group's
    /// `Result` back.
    async fn call<Answer, Failure>(
        &self,
        payload: Result<Vec<u8>, serde_json::Error>,
        option: &RPCOption,
    ) -> Result<Answer, RPCError<u64, BasicNode, RaftError<u64, Failure>>>
    where
        Answer: DeserializeOwned,
        Failure: std::error::Error + DeserializeOwned,
    {
        let payload = payload.map_err(|error| RPCError::Network(NetworkError::new(&error)))?;
        // Within openraft's own deadline (hard_ttl), so this call ends first and its link
        // records the failure.
        let timeout = option.soft_ttl();
        let called = self.transport.call_within(self.target, SERVICE_RAFT, payload.into(), timeout).await;
        let answer = match called {
            Ok(answer) => answer,
            Err(error @ (ClusterError::Unreachable { .. } | ClusterError::UnknownNode(_) | ClusterError::Stopped)) => {
                return Err(RPCError::Unreachable(Unreachable::new(&error)));
            }
            // Resending the same batch cannot help: openraft is told to send fewer entries.
            Err(ClusterError::FrameTooLarge { .. }) => {
                return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(1)));
            }
            Err(error) => return Err(RPCError::Network(NetworkError::new(&error))),
        };
        let result: Result<Answer, RaftError<u64, Failure>> =
            serde_json::from_slice(&answer).map_err(|error| RPCError::Network(NetworkError::new(&error)))?;
        result.map_err(|error| RPCError::RemoteError(RemoteError::new(self.target, error)))
    }
}

impl RaftNetwork<GroupTypes> for GroupPeer {
    async fn append_entries(
        &mut self,
        request: AppendEntriesRequest<GroupTypes>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        let payload = encode(self.group, KIND_APPEND_BINARY, |payload| crate::codec::encode_append(&request, payload));
        self.call(payload, &option).await
    }

    async fn install_snapshot(
        &mut self,
        request: InstallSnapshotRequest<GroupTypes>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>> {
        self.call(encode_json(self.group, KIND_SNAPSHOT, &request), &option).await
    }

    async fn vote(
        &mut self,
        request: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(encode_json(self.group, KIND_VOTE, &request), &option).await
    }
}

/// The groups this node is a member of, by id: where Raft messages from other nodes go.
#[derive(Default, Clone)]
pub struct Groups {
    groups: Arc<RwLock<HashMap<GroupId, Raft<GroupTypes>>>>,
}

impl std::fmt::Debug for Groups {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let groups = self.groups.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        formatter.debug_struct("Groups").field("groups", &groups.keys().collect::<Vec<_>>()).finish()
    }
}

impl Groups {
    /// Messages for `group` go to `raft` from now on.
    pub fn insert(&self, group: GroupId, raft: Raft<GroupTypes>) {
        self.groups.write().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(group, raft);
    }

    /// Messages for `group` are refused from now on.
    pub fn remove(&self, group: GroupId) -> Option<Raft<GroupTypes>> {
        self.groups.write().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&group)
    }

    fn get(&self, group: GroupId) -> Option<Raft<GroupTypes>> {
        self.groups.read().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&group).cloned()
    }

    /// Handles one [`SERVICE_RAFT`] call's payload; the answer's payload, or why there is none.
    pub async fn handle(&self, payload: &[u8]) -> Result<Vec<u8>, String> {
        if payload.len() < 9 {
            return Err(format!("a Raft message of {} bytes is too short", payload.len()));
        }
        let group = u64::from_be_bytes(payload[..8].try_into().map_err(|_| "no group id".to_owned())?);
        let (kind, message) = (payload[8], &payload[9..]);
        let Some(raft) = self.get(group) else { return Err(format!("this node is not in group {group}")) };
        let parse_error = |error: serde_json::Error| format!("a Raft message for group {group} is unreadable: {error}");
        let answer = match kind {
            KIND_APPEND_BINARY => {
                let request = crate::codec::decode_append(message)
                    .map_err(|error| format!("a Raft message for group {group} is unreadable: {error}"))?;
                serde_json::to_vec(&raft.append_entries(request).await)
            }
            KIND_APPEND => {
                serde_json::to_vec(&raft.append_entries(serde_json::from_slice(message).map_err(parse_error)?).await)
            }
            KIND_VOTE => serde_json::to_vec(&raft.vote(serde_json::from_slice(message).map_err(parse_error)?).await),
            KIND_SNAPSHOT => {
                serde_json::to_vec(&raft.install_snapshot(serde_json::from_slice(message).map_err(parse_error)?).await)
            }
            other => return Err(format!("Raft message kind {other} is unknown")),
        };
        answer.map_err(|error| format!("a Raft answer could not be encoded: {error}"))
    }
}
