//! A Raft group's log on `wharf-store`: one store log per group holds its entries, its vote, its
//! purge point and its latest snapshot, as records in append order; openraft's
//! [`RaftLogStorage`] on top, and [`GroupSnapshots`] for the group's state machine.
//!
//! Why one store log for all of them: openraft asks that every write of a group (vote and entries)
//! take effect in the order it was made. Records of one store log become durable in append
//! order (the store's group commit writes a log's records in order and a crash loses a suffix
//! at most), so that order needs nothing more.
//!
//! Each record's meta is one byte saying what it is ([`RECORD_ENTRY_BINARY`], [`RECORD_VOTE`],
//! [`RECORD_PURGED`], [`RECORD_SNAPSHOT_PART`]); an entry's body is `codec.rs`'s encoding, the
//! others' are JSON (a snapshot's: its meta as JSON then the machine's bytes, cut into parts of
//! [`SNAPSHOT_PART_BYTES`]). Recovery
//! ([`GroupLog::open`]) reads them in seq order:
//! - the last vote and purge point, and the newest snapshot whose parts are all there (by the
//!   log id it covers), are the ones in force (the others are removed);
//! - an entry whose index is not past the last one read replaces that index and everything
//!   after it: a truncation whose removals a crash lost, then the appends that replaced it;
//! - entries up to the purge point are gone; so is everything after the first gap (a
//!   truncation the crash cut short): the log has no hole.
//!
//! Every entry is also kept in memory (the group's reads are all from memory); purging after a
//! snapshot is what bounds it.

use crate::{GroupEntry, GroupLogId, GroupTypes};
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{AnyError, LogState, OptionalSend, RaftLogId, RaftLogReader, StorageError, StorageIOError, Vote};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex};
use wharf_store::{LogId, Recovered, Store, StoreError};

/// A record holding one log entry as JSON (written by earlier versions; still read).
pub const RECORD_ENTRY: u8 = b'E';
/// A record holding one log entry in the binary encoding of `codec.rs`.
pub const RECORD_ENTRY_BINARY: u8 = b'B';
/// A record holding the group's vote.
pub const RECORD_VOTE: u8 = b'V';
/// A record holding the last purged log id.
pub const RECORD_PURGED: u8 = b'P';
/// A record holding a whole snapshot: a 4-byte length, the snapshot's meta as JSON, then the
/// state machine's bytes (written before snapshots came in parts; still read).
pub const RECORD_SNAPSHOT: u8 = b'S';
/// A record holding one part of a snapshot: the snapshot's generation (8 bytes: 0 in its first
/// part, whose own seq it then is; that seq in the others), the part's number and the number of
/// parts (4 bytes each), then the part's share of what a [`RECORD_SNAPSHOT`] body holds. A
/// snapshot of a deep queue is larger than one store record may be (`BODY_BYTES_MAX`), so it
/// is written in parts, and recovery takes only a snapshot whose parts are all there.
pub const RECORD_SNAPSHOT_PART: u8 = b'T';

/// The bytes of a snapshot one part record carries at most.
pub const SNAPSHOT_PART_BYTES: usize = 8 * 1024 * 1024;

/// A snapshot's description, as openraft gives it.
pub type GroupSnapshotMeta = openraft::SnapshotMeta<u64, openraft::BasicNode>;

/// Why a group's log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RaftStoreError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A record is not what this crate writes.
    #[error("group log {log}: record {seq} is unreadable: {reason}")]
    Unreadable {
        /// The store log.
        log: u64,
        /// The record.
        seq: u64,
        /// What is wrong with it.
        reason: String,
    },
}

/// What the log holds, shared by the log and its readers.
#[derive(Debug, Default)]
struct Held {
    /// Entries by index, with their record's seq.
    entries: BTreeMap<u64, (u64, GroupEntry)>,
    /// The vote in force and its record's seq.
    vote: Option<(u64, Vote<u64>)>,
    /// The purge point in force and its record's seq.
    purged: Option<(u64, GroupLogId)>,
    /// The latest snapshot (meta, bytes) and its records' seqs.
    snapshot: Option<(Vec<u64>, GroupSnapshotMeta, Arc<Vec<u8>>)>,
    /// Records to remove once the purge point in force is durable (it is not yet when its seq
    /// is [`NOT_DURABLE`]): the entries it purged, and the purge records before it.
    purge_pending: Vec<u64>,
}

/// The "seq" of a purge point held in memory only, until a snapshot covering it is saved.
const NOT_DURABLE: u64 = u64::MAX;

/// Whether `held`'s newest snapshot covers index `index`.
fn snapshot_covers(held: &Held, index: u64) -> bool {
    held.snapshot.as_ref().is_some_and(|(_, meta, _)| meta.last_log_id.is_some_and(|last| last.index >= index))
}

/// Makes purge point `log_id` durable (its record first), then removes what it made stale.
async fn make_purge_durable(store: &Store, log: LogId, held: &Mutex<Held>, log_id: GroupLogId) -> Result<(), String> {
    let body = serde_json::to_vec(&log_id).map_err(|error| error.to_string())?;
    let pending = store.append(log, 0, &[RECORD_PURGED], &body).map_err(|error| error.to_string())?;
    let seq = pending.seq;
    pending.ticket.await.map_err(|error| error.to_string())?;
    let stale = {
        let mut held = lock(held);
        match held.purged {
            Some((NOT_DURABLE, current)) if current == log_id => {
                held.purged = Some((seq, log_id));
                std::mem::take(&mut held.purge_pending)
            }
            // A newer purge point came meanwhile and waits for its own snapshot: this record
            // goes once that one is durable.
            _ => {
                held.purge_pending.push(seq);
                Vec::new()
            }
        }
    };
    for seq in stale {
        store.remove_unawaited(log, seq).map_err(|error| error.to_string())?;
    }
    Ok(())
}

fn encode_snapshot(meta: &GroupSnapshotMeta, data: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    let meta = serde_json::to_vec(meta)?;
    let mut body = Vec::with_capacity(4 + meta.len() + data.len());
    body.extend_from_slice(&(meta.len() as u32).to_be_bytes());
    body.extend_from_slice(&meta);
    body.extend_from_slice(data);
    Ok(body)
}

/// What a [`RECORD_SNAPSHOT_PART`] record says: generation (0 in a first part), part, parts,
/// and its share of the snapshot's bytes.
fn decode_part(body: &[u8]) -> Result<(u64, u32, u32, &[u8]), String> {
    if body.len() < 16 {
        return Err("a snapshot part shorter than its header".into());
    }
    let (header, share) = body.split_at(16);
    let number =
        |range: std::ops::Range<usize>| header[range].iter().fold(0u64, |sum, byte| sum << 8 | u64::from(*byte));
    let (generation, part, parts) = (number(0..8), number(8..12) as u32, number(12..16) as u32);
    if parts == 0 || part >= parts {
        return Err(format!("snapshot part {part} of {parts}"));
    }
    Ok((generation, part, parts, share))
}

/// The parts of snapshots found at recovery, by generation: how many each should have, and
/// those read (by number: seq and bytes).
type PartsFound = BTreeMap<u64, (u32, BTreeMap<u32, (u64, Vec<u8>)>)>;

/// A snapshot's meta, and where the machine's bytes start in its body.
fn decode_snapshot_meta(body: &[u8]) -> Result<(GroupSnapshotMeta, usize), String> {
    let length = body.get(..4).ok_or("a snapshot record without its length")?;
    let length = u32::from_be_bytes([length[0], length[1], length[2], length[3]]) as usize;
    let meta = body.get(4..4 + length).ok_or("a snapshot record shorter than its meta")?;
    let meta = serde_json::from_slice(meta).map_err(|error| error.to_string())?;
    Ok((meta, 4 + length))
}

fn lock(held: &Mutex<Held>) -> std::sync::MutexGuard<'_, Held> {
    held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A group's log, vote and purge point (openraft's log storage).
#[derive(Debug)]
pub struct GroupLog {
    store: Store,
    log: LogId,
    held: Arc<Mutex<Held>>,
}

/// Reads a group's entries (openraft's log reader): shares what the log holds.
#[derive(Debug, Clone)]
pub struct GroupLogReader {
    held: Arc<Mutex<Held>>,
}

fn write_error(error: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::write_logs(AnyError::new(&error)).into()
}

fn vote_error(error: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::write_vote(AnyError::new(&error)).into()
}

impl GroupLog {
    /// A new, empty group log in a store log of its own.
    pub async fn create(store: &Store) -> Result<GroupLog, RaftStoreError> {
        let log = store.create_log()?.await?;
        Ok(GroupLog { store: store.clone(), log, held: Arc::default() })
    }

    /// The group log kept in store log `log`, as `recovered` found it (see the module's doc).
    /// Records recovery no longer needs are removed from the store.
    pub fn open(store: &Store, log: LogId, recovered: &Recovered) -> Result<GroupLog, RaftStoreError> {
        let mut held = Held::default();
        let mut stale = Vec::new();
        let mut failure = None;
        let mut whole: Vec<(Vec<u64>, Vec<u8>)> = Vec::new();
        let mut parts_found = PartsFound::new();
        let records = recovered.queues.get(&log).map(Vec::as_slice).unwrap_or(&[]);
        let locations: Vec<_> = records.iter().map(|record| record.location).collect();
        store.read_each(log, &locations, &mut |index, read| {
            let seq = records[index].seq;
            let outcome = read.map_err(|error| error.to_string()).and_then(|record| {
                let kind = *record.meta.first().ok_or("no kind")?;
                match kind {
                    RECORD_ENTRY | RECORD_ENTRY_BINARY => {
                        let entry: GroupEntry = if kind == RECORD_ENTRY {
                            serde_json::from_slice(record.body).map_err(|e| e.to_string())?
                        } else {
                            crate::codec::decode_entry(record.body)?
                        };
                        let replaced = held.entries.split_off(&entry.get_log_id().index);
                        stale.extend(replaced.into_values().map(|(seq, _)| seq));
                        held.entries.insert(entry.get_log_id().index, (seq, entry));
                    }
                    RECORD_VOTE => {
                        let vote: Vote<u64> = serde_json::from_slice(record.body).map_err(|e| e.to_string())?;
                        stale.extend(held.vote.replace((seq, vote)).map(|(old, _)| old));
                    }
                    RECORD_PURGED => {
                        let purged: GroupLogId = serde_json::from_slice(record.body).map_err(|e| e.to_string())?;
                        stale.extend(held.purged.replace((seq, purged)).map(|(old, _)| old));
                    }
                    RECORD_SNAPSHOT => whole.push((vec![seq], record.body.to_vec())),
                    RECORD_SNAPSHOT_PART => {
                        let (generation, part, parts, share) = decode_part(record.body)?;
                        let generation = if generation == 0 { seq } else { generation };
                        let found = parts_found.entry(generation).or_insert_with(|| (parts, BTreeMap::new()));
                        if found.0 != parts {
                            return Err(format!("a snapshot part says {parts} parts, its first {}", found.0));
                        }
                        found.1.insert(part, (seq, share.to_vec()));
                    }
                    other => return Err(format!("unknown kind {other}")),
                }
                Ok(())
            });
            if let Err(reason) = outcome {
                failure.get_or_insert(RaftStoreError::Unreadable { log: log.0, seq, reason });
            }
        });
        if let Some(failure) = failure {
            return Err(failure);
        }
        // Snapshots whose parts are all there (a crash may cut the newest short); the newest of
        // them is in force, every other record of a snapshot goes.
        for (_, (parts, found)) in parts_found {
            let seqs: Vec<u64> = found.values().map(|(seq, _)| *seq).collect();
            if found.len() == parts as usize {
                let shares: Vec<Vec<u8>> = found.into_values().map(|(_, share)| share).collect();
                whole.push((seqs, shares.concat()));
            } else {
                stale.extend(seqs);
            }
        }
        // Only the newest is kept; the others' metas are read to choose it.
        let unreadable = |seq: u64| move |reason| RaftStoreError::Unreadable { log: log.0, seq, reason };
        let mut newest: Option<(Vec<u64>, GroupSnapshotMeta, Vec<u8>)> = None;
        for (seqs, body) in whole {
            let (meta, _) = decode_snapshot_meta(&body).map_err(unreadable(seqs[0]))?;
            let newer = newest.as_ref().is_none_or(|(current_seqs, current, _)| {
                (meta.last_log_id, seqs[0]) >= (current.last_log_id, current_seqs[0])
            });
            if newer {
                stale.extend(newest.replace((seqs, meta, body)).into_iter().flat_map(|(old, ..)| old));
            } else {
                stale.extend(seqs);
            }
        }
        if let Some((seqs, meta, mut body)) = newest {
            let (_, data_at) = decode_snapshot_meta(&body).map_err(unreadable(seqs[0]))?;
            body.drain(..data_at);
            held.snapshot = Some((seqs, meta, Arc::new(body)));
        }
        if let Some((_, purged)) = &held.purged {
            let kept = held.entries.split_off(&(purged.index + 1));
            stale.extend(std::mem::replace(&mut held.entries, kept).into_values().map(|(seq, _)| seq));
        }
        // A truncation cut short by the crash: nothing after the first gap.
        let mut expected = held.entries.keys().next().copied();
        let mut gap_at = None;
        for index in held.entries.keys() {
            if Some(*index) != expected {
                gap_at = Some(*index);
                break;
            }
            expected = Some(index + 1);
        }
        if let Some(gap_at) = gap_at {
            stale.extend(held.entries.split_off(&gap_at).into_values().map(|(seq, _)| seq));
        }
        for seq in stale {
            store.remove_unawaited(log, seq)?;
        }
        Ok(GroupLog { store: store.clone(), log, held: Arc::new(Mutex::new(held)) })
    }

    /// The store log the group's records are in.
    pub fn store_log(&self) -> LogId {
        self.log
    }

    /// Where the group's state machine keeps its snapshots (in the same store log).
    pub fn snapshots(&self) -> GroupSnapshots {
        GroupSnapshots { store: self.store.clone(), log: self.log, held: Arc::clone(&self.held) }
    }

    /// Appends one record and waits until it is durable; returns its seq.
    async fn append_durably(&self, kind: u8, body: &[u8]) -> Result<u64, StoreError> {
        let pending = self.store.append(self.log, 0, &[kind], body)?;
        let seq = pending.seq;
        pending.ticket.await?;
        Ok(seq)
    }
}

/// A group's latest snapshot, durable in the group's store log: what its state machine saves
/// when it builds or installs one, and starts from after a restart.
#[derive(Debug, Clone)]
pub struct GroupSnapshots {
    store: Store,
    log: LogId,
    held: Arc<Mutex<Held>>,
}

impl GroupSnapshots {
    /// Saves a snapshot in place of the previous one; durable when this returns.
    pub async fn save(&self, meta: &GroupSnapshotMeta, data: Vec<u8>) -> Result<(), StorageError<u64>> {
        let snapshot_error = |error: &dyn std::fmt::Display| {
            StorageError::from(StorageIOError::write_snapshot(None, AnyError::error(error.to_string())))
        };
        let body = encode_snapshot(meta, &data).map_err(|error| snapshot_error(&error))?;
        // In parts, each a record; durable in append order, so once the last is, all are.
        let chunks: Vec<&[u8]> = body.chunks(SNAPSHOT_PART_BYTES).collect();
        let parts = u32::try_from(chunks.len().max(1)).map_err(|error| snapshot_error(&error))?;
        let mut seqs = Vec::with_capacity(chunks.len());
        let mut last_ticket = None;
        for (number, chunk) in chunks.iter().enumerate() {
            let generation = seqs.first().copied().unwrap_or(0u64);
            let mut record = Vec::with_capacity(16 + chunk.len());
            record.extend_from_slice(&generation.to_be_bytes());
            record.extend_from_slice(&(number as u32).to_be_bytes());
            record.extend_from_slice(&parts.to_be_bytes());
            record.extend_from_slice(chunk);
            let pending = self
                .store
                .append(self.log, 0, &[RECORD_SNAPSHOT_PART], &record)
                .map_err(|error| snapshot_error(&error))?;
            seqs.push(pending.seq);
            last_ticket = Some(pending.ticket);
        }
        if let Some(ticket) = last_ticket {
            ticket.await.map_err(|error| snapshot_error(&error))?;
        }
        // openraft may build a snapshot while it installs another: the newer one stays, whichever
        // is saved last (recovery keeps the newest too).
        let stale = {
            let mut held = lock(&self.held);
            let newer = held.snapshot.as_ref().is_none_or(|(_, current, _)| meta.last_log_id >= current.last_log_id);
            if newer {
                held.snapshot.replace((seqs, meta.clone(), Arc::new(data))).map(|(old, ..)| old).unwrap_or_default()
            } else {
                seqs
            }
        };
        for seq in stale {
            self.store.remove_unawaited(self.log, seq).map_err(|error| snapshot_error(&error))?;
        }
        // A purge point waiting for a snapshot that covers it (see `GroupLog::purge`).
        let waiting = {
            let held = lock(&self.held);
            held.purged.filter(|(seq, purged)| *seq == NOT_DURABLE && snapshot_covers(&held, purged.index))
        };
        if let Some((_, purged)) = waiting {
            make_purge_durable(&self.store, self.log, &self.held, purged)
                .await
                .map_err(|text| snapshot_error(&text))?;
        }
        Ok(())
    }

    /// The latest snapshot saved, if any.
    pub fn current(&self) -> Option<(GroupSnapshotMeta, Arc<Vec<u8>>)> {
        lock(&self.held).snapshot.as_ref().map(|(_, meta, data)| (meta.clone(), Arc::clone(data)))
    }
}

/// The entries in `range`, for both readers openraft asks for (the log and its reader).
fn entries_in(held: &Mutex<Held>, range: impl RangeBounds<u64>) -> Vec<GroupEntry> {
    lock(held).entries.range(range).map(|(_, (_, entry))| entry.clone()).collect()
}

impl RaftLogReader<GroupTypes> for GroupLogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<GroupEntry>, StorageError<u64>> {
        Ok(entries_in(&self.held, range))
    }
}

impl RaftLogReader<GroupTypes> for GroupLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<GroupEntry>, StorageError<u64>> {
        Ok(entries_in(&self.held, range))
    }
}

impl RaftLogStorage<GroupTypes> for GroupLog {
    type LogReader = GroupLogReader;

    async fn get_log_state(&mut self) -> Result<LogState<GroupTypes>, StorageError<u64>> {
        let held = lock(&self.held);
        let last_purged_log_id = held.purged.as_ref().map(|(_, purged)| *purged);
        let last_log_id =
            held.entries.values().next_back().map(|(_, entry)| *entry.get_log_id()).or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> GroupLogReader {
        GroupLogReader { held: Arc::clone(&self.held) }
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        let body = serde_json::to_vec(vote).map_err(vote_error)?;
        let seq = self.append_durably(RECORD_VOTE, &body).await.map_err(vote_error)?;
        let replaced = lock(&self.held).vote.replace((seq, *vote));
        if let Some((old, _)) = replaced {
            self.store.remove_unawaited(self.log, old).map_err(vote_error)?;
        }
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        Ok(lock(&self.held).vote.as_ref().map(|(_, vote)| *vote))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<GroupTypes>) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = GroupEntry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut tickets = Vec::new();
        for entry in entries {
            let body = crate::codec::entry_bytes(&entry).map_err(write_error)?;
            let pending = self.store.append(self.log, 0, &[RECORD_ENTRY_BINARY], &body).map_err(write_error)?;
            let index = entry.get_log_id().index;
            let mut held = lock(&self.held);
            // openraft truncates before it appends over; should it not, the later entry wins,
            // as at recovery.
            let replaced = held.entries.split_off(&index);
            held.entries.insert(index, (pending.seq, entry));
            drop(held);
            for (seq, _) in replaced.into_values() {
                self.store.remove_unawaited(self.log, seq).map_err(write_error)?;
            }
            tickets.push(pending.ticket);
        }
        // Durable in append order: the last ticket resolving means every earlier one did, but
        // each is awaited so a failure of any is reported.
        tokio::spawn(async move {
            let mut outcome = Ok(());
            for ticket in tickets {
                if let Err(error) = ticket.await {
                    outcome = Err(std::io::Error::other(error.to_string()));
                    break;
                }
            }
            callback.log_io_completed(outcome);
        });
        Ok(())
    }

    async fn truncate(&mut self, log_id: GroupLogId) -> Result<(), StorageError<u64>> {
        let removed = lock(&self.held).entries.split_off(&log_id.index);
        for (seq, _) in removed.into_values() {
            self.store.remove_unawaited(self.log, seq).map_err(write_error)?;
        }
        // The removals are durable before anything is appended in their place (recovery would
        // cope without, but a durable truncation keeps the log on disk what openraft was told).
        self.store.sync().map_err(write_error)?.await.map_err(write_error)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: GroupLogId) -> Result<(), StorageError<u64>> {
        // In memory at once. On disk the purge point is made durable only once a saved snapshot
        // covers it: openraft purges as soon as it has asked the state machine to install a
        // leader's snapshot, while the machine may still be saving it, and a durable purge
        // point ahead of every durable snapshot would leave, after a crash, a log starting past
        // all the machine can restore. The purged entries' records stay until then, so a crash
        // before it finds the log as it was (recovery keeps the entries up to the first gap).
        let covered = {
            let mut held = lock(&self.held);
            let kept = held.entries.split_off(&(log_id.index + 1));
            let removed = std::mem::replace(&mut held.entries, kept);
            let mut stale: Vec<u64> = removed.into_values().map(|(seq, _)| seq).collect();
            if let Some((seq, _)) = held.purged.replace((NOT_DURABLE, log_id)).filter(|(seq, _)| *seq != NOT_DURABLE) {
                stale.push(seq);
            }
            held.purge_pending.extend(stale);
            snapshot_covers(&held, log_id.index)
        };
        if covered {
            make_purge_durable(&self.store, self.log, &self.held, log_id)
                .await
                .map_err(|text| write_error(std::io::Error::other(text)))?;
        }
        Ok(())
    }
}
