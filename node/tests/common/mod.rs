//! Real `tollgate serve` processes on loopback, for tests and benches that
//! kill nodes without warning: settings files, spawning, SIGKILL, and small
//! HTTP helpers.

#![allow(dead_code)]

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
pub use tollgate_node::gossip_bench::join_all;

/// How long helpers wait for a condition.
pub const WAIT: Duration = Duration::from_secs(30);

/// One node's addresses.
#[derive(Clone, Debug)]
pub struct Addrs {
    pub id: u64,
    pub grpc: String,
    pub http: String,
    pub raft: String,
    /// The QUIC gossip address, when gossip is on.
    pub gossip: Option<String>,
}

/// How [`ProcCluster::start_with`] configures the nodes. The default is what
/// [`ProcCluster::start`] has always written: no gossip settings at all.
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// Usage gossip over QUIC with mTLS: a `gossip_addr` per node (a free
    /// UDP port), certificates made by `tollgate certs init`, and the
    /// `gossip` section below.
    pub gossip: Option<GossipOptions>,
    /// `enable_fault_injection: true` (needed for partitions).
    pub fault_injection: bool,
    /// `durable_usage_ack: true`: acknowledged usage is on disk.
    pub durable_usage_ack: bool,
    /// `audit: { enabled: false }`: for measurements of something else
    /// (gossip bytes) that the audit writer's CPU would only blur.
    pub no_audit: bool,
}

/// The `gossip` section of the settings.
#[derive(Clone, Debug)]
pub struct GossipOptions {
    pub interval_ms: u64,
    pub fanout: usize,
    pub anti_entropy_ms: u64,
}

impl Default for GossipOptions {
    fn default() -> Self {
        Self {
            interval_ms: 50,
            fanout: 2,
            anti_entropy_ms: 1000,
        }
    }
}

impl ClusterOptions {
    /// Gossip with the default timing (50 ms ticks, fanout 2, digest every
    /// second) and fault injection on.
    pub fn gossip() -> Self {
        Self {
            gossip: Some(GossipOptions::default()),
            fault_injection: true,
            durable_usage_ack: false,
            no_audit: false,
        }
    }
}

/// A cluster of `tollgate serve` processes.
pub struct ProcCluster {
    dir: PathBuf,
    pub nodes: Vec<Addrs>,
    children: Vec<Option<Child>>,
    pub token: String,
    pub client: reqwest::Client,
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Free loopback ports, held until every one of a cluster is picked (so
/// the OS cannot hand the same one out twice), then released for the nodes
/// to bind a moment later.
#[derive(Default)]
struct Ports {
    tcp: Vec<TcpListener>,
    udp: Vec<UdpSocket>,
}

impl Ports {
    fn tcp(&mut self) -> anyhow::Result<String> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?.to_string();
        self.tcp.push(l);
        Ok(addr)
    }

    fn udp(&mut self) -> anyhow::Result<String> {
        let s = UdpSocket::bind("127.0.0.1:0")?;
        let addr = s.local_addr()?.to_string();
        self.udp.push(s);
        Ok(addr)
    }
}

/// `tollgate certs init --out DIR --nodes N`: a CA and one certificate per
/// node id.
pub fn make_certs(out: &Path, nodes: usize) -> anyhow::Result<()> {
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["certs", "init", "--out"])
        .arg(out)
        .arg("--nodes")
        .arg(nodes.to_string())
        .stdin(Stdio::null())
        .output()
        .context("running tollgate certs init")?;
    anyhow::ensure!(
        output.status.success(),
        "tollgate certs init failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

impl ProcCluster {
    /// Writes settings for `n` nodes under `dir` (node 1 bootstraps all of
    /// them and seeds the quickstart documents) and starts every node.
    pub fn start(dir: &Path, n: usize) -> anyhow::Result<Self> {
        Self::start_with(dir, n, &ClusterOptions::default())
    }

    /// Like [`ProcCluster::start`], with gossip, fault injection and
    /// durable acks as `opts` says.
    pub fn start_with(dir: &Path, n: usize, opts: &ClusterOptions) -> anyhow::Result<Self> {
        let token = "tga_process_test_token".to_string();
        std::fs::write(dir.join("admin.token"), format!("{token}\n"))?;
        let mut nodes = Vec::new();
        let mut ports = Ports::default();
        for i in 0..n {
            nodes.push(Addrs {
                id: u64::try_from(i)? + 1,
                grpc: ports.tcp()?,
                http: ports.tcp()?,
                raft: ports.tcp()?,
                gossip: match opts.gossip {
                    Some(_) => Some(ports.udp()?),
                    None => None,
                },
            });
        }
        drop(ports);
        let certs = dir.join("certs");
        if opts.gossip.is_some() {
            make_certs(&certs, n)?;
        }
        let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart.yaml");
        let mut members = String::new();
        for a in &nodes {
            let gossip = match &a.gossip {
                Some(g) => format!(", gossip_addr: \"{g}\""),
                None => String::new(),
            };
            members.push_str(&format!(
                "  - {{ id: {}, region: local-{}, raft_addr: \"{}\", grpc_addr: \"{}\", http_addr: \"{}\"{gossip} }}\n",
                a.id,
                char::from(b'a' + u8::try_from(a.id - 1)?),
                a.raft,
                a.grpc,
                a.http
            ));
        }
        for a in &nodes {
            let first = a.id == 1;
            let mut yaml = format!(
                "node_id: {id}\nregion: local-{r}\ngrpc_addr: \"{g}\"\nhttp_addr: \"{h}\"\nraft_addr: \"{ra}\"\ndata_dir: \"{d}\"\nadmin_token_file: \"{t}\"\nbootstrap: {first}\nraft:\n  heartbeat_interval_ms: 50\n  election_timeout_min_ms: 300\n  election_timeout_max_ms: 600\n  write_timeout_ms: 3000\n",
                id = a.id,
                r = char::from(b'a' + u8::try_from(a.id - 1)?),
                g = a.grpc,
                h = a.http,
                ra = a.raft,
                d = dir.join(format!("node-{}", a.id)).display(),
                t = dir.join("admin.token").display(),
            );
            if let (Some(g), Some(addr)) = (&opts.gossip, &a.gossip) {
                yaml.push_str(&format!(
                    "gossip_addr: \"{addr}\"\ntls:\n  ca: \"{ca}\"\n  cert: \"{cert}\"\n  key: \"{key}\"\ngossip:\n  interval_ms: {i}\n  fanout: {f}\n  anti_entropy_ms: {ae}\n",
                    ca = certs.join("ca.pem").display(),
                    cert = certs.join(format!("node-{}.pem", a.id)).display(),
                    key = certs.join(format!("node-{}.key", a.id)).display(),
                    i = g.interval_ms,
                    f = g.fanout,
                    ae = g.anti_entropy_ms,
                ));
            }
            if opts.fault_injection {
                yaml.push_str("enable_fault_injection: true\n");
            }
            if opts.no_audit {
                yaml.push_str("audit:\n  enabled: false\n");
            }
            if opts.durable_usage_ack {
                yaml.push_str("durable_usage_ack: true\n");
            }
            if first {
                yaml.push_str(&format!(
                    "seed_documents: \"{}\"\ninitial_members:\n{members}",
                    quickstart.display()
                ));
            }
            std::fs::write(dir.join(format!("node-{}.yaml", a.id)), yaml)?;
        }
        let mut cluster = Self {
            dir: dir.to_path_buf(),
            children: nodes.iter().map(|_| None).collect(),
            nodes,
            token,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        };
        for i in 0..n {
            cluster.spawn(i)?;
        }
        Ok(cluster)
    }

    /// Starts node `i` (again) from its settings file.
    pub fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        anyhow::ensure!(self.children[i].is_none(), "node {i} is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node-{}.log", i + 1)))?;
        let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("serve")
            .arg("--config")
            .arg(self.dir.join(format!("node-{}.yaml", i + 1)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning tollgate serve")?;
        self.children[i] = Some(child);
        Ok(())
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        let mut child = self.children[i].take().context("node is not running")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Stops node `i` cleanly (SIGTERM: it flushes and closes its storage)
    /// and waits for the process to exit.
    pub fn stop(&mut self, i: usize) -> anyhow::Result<()> {
        let mut child = self.children[i].take().context("node is not running")?;
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .context("running kill")?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        let exit = child.wait()?;
        anyhow::ensure!(exit.success(), "node {i} exited with {exit}");
        Ok(())
    }

    /// Indexes of running nodes.
    pub fn running(&self) -> Vec<usize> {
        (0..self.children.len())
            .filter(|i| self.children[*i].is_some())
            .collect()
    }

    /// `http://<node i>/<path>`.
    pub fn url(&self, i: usize, path: &str) -> String {
        format!("http://{}{path}", self.nodes[i].http)
    }

    /// The directory holding settings, logs and data dirs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Waits until every running node has applied the seed documents (the
    /// quickstart licenses). Admin writes must wait for this: the seed batch
    /// applies only to a config that never held a license.
    pub async fn wait_seeded(&self) -> anyhow::Result<()> {
        self.leader().await?;
        let deadline = Instant::now() + WAIT;
        for i in self.running() {
            loop {
                let n = self
                    .status(i)
                    .await
                    .and_then(|s| s["n_licenses"].as_u64())
                    .unwrap_or(0);
                if n >= 2 {
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "node {i} never got the seed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// PUTs a license document (JSON or YAML) through node `i`, retrying
    /// while the cluster has no quorum yet, and waits until every running
    /// node has applied it. Returns the config version.
    pub async fn apply_license(&self, i: usize, id: &str, doc: &str) -> anyhow::Result<u64> {
        let deadline = Instant::now() + WAIT;
        loop {
            let r = self
                .client
                .put(self.url(i, &format!("/v1/licenses/{id}?reason=test")))
                .header("authorization", format!("Bearer {}", self.token))
                .body(doc.to_string())
                .send()
                .await;
            if let Ok(r) = r {
                let status = r.status().as_u16();
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                if status == 200 {
                    let v = body["version"].as_u64().context("no version")?;
                    self.wait_version(v).await?;
                    return Ok(v);
                }
                anyhow::ensure!(
                    status == 503 || status == 504,
                    "PUT license {id}: {status} {body}"
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "PUT license {id} never committed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Tells node `i` to drop all gossip to and from `peers` (node ids);
    /// an empty list heals.
    pub async fn set_dropped(&self, i: usize, peers: &[u64]) -> anyhow::Result<()> {
        let r = self
            .client
            .post(self.url(i, "/v1/admin/gossip/faults"))
            .header("authorization", format!("Bearer {}", self.token))
            .json(&serde_json::json!({ "drop": peers }))
            .send()
            .await?;
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        anyhow::ensure!(status.is_success(), "faults on node {i}: {status} {body}");
        Ok(())
    }

    /// Cuts node `k` off from every other node: `k` drops all of them and
    /// each of them drops `k`.
    pub async fn partition(&self, k: usize) -> anyhow::Result<()> {
        let victim = self.nodes[k].id;
        let others: Vec<u64> = self
            .nodes
            .iter()
            .map(|a| a.id)
            .filter(|id| *id != victim)
            .collect();
        let cut = [victim];
        let mut calls = vec![self.set_dropped(k, &others)];
        for i in self.running().into_iter().filter(|i| *i != k) {
            calls.push(self.set_dropped(i, &cut));
        }
        for r in join_all(calls).await {
            r?;
        }
        Ok(())
    }

    /// Heals every partition on every running node.
    pub async fn heal(&self) -> anyhow::Result<()> {
        let calls: Vec<_> = self
            .running()
            .into_iter()
            .map(|i| self.set_dropped(i, &[]))
            .collect();
        for r in join_all(calls).await {
            r?;
        }
        Ok(())
    }

    /// Node `i`'s merged view of every counter (of one license).
    pub async fn usage(
        &self,
        i: usize,
        license: Option<&str>,
    ) -> anyhow::Result<serde_json::Value> {
        let path = match license {
            Some(l) => format!("/v1/usage?license={l}"),
            None => "/v1/usage".to_string(),
        };
        let r = self
            .client
            .get(self.url(i, &path))
            .header("authorization", format!("Bearer {}", self.token))
            .send()
            .await?;
        let status = r.status();
        anyhow::ensure!(status.is_success(), "usage on node {i}: {status}");
        Ok(r.json().await?)
    }

    /// Waits until every running node reports the same counters for
    /// `license` (value and per-node slots) and returns them.
    pub async fn wait_usage_converged(
        &self,
        license: &str,
        within: Duration,
    ) -> anyhow::Result<Vec<CounterView>> {
        let deadline = Instant::now() + within;
        loop {
            let calls: Vec<_> = self
                .running()
                .into_iter()
                .map(|i| self.usage(i, Some(license)))
                .collect();
            let mut views = Vec::new();
            for r in join_all(calls).await {
                views.push(r.map(|v| counters(&v)));
            }
            let first = views.first().and_then(|v| v.as_ref().ok()).cloned();
            if let Some(first) = first
                && !first.is_empty()
                && views.iter().all(|v| v.as_ref().ok() == Some(&first))
            {
                return Ok(first);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "usage of {license} did not converge: {views:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Writes `cluster.json` (the format `tollgate up` writes) for tools
    /// and benches, and returns its path.
    pub fn write_cluster_json(&self) -> anyhow::Result<PathBuf> {
        let nodes: Vec<serde_json::Value> = self
            .nodes
            .iter()
            .map(|a| {
                serde_json::json!({
                    "id": a.id,
                    "region": format!("local-{}", char::from(b'a' + u8::try_from(a.id - 1).unwrap_or(0))),
                    "grpc_addr": a.grpc,
                    "http_addr": a.http,
                    "raft_addr": a.raft,
                })
            })
            .collect();
        let path = self.dir.join("cluster.json");
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(&serde_json::json!({
                "nodes": nodes,
                "admin_token_file": self.dir.join("admin.token"),
            }))?,
        )?;
        Ok(path)
    }

    /// Node `i`'s status, if it answers.
    pub async fn status(&self, i: usize) -> Option<serde_json::Value> {
        let r = self
            .client
            .get(self.url(i, "/v1/status"))
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    /// The index of the leader every running node agrees on.
    pub async fn leader(&self) -> anyhow::Result<usize> {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut seen = Vec::new();
            for i in self.running() {
                seen.push(
                    self.status(i)
                        .await
                        .and_then(|s| s["raft"]["leader"].as_u64()),
                );
            }
            if let Some(Some(id)) = seen.first().copied()
                && seen.iter().all(|l| *l == Some(id))
            {
                let i = usize::try_from(id)? - 1;
                if self.children.get(i).is_some_and(Option::is_some) {
                    return Ok(i);
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "no agreed leader: {seen:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every running node has applied at least version `v`.
    pub async fn wait_version(&self, v: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        for i in self.running() {
            loop {
                let have = self
                    .status(i)
                    .await
                    .and_then(|s| s["policy_version"].as_u64())
                    .unwrap_or(0);
                if have >= v {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "node {i} stuck at {have}, want {v}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(())
    }

    /// PUTs a license through node `i`; returns (HTTP status, body).
    pub async fn put_license(
        &self,
        i: usize,
        id: &str,
        reason: &str,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let doc = format!(
            r#"{{"apiVersion":"tollgate/v1","kind":"License","id":"{id}","customer":"C"}}"#
        );
        let r = self
            .client
            .put(self.url(i, &format!("/v1/licenses/{id}?reason={reason}")))
            .header("authorization", format!("Bearer {}", self.token))
            .body(doc)
            .send()
            .await?;
        let status = r.status().as_u16();
        let body = r.json().await.unwrap_or(serde_json::Value::Null);
        Ok((status, body))
    }

    /// The first leader other than `old` that node `i` reports.
    async fn new_leader_seen(
        &self,
        i: usize,
        old: u64,
        since: Instant,
    ) -> anyhow::Result<Duration> {
        loop {
            let leader = self
                .status(i)
                .await
                .and_then(|s| s["raft"]["leader"].as_u64());
            if leader.is_some_and(|l| l != old) {
                return Ok(since.elapsed());
            }
            anyhow::ensure!(since.elapsed() < WAIT, "no new leader seen by node {i}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Kills the leader and measures, from the kill, how long until the
    /// surviving follower knows a new leader and how long until a license
    /// write through it commits. Restarts the killed node afterwards and
    /// waits until it has caught up.
    pub async fn failover_once(&mut self, round: usize) -> anyhow::Result<Failover> {
        let leader = self.leader().await?;
        let follower = self
            .running()
            .into_iter()
            .find(|i| *i != leader)
            .context("no follower")?;
        self.kill(leader)?;
        let killed_at = Instant::now();
        let old = self.nodes[leader].id;
        let write = async {
            loop {
                let (status, body) = self
                    .put_license(follower, &format!("failover-{round}"), "failover")
                    .await?;
                if status == 200 {
                    return anyhow::Ok((
                        killed_at.elapsed(),
                        body["version"].as_u64().unwrap_or(0),
                    ));
                }
                anyhow::ensure!(
                    killed_at.elapsed() < WAIT,
                    "no commit after the leader died: {status} {body}"
                );
                // A refused write comes back at once; do not spin.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let (elected, written) =
            tokio::join!(self.new_leader_seen(follower, old, killed_at), write);
        let (committed, version) = written?;
        let elected = elected?;
        self.spawn(leader)?;
        self.wait_version(version).await?;
        Ok(Failover { elected, committed })
    }
}

/// One counter as `/v1/usage` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterView {
    pub license: String,
    pub quota: String,
    pub epoch: u64,
    pub scope: String,
    pub value: u64,
    /// Units per node id.
    pub slots: std::collections::BTreeMap<u64, u64>,
}

/// The counters of a `/v1/usage` answer, sorted.
pub fn counters(usage: &serde_json::Value) -> Vec<CounterView> {
    let mut out: Vec<CounterView> = usage["counters"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|c| CounterView {
            license: c["license"].as_str().unwrap_or_default().to_string(),
            quota: c["quota"].as_str().unwrap_or_default().to_string(),
            epoch: c["epoch"].as_u64().unwrap_or(0),
            scope: match &c["scope"] {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            },
            value: c["value"].as_u64().unwrap_or(0),
            slots: c["slots"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_u64()?)))
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    out.sort_by(|a, b| {
        (&a.license, &a.quota, a.epoch, &a.scope).cmp(&(&b.license, &b.quota, b.epoch, &b.scope))
    });
    out
}

/// One failover's timings, from the SIGKILL of the leader.
#[derive(Clone, Copy, Debug)]
pub struct Failover {
    /// Until the surviving follower reported a new leader.
    pub elected: Duration,
    /// Until a write through that follower committed.
    pub committed: Duration,
}
