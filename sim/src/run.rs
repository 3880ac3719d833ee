//! Runs one scenario with one seed: real Tollgate nodes on turmoil hosts,
//! clients on hosts of their own, faults from the scenario, and samples of
//! every node's state, all on simulated time.
//!
//! This module owns the cluster's lifecycle in the simulation (start, crash
//! with loss of unsynced writes, restart, join, removal), the workload, the
//! fault driver and the history it records. It must not judge the history
//! (that is `check`) and must not fork node logic: nodes are started through
//! `tollgate_node::server::start_in`, the same path as production, with
//! simulated sockets, storage and clock.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tollgate_consensus::dial::{BoxIo, Dial, DialFuture};
use tollgate_consensus::storage::{MemStorage, Storage};
use tollgate_node::clock::Clock;
use tollgate_node::quic::GossipSocket;
use tollgate_node::server::{Addrs, Environment, RunningNode};
use tollgate_node::settings::{MemberSettings, NodeSettings, RaftTiming};
use tollgate_node::state::NodeState;
use tollgate_proto::v1 as pb;

use crate::history::{Call, FaultEvent, History, Lic, Op, Outcome, Sample};
use crate::licenses::{self, CHURN_ID, QUOTA_ID};
use crate::net;
use crate::scenario::{At, FaultKind, Scenario, Target};

const GRPC_PORT: u16 = 7400;
const HTTP_PORT: u16 = 7480;
const RAFT_PORT: u16 = 7500;
const GOSSIP_PORT: u16 = 7600;
/// Gossip interval of simulated nodes (the default).
pub const GOSSIP_INTERVAL_MS: u64 = 50;
/// How often the driver samples every node.
const SAMPLE_EVERY_MS: u64 = 10;
/// Faults start no earlier than this: the cluster must form and seed first.
const WARMUP_MS: u64 = 3_000;
/// A client call gives up after this long (its outcome is then unknown).
const CALL_TIMEOUT_MS: u64 = 1_500;
const ADMIN_TOKEN: &str = "sim-admin-token";

/// A bug to plant (needs the `planted-bugs` feature).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plant {
    /// `decide` allows strict usage without escrow rights.
    SkipEscrowCheck,
}

impl Plant {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::SkipEscrowCheck => "skip-escrow-check",
        }
    }

    /// Parses a command-line name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "skip-escrow-check" => Some(Self::SkipEscrowCheck),
            _ => None,
        }
    }
}

/// How to run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// The seed every random choice derives from.
    pub seed: u64,
    /// A bug to plant.
    pub plant: Option<Plant>,
}

/// What one run produced.
#[derive(Debug)]
pub struct Run {
    /// The scenario.
    pub scenario: Scenario,
    /// The seed.
    pub seed: u64,
    /// The record.
    pub history: History,
    /// When the last heal happened (simulated ms).
    pub healed_at_ms: u64,
    /// When, after the heal, every live node was serving with its gossip
    /// started (a node restarted at the heal first has to boot); convergence
    /// is measured from here.
    pub serving_at_ms: u64,
    /// When every live node first agreed on all usage after the heal.
    pub converged_at_ms: Option<u64>,
    /// Final usage per license and window, as the converged nodes agree
    /// (from the first live node).
    pub final_usage: BTreeMap<(Lic, i64), u64>,
    /// The config version each live node ended at, and whether its history
    /// of the churned license holds each version.
    pub final_configs: BTreeMap<u64, FinalConfig>,
    /// The most groups the network was cut into at once.
    pub max_components: usize,
    /// Largest clock skew set on any node (ms, absolute).
    pub max_skew_ms: u64,
    /// Node software that failed, with its error.
    pub node_failures: Vec<String>,
    /// Nodes alive at the end.
    pub live_nodes: BTreeSet<u64>,
    /// Nodes removed from the membership (and stopped) on purpose.
    pub removed: BTreeSet<u64>,
    /// Each live node's audit log at the end, verified against the key its
    /// config registered: the records it holds, or the first problem.
    pub audit: BTreeMap<u64, Result<u64, String>>,
}

/// A node's config at the end of a run.
#[derive(Clone, Debug)]
pub struct FinalConfig {
    /// Its version.
    pub version: u64,
    /// Versions recorded in the churned license's history.
    pub churn_versions: BTreeSet<u64>,
}

/// Files every simulated node reads: certificates and tokens. Made once per
/// process, in a dir of its own; their bytes do not influence the run.
struct Fixtures {
    dir: PathBuf,
}

impl Drop for Fixtures {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(error = %e, dir = %self.dir.display(), "could not remove the simulator fixtures");
        }
    }
}

/// This process's fixtures, while it has them.
static FIXTURES: Mutex<Option<Arc<Fixtures>>> = parking_lot::const_mutex(None);

fn fixtures() -> anyhow::Result<Arc<Fixtures>> {
    let mut held = FIXTURES.lock();
    if let Some(fx) = held.as_ref() {
        return Ok(Arc::clone(fx));
    }
    let fx = Arc::new(make_fixtures().context("simulator fixtures")?);
    *held = Some(Arc::clone(&fx));
    Ok(fx)
}

/// Removes this process's fixtures dir once the runs using it are over (a
/// later run makes a new one). Call it when the process is done with runs.
pub fn remove_fixtures() {
    FIXTURES.lock().take();
}

fn make_fixtures() -> anyhow::Result<Fixtures> {
    // A dir that did not exist before: never another process's, never one
    // a killed run left behind.
    let mut attempts = 0;
    let dir = loop {
        let suffix: u64 = rand::random();
        let dir =
            std::env::temp_dir().join(format!("tollgate-sim-{}-{suffix:016x}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => break dir,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempts < 8 => {
                attempts += 1;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("creating {}", dir.display()));
            }
        }
    };
    // Owned from here: an error below removes the dir again.
    let fx = Fixtures { dir };
    tollgate_node::certs::init(&fx.dir.join("certs"), &(1..=9).collect::<Vec<u64>>())
        .context("making simulator certificates")?;
    std::fs::write(fx.dir.join("admin.token"), ADMIN_TOKEN).context("writing the admin token")?;
    std::fs::write(fx.dir.join("cluster.token"), "sim-cluster-token")
        .context("writing the cluster token")?;
    Ok(fx)
}

/// Dials Raft peers over the simulated network.
struct SimDialer;

impl Dial for SimDialer {
    fn dial(&self, addr: &str) -> DialFuture {
        let addr = addr.to_string();
        Box::pin(async move {
            let stream = net::dial(&addr).await?;
            Ok(Box::new(stream) as BoxIo)
        })
    }
}

/// One node's slot: what survives its crashes.
struct Slot {
    id: u64,
    storage: Arc<MemStorage>,
    skew_ms: Arc<AtomicI64>,
    // Weak: the host's runtime owns the node; dropping it on a crash must
    // release everything, sockets included, inside the simulation.
    state: Mutex<Option<std::sync::Weak<NodeState>>>,
    incarnation: Mutex<u32>,
    failure: Mutex<Option<String>>,
}

impl Slot {
    /// The running node, if it is serving.
    fn node(&self) -> Option<Arc<NodeState>> {
        self.state
            .lock()
            .as_ref()
            .and_then(std::sync::Weak::upgrade)
    }
}

fn host_name(id: u64) -> String {
    format!("n{id}")
}

fn node_settings(
    scenario: &Scenario,
    fx: &Fixtures,
    id: u64,
    ip: IpAddr,
    founders: &[(u64, IpAddr)],
    join: Option<SocketAddr>,
) -> NodeSettings {
    let grpc = SocketAddr::new(ip, GRPC_PORT);
    let http = SocketAddr::new(ip, HTTP_PORT);
    let mut s = NodeSettings::local(id, &fx.dir, grpc, http);
    s.region = scenario.region_of(id);
    s.raft_addr = Some(SocketAddr::new(ip, RAFT_PORT));
    s.gossip_addr = Some(SocketAddr::new(ip, GOSSIP_PORT));
    s.tls = Some(tollgate_node::certs::node_files(&fx.dir.join("certs"), id));
    s.cluster_token_file = Some(fx.dir.join("cluster.token"));
    s.durable_usage_ack = true;
    s.raft = RaftTiming::local();
    s.snapshot_after_entries = 50;
    s.snapshot_keep_entries = 10;
    if let Some(ms) = scenario.drain_timeout_ms {
        s.gossip.drain_timeout_ms = ms;
    }
    match join {
        Some(addr) => {
            s.bootstrap = false;
            s.join = Some(addr.to_string());
        }
        None => {
            s.initial_members = founders
                .iter()
                .map(|&(fid, fip)| MemberSettings {
                    id: fid,
                    region: scenario.region_of(fid),
                    raft_addr: SocketAddr::new(fip, RAFT_PORT),
                    grpc_addr: SocketAddr::new(fip, GRPC_PORT),
                    http_addr: SocketAddr::new(fip, HTTP_PORT),
                    gossip_addr: Some(SocketAddr::new(fip, GOSSIP_PORT)),
                })
                .collect();
        }
    }
    s
}

/// The software of a node host: starts the real node on simulated I/O and
/// keeps it serving.
async fn serve_node(
    slot: Arc<Slot>,
    settings: NodeSettings,
    seed_docs: Option<String>,
    epoch_ms: i64,
    quic_seed: u64,
) -> turmoil::Result {
    let incarnation = *slot.incarnation.lock();
    let ip = turmoil::lookup(host_name(slot.id));
    let grpc = turmoil::net::TcpListener::bind(("0.0.0.0", GRPC_PORT)).await?;
    let raft = turmoil::net::TcpListener::bind(("0.0.0.0", RAFT_PORT)).await?;
    let udp = net::bind_udp(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), GOSSIP_PORT)).await?;
    let skew = Arc::clone(&slot.skew_ms);
    let clock = Clock::from_source(Arc::new(move || {
        let since = turmoil::since_epoch()
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(epoch_ms);
        since.saturating_add(skew.load(Ordering::Relaxed))
    }));
    let mut rng_seed = [0u8; 32];
    rng_seed[..8].copy_from_slice(&quic_seed.to_le_bytes());
    rng_seed[8..12].copy_from_slice(&incarnation.to_le_bytes());
    let env = Environment {
        addrs: Addrs {
            grpc: SocketAddr::new(ip, GRPC_PORT),
            http: SocketAddr::new(ip, HTTP_PORT),
            raft: SocketAddr::new(ip, RAFT_PORT),
            // Bound on 0.0.0.0; peers learn the host's address.
            gossip: Some(SocketAddr::new(ip, GOSSIP_PORT)),
        },
        grpc: net::incoming(grpc),
        raft: net::incoming(raft),
        http: None,
        gossip: GossipSocket::Abstract {
            socket: udp,
            runtime: Arc::new(net::SimQuinnRuntime),
            rng_seed: Some(rng_seed),
        },
        storage: Some(Arc::clone(&slot.storage) as Arc<dyn Storage>),
        clock: Arc::new(clock),
        raft_dialer: Some(Arc::new(SimDialer)),
    };
    let node: RunningNode = match tollgate_node::server::start_in(settings, env, seed_docs).await {
        Ok(node) => node,
        Err(e) => {
            *slot.failure.lock() = Some(format!("node {} failed to start: {e:#}", slot.id));
            return Err(e.into());
        }
    };
    *slot.state.lock() = Some(Arc::downgrade(&node.state));
    std::future::pending::<()>().await;
    drop(node);
    Ok(())
}

/// Simulated ms since the start.
fn now_ms() -> u64 {
    turmoil::sim_elapsed()
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

type Calls = Arc<Mutex<Vec<Call>>>;

fn admin_request<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Ok(v) = format!("Bearer {ADMIN_TOKEN}").parse() {
        req.metadata_mut().insert("authorization", v);
    }
    req.set_timeout(Duration::from_millis(CALL_TIMEOUT_MS));
    req
}

fn check_request(key: &str, quantity: u64, dry_run: bool) -> pb::CheckRequest {
    pb::CheckRequest {
        key: key.to_string(),
        model: licenses::MODEL.to_string(),
        model_version: licenses::MODEL_VERSION.to_string(),
        meters: vec![pb::Meter {
            metric: "inferences".into(),
            quantity,
        }],
        dry_run,
        ..Default::default()
    }
}

fn deny_code(reasons: &[pb::Reason]) -> String {
    reasons
        .first()
        .map(|r| r.code.clone())
        .unwrap_or_else(|| "unspecified".into())
}

fn window_of(resp: &pb::CheckResponse) -> i64 {
    resp.quotas
        .iter()
        .find(|q| q.quota == QUOTA_ID)
        .map_or(0, |q| q.resets_at_ms)
}

async fn with_timeout<T>(
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(Duration::from_millis(CALL_TIMEOUT_MS + 100), f).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(format!("{:?}", status.code())),
        Err(_) => Err("timeout".into()),
    }
}

struct ClientCtx {
    name: String,
    nodes: Vec<u64>,
    home: usize,
    calls: Calls,
    stop_at_ms: u64,
    think_ms: u64,
    weights: [u32; 5],
    rng: StdRng,
}

fn channel_to(node: u64) -> Option<tonic::transport::Channel> {
    net::channel(&format!("{}:{GRPC_PORT}", host_name(node))).ok()
}

/// One edge client: Checks, Reports and seat calls until `stop_at_ms`.
async fn edge_client(mut c: ClientCtx) -> turmoil::Result {
    let mut at = c.home;
    let mut lease: Option<(String, u64)> = None;
    let total: u32 = c.weights.iter().sum::<u32>().max(1);
    while now_ms() < c.stop_at_ms {
        let pause = c.rng.gen_range(0..=c.think_ms.saturating_mul(2));
        tokio::time::sleep(Duration::from_millis(pause.max(1))).await;
        let node = c.nodes[at % c.nodes.len()];
        let Some(channel) = channel_to(node) else {
            at += 1;
            continue;
        };
        let mut edge = pb::edge_client::EdgeClient::new(channel);
        let mut pick = c.rng.gen_range(0..total);
        let mut which = 0;
        for (i, w) in c.weights.iter().enumerate() {
            if pick < *w {
                which = i;
                break;
            }
            pick -= w;
        }
        let sent_ms = now_ms();
        let (op, outcome) = match which {
            0 | 1 | 4 => {
                let (lic, key) = match which {
                    0 => (Lic::Soft, licenses::SOFT_KEY),
                    1 => (Lic::Strict, licenses::STRICT_KEY),
                    _ => (Lic::Rate, licenses::RATE_KEY),
                };
                match with_timeout(edge.check(check_request(key, 1, false))).await {
                    Ok(r) => {
                        let window = window_of(&r);
                        let outcome = if r.outcome == pb::Outcome::Allow as i32 {
                            Outcome::Allow
                        } else {
                            Outcome::Deny(deny_code(&r.reasons))
                        };
                        (
                            Op::Check {
                                lic,
                                quantity: 1,
                                window,
                            },
                            outcome,
                        )
                    }
                    Err(e) => (
                        Op::Check {
                            lic,
                            quantity: 1,
                            window: 0,
                        },
                        Outcome::Unknown(e),
                    ),
                }
            }
            2 => {
                let quantity = c.rng.gen_range(1..=3);
                match with_timeout(edge.report(check_request(
                    licenses::METERED_KEY,
                    quantity,
                    false,
                )))
                .await
                {
                    Ok(r) => {
                        let window = window_of(&r);
                        let outcome = if r.outcome == pb::Outcome::Allow as i32 {
                            Outcome::Allow
                        } else {
                            Outcome::Deny(deny_code(&r.reasons))
                        };
                        (Op::Report { quantity, window }, outcome)
                    }
                    Err(e) => (
                        Op::Report {
                            quantity,
                            window: 0,
                        },
                        Outcome::Unknown(e),
                    ),
                }
            }
            _ => match lease.take() {
                None => {
                    let req = pb::SeatRequest {
                        key: licenses::SEATS_KEY.into(),
                        instance: c.name.clone(),
                        ..Default::default()
                    };
                    match with_timeout(edge.acquire_seat(req)).await {
                        Ok(r) if r.granted => {
                            lease = Some((r.lease_id.clone(), node));
                            (Op::Acquire { lease: r.lease_id }, Outcome::Allow)
                        }
                        Ok(r) => (
                            Op::Acquire {
                                lease: String::new(),
                            },
                            Outcome::Deny(deny_code(&r.reasons)),
                        ),
                        Err(e) => (
                            Op::Acquire {
                                lease: String::new(),
                            },
                            Outcome::Unknown(e),
                        ),
                    }
                }
                Some((id, _granted_by)) => {
                    let req = pb::SeatRequest {
                        key: licenses::SEATS_KEY.into(),
                        instance: c.name.clone(),
                        lease_id: id.clone(),
                        ..Default::default()
                    };
                    if c.rng.gen_bool(0.5) {
                        match with_timeout(edge.renew_seat(req)).await {
                            Ok(r) if r.granted => {
                                lease = Some((id.clone(), node));
                                (Op::Renew { lease: id }, Outcome::Allow)
                            }
                            Ok(r) => (
                                Op::Renew { lease: id },
                                Outcome::Deny(deny_code(&r.reasons)),
                            ),
                            Err(e) => (Op::Renew { lease: id }, Outcome::Unknown(e)),
                        }
                    } else {
                        match with_timeout(edge.release_seat(req)).await {
                            Ok(r) if r.granted => (Op::Release { lease: id }, Outcome::Allow),
                            Ok(r) => (
                                Op::Release { lease: id },
                                Outcome::Deny(deny_code(&r.reasons)),
                            ),
                            Err(e) => (Op::Release { lease: id }, Outcome::Unknown(e)),
                        }
                    }
                }
            },
        };
        if matches!(outcome, Outcome::Unknown(_)) {
            // Fail over to the next node.
            at += 1;
        }
        c.calls.lock().push(Call {
            client: c.name.clone(),
            node,
            sent_ms,
            done_ms: now_ms(),
            op,
            outcome,
        });
    }
    Ok(())
}

/// The admin client: puts, revokes and rolls back the churned license.
async fn admin_client(
    nodes: Vec<u64>,
    calls: Calls,
    every_ms: u64,
    stop_at_ms: u64,
    mut rng: StdRng,
) -> turmoil::Result {
    let mut rev = 1u64;
    let mut acked: Vec<u64> = Vec::new();
    let mut at = 0usize;
    tokio::time::sleep(Duration::from_millis(WARMUP_MS)).await;
    while now_ms() < stop_at_ms {
        let node = nodes[at % nodes.len()];
        at += 1;
        let Some(channel) = channel_to(node) else {
            continue;
        };
        let mut admin = pb::admin_client::AdminClient::new(channel);
        let sent_ms = now_ms();
        let roll = rng.gen_range(0..10);
        let (action, result) = if roll < 6 || acked.is_empty() {
            rev += 1;
            let req = admin_request(pb::ApplyRequest {
                document: licenses::churn_license(rev),
                reason: format!("sim put {rev}"),
            });
            (
                "put",
                with_timeout(admin.apply(req)).await.map(|r| r.version),
            )
        } else if roll < 8 {
            let req = admin_request(pb::RevokeLicenseRequest {
                id: CHURN_ID.into(),
                reason: "sim revoke".into(),
            });
            (
                "revoke",
                with_timeout(admin.revoke_license(req))
                    .await
                    .map(|r| r.version),
            )
        } else {
            let to = acked[rng.gen_range(0..acked.len())];
            let req = admin_request(pb::RollbackLicenseRequest {
                id: CHURN_ID.into(),
                to_version: to,
                reason: "sim rollback".into(),
            });
            (
                "rollback",
                with_timeout(admin.rollback_license(req))
                    .await
                    .map(|r| r.version),
            )
        };
        let outcome = match &result {
            Ok(v) => {
                if action == "put" {
                    acked.push(*v);
                }
                Outcome::Allow
            }
            Err(e) if e.contains("FailedPrecondition") || e.contains("InvalidArgument") => {
                Outcome::Deny(e.clone())
            }
            Err(e) => Outcome::Unknown(e.clone()),
        };
        calls.lock().push(Call {
            client: "admin".into(),
            node,
            sent_ms,
            done_ms: now_ms(),
            op: Op::Admin {
                action: action.into(),
                version: result.unwrap_or(0),
            },
            outcome,
        });
        tokio::time::sleep(Duration::from_millis(every_ms)).await;
    }
    Ok(())
}

/// After the heal: asks every live node for a dry-run Check until each has
/// answered, and commits one admin write.
async fn probe_client(
    nodes: Vec<u64>,
    calls: Calls,
    start_ms: u64,
    stop_at_ms: u64,
) -> turmoil::Result {
    while now_ms() < start_ms {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut pending: BTreeSet<u64> = nodes.iter().copied().collect();
    let mut admin_done = false;
    let mut rev = 1_000_000u64;
    while now_ms() < stop_at_ms && (!pending.is_empty() || !admin_done) {
        for node in pending.clone() {
            let Some(channel) = channel_to(node) else {
                continue;
            };
            let mut edge = pb::edge_client::EdgeClient::new(channel);
            let sent_ms = now_ms();
            let r = with_timeout(edge.check(check_request(licenses::SOFT_KEY, 1, true))).await;
            if r.is_ok() {
                pending.remove(&node);
                calls.lock().push(Call {
                    client: "probe".into(),
                    node,
                    sent_ms,
                    done_ms: now_ms(),
                    op: Op::Probe,
                    outcome: Outcome::Allow,
                });
            }
        }
        if !admin_done && let Some(&node) = nodes.first() {
            rev += 1;
            if let Some(channel) = channel_to(node) {
                let mut admin = pb::admin_client::AdminClient::new(channel);
                let sent_ms = now_ms();
                let req = admin_request(pb::ApplyRequest {
                    document: licenses::churn_license(rev),
                    reason: "sim liveness probe".into(),
                });
                if let Ok(r) = with_timeout(admin.apply(req)).await {
                    admin_done = true;
                    calls.lock().push(Call {
                        client: "probe".into(),
                        node,
                        sent_ms,
                        done_ms: now_ms(),
                        op: Op::Admin {
                            action: "put".into(),
                            version: r.version,
                        },
                        outcome: Outcome::Allow,
                    });
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The network cuts currently in force, as directed pairs (from, to).
#[derive(Default)]
struct Cuts {
    pairs: BTreeSet<(u64, u64)>,
}

impl Cuts {
    fn components(&self, nodes: &BTreeSet<u64>) -> usize {
        // Two nodes are together when messages flow both ways.
        let mut parent: BTreeMap<u64, u64> = nodes.iter().map(|&n| (n, n)).collect();
        fn find(p: &mut BTreeMap<u64, u64>, x: u64) -> u64 {
            let mut r = x;
            while let Some(&q) = p.get(&r) {
                if q == r {
                    break;
                }
                r = q;
            }
            p.insert(x, r);
            r
        }
        let list: Vec<u64> = nodes.iter().copied().collect();
        for (i, &a) in list.iter().enumerate() {
            for &b in &list[i + 1..] {
                if !self.pairs.contains(&(a, b)) && !self.pairs.contains(&(b, a)) {
                    let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
                    if ra != rb {
                        parent.insert(ra, rb);
                    }
                }
            }
        }
        let roots: BTreeSet<u64> = list.iter().map(|&n| find(&mut parent, n)).collect();
        roots.len()
    }
}

struct Driver<'a> {
    scenario: &'a Scenario,
    sim: turmoil::Sim<'a>,
    slots: BTreeMap<u64, Arc<Slot>>,
    history: History,
    cuts: Cuts,
    held: BTreeSet<(u64, u64)>,
    crashed: BTreeSet<u64>,
    removed: BTreeSet<u64>,
    rng: StdRng,
    max_components: usize,
    max_skew_ms: u64,
    seed: u64,
    epoch_ms: i64,
    // Filled once every founder's host exists (their addresses come from
    // the simulated DNS); read when a node's software starts.
    founders: Arc<Mutex<Vec<(u64, IpAddr)>>>,
    seed_docs: String,
    // Removals under way: the node, whether the removal committed, and
    // the latest time it is stopped at once it has (see REMOVAL_STOP_BOUND_MS).
    pending_removals: Vec<(u64, Arc<Mutex<bool>>, Option<u64>)>,
}

/// How long a removed node may run after its removal committed. It is
/// stopped the moment it reports its drain over (it noticed the removal,
/// refused new usage and its peers acked all it counted, or its drain timed
/// out); this bound only stops a node that never reports, e.g. one cut off
/// from every member, which cannot learn of its removal.
const REMOVAL_STOP_BOUND_MS: u64 = 30_000;

impl<'a> Driver<'a> {
    fn fault(&mut self, what: String) {
        tracing::debug!(at_ms = self.sim_ms(), %what, "fault");
        self.history.faults.push(FaultEvent {
            at_ms: self.sim_ms(),
            what,
        });
    }

    fn sim_ms(&self) -> u64 {
        u64::try_from(self.sim.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn live(&self) -> BTreeSet<u64> {
        self.slots
            .keys()
            .copied()
            .filter(|id| !self.crashed.contains(id) && !self.removed.contains(id))
            .filter(|id| self.started(*id))
            .collect()
    }

    fn started(&self, id: u64) -> bool {
        self.slots.get(&id).is_some_and(|s| {
            s.state
                .lock()
                .as_ref()
                .is_some_and(|w| w.strong_count() > 0)
        })
    }

    fn leader(&self) -> Option<u64> {
        let live = self.live();
        let mut best: Option<(u64, u64)> = None;
        for id in &live {
            if let Some(state) = self.slots[id].node() {
                let m = state.consensus.metrics();
                if m.is_leader && best.is_none_or(|(t, _)| m.term > t) {
                    best = Some((m.term, *id));
                }
            }
        }
        best.map(|(_, id)| id)
    }

    fn resolve(&mut self, target: &Target) -> Option<u64> {
        let live: Vec<u64> = self.live().into_iter().collect();
        match target {
            Target::Node(n) => Some(*n),
            Target::Leader => self.leader(),
            Target::Follower => {
                let leader = self.leader();
                let followers: Vec<u64> = live
                    .iter()
                    .copied()
                    .filter(|n| Some(*n) != leader)
                    .collect();
                (!followers.is_empty()).then(|| followers[self.rng.gen_range(0..followers.len())])
            }
            Target::Random => (!live.is_empty()).then(|| live[self.rng.gen_range(0..live.len())]),
        }
    }

    fn cut(&mut self, from: u64, to: u64) {
        if from == to {
            return;
        }
        self.sim.partition_oneway(host_name(from), host_name(to));
        self.cuts.pairs.insert((from, to));
    }

    fn all_ids(&self) -> Vec<u64> {
        self.slots.keys().copied().collect()
    }

    fn groups_by_region(&self) -> Vec<Vec<u64>> {
        let mut by: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for id in self.all_ids() {
            by.entry(self.scenario.region_of(id)).or_default().push(id);
        }
        by.into_values().collect()
    }

    fn heal_all(&mut self) {
        for (a, b) in std::mem::take(&mut self.cuts.pairs) {
            self.sim.repair_oneway(host_name(a), host_name(b));
        }
        for (a, b) in std::mem::take(&mut self.held) {
            self.sim.release(host_name(a), host_name(b));
        }
        let ids = self.all_ids();
        for &a in &ids {
            for &b in &ids {
                if a < b {
                    self.sim.set_link_fail_rate(host_name(a), host_name(b), 0.0);
                    // Both bounds: a latency fault set min = max above the
                    // scenario's max, and min > max must never happen.
                    self.sim.set_link_latency(
                        host_name(a),
                        host_name(b),
                        Duration::from_millis(self.scenario.latency_ms.min),
                    );
                    self.sim.set_link_max_message_latency(
                        host_name(a),
                        host_name(b),
                        Duration::from_millis(self.scenario.latency_ms.max),
                    );
                }
            }
        }
    }

    fn register_host(&mut self, id: u64, join: Option<SocketAddr>) -> anyhow::Result<()> {
        let fx = fixtures()?;
        let slot = Arc::clone(&self.slots[&id]);
        let scenario = self.scenario.clone();
        let founders = Arc::clone(&self.founders);
        let seed_docs = join.is_none().then(|| self.seed_docs.clone());
        let epoch_ms = self.epoch_ms;
        let quic_seed = self.seed ^ (id << 32);
        self.sim.host(host_name(id), move || {
            // Settings are made when the software first runs, not when the
            // host is registered: other founders may not have hosts yet.
            let slot = Arc::clone(&slot);
            let scenario = scenario.clone();
            let founders = Arc::clone(&founders);
            let seed_docs = seed_docs.clone();
            let fx = Arc::clone(&fx);
            async move {
                let ip = turmoil::lookup(host_name(id));
                let settings = node_settings(&scenario, &fx, id, ip, &founders.lock(), join);
                serve_node(slot, settings, seed_docs, epoch_ms, quic_seed).await
            }
        });
        Ok(())
    }

    fn crash(&mut self, id: u64) {
        if self.crashed.contains(&id) || self.removed.contains(&id) {
            return;
        }
        self.sim.crash(host_name(id));
        let slot = &self.slots[&id];
        *slot.state.lock() = None;
        slot.storage.crash();
        self.crashed.insert(id);
    }

    fn restart(&mut self, id: u64) {
        if !self.crashed.remove(&id) {
            return;
        }
        *self.slots[&id].incarnation.lock() += 1;
        self.sim.bounce(host_name(id));
    }

    fn apply(&mut self, kind: &FaultKind) -> anyhow::Result<()> {
        match kind {
            FaultKind::Partition { groups, regions } => {
                let groups = if *regions {
                    self.groups_by_region()
                } else {
                    groups.clone()
                };
                for (i, g) in groups.iter().enumerate() {
                    for h in &groups[i + 1..] {
                        for &a in g {
                            for &b in h {
                                self.cut(a, b);
                                self.cut(b, a);
                            }
                        }
                    }
                }
                self.fault(format!("partition {groups:?}"));
            }
            FaultKind::Ring => {
                let ids = self.all_ids();
                for (i, &a) in ids.iter().enumerate() {
                    let b = ids[(i + 1) % ids.len()];
                    self.cut(a, b);
                    self.cut(b, a);
                }
                self.fault("ring".into());
            }
            FaultKind::OneWay { from, to } => {
                for &a in from {
                    for &b in to {
                        self.cut(a, b);
                    }
                }
                self.fault(format!("one_way {from:?} -> {to:?}"));
            }
            FaultKind::Hold { groups } => {
                for (i, g) in groups.iter().enumerate() {
                    for h in &groups[i + 1..] {
                        for &a in g {
                            for &b in h {
                                self.sim.hold(host_name(a), host_name(b));
                                self.held.insert((a, b));
                            }
                        }
                    }
                }
                self.fault(format!("hold {groups:?}"));
            }
            FaultKind::Release => {
                for (a, b) in std::mem::take(&mut self.held) {
                    self.sim.release(host_name(a), host_name(b));
                }
                self.fault("release".into());
            }
            FaultKind::Loss { from, to, rate } => {
                for &a in from {
                    for &b in to {
                        if a != b {
                            self.sim
                                .set_link_fail_rate(host_name(a), host_name(b), *rate);
                        }
                    }
                }
                self.fault(format!("loss {from:?} <-> {to:?} {rate}"));
            }
            FaultKind::Latency { nodes, ms } => {
                for &a in nodes {
                    for b in self.all_ids() {
                        if a != b {
                            self.sim.set_link_latency(
                                host_name(a),
                                host_name(b),
                                Duration::from_millis(*ms),
                            );
                        }
                    }
                }
                self.fault(format!("latency {nodes:?} {ms} ms"));
            }
            FaultKind::HealAll => {
                self.heal_all();
                self.fault("heal_all".into());
            }
            FaultKind::Crash { target } => {
                if let Some(id) = self.resolve(target) {
                    self.crash(id);
                    self.fault(format!("crash {id}"));
                }
            }
            FaultKind::Restart { target } => {
                let id = match target {
                    Target::Node(n) => Some(*n),
                    _ => self.crashed.iter().next().copied(),
                };
                if let Some(id) = id {
                    self.restart(id);
                    self.fault(format!("restart {id}"));
                }
            }
            FaultKind::Skew { target, ms } => {
                if let Some(id) = self.resolve(target) {
                    self.slots[&id].skew_ms.store(*ms, Ordering::Relaxed);
                    self.max_skew_ms = self.max_skew_ms.max(ms.unsigned_abs());
                    self.fault(format!("skew {id} {ms} ms"));
                }
            }
            FaultKind::AddNode { id } => {
                let via = self
                    .leader()
                    .or_else(|| self.live().into_iter().next())
                    .context("no live node to join through")?;
                let ip = self.sim.lookup(host_name(via));
                self.register_host(*id, Some(SocketAddr::new(ip, RAFT_PORT)))?;
                self.fault(format!("add_node {id} via {via}"));
            }
            FaultKind::RemoveNode { target } => {
                if let Some(id) = self.resolve(target) {
                    // Through the leader's consensus handle, as the admin
                    // API's RemoveNode does; the node is then stopped.
                    let leader = self.leader().filter(|l| *l != id);
                    if let Some(l) = leader {
                        self.history.faults.push(FaultEvent {
                            at_ms: self.sim_ms(),
                            what: format!("remove_node {id} requested via {l}"),
                        });
                        let state = self.slots[&l].node();
                        if let Some(state) = state {
                            self.spawn_removal(state, id);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn spawn_removal(&mut self, state: Arc<NodeState>, id: u64) {
        // Removal is a Raft write: run it as a client so that it progresses
        // with simulated time; the node is stopped once it is out.
        let done = Arc::new(Mutex::new(false));
        let flag = Arc::clone(&done);
        self.sim.client(format!("remove-{id}"), async move {
            let ok = state.consensus.remove_node(id).await.is_ok();
            *flag.lock() = ok;
            Ok(())
        });
        self.pending_removals.push((id, done, None));
    }
}

fn lic_of(license: &str) -> Option<Lic> {
    match license {
        "sim-soft" => Some(Lic::Soft),
        "sim-strict" => Some(Lic::Strict),
        "sim-metered" => Some(Lic::Metered),
        "sim-seats" => Some(Lic::Seats),
        _ => None,
    }
}

/// The window id (its reset time, ms) of a monthly counter epoch.
fn window_id(epoch: u64) -> i64 {
    tollgate_quota::usage::Window::Month
        .bounds(epoch)
        .1
        .unwrap_or(0)
}

/// Every usage counter a node holds, by encoded key.
fn usage_of(state: &NodeState) -> BTreeMap<Vec<u8>, tollgate_quota::counter::Counter> {
    state.with_usage(|u| {
        u.counters()
            .map(|(k, c)| (k.to_bytes(), c.clone()))
            .collect()
    })
}

/// Runs `scenario` with `opts.seed` and returns what happened.
pub fn run(scenario: &Scenario, opts: &RunOptions) -> anyhow::Result<Run> {
    let seed = opts.seed;
    fixtures()?;
    align_task_ids()?;
    // Every random choice on this thread derives from the seed.
    tollgate_quota::hashing::pin_seed(Some(seed));
    tollgate_consensus::runtime::seed_thread_rng(seed);
    set_plant(opts.plant)?;
    let result = run_seeded(scenario, seed);
    set_plant(None)?;
    tollgate_quota::hashing::pin_seed(None);
    tollgate_consensus::runtime::unseed_thread_rng();
    result
}

/// Task ids share one process-wide counter, and a runtime that drops its
/// tasks (a crashed or stopped host) drops them in an order that depends
/// on the ids modulo its shard count (a power of two, 4 for turmoil's
/// current-thread runtimes). That order decides which sockets close first,
/// and so the rest of the run. Spending ids up to a multiple of
/// [`TASK_ID_ALIGN`] before a run gives every run of a seed the same ids
/// modulo any shard count up to it, whatever ran before in the process.
/// It holds as long as no other thread spawns tasks while the run lasts,
/// which is why the runner gives each seed a process of its own.
fn align_task_ids() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .context("building the task id runtime")?;
    for _ in 0..TASK_ID_ALIGN {
        let id = rt.spawn(async {}).id();
        // `Id` shows its number; its value is not otherwise public.
        let n: u64 = id
            .to_string()
            .parse()
            .context("reading a task id as a number")?;
        if (n + 1).is_multiple_of(TASK_ID_ALIGN) {
            return Ok(());
        }
    }
    anyhow::bail!("task ids did not come in sequence")
}

/// The largest shard count [`align_task_ids`] makes runs agree on.
const TASK_ID_ALIGN: u64 = 64;

fn set_plant(plant: Option<Plant>) -> anyhow::Result<()> {
    tollgate_quota::planted::set_skip_escrow_check(plant == Some(Plant::SkipEscrowCheck))
        .with_context(|| format!("planting {}", plant.map_or("", Plant::name)))
}

fn run_seeded(scenario: &Scenario, seed: u64) -> anyhow::Result<Run> {
    let epoch_ms = scenario.epoch_ms()?;
    let w = &scenario.workload;
    let load_end = scenario.duration_ms;
    let end = load_end + scenario.settle_ms;
    let mut builder = turmoil::Builder::new();
    builder
        .rng_seed(seed)
        .epoch(UNIX_EPOCH + Duration::from_millis(u64::try_from(epoch_ms).unwrap_or(0)))
        .simulation_duration(Duration::from_millis(end + 60_000))
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_millis(scenario.latency_ms.min))
        .max_message_latency(Duration::from_millis(scenario.latency_ms.max))
        .repair_rate(0.5)
        .enable_random_order();
    let sim = builder.build();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_f417);

    let all_ids = scenario.all_node_ids();
    let slots: BTreeMap<u64, Arc<Slot>> = all_ids
        .iter()
        .map(|&id| {
            (
                id,
                Arc::new(Slot {
                    id,
                    storage: Arc::new(MemStorage::new()),
                    skew_ms: Arc::new(AtomicI64::new(0)),
                    state: Mutex::new(None),
                    incarnation: Mutex::new(0),
                    failure: Mutex::new(None),
                }),
            )
        })
        .collect();

    // Resolve the schedule: ranges drawn from the seed, then time order.
    let mut schedule: Vec<(u64, FaultKind)> = scenario
        .faults
        .iter()
        .map(|f| {
            let t = match f.at_ms {
                At::Exact(t) => t,
                At::Range([lo, hi]) => rng.gen_range(lo..=hi),
            };
            (t, f.kind.clone())
        })
        .collect();
    schedule.sort_by_key(|(t, _)| *t);

    let mut d = Driver {
        scenario,
        sim,
        slots,
        history: History::default(),
        cuts: Cuts::default(),
        held: BTreeSet::new(),
        crashed: BTreeSet::new(),
        removed: BTreeSet::new(),
        rng,
        max_components: 1,
        max_skew_ms: 0,
        seed,
        epoch_ms,
        founders: Arc::new(Mutex::new(Vec::new())),
        seed_docs: licenses::seed_documents(w),
        pending_removals: Vec::new(),
    };
    // Founders first (their addresses are needed by each other's settings).
    let founders: Vec<u64> = (1..=scenario.nodes).collect();
    // Hosts must exist for DNS before any starts; register them, then
    // resolve their addresses.
    for &id in &founders {
        d.register_host(id, None)?;
    }
    *d.founders.lock() = founders
        .iter()
        .map(|&id| (id, d.sim.lookup(host_name(id))))
        .collect();

    let calls: Calls = Arc::new(Mutex::new(Vec::new()));
    let weights = [
        w.mix.soft,
        w.mix.strict,
        w.mix.report,
        w.mix.seat,
        w.mix.rate,
    ];
    for k in 1..=w.clients {
        let ctx = ClientCtx {
            name: format!("c{k}"),
            nodes: founders.clone(),
            home: usize::try_from(k - 1).unwrap_or(0),
            calls: Arc::clone(&calls),
            stop_at_ms: load_end,
            think_ms: w.think_ms,
            weights,
            rng: StdRng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(k)),
        };
        d.sim.client(format!("c{k}"), async move {
            tokio::time::sleep(Duration::from_millis(WARMUP_MS)).await;
            edge_client(ctx).await
        });
    }
    if w.admin_every_ms > 0 {
        let calls = Arc::clone(&calls);
        let nodes = founders.clone();
        let every = w.admin_every_ms;
        let rng = StdRng::seed_from_u64(seed.wrapping_mul(37).wrapping_add(1));
        d.sim
            .client("admin", admin_client(nodes, calls, every, load_end, rng));
    }

    let mut next_fault = 0usize;
    let mut healed_at: Option<u64> = None;
    let mut probe_started = false;
    let mut converged_at: Option<u64> = None;
    let mut serving_at: Option<u64> = None;
    let mut last_sample = 0u64;
    loop {
        let now = d.sim_ms();
        if now >= end {
            break;
        }
        while next_fault < schedule.len() && schedule[next_fault].0 <= now {
            let kind = schedule[next_fault].1.clone();
            next_fault += 1;
            d.apply(&kind)?;
            let live = d.all_ids().into_iter().collect();
            d.max_components = d.max_components.max(d.cuts.components(&live));
        }
        // Removals that committed: stop the node as soon as it reports
        // its drain over, as an operator's script waiting on /v1/status
        // would, or at the bound.
        let mut i = 0;
        while i < d.pending_removals.len() {
            let committed = *d.pending_removals[i].1.lock();
            if committed && d.pending_removals[i].2.is_none() {
                d.pending_removals[i].2 = Some(now + REMOVAL_STOP_BOUND_MS);
            }
            let id = d.pending_removals[i].0;
            let drained = committed
                && d.slots[&id]
                    .node()
                    .is_some_and(|s| s.drain.phase().is_finished());
            if drained || d.pending_removals[i].2.is_some_and(|t| now >= t) {
                let (id, _, _) = d.pending_removals.remove(i);
                if !d.crashed.contains(&id) {
                    d.sim.crash(host_name(id));
                }
                *d.slots[&id].state.lock() = None;
                d.removed.insert(id);
                let how = if drained {
                    "drained"
                } else {
                    "stop bound reached"
                };
                d.fault(format!("removed {id} ({how})"));
            } else {
                i += 1;
            }
        }
        if now >= load_end && healed_at.is_none() {
            d.heal_all();
            d.fault("final heal".into());
            let crashed: Vec<u64> = d.crashed.iter().copied().collect();
            for id in crashed {
                d.restart(id);
                d.fault(format!("restart {id}"));
            }
            healed_at = Some(now);
        }
        if let Some(h) = healed_at
            && !probe_started
        {
            probe_started = true;
            let nodes: Vec<u64> = d
                .slots
                .keys()
                .copied()
                .filter(|id| !d.removed.contains(id))
                .collect();
            let calls = Arc::clone(&calls);
            d.sim.client("probe", probe_client(nodes, calls, h, end));
        }
        if now >= last_sample + SAMPLE_EVERY_MS {
            last_sample = now;
            sample(&mut d, now);
            if healed_at.is_some() && serving_at.is_none() && all_serving(&d) {
                serving_at = Some(now);
            }
            if let Some(h) = healed_at
                && converged_at.is_none()
                && now >= h
                && all_agree(&d)
            {
                converged_at = Some(now);
            }
        }
        if let Err(e) = d.sim.step() {
            let failures: Vec<String> = d
                .slots
                .values()
                .filter_map(|s| s.failure.lock().clone())
                .collect();
            if failures.is_empty() {
                return Err(anyhow::anyhow!("simulation failed: {e}"));
            }
            return finish(d, calls, healed_at, serving_at, converged_at, failures);
        }
    }
    finish(d, calls, healed_at, serving_at, converged_at, Vec::new())
}

/// Whether every node that should be live runs with its gossip started.
fn all_serving(d: &Driver<'_>) -> bool {
    d.slots
        .iter()
        .filter(|(id, _)| !d.removed.contains(id))
        .all(|(_, slot)| slot.node().is_some_and(|s| s.gossip.get().is_some()))
}

fn all_agree(d: &Driver<'_>) -> bool {
    let live = d.live();
    let expected: BTreeSet<u64> = d
        .slots
        .keys()
        .copied()
        .filter(|id| !d.removed.contains(id))
        .collect();
    if live != expected {
        return false;
    }
    let mut first: Option<BTreeMap<Vec<u8>, tollgate_quota::counter::Counter>> = None;
    for id in &live {
        let Some(state) = d.slots[id].node() else {
            return false;
        };
        let u = usage_of(&state);
        match &first {
            None => first = Some(u),
            Some(f) if *f == u => {}
            Some(_) => return false,
        }
    }
    true
}

fn sample(d: &mut Driver<'_>, now: u64) {
    for (id, slot) in &d.slots {
        let Some(state) = slot.node() else {
            continue;
        };
        let mut strict: BTreeMap<i64, u64> = BTreeMap::new();
        state.with_usage(|u| {
            for (k, c) in u.counters() {
                if k.license == "sim-strict" {
                    let e = strict.entry(window_id(k.epoch)).or_default();
                    *e = (*e).max(c.value());
                }
            }
        });
        d.history.samples.push(Sample {
            at_ms: now,
            node: *id,
            incarnation: *slot.incarnation.lock(),
            config_version: state.config().version,
            strict_used: strict.into_iter().collect(),
        });
    }
}

fn finish(
    d: Driver<'_>,
    calls: Calls,
    healed_at: Option<u64>,
    serving_at: Option<u64>,
    converged_at: Option<u64>,
    failures: Vec<String>,
) -> anyhow::Result<Run> {
    let live = d.live();
    let mut final_usage: BTreeMap<(Lic, i64), u64> = BTreeMap::new();
    let mut final_configs = BTreeMap::new();
    let mut audit = BTreeMap::new();
    for id in &live {
        let Some(state) = d.slots[id].node() else {
            continue;
        };
        audit.insert(*id, verify_audit(&state));
        if final_usage.is_empty() {
            state.with_usage(|u| {
                for (k, c) in u.counters() {
                    if let Some(lic) = lic_of(&k.license) {
                        *final_usage.entry((lic, window_id(k.epoch))).or_default() += c.value();
                    }
                }
            });
        }
        let config = state.config();
        final_configs.insert(
            *id,
            FinalConfig {
                version: config.version,
                churn_versions: config
                    .license_history(CHURN_ID)
                    .iter()
                    .map(|r| r.version)
                    .collect(),
            },
        );
    }
    if std::env::var_os("TOLLGATE_SIM_DEBUG").is_some() {
        for (id, slot) in &d.slots {
            let Some(state) = slot.node() else {
                eprintln!("node {id}: down");
                continue;
            };
            let m = state.consensus.metrics();
            eprintln!(
                "node {id}: config v{} leader {:?} term {} applied {:?} gossip {}",
                state.config().version,
                m.leader,
                m.term,
                m.last_log_index,
                state
                    .gossip
                    .get()
                    .map(|g| g.status_json(state.now_ms()).to_string())
                    .unwrap_or_default()
            );
            for (k, c) in usage_of(&state) {
                eprintln!("  {} = {} {:?}", String::from_utf8_lossy(&k), c.value(), c);
            }
        }
    }
    let mut history = d.history;
    history.calls = std::mem::take(&mut *calls.lock());
    let mut node_failures = failures;
    for s in d.slots.values() {
        if let Some(f) = s.failure.lock().clone()
            && !node_failures.contains(&f)
        {
            node_failures.push(f);
        }
    }
    Ok(Run {
        scenario: d.scenario.clone(),
        seed: d.seed,
        history,
        healed_at_ms: healed_at.unwrap_or(d.scenario.duration_ms),
        serving_at_ms: serving_at.or(healed_at).unwrap_or(d.scenario.duration_ms),
        converged_at_ms: converged_at,
        final_usage,
        final_configs,
        max_components: d.max_components,
        max_skew_ms: d.max_skew_ms,
        node_failures,
        live_nodes: live,
        removed: d.removed.clone(),
        audit,
    })
}

/// Verifies a node's audit log on its in-memory storage (crashes included)
/// against the keys its config registered for it.
fn verify_audit(state: &NodeState) -> Result<u64, String> {
    use tollgate_node::audit::verify::{trusted_keys_for, verify};
    let store = state
        .audit
        .store()
        .ok_or_else(|| "the audit trail is off".to_string())?;
    let config = state.config();
    if config.node_keys(state.node_id).is_empty() {
        return Err("no audit key registered for this node".into());
    }
    let trusted = trusted_keys_for(Some(&config), Some(state.node_id), Vec::new());
    let report = verify(store, &trusted).map_err(|e| e.to_string())?;
    match report.broken {
        None => Ok(report.n_records),
        Some(b) => Err(format!("{:?} {}: {}", b.part, b.seq, b.reason)),
    }
}
