//! The shared journal: one file in which a batch's small segment writes are made durable with a
//! single `fdatasync`, however many queues the batch touched (issue #18; the layouts compared and
//! measured are in `docs/design/20261204_one-sync-for-every-queue.md`).
//!
//! Each queue keeps its own segment files, with their format, read path and reclamation
//! unchanged. A batch that dirties two or more segments writes each segment's new bytes as
//! before, but instead of syncing every segment it also writes one journal record per segment
//! write (the queue, the segment id, the offset, and the exact bytes) and syncs the journal only.
//! The segments are synced later, at a *checkpoint*: when the journal is full, and at close.
//! After a checkpoint the journal starts over at its beginning under a new *generation*, in
//! place: a file whose size no longer changes is the cheapest thing to `fdatasync`.
//!
//! Recovery replays the journal before it scans anything: every record of the current generation
//! is written again at its place in its segment (idempotent, so a crash during replay is just
//! another crash), the segments are synced, and only then is the journal started over. A segment
//! that no longer exists (its records were all removed and it was deleted, or its queue was) is
//! skipped: segment and queue ids are never reused, so a record can only ever land where it was.
//!
//! Why stale records can never be replayed: the journal's header carries its generation and a
//! random salt, both new at every start-over; every record's header checksum is seeded with the
//! salt and its payload begins with the generation; a scan stops at the first record that fails
//! either. A start-over happens only after every segment the old generation wrote to is synced,
//! so a start-over torn by a crash (its header unreadable) loses nothing: the journal is empty.
//!
//! Writes that skip the journal, and are synced in their segment as before: a batch that dirties
//! only one segment (the journal would add a second write for the same single sync), and a write
//! of more than `StoreConfig::journal_write_bytes_max` (large records would halve the disk's
//! bandwidth by being written twice; one such write fills a sync on its own anyway).
//!
//! An old data directory has no journal: opening it creates one (the migration); a crash during
//! that creation leaves a journal with no records, which the next open treats as empty. With
//! `StoreConfig::journal_bytes` 0 the store runs without one (each batch syncs every segment it
//! dirtied), and opening a directory that has one replays it and removes it.

use crate::error::{Result, StoreError};
use crate::format::{self, FILE_HEADER_BYTES, FileHeader, JOURNAL_MAGIC, RECORD_HEADER_BYTES, RecordKind};
use crate::fs::{Fs, FsFile, OpenMode};
use crate::layout;
use crate::recovery::io_error;
use crate::store::{LogId, RecoveryIssue, SEGMENT_FILE_BYTES_LIMIT};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The journal's file name in the data directory.
pub(crate) const JOURNAL_FILE: &str = "journal";
/// Largest journal recovery reads; a bigger one stops the open (it was not written by this store).
pub const JOURNAL_BYTES_LIMIT: u64 = 1024 * 1024 * 1024;
/// Bytes a journal record adds before the segment bytes it carries: the frame header, the
/// generation and the segment id.
pub(crate) const JOURNAL_RECORD_OVERHEAD_BYTES: usize = RECORD_HEADER_BYTES + 16;
/// Largest `StoreConfig::journal_write_bytes_max`: a bigger segment write skips the journal.
pub const JOURNAL_WRITE_BYTES_LIMIT: usize = 16 * 1024 * 1024;
/// Largest journal record recovery reads; a length above it is damage, not an allocation.
const JOURNAL_RECORD_BYTES_MAX: usize = JOURNAL_RECORD_OVERHEAD_BYTES + JOURNAL_WRITE_BYTES_LIMIT;

/// The journal as the writer thread holds it.
#[derive(Debug)]
pub(crate) struct Journal {
    file: Arc<dyn FsFile>,
    path: PathBuf,
    generation: u64,
    salt: u32,
    /// Where the next record goes.
    len_bytes: u64,
    capacity_bytes: u64,
    /// This batch's records, written with one write.
    pending: Vec<u8>,
    /// Segments written through the journal since the last checkpoint, as (log, segment base
    /// seq): the next checkpoint syncs them.
    pub dirty_segments: BTreeSet<(LogId, u64)>,
}

impl Journal {
    /// Bytes a batch's journal records take for segment writes of these lengths.
    pub fn record_bytes(write_lengths: impl Iterator<Item = usize>) -> u64 {
        write_lengths.map(|len| (JOURNAL_RECORD_OVERHEAD_BYTES + len) as u64).sum()
    }

    /// True if `bytes` more fit before the journal must start over.
    pub fn fits(&self, bytes: u64) -> bool {
        self.len_bytes + bytes <= self.capacity_bytes
    }

    /// True if `bytes` fit in an empty journal.
    pub fn could_ever_fit(&self, bytes: u64) -> bool {
        FILE_HEADER_BYTES as u64 + bytes <= self.capacity_bytes
    }

    /// Adds one segment write to this batch's journal records.
    pub fn add(&mut self, queue: LogId, segment_id: u64, offset: u64, bytes: &[u8]) {
        // Written as parts: no allocation per segment write.
        let (generation, segment) = (self.generation.to_le_bytes(), segment_id.to_le_bytes());
        format::encode_record(
            &mut self.pending,
            self.salt,
            RecordKind::JournalWrite,
            0,
            queue.0,
            offset,
            &[&generation, &segment, bytes],
        );
    }

    /// Writes this batch's records and syncs the journal: after this, the batch is durable.
    pub fn write_and_sync(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(&self.pending, self.len_bytes)?;
        self.file.sync_data()?;
        self.len_bytes += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    /// Starts the journal over under a new generation (every segment it spoke of must be synced
    /// by now). A failure leaves the journal's state unknown: the caller treats it as fatal.
    pub fn start_over(&mut self) -> std::io::Result<()> {
        self.generation = self.generation.wrapping_add(1);
        self.salt = layout::random_salt();
        self.pending.clear();
        let header = journal_header(self.generation, self.salt);
        self.file.write_all_at(&header.encode(), 0)?;
        self.file.sync_data()?;
        self.len_bytes = FILE_HEADER_BYTES as u64;
        self.dirty_segments.clear();
        Ok(())
    }

    /// Bytes of records since the last start-over.
    pub fn used_bytes(&self) -> u64 {
        self.len_bytes - FILE_HEADER_BYTES as u64
    }

    /// The journal's path (for error messages).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn journal_header(generation: u64, salt: u32) -> FileHeader {
    FileHeader {
        magic: JOURNAL_MAGIC,
        file_id: generation,
        queue_id: 0,
        base_seq: 0,
        created_ms: layout::now_ms(),
        salt,
    }
}

/// What replay found.
#[derive(Debug, Default)]
pub(crate) struct Replayed {
    /// The generation of the journal on disk, if its header was readable.
    pub generation: Option<u64>,
    /// Records written back into segments.
    pub records: u64,
}

/// Writes every record of the journal's current generation back into its segment, then syncs
/// the segments it touched. Runs before recovery scans anything; the journal itself is left as it
/// is (started over by [`open_for_writing`] once recovery has synced everything).
pub(crate) fn replay(fs: &dyn Fs, dir: &Path, issues: &mut Vec<RecoveryIssue>) -> Result<Replayed> {
    let path = dir.join(JOURNAL_FILE);
    let file = match fs.open(&path, OpenMode::Existing) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Replayed::default()),
        Err(error) => return Err(StoreError::io(format!("opening {}", path.display()), error)),
    };
    let file_len = file.size_bytes().map_err(io_error(format!("reading the length of {}", path.display())))?;
    if file_len > JOURNAL_BYTES_LIMIT {
        return Err(StoreError::TooLarge {
            what: "journal (see JOURNAL_BYTES_LIMIT)",
            bytes: file_len,
            limit_bytes: JOURNAL_BYTES_LIMIT,
        });
    }
    let bytes =
        crate::fs::read_all(file.as_ref(), file_len).map_err(io_error(format!("reading {}", path.display())))?;
    let header = match FileHeader::decode(&bytes, JOURNAL_MAGIC, &path) {
        Ok(header) => header,
        Err(StoreError::Corrupt { reason, .. }) => {
            // Torn while being created (the migration) or started over: in both cases every
            // segment it ever spoke of was synced before, so there is nothing to replay.
            if file_len > FILE_HEADER_BYTES as u64 {
                tracing::warn!(path = %path.display(), %reason, "journal header unreadable; nothing replayed");
                issues.push(RecoveryIssue::UnreadableFile {
                    path,
                    reason: format!("{reason}; a start-over torn by a crash, nothing to replay"),
                });
            }
            return Ok(Replayed::default());
        }
        Err(other) => return Err(other),
    };
    let mut replayed = Replayed { generation: Some(header.file_id), records: 0 };
    let mut segments: HashMap<PathBuf, Option<Arc<dyn FsFile>>> = HashMap::new();
    let mut offset = FILE_HEADER_BYTES;
    // The first record that fails any check ends the generation: what follows is either a
    // batch torn by the crash or an older generation's records.
    while let Ok(frame) = format::decode_header(&bytes[offset..], header.salt, JOURNAL_RECORD_BYTES_MAX) {
        let end = offset + frame.record_bytes as usize;
        let Some(payload) = bytes.get(offset + RECORD_HEADER_BYTES..end) else {
            break;
        };
        if frame.kind != RecordKind::JournalWrite || payload.len() < 16 || !format::payload_matches(&frame, payload) {
            break;
        }
        let (prefix, segment_bytes) = payload.split_at(16);
        let mut word = [0u8; 8];
        word.copy_from_slice(&prefix[..8]);
        if u64::from_le_bytes(word) != header.file_id {
            break;
        }
        word.copy_from_slice(&prefix[8..16]);
        let segment_id = u64::from_le_bytes(word);
        let (queue, segment_offset) = (LogId(frame.a), frame.b);
        offset = end;
        if segment_offset < FILE_HEADER_BYTES as u64
            || segment_offset.saturating_add(segment_bytes.len() as u64) > SEGMENT_FILE_BYTES_LIMIT
        {
            issues.push(RecoveryIssue::Corruption {
                path: path.clone(),
                offset: (end - frame.record_bytes as usize) as u64,
                bytes: frame.record_bytes as u64,
            });
            continue;
        }
        let segment_path = layout::segment_path(dir, queue, segment_id);
        let target = match segments.get(&segment_path) {
            Some(target) => target.clone(),
            None => {
                let opened = match fs.open(&segment_path, OpenMode::Existing) {
                    Ok(file) => Some(file),
                    // Deleted since (all its records removed, or its queue deleted): nothing to do.
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
                    Err(error) => return Err(StoreError::io(format!("opening {}", segment_path.display()), error)),
                };
                segments.insert(segment_path.clone(), opened.clone());
                opened
            }
        };
        if let Some(target) = target {
            target
                .write_all_at(segment_bytes, segment_offset)
                .map_err(io_error(format!("replaying the journal into {}", segment_path.display())))?;
            replayed.records += 1;
        }
    }
    for (segment_path, target) in &segments {
        if let Some(target) = target {
            target.sync_data().map_err(io_error(format!("syncing {} after replay", segment_path.display())))?;
        }
    }
    if replayed.records > 0 {
        tracing::info!(records = replayed.records, segments = segments.len(), "journal replayed");
    }
    Ok(replayed)
}

/// Opens the journal for the writer after recovery, starting it over under a new generation
/// (recovery has synced every segment by now); creates it in a data directory that has none (the
/// migration from the layout before the journal). With `capacity_bytes` 0, removes any journal
/// instead and returns `None`.
pub(crate) fn open_for_writing(
    fs: &dyn Fs,
    dir: &Path,
    capacity_bytes: u64,
    previous_generation: Option<u64>,
) -> Result<Option<Journal>> {
    let path = dir.join(JOURNAL_FILE);
    let exists = fs.exists(&path).map_err(io_error(format!("checking {}", path.display())))?;
    if capacity_bytes == 0 {
        if exists {
            fs.remove_file(&path).map_err(io_error(format!("removing {}", path.display())))?;
            fs.sync_dir(dir).map_err(io_error(format!("syncing {}", dir.display())))?;
        }
        return Ok(None);
    }
    let file = if exists {
        let file = fs.open(&path, OpenMode::Existing).map_err(io_error(format!("opening {}", path.display())))?;
        let len = file.size_bytes().map_err(io_error(format!("reading the length of {}", path.display())))?;
        if len > capacity_bytes {
            // Configured smaller than before: give the rest back.
            file.set_len(capacity_bytes).map_err(io_error(format!("truncating {}", path.display())))?;
        }
        file
    } else {
        // A new file is a journal with an unreadable header until its first start-over below is
        // synced, and an unreadable journal is an empty one: a crash anywhere here is harmless.
        let file = fs.open(&path, OpenMode::CreateNew).map_err(io_error(format!("creating {}", path.display())))?;
        fs.sync_dir(dir).map_err(io_error(format!("syncing {}", dir.display())))?;
        file
    };
    // Held ahead, so a journal write never meets a full disk (the records it carries were
    // accepted into allocated space already).
    match file.allocate(0, capacity_bytes) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::Unsupported => {}
        Err(error) => return Err(StoreError::io(format!("allocating {}", path.display()), error)),
    }
    let generation = previous_generation.unwrap_or_else(|| u64::from(layout::random_salt()) << 32);
    let mut journal = Journal {
        file,
        path,
        generation,
        salt: 0,
        len_bytes: FILE_HEADER_BYTES as u64,
        capacity_bytes,
        pending: Vec::new(),
        dirty_segments: BTreeSet::new(),
    };
    journal.start_over().map_err(io_error(format!("starting {} over", journal.path.display())))?;
    Ok(Some(journal))
}
