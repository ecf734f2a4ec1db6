//! `wharf-raft`: the Raft groups of a Wharf cluster (issue #19, `docs/design/20261205_replication.md`).
//!
//! Consensus is openraft's (0.9, its "storage v2" API); this crate owns what openraft leaves to
//! the application that is not the broker's business: where a group's log and snapshots live
//! and how they come back after a crash ([`GroupLog`], [`GroupSnapshots`], on `wharf-store`), and how its messages travel between
//! nodes ([`GroupNetwork`] out, [`Groups`] in, over `wharf-cluster`'s links), and what a group
//! looks like to an operator ([`GroupStatus`]). What a group replicates is opaque
//! here ([`Command`] bytes, [`Answer`] bytes): the metadata group's definitions and a quorum
//! queue's operations are the broker's to encode and apply.

mod codec;
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
pub struct Command(#[serde(with = "base64_bytes")] pub Vec<u8>);

/// A state machine's answer to a command, returned to whoever proposed it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer(#[serde(with = "base64_bytes")] pub Vec<u8>);

/// A command's bytes in the JSON of Raft messages and log records: a base64 string (4 bytes
/// of JSON per 3 of command), not serde's default for bytes in JSON, an array of numbers (up
/// to 4 bytes of JSON per byte, and a number to format and parse for each), which made
/// encoding message bodies the larger part of a replicated publish's CPU. Arrays written by
/// earlier versions still read.
mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_any(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            formatter.write_str("bytes in base64, or an array of bytes")
        }

        fn visit_str<E: Error>(self, text: &str) -> Result<Vec<u8>, E> {
            STANDARD.decode(text).map_err(E::custom)
        }

        fn visit_bytes<E: Error>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
            Ok(bytes.to_vec())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut sequence: A) -> Result<Vec<u8>, A::Error> {
            let mut bytes = Vec::with_capacity(sequence.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(byte) = sequence.next_element::<u8>()? {
                bytes.push(byte);
            }
            Ok(bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn commands_travel_as_base64_and_old_arrays_still_read() {
        let command = Command(vec![0, 1, 2, 250, 255]);
        let json = serde_json::to_string(&command).unwrap();
        assert_eq!(json, "\"AAEC+v8=\"");
        assert_eq!(serde_json::from_str::<Command>(&json).unwrap(), command);
        assert_eq!(serde_json::from_str::<Command>("[0,1,2,250,255]").unwrap(), command);
        assert!(serde_json::from_str::<Command>("\"not base64!\"").is_err());
        assert!(serde_json::from_str::<Answer>("[256]").is_err());
    }
}

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
