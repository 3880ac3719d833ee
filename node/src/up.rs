//! The embedded default: `tollgate up` starts a local Raft cluster (three
//! nodes by default, regions `local-a`, `local-b`, ...) in one process, on
//! loopback, with the demo models and licenses; writes
//! `<data-dir>/cluster.json` for tools; and prints how to talk to it. `up`
//! on a data dir that already holds a cluster restarts that cluster, on the
//! same addresses.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::roles::Role;
use crate::server::{self, Listeners, RunningNode};
use crate::settings::{MemberSettings, NamedTokenFile, NodeSettings, RaftTiming};

/// The demo documents applied at first start (models and two licenses).
pub const QUICKSTART_YAML: &str = include_str!("../../examples/quickstart.yaml");

/// Preferred gRPC port of the first local node.
pub const DEFAULT_GRPC_PORT: u16 = 7400;
/// Preferred HTTP port of the first local node.
pub const DEFAULT_HTTP_PORT: u16 = 7480;
/// Preferred Raft port of the first local node.
pub const DEFAULT_RAFT_PORT: u16 = 7500;
/// Preferred gossip (UDP) port of the first local node.
pub const DEFAULT_GOSSIP_PORT: u16 = 7600;
/// Nodes `up` starts unless told otherwise.
pub const DEFAULT_NODES: usize = 3;
/// Most nodes `up` starts (each takes three ports after the defaults).
pub const MAX_LOCAL_NODES: usize = 9;

/// `<data-dir>/cluster.json`: how tools and scripts find a running cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterFile {
    /// Every node of the cluster.
    pub nodes: Vec<ClusterNode>,
    /// Path of the file holding the admin token (mode 0600).
    pub admin_token_file: PathBuf,
    /// Path of the file holding an `auditor` token (reads, and the audit
    /// log); older files lack it.
    #[serde(default)]
    pub auditor_token_file: Option<PathBuf>,
    /// Path of the file holding a `viewer` token (reads, dashboard,
    /// metrics); older files lack it.
    #[serde(default)]
    pub viewer_token_file: Option<PathBuf>,
}

/// One node in `cluster.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterNode {
    /// Raft node id.
    pub id: u64,
    /// Region label.
    pub region: String,
    /// gRPC address (host:port).
    pub grpc_addr: String,
    /// HTTP address (host:port).
    pub http_addr: String,
    /// Raft transport address (host:port); older files lack it.
    #[serde(default)]
    pub raft_addr: Option<String>,
    /// Usage gossip (QUIC/UDP) address (host:port); older files lack it.
    #[serde(default)]
    pub gossip_addr: Option<String>,
}

impl ClusterFile {
    /// Reads `<dir>/cluster.json`.
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("cluster.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let path = dir.join("cluster.json");
        let tmp = dir.join("cluster.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }
}

/// Creates a token file (mode 0600) holding a fresh random token, if it
/// does not exist yet: the admin token, or the cluster token.
pub fn ensure_admin_token(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    let token = format!("tga_{}", hex::encode(bytes));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{token}")?;
    Ok(())
}

async fn bind_preferring(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(_) => {
            let any = SocketAddr::new(addr.ip(), 0);
            TcpListener::bind(any)
                .await
                .with_context(|| format!("binding {any}"))
        }
    }
}

fn bind_udp_preferring(addr: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    std::net::UdpSocket::bind(addr)
        .or_else(|_| std::net::UdpSocket::bind(SocketAddr::new(addr.ip(), 0)))
        .with_context(|| format!("binding a gossip port near {addr}"))
}

/// Binds exactly `addr` (UDP): gossip addresses are in the membership too.
fn bind_udp_exact(addr: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    std::net::UdpSocket::bind(addr).with_context(|| {
        format!("binding gossip address {addr} recorded in cluster.json (is another `up` running?)")
    })
}

/// Binds exactly `addr`: a restarted cluster's Raft addresses are in its
/// replicated membership and cannot move.
async fn bind_exact(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("binding {what} address {addr} recorded in cluster.json (is another `up` running?)")
    })
}

/// The region label of the `i`-th local node: local-a, local-b, ...
pub fn local_region(i: usize) -> String {
    let letter = char::from(b'a' + u8::try_from(i % 26).unwrap_or(0));
    format!("local-{letter}")
}

/// One local node to start: its id, region and bound sockets.
struct Planned {
    id: u64,
    region: String,
    listeners: Listeners,
}

async fn plan_new(n: usize) -> anyhow::Result<Vec<Planned>> {
    let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
    let mut planned = Vec::with_capacity(n);
    for i in 0..n {
        let offset = u16::try_from(i).context("too many nodes")?;
        let port = |base: u16| SocketAddr::new(loopback, base + offset);
        planned.push(Planned {
            id: u64::from(offset) + 1,
            region: local_region(i),
            listeners: Listeners {
                grpc: bind_preferring(port(DEFAULT_GRPC_PORT)).await?,
                http: bind_preferring(port(DEFAULT_HTTP_PORT)).await?,
                raft: bind_preferring(port(DEFAULT_RAFT_PORT)).await?,
                gossip: bind_udp_preferring(port(DEFAULT_GOSSIP_PORT))?,
            },
        });
    }
    Ok(planned)
}

async fn plan_restart(previous: &ClusterFile) -> anyhow::Result<Vec<Planned>> {
    let mut planned = Vec::with_capacity(previous.nodes.len());
    for n in &previous.nodes {
        let grpc: SocketAddr = n.grpc_addr.parse().context("cluster.json grpc_addr")?;
        let http: SocketAddr = n.http_addr.parse().context("cluster.json http_addr")?;
        let raft: SocketAddr = match &n.raft_addr {
            Some(a) => a.parse().context("cluster.json raft_addr")?,
            None => crate::settings::default_raft_addr(grpc),
        };
        let gossip = match &n.gossip_addr {
            Some(a) => bind_udp_exact(a.parse().context("cluster.json gossip_addr")?)?,
            None => bind_udp_preferring(crate::settings::default_gossip_addr(grpc))?,
        };
        planned.push(Planned {
            id: n.id,
            region: n.region.clone(),
            listeners: Listeners {
                // Tools may have the edge addresses, but they can move.
                grpc: bind_preferring(grpc).await?,
                http: bind_preferring(http).await?,
                raft: bind_exact(raft, "Raft").await?,
                gossip,
            },
        });
    }
    Ok(planned)
}

/// Starts the embedded default in `data_dir`: `n_nodes` local nodes on a
/// new data dir, or the cluster recorded in its `cluster.json`.
pub async fn start(
    data_dir: &Path,
    n_nodes: usize,
) -> anyhow::Result<(Vec<RunningNode>, ClusterFile)> {
    start_with_options(data_dir, n_nodes, UpOptions::default()).await
}

/// How `up` runs its nodes, beyond the defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpOptions {
    /// Accept fault-injection commands (dropping gossip on command).
    pub enable_fault_injection: bool,
    /// Keep the audit trail (`audit.enabled`).
    pub audit: bool,
}

impl Default for UpOptions {
    fn default() -> Self {
        Self {
            enable_fault_injection: false,
            audit: true,
        }
    }
}

/// [`start`], with `options`.
pub async fn start_with_options(
    data_dir: &Path,
    n_nodes: usize,
    options: UpOptions,
) -> anyhow::Result<(Vec<RunningNode>, ClusterFile)> {
    let UpOptions {
        enable_fault_injection,
        audit,
    } = options;
    anyhow::ensure!(
        (1..=MAX_LOCAL_NODES).contains(&n_nodes),
        "--nodes must be between 1 and {MAX_LOCAL_NODES}"
    );
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    let token_file = data_dir.join("admin.token");
    ensure_admin_token(&token_file)?;
    // The nodes' secret for each other, distinct from the admin token so an
    // admin client cannot speak Raft.
    let cluster_token_file = data_dir.join("cluster.token");
    ensure_admin_token(&cluster_token_file)?;
    // Read-only tokens for auditors and dashboards.
    let auditor_token_file = data_dir.join("auditor.token");
    ensure_admin_token(&auditor_token_file)?;
    let viewer_token_file = data_dir.join("viewer.token");
    ensure_admin_token(&viewer_token_file)?;

    let previous = ClusterFile::read(&data_dir).ok();
    let planned = match &previous {
        Some(p) if !p.nodes.is_empty() => {
            if p.nodes.len() != n_nodes {
                tracing::warn!(
                    recorded = p.nodes.len(),
                    requested = n_nodes,
                    "restarting the cluster recorded in cluster.json; --nodes applies to new data dirs only"
                );
            }
            plan_restart(p).await?
        }
        _ => plan_new(n_nodes).await?,
    };

    let mut members = Vec::with_capacity(planned.len());
    for p in &planned {
        members.push(MemberSettings {
            id: p.id,
            region: p.region.clone(),
            raft_addr: p.listeners.raft.local_addr()?,
            grpc_addr: p.listeners.grpc.local_addr()?,
            http_addr: p.listeners.http.local_addr()?,
            gossip_addr: Some(p.listeners.gossip.local_addr()?),
        });
    }
    // Record the addresses before any node starts: once the first node has
    // formed the cluster, its membership holds these Raft addresses, and a
    // later `up` must bind the same ones even if this start is interrupted.
    let cluster = ClusterFile {
        nodes: members
            .iter()
            .map(|m| ClusterNode {
                id: m.id,
                region: m.region.clone(),
                grpc_addr: m.grpc_addr.to_string(),
                http_addr: m.http_addr.to_string(),
                raft_addr: Some(m.raft_addr.to_string()),
                gossip_addr: m.gossip_addr.map(|a| a.to_string()),
            })
            .collect(),
        admin_token_file: token_file.clone(),
        auditor_token_file: Some(auditor_token_file.clone()),
        viewer_token_file: Some(viewer_token_file.clone()),
    };
    cluster.write(&data_dir)?;
    // One dev CA for the local cluster, so the nodes accept each other's
    // gossip (mutual TLS); kept across restarts.
    let certs_dir = data_dir.join("certs");
    let ids: Vec<u64> = members.iter().map(|m| m.id).collect();
    crate::certs::init(&certs_dir, &ids)
        .with_context(|| format!("creating certificates in {}", certs_dir.display()))?;

    let first_id = planned.first().map(|p| p.id);
    let mut starting = Vec::with_capacity(planned.len());
    for (p, m) in planned.into_iter().zip(&members) {
        let mut settings = NodeSettings::local(p.id, &data_dir, m.grpc_addr, m.http_addr);
        settings.region = p.region;
        settings.raft_addr = Some(m.raft_addr);
        settings.gossip_addr = m.gossip_addr;
        settings.tls = Some(crate::certs::node_files(&certs_dir, p.id));
        settings.enable_fault_injection = enable_fault_injection;
        settings.audit.enabled = audit;
        settings.admin_token_file = token_file.clone();
        settings.cluster_token_file = Some(cluster_token_file.clone());
        settings.admin_tokens = vec![
            NamedTokenFile {
                name: "auditor".into(),
                file: auditor_token_file.clone(),
                role: Role::Auditor,
            },
            NamedTokenFile {
                name: "viewer".into(),
                file: viewer_token_file.clone(),
                role: Role::Viewer,
            },
        ];
        settings.raft = RaftTiming::local();
        // The first node forms the cluster with all of them; the others
        // wait to hear from it.
        let is_first = Some(p.id) == first_id;
        settings.bootstrap = is_first;
        settings.initial_members = if is_first {
            members.clone()
        } else {
            Vec::new()
        };
        let seed = is_first.then(|| QUICKSTART_YAML.to_string());
        // All nodes start at once: the first one waits for a quorum.
        starting.push(tokio::spawn(server::start_with_listeners(
            settings,
            p.listeners,
            seed,
        )));
    }
    let mut nodes = Vec::with_capacity(starting.len());
    let mut first_err = None;
    for handle in starting {
        match handle.await {
            Ok(Ok(node)) => nodes.push(node),
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(e) => first_err = first_err.or(Some(anyhow::anyhow!("node start panicked: {e}"))),
        }
    }
    if let Some(e) = first_err {
        for node in nodes {
            let _ = node.shutdown().await;
        }
        return Err(e);
    }
    Ok((nodes, cluster))
}

/// What `up` prints once the nodes serve.
pub fn banner(cluster: &ClusterFile, data_dir: &Path) -> String {
    let mut out = String::new();
    let n = cluster.nodes.len();
    out.push_str(&format!(
        "Tollgate is up (embedded default: {n}-node local cluster, demo licenses).\n\n"
    ));
    for n in &cluster.nodes {
        out.push_str(&format!(
            "  node {} [{}]  gRPC {}  HTTP http://{}  Raft {}  gossip {}\n",
            n.id,
            n.region,
            n.grpc_addr,
            n.http_addr,
            n.raft_addr.as_deref().unwrap_or("-"),
            n.gossip_addr.as_deref().unwrap_or("-")
        ));
    }
    out.push_str(&format!(
        "\n  data dir:     {}\n  cluster file: {}\n  admin token:  {} (mode 0600)\n",
        data_dir.display(),
        data_dir.join("cluster.json").display(),
        cluster.admin_token_file.display()
    ));
    for (role, file) in [
        ("auditor", &cluster.auditor_token_file),
        ("viewer", &cluster.viewer_token_file),
    ] {
        if let Some(f) = file {
            out.push_str(&format!(
                "  {role} token:{:>w$}{}\n",
                "",
                f.display(),
                w = 8 - role.len()
            ));
        }
    }
    if let Some(n) = cluster.nodes.first() {
        out.push_str("\nTry it:\n");
        out.push_str(&format!(
            "  curl -s -XPOST http://{}/v1/check -d '{{\"key\":\"tg_demo_key\",\"model\":\"demo-classifier\",\"model_version\":\"2.1.0\",\"environment\":\"production\",\"region\":\"local-a\",\"meters\":[{{\"metric\":\"inferences\",\"quantity\":1}}]}}'\n",
            n.http_addr
        ));
        out.push_str(&format!(
            "  tollgate check --addr {} --key tg_demo_key --model demo-classifier --version 2.1.0 --environment production --region local-a\n",
            n.grpc_addr
        ));
        out.push_str("  tollgate cluster status\n");
        out.push_str(&format!(
            "\nMetrics: http://{http}/metrics   Dashboard: http://{http}/dashboard (sign in with the viewer token)\n",
            http = n.http_addr
        ));
    }
    out.push_str(
        "\nCtrl-C stops every node; `up` again on the same data dir restarts the same cluster.\n",
    );
    out
}
