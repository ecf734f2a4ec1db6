//! [`Histogram`]: counts of observations in fixed buckets, filled by the writer thread with
//! relaxed atomic adds (no lock on its path) and read by anyone as a [`HistogramSnapshot`], in
//! the shape Prometheus histograms have (cumulative bucket counts, a sum, a count). The store
//! keeps two: the latency of each `fdatasync` and the number of appends each batch made durable.

use std::sync::atomic::{AtomicU64, Ordering};

/// `fdatasync` latency bucket bounds, in microseconds: 50 µs (a fast NVMe) to 1 s (a disk in
/// trouble).
pub const SYNC_LATENCY_BOUNDS_US: [u64; 14] =
    [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000];

/// Appends-per-batch bucket bounds: one append alone up to the largest batches group commit
/// forms.
pub const BATCH_APPENDS_BOUNDS: [u64; 13] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1_024, 2_048, 4_096];

/// Observations counted into buckets with fixed upper bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// One count per bound, and one for the values above the last.
    buckets: Vec<AtomicU64>,
    sum: AtomicU64,
    count: AtomicU64,
}

/// A histogram as read at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// `(upper bound, observations at or below it)`, cumulative, ascending.
    pub cumulative: Vec<(u64, u64)>,
    /// The sum of every observation.
    pub sum: u64,
    /// Observations in all (the `+Inf` bucket).
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Counts one observation.
    pub fn observe(&self, value: u64) {
        let index = self.bounds.partition_point(|bound| *bound < value);
        if let Some(bucket) = self.buckets.get(index) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.sum.fetch_add(value, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut running = 0;
        let cumulative = self
            .bounds
            .iter()
            .zip(&self.buckets)
            .map(|(bound, bucket)| {
                running += bucket.load(Ordering::Relaxed);
                (*bound, running)
            })
            .collect();
        // The count is read last and never below the buckets' sum, so the `+Inf` bucket is
        // never smaller than the last bounded one, even while the writer observes.
        let sum = self.sum.load(Ordering::Relaxed);
        let count = self.count.load(Ordering::Relaxed).max(running);
        HistogramSnapshot { cumulative, sum, count }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let histogram = Histogram::new(&[1, 10, 100]);
        for value in [0, 1, 2, 10, 11, 100, 1000] {
            histogram.observe(value);
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.cumulative, vec![(1, 2), (10, 4), (100, 6)]);
        assert_eq!((snapshot.count, snapshot.sum), (7, 1124));
    }
}
