//! [`MetaStore`]: the durable definitions (queues, exchanges, bindings, users, policies) as a
//! key-value map in its own log, `meta/definitions.log`.
//!
//! Each [`MetaStore::apply`] appends one checksummed record holding a batch of puts and deletes and
//! `fdatasync`s it before returning, so a batch is applied whole or not at all. When the log holds
//! much more than the live map, it is rewritten compactly to `definitions.log.tmp`, synced, and
//! renamed over the log (then the directory is synced): the replacement is atomic, a crash leaves
//! the old log or the new one. Keys are opaque bytes; callers namespace them (`queue/<vhost>/…`).
//! Definitions change rarely, so this log favours simplicity over batching.

use crate::error::{Result, StoreError};
use crate::format::{
    self, FILE_HEADER_BYTES, FileHeader, META_MAGIC, META_RECORD_BYTES_MAX, RECORD_HEADER_BYTES, RecordKind,
};
use crate::fs::{Fs, FsFile, OpenMode};
use crate::store::RecoveryIssue;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Longest key accepted.
pub const META_KEY_BYTES_MAX: usize = 4 * 1024;
/// Longest value accepted.
pub const META_VALUE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Most entries the map may hold.
pub const META_ENTRIES_MAX: usize = 1_000_000;
/// Most bytes of live definitions. With compaction at twice the live size, the log stays far
/// below the size recovery reads (`SEGMENT_FILE_BYTES_LIMIT`).
pub const META_LIVE_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// The log is compacted once it is this much larger than the live data.
const COMPACTION_SLACK_BYTES: u64 = 1024 * 1024;

const LOG_NAME: &str = "definitions.log";
const TMP_NAME: &str = "definitions.log.tmp";
const CHANGE_PUT: u8 = 1;
const CHANGE_DELETE: u8 = 2;
const CHANGE_HEADER_BYTES: usize = 9;

/// The definitions map: opaque keys to opaque values.
pub type Definitions = BTreeMap<Vec<u8>, Vec<u8>>;

/// What [`MetaStore::open`] found.
#[derive(Debug, Default)]
pub struct MetaRecovered {
    /// The map as of the last complete batch.
    pub entries: Definitions,
    /// Damage found and handled (a damaged batch is skipped whole, a torn one cut off).
    pub issues: Vec<RecoveryIssue>,
}

/// One change in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaChange {
    /// Insert or replace `key`.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The new value.
        value: Vec<u8>,
    },
    /// Remove `key` (no-op if absent).
    Delete {
        /// The key.
        key: Vec<u8>,
    },
}

/// The definitions log. Cheap to clone; all clones share one file.
#[derive(Debug, Clone)]
pub struct MetaStore {
    inner: Arc<Mutex<MetaInner>>,
}

#[derive(Debug)]
struct MetaInner {
    fs: Arc<dyn Fs>,
    dir: PathBuf,
    file: Arc<dyn FsFile>,
    salt: u32,
    len: u64,
    entries: BTreeMap<Vec<u8>, Vec<u8>>,
    live_bytes: u64,
    fatal: Option<Arc<str>>,
}

fn encode_changes(changes: &[MetaChange]) -> Vec<u8> {
    let mut out = Vec::new();
    for change in changes {
        let (op, key, value): (u8, &[u8], &[u8]) = match change {
            MetaChange::Put { key, value } => (CHANGE_PUT, key, value),
            MetaChange::Delete { key } => (CHANGE_DELETE, key, &[]),
        };
        out.push(op);
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(value);
    }
    out
}

fn decode_changes(mut bytes: &[u8]) -> Option<Vec<MetaChange>> {
    let mut changes = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < CHANGE_HEADER_BYTES {
            return None;
        }
        let key_len = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        let value_len = u32::from_le_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) as usize;
        if key_len > META_KEY_BYTES_MAX || value_len > META_VALUE_BYTES_MAX {
            return None;
        }
        let rest = &bytes[CHANGE_HEADER_BYTES..];
        let key = rest.get(..key_len)?.to_vec();
        let value = rest.get(key_len..key_len + value_len)?.to_vec();
        changes.push(match bytes[0] {
            CHANGE_PUT => MetaChange::Put { key, value },
            CHANGE_DELETE if value_len == 0 => MetaChange::Delete { key },
            _ => return None,
        });
        bytes = &rest[key_len + value_len..];
    }
    Some(changes)
}

fn entry_bytes(key: &[u8], value: &[u8]) -> u64 {
    (CHANGE_HEADER_BYTES + key.len() + value.len()) as u64
}

fn apply_to_map(entries: &mut BTreeMap<Vec<u8>, Vec<u8>>, live_bytes: &mut u64, changes: Vec<MetaChange>) {
    for change in changes {
        match change {
            MetaChange::Put { key, value } => {
                *live_bytes += entry_bytes(&key, &value);
                if let Some(old) = entries.insert(key.clone(), value) {
                    *live_bytes -= entry_bytes(&key, &old);
                }
            }
            MetaChange::Delete { key } => {
                if let Some(old) = entries.remove(&key) {
                    *live_bytes -= entry_bytes(&key, &old);
                }
            }
        }
    }
}

/// Writes a fresh log holding `entries` to `path` and syncs it (no rename).
fn write_log(fs: &dyn Fs, path: &Path, entries: &BTreeMap<Vec<u8>, Vec<u8>>) -> Result<(Arc<dyn FsFile>, u32, u64)> {
    if fs.exists(path).map_err(|error| StoreError::io(format!("checking {}", path.display()), error))? {
        fs.remove_file(path).map_err(|error| StoreError::io(format!("removing {}", path.display()), error))?;
    }
    let salt = crate::layout::random_salt();
    let file = crate::layout::create_file(fs, path, META_MAGIC, 1, 0, 0, salt)?;
    let mut bytes = Vec::new();
    let mut chunk = Vec::new();
    let chunk_bytes_max = META_RECORD_BYTES_MAX - RECORD_HEADER_BYTES;
    for (key, value) in entries {
        let change = MetaChange::Put { key: key.clone(), value: value.clone() };
        let encoded = encode_changes(std::slice::from_ref(&change));
        if chunk.len() + encoded.len() > chunk_bytes_max {
            format::encode_record(&mut bytes, salt, RecordKind::MetaBatch, 0, 0, 0, &[&chunk]);
            chunk.clear();
        }
        chunk.extend_from_slice(&encoded);
    }
    if !chunk.is_empty() {
        format::encode_record(&mut bytes, salt, RecordKind::MetaBatch, 0, 0, 0, &[&chunk]);
    }
    let write = file.write_all_at(&bytes, FILE_HEADER_BYTES as u64).and_then(|()| file.sync_data());
    if let Err(error) = write {
        let _ = fs.remove_file(path);
        return Err(StoreError::io(format!("writing {}", path.display()), error));
    }
    Ok((file, salt, (FILE_HEADER_BYTES + bytes.len()) as u64))
}

impl MetaStore {
    /// Opens (or creates) the definitions log in `dir`; returns the store, the current map and
    /// any damage found (damaged batches are skipped whole, a torn tail is cut).
    pub fn open(fs: Arc<dyn Fs>, dir: impl Into<PathBuf>) -> Result<(MetaStore, MetaRecovered)> {
        let dir = dir.into();
        let mut issues = Vec::new();
        crate::fs::create_dir_durable(fs.as_ref(), &dir)
            .map_err(|error| StoreError::io(format!("creating {}", dir.display()), error))?;
        let log_path = dir.join(LOG_NAME);
        let tmp_path = dir.join(TMP_NAME);
        let exists = |path: &Path| {
            fs.exists(path).map_err(|error| StoreError::io(format!("checking {}", path.display()), error))
        };
        if exists(&tmp_path)? {
            // A compaction that did not reach its rename: the old log is still the truth.
            fs.remove_file(&tmp_path)
                .map_err(|error| StoreError::io(format!("removing {}", tmp_path.display()), error))?;
        }
        let mut entries = BTreeMap::new();
        let mut live_bytes = 0;
        let (file, salt, len) = if exists(&log_path)? {
            let file = fs
                .open(&log_path, OpenMode::Existing)
                .map_err(|error| StoreError::io(format!("opening {}", log_path.display()), error))?;
            let file_len =
                file.size_bytes().map_err(|error| StoreError::io(format!("reading {}", log_path.display()), error))?;
            if file_len > crate::store::SEGMENT_FILE_BYTES_LIMIT {
                return Err(StoreError::TooLarge {
                    what: "definitions log",
                    bytes: file_len,
                    limit_bytes: crate::store::SEGMENT_FILE_BYTES_LIMIT,
                });
            }
            let bytes = crate::fs::read_all(file.as_ref(), file_len)
                .map_err(|error| StoreError::io(format!("reading {}", log_path.display()), error))?;
            let header = FileHeader::decode(&bytes, META_MAGIC, &log_path)?;
            let scan = format::scan_records(&bytes, header.salt, META_RECORD_BYTES_MAX);
            for damaged in &scan.damaged {
                tracing::error!(path = %log_path.display(), offset = damaged.offset, "corrupt definitions batch skipped");
                issues.push(RecoveryIssue::Corruption {
                    path: log_path.clone(),
                    offset: damaged.offset,
                    bytes: damaged.bytes,
                });
            }
            for record in &scan.records {
                let start = record.offset as usize + RECORD_HEADER_BYTES;
                let end = record.offset as usize + record.header.record_bytes as usize;
                let decoded =
                    (record.header.kind == RecordKind::MetaBatch).then(|| decode_changes(&bytes[start..end])).flatten();
                match decoded {
                    Some(changes) => apply_to_map(&mut entries, &mut live_bytes, changes),
                    None => issues.push(RecoveryIssue::Corruption {
                        path: log_path.clone(),
                        offset: record.offset,
                        bytes: record.header.record_bytes as u64,
                    }),
                }
            }
            if scan.valid_end < file_len {
                tracing::warn!(path = %log_path.display(), offset = scan.valid_end, "torn tail of the definitions log truncated");
                file.set_len(scan.valid_end)
                    .and_then(|()| file.sync_data())
                    .map_err(|error| StoreError::io(format!("truncating {}", log_path.display()), error))?;
                issues.push(RecoveryIssue::TruncatedTail {
                    path: log_path.clone(),
                    offset: scan.valid_end,
                    bytes: file_len - scan.valid_end,
                });
            }
            file.sync_data().map_err(|error| StoreError::io(format!("syncing {}", log_path.display()), error))?;
            (file, header.salt, scan.valid_end)
        } else {
            write_log(fs.as_ref(), &tmp_path, &entries)?;
            fs.rename(&tmp_path, &log_path)
                .map_err(|error| StoreError::io(format!("creating {}", log_path.display()), error))?;
            fs.sync_dir(&dir).map_err(|error| StoreError::io(format!("syncing {}", dir.display()), error))?;
            let file = fs
                .open(&log_path, OpenMode::Existing)
                .map_err(|error| StoreError::io(format!("opening {}", log_path.display()), error))?;
            let header_bytes = crate::fs::read_all(file.as_ref(), FILE_HEADER_BYTES as u64)
                .map_err(|error| StoreError::io(format!("reading {}", log_path.display()), error))?;
            let header = FileHeader::decode(&header_bytes, META_MAGIC, &log_path)?;
            (file, header.salt, FILE_HEADER_BYTES as u64)
        };
        let store = MetaStore {
            inner: Arc::new(Mutex::new(MetaInner {
                fs,
                dir,
                file,
                salt,
                len,
                entries: entries.clone(),
                live_bytes,
                fatal: None,
            })),
        };
        Ok((store, MetaRecovered { entries, issues }))
    }

    /// Inserts or replaces one key, durably.
    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.apply(&[MetaChange::Put { key: key.to_vec(), value: value.to_vec() }])
    }

    /// Deletes one key, durably.
    pub fn delete(&self, key: &[u8]) -> Result<()> {
        self.apply(&[MetaChange::Delete { key: key.to_vec() }])
    }

    /// The current value of a key.
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.lock().entries.get(key).cloned()
    }

    /// A copy of the whole map.
    pub fn entries(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        self.lock().entries.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MetaInner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies a batch atomically and durably: on return the whole batch is on disk (or nothing
    /// of it is, and the error says why).
    pub fn apply(&self, changes: &[MetaChange]) -> Result<()> {
        for change in changes {
            let (key, value_bytes) = match change {
                MetaChange::Put { key, value } => (key, value.len()),
                MetaChange::Delete { key } => (key, 0),
            };
            if key.len() > META_KEY_BYTES_MAX {
                return Err(StoreError::TooLarge {
                    what: "definition key",
                    bytes: key.len() as u64,
                    limit_bytes: META_KEY_BYTES_MAX as u64,
                });
            }
            if value_bytes > META_VALUE_BYTES_MAX {
                return Err(StoreError::TooLarge {
                    what: "definition value",
                    bytes: value_bytes as u64,
                    limit_bytes: META_VALUE_BYTES_MAX as u64,
                });
            }
        }
        let payload = encode_changes(changes);
        if payload.len() + RECORD_HEADER_BYTES > META_RECORD_BYTES_MAX {
            return Err(StoreError::TooLarge {
                what: "definitions batch",
                bytes: (payload.len() + RECORD_HEADER_BYTES) as u64,
                limit_bytes: META_RECORD_BYTES_MAX as u64,
            });
        }
        let mut inner = self.lock();
        if let Some(reason) = &inner.fatal {
            return Err(StoreError::Fatal { reason: Arc::clone(reason) });
        }
        let new_keys = changes
            .iter()
            .filter(|change| matches!(change, MetaChange::Put { key, .. } if !inner.entries.contains_key(key)))
            .count();
        if inner.entries.len() + new_keys > META_ENTRIES_MAX {
            return Err(StoreError::TooLarge {
                what: "definitions map (entries)",
                bytes: (inner.entries.len() + new_keys) as u64,
                limit_bytes: META_ENTRIES_MAX as u64,
            });
        }
        let added_bytes: u64 = changes
            .iter()
            .map(|change| match change {
                MetaChange::Put { key, value } => entry_bytes(key, value),
                MetaChange::Delete { .. } => 0,
            })
            .sum();
        if inner.live_bytes + added_bytes > META_LIVE_BYTES_MAX {
            return Err(StoreError::TooLarge {
                what: "definitions (live bytes)",
                bytes: inner.live_bytes + added_bytes,
                limit_bytes: META_LIVE_BYTES_MAX,
            });
        }
        let mut record = Vec::with_capacity(RECORD_HEADER_BYTES + payload.len());
        format::encode_record(&mut record, inner.salt, RecordKind::MetaBatch, 0, 0, 0, &[&payload]);
        let start = inner.len;
        let path = inner.dir.join(LOG_NAME);
        if let Err(error) = inner.file.write_all_at(&record, start) {
            if let Err(undo) = inner.file.set_len(start) {
                return Err(
                    inner.set_fatal(format!("could not truncate {} after a failed write: {undo}", path.display()))
                );
            }
            return Err(StoreError::io(format!("appending to {}", path.display()), error));
        }
        if let Err(error) = inner.file.sync_data() {
            return Err(inner.set_fatal(format!("fdatasync of {} failed: {error}", path.display())));
        }
        inner.len = start + record.len() as u64;
        let MetaInner { entries, live_bytes, .. } = &mut *inner;
        apply_to_map(entries, live_bytes, changes.to_vec());
        if inner.len > 2 * inner.live_bytes + COMPACTION_SLACK_BYTES {
            inner.compact()?;
        }
        Ok(())
    }
}

impl MetaInner {
    fn set_fatal(&mut self, reason: String) -> StoreError {
        tracing::error!(%reason, "definitions log stopped");
        let reason: Arc<str> = Arc::from(reason.as_str());
        self.fatal = Some(Arc::clone(&reason));
        StoreError::Fatal { reason }
    }

    /// Rewrites the log with only the live entries and swaps it in atomically.
    fn compact(&mut self) -> Result<()> {
        let tmp_path = self.dir.join(TMP_NAME);
        let log_path = self.dir.join(LOG_NAME);
        let (file, salt, len) = match write_log(self.fs.as_ref(), &tmp_path, &self.entries) {
            Ok(written) => written,
            Err(error) => {
                // The old log is intact and complete; compaction can wait for space.
                tracing::warn!(%error, "compaction of the definitions log failed; keeping the old log");
                return Ok(());
            }
        };
        if let Err(error) = self.fs.rename(&tmp_path, &log_path) {
            return Err(self.set_fatal(format!("could not rename {} over the log: {error}", tmp_path.display())));
        }
        if let Err(error) = self.fs.sync_dir(&self.dir) {
            return Err(self.set_fatal(format!("fsync of {} failed: {error}", self.dir.display())));
        }
        self.file = file;
        self.salt = salt;
        self.len = len;
        Ok(())
    }
}
