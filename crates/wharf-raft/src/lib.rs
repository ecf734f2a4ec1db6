//! `wharf-raft`: the Raft groups of a Wharf cluster (issue #19, `docs/design/20261205_replication.md`).
//!
//! Consensus is openraft's (0.9, its "storage v2" API); this crate owns what openraft leaves to
//! the application that is not the broker's business: where a group's log and snapshots live
//! and how they come back after a crash ([`GroupLog`], [`GroupSnapshots`], on `wharf-store`), and how its messages travel between
//! nodes ([`GroupNetwork`] out, [`Groups`] in, over `wharf-cluster`'s links), and what a group
//! looks like to an operator ([`GroupStatus`]). What a group replicates is opaque
//! here ([`Command`] bytes, [`Answer`] bytes): the metadata group's definitions and a quorum
//! queue's operations are the broker's to encode and apply.

mod log;
mod network;
mod status;

pub use log::{
    GroupLog, GroupLogReader, GroupSnapshotMeta, GroupSnapshots, RECORD_SNAPSHOT_PART, RaftStoreError,
    SNAPSHOT_PART_BYTES,
};
pub use network::{GroupId, GroupNetwork, GroupPeer, Groups, SERVICE_RAFT};
pub use status::GroupStatus;

use serde::{Deserialize, Serialize};
// The snapshots' type in `declare_raft_types!` (its default, named there unqualified).
use std::io::Cursor;

/// A command a group replicates: bytes whose meaning is the group's state machine's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command(pub Vec<u8>);

/// A state machine's answer to a command, returned to whoever proposed it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer(pub Vec<u8>);

openraft::declare_raft_types!(
    /// The types of every Wharf Raft group: node ids are the cluster's (`wharf-cluster`), nodes
    /// are known by address, snapshots are bytes in memory.
    pub GroupTypes:
        D = Command,
        R = Answer,
        NodeId = u64,
        Node = openraft::BasicNode,
);

/// A log entry of a group.
pub type GroupEntry = openraft::Entry<GroupTypes>;
/// A group's log id (term, leader, index).
pub type GroupLogId = openraft::LogId<u64>;
