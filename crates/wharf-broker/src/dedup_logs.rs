//! De-duplication key logs: the store logs that keep a durable queue's or exchange's seen keys
//! across restarts. [`DedupLogs`] tracks each log's window and its records in the order they were
//! written, so records are removed once their window has passed (or the log is over its bound),
//! and key logs stay proportional to the window.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// A durable queue or exchange gets at most this many key records before the oldest are removed
/// early (the in-memory index is bounded the same way).
const DEDUP_LOG_RECORDS_MAX: usize = wharf_model::dedup::DEDUP_KEYS_MAX;

/// Every de-duplication key log, by store log id.
#[derive(Debug, Default)]
pub(crate) struct DedupLogs {
    logs: Mutex<HashMap<u64, DedupLog>>,
}

/// One de-duplication key log: the keys' window and (first seen, seq) of its records, oldest
/// first.
#[derive(Debug, Default)]
struct DedupLog {
    ttl_ms: u64,
    records: VecDeque<(u64, u64)>,
}

impl DedupLogs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, DedupLog>> {
        self.logs.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts tracking a log with the records recovery found, as (first seen, seq), any order.
    pub fn restore(&self, log: u64, ttl_ms: u64, mut records: VecDeque<(u64, u64)>) {
        records.make_contiguous().sort_unstable();
        self.lock().insert(log, DedupLog { ttl_ms, records });
    }

    /// Starts tracking a new, empty log.
    pub fn register(&self, log: u64, ttl_ms: u64) {
        self.restore(log, ttl_ms, VecDeque::new());
    }

    /// Stops tracking a log (its queue or exchange was deleted).
    pub fn forget(&self, log: u64) {
        self.lock().remove(&log);
    }

    /// A key record was appended to `log`.
    pub fn record(&self, log: u64, seen_ms: u64, seq: u64) {
        if let Some(dedup_log) = self.lock().get_mut(&log) {
            dedup_log.records.push_back((seen_ms, seq));
        }
    }

    /// Takes the records whose window has passed at `now_ms` (and the oldest beyond the bound),
    /// as (log, seq), for removal from the store.
    pub fn take_expired(&self, now_ms: u64) -> Vec<(u64, u64)> {
        let mut expired = Vec::new();
        for (log, dedup_log) in self.lock().iter_mut() {
            while let Some(&(seen_ms, seq)) = dedup_log.records.front() {
                if seen_ms.saturating_add(dedup_log.ttl_ms) > now_ms && dedup_log.records.len() <= DEDUP_LOG_RECORDS_MAX
                {
                    break;
                }
                dedup_log.records.pop_front();
                expired.push((*log, seq));
            }
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_expire_when_their_window_has_passed_oldest_first() {
        let logs = DedupLogs::default();
        logs.restore(7, 1_000, VecDeque::from([(500, 2), (100, 1)]));
        logs.record(7, 900, 3);
        logs.record(8, 0, 9); // an untracked log: ignored
        assert!(logs.take_expired(1_099).is_empty());
        assert_eq!(logs.take_expired(1_100), vec![(7, 1)]);
        assert_eq!(logs.take_expired(1_900), vec![(7, 2), (7, 3)]);
        logs.forget(7);
        logs.record(7, 2_000, 4);
        assert!(logs.take_expired(u64::MAX).is_empty(), "a forgotten log is not tracked");
    }
}
