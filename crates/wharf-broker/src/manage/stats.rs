//! [`BrokerStats`]: the broker's counters and measurements in one snapshot, for the metrics
//! endpoint: the model's message counters, what was opened and deleted, the store's counters and
//! histograms, memory and disk.

use super::Management;
use std::sync::atomic::Ordering;
use wharf_store::{HistogramSnapshot, StoreStats};

/// Everything the metrics endpoint reports beyond the object listings.
#[derive(Debug, Clone)]
pub struct BrokerStats {
    /// The model's counters (messages published, delivered, acknowledged, dead-lettered, …).
    pub counters: wharf_model::Counters,
    pub connections_opened: u64,
    pub channels_opened: u64,
    pub queues_declared: u64,
    pub queues_created: u64,
    pub queues_deleted: u64,
    /// The store's counters (batches, appends, syncs, segments deleted).
    pub store: StoreStats,
    /// Each `fdatasync` of a data file, in microseconds.
    pub sync_latency_us: HistogramSnapshot,
    /// Appends made durable per batch (group commit).
    pub batch_appends: HistogramSnapshot,
    /// Free space on the data directory's file system, if it can be read.
    pub disk_free_bytes: Option<u64>,
}

impl Management {
    /// The store's message segments now: how many files and their bytes (one `fstat` each).
    pub fn segment_usage(&self) -> wharf_store::SegmentUsage {
        self.core.store.segment_usage()
    }

    pub fn stats(&self) -> BrokerStats {
        let churn = &self.core.churn;
        BrokerStats {
            counters: self.core.counters(),
            connections_opened: churn.connections_opened.load(Ordering::Relaxed),
            channels_opened: churn.channels_opened.load(Ordering::Relaxed),
            queues_declared: churn.queues_declared.load(Ordering::Relaxed),
            queues_created: churn.queues_created.load(Ordering::Relaxed),
            queues_deleted: churn.queues_deleted.load(Ordering::Relaxed),
            store: self.core.store.stats(),
            sync_latency_us: self.core.store.sync_latency_us(),
            batch_appends: self.core.store.batch_appends(),
            disk_free_bytes: self.core.alarms.disk_free_bytes(),
        }
    }
}
