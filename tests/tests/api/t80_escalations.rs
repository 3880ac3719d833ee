use std::time::Duration;

use reqwest::Method;
use tollgate_tests::webhook::Receiver;
use tollgate_tests::{TestNode, demo_check};

fn escalating_license(webhook: &str) -> String {
    format!(
        r#"
apiVersion: tollgate/v1
kind: License
id: escalating
customer: Acme
keys:
  - key: tg_escalating
models:
  - model: demo-classifier
    versions: {{ major: 2 }}
governance:
  owner: licensing@acme.example
  webhook: {webhook}
  escalation_deadline: 4h
quotas:
  - {{ id: daily, metric: inferences, limit: 1, window: day, on_exceed: escalate }}
"#
    )
}

#[tokio::test]
async fn a_violation_that_escalates_opens_one_record_for_the_owner() -> anyhow::Result<()> {
    let receiver = Receiver::start(0).await?;
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    n.admin_ok(
        Method::PUT,
        "/v1/licenses/escalating?reason=test",
        &escalating_license(&receiver.url),
    )
    .await?;
    let (_, body) = n.post("/v1/check", &demo_check("tg_escalating")).await?;
    assert_eq!(body["decision"], "allow", "{body}");
    for _ in 0..3 {
        let (_, body) = n.post("/v1/check", &demo_check("tg_escalating")).await?;
        assert_eq!(body["decision"], "deny", "{body}");
        assert_eq!(body["reasons"][0]["code"], "quota_exceeded", "{body}");
    }
    // Three denials, one proposal: the node remembers what it proposed.
    let status = n.status().await?;
    assert_eq!(
        status["alerts"]["escalations_proposed"], 1,
        "{}",
        status["alerts"]
    );

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let list = loop {
        let (status, list) = n
            .admin(Method::GET, "/v1/escalations", Some(&n.viewer_token), "")
            .await?;
        assert_eq!(status, 200, "{list}");
        if list["escalations"]
            .as_array()
            .is_some_and(|l| !l.is_empty())
        {
            break list;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no escalation opened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let records = list["escalations"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    assert_eq!(records.len(), 1, "{list}");
    let e = &records[0];
    assert_eq!(e["license"], "escalating", "{e}");
    assert_eq!(e["rule"], "quotas[daily]", "{e}");
    assert_eq!(e["owner"], "licensing@acme.example", "{e}");
    assert_eq!(e["status"], "open", "{e}");
    assert_eq!(e["opened_by"], "node-1", "{e}");
    assert_eq!(e["overdue"], false, "{e}");
    let opened = e["opened_at_ms"].as_i64().unwrap_or_default();
    assert_eq!(
        e["deadline_ms"].as_i64(),
        Some(opened + 4 * 3_600_000),
        "{e}"
    );
    let id = e["id"].as_str().expect("an id").to_string();

    // The owner hears of it.
    let got = receiver
        .wait_for(Duration::from_secs(10), |r| {
            r.iter()
                .any(|x| x.event.as_deref() == Some("escalation_opened"))
        })
        .await;
    let hook = got
        .iter()
        .find(|x| x.event.as_deref() == Some("escalation_opened"))
        .expect("an escalation_opened webhook");
    assert_eq!(hook.body["escalation"]["id"], id.as_str(), "{}", hook.body);
    assert_eq!(hook.body["owner"], "licensing@acme.example");

    // Viewers read, admins resolve.
    let resolve = format!("/v1/escalations/{id}/resolve");
    let body = r#"{"reason":"moved to a bigger plan"}"#;
    let (status, b) = n
        .admin(Method::POST, &resolve, Some(&n.viewer_token), body)
        .await?;
    assert_eq!(status, 403, "{b}");
    let (status, b) = n
        .admin(Method::POST, &resolve, Some(&n.token), body)
        .await?;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["status"], "resolved", "{b}");
    assert_eq!(b["resolution"], "moved to a bigger plan", "{b}");
    assert_eq!(b["updated_by"], "admin", "{b}");
    let (status, b) = n
        .admin(Method::POST, &resolve, Some(&n.token), body)
        .await?;
    assert_eq!(status, 409, "resolved once: {b}");
    let (status, b) = n
        .admin(
            Method::POST,
            "/v1/escalations/esc-0/resolve",
            Some(&n.token),
            body,
        )
        .await?;
    assert_eq!(status, 404, "{b}");

    let history = n
        .admin_ok(Method::GET, "/v1/licenses/escalating/history", "")
        .await?;
    let kinds: Vec<&str> = history["history"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|r| r["action"]["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["put", "escalation_opened", "escalation_resolved"]);
    n.node.shutdown().await
}

#[tokio::test]
async fn escalate_needs_a_governance_owner() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let without = escalating_license("http://127.0.0.1:9/hook").replace(
        "governance:\n  owner: licensing@acme.example\n  webhook: http://127.0.0.1:9/hook\n  escalation_deadline: 4h\n",
        "",
    );
    let (status, body) = n
        .admin(
            Method::PUT,
            "/v1/licenses/escalating",
            Some(&n.token),
            &without,
        )
        .await?;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("quotas[0].on_exceed: "), "{message}");
    n.node.shutdown().await
}
