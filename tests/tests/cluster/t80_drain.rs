//! A node that leaves drains first: removed from the membership or stopped,
//! it refuses new usage and hands every use it acknowledged to the members
//! that stay. Node 3 gossips rarely here (one tick a minute, no periodic
//! digests anywhere), so its usage reaches the others by its drain.

use std::time::{Duration, Instant};

use reqwest::Method;
use tollgate_node::settings::NodeSettings;
use tollgate_tests::cluster::{TestCluster, WAIT};
use tollgate_tests::{TestNode, demo_check};

/// Node 3 sends its usage only when it drains; nobody pulls it by digest.
fn node_3_silent(s: &mut NodeSettings) {
    s.gossip.anti_entropy_ms = 600_000;
    if s.node_id == 3 {
        s.gossip.interval_ms = 60_000;
    }
}

/// `node`'s count of license `demo` (every counter of it, summed).
async fn demo_used(node: &TestNode) -> anyhow::Result<u64> {
    let v = node
        .admin_ok(Method::GET, "/v1/usage?license=demo", "")
        .await?;
    Ok(v["counters"]
        .as_array()
        .map(|cs| cs.iter().filter_map(|c| c["value"].as_u64()).sum())
        .unwrap_or(0))
}

/// Sends `n` demo Checks to `node`; all must be allowed.
async fn use_demo(node: &TestNode, n: u64) -> anyhow::Result<()> {
    for _ in 0..n {
        let (status, d) = node.post("/v1/check", &demo_check("tg_demo_key")).await?;
        anyhow::ensure!(status == 200 && d["decision"] == "allow", "{status}: {d}");
    }
    Ok(())
}

/// Waits until node `i`'s status shows its drain `phase`.
async fn wait_drain_phase(
    cluster: &TestCluster,
    i: usize,
    phase: &str,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = cluster.node(i)?.status().await?;
        if status["drain"]["phase"] == phase {
            return Ok(status);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "drain never reached {phase}: {}",
            status["drain"]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_removed_node_hands_its_usage_to_the_remaining_members() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = TestCluster::start(dir.path(), 3, node_3_silent).await?;
    use_demo(cluster.node(0)?, 2).await?;
    let leader = cluster.leader().await?;
    let via = if leader == 2 { 0 } else { leader };

    // Node 3 takes Checks before and after its removal commits, until it
    // notices the removal and refuses.
    let node3 = cluster.node(2)?;
    let mut allowed_on_3 = 0u64;
    let mut removed = false;
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, body) = node3.post("/v1/check", &demo_check("tg_demo_key")).await?;
        if code == 503 {
            assert_eq!(body["error"]["code"], "node_draining", "{body}");
            break;
        }
        assert_eq!(
            (code, body["decision"].as_str()),
            (200, Some("allow")),
            "{body}"
        );
        allowed_on_3 += 1;
        if allowed_on_3 == 20 && !removed {
            cluster
                .node(via)?
                .admin_ok(Method::DELETE, "/v1/cluster/nodes/3", "")
                .await?;
            removed = true;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "node 3 never refused after its removal"
        );
    }
    assert!(removed && allowed_on_3 >= 20);

    let status = wait_drain_phase(&cluster, 2, "drained").await?;
    assert_eq!(status["drain"]["reason"], "removed", "{}", status["drain"]);
    assert_eq!(
        status["drain"]["progress"]["caught_up"],
        serde_json::json!([1, 2]),
        "{}",
        status["drain"]
    );
    // Drained means acked, and a peer acks only what it merged: nodes 1
    // and 2 count every use node 3 acknowledged the moment it says so.
    for i in [0, 1] {
        assert_eq!(
            demo_used(cluster.node(i)?).await?,
            2 + allowed_on_3,
            "node {}",
            i + 1
        );
    }
    let metrics = node3.get_text("/metrics", None).await?.1;
    assert!(
        metrics.contains("tollgate_drains_total{outcome=\"drained\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_drain_phase{phase=\"drained\"} 1"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn a_node_stopped_gracefully_drains_first() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = TestCluster::start(dir.path(), 3, node_3_silent).await?;
    use_demo(cluster.node(2)?, 5).await?;
    cluster.stop(2).await?;
    // Stopped, node 3 can no longer send anything: the others must already
    // hold its five uses.
    for i in [0, 1] {
        assert_eq!(demo_used(cluster.node(i)?).await?, 5, "node {}", i + 1);
    }
    Ok(())
}
