use reqwest::Method;
use tollgate_tests::{TestNode, demo_check};

#[tokio::test]
async fn only_auditors_and_admins_read_the_audit_log() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let (status, d) = n.post("/v1/check", &demo_check("tg_demo_key")).await?;
    assert_eq!(status, 200, "{d}");
    n.wait_audited(1).await?;
    for path in ["/v1/audit", "/v1/audit/verify"] {
        let (viewer, body) = n.get_text(path, Some(&n.viewer_token)).await?;
        assert_eq!(viewer, 403, "{path}: {body}");
        assert!(body.contains("permission_denied"), "{body}");
        let (anonymous, _) = n.get_text(path, None).await?;
        assert_eq!(anonymous, 401, "{path}");
        let (wrong, _) = n.get_text(path, Some("tga_not_a_token")).await?;
        assert_eq!(wrong, 401, "{path}");
        let (auditor, body) = n.get_text(path, Some(&n.auditor_token)).await?;
        assert_eq!(auditor, 200, "{path}: {body}");
        let (admin, _) = n.get_text(path, Some(&n.token)).await?;
        assert_eq!(admin, 200, "{path}");
    }
    // An auditor reads; it cannot write.
    let (status, body) = n
        .admin(
            Method::POST,
            "/v1/licenses/demo/revoke",
            Some(&n.auditor_token),
            r#"{"reason":"not allowed"}"#,
        )
        .await?;
    assert_eq!(status, 403, "{body}");
    n.node.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn bad_export_queries_and_bad_hashes_get_400_and_change_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let n = TestNode::start(dir.path()).await?;
    let before = n.wait_audited(1).await?["appended"].as_u64().unwrap_or(0);
    for query in [
        "since=yesterday",
        "limit=0",
        "limit=100001",
        "limit=ten",
        "after_seq=-1",
        "sinse=0",
    ] {
        let (status, body) = n
            .get_text(&format!("/v1/audit?{query}"), Some(&n.auditor_token))
            .await?;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains("invalid_argument"), "{query}: {body}");
    }
    for (field, value) in [
        ("input_hash", "xyz"),
        ("input_hash", "ab"),
        ("output_hash", &"a".repeat(65)),
        ("output_hash", &"ab".repeat(65)),
    ] {
        let body = demo_check("tg_demo_key").replace(
            r#""region":"local-a""#,
            &format!(r#""region":"local-a","{field}":"{value}""#),
        );
        let (status, d) = n.post("/v1/check", &body).await?;
        assert_eq!(status, 400, "{field}={value}: {d}");
        assert!(
            d["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(field)),
            "{d}"
        );
    }
    // One good check after them: exactly one more record.
    let (status, d) = n.post("/v1/check", &demo_check("tg_demo_key")).await?;
    assert_eq!(status, 200, "{d}");
    let after = n.wait_audited(before + 1).await?;
    assert_eq!(after["appended"].as_u64(), Some(before + 1), "{after}");
    n.node.shutdown().await?;
    Ok(())
}
