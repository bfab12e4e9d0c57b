//! `hotpot node`: join the dispatcher, open (or create) the PM file, recover it, drop pages
//! of datasets that no longer exist, serve peers, mount, heartbeat; on SIGTERM or SIGINT
//! unmount and exit. A second node on the same PM file is refused by the file lock.

mod committer;
pub mod engine;
mod fault;
mod machine;
pub(crate) mod merger;
mod mrmw;
mod multi;
mod peers;
mod protocol;
mod recovery;
pub(crate) mod service;
pub mod transport;
mod versions;

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hotpot_core::page::PageTable;
use hotpot_core::pm::{create_file, Durability, MappedRegion, Pool};
use hotpot_core::proto::messages::{DispatcherReply, DispatcherRequest, NodeReply, NodeRequest};
use hotpot_core::proto::types::NodeUsage;
use hotpot_net::{Client, Server};

use crate::signals;
use engine::{NodeEngine, ProtocolPath};
use peers::Peers;
use protocol::Protocol;

#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// This node's id (1, 2, ...): stored in the PM file at creation and checked at every start.
    #[arg(long)]
    pub id: u32,
    /// Dispatcher address, host:port.
    #[arg(long)]
    pub dispatcher: String,
    /// Address to serve peers and tools on, host:port (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Persistent-memory file (created if missing; then --pm-size is required).
    #[arg(long)]
    pub pm: PathBuf,
    /// Size of a new PM file, e.g. 1GiB, 512MiB.
    #[arg(long, value_parser = crate::size::parse_size)]
    pub pm_size: Option<u64>,
    /// How persist() makes bytes durable: cache-flush (memory or DAX, the default) or msync
    /// (an ordinary file on a disk).
    #[arg(long, default_value = "cache-flush")]
    pub pm_durability: Durability,
    /// Directory to mount the hotpot file system on (must exist).
    #[arg(long)]
    pub mount: PathBuf,
    /// FUSE request threads.
    #[arg(long, default_value_t = 4)]
    pub fuse_threads: usize,
    /// Let users other than the one who mounted use the mount (FUSE allow_other).
    #[arg(long)]
    pub allow_other: bool,
    /// File holding the cluster secret (every connection proves it). Without it the node
    /// runs unauthenticated and says so.
    #[arg(long)]
    pub secret: Option<PathBuf>,
    /// How long an open for writing waits for another node's MRSW write lease (then EBUSY).
    #[arg(long, default_value_t = 3000)]
    pub lease_wait_ms: u64,
    /// Identical-page merging: committed pages the background merger hashes per second at
    /// most (its CPU bound); 0 turns merging off.
    #[arg(long, default_value_t = merger::DEFAULT_PAGES_PER_S)]
    pub merge_pages_per_s: u64,
    /// Run the node's protocol as the node machine (the sans-IO protocol hotpot-sim checks)
    /// instead of the thread-based one. Every node of a cluster must run the same. Not yet
    /// with it: fault points, one-sided RDMA reads (pages come two-sided).
    #[arg(long)]
    pub machine: bool,
    #[command(flatten)]
    pub transport: transport::TransportArgs,
}

pub fn run(args: NodeArgs) -> anyhow::Result<()> {
    // Block the stop signals before any thread starts, so the main thread can wait for them.
    let stop = signals::block_stop_signals()?;
    if args.id == 0 {
        bail!("--id must be 1 or more (0 marks a PM file without an owner)");
    }
    if !args.mount.is_dir() {
        bail!(
            "--mount {}: not a directory (create it first)",
            args.mount.display()
        );
    }
    // The transport (and its RDMA device) first: a refused start creates no PM file.
    let transport = transport::NodeTransport::open(&args.transport)?;
    match (args.pm.exists(), args.pm_size) {
        (false, Some(size)) => create_file(&args.pm, size)
            .with_context(|| format!("creating {}", args.pm.display()))?,
        (false, None) => bail!(
            "--pm {} does not exist: give --pm-size to create it",
            args.pm.display()
        ),
        (true, Some(size)) => {
            let actual = std::fs::metadata(&args.pm)?.len();
            if actual != size {
                bail!(
                    "--pm {} is {actual} bytes but --pm-size asks for {size}: a PM file is never resized",
                    args.pm.display()
                );
            }
        }
        (true, None) => {}
    }

    tracing::info!(node = args.id, pm = %args.pm.display(), "node starting: opening its PM file");
    // The PM file is locked and checked before the node joins, so a refused start changes
    // nothing at the dispatcher or in the file.
    let region = MappedRegion::open(&args.pm, args.pm_durability)
        .with_context(|| format!("opening PM file {}", args.pm.display()))?;
    let existing =
        Pool::read_superblock(&region).with_context(|| format!("PM file {}", args.pm.display()))?;
    if let Some(superblock) = &existing {
        if superblock.node_id != args.id {
            bail!(
                "PM file {} belongs to node {}, not node {}",
                args.pm.display(),
                superblock.node_id,
                args.id
            );
        }
    }

    let listener = TcpListener::bind(&args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let listen_addr = listener.local_addr()?.to_string();
    let secret = crate::load_secret(args.secret.as_deref())?;
    let dispatcher = Arc::new(Client::new(args.dispatcher.clone(), secret.clone()));
    let mount = args.mount.canonicalize()?;
    let join = DispatcherRequest::Join {
        node: args.id,
        addr: listen_addr.clone(),
        mount: mount.display().to_string(),
        pm_cluster: existing.map(|superblock| superblock.cluster_id),
    };
    let (cluster_id, incarnation) = match call_with_retry(&dispatcher, &join)? {
        DispatcherReply::Joined {
            cluster_id,
            incarnation,
        } => (cluster_id, incarnation),
        DispatcherReply::Failed(error) => bail!("dispatcher refused the join: {error}"),
        other => bail!("dispatcher answered the join with {other:?}"),
    };

    tracing::info!(
        cluster = cluster_id,
        "joined the dispatcher; recovering the PM file"
    );
    let (mut table, report) = PageTable::open(Box::new(region), args.id, cluster_id)
        .with_context(|| format!("PM file {}", args.pm.display()))?;
    tracing::info!(
        pages = report.pages,
        replayed = report.records_replayed,
        discarded = report.records_discarded,
        pending = report.records_pending,
        outcomes = report.outcomes_kept,
        "PM recovered"
    );
    let datasets = match call_with_retry(&dispatcher, &DispatcherRequest::LiveDatasets)? {
        DispatcherReply::Datasets(live) => {
            let ids: std::collections::BTreeSet<u64> = live.iter().map(|d| d.id).collect();
            for orphan in table
                .pool()
                .datasets()
                .difference(&ids)
                .copied()
                .collect::<Vec<_>>()
            {
                tracing::info!(dataset = orphan, "dropping pages of a deleted dataset");
                table.drop_dataset(orphan)?;
            }
            live
        }
        other => bail!("dispatcher answered LiveDatasets with {other:?}"),
    };

    transport.expose(table.pool().memory())?;
    // A node whose PM was lost rebuilds the pages it owns from the other nodes' copies. The
    // marker beside the PM file keeps it rebuilding across a crash before the rebuild is over
    // (found by hotpot-sim: a restart mid-rebuild served pages it never rebuilt as zeros).
    let marker = rebuild_marker(&args.pm);
    let rebuilding = (report.formatted && !datasets.is_empty()) || marker.exists();
    if rebuilding {
        write_durably(&marker)
            .with_context(|| format!("writing the rebuild marker {}", marker.display()))?;
    }
    if args.machine {
        let joined = machine::Joined {
            stop,
            listener,
            listen_addr,
            secret,
            dispatcher,
            transport,
            table,
            datasets,
            incarnation,
            rebuilding,
            marker,
            mount,
        };
        return machine::serve(&args, joined);
    }
    let protocol = Arc::new(Protocol::new(
        args.id,
        table,
        Peers::new(secret.clone(), dispatcher.clone(), transport.peers.clone()),
    ));
    if rebuilding {
        tracing::warn!(
            "new PM file in a cluster with datasets: owned pages come from other nodes' copies"
        );
        protocol.set_rebuilding();
    }
    refresh_peers(&dispatcher, &protocol)?;
    if protocol.peers.successors().contains_key(&args.id) {
        // Replaced by a promotion: this node owns nothing now, and its copies of the pages
        // it owned may hold commits it applied alone (never acknowledged) under versions its
        // successor has since given other bytes (found by hotpot-sim). Every copy goes; the
        // owners' copies are the ones to have, and come back by fetches and re-replication.
        let mut table = protocol.table();
        for dataset in &datasets {
            table
                .drop_dataset(dataset.id)
                .with_context(|| format!("dropping the copies of dataset {}", dataset.id))?;
        }
        tracing::warn!(
            datasets = datasets.len(),
            "replaced by a promotion while away: copies dropped, rejoining as a holder"
        );
    }
    protocol.set_incarnation(incarnation);
    protocol.take_home_blocks(&datasets);
    let path = Arc::new(ProtocolPath::new(
        protocol.clone(),
        dispatcher.clone(),
        Duration::from_millis(args.lease_wait_ms),
    ));
    let engine = Arc::new(NodeEngine::new(args.id, dispatcher.clone(), path.clone()));
    let serving = protocol.clone();
    // Enough workers that owners waiting on targets never starve the targets' own requests.
    Server::spawn_with(
        listener,
        transport.server_config(secret, 16),
        move |request: NodeRequest| -> NodeReply { service::handle(&serving, request) },
    )?;
    spawn_heartbeat(args.id, dispatcher, protocol.clone());
    let leases = (protocol.clone(), engine.clone());
    std::thread::Builder::new()
        .name("pin leases".into())
        .spawn(move || {
            leases
                .0
                .run_pin_leases(&|| path.by_owner(leases.1.pinned_views()))
        })?;
    let merging = protocol.clone();
    let pages_per_s = args.merge_pages_per_s;
    std::thread::Builder::new()
        .name("merger".into())
        .spawn(move || {
            merger::run(&merging.merging, pages_per_s, |step| {
                step(&mut merging.table())
            })
        })?;
    if rebuilding {
        fault::point("node.rebuild_started");
    }
    protocol.rejoin(&datasets);
    if rebuilding {
        match std::fs::remove_file(&marker) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(%error, marker = %marker.display(), "rebuild marker left behind: the next start rebuilds again")
            }
        }
    }
    protocol.set_ready();
    for (name, role) in [
        ("resolver", Protocol::run_resolver as fn(&Protocol)),
        ("confirmations", Protocol::run_confirmations),
    ] {
        let protocol = protocol.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || role(&protocol))?;
    }

    serve_mounted(&args, engine, &mount, &listen_addr, &stop, "")
}

/// Mount `engine` on `mount`, say the node serves (`how`: which protocol, if not the
/// default), and serve until SIGTERM or SIGINT; then unmount.
fn serve_mounted(
    args: &NodeArgs,
    engine: Arc<NodeEngine>,
    mount: &std::path::Path,
    listen_addr: &str,
    stop: &signals::StopSignals,
    how: &str,
) -> anyhow::Result<()> {
    let session = hotpot_fs::mount(
        engine,
        mount,
        &hotpot_fs::MountConfig {
            threads: args.fuse_threads,
            source: format!("hotpot:{}", args.dispatcher),
            allow_other: args.allow_other,
        },
    )
    .with_context(|| format!("mounting on {}", mount.display()))?;
    tracing::info!(node = args.id, listen = %listen_addr, mount = %mount.display(), how, "node serving");
    println!(
        "node {} serving on {listen_addr}, mounted at {}{how}",
        args.id,
        mount.display()
    );
    let signal = signals::wait(stop)?;
    tracing::info!(signal, "stopping: unmounting");
    drop(session);
    Ok(())
}

fn call_with_retry(
    dispatcher: &Client,
    request: &DispatcherRequest,
) -> anyhow::Result<DispatcherReply> {
    let mut last_error = None;
    for attempt in 0..50 {
        match dispatcher.call(request, Duration::from_secs(5)) {
            Ok(reply) => return Ok(reply),
            Err(error @ hotpot_net::NetError::WrongSecret { .. }) => {
                bail!("{error} (check --secret)")
            }
            Err(error) => {
                if attempt % 10 == 0 {
                    tracing::warn!(%error, "dispatcher not reachable yet");
                }
                last_error = Some(error);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    Err(anyhow::anyhow!(
        "dispatcher at {} unreachable for 10 s: {}",
        dispatcher.addr(),
        last_error.map(|e| e.to_string()).unwrap_or_default()
    ))
}

/// Learn the cluster's nodes before serving (the heartbeat keeps them current).
fn refresh_peers(dispatcher: &Client, protocol: &Protocol) -> anyhow::Result<()> {
    match call_with_retry(dispatcher, &DispatcherRequest::Status)? {
        DispatcherReply::Status {
            nodes, successors, ..
        } => {
            protocol.peers.update(&nodes, successors);
            Ok(())
        }
        other => bail!("dispatcher answered Status with {other:?}"),
    }
}

fn spawn_heartbeat(id: u32, dispatcher: Arc<Client>, protocol: Arc<Protocol>) {
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || loop {
            let usage = {
                let pool_usage = protocol.table().pool().usage();
                let (wire_bytes_sent, wire_bytes_received) = hotpot_net::wire_bytes();
                NodeUsage {
                    pm_frames_total: pool_usage.frames_total,
                    pm_frames_used: pool_usage.frames_used,
                    pages_persisted: pool_usage.pages_persisted,
                    wire_bytes_sent,
                    wire_bytes_received,
                    recovery: protocol.recovery_status(),
                    links: protocol.peers.links(),
                    fetches: protocol.fetches.counts(),
                    sharing: protocol.merging.counts(),
                    versions: protocol.version_usage(),
                    sees_live: protocol.peers.live(),
                }
            };
            let beat = DispatcherRequest::Heartbeat { node: id, usage };
            match dispatcher.call::<_, DispatcherReply>(&beat, Duration::from_secs(2)) {
                Ok(DispatcherReply::Status {
                    nodes, successors, ..
                }) => protocol.take_view(&nodes, successors),
                Ok(other) => tracing::warn!(?other, "unexpected heartbeat reply"),
                Err(error) => tracing::warn!(%error, "heartbeat not delivered"),
            }
            protocol.refill_version_blocks();
            std::thread::sleep(Duration::from_millis(500));
        })
        .expect("start the heartbeat thread");
}

/// The file whose presence says the PM file beside it is still being rebuilt.
fn rebuild_marker(pm: &std::path::Path) -> PathBuf {
    let mut name = pm.as_os_str().to_owned();
    name.push(".rebuilding");
    PathBuf::from(name)
}

/// Create `path` (empty) and make it and its directory entry durable.
fn write_durably(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::create(path)?.sync_all()?;
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
