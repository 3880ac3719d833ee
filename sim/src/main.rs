//! `tollgate-sim`: runs scenarios over many seeds and reports violations.
//!
//! ```text
//! cargo run -p tollgate-sim --release -- --seeds 1..1000
//! cargo run -p tollgate-sim -- --seed 42 --scenario oneway-loss
//! ```

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tollgate_sim::run::Plant;
use tollgate_sim::runner;
use tollgate_sim::scenario::Scenario;

#[derive(Parser, Debug)]
#[command(
    name = "tollgate-sim",
    about = "Deterministic simulation of a Tollgate cluster"
)]
struct Args {
    /// Seeds to run, `A..B` (B excluded) or `A..=B`. Without `--scenario`,
    /// seed N runs scenario N mod (number of scenarios).
    #[arg(long, conflicts_with = "seed")]
    seeds: Option<String>,
    /// One seed (prints its trace hash and every verdict).
    #[arg(long)]
    seed: Option<u64>,
    /// Run only this built-in scenario.
    #[arg(long, conflicts_with = "scenario_file")]
    scenario: Option<String>,
    /// Run a scenario from a file.
    #[arg(long)]
    scenario_file: Option<PathBuf>,
    /// Seeds run at once, each in a process of its own (default: the number
    /// of cores).
    #[arg(long)]
    jobs: Option<usize>,
    /// Wall-clock seconds a seed's process may run before it is killed and
    /// the seed fails (a hang; simulated time is bounded by the scenario).
    #[arg(long, default_value_t = 600)]
    seed_timeout: u64,
    /// Plant a bug (builds with `--features planted-bugs` only):
    /// `skip-escrow-check`.
    #[arg(long)]
    plant: Option<String>,
    /// Also write the summary JSON here.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Also write one JSON line per seed here (seed, scenario, trace hash,
    /// calls, ok), to compare two runs seed by seed.
    #[arg(long)]
    traces: Option<PathBuf>,
    /// List the built-in scenarios and exit.
    #[arg(long)]
    list: bool,
    /// With `--seed`: print the result as one machine-readable line (how
    /// `--seeds` runs each seed in a process of its own).
    #[arg(long, requires = "seed", hide = true)]
    emit_result: bool,
}

fn parse_seeds(text: &str) -> anyhow::Result<std::ops::Range<u64>> {
    let (a, b, inclusive) = if let Some((a, b)) = text.split_once("..=") {
        (a, b, true)
    } else if let Some((a, b)) = text.split_once("..") {
        (a, b, false)
    } else {
        let n: u64 = text.parse().context("--seeds: expected A..B")?;
        return Ok(n..n + 1);
    };
    let a: u64 = a.trim().parse().context("--seeds: start is not a number")?;
    let b: u64 = b.trim().parse().context("--seeds: end is not a number")?;
    let end = if inclusive { b.saturating_add(1) } else { b };
    anyhow::ensure!(a < end, "--seeds {text} is empty");
    Ok(a..end)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.list {
        for s in Scenario::all_builtin()? {
            println!("{:<32} {}", s.name, s.description);
        }
        return Ok(());
    }
    let plant = match &args.plant {
        None => None,
        Some(name) => {
            Some(Plant::parse(name).with_context(|| format!("--plant {name}: unknown bug"))?)
        }
    };
    let scenarios: Vec<Scenario> = match (&args.scenario, &args.scenario_file) {
        (Some(name), _) => vec![Scenario::builtin(name)?],
        (None, Some(path)) => vec![Scenario::from_file(path)?],
        (None, None) => Scenario::all_builtin()?,
    };
    let seeds = match (&args.seeds, args.seed) {
        (_, Some(n)) => n..n + 1,
        (Some(text), None) => parse_seeds(text)?,
        (None, None) => 1..11,
    };
    let work: Vec<(u64, Scenario)> = seeds
        .map(|seed| {
            let i = usize::try_from(seed % scenarios.len() as u64).unwrap_or(0);
            (seed, scenarios[i].clone())
        })
        .collect();
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let single = args.seed.is_some();
    let seed_timeout = std::time::Duration::from_secs(args.seed_timeout.max(1));
    if args.emit_result {
        // One seed for a parent runner: the result line only.
        for (seed, scenario) in &work {
            let r = runner::run_seed(scenario, *seed, plant);
            println!("{}", runner::result_line(&r)?);
        }
        tollgate_sim::run::remove_fixtures();
        return Ok(());
    }
    // Each seed of a batch gets a process of its own (this binary, as its
    // REPRODUCE line runs it); a single seed runs here.
    let exe = std::env::current_exe().context("finding the runner's own binary")?;
    let scenario_args: Vec<String> = match (&args.scenario, &args.scenario_file) {
        (Some(name), _) => vec!["--scenario".into(), name.clone()],
        (None, Some(path)) => vec!["--scenario-file".into(), path.display().to_string()],
        (None, None) => Vec::new(),
    };
    let run_one = |seed: u64, scenario: &Scenario| {
        if single {
            return runner::run_seed(scenario, seed, plant);
        }
        let mut named = scenario_args.clone();
        if named.is_empty() {
            named = vec!["--scenario".into(), scenario.name.clone()];
        }
        runner::run_seed_in_process(&exe, &named, scenario, seed, plant, seed_timeout)
    };
    let (results, wall_s) = runner::run_many(&work, &run_one, jobs, &|r| {
        let mut out = std::io::stdout().lock();
        if single {
            let _ = writeln!(
                out,
                "seed={} scenario={} trace_hash={:016x} calls={}",
                r.seed, r.scenario, r.trace_hash, r.calls
            );
            for v in &r.verdicts {
                let _ = writeln!(
                    out,
                    "  {:<24} {}{}",
                    v.checker,
                    if v.ok { "ok" } else { "FAIL" },
                    v.counterexample
                        .as_deref()
                        .map(|c| format!(": {c}"))
                        .unwrap_or_default()
                );
            }
        }
        if !r.ok() {
            let _ = write!(
                out,
                "{}",
                runner::report_failure_for(r, args.scenario_file.as_deref(), plant)
            );
        }
    });
    tollgate_sim::run::remove_fixtures();
    let summary = runner::summarize(&results, wall_s);
    let json = serde_json::to_string_pretty(&summary)?;
    println!("{json}");
    if let Some(path) = &args.traces {
        let mut lines = String::new();
        for r in &results {
            let line = serde_json::json!({
                "seed": r.seed,
                "scenario": r.scenario,
                "trace_hash": format!("{:016x}", r.trace_hash),
                "calls": r.calls,
                "ok": r.ok(),
            });
            lines.push_str(&line.to_string());
            lines.push('\n');
        }
        std::fs::write(path, lines).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.summary {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    if summary.violations > 0 {
        std::process::exit(1);
    }
    Ok(())
}
