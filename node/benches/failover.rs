//! Election-to-commit after a leader dies, on real processes: start three
//! `tollgate serve` nodes on loopback (heartbeat 50 ms, election timeout
//! 300-600 ms), then, `FAILOVER_RUNS` times (default 20), SIGKILL the
//! leader and time until the surviving follower reports a new leader and
//! until a license write through it commits. Prints one JSON object: every
//! run, median, min and max in ms.
//!
//! `cargo bench -p tollgate-node --bench failover`

#[path = "../tests/common/mod.rs"]
mod common;

use common::ProcCluster;

/// Median, min, max and every value, in ms.
fn summary(ms: &[f64]) -> serde_json::Value {
    let mut sorted = ms.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = match n {
        0 => 0.0,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    };
    serde_json::json!({
        "median": median,
        "min": sorted.first().copied().unwrap_or(0.0),
        "max": sorted.last().copied().unwrap_or(0.0),
        "runs": ms,
    })
}

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::var("FAILOVER_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let dir = tempfile::tempdir()?;
        let mut cluster = ProcCluster::start(dir.path(), 3)?;
        cluster.leader().await?;
        let mut elected = Vec::with_capacity(runs);
        let mut committed = Vec::with_capacity(runs);
        for round in 0..runs {
            let f = cluster.failover_once(round).await?;
            elected.push(f.elected.as_secs_f64() * 1e3);
            committed.push(f.committed.as_secs_f64() * 1e3);
        }
        let report = serde_json::json!({
            "scenario": "failover",
            "nodes": 3,
            "runs": runs,
            "heartbeat_ms": 50,
            "election_timeout_ms": [300, 600],
            "kill_to_new_leader_ms": summary(&elected),
            "kill_to_commit_ms": summary(&committed),
        });
        println!("{report}");
        anyhow::Ok(())
    })
}
