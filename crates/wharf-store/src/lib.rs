//! `wharf-store`: Wharf's crash-safe storage engine.
//!
//! It owns everything that touches the disk: per-queue message logs in segment files, an ack log
//! of removals and delivery counts, a group-commit writer thread that batches appends and
//! `fdatasync`s them before completing, recovery after any crash, and a small log of durable
//! definitions. It knows nothing of AMQP or of any async runtime: it runs on std threads, and its
//! completions ([`Ticket`]) can be awaited from async code or waited on from plain threads.
//!
//! All file access goes through the [`Fs`] trait; [`SimFs`] is a fault-injecting implementation
//! for crash tests. The byte layout is in `docs/storage-format.md`, the durability promises in
//! `docs/durability.md`.
//!
//! ```
//! use wharf_store::{SimFs, Store, StoreConfig};
//! let fs = SimFs::new(7);
//! let (store, _recovered) = Store::open(fs.shared(), "/data", StoreConfig::default())?;
//! let queue = store.create_log()?.wait()?;
//! let receipt = store.append(queue, 0, b"routing", b"hello")?.wait()?; // durable now
//! assert_eq!(store.read(queue, &receipt.location)?.body, b"hello");
//! store.remove(queue, receipt.seq)?.wait()?;
//! store.sync()?.wait()?; // the removal is durable too
//! # Ok::<(), wharf_store::StoreError>(())
//! ```

mod config;
mod error;
pub mod format;
mod fs;
mod histogram;
mod journal;
mod layout;
mod live_set;
mod meta;
mod recovery;
mod space;
mod store;
mod ticket;
mod writer;

pub use error::{Result, StoreError};
pub use fs::{CrashMode, DirEntry, Fs, FsFile, OpenMode, RealFs, SimFs};
pub use histogram::{BATCH_APPENDS_BOUNDS, Histogram, HistogramSnapshot, SYNC_LATENCY_BOUNDS_US};
pub use journal::{JOURNAL_BYTES_LIMIT, JOURNAL_WRITE_BYTES_LIMIT};
pub use meta::{
    Definitions, META_ENTRIES_MAX, META_KEY_BYTES_MAX, META_VALUE_BYTES_MAX, MetaChange, MetaRecovered, MetaStore,
};
pub use space::SpaceReservation;
pub use store::{
    AppendReceipt, CLEAN_STOP_MARKER, LogId, MessageLocation, PendingAppend, RecordView, Recovered, RecoveredMessage,
    RecoveryIssue, SEGMENT_FILE_BYTES_LIMIT, SegmentUsage, Store, StoreConfig, StoreStats, StoredMessage,
};
pub use ticket::{Observer, Ticket, TicketFuture};
