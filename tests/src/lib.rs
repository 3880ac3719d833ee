//! Shared helpers for Tollgate's cross-crate tests: start a real node on
//! loopback ports chosen by the OS, talk to it over HTTP and gRPC.

pub mod cluster;
pub mod webhook;

use std::path::Path;

use anyhow::Context;
use tollgate_node::roles::Role;
use tollgate_node::server::{self, Listeners, RunningNode};
use tollgate_node::settings::{NamedTokenFile, NodeSettings, RaftTiming};
use tollgate_node::up::{QUICKSTART_YAML, ensure_admin_token};

/// Creates `auditor.token` and `viewer.token` in `dir`: the settings
/// entries for them, and the two plain tokens.
pub fn role_tokens(dir: &Path) -> anyhow::Result<(Vec<NamedTokenFile>, String, String)> {
    let mut entries = Vec::new();
    let mut plain = Vec::new();
    for (name, role) in [("auditor", Role::Auditor), ("viewer", Role::Viewer)] {
        let file = dir.join(format!("{name}.token"));
        ensure_admin_token(&file)?;
        plain.push(std::fs::read_to_string(&file)?.trim().to_string());
        entries.push(NamedTokenFile {
            name: name.to_string(),
            file,
            role,
        });
    }
    let viewer = plain.pop().unwrap_or_default();
    let auditor = plain.pop().unwrap_or_default();
    Ok((entries, auditor, viewer))
}

/// A node under test and what a client needs to reach it.
pub struct TestNode {
    /// The running node.
    pub node: RunningNode,
    /// `http://127.0.0.1:PORT`.
    pub http: String,
    /// `http://127.0.0.1:PORT` for gRPC.
    pub grpc: String,
    /// The admin token.
    pub token: String,
    /// A token with the `auditor` role (empty unless started by `start`).
    pub auditor_token: String,
    /// A token with the `viewer` role (empty unless started by `start`).
    pub viewer_token: String,
    /// A reusable HTTP client.
    pub client: reqwest::Client,
}

impl TestNode {
    /// Starts a node in `dir` with the quickstart documents applied.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, |_| {}).await
    }

    /// Like [`Self::start`], with `edit` applied to the settings first.
    pub async fn start_with(
        dir: &Path,
        edit: impl FnOnce(&mut NodeSettings),
    ) -> anyhow::Result<Self> {
        let token_file = dir.join("admin.token");
        ensure_admin_token(&token_file)?;
        let listeners = Listeners::ephemeral().await?;
        let mut settings = NodeSettings::local(
            1,
            dir,
            listeners.grpc.local_addr()?,
            listeners.http.local_addr()?,
        );
        settings.admin_token_file = token_file.clone();
        settings.raft = RaftTiming::local();
        let (role_tokens, auditor_token, viewer_token) = role_tokens(dir)?;
        settings.admin_tokens = role_tokens;
        edit(&mut settings);
        let node =
            server::start_with_listeners(settings, listeners, Some(QUICKSTART_YAML.to_string()))
                .await
                .context("starting node")?;
        let token = std::fs::read_to_string(&token_file)?.trim().to_string();
        let mut n = Self::around(node, token);
        n.auditor_token = auditor_token;
        n.viewer_token = viewer_token;
        Ok(n)
    }

    /// Wraps a running node.
    pub fn around(node: RunningNode, token: String) -> Self {
        Self {
            http: format!("http://{}", node.http_addr),
            grpc: format!("http://{}", node.grpc_addr),
            node,
            token,
            auditor_token: String::new(),
            viewer_token: String::new(),
            client: reqwest::Client::new(),
        }
    }

    /// Sends an admin request with this node's token.
    pub async fn admin_ok(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let (status, v) = self.admin(method, path, Some(&self.token), body).await?;
        anyhow::ensure!(status == 200, "{path}: HTTP {status}: {v}");
        Ok(v)
    }

    /// The node's `/v1/status` document.
    pub async fn status(&self) -> anyhow::Result<serde_json::Value> {
        Ok(self
            .client
            .get(format!("{}/v1/status", self.http))
            .send()
            .await?
            .json()
            .await?)
    }

    /// POSTs a JSON body to `path` and returns (status, JSON body).
    pub async fn post(&self, path: &str, body: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        let r = self
            .client
            .post(format!("{}{path}", self.http))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        ))
    }

    /// Sends an admin request with `token` (None: no Authorization header).
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.http))
            .body(body.to_string());
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        ))
    }

    /// GETs `path` with `token` and returns (status, body text).
    pub async fn get_text(&self, path: &str, token: Option<&str>) -> anyhow::Result<(u16, String)> {
        let mut req = self.client.get(format!("{}{path}", self.http));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let r = req.send().await?;
        Ok((r.status().as_u16(), r.text().await?))
    }

    /// Waits until the audit writer has durably appended at least
    /// `n_records` records and holds nothing queued; returns the `audit`
    /// part of status.
    pub async fn wait_audited(&self, n_records: u64) -> anyhow::Result<serde_json::Value> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let audit = self.status().await?["audit"].clone();
            let appended = audit["appended"].as_u64().unwrap_or(0);
            if appended >= n_records && audit["backlog"].as_u64() == Some(0) {
                return Ok(audit);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "audit appended {appended} of {n_records} records: {audit}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// The node's config version (policy version) as reported by status.
    pub async fn version(&self) -> anyhow::Result<u64> {
        let v: serde_json::Value = self
            .client
            .get(format!("{}/v1/status", self.http))
            .send()
            .await?
            .json()
            .await?;
        v["policy_version"]
            .as_u64()
            .context("status without policy_version")
    }
}

/// The README's demo Check body, with `key` swapped in.
pub fn demo_check(key: &str) -> String {
    format!(
        r#"{{"key":"{key}","model":"demo-classifier","model_version":"2.1.0","environment":"production","region":"local-a","meters":[{{"metric":"inferences","quantity":1}}]}}"#
    )
}

/// A Check body for `key` whose lineage is `entries` (`dataset@release`).
pub fn lineage_check(key: &str, entries: &[&str]) -> String {
    let lineage: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| {
            let (dataset, release) = e.split_once('@').unwrap_or((e, ""));
            serde_json::json!({"dataset": dataset, "release": release})
        })
        .collect();
    serde_json::json!({
        "key": key,
        "model": "demo-classifier",
        "model_version": "2.1.0",
        "meters": [{"metric": "inferences", "quantity": 1}],
        "lineage": lineage,
    })
    .to_string()
}
