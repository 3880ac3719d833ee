//! Three `tollgate serve` processes: SIGKILL the leader, a new one is
//! elected and a license write through a surviving follower commits; the
//! killed node comes back and catches up. The timing figures live in the
//! `failover` bench; this test checks the behaviour.

mod common;

use common::ProcCluster;

#[tokio::test]
async fn after_the_leader_is_killed_a_write_through_a_follower_commits() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = ProcCluster::start(dir.path(), 3)?;
    // Seeded and agreed on a leader.
    cluster.leader().await?;
    for round in 0..2 {
        // Fails unless a new leader is seen and the write commits in time.
        cluster.failover_once(round).await?;
    }
    // Every node, including the restarted ones, has both writes.
    for i in cluster.running() {
        let s = cluster.status(i).await.unwrap_or_default();
        assert_eq!(
            s["n_licenses"], 7,
            "the 5 demo licenses and both writes: node {i}: {s}"
        );
    }
    Ok(())
}
