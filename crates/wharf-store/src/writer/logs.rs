//! The writer's logs: creating one (its id durably reserved first), deleting one, and deleting
//! sealed segments once every record in them is removed and the removals are durable.

use super::*;
use crate::layout::{QUEUE_ID_RESERVATION_BLOCK, write_queue_id_reservation};
use crate::store::QueueHandle;

impl WriterState {
    /// Deletes sealed segments with no live message (their removals are durable by now), then
    /// the ack-log segments nothing needs any more.
    pub(super) fn delete_dead_segments(&mut self) -> Result<()> {
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

    pub(super) fn create_log(&mut self) -> Result<LogId> {
        if self.queues.len() >= self.config.queue_count_max {
            return Err(StoreError::QueueLimit { limit: self.config.queue_count_max });
        }
        if self.next_queue_id >= self.queue_ids_reserved_until {
            // Saturating: a reservation read back from disk may sit just below the last id; then
            // the ids run out below, with an error, not here.
            let reserve_until = self.next_queue_id.saturating_add(QUEUE_ID_RESERVATION_BLOCK);
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
                if is_out_of_descriptors(&error) {
                    // The directory could not even be opened, so no sync failed and nothing was
                    // promised: the new log is undone and its creation fails; the store goes on
                    // (a queue declared with too many files open is refused, not fatal).
                    let _ = self.fs.remove_dir_all(&dir);
                    return Err(StoreError::io(format!("opening {} to sync it", path.display()), error));
                }
                return Err(self.fatal(format!("fsync of directory {} failed: {error}", path.display())));
            }
        }
        let tail = crate::space::Tail::new(1, 1, Arc::clone(&file), FILE_HEADER_BYTES as u64);
        let handle = Arc::new(QueueHandle::new(tail, salt, dir.clone()));
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
        self.shared.queues.write().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(queue, handle);
        Ok(queue)
    }

    pub(super) fn delete_log(&mut self, queue: LogId) -> Result<()> {
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

/// The process or the system has no file descriptor left (EMFILE, ENFILE): an open failed, so
/// nothing it would have done happened.
fn is_out_of_descriptors(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(23 | 24))
}
