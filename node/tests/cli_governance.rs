//! `tollgate exception` and `tollgate escalation` as a user runs them: the
//! real binary against a node on loopback.

use std::process::Command;

use anyhow::Context;
use tollgate_node::roles::Role;
use tollgate_node::server::{self, Listeners};
use tollgate_node::settings::{NamedTokenFile, NodeSettings, RaftTiming};
use tollgate_node::up::{QUICKSTART_YAML, ensure_admin_token};

/// Runs `tollgate ARGS --http HTTP --token TOKEN` off the runtime's
/// threads; returns (success, stdout, stderr).
async fn tollgate(
    http: &str,
    token: &str,
    args: &[&str],
) -> anyhow::Result<(bool, String, String)> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.args(args).args(["--http", http, "--token", token]);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .context("joining the CLI")??;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn an_admin_approves_and_rejects_exceptions_from_the_cli() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("admin.token");
    ensure_admin_token(&token_file)?;
    let viewer_file = dir.path().join("viewer.token");
    ensure_admin_token(&viewer_file)?;
    let listeners = Listeners::ephemeral().await?;
    let mut settings = NodeSettings::local(
        1,
        dir.path(),
        listeners.grpc.local_addr()?,
        listeners.http.local_addr()?,
    );
    settings.admin_token_file = token_file.clone();
    settings.raft = RaftTiming::local();
    settings.admin_tokens = vec![NamedTokenFile {
        name: "viewer".into(),
        file: viewer_file.clone(),
        role: Role::Viewer,
    }];
    let node = server::start_with_listeners(settings, listeners, Some(QUICKSTART_YAML.to_string()))
        .await?;
    let http = node.http_addr.to_string();
    let token = std::fs::read_to_string(&token_file)?.trim().to_string();
    let viewer = std::fs::read_to_string(&viewer_file)?.trim().to_string();

    let (ok, out, err) = tollgate(
        &http,
        &token,
        &[
            "exception",
            "request",
            "--license",
            "demo-tiny",
            "--quota",
            "daily",
            "--amount",
            "5",
            "--reason",
            "demo day",
        ],
    )
    .await?;
    assert!(ok, "{err}");
    let id = out
        .split_whitespace()
        .nth(1)
        .filter(|w| w.starts_with("exc-"))
        .with_context(|| format!("no id in {out:?}"))?
        .to_string();

    let (ok, out, err) = tollgate(&http, &token, &["exception", "list"]).await?;
    assert!(ok, "{err}");
    assert!(out.starts_with("ID "), "{out}");
    assert!(out.contains(&id) && out.contains("pending"), "{out}");

    // A viewer may list but not approve.
    let approve = [
        "exception",
        "approve",
        &id,
        "--until",
        "1h",
        "--reason",
        "ok",
    ];
    let (ok, _, err) = tollgate(&http, &viewer, &approve).await?;
    assert!(!ok);
    assert!(err.contains("permission_denied (HTTP 403)"), "{err}");
    let (ok, out, err) = tollgate(&http, &token, &approve).await?;
    assert!(ok, "{err}");
    assert!(
        out.starts_with(&format!("approved {id}: demo-tiny/daily +5 until ")),
        "{out}"
    );

    // The quota's limit is raised: 5 + 5.
    let check = r#"{"key":"tg_demo_tiny","model":"demo-classifier","model_version":"2.1.0","dry_run":true,"meters":[{"metric":"inferences","quantity":1}]}"#;
    let d: serde_json::Value = reqwest::Client::new()
        .post(format!("http://{http}/v1/check"))
        .body(check)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(d["quotas"][0]["limit"], 10, "{d}");

    // Decided once; a bad --until never reaches the node.
    let (ok, _, err) = tollgate(
        &http,
        &token,
        &["exception", "reject", &id, "--reason", "no"],
    )
    .await?;
    assert!(!ok);
    assert!(
        err.contains("HTTP 409") && err.contains("already approved"),
        "{err}"
    );
    let (ok, _, err) = tollgate(
        &http,
        &token,
        &["exception", "approve", &id, "--until", "soon"],
    )
    .await?;
    assert!(!ok);
    assert!(err.contains("HTTP 400") && err.contains("until"), "{err}");

    let (ok, out, err) = tollgate(&http, &token, &["escalation", "list"]).await?;
    assert!(ok, "{err}");
    assert!(out.starts_with("ID "), "{out}");
    let (ok, _, err) = tollgate(
        &http,
        &token,
        &["escalation", "resolve", "esc-0", "--reason", "x"],
    )
    .await?;
    assert!(!ok);
    assert!(err.contains("HTTP 404"), "{err}");
    node.shutdown().await
}
