//! `hotpot node --machine`: the node runs its protocol as the node machine
//! (`hotpot_core::proto::node`, what `hotpot-sim` checks under seeded faults) instead of the
//! thread-based protocol (node/protocol.rs). Step 1 of docs/design.md's "Moving the daemon
//! onto the machine": the start is the daemon's (join, PM recovered, deleted datasets'
//! pages dropped); then the machine starts on the recovered page table, its runtime
//! (runtime.rs) carries its calls, the server feeds it requests, the heartbeat its views, a
//! tick its time, and the file system its operations (path.rs). Not yet here: fault points
//! (`ArmFault` is refused), one-sided reads over verbs (pages come two-sided), and the
//! counters `hotpot status` shows of the thread-based protocol's recovery and fetches.

mod path;
mod runtime;

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hotpot_core::page::PageTable;
use hotpot_core::proto::dispatcher::VERSION_BLOCK;
use hotpot_core::proto::messages::{DispatcherReply, DispatcherRequest, NodeReply, NodeRequest};
use hotpot_core::proto::node::{Bugs, Config, Input, Machine};
use hotpot_core::proto::types::{Dataset, NodeId, NodeUsage, RecoveryStatus, VersionCounts};
use hotpot_net::{Client, Secret, Server};

use super::engine::NodeEngine;
use super::merger::{self, MergeCounters};
use super::peers::Peers;
use super::transport::NodeTransport;
use super::NodeArgs;
use crate::signals::StopSignals;
use runtime::Runtime;

/// How often the machine hears that time passed.
const TICK: Duration = Duration::from_millis(100);
/// How often the node heartbeats (the thread-based protocol's pace).
const HEARTBEAT: Duration = Duration::from_millis(500);
/// How often views pinned by a lookup but never opened are let go.
const VIEW_HOUSEKEEPING: Duration = Duration::from_secs(2);

/// What the daemon's start has done when the machine takes over.
pub struct Joined {
    pub stop: StopSignals,
    pub listener: TcpListener,
    pub listen_addr: String,
    pub secret: Secret,
    pub dispatcher: Arc<Client>,
    pub transport: NodeTransport,
    pub table: PageTable,
    pub datasets: Vec<Dataset>,
    pub incarnation: u64,
    /// The PM is new while datasets exist (or an earlier rebuild did not end): the pages
    /// this node owns come from the other nodes' copies; `marker` says so until it is over.
    pub rebuilding: bool,
    pub marker: PathBuf,
    pub mount: PathBuf,
}

pub fn serve(args: &NodeArgs, joined: Joined) -> anyhow::Result<()> {
    let Joined {
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
    } = joined;
    let (nodes, successors) = match super::call_with_retry(&dispatcher, &DispatcherRequest::Status)?
    {
        DispatcherReply::Status {
            nodes, successors, ..
        } => (nodes, successors),
        other => bail!("dispatcher answered Status with {other:?}"),
    };
    let peers = Arc::new(Peers::new(
        secret.clone(),
        dispatcher.clone(),
        transport.peers.clone(),
    ));
    peers.update(&nodes, successors.clone());
    if successors.contains_key(&args.id) {
        tracing::warn!("replaced by a promotion while away: copies dropped, rejoining as a holder");
    }
    let timing = runtime::daemon_timing();
    let config = Config {
        id: args.id,
        incarnation,
        nodes: nodes
            .iter()
            .map(|node| node.id)
            .chain(std::iter::once(args.id))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        datasets,
        rebuilding,
        successors: successors.clone(),
        timing,
        version_block: VERSION_BLOCK,
        one_sided: false,
        bugs: Bugs::default(),
    };
    let epoch = Instant::now();
    let machine = Machine::start(config, table, 0).context("starting the node machine")?;
    let runtime = Runtime::start(machine, epoch, timing, peers, dispatcher.clone())?;
    runtime.feed(Input::view(&nodes, successors));

    let serving = runtime.clone();
    Server::spawn_with(
        listener,
        transport.server_config(secret, 16),
        move |request: NodeRequest| -> NodeReply { serving.serve(request) },
    )?;
    let merging = Arc::new(MergeCounters::default());
    spawn_heartbeat(
        args.id,
        dispatcher.clone(),
        runtime.clone(),
        merging.clone(),
        rebuilding,
    )?;
    let ticking = runtime.clone();
    std::thread::Builder::new()
        .name("machine-tick".into())
        .spawn(move || loop {
            std::thread::sleep(TICK);
            ticking.feed(Input::Tick);
        })?;
    let (stepping, pages_per_s) = (runtime.clone(), args.merge_pages_per_s);
    std::thread::Builder::new()
        .name("merger".into())
        .spawn(move || {
            merger::run(&merging, pages_per_s, |step| {
                stepping.with_table(|table| step(table))
            })
        })?;

    wait_rejoined(&runtime, rebuilding, &marker);
    let path = Arc::new(path::MachinePath::new(
        runtime.clone(),
        Duration::from_millis(args.lease_wait_ms),
    ));
    let engine = Arc::new(NodeEngine::new(args.id, dispatcher, path));
    let housekeeping = engine.clone();
    // The machine renews the pins of its views itself; this only lets go of views a
    // lookup pinned but nobody opened.
    std::thread::Builder::new()
        .name("view housekeeping".into())
        .spawn(move || loop {
            std::thread::sleep(VIEW_HOUSEKEEPING);
            housekeeping.pinned_views();
        })?;
    super::serve_mounted(args, engine, &mount, &listen_addr, &stop, " (node machine)")
}

/// Mount only once this node serves as an owner (as the thread-based start does): until
/// then its own pages may be behind another node's. A rebuild's marker goes once it is over.
fn wait_rejoined(runtime: &Runtime, rebuilding: bool, marker: &std::path::Path) {
    let started = Instant::now();
    let mut said = Instant::now();
    while !runtime.with(Machine::is_ready) {
        if said.elapsed() >= Duration::from_secs(5) {
            tracing::info!(
                waited_s = started.elapsed().as_secs(),
                "rejoining: waiting for the other nodes' copies of the pages this node owns"
            );
            said = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!(
        rejoin_ms = started.elapsed().as_millis() as u64,
        "rejoined: serving as an owner"
    );
    if rebuilding {
        match std::fs::remove_file(marker) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(%error, marker = %marker.display(), "rebuild marker left behind: the next start rebuilds again")
            }
        }
    }
}

fn spawn_heartbeat(
    id: NodeId,
    dispatcher: Arc<Client>,
    runtime: Arc<Runtime>,
    merging: Arc<MergeCounters>,
    rebuilt: bool,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || loop {
            let usage = runtime.with(|machine| {
                let pool = machine.table().pool().usage();
                let (wire_bytes_sent, wire_bytes_received) = hotpot_net::wire_bytes();
                let ready = machine.is_ready();
                NodeUsage {
                    pm_frames_total: pool.frames_total,
                    pm_frames_used: pool.frames_used,
                    pages_persisted: pool.pages_persisted,
                    wire_bytes_sent,
                    wire_bytes_received,
                    recovery: RecoveryStatus {
                        state: if ready { "ready" } else { "rejoining" }.into(),
                        rebuilt,
                        ..RecoveryStatus::default()
                    },
                    links: Vec::new(),
                    fetches: Default::default(),
                    sharing: merging.counts(),
                    versions: {
                        let pins = machine.table().pin_usage();
                        VersionCounts {
                            views_pinned: pins.views,
                            frames_kept: pins.frames_kept,
                        }
                    },
                    sees_live: machine.sees_live().iter().copied().collect(),
                }
            });
            let usage = NodeUsage {
                links: runtime.peers().links(),
                ..usage
            };
            let beat = DispatcherRequest::Heartbeat { node: id, usage };
            match dispatcher.call::<_, DispatcherReply>(&beat, Duration::from_secs(2)) {
                Ok(DispatcherReply::Status {
                    nodes, successors, ..
                }) => {
                    runtime.peers().update(&nodes, successors.clone());
                    runtime.feed(Input::view(&nodes, successors));
                }
                Ok(other) => tracing::warn!(?other, "unexpected heartbeat reply"),
                Err(error) => tracing::warn!(%error, "heartbeat not delivered"),
            }
            std::thread::sleep(HEARTBEAT);
        })?;
    Ok(())
}
