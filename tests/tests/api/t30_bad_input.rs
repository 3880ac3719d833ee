use tollgate_tests::{TestNode, demo_check};

/// demo-tiny's remaining quota as a dry run sees it (proves the node serves).
async fn remaining(n: &TestNode) -> anyhow::Result<serde_json::Value> {
    let dry = demo_check("tg_demo_tiny").replace("\"meters\"", "\"dry_run\":true,\"meters\"");
    let (ok, after) = n.post("/v1/check", &dry).await?;
    assert_eq!(ok, 200, "{after}");
    let remaining = after["quotas"][0]["remaining"].as_u64();
    anyhow::ensure!(remaining.is_some(), "dry run without quota status: {after}");
    Ok(after["quotas"][0]["remaining"].clone())
}

/// Sends `body` to /v1/check and expects `status`; then proves the node still
/// serves and that demo-tiny's usage did not move.
async fn check(n: &TestNode, body: &str, status: u16, needle: &str) -> anyhow::Result<()> {
    let before = remaining(n).await?;
    let (got, resp) = n.post("/v1/check", body).await?;
    assert_eq!(got, status, "body {body:.200}: {resp}");
    if !needle.is_empty() {
        assert!(
            resp.to_string().contains(needle),
            "expected `{needle}` in {resp}"
        );
    }
    assert_eq!(remaining(n).await?, before, "bad input changed usage");
    Ok(())
}

#[tokio::test]
async fn malformed_requests_get_400_with_a_reason_and_change_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let good = demo_check("tg_demo_tiny");
    check(
        &n,
        &good.replace(r#""model":"demo-classifier","#, ""),
        400,
        "model",
    )
    .await?;
    check(
        &n,
        &good.replace(r#""quantity":1"#, r#""quantity":-3"#),
        400,
        "quantity",
    )
    .await?;
    check(
        &n,
        &good.replace(r#""quantity":1"#, r#""quantity":1000000000000000"#),
        400,
        "quantity",
    )
    .await?;
    check(
        &n,
        &good.replace(r#""quantity":1"#, r#""quantity":0"#),
        400,
        "quantity",
    )
    .await?;
    let meters: Vec<String> = (0..17)
        .map(|i| format!(r#"{{"metric":"m{i}","quantity":1}}"#))
        .collect();
    let many = good.replace(
        r#"[{"metric":"inferences","quantity":1}]"#,
        &format!("[{}]", meters.join(",")),
    );
    check(&n, &many, 400, "meters").await?;
    check(
        &n,
        &good.replace(r#""region""#, r#""regoin""#),
        400,
        "regoin",
    )
    .await?;
    check(&n, "{not json", 400, "JSON").await?;
    check(&n, "[1,2,3]", 400, "object").await?;
    let huge = format!(r#"{{"key":"{}"}}"#, "x".repeat(1024 * 1024));
    let (status, _) = n.post("/v1/check", &huge).await?;
    assert_eq!(status, 413, "1 MiB body");
    n.node.shutdown().await
}

#[tokio::test]
async fn grpc_bad_input_is_invalid_argument_and_changes_nothing() -> anyhow::Result<()> {
    use tollgate_proto::v1 as pb;
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let before = remaining(&n).await?;
    let mut edge = tollgate_proto::v1::edge_client::EdgeClient::connect(n.grpc.clone()).await?;
    let good = pb::CheckRequest {
        key: "tg_demo_tiny".into(),
        model: "demo-classifier".into(),
        model_version: "2.1.0".into(),
        meters: vec![pb::Meter {
            metric: "inferences".into(),
            quantity: 1,
        }],
        ..Default::default()
    };
    let no_model = pb::CheckRequest {
        model: String::new(),
        ..good.clone()
    };
    let absurd = pb::CheckRequest {
        meters: vec![pb::Meter {
            metric: "inferences".into(),
            quantity: u64::MAX,
        }],
        ..good.clone()
    };
    let many = pb::CheckRequest {
        meters: (0..17)
            .map(|i| pb::Meter {
                metric: format!("m{i}"),
                quantity: 1,
            })
            .collect(),
        ..good.clone()
    };
    let huge = pb::CheckRequest {
        key: "x".repeat(1024 * 1024),
        ..good.clone()
    };
    for (what, req) in [
        ("no model", no_model),
        ("absurd", absurd),
        ("17 meters", many),
        ("1 MiB", huge),
    ] {
        let err = edge.check(req).await.err();
        let code = err.as_ref().map(|s| s.code());
        assert!(
            matches!(
                code,
                Some(tonic::Code::InvalidArgument)
                    | Some(tonic::Code::OutOfRange)
                    | Some(tonic::Code::ResourceExhausted)
            ),
            "{what}: {err:?}"
        );
    }
    assert_eq!(remaining(&n).await?, before, "bad input changed usage");
    n.node.shutdown().await
}
