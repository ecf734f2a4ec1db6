//! Where things are in a data directory: the paths and names of log directories, segment and
//! ack-log files, new files with their headers, and the durable log-id reservation
//! (`queue-ids`). `docs/storage-format.md` describes the same layout byte by byte.

use crate::error::{Result, StoreError};
use crate::format::FileHeader;
use crate::fs::{Fs, FsFile, OpenMode};
use crate::store::{LogId, Shared};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

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

/// How many queue ids one durable reservation covers (one small file write per this many queues).
pub(crate) const QUEUE_ID_RESERVATION_BLOCK: u64 = 64;
pub(crate) const QUEUE_IDS_FILE: &str = "queue-ids";
const QUEUE_IDS_TMP_FILE: &str = "queue-ids.tmp";
const QUEUE_IDS_FILE_BYTES: usize = 12;

/// Durably records that queue ids below `reserve_until` may be in use: write a temporary file,
/// sync it, rename it over the old one, sync the directory. Failing before the rename leaves the
/// old reservation in force (an ordinary error); failing after it is fatal.
pub(crate) fn write_queue_id_reservation(fs: &dyn Fs, dir: &Path, reserve_until: u64, shared: &Shared) -> Result<()> {
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
