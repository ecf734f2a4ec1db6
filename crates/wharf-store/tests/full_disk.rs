//! A full disk: an append takes its space when it is submitted, so the disk being full refuses it
//! there (`NoSpace`, at once, nothing queued), and an append the store accepted is never failed
//! later for lack of space. Reservations for several logs are all or nothing. Removals still go
//! through, and once space is back (freed by the store itself or by someone else) appends
//! succeed again without a restart. On a file system without `fallocate`, a write that finds
//! the disk full stops the store instead of failing an accepted append.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use wharf_store::{CrashMode, LogId, PendingAppend, SimFs, Store, StoreConfig, StoreError};

const DIR: &str = "/data";

fn open_with(sim: &SimFs, config: StoreConfig) -> (Store, wharf_store::Recovered) {
    Store::open(sim.remount().shared(), DIR, config).unwrap()
}

fn open(sim: &SimFs) -> (Store, wharf_store::Recovered) {
    open_with(sim, StoreConfig::default())
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
fn a_full_disk_refuses_an_append_at_submission_and_keeps_what_was_durable() {
    let sim = SimFs::new(3);
    let (store, _) = open(&sim);
    let queue = store.create_log().unwrap().wait().unwrap();
    for index in 0..10u8 {
        store.append(queue, 1, b"", &[index; 100]).unwrap().wait().unwrap();
    }
    // Nothing more fits than what the log already holds allocated; far more than that is asked.
    sim.set_space_bytes_max(Some(sim.used_bytes()));
    let error = loop {
        match store.append(queue, 1, b"", &[99; 1000]) {
            Ok(pending) => pending.wait().expect("an accepted append is written"),
            Err(error) => break error,
        };
    };
    assert!(matches!(error, StoreError::NoSpace { .. }), "{error:?}");
    assert!(error.to_string().contains("no space left on device"), "{error}");
    assert!(!error.is_fatal());

    // Space comes back; the store carries on.
    sim.set_space_bytes_max(None);
    store.append(queue, 1, b"", b"after").unwrap().wait().unwrap();
    sim.crash(CrashMode::LoseUnsynced);
    drop(store);
    let bodies = live_bodies(&sim);
    assert_eq!(bodies[..10], (0..10u8).map(|index| vec![index; 100]).collect::<Vec<_>>());
    assert_eq!(bodies.last().unwrap(), b"after");
    assert!(bodies[10..bodies.len() - 1].iter().all(|body| body == &[99; 1000]));
}

#[test]
fn every_accepted_append_is_written_however_full_the_disk_gets() {
    let sim = SimFs::new(7);
    let config = StoreConfig { segment_bytes_max: 16 * 1024, ..StoreConfig::default() };
    let (store, _) = open_with(&sim, config.clone());
    let queues: Vec<LogId> = (0..3).map(|_| store.create_log().unwrap().wait().unwrap()).collect();
    sim.set_space_bytes_max(Some(sim.used_bytes() + 100 * 1024));
    // Left in flight, so that many are accepted before any is written: the disk fills while the
    // writer has work queued.
    let mut accepted: Vec<(u64, PendingAppend)> = Vec::new();
    let mut refused = 0;
    for id in 0..600u64 {
        let body = vec![id as u8; 200 + (id as usize * 37) % 900];
        match store.append(queues[id as usize % 3], id, b"", &body) {
            Ok(pending) => accepted.push((id, pending)),
            Err(StoreError::NoSpace { .. }) => refused += 1,
            Err(error) => panic!("append {id}: {error}"),
        }
    }
    assert!(refused > 0, "the disk never filled");
    assert!(!accepted.is_empty());
    let mut written = Vec::new();
    for (id, pending) in accepted {
        pending.wait().unwrap_or_else(|error| panic!("append {id} was accepted, then failed: {error}"));
        written.push(id);
    }
    sim.crash(CrashMode::LoseUnsynced);
    drop(store);
    let (store, recovered) = open_with(&sim, config);
    let mut recovered_ids: Vec<u64> = recovered
        .queues
        .iter()
        .flat_map(|(queue, messages)| messages.iter().map(|message| store.read(*queue, &message.location).unwrap()))
        .map(|message| message.timestamp_ms)
        .collect();
    recovered_ids.sort_unstable();
    assert_eq!(recovered_ids, written, "exactly the accepted appends are on disk");
}

/// How many reservations of `bytes` the log takes before the disk refuses one (all then dropped).
fn reservations_that_fit(store: &Store, queue: LogId, bytes: u64) -> usize {
    let mut held = Vec::new();
    while let Ok(mut reservation) = store.reserve(&[(queue, bytes)]) {
        held.append(&mut reservation);
        assert!(held.len() < 10_000, "the disk never refused a reservation");
    }
    held.len()
}

#[test]
fn a_reservation_for_several_logs_is_all_or_nothing() {
    let sim = SimFs::new(8);
    let (store, _) = open(&sim);
    let first = store.create_log().unwrap().wait().unwrap();
    let second = store.create_log().unwrap().wait().unwrap();
    store.append(first, 1, b"", &[1; 100]).unwrap().wait().unwrap();
    sim.set_space_bytes_max(Some(sim.used_bytes()));
    let record_bytes = Store::record_bytes(0, 100);
    let fit = reservations_that_fit(&store, first, record_bytes);
    assert!(fit > 0, "the first log has space allocated ahead");

    let error = store.reserve(&[(first, record_bytes), (second, record_bytes)]).unwrap_err();
    assert!(matches!(error, StoreError::NoSpace { .. }), "{error:?}");
    assert_eq!(reservations_that_fit(&store, first, record_bytes), fit, "the failed reservation held nothing");

    // What a reservation holds is the append's, however full the disk is meanwhile.
    sim.set_space_bytes_max(None);
    let held = store.reserve(&[(first, record_bytes), (second, record_bytes)]).unwrap();
    sim.set_space_bytes_max(Some(sim.used_bytes()));
    let mut pending = Vec::new();
    for (index, reservation) in held.into_iter().enumerate() {
        pending.push(store.append_reserved(reservation, 1, b"", &[2 + index as u8; 100], None).unwrap());
    }
    for append in pending {
        append.wait().unwrap();
    }
}

#[test]
fn removals_go_through_on_a_full_disk_and_appends_succeed_again_once_they_free_space() {
    let sim = SimFs::new(9);
    let config = StoreConfig { segment_bytes_max: 4 * 1024, ..StoreConfig::default() };
    let (store, _) = open_with(&sim, config);
    let queue = store.create_log().unwrap().wait().unwrap();
    sim.set_space_bytes_max(Some(sim.used_bytes() + 64 * 1024));
    let mut seqs = Vec::new();
    let error = loop {
        match store.append(queue, 1, b"", &[7; 500]) {
            Ok(pending) => seqs.push(pending.wait().unwrap().seq),
            Err(error) => break error,
        }
    };
    assert!(matches!(error, StoreError::NoSpace { .. }), "{error:?}");
    assert!(seqs.len() > 20);
    assert_eq!(store.stats().segments_deleted, 0);
    for seq in &seqs {
        store.remove(queue, *seq).unwrap().wait().unwrap();
    }
    // The sealed segments are deleted once their removals are durable.
    store.sync().unwrap().wait().unwrap();
    assert!(store.stats().segments_deleted > 0, "fully removed segments were deleted");
    for _ in 0..seqs.len() / 2 {
        store.append(queue, 1, b"", &[8; 500]).unwrap().wait().unwrap();
    }
}

#[test]
fn rolling_to_a_new_segment_on_a_full_disk_is_refused_cleanly() {
    let sim = SimFs::new(5);
    let config = StoreConfig { segment_bytes_max: 300, ..StoreConfig::default() };
    let (store, _) = Store::open(sim.shared(), DIR, config.clone()).unwrap();
    let queue = store.create_log().unwrap().wait().unwrap();
    store.append(queue, 1, b"", &[1; 150]).unwrap().wait().unwrap();
    // The next append needs a new segment: not even its header fits.
    sim.set_space_bytes_max(Some(sim.used_bytes() + 20));
    let error = store.append(queue, 1, b"", &[2; 150]).unwrap_err();
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
fn without_fallocate_a_write_that_finds_the_disk_full_stops_the_store() {
    let sim = SimFs::new(10);
    sim.set_allocation_supported(false);
    let (store, _) = open(&sim);
    let queue = store.create_log().unwrap().wait().unwrap();
    let kept = store.append(queue, 1, b"", b"durable before").unwrap().wait().unwrap();
    sim.set_space_bytes_max(Some(sim.used_bytes() + 50));
    let error = store.append(queue, 1, b"", &[9; 100]).unwrap().wait().unwrap_err();
    assert!(error.is_fatal(), "an accepted append is never failed as an ordinary error: {error:?}");
    assert!(matches!(store.append(queue, 1, b"", b"later"), Err(StoreError::Fatal { .. })));
    sim.set_space_bytes_max(None);
    sim.crash(CrashMode::LoseUnsynced);
    drop(store);
    let (store, recovered) = open(&sim);
    let bodies: Vec<Vec<u8>> =
        recovered.queues[&queue].iter().map(|message| store.read(queue, &message.location).unwrap().body).collect();
    assert_eq!(bodies, vec![b"durable before".to_vec()]);
    assert_eq!(recovered.queues[&queue][0].seq, kept.seq);
}

#[test]
fn a_crash_after_a_refused_roll_recovers_the_empty_newest_segment() {
    for mode in [CrashMode::KeepUnsynced, CrashMode::LoseUnsynced, CrashMode::Random] {
        let sim = SimFs::new(11);
        let config = StoreConfig { segment_bytes_max: 300, ..StoreConfig::default() };
        let (store, _) = Store::open(sim.shared(), DIR, config.clone()).unwrap();
        let queue = store.create_log().unwrap().wait().unwrap();
        store.append(queue, 1, b"", &[1; 150]).unwrap().wait().unwrap();
        // The new segment's header fits, the record does not: the roll happens, the append not.
        sim.set_space_bytes_max(Some(sim.used_bytes() + 100));
        assert!(matches!(store.append(queue, 1, b"", &[2; 150]), Err(StoreError::NoSpace { .. })));
        store.sync().unwrap().wait().unwrap();
        sim.crash(mode);
        drop(store);
        sim.set_space_bytes_max(None);
        let (store, recovered) = Store::open(sim.remount().shared(), DIR, config.clone()).unwrap();
        assert_eq!(recovered.queues[&queue].len(), 1, "{mode:?}");
        store.append(queue, 1, b"", &[3; 150]).unwrap().wait().unwrap();
        drop(store);
        let (store, recovered) = Store::open(sim.remount().shared(), DIR, config).unwrap();
        let bodies: Vec<u8> = recovered.queues[&queue]
            .iter()
            .map(|message| store.read(queue, &message.location).unwrap().body[0])
            .collect();
        assert_eq!(bodies, vec![1, 3], "{mode:?}");
    }
}
