//! Multi-node Raft over the gRPC transport on real loopback sockets:
//! election and forwarded writes, leader failover, refusing writes without
//! a quorum, catching a new node up through a snapshot, the cluster token,
//! and connections opened by a plugged-in dialer.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::TcpListenerStream;
use tollgate_consensus::{
    BoxIo, CallError, ConsensusNode, Dial, DialFuture, MemStorage, NodeId, NodeInfo, RaftSettings,
    Storage, TransportSettings, WriteError, raft_server,
};
use tollgate_proto::v1::RaftMessage;
use tollgate_proto::v1::raft_client::RaftClient;
use tollgate_quota::config::{ApplyOutcome, Config, ConfigCommand, ConfigOp};
use tollgate_quota::license::parse_license;

const TOKEN: &str = "test-cluster-token";
/// Bound on every wait for convergence; generous for a loaded CI machine.
const WAIT: Duration = Duration::from_secs(20);
/// Bound on stopping a node's Raft server.
const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a test polls a condition that has no openraft wait.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The one place tests build a config command.
fn put_cmd(i: usize) -> ConfigCommand {
    let yaml = format!(
        "apiVersion: tollgate/v1\nkind: License\nid: lic-{i}\ncustomer: C\nkeys: [{{key: key-{i}}}]\n"
    );
    let license = parse_license(&yaml).expect("test license parses");
    ConfigCommand {
        request_id: None,
        actor: "test".to_string(),
        reason: None,
        at_ms: 0,
        op: ConfigOp::PutLicense(license),
    }
}

fn fast_settings() -> RaftSettings {
    RaftSettings {
        heartbeat_interval_ms: 50,
        election_timeout_min_ms: 200,
        election_timeout_max_ms: 400,
        write_timeout_ms: 2_000,
        membership_timeout_ms: 15_000,
        ..RaftSettings::default()
    }
}

fn fast_transport() -> TransportSettings {
    TransportSettings {
        connect_timeout_ms: 500,
        ..TransportSettings::default()
    }
}

/// One node: consensus plus its Raft server on a loopback listener.
struct TestNode {
    id: NodeId,
    info: NodeInfo,
    node: Arc<ConsensusNode>,
    stop_server: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl TestNode {
    async fn spawn(id: NodeId, settings: &RaftSettings) -> Result<Self> {
        Self::spawn_with_token(id, settings, TOKEN).await
    }

    async fn spawn_with_token(id: NodeId, settings: &RaftSettings, token: &str) -> Result<Self> {
        Self::spawn_with(id, settings, token, None).await
    }

    /// A node whose connections to peers `dialer` opens (`None`: the
    /// default TCP transport, through `start_grpc`).
    async fn spawn_with(
        id: NodeId,
        settings: &RaftSettings,
        token: &str,
        dialer: Option<Arc<dyn Dial>>,
    ) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let info = NodeInfo {
            region: format!("region-{id}"),
            raft_addr: listener.local_addr()?.to_string(),
            ..NodeInfo::default()
        };
        let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
        let transport = fast_transport();
        let node = Arc::new(match dialer {
            None => {
                ConsensusNode::start_grpc(id, info.clone(), storage, settings, &transport, token)
                    .await?
            }
            Some(dialer) => {
                ConsensusNode::start_grpc_with_dialer(
                    id,
                    info.clone(),
                    storage,
                    settings,
                    &transport,
                    token,
                    dialer,
                )
                .await?
            }
        });
        let (stop_server, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(raft_server(node.clone(), token))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                    let _ = stopped.await;
                }),
        );
        Ok(Self {
            id,
            info,
            node,
            stop_server: Some(stop_server),
            server: Some(server),
        })
    }

    /// Stops Raft, then the server (boundedly: a graceful stop waits for
    /// open peer connections, so it is cut short if they linger).
    async fn stop(&mut self) -> Result<()> {
        self.node.shutdown().await?;
        if let Some(stop) = self.stop_server.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let abort = server.abort_handle();
            if tokio::time::timeout(SERVER_STOP_TIMEOUT, server)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        Ok(())
    }
}

/// Starts `n` nodes (ids 1..=n) and forms a cluster of all of them.
async fn cluster(n: u64, settings: &RaftSettings) -> Result<Vec<TestNode>> {
    let mut nodes = Vec::new();
    for id in 1..=n {
        nodes.push(TestNode::spawn(id, settings).await?);
    }
    form(nodes).await
}

/// Initializes a cluster of all of `nodes` on the first one and waits until
/// each knows a leader.
async fn form(nodes: Vec<TestNode>) -> Result<Vec<TestNode>> {
    let members: BTreeMap<NodeId, NodeInfo> =
        nodes.iter().map(|n| (n.id, n.info.clone())).collect();
    ensure!(
        nodes[0].node.initialize(members.clone()).await?,
        "first initialize"
    );
    ensure!(
        !nodes[0].node.initialize(members).await?,
        "second initialize is a no-op"
    );
    for n in &nodes {
        n.node.wait_for_leader(WAIT).await?;
    }
    Ok(nodes)
}

/// Waits until every node in `nodes` agrees on one leader among them.
async fn agreed_leader(nodes: &[&TestNode]) -> Result<NodeId> {
    let ids: Vec<NodeId> = nodes.iter().map(|n| n.id).collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let leaders: Vec<Option<NodeId>> = nodes.iter().map(|n| n.node.metrics().leader).collect();
        if let Some(Some(leader)) = leaders.first()
            && ids.contains(leader)
            && leaders.iter().all(|l| l == &Some(*leader))
        {
            return Ok(*leader);
        }
        if Instant::now() > deadline {
            bail!("no agreed leader among {ids:?} within {WAIT:?}: {leaders:?}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn applied_version(outcome: ApplyOutcome) -> Result<u64> {
    match outcome {
        ApplyOutcome::Applied { version } => Ok(version),
        other => bail!("write not applied: {other:?}"),
    }
}

/// Config equality by value (Config has derived indexes and no PartialEq).
fn same_config(a: &Config, b: &Config) -> Result<bool> {
    Ok(serde_json::to_value(a)? == serde_json::to_value(b)?)
}

async fn stop_all(nodes: &mut [TestNode]) -> Result<()> {
    for n in nodes {
        if n.server.is_some() {
            n.stop().await?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t10_three_nodes_elect_and_a_follower_write_reaches_everyone() -> Result<()> {
    let mut nodes = cluster(3, &fast_settings()).await?;
    let leader = agreed_leader(&nodes.iter().collect::<Vec<_>>()).await?;
    let follower = nodes
        .iter()
        .find(|n| n.id != leader)
        .context("a follower")?;

    let version = applied_version(follower.node.write_forwarded(put_cmd(1)).await?)?;
    // Read-your-write on the node that forwarded it.
    let here = follower.node.metrics().last_applied_index;
    ensure!(
        here >= Some(version),
        "forwarding node applied {here:?} < {version}"
    );
    ensure!(follower.node.current_config().licenses.len() == 1);

    for n in &nodes {
        n.node.wait_for_applied(version, WAIT).await?;
        ensure!(
            n.node.current_config().version >= version,
            "node {} behind",
            n.id
        );
    }
    let reference = nodes[0].node.current_config();
    for n in &nodes[1..] {
        ensure!(
            same_config(&reference, &n.node.current_config())?,
            "node {} differs",
            n.id
        );
    }

    let members = nodes[0].node.members();
    ensure!(
        members.len() == 3 && members.iter().all(|m| m.voter),
        "{members:?}"
    );
    let leader_node = nodes.iter().find(|n| n.id == leader).context("leader")?;
    let m = leader_node.node.metrics();
    ensure!(m.state == "leader" && m.replication.len() == 2, "{m:?}");
    let status = leader_node.node.peer_status(&follower.info).await?;
    ensure!(
        status.node_id == follower.id && status.state == "follower",
        "{status:?}"
    );
    stop_all(&mut nodes).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t20_after_the_leader_stops_the_others_elect_and_accept_writes() -> Result<()> {
    let mut nodes = cluster(3, &fast_settings()).await?;
    let old_leader = agreed_leader(&nodes.iter().collect::<Vec<_>>()).await?;
    let first = nodes
        .iter()
        .find(|n| n.id != old_leader)
        .context("a follower")?;
    let before = applied_version(first.node.write_forwarded(put_cmd(1)).await?)?;

    let idx = nodes
        .iter()
        .position(|n| n.id == old_leader)
        .context("leader")?;
    nodes[idx].stop().await?;
    let survivors: Vec<&TestNode> = nodes.iter().filter(|n| n.id != old_leader).collect();
    let new_leader = agreed_leader(&survivors).await?;
    ensure!(new_leader != old_leader);

    let follower = survivors
        .iter()
        .find(|n| n.id != new_leader)
        .context("a follower")?;
    let version = applied_version(follower.node.write_forwarded(put_cmd(2)).await?)?;
    ensure!(version > before);
    for n in &survivors {
        n.node.wait_for_applied(version, WAIT).await?;
        ensure!(n.node.current_config().licenses.len() == 2, "node {}", n.id);
    }
    stop_all(&mut nodes).await
}

/// Stops every node but `survivor` and checks that a write there fails
/// with `NoQuorum` within the write timeout plus slack.
async fn check_no_quorum(mut nodes: Vec<TestNode>, survivor: NodeId) -> Result<()> {
    let settings = fast_settings();
    for n in nodes.iter_mut().filter(|n| n.id != survivor) {
        n.stop().await?;
    }
    let node = nodes
        .iter()
        .find(|n| n.id == survivor)
        .context("survivor")?;
    let started = Instant::now();
    let result = node.node.write_forwarded(put_cmd(9)).await;
    let elapsed = started.elapsed();
    let bound = Duration::from_millis(settings.write_timeout_ms) + Duration::from_secs(2);
    ensure!(elapsed <= bound, "took {elapsed:?} > {bound:?}: {result:?}");
    match result {
        Err(e @ WriteError::NoQuorum { voters: 3, .. }) => {
            ensure!(e.to_string().starts_with("no quorum:"), "{e}");
        }
        other => bail!("expected NoQuorum, got {other:?}"),
    }
    stop_all(&mut nodes).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t30_a_follower_alone_refuses_writes_with_no_quorum() -> Result<()> {
    let nodes = cluster(3, &fast_settings()).await?;
    let leader = agreed_leader(&nodes.iter().collect::<Vec<_>>()).await?;
    let survivor = nodes
        .iter()
        .find(|n| n.id != leader)
        .context("a follower")?
        .id;
    check_no_quorum(nodes, survivor).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t31_a_leader_alone_refuses_writes_with_no_quorum() -> Result<()> {
    let nodes = cluster(3, &fast_settings()).await?;
    let leader = agreed_leader(&nodes.iter().collect::<Vec<_>>()).await?;
    check_no_quorum(nodes, leader).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t40_a_new_node_catches_up_through_a_snapshot() -> Result<()> {
    let settings = RaftSettings {
        snapshot_after_entries: 20,
        max_in_snapshot_log_to_keep: 0,
        ..fast_settings()
    };
    let mut nodes = cluster(3, &settings).await?;
    let leader = agreed_leader(&nodes.iter().collect::<Vec<_>>()).await?;
    let leader_node = nodes.iter().find(|n| n.id == leader).context("leader")?;
    let mut last = 0;
    for i in 0..60 {
        last = applied_version(leader_node.node.write(put_cmd(i)).await?)?;
    }
    // The log the new node would need is gone: it must get a snapshot.
    leader_node
        .node
        .raft()
        .wait(Some(WAIT))
        .metrics(|m| m.purged.is_some_and(|p| p.index >= 40), "log purged")
        .await?;

    let newcomer = TestNode::spawn(4, &settings).await?;
    let index = leader_node.node.add_node(4, newcomer.info.clone()).await?;
    ensure!(index > last, "membership index {index} <= {last}");
    newcomer.node.wait_for_applied(index, WAIT).await?;
    let m = newcomer.node.metrics();
    ensure!(m.install_snapshot_rpcs_received > 0, "{m:?}");
    ensure!(m.voter_ids.contains(&4), "{m:?}");
    ensure!(
        same_config(
            &leader_node.node.current_config(),
            &newcomer.node.current_config()
        )?,
        "configs differ"
    );
    ensure!(newcomer.node.current_config().licenses.len() == 60);

    // Adding it again is a no-op; the same id at another address is refused.
    ensure!(leader_node.node.add_node(4, newcomer.info.clone()).await? == index);
    let moved = NodeInfo {
        raft_addr: "127.0.0.1:1".to_string(),
        ..newcomer.info.clone()
    };
    match leader_node.node.add_node(4, moved).await {
        Err(WriteError::MembershipRejected { .. }) => {}
        other => bail!("expected MembershipRejected, got {other:?}"),
    }
    // Another id at a member's address is refused too: one process, one vote.
    match leader_node.node.add_node(9, newcomer.info.clone()).await {
        Err(WriteError::MembershipRejected { reason }) if reason.contains("node 4") => {}
        other => bail!("expected MembershipRejected naming node 4, got {other:?}"),
    }
    nodes.push(newcomer);
    stop_all(&mut nodes).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t50_a_node_joins_through_a_follower_and_is_removed() -> Result<()> {
    let mut nodes = cluster(3, &fast_settings()).await?;
    let leader = agreed_leader(&nodes.iter().collect::<Vec<_>>()).await?;
    let follower = nodes
        .iter()
        .find(|n| n.id != leader)
        .context("a follower")?;
    let version = applied_version(follower.node.write_forwarded(put_cmd(1)).await?)?;

    let newcomer = TestNode::spawn(4, &fast_settings()).await?;
    let index = ConsensusNode::join_cluster(
        &follower.info.raft_addr,
        TOKEN,
        4,
        newcomer.info.clone(),
        WAIT,
    )
    .await?;
    newcomer
        .node
        .wait_for_applied(index.max(version), WAIT)
        .await?;
    ensure!(newcomer.node.current_config().licenses.len() == 1);
    ensure!(follower.node.members().iter().any(|m| m.id == 4 && m.voter));

    // Removal through a follower, then the node is gone everywhere.
    let removed_at = follower.node.remove_node(4).await?;
    follower.node.wait_for_applied(removed_at, WAIT).await?;
    ensure!(follower.node.members().iter().all(|m| m.id != 4));
    nodes.push(newcomer);
    stop_all(&mut nodes).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t60_a_wrong_or_missing_cluster_token_is_unauthenticated() -> Result<()> {
    let mut nodes = cluster(1, &fast_settings()).await?;
    let addr = format!("http://{}", nodes[0].info.raft_addr);

    let mut client = RaftClient::connect(addr.clone()).await?;
    let status = client
        .node_status(RaftMessage { payload: vec![] })
        .await
        .expect_err("no token must be refused");
    ensure!(status.code() == tonic::Code::Unauthenticated, "{status:?}");

    let mut request = tonic::Request::new(RaftMessage { payload: vec![] });
    request
        .metadata_mut()
        .insert("authorization", "Bearer wrong".parse()?);
    let status = client
        .node_status(request)
        .await
        .expect_err("a wrong token must be refused");
    ensure!(status.code() == tonic::Code::Unauthenticated, "{status:?}");

    // The right token with a payload that is not a request: a reason, no panic.
    let mut request = tonic::Request::new(RaftMessage {
        payload: vec![0xc1, 0x00, 0xff],
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse()?);
    let status = client
        .append_entries(request)
        .await
        .expect_err("garbage must be refused");
    ensure!(status.code() == tonic::Code::InvalidArgument, "{status:?}");

    // A node of another cluster cannot query it either.
    let mut stranger = TestNode::spawn_with_token(7, &fast_settings(), "other-token").await?;
    match stranger.node.peer_status(&nodes[0].info).await {
        Err(CallError::Unreachable {
            code: tonic::Code::Unauthenticated,
            ..
        }) => {}
        other => bail!("expected an unauthenticated peer, got {other:?}"),
    }
    stranger.stop().await?;
    stop_all(&mut nodes).await
}

/// A dialer that records every attempt and then connects over TCP, or
/// refuses every attempt.
struct RecordingDialer {
    refuse: bool,
    dials: AtomicUsize,
    addrs: Mutex<Vec<String>>,
}

impl RecordingDialer {
    fn new(refuse: bool) -> Arc<Self> {
        Arc::new(Self {
            refuse,
            dials: AtomicUsize::new(0),
            addrs: Mutex::new(Vec::new()),
        })
    }

    fn dials(&self) -> usize {
        self.dials.load(Ordering::Relaxed)
    }
}

impl Dial for RecordingDialer {
    fn dial(&self, addr: &str) -> DialFuture {
        self.dials.fetch_add(1, Ordering::Relaxed);
        self.addrs.lock().push(addr.to_string());
        let addr = addr.to_string();
        let refuse = self.refuse;
        Box::pin(async move {
            if refuse {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("test dialer refuses {addr}"),
                ));
            }
            let stream = TcpStream::connect(addr.as_str()).await?;
            Ok(Box::new(stream) as BoxIo)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t70_peers_are_reached_through_the_plugged_in_dialer() -> Result<()> {
    let settings = fast_settings();
    let mut dialers = Vec::new();
    let mut nodes = Vec::new();
    for id in 1..=3 {
        let dialer = RecordingDialer::new(false);
        nodes.push(TestNode::spawn_with(id, &settings, TOKEN, Some(dialer.clone())).await?);
        dialers.push(dialer);
    }
    let mut nodes = form(nodes).await?;
    let leader = agreed_leader(&nodes.iter().collect::<Vec<_>>()).await?;
    let follower_idx = nodes
        .iter()
        .position(|n| n.id != leader)
        .context("a follower")?;
    let leader_idx = nodes
        .iter()
        .position(|n| n.id == leader)
        .context("the leader")?;

    // The forwarded write goes through the follower's dialer, replication
    // through the leader's.
    let version = applied_version(nodes[follower_idx].node.write_forwarded(put_cmd(1)).await?)?;
    for n in &nodes {
        n.node.wait_for_applied(version, WAIT).await?;
    }
    let raft_addrs: Vec<&str> = nodes.iter().map(|n| n.info.raft_addr.as_str()).collect();
    ensure!(
        dialers[follower_idx].dials() >= 1,
        "the follower never dialled"
    );
    ensure!(
        dialers[leader_idx].dials() >= 2,
        "the leader dialled {} times for two followers",
        dialers[leader_idx].dials()
    );
    for (dialer, n) in dialers.iter().zip(&nodes) {
        let addrs = dialer.addrs.lock().clone();
        ensure!(
            addrs
                .iter()
                .all(|a| raft_addrs.contains(&a.as_str()) && a != &n.info.raft_addr),
            "node {} dialled {addrs:?}, not only its peers' Raft addresses",
            n.id
        );
    }
    // Channels are cached: dials count connections, not requests.
    let before: usize = dialers.iter().map(|d| d.dials()).sum();
    let follower = &nodes[follower_idx];
    for i in 2..6 {
        applied_version(follower.node.write_forwarded(put_cmd(i)).await?)?;
    }
    let after: usize = dialers.iter().map(|d| d.dials()).sum();
    ensure!(
        after == before,
        "{} more dials for 4 writes",
        after - before
    );
    stop_all(&mut nodes).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t71_a_dialer_that_fails_leaves_the_peer_unreachable() -> Result<()> {
    let settings = fast_settings();
    let refusing = RecordingDialer::new(true);
    let nodes = vec![
        TestNode::spawn(1, &settings).await?,
        TestNode::spawn_with(2, &settings, TOKEN, Some(refusing.clone())).await?,
    ];
    // Node 2 cannot open a connection, but node 1 can reach it, and node 2
    // answers on node 1's connections: node 1 leads (node 2 can never win
    // an election it cannot call).
    let mut nodes = form(nodes).await?;
    ensure!(agreed_leader(&nodes.iter().collect::<Vec<_>>()).await? == 1);
    let version = applied_version(nodes[0].node.write(put_cmd(1)).await?)?;
    nodes[1].node.wait_for_applied(version, WAIT).await?;

    match nodes[1].node.peer_status(&nodes[0].info).await {
        Err(e @ CallError::Unreachable { .. }) => {
            ensure!(e.not_delivered(), "{e}");
        }
        other => bail!("expected node 1 unreachable from node 2, got {other:?}"),
    }
    ensure!(
        refusing.dials() >= 1,
        "the refusing dialer was never called"
    );
    // Node 2 keeps working as a follower.
    let version = applied_version(nodes[0].node.write(put_cmd(2)).await?)?;
    nodes[1].node.wait_for_applied(version, WAIT).await?;
    stop_all(&mut nodes).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t72_a_node_joins_through_a_plugged_in_dialer() -> Result<()> {
    let mut nodes = cluster(1, &fast_settings()).await?;
    let dialer = RecordingDialer::new(false);
    let newcomer = TestNode::spawn(2, &fast_settings()).await?;
    let index = ConsensusNode::join_cluster_with_dialer(
        &nodes[0].info.raft_addr,
        TOKEN,
        2,
        newcomer.info.clone(),
        WAIT,
        dialer.clone(),
    )
    .await?;
    newcomer.node.wait_for_applied(index, WAIT).await?;
    ensure!(
        dialer.addrs.lock().first() == Some(&nodes[0].info.raft_addr),
        "{:?}",
        dialer.addrs.lock()
    );

    // A seed that cannot be dialled fails the join within its timeout.
    let refused = ConsensusNode::join_cluster_with_dialer(
        &nodes[0].info.raft_addr,
        TOKEN,
        3,
        NodeInfo {
            raft_addr: "127.0.0.1:1".to_string(),
            ..NodeInfo::default()
        },
        Duration::from_millis(300),
        RecordingDialer::new(true),
    )
    .await;
    match refused {
        Err(WriteError::Transport { .. }) => {}
        other => bail!("expected a transport error, got {other:?}"),
    }
    nodes.push(newcomer);
    stop_all(&mut nodes).await
}
