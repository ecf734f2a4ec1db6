//! The writer's ack log: removal and delivery-count records written after the appends they name
//! are durable, synced when asked or lazily, rolled into new segments, and deleted once no
//! remaining segment needs them.

use super::*;

/// Space kept allocated past the ack log's end: about 6,500 removals.
const ACK_LOG_AHEAD_BYTES: u64 = 256 * 1024;

impl WriterState {
    /// Writes removal and delivery-count records for live messages, applying removals to the
    /// in-memory live sets (undone if the write fails). Returns each ack's result so far.
    pub(super) fn write_acks(
        &mut self,
        acks: Vec<(LogId, u64, Option<u32>, Completer<()>)>,
    ) -> Vec<(Completer<()>, Result<()>)> {
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
                self.keep_ack_space_ahead();
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
    pub(super) fn roll_ack_segment_if_full(&mut self, incoming_bytes: u64) -> Result<()> {
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
        let len = FILE_HEADER_BYTES as u64;
        self.acks.segments.insert(id, AckSegment { file, salt, len, allocated_end_bytes: len, ref_count: 0 });
        self.acks.active = id;
        self.acks.unsynced.insert(id);
        self.acks.dir_dirty = true;
        self.acks.dirty_since.get_or_insert_with(Instant::now);
        self.keep_ack_space_ahead();
        if self.acks.segments.get(&sealed).is_some_and(|segment| segment.ref_count == 0) {
            self.delete_ack_segments(&[sealed])?;
        }
        Ok(())
    }

    /// Keeps space allocated past the ack log's end, so that removals can still be written (and
    /// fully removed segments deleted, which gives space back) after appends have filled the
    /// disk. Best effort: without the space, an ack-log write fails as it always could (undone;
    /// the message stays live).
    pub(super) fn keep_ack_space_ahead(&mut self) {
        let ack_segment_bytes_max = self.config.ack_segment_bytes_max;
        let Some(active) = self.acks.segments.get_mut(&self.acks.active) else { return };
        let wanted_end = (active.len + ACK_LOG_AHEAD_BYTES).min(ack_segment_bytes_max.max(active.len));
        if active.allocated_end_bytes >= active.len + ACK_LOG_AHEAD_BYTES / 2
            || wanted_end <= active.allocated_end_bytes
        {
            return;
        }
        let from = active.allocated_end_bytes.max(active.len);
        match active.file.allocate(from, wanted_end.saturating_sub(from)) {
            Ok(()) => active.allocated_end_bytes = wanted_end,
            Err(error) if error.kind() == std::io::ErrorKind::Unsupported => active.allocated_end_bytes = wanted_end,
            Err(error) => tracing::debug!(%error, "could not allocate space ahead in the ack log"),
        }
    }

    /// Makes every written ack-log record durable.
    pub(crate) fn sync_acks(&mut self) -> Result<()> {
        for id in std::mem::take(&mut self.acks.unsynced) {
            if let Some(segment) = self.acks.segments.get(&id) {
                let started = std::time::Instant::now();
                if let Err(error) = segment.file.sync_data() {
                    return Err(self.fatal(format!("fdatasync of ack-log segment {id} failed: {error}")));
                }
                self.shared.counters.sync_latency_us.observe(started.elapsed().as_micros() as u64);
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

    /// Drops references to ack-log segments and deletes those left with none (never the active
    /// one). Must only run once the deletions that released the references are durable.
    pub(super) fn release_ack_refs(&mut self, released: Vec<u64>) -> Result<()> {
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

    pub(super) fn delete_ack_segments(&mut self, ids: &[u64]) -> Result<()> {
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
}
