//! Recovery: turns whatever is in a data directory into the writer's state and the list of live
//! messages, after any crash.
//!
//! Order of work, and why:
//! 0. Replay the shared journal (`journal.rs`) into the segments and sync them: a segment written
//!    through the journal may have lost, after a power loss, writes the journal still holds.
//! 1. Finish interrupted queue deletions (`*.deleted` directories) and drop torn queue creations.
//! 2. Scan every segment: verify each record; report damaged stretches (never returned as
//!    messages); cut the torn tail of each queue's last segment, which is where a crash leaves one.
//! 3. Replay the ack log in order: removals clear live bits, delivery counts keep their maximum.
//! 4. Sync everything that was read. After a process kill, what recovery saw may still be only in
//!    the page cache; syncing it first means a later power loss cannot take back a message
//!    recovery already reported, or a delivery count it already raised. Skipped after a clean
//!    stop, whose close synced all of it before leaving the marker.
//! 5. Delete segments with no live message, then ack-log segments no remaining segment needs. A
//!    queue whose newest segment was unusable gets a replacement whose base seq lies above every
//!    base on disk, so a crash before the deletions cannot leave two segments with one base (an
//!    empty segment followed by one with its base, left by older builds, yields to the newer).
//! 6. Start the journal over (or create it: the migration of a data directory from before it),
//!    now that every segment it spoke of is synced.
//!
//! Seqs and queue ids continue above the highest ever seen, in segments *or* in the ack log, so a
//! surviving removal record can never match a new message.

use crate::error::{Result, StoreError};
use crate::format::{
    self, ACK_MAGIC, FILE_HEADER_BYTES, FileHeader, RECORD_BYTES_MAX, RECORD_HEADER_BYTES, RecordKind, SEGMENT_MAGIC,
    SEGMENT_SEQ_SPAN_MAX, SEQ_MAX,
};
use crate::fs::{Fs, FsFile, OpenMode};
use crate::layout;
use crate::live_set::LiveSet;
use crate::store::{
    LogId, MessageLocation, QueueHandle, Recovered, RecoveredMessage, RecoveryIssue, SEGMENT_FILE_BYTES_LIMIT, Shared,
    StoreConfig,
};
use crate::writer::{AckLog, AckSegment, QueueLog, Segment, WriterState};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A message record seen during the scan, before the ack log says whether it is still live.
struct ScannedMessage {
    seq: u64,
    timestamp_ms: u64,
    location: MessageLocation,
    /// (offset, length) of its meta in the queue scan's `metas`.
    meta_at: (usize, usize),
}

/// What the scan of one file found, before it becomes writer state.
struct ScannedFile {
    header: FileHeader,
    file: Arc<dyn FsFile>,
    /// Length after any tail truncation.
    len: u64,
    records: Vec<format::ScannedRecord>,
}

fn id_exhausted(path: &Path) -> StoreError {
    StoreError::Format {
        path: path.to_path_buf(),
        reason: "file or queue ids exhausted (a stray file named with the largest id?)".into(),
    }
}

pub(crate) fn io_error(context: String) -> impl FnOnce(std::io::Error) -> StoreError {
    move |error| StoreError::io(context, error)
}

/// Creates a directory (and missing ancestors) durably.
fn ensure_dir(fs: &dyn Fs, path: &Path) -> Result<()> {
    crate::fs::create_dir_durable(fs, path).map_err(io_error(format!("creating {}", path.display())))
}

/// Lists `dir` for files named `<decimal id>.<extension>`, sorted by id.
fn numbered_files(
    fs: &dyn Fs,
    dir: &Path,
    extension: &str,
    issues: &mut Vec<RecoveryIssue>,
) -> Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for entry in fs.read_dir(dir).map_err(io_error(format!("listing {}", dir.display())))? {
        let parsed = entry
            .name
            .strip_suffix(extension)
            .and_then(|stem| stem.strip_suffix('.'))
            .and_then(|stem| stem.parse::<u64>().ok());
        match parsed {
            Some(id) if !entry.is_dir => files.push((id, dir.join(&entry.name))),
            _ => issues.push(RecoveryIssue::UnreadableFile {
                path: dir.join(&entry.name),
                reason: format!("not a .{extension} file of this store; ignored"),
            }),
        }
    }
    files.sort();
    Ok(files)
}

/// Reads and checks one segment or ack-log file. Returns `None` if the file is unusable (reported)
/// or was a torn creation (removed).
fn scan_file(
    fs: &dyn Fs,
    path: &Path,
    magic: [u8; 8],
    record_bytes_max: usize,
    is_last: bool,
    issues: &mut Vec<RecoveryIssue>,
    buffer: &mut Vec<u8>,
) -> Result<Option<ScannedFile>> {
    let file = fs.open(path, OpenMode::Existing).map_err(io_error(format!("opening {}", path.display())))?;
    let file_len = file.size_bytes().map_err(io_error(format!("reading the length of {}", path.display())))?;
    if file_len > SEGMENT_FILE_BYTES_LIMIT {
        // Never skipped: ignoring an ack-log segment would bring back removed messages.
        return Err(StoreError::TooLarge {
            what: "store file (see SEGMENT_FILE_BYTES_LIMIT)",
            bytes: file_len,
            limit_bytes: SEGMENT_FILE_BYTES_LIMIT,
        });
    }
    // One buffer for every file of a scan: fresh memory for each 32 MiB segment cost more in
    // page faults than reading it.
    let len_bytes = usize::try_from(file_len).map_err(|_| StoreError::TooLarge {
        what: "store file (see SEGMENT_FILE_BYTES_LIMIT)",
        bytes: file_len,
        limit_bytes: SEGMENT_FILE_BYTES_LIMIT,
    })?;
    if buffer.len() < len_bytes {
        buffer.resize(len_bytes, 0);
    }
    file.read_exact_at(&mut buffer[..len_bytes], 0).map_err(io_error(format!("reading {}", path.display())))?;
    let bytes = &buffer[..len_bytes];
    let header = match FileHeader::decode(bytes, magic, path) {
        Ok(header) => header,
        Err(StoreError::Corrupt { .. }) if is_last && file_len <= FILE_HEADER_BYTES as u64 => {
            // The newest file, cut short while its header was being written: it never held a record.
            tracing::warn!(path = %path.display(), "removing a file whose creation was torn by a crash");
            fs.remove_file(path).map_err(io_error(format!("removing {}", path.display())))?;
            issues.push(RecoveryIssue::TruncatedTail { path: path.to_path_buf(), offset: 0, bytes: file_len });
            return Ok(None);
        }
        Err(StoreError::Corrupt { reason, .. }) => {
            tracing::error!(path = %path.display(), %reason, "unreadable store file ignored");
            issues.push(RecoveryIssue::UnreadableFile { path: path.to_path_buf(), reason });
            return Ok(None);
        }
        Err(other) => return Err(other),
    };
    let scan = format::scan_records(bytes, header.salt, record_bytes_max);
    for damaged in &scan.damaged {
        tracing::error!(path = %path.display(), offset = damaged.offset, bytes = damaged.bytes, "corrupt records skipped");
        issues.push(RecoveryIssue::Corruption {
            path: path.to_path_buf(),
            offset: damaged.offset,
            bytes: damaged.bytes,
        });
    }
    let mut len = file_len;
    if scan.valid_end < file_len {
        let cut = file_len - scan.valid_end;
        let tail = &bytes[scan.valid_end as usize..];
        // A torn write leaves a prefix of the records being written: a partial header, or an
        // intact header whose record runs past the end. Any segment can end that way (a segment
        // is sealed before the batch that filled it is synced); only the unsynced tail is lost.
        let torn = tail.len() < RECORD_HEADER_BYTES
            || format::decode_header(tail, header.salt, record_bytes_max)
                .is_ok_and(|frame| frame.record_bytes as usize > tail.len());
        if torn {
            tracing::warn!(path = %path.display(), offset = scan.valid_end, bytes = cut, "torn tail truncated");
            issues.push(RecoveryIssue::TruncatedTail { path: path.to_path_buf(), offset: scan.valid_end, bytes: cut });
        } else {
            tracing::error!(path = %path.display(), offset = scan.valid_end, bytes = cut, "corrupt records at the end of a file");
            issues.push(RecoveryIssue::Corruption { path: path.to_path_buf(), offset: scan.valid_end, bytes: cut });
        }
        // The newest file must end cleanly because it is appended to; an older one is only cut
        // when the damage is a torn write, so real corruption stays on disk for inspection.
        if torn || is_last {
            file.set_len(scan.valid_end).map_err(io_error(format!("truncating {}", path.display())))?;
            file.sync_data().map_err(io_error(format!("syncing {}", path.display())))?;
            len = scan.valid_end;
        }
    }
    Ok(Some(ScannedFile { header, file, len, records: scan.records }))
}

/// Parses `q-<16 hex digits>` (and the `.deleted` form).
fn parse_queue_dir(name: &str) -> Option<(LogId, bool)> {
    let (stem, deleted) = match name.strip_suffix(".deleted") {
        Some(stem) => (stem, true),
        None => (name, false),
    };
    let hex = stem.strip_prefix("q-")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok().map(|id| (LogId(id), deleted))
}

struct QueueScan {
    log: QueueLog,
    messages: BTreeMap<u64, Vec<ScannedMessage>>,
    /// Every scanned message record's meta, back to back.
    metas: Vec<u8>,
    /// The active segment must be created fresh (no usable segment was last).
    needs_new_segment: bool,
    max_seq: u64,
    /// The highest base seq in any segment header of this queue, refused ones included.
    highest_base_on_disk: u64,
    /// Ids of empty segments a newer segment with the same base seq replaced.
    superseded: Vec<u64>,
}

fn scan_queue(
    fs: &dyn Fs,
    queue: LogId,
    dir: PathBuf,
    issues: &mut Vec<RecoveryIssue>,
    buffer: &mut Vec<u8>,
) -> Result<Option<QueueScan>> {
    let files = numbered_files(fs, &dir, "seg", issues)?;
    if files.is_empty() {
        // A creation torn before its first segment was durable: the caller never got this id.
        tracing::warn!(path = %dir.display(), "removing a queue directory whose creation was torn");
        fs.remove_dir_all(&dir).map_err(io_error(format!("removing {}", dir.display())))?;
        return Ok(None);
    }
    let last_id = files.last().map_or(0, |(id, _)| *id);
    let mut segments = BTreeMap::new();
    let mut messages = BTreeMap::new();
    let mut metas = Vec::new();
    let mut last_seq = 0u64;
    let mut max_seq = 0u64;
    let mut last_usable_id = None;
    let mut salt = layout::random_salt();
    let mut highest_base_on_disk = 0u64;
    let mut superseded = Vec::new();
    for (id, path) in &files {
        let Some(scanned) = scan_file(fs, path, SEGMENT_MAGIC, RECORD_BYTES_MAX, *id == last_id, issues, buffer)?
        else {
            continue;
        };
        let header = scanned.header;
        if header.queue_id == queue.0 && header.file_id == *id && header.base_seq <= SEQ_MAX {
            highest_base_on_disk = highest_base_on_disk.max(header.base_seq);
        }
        let previous = segments
            .last_key_value()
            .map(|(base, segment): (&u64, &Segment)| (*base, segment.id, segment.len == FILE_HEADER_BYTES as u64));
        let previous_base = previous.map_or(0, |(base, _, _)| base);
        // A recovery crashed between making a replacement segment and deleting the empty one it
        // replaced leaves two segments with one base seq; the newer one is the queue's (the
        // older holds no record), so it takes the place and the older is deleted in step 5.
        if let Some((base, previous_id, previous_empty)) = previous
            && previous_empty
            && header.queue_id == queue.0
            && header.file_id == *id
            && header.base_seq == base
        {
            segments.remove(&base);
            messages.remove(&base);
            superseded.push(previous_id);
        } else if header.queue_id != queue.0
            || header.file_id != *id
            || header.base_seq <= previous_base
            || header.base_seq <= last_seq
            || header.base_seq > SEQ_MAX
        {
            issues.push(RecoveryIssue::UnreadableFile {
                path: path.clone(),
                reason: "header does not match its place (queue, file id or base seq)".into(),
            });
            continue;
        }
        max_seq = max_seq.max(header.base_seq.saturating_sub(1));
        let mut live = LiveSet::default();
        let mut found = Vec::with_capacity(scanned.records.len());
        for record in &scanned.records {
            let header_fields = record.header;
            let seq = header_fields.a;
            let meta_fits = header_fields.aux as usize <= header_fields.record_bytes as usize - RECORD_HEADER_BYTES;
            // Checked before the seq sizes the live set (one bit per seq from the base).
            let within_span = seq >= header.base_seq && seq - header.base_seq < SEGMENT_SEQ_SPAN_MAX;
            if header_fields.kind != RecordKind::Message || !within_span || seq <= last_seq || !meta_fits {
                issues.push(RecoveryIssue::Corruption {
                    path: path.clone(),
                    offset: record.offset,
                    bytes: header_fields.record_bytes as u64,
                });
                continue;
            }
            last_seq = seq;
            live.insert(seq - header.base_seq);
            // The scanned file is still in `buffer`; the record was checked against it.
            let meta_start = record.offset as usize + RECORD_HEADER_BYTES;
            let meta_at = (metas.len(), header_fields.aux as usize);
            metas.extend_from_slice(buffer.get(meta_start..meta_start + meta_at.1).unwrap_or_default());
            found.push(ScannedMessage {
                seq,
                timestamp_ms: header_fields.b,
                location: MessageLocation {
                    segment_id: *id,
                    offset: record.offset,
                    record_bytes: header_fields.record_bytes,
                },
                meta_at,
            });
        }
        max_seq = max_seq.max(last_seq);
        salt = header.salt;
        last_usable_id = Some(*id);
        messages.insert(header.base_seq, found);
        segments.insert(
            header.base_seq,
            Segment {
                id: *id,
                base_seq: header.base_seq,
                salt: header.salt,
                file: scanned.file,
                len: scanned.len,
                live,
                ack_refs: BTreeSet::new(),
            },
        );
    }
    let active_base = segments.keys().next_back().copied().unwrap_or(0);
    let next_segment_id = last_id.checked_add(1).ok_or_else(|| id_exhausted(&dir))?;
    Ok(Some(QueueScan {
        needs_new_segment: last_usable_id != Some(last_id),
        log: QueueLog { dir, salt, segments, active_base, next_segment_id, last_seq: max_seq },
        messages,
        metas,
        max_seq,
        highest_base_on_disk,
        superseded,
    }))
}

pub(crate) fn recover(
    fs: Arc<dyn Fs>,
    dir: &Path,
    config: StoreConfig,
    shared: Arc<Shared>,
    clean_stop: bool,
) -> Result<(WriterState, Recovered)> {
    let queues_dir = layout::queues_dir(dir);
    let acks_dir = layout::acks_dir(dir);
    for path in [dir, &queues_dir, &acks_dir] {
        ensure_dir(fs.as_ref(), path)?;
    }
    let mut issues = Vec::new();
    let mut max_queue_id = 0u64;
    let mut buffer = Vec::new();

    // 0: the journal.
    let replayed = crate::journal::replay(fs.as_ref(), dir, &mut issues)?;

    // 1 and 2: queues and their segments.
    let mut scans: HashMap<LogId, QueueScan> = HashMap::new();
    let entries = fs.read_dir(&queues_dir).map_err(io_error(format!("listing {}", queues_dir.display())))?;
    for entry in entries {
        let path = queues_dir.join(&entry.name);
        let Some((queue, deleted)) = parse_queue_dir(&entry.name).filter(|_| entry.is_dir) else {
            issues.push(RecoveryIssue::UnreadableFile {
                path,
                reason: "not a queue directory of this store; ignored".into(),
            });
            continue;
        };
        max_queue_id = max_queue_id.max(queue.0);
        if deleted {
            tracing::info!(path = %path.display(), "finishing an interrupted queue deletion");
            fs.remove_dir_all(&path).map_err(io_error(format!("removing {}", path.display())))?;
            continue;
        }
        if let Some(scan) = scan_queue(fs.as_ref(), queue, path, &mut issues, &mut buffer)? {
            scans.insert(queue, scan);
        }
    }
    if scans.len() > config.queue_count_max {
        return Err(StoreError::QueueLimit { limit: config.queue_count_max });
    }

    // 3: the ack log.
    let ack_files = numbered_files(fs.as_ref(), &acks_dir, "ack", &mut issues)?;
    let last_ack_id = ack_files.last().map_or(0, |(id, _)| *id);
    let mut ack_segments = BTreeMap::new();
    let mut delivery_counts: foldhash::HashMap<(LogId, u64), u32> = foldhash::HashMap::default();
    let mut max_acked_seq: HashMap<LogId, u64> = HashMap::new();
    for (id, path) in &ack_files {
        let Some(scanned) =
            scan_file(fs.as_ref(), path, ACK_MAGIC, RECORD_HEADER_BYTES, *id == last_ack_id, &mut issues, &mut buffer)?
        else {
            continue;
        };
        for record in &scanned.records {
            let header = record.header;
            let (queue, seq) = (LogId(header.a), header.b);
            if !matches!(header.kind, RecordKind::Removal | RecordKind::DeliveryCount) || seq > SEQ_MAX {
                issues.push(RecoveryIssue::Corruption {
                    path: path.clone(),
                    offset: record.offset,
                    bytes: header.record_bytes as u64,
                });
                continue;
            }
            max_queue_id = max_queue_id.max(queue.0);
            let highest = max_acked_seq.entry(queue).or_insert(0);
            *highest = (*highest).max(seq);
            let Some(segment) = scans
                .get_mut(&queue)
                .and_then(|scan| scan.log.segments.range_mut(..=seq).next_back().map(|(_, segment)| segment))
            else {
                continue;
            };
            segment.ack_refs.insert(*id);
            if header.kind == RecordKind::Removal {
                segment.live.remove(seq - segment.base_seq);
            } else {
                let count = delivery_counts.entry((queue, seq)).or_insert(0);
                *count = (*count).max(header.aux);
            }
        }
        ack_segments.insert(
            *id,
            AckSegment {
                file: scanned.file,
                salt: scanned.header.salt,
                len: scanned.len,
                allocated_end_bytes: scanned.len,
                ref_count: 0,
            },
        );
    }

    // 4: make what was read durable; after a clean stop it is already (the close synced every
    // segment, the journal's checkpoint included, and the ack log before leaving its marker), and
    // 10,000 queues would cost 20,000 syncs here, most of a restart.
    let sync = |file: &Arc<dyn FsFile>, what: &str| {
        file.sync_data().map_err(io_error(format!("syncing {what} during recovery")))
    };
    for scan in scans.values() {
        if clean_stop {
            // Except a newest segment holding no record beyond a queue's first: another handle
            // may have rolled to it after the close (its writer never saw the roll), so neither
            // it nor its directory entry was synced.
            let unsynced_roll = scan
                .log
                .segments
                .values()
                .next_back()
                .filter(|last| last.id > 1 && last.len == FILE_HEADER_BYTES as u64);
            if let Some(last) = unsynced_roll {
                sync(&last.file, "a queue segment")?;
                fs.sync_dir(&scan.log.dir).map_err(io_error(format!("syncing {}", scan.log.dir.display())))?;
            }
            continue;
        }
        for segment in scan.log.segments.values() {
            sync(&segment.file, "a queue segment")?;
        }
        fs.sync_dir(&scan.log.dir).map_err(io_error(format!("syncing {}", scan.log.dir.display())))?;
    }
    for segment in ack_segments.values().filter(|_| !clean_stop) {
        sync(&segment.file, "an ack-log segment")?;
    }
    for path in [&queues_dir, &acks_dir] {
        fs.sync_dir(path).map_err(io_error(format!("syncing {}", path.display())))?;
    }

    // 5: delete what is dead; create missing active segments.
    let mut queues = foldhash::HashMap::default();
    let mut recovered = Recovered { issues, ..Recovered::default() };
    for (queue, mut scan) in scans {
        let log = &mut scan.log;
        let active_base = log.active_base;
        let dead: Vec<u64> = log
            .segments
            .iter()
            .filter(|(base, segment)| (**base != active_base || scan.needs_new_segment) && segment.live.count() == 0)
            .map(|(base, _)| *base)
            .collect();
        let mut next_seq = scan.max_seq.max(max_acked_seq.get(&queue).copied().unwrap_or(0)) + 1;
        // The replacement active segment is made durable before anything is deleted: at every
        // moment the queue has a durable segment, so a crash in between can never leave an empty
        // directory that the next recovery would take for a torn creation.
        let needs_new_segment = scan.needs_new_segment || log.segments.len() == dead.len();
        if needs_new_segment {
            // Its base goes above every base on disk: a dead empty segment may share the next
            // seq as its base, and if a crash comes before it is deleted, the next scan must
            // still find the segments' bases rising with their ids. Seqs may skip; they only rise.
            next_seq = next_seq.max(scan.highest_base_on_disk.saturating_add(1));
        }
        // Out of the map before the replacement goes in: an empty dead segment may have the
        // replacement's base seq (a segment rolled to and never written), and must not take the
        // replacement with it when it is deleted.
        let dead: Vec<(u64, Segment)> =
            dead.iter().filter_map(|base| log.segments.remove(base).map(|segment| (*base, segment))).collect();
        if needs_new_segment {
            let id = log.next_segment_id;
            log.next_segment_id = id.checked_add(1).ok_or_else(|| id_exhausted(&log.dir))?;
            let file = layout::create_file(
                fs.as_ref(),
                &log.dir.join(layout::segment_file_name(id)),
                SEGMENT_MAGIC,
                id,
                queue.0,
                next_seq,
                log.salt,
            )?;
            sync(&file, "a new queue segment")?;
            fs.sync_dir(&log.dir).map_err(io_error(format!("syncing {}", log.dir.display())))?;
            log.segments.insert(
                next_seq,
                Segment {
                    id,
                    base_seq: next_seq,
                    salt: log.salt,
                    file,
                    len: FILE_HEADER_BYTES as u64,
                    live: LiveSet::default(),
                    ack_refs: BTreeSet::new(),
                },
            );
            log.active_base = next_seq;
        }
        for (base, segment) in &dead {
            let path = log.dir.join(layout::segment_file_name(segment.id));
            fs.remove_file(&path).map_err(io_error(format!("removing {}", path.display())))?;
            scan.messages.remove(base);
        }
        for id in &scan.superseded {
            let path = log.dir.join(layout::segment_file_name(*id));
            fs.remove_file(&path).map_err(io_error(format!("removing {}", path.display())))?;
        }
        if !dead.is_empty() || !scan.superseded.is_empty() {
            fs.sync_dir(&log.dir).map_err(io_error(format!("syncing {}", log.dir.display())))?;
        }
        if let Some(active) = log.segments.get(&log.active_base) {
            log.salt = active.salt;
        }
        log.last_seq = next_seq - 1;

        let mut live_messages = Vec::new();
        for (base, segment) in &log.segments {
            for ack_id in &segment.ack_refs {
                if let Some(ack) = ack_segments.get_mut(ack_id) {
                    ack.ref_count += 1;
                }
            }
            for message in scan.messages.get(base).into_iter().flatten() {
                if segment.live.contains(message.seq - base) {
                    live_messages.push(RecoveredMessage {
                        seq: message.seq,
                        timestamp_ms: message.timestamp_ms,
                        delivery_count: delivery_counts.get(&(queue, message.seq)).copied().unwrap_or(0),
                        location: message.location,
                        meta_at: message.meta_at,
                    });
                }
            }
        }
        let Some(active) = log.segments.get(&log.active_base) else {
            return Err(StoreError::Format {
                path: log.dir.clone(),
                reason: "recovery left a log without a segment".into(),
            });
        };
        let mut tail = crate::space::Tail::new(next_seq, active.id, Arc::clone(&active.file), active.len);
        tail.next_segment_id = log.next_segment_id;
        {
            let mut files = shared.segment_files.write().unwrap_or_else(|poisoned| poisoned.into_inner());
            for segment in log.segments.values() {
                files.insert((queue, segment.id), (Arc::clone(&segment.file), segment.salt));
            }
        }
        shared
            .queues
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(queue, Arc::new(QueueHandle::new(tail, log.salt, log.dir.clone())));
        recovered.queues.insert(queue, live_messages);
        recovered.metas.insert(queue, std::mem::take(&mut scan.metas));
        queues.insert(queue, scan.log);
    }

    let mut acks = AckLog {
        dir: acks_dir.clone(),
        active: 0,
        segments: ack_segments,
        dirty_since: None,
        unsynced: BTreeSet::new(),
        dir_dirty: false,
    };
    let usable_last = acks.segments.keys().next_back().copied().filter(|id| *id == last_ack_id);
    match usable_last {
        Some(id) => acks.active = id,
        None => {
            let id = last_ack_id.checked_add(1).ok_or_else(|| id_exhausted(&acks_dir))?;
            let salt = layout::random_salt();
            let file =
                layout::create_file(fs.as_ref(), &acks_dir.join(layout::ack_file_name(id)), ACK_MAGIC, id, 0, 0, salt)?;
            sync(&file, "a new ack-log segment")?;
            let len = FILE_HEADER_BYTES as u64;
            acks.segments.insert(id, AckSegment { file, salt, len, allocated_end_bytes: len, ref_count: 0 });
            acks.active = id;
        }
    }
    let dead_acks: Vec<u64> = acks
        .segments
        .iter()
        .filter(|(id, segment)| **id != acks.active && segment.ref_count == 0)
        .map(|(id, _)| *id)
        .collect();
    for id in &dead_acks {
        acks.segments.remove(id);
        let path = acks_dir.join(layout::ack_file_name(*id));
        fs.remove_file(&path).map_err(io_error(format!("removing {}", path.display())))?;
    }
    fs.sync_dir(&acks_dir).map_err(io_error(format!("syncing {}", acks_dir.display())))?;

    let reservation = match layout::read_queue_id_reservation(fs.as_ref(), dir)? {
        layout::Reservation::Below(below) => Some(below),
        layout::Reservation::Missing => None,
        layout::Reservation::Damaged => {
            recovered.issues.push(RecoveryIssue::UnreadableFile {
                path: dir.join(layout::QUEUE_IDS_FILE),
                reason: "queue-id reservation damaged; continuing above the highest id on disk".into(),
            });
            None
        }
    };
    // Skip whatever the last reservation covered: some of those ids may have been handed out.
    let next_queue_id =
        max_queue_id.checked_add(1).ok_or_else(|| id_exhausted(&queues_dir))?.max(reservation.unwrap_or(0));
    // 6: every segment is synced by now.
    let journal = crate::journal::open_for_writing(fs.as_ref(), dir, config.journal_bytes, replayed.generation)?;
    let state = WriterState {
        fs,
        dir: dir.to_path_buf(),
        config,
        shared,
        queues,
        acks,
        next_queue_id,
        queue_ids_reserved_until: next_queue_id,
        deletion_candidates: BTreeSet::new(),
        journal,
    };
    Ok((state, recovered))
}
