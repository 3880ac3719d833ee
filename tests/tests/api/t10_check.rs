use tollgate_proto::v1 as pb;
use tollgate_proto::v1::edge_client::EdgeClient;
use tollgate_tests::{TestNode, demo_check};

#[tokio::test]
async fn demo_check_over_http_allows_with_quotas_and_version() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let (status, body) = n.post("/v1/check", &demo_check("tg_demo_key")).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["decision"], "allow", "{body}");
    assert!(body["policy_version"].as_u64().unwrap_or(0) > 0, "{body}");
    assert!(!body["decision_id"].as_str().unwrap_or("").is_empty());
    let q = &body["quotas"][0];
    assert_eq!(q["metric"], "inferences");
    assert_eq!(q["used"], 1);
    assert_eq!(
        q["remaining"].as_u64(),
        Some(q["limit"].as_u64().unwrap_or(0) - 1)
    );
    n.node.shutdown().await
}

#[tokio::test]
async fn grpc_and_http_agree_and_unknown_key_is_a_normal_deny() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let mut edge = EdgeClient::connect(n.grpc.clone()).await?;
    let req = pb::CheckRequest {
        key: "tg_demo_key".into(),
        model: "demo-classifier".into(),
        model_version: "2.1.0".into(),
        environment: "production".into(),
        region: "local-a".into(),
        meters: vec![pb::Meter {
            metric: "inferences".into(),
            quantity: 2,
        }],
        ..Default::default()
    };
    let r = edge.check(req.clone()).await?.into_inner();
    assert_eq!(r.decision, "allow");
    assert_eq!(r.outcome, pb::Outcome::Allow as i32);
    assert_eq!(r.quotas[0].used, 2);

    // HTTP sees the usage the gRPC call added.
    let (_, body) = n.post("/v1/check", &demo_check("tg_demo_key")).await?;
    assert_eq!(body["quotas"][0]["used"], 3, "{body}");

    let unknown = edge
        .check(pb::CheckRequest {
            key: "tg_nope".into(),
            ..req
        })
        .await?
        .into_inner();
    assert_eq!(unknown.decision, "deny");
    assert_eq!(unknown.reasons[0].code, "unknown_key");
    n.node.shutdown().await
}

#[tokio::test]
async fn wrong_major_is_denied_with_reason_and_rule() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let body = demo_check("tg_demo_key").replace("2.1.0", "1.4.0");
    let (status, body) = n.post("/v1/check", &body).await?;
    assert_eq!(status, 200);
    assert_eq!(body["decision"], "deny", "{body}");
    assert_eq!(
        body["reasons"][0]["code"], "model_version_not_allowed",
        "{body}"
    );
    assert!(!body["reasons"][0]["rule"].as_str().unwrap_or("").is_empty());
    n.node.shutdown().await
}
