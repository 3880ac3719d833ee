//! Many seeds in parallel: one line per failure with the command that
//! replays it, and a JSON summary.
//!
//! This module owns seed ranges, the assignment of seeds to scenarios, the
//! worker threads (each seed runs on one thread, start to end, because a
//! simulated cluster is single-threaded by design), and the summary. It
//! must not judge runs itself: `check` does.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use serde::Serialize;

use crate::check::{self, CHECKERS, Figures, Verdict};
use crate::run::{self, Plant, RunOptions};
use crate::scenario::Scenario;

/// The outcome of one seed.
#[derive(Clone, Debug, Serialize)]
pub struct SeedResult {
    /// The seed.
    pub seed: u64,
    /// The scenario.
    pub scenario: String,
    /// Every checker's verdict (empty when the run itself failed).
    pub verdicts: Vec<Verdict>,
    /// Figures for the summary.
    pub figures: Figures,
    /// Hash of the run's trace.
    pub trace_hash: u64,
    /// The run could not complete (harness error or panic).
    pub error: Option<String>,
    /// Client calls recorded.
    pub calls: usize,
}

impl SeedResult {
    /// Whether every checker passed and the run completed.
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.verdicts.iter().all(|v| v.ok)
    }
}

/// The command that replays one seed.
pub fn reproduce_line(seed: u64, scenario: &str, plant: Option<Plant>) -> String {
    match plant {
        None => {
            format!("REPRODUCE: cargo run -p tollgate-sim -- --seed {seed} --scenario {scenario}")
        }
        Some(p) => format!(
            "REPRODUCE: cargo run -p tollgate-sim --features planted-bugs -- --seed {seed} --scenario {scenario} --plant {}",
            p.name()
        ),
    }
}

/// Runs one seed and checks it.
pub fn run_seed(scenario: &Scenario, seed: u64, plant: Option<Plant>) -> SeedResult {
    let opts = RunOptions { seed, plant };
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run::run(scenario, &opts)));
    match outcome {
        Ok(Ok(r)) => {
            let (verdicts, figures) = check::check(&r);
            SeedResult {
                seed,
                scenario: scenario.name.clone(),
                verdicts,
                figures,
                trace_hash: r.history.trace_hash(),
                error: None,
                calls: r.history.calls.len(),
            }
        }
        Ok(Err(e)) => failed(scenario, seed, format!("{e:#}")),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_else(|| "panic".into());
            failed(scenario, seed, format!("panicked: {what}"))
        }
    }
}

fn failed(scenario: &Scenario, seed: u64, error: String) -> SeedResult {
    SeedResult {
        seed,
        scenario: scenario.name.clone(),
        verdicts: Vec::new(),
        figures: Figures::default(),
        trace_hash: 0,
        error: Some(error),
        calls: 0,
    }
}

/// Per-checker counts.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckerCounts {
    /// Seeds where it held.
    pub pass: u64,
    /// Seeds where it did not.
    pub fail: u64,
}

/// The summary of many seeds.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Seeds run.
    pub seeds_run: u64,
    /// Seeds with every checker passing.
    pub seeds_ok: u64,
    /// Violations (failed verdicts) plus runs that could not complete.
    pub violations: u64,
    /// Seeds per scenario.
    pub scenarios: BTreeMap<String, u64>,
    /// Pass and fail counts per checker.
    pub checkers: BTreeMap<String, CheckerCounts>,
    /// Convergence after the last heal: p50, p99 and max (ms).
    pub convergence_ms: Percentiles,
    /// Largest soft-quota overshoot seen (units past the limit).
    pub max_soft_overshoot: u64,
    /// Largest number of strict units allowed in one window, and the limit.
    pub max_strict_allowed: u64,
    /// Client calls recorded, all seeds.
    pub calls: u64,
    /// Wall-clock seconds.
    pub wall_s: f64,
}

/// Percentiles of a sample.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: Option<u64>,
    /// 99th percentile.
    pub p99: Option<u64>,
    /// Largest.
    pub max: Option<u64>,
}

fn percentiles(mut xs: Vec<u64>) -> Percentiles {
    xs.sort_unstable();
    let at = |q: f64| -> Option<u64> {
        if xs.is_empty() {
            return None;
        }
        let i = ((xs.len() as f64 - 1.0) * q).round() as usize;
        xs.get(i).copied()
    };
    Percentiles {
        n: xs.len(),
        p50: at(0.5),
        p99: at(0.99),
        max: xs.last().copied(),
    }
}

/// Summarises results.
pub fn summarize(results: &[SeedResult], wall_s: f64) -> Summary {
    let mut checkers: BTreeMap<String, CheckerCounts> = CHECKERS
        .iter()
        .map(|c| ((*c).to_string(), CheckerCounts::default()))
        .collect();
    let mut scenarios: BTreeMap<String, u64> = BTreeMap::new();
    let mut violations = 0;
    let mut conv = Vec::new();
    let mut overshoot = 0;
    let mut strict = 0;
    let mut calls = 0u64;
    for r in results {
        *scenarios.entry(r.scenario.clone()).or_default() += 1;
        if r.error.is_some() {
            violations += 1;
        }
        for v in &r.verdicts {
            let c = checkers.entry(v.checker.to_string()).or_default();
            if v.ok {
                c.pass += 1;
            } else {
                c.fail += 1;
                violations += 1;
            }
        }
        conv.extend(r.figures.convergence_ms);
        overshoot = overshoot.max(r.figures.soft_overshoot);
        strict = strict.max(r.figures.strict_allowed);
        calls += r.calls as u64;
    }
    Summary {
        seeds_run: results.len() as u64,
        seeds_ok: results.iter().filter(|r| r.ok()).count() as u64,
        violations,
        scenarios,
        checkers,
        convergence_ms: percentiles(conv),
        max_soft_overshoot: overshoot,
        max_strict_allowed: strict,
        calls,
        wall_s,
    }
}

/// Prints a failed seed: one line per failed checker, then how to replay.
pub fn report_failure(r: &SeedResult, plant: Option<Plant>) -> String {
    let mut out = String::new();
    if let Some(e) = &r.error {
        out.push_str(&format!(
            "FAIL seed={} scenario={} run: {e}\n",
            r.seed, r.scenario
        ));
    }
    for v in r.verdicts.iter().filter(|v| !v.ok) {
        out.push_str(&format!(
            "FAIL seed={} scenario={} checker={}: {}\n",
            r.seed,
            r.scenario,
            v.checker,
            v.counterexample.as_deref().unwrap_or("")
        ));
    }
    out.push_str(&reproduce_line(r.seed, &r.scenario, plant));
    out.push('\n');
    out
}

/// Runs every (seed, scenario) pair on `jobs` threads; `on_done` sees each
/// result as it completes.
pub fn run_many(
    work: &[(u64, Scenario)],
    plant: Option<Plant>,
    jobs: usize,
    on_done: &(dyn Fn(&SeedResult) + Sync),
) -> (Vec<SeedResult>, f64) {
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(work.len()));
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((seed, scenario)) = work.get(i) else {
                        break;
                    };
                    let r = run_seed(scenario, *seed, plant);
                    on_done(&r);
                    results.lock().push(r);
                }
            });
        }
    });
    let mut results = results.into_inner();
    results.sort_by_key(|r| r.seed);
    (results, started.elapsed().as_secs_f64())
}
