use std::time::Duration;

use reqwest::Method;
use tollgate_tests::webhook::Receiver;
use tollgate_tests::{TestNode, demo_check};

/// A license whose 4th inference of the day crosses its 80% threshold,
/// alerting `webhook`.
fn alerted_license(webhook: &str) -> String {
    format!(
        r#"
apiVersion: tollgate/v1
kind: License
id: alerted
customer: Acme
keys:
  - key: tg_alerted
    id: edge
models:
  - model: demo-classifier
    versions: {{ major: 2 }}
governance:
  owner: licensing@acme.example
  webhook: {webhook}
quotas:
  - id: daily
    metric: inferences
    limit: 5
    window: day
    alert_thresholds: [0.8]
"#
    )
}

#[tokio::test]
async fn a_threshold_crossing_is_delivered_exactly_once_despite_a_failed_first_attempt()
-> anyhow::Result<()> {
    let receiver = Receiver::start(1).await?;
    let dir = tempfile::tempdir()?;
    let secret_file = dir.path().join("alerts.secret");
    std::fs::write(&secret_file, "s3cret\n")?;
    let n = TestNode::start_with(dir.path(), |s| {
        s.alerts.retry_initial_ms = 100;
        s.alerts.signing_secret_file = Some(secret_file.clone());
    })
    .await?;
    n.admin_ok(
        Method::PUT,
        "/v1/licenses/alerted?reason=test",
        &alerted_license(&receiver.url),
    )
    .await?;

    for i in 1..=3 {
        let (_, body) = n.post("/v1/check", &demo_check("tg_alerted")).await?;
        assert_eq!(body["decision"], "allow", "check {i}: {body}");
    }
    assert!(receiver.received().is_empty(), "nothing crossed yet");
    let (_, body) = n.post("/v1/check", &demo_check("tg_alerted")).await?;
    assert_eq!(body["decision"], "allow", "{body}");
    assert_eq!(body["warnings"][0]["code"], "threshold_crossed", "{body}");

    let got = receiver
        .wait_for(Duration::from_secs(10), |r| {
            r.iter().any(|x| x.status == 200)
        })
        .await;
    assert_eq!(got.len(), 2, "one failure, then one success: {got:#?}");
    assert_eq!(got[0].status, 500);
    assert_eq!(got[1].status, 200);
    let key = got[0].idempotency_key.clone().expect("an idempotency key");
    assert_eq!(got[1].idempotency_key.as_deref(), Some(key.as_str()));
    assert_eq!(
        got[0].body, got[1].body,
        "every attempt sends the same body"
    );
    let event = &got[1].body;
    assert_eq!(got[1].event.as_deref(), Some("threshold_crossed"));
    assert_eq!(event["event"], "threshold_crossed", "{event}");
    assert_eq!(event["id"], key.as_str(), "{event}");
    assert_eq!(event["license"], "alerted", "{event}");
    assert_eq!(event["owner"], "licensing@acme.example", "{event}");
    assert_eq!(event["quota"], "daily", "{event}");
    assert_eq!(event["threshold"], 0.8, "{event}");
    assert_eq!(event["used"], 4, "{event}");
    assert_eq!(event["limit"], 5, "{event}");
    assert_eq!(event["node"], 1, "{event}");
    assert!(event["window"]["start"].is_string(), "{event}");
    assert!(event["time"].is_string(), "{event}");
    // Signed with the configured secret.
    let expected = tollgate_node::alerts::hmac_sha256(b"s3cret", &got[1].raw);
    let expected: String = expected.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        got[1].signature.as_deref(),
        Some(format!("sha256={expected}").as_str())
    );

    // The rest of the window: the 5th use, then a denial. Neither reaches a
    // threshold not yet reported, so nothing more is queued (the queue is
    // fed synchronously by the check).
    let (_, body) = n.post("/v1/check", &demo_check("tg_alerted")).await?;
    assert_eq!(body["decision"], "allow", "{body}");
    let (_, body) = n.post("/v1/check", &demo_check("tg_alerted")).await?;
    assert_eq!(body["decision"], "deny", "{body}");
    let status = n.status().await?;
    assert_eq!(status["alerts"]["queued"], 1, "{}", status["alerts"]);
    assert_eq!(status["alerts"]["delivered"], 1, "{}", status["alerts"]);
    assert_eq!(status["alerts"]["attempts"], 2, "{}", status["alerts"]);
    assert_eq!(status["alerts"]["dropped"], 0, "{}", status["alerts"]);
    assert_eq!(receiver.received().len(), 2);
    n.node.shutdown().await
}

#[tokio::test]
async fn a_webhook_must_be_an_http_url_without_credentials() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let version = n.version().await?;
    for (url, fragment) in [
        ("ftp://hooks.example/x", "http:// or https://"),
        ("https://user:pw@hooks.example/x", "credentials"),
        ("https:///x", "host"),
        ("http://hooks.example:99999/x", "port"),
    ] {
        let (status, body) = n
            .admin(
                Method::PUT,
                "/v1/licenses/alerted",
                Some(&n.token),
                &alerted_license(url),
            )
            .await?;
        assert_eq!(status, 400, "{url}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("governance.webhook"), "{message}");
        assert!(message.contains(fragment), "{url}: {message}");
    }
    assert_eq!(n.version().await?, version, "nothing changed");
    n.node.shutdown().await
}

#[tokio::test]
async fn a_deny_rate_spike_alerts_the_owner_once_per_window() -> anyhow::Result<()> {
    let receiver = Receiver::start(0).await?;
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let license = alerted_license(&receiver.url).replace(
        "  webhook:",
        "  anomalies:\n    deny_rate: { threshold: 0.5, window: 1d, min_decisions: 4 }\n  webhook:",
    );
    n.admin_ok(Method::PUT, "/v1/licenses/alerted?reason=test", &license)
        .await?;
    let wrong_model = demo_check("tg_alerted").replace("demo-classifier", "other-model");
    let (_, body) = n.post("/v1/check", &demo_check("tg_alerted")).await?;
    assert_eq!(body["decision"], "allow", "{body}");
    // 1 allowed, then denials: 1 of 2, 2 of 3, then 3 of 4 denied: a spike.
    for _ in 0..6 {
        let (_, body) = n.post("/v1/check", &wrong_model).await?;
        assert_eq!(body["reasons"][0]["code"], "model_not_granted", "{body}");
    }
    let got = receiver
        .wait_for(Duration::from_secs(10), |r| !r.is_empty())
        .await;
    assert_eq!(got.len(), 1, "{got:#?}");
    let event = &got[0].body;
    assert_eq!(event["event"], "deny_rate_spike", "{event}");
    assert_eq!(event["license"], "alerted", "{event}");
    assert_eq!(event["decisions"], 4, "{event}");
    assert_eq!(event["denied"], 3, "{event}");
    let status = n.status().await?;
    assert_eq!(
        status["alerts"]["queued"], 1,
        "once per window: {}",
        status["alerts"]
    );
    n.node.shutdown().await
}
