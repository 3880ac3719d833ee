//! One seed replays the same run: same calls, outcomes, faults and samples
//! at the same simulated times, so the same trace hash. In the same process
//! and in another one, which is what a REPRODUCE line relies on: each
//! process makes its own certificates and keys.

use tollgate_sim::runner::{report_failure, run_seed};
use tollgate_sim::scenario::Scenario;

#[test]
fn the_same_seed_gives_the_same_trace_hash() {
    // A scenario that crashes nodes: the order in which a crashed host's
    // tasks are dropped is where per-process state once leaked in (seed 26
    // is one that it changed).
    let scenario = Scenario::builtin("crash-restart-loses-unsynced").expect("builtin scenario");
    let first = run_seed(&scenario, 26, None);
    assert!(first.ok(), "{}", report_failure(&first, None));
    assert!(first.calls > 50, "the workload ran: {} calls", first.calls);
    let other = run_seed(&scenario, 27, None);
    assert_ne!(
        first.trace_hash, other.trace_hash,
        "another seed gives another run"
    );
    // Again, after other tasks used this process's task ids: each shift
    // moves the ids a run starts from by one more.
    for shift in 1..=3 {
        spend_task_ids(shift);
        let again = run_seed(&scenario, 26, None);
        assert_eq!(
            first.trace_hash, again.trace_hash,
            "seed 26 replayed differently after {shift} more task ids"
        );
    }

    // The runner binary replays it too: alone (`--seed`, this process's
    // path) and as a seed of a batch (`--seeds`, a child process per seed).
    let alone = run_binary(&["--seed", "26", "--scenario", "crash-restart-loses-unsynced"]);
    let replayed = alone
        .split_whitespace()
        .find_map(|w| w.strip_prefix("trace_hash="))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .expect("a trace_hash in the output");
    assert_eq!(
        replayed, first.trace_hash,
        "seed 26 replayed differently in another process"
    );
    let traces =
        std::env::temp_dir().join(format!("tollgate-sim-traces-{}.jsonl", std::process::id()));
    let traces_arg = traces.display().to_string();
    run_binary(&[
        "--seeds",
        "26..27",
        "--scenario",
        "crash-restart-loses-unsynced",
        "--traces",
        &traces_arg,
    ]);
    let line = std::fs::read_to_string(&traces).expect("the traces file");
    let _ = std::fs::remove_file(&traces);
    let batch: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON line");
    assert_eq!(
        batch["trace_hash"].as_str(),
        Some(format!("{:016x}", first.trace_hash).as_str()),
        "seed 26 ran differently as a seed of a batch"
    );
    tollgate_sim::run::remove_fixtures();
}

/// Spawns `n` tasks that do nothing, as other work in the process would.
fn spend_task_ids(n: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    for _ in 0..n {
        drop(rt.spawn(async {}));
    }
}

/// Runs the runner binary with `args` (logs off) and returns its stdout;
/// fails the test, showing both outputs, unless it succeeds.
fn run_binary(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate-sim"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("running tollgate-sim");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tollgate-sim {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
