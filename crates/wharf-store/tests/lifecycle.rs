//! The store's everyday life: queues created and deleted, appends from many threads and from async
//! code, segments rolled and deleted once fully removed, ack-log segments deleted once unneeded,
//! delivery counts kept, limits enforced, and everything the same after a reopen.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::{Future, IntoFuture};
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use wharf_store::{CrashMode, LogId, RealFs, SimFs, Store, StoreConfig, StoreError};

const DIR: &str = "/data";

fn small_segments() -> StoreConfig {
    StoreConfig { segment_bytes_max: 1_000, ack_segment_bytes_max: 400, ..StoreConfig::default() }
}

fn bodies(store: &Store, queue: LogId, recovered: &wharf_store::Recovered) -> Vec<Vec<u8>> {
    recovered.queues[&queue].iter().map(|message| store.read(queue, &message.location).unwrap().body).collect()
}

/// Each recovered message of `queue` as (seq, delivery count).
fn counts(recovered: &wharf_store::Recovered, queue: LogId) -> Vec<(u64, u32)> {
    recovered.queues[&queue].iter().map(|message| (message.seq, message.delivery_count)).collect()
}

/// Crashes, losing whatever was not synced, and opens the store again.
fn crash_and_reopen(sim: &SimFs, store: Store, config: StoreConfig) -> (Store, wharf_store::Recovered) {
    sim.crash(CrashMode::LoseUnsynced);
    drop(store);
    Store::open(sim.remount().shared(), DIR, config).unwrap()
}

#[test]
fn concurrent_appenders_on_the_real_file_system_keep_everything_in_order() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let (store, recovered) = Store::open(RealFs::shared(), &dir, StoreConfig::default()).unwrap();
    assert!(recovered.queues.is_empty() && recovered.issues.is_empty());
    let queues: Vec<LogId> = (0..4).map(|_| store.create_log().unwrap().wait().unwrap()).collect();
    let threads: Vec<_> = (0..8u32)
        .map(|thread| {
            let store = store.clone();
            let queue = queues[thread as usize % queues.len()];
            std::thread::spawn(move || {
                for index in 0..200u32 {
                    let body = [thread.to_le_bytes(), index.to_le_bytes()].concat();
                    store.append(queue, u64::from(index), b"m", &body).unwrap().wait().unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let stats = store.stats();
    assert_eq!(stats.appends, 1_600);
    drop(store);

    let (store, recovered) = Store::open(RealFs::shared(), &dir, StoreConfig::default()).unwrap();
    assert!(recovered.issues.is_empty(), "{:?}", recovered.issues);
    let mut total = 0;
    for queue in &queues {
        let mut last_index_per_thread = std::collections::HashMap::new();
        for body in bodies(&store, *queue, &recovered) {
            let thread = u32::from_le_bytes(body[..4].try_into().unwrap());
            let index = u32::from_le_bytes(body[4..].try_into().unwrap());
            let previous = last_index_per_thread.insert(thread, index);
            assert!(previous.is_none_or(|previous| previous < index), "per-appender order is kept");
            total += 1;
        }
    }
    assert_eq!(total, 1_600);
}

struct ThreadWaker(std::thread::Thread);
impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// A minimal executor, to show tickets need no particular async runtime.
fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut context = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        std::thread::park();
    }
}

#[test]
fn tickets_can_be_awaited() {
    let sim = SimFs::new(1);
    let (store, _) = Store::open(sim.shared(), DIR, StoreConfig::default()).unwrap();
    let receipt = block_on(async {
        let queue = store.create_log()?.await?;
        let receipt = store.append(queue, 5, b"meta", b"body")?.ticket.await?;
        store.remove(queue, receipt.seq)?.await?;
        store.sync()?.into_future().await?;
        Ok::<_, StoreError>(receipt)
    })
    .unwrap();
    assert_eq!(receipt.seq, 1);
}

#[test]
fn fully_removed_segments_and_unneeded_ack_segments_are_deleted() {
    let sim = SimFs::new(2);
    let (store, _) = Store::open(sim.shared(), DIR, small_segments()).unwrap();
    let queue = store.create_log().unwrap().wait().unwrap();
    let receipts: Vec<_> =
        (0..100u8).map(|index| store.append(queue, 1, b"", &[index; 60]).unwrap().wait().unwrap()).collect();
    let segments_used = receipts.last().unwrap().location.segment_id;
    assert!(segments_used > 5, "the test needs many segments");
    for receipt in &receipts {
        store.remove(queue, receipt.seq).unwrap().wait().unwrap();
    }
    store.sync().unwrap().wait().unwrap();
    let stats = store.stats();
    assert_eq!(stats.segments_deleted, segments_used - 1, "every sealed segment goes; the active one stays");
    assert!(stats.ack_segments_deleted > 0, "ack segments that only spoke of deleted segments go too");
    let queue_files = sim.list_files(&Path::new(DIR).join("queues")).unwrap();
    assert_eq!(queue_files.len(), 1, "{queue_files:?}");
    drop(store);

    let (_, recovered) = Store::open(sim.remount().shared(), DIR, small_segments()).unwrap();
    assert!(recovered.queues[&queue].is_empty());
    assert!(recovered.issues.is_empty(), "{:?}", recovered.issues);
}

#[test]
fn removals_become_durable_lazily_on_their_own() {
    let sim = SimFs::new(3);
    let config = StoreConfig { ack_sync_interval_ms: 20, ..StoreConfig::default() };
    let (store, _) = Store::open(sim.shared(), DIR, config.clone()).unwrap();
    let queue = store.create_log().unwrap().wait().unwrap();
    let receipt = store.append(queue, 1, b"", b"acked").unwrap().wait().unwrap();
    let syncs_before = store.stats().ack_log_syncs;
    store.remove(queue, receipt.seq).unwrap().wait().unwrap();
    // No explicit sync: the writer's lazy timer makes the removal durable by itself.
    while store.stats().ack_log_syncs == syncs_before {
        std::thread::yield_now();
    }
    let (_, recovered) = crash_and_reopen(&sim, store, config);
    assert!(recovered.queues[&queue].is_empty());
}

#[test]
fn an_unsynced_removal_lost_in_a_crash_means_a_redelivery_not_a_loss() {
    let sim = SimFs::new(4);
    let config = StoreConfig { ack_sync_interval_ms: 3_600_000, ..StoreConfig::default() };
    let (store, _) = Store::open(sim.shared(), DIR, config.clone()).unwrap();
    let queue = store.create_log().unwrap().wait().unwrap();
    let receipt = store.append(queue, 1, b"", b"comes back").unwrap().wait().unwrap();
    store.remove(queue, receipt.seq).unwrap().wait().unwrap();
    let (store, recovered) = crash_and_reopen(&sim, store, config);
    assert_eq!(bodies(&store, queue, &recovered), vec![b"comes back".to_vec()]);
}

#[test]
fn delivery_counts_survive_restarts_and_only_grow() {
    let sim = SimFs::new(5);
    let (store, _) = Store::open(sim.shared(), DIR, small_segments()).unwrap();
    let queue = store.create_log().unwrap().wait().unwrap();
    let first = store.append(queue, 1, b"", b"a").unwrap().wait().unwrap();
    let second = store.append(queue, 1, b"", b"b").unwrap().wait().unwrap();
    for count in 1..=3 {
        store.set_delivery_count(queue, first.seq, count).unwrap().wait().unwrap();
    }
    // A stale, lower count written later does not lower the recorded one.
    store.set_delivery_count(queue, first.seq, 2).unwrap().wait().unwrap();
    store.sync().unwrap().wait().unwrap();

    let (store, recovered) = crash_and_reopen(&sim, store, small_segments());
    assert_eq!(counts(&recovered, queue), vec![(first.seq, 3), (second.seq, 0)]);
    // Many restarts later (a crash loop), the count keeps climbing from where it was.
    drop(store);
    let mut count = 3;
    for _ in 0..5 {
        let (store, recovered) = Store::open(sim.remount().shared(), DIR, small_segments()).unwrap();
        assert_eq!(recovered.queues[&queue][0].delivery_count, count);
        count += 1;
        store.set_delivery_count(queue, first.seq, count).unwrap().wait().unwrap();
        store.sync().unwrap().wait().unwrap();
        sim.crash(CrashMode::LoseUnsynced);
    }
}

#[test]
fn unawaited_removals_and_delivery_counts_are_recorded_like_awaited_ones() {
    let sim = SimFs::new(6);
    let (store, _) = Store::open(sim.shared(), DIR, small_segments()).unwrap();
    let queue = store.create_log().unwrap().wait().unwrap();
    let removed = store.append(queue, 1, b"", b"removed").unwrap().wait().unwrap();
    let counted = store.append(queue, 1, b"", b"counted").unwrap().wait().unwrap();
    store.remove_unawaited(queue, removed.seq).unwrap();
    store.set_delivery_count_unawaited(queue, counted.seq, 1).unwrap();
    // A sync covers everything submitted before it, unawaited operations included.
    store.sync().unwrap().wait().unwrap();

    let (store, recovered) = crash_and_reopen(&sim, store, small_segments());
    assert_eq!(counts(&recovered, queue), vec![(counted.seq, 1)]);
    assert_eq!(bodies(&store, queue, &recovered), vec![b"counted".to_vec()]);
}

#[test]
fn deleted_queues_are_gone_and_their_ids_never_come_back() {
    let sim = SimFs::new(6);
    let (store, _) = Store::open(sim.shared(), DIR, StoreConfig::default()).unwrap();
    let kept = store.create_log().unwrap().wait().unwrap();
    let doomed = store.create_log().unwrap().wait().unwrap();
    store.append(kept, 1, b"", b"kept").unwrap().wait().unwrap();
    let receipt = store.append(doomed, 1, b"", b"doomed").unwrap().wait().unwrap();
    store.remove(doomed, receipt.seq).unwrap().wait().unwrap();
    store.delete_log(doomed).unwrap().wait().unwrap();
    assert!(matches!(store.append(doomed, 1, b"", b"x"), Err(StoreError::UnknownLog(_))));
    assert!(matches!(store.delete_log(doomed).unwrap().wait(), Err(StoreError::UnknownLog(_))));
    assert_eq!(store.log_ids(), vec![kept]);

    let (store, recovered) = crash_and_reopen(&sim, store, StoreConfig::default());
    assert_eq!(recovered.queues.keys().copied().collect::<Vec<_>>(), vec![kept]);
    assert_eq!(bodies(&store, kept, &recovered), vec![b"kept".to_vec()]);
    let fresh = store.create_log().unwrap().wait().unwrap();
    assert!(fresh.0 > doomed.0, "ids are never reused, even the highest deleted one after a restart");
}

#[test]
fn an_interrupted_queue_deletion_is_finished_by_recovery() {
    let sim = SimFs::new(7);
    let (store, _) = Store::open(sim.shared(), DIR, StoreConfig::default()).unwrap();
    let queue = store.create_log().unwrap().wait().unwrap();
    store.append(queue, 1, b"", b"x").unwrap().wait().unwrap();
    store.close().unwrap();
    // The state a crash right after the deletion's rename leaves behind.
    let queues = Path::new(DIR).join("queues");
    let fs = sim.remount();
    let name = format!("q-{:016x}", queue.0);
    wharf_store::Fs::rename(&fs, &queues.join(&name), &queues.join(format!("{name}.deleted"))).unwrap();
    wharf_store::Fs::sync_dir(&fs, &queues).unwrap();

    let (_, recovered) = Store::open(sim.remount().shared(), DIR, StoreConfig::default()).unwrap();
    assert!(recovered.queues.is_empty());
    assert!(sim.list_files(&queues).unwrap().is_empty());
}

#[test]
fn limits_are_enforced_with_clear_errors() {
    let sim = SimFs::new(8);
    let config = StoreConfig { queue_count_max: 2, ..StoreConfig::default() };
    let (store, _) = Store::open(sim.shared(), DIR, config).unwrap();
    let queue = store.create_log().unwrap().wait().unwrap();
    store.create_log().unwrap().wait().unwrap();
    let error = store.create_log().unwrap().wait().unwrap_err();
    assert!(matches!(error, StoreError::QueueLimit { limit: 2 }), "{error:?}");

    let huge_meta = vec![0u8; wharf_store::format::META_BYTES_MAX + 1];
    let error = store.append(queue, 1, &huge_meta, b"").unwrap_err();
    assert!(error.to_string().contains("message meta"), "{error}");
    let error = store.append(LogId(999), 1, b"", b"").unwrap_err();
    assert!(matches!(error, StoreError::UnknownLog(999)));
    assert!(matches!(store.remove(LogId(999), 1).unwrap().wait(), Err(StoreError::UnknownLog(999))));
    // Removing what is not live is a harmless no-op (acks may be repeated).
    store.remove(queue, 12_345).unwrap().wait().unwrap();

    for bad in [
        StoreConfig { segment_bytes_max: 10, ..StoreConfig::default() },
        StoreConfig { ack_segment_bytes_max: u64::MAX, ..StoreConfig::default() },
        StoreConfig { pending_ops_max: 0, ..StoreConfig::default() },
    ] {
        let error = Store::open(SimFs::new(9).shared(), DIR, bad).unwrap_err();
        assert!(matches!(error, StoreError::Config(_)), "{error:?}");
    }
}

#[test]
fn a_closed_store_refuses_work() {
    let sim = SimFs::new(10);
    let (store, _) = Store::open(sim.shared(), DIR, StoreConfig::default()).unwrap();
    let other = store.clone();
    let queue = store.create_log().unwrap().wait().unwrap();
    store.close().unwrap();
    let outcome = other.append(queue, 1, b"", b"x").and_then(|pending| pending.wait());
    assert!(matches!(outcome, Err(StoreError::Closed)), "{outcome:?}");
}

#[test]
fn a_message_can_be_removed_before_its_append_is_durable() {
    // A broker may deliver before the sync and get the ack back quickly; the removal must apply.
    let sim = SimFs::new(11);
    let (store, _) = Store::open(sim.shared(), DIR, StoreConfig::default()).unwrap();
    let queue = store.create_log().unwrap().wait().unwrap();
    let pending = store.append(queue, 1, b"", b"quick").unwrap();
    let removal = store.remove(queue, pending.seq).unwrap();
    pending.wait().unwrap();
    removal.wait().unwrap();
    store.sync().unwrap().wait().unwrap();
    let (_, recovered) = crash_and_reopen(&sim, store, StoreConfig::default());
    assert!(recovered.queues[&queue].is_empty());
}

#[test]
fn a_data_directory_is_opened_by_one_store_at_a_time() {
    let temp = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(RealFs::shared(), temp.path(), StoreConfig::default()).unwrap();
    let error = Store::open(RealFs::shared(), temp.path(), StoreConfig::default()).unwrap_err();
    assert!(matches!(error, StoreError::Locked { .. }), "{error:?}");
    assert!(error.to_string().contains("in use by another process"), "{error}");
    store.close().unwrap();
    Store::open(RealFs::shared(), temp.path(), StoreConfig::default()).expect("the lock goes with the store");
}

#[test]
fn appenders_wait_for_room_in_the_byte_budget_and_all_complete() {
    let sim = SimFs::new(12);
    // Room for about two 1 KiB records at a time.
    let config = StoreConfig { pending_bytes_max: 2_500, ..StoreConfig::default() };
    let (store, _) = Store::open(sim.shared(), DIR, config).unwrap();
    let queue = store.create_log().unwrap().wait().unwrap();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || {
                for _ in 0..50 {
                    store.append(queue, 1, b"", &[7u8; 1024]).unwrap().wait().unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(store.stats().appends, 200);
    // A record larger than the whole budget still goes through on its own.
    store.append(queue, 1, b"", &[1u8; 10_000]).unwrap().wait().unwrap();
}

#[test]
fn read_each_returns_what_read_returns_across_segments() {
    let sim = SimFs::new(9);
    let (store, _) = Store::open(sim.shared(), DIR, small_segments()).unwrap();
    let queue = store.create_log().unwrap().wait().unwrap();
    let receipts: Vec<_> = (0..60u8)
        .map(|index| store.append(queue, u64::from(index), &[index; 3], &[index; 50]).unwrap().wait().unwrap())
        .collect();
    assert!(receipts.last().unwrap().location.segment_id > 3, "the test needs several segments");
    // Every other record, as recovery would ask after removals.
    let wanted: Vec<_> = receipts.iter().step_by(2).map(|receipt| receipt.location).collect();
    let mut seen = Vec::new();
    store.read_each(queue, &wanted, &mut |index, record| {
        let record = record.unwrap();
        let single = store.read(queue, &wanted[index]).unwrap();
        assert_eq!(
            (record.timestamp_ms, record.meta, record.body),
            (single.timestamp_ms, &single.meta[..], &single.body[..])
        );
        seen.push(index);
    });
    assert_eq!(seen, (0..wanted.len()).collect::<Vec<_>>());
}

#[test]
fn recovery_hands_back_each_live_message_meta_and_body_length() {
    let sim = SimFs::new(10);
    let (store, _) = Store::open(sim.shared(), DIR, small_segments()).unwrap();
    let queue = store.create_log().unwrap().wait().unwrap();
    let receipts: Vec<_> = (0..40u8)
        .map(|index| {
            let meta = vec![index; usize::from(index % 7)];
            store.append(queue, 1, &meta, &vec![index; usize::from(index) + 10]).unwrap().wait().unwrap()
        })
        .collect();
    for receipt in receipts.iter().step_by(3) {
        store.remove(queue, receipt.seq).unwrap().wait().unwrap();
    }
    store.close().unwrap();
    let (store, recovered) = Store::open(sim.remount().shared(), DIR, small_segments()).unwrap();
    let live = &recovered.queues[&queue];
    assert_eq!(live.len(), 40 - 14);
    for message in live {
        let stored = store.read(queue, &message.location).unwrap();
        assert_eq!(recovered.meta(queue, message), Some(&stored.meta[..]), "seq {}", message.seq);
        assert_eq!(message.body_bytes(), stored.body.len() as u64, "seq {}", message.seq);
    }
}

#[test]
fn only_a_close_leaves_a_clean_stop_and_the_next_open_consumes_it() {
    let sim = SimFs::new(7);
    let (store, recovered) = Store::open(sim.shared(), DIR, StoreConfig::default()).unwrap();
    assert!(!recovered.clean_stop, "a new store has no clean stop behind it");
    store.close().unwrap();
    assert!(sim.shared().exists(&Path::new(DIR).join(wharf_store::CLEAN_STOP_MARKER)).unwrap());
    let (store, recovered) = Store::open(sim.shared(), DIR, StoreConfig::default()).unwrap();
    assert!(recovered.clean_stop, "closed cleanly");
    // Gone once opened (durably, even through a power loss): a crash from here on is not clean.
    sim.crash(CrashMode::LoseUnsynced);
    drop(store);
    let sim = sim.remount();
    let (store, recovered) = Store::open(sim.shared(), DIR, StoreConfig::default()).unwrap();
    assert!(!recovered.clean_stop, "a crash after a clean start is not a clean stop");
    drop(store);
    let (_store, recovered) = Store::open(sim.shared(), DIR, StoreConfig::default()).unwrap();
    assert!(!recovered.clean_stop, "dropped without close");
}

#[test]
fn segment_usage_counts_the_segment_files_and_their_bytes_as_they_come_and_go() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let (store, _) = Store::open(RealFs::shared(), &dir, small_segments()).unwrap();
    assert_eq!(store.segment_usage().segments, 0);
    let queue = store.create_log().unwrap().wait().unwrap();
    let empty = store.segment_usage();
    assert_eq!(empty.segments, 1, "a log starts with one segment");
    let mut seqs = Vec::new();
    for index in 0..40u32 {
        seqs.push(store.append(queue, 0, b"m", &[index as u8; 100]).unwrap().wait().unwrap().seq);
    }
    let full = store.segment_usage();
    assert!(full.segments > 2, "1,000-byte segments roll: {full:?}");
    assert!(full.bytes >= 40 * 100, "{full:?}");
    for seq in seqs {
        store.remove(queue, seq).unwrap().wait().unwrap();
    }
    store.sync().unwrap().wait().unwrap();
    // Fully removed segments are deleted by the writer after the sync; one more sync is ordered
    // after that deletion.
    store.sync().unwrap().wait().unwrap();
    let drained = store.segment_usage();
    assert!(drained.segments < full.segments, "{drained:?} after {full:?}");
    store.delete_log(queue).unwrap().wait().unwrap();
    assert_eq!(store.segment_usage(), wharf_store::SegmentUsage { segments: 0, bytes: 0 });
}
