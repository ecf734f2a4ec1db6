//! Damage on disk: a flipped bit anywhere in a record is detected, reported with its file and
//! offset, and never returned as a message, while the records around it are still read; a torn
//! tail is cut off and reported; a damaged file header makes only that file unusable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use wharf_store::{
    AppendReceipt, CrashMode, LogId, RealFs, RecoveryIssue, SimFs, Store, StoreConfig, format::RECORD_HEADER_BYTES,
};

const DIR: &str = "/data";

fn open(sim: &SimFs) -> (Store, wharf_store::Recovered) {
    Store::open(sim.remount().shared(), DIR, StoreConfig::default()).unwrap()
}

/// A store with one queue holding three durable messages; the store is closed.
fn three_messages(sim: &SimFs) -> (LogId, Vec<AppendReceipt>) {
    let (store, _) = open(sim);
    let queue = store.create_log().unwrap().wait().unwrap();
    let receipts = [&b"first body"[..], b"second body, the one that gets damaged", b"third body"]
        .iter()
        .map(|body| store.append(queue, 1, b"meta", body).unwrap().wait().unwrap())
        .collect();
    store.close().unwrap();
    (queue, receipts)
}

fn segment_path(queue: LogId, segment_id: u64) -> PathBuf {
    Path::new(DIR).join("queues").join(format!("q-{:016x}", queue.0)).join(format!("{segment_id:020}.seg"))
}

fn bodies(store: &Store, queue: LogId, recovered: &wharf_store::Recovered) -> Vec<Vec<u8>> {
    recovered.queues[&queue].iter().map(|message| store.read(queue, &message.location).unwrap().body).collect()
}

#[test]
fn a_flipped_bit_anywhere_in_a_middle_record_is_reported_and_skipped() {
    let probe = SimFs::new(1);
    let (_, receipts) = three_messages(&probe);
    let middle = receipts[1].location;
    // Every byte of the middle record: header fields, checksums, meta and body.
    for byte in 0..u64::from(middle.record_bytes) {
        let sim = SimFs::new(1);
        let (queue, receipts) = three_messages(&sim);
        assert_eq!(receipts[1].location, middle);
        let path = segment_path(queue, middle.segment_id);
        sim.flip_bit(&path, middle.offset + byte, (byte % 8) as u8).unwrap();

        let (store, recovered) = open(&sim);
        assert_eq!(
            bodies(&store, queue, &recovered),
            vec![b"first body".to_vec(), b"third body".to_vec()],
            "flip at byte {byte}: the neighbours survive and the damaged record is not returned"
        );
        assert_eq!(
            recovered.issues,
            vec![RecoveryIssue::Corruption { path, offset: middle.offset, bytes: u64::from(middle.record_bytes) }],
            "flip at byte {byte}"
        );
        // The store keeps working after it.
        let receipt = store.append(queue, 2, b"", b"after").unwrap().wait().unwrap();
        assert_eq!(store.read(queue, &receipt.location).unwrap().body, b"after");
    }
}

#[test]
fn reading_a_damaged_record_is_an_error_not_a_message() {
    let sim = SimFs::new(2);
    let (store, _) = open(&sim);
    let queue = store.create_log().unwrap().wait().unwrap();
    let receipt = store.append(queue, 1, b"m", b"payload").unwrap().wait().unwrap();
    let path = segment_path(queue, receipt.location.segment_id);
    sim.flip_bit(&path, receipt.location.offset + RECORD_HEADER_BYTES as u64 + 3, 0).unwrap();
    let error = store.read(queue, &receipt.location).unwrap_err();
    assert!(error.to_string().contains("checksum"), "{error}");
}

#[test]
fn a_torn_tail_is_truncated_reported_and_appending_continues() {
    let sim = SimFs::new(3);
    let (queue, receipts) = three_messages(&sim);
    let path = segment_path(queue, 1);
    let clean_len = sim.read_file(&path).unwrap().len() as u64;
    // The first 57 bytes of a record: a whole header and the start of a payload.
    let whole = sim.read_file(&path).unwrap();
    let start = receipts[1].location.offset as usize;
    sim.append_durable(&path, &whole[start..start + 57]).unwrap();

    let (store, recovered) = open(&sim);
    assert_eq!(
        recovered.issues,
        vec![RecoveryIssue::TruncatedTail { path: path.clone(), offset: clean_len, bytes: 57 }]
    );
    assert_eq!(recovered.queues[&queue].len(), 3);
    assert_eq!(sim.read_file(&path).unwrap().len() as u64, clean_len, "the tail is cut off on disk");
    store.append(queue, 2, b"", b"fourth").unwrap().wait().unwrap();
    drop(store);

    let (store, recovered) = open(&sim);
    assert!(recovered.issues.is_empty(), "{:?}", recovered.issues);
    assert_eq!(bodies(&store, queue, &recovered).last().unwrap(), b"fourth");
}

#[test]
fn a_torn_partial_header_is_truncated() {
    let sim = SimFs::new(4);
    let (queue, _) = three_messages(&sim);
    let path = segment_path(queue, 1);
    let clean_len = sim.read_file(&path).unwrap().len() as u64;
    sim.append_durable(&path, &[0x51, 0, 0]).unwrap();
    let (_, recovered) = open(&sim);
    assert_eq!(recovered.issues, vec![RecoveryIssue::TruncatedTail { path, offset: clean_len, bytes: 3 }]);
    assert_eq!(recovered.queues[&queue].len(), 3);
}

#[test]
fn a_damaged_ack_record_is_reported_and_its_message_comes_back() {
    let sim = SimFs::new(5);
    let (store, _) = open(&sim);
    let queue = store.create_log().unwrap().wait().unwrap();
    let kept = store.append(queue, 1, b"", b"kept").unwrap().wait().unwrap();
    let acked = store.append(queue, 1, b"", b"acked").unwrap().wait().unwrap();
    store.remove(queue, kept.seq).unwrap().wait().unwrap();
    store.remove(queue, acked.seq).unwrap().wait().unwrap();
    store.sync().unwrap().wait().unwrap();
    store.close().unwrap();
    // The first removal record sits right after the 64-byte header of the first ack segment.
    let ack_path = sim.list_files(&Path::new(DIR).join("acks")).unwrap()[0].clone();
    sim.flip_bit(&ack_path, 64 + 30, 2).unwrap();

    let (store, recovered) = open(&sim);
    assert!(
        recovered.issues.contains(&RecoveryIssue::Corruption { path: ack_path, offset: 64, bytes: 40 }),
        "{:?}",
        recovered.issues
    );
    // At-least-once: a lost removal means a redelivery, never a loss.
    assert_eq!(bodies(&store, queue, &recovered), vec![b"kept".to_vec()]);
}

#[test]
fn a_damaged_segment_header_makes_only_that_segment_unreadable() {
    let sim = SimFs::new(6);
    let config = StoreConfig { segment_bytes_max: 200, ..StoreConfig::default() };
    let (store, _) = Store::open(sim.shared(), DIR, config.clone()).unwrap();
    let queue = store.create_log().unwrap().wait().unwrap();
    let receipts: Vec<_> =
        (0..6u8).map(|index| store.append(queue, 1, b"", &[index; 50]).unwrap().wait().unwrap()).collect();
    store.close().unwrap();
    let first_segment = receipts[0].location.segment_id;
    assert!(receipts.last().unwrap().location.segment_id > first_segment, "the test needs several segments");
    let path = segment_path(queue, first_segment);
    sim.flip_bit(&path, 20, 1).unwrap();

    let (store, recovered) =
        Store::open(sim.remount().shared(), DIR, config).expect("one bad file does not stop the store");
    assert!(matches!(&recovered.issues[..], [RecoveryIssue::UnreadableFile { path: bad, .. }] if *bad == path));
    let survivors = bodies(&store, queue, &recovered);
    let expected: Vec<Vec<u8>> = receipts
        .iter()
        .enumerate()
        .filter(|(_, receipt)| receipt.location.segment_id != first_segment)
        .map(|(index, _)| vec![index as u8; 50])
        .collect();
    assert_eq!(survivors, expected);
}

#[test]
fn corruption_is_detected_on_the_real_file_system_too() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let (store, _) = Store::open(RealFs::shared(), &dir, StoreConfig::default()).unwrap();
    let queue = store.create_log().unwrap().wait().unwrap();
    let receipts: Vec<_> =
        (0..3u8).map(|index| store.append(queue, 1, b"", &[index; 100]).unwrap().wait().unwrap()).collect();
    store.close().unwrap();
    let path = dir.join("queues").join(format!("q-{:016x}", queue.0)).join(format!("{:020}.seg", 1));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[receipts[1].location.offset as usize + 60] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();

    let (store, recovered) = Store::open(RealFs::shared(), &dir, StoreConfig::default()).unwrap();
    assert_eq!(
        recovered.issues,
        vec![RecoveryIssue::Corruption { path, offset: receipts[1].location.offset, bytes: 140 }]
    );
    let survivors: Vec<u8> =
        recovered.queues[&queue].iter().map(|message| store.read(queue, &message.location).unwrap().body[0]).collect();
    assert_eq!(survivors, vec![0, 2]);
}

#[test]
fn a_crash_mid_write_never_surfaces_as_corruption() {
    // Torn writes from crashes are tails, not corruption: hundreds of random crashes while
    // appends are in flight must never be reported as damage.
    for seed in 0..200 {
        let sim = SimFs::new(seed);
        let (store, _) = open(&sim);
        let queue = store.create_log().unwrap().wait().unwrap();
        let pending: Vec<_> = (0..20u8).map(|index| store.append(queue, 1, b"", &[index; 300]).unwrap()).collect();
        sim.crash(CrashMode::Random);
        drop(store);
        drop(pending);
        let (_, recovered) = open(&sim);
        assert!(
            recovered.issues.iter().all(|issue| !matches!(issue, RecoveryIssue::Corruption { .. })),
            "seed {seed}: {:?}",
            recovered.issues
        );
    }
}

#[test]
fn read_each_reports_a_damaged_record_and_returns_its_neighbours() {
    let sim = SimFs::new(4);
    let (store, _) = open(&sim);
    let queue = store.create_log().unwrap().wait().unwrap();
    let receipts: Vec<_> =
        (0..3u8).map(|index| store.append(queue, 1, b"m", &[index; 20]).unwrap().wait().unwrap()).collect();
    let damaged = receipts[1].location;
    sim.flip_bit(&segment_path(queue, damaged.segment_id), damaged.offset + RECORD_HEADER_BYTES as u64 + 3, 0).unwrap();
    let locations: Vec<_> = receipts.iter().map(|receipt| receipt.location).collect();
    let mut outcomes = Vec::new();
    store.read_each(queue, &locations, &mut |index, record| {
        outcomes.push((index, record.map(|record| record.body.to_vec()).map_err(|error| error.to_string())))
    });
    assert_eq!(outcomes[0], (0, Ok(vec![0; 20])));
    assert!(outcomes[1].1.as_ref().is_err_and(|error| error.contains("checksum")), "{outcomes:?}");
    assert_eq!(outcomes[2], (2, Ok(vec![2; 20])));
}

/// Found by the `store_recovery` fuzz target: a record with intact checksums whose seq lies far
/// beyond its segment's base sized the segment's live set (one bit per seq) from that seq, and
/// the allocation aborted the process at start. Such a record is damage, reported and skipped.
#[test]
fn a_record_whose_seq_is_far_beyond_its_segment_is_damage_not_an_allocation() {
    use wharf_store::format::{self, FILE_HEADER_BYTES, FileHeader, RecordKind, SEGMENT_MAGIC, SEGMENT_SEQ_SPAN_MAX};
    for far in [SEGMENT_SEQ_SPAN_MAX, 1 << 40, u64::MAX - 1] {
        let sim = SimFs::new(9);
        let (store, _) = open(&sim);
        let queue = store.create_log().unwrap().wait().unwrap();
        let receipt = store.append(queue, 1, b"meta", b"first").unwrap().wait().unwrap();
        store.close().unwrap();
        let path = segment_path(queue, receipt.location.segment_id);
        let file = sim.read_file(&path).unwrap();
        let header = FileHeader::decode(&file[..FILE_HEADER_BYTES], SEGMENT_MAGIC, &path).unwrap();
        let mut forged = Vec::new();
        let seq = header.base_seq.saturating_add(far);
        format::encode_record(&mut forged, header.salt, RecordKind::Message, 0, seq, 1, &[b"far"]);
        sim.append_durable(&path, &forged).unwrap();

        let (store, recovered) = open(&sim);
        assert_eq!(bodies(&store, queue, &recovered), vec![b"first".to_vec()], "seq base + {far}");
        assert_eq!(
            recovered.issues,
            vec![RecoveryIssue::Corruption { path, offset: file.len() as u64, bytes: forged.len() as u64 }],
            "seq base + {far}"
        );
    }
}

/// Found by the `store_recovery` fuzz target: an ack record naming seq `u64::MAX` (intact checksum)
/// made recovery's next seq overflow. A seq above `SEQ_MAX` is damage: the record is reported and
/// skipped, and the queue goes on taking messages.
#[test]
fn an_ack_record_naming_a_seq_at_the_end_of_the_seqs_is_damage() {
    use wharf_store::format::{self, ACK_MAGIC, FILE_HEADER_BYTES, FileHeader, RecordKind, SEQ_MAX};
    for seq in [SEQ_MAX + 1, u64::MAX - 1, u64::MAX] {
        let sim = SimFs::new(13);
        let (store, _) = open(&sim);
        let queue = store.create_log().unwrap().wait().unwrap();
        let first = store.append(queue, 1, b"", b"first").unwrap().wait().unwrap();
        store.remove(queue, first.seq).unwrap().wait().unwrap();
        store.sync().unwrap().wait().unwrap();
        store.close().unwrap();
        let ack_path = sim.list_files(&Path::new(DIR).join("acks")).unwrap()[0].clone();
        let file = sim.read_file(&ack_path).unwrap();
        let header = FileHeader::decode(&file[..FILE_HEADER_BYTES], ACK_MAGIC, &ack_path).unwrap();
        let mut forged = Vec::new();
        format::encode_record(&mut forged, header.salt, RecordKind::Removal, 0, queue.0, seq, &[]);
        sim.append_durable(&ack_path, &forged).unwrap();

        let (store, recovered) = open(&sim);
        assert!(
            recovered.issues.contains(&RecoveryIssue::Corruption {
                path: ack_path,
                offset: file.len() as u64,
                bytes: forged.len() as u64
            }),
            "seq {seq}: {:?}",
            recovered.issues
        );
        let next = store.append(queue, 1, b"", b"next").unwrap().wait().unwrap();
        assert!(next.seq > first.seq && next.seq <= SEQ_MAX, "seq {seq}: next seq {}", next.seq);
        store.close().unwrap();
        let (store, recovered) = open(&sim);
        assert_eq!(bodies(&store, queue, &recovered), vec![b"next".to_vec()], "seq {seq}");
    }
}

/// A segment whose header names a base seq above `SEQ_MAX` (intact checksum) is unreadable, and
/// the queue's next seq does not climb to it.
#[test]
fn a_segment_based_at_the_end_of_the_seqs_is_unreadable() {
    use wharf_store::format::{FILE_HEADER_BYTES, FileHeader, SEGMENT_MAGIC, SEQ_MAX};
    let sim = SimFs::new(14);
    let (store, _) = open(&sim);
    let queue = store.create_log().unwrap().wait().unwrap();
    let receipt = store.append(queue, 1, b"meta", b"first").unwrap().wait().unwrap();
    store.close().unwrap();
    let path = segment_path(queue, receipt.location.segment_id);
    let file = sim.read_file(&path).unwrap();
    let header = FileHeader::decode(&file[..FILE_HEADER_BYTES], SEGMENT_MAGIC, &path).unwrap();
    let forged_path = segment_path(queue, receipt.location.segment_id + 1);
    let forged = FileHeader { file_id: receipt.location.segment_id + 1, base_seq: u64::MAX, ..header };
    let fs = sim.shared();
    let forged_file = fs.open(&forged_path, wharf_store::OpenMode::CreateNew).unwrap();
    forged_file.write_all_at(&forged.encode(), 0).unwrap();
    forged_file.sync_data().unwrap();
    fs.sync_dir(forged_path.parent().unwrap()).unwrap();

    let (store, recovered) = open(&sim);
    assert!(
        recovered
            .issues
            .iter()
            .any(|issue| matches!(issue, RecoveryIssue::UnreadableFile { path, .. } if *path == forged_path)),
        "{:?}",
        recovered.issues
    );
    let next = store.append(queue, 1, b"", b"next").unwrap().wait().unwrap();
    assert!(next.seq > receipt.seq && next.seq <= SEQ_MAX, "next seq {}", next.seq);
    assert_eq!(bodies(&store, queue, &recovered), vec![b"first".to_vec()]);
}

/// Found by the `store_recovery` fuzz target: a queue-id reservation just below `u64::MAX` (intact
/// checksum) overflowed the next reservation on the writer thread, which then died with every
/// later operation. Now the ids run out with an error and the store carries on.
#[test]
fn a_queue_id_reservation_at_the_end_of_the_ids_runs_out_cleanly() {
    use wharf_store::OpenMode;
    let sim = SimFs::new(12);
    let (store, _) = open(&sim);
    let queue = store.create_log().unwrap().wait().unwrap();
    store.close().unwrap();
    let mut reservation = (u64::MAX - 1).to_le_bytes().to_vec();
    reservation.extend_from_slice(&crc32c::crc32c(&reservation).to_le_bytes());
    let file = sim.shared().open(&Path::new(DIR).join("queue-ids"), OpenMode::Existing).unwrap();
    file.write_all_at(&reservation, 0).unwrap();
    file.sync_data().unwrap();

    let (store, _) = open(&sim);
    assert_eq!(store.create_log().unwrap().wait().unwrap(), LogId(u64::MAX - 1));
    assert!(store.create_log().unwrap().wait().is_err(), "the ids are exhausted");
    store.append(queue, 1, b"", b"still works").unwrap().wait().unwrap();
    store.close().unwrap();
}

/// Builds before the fix could leave, after a crash inside recovery, two segments with one base
/// seq: an empty one, and a newer one holding a confirmed message. The newer is the queue's; the
/// empty one is deleted, and the message survives this recovery and the next.
#[test]
fn an_empty_segment_and_a_newer_one_with_its_base_keep_the_newer_ones_messages() {
    use wharf_store::format::{self, FileHeader, RecordKind, SEGMENT_MAGIC};
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let (store, _) = Store::open(RealFs::shared(), &dir, StoreConfig::default()).unwrap();
    let queue = store.create_log().unwrap().wait().unwrap();
    let first = store.append(queue, 1, b"m", b"first").unwrap().wait().unwrap();
    store.close().unwrap();
    let queue_dir = dir.join("queues").join(format!("q-{:016x}", queue.0));
    let header = |file_id, salt| FileHeader {
        magic: SEGMENT_MAGIC,
        file_id,
        queue_id: queue.0,
        base_seq: first.seq + 1,
        created_ms: 1,
        salt,
    };
    std::fs::write(queue_dir.join(format!("{:020}.seg", 4)), header(4, 11).encode()).unwrap();
    let mut newer = header(5, 12).encode().to_vec();
    format::encode_record(&mut newer, 12, RecordKind::Message, 1, first.seq + 1, 2, &[b"m", b"second"]);
    std::fs::write(queue_dir.join(format!("{:020}.seg", 5)), newer).unwrap();

    for round in 0..2 {
        let (store, recovered) = Store::open(RealFs::shared(), &dir, StoreConfig::default()).unwrap();
        assert_eq!(recovered.issues, vec![], "round {round}");
        assert_eq!(bodies(&store, queue, &recovered), vec![b"first".to_vec(), b"second".to_vec()], "round {round}");
        assert!(!queue_dir.join(format!("{:020}.seg", 4)).exists(), "the empty segment is deleted (round {round})");
        store.close().unwrap();
    }
}

/// A replacement segment's base seq lies above every base on disk, so a crash between making it
/// and deleting the dead empty segment it replaces cannot leave two segments with one base.
#[test]
fn a_replacement_segment_starts_above_a_dead_empty_segments_base() {
    use wharf_store::format::{FILE_HEADER_BYTES, FileHeader, SEGMENT_MAGIC};
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("data");
    let (store, _) = Store::open(RealFs::shared(), &dir, StoreConfig::default()).unwrap();
    let queue = store.create_log().unwrap().wait().unwrap();
    let first = store.append(queue, 1, b"m", b"first").unwrap().wait().unwrap();
    store.close().unwrap();
    let queue_dir = dir.join("queues").join(format!("q-{:016x}", queue.0));
    let segment = |id: u64| queue_dir.join(format!("{id:020}.seg"));
    let empty = FileHeader {
        magic: SEGMENT_MAGIC,
        file_id: 2,
        queue_id: queue.0,
        base_seq: first.seq + 1,
        created_ms: 1,
        salt: 7,
    };
    std::fs::write(segment(2), empty.encode()).unwrap();
    // The newest segment's creation torn inside its header: recovery must make a replacement.
    std::fs::write(segment(3), &empty.encode()[..10]).unwrap();

    let (store, recovered) = Store::open(RealFs::shared(), &dir, StoreConfig::default()).unwrap();
    assert_eq!(bodies(&store, queue, &recovered), vec![b"first".to_vec()]);
    assert!(!segment(2).exists() && !segment(3).exists(), "the dead and the torn segment are gone");
    let replacement = std::fs::read(segment(4)).unwrap();
    let header = FileHeader::decode(&replacement[..FILE_HEADER_BYTES], SEGMENT_MAGIC, &segment(4)).unwrap();
    assert!(header.base_seq > empty.base_seq, "replacement base {} above {}", header.base_seq, empty.base_seq);
    let next = store.append(queue, 1, b"m", b"next").unwrap().wait().unwrap();
    assert!(next.seq >= header.base_seq);
    store.close().unwrap();
}
