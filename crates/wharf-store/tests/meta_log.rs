//! The definitions log: batches are applied whole and durably, survive crashes, a torn batch is
//! dropped whole, compaction replaces the log atomically, and limits are enforced.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use wharf_store::{CrashMode, MetaChange, MetaStore, RecoveryIssue, SimFs, StoreError};

const DIR: &str = "/data/meta";

fn open(sim: &SimFs) -> (MetaStore, BTreeMap<Vec<u8>, Vec<u8>>, Vec<RecoveryIssue>) {
    let (meta, recovered) = MetaStore::open(sim.remount().shared(), DIR).unwrap();
    (meta, recovered.entries, recovered.issues)
}

fn put(key: &str, value: &str) -> MetaChange {
    MetaChange::Put { key: key.as_bytes().to_vec(), value: value.as_bytes().to_vec() }
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<Vec<u8>, Vec<u8>> {
    pairs.iter().map(|(key, value)| (key.as_bytes().to_vec(), value.as_bytes().to_vec())).collect()
}

#[test]
fn definitions_survive_a_power_loss() {
    let sim = SimFs::new(1);
    let (meta, initial, issues) = open(&sim);
    assert!(initial.is_empty() && issues.is_empty());
    meta.put(b"queue/%2F/orders", b"durable").unwrap();
    meta.apply(&[put("exchange/%2F/events", "topic"), put("binding/1", "orders<-events")]).unwrap();
    meta.delete(b"binding/1").unwrap();
    meta.put(b"queue/%2F/orders", b"durable,lazy").unwrap();
    assert_eq!(meta.get(b"queue/%2F/orders").unwrap(), b"durable,lazy");
    sim.crash(CrashMode::LoseUnsynced);

    let (_, entries, issues) = open(&sim);
    assert!(issues.is_empty(), "{issues:?}");
    assert_eq!(entries, map(&[("exchange/%2F/events", "topic"), ("queue/%2F/orders", "durable,lazy")]));
}

#[test]
fn a_torn_batch_is_dropped_whole() {
    let sim = SimFs::new(2);
    let (meta, _, _) = open(&sim);
    meta.put(b"kept", b"1").unwrap();
    let log = Path::new(DIR).join("definitions.log");
    let before = sim.read_file(&log).unwrap();
    meta.apply(&[put("a", "1"), put("b", "2"), put("c", "3")]).unwrap();
    let after = sim.read_file(&log).unwrap();
    drop(meta);
    // Keep only part of the last batch, as a crash in the middle of its write would.
    let torn = SimFs::new(3);
    let _ = MetaStore::open(torn.shared(), DIR).unwrap();
    wharf_store::Fs::remove_file(&torn, &log).unwrap();
    let file = wharf_store::Fs::open(&torn, &log, wharf_store::OpenMode::CreateNew).unwrap();
    let cut = before.len() + (after.len() - before.len()) / 2;
    file.write_all_at(&after[..cut], 0).unwrap();
    file.sync_data().unwrap();

    let (_, recovered) = MetaStore::open(torn.remount().shared(), DIR).unwrap();
    let (entries, issues) = (recovered.entries, recovered.issues);
    assert_eq!(entries, map(&[("kept", "1")]));
    assert!(matches!(&issues[..], [RecoveryIssue::TruncatedTail { offset, .. }] if *offset == before.len() as u64));
}

#[test]
fn compaction_keeps_the_map_and_bounds_the_log() {
    let sim = SimFs::new(4);
    let (meta, _, _) = open(&sim);
    let value = vec![7u8; 100 * 1024];
    for round in 0..60u8 {
        let mut value = value.clone();
        value[0] = round;
        meta.put(b"big", &value).unwrap();
        meta.put(format!("small/{round}").as_bytes(), b"x").unwrap();
    }
    let log_bytes = sim.read_file(&Path::new(DIR).join("definitions.log")).unwrap().len();
    assert!(log_bytes < 3 * 1024 * 1024, "60 rewrites of 100 KiB were compacted away: {log_bytes} bytes");
    sim.crash(CrashMode::Random);

    let (_, entries, issues) = open(&sim);
    assert!(issues.is_empty(), "{issues:?}");
    assert_eq!(entries.len(), 61);
    assert_eq!(entries[&b"big".to_vec()][0], 59);
}

#[test]
fn a_compaction_that_fails_before_its_rename_keeps_the_old_log() {
    let sim = SimFs::new(5);
    let (meta, _, _) = open(&sim);
    let log = Path::new(DIR).join("definitions.log");
    let value = vec![1u8; 600 * 1024];
    for _ in 0..3 {
        meta.put(b"big", &value).unwrap();
    }
    // The fourth put makes the log large enough to compact. Its own sync succeeds; the sync of
    // the compacted temporary file fails, so the compaction is abandoned.
    sim.fail_syncs_after(1, 1);
    meta.put(b"big", &value).unwrap();
    assert!(sim.read_file(&log).unwrap().len() > 4 * value.len(), "the old log is still in place");
    sim.crash(CrashMode::LoseUnsynced);

    let (meta, entries, issues) = open(&sim);
    assert!(issues.is_empty(), "{issues:?}");
    assert_eq!(entries[&b"big".to_vec()], value);
    assert!(
        !sim.remount().list_files(Path::new(DIR)).unwrap().iter().any(|path| path.ends_with("definitions.log.tmp"))
    );
    // With a healthy disk the next write compacts.
    meta.put(b"big", &value).unwrap();
    assert!(sim.remount().read_file(&log).unwrap().len() < 2 * value.len());
}

#[test]
fn a_failed_sync_stops_the_log() {
    let sim = SimFs::new(8);
    let (meta, _, _) = open(&sim);
    meta.put(b"kept", b"1").unwrap();
    sim.fail_next_syncs(1);
    assert!(matches!(meta.put(b"lost", b"2"), Err(StoreError::Fatal { .. })));
    assert!(matches!(meta.put(b"later", b"3"), Err(StoreError::Fatal { .. })));
    sim.crash(CrashMode::LoseUnsynced);
    let (_, entries, _) = open(&sim);
    assert_eq!(entries, map(&[("kept", "1")]));
}

#[test]
fn limits_are_enforced() {
    let sim = SimFs::new(6);
    let (meta, _, _) = open(&sim);
    let long_key = vec![b'k'; wharf_store::META_KEY_BYTES_MAX + 1];
    let error = meta.put(&long_key, b"v").unwrap_err();
    assert!(error.to_string().contains("definition key"), "{error}");
    let huge_value = vec![0u8; wharf_store::META_VALUE_BYTES_MAX + 1];
    assert!(matches!(meta.put(b"k", &huge_value), Err(StoreError::TooLarge { .. })));
    // A refused change leaves the map as it was.
    assert!(meta.entries().is_empty());
}

#[test]
fn a_full_disk_fails_the_batch_and_keeps_the_log_usable() {
    let sim = SimFs::new(7);
    let (meta, _, _) = open(&sim);
    meta.put(b"before", b"1").unwrap();
    sim.set_space_bytes_max(Some(sim.used_bytes() + 20));
    let error = meta.put(b"too-big-for-the-disk", &[0u8; 200]).unwrap_err();
    assert!(matches!(error, StoreError::NoSpace { .. }), "{error:?}");
    sim.set_space_bytes_max(None);
    meta.put(b"after", b"2").unwrap();
    sim.crash(CrashMode::LoseUnsynced);
    let (_, entries, issues) = open(&sim);
    assert!(issues.is_empty(), "{issues:?}");
    assert_eq!(entries, map(&[("after", "2"), ("before", "1")]));
}
