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
}

impl TargetArgs {
    fn target(&self) -> Target {
        Target {
            addr: self.addr.clone(),
            token: self.token.clone(),
            data_dir: self.cluster_dir.clone(),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run one node from a settings file.
    Serve(ServeArgs),
    /// Start the embedded default: a local node with the demo licenses.
    Up {
        /// Where state lives; a second `up` on the same dir keeps it.
        #[arg(long, default_value = "tollgate-data")]
        data_dir: PathBuf,
    },
    /// Apply, read, list and revoke licenses; issue keys.
    License {
        #[command(subcommand)]
        command: LicenseCommand,
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
}

#[derive(Subcommand)]
enum LicenseCommand {
    /// Apply a YAML/JSON file of Model and License documents.
    Apply {
        /// The file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Why (kept with the change).
        #[arg(long, default_value = "")]
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
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Issue a new API key for a license; the key is shown once.
    Key {
        /// License id.
        id: String,
        /// A name for the key.
        #[arg(long, default_value = "")]
        name: String,
        /// Why.
        #[arg(long, default_value = "")]
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
        })
    }
}

#[derive(Args)]
struct BenchArgs {
    /// gRPC address of the node.
    #[arg(long, env = "TOLLGATE_ADDR")]
    addr: String,
    /// Offered requests per second.
    #[arg(long, default_value_t = 10_000)]
    rps: u64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Unmeasured warm-up seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Connections.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
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

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            init_tracing();
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
            let seed = match &s.seed_documents {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?,
                ),
                None => None,
            };
            let node = server::start(s, seed).await?;
            println!(
                "serving: gRPC {} HTTP http://{}",
                node.grpc_addr, node.http_addr
            );
            wait_for_signal().await;
            node.shutdown().await?;
        }
        Command::Up { data_dir } => {
            init_tracing();
            let (node, cluster) = up::start(&data_dir).await?;
            let shown = data_dir.canonicalize().unwrap_or(data_dir);
            println!("{}", up::banner(&cluster, &shown));
            wait_for_signal().await;
            println!("stopping...");
            node.shutdown().await?;
            println!("stopped cleanly");
        }
        Command::License { command, target } => license(command, &target.target()).await?,
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
        Command::Bench(args) => {
            let cfg = BenchConfig {
                addr: args.addr,
                rps: args.rps,
                duration: Duration::from_secs_f64(args.duration),
                warmup: Duration::from_secs_f64(args.warmup),
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
            let report = bench::run(cfg).await?;
            println!("{}", serde_json::to_string(&report)?);
        }
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
    }
    Ok(())
}
