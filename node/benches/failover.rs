//! Election-to-commit after a leader dies, on real processes: start three
//! `tollgate serve` nodes on loopback (heartbeat 50 ms, election timeout
//! 300-600 ms), then, `FAILOVER_RUNS` times (default 20), SIGKILL the
//! leader and time until a license write through a surviving follower
//! commits. Prints one JSON object: every run, median and max in ms.
//!
//! `cargo bench -p tollgate-node --bench failover`

#[path = "../tests/common/mod.rs"]
mod common;

use common::ProcCluster;

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
        let mut ms = Vec::with_capacity(runs);
        for round in 0..runs {
            let took = cluster.failover_once(round).await?;
            ms.push(took.as_secs_f64() * 1e3);
        }
        let mut sorted = ms.clone();
        sorted.sort_by(f64::total_cmp);
        let median = if sorted.is_empty() {
            0.0
        } else if sorted.len() % 2 == 1 {
            sorted[sorted.len() / 2]
        } else {
            (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
        };
        let report = serde_json::json!({
            "scenario": "failover",
            "nodes": 3,
            "runs": runs,
            "heartbeat_ms": 50,
            "election_timeout_ms": [300, 600],
            "election_to_commit_ms": {
                "median": median,
                "max": sorted.last().copied().unwrap_or(0.0),
                "min": sorted.first().copied().unwrap_or(0.0),
                "runs": ms,
            },
        });
        println!("{report}");
        anyhow::Ok(())
    })
}
