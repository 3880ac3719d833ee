//! `tollgate bench --scenario gossip`: what usage gossip costs on the wire,
//! and how fast usage converges after a partition heals.
//!
//! **Cost.** Every node of the cluster named by `cluster.json` gets steady
//! open-loop Check load (`rate_per_node` requests per second, gRPC) with one
//! key. After a warm-up, the bench reads each node's `gossip.bytes_sent`
//! (UDP bytes on the wire) from its status, counts the allowed Checks
//! (each one increment of a usage counter) sent during the measured phase,
//! reads the bytes again and reports wire bytes per increment. Load runs
//! during both reads, so the figure is steady state: deltas of increments
//! from before the phase that go out inside it stand for those of the last
//! increments that go out after it.
//!
//! **Convergence** (`heals` > 0; the nodes need fault injection). Each
//! round cuts one node off (it drops every peer, every peer drops it),
//! sends allowed Checks on both sides, waits until the connected side
//! agrees, heals, and times until every node's `/v1/usage` shows the same
//! value and per-node slots for every counter of the license. The time runs
//! from just before the heal calls until the answer that showed agreement;
//! it includes the heal calls and the polling itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tollgate_proto::v1 as pb;
use tollgate_proto::v1::admin_client::AdminClient;
use tollgate_proto::v1::edge_client::EdgeClient;
use tonic::transport::{Channel, Endpoint};

/// Wire bytes per increment the gossip design aims at.
pub const TARGET_BYTES_PER_INCREMENT: f64 = 16.0;

/// Most Checks in flight per node; past it a scheduled Check is shed
/// (counted, not sent) rather than queued without limit.
const MAX_IN_FLIGHT_PER_NODE: usize = 512;

/// How long one convergence round may wait for agreement.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Debug, Clone)]
pub struct GossipBenchOptions {
    /// Measured duration of the cost phase (seconds).
    pub duration_secs: u64,
    /// Unmeasured load before it (seconds).
    pub warmup_secs: u64,
    /// Checks per second offered to every node.
    pub rate_per_node: u64,
    /// The key every Check uses; its license must allow the Checks.
    pub license_key: String,
    /// Partition-and-heal rounds to time after the cost phase (0: none).
    pub heals: usize,
    /// Allowed Checks sent to each side of a partition per round.
    pub checks_per_side: usize,
}

impl Default for GossipBenchOptions {
    fn default() -> Self {
        Self {
            duration_secs: 10,
            warmup_secs: 1,
            rate_per_node: 400,
            license_key: "tg_demo_key".to_string(),
            heals: 0,
            checks_per_side: 5,
        }
    }
}

/// One node as `cluster.json` lists it.
#[derive(Debug, Clone)]
pub struct BenchNode {
    /// Node id.
    pub id: u64,
    /// gRPC address (host:port).
    pub grpc_addr: String,
    /// HTTP address (host:port).
    pub http_addr: String,
}

/// The cluster to drive: its nodes and the admin token.
#[derive(Debug, Clone)]
pub struct BenchCluster {
    /// Every node.
    pub nodes: Vec<BenchNode>,
    /// Admin bearer token.
    pub token: String,
}

impl BenchCluster {
    /// Reads `cluster.json` (as `tollgate up` writes it) and the admin token
    /// file it names (relative paths are taken from the file's directory).
    pub fn read(cluster_json: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(cluster_json)
            .with_context(|| format!("reading {}", cluster_json.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", cluster_json.display()))?;
        let mut nodes = Vec::new();
        for (i, n) in v["nodes"]
            .as_array()
            .context("cluster.json: no `nodes` list")?
            .iter()
            .enumerate()
        {
            let field = |name: &str| {
                n[name]
                    .as_str()
                    .map(str::to_string)
                    .with_context(|| format!("cluster.json: nodes[{i}].{name} missing"))
            };
            nodes.push(BenchNode {
                id: n["id"]
                    .as_u64()
                    .with_context(|| format!("cluster.json: nodes[{i}].id missing"))?,
                grpc_addr: field("grpc_addr")?,
                http_addr: field("http_addr")?,
            });
        }
        anyhow::ensure!(!nodes.is_empty(), "cluster.json lists no nodes");
        let token_file = PathBuf::from(
            v["admin_token_file"]
                .as_str()
                .context("cluster.json: no `admin_token_file`")?,
        );
        let token_file = if token_file.is_relative() {
            cluster_json
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join(token_file)
        } else {
            token_file
        };
        let token = std::fs::read_to_string(&token_file)
            .with_context(|| format!("reading {}", token_file.display()))?
            .trim()
            .to_string();
        anyhow::ensure!(!token.is_empty(), "{} is empty", token_file.display());
        Ok(Self { nodes, token })
    }
}

/// Runs the cost phase (and the convergence rounds when `opts.heals` > 0)
/// on the cluster `cluster_json` names; returns the report as JSON.
pub async fn run(cluster_json: &Path, opts: GossipBenchOptions) -> anyhow::Result<Value> {
    let cluster = BenchCluster::read(cluster_json)?;
    run_on(&cluster, &opts).await
}

/// [`run`] on a cluster already read.
pub async fn run_on(cluster: &BenchCluster, opts: &GossipBenchOptions) -> anyhow::Result<Value> {
    anyhow::ensure!(opts.rate_per_node > 0, "rate_per_node must be positive");
    anyhow::ensure!(opts.duration_secs > 0, "duration_secs must be positive");
    let mut report = cost(cluster, opts).await?;
    if opts.heals > 0 {
        let times = convergence(cluster, &opts.license_key, opts.heals, opts.checks_per_side)
            .await?
            .heal_to_converged_ms;
        report["convergence"] = convergence_summary(&times);
    }
    Ok(report)
}

async fn connect(addr: &str) -> anyhow::Result<Channel> {
    let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Endpoint::from_shared(uri.clone())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("connecting to {uri}"))
}

fn check_request(key: &str) -> pb::CheckRequest {
    pb::CheckRequest {
        key: key.to_string(),
        model: "demo-classifier".into(),
        model_version: "2.1.0".into(),
        environment: "production".into(),
        meters: vec![pb::Meter {
            metric: "inferences".into(),
            quantity: 1,
        }],
        ..Default::default()
    }
}

fn reason_codes(d: &pb::CheckResponse) -> String {
    let codes: Vec<&str> = d.reasons.iter().map(|r| r.code.as_str()).collect();
    codes.join(",")
}

/// Sends one Check and insists that it is allowed; returns the license id.
async fn allowed_check(
    edge: &mut EdgeClient<Channel>,
    key: &str,
    node: u64,
) -> anyhow::Result<String> {
    let d = edge
        .check(check_request(key))
        .await
        .map_err(|s| anyhow::anyhow!("check on node {node}: {s}"))?
        .into_inner();
    anyhow::ensure!(
        d.decision == "allow",
        "check on node {node} was not allowed ({}: {}); the key's license must allow these Checks",
        d.decision,
        reason_codes(&d)
    );
    Ok(d.license_id)
}

/// This node's status JSON, over the admin gRPC API.
async fn status(admin: &mut AdminClient<Channel>, token: &str) -> anyhow::Result<Value> {
    let mut req = tonic::Request::new(pb::StatusRequest {});
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .context("admin token is not valid in a header")?,
    );
    let s = admin
        .status(req)
        .await
        .map_err(|s| anyhow::anyhow!("status: {s}"))?
        .into_inner();
    serde_json::from_str(&s.status_json).context("status is not JSON")
}

/// `gossip.bytes_sent` and `gossip.bytes_received` of every node.
async fn wire_bytes(
    admins: &mut [(u64, AdminClient<Channel>)],
    token: &str,
) -> anyhow::Result<Vec<(u64, u64, u64)>> {
    let futures: Vec<_> = admins
        .iter_mut()
        .map(|(id, admin)| {
            let id = *id;
            async move {
                let s = status(admin, token).await?;
                let g = &s["gossip"];
                let sent = g["bytes_sent"]
                    .as_u64()
                    .with_context(|| format!("node {id} reports no gossip.bytes_sent: {g}"))?;
                let received = g["bytes_received"].as_u64().unwrap_or(0);
                anyhow::Ok((id, sent, received))
            }
        })
        .collect();
    join_all(futures).await.into_iter().collect()
}

#[derive(Default)]
struct Tally {
    measuring: AtomicBool,
    stop: AtomicBool,
    allowed: AtomicU64,
    denied: AtomicU64,
    errors: AtomicU64,
    shed: AtomicU64,
}

/// Open-loop load on one node: Check number `n` is due at
/// `start + n / rate`, sent without waiting for earlier answers.
async fn drive(edge: EdgeClient<Channel>, key: String, rate: u64, tally: Arc<Tally>) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let start = tokio::time::Instant::now();
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let req = check_request(&key);
    let mut n: u32 = 0;
    while !tally.stop.load(Ordering::Relaxed) {
        tokio::time::sleep_until(start + period * n).await;
        n = n.saturating_add(1);
        let measured = tally.measuring.load(Ordering::Relaxed);
        if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT_PER_NODE {
            if measured {
                tally.shed.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (mut edge, req, tally, in_flight) = (
            edge.clone(),
            req.clone(),
            Arc::clone(&tally),
            Arc::clone(&in_flight),
        );
        tokio::spawn(async move {
            let r = edge.check(req).await;
            in_flight.fetch_sub(1, Ordering::Relaxed);
            if !measured {
                return;
            }
            match r {
                Ok(d) if d.get_ref().decision == "allow" => {
                    tally.allowed.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {
                    tally.denied.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    tally.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
}

async fn cost(cluster: &BenchCluster, opts: &GossipBenchOptions) -> anyhow::Result<Value> {
    let mut admins = Vec::with_capacity(cluster.nodes.len());
    let mut edges = Vec::with_capacity(cluster.nodes.len());
    for n in &cluster.nodes {
        let channel = connect(&n.grpc_addr).await?;
        admins.push((n.id, AdminClient::new(channel.clone())));
        let mut edge = EdgeClient::new(channel);
        allowed_check(&mut edge, &opts.license_key, n.id).await?;
        edges.push(edge);
    }
    // Fails early when gossip is off.
    wire_bytes(&mut admins, &cluster.token).await?;

    let tally = Arc::new(Tally::default());
    let drivers: Vec<_> = edges
        .into_iter()
        .map(|edge| {
            tokio::spawn(drive(
                edge,
                opts.license_key.clone(),
                opts.rate_per_node,
                Arc::clone(&tally),
            ))
        })
        .collect();
    let measured = async {
        tokio::time::sleep(Duration::from_secs(opts.warmup_secs)).await;
        let before = wire_bytes(&mut admins, &cluster.token).await?;
        tally.measuring.store(true, Ordering::Relaxed);
        let from = Instant::now();
        tokio::time::sleep(Duration::from_secs(opts.duration_secs)).await;
        tally.measuring.store(false, Ordering::Relaxed);
        let elapsed = from.elapsed();
        let after = wire_bytes(&mut admins, &cluster.token).await?;
        anyhow::Ok((before, after, elapsed))
    }
    .await;
    tally.stop.store(true, Ordering::Relaxed);
    for d in drivers {
        let _ = d.await;
    }
    // Let the answers still in flight land (they are not measured).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (before, after, elapsed) = measured?;

    let mut per_node = serde_json::Map::new();
    let (mut sent, mut received) = (0u64, 0u64);
    for ((id, s0, r0), (_, s1, r1)) in before.iter().zip(&after) {
        let s = s1.saturating_sub(*s0);
        sent += s;
        received += r1.saturating_sub(*r0);
        per_node.insert(id.to_string(), json!(s));
    }
    let increments = tally.allowed.load(Ordering::Relaxed);
    let per_increment = if increments == 0 {
        Value::Null
    } else {
        json!(sent as f64 / increments as f64)
    };
    Ok(json!({
        "scenario": "gossip",
        "nodes": cluster.nodes.len(),
        "duration_s": elapsed.as_secs_f64(),
        "rate_per_node": opts.rate_per_node,
        "increments": increments,
        "denied": tally.denied.load(Ordering::Relaxed),
        "errors": tally.errors.load(Ordering::Relaxed),
        "shed": tally.shed.load(Ordering::Relaxed),
        "wire_bytes": sent,
        "wire_bytes_received": received,
        "wire_bytes_sent_by_node": per_node,
        "bytes_per_increment": per_increment,
        "target_bytes_per_increment": TARGET_BYTES_PER_INCREMENT,
    }))
}

/// Heal-to-agreement times of the convergence rounds.
#[derive(Debug, Clone)]
pub struct ConvergenceReport {
    /// The license whose counters were compared.
    pub license: String,
    /// One time per round, ms, in round order.
    pub heal_to_converged_ms: Vec<f64>,
}

/// Nearest-rank quantile of sorted `values`.
fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let n = sorted.len();
    let rank = (p * n as f64).ceil().max(1.0) as usize;
    sorted[rank.min(n) - 1]
}

/// p50, p99, min and max of heal-to-agreement times (ms), and every value.
pub fn convergence_summary(times_ms: &[f64]) -> Value {
    let mut sorted = times_ms.to_vec();
    sorted.sort_by(f64::total_cmp);
    json!({
        "heals": times_ms.len(),
        "p50_ms": quantile(&sorted, 0.50),
        "p99_ms": quantile(&sorted, 0.99),
        "min_ms": sorted.first().copied().unwrap_or(0.0),
        "max_ms": sorted.last().copied().unwrap_or(0.0),
        "runs_ms": times_ms,
    })
}

/// Runs `heals` partition-and-heal rounds (node `r mod n` is cut off in
/// round `r`) and times each heal until every node agrees on the counters
/// of the license `key` belongs to. Needs at least three nodes started with
/// fault injection.
pub async fn convergence(
    cluster: &BenchCluster,
    key: &str,
    heals: usize,
    checks_per_side: usize,
) -> anyhow::Result<ConvergenceReport> {
    let n = cluster.nodes.len();
    anyhow::ensure!(n >= 3, "convergence needs at least three nodes");
    let mut edges = Vec::with_capacity(n);
    let mut https = Vec::with_capacity(n);
    let mut license = String::new();
    for node in &cluster.nodes {
        let mut edge = EdgeClient::new(connect(&node.grpc_addr).await?);
        license = allowed_check(&mut edge, key, node.id).await?;
        edges.push(edge);
        https.push(Http::new(&node.http_addr, &cluster.token));
    }
    anyhow::ensure!(!license.is_empty(), "the key resolves to no license");
    let all: Vec<usize> = (0..n).collect();
    agreement(&mut https, &all, &license, CONVERGE_TIMEOUT)
        .await
        .context("before the first round")?;

    let mut times = Vec::with_capacity(heals);
    for round in 0..heals {
        let victim = round % n;
        let rest: Vec<usize> = (0..n).filter(|i| *i != victim).collect();
        let victim_id = cluster.nodes[victim].id;
        let rest_ids: Vec<u64> = rest.iter().map(|i| cluster.nodes[*i].id).collect();

        // Cut the victim off, from both ends.
        {
            let mut calls = Vec::with_capacity(n);
            for (i, h) in https.iter_mut().enumerate() {
                let drop: Vec<u64> = if i == victim {
                    rest_ids.clone()
                } else {
                    vec![victim_id]
                };
                calls.push(h.set_dropped(drop));
            }
            for r in join_all(calls).await {
                r.with_context(|| format!("round {round}: partitioning node {victim_id}"))?;
            }
        }
        // Usage on both sides: the victim and two of the others.
        for _ in 0..checks_per_side {
            for i in [
                victim,
                rest[round % rest.len()],
                rest[(round + 1) % rest.len()],
            ] {
                allowed_check(&mut edges[i], key, cluster.nodes[i].id).await?;
            }
        }
        let majority = agreement(&mut https, &rest, &license, CONVERGE_TIMEOUT)
            .await
            .with_context(|| format!("round {round}: the connected side did not agree"))?;
        let cut_off = counters_of(&https[victim].usage(&license).await?);
        anyhow::ensure!(
            cut_off != majority,
            "round {round}: node {victim_id} already agrees with the others while cut off: gossip crossed the partition"
        );

        let healed_at = Instant::now();
        {
            let calls: Vec<_> = https
                .iter_mut()
                .map(|h| h.set_dropped(Vec::new()))
                .collect();
            for r in join_all(calls).await {
                r.with_context(|| format!("round {round}: healing"))?;
            }
        }
        agreement(&mut https, &all, &license, CONVERGE_TIMEOUT)
            .await
            .with_context(|| format!("round {round}: no agreement after the heal"))?;
        times.push(healed_at.elapsed().as_secs_f64() * 1e3);
    }
    Ok(ConvergenceReport {
        license,
        heal_to_converged_ms: times,
    })
}

/// The counters of a `/v1/usage` answer as comparable values: identity,
/// value and per-node slots, sorted.
fn counters_of(usage: &Value) -> Vec<Value> {
    let mut out: Vec<Value> = usage["counters"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|c| {
            json!({
                "license": c["license"], "quota": c["quota"], "epoch": c["epoch"],
                "scope": c["scope"], "value": c["value"], "slots": c["slots"],
            })
        })
        .collect();
    out.sort_by_key(|c| {
        format!(
            "{}\u{0}{}\u{0}{:020}\u{0}{}",
            c["license"],
            c["quota"],
            c["epoch"].as_u64().unwrap_or(0),
            c["scope"]
        )
    });
    out
}

/// Polls `nodes` (all at once, back to back) until they all show the same
/// non-empty counters for `license`; returns them.
async fn agreement(
    https: &mut [Http],
    nodes: &[usize],
    license: &str,
    within: Duration,
) -> anyhow::Result<Vec<Value>> {
    let deadline = Instant::now() + within;
    loop {
        let calls: Vec<_> = https
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| nodes.contains(i))
            .map(|(_, h)| h.usage(license))
            .collect();
        let views: Vec<anyhow::Result<Vec<Value>>> = join_all(calls)
            .await
            .into_iter()
            .map(|r| r.map(|v| counters_of(&v)))
            .collect();
        if let Some(Ok(first)) = views.first()
            && !first.is_empty()
            && views.iter().all(|v| v.as_ref().ok() == Some(first))
        {
            return Ok(first.clone());
        }
        if Instant::now() >= deadline {
            let shown: Vec<String> = views
                .iter()
                .map(|v| match v {
                    Ok(c) => Value::Array(c.clone()).to_string(),
                    Err(e) => format!("error: {e:#}"),
                })
                .collect();
            anyhow::bail!("no agreement within {within:?}: {}", shown.join(" | "));
        }
        tokio::task::yield_now().await;
    }
}

/// Awaits every future concurrently; results in input order.
pub async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in pinned.iter_mut().zip(results.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

/// A keep-alive HTTP/1.1 connection to one node, for the few admin calls
/// the bench makes (fault injection, usage). Reconnects after any error.
struct Http {
    addr: String,
    token: String,
    conn: Option<BufReader<TcpStream>>,
}

/// Largest response body accepted.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// How long one HTTP exchange may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

impl Http {
    fn new(addr: &str, token: &str) -> Self {
        Self {
            addr: addr
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string(),
            token: token.to_string(),
            conn: None,
        }
    }

    async fn usage(&mut self, license: &str) -> anyhow::Result<Value> {
        let (status, body) = self
            .request("GET", &format!("/v1/usage?license={license}"), None)
            .await?;
        anyhow::ensure!(
            status == 200,
            "GET /v1/usage on {}: {status} {}",
            self.addr,
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice(&body).context("usage is not JSON")
    }

    async fn set_dropped(&mut self, peers: Vec<u64>) -> anyhow::Result<()> {
        let body = json!({ "drop": peers }).to_string();
        let (status, reply) = self
            .request("POST", "/v1/admin/gossip/faults", Some(&body))
            .await?;
        anyhow::ensure!(
            status == 200,
            "POST /v1/admin/gossip/faults on {}: {status} {}",
            self.addr,
            String::from_utf8_lossy(&reply)
        );
        Ok(())
    }

    /// One exchange; on a broken kept-alive connection, one retry on a
    /// fresh one (both calls are idempotent).
    async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let reused = self.conn.is_some();
        match tokio::time::timeout(HTTP_TIMEOUT, self.exchange(method, path, body)).await {
            Ok(Ok(r)) => return Ok(r),
            Ok(Err(e)) if !reused => {
                self.conn = None;
                return Err(e);
            }
            Ok(Err(_)) => {}
            Err(_) => {
                self.conn = None;
                anyhow::bail!("{method} {path} on {}: timed out", self.addr);
            }
        }
        self.conn = None;
        match tokio::time::timeout(HTTP_TIMEOUT, self.exchange(method, path, body)).await {
            Ok(r) => r.inspect_err(|_| self.conn = None),
            Err(_) => {
                self.conn = None;
                anyhow::bail!("{method} {path} on {}: timed out", self.addr)
            }
        }
    }

    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        if self.conn.is_none() {
            let s = TcpStream::connect(&self.addr)
                .await
                .with_context(|| format!("connecting to {}", self.addr))?;
            s.set_nodelay(true)?;
            self.conn = Some(BufReader::new(s));
        }
        let addr = self.addr.clone();
        let token = self.token.clone();
        let conn = self.conn.as_mut().context("no connection")?;
        let body = body.unwrap_or("");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let mut out = head.into_bytes();
        out.extend_from_slice(body.as_bytes());
        conn.get_mut().write_all(&out).await?;

        let mut line = String::new();
        anyhow::ensure!(
            conn.read_line(&mut line).await? > 0,
            "connection closed by {addr}"
        );
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line from {addr}: {line:?}"))?;
        let mut length = None;
        let mut chunked = false;
        let mut close = false;
        loop {
            line.clear();
            anyhow::ensure!(
                conn.read_line(&mut line).await? > 0,
                "connection closed by {addr} in the headers"
            );
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let Some((name, value)) = l.split_once(':') else {
                continue;
            };
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            match name.as_str() {
                "content-length" => length = Some(value.parse::<usize>()?),
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                conn.read_line(&mut line).await?;
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .with_context(|| format!("bad chunk size from {addr}: {line:?}"))?;
                anyhow::ensure!(
                    body.len() + size <= MAX_RESPONSE_BYTES,
                    "response too large"
                );
                let start = body.len();
                body.resize(start + size, 0);
                conn.read_exact(&mut body[start..]).await?;
                line.clear();
                conn.read_line(&mut line).await?;
                if size == 0 {
                    break;
                }
            }
        } else if let Some(n) = length {
            anyhow::ensure!(n <= MAX_RESPONSE_BYTES, "response too large");
            body.resize(n, 0);
            conn.read_exact(&mut body).await?;
        } else {
            conn.take(MAX_RESPONSE_BYTES as u64)
                .read_to_end(&mut body)
                .await?;
            close = true;
        }
        if close {
            self.conn = None;
        }
        Ok((status, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let times: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let s = convergence_summary(&times);
        assert_eq!(s["p50_ms"], 50.0);
        assert_eq!(s["p99_ms"], 99.0);
        assert_eq!(s["max_ms"], 100.0);
        assert_eq!(s["heals"], 100);
    }

    #[test]
    fn counters_compare_by_value_and_slots_in_any_order() {
        let a = json!({"counters": [
            {"license": "l", "quota": "q", "epoch": 2, "scope": "", "value": 3, "slots": {"1": 1, "2": 2}},
            {"license": "l", "quota": "p", "epoch": 2, "scope": "", "value": 1, "slots": {"1": 1}},
        ]});
        let b = json!({"node_id": 2, "counters": [
            {"license": "l", "quota": "p", "epoch": 2, "scope": "", "value": 1, "slots": {"1": 1}},
            {"license": "l", "quota": "q", "epoch": 2, "scope": "", "value": 3, "slots": {"2": 2, "1": 1}},
        ]});
        assert_eq!(counters_of(&a), counters_of(&b));
        let c = json!({"counters": [
            {"license": "l", "quota": "q", "epoch": 2, "scope": "", "value": 3, "slots": {"1": 2, "2": 1}},
        ]});
        assert_ne!(counters_of(&a), counters_of(&c));
    }

    #[test]
    fn reads_cluster_json_with_a_relative_token_file() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("gossip-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("admin.token"), "tga_x\n")?;
        std::fs::write(
            dir.join("cluster.json"),
            r#"{"nodes":[{"id":1,"region":"local-a","grpc_addr":"127.0.0.1:1","http_addr":"127.0.0.1:2"}],"admin_token_file":"admin.token"}"#,
        )?;
        let c = BenchCluster::read(&dir.join("cluster.json"));
        std::fs::remove_dir_all(&dir)?;
        let c = c?;
        assert_eq!(c.token, "tga_x");
        assert_eq!(c.nodes.len(), 1);
        assert_eq!(c.nodes[0].http_addr, "127.0.0.1:2");
        Ok(())
    }
}
