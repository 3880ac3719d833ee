//! Starting and stopping one node: storage, Raft, usage, the gRPC and HTTP
//! servers, the background flush loop and the metrics sampler.
//!
//! Listeners and shutdown come from the caller (`start_with_listeners`), so
//! tests and the embedded default can bind port 0 and stop nodes cleanly.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tollgate_consensus::dial::Dial;
use tollgate_consensus::storage::{SledStorage, Storage};
use tollgate_consensus::{ConsensusNode, NodeInfo, RaftSettings, TransportSettings};
use tollgate_proto::v1::admin_server::AdminServer;
use tollgate_proto::v1::edge_server::EdgeServer;
use tonic::transport::server::Connected;

use crate::admin;
use crate::audit::keys::{NodeSigner, SubjectKey};
use crate::audit::store::AuditStore;
use crate::audit::writer::WriterParts;
use crate::audit::{AuditConfig, Auditor};
use crate::clock::Clock;
use crate::drain::{DrainPhase, DrainReason};
use crate::gossip::GossipNode;
use crate::grpc::{AdminService, EdgeService};
use crate::metrics::Metrics;
use crate::persist;
use crate::quic::GossipSocket;
use crate::roles::{Role, TokenSet};
use crate::settings::{MAX_BODY_BYTES, MemberSettings, NodeSettings};
use crate::state::NodeState;

/// How long `start` waits for a Raft leader before it serves anyway (and
/// applies seed documents later, in the background).
pub const LEADER_WAIT_MS: u64 = 10_000;
/// How long a new node keeps asking to be added to the cluster.
pub const JOIN_TIMEOUT_MS: u64 = 60_000;
/// How often a node checks whether a committed membership change removed
/// it (one `NodeStatus` call to the leader, see [`watch_removal`]).
pub const REMOVAL_CHECK_INTERVAL_MS: u64 = 500;
/// Members asked per removal check when the leader is not known.
const REMOVAL_CHECK_MAX_ASKED: usize = 2;
/// How much longer than the drain timeout shutdown waits for a drain's
/// outcome.
const DRAIN_WAIT_SLACK_MS: u64 = 1_000;

/// A node that is serving.
pub struct RunningNode {
    /// Shared state (for tests and the embedded default).
    pub state: Arc<NodeState>,
    /// Where gRPC listens.
    pub grpc_addr: SocketAddr,
    /// Where HTTP listens.
    pub http_addr: SocketAddr,
    /// Where the Raft transport listens.
    pub raft_addr: SocketAddr,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    // The audit writer stops after every server did, so that the decisions
    // of requests still in flight at shutdown are recorded too.
    audit_shutdown_tx: watch::Sender<bool>,
    audit_task: Option<JoinHandle<anyhow::Result<()>>>,
    drain_timeout_ms: u64,
}

impl RunningNode {
    /// Drains (refuses new usage and waits, at most `gossip.drain_timeout_ms`,
    /// until its peers hold all of this node's usage), then stops serving,
    /// flushes usage and the audit log, and shuts Raft down.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.drain().await;
        let _ = self.shutdown_tx.send(true);
        let mut first_err = None;
        let mut note = |joined: Result<anyhow::Result<()>, tokio::task::JoinError>| match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => first_err = first_err.take().or(Some(e)),
            Err(e) => {
                first_err = first_err
                    .take()
                    .or(Some(anyhow::anyhow!("task panicked: {e}")))
            }
        };
        for t in self.tasks {
            note(t.await);
        }
        // Every server has stopped: nothing more can be decided.
        let _ = self.audit_shutdown_tx.send(true);
        if let Some(t) = self.audit_task {
            note(t.await);
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

    /// Begins a drain (unless one began already, e.g. on removal) and waits
    /// for its end. The gossip loop enforces the timeout; the wait here has
    /// a little slack over it in case that loop is gone.
    pub async fn drain(&self) -> DrainPhase {
        let state = &self.state;
        state.drain.begin(DrainReason::Shutdown, state.now_ms());
        let bound =
            Duration::from_millis(self.drain_timeout_ms.saturating_add(DRAIN_WAIT_SLACK_MS));
        match tokio::time::timeout(bound, state.drain.finished()).await {
            Ok(phase) => phase,
            Err(_) => {
                tracing::warn!("the drain did not report an outcome in time; stopping anyway");
                state.drain.phase()
            }
        }
    }

    /// Resolves when a shutdown was requested (by `shutdown` or a signal).
    pub fn shutdown_sender(&self) -> watch::Sender<bool> {
        self.shutdown_tx.clone()
    }
}

/// How long `start` waits for a database lock held by an instance of this
/// node that is still stopping.
const STORAGE_LOCK_WAIT_MS: u64 = 5_000;

/// Opens the sled database in `dir`. A node restarted in the same process
/// (the embedded cluster, tests) can find the lock still held for a moment
/// after the old instance stopped: sled's I/O threads and storage work
/// already handed to blocking threads drop their handles on their own
/// time. That lock is waited for, up to [`STORAGE_LOCK_WAIT_MS`]; a lock
/// held longer (another process) is reported as it is.
async fn open_sled(dir: &Path) -> Result<SledStorage, tollgate_consensus::storage::StorageError> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(STORAGE_LOCK_WAIT_MS);
    loop {
        match SledStorage::open(dir) {
            Err(e) if e.is_locked() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// Reads a token file (one line, not empty).
fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading token file {}", path.display()))?;
    let token = token.trim().to_string();
    anyhow::ensure!(!token.is_empty(), "token file {} is empty", path.display());
    Ok(token)
}

/// Reads the admin token file (one line).
fn read_admin_token(settings: &NodeSettings) -> anyhow::Result<String> {
    read_token_file(&settings.admin_token_file)
}

/// Every API token with the actor name it is recorded under and its role.
fn read_tokens(settings: &NodeSettings) -> anyhow::Result<TokenSet> {
    let mut tokens = vec![(
        settings.admin_token_name.clone(),
        read_admin_token(settings)?,
        Role::Admin,
    )];
    for t in &settings.admin_tokens {
        anyhow::ensure!(
            !t.name.trim().is_empty(),
            "admin_tokens: a token file ({}) has an empty name",
            t.file.display()
        );
        tokens.push((t.name.clone(), read_token_file(&t.file)?, t.role));
    }
    Ok(TokenSet::new(
        tokens.iter().map(|(n, t, r)| (n.as_str(), t.as_str(), *r)),
    ))
}

/// The sockets a node serves on, bound by the caller.
pub struct Listeners {
    /// Edge and admin gRPC.
    pub grpc: TcpListener,
    /// HTTP/JSON.
    pub http: TcpListener,
    /// Raft transport.
    pub raft: TcpListener,
    /// Usage gossip (QUIC over UDP).
    pub gossip: std::net::UdpSocket,
}

impl Listeners {
    /// Binds the addresses in `settings`.
    pub async fn bind(settings: &NodeSettings) -> anyhow::Result<Self> {
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {what} address {addr}"))
        };
        Ok(Self {
            grpc: bind(settings.grpc_addr, "gRPC").await?,
            http: bind(settings.http_addr, "HTTP").await?,
            raft: bind(settings.raft_addr(), "Raft").await?,
            gossip: std::net::UdpSocket::bind(settings.gossip_addr())
                .with_context(|| format!("binding gossip address {}", settings.gossip_addr()))?,
        })
    }

    /// Binds ephemeral loopback ports (tests).
    pub async fn ephemeral() -> anyhow::Result<Self> {
        Ok(Self {
            grpc: TcpListener::bind("127.0.0.1:0").await?,
            http: TcpListener::bind("127.0.0.1:0").await?,
            raft: TcpListener::bind("127.0.0.1:0").await?,
            gossip: std::net::UdpSocket::bind("127.0.0.1:0")?,
        })
    }
}

/// Binds the configured addresses and starts the node.
pub async fn start(settings: NodeSettings, seed: Option<String>) -> anyhow::Result<RunningNode> {
    let listeners = Listeners::bind(&settings).await?;
    start_with_listeners(settings, listeners, seed).await
}

fn member_info(m: &MemberSettings) -> NodeInfo {
    NodeInfo {
        region: m.region.clone(),
        raft_addr: m.raft_addr.to_string(),
        grpc_addr: m.grpc_addr.to_string(),
        http_addr: m.http_addr.to_string(),
        gossip_addr: m.gossip_addr.map(|a| a.to_string()).unwrap_or_default(),
    }
}

/// Nagle's algorithm would add up to 40 ms to small responses; a decision
/// (or a Raft heartbeat) is a few hundred bytes and latency is the product.
fn nodelay_incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    TcpListenerStream::new(listener).map(|s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    })
}

/// Starts the node on listeners the caller bound. `seed` holds documents
/// applied when the config is still empty (first start of a bootstrapping
/// node), once a leader is known.
pub async fn start_with_listeners(
    settings: NodeSettings,
    listeners: Listeners,
    seed: Option<String>,
) -> anyhow::Result<RunningNode> {
    let Listeners {
        grpc,
        http,
        raft,
        gossip,
    } = listeners;
    let addrs = Addrs {
        grpc: grpc.local_addr()?,
        http: http.local_addr()?,
        raft: raft.local_addr()?,
        gossip: None,
    };
    let env = Environment {
        addrs,
        grpc: nodelay_incoming(grpc),
        raft: nodelay_incoming(raft),
        http: Some(http),
        gossip: GossipSocket::Std(gossip),
        storage: None,
        clock: Arc::new(Clock::system()),
        raft_dialer: None,
    };
    start_in(settings, env, seed).await
}

/// The addresses a node serves on, as peers and clients reach them.
#[derive(Clone, Copy, Debug)]
pub struct Addrs {
    /// Edge and admin gRPC.
    pub grpc: SocketAddr,
    /// HTTP/JSON.
    pub http: SocketAddr,
    /// Raft transport.
    pub raft: SocketAddr,
    /// Usage gossip; `None` advertises the address the socket is bound to.
    pub gossip: Option<SocketAddr>,
}

/// Everything a node runs on besides its settings. [`start_with_listeners`]
/// fills it with OS sockets, sled in the data dir and the system clock; the
/// deterministic simulator fills it with simulated ones, so that both run
/// the same node.
pub struct Environment<G, R> {
    /// The advertised addresses.
    pub addrs: Addrs,
    /// Incoming edge and admin gRPC connections.
    pub grpc: G,
    /// Incoming Raft connections.
    pub raft: R,
    /// The HTTP listener; `None` serves no HTTP.
    pub http: Option<TcpListener>,
    /// The usage gossip socket.
    pub gossip: GossipSocket,
    /// The storage engine; `None` opens sled in the data dir.
    pub storage: Option<Arc<dyn Storage>>,
    /// The wall clock.
    pub clock: Arc<Clock>,
    /// How the Raft transport reaches peers; `None` dials TCP.
    pub raft_dialer: Option<Arc<dyn Dial>>,
}

/// Starts the node in `env`. `seed` holds documents applied when the config
/// is still empty (first start of a bootstrapping node), once a leader is
/// known.
pub async fn start_in<G, R, GIo, RIo, GE, RE>(
    settings: NodeSettings,
    env: Environment<G, R>,
    seed: Option<String>,
) -> anyhow::Result<RunningNode>
where
    G: tokio_stream::Stream<Item = Result<GIo, GE>> + Send + 'static,
    R: tokio_stream::Stream<Item = Result<RIo, RE>> + Send + 'static,
    GIo: Connected + AsyncRead + AsyncWrite + Unpin + Send + 'static,
    RIo: Connected + AsyncRead + AsyncWrite + Unpin + Send + 'static,
    GIo::ConnectInfo: Clone + Send + Sync + 'static,
    RIo::ConnectInfo: Clone + Send + Sync + 'static,
    GE: Into<Box<dyn std::error::Error + Send + Sync>>,
    RE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Environment {
        addrs,
        grpc,
        raft,
        http,
        gossip: gossip_socket,
        storage,
        clock,
        raft_dialer,
    } = env;
    let Addrs {
        grpc: grpc_addr,
        http: http_addr,
        raft: raft_addr,
        gossip: advertised_gossip,
    } = addrs;
    let tokens = read_tokens(&settings)?;
    let alert_secret = crate::alerts::read_secret(&settings.alerts)?;
    let cluster_token = read_token_file(settings.cluster_token_file())?;
    let storage: Arc<dyn Storage> = match storage {
        Some(storage) => storage,
        None => {
            std::fs::create_dir_all(&settings.data_dir)
                .with_context(|| format!("creating data dir {}", settings.data_dir.display()))?;
            Arc::new(
                open_sled(&settings.data_dir.join("db"))
                    .await
                    .with_context(|| {
                        format!("opening storage in {}", settings.data_dir.display())
                    })?,
            )
        }
    };
    let tls_files = match &settings.tls {
        Some(files) => files.clone(),
        None => {
            if settings.initial_members.len() > 1 || settings.join.is_some() {
                tracing::warn!(
                    "no `tls` settings: this node makes a CA of its own, so other members will refuse its gossip; create shared certificates with `tollgate certs init`"
                );
            }
            let dir = settings.data_dir.join("certs");
            crate::certs::init(&dir, &[settings.node_id])
                .with_context(|| format!("creating node certificates in {}", dir.display()))?;
            crate::certs::node_files(&dir, settings.node_id)
        }
    };
    let tls = crate::certs::TlsMaterial::load(&tls_files)?;
    let (transport, inbound) =
        crate::quic::QuicTransport::bind_socket(gossip_socket, settings.node_id, &tls)
            .context("starting gossip transport")?;
    let gossip_addr = advertised_gossip.unwrap_or_else(|| transport.local_addr());
    let info = NodeInfo {
        region: settings.region.clone(),
        raft_addr: raft_addr.to_string(),
        grpc_addr: grpc_addr.to_string(),
        http_addr: http_addr.to_string(),
        gossip_addr: gossip_addr.to_string(),
    };
    let raft_settings = RaftSettings {
        heartbeat_interval_ms: settings.raft.heartbeat_interval_ms,
        election_timeout_min_ms: settings.raft.election_timeout_min_ms,
        election_timeout_max_ms: settings.raft.election_timeout_max_ms,
        write_timeout_ms: settings.raft.write_timeout_ms,
        snapshot_after_entries: settings.snapshot_after_entries,
        max_in_snapshot_log_to_keep: settings.snapshot_keep_entries,
        ..RaftSettings::default()
    };
    let consensus = match raft_dialer.clone() {
        None => {
            ConsensusNode::start_grpc(
                settings.node_id,
                info.clone(),
                Arc::clone(&storage),
                &raft_settings,
                &TransportSettings::default(),
                &cluster_token,
            )
            .await
        }
        Some(dialer) => {
            ConsensusNode::start_grpc_with_dialer(
                settings.node_id,
                info.clone(),
                Arc::clone(&storage),
                &raft_settings,
                &TransportSettings::default(),
                &cluster_token,
                dialer,
            )
            .await
        }
    };
    let consensus = Arc::new(consensus.context("starting raft")?);

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    // The Raft transport serves first: joining and elections need it.
    let raft_svc = tollgate_consensus::raft_server(Arc::clone(&consensus), &cluster_token);
    let mut rx = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(raft_svc)
            .serve_with_incoming_shutdown(raft, async move {
                let _ = rx.changed().await;
            })
            .await
            .context("Raft server")
    }));

    if let Err(e) = form_or_join(
        &consensus,
        &settings,
        &info,
        &cluster_token,
        raft_dialer.clone(),
    )
    .await
    {
        // Leave nothing running: the caller may retry on the same ports
        // and data dir.
        let _ = shutdown_tx.send(true);
        for t in tasks {
            let _ = t.await;
        }
        if let Err(stop) = consensus.shutdown().await {
            tracing::warn!(error = %stop, "raft did not stop cleanly after a failed start");
        }
        return Err(e);
    }

    let usage = persist::restore(storage.as_ref(), settings.node_id)?;
    let audit_parts = open_audit(&settings, &storage, &consensus, &cluster_token)?;
    let mut state = NodeState::new(
        settings.node_id,
        settings.region.clone(),
        Arc::clone(&consensus),
        usage,
        tokens,
        settings.strict_fields,
    );
    state.durable_usage_ack = settings.durable_usage_ack;
    state.clock = clock;
    state.metrics = Metrics::new(settings.metrics.clone());
    if settings.metrics.per_license_labels && !settings.metrics.require_token {
        tracing::warn!(
            "metrics.per_license_labels is on and metrics.require_token is off: anyone who reaches the HTTP port can read license ids on /metrics"
        );
    }
    let audit_writer = audit_parts.map(|(auditor, parts)| {
        let public_key = auditor.public_key();
        state.audit = auditor;
        (parts, public_key)
    });
    // Escrow counters split their limit among the members: know them
    // before the first Check can create one.
    let member_ids: Vec<u64> = consensus.members().iter().map(|m| m.id).collect();
    state.with_usage(|u| u.set_members(&member_ids));
    let state = Arc::new(state);
    let gossip = Arc::new(GossipNode::new(
        settings.node_id,
        &settings.region,
        &settings.gossip,
        transport,
        settings.enable_fault_injection,
    ));
    let _ = state.gossip.set(Arc::clone(&gossip));

    // Seed documents go in once a leader exists. Wait for that here, so a
    // caller of `start` sees the seeded config; if the cluster is not up yet
    // (other members still starting), keep waiting in the background.
    if let Some(text) = seed.filter(|_| settings.bootstrap && settings.join.is_none()) {
        let mut seeding = tokio::spawn(seed_when_ready(
            Arc::clone(&state),
            text,
            shutdown_rx.clone(),
        ));
        match tokio::time::timeout(Duration::from_millis(LEADER_WAIT_MS), &mut seeding).await {
            Ok(joined) => joined.context("seeding task")??,
            Err(_) => {
                tracing::warn!(
                    "no raft leader yet; seed documents will be applied once one is elected"
                );
                tasks.push(seeding);
            }
        }
    }

    tasks.push(tokio::spawn(crate::metrics::run_sampler(
        Arc::clone(&state),
        shutdown_rx.clone(),
    )));

    let (audit_shutdown_tx, audit_shutdown_rx) = watch::channel(false);
    let mut audit_task = None;
    let mut audit_key = None;
    if let Some((parts, public_key)) = audit_writer {
        audit_task = Some(tokio::spawn(crate::audit::writer::run(
            Arc::clone(&state),
            parts,
            audit_shutdown_rx,
        )));
        audit_key = public_key;
    }

    tasks.push(tokio::spawn(crate::gossip::run(
        Arc::clone(&state),
        gossip,
        inbound,
        Arc::clone(&storage),
        settings.usage_flush_interval_ms,
        shutdown_rx.clone(),
    )));

    tasks.push(tokio::spawn(watch_removal(
        Arc::clone(&state),
        shutdown_rx.clone(),
    )));

    tasks.push(tokio::spawn(crate::alerts::run(
        Arc::clone(&state),
        settings.alerts.clone(),
        alert_secret,
        shutdown_rx.clone(),
    )));

    let edge = EdgeServer::new(EdgeService::new(Arc::clone(&state)))
        .max_decoding_message_size(MAX_BODY_BYTES);
    let admin_svc = AdminServer::new(AdminService::new(Arc::clone(&state)))
        .max_decoding_message_size(MAX_BODY_BYTES);
    let mut rx = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        tonic::transport::Server::builder()
            .trace_fn(grpc_span)
            .add_service(edge)
            .add_service(admin_svc)
            .serve_with_incoming_shutdown(grpc, async move {
                let _ = rx.changed().await;
            })
            .await
            .context("gRPC server")
    }));

    if let Some(http) = http {
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
    }

    // Checkpoints are verified against the key in the replicated config.
    // Register it once serving, and wait for it like the seed, so a caller
    // of `start` sees a settled config version; without a leader yet, go
    // on registering in the background.
    if let Some(public_key) = audit_key {
        let mut registering = tokio::spawn(register_audit_key(
            Arc::clone(&state),
            public_key,
            shutdown_rx.clone(),
        ));
        match tokio::time::timeout(Duration::from_millis(LEADER_WAIT_MS), &mut registering).await {
            Ok(joined) => {
                if let Err(e) = joined.context("audit key registration task")? {
                    tracing::warn!(error = %e, "checkpoints of this node cannot be verified against the replicated config");
                }
            }
            Err(_) => {
                tracing::warn!(
                    "no raft leader yet; the audit signing key will be registered once one is elected"
                );
                tasks.push(registering);
            }
        }
    }

    tracing::info!(node_id = settings.node_id, %grpc_addr, %http_addr, %raft_addr, %gossip_addr, "node serving");
    Ok(RunningNode {
        state,
        grpc_addr,
        http_addr,
        raft_addr,
        shutdown_tx,
        tasks,
        audit_shutdown_tx,
        audit_task,
        drain_timeout_ms: settings.gossip.drain_timeout_ms,
    })
}

/// Begins a drain once a committed membership change removed this node.
/// Raft does not tell a removed follower (its leader stops replicating to
/// it as soon as the change exists), so a node that is not the leader asks
/// the leader, or a member, for its view every
/// [`REMOVAL_CHECK_INTERVAL_MS`]. Ends at shutdown or once a drain began.
async fn watch_removal(
    state: Arc<NodeState>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(REMOVAL_CHECK_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return Ok(()),
        }
        if !state.drain.accepts_usage() {
            return Ok(());
        }
        let found = tokio::select! {
            found = state.consensus.find_own_removal(REMOVAL_CHECK_MAX_ASKED) => found,
            _ = shutdown.changed() => return Ok(()),
        };
        if let Some(removal) = found {
            tracing::info!(
                membership_index = removal.membership_index,
                seen_by = removal.seen_by,
                "this node was removed from the cluster; draining"
            );
            state.drain.begin(DrainReason::Removed, state.now_ms());
            return Ok(());
        }
    }
}

/// One span per gRPC call, named by its method path; Edge calls (the hot
/// path) at debug level only.
fn grpc_span<B>(req: &axum::http::Request<B>) -> tracing::Span {
    let path = req.uri().path();
    if path.starts_with("/tollgate.v1.Edge/") {
        tracing::debug_span!("grpc", path)
    } else {
        tracing::info_span!("grpc", path)
    }
}

/// The audit trail's queue for the hot path and the parts its writer
/// takes, or `None` when `audit.enabled` is off.
fn open_audit(
    settings: &NodeSettings,
    storage: &Arc<dyn Storage>,
    consensus: &ConsensusNode,
    cluster_token: &str,
) -> anyhow::Result<Option<(Auditor, WriterParts)>> {
    let config: &AuditConfig = &settings.audit;
    if !config.enabled {
        return Ok(None);
    }
    let key_path = config.key_path(&settings.data_dir);
    let (signer, created) = NodeSigner::load_or_create(&key_path)?;
    if created {
        tracing::info!(path = %key_path.display(), "created the audit signing key");
    }
    let store = AuditStore::open(storage.as_ref()).context("opening the audit log")?;
    let blocking = storage.needs_blocking_thread();
    let (tx, rx) = tokio::sync::mpsc::channel(config.capacity());
    let auditor = Auditor::new(tx, config, store.clone(), blocking, signer.public_key());
    let parts = WriterParts {
        store,
        signer,
        subject_key: SubjectKey::from_cluster_token(cluster_token),
        feed: consensus.applied_feed(),
        rx,
        config: config.clone(),
        blocking,
    };
    Ok(Some((auditor, parts)))
}

/// First wait between attempts to register the audit key.
const REGISTER_RETRY_MIN_MS: u64 = 100;
/// Longest wait between attempts.
const REGISTER_RETRY_MAX_MS: u64 = 5_000;

/// Puts this node's audit public key into the replicated config, unless it
/// is there already; retries until it is, or the node stops.
async fn register_audit_key(
    state: Arc<NodeState>,
    public_key: [u8; 32],
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let key_hex = hex::encode(public_key);
    let mut backoff_ms = REGISTER_RETRY_MIN_MS;
    loop {
        if state
            .config()
            .node_keys(state.node_id)
            .iter()
            .any(|k| k.public_key == key_hex)
        {
            return Ok(());
        }
        if *shutdown.borrow() {
            return Ok(());
        }
        let cmd = tollgate_quota::config::ConfigCommand {
            actor: format!("node-{}", state.node_id),
            reason: Some("audit signing key".to_string()),
            at_ms: state.now_ms(),
            op: tollgate_quota::config::ConfigOp::RegisterNodeKey {
                node_id: state.node_id,
                public_key: key_hex.clone(),
            },
            // The same key always has the same id: a retry of a write whose
            // answer was lost applies at most once.
            request_id: Some(format!("node-{}/audit-key/{key_hex}", state.node_id)),
        };
        let attempt = async {
            state
                .consensus
                .wait_for_leader(Duration::from_millis(LEADER_WAIT_MS))
                .await
                .map_err(|e| e.to_string())?;
            state
                .consensus
                .write_forwarded(cmd)
                .await
                .map_err(|e| e.to_string())
        };
        let outcome = tokio::select! {
            r = attempt => r,
            _ = shutdown.changed() => return Ok(()),
        };
        match outcome {
            Ok(tollgate_quota::config::ApplyOutcome::Applied { version }) => {
                // Answered once applied here; check on the next turn.
                let _ = state
                    .consensus
                    .wait_for_applied(version, Duration::from_millis(LEADER_WAIT_MS))
                    .await;
                continue;
            }
            Ok(tollgate_quota::config::ApplyOutcome::Rejected { reason, .. }) => {
                anyhow::bail!("the cluster refused this node's audit key: {reason}");
            }
            Err(e) => tracing::debug!(error = %e, "audit key not registered yet; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
            _ = shutdown.changed() => return Ok(()),
        }
        backoff_ms = (backoff_ms * 2).min(REGISTER_RETRY_MAX_MS);
    }
}

/// Forms the cluster (`bootstrap`), joins one (`join`), or, when the data
/// dir already holds Raft state, checks that this node's recorded Raft
/// address is the one it serves on: peers reach it at the replicated one.
async fn form_or_join(
    consensus: &ConsensusNode,
    settings: &NodeSettings,
    info: &NodeInfo,
    cluster_token: &str,
    dialer: Option<Arc<dyn Dial>>,
) -> anyhow::Result<()> {
    let raft_addr: SocketAddr = info.raft_addr.parse().context("raft address")?;
    anyhow::ensure!(
        !raft_addr.ip().is_unspecified() && raft_addr.port() != 0,
        "raft_addr {raft_addr}: peers need a concrete address and port to reach this node"
    );
    let initialized = consensus
        .raft()
        .is_initialized()
        .await
        .context("reading raft state")?;
    if initialized {
        let members = consensus.members();
        if let Some(me) = members.iter().find(|m| m.id == settings.node_id)
            && me.info.raft_addr != info.raft_addr
        {
            if members.len() == 1 {
                // Alone, nobody needs to reach it; a node joining later
                // would be told the recorded address, though.
                tracing::warn!(
                    recorded = %me.info.raft_addr,
                    serving = %info.raft_addr,
                    "this one-node cluster recorded another Raft address; set raft_addr to keep it stable"
                );
                return Ok(());
            }
            anyhow::bail!(
                "this node is a member at Raft address {}, but serves on {}: restart it on the recorded address (or remove it and join again)",
                me.info.raft_addr,
                info.raft_addr
            );
        }
        return Ok(());
    }
    if let Some(seed_addr) = &settings.join {
        tracing::info!(node_id = settings.node_id, member = %seed_addr, "joining cluster");
        let timeout = Duration::from_millis(JOIN_TIMEOUT_MS);
        let joined = match dialer {
            None => {
                ConsensusNode::join_cluster(
                    seed_addr,
                    cluster_token,
                    settings.node_id,
                    info.clone(),
                    timeout,
                )
                .await
            }
            Some(dialer) => {
                ConsensusNode::join_cluster_with_dialer(
                    seed_addr,
                    cluster_token,
                    settings.node_id,
                    info.clone(),
                    timeout,
                    dialer,
                )
                .await
            }
        };
        joined.with_context(|| format!("joining the cluster through {seed_addr}"))?;
    } else if settings.bootstrap {
        let mut members: BTreeMap<u64, NodeInfo> = BTreeMap::new();
        for m in &settings.initial_members {
            anyhow::ensure!(
                members.insert(m.id, member_info(m)).is_none(),
                "initial_members lists node {} twice",
                m.id
            );
        }
        if let Some(listed) = members.get(&settings.node_id) {
            // Every founding member must write the same first membership.
            anyhow::ensure!(
                listed.raft_addr == info.raft_addr,
                "initial_members gives this node Raft address {}, but it serves on {}",
                listed.raft_addr,
                info.raft_addr
            );
        }
        members.insert(settings.node_id, info.clone());
        if members.len() > 1 && settings.cluster_token_file.is_none() {
            tracing::warn!(
                "the cluster token is the admin token: set cluster_token_file so that admin clients cannot speak Raft"
            );
        }
        consensus
            .initialize(members)
            .await
            .context("initializing the cluster")?;
    }
    Ok(())
}

/// Waits for a leader, then applies `text` if the config is still empty.
/// Ends early, doing nothing, when the node shuts down.
async fn seed_when_ready(
    state: Arc<NodeState>,
    text: String,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let wait = state
            .consensus
            .wait_for_leader(Duration::from_millis(LEADER_WAIT_MS));
        tokio::select! {
            r = wait => match r {
                Ok(_) => break,
                Err(e) => tracing::debug!(error = %e, "still waiting for a raft leader"),
            },
            _ = shutdown.changed() => return Ok(()),
        }
    }
    // Skip the round trip on a restart; the state machine makes the real
    // decision, since this node's own view may lag behind the cluster's.
    let config = state.config();
    if !config.licenses.is_empty() || !config.models.is_empty() {
        return Ok(());
    }
    if admin::apply_seed(&state, &text)
        .await
        .map_err(|e| anyhow::anyhow!("applying seed documents: {e}"))?
    {
        tracing::info!("applied seed documents");
    }
    Ok(())
}
