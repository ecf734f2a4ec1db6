//! [`RealFs`]: the operating system's file system, via `std::fs`, Unix positional I/O and (on Linux)
//! `fallocate(2)` for space allocated ahead of writes.

use super::{DirEntry, Fs, FsFile, OpenMode};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// The real file system. `sync_data` is `fdatasync(2)`; `sync_dir` opens the directory and calls
/// `fsync(2)` on it.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

impl RealFs {
    /// A handle to the real file system, shareable as `Arc<dyn Fs>`.
    pub fn shared() -> Arc<dyn Fs> {
        Arc::new(RealFs)
    }
}

#[derive(Debug)]
struct RealFile {
    file: File,
}

impl Fs for RealFs {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        let mut entries = Vec::new();
        for entry in fs::read_dir(path)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                // Names the store writes are ASCII; anything else is not ours and is ignored.
                continue;
            };
            entries.push(DirEntry { name, is_dir: entry.file_type()?.is_dir() });
        }
        Ok(entries)
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn FsFile>> {
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        match mode {
            OpenMode::CreateNew => options.create_new(true),
            OpenMode::Existing => options.create(false),
        };
        Ok(Arc::new(RealFile { file: options.open(path)? }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir_all(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }

    fn lock_exclusive(&self, path: &Path) -> io::Result<Box<dyn std::any::Any + Send + Sync>> {
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Box::new(file)),
            Err(std::fs::TryLockError::WouldBlock) => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is locked by another process", path.display()),
            )),
            Err(std::fs::TryLockError::Error(error)) => Err(error),
        }
    }
}

impl FsFile for RealFile {
    fn size_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    #[cfg(target_os = "linux")]
    fn allocate(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        fallocate(&self.file, rustix::fs::FallocateFlags::KEEP_SIZE, offset, len_bytes)
    }

    #[cfg(target_os = "linux")]
    fn release_allocation(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        match fallocate(&self.file, flags, offset, len_bytes) {
            // Only space is at stake: a file system that cannot punch keeps the blocks until the
            // segment is deleted.
            Err(error) if error.kind() == io::ErrorKind::Unsupported => Ok(()),
            other => other,
        }
    }
}

/// `fallocate(2)`, retried on `EINTR`; "not supported" (by the file system or the kernel) comes
/// back as `ErrorKind::Unsupported`.
#[cfg(target_os = "linux")]
fn fallocate(file: &File, flags: rustix::fs::FallocateFlags, offset: u64, len_bytes: u64) -> io::Result<()> {
    use rustix::io::Errno;
    if len_bytes == 0 {
        return Ok(());
    }
    loop {
        match rustix::fs::fallocate(file, flags, offset, len_bytes) {
            Ok(()) => return Ok(()),
            Err(Errno::INTR) => continue,
            Err(errno @ (Errno::OPNOTSUPP | Errno::NOSYS)) => {
                return Err(io::Error::new(io::ErrorKind::Unsupported, io::Error::from(errno)));
            }
            Err(errno) => return Err(io::Error::from(errno)),
        }
    }
}
