//! The group-commit writer: one std thread per store that does every write, sync and deletion.
//!
//! A batch is whatever arrived while the previous batch was being synced (adaptive, no timer):
//! the writer blocks for the first operation, drains everything else already queued (up to
//! `batch_bytes_max`), then
//! 1. writes each dirtied segment's new records with one positional write,
//! 2. `fdatasync`s every file and directory the batch dirtied, then completes the appends,
//! 3. writes removals and delivery counts to the ack log (only after the appends they refer to are
//!    durable, so a durable ack can never point at a message that a crash could still take away
//!    and whose seq could then be reused),
//! 4. syncs the ack log when someone asked (`Store::sync`), when the lazy interval ran out, or when
//!    a fully removed segment is waiting to be deleted,
//! 5. deletes fully removed segments, syncs their directory, then deletes ack-log segments that no
//!    remaining segment needs.
//!
//! A failed write is undone (the file is truncated back) and fails only its own operations; a
//! failed sync, or an undo that fails, is fatal: the store stops and every later operation fails.

use crate::error::{Result, StoreError};
use crate::format::{self, ACK_MAGIC, FILE_HEADER_BYTES, FileHeader, RecordKind, SEGMENT_MAGIC};
use crate::fs::{Fs, FsFile, OpenMode};
use crate::live_set::LiveSet;
use crate::store::{AppendReceipt, LogId, MessageLocation, QueueHandle, Shared, StoreConfig};
use crate::ticket::Completer;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// An operation sent to the writer thread.
#[derive(Debug)]
pub(crate) enum Op {
    Append {
        queue: LogId,
        seq: u64,
        record: Vec<u8>,
        done: Completer<AppendReceipt>,
    },
    Ack {
        queue: LogId,
        seq: u64,
        /// `None` for a removal, `Some(count)` for a delivery count.
        delivery_count: Option<u32>,
        done: Completer<()>,
    },
    Sync(Completer<()>),
    CreateQueue(Completer<LogId>),
    DeleteQueue {
        queue: LogId,
        done: Completer<()>,
    },
    Close(Completer<()>),
}

impl Op {
    fn fail(self, error: StoreError) {
        match self {
            Op::Append { done, .. } => done.complete(Err(error)),
            Op::Ack { done, .. } | Op::DeleteQueue { done, .. } | Op::Sync(done) | Op::Close(done) => {
                done.complete(Err(error))
            }
            Op::CreateQueue(done) => done.complete(Err(error)),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Op::Append { record, .. } => record.len(),
            _ => format::RECORD_HEADER_BYTES,
        }
    }
}

pub(crate) fn queues_dir(dir: &Path) -> PathBuf {
    dir.join("queues")
}

pub(crate) fn acks_dir(dir: &Path) -> PathBuf {
    dir.join("acks")
}

pub(crate) fn queue_dir_name(queue: LogId) -> String {
    format!("q-{:016x}", queue.0)
}

pub(crate) fn segment_file_name(segment_id: u64) -> String {
    format!("{segment_id:020}.seg")
}

pub(crate) fn ack_file_name(segment_id: u64) -> String {
    format!("{segment_id:020}.ack")
}

pub(crate) fn segment_path(dir: &Path, queue: LogId, segment_id: u64) -> PathBuf {
    queues_dir(dir).join(queue_dir_name(queue)).join(segment_file_name(segment_id))
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis() as u64).unwrap_or(0)
}

/// A fresh random salt for a new file's record checksums.
pub(crate) fn random_salt() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    hasher.finish() as u32
}

/// One segment of a queue's log.
#[derive(Debug)]
pub(crate) struct Segment {
    pub id: u64,
    pub base_seq: u64,
    pub salt: u32,
    pub file: Arc<dyn FsFile>,
    /// Bytes written and accepted (header included); the next record goes here.
    pub len: u64,
    /// Live seqs, as offsets from `base_seq`.
    pub live: LiveSet,
    /// Ack-log segments holding records about this segment's messages.
    pub ack_refs: BTreeSet<u64>,
}

impl Segment {
    fn has_records(&self) -> bool {
        self.len > FILE_HEADER_BYTES as u64
    }
}

/// One queue's log: its segments keyed by base seq (ascending, like their ids).
#[derive(Debug)]
pub(crate) struct QueueLog {
    pub dir: PathBuf,
    pub salt: u32,
    pub segments: BTreeMap<u64, Segment>,
    /// Base seq of the segment new records go to (always the last one).
    pub active_base: u64,
    pub next_segment_id: u64,
    /// Highest seq handed to the writer so far; seqs must arrive in increasing order.
    pub last_seq: u64,
}

impl QueueLog {
    /// The segment that holds `seq` if it is live.
    fn live_segment_mut(&mut self, seq: u64) -> Option<&mut Segment> {
        let (_, segment) = self.segments.range_mut(..=seq).next_back()?;
        segment.live.contains(seq - segment.base_seq).then_some(segment)
    }
}

/// One ack-log segment.
#[derive(Debug)]
pub(crate) struct AckSegment {
    pub file: Arc<dyn FsFile>,
    pub salt: u32,
    pub len: u64,
    /// How many message segments still reference records in this file.
    pub ref_count: u64,
}

/// The ack log: removals and delivery counts for every queue.
#[derive(Debug)]
pub(crate) struct AckLog {
    pub dir: PathBuf,
    pub segments: BTreeMap<u64, AckSegment>,
    pub active: u64,
    /// When the first unsynced record was written.
    pub dirty_since: Option<Instant>,
    /// Segments with written, unsynced records.
    pub unsynced: BTreeSet<u64>,
    /// A segment was created and the directory not yet synced.
    pub dir_dirty: bool,
}

/// Everything the writer thread owns.
#[derive(Debug)]
pub(crate) struct WriterState {
    pub fs: Arc<dyn Fs>,
    pub dir: PathBuf,
    pub config: StoreConfig,
    pub shared: Arc<Shared>,
    pub queues: foldhash::HashMap<LogId, QueueLog>,
    pub acks: AckLog,
    pub next_queue_id: u64,
    /// Ids below this may have been handed out before; recorded durably in `queue-ids` before
    /// any id at or above the previous value is used, so ids are never reused after a restart.
    pub queue_ids_reserved_until: u64,
    /// Sealed segments whose messages are all removed, waiting for their removals to be durable.
    pub deletion_candidates: BTreeSet<(LogId, u64)>,
}

/// An append that has a place in this batch's writes.
struct PlannedAppend {
    queue: LogId,
    seq: u64,
    segment_base: u64,
    location: MessageLocation,
    done: Completer<AppendReceipt>,
    write_index: usize,
}

/// The new bytes for one segment in this batch.
struct PlannedWrite {
    queue: LogId,
    segment_base: u64,
    start: u64,
    bytes: Vec<u8>,
    error: Option<StoreError>,
}

/// How many times in a row the gatherer yields without anything arriving before it gives up.
const GATHER_IDLE_YIELDS_MAX: u32 = 8;
/// The longest a batch waits for late arrivals: well under one `fdatasync`.
const GATHER_TIME_MAX: Duration = Duration::from_micros(100);

/// The group commit delay ends early after this long without a new operation.
const GROUP_COMMIT_IDLE_GAP: Duration = Duration::from_micros(150);

/// The batch being gathered, with the running totals the gathering decides on.
#[derive(Default)]
struct Gathered {
    ops: Vec<Op>,
    bytes: usize,
    appends: usize,
    append_bytes: u64,
}

impl Gathered {
    fn push(&mut self, op: Op) {
        self.bytes += op.bytes();
        if let Op::Append { record, .. } = &op {
            self.appends += 1;
            self.append_bytes += record.len() as u64;
        }
        self.ops.push(op);
    }

    /// Takes whatever is queued now, up to `bytes_max`; returns how many operations it took.
    fn take_queued(&mut self, receiver: &Receiver<Op>, bytes_max: usize) -> usize {
        let before = self.ops.len();
        while self.bytes < bytes_max {
            match receiver.try_recv() {
                Ok(op) => self.push(op),
                Err(_) => break,
            }
        }
        self.ops.len() - before
    }
}

/// The writer thread's loop. Returns when the store is closed or every handle is gone.
pub(crate) fn run(mut state: WriterState, receiver: Receiver<Op>) {
    let mut batch = Gathered::default();
    let mut last_batch_len = 0;
    let mut last_appends = 0;
    let ack_sync_interval = Duration::from_millis(state.config.ack_sync_interval_ms);
    let group_commit_delay = Duration::from_micros(state.config.group_commit_delay_us);
    let bytes_max = state.config.batch_bytes_max;
    loop {
        // After a fatal error nothing will ever be synced again: wait for work, not for a timer.
        let lazy_deadline = state.acks.dirty_since.filter(|_| state.shared.check_fatal().is_ok());
        let first = match lazy_deadline {
            Some(since) => {
                let wait = (since + ack_sync_interval).saturating_duration_since(Instant::now());
                match receiver.recv_timeout(wait) {
                    Ok(op) => Some(op),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            None => match receiver.recv() {
                Ok(op) => Some(op),
                Err(_) => break,
            },
        };
        batch.bytes = 0;
        batch.appends = 0;
        batch.append_bytes = 0;
        if let Some(op) = first {
            batch.push(op);
        }
        // Gather: take what is queued; while fewer operations are here than the last batch
        // completed, and they keep arriving, yield briefly so the callers just woken by that
        // batch can resubmit into this one instead of splitting into two small batches.
        let gather_started = Instant::now();
        let mut idle_yields = 0;
        while batch.bytes < bytes_max {
            if batch.take_queued(&receiver, bytes_max) > 0 {
                idle_yields = 0;
            } else if batch.ops.len() < last_batch_len
                && idle_yields < GATHER_IDLE_YIELDS_MAX
                && gather_started.elapsed() < GATHER_TIME_MAX
            {
                idle_yields += 1;
                std::thread::yield_now();
            } else {
                break;
            }
        }
        // Group commit delay: under pipelined load, wait a little longer for more appends to
        // share this batch's sync (see `StoreConfig::group_commit_delay_us`).
        if batch.appends > 0 && last_appends >= 2 && !group_commit_delay.is_zero() {
            while batch.bytes < bytes_max {
                let waited = gather_started.elapsed();
                if waited >= group_commit_delay {
                    break;
                }
                // Only while appends keep arriving: a quiet gap means every waiting appender is
                // in (closed-loop callers), and waiting longer would only add latency. Sleeping
                // (rather than blocking in `recv`) means arrivals do not wake this thread one by
                // one: each wake-up is a futex call for the sender and a context switch here.
                std::thread::sleep((group_commit_delay - waited).min(GROUP_COMMIT_IDLE_GAP));
                if batch.take_queued(&receiver, bytes_max) == 0 {
                    break;
                }
            }
        }
        last_appends = batch.appends;
        last_batch_len = batch.ops.len();
        let closed = state.process(&mut batch.ops);
        state.shared.release_pending(batch.append_bytes);
        if closed {
            stop_writer(&state);
            return;
        }
    }
    // Every handle is gone without a close: make the last removals durable anyway.
    if state.shared.check_fatal().is_ok()
        && let Err(error) = state.sync_acks()
    {
        tracing::error!(%error, "could not sync the ack log while shutting down");
    }
    stop_writer(&state);
}

/// Marks the writer stopped and wakes appenders waiting for room, so none waits forever.
fn stop_writer(state: &WriterState) {
    state.shared.writer_stopped.store(true, Ordering::Release);
    let _guard = state.shared.pending_bytes.lock();
    state.shared.pending_room.notify_all();
}

impl WriterState {
    fn fatal(&self, reason: String) -> StoreError {
        self.shared.set_fatal(reason)
    }

    /// Handles one batch. Returns true when the store was closed.
    fn process(&mut self, batch: &mut Vec<Op>) -> bool {
        self.shared.counters.batches.fetch_add(1, Ordering::Relaxed);
        let mut io_ops = Vec::new();
        let mut closed = false;
        for op in batch.drain(..) {
            if closed {
                op.fail(StoreError::Closed);
                continue;
            }
            match op {
                Op::Append { .. } | Op::Ack { .. } | Op::Sync(_) => io_ops.push(op),
                Op::CreateQueue(done) => {
                    self.run_io(&mut io_ops);
                    done.complete(self.shared.check_fatal().and_then(|()| self.create_log()));
                }
                Op::DeleteQueue { queue, done } => {
                    self.run_io(&mut io_ops);
                    done.complete(self.shared.check_fatal().and_then(|()| self.delete_log(queue)));
                }
                Op::Close(done) => {
                    self.run_io(&mut io_ops);
                    done.complete(self.shared.check_fatal().and_then(|()| self.sync_acks()));
                    closed = true;
                }
            }
        }
        self.run_io(&mut io_ops);
        closed
    }

    /// Writes, syncs and completes appends, acks and sync requests; then deletes what became dead.
    fn run_io(&mut self, ops: &mut Vec<Op>) {
        if let Err(error) = self.shared.check_fatal() {
            for op in ops.drain(..) {
                op.fail(error.clone());
            }
            return;
        }
        let mut appends = Vec::new();
        let mut writes: Vec<PlannedWrite> = Vec::new();
        let mut acks = Vec::new();
        let mut sync_requests = Vec::new();
        let mut dirty_dirs: BTreeSet<PathBuf> = BTreeSet::new();
        for op in ops.drain(..) {
            match op {
                Op::Append { queue, seq, record, done } => {
                    self.plan_append(queue, seq, record, done, &mut appends, &mut writes, &mut dirty_dirs)
                }
                Op::Ack { queue, seq, delivery_count, done } => acks.push((queue, seq, delivery_count, done)),
                Op::Sync(done) => sync_requests.push(done),
                other => other.fail(StoreError::Closed),
            }
        }

        if let Err(fatal) = self.write_and_sync_appends(&mut writes, &dirty_dirs) {
            for append in appends {
                append.done.complete(Err(fatal.clone()));
            }
            for (_, _, _, done) in acks {
                done.complete(Err(fatal.clone()));
            }
            for done in sync_requests {
                done.complete(Err(fatal.clone()));
            }
            return;
        }
        for append in appends {
            if let Some(error) = &writes[append.write_index].error {
                append.done.complete(Err(error.clone()));
                continue;
            }
            if let Some(segment) =
                self.queues.get_mut(&append.queue).and_then(|log| log.segments.get_mut(&append.segment_base))
            {
                segment.live.insert(append.seq - segment.base_seq);
            }
            self.shared.counters.appends.fetch_add(1, Ordering::Relaxed);
            append.done.complete(Ok(AppendReceipt { seq: append.seq, location: append.location }));
        }

        let ack_results = self.write_acks(acks);
        let deadline_passed = self
            .acks
            .dirty_since
            .is_some_and(|since| since.elapsed() >= Duration::from_millis(self.config.ack_sync_interval_ms));
        let wants_sync = !sync_requests.is_empty() || deadline_passed || !self.deletion_candidates.is_empty();
        let sync_result = if wants_sync { self.sync_acks() } else { Ok(()) };
        for (done, result) in ack_results {
            done.complete(result.and(sync_result.clone()));
        }
        for done in sync_requests {
            done.complete(sync_result.clone());
        }
        if sync_result.is_ok()
            && self.acks.dirty_since.is_none()
            && !self.deletion_candidates.is_empty()
            && let Err(error) = self.delete_dead_segments()
        {
            tracing::error!(%error, "deleting fully removed segments failed");
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn plan_append(
        &mut self,
        queue: LogId,
        seq: u64,
        record: Vec<u8>,
        done: Completer<AppendReceipt>,
        appends: &mut Vec<PlannedAppend>,
        writes: &mut Vec<PlannedWrite>,
        dirty_dirs: &mut BTreeSet<PathBuf>,
    ) {
        let segment_bytes_max = self.config.segment_bytes_max;
        let Some(log) = self.queues.get_mut(&queue) else {
            done.complete(Err(StoreError::UnknownLog(queue.0)));
            return;
        };
        if seq <= log.last_seq {
            // Seqs are taken under the queue lock and sent in order; anything else is a bug.
            done.complete(Err(StoreError::Config(format!(
                "seq {seq} arrived after {} for queue {queue}",
                log.last_seq
            ))));
            return;
        }
        log.last_seq = seq;
        let pending_in_active = writes
            .iter()
            .rev()
            .find(|write| write.queue == queue && write.segment_base == log.active_base)
            .map_or(0, |write| write.bytes.len() as u64);
        let Some(active) = log.segments.get(&log.active_base) else {
            done.complete(Err(self.shared.set_fatal(format!("queue {queue} lost its active segment"))));
            return;
        };
        let projected = active.len + pending_in_active + record.len() as u64;
        if projected > segment_bytes_max && (active.has_records() || pending_in_active > 0) {
            let segment_id = log.next_segment_id;
            match create_file(
                self.fs.as_ref(),
                &log.dir.join(segment_file_name(segment_id)),
                SEGMENT_MAGIC,
                segment_id,
                queue.0,
                seq,
                log.salt,
            ) {
                Ok(file) => {
                    log.next_segment_id += 1;
                    let sealed_base = log.active_base;
                    log.segments.insert(
                        seq,
                        Segment {
                            id: segment_id,
                            base_seq: seq,
                            salt: log.salt,
                            file: Arc::clone(&file),
                            len: FILE_HEADER_BYTES as u64,
                            live: LiveSet::default(),
                            ack_refs: BTreeSet::new(),
                        },
                    );
                    log.active_base = seq;
                    dirty_dirs.insert(log.dir.clone());
                    self.shared
                        .segment_files
                        .write()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .insert((queue, segment_id), (file, log.salt));
                    if log.segments.get(&sealed_base).is_some_and(|sealed| sealed.live.count() == 0) {
                        self.deletion_candidates.insert((queue, sealed_base));
                    }
                }
                Err(error) => {
                    done.complete(Err(error));
                    return;
                }
            }
        }
        let Some(active) = log.segments.get(&log.active_base) else {
            return;
        };
        let write_index =
            match writes.iter().rposition(|write| write.queue == queue && write.segment_base == log.active_base) {
                Some(index) => index,
                None => {
                    writes.push(PlannedWrite {
                        queue,
                        segment_base: log.active_base,
                        start: active.len,
                        bytes: Vec::new(),
                        error: None,
                    });
                    writes.len() - 1
                }
            };
        let write = &mut writes[write_index];
        let location = MessageLocation {
            segment_id: active.id,
            offset: write.start + write.bytes.len() as u64,
            record_bytes: record.len() as u32,
        };
        write.bytes.extend_from_slice(&record);
        appends.push(PlannedAppend { queue, seq, segment_base: log.active_base, location, done, write_index });
    }

    /// Performs the planned writes, then syncs every dirtied file and directory. A failed write
    /// is truncated away and recorded on its `PlannedWrite`; a failed sync or undo is fatal.
    fn write_and_sync_appends(&mut self, writes: &mut [PlannedWrite], dirty_dirs: &BTreeSet<PathBuf>) -> Result<()> {
        let mut to_sync: Vec<Arc<dyn FsFile>> = Vec::new();
        for write in writes.iter_mut() {
            let Some(log) = self.queues.get_mut(&write.queue) else {
                continue;
            };
            let Some(segment) = log.segments.get_mut(&write.segment_base) else {
                continue;
            };
            to_sync.push(Arc::clone(&segment.file));
            match segment.file.write_all_at(&write.bytes, write.start) {
                Ok(()) => segment.len = write.start + write.bytes.len() as u64,
                Err(error) => {
                    let path = log.dir.join(segment_file_name(segment.id));
                    if let Err(undo) = segment.file.set_len(write.start) {
                        return Err(self.fatal(format!(
                            "could not truncate {} after a failed write ({error}): {undo}",
                            path.display()
                        )));
                    }
                    tracing::warn!(path = %path.display(), %error, "append failed and was undone");
                    write.error = Some(StoreError::io(format!("appending to {}", path.display()), error));
                }
            }
        }
        for file in &to_sync {
            if let Err(error) = file.sync_data() {
                return Err(self.fatal(format!("fdatasync of a queue segment failed: {error}")));
            }
            self.shared.counters.data_syncs.fetch_add(1, Ordering::Relaxed);
        }
        for dir in dirty_dirs {
            if let Err(error) = self.fs.sync_dir(dir) {
                return Err(self.fatal(format!("fsync of directory {} failed: {error}", dir.display())));
            }
        }
        Ok(())
    }

    /// Writes removal and delivery-count records for live messages, applying removals to the
    /// in-memory live sets (undone if the write fails). Returns each ack's result so far.
    fn write_acks(&mut self, acks: Vec<(LogId, u64, Option<u32>, Completer<()>)>) -> Vec<(Completer<()>, Result<()>)> {
        let mut results = Vec::with_capacity(acks.len());
        if acks.is_empty() {
            return results;
        }
        if let Err(error) = self.roll_ack_segment_if_full((acks.len() * format::RECORD_HEADER_BYTES) as u64) {
            for (_, _, _, done) in acks {
                results.push((done, Err(error.clone())));
            }
            return results;
        }
        let active_id = self.acks.active;
        let Some(active) = self.acks.segments.get(&active_id) else {
            let error = self.fatal("the ack log lost its active segment".into());
            return acks.into_iter().map(|(_, _, _, done)| (done, Err(error.clone()))).collect();
        };
        let salt = active.salt;
        let mut bytes = Vec::with_capacity(acks.len() * format::RECORD_HEADER_BYTES);
        let mut removed: Vec<(LogId, u64, u64)> = Vec::new();
        let mut new_refs = 0u64;
        let mut written = Vec::new();
        for (queue, seq, delivery_count, done) in acks {
            let Some(log) = self.queues.get_mut(&queue) else {
                results.push((done, Err(StoreError::UnknownLog(queue.0))));
                continue;
            };
            let active_base = log.active_base;
            let Some(segment) = log.live_segment_mut(seq) else {
                // Not live: already removed, never written, or its append failed. Nothing to record.
                results.push((done, Ok(())));
                continue;
            };
            match delivery_count {
                None => {
                    format::encode_record(&mut bytes, salt, RecordKind::Removal, 0, queue.0, seq, &[]);
                    segment.live.remove(seq - segment.base_seq);
                    removed.push((queue, segment.base_seq, seq));
                    if segment.live.count() == 0 && segment.base_seq != active_base {
                        self.deletion_candidates.insert((queue, segment.base_seq));
                    }
                }
                Some(count) => {
                    format::encode_record(&mut bytes, salt, RecordKind::DeliveryCount, count, queue.0, seq, &[]);
                }
            }
            if segment.ack_refs.insert(active_id) {
                new_refs += 1;
            }
            written.push(done);
        }
        if let Some(active) = self.acks.segments.get_mut(&active_id) {
            active.ref_count += new_refs;
        }
        if written.is_empty() {
            return results;
        }
        let start = self.acks.segments.get(&active_id).map_or(0, |segment| segment.len);
        let file = self.acks.segments.get(&active_id).map(|segment| Arc::clone(&segment.file));
        let outcome = match file {
            Some(file) => match file.write_all_at(&bytes, start) {
                Ok(()) => Ok(()),
                Err(error) => {
                    let path = self.acks.dir.join(ack_file_name(active_id));
                    if let Err(undo) = file.set_len(start) {
                        Err(self.fatal(format!(
                            "could not truncate {} after a failed write ({error}): {undo}",
                            path.display()
                        )))
                    } else {
                        Err(StoreError::io(format!("appending to {}", path.display()), error))
                    }
                }
            },
            None => Err(self.fatal("the ack log lost its active segment".into())),
        };
        match outcome {
            Ok(()) => {
                if let Some(active) = self.acks.segments.get_mut(&active_id) {
                    active.len = start + bytes.len() as u64;
                }
                self.acks.unsynced.insert(active_id);
                self.acks.dirty_since.get_or_insert_with(Instant::now);
                results.extend(written.into_iter().map(|done| (done, Ok(()))));
            }
            Err(error) => {
                // The removals did not happen: make those messages live again.
                for (queue, base, seq) in removed {
                    if let Some(segment) = self.queues.get_mut(&queue).and_then(|log| log.segments.get_mut(&base)) {
                        segment.live.insert(seq - base);
                        self.deletion_candidates.remove(&(queue, base));
                    }
                }
                results.extend(written.into_iter().map(|done| (done, Err(error.clone()))));
            }
        }
        results
    }

    /// Starts a new ack-log segment if `incoming_bytes` would take the active one past its limit
    /// (an empty segment takes any batch; `StoreConfig::validate` keeps that under the file limit).
    fn roll_ack_segment_if_full(&mut self, incoming_bytes: u64) -> Result<()> {
        let active_len = self.acks.segments.get(&self.acks.active).map_or(0, |segment| segment.len);
        if active_len <= FILE_HEADER_BYTES as u64 || active_len + incoming_bytes <= self.config.ack_segment_bytes_max {
            return Ok(());
        }
        let id = self
            .acks
            .active
            .checked_add(1)
            .ok_or_else(|| StoreError::Config("ack-log segment ids exhausted".into()))?;
        let salt = random_salt();
        let file = create_file(self.fs.as_ref(), &self.acks.dir.join(ack_file_name(id)), ACK_MAGIC, id, 0, 0, salt)?;
        let sealed = self.acks.active;
        self.acks.segments.insert(id, AckSegment { file, salt, len: FILE_HEADER_BYTES as u64, ref_count: 0 });
        self.acks.active = id;
        self.acks.unsynced.insert(id);
        self.acks.dir_dirty = true;
        self.acks.dirty_since.get_or_insert_with(Instant::now);
        if self.acks.segments.get(&sealed).is_some_and(|segment| segment.ref_count == 0) {
            self.delete_ack_segments(&[sealed])?;
        }
        Ok(())
    }

    /// Makes every written ack-log record durable.
    pub(crate) fn sync_acks(&mut self) -> Result<()> {
        for id in std::mem::take(&mut self.acks.unsynced) {
            if let Some(segment) = self.acks.segments.get(&id) {
                if let Err(error) = segment.file.sync_data() {
                    return Err(self.fatal(format!("fdatasync of ack-log segment {id} failed: {error}")));
                }
                self.shared.counters.data_syncs.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.acks.dir_dirty {
            if let Err(error) = self.fs.sync_dir(&self.acks.dir) {
                return Err(self.fatal(format!("fsync of directory {} failed: {error}", self.acks.dir.display())));
            }
            self.acks.dir_dirty = false;
        }
        self.acks.dirty_since = None;
        self.shared.counters.ack_log_syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Deletes sealed segments with no live message (their removals are durable by now), then
    /// the ack-log segments nothing needs any more.
    fn delete_dead_segments(&mut self) -> Result<()> {
        let candidates = std::mem::take(&mut self.deletion_candidates);
        let mut dirs = BTreeSet::new();
        let mut released_refs = Vec::new();
        for (queue, base) in candidates {
            let Some(log) = self.queues.get_mut(&queue) else {
                continue;
            };
            let dead =
                log.active_base != base && log.segments.get(&base).is_some_and(|segment| segment.live.count() == 0);
            if !dead {
                continue;
            }
            let Some(segment) = log.segments.remove(&base) else {
                continue;
            };
            let path = log.dir.join(segment_file_name(segment.id));
            if let Err(error) = self.fs.remove_file(&path) {
                return Err(self.fatal(format!("could not delete {}: {error}", path.display())));
            }
            self.shared
                .segment_files
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .remove(&(queue, segment.id));
            self.shared.counters.segments_deleted.fetch_add(1, Ordering::Relaxed);
            dirs.insert(log.dir.clone());
            released_refs.extend(segment.ack_refs);
        }
        for dir in &dirs {
            if let Err(error) = self.fs.sync_dir(dir) {
                return Err(self.fatal(format!("fsync of directory {} failed: {error}", dir.display())));
            }
        }
        self.release_ack_refs(released_refs)
    }

    /// Drops references to ack-log segments and deletes those left with none (never the active
    /// one). Must only run once the deletions that released the references are durable.
    fn release_ack_refs(&mut self, released: Vec<u64>) -> Result<()> {
        let mut dead = Vec::new();
        for id in released {
            if let Some(segment) = self.acks.segments.get_mut(&id) {
                segment.ref_count = segment.ref_count.saturating_sub(1);
                if segment.ref_count == 0 && id != self.acks.active {
                    dead.push(id);
                }
            }
        }
        self.delete_ack_segments(&dead)
    }

    fn delete_ack_segments(&mut self, ids: &[u64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        // The directory sync below also makes new segments' entries durable; their contents
        // (at least the header) must be durable first, or a crash leaves an empty, unreadable file.
        if self.acks.dir_dirty {
            self.sync_acks()?;
        }
        for id in ids {
            if self.acks.segments.remove(id).is_none() {
                continue;
            }
            self.acks.unsynced.remove(id);
            let path = self.acks.dir.join(ack_file_name(*id));
            if let Err(error) = self.fs.remove_file(&path) {
                return Err(self.fatal(format!("could not delete {}: {error}", path.display())));
            }
            self.shared.counters.ack_segments_deleted.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(error) = self.fs.sync_dir(&self.acks.dir) {
            return Err(self.fatal(format!("fsync of directory {} failed: {error}", self.acks.dir.display())));
        }
        self.acks.dir_dirty = false;
        Ok(())
    }

    fn create_log(&mut self) -> Result<LogId> {
        if self.queues.len() >= self.config.queue_count_max {
            return Err(StoreError::QueueLimit { limit: self.config.queue_count_max });
        }
        if self.next_queue_id >= self.queue_ids_reserved_until {
            let reserve_until = self.next_queue_id + QUEUE_ID_RESERVATION_BLOCK;
            write_queue_id_reservation(self.fs.as_ref(), &self.dir, reserve_until, &self.shared)?;
            self.queue_ids_reserved_until = reserve_until;
        }
        let queue = LogId(self.next_queue_id);
        self.next_queue_id =
            self.next_queue_id.checked_add(1).ok_or_else(|| StoreError::Config("queue ids exhausted".into()))?;
        let queues_dir = queues_dir(&self.dir);
        let dir = queues_dir.join(queue_dir_name(queue));
        if self.fs.exists(&dir).map_err(|error| StoreError::io(format!("checking {}", dir.display()), error))? {
            // Only possible with files this store did not write; never touch them.
            return Err(StoreError::Format {
                path: dir,
                reason: "a queue directory with a fresh id already exists".into(),
            });
        }
        let salt = random_salt();
        let created = self
            .fs
            .create_dir_all(&dir)
            .map_err(|error| StoreError::io(format!("creating {}", dir.display()), error))
            .and_then(|()| {
                create_file(self.fs.as_ref(), &dir.join(segment_file_name(1)), SEGMENT_MAGIC, 1, queue.0, 1, salt)
            });
        let file = match created {
            Ok(file) => file,
            Err(error) => {
                // Best effort: a leftover empty directory is also cleaned up by recovery.
                let _ = self.fs.remove_dir_all(&dir);
                return Err(error);
            }
        };
        if let Err(error) = file.sync_data() {
            return Err(self.fatal(format!("fdatasync of a new segment failed: {error}")));
        }
        for path in [&dir, &queues_dir] {
            if let Err(error) = self.fs.sync_dir(path) {
                return Err(self.fatal(format!("fsync of directory {} failed: {error}", path.display())));
            }
        }
        self.queues.insert(
            queue,
            QueueLog {
                dir,
                salt,
                segments: BTreeMap::from([(
                    1,
                    Segment {
                        id: 1,
                        base_seq: 1,
                        salt,
                        file: Arc::clone(&file),
                        len: FILE_HEADER_BYTES as u64,
                        live: LiveSet::default(),
                        ack_refs: BTreeSet::new(),
                    },
                )]),
                active_base: 1,
                next_segment_id: 2,
                last_seq: 0,
            },
        );
        self.shared
            .segment_files
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert((queue, 1), (file, salt));
        self.shared
            .queues
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(queue, Arc::new(QueueHandle { next_seq: Mutex::new(1), salt }));
        Ok(queue)
    }

    fn delete_log(&mut self, queue: LogId) -> Result<()> {
        let Some(log) = self.queues.remove(&queue) else {
            return Err(StoreError::UnknownLog(queue.0));
        };
        self.shared.queues.write().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&queue);
        self.shared
            .segment_files
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .retain(|(owner, _), _| *owner != queue);
        self.deletion_candidates.retain(|(owner, _)| *owner != queue);
        // Renaming first makes the deletion atomic: recovery finishes whatever `.deleted`
        // directory it finds, and never resurrects half a queue.
        let queues_dir = queues_dir(&self.dir);
        let doomed = queues_dir.join(format!("{}.deleted", queue_dir_name(queue)));
        if let Err(error) = self.fs.rename(&log.dir, &doomed) {
            return Err(self.fatal(format!("could not rename {} for deletion: {error}", log.dir.display())));
        }
        if let Err(error) = self.fs.sync_dir(&queues_dir) {
            return Err(self.fatal(format!("fsync of directory {} failed: {error}", queues_dir.display())));
        }
        if let Err(error) = self.fs.remove_dir_all(&doomed) {
            tracing::warn!(path = %doomed.display(), %error, "could not remove a deleted queue's files; recovery will retry");
        } else if let Err(error) = self.fs.sync_dir(&queues_dir) {
            return Err(self.fatal(format!("fsync of directory {} failed: {error}", queues_dir.display())));
        }
        let released: Vec<u64> = log.segments.into_values().flat_map(|segment| segment.ack_refs).collect();
        self.release_ack_refs(released)
    }
}

/// How many queue ids one durable reservation covers (one small file write per this many queues).
const QUEUE_ID_RESERVATION_BLOCK: u64 = 64;
pub(crate) const QUEUE_IDS_FILE: &str = "queue-ids";
const QUEUE_IDS_TMP_FILE: &str = "queue-ids.tmp";
const QUEUE_IDS_FILE_BYTES: usize = 12;

/// Durably records that queue ids below `reserve_until` may be in use: write a temporary file,
/// sync it, rename it over the old one, sync the directory. Failing before the rename leaves the
/// old reservation in force (an ordinary error); failing after it is fatal.
fn write_queue_id_reservation(fs: &dyn Fs, dir: &Path, reserve_until: u64, shared: &Shared) -> Result<()> {
    let tmp = dir.join(QUEUE_IDS_TMP_FILE);
    if fs.exists(&tmp).map_err(|error| StoreError::io(format!("checking {}", tmp.display()), error))? {
        fs.remove_file(&tmp).map_err(|error| StoreError::io(format!("removing {}", tmp.display()), error))?;
    }
    let mut bytes = reserve_until.to_le_bytes().to_vec();
    bytes.extend_from_slice(&crc32c::crc32c(&bytes).to_le_bytes());
    let written = fs.open(&tmp, OpenMode::CreateNew).and_then(|file| {
        file.write_all_at(&bytes, 0)?;
        file.sync_data()
    });
    if let Err(error) = written {
        let _ = fs.remove_file(&tmp);
        return Err(StoreError::io(format!("writing {}", tmp.display()), error));
    }
    let target = dir.join(QUEUE_IDS_FILE);
    if let Err(error) = fs.rename(&tmp, &target).and_then(|()| fs.sync_dir(dir)) {
        return Err(shared.set_fatal(format!("could not replace {}: {error}", target.display())));
    }
    Ok(())
}

/// What the queue-id reservation file holds.
pub(crate) enum Reservation {
    /// No file (a store that never created a queue).
    Missing,
    /// The file is there but short or failing its checksum.
    Damaged,
    /// Ids below this may have been handed out.
    Below(u64),
}

/// Reads the queue-id reservation. I/O errors are errors: guessing "no reservation" could hand
/// out an id again.
pub(crate) fn read_queue_id_reservation(fs: &dyn Fs, dir: &Path) -> Result<Reservation> {
    let path = dir.join(QUEUE_IDS_FILE);
    let file = match fs.open(&path, OpenMode::Existing) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Reservation::Missing),
        Err(error) => return Err(StoreError::io(format!("opening {}", path.display()), error)),
    };
    let mut bytes = [0u8; QUEUE_IDS_FILE_BYTES];
    match file.read_exact_at(&mut bytes, 0) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Reservation::Damaged),
        Err(error) => return Err(StoreError::io(format!("reading {}", path.display()), error)),
    }
    let (value, crc) = bytes.split_at(8);
    if crc32c::crc32c(value).to_le_bytes() != crc {
        return Ok(Reservation::Damaged);
    }
    let mut word = [0u8; 8];
    word.copy_from_slice(value);
    Ok(Reservation::Below(u64::from_le_bytes(word)))
}

/// Creates a store file with its header written (not yet synced).
pub(crate) fn create_file(
    fs: &dyn Fs,
    path: &Path,
    magic: [u8; 8],
    file_id: u64,
    queue_id: u64,
    base_seq: u64,
    salt: u32,
) -> Result<Arc<dyn FsFile>> {
    let file = fs
        .open(path, OpenMode::CreateNew)
        .map_err(|error| StoreError::io(format!("creating {}", path.display()), error))?;
    let header = FileHeader { magic, file_id, queue_id, base_seq, created_ms: now_ms(), salt };
    if let Err(error) = file.write_all_at(&header.encode(), 0) {
        let _ = fs.remove_file(path);
        return Err(StoreError::io(format!("writing the header of {}", path.display()), error));
    }
    Ok(file)
}
