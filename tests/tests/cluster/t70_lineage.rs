//! The lineage graph across an in-process cluster: uses with lineage
//! allowed on different nodes show up, with the same counts, in every
//! node's `/v1/lineage` once gossip has carried the edge counters, and are
//! still there after the whole cluster restarts.

use std::time::{Duration, Instant};

use reqwest::Method;
use tollgate_tests::cluster::{TestCluster, WAIT};
use tollgate_tests::lineage_check;

/// Node `i`'s view of demo-lineage's graph: its nodes and edges, without
/// the fields that name the answering node.
async fn graph(cluster: &TestCluster, i: usize) -> anyhow::Result<serde_json::Value> {
    let g = cluster
        .node(i)?
        .admin_ok(Method::GET, "/v1/lineage?license=demo-lineage", "")
        .await?;
    Ok(serde_json::json!({"nodes": g["nodes"], "edges": g["edges"]}))
}

#[tokio::test]
async fn the_lineage_graph_is_equal_on_every_node_after_gossip() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = TestCluster::start(dir.path(), 3, |_| {}).await?;
    // Node i allows i + 1 uses fed by web-reviews, and node 2 one more fed
    // by the customer records; a denied use on node 1 adds nothing.
    let key = "tg_demo_lineage";
    for i in cluster.running() {
        for _ in 0..=i {
            let (_, d) = cluster
                .node(i)?
                .post("/v1/check", &lineage_check(key, &["web-reviews@2025.1"]))
                .await?;
            assert_eq!(d["decision"], "allow", "node {i}: {d}");
        }
    }
    let (_, d) = cluster
        .node(2)?
        .post("/v1/check", &lineage_check(key, &["crm-customers@2026-01"]))
        .await?;
    assert_eq!(d["decision"], "allow", "{d}");
    let (_, d) = cluster
        .node(1)?
        .post(
            "/v1/check",
            &lineage_check(key, &["crm-customers@2026-01", "web-reviews@2025.1"]),
        )
        .await?;
    assert_eq!(
        d["reasons"][0]["code"], "dataset_combination_forbidden",
        "{d}"
    );

    let want = serde_json::json!([
        {"from": "license:demo-lineage", "to": "model:demo-classifier@2.1.0", "count": 7},
        {"from": "model:demo-classifier@2.1.0", "to": "dataset:crm-customers@2026-01", "count": 1},
        {"from": "model:demo-classifier@2.1.0", "to": "dataset:web-reviews@2025.1", "count": 6},
    ]);
    wait_equal(&cluster, &want).await?;
    // The edges are on disk like usage: after every node has stopped and
    // started again, each still shows the whole graph.
    for i in cluster.running() {
        cluster.stop(i).await?;
    }
    for i in 0..3 {
        cluster.restart(i).await?;
    }
    cluster.leader().await?;
    wait_equal(&cluster, &want).await
}

/// Polls every running node until each shows `edges` and all agree.
async fn wait_equal(cluster: &TestCluster, edges: &serde_json::Value) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let mut views = Vec::new();
        for i in cluster.running() {
            views.push(graph(cluster, i).await?);
        }
        let converged =
            views.iter().all(|v| v["edges"] == *edges) && views.windows(2).all(|w| w[0] == w[1]);
        if converged {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < WAIT,
            "lineage graphs did not converge to {edges}: {views:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
