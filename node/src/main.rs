//! `tollgate`: run a node (`serve`, `up`), administer licenses, send checks
//! and benchmark a node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tollgate_node::bench::{self, BenchConfig};
use tollgate_node::client::{self, Target, authed, status_err};
use tollgate_node::server;
use tollgate_node::settings::NodeSettings;
use tollgate_node::telemetry::{self, LogFormat};
use tollgate_node::up;
use tollgate_proto::v1 as pb;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "License enforcement for ML models at the edge"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How `serve` and `up` write logs to stderr: text, or JSON (one object
    /// per line). `RUST_LOG` filters either.
    #[arg(long, env = "TOLLGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Export tracing spans of `serve` and `up` over OTLP/gRPC to this
    /// collector (e.g. http://127.0.0.1:4317). Needs a build with the `otlp`
    /// feature.
    #[arg(long, env = "TOLLGATE_OTLP_ENDPOINT", global = true)]
    otlp_endpoint: Option<String>,
}

#[derive(Args, Clone)]
struct TargetArgs {
    /// gRPC address of a node (host:port).
    #[arg(long, env = "TOLLGATE_ADDR", global = true)]
    addr: Option<String>,
    /// Admin bearer token.
    #[arg(long, env = "TOLLGATE_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Data dir whose cluster.json names the node and token file when
    /// --addr or --token are not given.
    #[arg(long = "cluster-dir", default_value = client::DEFAULT_DATA_DIR, global = true)]
    cluster_dir: PathBuf,
    /// HTTP address of a node (host:port or URL), for the commands that
    /// speak HTTP (exception, escalation).
    #[arg(long, env = "TOLLGATE_HTTP", global = true)]
    http: Option<String>,
}

impl TargetArgs {
    fn target(&self) -> Target {
        Target {
            addr: self.addr.clone(),
            token: self.token.clone(),
            data_dir: self.cluster_dir.clone(),
            http: self.http.clone(),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run one node from a settings file.
    Serve(ServeArgs),
    /// Start the embedded default: a local cluster with the demo licenses.
    Up {
        /// Where state lives; a second `up` on the same dir restarts the
        /// same cluster.
        #[arg(long, default_value = "tollgate-data")]
        data_dir: PathBuf,
        /// How many nodes a new local cluster has (regions local-a, local-b, ...).
        #[arg(long, default_value_t = up::DEFAULT_NODES)]
        nodes: usize,
        /// Accept fault-injection commands on the admin API (tests, chaos
        /// runs, `bench --scenario gossip --heals N`).
        #[arg(long)]
        enable_fault_injection: bool,
        /// Run without the audit trail (`audit.enabled: false`), e.g. to
        /// measure what it costs.
        #[arg(long)]
        no_audit: bool,
    },
    /// Apply, read, list, revoke and roll back licenses; issue and revoke keys.
    License {
        #[command(subcommand)]
        command: LicenseCommand,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Inspect models.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Inspect the Raft cluster and change its membership.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Quota exceptions: list them, ask for one, approve or reject one.
    Exception {
        #[command(subcommand)]
        command: ExceptionCommand,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Escalations opened by quotas with `on_exceed: escalate`.
    Escalation {
        #[command(subcommand)]
        command: EscalationCommand,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Ask a node whether one use is allowed.
    Check {
        #[command(flatten)]
        signals: SignalArgs,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Report usage measured after an inference (tokens, pages, ...).
    Report {
        #[command(flatten)]
        signals: SignalArgs,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Show a node's status as JSON.
    Status {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Open-loop load test of Check; prints one JSON object.
    Bench(BenchArgs),
    /// Certificates for gossip's mutual TLS.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Verify or export a node's audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check a stopped node's audit log: every record intact and chained,
    /// no gaps, every checkpoint signed by the node's key (as registered in
    /// the replicated config). Names the first broken record and exits
    /// non-zero; an intact log prints a summary.
    Verify {
        /// The node's data dir (the one holding db/ and audit.key).
        #[arg(long)]
        data_dir: PathBuf,
        /// The node's signing key file, if not `audit.key` in the data dir.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write audit records as JSON Lines (one record per line, each
    /// checkpoint after the record it signs). From a running node over
    /// HTTP (auditor token), or from a stopped node's --data-dir.
    Export {
        /// Only records at or after this time: RFC 3339 or unix ms.
        #[arg(long)]
        since: Option<String>,
        /// At most this many records.
        #[arg(long)]
        limit: Option<usize>,
        /// Read a stopped node's data dir instead of asking a running node.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Base URL of the node's HTTP API; default: the node of
        /// cluster.json named by --node, else its first node.
        #[arg(long, env = "TOLLGATE_HTTP")]
        url: Option<String>,
        /// Which node of cluster.json to export from.
        #[arg(long)]
        node: Option<u64>,
        /// An auditor (or admin) token; default: cluster.json's auditor
        /// token file.
        #[arg(long, env = "TOLLGATE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Data dir whose cluster.json names the nodes and token files.
        #[arg(long = "cluster-dir", default_value = client::DEFAULT_DATA_DIR)]
        cluster_dir: PathBuf,
        /// Write to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a dev CA (or reuse the one in --out) and a certificate and
    /// key per node: ca.pem, ca.key, `node-<id>.pem`, `node-<id>.key`. For
    /// production, point each node's `tls` settings at PEM files from your
    /// own CA instead.
    Init {
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
        /// Node ids 1..=N get certificates.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Settings file (YAML).
    #[arg(long)]
    config: PathBuf,
    /// Override the node id.
    #[arg(long)]
    node_id: Option<u64>,
    /// Override the region.
    #[arg(long)]
    region: Option<String>,
    /// Override the gRPC address.
    #[arg(long)]
    grpc_addr: Option<SocketAddr>,
    /// Override the HTTP address.
    #[arg(long)]
    http_addr: Option<SocketAddr>,
    /// Override the data dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Override the Raft transport address.
    #[arg(long)]
    raft_addr: Option<SocketAddr>,
    /// Join an existing cluster through any member's Raft address (used
    /// when the data dir is new; the node is added as a learner, then
    /// promoted to voter once it has caught up).
    #[arg(long)]
    join: Option<String>,
    /// Override the gossip (QUIC/UDP) address.
    #[arg(long)]
    gossip_addr: Option<SocketAddr>,
    /// Accept fault-injection commands (drop gossip to and from peers) on
    /// the admin API, for tests and chaos runs.
    #[arg(long)]
    enable_fault_injection: bool,
}

#[derive(Subcommand)]
enum ExceptionCommand {
    /// Every exception: pending, active, expired, rejected.
    List {
        /// Only this license's.
        #[arg(long)]
        license: Option<String>,
        /// Only those in this state (pending, active, expired, rejected).
        #[arg(long)]
        state: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Ask for an exception (as an administrator; edge callers POST
    /// /v1/exceptions with their API key).
    Request {
        /// License id.
        #[arg(long)]
        license: String,
        /// Quota id.
        #[arg(long)]
        quota: String,
        /// Units to raise the limit by.
        #[arg(long)]
        amount: u64,
        /// Why.
        #[arg(long)]
        reason: String,
        /// Until when it is wanted: RFC 3339, or a duration from now (7d).
        #[arg(long)]
        until: Option<String>,
    },
    /// Approve a pending exception: its quota's limit is raised by its
    /// amount until T.
    Approve {
        /// Exception id (exc-N).
        id: String,
        /// When it ends: RFC 3339 (2026-07-01T00:00:00Z), or a duration
        /// from now (90s, 12h, 7d).
        #[arg(long)]
        until: String,
        /// Why (kept in the license history).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Reject a pending exception.
    Reject {
        /// Exception id (exc-N).
        id: String,
        /// Why (kept in the license history).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum EscalationCommand {
    /// Every escalation, newest first.
    List {
        /// Only this license's.
        #[arg(long)]
        license: Option<String>,
        /// Only those with this status (open, acknowledged, resolved).
        #[arg(long)]
        status: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Mark an escalation acknowledged.
    Ack {
        /// Escalation id (esc-...).
        id: String,
        /// A note (kept in the license history).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Mark an escalation resolved.
    Resolve {
        /// Escalation id (esc-...).
        id: String,
        /// What was done (kept with the record and in the license history).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Every recorded change of a model: version, actor, time, reason, diff.
    History {
        /// Model id.
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Every member: leader, term, applied index, lag, region.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a node from the Raft membership.
    RemoveNode {
        /// Node id.
        id: u64,
        /// Why (logged).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum LicenseCommand {
    /// Apply a YAML/JSON file of Model, Dataset and License documents.
    Apply {
        /// The file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Why (kept with the change in the license history).
        #[arg(long)]
        reason: String,
    },
    /// Print one license as JSON (keys appear only as hashes).
    Get {
        /// License id.
        id: String,
    },
    /// List licenses.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a license.
    Revoke {
        /// License id.
        id: String,
        /// Why (kept with the change).
        #[arg(long)]
        reason: String,
    },
    /// Issue a new API key for a license; the key is shown once.
    Key {
        /// License id.
        id: String,
        /// A name for the key.
        #[arg(long, default_value = "")]
        name: String,
        /// Why (kept with the change).
        #[arg(long)]
        reason: String,
    },
    /// Revoke one key of a license (by its name or hash prefix).
    RevokeKey {
        /// License id.
        id: String,
        /// The key's name, or at least 8 leading hex characters of its hash.
        key_id: String,
        /// Why (kept with the change).
        #[arg(long)]
        reason: String,
    },
    /// Every recorded change of a license: version, actor, time, reason, diff.
    History {
        /// License id.
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write the license as it was at config version VERSION back as a new
    /// version (history is kept).
    Rollback {
        /// License id.
        id: String,
        /// The config version to go back to (see `license history`).
        #[arg(long = "to")]
        to_version: u64,
        /// Why (kept with the change).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Args)]
struct SignalArgs {
    /// The API key.
    #[arg(long)]
    key: String,
    /// Model id.
    #[arg(long)]
    model: String,
    /// Model version.
    #[arg(long = "version")]
    model_version: String,
    /// Feature used.
    #[arg(long)]
    feature: Option<String>,
    /// Environment: production, staging, development, experiment.
    #[arg(long)]
    environment: Option<String>,
    /// Region of the caller.
    #[arg(long)]
    region: Option<String>,
    /// Hardware (device) id.
    #[arg(long)]
    hardware_id: Option<String>,
    /// User or service id.
    #[arg(long)]
    subject: Option<String>,
    /// Meter as metric=quantity; repeatable. Defaults to inferences=1.
    #[arg(long = "meter")]
    meters: Vec<String>,
    /// A dataset release feeding the use, as dataset@release; repeatable.
    #[arg(long = "lineage")]
    lineage: Vec<String>,
    /// Caller's request id.
    #[arg(long)]
    request_id: Option<String>,
    /// Decide without consuming.
    #[arg(long)]
    dry_run: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

impl SignalArgs {
    fn request(&self) -> anyhow::Result<pb::CheckRequest> {
        let mut meters = Vec::new();
        for m in &self.meters {
            let (metric, qty) = m
                .split_once('=')
                .with_context(|| format!("--meter {m}: expected metric=quantity"))?;
            let quantity: u64 = qty
                .parse()
                .with_context(|| format!("--meter {m}: quantity is not a number"))?;
            meters.push(pb::Meter {
                metric: metric.to_string(),
                quantity,
            });
        }
        if meters.is_empty() {
            meters.push(pb::Meter {
                metric: "inferences".into(),
                quantity: 1,
            });
        }
        let mut lineage = Vec::with_capacity(self.lineage.len());
        for entry in &self.lineage {
            let (dataset, release) = entry
                .split_once('@')
                .with_context(|| format!("--lineage {entry}: expected dataset@release"))?;
            lineage.push(pb::LineageEntry {
                dataset: dataset.to_string(),
                release: release.to_string(),
            });
        }
        Ok(pb::CheckRequest {
            key: self.key.clone(),
            subject: self.subject.clone().unwrap_or_default(),
            model: self.model.clone(),
            model_version: self.model_version.clone(),
            feature: self.feature.clone().unwrap_or_default(),
            environment: self.environment.clone().unwrap_or_default(),
            region: self.region.clone().unwrap_or_default(),
            hardware_id: self.hardware_id.clone().unwrap_or_default(),
            meters,
            request_id: self.request_id.clone().unwrap_or_default(),
            dry_run: self.dry_run,
            input_hash: String::new(),
            output_hash: String::new(),
            lineage,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// Open-loop Check load against one node.
    Load,
    /// Issue a key, revoke it on the leader, time until every node denies it.
    Revocation,
    /// Steady Check load on every node of cluster.json; gossip bytes on the
    /// wire per counted increment.
    Gossip,
}

#[derive(Args)]
struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value = "load")]
    scenario: Scenario,
    /// gRPC address of the node (load); default: the first node of cluster.json.
    #[arg(long, env = "TOLLGATE_ADDR")]
    addr: Option<String>,
    /// Admin token (revocation); default: cluster.json's token file.
    #[arg(long, env = "TOLLGATE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Data dir whose cluster.json names the nodes and the token file.
    #[arg(long = "cluster-dir", default_value = client::DEFAULT_DATA_DIR)]
    cluster_dir: PathBuf,
    /// Revocations to measure (revocation).
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// License the revocation scenario issues its keys on (the default one
    /// is created if missing).
    #[arg(long, default_value = tollgate_node::revocation_bench::BENCH_LICENSE)]
    license: String,
    /// Offered requests per second.
    #[arg(long, default_value_t = 10_000)]
    rps: u64,
    /// Checks per second offered to every node (gossip).
    #[arg(long, default_value_t = 400)]
    rate_per_node: u64,
    /// Partition-and-heal rounds to time convergence over (gossip; needs
    /// nodes started with --enable-fault-injection).
    #[arg(long, default_value_t = 0)]
    heals: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Unmeasured warm-up seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Connections (to each node).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Compare with a second node (load): the offered load alternates
    /// between the two every --slice seconds, so both are measured on the
    /// same machine at the same time, and the report gives each one's
    /// quantiles and their ratios (first node over this one).
    #[arg(long, env = "TOLLGATE_COMPARE_ADDR")]
    compare_addr: Option<String>,
    /// Data dir whose cluster.json names the node to compare with (its
    /// first node), when --compare-addr is not given.
    #[arg(long = "compare-cluster-dir")]
    compare_cluster_dir: Option<PathBuf>,
    /// Seconds per slice of a comparison.
    #[arg(long, default_value_t = 1.0)]
    slice: f64,
    /// Key to check with.
    #[arg(long, default_value = "tg_demo_key")]
    key: String,
    /// Send dry runs (nothing consumed).
    #[arg(long)]
    dry_run: bool,
    /// Print JSON (the only output format; kept for scripts).
    #[arg(long)]
    json: bool,
}

/// SIGINT / SIGTERM, registered before a node starts: a signal that
/// arrives while nodes are still starting must stop them cleanly, not kill
/// the process with the default action.
struct StopSignals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
                term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn wait(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let log_format = cli.log_format;
    let otlp_endpoint = cli.otlp_endpoint;
    match cli.command {
        Command::Serve(args) => {
            let telemetry = telemetry::init(log_format, otlp_endpoint.as_deref())?;
            let mut signals = StopSignals::install()?;
            let mut s = NodeSettings::from_file(&args.config)?;
            if let Some(v) = args.node_id {
                s.node_id = v;
            }
            if let Some(v) = args.region {
                s.region = v;
            }
            if let Some(v) = args.grpc_addr {
                s.grpc_addr = v;
            }
            if let Some(v) = args.http_addr {
                s.http_addr = v;
            }
            if let Some(v) = args.data_dir {
                s.data_dir = v;
            }
            if let Some(v) = args.raft_addr {
                s.raft_addr = Some(v);
            }
            if let Some(v) = args.join {
                s.join = Some(v);
            }
            if let Some(v) = args.gossip_addr {
                s.gossip_addr = Some(v);
            }
            if args.enable_fault_injection {
                s.enable_fault_injection = true;
            }
            let seed = match &s.seed_documents {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?,
                ),
                None => None,
            };
            let node = server::start(s, seed).await?;
            let gossip = node
                .state
                .gossip
                .get()
                .map(|g| g.local_addr().to_string())
                .unwrap_or_default();
            println!(
                "serving: gRPC {} HTTP http://{} Raft {} gossip {gossip}",
                node.grpc_addr, node.http_addr, node.raft_addr
            );
            signals.wait().await;
            let stopped = node.shutdown().await;
            telemetry.shutdown().await;
            stopped?;
        }
        Command::Up {
            data_dir,
            nodes,
            enable_fault_injection,
            no_audit,
        } => {
            let telemetry = telemetry::init(log_format, otlp_endpoint.as_deref())?;
            let mut signals = StopSignals::install()?;
            let options = up::UpOptions {
                enable_fault_injection,
                audit: !no_audit,
            };
            let (nodes, cluster) = up::start_with_options(&data_dir, nodes, options).await?;
            let shown = data_dir.canonicalize().unwrap_or(data_dir);
            println!("{}", up::banner(&cluster, &shown));
            signals.wait().await;
            println!("stopping...");
            let mut stopping = tokio::task::JoinSet::new();
            for node in nodes {
                stopping.spawn(node.shutdown());
            }
            let mut failed = None;
            while let Some(r) = stopping.join_next().await {
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => failed = failed.or(Some(e)),
                    Err(e) => failed = failed.or(Some(anyhow::anyhow!("shutdown panicked: {e}"))),
                }
            }
            telemetry.shutdown().await;
            if let Some(e) = failed {
                return Err(e.context("stopping nodes"));
            }
            println!("stopped cleanly");
        }
        Command::License { command, target } => license(command, &target.target()).await?,
        Command::Cluster { command, target } => cluster(command, &target.target()).await?,
        Command::Exception { command, target } => exception(command, &target.target()).await?,
        Command::Escalation { command, target } => escalation(command, &target.target()).await?,
        Command::Model {
            command: ModelCommand::History { id, json },
            target,
        } => {
            let (mut admin, h) = target.target().admin().await?;
            let r = admin
                .model_history(authed(pb::ModelHistoryRequest { id }, &h))
                .await
                .map_err(status_err)?;
            print_history(&r.into_inner(), json)?;
        }
        Command::Check { signals, target } => {
            let d = client::check(&target.target(), signals.request()?, false).await?;
            print_decision(&d, signals.json)?;
        }
        Command::Report { signals, target } => {
            let d = client::check(&target.target(), signals.request()?, true).await?;
            print_decision(&d, signals.json)?;
        }
        Command::Status { target } => {
            let (mut admin, h) = target.target().admin().await?;
            let s = admin
                .status(authed(pb::StatusRequest {}, &h))
                .await
                .map_err(status_err)?
                .into_inner();
            let v: serde_json::Value = serde_json::from_str(&s.status_json)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Command::Audit { command } => audit(command).await?,
        Command::Certs {
            command: CertsCommand::Init { out, nodes },
        } => {
            anyhow::ensure!(nodes >= 1, "--nodes must be at least 1");
            let ids: Vec<u64> = (1..=nodes).collect();
            tollgate_node::certs::init(&out, &ids)?;
            println!(
                "certificates for nodes 1..={nodes} in {} (CA: ca.pem; keep ca.key private)",
                out.display()
            );
        }
        Command::Bench(args) if args.scenario == Scenario::Gossip => {
            let opts = tollgate_node::gossip_bench::GossipBenchOptions {
                duration_secs: args.duration.ceil().max(1.0) as u64,
                warmup_secs: args.warmup.ceil() as u64,
                rate_per_node: args.rate_per_node,
                license_key: args.key.clone(),
                heals: args.heals,
                ..Default::default()
            };
            let report =
                tollgate_node::gossip_bench::run(&args.cluster_dir.join("cluster.json"), opts)
                    .await?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Command::Bench(args) if args.scenario == Scenario::Revocation => {
            let target = Target {
                addr: args.addr.clone(),
                token: args.token.clone(),
                data_dir: args.cluster_dir.clone(),
                http: None,
            };
            let report =
                tollgate_node::revocation_bench::run(&target, &args.license, args.count).await?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Command::Bench(args) => {
            let addr = match args.addr {
                Some(a) => a,
                None => first_node(args.cluster_dir).context("no node to benchmark")?,
            };
            let compare_addr = match (args.compare_addr, args.compare_cluster_dir) {
                (Some(a), _) => Some(a),
                (None, Some(dir)) => Some(first_node(dir).context("no node to compare with")?),
                (None, None) => None,
            };
            let seconds = |flag: &str, s: f64| {
                Duration::try_from_secs_f64(s).map_err(|_| {
                    anyhow::anyhow!("{flag} must be a non-negative number of seconds, not {s}")
                })
            };
            let cfg = BenchConfig {
                addr,
                compare_addr,
                slice: seconds("--slice", args.slice)?,
                rps: args.rps,
                duration: seconds("--duration", args.duration)?,
                warmup: seconds("--warmup", args.warmup)?,
                concurrency: args.concurrency,
                request: pb::CheckRequest {
                    key: args.key,
                    model: "demo-classifier".into(),
                    model_version: "2.1.0".into(),
                    environment: "production".into(),
                    region: "local-a".into(),
                    meters: vec![pb::Meter {
                        metric: "inferences".into(),
                        quantity: 1,
                    }],
                    dry_run: args.dry_run,
                    ..Default::default()
                },
            };
            let _ = args.json;
            let json = if cfg.compare_addr.is_some() {
                serde_json::to_string(&bench::run_compare(cfg).await?)?
            } else {
                serde_json::to_string(&bench::run(cfg).await?)?
            };
            println!("{json}");
        }
    }
    Ok(())
}

/// The gRPC address of the first node named by `data_dir`'s cluster.json.
fn first_node(data_dir: PathBuf) -> anyhow::Result<String> {
    let target = Target {
        addr: None,
        token: None,
        data_dir,
        http: None,
    };
    target
        .uris()?
        .into_iter()
        .next()
        .context("cluster.json names no node")
}

/// Prints a license or model history as JSON or as text.
fn print_history(r: &pb::LicenseHistoryResponse, json: bool) -> anyhow::Result<()> {
    let v: serde_json::Value = serde_json::from_str(&r.history_json)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", client::render_history(&v));
    }
    Ok(())
}

fn print_decision(d: &tollgate_node::api::DecisionJson, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(d)?);
    } else {
        print!("{}", client::render_decision(d));
    }
    Ok(())
}

async fn license(cmd: LicenseCommand, target: &Target) -> anyhow::Result<()> {
    let (mut admin, h) = target.admin().await?;
    match cmd {
        LicenseCommand::Apply { file, reason } => {
            let document = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let r = admin
                .apply(authed(pb::ApplyRequest { document, reason }, &h))
                .await
                .map_err(status_err)?
                .into_inner();
            for a in &r.applied {
                println!("applied {} {} at version {}", a.kind, a.id, a.version);
            }
        }
        LicenseCommand::Get { id } => {
            let r = admin
                .get_license(authed(pb::GetLicenseRequest { id }, &h))
                .await
                .map_err(status_err)?;
            println!("{}", r.into_inner().license_json);
        }
        LicenseCommand::List { json } => {
            let r = admin
                .list_licenses(authed(pb::ListLicensesRequest {}, &h))
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                let v: Vec<_> = r
                    .licenses
                    .iter()
                    .map(|l| serde_json::json!({"id": l.id, "customer": l.customer, "tier": l.tier, "status": l.status, "n_keys": l.n_keys, "n_quotas": l.n_quotas}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<20} {:<20} {:<12} {:<10} {:>5} {:>7}",
                    "ID", "CUSTOMER", "TIER", "STATUS", "KEYS", "QUOTAS"
                );
                for l in &r.licenses {
                    println!(
                        "{:<20} {:<20} {:<12} {:<10} {:>5} {:>7}",
                        l.id, l.customer, l.tier, l.status, l.n_keys, l.n_quotas
                    );
                }
                println!("(config version {})", r.version);
            }
        }
        LicenseCommand::Revoke { id, reason } => {
            let r = admin
                .revoke_license(authed(
                    pb::RevokeLicenseRequest {
                        id: id.clone(),
                        reason,
                    },
                    &h,
                ))
                .await
                .map_err(status_err)?;
            println!("revoked {id} at version {}", r.into_inner().version);
        }
        LicenseCommand::Key { id, name, reason } => {
            let r = admin
                .issue_key(authed(
                    pb::IssueKeyRequest {
                        license_id: id.clone(),
                        name,
                        reason,
                    },
                    &h,
                ))
                .await
                .map_err(status_err)?
                .into_inner();
            println!(
                "key {} for license {id} (version {}):\n{}\nStore it now: it is not shown again.",
                r.key_id, r.version, r.key
            );
        }
        LicenseCommand::RevokeKey { id, key_id, reason } => {
            let r = admin
                .revoke_key(authed(
                    pb::RevokeKeyRequest {
                        license_id: id.clone(),
                        key_id: key_id.clone(),
                        reason,
                    },
                    &h,
                ))
                .await
                .map_err(status_err)?;
            println!(
                "revoked key {key_id} of {id} at version {}",
                r.into_inner().version
            );
        }
        LicenseCommand::History { id, json } => {
            let r = admin
                .license_history(authed(pb::LicenseHistoryRequest { id }, &h))
                .await
                .map_err(status_err)?;
            print_history(&r.into_inner(), json)?;
        }
        LicenseCommand::Rollback {
            id,
            to_version,
            reason,
        } => {
            let r = admin
                .rollback_license(authed(
                    pb::RollbackLicenseRequest {
                        id: id.clone(),
                        to_version,
                        reason,
                    },
                    &h,
                ))
                .await
                .map_err(status_err)?;
            println!(
                "rolled {id} back to its version-{to_version} content as version {}",
                r.into_inner().version
            );
        }
    }
    Ok(())
}

async fn audit(cmd: AuditCommand) -> anyhow::Result<()> {
    use std::io::Write;
    use tollgate_node::audit::{export, offline};
    match cmd {
        AuditCommand::Verify {
            data_dir,
            key_file,
            json,
        } => {
            let report = offline::verify_data_dir(&data_dir, key_file.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            if let Some(b) = &report.broken {
                anyhow::bail!("the audit log is broken at record {}", b.seq);
            }
        }
        AuditCommand::Export {
            since,
            limit,
            data_dir,
            url,
            node,
            token,
            cluster_dir,
            out,
        } => {
            let since_ms = since
                .as_deref()
                .map(export::parse_time)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--since: {e}"))?;
            let mut sink: Box<dyn Write> = match &out {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("creating {}", path.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            let n_records = match data_dir {
                Some(dir) => {
                    offline::export_data_dir(&dir, since_ms, limit.map(|l| l as u64), &mut sink)?
                }
                None => {
                    let target = client::AuditTarget::resolve(url, node, token, &cluster_dir)?;
                    client::export_audit(&target, since.as_deref(), limit, &mut sink).await?
                }
            };
            sink.flush()?;
            if out.is_some() {
                eprintln!("exported {n_records} records");
            }
        }
    }
    Ok(())
}

async fn cluster(cmd: ClusterCommand, target: &Target) -> anyhow::Result<()> {
    let (mut admin, h) = target.admin().await?;
    match cmd {
        ClusterCommand::Status { json } => {
            let r = admin
                .cluster_status(authed(pb::ClusterStatusRequest {}, &h))
                .await
                .map_err(status_err)?
                .into_inner();
            let v: serde_json::Value = serde_json::from_str(&r.cluster_json)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", client::render_cluster(&v));
            }
        }
        ClusterCommand::RemoveNode { id, reason } => {
            let r = admin
                .remove_node(authed(
                    pb::RemoveNodeRequest {
                        node_id: id,
                        reason,
                    },
                    &h,
                ))
                .await
                .map_err(status_err)?;
            println!(
                "removed node {id} (membership log index {})",
                r.into_inner().version
            );
        }
    }
    Ok(())
}

/// `?a=b&c=d` from the given pairs (values percent-encoded), or "".
fn query(pairs: &[(&str, Option<&str>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| {
            let v = (*v)?;
            let encoded: String = v
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            Some(format!("{k}={encoded}"))
        })
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// A path segment from an id the user typed: ids are `[a-z0-9._-]`, so
/// anything else is refused rather than sent.
fn id_segment(id: &str) -> anyhow::Result<&str> {
    anyhow::ensure!(
        !id.is_empty()
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
        "{id:?} is not an id"
    );
    Ok(id)
}

async fn exception(cmd: ExceptionCommand, target: &Target) -> anyhow::Result<()> {
    use reqwest::Method;
    match cmd {
        ExceptionCommand::List {
            license,
            state,
            json,
        } => {
            let path = format!(
                "/v1/exceptions{}",
                query(&[("license", license.as_deref()), ("state", state.as_deref())])
            );
            let v = target.http_json(Method::GET, &path, None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", client::render_exceptions(&v));
            }
        }
        ExceptionCommand::Request {
            license,
            quota,
            amount,
            reason,
            until,
        } => {
            let mut body = serde_json::json!({
                "license": license, "quota": quota, "amount": amount, "reason": reason,
            });
            if let Some(u) = until {
                body["requested_until"] = u.into();
            }
            let v = target
                .http_json(Method::POST, "/v1/exceptions", Some(&body))
                .await?;
            println!(
                "requested {} (+{} {}/{}): pending",
                v["id"].as_str().unwrap_or("?"),
                v["amount"],
                v["license"].as_str().unwrap_or("?"),
                v["quota"].as_str().unwrap_or("?")
            );
        }
        ExceptionCommand::Approve { id, until, reason } => {
            let path = format!("/v1/exceptions/{}/approve", id_segment(&id)?);
            let body = serde_json::json!({"until": until, "reason": reason});
            let v = target.http_json(Method::POST, &path, Some(&body)).await?;
            println!(
                "approved {id}: {}/{} +{} until {}",
                v["license"].as_str().unwrap_or("?"),
                v["quota"].as_str().unwrap_or("?"),
                v["amount"],
                v["until"].as_str().unwrap_or("?")
            );
        }
        ExceptionCommand::Reject { id, reason } => {
            let path = format!("/v1/exceptions/{}/reject", id_segment(&id)?);
            let body = serde_json::json!({"reason": reason});
            target.http_json(Method::POST, &path, Some(&body)).await?;
            println!("rejected {id}");
        }
    }
    Ok(())
}

async fn escalation(cmd: EscalationCommand, target: &Target) -> anyhow::Result<()> {
    use reqwest::Method;
    match cmd {
        EscalationCommand::List {
            license,
            status,
            json,
        } => {
            let path = format!(
                "/v1/escalations{}",
                query(&[
                    ("license", license.as_deref()),
                    ("status", status.as_deref())
                ])
            );
            let v = target.http_json(Method::GET, &path, None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", client::render_escalations(&v));
            }
        }
        EscalationCommand::Ack { id, reason } => {
            let path = format!("/v1/escalations/{}/acknowledge", id_segment(&id)?);
            let body = serde_json::json!({"reason": reason});
            target.http_json(Method::POST, &path, Some(&body)).await?;
            println!("acknowledged {id}");
        }
        EscalationCommand::Resolve { id, reason } => {
            let path = format!("/v1/escalations/{}/resolve", id_segment(&id)?);
            let body = serde_json::json!({"reason": reason});
            target.http_json(Method::POST, &path, Some(&body)).await?;
            println!("resolved {id}");
        }
    }
    Ok(())
}
