use std::time::{Duration, Instant};

use reqwest::Method;
use tollgate_tests::cluster::{TestCluster, WAIT};
use tollgate_tests::demo_check;

const GOVERNED: &str = r#"
apiVersion: tollgate/v1
kind: License
id: governed
customer: Acme
keys:
  - key: tg_governed
    id: edge
models:
  - model: demo-classifier
    versions: { major: 2 }
governance:
  owner: licensing@acme.example
quotas:
  - { id: daily, metric: inferences, limit: 1, window: day, on_exceed: escalate }
"#;

fn dry(key: &str) -> String {
    demo_check(key).replace("\"meters\"", "\"dry_run\":true,\"meters\"")
}

#[tokio::test]
async fn exceptions_and_escalations_are_the_same_on_every_node() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = TestCluster::start(dir.path(), 3, |_| {}).await?;
    let put = cluster
        .node(0)?
        .admin_ok(Method::PUT, "/v1/licenses/governed?reason=test", GOVERNED)
        .await?;
    cluster
        .wait_version(put["version"].as_u64().unwrap_or(0))
        .await?;

    // Asked at one node, approved at another, in force at the third.
    let (status, asked) = cluster
        .node(0)?
        .post(
            "/v1/exceptions",
            r#"{"key":"tg_governed","quota":"daily","amount":10,"reason":"load test"}"#,
        )
        .await?;
    assert_eq!(status, 201, "{asked}");
    let id = asked["id"].as_str().expect("an id").to_string();
    let approved = cluster
        .node(1)?
        .admin_ok(
            Method::POST,
            &format!("/v1/exceptions/{id}/approve"),
            r#"{"until":"1h","reason":"ok"}"#,
        )
        .await?;
    assert_eq!(approved["state"], "active", "{approved}");
    let version = cluster.node(1)?.version().await?;
    cluster.wait_version(version).await?;
    for i in cluster.running() {
        let (_, d) = cluster
            .node(i)?
            .post("/v1/check", &dry("tg_governed"))
            .await?;
        assert_eq!(d["quotas"][0]["limit"], 11, "node {i}: {d}");
        let list = cluster
            .node(i)?
            .admin_ok(Method::GET, "/v1/exceptions", "")
            .await?;
        assert_eq!(list["exceptions"][0]["state"], "active", "node {i}: {list}");
    }

    // A violation at every node opens one escalation, seen everywhere.
    let deadline = Instant::now() + WAIT;
    for i in cluster.running() {
        // Uses at this node until it denies for the quota being spent (the
        // cluster's count comes by gossip; near the limit a node may also
        // hold back for a moment, which is not the violation).
        loop {
            let (_, d) = cluster
                .node(i)?
                .post("/v1/check", &demo_check("tg_governed"))
                .await?;
            let exceeded = d["reasons"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["code"] == "quota_exceeded"));
            if exceeded {
                break;
            }
            assert!(Instant::now() < deadline, "node {i} never denied: {d}");
            if d["decision"] != "allow" {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    for i in cluster.running() {
        loop {
            let list = cluster
                .node(i)?
                .admin_ok(Method::GET, "/v1/escalations?license=governed", "")
                .await?;
            let records = list["escalations"].as_array().cloned().unwrap_or_default();
            if !records.is_empty() {
                assert_eq!(records.len(), 1, "node {i}: {list}");
                assert_eq!(records[0]["rule"], "quotas[daily]", "node {i}: {list}");
                assert_eq!(records[0]["status"], "open", "node {i}: {list}");
                break;
            }
            assert!(Instant::now() < deadline, "node {i} sees no escalation");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

#[tokio::test]
async fn gossip_lag_over_a_license_bound_alerts_its_owner_once() -> anyhow::Result<()> {
    let receiver = tollgate_tests::webhook::Receiver::start(0).await?;
    let dir = tempfile::tempdir()?;
    let cluster = TestCluster::start(dir.path(), 2, |s| {
        s.enable_fault_injection = true;
        s.alerts.lag_check_interval_ms = 100;
    })
    .await?;
    let license = GOVERNED.replace(
        "  owner: licensing@acme.example\n",
        &format!(
            "  owner: licensing@acme.example\n  webhook: {}\n  anomalies: {{ gossip_lag: 1s }}\n",
            receiver.url
        ),
    );
    let put = cluster
        .node(0)?
        .admin_ok(Method::PUT, "/v1/licenses/governed?reason=test", &license)
        .await?;
    cluster
        .wait_version(put["version"].as_u64().unwrap_or(0))
        .await?;
    // Node 1 stops hearing node 2, then counts a use node 2 never acks.
    cluster
        .node(0)?
        .admin_ok(Method::POST, "/v1/admin/gossip/faults", r#"{"drop":[2]}"#)
        .await?;
    let (_, d) = cluster
        .node(0)?
        .post("/v1/check", &demo_check("tg_governed"))
        .await?;
    assert_eq!(d["decision"], "allow", "{d}");

    let got = receiver
        .wait_for(WAIT, |r| {
            r.iter().any(|x| x.event.as_deref() == Some("gossip_lag"))
        })
        .await;
    let lag: Vec<_> = got
        .iter()
        .filter(|x| x.event.as_deref() == Some("gossip_lag"))
        .collect();
    assert_eq!(lag.len(), 1, "{got:#?}");
    let event = &lag[0].body;
    assert_eq!(event["node"], 1, "{event}");
    assert_eq!(event["peer"], 2, "{event}");
    assert_eq!(event["bound_ms"], 1_000, "{event}");
    assert!(event["lag_ms"].as_i64().unwrap_or(0) > 1_000, "{event}");
    // Still lagging a while later: the same episode, no second alert.
    let status = cluster.node(0)?.status().await?;
    let queued = status["alerts"]["queued"].as_u64().unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = cluster.node(0)?.status().await?;
    assert_eq!(
        status["alerts"]["queued"].as_u64(),
        Some(queued),
        "{}",
        status["alerts"]
    );
    cluster
        .node(0)?
        .admin_ok(Method::POST, "/v1/admin/gossip/faults", r#"{"drop":[]}"#)
        .await?;
    Ok(())
}
