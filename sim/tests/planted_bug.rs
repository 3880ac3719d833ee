//! A deliberately broken build fails a checker, prints a REPRODUCE line,
//! and that line's arguments replay the same failure.

use tollgate_sim::run::Plant;
use tollgate_sim::runner::{report_failure, run_seed};
use tollgate_sim::scenario::Scenario;

/// Parses `--seed N --scenario S --plant P` out of a REPRODUCE line.
fn replay_args(line: &str) -> (u64, String, Option<Plant>) {
    let args: Vec<&str> = line
        .split_once(" -- ")
        .map(|(_, a)| a.split_whitespace().collect())
        .expect("the line has arguments after --");
    let value = |flag: &str| {
        args.iter()
            .position(|a| *a == flag)
            .and_then(|i| args.get(i + 1))
            .map(|s| (*s).to_string())
    };
    let seed = value("--seed")
        .and_then(|s| s.parse().ok())
        .expect("--seed N");
    let scenario = value("--scenario").expect("--scenario NAME");
    let plant = value("--plant").map(|p| Plant::parse(&p).expect("a known plant"));
    (seed, scenario, plant)
}

#[test]
fn skipping_the_escrow_check_breaks_strict_quota_safety_and_replays() {
    let scenario = Scenario::builtin("region-partition-during-load").expect("builtin scenario");
    let plant = Some(Plant::SkipEscrowCheck);
    // The first seed (of a few) whose run exposes the bug.
    let failing = (1..=4)
        .map(|seed| run_seed(&scenario, seed, plant))
        .find(|r| {
            r.verdicts
                .iter()
                .any(|v| v.checker == "strict-quota-safety" && !v.ok)
        })
        .expect("without the escrow check, a partition lets the strict quota be exceeded");
    let report = report_failure(&failing, plant);
    let line = report
        .lines()
        .find(|l| l.starts_with("REPRODUCE: cargo run -p tollgate-sim"))
        .expect("a REPRODUCE line");
    assert!(report.contains("checker=strict-quota-safety"), "{report}");

    let (seed, name, replant) = replay_args(line);
    assert_eq!((seed, replant), (failing.seed, plant));
    let replay = run_seed(&Scenario::builtin(&name).expect("scenario"), seed, replant);
    let verdict = replay
        .verdicts
        .iter()
        .find(|v| v.checker == "strict-quota-safety")
        .expect("verdict");
    assert!(!verdict.ok, "the REPRODUCE line replays the failure");
    assert_eq!(
        replay.trace_hash, failing.trace_hash,
        "and replays it exactly"
    );

    // The same seed without the bug passes.
    let sound = run_seed(&scenario, seed, None);
    assert!(sound.ok(), "{}", report_failure(&sound, None));
    tollgate_sim::run::remove_fixtures();
}
