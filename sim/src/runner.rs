//! Many seeds in parallel: one line per failure with the command that
//! replays it, and a JSON summary.
//!
//! This module owns seed ranges, the assignment of seeds to scenarios, the
//! workers (each seed runs in a process of its own, on one thread, start to
//! end, because a simulated cluster is single-threaded by design), and the
//! summary. It must not judge runs itself: `check` does.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

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

/// The command that replays one seed of a built-in scenario.
pub fn reproduce_line(seed: u64, scenario: &str, plant: Option<Plant>) -> String {
    reproduce_line_for(seed, scenario, None, plant)
}

/// The command that replays one seed; `scenario_file` when the scenario
/// came from a file (the file is named, not the scenario).
pub fn reproduce_line_for(
    seed: u64,
    scenario: &str,
    scenario_file: Option<&Path>,
    plant: Option<Plant>,
) -> String {
    let which = match scenario_file {
        Some(path) => format!("--scenario-file {}", path.display()),
        None => format!("--scenario {scenario}"),
    };
    match plant {
        None => format!("REPRODUCE: cargo run -p tollgate-sim -- --seed {seed} {which}"),
        Some(p) => format!(
            "REPRODUCE: cargo run -p tollgate-sim --features planted-bugs -- --seed {seed} {which} --plant {}",
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

/// Prints a failed seed of a built-in scenario: one line per failed
/// checker, then how to replay.
pub fn report_failure(r: &SeedResult, plant: Option<Plant>) -> String {
    report_failure_for(r, None, plant)
}

/// [`report_failure`] for a scenario that may come from a file.
pub fn report_failure_for(
    r: &SeedResult,
    scenario_file: Option<&Path>,
    plant: Option<Plant>,
) -> String {
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
    out.push_str(&reproduce_line_for(
        r.seed,
        &r.scenario,
        scenario_file,
        plant,
    ));
    out.push('\n');
    out
}

/// What a seed's own process prints its result after.
pub const RESULT_PREFIX: &str = "RESULT ";

/// A seed's result as its process reports it: one JSON line.
#[derive(Serialize, Deserialize)]
struct WireResult {
    seed: u64,
    scenario: String,
    verdicts: Vec<WireVerdict>,
    figures: Figures,
    trace_hash: u64,
    error: Option<String>,
    calls: usize,
}

#[derive(Serialize, Deserialize)]
struct WireVerdict {
    checker: String,
    ok: bool,
    counterexample: Option<String>,
}

/// The line a seed's process prints its result on ([`RESULT_PREFIX`] and
/// JSON).
pub fn result_line(r: &SeedResult) -> anyhow::Result<String> {
    let wire = WireResult {
        seed: r.seed,
        scenario: r.scenario.clone(),
        verdicts: r
            .verdicts
            .iter()
            .map(|v| WireVerdict {
                checker: v.checker.to_string(),
                ok: v.ok,
                counterexample: v.counterexample.clone(),
            })
            .collect(),
        figures: r.figures.clone(),
        trace_hash: r.trace_hash,
        error: r.error.clone(),
        calls: r.calls,
    };
    Ok(format!("{RESULT_PREFIX}{}", serde_json::to_string(&wire)?))
}

/// Reads a [`result_line`] back; `None` if `line` is not one.
fn parse_result_line(line: &str) -> Option<SeedResult> {
    let wire: WireResult = serde_json::from_str(line.strip_prefix(RESULT_PREFIX)?).ok()?;
    let verdicts = wire
        .verdicts
        .into_iter()
        .map(|v| {
            // Checker names are the static ones of `check`.
            let checker = CHECKERS
                .iter()
                .find(|c| **c == v.checker)
                .copied()
                .unwrap_or("unknown-checker");
            Verdict {
                checker,
                ok: v.ok,
                counterexample: v.counterexample,
            }
        })
        .collect();
    Some(SeedResult {
        seed: wire.seed,
        scenario: wire.scenario,
        verdicts,
        figures: wire.figures,
        trace_hash: wire.trace_hash,
        error: wire.error,
        calls: wire.calls,
    })
}

/// Runs one seed in a process of its own: `exe` (this runner) with
/// `scenario_args` (how it names the scenario), `--seed`, and the hidden
/// `--emit-result`. A fresh process per seed is what makes a batch run of
/// a seed the same run as its REPRODUCE line: some state is per process
/// (tokio's task ids; see `run::align_task_ids`), and two simulations on
/// two threads of one process would share it.
///
/// A process still running after `timeout` (wall time: a hang, not a slow
/// simulation, since simulated time is bounded by the scenario) is killed
/// and its seed fails, so one stuck seed cannot stall a batch.
pub fn run_seed_in_process(
    exe: &Path,
    scenario_args: &[String],
    scenario: &Scenario,
    seed: u64,
    plant: Option<Plant>,
    timeout: Duration,
) -> SeedResult {
    // Logs and debug dumps asked for go straight through; otherwise a
    // failed seed shows the end of what its process said.
    let verbose = std::env::var_os("TOLLGATE_SIM_DEBUG").is_some()
        || std::env::var("RUST_LOG").is_ok_and(|v| !v.is_empty() && v != "off");
    let mut cmd = Command::new(exe);
    cmd.args(scenario_args)
        .args(["--seed", &seed.to_string(), "--emit-result"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if verbose {
            Stdio::inherit()
        } else {
            Stdio::piped()
        });
    if let Some(p) = plant {
        cmd.args(["--plant", p.name()]);
    }
    let out = match output_within(&mut cmd, timeout) {
        Ok(Some(out)) => out,
        Ok(None) => {
            return failed(
                scenario,
                seed,
                format!(
                    "its process was still running after {} s and was killed",
                    timeout.as_secs()
                ),
            );
        }
        Err(e) => return failed(scenario, seed, format!("running its process: {e}")),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail = |n: usize| -> Vec<&str> {
        let mut lines: Vec<&str> = stderr.lines().rev().take(n).collect();
        lines.reverse();
        lines
    };
    if let Some(r) = stdout.lines().find_map(parse_result_line) {
        if !r.ok() && !stderr.is_empty() {
            eprintln!("seed {seed}: the end of its output:");
            for line in tail(STDERR_TAIL_LINES) {
                eprintln!("  {line}");
            }
        }
        return r;
    }
    // No result: the process died (a panic outside the run, an abort, a
    // signal). Its last words say why.
    failed(
        scenario,
        seed,
        format!(
            "its process ended ({}): {}",
            out.status,
            tail(5).join(" | ")
        ),
    )
}

/// Runs `cmd` like [`Command::output`], but kills it once `timeout` has
/// gone by (`None`: killed). Its pipes are read meanwhile, so a chatty
/// child cannot block on a full pipe.
fn output_within(cmd: &mut Command, timeout: Duration) -> std::io::Result<Option<Output>> {
    let mut child = cmd.spawn()?;
    let stdout = read_all(child.stdout.take());
    let stderr = read_all(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            // Killing closes its pipes, which ends the readers.
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(CHILD_POLL);
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    Ok(status.map(|status| Output {
        status,
        stdout,
        stderr,
    }))
}

/// Reads `pipe` to its end on a thread of its own (nothing if `None`).
fn read_all<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

/// How often a seed's process is looked at while it runs.
const CHILD_POLL: Duration = Duration::from_millis(5);

/// Lines of a failed seed's own output shown after its FAIL lines.
const STDERR_TAIL_LINES: usize = 40;

/// Runs every (seed, scenario) pair with `run_one`, on `jobs` threads;
/// `on_done` sees each result as it completes.
pub fn run_many(
    work: &[(u64, Scenario)],
    run_one: &(dyn Fn(u64, &Scenario) -> SeedResult + Sync),
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
                    let r = run_one(*seed, scenario);
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

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn a_child_that_ends_gives_its_output_and_one_that_hangs_is_killed() -> std::io::Result<()> {
        let out = output_within(
            Command::new("sh")
                .args(["-c", "echo out; echo err >&2"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
            Duration::from_secs(60),
        )?;
        let out = out.expect("sh ends well within a minute");
        assert!(out.status.success());
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");

        let started = Instant::now();
        let hung = output_within(
            Command::new("sleep")
                .arg("600")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
            Duration::from_millis(200),
        )?;
        assert!(
            hung.is_none(),
            "a child past its timeout is reported as killed"
        );
        // Killed, not waited for: far less than its 600 s.
        assert!(started.elapsed() < Duration::from_secs(60));
        Ok(())
    }
}
