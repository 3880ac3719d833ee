use reqwest::Method;
use tollgate_tests::cluster::TestCluster;

fn license(i: usize) -> String {
    format!(
        r#"{{"apiVersion":"tollgate/v1","kind":"License","id":"bulk-{id}","customer":"C{i}","quotas":[{{"id":"daily","metric":"inferences","limit":{limit},"window":"day"}}]}}"#,
        id = i % 20,
        limit = i + 1
    )
}

/// The licenses as node `i` serves them, for comparing nodes.
async fn contents(cluster: &TestCluster, i: usize) -> anyhow::Result<Vec<serde_json::Value>> {
    let node = cluster.node(i)?;
    let list = node.admin_ok(Method::GET, "/v1/licenses", "").await?;
    let mut out = Vec::new();
    for l in list["licenses"].as_array().cloned().unwrap_or_default() {
        let id = l["id"].as_str().unwrap_or_default();
        let full = node
            .admin_ok(Method::GET, &format!("/v1/licenses/{id}"), "")
            .await?;
        out.push(full["license"].clone());
    }
    Ok(out)
}

#[tokio::test]
async fn a_node_stopped_during_200_writes_converges_after_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = TestCluster::start(dir.path(), 3, |_| {}).await?;
    let leader = cluster.leader().await?;
    let down = cluster.follower().await?;
    cluster.stop(down).await?;

    let mut last = 0;
    for i in 0..200 {
        let doc = license(i);
        let id = format!("bulk-{}", i % 20);
        let r = cluster
            .node(leader)?
            .admin_ok(Method::PUT, &format!("/v1/licenses/{id}?reason=bulk"), &doc)
            .await?;
        let v = r["version"].as_u64().unwrap_or(0);
        assert!(v > last, "versions must grow: {v} after {last}");
        last = v;
    }
    cluster.restart(down).await?;
    cluster.wait_version(last).await?;
    // A leader change while the node rejoins commits an entry of its own,
    // which moves the version past the last write: every node must reach
    // the leader's version, whatever it is, and hold the same licenses.
    let mut target = last;
    for i in cluster.running() {
        target = target.max(cluster.node(i)?.version().await?);
    }
    assert!(
        target <= last + 2,
        "version {target}: more than a leader change after {last}"
    );
    cluster.wait_version(target).await?;
    let want = contents(&cluster, leader).await?;
    assert_eq!(want.len(), 25, "20 bulk licenses and the 5 demo ones");
    for i in cluster.running() {
        assert!(
            cluster.node(i)?.version().await? >= target,
            "node {i} version"
        );
        assert_eq!(contents(&cluster, i).await?, want, "node {i} content");
    }
    Ok(())
}
