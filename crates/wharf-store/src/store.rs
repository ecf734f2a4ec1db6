//! [`Store`]: the public face of the message log. It owns the writer thread and the state shared
//! with callers (per-queue seq counters, open segment handles for reads, the fatal flag).
//!
//! Callers encode their record (and its payload checksum) on their own thread, take the next seq
//! under the queue's small lock, and hand the record to the group-commit writer over a bounded
//! channel; the writer does all file I/O. Reads go straight to the segment files with `pread`.

pub use crate::config::{SEGMENT_FILE_BYTES_LIMIT, StoreConfig};
use crate::error::{Result, StoreError};
use crate::format::{self, RECORD_BYTES_MAX, RECORD_HEADER_BYTES, RecordKind};
use crate::fs::{Fs, OpenMode};
use crate::layout;
use crate::recovery;
use crate::ticket::{self, Completer, Ticket};
use crate::writer::{self, Op};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;

/// Identifies a log inside one store: an ordered series of records that one owner appends to and
/// removes from (a queue's messages, a delayed-message exchange's waiting messages, a
/// de-duplication key log). Allocated by [`Store::create_log`] and never reused in the same data
/// directory, so a stale ack record can never hit a new log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LogId(pub u64);

impl fmt::Display for LogId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}", self.0)
    }
}

/// Where a message record lives; enough to read it back with one `pread`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageLocation {
    /// The segment file (per queue).
    pub segment_id: u64,
    /// Byte offset of the record in the segment.
    pub offset: u64,
    /// Length of the whole record.
    pub record_bytes: u32,
}

/// What a completed append reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendReceipt {
    /// The message's seq in its queue (strictly increasing in append order, starting at 1).
    pub seq: u64,
    /// Where it was written.
    pub location: MessageLocation,
}

/// An append on its way to disk: its seq is known at once (so the message can be delivered, and
/// even removed, before it is durable), its ticket resolves once it is durable.
#[derive(Debug)]
#[must_use = "the ticket says when the message is durable"]
pub struct PendingAppend {
    /// The message's seq in its queue.
    pub seq: u64,
    /// Resolves when the record is written and synced.
    pub ticket: Ticket<AppendReceipt>,
}

impl PendingAppend {
    /// Blocks until the append is durable.
    pub fn wait(self) -> Result<AppendReceipt> {
        self.ticket.wait()
    }
}

/// A message read back from a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Its seq in the queue.
    pub seq: u64,
    /// The timestamp given at append.
    pub timestamp_ms: u64,
    /// The caller's metadata bytes (routing information, encoded properties).
    pub meta: Vec<u8>,
    /// The body.
    pub body: Vec<u8>,
}

/// A record read by [`Store::read_each`], borrowed from its read buffer.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    /// The timestamp given at append.
    pub timestamp_ms: u64,
    /// The caller's metadata bytes.
    pub meta: &'a [u8],
    /// The body.
    pub body: &'a [u8],
}

/// A live message found by recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveredMessage {
    /// Its seq.
    pub seq: u64,
    /// The timestamp given at append.
    pub timestamp_ms: u64,
    /// How many times it was delivered, as last recorded durably (0 if never).
    pub delivery_count: u32,
    /// Where to read it.
    pub location: MessageLocation,
    /// Where its meta is in its queue's arena (see [`Recovered::meta`]): (offset, length).
    pub(crate) meta_at: (usize, usize),
}

/// One problem recovery found and handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryIssue {
    /// Bytes that failed their checksum or structure checks; skipped, never returned.
    Corruption {
        /// The file.
        path: PathBuf,
        /// Where the bad bytes start.
        offset: u64,
        /// How many bytes were skipped.
        bytes: u64,
    },
    /// An incomplete write at the end of a file (a torn tail); cut off.
    TruncatedTail {
        /// The file.
        path: PathBuf,
        /// The new end of the file.
        offset: u64,
        /// How many bytes were cut.
        bytes: u64,
    },
    /// A whole file that could not be used (bad header); left in place, ignored.
    UnreadableFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// What [`Store::open`] found on disk.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Live messages per queue, in seq (= append) order. Every queue in the store is listed, empty
    /// ones too.
    pub queues: std::collections::BTreeMap<LogId, Vec<RecoveredMessage>>,
    /// Problems found and handled (also logged).
    pub issues: Vec<RecoveryIssue>,
    /// The last stop was clean ([`Store::close`] succeeded): every removal and delivery count
    /// written before it is on disk. After any other stop, lazily synced delivery counts may be
    /// missing, so a caller must treat every recovered message as possibly delivered.
    pub clean_stop: bool,
    /// The meta bytes of every message record scanned, per queue: recovery reads each segment
    /// once, so a caller rebuilding its state needs to read back only the bodies it keeps.
    pub(crate) metas: std::collections::BTreeMap<LogId, Vec<u8>>,
}

impl RecoveredMessage {
    /// The length of its body.
    pub fn body_bytes(&self) -> u64 {
        (self.location.record_bytes as usize).saturating_sub(RECORD_HEADER_BYTES + self.meta_at.1) as u64
    }
}

impl Recovered {
    /// A recovered message's meta bytes (checked with its record at recovery), without reading
    /// the record again.
    pub fn meta(&self, queue: LogId, message: &RecoveredMessage) -> Option<&[u8]> {
        let (offset, len) = message.meta_at;
        self.metas.get(&queue)?.get(offset..offset.checked_add(len)?)
    }
}

/// What the store's message segments take now ([`Store::segment_usage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentUsage {
    /// Segment files (every log has at least one).
    pub segments: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Counters for benchmarks and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Batches the writer processed.
    pub batches: u64,
    /// Records appended (messages).
    pub appends: u64,
    /// `fdatasync` calls on data files (segments, the journal and the ack log).
    pub data_syncs: u64,
    /// Completed syncs of the ack log: every removal or delivery count written before one of
    /// these is durable.
    pub ack_log_syncs: u64,
    /// Message segments deleted because every record in them was removed.
    pub segments_deleted: u64,
    /// Ack-log segments deleted because no live segment needs them.
    pub ack_segments_deleted: u64,
    /// Journal checkpoints: the segments written through the journal were synced and the journal
    /// started over.
    pub checkpoints: u64,
}

#[derive(Debug)]
pub(crate) struct Counters {
    /// Each `fdatasync` of a data file (segments, ack log), in microseconds.
    pub sync_latency_us: crate::Histogram,
    /// Appends each batch made durable (batches with none are not counted).
    pub batch_appends: crate::Histogram,
    pub batches: AtomicU64,
    pub appends: AtomicU64,
    pub data_syncs: AtomicU64,
    pub ack_log_syncs: AtomicU64,
    pub segments_deleted: AtomicU64,
    pub ack_segments_deleted: AtomicU64,
    pub checkpoints: AtomicU64,
}

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            sync_latency_us: crate::Histogram::new(&crate::SYNC_LATENCY_BOUNDS_US),
            batch_appends: crate::Histogram::new(&crate::BATCH_APPENDS_BOUNDS),
            batches: AtomicU64::new(0),
            appends: AtomicU64::new(0),
            data_syncs: AtomicU64::new(0),
            ack_log_syncs: AtomicU64::new(0),
            segments_deleted: AtomicU64::new(0),
            ack_segments_deleted: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
        }
    }
}

/// Per-queue state shared with callers: the tail (seq counter, where the next record goes, the
/// space held for it; under its lock, so records reach the writer in order), the salt new
/// records are sealed with, and the log's directory (where a new segment is created).
#[derive(Debug)]
pub(crate) struct QueueHandle {
    tail: Mutex<crate::space::Tail>,
    pub salt: u32,
    pub dir: PathBuf,
}

impl QueueHandle {
    pub fn new(tail: crate::space::Tail, salt: u32, dir: PathBuf) -> QueueHandle {
        QueueHandle { tail: Mutex::new(tail), salt, dir }
    }

    pub fn lock_tail(&self) -> std::sync::MutexGuard<'_, crate::space::Tail> {
        self.tail.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Open segment files by (queue, segment id), with the salt their records are sealed with.
pub(crate) type SegmentFiles = foldhash::HashMap<(LogId, u64), (Arc<dyn crate::fs::FsFile>, u32)>;

/// State shared between callers and the writer thread.
#[derive(Debug)]
pub(crate) struct Shared {
    pub queues: RwLock<foldhash::HashMap<LogId, Arc<QueueHandle>>>,
    /// Open segment files by (queue, segment id), for reads.
    pub segment_files: RwLock<SegmentFiles>,
    /// Set once by the first fatal error; every later operation fails with it.
    pub fatal: OnceLock<Arc<str>>,
    /// Bytes of appends handed to the writer and not yet processed.
    pub pending_bytes: Mutex<u64>,
    /// Signalled when the writer releases pending bytes, or stops.
    pub pending_room: std::sync::Condvar,
    /// The writer thread has stopped; nobody will release pending bytes any more.
    pub writer_stopped: std::sync::atomic::AtomicBool,
    pub counters: Counters,
}

impl Shared {
    /// Waits until `bytes` more append bytes fit in the budget, then takes them.
    pub fn reserve_pending(&self, bytes: u64, max: u64) -> Result<()> {
        let mut pending = self.pending_bytes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        while *pending > 0 && *pending + bytes > max {
            if self.writer_stopped.load(Ordering::Acquire) {
                return Err(StoreError::Closed);
            }
            self.check_fatal()?;
            pending = self.pending_room.wait(pending).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        *pending += bytes;
        Ok(())
    }

    /// Gives back append bytes the writer has processed.
    pub fn release_pending(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let mut pending = self.pending_bytes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *pending = pending.saturating_sub(bytes);
        self.pending_room.notify_all();
    }

    pub fn check_fatal(&self) -> Result<()> {
        match self.fatal.get() {
            Some(reason) => Err(StoreError::Fatal { reason: Arc::clone(reason) }),
            None => Ok(()),
        }
    }

    /// Records a fatal error (the first one wins) and returns the error to hand out.
    pub fn set_fatal(&self, reason: String) -> StoreError {
        let reason = Arc::clone(self.fatal.get_or_init(|| {
            tracing::error!(%reason, "store stopped: durability can no longer be guaranteed");
            Arc::from(reason.as_str())
        }));
        StoreError::Fatal { reason }
    }
}

/// The message store of one data directory. Cheap to clone; the writer thread stops when the last
/// clone is dropped or [`Store::close`] is called.
#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) inner: Arc<StoreInner>,
}

#[derive(Debug)]
pub(crate) struct StoreInner {
    pub(crate) shared: Arc<Shared>,
    pub(crate) sender: SyncSender<Op>,
    writer: Mutex<Option<JoinHandle<()>>>,
    dir: PathBuf,
    pub(crate) pending_bytes_max: u64,
    pub(crate) segment_bytes_max: u64,
    /// A file system said it cannot allocate ahead (warned about once).
    pub(crate) allocation_unsupported: std::sync::atomic::AtomicBool,
    /// For creating segments and writing the clean-stop marker at close.
    pub(crate) fs: Arc<dyn Fs>,
    /// Held for the store's lifetime: the data directory's `LOCK` file.
    _lock: Box<dyn std::any::Any + Send + Sync>,
}

impl Drop for StoreInner {
    fn drop(&mut self) {
        let (completer, ticket) = ticket::ticket();
        if self.sender.send(Op::Close(completer)).is_ok() {
            let _ = ticket.wait();
        }
        let handle = self.writer.lock().ok().and_then(|mut guard| guard.take());
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

/// The file a clean close leaves in the data directory; [`Store::open`] takes it away before
/// anything else, so a crash at any later moment counts as unclean.
pub const CLEAN_STOP_MARKER: &str = "clean-stop";

/// Whether the marker was there; removed (durably) if so.
fn take_clean_stop_marker(fs: &dyn Fs, dir: &Path) -> Result<bool> {
    let marker = dir.join(CLEAN_STOP_MARKER);
    let clean_stop = fs.exists(&marker).unwrap_or(false);
    if clean_stop {
        fs.remove_file(&marker).map_err(|error| StoreError::io("removing the clean-stop marker", error))?;
        fs.sync_dir(dir).map_err(|error| {
            StoreError::io("syncing the data directory after removing the clean-stop marker", error)
        })?;
    }
    Ok(clean_stop)
}

impl Store {
    /// Opens (or creates) the store in `dir`, recovering whatever is there: torn tails are cut,
    /// damaged records reported and skipped, fully removed segments deleted.
    pub fn open(fs: Arc<dyn Fs>, dir: impl Into<PathBuf>, config: StoreConfig) -> Result<(Store, Recovered)> {
        config.validate()?;
        let dir = dir.into();
        crate::fs::create_dir_durable(fs.as_ref(), &dir)
            .map_err(|error| StoreError::io(format!("creating {}", dir.display()), error))?;
        let lock_path = dir.join("LOCK");
        let lock = fs.lock_exclusive(&lock_path).map_err(|error| {
            if error.kind() == std::io::ErrorKind::WouldBlock {
                StoreError::Locked { path: lock_path.clone() }
            } else {
                StoreError::io(format!("locking {}", lock_path.display()), error)
            }
        })?;
        let clean_stop = take_clean_stop_marker(fs.as_ref(), &dir)?;
        let shared = Arc::new(Shared {
            queues: RwLock::new(foldhash::HashMap::default()),
            segment_files: RwLock::new(foldhash::HashMap::default()),
            fatal: OnceLock::new(),
            pending_bytes: Mutex::new(0),
            pending_room: std::sync::Condvar::new(),
            writer_stopped: std::sync::atomic::AtomicBool::new(false),
            counters: Counters::default(),
        });
        let (state, mut recovered) =
            recovery::recover(Arc::clone(&fs), &dir, config.clone(), Arc::clone(&shared), clean_stop)?;
        recovered.clean_stop = clean_stop;
        let (sender, receiver) = std::sync::mpsc::sync_channel(config.pending_ops_max);
        let writer = std::thread::Builder::new()
            .name("wharf-store-writer".into())
            .spawn(move || writer::run(state, receiver))
            .map_err(|error| StoreError::io("starting the writer thread", error))?;
        let store = Store {
            inner: Arc::new(StoreInner {
                shared,
                sender,
                writer: Mutex::new(Some(writer)),
                dir,
                pending_bytes_max: config.pending_bytes_max,
                segment_bytes_max: config.segment_bytes_max,
                allocation_unsupported: std::sync::atomic::AtomicBool::new(false),
                fs,
                _lock: lock,
            }),
        };
        Ok((store, recovered))
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn submit<T>(&self, make: impl FnOnce(Completer<T>) -> Op) -> Result<Ticket<T>> {
        self.inner.shared.check_fatal()?;
        let (completer, ticket) = ticket::ticket();
        self.inner.sender.send(make(completer)).map_err(|_| StoreError::Closed)?;
        Ok(ticket)
    }

    /// Like `submit` for a caller that never waits: no ticket (and no channel for one) is made.
    fn submit_unawaited(&self, make: impl FnOnce(Completer<()>) -> Op) -> Result<()> {
        self.inner.shared.check_fatal()?;
        self.inner.sender.send(make(ticket::unawaited())).map_err(|_| StoreError::Closed)
    }

    /// Creates a new, empty queue log. The ticket resolves once the queue's directory and first
    /// segment are durable.
    pub fn create_log(&self) -> Result<Ticket<LogId>> {
        self.submit(Op::CreateQueue)
    }

    /// Deletes a queue and all its messages. The ticket resolves once the deletion is durable.
    pub fn delete_log(&self, queue: LogId) -> Result<Ticket<()>> {
        self.submit(|done| Op::DeleteQueue { queue, done })
    }

    /// True while the queue's log exists (created and not deleted).
    pub fn has_log(&self, queue: LogId) -> bool {
        self.inner.shared.queues.read().unwrap_or_else(|poisoned| poisoned.into_inner()).contains_key(&queue)
    }

    /// The queues the store holds.
    pub fn log_ids(&self) -> Vec<LogId> {
        let queues = self.inner.shared.queues.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut ids: Vec<LogId> = queues.keys().copied().collect();
        ids.sort();
        ids
    }

    /// Appends a message to a queue. The ticket resolves when the record is written and
    /// `fdatasync`ed (the moment a publisher confirm may be sent), or with the error that kept it
    /// from being durable. Seqs are assigned in call order per queue.
    pub fn append(&self, queue: LogId, timestamp_ms: u64, meta: &[u8], body: &[u8]) -> Result<PendingAppend> {
        self.append_with(queue, timestamp_ms, meta, body, None)
    }

    /// Like [`Store::append`], and `observer` is also given the result, on the writer thread,
    /// just before the ticket resolves (or `Closed` if the writer goes away first). It must not
    /// block. The broker uses it to learn where a record went without a task per append.
    pub fn append_observed(
        &self,
        queue: LogId,
        timestamp_ms: u64,
        meta: &[u8],
        body: &[u8],
        observer: crate::ticket::Observer<AppendReceipt>,
    ) -> Result<PendingAppend> {
        self.append_with(queue, timestamp_ms, meta, body, Some(observer))
    }

    /// Records that a message left its queue (ack, reject, expiry, dead-lettering). The ticket
    /// resolves when the removal is written; it becomes durable lazily (within
    /// `ack_sync_interval_ms`) or at the next [`Store::sync`]. Removing a message that is not
    /// live is a no-op.
    pub fn remove(&self, queue: LogId, seq: u64) -> Result<Ticket<()>> {
        self.submit(|done| Op::Ack { queue, seq, delivery_count: None, done })
    }

    /// Like [`Store::remove`] for a caller that never waits for the removal (the broker, for
    /// every ack): no ticket is made, which saves an allocation and its wake-up per message.
    pub fn remove_unawaited(&self, queue: LogId, seq: u64) -> Result<()> {
        self.submit_unawaited(|done| Op::Ack { queue, seq, delivery_count: None, done })
    }

    /// Records a message's delivery count durably-lazily, like [`Store::remove`]. Recovery returns
    /// the highest count recorded for each live message.
    pub fn set_delivery_count(&self, queue: LogId, seq: u64, delivery_count: u32) -> Result<Ticket<()>> {
        self.submit(|done| Op::Ack { queue, seq, delivery_count: Some(delivery_count), done })
    }

    /// Like [`Store::set_delivery_count`] for a caller that never waits for it (the broker, for
    /// every first delivery): no ticket is made.
    pub fn set_delivery_count_unawaited(&self, queue: LogId, seq: u64, delivery_count: u32) -> Result<()> {
        self.submit_unawaited(|done| Op::Ack { queue, seq, delivery_count: Some(delivery_count), done })
    }

    /// Resolves once everything submitted before it, removals and delivery counts included, is
    /// durable. Transactions call this before `Tx.CommitOk`.
    pub fn sync(&self) -> Result<Ticket<()>> {
        self.submit(Op::Sync)
    }

    /// Reads a message back, verifying its checksums.
    pub fn read(&self, queue: LogId, location: &MessageLocation) -> Result<StoredMessage> {
        self.inner.shared.check_fatal()?;
        let (file, salt) = self.segment_file(queue, location.segment_id)?;
        let record_bytes = self.check_record_length(queue, location)?;
        let mut bytes = vec![0u8; record_bytes];
        file.read_exact_at(&mut bytes, location.offset).map_err(|error| {
            StoreError::io(
                format!("reading {}", layout::segment_path(&self.inner.dir, queue, location.segment_id).display()),
                error,
            )
        })?;
        let (seq, timestamp_ms, meta_bytes) = self.check_record(queue, location, &bytes, salt)?;
        let body = bytes.split_off(RECORD_HEADER_BYTES + meta_bytes);
        let meta = bytes.split_off(RECORD_HEADER_BYTES);
        Ok(StoredMessage { seq, timestamp_ms, meta, body })
    }

    /// Reads many records of one queue, given in log order, and hands each to `visit` with its
    /// index in `locations`, with the same checks as
    /// [`Store::read`]. Records are read in chunks of up to `READ_CHUNK_BYTES` instead of one
    /// `pread` each, so reading a whole backlog back (at start) costs a sequential pass.
    pub fn read_each(
        &self,
        queue: LogId,
        locations: &[MessageLocation],
        visit: &mut dyn FnMut(usize, Result<RecordView<'_>>),
    ) {
        const READ_CHUNK_BYTES: u64 = 4 * 1024 * 1024;
        let mut chunk: Vec<u8> = Vec::new();
        // (segment id, file offset of chunk[0]) of what `chunk` holds.
        let mut chunk_at: Option<(u64, u64)> = None;
        let mut index = 0;
        while index < locations.len() {
            let location = &locations[index];
            let outcome = (|| -> Result<(u64, usize, usize)> {
                self.inner.shared.check_fatal()?;
                let record_bytes = self.check_record_length(queue, location)? as u64;
                let (file, salt) = self.segment_file(queue, location.segment_id)?;
                let held = chunk_at.is_some_and(|(segment, start)| {
                    segment == location.segment_id
                        && location.offset >= start
                        && location.offset + record_bytes <= start + chunk.len() as u64
                });
                if !held {
                    // Up to the end of the last record of this segment still to read.
                    let group_end = locations[index..]
                        .iter()
                        .take_while(|next| next.segment_id == location.segment_id)
                        .map(|next| next.offset + u64::from(next.record_bytes))
                        .max()
                        .unwrap_or(location.offset + record_bytes);
                    let end = group_end.min(location.offset + READ_CHUNK_BYTES.max(record_bytes));
                    chunk.resize((end - location.offset) as usize, 0);
                    chunk_at = None;
                    file.read_exact_at(&mut chunk, location.offset).map_err(|error| {
                        StoreError::io(
                            format!(
                                "reading {}",
                                layout::segment_path(&self.inner.dir, queue, location.segment_id).display()
                            ),
                            error,
                        )
                    })?;
                    chunk_at = Some((location.segment_id, location.offset));
                }
                let start = chunk_at.map_or(0, |(_, start)| (location.offset - start) as usize);
                let bytes = &chunk[start..start + record_bytes as usize];
                let (_, timestamp_ms, meta_bytes) = self.check_record(queue, location, bytes, salt)?;
                Ok((timestamp_ms, start, meta_bytes))
            })();
            match outcome {
                Ok((timestamp_ms, start, meta_bytes)) => {
                    let record = &chunk[start..start + location.record_bytes as usize];
                    let meta = &record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + meta_bytes];
                    let body = &record[RECORD_HEADER_BYTES + meta_bytes..];
                    visit(index, Ok(RecordView { timestamp_ms, meta, body }));
                }
                Err(error) => visit(index, Err(error)),
            }
            index += 1;
        }
    }

    /// The open file of one segment, and the salt its records are sealed with.
    fn segment_file(&self, queue: LogId, segment_id: u64) -> Result<(Arc<dyn crate::fs::FsFile>, u32)> {
        let files = self.inner.shared.segment_files.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (file, salt) = files.get(&(queue, segment_id)).ok_or(StoreError::UnknownLog(queue.0))?;
        Ok((Arc::clone(file), *salt))
    }

    fn check_record_length(&self, queue: LogId, location: &MessageLocation) -> Result<usize> {
        let record_bytes = location.record_bytes as usize;
        if !(RECORD_HEADER_BYTES..=RECORD_BYTES_MAX).contains(&record_bytes) {
            return Err(StoreError::Corrupt {
                path: layout::segment_path(&self.inner.dir, queue, location.segment_id),
                offset: location.offset,
                reason: format!("record length {record_bytes} out of range"),
            });
        }
        Ok(record_bytes)
    }

    /// Checks a message record read from `location`: header, kind, length, payload checksum.
    /// Returns (seq, stored at ms, meta length).
    fn check_record(
        &self,
        queue: LogId,
        location: &MessageLocation,
        bytes: &[u8],
        salt: u32,
    ) -> Result<(u64, u64, usize)> {
        let corrupt = |reason: &str| StoreError::Corrupt {
            path: layout::segment_path(&self.inner.dir, queue, location.segment_id),
            offset: location.offset,
            reason: reason.to_owned(),
        };
        let record_bytes = bytes.len();
        let header =
            format::decode_header(bytes, salt, RECORD_BYTES_MAX).map_err(|_| corrupt("record header check failed"))?;
        if header.kind != RecordKind::Message || header.record_bytes as usize != record_bytes {
            return Err(corrupt("not the message record expected at this location"));
        }
        let meta_bytes = header.aux as usize;
        if meta_bytes > record_bytes - RECORD_HEADER_BYTES {
            return Err(corrupt("meta length exceeds the record"));
        }
        if !format::payload_matches(&header, &bytes[RECORD_HEADER_BYTES..]) {
            return Err(corrupt("payload checksum mismatch"));
        }
        Ok((header.a, header.b, meta_bytes))
    }

    /// True when appends are waiting for room (the writer is behind by `pending_bytes_max`): the
    /// next append may block until it catches up. Callers on an async runtime move such an
    /// append off their worker; otherwise an append only queues work and returns.
    pub fn under_back_pressure(&self) -> bool {
        let pending = *self.inner.shared.pending_bytes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        pending.saturating_mul(2) >= self.inner.pending_bytes_max
    }

    /// Counters since open.
    pub fn stats(&self) -> StoreStats {
        let counters = &self.inner.shared.counters;
        StoreStats {
            batches: counters.batches.load(Ordering::Relaxed),
            appends: counters.appends.load(Ordering::Relaxed),
            data_syncs: counters.data_syncs.load(Ordering::Relaxed),
            ack_log_syncs: counters.ack_log_syncs.load(Ordering::Relaxed),
            segments_deleted: counters.segments_deleted.load(Ordering::Relaxed),
            ack_segments_deleted: counters.ack_segments_deleted.load(Ordering::Relaxed),
            checkpoints: counters.checkpoints.load(Ordering::Relaxed),
        }
    }

    /// The message segment files that exist now and their bytes (their written length, without
    /// space allocated ahead): one `fstat` per segment, taken without holding the writer up.
    pub fn segment_usage(&self) -> SegmentUsage {
        let files: Vec<Arc<dyn crate::fs::FsFile>> = {
            let files = self.inner.shared.segment_files.read().unwrap_or_else(|poisoned| poisoned.into_inner());
            files.values().map(|(file, _)| Arc::clone(file)).collect()
        };
        // A segment deleted meanwhile may fail its `fstat`; it counts as empty.
        let bytes = files.iter().map(|file| file.size_bytes().unwrap_or(0)).sum();
        SegmentUsage { segments: files.len() as u64, bytes }
    }

    /// The latency of each `fdatasync` of a data file, in microseconds.
    pub fn sync_latency_us(&self) -> crate::HistogramSnapshot {
        self.inner.shared.counters.sync_latency_us.snapshot()
    }

    /// The appends each batch made durable.
    pub fn batch_appends(&self) -> crate::HistogramSnapshot {
        self.inner.shared.counters.batch_appends.snapshot()
    }

    /// Makes pending removals durable and stops the writer. Other clones fail with `Closed` after.
    /// Makes every removal and delivery count durable, stops the writer, and leaves the
    /// clean-stop marker for the next [`Store::open`] (see [`Recovered::clean_stop`]).
    pub fn close(self) -> Result<()> {
        let ticket = self.submit(Op::Close)?;
        ticket.wait()?;
        let marker = self.inner.dir.join(CLEAN_STOP_MARKER);
        let written = self.inner.fs.open(&marker, OpenMode::CreateNew).and_then(|file| file.sync_data());
        match written {
            // A marker lost to a crash right after only makes the next start treat messages as
            // possibly delivered, which is the safe side.
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(error) => Err(StoreError::io("writing the clean-stop marker", error)),
        }
    }

    pub(crate) fn queue_handle(&self, queue: LogId) -> Result<Arc<QueueHandle>> {
        let queues = self.inner.shared.queues.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        queues.get(&queue).cloned().ok_or(StoreError::UnknownLog(queue.0))
    }
}
