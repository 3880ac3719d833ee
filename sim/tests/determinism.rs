//! One seed replays the same run: same calls, outcomes, faults and samples
//! at the same simulated times, so the same trace hash.

use tollgate_sim::runner::run_seed;
use tollgate_sim::scenario::Scenario;

#[test]
fn the_same_seed_gives_the_same_trace_hash() {
    let scenario = Scenario::builtin("crash-restart-loses-unsynced").expect("builtin scenario");
    let first = run_seed(&scenario, 7, None);
    assert!(first.error.is_none(), "run failed: {:?}", first.error);
    assert!(first.calls > 50, "the workload ran: {} calls", first.calls);
    let second = run_seed(&scenario, 7, None);
    assert_eq!(
        first.trace_hash, second.trace_hash,
        "seed 7 replayed differently"
    );
    let other = run_seed(&scenario, 8, None);
    assert_ne!(
        first.trace_hash, other.trace_hash,
        "another seed gives another run"
    );
}
