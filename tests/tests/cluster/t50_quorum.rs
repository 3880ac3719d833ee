use std::time::{Duration, Instant};

use reqwest::Method;
use tollgate_tests::cluster::TestCluster;
use tollgate_tests::demo_check;

#[tokio::test]
async fn without_quorum_writes_fail_fast_with_no_quorum_and_checks_still_answer()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster =
        TestCluster::start(dir.path(), 3, |s| s.raft.write_timeout_ms = 2_000).await?;
    let leader = cluster.leader().await?;
    // Keep the leader: the hardest case, a leader that lost its followers.
    for i in cluster.running() {
        if i != leader {
            cluster.stop(i).await?;
        }
    }
    let survivor = cluster.node(leader)?;
    let started = Instant::now();
    let (status, body) = survivor
        .admin(
            Method::PUT,
            "/v1/licenses/nq?reason=test",
            Some(cluster.token()),
            r#"{"apiVersion":"tollgate/v1","kind":"License","id":"nq","customer":"C"}"#,
        )
        .await?;
    let took = started.elapsed();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "no_quorum", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("no quorum"),
        "{body}"
    );
    // Bounded by the write timeout (plus slack for a loaded machine).
    assert!(took < Duration::from_millis(2_000 + 3_000), "took {took:?}");

    let (status, d) = survivor
        .post("/v1/check", &demo_check("tg_demo_key"))
        .await?;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["decision"], "allow", "{d}");
    Ok(())
}

#[tokio::test]
async fn a_lone_follower_reports_no_quorum_too() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster =
        TestCluster::start(dir.path(), 3, |s| s.raft.write_timeout_ms = 2_000).await?;
    let follower = cluster.follower().await?;
    for i in cluster.running() {
        if i != follower {
            cluster.stop(i).await?;
        }
    }
    let node = cluster.node(follower)?;
    let started = Instant::now();
    let (status, body) = node
        .admin(
            Method::POST,
            "/v1/licenses/demo/revoke",
            Some(cluster.token()),
            r#"{"reason":"test"}"#,
        )
        .await?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "no_quorum", "{body}");
    assert!(started.elapsed() < Duration::from_millis(2_000 + 3_000));
    let (_, d) = node.post("/v1/check", &demo_check("tg_demo_key")).await?;
    assert_eq!(d["decision"], "allow", "{d}");
    Ok(())
}
