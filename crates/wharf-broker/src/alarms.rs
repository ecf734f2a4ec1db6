//! Memory and disk alarms, as RabbitMQ raises them: when the broker holds more than
//! `memory_high_watermark_bytes`, or the data directory's file system has less than
//! `disk_free_limit_bytes` free, publishing connections are blocked until the alarm clears.
//!
//! This module owns the alarm state and the memory account. What the broker holds is counted,
//! not read off the process: the body bytes queued in memory (transient messages, and persistent
//! ones not paged out), unfinished message bodies and transaction buffers (each connection
//! reports its own, [`SessionMemory`]). Deliveries on their way to sockets are bounded per
//! connection apart from this. A count goes down as
//! soon as memory is given back, where a process's resident size often does not, so an alarm
//! clears when the cause is gone.
//!
//! Blocking itself is the connection's (`connection.rs`): a connection that publishes while an
//! alarm is raised is sent `connection.blocked` (if it announced the capability) and is not read
//! from until the alarm clears, then gets `connection.unblocked`. Connections that only consume
//! are never blocked, so consumers keep draining.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::watch;

/// Which alarms are raised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlarmState {
    /// The broker holds more than its memory high watermark.
    pub memory: bool,
    /// The data directory's file system has less free space than the disk free limit.
    pub disk: bool,
}

impl AlarmState {
    /// Whether any alarm is raised.
    pub fn any(self) -> bool {
        self.memory || self.disk
    }

    /// The reason `connection.blocked` gives, in RabbitMQ's words (`rabbit_reader`).
    pub fn reason(self) -> &'static str {
        match (self.memory, self.disk) {
            (true, true) => "low on memory & disk",
            (true, false) => "low on memory",
            (false, true) => "low on disk",
            (false, false) => "",
        }
    }
}

/// How much free space a file system has, for the disk alarm.
pub trait DiskSpace: Send + Sync + std::fmt::Debug {
    /// Bytes free for the broker on the file system holding `path` (`None` if unknown).
    fn free_bytes(&self, path: &Path) -> Option<u64>;
}

/// The real file system's free space (`statvfs`: blocks available to unprivileged users).
#[derive(Debug, Default)]
pub struct RealDiskSpace;

impl DiskSpace for RealDiskSpace {
    fn free_bytes(&self, path: &Path) -> Option<u64> {
        let stat = rustix::fs::statvfs(path).ok()?;
        Some(stat.f_bavail.saturating_mul(stat.f_frsize))
    }
}

/// A free-space figure a test sets (for the disk alarm without filling a disk).
#[derive(Debug, Default)]
pub struct FixedDiskSpace {
    free_bytes: AtomicU64,
}

impl FixedDiskSpace {
    /// Reports `free_bytes` until set otherwise.
    pub fn new(free_bytes: u64) -> Arc<FixedDiskSpace> {
        Arc::new(FixedDiskSpace { free_bytes: AtomicU64::new(free_bytes) })
    }

    /// Changes the figure reported.
    pub fn set(&self, free_bytes: u64) {
        self.free_bytes.store(free_bytes, Ordering::Relaxed);
    }
}

impl DiskSpace for FixedDiskSpace {
    fn free_bytes(&self, _path: &Path) -> Option<u64> {
        Some(self.free_bytes.load(Ordering::Relaxed))
    }
}

/// Default for the memory high watermark: 40% of the machine's memory, as RabbitMQ's
/// `vm_memory_high_watermark` (4 GiB if the machine's memory cannot be read).
pub fn default_memory_high_watermark_bytes() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|meminfo| {
        let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib.saturating_mul(1024))
    });
    total.map_or(4 << 30, |total| total / 10 * 4)
}

/// Default for the disk free limit: RabbitMQ's 50 MB plus room for the largest message the broker
/// accepts, so a publish accepted while the alarm is clear still fits.
pub fn default_disk_free_limit_bytes(message_bytes_max: u64) -> u64 {
    message_bytes_max.saturating_add(50_000_000)
}

/// The alarm state and the connections' share of the memory account.
#[derive(Debug)]
pub(crate) struct Alarms {
    memory_high_watermark_bytes: u64,
    disk_free_limit_bytes: u64,
    disk_space: Arc<dyn DiskSpace>,
    data_dir: PathBuf,
    /// Unfinished bodies and transaction buffers, summed over every connection.
    sessions_bytes: Arc<AtomicU64>,
    state: watch::Sender<AlarmState>,
}

impl Alarms {
    pub fn new(
        memory_high_watermark_bytes: u64,
        disk_free_limit_bytes: u64,
        disk_space: Arc<dyn DiskSpace>,
        data_dir: PathBuf,
    ) -> Alarms {
        Alarms {
            memory_high_watermark_bytes,
            disk_free_limit_bytes,
            disk_space,
            data_dir,
            sessions_bytes: Arc::default(),
            state: watch::channel(AlarmState::default()).0,
        }
    }

    /// The data directory's file system's free space now, if it can be read.
    pub fn disk_free_bytes(&self) -> Option<u64> {
        self.disk_space.free_bytes(&self.data_dir)
    }

    /// The alarms raised now.
    pub fn state(&self) -> AlarmState {
        *self.state.borrow()
    }

    /// Follows the alarm state (a blocked connection waits on it).
    pub fn subscribe(&self) -> watch::Receiver<AlarmState> {
        self.state.subscribe()
    }

    /// A connection's share of the account.
    pub fn session_memory(&self) -> SessionMemory {
        SessionMemory { total: Arc::clone(&self.sessions_bytes), counted: 0 }
    }

    /// Raises or clears the alarms for `held_bytes` (what the model holds in memory) plus what
    /// the connections hold, and the data directory's free space now. Returns the new state.
    pub fn check(&self, held_bytes: u64) -> AlarmState {
        let memory_bytes = held_bytes.saturating_add(self.sessions_bytes.load(Ordering::Relaxed));
        let free_bytes = self.disk_space.free_bytes(&self.data_dir);
        let state = AlarmState {
            memory: memory_bytes > self.memory_high_watermark_bytes,
            disk: free_bytes.is_some_and(|free| free < self.disk_free_limit_bytes),
        };
        let before = self.state.send_replace(state);
        if state.memory != before.memory {
            if state.memory {
                tracing::warn!(
                    memory_bytes,
                    watermark_bytes = self.memory_high_watermark_bytes,
                    "memory alarm raised: publishers are blocked"
                );
            } else {
                tracing::info!(
                    memory_bytes,
                    watermark_bytes = self.memory_high_watermark_bytes,
                    "memory alarm cleared"
                );
            }
        }
        if state.disk != before.disk {
            if state.disk {
                tracing::warn!(
                    ?free_bytes,
                    limit_bytes = self.disk_free_limit_bytes,
                    "disk alarm raised: publishers are blocked"
                );
            } else {
                tracing::info!(?free_bytes, limit_bytes = self.disk_free_limit_bytes, "disk alarm cleared");
            }
        }
        state
    }
}

/// One connection's unfinished bodies and transaction buffers in the memory account; dropping
/// it takes them out.
#[derive(Debug)]
pub(crate) struct SessionMemory {
    total: Arc<AtomicU64>,
    counted: u64,
}

impl SessionMemory {
    /// The connection now holds `bytes`.
    pub fn set(&mut self, bytes: u64) {
        if bytes > self.counted {
            self.total.fetch_add(bytes - self.counted, Ordering::Relaxed);
        } else if bytes < self.counted {
            self.total.fetch_sub(self.counted - bytes, Ordering::Relaxed);
        }
        self.counted = bytes;
    }
}

impl Drop for SessionMemory {
    fn drop(&mut self) {
        self.set(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alarms_follow_the_account_and_the_free_space_both_ways() {
        let disk = FixedDiskSpace::new(1_000);
        let alarms = Alarms::new(100, 500, disk.clone(), PathBuf::from("/data"));
        assert_eq!(alarms.check(100), AlarmState::default());
        let mut session = alarms.session_memory();
        session.set(1);
        assert_eq!(alarms.check(100), AlarmState { memory: true, disk: false });
        assert_eq!(alarms.state().reason(), "low on memory");
        drop(session);
        assert!(!alarms.check(100).any(), "a connection's bytes leave with it");
        disk.set(499);
        assert_eq!(alarms.check(0).reason(), "low on disk");
        disk.set(500);
        assert!(!alarms.check(0).any());
    }

    #[test]
    fn defaults_follow_rabbitmq() {
        assert_eq!(default_disk_free_limit_bytes(128 << 20), (128 << 20) + 50_000_000);
        assert!(default_memory_high_watermark_bytes() > 0);
    }
}
