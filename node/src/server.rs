//! Starting and stopping one node: storage, Raft, usage, the gRPC and HTTP
//! servers, and the background flush loop.
//!
//! Listeners and shutdown come from the caller (`start_with_listeners`), so
//! tests and the embedded default can bind port 0 and stop nodes cleanly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tollgate_consensus::storage::{SledStorage, Storage};
use tollgate_consensus::{ConsensusNode, NoNetwork, NodeInfo, RaftSettings};
use tollgate_proto::v1::admin_server::AdminServer;
use tollgate_proto::v1::edge_server::EdgeServer;

use crate::admin;
use crate::grpc::{AdminService, EdgeService};
use crate::persist;
use crate::settings::{MAX_BODY_BYTES, NodeSettings};
use crate::state::NodeState;

/// How long a starting node waits for its Raft leader.
pub const LEADER_WAIT_MS: u64 = 10_000;

/// A node that is serving.
pub struct RunningNode {
    /// Shared state (for tests and the embedded default).
    pub state: Arc<NodeState>,
    /// Where gRPC listens.
    pub grpc_addr: SocketAddr,
    /// Where HTTP listens.
    pub http_addr: SocketAddr,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl RunningNode {
    /// Stops serving, flushes usage and shuts Raft down.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown_tx.send(true);
        let mut first_err = None;
        for t in self.tasks {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                Err(e) => first_err = first_err.or(Some(anyhow::anyhow!("task panicked: {e}"))),
            }
        }
        self.state
            .consensus
            .shutdown()
            .await
            .context("raft shutdown")?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Resolves when a shutdown was requested (by `shutdown` or a signal).
    pub fn shutdown_sender(&self) -> watch::Sender<bool> {
        self.shutdown_tx.clone()
    }
}

/// Reads the admin token file (one line).
pub fn read_admin_token(settings: &NodeSettings) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(&settings.admin_token_file).with_context(|| {
        format!(
            "reading admin token file {}",
            settings.admin_token_file.display()
        )
    })?;
    let token = token.trim().to_string();
    anyhow::ensure!(
        !token.is_empty(),
        "admin token file {} is empty",
        settings.admin_token_file.display()
    );
    Ok(token)
}

/// Binds the configured addresses and starts the node.
pub async fn start(settings: NodeSettings, seed: Option<String>) -> anyhow::Result<RunningNode> {
    let grpc = TcpListener::bind(settings.grpc_addr)
        .await
        .with_context(|| format!("binding gRPC address {}", settings.grpc_addr))?;
    let http = TcpListener::bind(settings.http_addr)
        .await
        .with_context(|| format!("binding HTTP address {}", settings.http_addr))?;
    start_with_listeners(settings, grpc, http, seed).await
}

/// Starts the node on listeners the caller bound. `seed` holds documents
/// applied when the config is still empty (first start).
pub async fn start_with_listeners(
    settings: NodeSettings,
    grpc: TcpListener,
    http: TcpListener,
    seed: Option<String>,
) -> anyhow::Result<RunningNode> {
    let grpc_addr = grpc.local_addr()?;
    let http_addr = http.local_addr()?;
    let token = read_admin_token(&settings)?;
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("creating data dir {}", settings.data_dir.display()))?;
    let storage: Arc<dyn Storage> = Arc::new(
        SledStorage::open(settings.data_dir.join("db"))
            .with_context(|| format!("opening storage in {}", settings.data_dir.display()))?,
    );

    let info = NodeInfo {
        region: settings.region.clone(),
        raft_addr: grpc_addr.to_string(),
        grpc_addr: grpc_addr.to_string(),
        http_addr: http_addr.to_string(),
    };
    let raft_settings = RaftSettings {
        snapshot_after_entries: settings.snapshot_after_entries,
        ..RaftSettings::default()
    };
    let consensus = ConsensusNode::start(
        settings.node_id,
        info,
        Arc::clone(&storage),
        NoNetwork,
        &raft_settings,
    )
    .await
    .context("starting raft")?;
    if settings.bootstrap {
        consensus
            .initialize_single()
            .await
            .context("initializing single-node cluster")?;
    }
    consensus
        .wait_for_leader(Duration::from_millis(LEADER_WAIT_MS))
        .await
        .context("waiting for a raft leader")?;

    let usage = persist::restore(storage.as_ref(), settings.node_id)?;
    let state = Arc::new(NodeState::new(
        settings.node_id,
        settings.region.clone(),
        consensus,
        usage,
        &token,
        settings.strict_fields,
    ));

    if let Some(text) = seed {
        let config = state.config();
        if config.licenses.is_empty() && config.models.is_empty() {
            let applied =
                admin::apply_documents(&state, "bootstrap", &text, "seed documents at first start")
                    .await
                    .map_err(|e| anyhow::anyhow!("applying seed documents: {e}"))?;
            tracing::info!(n_documents = applied.len(), "applied seed documents");
        }
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    tasks.push(tokio::spawn(persist::run(
        Arc::clone(&state),
        Arc::clone(&storage),
        settings.usage_flush_interval_ms,
        shutdown_rx.clone(),
    )));

    let edge = EdgeServer::new(EdgeService::new(Arc::clone(&state)))
        .max_decoding_message_size(MAX_BODY_BYTES);
    let admin_svc = AdminServer::new(AdminService::new(Arc::clone(&state)))
        .max_decoding_message_size(MAX_BODY_BYTES);
    // Nagle's algorithm would add up to 40 ms to small responses; a decision
    // is a few hundred bytes and latency is the product.
    let incoming = TcpListenerStream::new(grpc).map(|s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    });
    let mut rx = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(edge)
            .add_service(admin_svc)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = rx.changed().await;
            })
            .await
            .context("gRPC server")
    }));

    let router = crate::http::router(Arc::clone(&state));
    let mut rx = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        axum::serve(http, router)
            .with_graceful_shutdown(async move {
                let _ = rx.changed().await;
            })
            .await
            .context("HTTP server")
    }));

    tracing::info!(node_id = settings.node_id, %grpc_addr, %http_addr, "node serving");
    Ok(RunningNode {
        state,
        grpc_addr,
        http_addr,
        shutdown_tx,
        tasks,
    })
}
