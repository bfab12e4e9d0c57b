//! The simulated world: virtual time, one seeded generator, an event queue, a network that
//! loses, duplicates, delays (so reorders) and partitions messages, and nodes whose PM is a
//! `SimRegion` (live and persisted images) that crash and restart on what was persisted.
//! Single-threaded and deterministic: the same seed gives the same events, byte for byte.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use hotpot_core::page::{Merger, PageTable};
use hotpot_core::pm::{SimRegion, PAGE_BYTES};
use hotpot_core::proto::messages::{DispatcherReply, DispatcherRequest, NodeReply, NodeRequest};
use hotpot_core::proto::node::{
    Config, Input, Machine, Op, OpDone, OpResult, Output, Timing, DISPATCHER,
};
use hotpot_core::proto::types::{Attr, Dataset, DatasetId, DatasetParams, NodeId, ROOT_INO};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::check::{Checker, Views, Violation};
use crate::dispatcher::SimDispatcher;
use crate::options::Options;
use crate::trace::{self, Trace};
use crate::workload::{Tally, Thread, Workload};
use kernel::Reading;

mod faults;
mod kernel;

/// Bytes of each node's simulated PM.
const PM_BYTES: usize = 1 << 20;
const CLUSTER_ID: u64 = 7;
/// Every node gets a tick this often.
const TICK_MS: u64 = 100;
/// After the workload: how long the healed cluster gets to settle.
const SETTLE_MS: u64 = 60_000;
/// More events than this in one seed is a storm (a liveness failure of its own).
const EVENTS_MAX: u64 = 3_000_000;

/// A starting node asks the dispatcher to join again this often until it answers.
const JOIN_RETRY_MS: u64 = 300;
const HEARTBEAT_MS: u64 = 1_000;
/// With merging on, each node's merger visits this many pages every `MERGE_EVERY_MS` (the
/// daemon's thread visits 256 per hold of the table lock, paced to 20,000 pages a second).
const MERGE_STEP_PAGES: usize = 8;
const MERGE_EVERY_MS: u64 = 50;

#[derive(Clone, Debug)]
pub(crate) enum Message {
    Request {
        call: u64,
        request: NodeRequest,
    },
    Reply {
        call: u64,
        reply: NodeReply,
    },
    ToDispatcher(DispatcherRequest),
    FromDispatcher(DispatcherReply),
    /// A machine's call to the dispatcher, and its answer.
    DispatcherCall {
        call: u64,
        request: DispatcherRequest,
    },
    DispatcherAnswer {
        call: u64,
        reply: DispatcherReply,
    },
}

#[derive(Clone, Debug)]
enum Event {
    /// A message on a connection between these incarnations of the two nodes: if either
    /// restarted since, the connection is gone and so is the message (TCP semantics).
    Deliver {
        from: (NodeId, u64),
        to: (NodeId, u64),
        message: Box<Message>,
    },
    Tick(NodeId),
    /// The node's program starts its next operation.
    Client(NodeId),
    /// The node's program's storing thread starts its next operation (`storers`).
    Store(NodeId),
    Crash(NodeId),
    Restart(NodeId),
    /// A partition starts (or, with `heal`, ends).
    Partition {
        heal: bool,
    },
    /// Faults stop; every down node restarts; partitions heal.
    Heal,
    /// A starting node (this start of it) asks to join again if it has no answer yet.
    JoinRetry(NodeId, u64),
    Heartbeat(NodeId),
    /// The node's identical-page merger takes a step.
    Merge(NodeId),
    /// A program makes the `n`th dataset of `Options::created` (again, until the
    /// dispatcher is up and counts a node live to own it).
    Create(usize),
    /// A node joins the running cluster (`Options::late_join_ms`).
    Join(NodeId),
    /// A program deletes the `n`th dataset of `Options::created` (again, until the
    /// dispatcher is up).
    Delete(usize),
    /// A node's one-sided read reaches the other node's PM (on a link between these
    /// incarnations of the two: a restart of either breaks it).
    RemoteRead {
        reader: (NodeId, u64),
        target: (NodeId, u64),
        call: u64,
        offset: u64,
        len: usize,
    },
    /// What a one-sided read found (`None`: it failed) reaches the reader.
    RemoteReadDone {
        reader: (NodeId, u64),
        target: NodeId,
        call: u64,
        bytes: Option<Vec<u8>>,
    },
    /// The machine of this start of the node hears that its kernel dropped the pages an
    /// `Output::Invalidate` named (`Input::Invalidated`), a moment after the drop: reads
    /// may reach it between the two, as in the daemon.
    KernelDropped {
        node: (NodeId, u64),
        dataset: DatasetId,
        pages: Vec<u64>,
        mark: u64,
    },
    DispatcherCrash,
    DispatcherRestart,
}

pub(crate) struct SimNode {
    pub(crate) machine: Option<Machine>,
    region: Arc<SimRegion>,
    incarnation: u64,
    /// Its PM was lost and the rebuild from the other nodes' copies is not over: a marker
    /// the runtime keeps on disk beside the PM (it survives further crashes).
    rebuilding: bool,
    /// Power is cut inside this node's next step: it dies there, sending nothing.
    dying: bool,
    /// Started, waiting for the dispatcher's `Joined` (which names its incarnation), then
    /// for its view (who is live, who was promoted in place of whom), as the daemon asks
    /// before it recovers.
    joining: bool,
    /// The incarnation `Joined` gave this start, while it waits for the view.
    joined: Option<u64>,
    /// The last incarnation the dispatcher gave it.
    joined_as: u64,
    /// Its kernel's page cache.
    pub(crate) kernel: kernel::KernelCache,
    /// Its identical-page merger (`hotpot_core::page::Merger`, the daemon's): volatile,
    /// a new one at every start.
    merger: Merger,
}

pub struct World {
    options: Options,
    rng: ChaCha8Rng,
    now_ms: u64,
    sequence: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    pub(crate) nodes: BTreeMap<NodeId, SimNode>,
    pub(crate) datasets: Vec<(Dataset, u64)>,
    /// The datasets of `Options::created` made so far, by their index there.
    made: BTreeMap<usize, DatasetId>,
    /// Datasets a program deleted (`Made::deleted_after_ms`).
    deleted: BTreeSet<DatasetId>,
    /// Directions cut: (from, to).
    cut: BTreeSet<(NodeId, NodeId)>,
    healing: bool,
    dispatcher: SimDispatcher,
    workload: Workload,
    checker: Checker,
    /// The live views given to each machine, for the coherence check of reads.
    views: Views,
    /// Every promotion a node was told of: (lost node, node promoted in its place).
    promoted: BTreeSet<(NodeId, NodeId)>,
    trace: Trace,
}

impl World {
    pub fn new(options: Options, rng: ChaCha8Rng, trace: Trace) -> World {
        let node_ids: Vec<NodeId> = (1..=options.nodes).collect();
        let datasets: Vec<(Dataset, u64)> = options
            .datasets
            .iter()
            .enumerate()
            .map(|(i, dataset)| {
                // Owners round-robin from a different node per dataset.
                let mut owners = node_ids.clone();
                owners.rotate_left(i % node_ids.len());
                let record = Dataset {
                    id: i as u64 + 1,
                    params: DatasetParams {
                        mode: dataset.mode,
                        replicas: dataset.replicas,
                        chunk_pages: dataset.chunk_pages,
                    },
                    // The first start of the first home gives the versions of the first
                    // block, as after a `create` through the dispatcher.
                    first_home: Some((owners[0], 1)),
                    owners,
                };
                (record, dataset.pages)
            })
            .collect();
        let workload = Workload::new(
            &datasets,
            &node_ids,
            options.silences_live_nodes(),
            options.write_calls,
        );
        let dispatcher = SimDispatcher::new(CLUSTER_ID, &options, &datasets);
        let mut world = World {
            options,
            rng,
            now_ms: 0,
            sequence: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            nodes: BTreeMap::new(),
            datasets,
            made: BTreeMap::new(),
            deleted: BTreeSet::new(),
            cut: BTreeSet::new(),
            healing: false,
            dispatcher,
            workload,
            checker: Checker::default(),
            views: Views::default(),
            promoted: BTreeSet::new(),
            trace,
        };
        for id in node_ids {
            world.add_node(id);
        }
        if world.options.dispatcher_crashes {
            let at = world.rng.random_range(100..2_000);
            world.schedule(at, Event::DispatcherCrash);
        }
        if world.options.crashes {
            let at = world.rng.random_range(200..1_500);
            let victim = world.random_node();
            world.schedule(at, Event::Crash(victim));
        }
        if world.options.partitions {
            let at = world.rng.random_range(100..1_500);
            world.schedule(at, Event::Partition { heal: false });
        }
        if let Some(at_ms) = world.options.late_join_ms {
            world.schedule(at_ms, Event::Join(world.options.nodes + 1));
        }
        let made: Vec<u64> = world
            .options
            .created
            .iter()
            .map(|made| made.at_ms)
            .collect();
        for (i, at_ms) in made.into_iter().enumerate() {
            world.schedule(at_ms, Event::Create(i));
        }
        world.schedule(world.options.workload_ms, Event::Heal);
        world
    }

    /// Run the workload, heal, settle; the violations found (empty: the seed passed).
    pub fn run(mut self) -> (Vec<Violation>, Trace, Tally) {
        let end_ms = self.options.workload_ms + SETTLE_MS;
        while let Some(Reverse((at, sequence))) = self.queue.pop() {
            let event = self.events.remove(&sequence).expect("queued event");
            if at > end_ms {
                break;
            }
            self.now_ms = at;
            if sequence > EVENTS_MAX {
                let what = format!("more than {EVENTS_MAX} events: a message storm");
                self.checker.violation(at, what);
                break;
            }
            // A panic in a node's code (or the world's) fails this seed, with the trace so
            // far, rather than the whole run.
            let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| self.step(event)));
            if let Err(panic) = stepped {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|text| text.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".into());
                let what = format!("a step panicked (a node's code or the world): {what}");
                self.checker.violation(at, what);
                break;
            }
            if self.checker.failed() {
                break;
            }
            if self.healing && self.quiescent() {
                break;
            }
        }
        if !self.checker.failed() {
            self.checker.check_versions(self.now_ms, &self.workload);
            self.checker.check_views(self.now_ms, &self.workload);
        }
        if !self.checker.failed() {
            let quiescent = self.quiescent();
            let mut checker = std::mem::take(&mut self.checker);
            checker.check_end(self.now_ms, quiescent, &self);
            self.checker = checker;
        }
        let violations = self.checker.take();
        for violation in &violations {
            trace!(self, "VIOLATION {violation}");
        }
        let tally = self.workload.tally();
        (violations, self.trace, tally)
    }

    pub(crate) fn workload(&self) -> &Workload {
        &self.workload
    }

    fn schedule(&mut self, after_ms: u64, event: Event) {
        self.sequence += 1;
        self.queue
            .push(Reverse((self.now_ms + after_ms, self.sequence)));
        self.events.insert(self.sequence, event);
    }

    fn random_node(&mut self) -> NodeId {
        // Nodes are 1..=n, the one that joins late only once it joined.
        self.rng.random_range(1..=self.nodes.len() as NodeId)
    }

    fn step(&mut self, event: Event) {
        match event {
            Event::Deliver { from, to, message } => self.deliver(from, to, *message),
            Event::Tick(node) => {
                self.input(node, Input::Tick);
                self.schedule(TICK_MS, Event::Tick(node));
            }
            Event::Client(node) => self.client(node),
            Event::Store(node) => self.store(node),
            Event::Crash(node) => self.crash(node),
            Event::Restart(node) => self.restart(node),
            Event::Partition { heal } => self.partition(heal),
            Event::Heal => self.heal(),
            Event::Create(i) => self.create_dataset(i),
            Event::Join(node) => self.add_node(node),
            Event::Delete(i) => self.delete_dataset(i),
            Event::JoinRetry(node, incarnation) => {
                let state = &self.nodes[&node];
                if state.joining && state.incarnation == incarnation {
                    self.ask_to_join(node);
                }
            }
            Event::Heartbeat(node) => {
                if self.nodes[&node].machine.is_some() {
                    let usage = Default::default();
                    let heartbeat = DispatcherRequest::Heartbeat { node, usage };
                    self.send(node, DISPATCHER, Message::ToDispatcher(heartbeat));
                }
                self.schedule(HEARTBEAT_MS, Event::Heartbeat(node));
            }
            Event::DispatcherCrash => {
                if !self.healing && self.dispatcher.is_up() {
                    self.dispatcher.crash();
                    trace!(self, "dispatcher crashes");
                    let back = self.rng.random_range(100..2_000);
                    self.schedule(back, Event::DispatcherRestart);
                    let next = self.rng.random_range(1_000..4_000);
                    self.schedule(back + next, Event::DispatcherCrash);
                }
            }
            Event::DispatcherRestart => self.restart_dispatcher(),
            Event::Merge(node) => {
                self.merge(node);
                self.schedule(MERGE_EVERY_MS, Event::Merge(node));
            }
            Event::RemoteRead {
                reader,
                target,
                call,
                offset,
                len,
            } => self.remote_read(reader, target, call, offset, len),
            Event::RemoteReadDone {
                reader,
                target,
                call,
                bytes,
            } => {
                if self.is_alive(reader) {
                    let input = Input::RemoteRead {
                        from: target,
                        call,
                        bytes,
                    };
                    self.input(reader.0, input);
                }
            }
            Event::KernelDropped {
                node,
                dataset,
                pages,
                mark,
            } => {
                if self.is_alive(node) {
                    let input = Input::Invalidated {
                        dataset,
                        pages,
                        mark,
                    };
                    self.input(node.0, input);
                }
            }
        }
    }

    /// A step of the node's merger on its page table, between two inputs of its machine,
    /// as the daemon's merger thread takes the table lock between protocol calls. A power
    /// cut may fall inside it, as inside any step.
    fn merge(&mut self, node: NodeId) {
        let held_before_step =
            self.nodes.get(&node).is_some_and(|n| n.dying) && self.holds_only_copy(node);
        let state = self.nodes.get_mut(&node).expect("node");
        let Some(machine) = state.machine.as_mut() else {
            return;
        };
        let merged_before = state.merger.pages_merged;
        let stepped = state.merger.step(machine.table_mut(), MERGE_STEP_PAGES);
        let merged = state.merger.pages_merged - merged_before;
        match stepped {
            Err(error) => trace!(self, "n{node}'s merger failed: {error}"),
            Ok(_) if merged > 0 => trace!(self, "n{node} merged {merged} identical pages"),
            Ok(_) => {}
        }
        if self.nodes[&node].dying {
            trace!(self, "power cut in n{node}'s merge step");
            self.power_off(node, held_before_step);
        }
    }

    /// Whether this incarnation of the node (or the dispatcher) is the one running.
    fn is_alive(&self, (node, incarnation): (NodeId, u64)) -> bool {
        if node == DISPATCHER {
            return self.dispatcher.is_up() && self.dispatcher.incarnation == incarnation;
        }
        let node = &self.nodes[&node];
        (node.machine.is_some() || node.joining) && node.incarnation == incarnation
    }

    /// A one-sided read of `target`'s live PM, without its CPU: it fails if the link is
    /// gone (either end restarted) or cut; the bytes are those at this moment, whatever
    /// the target's commits do before or after.
    fn remote_read(
        &mut self,
        reader: (NodeId, u64),
        target: (NodeId, u64),
        call: u64,
        offset: u64,
        len: usize,
    ) {
        if !self.is_alive(reader) {
            return;
        }
        let (from, to) = (reader.0, target.0);
        let cut =
            !self.healing && (self.cut.contains(&(from, to)) || self.cut.contains(&(to, from)));
        let bytes = if self.is_alive(target) && !cut {
            let region = &self.nodes[&to].region;
            usize::try_from(offset)
                .ok()
                .and_then(|offset| region.read_live(offset, len))
        } else {
            None
        };
        let found = match &bytes {
            Some(_) => "read",
            None => "failed",
        };
        trace!(
            self,
            "n{from} reads n{to}'s PM one-sided at {offset} ({len} bytes): {found}"
        );
        let delay = self.delay();
        let target = to;
        let done = Event::RemoteReadDone {
            reader,
            target,
            call,
            bytes,
        };
        self.schedule(delay, done);
    }

    fn deliver(&mut self, from: (NodeId, u64), to: (NodeId, u64), message: Message) {
        let connected = self.is_alive(from) && self.is_alive(to);
        let (from, to) = (from.0, to.0);
        if !connected {
            trace!(
                self,
                "drop {from}->{to} (connection gone) {}",
                trace::describe(&message)
            );
            return;
        }
        trace!(self, "deliver {from}->{to} {}", trace::describe(&message));
        let input = match message {
            Message::Request { call, request } => Input::Request {
                from,
                call,
                request,
            },
            Message::Reply { call, reply } => Input::Reply { from, call, reply },
            Message::ToDispatcher(request) => {
                if let Some(reply) = self.dispatcher.handle(request, self.now_ms) {
                    self.send(DISPATCHER, from, Message::FromDispatcher(reply));
                }
                return;
            }
            Message::DispatcherCall { call, request } => {
                if let Some(reply) = self.dispatcher.handle(request, self.now_ms) {
                    self.send(DISPATCHER, from, Message::DispatcherAnswer { call, reply });
                }
                return;
            }
            Message::DispatcherAnswer { call, reply } => Input::DispatcherReply { call, reply },
            Message::FromDispatcher(DispatcherReply::Joined { incarnation, .. }) => {
                return self.joined(to, incarnation);
            }
            Message::FromDispatcher(DispatcherReply::Status {
                nodes, successors, ..
            }) => {
                self.promoted
                    .extend(successors.iter().map(|(lost, by)| (*lost, *by)));
                if let Some(incarnation) = self.nodes[&to].joined {
                    self.start_machine(to, incarnation, successors.clone());
                }
                if self.nodes[&to].machine.is_none() {
                    return;
                }
                let view = Input::view(&nodes, successors);
                if let Input::View { live, .. } = &view {
                    self.views.record(to, self.now_ms, live.clone());
                }
                view
            }
            Message::FromDispatcher(_) => return,
        };
        self.input(to, input);
    }

    /// A node starts: it asks the dispatcher to join; its machine starts with the answer.
    /// Node `id` joins the cluster, on a new PM: it boots, and its ticks, heartbeats and
    /// merger steps begin. One that joins a running cluster starts as the daemon does on a
    /// new PM file where datasets exist: rebuilding (the pages it owns: none yet).
    fn add_node(&mut self, id: NodeId) {
        let region = Arc::new(SimRegion::from_image(vec![0u8; PM_BYTES]));
        let late = id > self.options.nodes;
        self.nodes.insert(
            id,
            SimNode {
                machine: None,
                region,
                incarnation: 0,
                rebuilding: late,
                dying: false,
                joining: false,
                joined: None,
                joined_as: 0,
                kernel: Default::default(),
                merger: Merger::default(),
            },
        );
        if late {
            trace!(self, "n{id} joins the running cluster");
        }
        self.boot(id);
        self.schedule(TICK_MS, Event::Tick(id));
        self.schedule(HEARTBEAT_MS, Event::Heartbeat(id));
        if self.options.merging {
            self.schedule(MERGE_EVERY_MS, Event::Merge(id));
        }
    }

    /// A program makes a dataset through the dispatcher (its `create`): it owns no page
    /// anywhere yet, and the nodes learn its record when something names it.
    fn create_dataset(&mut self, i: usize) {
        let made = self.options.created[i].clone();
        let options = made.dataset;
        let request = DispatcherRequest::Create {
            parent: ROOT_INO,
            name: format!("made-{i}"),
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: options.pages * PAGE_BYTES as u64,
            params: Some(DatasetParams {
                mode: options.mode,
                replicas: options.replicas,
                chunk_pages: options.chunk_pages,
            }),
            exclusive: false,
        };
        match self.dispatcher.handle(request, self.now_ms) {
            Some(DispatcherReply::Attr(Attr {
                dataset: Some(record),
                ..
            })) => {
                trace!(
                    self,
                    "a program makes d{} ({options}), owners {:?}",
                    record.id,
                    record.owners
                );
                self.workload.add_dataset(&record, options.pages);
                self.made.insert(i, record.id);
                self.datasets.push((record, options.pages));
                if let Some(after) = made.deleted_after_ms {
                    self.schedule(after, Event::Delete(i));
                }
            }
            other => {
                trace!(
                    self,
                    "making dataset {i} failed ({other:?}); again in 100 ms"
                );
                self.schedule(100, Event::Create(i));
            }
        }
    }

    /// A program deletes a dataset it made (unlinks its one name): the programs stop using
    /// it (a write or read under way ends as it ends), and the end's checks leave it out.
    fn delete_dataset(&mut self, i: usize) {
        let id = self.made[&i];
        let request = DispatcherRequest::Unlink {
            parent: ROOT_INO,
            name: format!("made-{i}"),
        };
        match self.dispatcher.handle(request, self.now_ms) {
            Some(DispatcherReply::Removed { .. }) => {
                trace!(self, "a program deletes d{id}");
                self.workload.remove_dataset(id);
                self.deleted.insert(id);
            }
            other => {
                trace!(self, "deleting d{id} failed ({other:?}); again in 100 ms");
                self.schedule(100, Event::Delete(i));
            }
        }
    }

    /// The datasets not deleted, with their pages.
    pub(crate) fn live_datasets(&self) -> impl Iterator<Item = &(Dataset, u64)> {
        self.datasets
            .iter()
            .filter(|(dataset, _)| !self.deleted.contains(&dataset.id))
    }

    /// The record of dataset `id` (one the world made or a program created).
    pub(crate) fn record(&self, id: DatasetId) -> &Dataset {
        self.datasets
            .iter()
            .map(|(dataset, _)| dataset)
            .find(|dataset| dataset.id == id)
            .expect("a dataset the world knows")
    }

    fn boot(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("node");
        node.incarnation += 1;
        node.joining = true;
        node.joined = None;
        self.ask_to_join(id);
    }

    fn ask_to_join(&mut self, id: NodeId) {
        let node = &self.nodes[&id];
        let request = if node.joined.is_some() {
            // Joined: the view next.
            let usage = Default::default();
            DispatcherRequest::Heartbeat { node: id, usage }
        } else {
            DispatcherRequest::Join {
                node: id,
                addr: format!("sim:{id}"),
                mount: String::new(),
                pm_cluster: (!node.rebuilding).then_some(CLUSTER_ID),
            }
        };
        let incarnation = node.incarnation;
        self.send(id, DISPATCHER, Message::ToDispatcher(request));
        self.schedule(JOIN_RETRY_MS, Event::JoinRetry(id, incarnation));
    }

    fn restart_dispatcher(&mut self) {
        if !self.dispatcher.is_up() {
            self.dispatcher.restart(self.now_ms);
            trace!(self, "dispatcher restarts on its persisted state");
        }
    }

    /// One input to a live node, and its outputs carried out.
    fn input(&mut self, node: NodeId, input: Input) {
        let now = self.now_ms;
        // A power cut inside this step leaves PM as it was before the step, or partly
        // written: what only this node's PM holds is judged on that state too.
        let held_before_step =
            self.nodes.get(&node).is_some_and(|n| n.dying) && self.holds_only_copy(node);
        let Some(machine) = self.nodes.get_mut(&node).and_then(|n| n.machine.as_mut()) else {
            return;
        };
        let outputs = machine.handle(now, input);
        let rebuilt = machine.is_ready();
        let node_state = self.nodes.get_mut(&node).expect("node");
        if node_state.rebuilding && rebuilt {
            node_state.rebuilding = false;
            trace!(self, "n{node} rebuilt its pages");
        }
        if self.nodes[&node].dying {
            trace!(
                self,
                "power cut in n{node}'s step ({} outputs lost)",
                outputs.len()
            );
            self.power_off(node, held_before_step);
            return;
        }
        for output in outputs {
            self.output(node, output);
        }
    }

    fn output(&mut self, node: NodeId, output: Output) {
        match output {
            Output::Send { to, call, request } => {
                self.send(node, to, Message::Request { call, request })
            }
            Output::Reply { to, call, reply } => {
                self.send(node, to, Message::Reply { call, reply })
            }
            Output::Done(done) => self.op_done(node, done),
            Output::AskDispatcher { call, request } => {
                self.send(node, DISPATCHER, Message::DispatcherCall { call, request })
            }
            Output::Invalidate {
                dataset,
                pages,
                mark,
            } => {
                // The kernel drops them at once (the daemon waits for it before it answers
                // the message that made them stale); the node hears it a moment later.
                trace!(self, "n{node} invalidates d{dataset} pages {pages:?}");
                let kernel = &mut self.nodes.get_mut(&node).expect("node").kernel;
                kernel.invalidate(dataset, &pages);
                let dropped = Event::KernelDropped {
                    node: (node, self.nodes[&node].incarnation),
                    dataset,
                    pages,
                    mark,
                };
                let delay = self.kernel_delay();
                self.schedule(delay, dropped);
            }
            Output::ReadRemote {
                to,
                call,
                offset,
                len,
            } => {
                let reader = (node, self.nodes[&node].incarnation);
                let target = (to, self.nodes[&to].incarnation);
                let delay = self.delay();
                let read = Event::RemoteRead {
                    reader,
                    target,
                    call,
                    offset,
                    len,
                };
                self.schedule(delay, read);
            }
        }
    }

    /// The network: a node's messages to itself always arrive; others may be lost,
    /// duplicated, delayed, or cut by a partition.
    fn send(&mut self, from: NodeId, to: NodeId, message: Message) {
        let incarnation = |world: &World, node: NodeId| {
            if node == DISPATCHER {
                world.dispatcher.incarnation
            } else {
                world.nodes[&node].incarnation
            }
        };
        let ends = ((from, incarnation(self, from)), (to, incarnation(self, to)));
        if from == to {
            let (from, to) = ends;
            self.schedule(
                0,
                Event::Deliver {
                    from,
                    to,
                    message: Box::new(message),
                },
            );
            return;
        }
        let faults = !self.healing;
        if faults && self.cut.contains(&(from, to)) {
            trace!(self, "cut {from}->{to} {}", trace::describe(&message));
            return;
        }
        // With promotion, only a crash silences a node (crash-stop): no heartbeat is lost.
        let losable =
            self.options.promote_after_ms == 0 || (from != DISPATCHER && to != DISPATCHER);
        if faults && losable && self.rng.random_range(0..1000) < self.options.loss_per_mille {
            trace!(self, "lose {from}->{to} {}", trace::describe(&message));
            return;
        }
        let copies = if faults && self.rng.random_range(0..1000) < self.options.duplicate_per_mille
        {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.delay();
            let message = message.clone();
            let (from, to) = ends;
            self.schedule(
                delay,
                Event::Deliver {
                    from,
                    to,
                    message: Box::new(message),
                },
            );
        }
    }

    /// A message's (or a remote read's) time on the wire: a wide range reorders.
    fn delay(&mut self) -> u64 {
        let (low, high) = self.options.delay_ms;
        if self.healing {
            low.min(1)
        } else {
            self.rng.random_range(low..=high)
        }
    }

    /// How long after the kernel dropped pages the node hears it did (0–2 ms).
    fn kernel_delay(&mut self) -> u64 {
        self.rng.random_range(0..=2)
    }

    fn client(&mut self, node: NodeId) {
        let busy = self.workload.busy(node, Thread::Committing);
        if self.healing || self.nodes[&node].machine.is_none() || busy {
            return;
        }
        let op = self.workload.next_op(node, &mut self.rng, self.now_ms);
        let kernel = &mut self.nodes.get_mut(&node).expect("node").kernel;
        // Stores into pages the kernel holds go into its copies (the program's mapping),
        // which it writes back whole at the msync.
        let op = kernel.through_mapping(op);
        trace!(self, "start n{node} {}", trace::describe_op(&op));
        match &op {
            Op::Read { op, dataset, page } => {
                if let Some((version, bytes, failed_over)) = kernel.cached((*dataset, *page)) {
                    let result = OpResult::Read {
                        version: *version,
                        bytes: bytes.clone(),
                        failed_over: *failed_over,
                    };
                    trace!(
                        self,
                        "n{node} reads d{dataset} p{page} from its kernel's cache"
                    );
                    return self.op_done(node, OpDone { op: *op, result });
                }
                if let Some(reader) = kernel.read_in_flight((*dataset, *page)) {
                    kernel.wait_for(reader, *op);
                    trace!(self, "n{node} op {op} waits for read op {reader}");
                    return;
                }
                kernel.start_read(*op, (*dataset, *page));
            }
            Op::Write { .. } | Op::WriteBack { .. } => kernel.write_starts(&op),
            // Views are read from their owners, never through the kernel's cache.
            Op::Commit { .. }
            | Op::Latest { .. }
            | Op::Open { .. }
            | Op::Close { .. }
            | Op::Pin { .. }
            | Op::ReadAt { .. }
            | Op::Unpin { .. } => {}
        }
        self.input(node, Input::Start(op));
    }

    /// The node's storing thread: a store through its kernel's copy of a page, written back
    /// without msync, or the read that brings the page first.
    fn store(&mut self, node: NodeId) {
        let busy = self.workload.busy(node, Thread::Storing);
        if self.healing || self.nodes[&node].machine.is_none() || busy {
            return;
        }
        let kernel = &self.nodes[&node].kernel;
        let cached = |dataset, page| kernel.cached((dataset, page)).map(|c| c.1.clone());
        let locked = |dataset, page| kernel.locked((dataset, page));
        let chosen = self
            .workload
            .next_store(node, &mut self.rng, self.now_ms, cached, locked);
        let Some(op) = chosen else {
            // Nothing to store into now (no dataset it may write, or the page it chose is
            // locked by a write): it tries again later.
            let (low, high) = self.options.think_ms;
            let pause = self.rng.random_range(low..=high).max(1);
            return self.schedule(pause, Event::Store(node));
        };
        trace!(self, "start n{node} storing {}", trace::describe_op(&op));
        let kernel = &mut self.nodes.get_mut(&node).expect("node").kernel;
        match &op {
            Op::Read { op, dataset, page } => {
                if let Some(reader) = kernel.read_in_flight((*dataset, *page)) {
                    kernel.wait_for(reader, *op);
                    trace!(self, "n{node} op {op} waits for read op {reader}");
                    return;
                }
                kernel.start_read(*op, (*dataset, *page));
            }
            Op::Write { .. } | Op::WriteBack { .. } => kernel.write_starts(&op),
            _ => {}
        }
        self.input(node, Input::Start(op));
    }

    /// Read `reading` ended as `result`: the reads waiting for it get what it read, unless
    /// it failed or its page went meanwhile; then the first of them reads the page again
    /// (the others waiting for it), as a kernel faults a dropped page in again.
    fn reading_ended(&mut self, node: NodeId, reading: Reading, result: &OpResult) {
        let Some((first, rest)) = reading.waiting.split_first() else {
            return;
        };
        if matches!(result, OpResult::Read { .. }) && !reading.dropped {
            for op in reading.waiting.iter().copied() {
                trace!(self, "n{node} op {op} takes what its read brought");
                let done = OpDone {
                    op,
                    result: result.clone(),
                };
                self.op_done(node, done);
            }
            return;
        }
        let (dataset, page) = reading.page;
        let kernel = &mut self.nodes.get_mut(&node).expect("node").kernel;
        kernel.start_read(*first, reading.page);
        for op in rest {
            kernel.wait_for(*first, *op);
        }
        let read = Op::Read {
            op: *first,
            dataset,
            page,
        };
        trace!(self, "start n{node} {} (again)", trace::describe_op(&read));
        self.input(node, Input::Start(read));
    }

    fn op_done(&mut self, node: NodeId, done: OpDone) {
        trace!(
            self,
            "done n{node} op {} {}",
            done.op,
            trace::describe_result(&done.result)
        );
        let thread = self.workload.thread_of(node, done.op);
        let kernel = &mut self.nodes.get_mut(&node).expect("node").kernel;
        kernel.op_ended(done.op);
        let reading = kernel.take_read(done.op);
        let read = thread.and_then(|thread| self.workload.finish(node, thread, &done, self.now_ms));
        if let Some(read) = read {
            let cached = (read.version, read.bytes.clone(), read.failed_over);
            let kernel = &mut self.nodes.get_mut(&node).expect("node").kernel;
            if let Some(reading) = &reading {
                kernel.keep(reading, cached);
            }
            // The page's owner, and every node ever promoted in its place.
            let first = self.record(read.dataset).owner_of_page(read.page);
            let owners: Vec<NodeId> = std::iter::once(first)
                .chain(
                    self.promoted
                        .iter()
                        .filter(|(lost, _)| *lost == first)
                        .map(|(_, by)| *by),
                )
                .collect();
            self.checker
                .check_read(self.now_ms, &self.workload, &read, &owners, &self.views);
        }
        let (low, high) = self.options.think_ms;
        let pause = self.rng.random_range(low..=high);
        let next = match thread {
            Some(Thread::Storing) => Event::Store(node),
            _ => Event::Client(node),
        };
        self.schedule(pause, next);
        if let Some(reading) = reading {
            self.reading_ended(node, reading, &done.result);
        }
    }

    /// The dispatcher named this start of the node: it asks for the view next. Every join
    /// must get a new name (transactions and calls are named after it).
    fn joined(&mut self, id: NodeId, incarnation: u64) {
        let node = self.nodes.get_mut(&id).expect("node");
        if !node.joining || node.joined.is_some() {
            return; // a duplicate answer
        }
        if incarnation <= node.joined_as {
            let what = format!(
                "node {id} joined as incarnation {incarnation} after {}",
                node.joined_as
            );
            self.checker.violation(self.now_ms, what);
            return;
        }
        node.joined_as = incarnation;
        node.joined = Some(incarnation);
        self.ask_to_join(id);
    }

    /// The view arrived: the machine starts on the node's PM.
    fn start_machine(
        &mut self,
        id: NodeId,
        incarnation: u64,
        successors: BTreeMap<NodeId, NodeId>,
    ) {
        let nodes = self.nodes.keys().copied().collect();
        let datasets = self.live_datasets().map(|(d, _)| d.clone()).collect();
        let node = self.nodes.get_mut(&id).expect("node");
        node.joining = false;
        node.joined = None;
        let rebuilding = node.rebuilding;
        let config = Config {
            id,
            incarnation,
            nodes,
            datasets,
            rebuilding,
            successors,
            timing: Timing::default(),
            version_block: self.options.version_block,
            one_sided: self.options.one_sided,
            bugs: self.options.bugs,
        };
        let region = Box::new(Arc::clone(&node.region));
        let started = PageTable::open(region, id, CLUSTER_ID)
            .and_then(|(table, _)| Machine::start(config, table, self.now_ms));
        match started {
            Ok(machine) => {
                node.machine = Some(machine);
                node.merger = Merger::default();
                // A machine starts counting every node live.
                let all = self.nodes.keys().copied().collect();
                self.views.record(id, self.now_ms, all);
                self.schedule(1 + u64::from(id), Event::Client(id));
                if self.options.storers {
                    self.schedule(2 + u64::from(id), Event::Store(id));
                }
            }
            Err(error) => {
                self.checker.violation(
                    self.now_ms,
                    format!("node {id} cannot start on its PM: {error}"),
                );
            }
        }
        trace!(
            self,
            "n{id} starts as incarnation {incarnation}{}",
            if rebuilding {
                " (PM wiped, rebuilding)"
            } else {
                ""
            }
        );
    }

    /// Every node up, ready and counting every node live, nothing locked, no call waiting,
    /// no copy undecided, no program waiting.
    pub(crate) fn quiescent(&self) -> bool {
        let successors = self.dispatcher.successors();
        // Every node saw every node's latest start: one that has not seen an owner's restart
        // yet has not told it its copies, and may miss its commits till then.
        let incarnations = self.dispatcher.incarnations();
        let seen_every_start = |machine: &Machine| {
            incarnations
                .iter()
                .all(|(id, incarnation)| machine.incarnation_seen(*id) == Some(*incarnation))
        };
        self.workload.idle()
            && self.nodes.values().all(|node| {
                node.machine.as_ref().is_some_and(|machine| {
                    machine.is_rejoined()
                        && seen_every_start(machine)
                        && machine.sees_live().len() == self.nodes.len()
                        && *machine.successors() == successors
                        && machine.in_flight() == (0, 0)
                        && machine.failed_over_pages() == 0
                        && machine.table().pending().is_empty()
                        && machine.fully_replicated()
                })
            })
    }

    /// The owner of `page` now: its chunk's owner or the node the dispatcher promoted in
    /// its place.
    pub(crate) fn owner_of(&self, dataset: &Dataset, page: u64) -> NodeId {
        let first = dataset.owner_of_page(page);
        self.dispatcher
            .successors()
            .get(&first)
            .copied()
            .unwrap_or(first)
    }

    pub fn seed_rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }
}
