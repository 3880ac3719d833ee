use reqwest::Method;
use tollgate_tests::{TestNode, demo_check};

#[tokio::test]
async fn missing_or_wrong_token_gets_401_and_changes_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let before = n.version().await?;
    let (s, _) = n
        .admin(Method::POST, "/v1/licenses/demo/revoke", None, "")
        .await?;
    assert_eq!(s, 401);
    let (s, body) = n
        .admin(
            Method::POST,
            "/v1/licenses/demo/revoke",
            Some("tga_wrong"),
            "",
        )
        .await?;
    assert_eq!(s, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthenticated");
    let (s, _) = n.admin(Method::GET, "/v1/licenses", None, "").await?;
    assert_eq!(s, 401);
    assert_eq!(n.version().await?, before);
    let (_, body) = n.post("/v1/check", &demo_check("tg_demo_key")).await?;
    assert_eq!(body["decision"], "allow", "{body}");
    n.node.shutdown().await
}

#[tokio::test]
async fn malformed_license_is_rejected_with_field_path_and_version_unchanged() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let before = n.version().await?;
    let bad = "apiVersion: tollgate/v1\nkind: License\nid: broken\ncustomer: X\ntier: t\nstatus: active\nquotas:\n  - id: q\n    metric: inferences\n    limit: 0\n    window: day\n";
    let (s, body) = n
        .admin(Method::PUT, "/v1/licenses/broken", Some(&n.token), bad)
        .await?;
    assert_eq!(s, 400, "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("quotas[0].limit"),
        "message lacks the field path: {msg}"
    );
    let typo = "apiVersion: tollgate/v1\nkind: License\nid: broken\ncustomer: X\ntier: t\nstatus: active\nquotass: []\n";
    let (s, body) = n
        .admin(Method::PUT, "/v1/licenses/broken", Some(&n.token), typo)
        .await?;
    assert_eq!(s, 400, "{body}");
    assert!(body.to_string().contains("quotass"), "{body}");
    assert_eq!(n.version().await?, before);
    n.node.shutdown().await
}

#[tokio::test]
async fn issued_key_works_and_is_never_shown_again_then_revoke_denies() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let (s, body) = n
        .admin(
            Method::POST,
            "/v1/licenses/demo/keys",
            Some(&n.token),
            r#"{"name":"fleet-eu","reason":"new fleet"}"#,
        )
        .await?;
    assert_eq!(s, 200, "{body}");
    let key = body["key"].as_str().unwrap_or("").to_string();
    assert!(key.starts_with("tg_"), "{body}");
    let (_, d) = n.post("/v1/check", &demo_check(&key)).await?;
    assert_eq!(d["decision"], "allow", "{d}");
    assert_eq!(d["license_id"], "demo");

    let (s, lic) = n
        .admin(Method::GET, "/v1/licenses/demo", Some(&n.token), "")
        .await?;
    assert_eq!(s, 200);
    let text = lic.to_string();
    assert!(!text.contains(&key), "GET returned key material");
    assert!(!text.contains("tg_demo_key"), "GET returned the demo key");

    let (s, _) = n
        .admin(
            Method::POST,
            "/v1/licenses/demo/revoke",
            Some(&n.token),
            r#"{"reason":"test"}"#,
        )
        .await?;
    assert_eq!(s, 200);
    let (_, d) = n.post("/v1/check", &demo_check(&key)).await?;
    assert_eq!(d["decision"], "deny", "{d}");
    assert_eq!(d["reasons"][0]["code"], "license_revoked", "{d}");
    n.node.shutdown().await
}

#[tokio::test]
async fn rejected_write_changes_nothing_and_multi_document_apply_is_all_or_nothing()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let before = n.version().await?;
    // tg_demo_key already belongs to license `demo`.
    let thief = "apiVersion: tollgate/v1\nkind: License\nid: thief\ncustomer: X\ntier: t\nstatus: active\nkeys:\n  - key: tg_demo_key\n";
    let (s, body) = n
        .admin(Method::PUT, "/v1/licenses/thief", Some(&n.token), thief)
        .await?;
    assert_eq!(s, 409, "{body}");
    assert_eq!(n.version().await?, before, "{body}");

    let fine =
        "apiVersion: tollgate/v1\nkind: License\nid: fine\ncustomer: Y\ntier: t\nstatus: active\n";
    let both = format!("{fine}---\n{thief}");
    let (s, body) = n
        .admin(Method::POST, "/v1/apply", Some(&n.token), &both)
        .await?;
    assert_eq!(s, 409, "{body}");
    assert_eq!(
        n.version().await?,
        before,
        "a partly applied file moved the version"
    );
    let (s, _) = n
        .admin(Method::GET, "/v1/licenses/fine", Some(&n.token), "")
        .await?;
    assert_eq!(s, 404, "first document of a rejected file was applied");
    n.node.shutdown().await
}

#[tokio::test]
async fn role_tokens_read_but_only_admin_writes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let before = n.version().await?;
    let doc = "apiVersion: tollgate/v1\nkind: License\nid: by-role\ncustomer: X\ntier: t\nstatus: active\n";
    for (role, token) in [("viewer", &n.viewer_token), ("auditor", &n.auditor_token)] {
        // Both may read.
        let (s, body) = n
            .admin(Method::GET, "/v1/licenses", Some(token), "")
            .await?;
        assert_eq!(s, 200, "{role}: {body}");
        let (s, body) = n.admin(Method::GET, "/v1/cluster", Some(token), "").await?;
        assert_eq!(s, 200, "{role}: {body}");
        // Neither may write: 403 naming the role, and nothing changes.
        let (s, body) = n
            .admin(Method::PUT, "/v1/licenses/by-role", Some(token), doc)
            .await?;
        assert_eq!(s, 403, "{role}: {body}");
        assert_eq!(body["error"]["code"], "permission_denied");
        let msg = body["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains(role) && msg.contains("admin"), "{msg}");
        let (s, _) = n
            .admin(Method::POST, "/v1/licenses/demo/revoke", Some(token), "")
            .await?;
        assert_eq!(s, 403, "{role}");
    }
    assert_eq!(n.version().await?, before);
    let (_, d) = n.post("/v1/check", &demo_check("tg_demo_key")).await?;
    assert_eq!(d["decision"], "allow", "{d}");
    // The admin token still writes.
    let (s, body) = n
        .admin(Method::PUT, "/v1/licenses/by-role", Some(&n.token), doc)
        .await?;
    assert_eq!(s, 200, "{body}");
    n.node.shutdown().await
}
