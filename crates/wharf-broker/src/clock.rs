//! The clock seam: where the broker's time comes from. Message TTLs, queue expiry, leases,
//! retry backoffs, delayed messages and de-duplication windows are all measured against
//! [`Clock::now_ms`]. [`SystemClock`] reads the system's time; [`ManualClock`] moves only when
//! told, so tests cross a window by advancing it instead of sleeping through it, and prove that
//! nothing happens before a deadline by stopping just short of it.
//!
//! Only the semantics of messages follow this clock. Socket-level timing (heartbeats, the
//! handshake timeout, shutdown's grace period) stays on tokio's timer: it concerns peers, not
//! stored messages.

use std::sync::atomic::{AtomicU64, Ordering};

/// A source of wall-clock time in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A clock that moves only when told (tests). After moving it, `Broker::fire_due_timers` runs
/// whatever became due, so a test knows when the broker has acted on the new time.
#[derive(Debug)]
pub struct ManualClock {
    now_ms: AtomicU64,
}

impl ManualClock {
    /// A clock standing at `start_ms`.
    pub fn new(start_ms: u64) -> Self {
        ManualClock { now_ms: AtomicU64::new(start_ms) }
    }

    /// A clock standing at the system's current time (so stored timestamps look ordinary).
    pub fn starting_now() -> Self {
        ManualClock::new(SystemClock.now_ms())
    }

    /// Moves the clock forward by `duration_ms`.
    pub fn advance(&self, duration_ms: u64) {
        self.now_ms.fetch_add(duration_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::new(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        assert_eq!(clock.now_ms(), 1_000);
        clock.advance(250);
        assert_eq!(clock.now_ms(), 1_250);
    }

    #[test]
    fn the_system_clock_reads_the_system_time() {
        let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let read = SystemClock.now_ms();
        let after = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        assert!(before <= read && read <= after);
    }
}
