use chrono::{Duration, Utc};
use reqwest::Method;
use tollgate_tests::{TestNode, demo_check};

const FIVE_A_DAY: &str = r#"
apiVersion: tollgate/v1
kind: License
id: five-a-day
customer: Acme
tier: trial
status: active
keys:
  - key: tg_five_a_day
models:
  - model: demo-classifier
    versions: { major: 2 }
quotas:
  - id: daily
    metric: inferences
    limit: 5
    window: day
    scope: license
    mode: soft
    alert_thresholds: [0.8]
    on_exceed: deny
"#;

#[tokio::test]
async fn five_allow_then_quota_exceeded_until_next_utc_midnight() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let (status, body) = n
        .admin(
            Method::PUT,
            "/v1/licenses/five-a-day?reason=test",
            Some(&n.token),
            FIVE_A_DAY,
        )
        .await?;
    assert_eq!(status, 200, "{body}");

    for i in 1..=5 {
        let (_, body) = n.post("/v1/check", &demo_check("tg_five_a_day")).await?;
        assert_eq!(body["decision"], "allow", "check {i}: {body}");
        assert_eq!(body["quotas"][0]["remaining"], 5 - i, "check {i}: {body}");
    }
    let next_midnight_ms = || {
        (Utc::now() + Duration::days(1))
            .date_naive()
            .and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_millis())
    };
    let before = next_midnight_ms();
    let (_, body) = n.post("/v1/check", &demo_check("tg_five_a_day")).await?;
    let after = next_midnight_ms();
    assert_eq!(body["decision"], "deny", "{body}");
    assert_eq!(body["reasons"][0]["code"], "quota_exceeded", "{body}");
    assert_eq!(body["quotas"][0]["remaining"], 0);
    // Either side of the request, in case the run straddles midnight UTC.
    let resets_at_ms = body["quotas"][0]["resets_at_ms"].as_i64();
    assert!(resets_at_ms == before || resets_at_ms == after, "{body}");
    assert_eq!(
        body["request_adjustment"]["license"], "five-a-day",
        "{body}"
    );
    assert_eq!(body["request_adjustment"]["quota"], "daily", "{body}");
    assert!(body["retry_after_ms"].as_u64().is_some(), "{body}");
    n.node.shutdown().await
}

#[tokio::test]
async fn usage_survives_a_clean_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    for _ in 0..5 {
        let (_, body) = n.post("/v1/check", &demo_check("tg_demo_tiny")).await?;
        assert_eq!(body["decision"], "allow", "{body}");
    }
    n.node.shutdown().await?;

    let n = TestNode::start(dir.path()).await?;
    let (_, body) = n.post("/v1/check", &demo_check("tg_demo_tiny")).await?;
    assert_eq!(body["decision"], "deny", "{body}");
    assert_eq!(body["reasons"][0]["code"], "quota_exceeded", "{body}");
    n.node.shutdown().await
}

#[tokio::test]
async fn dry_run_consumes_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let dry = demo_check("tg_demo_tiny").replace("\"meters\"", "\"dry_run\":true,\"meters\"");
    for _ in 0..10 {
        let (_, body) = n.post("/v1/check", &dry).await?;
        assert_eq!(body["decision"], "allow", "{body}");
        assert_eq!(body["dry_run"], true);
    }
    let (_, body) = n.post("/v1/check", &demo_check("tg_demo_tiny")).await?;
    assert_eq!(body["quotas"][0]["used"], 1, "{body}");
    n.node.shutdown().await
}
