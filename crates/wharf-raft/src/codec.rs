//! The binary encoding of a group's log entries, in its log's records and in AppendEntries
//! messages: what a replicated publish's CPU is mostly spent on is getting its entry's bytes
//! from the leader's log to the followers' logs, and JSON made that a format, an escape scan and
//! a base64 pass over every message body, once for the log and once more for each follower.
//! Here a body is copied as it is.
//!
//! An entry is its payload's kind (one byte: [`BLANK`], [`NORMAL`], [`MEMBERSHIP`]), its log id
//! (term, leader node and index, 8 bytes each, big-endian), then the payload: a normal entry's
//! command bytes as they are, a membership entry's membership as JSON (rare, and openraft's
//! type). An AppendEntries request is the vote (term, node, committed), the previous and
//! committed log ids (a presence byte, then the three numbers), the number of entries (4 bytes),
//! then each entry with its length (4 bytes) first. Every length and count read is checked
//! against what is left, so damaged bytes are refused, never a panic or a huge allocation.

use crate::{Command, GroupEntry, GroupLogId, GroupTypes};
use openraft::raft::AppendEntriesRequest;
use openraft::{CommittedLeaderId, EntryPayload, LeaderId, LogId, Vote};

const BLANK: u8 = 1;
const NORMAL: u8 = 2;
const MEMBERSHIP: u8 = 3;

/// An entry's bytes after its kind and log id.
const ENTRY_HEADER_BYTES: usize = 1 + 24;

/// Appends `entry`'s encoding to `out`.
pub(crate) fn encode_entry(entry: &GroupEntry, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    let kind = match &entry.payload {
        EntryPayload::Blank => BLANK,
        EntryPayload::Normal(_) => NORMAL,
        EntryPayload::Membership(_) => MEMBERSHIP,
    };
    out.push(kind);
    put_log_id(out, &entry.log_id);
    match &entry.payload {
        EntryPayload::Blank => {}
        EntryPayload::Normal(command) => out.extend_from_slice(&command.0),
        EntryPayload::Membership(membership) => serde_json::to_writer(&mut *out, membership)?,
    }
    Ok(())
}

/// About how many bytes `entry` encodes to: exact for a normal entry, a guess for the rare
/// membership entry.
fn encoded_bytes_hint(entry: &GroupEntry) -> usize {
    ENTRY_HEADER_BYTES
        + match &entry.payload {
            EntryPayload::Normal(command) => command.0.len(),
            _ => 64,
        }
}

/// The bytes of `entry` alone.
pub(crate) fn entry_bytes(entry: &GroupEntry) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(encoded_bytes_hint(entry));
    encode_entry(entry, &mut out)?;
    Ok(out)
}

/// The entry `bytes` encode.
pub(crate) fn decode_entry(bytes: &[u8]) -> Result<GroupEntry, String> {
    let mut reader = Reader(bytes);
    let kind = reader.u8("entry kind")?;
    let log_id = reader.log_id()?;
    let rest = reader.0;
    let payload = match kind {
        BLANK if rest.is_empty() => EntryPayload::Blank,
        BLANK => return Err(format!("a blank entry carries {} bytes", rest.len())),
        NORMAL => EntryPayload::Normal(Command(rest.to_vec())),
        MEMBERSHIP => EntryPayload::Membership(
            serde_json::from_slice(rest).map_err(|error| format!("a membership entry is unreadable: {error}"))?,
        ),
        other => return Err(format!("entry kind {other} is unknown")),
    };
    Ok(GroupEntry { log_id, payload })
}

/// Appends an AppendEntries request's encoding to `out`.
pub(crate) fn encode_append(
    request: &AppendEntriesRequest<GroupTypes>,
    out: &mut Vec<u8>,
) -> Result<(), serde_json::Error> {
    let body_bytes: usize = request.entries.iter().map(|entry| 4 + encoded_bytes_hint(entry)).sum();
    out.reserve(64 + body_bytes);
    out.extend_from_slice(&request.vote.leader_id.term.to_be_bytes());
    out.extend_from_slice(&request.vote.leader_id.node_id.to_be_bytes());
    out.push(u8::from(request.vote.committed));
    put_optional_log_id(out, request.prev_log_id.as_ref());
    put_optional_log_id(out, request.leader_commit.as_ref());
    out.extend_from_slice(&(request.entries.len() as u32).to_be_bytes());
    for entry in &request.entries {
        let length_at = out.len();
        out.extend_from_slice(&[0; 4]);
        encode_entry(entry, out)?;
        let length = (out.len() - length_at - 4) as u32;
        out[length_at..length_at + 4].copy_from_slice(&length.to_be_bytes());
    }
    Ok(())
}

/// The AppendEntries request `bytes` encode.
pub(crate) fn decode_append(bytes: &[u8]) -> Result<AppendEntriesRequest<GroupTypes>, String> {
    let mut reader = Reader(bytes);
    let term = reader.u64("vote term")?;
    let node_id = reader.u64("vote node")?;
    let committed = match reader.u8("vote committed")? {
        0 => false,
        1 => true,
        other => return Err(format!("vote committed is {other}, not 0 or 1")),
    };
    let vote = Vote { leader_id: LeaderId { term, node_id }, committed };
    let prev_log_id = reader.optional_log_id()?;
    let leader_commit = reader.optional_log_id()?;
    let count = reader.u32("entry count")? as usize;
    // Each entry takes at least its length and header, so a count past what is left is damage.
    if count > reader.0.len() / (4 + ENTRY_HEADER_BYTES) {
        return Err(format!("{count} entries cannot fit in {} bytes", reader.0.len()));
    }
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let length = reader.u32("entry length")? as usize;
        entries.push(decode_entry(reader.take(length, "entry")?)?);
    }
    if !reader.0.is_empty() {
        return Err(format!("{} bytes after the last entry", reader.0.len()));
    }
    Ok(AppendEntriesRequest { vote, prev_log_id, entries, leader_commit })
}

fn put_log_id(out: &mut Vec<u8>, log_id: &GroupLogId) {
    out.extend_from_slice(&log_id.leader_id.term.to_be_bytes());
    out.extend_from_slice(&log_id.leader_id.node_id.to_be_bytes());
    out.extend_from_slice(&log_id.index.to_be_bytes());
}

fn put_optional_log_id(out: &mut Vec<u8>, log_id: Option<&GroupLogId>) {
    match log_id {
        None => out.push(0),
        Some(log_id) => {
            out.push(1);
            put_log_id(out, log_id);
        }
    }
}

/// Reads fields off the front of a byte slice, refusing to read past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, length: usize, what: &str) -> Result<&'a [u8], String> {
        if self.0.len() < length {
            return Err(format!("{what}: {length} bytes wanted, {} left", self.0.len()));
        }
        let (taken, rest) = self.0.split_at(length);
        self.0 = rest;
        Ok(taken)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let bytes = self.take(4, what)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let mut array = [0; 8];
        array.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_be_bytes(array))
    }

    fn log_id(&mut self) -> Result<GroupLogId, String> {
        let term = self.u64("log id term")?;
        let node_id = self.u64("log id node")?;
        let index = self.u64("log id index")?;
        Ok(LogId { leader_id: CommittedLeaderId::new(term, node_id), index })
    }

    fn optional_log_id(&mut self) -> Result<Option<GroupLogId>, String> {
        match self.u8("log id presence")? {
            0 => Ok(None),
            1 => Ok(Some(self.log_id()?)),
            other => Err(format!("log id presence is {other}, not 0 or 1")),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use openraft::{BasicNode, Membership};
    use std::collections::{BTreeMap, BTreeSet};

    fn log_id(term: u64, node: u64, index: u64) -> GroupLogId {
        LogId { leader_id: CommittedLeaderId::new(term, node), index }
    }

    fn entries() -> Vec<GroupEntry> {
        let nodes: BTreeMap<u64, BasicNode> =
            (1..=3).map(|id| (id, BasicNode::new(format!("127.0.0.1:{id}")))).collect();
        let membership = Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes);
        vec![
            GroupEntry { log_id: log_id(1, 1, 1), payload: EntryPayload::Blank },
            GroupEntry { log_id: log_id(1, 1, 2), payload: EntryPayload::Membership(membership) },
            GroupEntry { log_id: log_id(2, 3, 3), payload: EntryPayload::Normal(Command(vec![0, 255, b'{', 7])) },
            GroupEntry { log_id: log_id(u64::MAX, 2, u64::MAX), payload: EntryPayload::Normal(Command(Vec::new())) },
        ]
    }

    #[test]
    fn every_kind_of_entry_reads_back_as_written() {
        for entry in entries() {
            let bytes = entry_bytes(&entry).unwrap();
            assert_eq!(decode_entry(&bytes).unwrap(), entry);
        }
        // A normal entry's command is carried as it is, after the 25 bytes of kind and log id.
        let normal = &entries()[2];
        assert_eq!(&entry_bytes(normal).unwrap()[ENTRY_HEADER_BYTES..], &[0, 255, b'{', 7]);
    }

    #[test]
    fn an_append_request_reads_back_as_written() {
        let requests = [
            AppendEntriesRequest::<GroupTypes> {
                vote: Vote { leader_id: LeaderId { term: 2, node_id: 3 }, committed: true },
                prev_log_id: Some(log_id(1, 1, 2)),
                entries: entries(),
                leader_commit: Some(log_id(2, 3, 3)),
            },
            // A heartbeat.
            AppendEntriesRequest::<GroupTypes> {
                vote: Vote { leader_id: LeaderId { term: 1, node_id: 1 }, committed: false },
                prev_log_id: None,
                entries: Vec::new(),
                leader_commit: None,
            },
        ];
        for request in requests {
            let mut bytes = Vec::new();
            encode_append(&request, &mut bytes).unwrap();
            let read = decode_append(&bytes).unwrap();
            assert_eq!(read.vote, request.vote);
            assert_eq!(read.prev_log_id, request.prev_log_id);
            assert_eq!(read.leader_commit, request.leader_commit);
            assert_eq!(read.entries, request.entries);
        }
    }

    #[test]
    fn damaged_bytes_are_refused_not_a_panic() {
        let request = AppendEntriesRequest::<GroupTypes> {
            vote: Vote { leader_id: LeaderId { term: 2, node_id: 3 }, committed: true },
            prev_log_id: Some(log_id(1, 1, 2)),
            entries: entries(),
            leader_commit: None,
        };
        let mut bytes = Vec::new();
        encode_append(&request, &mut bytes).unwrap();
        // Every shortened request is refused.
        for length in 0..bytes.len() {
            assert!(decode_append(&bytes[..length]).is_err(), "{length} of {} bytes read", bytes.len());
        }
        // A count of entries larger than what follows can hold is refused before allocating.
        let mut huge = bytes[..17 + 26].to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_append(&huge).unwrap_err().contains("cannot fit"));
        // Unknown kinds, a blank entry with a payload, and trailing bytes are refused.
        let mut unknown = entry_bytes(&entries()[0]).unwrap();
        unknown[0] = 9;
        assert!(decode_entry(&unknown).unwrap_err().contains("unknown"));
        let mut padded_blank = entry_bytes(&entries()[0]).unwrap();
        padded_blank.push(0);
        assert!(decode_entry(&padded_blank).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode_append(&trailing).unwrap_err().contains("after the last entry"));
    }
}
