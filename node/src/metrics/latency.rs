//! Check latency, recorded on the hot path into sharded hdrhistograms.
//!
//! A record locks one shard, picked once per thread, for the time of one
//! histogram increment; with more shards than worker threads the lock is
//! practically never contended. The sampler drains the shards into a
//! cumulative histogram (buckets, `_sum`, `_count`) and into a two-part
//! sliding window (quantiles over the last 30 to 60 seconds); a scrape
//! reads those plus whatever the shards hold since the last drain.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use parking_lot::Mutex;

/// Largest latency recorded exactly (µs); slower ones count as this.
pub const MAX_LATENCY_US: u64 = 60_000_000;

/// Significant figures kept: 1% resolution, about 20 KiB per histogram.
const SIGNIFICANT_FIGURES: u8 = 2;

/// Most shards, whatever the core count.
const MAX_SHARDS: usize = 64;

/// How long one half of the quantile window lasts (ms): quantiles cover the
/// last 30 to 60 seconds.
pub const LATENCY_WINDOW_MS: u64 = 30_000;

/// Histogram bucket upper bounds (seconds) for the `_bucket` series.
pub const BUCKETS_SECONDS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

/// Quantiles the summary reports.
pub const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];

fn empty() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; failing here is a
    // programming error.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, SIGNIFICANT_FIGURES)
        .expect("valid histogram bounds")
}

thread_local! {
    static SHARD_IDX: Cell<usize> = const { Cell::new(usize::MAX) };
}
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

/// Cache-line aligned, so that two threads recording into neighbouring
/// shards do not share a line.
#[repr(align(128))]
struct Shard(Mutex<Histogram<u64>>);

struct Drained {
    /// Everything since start.
    total: Histogram<u64>,
    /// The window half being filled, and since when (ms on the sampler's
    /// clock).
    current: Histogram<u64>,
    current_since_ms: u64,
    /// The half before it.
    previous: Histogram<u64>,
    /// A drained shard is swapped with this, so a drain allocates nothing.
    spare: Histogram<u64>,
}

/// The latency recorder. See the module documentation.
pub struct LatencyHistogram {
    shards: Box<[Shard]>,
    drained: Mutex<Drained>,
    sum_ns: AtomicU64,
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("shards", &self.shards.len())
            .finish()
    }
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

/// What a scrape reads.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencySnapshot {
    /// Records since start.
    pub count: u64,
    /// Their sum (seconds).
    pub sum_seconds: f64,
    /// Records at or below each of [`BUCKETS_SECONDS`], cumulative.
    pub buckets: [u64; BUCKETS_SECONDS.len()],
    /// Each of [`QUANTILES`] over the window (seconds); NaN when the window
    /// is empty.
    pub quantiles: [f64; QUANTILES.len()],
    /// Records in the window.
    pub window_count: u64,
}

impl LatencyHistogram {
    /// Shards for twice the cores (a power of two), at most [`MAX_SHARDS`].
    pub fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        let n = (cores * 2).next_power_of_two().min(MAX_SHARDS);
        Self {
            shards: (0..n).map(|_| Shard(Mutex::new(empty()))).collect(),
            drained: Mutex::new(Drained {
                total: empty(),
                current: empty(),
                current_since_ms: 0,
                previous: empty(),
                spare: empty(),
            }),
            sum_ns: AtomicU64::new(0),
        }
    }

    fn shard(&self) -> &Shard {
        let idx = SHARD_IDX.with(|c| {
            let mut i = c.get();
            if i == usize::MAX {
                i = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
                c.set(i);
            }
            i
        });
        &self.shards[idx % self.shards.len()]
    }

    /// Records one latency.
    pub fn record(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, MAX_LATENCY_US);
        self.shard().0.lock().saturating_record(us);
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Moves what the shards recorded into the cumulative histogram and the
    /// window, and turns the window over every [`LATENCY_WINDOW_MS`].
    /// `now_ms` is any monotonic clock in ms (the sampler's).
    pub fn drain(&self, now_ms: u64) {
        let mut d = self.drained.lock();
        let d = &mut *d;
        if now_ms.saturating_sub(d.current_since_ms) >= LATENCY_WINDOW_MS {
            std::mem::swap(&mut d.previous, &mut d.current);
            d.current.reset();
            d.current_since_ms = now_ms;
        }
        for shard in self.shards.iter() {
            std::mem::swap(&mut *shard.0.lock(), &mut d.spare);
            // Same bounds everywhere, so adding cannot fail.
            let _ = d.total.add(&d.spare);
            let _ = d.current.add(&d.spare);
            d.spare.reset();
        }
    }

    /// Counts, buckets and window quantiles as of now.
    pub fn snapshot(&self) -> LatencySnapshot {
        let (mut total, mut window) = {
            let d = self.drained.lock();
            let mut window = d.current.clone();
            let _ = window.add(&d.previous);
            (d.total.clone(), window)
        };
        for shard in self.shards.iter() {
            let s = shard.0.lock();
            let _ = total.add(&*s);
            let _ = window.add(&*s);
        }
        let mut buckets = [0u64; BUCKETS_SECONDS.len()];
        for (b, le) in buckets.iter_mut().zip(BUCKETS_SECONDS) {
            let le_us = (le * 1e6).round() as u64;
            *b = total.count_between(0, le_us);
        }
        let mut quantiles = [f64::NAN; QUANTILES.len()];
        if !window.is_empty() {
            for (q, at) in quantiles.iter_mut().zip(QUANTILES) {
                *q = window.value_at_quantile(at) as f64 / 1e6;
            }
        }
        LatencySnapshot {
            count: total.len(),
            sum_seconds: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            buckets,
            quantiles,
            window_count: window.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_reach_counts_buckets_and_quantiles_across_drains() {
        let h = LatencyHistogram::new();
        for us in [40u64, 80, 300, 300, 2_000] {
            h.record(Duration::from_micros(us));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 5);
        assert_eq!(s.window_count, 5);
        assert_eq!(&s.buckets[..5], &[1, 2, 2, 4, 4]);
        assert_eq!(s.buckets[BUCKETS_SECONDS.len() - 1], 5);
        assert!((s.sum_seconds - 0.00272).abs() < 1e-9, "{}", s.sum_seconds);
        assert!(
            (s.quantiles[0] - 0.0003).abs() < 0.00001,
            "{:?}",
            s.quantiles
        );

        // Draining moves nothing out of sight; two window turns age the
        // records out of the quantiles but not out of the counts.
        h.drain(LATENCY_WINDOW_MS);
        assert_eq!(h.snapshot(), s);
        h.drain(2 * LATENCY_WINDOW_MS);
        let aged = h.snapshot();
        assert_eq!(aged.window_count, 5);
        h.drain(3 * LATENCY_WINDOW_MS);
        let aged = h.snapshot();
        assert_eq!((aged.count, aged.window_count), (5, 0));
        assert!(aged.quantiles.iter().all(|q| q.is_nan()));
    }

    #[test]
    fn records_from_many_threads_all_count() {
        let h = std::sync::Arc::new(LatencyHistogram::new());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let h = std::sync::Arc::clone(&h);
                std::thread::spawn(move || {
                    for _ in 0..1_000 {
                        h.record(Duration::from_micros(100));
                    }
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().is_ok());
        }
        assert_eq!(h.snapshot().count, 8_000);
    }
}
