//! Space for appends, taken when an append is submitted, never later: each log's tail (where its
//! next record goes, and how much of its active segment is allocated) and [`SpaceReservation`].
//!
//! Why at submission: the broker enqueues and may deliver a message as soon as `append` returns,
//! long before the writer thread writes it. If the write could then fail for lack of space, the
//! publisher would be nacked for a message a consumer already has. So the caller's thread places
//! the record (segment and offset) under the log's lock, and makes sure the blocks for it are
//! allocated (`fallocate` with the length kept, in growing steps) before the append is accepted;
//! a new segment, when the active one is full, is created and allocated here too. Without the
//! space, `append` fails at once with `NoSpace` and nothing is queued. The writer only writes
//! into space that is already the record's, so a failed write there is fatal (`writer/mod.rs`).
//!
//! A [`SpaceReservation`] holds bytes in a log's allocated tail for a record appended later: a
//! publish routed to several queues reserves every copy (and its de-duplication key records)
//! before any copy is appended, so it is stored whole or not at all. A segment is not rolled
//! while reservations are held in it.
//!
//! On a file system without `fallocate`, space is not held ahead: a write that then finds the
//! disk full stops the store (fatal) rather than fail a message that may have been delivered.

use crate::error::{Result, StoreError};
use crate::format::{
    self, BODY_BYTES_MAX, FILE_HEADER_BYTES, META_BYTES_MAX, RECORD_BYTES_MAX, RECORD_HEADER_BYTES, RecordKind,
    SEGMENT_MAGIC,
};
use crate::fs::{Fs, FsFile};
use crate::layout::{create_file, segment_file_name};
use crate::store::{AppendReceipt, LogId, PendingAppend, QueueHandle, SEGMENT_FILE_BYTES_LIMIT};
use crate::ticket::{self, Observer};
use crate::writer::Op;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;

/// The smallest step by which a segment's allocation grows (a file system block).
const ALLOCATION_STEP_BYTES_MIN: u64 = 4 * 1024;
/// The largest: a busy log allocates once per this many bytes, an idle one holds little.
const ALLOCATION_STEP_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Where a log's next record goes, and the space held for it. Guarded by the log's lock, under
/// which seqs are taken and records sent to the writer, so the writer sees them in this order.
#[derive(Debug)]
pub(crate) struct Tail {
    pub next_seq: u64,
    /// The segment new records go to, and its file.
    pub segment_id: u64,
    pub file: Arc<dyn FsFile>,
    pub next_segment_id: u64,
    /// The end of every record placed so far: where the next one goes.
    pub end_bytes: u64,
    /// Bytes `[0, allocated_end_bytes)` of the segment have their blocks allocated.
    pub allocated_end_bytes: u64,
    /// Bytes of the allocated tail held by reservations not yet appended.
    pub reserved_bytes: u64,
}

impl Tail {
    /// The tail of a segment whose records end at `len_bytes` (allocation unknown: the first
    /// reservation allocates, which costs nothing where blocks already are).
    pub fn new(next_seq: u64, segment_id: u64, file: Arc<dyn FsFile>, len_bytes: u64) -> Tail {
        Tail {
            next_seq,
            segment_id,
            file,
            next_segment_id: segment_id + 1,
            end_bytes: len_bytes,
            allocated_end_bytes: len_bytes,
            reserved_bytes: 0,
        }
    }
}

/// Bytes held in a log's active segment for one record to be appended later with
/// [`crate::Store::append_reserved`]. Dropping it unused gives the bytes back to the log.
#[derive(Debug)]
#[must_use = "a reservation holds space until it is appended or dropped"]
pub struct SpaceReservation {
    pub(crate) queue: LogId,
    pub(crate) bytes: u64,
    pub(crate) handle: Option<Arc<QueueHandle>>,
}

impl SpaceReservation {
    /// The log it is for.
    pub fn log(&self) -> LogId {
        self.queue
    }

    /// How many bytes of record it holds.
    pub fn record_bytes(&self) -> u64 {
        self.bytes
    }

    /// Hands the held bytes over to an append (which takes them from the tail itself).
    pub(crate) fn take(mut self) -> Option<Arc<QueueHandle>> {
        self.handle.take()
    }
}

impl Drop for SpaceReservation {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let mut tail = handle.lock_tail();
            tail.reserved_bytes = tail.reserved_bytes.saturating_sub(self.bytes);
        }
    }
}

/// What placing records needs besides the tail: the file system, the log's directory, the
/// writer's channel (for a roll), and the limits.
pub(crate) struct Placer<'a> {
    pub fs: &'a dyn Fs,
    pub sender: &'a SyncSender<Op>,
    pub segment_bytes_max: u64,
    /// Set once a file system said it cannot allocate ahead (warned about once).
    pub allocation_unsupported: &'a AtomicBool,
}

impl Placer<'_> {
    /// Holds `bytes` more in the tail's allocated space, growing the allocation or rolling to a
    /// new segment as needed. Fails with `NoSpace` (holding nothing more) when the disk is full.
    pub fn reserve(&self, queue: LogId, dir: &Path, salt: u32, tail: &mut Tail, bytes: u64) -> Result<()> {
        let needed_end = tail.end_bytes + tail.reserved_bytes + bytes;
        if needed_end <= tail.allocated_end_bytes {
            tail.reserved_bytes += bytes;
            return Ok(());
        }
        let header = FILE_HEADER_BYTES as u64;
        // An empty segment takes any record; otherwise a record that would pass the segment size
        // goes to a new segment. Not while reservations are outstanding: they are held in this
        // segment, so it grows past the size a little instead (up to the limit recovery reads).
        let over_size = needed_end > self.segment_bytes_max && tail.end_bytes + tail.reserved_bytes > header;
        if over_size && (tail.reserved_bytes == 0 || needed_end > SEGMENT_FILE_BYTES_LIMIT) {
            if tail.reserved_bytes > 0 {
                return Err(StoreError::NoSpace { context: format!("reserving in a full segment of log {queue}") });
            }
            self.roll(queue, dir, salt, tail)?;
            return self.reserve(queue, dir, salt, tail, bytes);
        }
        let ceiling = self.segment_bytes_max.max(needed_end);
        self.allocate(tail, needed_end, ceiling)?;
        tail.reserved_bytes += bytes;
        Ok(())
    }

    /// Makes `[allocated_end, needed_end)` of the tail's segment allocated, with a step ahead
    /// (about as much as the segment already holds) when the disk has it, never past `ceiling`.
    fn allocate(&self, tail: &mut Tail, needed_end: u64, ceiling: u64) -> Result<()> {
        let step = tail.allocated_end_bytes.clamp(ALLOCATION_STEP_BYTES_MIN, ALLOCATION_STEP_BYTES_MAX);
        let ahead_end = needed_end.saturating_add(step).next_multiple_of(ALLOCATION_STEP_BYTES_MIN).min(ceiling);
        let from = tail.allocated_end_bytes;
        let mut last_error = None;
        for end in [ahead_end, needed_end] {
            match tail.file.allocate(from, end - from) {
                Ok(()) => {
                    tail.allocated_end_bytes = end;
                    return Ok(());
                }
                Err(error) if error.kind() == std::io::ErrorKind::Unsupported => {
                    if !self.allocation_unsupported.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            %error,
                            "the file system cannot allocate space ahead (fallocate): on a full disk the store \
                             will stop instead of refusing appends"
                        );
                    }
                    tail.allocated_end_bytes = ahead_end;
                    return Ok(());
                }
                Err(error) => last_error = Some(error),
            }
        }
        let error = last_error.unwrap_or_else(|| std::io::Error::other("allocation failed"));
        Err(StoreError::io("allocating space for an append", error))
    }

    /// Seals the active segment (no reservation is outstanding in it) and makes the next one
    /// active; the writer learns of it before any record placed in it. The new segment is
    /// announced even if no space can be allocated in it yet: it is empty, and the caller's
    /// allocation there fails or succeeds like any other.
    fn roll(&self, queue: LogId, dir: &Path, salt: u32, tail: &mut Tail) -> Result<()> {
        let segment_id = tail.next_segment_id;
        // A failed creation never leaves an id to be tried again (a leftover file would be in
        // the way).
        tail.next_segment_id += 1;
        let path = dir.join(segment_file_name(segment_id));
        let file = create_file(self.fs, &path, SEGMENT_MAGIC, segment_id, queue.0, tail.next_seq, salt)?;
        let roll = Op::Roll {
            queue,
            segment_id,
            base_seq: tail.next_seq,
            file: Arc::clone(&file),
            sealed_allocated_end_bytes: tail.allocated_end_bytes,
        };
        self.sender.send(roll).map_err(|_| StoreError::Closed)?;
        let header = FILE_HEADER_BYTES as u64;
        *tail = Tail {
            next_seq: tail.next_seq,
            segment_id,
            file,
            next_segment_id: tail.next_segment_id,
            end_bytes: header,
            allocated_end_bytes: header,
            reserved_bytes: 0,
        };
        Ok(())
    }
}

impl crate::Store {
    /// The size of the record an append of `meta_bytes` and `body_bytes` writes: what
    /// [`crate::Store::reserve`] must hold for it.
    pub fn record_bytes(meta_bytes: usize, body_bytes: usize) -> u64 {
        (RECORD_HEADER_BYTES + meta_bytes + body_bytes) as u64
    }

    /// Holds space for records to append later, one reservation per `(log, record bytes)`
    /// (see [`crate::Store::record_bytes`]), all or nothing: on `NoSpace` (or any other error)
    /// nothing stays held. An append with a reservation cannot fail for lack of space.
    pub fn reserve(&self, requests: &[(LogId, u64)]) -> Result<Vec<SpaceReservation>> {
        self.inner.shared.check_fatal()?;
        let mut held = Vec::with_capacity(requests.len());
        for &(queue, bytes) in requests {
            if !(RECORD_HEADER_BYTES as u64..=RECORD_BYTES_MAX as u64).contains(&bytes) {
                return Err(StoreError::TooLarge {
                    what: "reserved record",
                    bytes,
                    limit_bytes: RECORD_BYTES_MAX as u64,
                });
            }
            let handle = self.queue_handle(queue)?;
            self.placer().reserve(queue, &handle.dir, handle.salt, &mut handle.lock_tail(), bytes)?;
            held.push(SpaceReservation { queue, bytes, handle: Some(handle) });
        }
        Ok(held)
    }

    /// Appends a record into space held by `reservation` (its log; at most its bytes), like
    /// [`crate::Store::append_observed`] with an optional observer. Never fails for lack of space.
    pub fn append_reserved(
        &self,
        reservation: SpaceReservation,
        timestamp_ms: u64,
        meta: &[u8],
        body: &[u8],
        observer: Option<Observer<AppendReceipt>>,
    ) -> Result<PendingAppend> {
        let queue = reservation.queue;
        self.submit_append(queue, Some(reservation), timestamp_ms, meta, body, observer)
    }

    pub(crate) fn append_with(
        &self,
        queue: LogId,
        timestamp_ms: u64,
        meta: &[u8],
        body: &[u8],
        observer: Option<Observer<AppendReceipt>>,
    ) -> Result<PendingAppend> {
        self.submit_append(queue, None, timestamp_ms, meta, body, observer)
    }

    fn placer(&self) -> Placer<'_> {
        Placer {
            fs: self.inner.fs.as_ref(),
            sender: &self.inner.sender,
            segment_bytes_max: self.inner.segment_bytes_max,
            allocation_unsupported: &self.inner.allocation_unsupported,
        }
    }

    /// Encodes the record (outside the log's lock: the payload checksum is the expensive part),
    /// takes its space (from `reservation`, or now), its seq and its place, and hands it to the
    /// writer, all under the log's lock.
    fn submit_append(
        &self,
        queue: LogId,
        reservation: Option<SpaceReservation>,
        timestamp_ms: u64,
        meta: &[u8],
        body: &[u8],
        observer: Option<Observer<AppendReceipt>>,
    ) -> Result<PendingAppend> {
        if meta.len() > META_BYTES_MAX {
            return Err(StoreError::TooLarge {
                what: "message meta",
                bytes: meta.len() as u64,
                limit_bytes: META_BYTES_MAX as u64,
            });
        }
        if body.len() > BODY_BYTES_MAX {
            return Err(StoreError::TooLarge {
                what: "message body",
                bytes: body.len() as u64,
                limit_bytes: BODY_BYTES_MAX as u64,
            });
        }
        self.inner.shared.check_fatal()?;
        let handle = match &reservation {
            Some(held) => held.handle.clone().ok_or(StoreError::UnknownLog(queue.0))?,
            None => self.queue_handle(queue)?,
        };
        let mut record = Vec::with_capacity(RECORD_HEADER_BYTES + meta.len() + body.len());
        format::encode_record(
            &mut record,
            handle.salt,
            RecordKind::Message,
            meta.len() as u32,
            0,
            timestamp_ms,
            &[meta, body],
        );
        let record_bytes = record.len() as u64;
        if let Some(held) = &reservation
            && record_bytes > held.bytes
        {
            return Err(StoreError::TooLarge { what: "reserved record", bytes: record_bytes, limit_bytes: held.bytes });
        }
        let (completer, ticket) = match observer {
            Some(observer) => ticket::observed_ticket(observer),
            None => ticket::ticket(),
        };
        self.inner.shared.reserve_pending(record_bytes, self.inner.pending_bytes_max)?;
        let mut tail = handle.lock_tail();
        let held_bytes = match reservation {
            Some(held) => {
                let bytes = held.bytes;
                // The bytes are taken from the tail below, not given back by its drop.
                drop(held.take());
                bytes
            }
            None => {
                if let Err(error) = self.placer().reserve(queue, &handle.dir, handle.salt, &mut tail, record_bytes) {
                    drop(tail);
                    self.inner.shared.release_pending(record_bytes);
                    return Err(error);
                }
                record_bytes
            }
        };
        tail.reserved_bytes = tail.reserved_bytes.saturating_sub(held_bytes);
        let seq = tail.next_seq;
        let offset = tail.end_bytes;
        format::set_record_word_a(&mut record, handle.salt, seq);
        let append = Op::Append { queue, seq, segment_id: tail.segment_id, offset, record, done: completer };
        self.inner.sender.send(append).map_err(|_| StoreError::Closed)?;
        tail.end_bytes += record_bytes;
        tail.next_seq += 1;
        Ok(PendingAppend { seq, ticket })
    }
}
