//! The shared journal (issue #18): a batch over several queues is made durable by the journal
//! alone, a power loss that takes the segments' unsynced writes is repaired by replaying it,
//! checkpoints start it over, and data directories written before it existed open after the
//! change (the migration), including when the migration itself is cut short by a crash.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use wharf_store::{CrashMode, LogId, PendingAppend, RealFs, SimFs, Store, StoreConfig};

const DIR: &str = "/data";

fn journal_path() -> PathBuf {
    Path::new(DIR).join("journal")
}

/// Every recovered message of every queue as (seq, body).
fn contents(store: &Store, recovered: &wharf_store::Recovered) -> BTreeMap<LogId, Vec<(u64, Vec<u8>)>> {
    recovered
        .queues
        .iter()
        .map(|(queue, messages)| {
            let read =
                messages.iter().map(|message| (message.seq, store.read(*queue, &message.location).unwrap().body));
            (*queue, read.collect())
        })
        .collect()
}

/// Appends one message to each queue without waiting in between, then waits for all of them,
/// until a batch held more than one of them (it went through the journal: the journal file grew
/// past its header). Returns what was appended, per queue.
fn append_until_journaled(sim: &SimFs, store: &Store, queues: &[LogId]) -> BTreeMap<LogId, Vec<(u64, Vec<u8>)>> {
    let mut appended: BTreeMap<LogId, Vec<(u64, Vec<u8>)>> = BTreeMap::new();
    for round in 0..1_000u32 {
        let pending: Vec<(LogId, Vec<u8>, PendingAppend)> = queues
            .iter()
            .map(|queue| {
                let body = format!("{queue}-{round}").into_bytes();
                let pending = store.append(*queue, u64::from(round), b"meta", &body).unwrap();
                (*queue, body, pending)
            })
            .collect();
        for (queue, body, pending) in pending {
            let receipt = pending.wait().unwrap();
            appended.entry(queue).or_default().push((receipt.seq, body));
        }
        if sim.read_file(&journal_path()).unwrap().len() > 64 {
            return appended;
        }
    }
    panic!("no batch in 1,000 rounds held appends to two queues");
}

#[test]
fn a_power_loss_after_a_journaled_batch_is_repaired_by_replay() {
    let sim = SimFs::new(3);
    let (store, _) = Store::open(sim.shared(), DIR, StoreConfig::default()).unwrap();
    let queues: Vec<LogId> = (0..3).map(|_| store.create_log().unwrap().wait().unwrap()).collect();
    let appended = append_until_journaled(&sim, &store, &queues);
    sim.crash(CrashMode::LoseUnsynced);
    drop(store);
    // The power loss took the segment writes that only the journal made durable.
    let segment_bytes: usize = sim
        .list_files(&Path::new(DIR).join("queues"))
        .unwrap()
        .iter()
        .map(|path| sim.read_file(path).unwrap().len())
        .sum();
    let appended_bytes: usize = appended.values().flatten().map(|(_, body)| body.len() + 4 + 40).sum();
    assert!(segment_bytes < 3 * 64 + appended_bytes, "some segment writes were never synced in their segment");
    let (store, recovered) = Store::open(sim.remount().shared(), DIR, StoreConfig::default()).unwrap();
    assert_eq!(contents(&store, &recovered), appended, "every confirmed append is back, through the journal");
    assert!(recovered.issues.is_empty(), "{:?}", recovered.issues);
    store.close().unwrap();
}

#[test]
fn checkpoints_start_the_journal_over_and_lose_nothing() {
    let sim = SimFs::new(5);
    let config = StoreConfig { journal_bytes: 4 * 1024, ..StoreConfig::default() };
    let (store, _) = Store::open(sim.shared(), DIR, config.clone()).unwrap();
    let queues: Vec<LogId> = (0..4).map(|_| store.create_log().unwrap().wait().unwrap()).collect();
    let mut appended: BTreeMap<LogId, Vec<(u64, Vec<u8>)>> = BTreeMap::new();
    // A 4 KiB journal holds a few dozen of these records: it must start over many times.
    while store.stats().checkpoints < 5 {
        for (queue, messages) in append_until_journaled(&sim, &store, &queues) {
            appended.entry(queue).or_default().extend(messages);
        }
    }
    assert!(sim.read_file(&journal_path()).unwrap().len() <= 4 * 1024, "the journal never grows past its size");
    sim.crash(CrashMode::LoseUnsynced);
    drop(store);
    let (store, recovered) = Store::open(sim.remount().shared(), DIR, config).unwrap();
    assert_eq!(contents(&store, &recovered), appended);
}

#[test]
fn a_clean_close_leaves_nothing_to_replay() {
    let sim = SimFs::new(9);
    let (store, _) = Store::open(sim.shared(), DIR, StoreConfig::default()).unwrap();
    let queues: Vec<LogId> = (0..2).map(|_| store.create_log().unwrap().wait().unwrap()).collect();
    let appended = append_until_journaled(&sim, &store, &queues);
    assert_eq!(store.stats().checkpoints, 0, "the journal holds the only durable copy of some writes");
    store.close().unwrap();
    // The close's checkpoint synced the segments: after a power loss, and without the journal
    // at all, everything is there.
    sim.crash(CrashMode::LoseUnsynced);
    let fs = sim.remount().shared();
    fs.remove_file(&journal_path()).unwrap();
    fs.sync_dir(Path::new(DIR)).unwrap();
    let (store, recovered) = Store::open(fs, DIR, StoreConfig::default()).unwrap();
    assert_eq!(contents(&store, &recovered), appended);
}

#[test]
fn turning_the_journal_off_replays_and_removes_it() {
    let sim = SimFs::new(13);
    let (store, _) = Store::open(sim.shared(), DIR, StoreConfig::default()).unwrap();
    let queues: Vec<LogId> = (0..3).map(|_| store.create_log().unwrap().wait().unwrap()).collect();
    let appended = append_until_journaled(&sim, &store, &queues);
    sim.crash(CrashMode::LoseUnsynced);
    drop(store);
    let off = StoreConfig { journal_bytes: 0, ..StoreConfig::default() };
    let (store, recovered) = Store::open(sim.remount().shared(), DIR, off.clone()).unwrap();
    assert_eq!(contents(&store, &recovered), appended);
    assert!(!sim.list_files(Path::new(DIR)).unwrap().contains(&journal_path()), "the journal is gone");
    // Without it, appends to several queues are still durable at once.
    let more = store.append(queues[0], 0, b"", b"after").unwrap();
    let more_other = store.append(queues[1], 0, b"", b"after").unwrap();
    let seqs = [more.wait().unwrap().seq, more_other.wait().unwrap().seq];
    sim.crash(CrashMode::LoseUnsynced);
    drop(store);
    let (store, recovered) = Store::open(sim.remount().shared(), DIR, off).unwrap();
    let found = contents(&store, &recovered);
    assert_eq!(found[&queues[0]].last().unwrap(), &(seqs[0], b"after".to_vec()));
    assert_eq!(found[&queues[1]].last().unwrap(), &(seqs[1], b"after".to_vec()));
}

/// Builds, without a journal (the layout before it), a data directory with messages in three
/// queues and some removed; returns what must be recovered.
fn directory_without_journal(sim: &SimFs) -> BTreeMap<LogId, Vec<(u64, Vec<u8>)>> {
    let off = StoreConfig { journal_bytes: 0, segment_bytes_max: 600, ..StoreConfig::default() };
    let (store, _) = Store::open(sim.shared(), DIR, off).unwrap();
    let mut expected = BTreeMap::new();
    for queue_index in 0..3u8 {
        let queue = store.create_log().unwrap().wait().unwrap();
        let mut kept = Vec::new();
        for index in 0..20u8 {
            let body = vec![queue_index, index];
            let seq = store.append(queue, 0, b"", &body).unwrap().wait().unwrap().seq;
            if index % 3 == 0 {
                store.remove(queue, seq).unwrap().wait().unwrap();
            } else {
                kept.push((seq, body));
            }
        }
        expected.insert(queue, kept);
    }
    store.sync().unwrap().wait().unwrap();
    assert!(!sim.list_files(Path::new(DIR)).unwrap().contains(&journal_path()));
    sim.crash(CrashMode::KeepUnsynced);
    drop(store);
    expected
}

#[test]
fn a_crash_at_any_step_of_the_migration_loses_nothing() {
    let mut step = 0u64;
    loop {
        let sim = SimFs::new(step);
        let expected = directory_without_journal(&sim);
        // Crash after `step` more file-system operations of the first open with a journal.
        sim.crash_after_operations(step, CrashMode::Random);
        let attempt = Store::open(sim.remount().shared(), DIR, StoreConfig::default());
        sim.cancel_scheduled_crash();
        let finished = attempt.is_ok();
        drop(attempt);
        let (store, recovered) = Store::open(sim.remount().shared(), DIR, StoreConfig::default()).unwrap();
        assert_eq!(contents(&store, &recovered), expected, "crash after {step} operations");
        assert!(sim.list_files(Path::new(DIR)).unwrap().contains(&journal_path()));
        if finished {
            break;
        }
        step += 1;
    }
    assert!(step > 5, "the migration was crashed at {step} points");
}

/// How the fixture was made: by the store as it was before the journal (commit e718cc6), with
/// 4 KiB segments: queue 1 got 40 messages (seq n has body `a-{n-1}-` repeated (n-1)%7+1 times,
/// meta `meta-a-{n-1}`, timestamp 999+n), seqs 1-25 removed, seq 31's delivery count set to 3;
/// queue 2 got 5 (`b-0`..`b-4`, meta `mb`); queue 3 got one and was deleted; then the process
/// stopped without closing the store.
fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pre-journal")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn a_data_directory_written_before_the_journal_opens_and_keeps_working() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    copy_dir(&fixture_dir(), &dir);
    assert!(!dir.join("journal").exists());
    let (store, recovered) = Store::open(RealFs::shared(), &dir, StoreConfig::default()).unwrap();
    assert!(recovered.issues.is_empty(), "{:?}", recovered.issues);
    assert!(dir.join("journal").exists(), "the migration created the journal");
    let (first, second) = (LogId(1), LogId(2));
    assert_eq!(recovered.queues.keys().copied().collect::<Vec<_>>().len(), 2, "the deleted queue stays deleted");
    let first_messages = &recovered.queues[&first];
    assert_eq!(first_messages.iter().map(|message| message.seq).collect::<Vec<_>>(), (26..=40).collect::<Vec<_>>());
    for message in first_messages {
        let index = message.seq - 1;
        let stored = store.read(first, &message.location).unwrap();
        assert_eq!(stored.body, format!("a-{index}-").repeat(index as usize % 7 + 1).into_bytes());
        assert_eq!(stored.meta, format!("meta-a-{index}").into_bytes());
        assert_eq!(stored.timestamp_ms, 1_000 + index);
        assert_eq!(message.delivery_count, if message.seq == 31 { 3 } else { 0 });
    }
    let second_bodies: Vec<Vec<u8>> =
        recovered.queues[&second].iter().map(|message| store.read(second, &message.location).unwrap().body).collect();
    assert_eq!(second_bodies, (0..5).map(|index| format!("b-{index}").into_bytes()).collect::<Vec<_>>());
    // New appends continue the old seqs, through the journal or not; the old removals hold.
    let pending = [store.append(first, 7, b"", b"new-1").unwrap(), store.append(second, 7, b"", b"new-2").unwrap()];
    let seqs: Vec<u64> = pending.into_iter().map(|pending| pending.wait().unwrap().seq).collect();
    assert_eq!(seqs, vec![41, 6]);
    let new_queue = store.create_log().unwrap().wait().unwrap();
    assert!(new_queue.0 > 3, "queue ids continue above the old ones");
    drop(store);
    let (store, recovered) = Store::open(RealFs::shared(), &dir, StoreConfig::default()).unwrap();
    assert_eq!(recovered.queues[&first].len(), 16);
    assert_eq!(recovered.queues[&second].len(), 6);
    let last = recovered.queues[&first].last().unwrap();
    assert_eq!(store.read(first, &last.location).unwrap().body, b"new-1");
    store.close().unwrap();
}

#[test]
fn a_restart_after_a_clean_close_does_not_sync_again_what_the_close_made_durable() {
    let sim = SimFs::new(21);
    let (store, _) = Store::open(sim.shared(), DIR, StoreConfig::default()).unwrap();
    let queues: Vec<LogId> = (0..40).map(|_| store.create_log().unwrap().wait().unwrap()).collect();
    let appended = append_until_journaled(&sim, &store, &queues);
    store.close().unwrap();
    // The marker's directory entry is made durable so that the next open sees the clean stop.
    sim.shared().sync_dir(Path::new(DIR)).unwrap();
    let syncs_before = sim.sync_count();
    let (store, recovered) = Store::open(sim.remount().shared(), DIR, StoreConfig::default()).unwrap();
    assert!(recovered.clean_stop);
    let syncs = sim.sync_count() - syncs_before;
    assert!(syncs < 10, "{syncs} syncs to reopen 40 queues after a clean close (a crash costs one per file)");
    assert_eq!(contents(&store, &recovered), appended);
    drop(store);
    // And all of it was durable: a power loss now takes nothing away.
    sim.crash(CrashMode::LoseUnsynced);
    let (store, recovered) = Store::open(sim.remount().shared(), DIR, StoreConfig::default()).unwrap();
    assert!(!recovered.clean_stop);
    assert_eq!(contents(&store, &recovered), appended);
    drop(store);
    // After a crash (no marker), recovery syncs every file it read again.
    sim.crash(CrashMode::KeepUnsynced);
    let syncs_before = sim.sync_count();
    let (_store, _) = Store::open(sim.remount().shared(), DIR, StoreConfig::default()).unwrap();
    assert!(sim.sync_count() - syncs_before > 40, "every queue's segment and directory synced after a crash");
}
