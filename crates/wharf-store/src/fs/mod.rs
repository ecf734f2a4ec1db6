//! The file-system seam: every byte the store reads or writes goes through [`Fs`] and [`FsFile`].
//!
//! Two implementations exist: [`RealFs`] (the operating system, `pread`/`pwrite`/`fdatasync`) and
//! [`SimFs`], an in-memory file system that models what a crash can do to unsynced data (drop it,
//! keep it, tear it), and can fail an fsync, run out of space or flip a bit on demand. The store is
//! written against the trait so that its crash behaviour is tested by the same code that runs in
//! production.
//!
//! The interface is deliberately small: positional reads and writes, truncation, `fdatasync`,
//! allocating space ahead of writes (and giving it back), and directory sync. Directory entries (creations, renames, removals) are durable only after
//! [`Fs::sync_dir`] on the parent, as on Linux.

mod real;
mod sim;

pub use real::RealFs;
pub use sim::{CrashMode, SimFs};

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

/// How [`Fs::open`] treats an existing or missing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Create the file; fail with `AlreadyExists` if it is there.
    CreateNew,
    /// Open an existing file for reading and writing; fail with `NotFound` if it is missing.
    Existing,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The entry's file name (not the full path).
    pub name: String,
    /// True for a directory.
    pub is_dir: bool,
}

/// A file system as the store needs it.
pub trait Fs: Send + Sync + fmt::Debug {
    /// Creates a directory and its missing parents (not durable until the parents are synced).
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Lists a directory, in no particular order.
    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>>;
    /// Opens a file for positional reads and writes.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn FsFile>>;
    /// Removes a file (not durable until the parent directory is synced).
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Removes a directory and everything below it.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Atomically renames a file or directory, replacing a file at `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, removals, renames) durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Whether the path exists; an error when that cannot be known (never guessed as "no").
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// Takes an exclusive lock on `path` (creating the file) for as long as the returned guard
    /// lives, so two processes never open the same data directory; fails with `WouldBlock` if
    /// another holder has it.
    fn lock_exclusive(&self, path: &Path) -> io::Result<Box<dyn std::any::Any + Send + Sync>>;
}

/// An open file. All methods take `&self` so one handle can serve the writer thread and readers.
pub trait FsFile: Send + Sync + fmt::Debug {
    /// The file's current length in bytes.
    fn size_bytes(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; fails with `UnexpectedEof` if the file is shorter.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file if needed. On error, a prefix of `buf`
    /// may have been written.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// `fdatasync`: makes the file's data durable.
    fn sync_data(&self) -> io::Result<()>;
    /// Allocates the blocks for bytes `[offset, offset + len_bytes)` without changing the file's
    /// length (`fallocate` with `FALLOC_FL_KEEP_SIZE`), so that a later write inside that range
    /// cannot fail for lack of space. `Unsupported` where the file system cannot promise that.
    fn allocate(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        let _ = (offset, len_bytes);
        Err(io::Error::new(io::ErrorKind::Unsupported, "this file system cannot allocate ahead"))
    }
    /// Gives back blocks allocated in `[offset, offset + len_bytes)`, a range at or past the end
    /// of the file (a hole punched with the length kept). Best effort: space, not data.
    fn release_allocation(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        let _ = (offset, len_bytes);
        Ok(())
    }
}

/// Creates `path` and any missing ancestors, and makes each new directory entry durable by
/// syncing its parent, top down (a new directory is only reachable after a crash if every new
/// level above it was synced into its own parent).
pub(crate) fn create_dir_durable(fs: &dyn Fs, path: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut current = Some(path);
    while let Some(dir) = current {
        if fs.exists(dir)? {
            break;
        }
        missing.push(dir);
        current = dir.parent();
    }
    if missing.is_empty() {
        return Ok(());
    }
    fs.create_dir_all(path)?;
    for dir in missing.iter().rev() {
        if let Some(parent) = dir.parent() {
            fs.sync_dir(if parent.as_os_str().is_empty() { Path::new(".") } else { parent })?;
        }
    }
    Ok(())
}

/// Reads a whole file into memory. Used for recovery scans, whose files are bounded by the
/// segment size limit checked by the caller.
pub(crate) fn read_all(file: &dyn FsFile, len: u64) -> io::Result<Vec<u8>> {
    let len = usize::try_from(len).map_err(|_| io::Error::other("file too large for memory"))?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}
