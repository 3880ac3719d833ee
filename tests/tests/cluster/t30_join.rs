use reqwest::Method;
use tollgate_tests::cluster::TestCluster;
use tollgate_tests::demo_check;

#[tokio::test]
async fn a_node_joining_after_compaction_catches_up_by_snapshot() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = TestCluster::start(dir.path(), 3, |s| {
        s.snapshot_after_entries = 20;
        s.snapshot_keep_entries = 0;
    })
    .await?;
    let leader = cluster.leader().await?;
    let mut last = 0;
    for i in 0..60 {
        let doc = format!(
            r#"{{"apiVersion":"tollgate/v1","kind":"License","id":"j{i}","customer":"C","keys":[{{"key":"tg_join_{i}"}}],"models":[{{"model":"demo-classifier","versions":{{"major":2}}}}]}}"#
        );
        let r = cluster
            .node(leader)?
            .admin_ok(Method::PUT, &format!("/v1/licenses/j{i}?reason=fill"), &doc)
            .await?;
        last = r["version"].as_u64().unwrap_or(0);
    }
    // The leader compacted its log: the first entries are gone.
    let s = cluster.node(leader)?.status().await?;
    assert!(s["raft"]["purged_index"].as_u64().unwrap_or(0) > 0, "{s}");

    let new = cluster.join(0).await?;
    cluster.wait_version(last).await?;
    let s = cluster.node(new)?.status().await?;
    assert!(
        s["raft"]["install_snapshot_rpcs_received"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "the new node must have caught up by InstallSnapshot: {s}"
    );
    let (_, d) = cluster
        .node(new)?
        .post("/v1/check", &demo_check("tg_join_0"))
        .await?;
    assert_eq!(d["license_id"], "j0", "{d}");

    // It was promoted to voter; then it can be removed again.
    let c = cluster
        .node(leader)?
        .admin_ok(Method::GET, "/v1/cluster", "")
        .await?;
    let nodes = c["nodes"].as_array().cloned().unwrap_or_default();
    assert_eq!(nodes.len(), 4, "{c}");
    assert!(nodes.iter().all(|n| n["voter"] == true), "{c}");
    let id = new + 1;
    cluster
        .node(leader)?
        .admin_ok(
            Method::DELETE,
            &format!("/v1/cluster/nodes/{id}?reason=test"),
            "",
        )
        .await?;
    let c = cluster
        .node(leader)?
        .admin_ok(Method::GET, "/v1/cluster", "")
        .await?;
    assert_eq!(c["nodes"].as_array().map(Vec::len), Some(3), "{c}");
    Ok(())
}
