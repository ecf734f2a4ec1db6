//! The store's error type: one enum for everything `wharf-store` can report.
//!
//! Errors are split by what the caller can do about them: `NoSpace` and `Io` fail one operation and
//! leave the store usable; `Fatal` means durability can no longer be promised (a failed `fdatasync`,
//! a failed truncate of a half-written batch) and every later operation fails with it too, so the
//! process stops instead of pretending. Errors are `Clone` because one failure completes many
//! waiting tickets.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// Everything that can go wrong in the store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The disk (or the fault-injecting file system) is full. The failed operation wrote nothing
    /// that will be read back; everything durable before is intact. Retrying after space is freed
    /// is allowed.
    #[error("no space left on device while {context}")]
    NoSpace {
        /// What the store was doing.
        context: String,
    },

    /// An I/O error that failed one operation without endangering anything already durable.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What the store was doing.
        context: String,
        /// The operating system's error.
        #[source]
        source: Arc<io::Error>,
    },

    /// The store has stopped: a sync failed or a half-written batch could not be undone, so the
    /// on-disk state can no longer be trusted to match what was acknowledged. Every later operation
    /// fails with this error; the process should exit and recover from disk.
    #[error("store stopped after a fatal error: {reason}")]
    Fatal {
        /// The first fatal failure, as text (it is shared by all later errors).
        reason: Arc<str>,
    },

    /// A record or file failed its checksum or structural checks.
    #[error("corrupt data in {path} at offset {offset}: {reason}")]
    Corrupt {
        /// The file holding the bad bytes.
        path: PathBuf,
        /// Byte offset of the bad record or header inside the file.
        offset: u64,
        /// What check failed.
        reason: String,
    },

    /// A value is larger than the limit the store enforces for it.
    #[error("{what} is {bytes} bytes, over the limit of {limit_bytes} bytes")]
    TooLarge {
        /// Which value.
        what: &'static str,
        /// Its size.
        bytes: u64,
        /// The named limit it broke.
        limit_bytes: u64,
    },

    /// The queue does not exist in this store (never created, or deleted).
    #[error("queue {0} does not exist in the store")]
    UnknownLog(u64),

    /// The store already holds its maximum number of queues.
    #[error("the store already holds {limit} queues, its configured maximum")]
    QueueLimit {
        /// `queue_count_max`.
        limit: usize,
    },

    /// Another process has the data directory open.
    #[error("the data directory is in use by another process (lock held on {path})")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },

    /// The store was closed; no more operations are accepted.
    #[error("the store is closed")]
    Closed,

    /// A configuration value is out of range.
    #[error("invalid store configuration: {0}")]
    Config(String),

    /// The data directory holds files this version cannot read (wrong magic or newer format).
    #[error("unsupported file {path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
}

impl StoreError {
    /// Wraps an I/O error, mapping "disk full" to [`StoreError::NoSpace`] so callers can tell it
    /// apart without inspecting OS error codes.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        let context = context.into();
        if source.kind() == io::ErrorKind::StorageFull || source.raw_os_error() == Some(28) {
            StoreError::NoSpace { context }
        } else {
            StoreError::Io { context, source: Arc::new(source) }
        }
    }

    /// True for errors after which the store accepts nothing more.
    pub fn is_fatal(&self) -> bool {
        matches!(self, StoreError::Fatal { .. } | StoreError::Closed)
    }
}

/// The store's result type.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
