//! `tollgate bench`: an open-loop load generator for the edge Check API.
//!
//! Requests are scheduled by the clock at a fixed rate and sent without
//! waiting for earlier replies; latency is measured from each request's
//! scheduled time, not from when it was actually sent, so a slow server
//! cannot hide its stalls (no coordinated omission). A dedicated thread
//! paces the schedule because tokio's timer has millisecond granularity.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;
use tollgate_proto::v1 as pb;
use tollgate_proto::v1::edge_client::EdgeClient;
use tonic::transport::{Channel, Endpoint};

/// Upper bound on requests in flight per connection; past it a scheduled
/// request counts as an error instead of queueing without limit.
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 2048;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// gRPC address of the node.
    pub addr: String,
    /// A second node to measure in the same run (`--compare-addr`): the
    /// schedule alternates between the two in slices of `slice`, so both
    /// see the same machine, and the report compares them.
    pub compare_addr: Option<String>,
    /// Length of one slice of a comparison.
    pub slice: Duration,
    /// Offered load, requests per second.
    pub rps: u64,
    /// Measured duration.
    pub duration: Duration,
    /// Unmeasured warm-up before it.
    pub warmup: Duration,
    /// Number of HTTP/2 connections.
    pub concurrency: usize,
    /// The request to send.
    pub request: pb::CheckRequest,
}

/// The result, printed as one JSON object.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Offered rate.
    pub offered_rps: f64,
    /// Completed successful requests per second of the measured phase.
    pub achieved_rps: f64,
    /// Requests scheduled in the measured phase.
    pub requests: u64,
    /// Failed or shed requests.
    pub errors: u64,
    /// Latency quantiles from the scheduled time, microseconds.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Maximum.
    pub max_us: u64,
    /// Decisions by outcome, to spot a run that measured only denials.
    pub allowed: u64,
    /// Denied or throttled decisions.
    pub denied: u64,
}

/// The result of a comparison run: each node's report over its slices,
/// and how the first compares with the second.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    /// The node of `--addr` (or `--cluster-dir`), over its slices. Its
    /// `offered_rps` is the rate while it is loaded.
    pub target: BenchReport,
    /// The node of `--compare-addr`, over its slices.
    pub compare: BenchReport,
    /// Measured slices per node.
    pub slices: usize,
    /// Seconds per slice.
    pub slice_s: f64,
    /// target p50 / compare p50, over all their slices.
    pub p50_ratio: f64,
    /// target p99 / compare p99, over all their slices.
    pub p99_ratio: f64,
    /// The median over slice pairs of target p50 / compare p50.
    pub p50_paired_ratio_median: f64,
    /// The median over slice pairs of target p99 / compare p99; pairs are
    /// neighbours in time, so slow drift in the machine's load cancels.
    pub p99_paired_ratio_median: f64,
}

/// Normalises `host:port` into an `http://` URI.
pub fn endpoint_uri(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

async fn connect(addr: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(endpoint_uri(addr))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))
}

/// What one node's requests add up to.
struct Side {
    hist: Mutex<Histogram<u64>>,
    /// One histogram per measured slice (comparisons only).
    slices: Vec<Mutex<Histogram<u64>>>,
    errors: AtomicU64,
    ok: AtomicU64,
    allowed: AtomicU64,
    denied: AtomicU64,
}

impl Side {
    fn new(n_slices: usize) -> anyhow::Result<Self> {
        let hist = || Histogram::new_with_bounds(1, 60_000_000, 3);
        Ok(Self {
            hist: Mutex::new(hist()?),
            slices: (0..n_slices)
                .map(|_| hist().map(Mutex::new))
                .collect::<Result<_, _>>()?,
            errors: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            allowed: AtomicU64::new(0),
            denied: AtomicU64::new(0),
        })
    }

    fn report(&self, offered_rps: f64, n_measured: u64, elapsed: Duration) -> BenchReport {
        let hist = self.hist.lock();
        let ok = self.ok.load(Ordering::Relaxed);
        let failed = self.errors.load(Ordering::Relaxed);
        BenchReport {
            offered_rps,
            achieved_rps: ok as f64 / elapsed.as_secs_f64(),
            requests: n_measured,
            // Failed, shed, and still unanswered after the drain deadline.
            errors: n_measured.saturating_sub(ok).max(failed),
            p50_us: hist.value_at_quantile(0.50),
            p90_us: hist.value_at_quantile(0.90),
            p99_us: hist.value_at_quantile(0.99),
            p999_us: hist.value_at_quantile(0.999),
            max_us: hist.max(),
            allowed: self.allowed.load(Ordering::Relaxed),
            denied: self.denied.load(Ordering::Relaxed),
        }
    }
}

/// Which node a measured slice loads in a comparison: in every four
/// slices the order is target, compare, compare, target, so a load that
/// drifts steadily favours neither.
fn slice_side(slice: usize) -> usize {
    match slice % 4 {
        0 | 3 => 0,
        _ => 1,
    }
}

/// Slice pairs (target slice, compare slice) that neighbour each other.
fn slice_pairs(n_slices: usize) -> Vec<(usize, usize)> {
    (0..n_slices / 2)
        .map(|k| {
            if k % 2 == 0 {
                (2 * k, 2 * k + 1)
            } else {
                (2 * k + 1, 2 * k)
            }
        })
        .collect()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => f64::midpoint(xs[n / 2 - 1], xs[n / 2]),
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b.max(1) as f64
}

/// Three decimals are all a ratio of latencies on a shared machine means.
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

struct Run {
    sides: Vec<Side>,
    in_flight: AtomicUsize,
}

/// Runs the benchmark and returns its report.
pub async fn run(cfg: BenchConfig) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(
        cfg.compare_addr.is_none(),
        "a comparison run reports through run_compare"
    );
    let (run, n_measured, elapsed) = drive(&cfg, 0).await?;
    Ok(run.sides[0].report(cfg.rps as f64, n_measured, elapsed))
}

/// Runs a comparison of `addr` with `compare_addr`: the offered load goes
/// to one node at a time, alternating every `slice`.
pub async fn run_compare(cfg: BenchConfig) -> anyhow::Result<CompareReport> {
    anyhow::ensure!(
        cfg.compare_addr.is_some(),
        "a comparison needs a second node"
    );
    anyhow::ensure!(!cfg.slice.is_zero(), "--slice must be positive");
    let n_slices = (cfg.duration.as_secs_f64() / cfg.slice.as_secs_f64()).floor() as usize;
    anyhow::ensure!(
        n_slices >= 2,
        "--duration must hold at least two slices of --slice"
    );
    let (run, n_measured, elapsed) = drive(&cfg, n_slices).await?;
    // Each side had every other slice: half the requests, half the time.
    let per_side_n = n_measured / 2;
    let per_side_elapsed = elapsed / 2;
    let target = run.sides[0].report(cfg.rps as f64, per_side_n, per_side_elapsed);
    let compare = run.sides[1].report(cfg.rps as f64, per_side_n, per_side_elapsed);
    let quantile = |side: usize, slice: usize, q: f64| {
        run.sides[side].slices[slice].lock().value_at_quantile(q)
    };
    let paired = |q: f64| {
        round3(median(
            slice_pairs(n_slices)
                .into_iter()
                .map(|(t, c)| ratio(quantile(0, t, q), quantile(1, c, q)))
                .collect(),
        ))
    };
    Ok(CompareReport {
        p50_ratio: round3(ratio(target.p50_us, compare.p50_us)),
        p99_ratio: round3(ratio(target.p99_us, compare.p99_us)),
        p50_paired_ratio_median: paired(0.50),
        p99_paired_ratio_median: paired(0.99),
        target,
        compare,
        slices: n_slices / 2,
        slice_s: cfg.slice.as_secs_f64(),
    })
}

/// Sends the schedule and collects the replies. With `n_slices > 0` the
/// measured phase is cut into that many slices of `cfg.slice`, alternating
/// between `addr` (side 0) and `compare_addr` (side 1); the warm-up
/// alternates too. Returns the sides, the requests scheduled in the
/// measured phase and its length.
async fn drive(cfg: &BenchConfig, n_slices: usize) -> anyhow::Result<(Arc<Run>, u64, Duration)> {
    anyhow::ensure!(cfg.rps > 0, "--rps must be positive");
    anyhow::ensure!(cfg.concurrency > 0, "--concurrency must be positive");
    let mut addrs = vec![cfg.addr.as_str()];
    addrs.extend(cfg.compare_addr.as_deref());
    let mut clients = Vec::with_capacity(addrs.len());
    for addr in &addrs {
        let mut side = Vec::with_capacity(cfg.concurrency);
        for _ in 0..cfg.concurrency {
            side.push(EdgeClient::new(connect(addr).await?));
        }
        clients.push(side);
    }
    let run = Arc::new(Run {
        sides: (0..addrs.len())
            .map(|_| Side::new(n_slices))
            .collect::<anyhow::Result<_>>()?,
        in_flight: AtomicUsize::new(0),
    });
    let max_in_flight = MAX_IN_FLIGHT_PER_CONNECTION * cfg.concurrency;
    let period = Duration::from_secs_f64(1.0 / cfg.rps as f64);
    let n_warmup = (cfg.warmup.as_secs_f64() * cfg.rps as f64) as u64;
    let n_measured = if n_slices > 0 {
        (cfg.slice.as_secs_f64() * n_slices as f64 * cfg.rps as f64) as u64
    } else {
        (cfg.duration.as_secs_f64() * cfg.rps as f64) as u64
    };
    let per_slice = ((cfg.slice.as_secs_f64() * cfg.rps as f64) as u64).max(1);
    let handle = tokio::runtime::Handle::current();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<(Instant, Instant)>();
    let req = cfg.request.clone();
    let pacer_run = Arc::clone(&run);
    std::thread::spawn(move || {
        let run = pacer_run;
        let start = Instant::now();
        let measure_from = start + period * u32::try_from(n_warmup).unwrap_or(u32::MAX);
        let total = n_warmup + n_measured;
        let mut next = 0u64;
        while next < total {
            let now = Instant::now();
            // Send everything whose scheduled time has come.
            while next < total {
                let scheduled = start + period.mul_f64(next as f64);
                if scheduled > now {
                    break;
                }
                let measured = next >= n_warmup;
                // Which slice (comparisons) and so which node.
                let slice = if measured {
                    usize::try_from((next - n_warmup) / per_slice).unwrap_or(usize::MAX)
                } else {
                    usize::try_from(next / per_slice).unwrap_or(usize::MAX)
                };
                let side = if n_slices > 0 { slice_side(slice) } else { 0 };
                let side_clients = &clients[side];
                let mut client = side_clients[(next as usize) % side_clients.len()].clone();
                next += 1;
                if run.in_flight.load(Ordering::Relaxed) >= max_in_flight {
                    if measured {
                        run.sides[side].errors.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                run.in_flight.fetch_add(1, Ordering::Relaxed);
                let run = Arc::clone(&run);
                let req = req.clone();
                handle.spawn(async move {
                    let result = client.check(req).await;
                    let latency_us =
                        u64::try_from(scheduled.elapsed().as_micros()).unwrap_or(u64::MAX);
                    run.in_flight.fetch_sub(1, Ordering::Relaxed);
                    if !measured {
                        return;
                    }
                    let s = &run.sides[side];
                    match result {
                        Ok(resp) => {
                            s.ok.fetch_add(1, Ordering::Relaxed);
                            if resp.get_ref().decision == "allow" {
                                s.allowed.fetch_add(1, Ordering::Relaxed);
                            } else {
                                s.denied.fetch_add(1, Ordering::Relaxed);
                            }
                            s.hist.lock().saturating_record(latency_us.max(1));
                            if let Some(h) = s.slices.get(slice) {
                                h.lock().saturating_record(latency_us.max(1));
                            }
                        }
                        Err(_) => {
                            s.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            if next < total {
                let scheduled = start + period.mul_f64(next as f64);
                let wait = scheduled.saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
            }
        }
        let _ = done_tx.send((measure_from, Instant::now()));
    });
    let (measure_from, last_sent) = done_rx.await.context("pacer thread ended early")?;
    // Wait for the replies still in flight, bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    while run.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = last_sent
        .saturating_duration_since(measure_from)
        .max(Duration::from_millis(1));
    Ok((run, n_measured, elapsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_alternate_abba_and_pairs_are_neighbours_of_opposite_sides() {
        let sides: Vec<usize> = (0..8).map(slice_side).collect();
        assert_eq!(sides, [0, 1, 1, 0, 0, 1, 1, 0]);
        let pairs = slice_pairs(8);
        assert_eq!(pairs, [(0, 1), (3, 2), (4, 5), (7, 6)]);
        for (t, c) in slice_pairs(9) {
            assert_eq!(slice_side(t), 0);
            assert_eq!(slice_side(c), 1);
            assert_eq!(t.abs_diff(c), 1);
        }
    }

    #[test]
    fn median_of_odd_and_even_lengths() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
