//! The `hotpot` command: run a dispatcher or a node, control a local cluster, create
//! datasets, and inspect the live cluster.

mod admin;
mod bench_ycsb;
mod cluster;
mod demo;
mod dispatcher;
mod mounts;
mod node;
mod ports;
mod process;
mod signals;
mod size;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// hotpot: distributed shared persistent memory. Datasets are files under a FUSE mount;
/// programs mmap them, and msync(MS_SYNC) or fsync commits: durable in persistent memory,
/// replicated, and coherent on every node.
#[derive(Parser, Debug)]
#[command(name = "hotpot", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The main job in one command: a local cluster, an mmap + msync workload, a SIGKILL and
    /// restart, verification of every committed byte, a report; cleans up after itself.
    Demo(demo::DemoArgs),
    /// Run the dispatcher: namespace, dataset owners, node registry (state in --data).
    Dispatcher(dispatcher::DispatcherArgs),
    /// Run a node: PM pool, page service, FUSE mount.
    Node(node::NodeArgs),
    /// Start, stop, crash and restart a local cluster of real processes.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Create a dataset (a file in a hotpot mount) with a size, mode and replication degree.
    Create(admin::CreateArgs),
    /// Show the nodes of a cluster: liveness, heartbeat age, PM use.
    Status {
        #[command(flatten)]
        target: admin::Target,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks: `hotpot bench ycsb` runs YCSB on hotpot, tmpfs and a FUSE passthrough.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Show a dataset: chunk owners, per-node page states and versions, copies per page.
    Stat {
        /// A file inside a hotpot mount.
        path: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Cluster secret file (default: the `secret` of the cluster directory, if found).
        #[arg(long)]
        secret: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// YCSB workloads A–F on LMDB (write-map) on a 3-node cluster, tmpfs and a FUSE
    /// passthrough; prints ops/s, p99 and ratios; writes reports, a CSV and an SVG chart.
    Ycsb(bench_ycsb::YcsbArgs),
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Start a dispatcher and N nodes in the background (node i mounted at DIR/n<i>/mnt);
    /// returns when every mount answers. Writes DIR/cluster.json.
    Up(cluster::UpArgs),
    /// Stop every process of the cluster and unmount, even after crashes.
    Down {
        #[arg(long)]
        dir: PathBuf,
    },
    /// SIGKILL one node (a crash); its PM file is kept unless --wipe.
    Kill {
        #[arg(long)]
        dir: PathBuf,
        /// Node id.
        #[arg(long)]
        node: u32,
        /// Also delete the node's PM file: the node is lost with its data and
        /// `cluster start-node` brings it back empty.
        #[arg(long)]
        wipe: bool,
    },
    /// Restart a node on its PM file; returns when its mount answers.
    StartNode {
        #[arg(long)]
        dir: PathBuf,
        /// Node id.
        #[arg(long)]
        node: u32,
    },
    /// SIGKILL the dispatcher (a crash); its state directory is kept.
    KillDispatcher {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Restart the dispatcher on its state directory; returns when it listens.
    StartDispatcher {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Test builds only (cargo feature fault-injection): make a running node crash, as
    /// kill -9 would, the next time it reaches a named point (docs/design.md, "Recovery").
    ArmFault {
        #[arg(long)]
        dir: PathBuf,
        /// Node id.
        #[arg(long)]
        node: u32,
        /// Point name, e.g. follower.prepared; panic:<point> makes the thread that reaches it
        /// panic instead (which stops the node: fail-stop); drop:target.deciding makes the
        /// node drop every Decide, as if lost, until another point (e.g. none) is armed.
        #[arg(long)]
        point: String,
    },
}

/// The cluster secret from `--secret FILE`, or none (with a warning).
pub fn load_secret(path: Option<&std::path::Path>) -> anyhow::Result<hotpot_net::Secret> {
    match path {
        Some(path) => hotpot_net::Secret::load(path).map_err(|error| anyhow::anyhow!(error)),
        None => {
            tracing::warn!("no --secret given: connections are not authenticated");
            Ok(hotpot_net::Secret::none())
        }
    }
}

/// A daemon stops whole when any of its threads panics (fail-stop). Left running, a node with
/// a dead heartbeat or RPC worker keeps serving its copies while its peers count it down and
/// commit without it: it reads stale bytes. A stopped node is a crash, which recovery handles
/// (its restart, or its loss). The default hook prints the panic and its backtrace first.
fn stop_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!(
            "hotpot: a thread panicked: the process stops (fail-stop; restart it on its PM file)"
        );
        std::process::abort();
    }));
}

fn main() {
    let cli = Cli::parse();
    let daemon = matches!(cli.command, Command::Dispatcher(_) | Command::Node(_));
    if daemon {
        stop_on_panic();
    }
    let default_level = if daemon { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Bench(BenchCommand::Ycsb(args)) => bench_ycsb::run(args),
        Command::Dispatcher(args) => dispatcher::run(args),
        Command::Node(args) => node::run(args),
        Command::Cluster(ClusterCommand::Up(args)) => cluster::up(args),
        Command::Cluster(ClusterCommand::Down { dir }) => cluster::down(&dir),
        Command::Cluster(ClusterCommand::Kill { dir, node, wipe }) => {
            cluster::kill(&dir, node, wipe)
        }
        Command::Cluster(ClusterCommand::StartNode { dir, node }) => {
            cluster::start_node(&dir, node)
        }
        Command::Cluster(ClusterCommand::KillDispatcher { dir }) => cluster::kill_dispatcher(&dir),
        Command::Cluster(ClusterCommand::StartDispatcher { dir }) => {
            cluster::start_dispatcher(&dir)
        }
        Command::Cluster(ClusterCommand::ArmFault { dir, node, point }) => {
            cluster::arm_fault(&dir, node, &point)
        }
        Command::Create(args) => admin::create(args),
        Command::Status { target, json } => admin::status(target, json),
        Command::Stat { path, json, secret } => admin::stat(&path, secret.as_deref(), json),
    };
    if let Err(error) = result {
        eprintln!("hotpot: error: {error:#}");
        std::process::exit(1);
    }
}
