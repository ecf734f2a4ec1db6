//! [`StoreConfig`]: the store's tuning and limits, and the checks that keep every file within
//! what recovery reads back.

use crate::error::{Result, StoreError};
use crate::format::{self, RECORD_BYTES_MAX, RECORD_HEADER_BYTES};

/// Tuning and limits. The defaults suit a broker; tests shrink the sizes to exercise rollover.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// A queue's segment is sealed and a new one started once the next record would pass this
    /// size (a single larger record still fits in an empty segment).
    pub segment_bytes_max: u64,
    /// The same for ack-log segments.
    pub ack_segment_bytes_max: u64,
    /// The writer stops gathering a batch once it holds this many bytes of records.
    pub batch_bytes_max: usize,
    /// Operations that may wait for the writer; beyond this, callers block (back-pressure).
    pub pending_ops_max: usize,
    /// Bytes of appends that may wait for the writer; beyond this, appenders block until the
    /// writer catches up (a single append larger than this still goes through alone).
    pub pending_bytes_max: u64,
    /// Removals not explicitly synced are made durable at most this long after they were written.
    pub ack_sync_interval_ms: u64,
    /// Most queues one store holds.
    pub queue_count_max: usize,
    /// Under pipelined load (the previous batch held more than one append), how long a batch
    /// with appends waits for more to arrive before it is written and synced. Each sync costs
    /// the same whatever it covers, so fewer, larger batches move more messages per CPU second;
    /// a lone synchronous appender (batches of one) never waits. 0 disables the wait.
    pub group_commit_delay_us: u64,
    /// Size of the shared journal (`journal.rs`): a batch that dirties several segments is made
    /// durable by one sync of the journal, and the segments are synced at checkpoints, each time
    /// the journal fills. 0 runs without a journal: every dirtied segment is synced in its batch.
    pub journal_bytes: u64,
    /// A batch's write to one segment larger than this skips the journal and is synced in its
    /// segment (a large write fills a sync on its own; through the journal it would be written
    /// twice).
    pub journal_write_bytes_max: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            segment_bytes_max: 32 * 1024 * 1024,
            ack_segment_bytes_max: 8 * 1024 * 1024,
            batch_bytes_max: 16 * 1024 * 1024,
            pending_ops_max: 65_536,
            pending_bytes_max: 256 * 1024 * 1024,
            ack_sync_interval_ms: 200,
            queue_count_max: 100_000,
            group_commit_delay_us: 1_000,
            journal_bytes: 64 * 1024 * 1024,
            journal_write_bytes_max: 256 * 1024,
        }
    }
}

/// Largest segment file recovery will read into memory; a bigger file stops the open (it was not
/// written by this store, and skipping it could bring back removed messages).
pub const SEGMENT_FILE_BYTES_LIMIT: u64 = 1024 * 1024 * 1024;
/// Largest `batch_bytes_max` accepted.
pub const BATCH_BYTES_LIMIT: usize = 256 * 1024 * 1024;

impl StoreConfig {
    /// Checks the limits, including that no file can grow past what recovery reads: a segment
    /// may exceed `segment_bytes_max` by one record, an ack-log segment by one batch.
    pub(crate) fn validate(&self) -> Result<()> {
        let floor = (format::FILE_HEADER_BYTES + RECORD_HEADER_BYTES) as u64;
        let segment_ceiling = SEGMENT_FILE_BYTES_LIMIT - RECORD_BYTES_MAX as u64;
        if self.segment_bytes_max < floor || self.segment_bytes_max > segment_ceiling {
            return Err(StoreError::Config(format!("segment_bytes_max must be between {floor} and {segment_ceiling}")));
        }
        if self.batch_bytes_max > BATCH_BYTES_LIMIT {
            return Err(StoreError::Config(format!("batch_bytes_max must be at most {BATCH_BYTES_LIMIT}")));
        }
        let ack_ceiling = SEGMENT_FILE_BYTES_LIMIT - BATCH_BYTES_LIMIT as u64;
        if self.ack_segment_bytes_max < floor || self.ack_segment_bytes_max > ack_ceiling {
            return Err(StoreError::Config(format!("ack_segment_bytes_max must be between {floor} and {ack_ceiling}")));
        }
        let journal_floor = 1024;
        if self.journal_bytes != 0
            && (self.journal_bytes < journal_floor || self.journal_bytes > crate::journal::JOURNAL_BYTES_LIMIT)
        {
            return Err(StoreError::Config(format!(
                "journal_bytes must be 0 (no journal) or between {journal_floor} and {}",
                crate::journal::JOURNAL_BYTES_LIMIT
            )));
        }
        if self.journal_write_bytes_max > crate::journal::JOURNAL_WRITE_BYTES_LIMIT {
            return Err(StoreError::Config(format!(
                "journal_write_bytes_max must be at most {}",
                crate::journal::JOURNAL_WRITE_BYTES_LIMIT
            )));
        }
        if self.pending_ops_max == 0 || self.batch_bytes_max == 0 || self.queue_count_max == 0 {
            return Err(StoreError::Config(
                "pending_ops_max, batch_bytes_max and queue_count_max must be positive".into(),
            ));
        }
        Ok(())
    }
}
