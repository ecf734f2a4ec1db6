//! Metrics and health.
//!
//! Metrics go through the `metrics` facade: the application installs the recorder it likes
//! (`metrics-exporter-prometheus` for a `/metrics` page, say); without one they cost next to
//! nothing. The names:
//!
//! | metric | kind | labels | what |
//! |---|---|---|---|
//! | `wharf_outbox_unsent_rows` | gauge | `table` | rows pending (not yet confirmed by the broker) |
//! | `wharf_outbox_failed_rows` | gauge | `table` | rows marked failed, waiting for `retry_failed` |
//! | `wharf_outbox_oldest_unsent_age_seconds` | gauge | `table` | how long the oldest pending row has waited |
//! | `wharf_relay_published_total` | counter | | rows confirmed and marked sent |
//! | `wharf_relay_failed_total` | counter | | rows marked failed |
//! | `wharf_relay_lag_seconds` | histogram | | from a row's write to the broker's confirm |
//! | `wharf_handler_outcomes_total` | counter | `queue`, `outcome` (`ack`, `retry`, `reject`) | handler results |
//! | `wharf_inbox_duplicates_total` | counter | `consumer` | redeliveries the inbox absorbed |
//!
//! A [`Health`] handle reports whether a relay or a consumer is working: up after each round or
//! connection that went through, down with the error after one that failed.

use crate::consumer::Outcome;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

/// What an outbox holds, for the gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Rows pending.
    pub unsent: i64,
    /// Rows failed.
    pub failed: i64,
    /// When the oldest pending row was written (ms since the Unix epoch), if any is pending.
    pub oldest_unsent_created_at_ms: Option<i64>,
}

pub(crate) fn outbox_stats(table: &str, stats: OutboxStats, now_ms: i64) {
    let table = table.to_owned();
    metrics::gauge!("wharf_outbox_unsent_rows", "table" => table.clone()).set(stats.unsent as f64);
    metrics::gauge!("wharf_outbox_failed_rows", "table" => table.clone()).set(stats.failed as f64);
    let age_s = stats.oldest_unsent_created_at_ms.map_or(0.0, |created| (now_ms - created).max(0) as f64 / 1000.0);
    metrics::gauge!("wharf_outbox_oldest_unsent_age_seconds", "table" => table).set(age_s);
}

pub(crate) fn relayed(created_at_ms: &[i64], failed: usize, now_ms: i64) {
    metrics::counter!("wharf_relay_published_total").increment(created_at_ms.len() as u64);
    metrics::counter!("wharf_relay_failed_total").increment(failed as u64);
    let lag = metrics::histogram!("wharf_relay_lag_seconds");
    for created in created_at_ms {
        lag.record((now_ms - created).max(0) as f64 / 1000.0);
    }
}

pub(crate) fn handled(queue: &str, outcome: &Outcome) {
    metrics::counter!("wharf_handler_outcomes_total", "queue" => queue.to_owned(), "outcome" => outcome.name())
        .increment(1);
}

pub(crate) fn duplicate(consumer: &str) {
    metrics::counter!("wharf_inbox_duplicates_total", "consumer" => consumer.to_owned()).increment(1);
}

/// Whether a relay or a consumer is working. Cheap to clone; every clone sees the same state.
#[derive(Debug, Clone, Default)]
pub struct Health {
    state: Arc<HealthState>,
}

#[derive(Debug, Default)]
struct HealthState {
    up: AtomicBool,
    /// When it last went through (ms since the Unix epoch; 0: never).
    progress_ms: AtomicI64,
    error: Mutex<Option<String>>,
}

impl Health {
    /// A handle that reports down until the first success.
    pub fn new() -> Health {
        Health::default()
    }

    /// True after a success with no failure since.
    pub fn is_up(&self) -> bool {
        self.state.up.load(Ordering::Acquire)
    }

    /// When it last went through (ms since the Unix epoch).
    pub fn last_progress_ms(&self) -> Option<i64> {
        Some(self.state.progress_ms.load(Ordering::Acquire)).filter(|ms| *ms > 0)
    }

    /// The error of the last failure, if the last thing that happened was one.
    pub fn last_error(&self) -> Option<String> {
        self.state.error.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    pub(crate) fn up(&self) {
        self.state.progress_ms.store(crate::outbox::now_ms(), Ordering::Release);
        *self.state.error.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
        self.state.up.store(true, Ordering::Release);
    }

    pub(crate) fn down(&self, error: String) {
        self.state.up.store(false, Ordering::Release);
        *self.state.error.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_the_last_outcome() {
        let health = Health::new();
        assert!(!health.is_up() && health.last_progress_ms().is_none());
        let seen_by_another = health.clone();
        health.up();
        assert!(seen_by_another.is_up() && seen_by_another.last_progress_ms().is_some());
        health.down("broker unreachable".into());
        assert!(!seen_by_another.is_up());
        assert_eq!(seen_by_another.last_error().as_deref(), Some("broker unreachable"));
    }
}
