use reqwest::Method;
use tollgate_node::settings::NodeSettings;
use tollgate_tests::cluster::TestCluster;

fn doc(limit: u64) -> String {
    format!(
        r#"{{"apiVersion":"tollgate/v1","kind":"License","id":"hist","customer":"Hist","keys":[{{"key":"tg_hist_key","id":"main"}}],"quotas":[{{"id":"daily","metric":"inferences","limit":{limit},"window":"day"}}]}}"#
    )
}

#[tokio::test]
async fn history_records_actor_reason_and_diff_and_rollback_appends_the_old_content()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = TestCluster::start(dir.path(), 3, |_| {}).await?;
    let node = cluster.node(cluster.follower().await?)?;

    let v1 = node
        .admin_ok(
            Method::PUT,
            "/v1/licenses/hist?reason=signed%20contract",
            &doc(100),
        )
        .await?["version"]
        .as_u64()
        .unwrap_or(0);
    let v2 = node
        .admin_ok(Method::PUT, "/v1/licenses/hist?reason=upsell", &doc(500))
        .await?["version"]
        .as_u64()
        .unwrap_or(0);
    assert!(v2 > v1);

    let h = node
        .admin_ok(Method::GET, "/v1/licenses/hist/history", "")
        .await?;
    let records = h["history"].as_array().cloned().unwrap_or_default();
    assert_eq!(records.len(), 2, "{h}");
    assert_eq!(records[0]["version"], v1);
    assert_eq!(records[0]["actor"], "admin");
    assert_eq!(records[0]["reason"], "signed contract");
    assert!(
        records[0]["at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{h}"
    );
    assert_eq!(records[1]["reason"], "upsell");
    let diff = records[1]["diff"].as_array().cloned().unwrap_or_default();
    assert_eq!(diff.len(), 1, "only the limit changed: {h}");
    assert_eq!(diff[0]["path"], "quotas[0].limit");
    assert_eq!(diff[0]["old"], 100);
    assert_eq!(diff[0]["new"], 500);
    // No full documents (with key hashes) in the listing.
    assert!(records.iter().all(|r| r.get("document").is_none()), "{h}");

    let r = node
        .admin_ok(
            Method::POST,
            "/v1/licenses/hist/rollback",
            &format!(r#"{{"to_version":{v1},"reason":"upsell cancelled"}}"#),
        )
        .await?;
    let v3 = r["version"].as_u64().unwrap_or(0);
    assert!(v3 > v2, "{r}");
    cluster.wait_version(v3).await?;

    // Every node now serves content equal to version v1's.
    for i in cluster.running() {
        let now = cluster
            .node(i)?
            .admin_ok(Method::GET, "/v1/licenses/hist", "")
            .await?;
        assert_eq!(now["license"]["quotas"][0]["limit"], 100, "node {i}: {now}");
    }
    let h = node
        .admin_ok(Method::GET, "/v1/licenses/hist/history", "")
        .await?;
    let records = h["history"].as_array().cloned().unwrap_or_default();
    assert_eq!(records.len(), 3, "history is appended, not rewritten: {h}");
    assert_eq!(records[2]["version"], v3);
    assert_eq!(records[2]["reason"], "upsell cancelled");
    assert_eq!(records[2]["diff"][0]["old"], 500);
    assert_eq!(records[2]["diff"][0]["new"], 100);

    // A rollback to a version before the license existed changes nothing.
    let (status, body) = node
        .admin(
            Method::POST,
            "/v1/licenses/hist/rollback",
            Some(cluster.token()),
            r#"{"to_version":1,"reason":"x"}"#,
        )
        .await?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(node.version().await?, v3);
    Ok(())
}

/// A second admin token named `alice`, next to the admin token file.
fn with_alice(s: &mut NodeSettings) {
    s.admin_tokens
        .push(tollgate_node::settings::NamedTokenFile {
            name: "alice".to_string(),
            file: s.admin_token_file.with_file_name("alice.token"),
            role: tollgate_node::roles::Role::Admin,
        });
}

#[tokio::test]
async fn the_actor_is_the_name_of_the_token_that_made_the_change() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("alice.token"), "tga_alice_secret\n")?;
    let cluster = TestCluster::start(dir.path(), 3, with_alice).await?;
    let node = cluster.node(cluster.follower().await?)?;
    let (status, body) = node
        .admin(
            Method::POST,
            "/v1/licenses/demo/revoke",
            Some("tga_alice_secret"),
            r#"{"reason":"payment failed"}"#,
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    let h = node
        .admin_ok(Method::GET, "/v1/licenses/demo/history", "")
        .await?;
    let last = h["history"]
        .as_array()
        .and_then(|r| r.last())
        .cloned()
        .unwrap_or_default();
    assert_eq!(last["actor"], "alice", "{h}");
    assert_eq!(last["reason"], "payment failed", "{h}");
    assert_eq!(last["action"]["kind"], "revoke", "{h}");
    // The seed documents were applied by the bootstrap, not by a token.
    assert_eq!(h["history"][0]["actor"], "bootstrap", "{h}");
    // A token nobody configured is refused.
    let (status, _) = node
        .admin(
            Method::GET,
            "/v1/licenses/demo/history",
            Some("tga_mallory"),
            "",
        )
        .await?;
    assert_eq!(status, 401);
    Ok(())
}

#[tokio::test]
async fn a_write_retried_with_the_same_idempotency_key_applies_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = TestCluster::start(dir.path(), 3, |_| {}).await?;
    let node = cluster.node(cluster.follower().await?)?;
    let put = |limit: u64| {
        node.client
            .put(format!("{}/v1/licenses/hist?reason=retry", node.http))
            .header("authorization", format!("Bearer {}", cluster.token()))
            .header("idempotency-key", "change-42")
            .body(doc(limit))
            .send()
    };
    let first: serde_json::Value = put(100).await?.json().await?;
    // A retry (even with a different body) returns the first outcome.
    let second: serde_json::Value = put(999).await?.json().await?;
    assert_eq!(first["version"], second["version"], "{first} {second}");
    let now = node.admin_ok(Method::GET, "/v1/licenses/hist", "").await?;
    assert_eq!(now["license"]["quotas"][0]["limit"], 100, "{now}");
    let h = node
        .admin_ok(Method::GET, "/v1/licenses/hist/history", "")
        .await?;
    assert_eq!(h["history"].as_array().map(Vec::len), Some(1), "{h}");

    // A retried key issue cannot show a key that was never stored.
    let issue = || {
        node.client
            .post(format!("{}/v1/licenses/hist/keys", node.http))
            .header("authorization", format!("Bearer {}", cluster.token()))
            .header("idempotency-key", "issue-7")
            .body(r#"{"reason":"fleet"}"#)
            .send()
    };
    assert_eq!(issue().await?.status().as_u16(), 200);
    let again = issue().await?;
    assert_eq!(again.status().as_u16(), 409);
    let l = node.admin_ok(Method::GET, "/v1/licenses/hist", "").await?;
    assert_eq!(
        l["license"]["keys"].as_array().map(Vec::len),
        Some(2),
        "{l}"
    );

    // A malformed key is refused and changes nothing.
    let v = node.version().await?;
    let bad = node
        .client
        .put(format!("{}/v1/licenses/hist?reason=x", node.http))
        .header("authorization", format!("Bearer {}", cluster.token()))
        .header("idempotency-key", "x".repeat(200))
        .body(doc(5))
        .send()
        .await?;
    assert_eq!(bad.status().as_u16(), 400);
    assert_eq!(node.version().await?, v);
    Ok(())
}

#[tokio::test]
async fn model_changes_are_in_the_history_too() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = TestCluster::start(dir.path(), 3, |_| {}).await?;
    let node = cluster.node(cluster.follower().await?)?;
    let model = r#"{"apiVersion":"tollgate/v1","kind":"Model","id":"demo-classifier","versions":[{"version":"2.1.0","released":"2026-06-01"},{"version":"3.0.0","released":"2026-11-01"}]}"#;
    let v = node
        .admin_ok(
            Method::PUT,
            "/v1/models/demo-classifier?reason=v3%20release",
            model,
        )
        .await?["version"]
        .as_u64()
        .unwrap_or(0);
    let h = node
        .admin_ok(Method::GET, "/v1/models/demo-classifier/history", "")
        .await?;
    let records = h["history"].as_array().cloned().unwrap_or_default();
    assert_eq!(records.len(), 2, "seeded, then changed: {h}");
    assert_eq!(records[0]["actor"], "bootstrap");
    assert_eq!(records[1]["version"], v);
    assert_eq!(records[1]["actor"], "admin");
    assert_eq!(records[1]["reason"], "v3 release");
    assert!(
        !records[1]["diff"]
            .as_array()
            .map(Vec::is_empty)
            .unwrap_or(true),
        "{h}"
    );
    let (status, _) = node
        .admin(
            Method::GET,
            "/v1/models/nope/history",
            Some(cluster.token()),
            "",
        )
        .await?;
    assert_eq!(status, 404);
    Ok(())
}
