//! Failing hardware: a failed fsync stops the store (nothing in the failed batch reports success,
//! nothing after it is accepted), and a full disk fails only the appends that did not fit, with a
//! clear error, losing nothing that was durable before.
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
fn a_full_disk_fails_the_append_clearly_and_keeps_what_was_durable() {
    let sim = SimFs::new(3);
    let (store, _) = open(&sim);
    let queue = store.create_log().unwrap().wait().unwrap();
    for index in 0..10u8 {
        store.append(queue, 1, b"", &[index; 100]).unwrap().wait().unwrap();
    }
    sim.set_space_bytes_max(Some(sim.used_bytes() + 50));
    let error = store.append(queue, 1, b"", &[99; 100]).unwrap().wait().unwrap_err();
    assert!(matches!(error, StoreError::NoSpace { .. }), "{error:?}");
    assert!(error.to_string().contains("no space left on device"), "{error}");
    assert!(!error.is_fatal());
    // The half-written record was undone: it takes no space and can never be read back.
    let error = store.append(queue, 1, b"", &[98; 100]).unwrap().wait().unwrap_err();
    assert!(matches!(error, StoreError::NoSpace { .. }));

    // Space comes back; the store carries on.
    sim.set_space_bytes_max(None);
    store.append(queue, 1, b"", b"after").unwrap().wait().unwrap();
    sim.crash(CrashMode::LoseUnsynced);
    drop(store);

    let mut expected: Vec<Vec<u8>> = (0..10u8).map(|index| vec![index; 100]).collect();
    expected.push(b"after".to_vec());
    assert_eq!(live_bodies(&sim), expected);
}

#[test]
fn a_full_disk_fails_a_removal_without_losing_the_message() {
    let sim = SimFs::new(4);
    let (store, _) = open(&sim);
    let queue = store.create_log().unwrap().wait().unwrap();
    let receipt = store.append(queue, 1, b"", b"stays").unwrap().wait().unwrap();
    sim.set_space_bytes_max(Some(sim.used_bytes() + 10));
    let error = store.remove(queue, receipt.seq).unwrap().wait().unwrap_err();
    assert!(matches!(error, StoreError::NoSpace { .. }), "{error:?}");
    sim.set_space_bytes_max(None);
    // The message is still live: a second removal is recorded for real.
    store.remove(queue, receipt.seq).unwrap().wait().unwrap();
    store.sync().unwrap().wait().unwrap();
    sim.crash(CrashMode::LoseUnsynced);
    drop(store);
    assert!(live_bodies(&sim).is_empty());
}

#[test]
fn a_full_disk_while_rolling_to_a_new_segment_fails_cleanly() {
    let sim = SimFs::new(5);
    let config = StoreConfig { segment_bytes_max: 300, ..StoreConfig::default() };
    let (store, _) = Store::open(sim.shared(), DIR, config.clone()).unwrap();
    let queue = store.create_log().unwrap().wait().unwrap();
    store.append(queue, 1, b"", &[1; 150]).unwrap().wait().unwrap();
    // The next append needs a new segment: not even its header fits.
    sim.set_space_bytes_max(Some(sim.used_bytes() + 20));
    let error = store.append(queue, 1, b"", &[2; 150]).unwrap().wait().unwrap_err();
    assert!(matches!(error, StoreError::NoSpace { .. }), "{error:?}");
    sim.set_space_bytes_max(None);
    store.append(queue, 1, b"", &[3; 150]).unwrap().wait().unwrap();
    sim.crash(CrashMode::LoseUnsynced);
    drop(store);
    let (store, recovered) = Store::open(sim.remount().shared(), DIR, config).unwrap();
    let bodies: Vec<u8> =
        recovered.queues[&queue].iter().map(|message| store.read(queue, &message.location).unwrap().body[0]).collect();
    assert_eq!(bodies, vec![1, 3]);
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
