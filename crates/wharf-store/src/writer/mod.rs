//! The group-commit writer: one std thread per store that does every write, sync and deletion.
//!
//! A batch is whatever arrived while the previous batch was being synced (adaptive, no timer):
//! the writer blocks for the first operation, drains everything else already queued (up to
//! `batch_bytes_max`), then
//! 1. writes each dirtied segment's new records with one positional write,
//! 2. makes them durable, then completes the appends: with one `fdatasync` of the shared journal
//!    when the batch wrote to several segments (`journal.rs`; the segments are synced at the next
//!    checkpoint), otherwise with an `fdatasync` of each segment written; new files and
//!    directories are synced in the batch either way,
//! 3. writes removals and delivery counts to the ack log (only after the appends they refer to are
//!    durable, so a durable ack can never point at a message that a crash could still take away
//!    and whose seq could then be reused),
//! 4. syncs the ack log when someone asked (`Store::sync`), when the lazy interval ran out, or when
//!    a fully removed segment is waiting to be deleted,
//! 5. deletes fully removed segments, syncs their directory, then deletes ack-log segments that no
//!    remaining segment needs.
//!
//! Appends arrive placed (segment and offset) in space their submitters allocated before
//! accepting them (`space.rs`), so a failed write of appends is fatal: a caller may already have
//! delivered those records. A failed ack-log write is undone (the file is truncated back) and
//! fails only its own operations. A failed sync, or an undo that fails, is fatal: the store stops
//! and every later operation fails.
//!
//! Steps 1 and 2 are here; 3 and 4 in `acks.rs`; 5 and the creation and deletion of logs in
//! `logs.rs`.

mod acks;
mod logs;

use crate::error::{Result, StoreError};
use crate::format::{self, ACK_MAGIC, FILE_HEADER_BYTES, RecordKind, SEGMENT_MAGIC, SEGMENT_SEQ_SPAN_MAX};
use crate::fs::{Fs, FsFile};
use crate::journal::Journal;
use crate::layout::{ack_file_name, create_file, queue_dir_name, queues_dir, random_salt, segment_file_name};
use crate::live_set::LiveSet;
use crate::store::{AppendReceipt, LogId, MessageLocation, Shared, StoreConfig};
use crate::ticket::Completer;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// An operation sent to the writer thread.
#[derive(Debug)]
pub(crate) enum Op {
    /// A record placed by its submitter (`space.rs`) at `offset` of segment `segment_id`, in
    /// space already allocated for it.
    Append {
        queue: LogId,
        seq: u64,
        segment_id: u64,
        offset: u64,
        record: Vec<u8>,
        done: Completer<AppendReceipt>,
    },
    /// A submitter started a new segment (created, its header written): it is the log's active
    /// segment from here on; the sealed one gives back what was allocated past its end.
    Roll {
        queue: LogId,
        segment_id: u64,
        base_seq: u64,
        file: Arc<dyn FsFile>,
        sealed_allocated_end_bytes: u64,
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
            Op::Roll { .. } => {}
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Op::Append { record, .. } => record.len(),
            _ => format::RECORD_HEADER_BYTES,
        }
    }
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
    /// Bytes `[0, allocated_end_bytes)` are allocated (see `WriterState::keep_ack_space_ahead`).
    pub allocated_end_bytes: u64,
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
    /// The shared journal (`journal.rs`); `None` when configured off.
    pub journal: Option<Journal>,
}

/// An append that has a place in this batch's writes.
struct PlannedAppend {
    queue: LogId,
    seq: u64,
    segment_base: u64,
    location: MessageLocation,
    done: Completer<AppendReceipt>,
}

/// The new bytes for one segment in this batch.
struct PlannedWrite {
    queue: LogId,
    segment_base: u64,
    start: u64,
    bytes: Vec<u8>,
}

/// Where a submitter placed a record.
struct Placed {
    queue: LogId,
    seq: u64,
    segment_id: u64,
    offset: u64,
}

/// What this batch's segment rolls left to do: files and directories to sync, and sealed
/// segments (log, base seq, allocated end) whose unused allocation to give back.
#[derive(Default)]
struct Rolled {
    dirs: Vec<PathBuf>,
    new_files: Vec<Arc<dyn FsFile>>,
    sealed: Vec<(LogId, u64, u64)>,
}

// A segment's seqs stay within the span recovery reads: an append refused for lack of space
// takes no seq (its space is taken before it is placed), so a segment holds consecutive seqs, and
// even the largest segment of the smallest records has fewer than the span.
const _: () =
    assert!(crate::store::SEGMENT_FILE_BYTES_LIMIT / format::RECORD_HEADER_BYTES as u64 <= SEGMENT_SEQ_SPAN_MAX);

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
    state.keep_ack_space_ahead();
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
        if batch.appends > 0 {
            state.shared.counters.batch_appends.observe(batch.appends as u64);
        }
        let closed = state.process(&mut batch.ops);
        state.shared.release_pending(batch.append_bytes);
        if closed {
            stop_writer(&state);
            return;
        }
    }
    // Every handle is gone without a close: make the last removals durable anyway.
    if state.shared.check_fatal().is_ok()
        && let Err(error) = state.checkpoint().and_then(|()| state.sync_acks())
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
                Op::Append { .. } | Op::Roll { .. } | Op::Ack { .. } | Op::Sync(_) => io_ops.push(op),
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
                    // A checkpoint first, so the next open has no journal to replay.
                    let closed_cleanly = self.shared.check_fatal().and_then(|()| self.checkpoint());
                    done.complete(closed_cleanly.and_then(|()| self.sync_acks()));
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
        let mut rolled = Rolled::default();
        for op in ops.drain(..) {
            match op {
                Op::Append { queue, seq, segment_id, offset, record, done } => {
                    let placed = Placed { queue, seq, segment_id, offset };
                    self.plan_append(placed, record, done, &mut appends, &mut writes)
                }
                Op::Roll { queue, segment_id, base_seq, file, sealed_allocated_end_bytes } => {
                    self.plan_roll(queue, segment_id, base_seq, file, sealed_allocated_end_bytes, &mut rolled);
                    dirty_dirs.extend(rolled.dirs.drain(..));
                }
                Op::Ack { queue, seq, delivery_count, done } => acks.push((queue, seq, delivery_count, done)),
                Op::Sync(done) => sync_requests.push(done),
                other => other.fail(StoreError::Closed),
            }
        }

        if let Err(fatal) = self.write_and_sync_appends(&mut writes, &rolled.new_files, &dirty_dirs) {
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
            if let Some(segment) =
                self.queues.get_mut(&append.queue).and_then(|log| log.segments.get_mut(&append.segment_base))
            {
                segment.live.insert(append.seq - segment.base_seq);
            }
            self.shared.counters.appends.fetch_add(1, Ordering::Relaxed);
            append.done.complete(Ok(AppendReceipt { seq: append.seq, location: append.location }));
        }
        self.release_sealed_allocations(rolled.sealed);

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

    /// Adds a placed record to this batch's write for its segment, which must be the log's active
    /// one with the record right after what is written and planned there (the submitters place
    /// records in order under the log's lock; anything else is a bug, and fatal).
    fn plan_append(
        &mut self,
        placed: Placed,
        record: Vec<u8>,
        done: Completer<AppendReceipt>,
        appends: &mut Vec<PlannedAppend>,
        writes: &mut Vec<PlannedWrite>,
    ) {
        let Placed { queue, seq, segment_id, offset } = placed;
        let Some(log) = self.queues.get_mut(&queue) else {
            done.complete(Err(StoreError::UnknownLog(queue.0)));
            return;
        };
        let active_base = log.active_base;
        let Some(active) = log.segments.get(&active_base) else {
            done.complete(Err(self.shared.set_fatal(format!("queue {queue} lost its active segment"))));
            return;
        };
        let write_index = writes.iter().rposition(|write| write.queue == queue && write.segment_base == active_base);
        let expected_offset = match write_index {
            Some(index) => writes[index].start + writes[index].bytes.len() as u64,
            None => active.len,
        };
        if seq <= log.last_seq || segment_id != active.id || offset != expected_offset {
            let reason = format!(
                "queue {queue}: record {seq} placed at segment {segment_id} offset {offset}, but the writer is at \
                 seq {} segment {} offset {expected_offset}",
                log.last_seq, active.id
            );
            done.complete(Err(self.shared.set_fatal(reason)));
            return;
        }
        log.last_seq = seq;
        let write_index = match write_index {
            Some(index) => index,
            None => {
                writes.push(PlannedWrite { queue, segment_base: active_base, start: active.len, bytes: Vec::new() });
                writes.len() - 1
            }
        };
        let write = &mut writes[write_index];
        let location = MessageLocation { segment_id, offset, record_bytes: record.len() as u32 };
        write.bytes.extend_from_slice(&record);
        appends.push(PlannedAppend { queue, seq, segment_base: active_base, location, done });
    }

    /// Makes a segment a submitter created the log's active one (see `Op::Roll`).
    fn plan_roll(
        &mut self,
        queue: LogId,
        segment_id: u64,
        base_seq: u64,
        file: Arc<dyn FsFile>,
        sealed_allocated_end_bytes: u64,
        rolled: &mut Rolled,
    ) {
        let Some(log) = self.queues.get_mut(&queue) else {
            return;
        };
        let sealed_base = log.active_base;
        log.segments.insert(
            base_seq,
            Segment {
                id: segment_id,
                base_seq,
                salt: log.salt,
                file: Arc::clone(&file),
                len: FILE_HEADER_BYTES as u64,
                live: LiveSet::default(),
                ack_refs: BTreeSet::new(),
            },
        );
        log.active_base = base_seq;
        log.next_segment_id = log.next_segment_id.max(segment_id + 1);
        rolled.dirs.push(log.dir.clone());
        rolled.new_files.push(Arc::clone(&file));
        rolled.sealed.push((queue, sealed_base, sealed_allocated_end_bytes));
        self.shared
            .segment_files
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert((queue, segment_id), (file, log.salt));
        if log.segments.get(&sealed_base).is_some_and(|sealed| sealed.live.count() == 0) {
            self.deletion_candidates.insert((queue, sealed_base));
        }
    }

    /// Gives back what was allocated past the end of segments sealed in this batch (their last
    /// records are written by now). Only space is at stake, so a failure is logged, not raised.
    fn release_sealed_allocations(&mut self, sealed: Vec<(LogId, u64, u64)>) {
        for (queue, base, allocated_end_bytes) in sealed {
            let Some(segment) = self.queues.get(&queue).and_then(|log| log.segments.get(&base)) else {
                continue;
            };
            if allocated_end_bytes > segment.len
                && let Err(error) = segment.file.release_allocation(segment.len, allocated_end_bytes - segment.len)
            {
                tracing::warn!(%queue, segment = segment.id, %error, "could not give back space past a sealed segment's end");
            }
        }
    }

    /// Performs the planned writes and makes them durable: through one sync of the journal when
    /// the batch wrote to several segments (each write small enough for it), otherwise by syncing
    /// each written segment; then syncs new segment files and dirtied directories. A failed write
    /// or sync is fatal.
    fn write_and_sync_appends(
        &mut self,
        writes: &mut [PlannedWrite],
        new_files: &[Arc<dyn FsFile>],
        dirty_dirs: &BTreeSet<PathBuf>,
    ) -> Result<()> {
        // A new segment's header is durable before its directory entry is.
        let mut to_sync: Vec<Arc<dyn FsFile>> = new_files.to_vec();
        let through_journal = self.plan_journal(writes)?;
        for (index, write) in writes.iter_mut().enumerate() {
            let Some(log) = self.queues.get_mut(&write.queue) else {
                continue;
            };
            let Some(segment) = log.segments.get_mut(&write.segment_base) else {
                continue;
            };
            match segment.file.write_all_at(&write.bytes, write.start) {
                Ok(()) => segment.len = write.start + write.bytes.len() as u64,
                Err(error) => {
                    // The space was the records' before they were accepted, and a caller may
                    // have delivered them since: failing them now would break that promise.
                    let path = log.dir.join(segment_file_name(segment.id));
                    return Err(
                        self.fatal(format!("a write into space allocated for it failed ({}): {error}", path.display()))
                    );
                }
            }
            match self.journal.as_mut().filter(|_| through_journal.get(index).copied().unwrap_or(false)) {
                Some(journal) => {
                    journal.add(write.queue, segment.id, write.start, &write.bytes);
                    journal.dirty_segments.insert((write.queue, write.segment_base));
                }
                None => to_sync.push(Arc::clone(&segment.file)),
            }
        }
        if let Some(journal) = self.journal.as_mut() {
            let started = Instant::now();
            let journal_synced = journal.write_and_sync();
            if let Err(error) = journal_synced {
                let path = journal.path().display().to_string();
                return Err(self.fatal(format!("writing and syncing the journal {path} failed: {error}")));
            }
            if through_journal.contains(&true) {
                self.count_sync(started);
            }
        }
        for file in &to_sync {
            let started = Instant::now();
            if let Err(error) = file.sync_data() {
                return Err(self.fatal(format!("fdatasync of a queue segment failed: {error}")));
            }
            self.count_sync(started);
        }
        for dir in dirty_dirs {
            if let Err(error) = self.fs.sync_dir(dir) {
                return Err(self.fatal(format!("fsync of directory {} failed: {error}", dir.display())));
            }
        }
        Ok(())
    }

    fn count_sync(&self, started: Instant) {
        self.shared.counters.sync_latency_us.observe(started.elapsed().as_micros() as u64);
        self.shared.counters.data_syncs.fetch_add(1, Ordering::Relaxed);
    }

    /// Which of this batch's writes go through the journal (see `journal.rs` for which skip it),
    /// making room first with a checkpoint if they do not fit in what is left of it.
    fn plan_journal(&mut self, writes: &[PlannedWrite]) -> Result<Vec<bool>> {
        let Some(journal) = self.journal.as_ref() else {
            return Ok(Vec::new());
        };
        let write_bytes_max = self.config.journal_write_bytes_max;
        let mut through: Vec<bool> = writes.iter().map(|write| write.bytes.len() <= write_bytes_max).collect();
        if through.iter().filter(|through| **through).count() < 2 {
            return Ok(Vec::new());
        }
        let lengths = writes.iter().zip(&through).filter(|(_, through)| **through).map(|(write, _)| write.bytes.len());
        let needed = Journal::record_bytes(lengths);
        if !journal.could_ever_fit(needed) {
            through.clear();
        } else if !journal.fits(needed) {
            self.checkpoint()?;
        }
        Ok(through)
    }

    /// Syncs every segment written through the journal since the last checkpoint, then starts
    /// the journal over. Any failure is fatal: the journal's promises rest on these syncs.
    pub(crate) fn checkpoint(&mut self) -> Result<()> {
        let Some(journal) = self.journal.as_mut() else {
            return Ok(());
        };
        if journal.used_bytes() == 0 {
            return Ok(());
        }
        let dirty = std::mem::take(&mut journal.dirty_segments);
        // A segment deleted since (all its records removed) or of a deleted queue needs nothing.
        let files: Vec<Arc<dyn FsFile>> = dirty
            .iter()
            .filter_map(|(queue, base)| self.queues.get(queue).and_then(|log| log.segments.get(base)))
            .map(|segment| Arc::clone(&segment.file))
            .collect();
        if let Err(error) = sync_in_parallel(&files, &self.shared.counters) {
            return Err(self.fatal(format!("fdatasync of a queue segment at a checkpoint failed: {error}")));
        }
        let Some(journal) = self.journal.as_mut() else {
            return Ok(());
        };
        if let Err(error) = journal.start_over() {
            let path = journal.path().display().to_string();
            return Err(self.fatal(format!("starting the journal {path} over failed: {error}")));
        }
        self.shared.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Threads a checkpoint syncs its segments from.
const CHECKPOINT_SYNC_THREADS: usize = 8;

/// Syncs `files` from up to `CHECKPOINT_SYNC_THREADS` threads at once. A checkpoint is the one
/// place with many files to sync and no order among them, and the disk serves several syncs in
/// flight faster than the same syncs one after another (64 files: 2.7x from 8 threads, measured
/// by `bench/sync_layouts.py`), so the writer's pause at a checkpoint is shorter. Returns the first
/// failure (every file is still tried; the caller treats any failure as fatal).
fn sync_in_parallel(files: &[Arc<dyn FsFile>], counters: &crate::store::Counters) -> std::io::Result<()> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let first_error = std::sync::Mutex::new(None);
    let sync_each = || {
        while let Some(file) = files.get(next.fetch_add(1, Ordering::Relaxed)) {
            let started = Instant::now();
            match file.sync_data() {
                Ok(()) => {
                    counters.sync_latency_us.observe(started.elapsed().as_micros() as u64);
                    counters.data_syncs.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    first_error.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get_or_insert(error);
                }
            }
        }
    };
    let threads = CHECKPOINT_SYNC_THREADS.min(files.len());
    if threads <= 1 {
        sync_each();
    } else {
        std::thread::scope(|scope| {
            for _ in 0..threads {
                // Without another thread (the system is out of them), this one does the work.
                if std::thread::Builder::new().spawn_scoped(scope, sync_each).is_err() {
                    sync_each();
                }
            }
        });
    }
    match first_error.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner()) {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use crate::{SimFs, Store, StoreConfig};

    #[test]
    fn appends_refused_on_a_full_disk_take_no_seq() {
        let sim = SimFs::new(11);
        let (store, _) = Store::open(sim.shared(), "/data", StoreConfig::default()).unwrap();
        let queue = store.create_log().unwrap().wait().unwrap();
        let first = store.append(queue, 1, b"", b"first").unwrap().wait().unwrap();
        sim.set_space_bytes_max(Some(sim.used_bytes()));
        let mut refused = 0;
        for _ in 0..64 {
            // Refused at submission, or (once the segment's allocated space is used up) never
            // accepted: either way not fatal.
            if let Err(error) = store.append(queue, 1, b"", &[0; 4096]).and_then(|ticket| ticket.wait()) {
                assert!(!error.is_fatal(), "{error:?}");
                refused += 1;
            }
        }
        assert!(refused > 0, "the full disk refused appends");
        sim.set_space_bytes_max(None);
        let after = store.append(queue, 1, b"", b"after").unwrap().wait().unwrap();
        assert_eq!(after.seq, first.seq + 1 + (64 - refused), "only accepted appends take seqs");
        store.close().unwrap();
        let (_, recovered) = Store::open(sim.shared(), "/data", StoreConfig::default()).unwrap();
        assert_eq!(recovered.queues[&queue].len() as u64, 2 + (64 - refused));
    }
}
