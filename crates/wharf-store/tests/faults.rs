//! Failing hardware: a failed fsync stops the store (nothing in the failed batch reports success,
//! nothing after it is accepted). A full disk is in `full_disk.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use wharf_store::{CrashMode, SimFs, Store, StoreConfig, StoreError};

const DIR: &str = "/data";

fn open(sim: &SimFs) -> (Store, wharf_store::Recovered) {
    Store::open(sim.remount().shared(), DIR, StoreConfig::default()).unwrap()
}

fn live_bodies(sim: &SimFs) -> Vec<Vec<u8>> {
    let (store, recovered) = open(sim);
    recovered
        .queues
        .iter()
        .flat_map(|(queue, messages)| {
            messages.iter().map(|message| store.read(*queue, &message.location).unwrap().body)
        })
        .collect()
}

#[test]
fn a_failed_fsync_is_fatal_and_no_completion_of_that_batch_reports_success() {
    let sim = SimFs::new(1);
    let (store, _) = open(&sim);
    let queue = store.create_log().unwrap().wait().unwrap();
    store.append(queue, 1, b"", b"durable before").unwrap().wait().unwrap();

    sim.fail_next_syncs(1);
    // Some of these reach the failing batch, the rest are refused once the store has stopped.
    let outcomes: Vec<_> =
        (0..50u8).map(|index| store.append(queue, 1, b"", &[index]).and_then(|pending| pending.wait())).collect();
    for outcome in outcomes {
        let error = outcome.expect_err("no append may succeed once a sync failed");
        assert!(error.is_fatal(), "{error}");
        assert!(error.to_string().contains("fdatasync"), "the error names the failed sync: {error}");
    }
    // Everything after is refused with the same fatal error, without touching the disk.
    assert!(matches!(store.append(queue, 1, b"", b"later"), Err(StoreError::Fatal { .. })));
    assert!(matches!(store.remove(queue, 1), Err(StoreError::Fatal { .. })));
    assert!(matches!(store.sync(), Err(StoreError::Fatal { .. })));
    assert!(store.read(queue, &wharf_store::MessageLocation { segment_id: 1, offset: 64, record_bytes: 41 }).is_err());

    // Recovery reads the disk: the message durable before is there.
    sim.crash(CrashMode::LoseUnsynced);
    drop(store);
    assert_eq!(live_bodies(&sim), vec![b"durable before".to_vec()]);
}

#[test]
fn a_failed_ack_log_sync_is_fatal_too() {
    let sim = SimFs::new(2);
    let (store, _) = open(&sim);
    let queue = store.create_log().unwrap().wait().unwrap();
    let receipt = store.append(queue, 1, b"", b"x").unwrap().wait().unwrap();
    store.remove(queue, receipt.seq).unwrap().wait().unwrap();
    sim.fail_next_syncs(1);
    let error = store.sync().unwrap().wait().unwrap_err();
    assert!(error.is_fatal(), "{error}");
    assert!(matches!(store.append(queue, 1, b"", b"y"), Err(StoreError::Fatal { .. })));
}

#[test]
fn failing_syncs_during_recovery_refuse_to_open() {
    let sim = SimFs::new(6);
    let (store, _) = open(&sim);
    let queue = store.create_log().unwrap().wait().unwrap();
    store.append(queue, 1, b"", b"x").unwrap().wait().unwrap();
    store.close().unwrap();
    sim.fail_next_syncs(1);
    let error = Store::open(sim.remount().shared(), DIR, StoreConfig::default()).unwrap_err();
    assert!(error.to_string().contains("syncing"), "{error}");
    // Once the disk behaves, the data is all there.
    assert_eq!(live_bodies(&sim), vec![b"x".to_vec()]);
}

#[test]
fn a_log_whose_directory_cannot_be_opened_for_lack_of_descriptors_is_refused_not_fatal() {
    let sim = SimFs::new(4);
    let (store, _) = open(&sim);
    let kept = store.create_log().unwrap().wait().unwrap();
    store.append(kept, 1, b"", b"before").unwrap().wait().unwrap();
    sim.fail_next_dir_opens(1);
    let refused = store.create_log().and_then(|pending| pending.wait()).expect_err("no descriptor to sync with");
    assert!(!refused.is_fatal(), "{refused}");
    assert!(matches!(refused, StoreError::Io { .. }), "{refused}");
    // The store goes on: appends, and the next log once descriptors are back.
    store.append(kept, 1, b"", b"after").unwrap().wait().unwrap();
    let next = store.create_log().unwrap().wait().unwrap();
    store.append(next, 1, b"", b"new").unwrap().wait().unwrap();
    drop(store);
    let mut bodies = live_bodies(&sim);
    bodies.sort();
    assert_eq!(bodies, vec![b"after".to_vec(), b"before".to_vec(), b"new".to_vec()], "the refused log left nothing");
}
