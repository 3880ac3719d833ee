use std::time::Duration;

use reqwest::Method;
use tollgate_tests::{TestNode, demo_check};

const TWO_A_DAY: &str = r#"
apiVersion: tollgate/v1
kind: License
id: two-a-day
customer: Acme
keys:
  - key: tg_two_a_day
    id: edge
models:
  - model: demo-classifier
    versions: { major: 2 }
quotas:
  - { id: daily, metric: inferences, limit: 2, window: day }
"#;

/// A dry-run Check: it decides against the limit in force and consumes
/// nothing, so it can be repeated while waiting for an exception to end.
fn dry_check(key: &str) -> String {
    demo_check(key).replace("\"meters\"", "\"dry_run\":true,\"meters\"")
}

#[tokio::test]
async fn an_approved_exception_lets_the_next_check_pass_until_it_expires() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    n.admin_ok(Method::PUT, "/v1/licenses/two-a-day?reason=test", TWO_A_DAY)
        .await?;
    for _ in 0..2 {
        let (_, body) = n.post("/v1/check", &demo_check("tg_two_a_day")).await?;
        assert_eq!(body["decision"], "allow", "{body}");
    }
    let (_, body) = n.post("/v1/check", &demo_check("tg_two_a_day")).await?;
    assert_eq!(body["decision"], "deny", "{body}");
    assert_eq!(body["reasons"][0]["code"], "quota_exceeded", "{body}");

    // The edge caller asks with its own API key.
    let (status, asked) = n
        .post(
            "/v1/exceptions",
            r#"{"key":"tg_two_a_day","quota":"daily","amount":3,"reason":"launch day"}"#,
        )
        .await?;
    assert_eq!(status, 201, "{asked}");
    let id = asked["id"].as_str().expect("an id").to_string();
    assert_eq!(asked["state"], "pending", "{asked}");
    assert_eq!(asked["license"], "two-a-day", "{asked}");
    assert_eq!(asked["requested_by"], "key:edge", "{asked}");
    let (_, body) = n.post("/v1/check", &demo_check("tg_two_a_day")).await?;
    assert_eq!(body["decision"], "deny", "pending changes nothing: {body}");

    // Only an admin decides.
    let approve = format!("/v1/exceptions/{id}/approve");
    let body = r#"{"until":"2s","reason":"approved for the launch"}"#;
    for token in [&n.viewer_token, &n.auditor_token] {
        let (status, b) = n.admin(Method::POST, &approve, Some(token), body).await?;
        assert_eq!(status, 403, "{b}");
    }
    let (status, b) = n.admin(Method::POST, &approve, None, body).await?;
    assert_eq!(status, 401, "{b}");
    let (status, approved) = n
        .admin(Method::POST, &approve, Some(&n.token), body)
        .await?;
    assert_eq!(status, 200, "{approved}");
    assert_eq!(approved["state"], "active", "{approved}");

    // Over the old limit: allowed, against the raised one.
    let (_, body) = n.post("/v1/check", &demo_check("tg_two_a_day")).await?;
    assert_eq!(body["decision"], "allow", "{body}");
    assert_eq!(body["quotas"][0]["limit"], 5, "{body}");
    assert_eq!(body["quotas"][0]["used"], 3, "{body}");

    // Once it ends, the old limit is back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = n.post("/v1/check", &dry_check("tg_two_a_day")).await?;
        if body["decision"] == "deny" {
            assert_eq!(body["quotas"][0]["limit"], 2, "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still allowed: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, body) = n.post("/v1/check", &demo_check("tg_two_a_day")).await?;
    assert_eq!(body["decision"], "deny", "{body}");
    assert_eq!(body["reasons"][0]["code"], "quota_exceeded", "{body}");

    // Listed for viewers, expired; both steps in the license's history.
    let (status, list) = n
        .admin(
            Method::GET,
            "/v1/exceptions?license=two-a-day",
            Some(&n.viewer_token),
            "",
        )
        .await?;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["exceptions"][0]["id"], id.as_str(), "{list}");
    assert_eq!(list["exceptions"][0]["state"], "expired", "{list}");
    // The end is recorded too, by the node, soon after it passed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let history = loop {
        let history = n
            .admin_ok(Method::GET, "/v1/licenses/two-a-day/history", "")
            .await?;
        let last = history["history"]
            .as_array()
            .and_then(|h| h.last())
            .cloned()
            .unwrap_or_default();
        if last["action"]["kind"] == "exception_expired" {
            break history;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "end not recorded: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let steps: Vec<(String, String, String)> = history["history"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|r| r["action"]["exception"] == id.as_str())
        .map(|r| {
            (
                r["action"]["kind"].as_str().unwrap_or_default().to_string(),
                r["actor"].as_str().unwrap_or_default().to_string(),
                r["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        vec![
            (
                "exception_requested".into(),
                "key:edge".into(),
                "launch day".into()
            ),
            (
                "exception_approved".into(),
                "admin".into(),
                "approved for the launch".into()
            ),
            ("exception_expired".into(), "node-1".into(), "ended".into()),
        ]
    );
    n.node.shutdown().await
}

#[tokio::test]
async fn bad_exception_calls_get_a_clear_4xx_and_change_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    n.admin_ok(Method::PUT, "/v1/licenses/two-a-day?reason=test", TWO_A_DAY)
        .await?;
    let version = n.version().await?;
    for (token, body, want, fragment) in [
        (
            None,
            r#"{"key":"tg_nope","quota":"daily","amount":1,"reason":"x"}"#,
            401,
            "token",
        ),
        (
            None,
            r#"{"quota":"daily","amount":1,"reason":"x"}"#,
            401,
            "token",
        ),
        (
            None,
            r#"{"key":"tg_two_a_day","quota":"weekly","amount":1,"reason":"x"}"#,
            400,
            "no quota",
        ),
        (
            None,
            r#"{"key":"tg_two_a_day","quota":"daily","amount":0,"reason":"x"}"#,
            400,
            "amount",
        ),
        (
            None,
            r#"{"key":"tg_two_a_day","quota":"daily","amount":1,"reason":" "}"#,
            400,
            "reason",
        ),
        (
            None,
            r#"{"key":"tg_two_a_day","quota":"daily","amount":1}"#,
            400,
            "reason",
        ),
        (
            None,
            r#"{"key":"tg_two_a_day","license":"demo","quota":"daily","amount":1,"reason":"x"}"#,
            403,
            "another license",
        ),
        (
            None,
            r#"{"key":"tg_two_a_day","quota":"daily","amount":1,"reason":"x","colour":"red"}"#,
            400,
            "colour",
        ),
        (
            None,
            r#"{"key":"tg_two_a_day","quota":"daily","amount":1,"reason":"x","requested_until":"yesterday"}"#,
            400,
            "until",
        ),
        (
            Some("viewer"),
            r#"{"license":"two-a-day","quota":"daily","amount":1,"reason":"x"}"#,
            403,
            "admin",
        ),
        (
            Some("admin"),
            r#"{"quota":"daily","amount":1,"reason":"x"}"#,
            400,
            "license",
        ),
        (
            Some("admin"),
            r#"{"license":"gone","quota":"daily","amount":1,"reason":"x"}"#,
            404,
            "gone",
        ),
    ] {
        let token = match token {
            Some("viewer") => Some(n.viewer_token.as_str()),
            Some(_) => Some(n.token.as_str()),
            None => None,
        };
        let (status, b) = n.admin(Method::POST, "/v1/exceptions", token, body).await?;
        assert_eq!(status, want, "{body}: {b}");
        let message = b["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(fragment), "{body}: {message}");
    }
    assert_eq!(n.version().await?, version, "nothing was written");

    // An admin may ask too; then bad decisions.
    let (status, asked) = n
        .admin(
            Method::POST,
            "/v1/exceptions",
            Some(&n.token),
            r#"{"license":"two-a-day","quota":"daily","amount":1,"reason":"x"}"#,
        )
        .await?;
    assert_eq!(status, 201, "{asked}");
    assert_eq!(asked["requested_by"], "admin", "{asked}");
    let id = asked["id"].as_str().expect("an id").to_string();
    let version = n.version().await?;
    for (path, body, want) in [
        (format!("/v1/exceptions/{id}/approve"), r#"{}"#, 400),
        (
            format!("/v1/exceptions/{id}/approve"),
            r#"{"until":"2000-01-01T00:00:00Z"}"#,
            400,
        ),
        (
            format!("/v1/exceptions/{id}/approve"),
            r#"{"until":"soon"}"#,
            400,
        ),
        (
            format!("/v1/exceptions/{id}/approve"),
            r#"{"until":"400d"}"#,
            400,
        ),
        (format!("/v1/exceptions/{id}/reject"), r#"{}"#, 400),
        (
            format!("/v1/exceptions/{id}/reject"),
            r#"{"reason":"x","until":"1d"}"#,
            400,
        ),
        (
            "/v1/exceptions/exc-999999/approve".to_string(),
            r#"{"until":"1d"}"#,
            404,
        ),
    ] {
        let (status, b) = n.admin(Method::POST, &path, Some(&n.token), body).await?;
        assert_eq!(status, want, "{path} {body}: {b}");
    }
    assert_eq!(n.version().await?, version, "nothing was written");
    let reject = format!("/v1/exceptions/{id}/reject");
    let (status, b) = n
        .admin(Method::POST, &reject, Some(&n.token), r#"{"reason":"no"}"#)
        .await?;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["state"], "rejected", "{b}");
    let approve = format!("/v1/exceptions/{id}/approve");
    let (status, b) = n
        .admin(Method::POST, &approve, Some(&n.token), r#"{"until":"1d"}"#)
        .await?;
    assert_eq!(status, 409, "decided once: {b}");
    n.node.shutdown().await
}

#[tokio::test]
async fn exceptions_over_grpc_need_the_same_roles() -> anyhow::Result<()> {
    use tollgate_proto::v1 as pb;
    use tollgate_proto::v1::admin_client::AdminClient;

    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let mut admin = AdminClient::connect(n.grpc.clone()).await?;
    let ask = pb::RequestExceptionRequest {
        license_id: "demo-tiny".into(),
        quota_id: "daily".into(),
        amount: 7,
        reason: "grpc".into(),
        requested_until: String::new(),
    };
    let denied = admin
        .request_exception(authed(ask.clone(), &n.viewer_token)?)
        .await
        .expect_err("a viewer may not ask");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let asked = admin
        .request_exception(authed(ask, &n.token)?)
        .await?
        .into_inner();
    let asked: serde_json::Value = serde_json::from_str(&asked.json)?;
    let id = asked["id"].as_str().expect("an id").to_string();
    let approve = pb::ApproveExceptionRequest {
        id: id.clone(),
        until: "1h".into(),
        reason: "ok".into(),
    };
    let denied = admin
        .approve_exception(authed(approve.clone(), &n.auditor_token)?)
        .await
        .expect_err("an auditor may not approve");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let bad = pb::ApproveExceptionRequest {
        until: String::new(),
        ..approve.clone()
    };
    let invalid = admin
        .approve_exception(authed(bad, &n.token)?)
        .await
        .expect_err("until is required");
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    admin.approve_exception(authed(approve, &n.token)?).await?;
    let list = admin
        .list_exceptions(authed(
            pb::ListExceptionsRequest {
                license: "demo-tiny".into(),
                state: String::new(),
            },
            &n.viewer_token,
        )?)
        .await?
        .into_inner();
    let list: serde_json::Value = serde_json::from_str(&list.json)?;
    assert_eq!(list["exceptions"][0]["id"], id.as_str(), "{list}");
    assert_eq!(list["exceptions"][0]["state"], "active", "{list}");
    let (_, d) = n.post("/v1/check", &dry_check("tg_demo_tiny")).await?;
    assert_eq!(d["quotas"][0]["limit"], 12, "{d}");
    n.node.shutdown().await
}

/// `msg` with `Authorization: Bearer <token>`.
fn authed<T>(msg: T, token: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(req)
}
