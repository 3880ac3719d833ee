//! Real `tollgate serve` processes on loopback, for tests and benches that
//! kill nodes without warning: settings files, spawning, SIGKILL, and small
//! HTTP helpers.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// How long helpers wait for a condition.
pub const WAIT: Duration = Duration::from_secs(30);

/// One node's addresses.
#[derive(Clone, Debug)]
pub struct Addrs {
    pub id: u64,
    pub grpc: String,
    pub http: String,
    pub raft: String,
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

fn free_port() -> anyhow::Result<String> {
    // The OS picks a free port; it is released again right away and reused
    // by the node a moment later.
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

impl ProcCluster {
    /// Writes settings for `n` nodes under `dir` (node 1 bootstraps all of
    /// them and seeds the quickstart documents) and starts every node.
    pub fn start(dir: &Path, n: usize) -> anyhow::Result<Self> {
        let token = "tga_process_test_token".to_string();
        std::fs::write(dir.join("admin.token"), format!("{token}\n"))?;
        let mut nodes = Vec::new();
        for i in 0..n {
            nodes.push(Addrs {
                id: u64::try_from(i)? + 1,
                grpc: free_port()?,
                http: free_port()?,
                raft: free_port()?,
            });
        }
        let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart.yaml");
        let mut members = String::new();
        for a in &nodes {
            members.push_str(&format!(
                "  - {{ id: {}, region: local-{}, raft_addr: \"{}\", grpc_addr: \"{}\", http_addr: \"{}\" }}\n",
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

    /// Indexes of running nodes.
    pub fn running(&self) -> Vec<usize> {
        (0..self.children.len())
            .filter(|i| self.children[*i].is_some())
            .collect()
    }

    fn url(&self, i: usize, path: &str) -> String {
        format!("http://{}{path}", self.nodes[i].http)
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

/// One failover's timings, from the SIGKILL of the leader.
#[derive(Clone, Copy, Debug)]
pub struct Failover {
    /// Until the surviving follower reported a new leader.
    pub elected: Duration,
    /// Until a write through that follower committed.
    pub committed: Duration,
}
