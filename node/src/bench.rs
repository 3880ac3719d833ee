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

struct Shared {
    hist: Mutex<Histogram<u64>>,
    errors: AtomicU64,
    ok: AtomicU64,
    allowed: AtomicU64,
    denied: AtomicU64,
    in_flight: AtomicUsize,
}

/// Runs the benchmark and returns its report.
pub async fn run(cfg: BenchConfig) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(cfg.rps > 0, "--rps must be positive");
    anyhow::ensure!(cfg.concurrency > 0, "--concurrency must be positive");
    let mut clients = Vec::with_capacity(cfg.concurrency);
    for _ in 0..cfg.concurrency {
        clients.push(EdgeClient::new(connect(&cfg.addr).await?));
    }
    let shared = Arc::new(Shared {
        hist: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        errors: AtomicU64::new(0),
        ok: AtomicU64::new(0),
        allowed: AtomicU64::new(0),
        denied: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
    });
    let max_in_flight = MAX_IN_FLIGHT_PER_CONNECTION * cfg.concurrency;
    let period = Duration::from_secs_f64(1.0 / cfg.rps as f64);
    let n_warmup = (cfg.warmup.as_secs_f64() * cfg.rps as f64) as u64;
    let n_measured = (cfg.duration.as_secs_f64() * cfg.rps as f64) as u64;
    let handle = tokio::runtime::Handle::current();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<(Instant, Instant)>();
    let req = cfg.request.clone();
    let pacer_shared = Arc::clone(&shared);
    std::thread::spawn(move || {
        let shared = pacer_shared;
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
                let mut client = clients[(next as usize) % clients.len()].clone();
                next += 1;
                if shared.in_flight.load(Ordering::Relaxed) >= max_in_flight {
                    if measured {
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                shared.in_flight.fetch_add(1, Ordering::Relaxed);
                let shared = Arc::clone(&shared);
                let req = req.clone();
                handle.spawn(async move {
                    let result = client.check(req).await;
                    let latency_us =
                        u64::try_from(scheduled.elapsed().as_micros()).unwrap_or(u64::MAX);
                    shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                    if !measured {
                        return;
                    }
                    match result {
                        Ok(resp) => {
                            shared.ok.fetch_add(1, Ordering::Relaxed);
                            if resp.get_ref().decision == "allow" {
                                shared.allowed.fetch_add(1, Ordering::Relaxed);
                            } else {
                                shared.denied.fetch_add(1, Ordering::Relaxed);
                            }
                            shared.hist.lock().saturating_record(latency_us.max(1));
                        }
                        Err(_) => {
                            shared.errors.fetch_add(1, Ordering::Relaxed);
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
    while shared.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = last_sent
        .saturating_duration_since(measure_from)
        .max(Duration::from_millis(1));
    let hist = shared.hist.lock();
    let ok = shared.ok.load(Ordering::Relaxed);
    let failed = shared.errors.load(Ordering::Relaxed);
    Ok(BenchReport {
        offered_rps: cfg.rps as f64,
        achieved_rps: ok as f64 / elapsed.as_secs_f64(),
        requests: n_measured,
        // Failed, shed, and still unanswered after the drain deadline.
        errors: n_measured.saturating_sub(ok).max(failed),
        p50_us: hist.value_at_quantile(0.50),
        p90_us: hist.value_at_quantile(0.90),
        p99_us: hist.value_at_quantile(0.99),
        p999_us: hist.value_at_quantile(0.999),
        max_us: hist.max(),
        allowed: shared.allowed.load(Ordering::Relaxed),
        denied: shared.denied.load(Ordering::Relaxed),
    })
}
