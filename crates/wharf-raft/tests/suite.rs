//! openraft's own test suite for log storage (`openraft::testing::Suite`) over [`GroupLog`] on a
//! real store in a temporary directory, and crash recovery of a group log on the fault-injecting
//! file system: truncations and purges cut short, votes and snapshots replaced, entries that come
//! back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{Entry, EntryPayload, LogId, RaftLogReader, StorageError};
use wharf_raft::{GroupLog, GroupTypes};
use wharf_store::{CrashMode, RealFs, SimFs, Store, StoreConfig};

mod common;
use common::Machine;

/// Each test of the suite gets a new store in a new temporary directory.
struct OnDisk;

impl StoreBuilder<GroupTypes, GroupLog, Machine, tempfile::TempDir> for OnDisk {
    async fn build(&self) -> Result<(tempfile::TempDir, GroupLog, Machine), StorageError<u64>> {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(RealFs::shared(), dir.path(), StoreConfig::default()).unwrap();
        let log = GroupLog::create(&store).await.unwrap();
        let machine = Machine::new(log.snapshots());
        Ok((dir, log, machine))
    }
}

#[test]
fn openraft_s_storage_suite_passes_on_a_group_log() {
    Suite::test_all(OnDisk).unwrap();
}

fn blank(term: u64, index: u64) -> Entry<GroupTypes> {
    Entry { log_id: LogId::new(openraft::CommittedLeaderId::new(term, 1), index), payload: EntryPayload::Blank }
}

/// What a group log holds: (index, term) of each entry, the vote's term, the purge point's index.
async fn contents(log: &mut GroupLog) -> (Vec<(u64, u64)>, Option<u64>, Option<u64>) {
    let entries = log.try_get_log_entries(0..).await.unwrap();
    let state = log.get_log_state().await.unwrap();
    (
        entries.iter().map(|entry| (entry.log_id.index, entry.log_id.leader_id.term)).collect(),
        log.read_vote().await.unwrap().map(|vote| vote.leader_id().term),
        state.last_purged_log_id.map(|purged| purged.index),
    )
}

/// A store on the fault-injecting file system, crashed in `mode` and opened again: the group
/// log as recovery rebuilds it.
fn crash_and_reopen(fs: &SimFs, mode: CrashMode, log: wharf_store::LogId) -> (SimFs, GroupLog) {
    fs.crash(mode);
    let fs = fs.remount();
    let (store, recovered) = Store::open(fs.shared(), "/data", StoreConfig::default()).unwrap();
    let group = GroupLog::open(&store, log, &recovered).unwrap();
    (fs, group)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_log_comes_back_after_a_crash_as_it_was_made_durable() {
    let fs = SimFs::new(3);
    let (store, _) = Store::open(fs.shared(), "/data", StoreConfig::default()).unwrap();
    let mut log = GroupLog::create(&store).await.unwrap();
    let id = log.store_log();
    log.save_vote(&openraft::Vote::new(1, 1)).await.unwrap();
    log.blocking_append((1..=6).map(|index| blank(1, index))).await.unwrap();
    // A new leader's entries replace 5 and 6; its vote replaces the first.
    log.save_vote(&openraft::Vote::new(2, 2)).await.unwrap();
    log.truncate(LogId::new(openraft::CommittedLeaderId::new(1, 1), 5)).await.unwrap();
    log.blocking_append([blank(2, 5), blank(2, 6), blank(2, 7)]).await.unwrap();
    log.purge(LogId::new(openraft::CommittedLeaderId::new(1, 1), 2)).await.unwrap();
    let expected = (vec![(3, 1), (4, 1), (5, 2), (6, 2), (7, 2)], Some(2), Some(2));
    assert_eq!(contents(&mut log).await, expected);
    // Two snapshots: the second replaces the first.
    let meta = |index| openraft::SnapshotMeta {
        last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), index)),
        last_membership: Default::default(),
        snapshot_id: format!("at {index}"),
    };
    log.snapshots().save(&meta(1), b"state at 1".to_vec()).await.unwrap();
    log.snapshots().save(&meta(2), b"state at 2".to_vec()).await.unwrap();
    let snapshot = |log: &GroupLog| log.snapshots().current().map(|(meta, data)| (meta.snapshot_id, data.to_vec()));
    let expected_snapshot = Some(("at 2".to_owned(), b"state at 2".to_vec()));
    assert_eq!(snapshot(&log), expected_snapshot);
    // A power loss keeps what was made durable, and recovery rebuilds exactly that.
    let (fs, mut again) = crash_and_reopen(&fs, CrashMode::LoseUnsynced, id);
    assert_eq!(contents(&mut again).await, expected);
    assert_eq!(snapshot(&again), expected_snapshot);
    // And it is the same after a second crash, with what the first recovery removed.
    let (_, mut third) = crash_and_reopen(&fs, CrashMode::KeepUnsynced, id);
    assert_eq!(contents(&mut third).await, expected);
    assert_eq!(snapshot(&third), expected_snapshot);
}

/// An entry appended over existing ones (openraft truncates first; this is the case where the
/// truncation's removals did not reach the disk) replaces them and every later one, in memory
/// and after a crash: recovery reads the records in append order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_written_over_others_replaces_them_and_what_follows_across_a_crash() {
    let fs = SimFs::new(4);
    let (store, _) = Store::open(fs.shared(), "/data", StoreConfig::default()).unwrap();
    let mut log = GroupLog::create(&store).await.unwrap();
    let id = log.store_log();
    log.blocking_append((1..=5).map(|index| blank(1, index))).await.unwrap();
    log.blocking_append([blank(2, 3)]).await.unwrap();
    let expected = vec![(1, 1), (2, 1), (3, 2)];
    assert_eq!(contents(&mut log).await.0, expected);
    let (_, mut again) = crash_and_reopen(&fs, CrashMode::LoseUnsynced, id);
    assert_eq!(contents(&mut again).await.0, expected, "4 and 5 went with the old 3");
}

/// A purge ahead of every saved snapshot (openraft purges while the state machine is still
/// saving a leader's snapshot it installs) is made durable only once a snapshot covering it is:
/// a crash before that finds the log as it was, one after finds it purged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_is_durable_only_once_a_snapshot_covers_it() {
    let fs = SimFs::new(5);
    let (store, _) = Store::open(fs.shared(), "/data", StoreConfig::default()).unwrap();
    let mut log = GroupLog::create(&store).await.unwrap();
    let id = log.store_log();
    log.blocking_append((1..=6).map(|index| blank(1, index))).await.unwrap();
    log.purge(LogId::new(openraft::CommittedLeaderId::new(1, 1), 4)).await.unwrap();
    assert_eq!(contents(&mut log).await, (vec![(5, 1), (6, 1)], None, Some(4)), "purged in memory at once");
    let (fs, mut again) = crash_and_reopen(&fs, CrashMode::KeepUnsynced, id);
    let whole = (1..=6).map(|index| (index, 1)).collect::<Vec<_>>();
    assert_eq!(contents(&mut again).await, (whole, None, None), "no snapshot covered it: the log as it was");
    again.purge(LogId::new(openraft::CommittedLeaderId::new(1, 1), 4)).await.unwrap();
    let meta = openraft::SnapshotMeta {
        last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), 5)),
        last_membership: Default::default(),
        snapshot_id: "at 5".to_owned(),
    };
    again.snapshots().save(&meta, b"state at 5".to_vec()).await.unwrap();
    let (_, mut third) = crash_and_reopen(&fs, CrashMode::LoseUnsynced, id);
    assert_eq!(contents(&mut third).await, (vec![(5, 1), (6, 1)], None, Some(4)), "durable with its snapshot");
}

fn snapshot_meta(index: u64) -> openraft::SnapshotMeta<u64, openraft::BasicNode> {
    openraft::SnapshotMeta {
        last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), index)),
        last_membership: Default::default(),
        snapshot_id: format!("at {index}"),
    }
}

/// A snapshot is saved in parts of `SNAPSHOT_PART_BYTES` (so one larger than a store record may
/// be, a deep queue's, can be saved; here two and a half parts) and comes back whole; a newer
/// one whose parts a crash cut short is not taken, the older one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_saved_in_parts_and_only_a_whole_one_is_taken() {
    let fs = SimFs::new(6);
    let (store, _) = Store::open(fs.shared(), "/data", StoreConfig::default()).unwrap();
    let log = GroupLog::create(&store).await.unwrap();
    let id = log.store_log();
    let large: Vec<u8> = (0..wharf_raft::SNAPSHOT_PART_BYTES * 5 / 2).map(|at| (at % 251) as u8).collect();
    log.snapshots().save(&snapshot_meta(7), large.clone()).await.unwrap();
    let (fs, again) = crash_and_reopen(&fs, CrashMode::LoseUnsynced, id);
    let (meta, data) = again.snapshots().current().expect("the snapshot");
    assert_eq!((meta.snapshot_id.as_str(), data.len()), ("at 7", large.len()));
    assert!(*data == large, "the parts come back in order");

    // The first of three parts of a newer snapshot, and then the crash.
    let (store, _) = Store::open(fs.shared(), "/data", StoreConfig::default()).unwrap();
    let mut part = Vec::new();
    part.extend_from_slice(&0u64.to_be_bytes());
    part.extend_from_slice(&0u32.to_be_bytes());
    part.extend_from_slice(&3u32.to_be_bytes());
    part.extend_from_slice(b"\0\0\0\x02{}");
    store.append(id, 0, &[wharf_raft::RECORD_SNAPSHOT_PART], &part).unwrap().ticket.await.unwrap();
    drop(store);
    let (_, third) = crash_and_reopen(&fs, CrashMode::LoseUnsynced, id);
    let (meta, data) = third.snapshots().current().expect("the whole snapshot");
    assert_eq!((meta.snapshot_id.as_str(), data.len()), ("at 7", large.len()));
}

/// Entries are logged in the binary encoding; an entry an earlier version logged as JSON is
/// still read: both come back, payload and all, after a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_logged_as_json_by_earlier_versions_still_read_beside_binary_ones() {
    let fs = SimFs::new(6);
    let (store, _) = Store::open(fs.shared(), "/data", StoreConfig::default()).unwrap();
    let mut log = GroupLog::create(&store).await.unwrap();
    let id = log.store_log();
    let normal = |index: u64, bytes: &[u8]| Entry::<GroupTypes> {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(wharf_raft::Command(bytes.to_vec())),
    };
    let earlier = normal(1, b"an earlier version's \x00\xff");
    // The record an earlier version wrote: kind 'E', the entry as JSON.
    let pending = store.append(id, 0, b"E", &serde_json::to_vec(&earlier).unwrap()).unwrap();
    pending.ticket.await.unwrap();
    let later = normal(2, b"{\"not\": \"json to this log\"}\x00");
    log.blocking_append([later.clone()]).await.unwrap();
    let (_, mut again) = crash_and_reopen(&fs, CrashMode::LoseUnsynced, id);
    assert_eq!(again.try_get_log_entries(0..).await.unwrap(), vec![earlier, later]);
}
