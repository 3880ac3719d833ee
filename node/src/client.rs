//! The CLI's client side: finding the node and token, calling the admin and
//! edge gRPC APIs, and printing results as tables or JSON.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tollgate_proto::v1 as pb;
use tollgate_proto::v1::admin_client::AdminClient;
use tollgate_proto::v1::edge_client::EdgeClient;
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use crate::api::{DecisionJson, proto_to_json};
use crate::bench::endpoint_uri;
use crate::up::ClusterFile;

/// Where the CLI looks for a cluster when no address is given.
pub const DEFAULT_DATA_DIR: &str = "tollgate-data";

/// Connection options shared by every client subcommand.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// gRPC address, from `--addr` / `TOLLGATE_ADDR`.
    pub addr: Option<String>,
    /// Admin token, from `--token` / `TOLLGATE_TOKEN`.
    pub token: Option<String>,
    /// Data dir whose cluster.json to read when addr or token are missing.
    pub data_dir: PathBuf,
    /// HTTP base URL or host:port, from `--http` / `TOLLGATE_HTTP`, for the
    /// commands that speak HTTP (exceptions, escalations).
    pub http: Option<String>,
}

impl Target {
    fn cluster(&self) -> Option<ClusterFile> {
        ClusterFile::read(&self.data_dir).ok()
    }

    /// The gRPC URIs to try, in order: `--addr`, else every node of
    /// cluster.json (so the CLI still works when a node is down).
    pub fn uris(&self) -> anyhow::Result<Vec<String>> {
        if let Some(a) = &self.addr {
            return Ok(vec![endpoint_uri(a)]);
        }
        let cluster = self.cluster().with_context(|| {
            format!(
                "no --addr or TOLLGATE_ADDR given and no {} found",
                self.data_dir.join("cluster.json").display()
            )
        })?;
        anyhow::ensure!(!cluster.nodes.is_empty(), "cluster.json lists no nodes");
        Ok(cluster
            .nodes
            .iter()
            .map(|n| endpoint_uri(&n.grpc_addr))
            .collect())
    }

    /// The admin token to send.
    pub fn token(&self) -> anyhow::Result<String> {
        if let Some(t) = &self.token {
            return Ok(t.trim().to_string());
        }
        let cluster = self
            .cluster()
            .context("no --token or TOLLGATE_TOKEN given and no cluster.json found")?;
        read_token(&cluster.admin_token_file)
    }

    async fn channel(&self) -> anyhow::Result<Channel> {
        let uris = self.uris()?;
        let mut last_err = None;
        for uri in uris {
            let connected = Endpoint::from_shared(uri.clone())?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(30))
                .connect()
                .await
                .with_context(|| format!("connecting to {uri}"));
            match connected {
                Ok(c) => return Ok(c),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no node to connect to")))
    }

    /// An edge client.
    pub async fn edge(&self) -> anyhow::Result<EdgeClient<Channel>> {
        Ok(EdgeClient::new(self.channel().await?))
    }

    /// An admin client and the bearer header value.
    pub async fn admin(
        &self,
    ) -> anyhow::Result<(AdminClient<Channel>, MetadataValue<tonic::metadata::Ascii>)> {
        let token = self.token()?;
        let header: MetadataValue<_> = format!("Bearer {token}")
            .parse()
            .context("token is not valid ASCII")?;
        Ok((AdminClient::new(self.channel().await?), header))
    }
}

impl Target {
    /// The HTTP base URLs to try, in order: `--http`, else every node of
    /// cluster.json.
    pub fn http_bases(&self) -> anyhow::Result<Vec<String>> {
        let base = |a: &str| {
            if a.starts_with("http://") || a.starts_with("https://") {
                a.trim_end_matches('/').to_string()
            } else {
                format!("http://{a}")
            }
        };
        if let Some(a) = &self.http {
            return Ok(vec![base(a)]);
        }
        let cluster = self.cluster().with_context(|| {
            format!(
                "no --http or TOLLGATE_HTTP given and no {} found",
                self.data_dir.join("cluster.json").display()
            )
        })?;
        anyhow::ensure!(!cluster.nodes.is_empty(), "cluster.json lists no nodes");
        Ok(cluster.nodes.iter().map(|n| base(&n.http_addr)).collect())
    }

    /// Sends `method path` with the admin token and an optional JSON body
    /// to the first node that answers; an error status becomes an error
    /// with the node's message.
    pub async fn http_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let token = self.token()?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30))
            .build()?;
        let mut last_err = None;
        for base in self.http_bases()? {
            let mut req = client
                .request(method.clone(), format!("{base}{path}"))
                .bearer_auth(&token);
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) if e.is_connect() => {
                    last_err = Some(anyhow::anyhow!("connecting to {base}: {e}"));
                    continue;
                }
                Err(e) => return Err(anyhow::anyhow!("{base}{path}: {e}")),
            };
            let status = resp.status();
            let text = resp.text().await?;
            let v: serde_json::Value =
                serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
            if !status.is_success() {
                let message = v["error"]["message"]
                    .as_str()
                    .map_or_else(|| v.to_string(), str::to_string);
                let code = v["error"]["code"].as_str().unwrap_or("error");
                anyhow::bail!("{code} (HTTP {}): {message}", status.as_u16());
            }
            return Ok(v);
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no node to connect to")))
    }
}

/// Renders `exception list` JSON as a table.
pub fn render_exceptions(v: &serde_json::Value) -> String {
    let mut out = format!(
        "{:<12} {:<16} {:<12} {:>8} {:<9} {:<22} {:<16} {}\n",
        "ID", "LICENSE", "QUOTA", "AMOUNT", "STATE", "UNTIL", "REQUESTED BY", "REASON"
    );
    for e in v["exceptions"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        out.push_str(&format!(
            "{:<12} {:<16} {:<12} {:>8} {:<9} {:<22} {:<16} {}\n",
            text(&e["id"]),
            text(&e["license"]),
            text(&e["quota"]),
            text(&e["amount"]),
            text(&e["state"]),
            text(&e["until"]),
            text(&e["requested_by"]),
            text(&e["reason"]),
        ));
    }
    out
}

/// Renders `escalation list` JSON as a table.
pub fn render_escalations(v: &serde_json::Value) -> String {
    let mut out = format!(
        "{:<20} {:<16} {:<18} {:<13} {:<22} {:<24} {}\n",
        "ID", "LICENSE", "RULE", "STATUS", "DEADLINE", "OWNER", "OPENED BY"
    );
    for e in v["escalations"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let status = if e["overdue"] == serde_json::Value::Bool(true) {
            format!("{} (late)", text(&e["status"]))
        } else {
            text(&e["status"])
        };
        out.push_str(&format!(
            "{:<20} {:<16} {:<18} {:<13} {:<22} {:<24} {}\n",
            text(&e["id"]),
            text(&e["license"]),
            text(&e["rule"]),
            status,
            text(&e["deadline"]),
            text(&e["owner"]),
            text(&e["opened_by"]),
        ));
    }
    out
}

/// Reads a token file.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading token file {}", path.display()))?
        .trim()
        .to_string())
}

/// Wraps a message with the admin bearer token.
pub fn authed<T>(msg: T, header: &MetadataValue<tonic::metadata::Ascii>) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert("authorization", header.clone());
    req
}

/// Turns a gRPC status into a readable error.
pub fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

/// Renders a decision as a human table.
pub fn render_decision(d: &DecisionJson) -> String {
    let mut out = String::new();
    out.push_str(&format!("decision        {}\n", d.decision));
    out.push_str(&format!("message         {}\n", d.message));
    if let Some(l) = &d.license_id {
        out.push_str(&format!("license         {l}\n"));
    }
    out.push_str(&format!("policy version  {}\n", d.policy_version));
    out.push_str(&format!("decision id     {}\n", d.decision_id));
    if let Some(ms) = d.retry_after_ms {
        out.push_str(&format!("retry after     {ms} ms\n"));
    }
    if d.dry_run {
        out.push_str("dry run         yes (nothing consumed)\n");
    }
    if !d.reasons.is_empty() {
        out.push_str("\nREASON                       RULE                         MESSAGE\n");
        for r in &d.reasons {
            out.push_str(&format!("{:<28} {:<28} {}\n", r.code, r.rule, r.message));
        }
    }
    if !d.quotas.is_empty() {
        out.push_str(
            "\nQUOTA            METRIC         USED/LIMIT             REMAINING    RESETS AT\n",
        );
        for q in &d.quotas {
            out.push_str(&format!(
                "{:<16} {:<14} {:<22} {:<12} {}\n",
                q.quota,
                q.metric,
                format!("{}/{}", q.used, q.limit),
                q.remaining,
                q.resets_at.as_deref().unwrap_or("never")
            ));
        }
    }
    if !d.warnings.is_empty() {
        out.push_str("\nWARNINGS\n");
        for w in &d.warnings {
            out.push_str(&format!("  {:<24} {}\n", w.code, w.message));
        }
    }
    if let Some(a) = &d.request_adjustment {
        out.push_str(&format!(
            "\nneed more? {} (license {}, quota {})\n",
            a.message, a.license, a.quota
        ));
    }
    out
}

/// Sends a Check (or Report) and returns the decision as JSON shape.
pub async fn check(
    target: &Target,
    req: pb::CheckRequest,
    report: bool,
) -> anyhow::Result<DecisionJson> {
    let mut edge = target.edge().await?;
    let resp = if report {
        edge.report(req).await
    } else {
        edge.check(req).await
    };
    Ok(proto_to_json(&resp.map_err(status_err)?.into_inner()))
}

fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Renders `cluster status` JSON as a table, one row per member.
pub fn render_cluster(v: &serde_json::Value) -> String {
    let mut out = format!(
        "leader {}  term {}  config version {}\n\n",
        text(&v["leader"]),
        text(&v["term"]),
        text(&v["config_version"])
    );
    out.push_str(&format!(
        "{:<5} {:<10} {:<10} {:<6} {:<6} {:>8} {:>6}  {:<22} {}\n",
        "ID", "REGION", "STATE", "VOTER", "TERM", "APPLIED", "LAG", "RAFT", "GRPC"
    ));
    for n in v["nodes"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let state = if n["reachable"] == serde_json::Value::Bool(false) {
            "down".to_string()
        } else {
            text(&n["state"])
        };
        out.push_str(&format!(
            "{:<5} {:<10} {:<10} {:<6} {:<6} {:>8} {:>6}  {:<22} {}\n",
            text(&n["id"]),
            text(&n["region"]),
            state,
            if n["voter"] == serde_json::Value::Bool(true) {
                "yes"
            } else {
                "no"
            },
            text(&n["term"]),
            text(&n["applied_index"]),
            text(&n["lag"]),
            text(&n["raft_addr"]),
            text(&n["grpc_addr"]),
        ));
        if let Some(e) = n["error"].as_str() {
            out.push_str(&format!("      ({e})\n"));
        }
    }
    out
}

/// Renders `license history` JSON: one block per change with its diff.
pub fn render_history(v: &serde_json::Value) -> String {
    let mut out = String::new();
    for r in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        let kind = text(&r["action"]["kind"]).replace('_', " ");
        let action = match r["action"]["to_version"].as_u64() {
            Some(v) => format!("{kind} to version {v}"),
            None => kind,
        };
        out.push_str(&format!(
            "version {}  {}  by {}  {}\n  reason: {}\n",
            text(&r["version"]),
            text(&r["at"]),
            text(&r["actor"]),
            action,
            r["reason"].as_str().unwrap_or("(none given)")
        ));
        for d in r["diff"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let path = d["path"]
                .as_str()
                .filter(|p| !p.is_empty())
                .unwrap_or("(document)");
            match d["op"].as_str().unwrap_or("") {
                "added" => out.push_str(&format!("  + {path}: {}\n", d["new"])),
                "removed" => out.push_str(&format!("  - {path}: {}\n", d["old"])),
                _ => out.push_str(&format!("  ~ {path}: {} -> {}\n", d["old"], d["new"])),
            }
        }
        out.push('\n');
    }
    out
}

/// Where `tollgate audit export` reads from: a node's HTTP API and an
/// auditor token.
#[derive(Debug, Clone)]
pub struct AuditTarget {
    /// Base URL, e.g. `http://127.0.0.1:7480`.
    pub url: String,
    /// The bearer token.
    pub token: String,
}

impl AuditTarget {
    /// `url` and `token` as given, else from `cluster_dir/cluster.json`:
    /// node `node` (or the first) and the auditor token file (or the admin
    /// one for older files).
    pub fn resolve(
        url: Option<String>,
        node: Option<u64>,
        token: Option<String>,
        cluster_dir: &Path,
    ) -> anyhow::Result<Self> {
        let cluster = || {
            ClusterFile::read(cluster_dir).with_context(|| {
                format!(
                    "no --url/--token given and no {} found",
                    cluster_dir.join("cluster.json").display()
                )
            })
        };
        let url = match url {
            Some(u) => u,
            None => {
                let c = cluster()?;
                let n = match node {
                    Some(id) => c
                        .nodes
                        .iter()
                        .find(|n| n.id == id)
                        .with_context(|| format!("cluster.json has no node {id}"))?,
                    None => c.nodes.first().context("cluster.json lists no nodes")?,
                };
                n.http_addr.clone()
            }
        };
        let token = match token {
            Some(t) => t.trim().to_string(),
            None => {
                let c = cluster()?;
                read_token(c.auditor_token_file.as_ref().unwrap_or(&c.admin_token_file))?
            }
        };
        Ok(Self {
            url: endpoint_uri(&url).trim_end_matches('/').to_string(),
            token,
        })
    }
}

/// Records asked for per HTTP request of an export.
const EXPORT_PAGE_RECORDS: usize = 10_000;

/// Streams `GET /v1/audit` pages into `sink` until the log (or `limit`)
/// is exhausted; returns how many records were written.
pub async fn export_audit(
    target: &AuditTarget,
    since: Option<&str>,
    limit: Option<usize>,
    sink: &mut dyn std::io::Write,
) -> anyhow::Result<u64> {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()?;
    let mut remaining = limit.unwrap_or(usize::MAX);
    let mut after_seq = 0u64;
    let mut n_records = 0u64;
    loop {
        let page = remaining.min(EXPORT_PAGE_RECORDS);
        let mut query = vec![
            ("limit", page.to_string()),
            ("after_seq", after_seq.to_string()),
        ];
        if let Some(s) = since {
            query.push(("since", s.to_string()));
        }
        let mut resp = http
            .get(format!("{}/v1/audit", target.url))
            .bearer_auth(&target.token)
            .query(&query)
            .send()
            .await
            .with_context(|| format!("asking {} for its audit log", target.url))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            anyhow::bail!("{}: HTTP {status}: {body}", target.url);
        }
        let mut n_page = 0usize;
        let mut partial: Vec<u8> = Vec::new();
        while let Some(chunk) = resp.chunk().await.context("reading the audit export")? {
            partial.extend_from_slice(&chunk);
            let Some(end) = partial.iter().rposition(|b| *b == b'\n') else {
                continue;
            };
            let complete: Vec<u8> = partial.drain(..=end).collect();
            for line in complete.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let v: serde_json::Value = serde_json::from_slice(line)
                    .context("the export sent a line that is not JSON")?;
                if v["type"] != "checkpoint" {
                    n_page += 1;
                    after_seq = v["seq"].as_u64().unwrap_or(after_seq);
                }
            }
            sink.write_all(&complete)?;
        }
        anyhow::ensure!(partial.is_empty(), "the audit export ended mid-line");
        n_records += n_page as u64;
        remaining = remaining.saturating_sub(n_page);
        if n_page < page || remaining == 0 {
            return Ok(n_records);
        }
    }
}
