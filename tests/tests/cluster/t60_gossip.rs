//! Usage gossip between the members of an in-process cluster: counts
//! converge, a strict quota holds its limit across nodes, seats hold
//! globally, and fault injection is refused unless enabled.

use std::time::{Duration, Instant};

use reqwest::Method;
use tollgate_tests::cluster::{TestCluster, WAIT};
use tollgate_tests::demo_check;

/// Every running node's view of `license`'s counters, as (quota, value) pairs.
async fn views(cluster: &TestCluster, license: &str) -> anyhow::Result<Vec<Vec<(String, u64)>>> {
    let mut out = Vec::new();
    for i in cluster.running() {
        let v = cluster
            .node(i)?
            .admin_ok(Method::GET, &format!("/v1/usage?license={license}"), "")
            .await?;
        let counters = v["counters"].as_array().cloned().unwrap_or_default();
        out.push(
            counters
                .iter()
                .map(|c| {
                    (
                        c["quota"].as_str().unwrap_or_default().to_string(),
                        c["value"].as_u64().unwrap_or(0),
                    )
                })
                .collect(),
        );
    }
    Ok(out)
}

async fn wait_converged(
    cluster: &TestCluster,
    license: &str,
    want: u64,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let seen = views(cluster, license).await?;
        if seen
            .iter()
            .all(|v| v.len() == 1 && v.first().is_some_and(|(_, n)| *n == want))
        {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(start.elapsed() < WAIT, "no convergence to {want}: {seen:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn usage_counted_on_every_node_converges_everywhere() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = TestCluster::start(dir.path(), 3, |_| {}).await?;
    for i in cluster.running() {
        for _ in 0..=i {
            let (status, d) = cluster
                .node(i)?
                .post("/v1/check", &demo_check("tg_demo_key"))
                .await?;
            assert_eq!(
                (status, d["decision"].as_str()),
                (200, Some("allow")),
                "{d}"
            );
        }
    }
    // 1 + 2 + 3 checks on the three nodes.
    wait_converged(&cluster, "demo", 6).await?;
    let status = cluster.node(0)?.status().await?;
    let peers = status["gossip"]["peers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(peers.len(), 2, "{status}");
    assert!(
        status["gossip"]["bytes_sent"].as_u64().unwrap_or(0) > 0,
        "{status}"
    );
    // demo-tiny allows 5 a day across the whole cluster now, not 5 per
    // node: once each use has reached every node, no node allows a sixth.
    let mut allowed = 0;
    for round in 0..3 {
        for i in cluster.running() {
            let (_, d) = cluster
                .node(i)?
                .post("/v1/check", &demo_check("tg_demo_tiny"))
                .await?;
            if d["decision"] == "allow" {
                allowed += 1;
                wait_converged(&cluster, "demo-tiny", allowed).await?;
            } else {
                assert_eq!(
                    d["reasons"][0]["code"], "quota_exceeded",
                    "round {round}: {d}"
                );
            }
        }
    }
    assert_eq!(allowed, 5, "soft daily quota of 5 across three nodes");
    Ok(())
}

#[tokio::test]
async fn a_strict_quota_never_goes_over_and_rights_follow_demand() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Strict Checks answer once their usage is flushed; one client in a
    // loop waits for every flush, so flush often.
    let cluster = TestCluster::start(dir.path(), 3, |s| s.usage_flush_interval_ms = 2).await?;
    // All demand on node 0: it starts with a third of the rights and gets
    // the rest as the others see its demand.
    let node = cluster.node(0)?;
    let mut allowed = 0u64;
    let mut rights_waits = 0u64;
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, d) = node
            .post("/v1/check", &demo_check("tg_demo_strict"))
            .await?;
        match d["reasons"][0]["code"].as_str() {
            None => allowed += 1,
            Some("quota_rights_unavailable") => {
                rights_waits += 1;
                let retry = d["retry_after_ms"].as_u64().unwrap_or(0);
                assert!(retry > 0, "{d}");
                tokio::time::sleep(Duration::from_millis(retry)).await;
            }
            Some("quota_exceeded") => break,
            other => panic!("unexpected {other:?}: {d}"),
        }
        assert!(Instant::now() < deadline, "{allowed} allowed so far");
    }
    assert_eq!(allowed, 1_000, "{rights_waits} waits for rights");
    // The other nodes refuse too: no rights are left anywhere.
    for i in [1, 2] {
        let (_, d) = cluster
            .node(i)?
            .post("/v1/check", &demo_check("tg_demo_strict"))
            .await?;
        assert_ne!(d["decision"], "allow", "node {i}: {d}");
    }
    wait_converged(&cluster, "demo-strict", 1_000).await?;
    let status = node.status().await?;
    let rights = status["rights"].as_array().cloned().unwrap_or_default();
    assert!(
        rights
            .iter()
            .any(|r| r["license"] == "demo-strict" && r["used"] == 1_000 && r["held"] == 0),
        "{status}"
    );
    Ok(())
}

#[tokio::test]
async fn seats_hold_across_nodes_and_fault_injection_needs_the_flag() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = TestCluster::start(dir.path(), 3, |_| {}).await?;
    let acquire = |i: usize| {
        r#"{"key":"tg_demo_seats","instance":"gpu-INSTANCE"}"#.replace("INSTANCE", &i.to_string())
    };
    let mut leases = Vec::new();
    for i in 0..3 {
        // A node that has not learned the membership yet holds no share of
        // the seats and says so; it gets one within a few gossip ticks.
        let deadline = Instant::now() + WAIT;
        let d = loop {
            let (status, d) = cluster
                .node(i)?
                .post("/v1/seats/acquire", &acquire(i))
                .await?;
            assert_eq!(status, 200, "{d}");
            if d["granted"] == true {
                break d;
            }
            assert_eq!(d["reasons"][0]["code"], "quota_rights_unavailable", "{d}");
            assert!(Instant::now() < deadline, "{d}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        leases.push((i, d["lease_id"].as_str().unwrap_or_default().to_string()));
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, d) = cluster
            .node(0)?
            .post("/v1/seats/acquire", &acquire(9))
            .await?;
        assert_eq!(d["granted"], false, "a fourth seat: {d}");
        if d["reasons"][0]["code"] == "seat_limit_reached" {
            break;
        }
        assert_eq!(d["reasons"][0]["code"], "quota_rights_unavailable", "{d}");
        assert!(Instant::now() < deadline, "{d}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Renewing or releasing at another node than the granting one is refused
    // with a pointer to the right node.
    let (i, lease) = &leases[2];
    let body = format!(r#"{{"key":"tg_demo_seats","lease_id":"{lease}"}}"#);
    let (_, d) = cluster
        .node((i + 1) % 3)?
        .post("/v1/seats/renew", &body)
        .await?;
    assert_eq!(d["reasons"][0]["code"], "seat_lease_unknown", "{d}");
    let (_, d) = cluster.node(*i)?.post("/v1/seats/release", &body).await?;
    assert!(d["reasons"].as_array().is_some_and(Vec::is_empty), "{d}");
    // The freed seat moves to node 0, where the demand is.
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, d) = cluster
            .node(0)?
            .post("/v1/seats/acquire", &acquire(9))
            .await?;
        if d["granted"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "{d}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, d) = cluster
        .node(0)?
        .admin(
            Method::POST,
            "/v1/admin/gossip/faults",
            Some(cluster.token()),
            r#"{"drop":[2]}"#,
        )
        .await?;
    assert_eq!(status, 403, "{d}");
    assert_eq!(d["error"]["code"], "fault_injection_disabled", "{d}");
    Ok(())
}
