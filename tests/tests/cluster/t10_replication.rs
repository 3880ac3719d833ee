use reqwest::Method;
use tollgate_tests::cluster::TestCluster;
use tollgate_tests::demo_check;

const LICENSE: &str = r#"{"apiVersion":"tollgate/v1","kind":"License","id":"acme","customer":"Acme","keys":[{"key":"tg_acme_key"}],"models":[{"model":"demo-classifier","versions":{"major":2}}]}"#;

#[tokio::test]
async fn a_write_to_a_follower_commits_everywhere_and_decisions_carry_the_version()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = TestCluster::start(dir.path(), 3, |_| {}).await?;
    let follower = cluster.follower().await?;
    let r = cluster
        .node(follower)?
        .admin_ok(Method::PUT, "/v1/licenses/acme?reason=onboarding", LICENSE)
        .await?;
    let version = r["version"].as_u64().unwrap_or(0);
    assert!(version > 0, "{r}");
    // The answering follower has applied its own write already.
    assert!(cluster.node(follower)?.version().await? >= version);
    cluster.wait_version(version).await?;
    for i in cluster.running() {
        let (status, d) = cluster
            .node(i)?
            .post("/v1/check", &demo_check("tg_acme_key"))
            .await?;
        assert_eq!(status, 200, "{d}");
        assert_eq!(d["license_id"], "acme", "node {i}: {d}");
        assert!(
            d["policy_version"].as_u64().unwrap_or(0) >= version,
            "node {i}: {d}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_revoked_key_is_denied_on_every_node_and_status_lists_every_member() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let cluster = TestCluster::start(dir.path(), 3, |_| {}).await?;
    let leader = cluster.leader().await?;
    let node = cluster.node(leader)?;
    let issued = node
        .admin_ok(
            Method::POST,
            "/v1/licenses/demo/keys",
            r#"{"name":"fleet","reason":"new fleet"}"#,
        )
        .await?;
    let key = issued["key"].as_str().unwrap_or_default().to_string();
    cluster
        .wait_version(issued["version"].as_u64().unwrap_or(0))
        .await?;
    for i in cluster.running() {
        let (_, d) = cluster
            .node(i)?
            .post("/v1/check", &demo_check(&key))
            .await?;
        assert_eq!(d["decision"], "allow", "node {i}: {d}");
    }
    let revoked = node
        .admin_ok(
            Method::POST,
            "/v1/licenses/demo/keys/fleet/revoke",
            r#"{"reason":"leaked"}"#,
        )
        .await?;
    cluster
        .wait_version(revoked["version"].as_u64().unwrap_or(0))
        .await?;
    for i in cluster.running() {
        let (_, d) = cluster
            .node(i)?
            .post("/v1/check", &demo_check(&key))
            .await?;
        assert_eq!(d["decision"], "deny", "node {i}: {d}");
        assert!(
            d["license_id"].is_null() || d["license_id"] == "",
            "node {i}: {d}"
        );
    }
    // Revoking it again is refused and changes nothing.
    let (status, body) = node
        .admin(
            Method::POST,
            "/v1/licenses/demo/keys/fleet/revoke",
            Some(cluster.token()),
            "",
        )
        .await?;
    assert_eq!(status, 409, "{body}");

    let c = cluster
        .node(0)?
        .admin_ok(Method::GET, "/v1/cluster", "")
        .await?;
    let nodes = c["nodes"].as_array().cloned().unwrap_or_default();
    assert_eq!(nodes.len(), 3, "{c}");
    for n in &nodes {
        assert_eq!(n["reachable"], true, "{c}");
        assert_eq!(n["voter"], true, "{c}");
        assert!(n["lag"].as_u64().is_some(), "{c}");
        assert!(
            n["region"]
                .as_str()
                .unwrap_or_default()
                .starts_with("local-"),
            "{c}"
        );
    }
    assert_eq!(
        c["leader"].as_u64(),
        Some(u64::try_from(leader)? + 1),
        "{c}"
    );
    Ok(())
}
