//! A Raft cluster of real nodes in this process, each on its own loopback
//! ports and sled directory: start, stop, restart on the same addresses,
//! join new nodes, find the leader, wait for convergence.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tollgate_node::server::{self, Listeners};
use tollgate_node::settings::{MemberSettings, NodeSettings, RaftTiming};
use tollgate_node::up::{QUICKSTART_YAML, ensure_admin_token, local_region};

use crate::TestNode;

/// How long cluster helpers wait for a condition before failing.
pub const WAIT: Duration = Duration::from_secs(20);

/// A cluster under test. Node `i` (0-based) has id `i + 1`.
pub struct TestCluster {
    dir: PathBuf,
    token: String,
    members: Vec<MemberSettings>,
    nodes: Vec<Option<TestNode>>,
    tweak: fn(&mut NodeSettings),
}

impl TestCluster {
    /// Starts `n` nodes in `dir`; node 1 bootstraps the cluster with all of
    /// them and applies the quickstart documents. `tweak` adjusts every
    /// node's settings (snapshot threshold, timing).
    pub async fn start(dir: &Path, n: usize, tweak: fn(&mut NodeSettings)) -> anyhow::Result<Self> {
        let token_file = dir.join("admin.token");
        ensure_admin_token(&token_file)?;
        let token = std::fs::read_to_string(&token_file)?.trim().to_string();
        let mut listeners = Vec::with_capacity(n);
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            let l = Listeners::ephemeral().await?;
            members.push(MemberSettings {
                id: u64::try_from(i)? + 1,
                region: local_region(i),
                raft_addr: l.raft.local_addr()?,
                grpc_addr: l.grpc.local_addr()?,
                http_addr: l.http.local_addr()?,
                gossip_addr: Some(l.gossip.local_addr()?),
            });
            listeners.push(l);
        }
        // One CA for the whole cluster (gossip is mutual TLS); room for
        // nodes that join later.
        let ids: Vec<u64> = (1..=u64::try_from(n)? + 4).collect();
        tollgate_node::certs::init(&dir.join("certs"), &ids)?;
        let mut cluster = Self {
            dir: dir.to_path_buf(),
            token,
            members,
            nodes: Vec::new(),
            tweak,
        };
        let mut starting = Vec::new();
        for (i, l) in listeners.into_iter().enumerate() {
            let settings = cluster.settings(i, i == 0);
            let seed = (i == 0).then(|| QUICKSTART_YAML.to_string());
            starting.push(tokio::spawn(server::start_with_listeners(
                settings, l, seed,
            )));
        }
        for s in starting {
            let node = s.await.context("start task")??;
            cluster
                .nodes
                .push(Some(TestNode::around(node, cluster.token.clone())));
        }
        Ok(cluster)
    }

    fn settings(&self, i: usize, bootstrap: bool) -> NodeSettings {
        let m = &self.members[i];
        let mut s = NodeSettings::local(m.id, &self.dir, m.grpc_addr, m.http_addr);
        s.region = m.region.clone();
        s.raft_addr = Some(m.raft_addr);
        s.gossip_addr = m.gossip_addr;
        s.tls = Some(tollgate_node::certs::node_files(
            &self.dir.join("certs"),
            m.id,
        ));
        s.admin_token_file = self.dir.join("admin.token");
        s.raft = RaftTiming::local();
        s.bootstrap = bootstrap;
        s.initial_members = if bootstrap {
            self.members.clone()
        } else {
            Vec::new()
        };
        (self.tweak)(&mut s);
        s
    }

    /// The admin token every node accepts.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Node `i`, if running.
    pub fn node(&self, i: usize) -> anyhow::Result<&TestNode> {
        self.nodes
            .get(i)
            .and_then(Option::as_ref)
            .with_context(|| format!("node index {i} is not running"))
    }

    /// Indexes of the running nodes.
    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].is_some())
            .collect()
    }

    /// Stops node `i` cleanly; its data dir and addresses are kept.
    pub async fn stop(&mut self, i: usize) -> anyhow::Result<()> {
        let node = self.nodes[i]
            .take()
            .with_context(|| format!("node {i} is not running"))?;
        node.node.shutdown().await
    }

    /// Starts node `i` again on its old addresses and data dir.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        anyhow::ensure!(self.nodes[i].is_none(), "node {i} is running");
        let m = &self.members[i];
        let listeners = Listeners {
            grpc: bind_again(m.grpc_addr).await?,
            http: bind_again(m.http_addr).await?,
            raft: bind_again(m.raft_addr).await?,
            gossip: bind_udp_again(m.gossip_addr.context("gossip address")?).await?,
        };
        let node = server::start_with_listeners(self.settings(i, false), listeners, None).await?;
        self.nodes[i] = Some(TestNode::around(node, self.token.clone()));
        Ok(())
    }

    /// Starts a new node that joins through node `via`'s Raft address;
    /// returns its index.
    pub async fn join(&mut self, via: usize) -> anyhow::Result<usize> {
        let i = self.members.len();
        let l = Listeners::ephemeral().await?;
        self.members.push(MemberSettings {
            id: u64::try_from(i)? + 1,
            region: local_region(i),
            raft_addr: l.raft.local_addr()?,
            grpc_addr: l.grpc.local_addr()?,
            http_addr: l.http.local_addr()?,
            gossip_addr: Some(l.gossip.local_addr()?),
        });
        tollgate_node::certs::init(&self.dir.join("certs"), &[u64::try_from(i)? + 1])?;
        let mut s = self.settings(i, false);
        s.join = Some(self.members[via].raft_addr.to_string());
        let node = server::start_with_listeners(s, l, None).await?;
        self.nodes
            .push(Some(TestNode::around(node, self.token.clone())));
        Ok(i)
    }

    /// The index of the node every running node agrees is the leader.
    pub async fn leader(&self) -> anyhow::Result<usize> {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut seen = Vec::new();
            for i in self.running() {
                let s = self.node(i)?.status().await?;
                seen.push(s["raft"]["leader"].as_u64());
            }
            if let Some(Some(id)) = seen.first().copied()
                && seen.iter().all(|l| *l == Some(id))
            {
                let i = usize::try_from(id)? - 1;
                if self.nodes.get(i).is_some_and(Option::is_some) {
                    return Ok(i);
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "no agreed leader: {seen:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A running node that is not the leader.
    pub async fn follower(&self) -> anyhow::Result<usize> {
        let leader = self.leader().await?;
        self.running()
            .into_iter()
            .find(|i| *i != leader)
            .context("no follower running")
    }

    /// Waits until every running node has applied config version `v`.
    pub async fn wait_version(&self, v: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        for i in self.running() {
            loop {
                let have = self.node(i)?.version().await?;
                if have >= v {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "node {i} stuck at version {have}, want {v}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(())
    }
}

/// Binds `addr` again after its previous owner closed it (retrying briefly
/// while the old socket drains).
async fn bind_again(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("rebinding {addr}")),
        }
    }
}

/// Binds UDP `addr` again after its previous owner closed it.
async fn bind_udp_again(addr: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::net::UdpSocket::bind(addr) {
            Ok(s) => return Ok(s),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("rebinding {addr}")),
        }
    }
}
