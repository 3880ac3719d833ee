//! The embedded default: `tollgate up` starts a local node with the demo
//! models and licenses, writes `<data-dir>/cluster.json` for tools, and
//! prints how to talk to it.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::server::{self, RunningNode};
use crate::settings::NodeSettings;

/// The demo documents applied at first start (models and two licenses).
pub const QUICKSTART_YAML: &str = include_str!("../../examples/quickstart.yaml");

/// Preferred gRPC port of the first local node.
pub const DEFAULT_GRPC_PORT: u16 = 7400;
/// Preferred HTTP port of the first local node.
pub const DEFAULT_HTTP_PORT: u16 = 7480;

/// `<data-dir>/cluster.json`: how tools and scripts find a running cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterFile {
    /// Every node of the cluster.
    pub nodes: Vec<ClusterNode>,
    /// Path of the file holding the admin token (mode 0600).
    pub admin_token_file: PathBuf,
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

/// Creates the admin token file (mode 0600) if it does not exist yet.
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

/// Starts the embedded default in `data_dir` and returns the running node.
pub async fn start(data_dir: &Path) -> anyhow::Result<(RunningNode, ClusterFile)> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    let token_file = data_dir.join("admin.token");
    ensure_admin_token(&token_file)?;

    let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
    let previous = ClusterFile::read(&data_dir).ok();
    let (grpc, http) = match previous.as_ref().and_then(|c| c.nodes.first()) {
        // A restart keeps the addresses tools already know.
        Some(n) => {
            let g: SocketAddr = n.grpc_addr.parse().context("cluster.json grpc_addr")?;
            let h: SocketAddr = n.http_addr.parse().context("cluster.json http_addr")?;
            (bind_preferring(g).await?, bind_preferring(h).await?)
        }
        None => (
            bind_preferring(SocketAddr::new(loopback, DEFAULT_GRPC_PORT)).await?,
            bind_preferring(SocketAddr::new(loopback, DEFAULT_HTTP_PORT)).await?,
        ),
    };
    let mut settings = NodeSettings::local(1, &data_dir, grpc.local_addr()?, http.local_addr()?);
    settings.admin_token_file = token_file.clone();
    let node = server::start_with_listeners(
        settings.clone(),
        grpc,
        http,
        Some(QUICKSTART_YAML.to_string()),
    )
    .await?;
    let cluster = ClusterFile {
        nodes: vec![ClusterNode {
            id: settings.node_id,
            region: settings.region.clone(),
            grpc_addr: node.grpc_addr.to_string(),
            http_addr: node.http_addr.to_string(),
        }],
        admin_token_file: token_file,
    };
    cluster.write(&data_dir)?;
    Ok((node, cluster))
}

/// What `up` prints once the node serves.
pub fn banner(cluster: &ClusterFile, data_dir: &Path) -> String {
    let mut out = String::new();
    out.push_str("Tollgate is up (embedded default: 1 node, demo licenses).\n\n");
    for n in &cluster.nodes {
        out.push_str(&format!(
            "  node {} [{}]  gRPC {}  HTTP http://{}\n",
            n.id, n.region, n.grpc_addr, n.http_addr
        ));
    }
    out.push_str(&format!(
        "\n  data dir:     {}\n  cluster file: {}\n  admin token:  {} (mode 0600)\n",
        data_dir.display(),
        data_dir.join("cluster.json").display(),
        cluster.admin_token_file.display()
    ));
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
    }
    out.push_str("\nCtrl-C stops the node; `up` again on the same data dir keeps its state.\n");
    out
}
