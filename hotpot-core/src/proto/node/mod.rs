//! One node's commit protocol as a sans-IO state machine (docs/design.md, "The node machine"):
//! owner (locks, targets, Prepare, apply, Decide), target (prepared copies), committer
//! (MRSW `Commit`, MRMW `CommitRuns`), reader (`Fetch`, or `Locate` and remote reads of the
//! owner's PM), rejoin and re-replication. Time and
//! messages come in through `handle`; PM writes happen inside it (through the page table,
//! persisted before it returns), so every message it hands out is sent after the persist it
//! depends on. Must survive: any message lost, duplicated, delayed or reordered; a crash
//! between any two inputs (a new machine on the crash image); a peer that never answers.

use std::collections::{BTreeMap, BTreeSet};

use crate::page::Run;
use crate::page::{PageTable, TxKey};
use crate::pm::{PageKey, PmError};
use crate::proto::messages::{
    DispatcherReply, DispatcherRequest, NodeReply, NodeRequest, OwnerPages,
};
use crate::proto::rejoin::Incarnations;
use crate::proto::types::{Dataset, DatasetId, FsError, NodeId, NodeInfo};

mod across;
mod client;
mod commit;
mod failover;
mod lease;
mod multi;
mod one_sided;
mod owner;
mod records;
mod target;
#[cfg(test)]
mod tests;
mod versions;
mod views;

pub use client::{Op, OpDone, OpId, OpResult};

/// Deliberately broken variants, for tests that must see the simulator's checkers fail.
/// All false in every real node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bugs {
    /// The owner answers the committer before its own apply is persisted.
    pub ack_before_persist: bool,
    /// The owner takes no page lock for a commit (MRMW's phase 1).
    pub skip_commit_lock: bool,
    /// The owner leaves holders out of a commit's targets: their copies go stale.
    pub skip_holder_invalidation: bool,
    /// A home gives out the first block's versions at every start, as only the first start
    /// of the dataset's first home may: numbers given before come again.
    pub reuse_first_block: bool,
    /// An MRSW writer keeps its block of versions when it gives the lease back: opened
    /// again after another writer, it gives numbers below that writer's.
    pub keep_versions_after_close: bool,
    /// A holder takes no notice of an owner's restart: an owner whose rejoin did not hear
    /// from it (cut off, or counted down) never learns its copies, and leaves it out.
    pub ignore_owner_restarts: bool,
    /// An owner answers a read at a version with its current copy: a view shows commits
    /// made after its version.
    pub read_views_current: bool,
    /// A one-sided read takes the frame's bytes without checking the slot read after them
    /// (or the checksum): a frame a commit freed and another page reused is taken for the
    /// version `Locate` named.
    pub trust_one_sided_frame: bool,
    /// When the kernel has dropped pages, every base of them is forgotten, also one served
    /// since the drop began (a read racing it): the kernel's copy from that read has no
    /// base, and its write-back is diffed against whatever copy is committed by then.
    pub forget_reread_bases: bool,
    /// A commit's end keeps staged whatever differs from the snapshot's bytes: a page a
    /// read rebased while the commit ran keeps the bytes that rebase brought, older than a
    /// copy decided since, and the next commit sends them (the daemon's bug of session 21).
    pub keep_rebased_bytes: bool,
}

/// Bounds, in virtual (or real) milliseconds.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// A call not answered within this is failed.
    pub call_timeout_ms: u64,
    /// A request waiting for a page lock longer than this is refused.
    pub lock_wait_ms: u64,
    /// A request waiting for this node's rejoin to end longer than this is refused (the
    /// daemon's 30 s, three of its 10 s call timeouts).
    pub ready_wait_ms: u64,
    /// A prepared copy undecided for this long is settled with its owner.
    pub resolve_after_ms: u64,
    /// How often an owner looks for pages with fewer copies than the dataset wants.
    pub rereplicate_every_ms: u64,
    /// How long a committer retries an MRMW commit refused as busy.
    pub commit_retry_ms: u64,
    /// How long a request or operation naming a dataset this node does not know waits for
    /// the dispatcher's list of datasets (the daemon's retries of an unreachable dispatcher).
    pub dispatcher_wait_ms: u64,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            call_timeout_ms: 1_000,
            lock_wait_ms: 2_000,
            ready_wait_ms: 3_000,
            resolve_after_ms: 3_000,
            rereplicate_every_ms: 500,
            commit_retry_ms: 10_000,
            dispatcher_wait_ms: 15_000,
        }
    }
}

/// What a machine is started with.
#[derive(Clone, Debug)]
pub struct Config {
    pub id: NodeId,
    /// How many times this node has started (names its transactions apart from an earlier
    /// start's, whose prepared copies may still wait on other nodes).
    pub incarnation: u64,
    /// The cluster's nodes when this node started, this one included (a node that joins
    /// later is learned from the dispatcher's views, or when it asks for a copy).
    pub nodes: Vec<NodeId>,
    /// The datasets the dispatcher listed at this start (`LiveDatasets`); one made since is
    /// learned when something names it (records.rs).
    pub datasets: Vec<Dataset>,
    /// This node started on a new (wiped) PM while datasets exist: it rebuilds the pages it
    /// owns from the newest copies on the other nodes before it serves as their owner.
    pub rebuilding: bool,
    /// The dispatcher's promotions when this start joined: a lost node → the node that owns
    /// its chunks now (a node replaced stays replaced: it comes back as a holder only).
    pub successors: BTreeMap<NodeId, NodeId>,
    pub timing: Timing,
    /// How many versions a block from the dispatcher holds (its `version_block`).
    pub version_block: u64,
    /// Peers' PM can be read one-sided (the daemon's verbs links to peers that expose their
    /// PM): a page comes with `Locate` and two remote reads, not `Fetch` (one_sided.rs).
    pub one_sided: bool,
    pub bugs: Bugs,
}

impl Machine {
    /// Every other node of the cluster, as far as this node knows (its start's nodes, and
    /// every node the dispatcher's views named since).
    pub(super) fn peers(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .copied()
            .filter(|node| *node != self.config.id)
            .collect()
    }

    /// The nodes that count as up for replication: the dispatcher's last view (every node
    /// until the first), this node, and peers that asked for a copy since.
    pub(super) fn live(&self) -> BTreeSet<NodeId> {
        self.live.clone()
    }

    /// The nodes this machine counts as live (for `hotpot-sim`'s settle check).
    pub fn sees_live(&self) -> &BTreeSet<NodeId> {
        &self.live
    }

    /// The dispatcher's view arrived: a node it counts as down is left out of commits (a
    /// holder it skips catches up by re-replication once it is live again); a node promoted
    /// in place of a lost one owns its chunks from now on (this one takes them over).
    fn take_view(&mut self, live: BTreeSet<NodeId>, successors: BTreeMap<NodeId, NodeId>) {
        self.live = live
            .into_iter()
            .filter(|node| self.nodes.contains(node))
            .chain(std::iter::once(self.config.id))
            .collect();
        let me = self.config.id;
        let gains = successors
            .iter()
            .any(|(lost, by)| *by == me && self.successors.get(lost) != Some(by));
        self.successors = successors;
        self.registrations_follow_promotions();
        if gains {
            self.take_over();
        }
    }

    /// `node`'s incarnation in the dispatcher's last view (for `hotpot-sim`'s settle check:
    /// a node that has not seen an owner's restart yet may still miss its commits).
    pub fn incarnation_seen(&self, node: NodeId) -> Option<u64> {
        self.incarnations.of(node)
    }

    /// Replaced by a promotion and counted down: what it held is on other nodes.
    pub(super) fn is_lost(&self, node: NodeId) -> bool {
        self.successors.contains_key(&node) && !self.live.contains(&node)
    }

    /// `node` just asked this owner for a copy: it is up, whatever the last view said, so
    /// the next commit counts it (and sends it the new bytes) at once; a node that joined
    /// the cluster since this one's last view is one of its nodes from now on.
    pub(super) fn mark_live(&mut self, node: NodeId) {
        if node != DISPATCHER {
            self.nodes.insert(node);
            self.live.insert(node);
        }
    }

    /// The nodes that ever joined, by the dispatcher's view (its incarnations): a node that
    /// joined the cluster after this one started is one of its nodes from now on.
    fn note_nodes(&mut self, incarnations: &BTreeMap<NodeId, u64>) {
        self.nodes
            .extend(incarnations.keys().filter(|node| **node != DISPATCHER));
    }
}

/// An input to `Machine::handle`.
#[derive(Clone, Debug)]
pub enum Input {
    /// A peer's (or this node's own) request.
    Request {
        from: NodeId,
        call: u64,
        request: NodeRequest,
    },
    /// The answer to one of this machine's calls.
    Reply {
        from: NodeId,
        call: u64,
        reply: NodeReply,
    },
    /// A program on this node wants something done.
    Start(Op),
    /// The file system learned a dataset's record from the dispatcher (a file's lookup or
    /// open), as a request carrying one teaches it: a program's operations on it need not
    /// wait for the dispatcher's list, which leaves out a file unlinked while open here.
    Record(Dataset),
    /// The dispatcher's view (its answer to a heartbeat): the nodes it counts as live, the
    /// nodes promoted in place of lost ones, and how many times each node joined.
    View {
        live: BTreeSet<NodeId>,
        successors: BTreeMap<NodeId, NodeId>,
        incarnations: BTreeMap<NodeId, u64>,
    },
    /// The dispatcher's answer to one of this machine's calls (`Output::AskDispatcher`).
    DispatcherReply { call: u64, reply: DispatcherReply },
    /// The bytes a remote read (`Output::ReadRemote`) found in `from`'s PM; `None`: the
    /// read failed (the link to that start of the node is gone).
    RemoteRead {
        from: NodeId,
        call: u64,
        bytes: Option<Vec<u8>>,
    },
    /// The kernel dropped the pages an `Output::Invalidate` named (a dirty one was
    /// written back first): their bases served before `mark` are forgotten.
    Invalidated {
        dataset: DatasetId,
        pages: Vec<u64>,
        mark: u64,
    },
    /// Time passed (every input carries `now_ms` too).
    Tick,
}

impl Input {
    /// The dispatcher's status (its answer to a heartbeat) as the machine's view.
    pub fn view(nodes: &[NodeInfo], successors: BTreeMap<NodeId, NodeId>) -> Input {
        Input::View {
            live: nodes.iter().filter(|n| n.live).map(|n| n.id).collect(),
            successors,
            incarnations: nodes.iter().map(|n| (n.id, n.incarnation)).collect(),
        }
    }
}

/// What the runtime must do, in order, after `handle` returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Send {
        to: NodeId,
        call: u64,
        request: NodeRequest,
    },
    Reply {
        to: NodeId,
        call: u64,
        reply: NodeReply,
    },
    Done(OpDone),
    /// A call to the dispatcher (its answer comes as `Input::DispatcherReply`).
    AskDispatcher {
        call: u64,
        request: DispatcherRequest,
    },
    /// The kernel's cached copies of these pages are out of date (a commit changed the
    /// bytes under them): drop them, so the next read asks the file system, then say so
    /// with `Input::Invalidated` and this `mark` (until then the bases stay: a dirty copy
    /// is written back against its own).
    Invalidate {
        dataset: DatasetId,
        pages: Vec<u64>,
        mark: u64,
    },
    /// Read `len` bytes at `offset` of node `to`'s PM one-sided, without its CPU (RDMA
    /// READ); the bytes come back as `Input::RemoteRead`.
    ReadRemote {
        to: NodeId,
        call: u64,
        offset: u64,
        len: usize,
    },
}

/// Why this machine is waiting for a call's answer.
#[derive(Clone, Debug)]
enum Purpose {
    /// A commit this node owns: a target's answer to Prepare or Decide.
    Target { tx: TxKey },
    /// Fire and forget (Abort, Install): the answer changes nothing.
    Notice,
    /// Re-replication: the node stores the copy at this version.
    Install { key: PageKey, version: u64 },
    /// A program's operation on this node.
    Op(OpId),
    /// The dispatcher's list of datasets, for inputs naming one this node does not know.
    Records,
    /// Settling prepared copy `tx` with its owner.
    Resolve { tx: TxKey },
    /// A leader's answer about commit `tx`, for a follower record (`target` None) or a
    /// target's copy.
    Outcome { tx: TxKey, target: Option<TxKey> },
    /// A leader asked whether anything here still waits for commit `tx`'s outcome.
    Pending { tx: TxKey },
    /// A leader that lost its PM asked whether this node decided a copy of commit `tx`.
    DecidedCommit { tx: TxKey },
    /// Rejoin: a peer's copies of the pages this node owns (`learn`), or an owner told
    /// this node's copies of its pages.
    Rejoin { dataset: DatasetId, learn: bool },
    /// A page taken elsewhere while its owner was silent, fetched again from the owner.
    Refetch { key: PageKey },
    /// A commit this node owns: the home's answer to `Version`.
    Version { tx: TxKey },
    /// As a home or writer: a block of versions from the dispatcher; an MRSW writer's for
    /// the open it writes under (`None`: a home's).
    VersionBlock {
        dataset: DatasetId,
        open: Option<u64>,
    },
    /// A program's `Open`: the dispatcher's answer to `AcquireLease` for open `open`.
    Lease { op: OpId, open: u64 },
    /// A program's MRSW `Latest`: the dispatcher's `VersionState`.
    LatestState { op: OpId },
    /// A page fetched one-sided for a program's operation (one_sided.rs).
    OneSided(Box<one_sided::Fetching>),
}

/// The dispatcher, as the peer of a machine's calls (node ids start at 1).
pub const DISPATCHER: NodeId = 0;

#[derive(Clone, Debug)]
struct Call {
    to: NodeId,
    purpose: Purpose,
    deadline_ms: u64,
}

pub struct Machine {
    config: Config,
    table: PageTable,
    now_ms: u64,
    next_call: u64,
    next_tx: u64,
    calls: BTreeMap<u64, Call>,
    /// Every node of the cluster this node knows (`Config.nodes`, then `note_nodes`).
    nodes: BTreeSet<NodeId>,
    live: BTreeSet<NodeId>,
    /// A lost node → the node promoted in its place (the dispatcher's last view).
    successors: BTreeMap<NodeId, NodeId>,
    /// How many times each node had joined, by the dispatcher's last view.
    incarnations: Incarnations,
    owner: owner::OwnerState,
    multi: multi::MultiState,
    client: client::ClientState,
    target: target::TargetState,
    failover: failover::FailoverState,
    versions: versions::VersionState,
    views: views::ViewState,
    records: records::RecordState,
    out: Vec<Output>,
}

impl Machine {
    /// A node starting on `table` (a new pool, or the crash image of an earlier start). The
    /// pages of datasets `config` does not list go first.
    ///
    /// A node the dispatcher replaced (promoted another in its place) owns nothing any more,
    /// and its copies of the pages it owned may hold commits it applied alone that never
    /// reached anyone else (never acknowledged), under version numbers its successor may
    /// since have given other bytes. It drops every copy first: every page it holds has an
    /// owner elsewhere, whose copy is the one to have (the error: the drop failed).
    pub fn start(config: Config, mut table: PageTable, now_ms: u64) -> Result<Machine, PmError> {
        assert!(
            config.nodes.contains(&config.id),
            "a node is in its cluster"
        );
        // A dataset the dispatcher no longer lists (deleted) keeps no pages here, as the
        // daemon drops them at its start; a replaced node keeps none at all.
        let kept: BTreeSet<DatasetId> = if config.successors.contains_key(&config.id) {
            BTreeSet::new()
        } else {
            config.datasets.iter().map(|d| d.id).collect()
        };
        let dropped: Vec<DatasetId> = table.pool().datasets().difference(&kept).copied().collect();
        for dataset in dropped {
            table.drop_dataset(dataset)?;
        }
        table.planted_keep_rebased_bytes = config.bugs.keep_rebased_bytes;
        let first_call = (config.incarnation << 40) | 1;
        let nodes: BTreeSet<NodeId> = config.nodes.iter().copied().collect();
        let live = nodes.clone();
        let successors = config.successors.clone();
        let versions = versions::VersionState::new(config.version_block);
        let records = records::RecordState::new(&config.datasets);
        let mut machine = Machine {
            config,
            table,
            now_ms,
            // Call ids never repeat across starts: a late answer to an earlier start's
            // call cannot be taken for one of this start's.
            next_call: first_call,
            next_tx: 1,
            calls: BTreeMap::new(),
            nodes,
            live,
            successors,
            incarnations: Incarnations::default(),
            owner: Default::default(),
            multi: Default::default(),
            client: Default::default(),
            target: Default::default(),
            failover: Default::default(),
            versions,
            views: Default::default(),
            records,
            out: Vec::new(),
        };
        machine.lock_waiting_records();
        machine.start_rejoin();
        machine.take_home_blocks();
        Ok(machine)
    }

    /// The promotions this machine knows (the dispatcher's last view).
    pub fn successors(&self) -> &BTreeMap<NodeId, NodeId> {
        &self.successors
    }

    pub fn id(&self) -> NodeId {
        self.config.id
    }

    pub fn table(&self) -> &PageTable {
        &self.table
    }

    /// The page table, for what the file system does to it directly (stage a program's
    /// writes, serve its reads) between inputs.
    pub fn table_mut(&mut self) -> &mut PageTable {
        &mut self.table
    }

    /// Whether this node serves as an owner (its rejoin is over).
    pub fn is_ready(&self) -> bool {
        self.target.rejoin.is_empty()
    }

    /// Whether the rejoin is over on both sides: this owner knows its pages' holders, and
    /// every owner knows this node's copies (and sent it newer ones).
    pub fn is_rejoined(&self) -> bool {
        self.is_ready() && self.target.registering.is_empty()
    }

    /// Page locks held by commits at this owner, and calls not answered yet.
    pub fn in_flight(&self) -> (usize, usize) {
        (self.owner.locks.len(), self.calls.len())
    }

    /// Nodes this owner counts as holding `key` (may hold a copy; get every commit).
    pub fn holders_of(&self, key: PageKey) -> BTreeSet<NodeId> {
        self.owner.copies.holders_of(&[key])
    }

    /// Nodes this owner counts as holding its current version of `key`.
    pub fn current_copies(&self, key: PageKey) -> BTreeSet<NodeId> {
        self.owner.copies.current_of(key)
    }

    /// Take one input at `now_ms`; the outputs, to be carried out in order.
    pub fn handle(&mut self, now_ms: u64, input: Input) -> Vec<Output> {
        assert!(now_ms >= self.now_ms, "time never goes back");
        self.now_ms = now_ms;
        match input {
            Input::Request {
                from,
                call,
                request,
            } => self.on_request(from, call, request),
            Input::Reply { from, call, reply } => self.on_reply(from, call, reply),
            Input::Start(op) => self.start_op(op),
            Input::Record(record) => self.note_record(record),
            Input::View {
                live,
                successors,
                incarnations,
            } => {
                self.note_nodes(&incarnations);
                self.take_view(live, successors);
                self.note_restarts(incarnations);
            }
            Input::DispatcherReply { call, reply } => self.on_dispatcher_reply(call, reply),
            Input::RemoteRead { from, call, bytes } => self.on_remote_read(from, call, bytes),
            Input::Invalidated {
                dataset,
                pages,
                mark,
            } => self.kernel_dropped(dataset, &pages, mark),
            // Rejoin calls that failed go again at the next tick, not at once.
            Input::Tick => self.continue_rejoin(),
        }
        if self.is_ready() && self.owner.waits_for_ready() {
            self.unpark();
        }
        self.expire_calls();
        self.expire_record_waits();
        self.expire_parked();
        self.expire_phase1();
        self.sweep_outcomes();
        self.resolve_pending();
        self.rereplicate();
        self.refill_versions();
        self.refetch_taken();
        self.retry_ops();
        self.expire_pins();
        self.renew_pins();
        std::mem::take(&mut self.out)
    }

    fn on_request(&mut self, from: NodeId, call: u64, request: NodeRequest) {
        let Some(request) = self.request_waits_for_record(from, call, request) else {
            return;
        };
        if self.waits_until_ready(&request) {
            return self.park_until_ready(from, call, request);
        }
        let reply = match request {
            request @ (NodeRequest::Fetch { .. } | NodeRequest::Locate { .. }) => {
                self.serve_fetch(from, call, request);
                return;
            }
            request @ (NodeRequest::Commit { .. }
            | NodeRequest::CommitRuns { .. }
            | NodeRequest::OwnerPrepare { .. }) => {
                return self.on_commit_request(from, call, request);
            }
            NodeRequest::OwnerDecide { tx, version } => {
                self.follower_decide(tx, Some(version), Some((from, call)));
                return;
            }
            NodeRequest::OwnerAbort { tx } => {
                self.follower_abort(tx);
                NodeReply::Done
            }
            NodeRequest::Lock { tx, dataset, pages } => self.serve_lock(tx, dataset, &pages),
            NodeRequest::Unlock { tx, dataset, pages } => self.serve_unlock(tx, dataset, &pages),
            NodeRequest::Outcome { tx, .. } => {
                self.serve_outcome(from, call, tx);
                return;
            }
            NodeRequest::DecidedCommit { tx } => self.serve_decided_commit(tx),
            NodeRequest::Confirm { txs, node } => self.serve_confirm(&txs, node),
            NodeRequest::Pending { tx } => NodeReply::Decision(self.waits_for(tx)),
            NodeRequest::Register {
                dataset,
                from: node,
                pages,
                tx,
            } => {
                self.serve_register(from, call, dataset, node, pages, tx);
                return;
            }
            NodeRequest::Prepare {
                tx,
                owner,
                commit,
                dataset,
                committer,
                pages,
            } => self.serve_prepare(tx, owner, commit, dataset, committer, &pages),
            NodeRequest::Decide { tx, .. } => self.serve_decide(tx),
            NodeRequest::Abort { tx } => self.serve_abort(tx),
            NodeRequest::Install { dataset, pages } => self.serve_install(dataset, &pages),
            NodeRequest::FetchCopies { dataset, pages } => self.serve_fetch_copies(dataset, pages),
            NodeRequest::FetchCopy { dataset, page } => self.serve_fetch_copy(dataset, page),
            NodeRequest::Pin {
                view,
                dataset,
                version,
            } => return self.serve_pin(from, call, view, dataset, version),
            NodeRequest::Unpin { view } => self.serve_unpin(view),
            NodeRequest::RenewPins { views } => self.serve_renew(&views),
            NodeRequest::ReadAt {
                dataset,
                version,
                pages,
            } => return self.serve_read_at(from, call, dataset, version, pages),
            NodeRequest::Version { dataset, take } => {
                return self.serve_version(from, call, dataset, take);
            }
            NodeRequest::Latest { dataset } => return self.serve_latest(from, call, dataset),
            NodeRequest::PinnedVersions { dataset } => self.serve_pinned_versions(dataset),
            NodeRequest::PageCopies { dataset } => {
                NodeReply::PageCopies(self.table.page_copies(dataset))
            }
            other => NodeReply::Failed(FsError::Invalid(format!(
                "the node machine does not serve {}",
                request_name(&other)
            ))),
        };
        self.reply(from, call, reply);
    }

    /// `Commit` (MRSW), `CommitRuns` (MRMW): this owner alone, or leading the owners in
    /// `followers`; `OwnerPrepare`: a follower's part of a commit across owners.
    fn on_commit_request(&mut self, from: NodeId, call: u64, request: NodeRequest) {
        let (tx, dataset, committer, committer_prepared, work, followers) = match request {
            NodeRequest::Commit {
                tx,
                followers,
                dataset,
                committer,
                committer_prepared,
                pages,
                version,
                ..
            } => {
                let work = commit::Work::Writes(pages, version);
                (
                    tx,
                    dataset,
                    committer,
                    committer_prepared,
                    work,
                    Ok(followers),
                )
            }
            NodeRequest::CommitRuns {
                tx,
                followers,
                dataset,
                committer,
                pages,
                ..
            } => {
                let work = commit::Work::Runs(pages);
                (tx, dataset, committer, false, work, Ok(followers))
            }
            NodeRequest::OwnerPrepare {
                tx,
                dataset,
                committer,
                committer_prepared,
                leader,
                pages,
                ..
            } => {
                let work = match pages {
                    OwnerPages::Runs(pages) => commit::Work::Runs(pages),
                    // A follower's part: the version comes with the decision (`OwnerDecide`).
                    OwnerPages::Writes(pages) => commit::Work::Writes(pages, None),
                };
                (
                    tx,
                    dataset,
                    committer,
                    committer_prepared,
                    work,
                    Err(leader),
                )
            }
            _ => unreachable!("only commit requests come here"),
        };
        let role = match followers {
            Ok(followers) => match self.commit_role(followers) {
                Some(role) => role,
                None => return self.reply(from, call, across_ids_refused()),
            },
            Err(leader) => commit::Role::Follower { leader },
        };
        self.serve_commit(
            from,
            call,
            tx,
            dataset,
            committer,
            committer_prepared,
            work,
            role,
        );
    }

    fn on_reply(&mut self, from: NodeId, call: u64, reply: NodeReply) {
        // A duplicate, or an answer after the call was given up: nothing waits for it.
        let Some(pending) = self.calls.remove(&call) else {
            return;
        };
        if pending.to != from {
            // Not the node asked: ignore, the call times out.
            self.calls.insert(call, pending);
            return;
        }
        self.peer_may_not_know(&reply);
        self.answered(pending.purpose, from, Some(reply));
    }

    fn on_dispatcher_reply(&mut self, call: u64, reply: DispatcherReply) {
        let Some(pending) = self.calls.remove(&call) else {
            return;
        };
        match pending.purpose {
            Purpose::VersionBlock { dataset, open } => {
                self.block_answered(dataset, open, Some(reply))
            }
            Purpose::Lease { op, open } => self.lease_answered(op, open, Some(reply)),
            Purpose::LatestState { op } => self.latest_state_answered(op, Some(reply)),
            Purpose::Records => self.records_answered(Some(reply)),
            Purpose::Notice => {}
            // An answer from the dispatcher to a call made to a node: not this call's.
            purpose => {
                self.calls.insert(call, Call { purpose, ..pending });
            }
        }
    }

    /// A call's answer, or `None` when it timed out.
    fn answered(&mut self, purpose: Purpose, from: NodeId, reply: Option<NodeReply>) {
        match purpose {
            Purpose::Target { tx } => self.target_answered(tx, from, reply),
            Purpose::Notice => {}
            Purpose::Install { key, version } => self.install_answered(key, version, from, reply),
            Purpose::Op(op) => self.op_answered(op, from, reply),
            Purpose::Resolve { tx } => self.resolve_answered(tx, reply),
            Purpose::Outcome { tx, target } => self.outcome_answered(tx, target, reply),
            Purpose::Pending { tx } => self.pending_answered(tx, from, reply),
            Purpose::DecidedCommit { tx } => self.decided_commit_answered(tx, from, reply),
            Purpose::Rejoin { dataset, learn } => self.rejoin_answered(from, dataset, learn, reply),
            Purpose::Refetch { key } => self.refetch_answered(key, reply),
            Purpose::Version { tx } => self.version_answered(tx, from, reply),
            // Timed out (a dispatcher answer comes through `on_dispatcher_reply`).
            Purpose::VersionBlock { dataset, open } => self.block_answered(dataset, open, None),
            Purpose::Lease { op, open } => self.lease_answered(op, open, None),
            Purpose::LatestState { op } => self.latest_state_answered(op, None),
            Purpose::Records => self.records_answered(None),
            Purpose::OneSided(fetching) => self.one_sided_answered(*fetching, from, reply),
        }
    }

    fn expire_calls(&mut self) {
        let now = self.now_ms;
        let expired: Vec<u64> = self
            .calls
            .iter()
            .filter(|(_, call)| call.deadline_ms <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(call) = self.calls.remove(&id) {
                self.answered(call.purpose, call.to, None);
            }
        }
    }

    fn send(&mut self, to: NodeId, request: NodeRequest, purpose: Purpose) {
        let call = self.new_call(to, purpose);
        self.out.push(Output::Send { to, call, request });
    }

    fn ask_dispatcher(&mut self, request: DispatcherRequest, purpose: Purpose) {
        let call = self.new_call(DISPATCHER, purpose);
        self.out.push(Output::AskDispatcher { call, request });
    }

    /// A call to `to`, failed (answered `None`) if no answer comes within the timeout.
    fn new_call(&mut self, to: NodeId, purpose: Purpose) -> u64 {
        let call = self.next_call;
        self.next_call += 1;
        self.calls.insert(
            call,
            Call {
                to,
                purpose,
                deadline_ms: self.now_ms + self.config.timing.call_timeout_ms,
            },
        );
        call
    }

    fn reply(&mut self, to: NodeId, call: u64, reply: NodeReply) {
        self.out.push(Output::Reply { to, call, reply });
    }

    /// `pages` of `dataset` changed here under whatever the kernel caches of them (a commit
    /// another node made, a copy installed): the kernel drops its copies, and then
    /// (`kernel_dropped`) the bases it was served. Not for this node's own commits of whole
    /// pages: its kernel holds those bytes already.
    fn kernel_stale(&mut self, dataset: DatasetId, pages: Vec<u64>) {
        if pages.is_empty() {
            return;
        }
        let mark = self.table.served_mark();
        self.out.push(Output::Invalidate {
            dataset,
            pages,
            mark,
        });
    }

    /// The kernel dropped `pages`: the bases served before `mark` go. One served since
    /// stays: a read after the drop began, whose copy the kernel holds (the daemon's
    /// `invalidate`).
    fn kernel_dropped(&mut self, dataset: DatasetId, pages: &[u64], mark: u64) {
        for page in pages {
            if self.config.bugs.forget_reread_bases {
                self.table.forget_served((dataset, *page));
            } else {
                self.table.forget_served_before((dataset, *page), mark);
            }
        }
        self.commit_settles(dataset, pages, mark);
    }

    /// A transaction name no earlier start of this node used.
    fn new_tx(&mut self) -> TxKey {
        let seq = (self.config.incarnation << 40) | self.next_tx;
        self.next_tx += 1;
        (self.config.id, seq)
    }

    /// This owner's part in a commit with `followers`: the only owner, or the leader
    /// (`None`: a node id past 64, which a commit across owners cannot name).
    fn commit_role(&self, mut followers: Vec<NodeId>) -> Option<commit::Role> {
        if followers.is_empty() {
            return Some(commit::Role::Single);
        }
        followers.push(self.config.id);
        crate::pm::TxTag::bitmap(&followers)
            .map(|participants| commit::Role::Leader { participants })
    }
}

/// Runs of one page, as `CommitRuns` carries them.
pub type PageRuns = (u64, Vec<Run>);

fn across_ids_refused() -> NodeReply {
    let why = "commits across owners need node ids 1..=64";
    NodeReply::Failed(FsError::Invalid(why.into()))
}

fn request_name(request: &NodeRequest) -> String {
    let debug = format!("{request:?}");
    debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or("?")
        .to_string()
}
