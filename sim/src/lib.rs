//! Tollgate's deterministic simulator: the real node on turmoil's simulated
//! network and clock, with faults, a workload, Jepsen-style checkers and
//! seed replay.
//!
//! One seed decides everything random in a run (election timeouts, gossip
//! peer choice, QUIC's own randomness, the workload, the fault schedule,
//! message latencies and the order hosts run in), so a failing seed replays
//! with `cargo run -p tollgate-sim -- --seed N --scenario NAME`.
//!
//! - `scenario`: the scenario files (`sim/scenarios/*.yaml`);
//! - `run`: one run of one scenario and seed, recording a history;
//! - `check`: the checkers that judge a history;
//! - `runner`: many seeds in parallel, a summary, REPRODUCE lines;
//! - `net`: quinn and tonic over turmoil's sockets.

pub mod check;
pub mod history;
pub mod licenses;
pub mod net;
pub mod run;
pub mod runner;
pub mod scenario;
