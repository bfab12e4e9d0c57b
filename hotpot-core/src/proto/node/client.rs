//! The committing and reading node's side: a program's stores committed to the pages' owner
//! (MRSW: whole pages against their versions, this node's own copy prepared first; MRMW:
//! byte runs, a busy owner retried after a growing pause), and reads (this node's copy, or
//! the owner's). Must survive: an owner that does not answer (the commit is in doubt and its
//! own copy is settled later), a refusal (nothing of the commit stays).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::{Machine, Output, Purpose};
use crate::page::{PageState, TxKey};
use crate::pm::PAGE_BYTES;
use crate::proto::messages::{NodeReply, NodeRequest, OwnerPages, VersionedPage};
use crate::proto::staged::{Ended, StagedCommit};
use crate::proto::types::{Dataset, DatasetId, FsError, Mode, NodeId};

pub type OpId = u64;

/// A program's request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A program's stores past the kernel's cache (write(2), the daemon's FUSE WRITE) and,
    /// with `msync`, its msync in one: each page this node holds no copy of is fetched first
    /// (as a kernel reads a page before a partial write), the stores are staged as the file
    /// system stages writes, and with `msync` they are committed as `Commit` commits (a
    /// program whose commit failed gives its stores up: their staged pages are dropped);
    /// without it they stay staged, for the next commit of the dataset, and the op ends
    /// `Staged`.
    Write {
        op: OpId,
        dataset: DatasetId,
        stores: Vec<(u64, u16, Vec<u8>)>,
        msync: bool,
    },
    /// A program's stores into pages its kernel holds (a mapping), written back whole by
    /// the kernel. Each page is staged against the base the kernel's copy was served at, as
    /// the daemon stages the kernel's writes; a page whose base this node no longer keeps is
    /// based as `Write`'s. `msync`: the program's msync follows, as `Write`'s (given up if the
    /// commit fails); without it the pages stay staged (the kernel's write-back of another
    /// thread's stores, which the next commit of the dataset takes) and the op ends `Staged`.
    WriteBack {
        op: OpId,
        dataset: DatasetId,
        pages: Vec<(u64, Vec<u8>)>,
        msync: bool,
    },
    /// msync: commit every page staged for `dataset` (MRSW: whole pages against their
    /// versions; MRMW: the bytes changed against each page's base). A commit that failed
    /// leaves them staged, for the next.
    Commit { op: OpId, dataset: DatasetId },
    /// Read one page.
    Read {
        op: OpId,
        dataset: DatasetId,
        page: u64,
    },
    /// `hotpot stat`'s version of a dataset: the newest its home (MRMW) or writer (MRSW)
    /// gave out, an upper bound of every version committed.
    Latest { op: OpId, dataset: DatasetId },
    /// A program opens the dataset for writing (lease.rs): an MRSW dataset's write lease and
    /// versions are this node's until it closes it.
    Open { op: OpId, dataset: DatasetId },
    /// The program closes what it opened for writing: the lease goes back.
    Close { op: OpId, dataset: DatasetId },
    /// A view of `dataset` as it was at `version` (`name@version`, views.rs), numbered
    /// `view` by this node: pinned at every owner, or refused with none pinned. This node
    /// renews the pins until `Unpin`.
    Pin {
        op: OpId,
        dataset: DatasetId,
        view: u64,
        version: u64,
    },
    /// Page `page` of `dataset` as it was at `version` (a pinned view's), from its owner.
    ReadAt {
        op: OpId,
        dataset: DatasetId,
        version: u64,
        page: u64,
    },
    /// The view ends: its pins go.
    Unpin {
        op: OpId,
        dataset: DatasetId,
        view: u64,
    },
}

/// The end of a program's request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpDone {
    pub op: OpId,
    pub result: OpResult,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    /// Acknowledged, with the dataset version it took (0 for a commit with nothing staged).
    Committed { dataset_version: u64 },
    /// Nothing of it was applied.
    Refused(FsError),
    /// It may or may not have been applied (the owner did not answer, or applied it with
    /// fewer confirmed copies than the dataset wants): not acknowledged.
    InDoubt(String),
    Read {
        version: u64,
        bytes: Vec<u8>,
        /// The copy came from another node than the owner, which did not answer (or was
        /// taken so and the owner not asked again yet): the newest only among the nodes that
        /// answered.
        failed_over: bool,
    },
    /// A `WriteBack` without msync: its pages are staged.
    Staged,
    /// `Latest`'s answer.
    Latest { version: u64 },
    /// `Open`: this node writes the dataset (MRSW: it holds the lease and has versions).
    Opened,
    /// `Close`: the lease is given back.
    Closed,
    /// `Pin`: every owner keeps the view's version.
    Pinned,
    /// `ReadAt`'s page.
    ReadAt { bytes: Vec<u8> },
    /// `Unpin`.
    Unpinned,
}

#[derive(Clone, Debug)]
pub(super) enum Step {
    /// A `Write`: fetching the pages this node has no copy of.
    Fetching { missing: BTreeSet<u64> },
    /// Waiting for the owner's answer to commit `tx`.
    Committing { tx: TxKey, own_copy: bool },
    /// MRMW: refused as busy; sent again at `until_ms`.
    Backoff { until_ms: u64 },
    /// Waiting for the owner's copy of a page.
    Reading { page: u64 },
    /// The owner did not answer: gathering the other nodes' copies (failover.rs).
    FailingOver(super::failover::Gathering),
    /// MRMW across owners (across.rs).
    Across(super::across::Phase),
    /// `Latest`: waiting for the home's (MRSW: the dispatcher's, then the writer's) answer.
    AskingLatest,
    /// `Open`: waiting for the dispatcher's lease, then for a block of versions.
    Opening,
    /// A view's pin, or a read at its version (views.rs).
    Viewing(super::views::Viewing),
}

#[derive(Clone, Debug)]
pub(super) struct ClientOp {
    pub(super) dataset: Dataset,
    /// A `Write`'s stores, until they are staged.
    stores: Vec<(u64, u16, Vec<u8>)>,
    /// A `Write`: the program gives its stores up if the commit fails.
    gives_up: bool,
    /// The stores are committed once staged (a `Write` or `WriteBack` without msync: not).
    commits: bool,
    /// The staged pages being committed.
    staged: Option<Arc<StagedCommit>>,
    /// The owner asked (a read's, or a one-owner commit's).
    pub(super) owner: NodeId,
    /// MRSW: the dataset version this node, the writer, gave the commit (versions.rs).
    pub(super) version: Option<u64>,
    pub(super) step: Step,
    pub(super) started_ms: u64,
    pub(super) attempts: u32,
}

impl ClientOp {
    pub(super) fn new(dataset: Dataset, now_ms: u64) -> ClientOp {
        ClientOp {
            dataset,
            stores: Vec::new(),
            gives_up: false,
            commits: true,
            staged: None,
            owner: 0,
            version: None,
            step: Step::Fetching {
                missing: BTreeSet::new(),
            },
            started_ms: now_ms,
            attempts: 0,
        }
    }
}

#[derive(Default)]
pub(super) struct ClientState {
    pub(super) ops: BTreeMap<OpId, ClientOp>,
    /// Commits whose end waits for the kernel to drop its stale copies (`op_done`).
    settling: Vec<Settling>,
}

/// An acknowledged MRMW commit waiting for `Input::Invalidated` with `mark` before it
/// settles and ends.
struct Settling {
    op: OpId,
    done: ClientOp,
    result: OpResult,
    pages: Vec<u64>,
    mark: u64,
}

fn ended(result: &OpResult) -> Ended {
    match result {
        OpResult::Committed { .. } => Ended::Committed,
        OpResult::Refused(_) => Ended::Refused,
        _ => Ended::Failed,
    }
}

/// Longest pause between two tries of a busy MRMW commit.
const BACKOFF_MAX_MS: u64 = 20;

impl Op {
    /// The operation's number and its dataset.
    fn names(&self) -> (OpId, DatasetId) {
        match self {
            Op::Write { op, dataset, .. }
            | Op::WriteBack { op, dataset, .. }
            | Op::Commit { op, dataset }
            | Op::Read { op, dataset, .. }
            | Op::Latest { op, dataset }
            | Op::Open { op, dataset }
            | Op::Close { op, dataset }
            | Op::Pin { op, dataset, .. }
            | Op::ReadAt { op, dataset, .. }
            | Op::Unpin { op, dataset, .. } => (*op, *dataset),
        }
    }

    pub fn id(&self) -> OpId {
        self.names().0
    }
}

impl Machine {
    pub(super) fn start_op(&mut self, op: Op) {
        let (id, dataset_id) = op.names();
        let Some(op) = self.op_waits_for_record(dataset_id, op) else {
            return;
        };
        let dataset = self
            .dataset(dataset_id)
            .cloned()
            .expect("an operation goes on with its dataset's record");
        let writes = matches!(
            op,
            Op::Write { .. } | Op::WriteBack { .. } | Op::Commit { .. }
        );
        if writes && !self.may_write(&dataset) {
            let why = format!(
                "dataset {dataset_id} is MRSW and this node does not hold its write lease (open it for writing first)"
            );
            return self.op_done(id, OpResult::Refused(FsError::Busy(why)));
        }
        match op {
            Op::Read { page, .. } => {
                let owner = self.owner_of(&dataset, page);
                let key = (dataset_id, page);
                let through = self.reads_through(&dataset, page)
                    || (self.table.staged_without_copy(key) && owner != self.config.id);
                if self.table.is_staged(key) && !through {
                    let failed_over = self.is_failed_over(key);
                    return self.read_staged(id, key, failed_over);
                }
                if !through {
                    if let Some((version, bytes)) = self.table.read_persisted(key) {
                        let failed_over = self.is_failed_over(key);
                        let result = OpResult::Read {
                            version,
                            bytes,
                            failed_over,
                        };
                        return self.read_done(id, key, result);
                    }
                }
                let mut reading = ClientOp::new(dataset.clone(), self.now_ms);
                reading.owner = owner;
                reading.step = Step::Reading { page };
                self.client.ops.insert(id, reading);
                self.fetch_page(id, owner, dataset_id, page);
            }
            Op::Write { stores, msync, .. } => {
                let bad = stores
                    .iter()
                    .any(|(_, offset, bytes)| usize::from(*offset) + bytes.len() > PAGE_BYTES);
                if stores.is_empty() || bad {
                    let why = "stores past the end of their page";
                    return self.op_done(id, OpResult::Refused(FsError::Invalid(why.into())));
                }
                // The program writes past the kernel's cache (its pages left it as the write
                // began): the stores are based on this node's copy, or the owner's.
                for (page, _, _) in &stores {
                    self.table.forget_served((dataset_id, *page));
                }
                // A copy its owner has not confirmed since this node's start may be older
                // than this node's own last commit of the page (one in flight at a crash):
                // stores staged on it would be diffed against bytes the owner no longer
                // has, and every stored byte equal to its stale value lost (found by
                // hotpot-sim). So may a copy with a newer one prepared here, waiting for a
                // decision that was lost (found by hotpot-sim, seed 10081251: this node's
                // own acknowledged commit torn by the next). Such pages come from the owner
                // first, like missing ones, as reads of them do.
                let missing: BTreeSet<u64> = stores
                    .iter()
                    .map(|(page, _, _)| *page)
                    .filter(|page| {
                        !self.table.has_copy((dataset_id, *page))
                            || self.reads_through(&dataset, *page)
                    })
                    .collect();
                self.write_pages(id, dataset, stores, missing, msync);
            }
            Op::WriteBack {
                pages: written,
                msync,
                ..
            } => {
                let bad = written.iter().any(|(_, bytes)| bytes.len() != PAGE_BYTES);
                if written.is_empty() || bad {
                    let why = "pages written back not whole";
                    return self.op_done(id, OpResult::Refused(FsError::Invalid(why.into())));
                }
                // A kernel's copy taken while the page's owner was silent (failed over) is
                // no base for a whole page: it may be older than this node's own undecided
                // commit of the page, and a stored byte equal to that older copy's is no
                // change against it, so the commit would carry part of the program's bytes
                // onto its own newer ones (found by hotpot-sim, seed 13753: a stamp torn).
                // Refused; the daemon has the same hazard (docs/design.md, session 20). A
                // copy prepared here is no reason by itself (session 24): the kernel's copy
                // of a page prepared here is dropped before this node answers the Prepare,
                // and one the kernel writes back as it drops it is staged by what the kernel
                // changed in it (`PageTable::stage`). Refusing those failed msync with EIO
                // under `hotpot node --machine` (lock_races, the MRMW conflict storm).
                let behind = written.iter().find_map(|(page, _)| {
                    let key = (dataset_id, *page);
                    let failed_over = self.table.has_kernel_base(key) && self.is_failed_over(key);
                    let behind = self.table.kernel_base_behind_own_prepared(key);
                    match behind.filter(|_| !self.table.is_staged(key)) {
                        Some((base, prepared)) => Some((*page, format!("read at version {base}, this node's own commit of version {prepared} undecided"))),
                        None => failed_over.then(|| (*page, "taken while its owner was silent".to_string())),
                    }
                });
                if let Some((page, how)) = behind {
                    let why = format!(
                        "page {page} of dataset {dataset_id}: the copy written back may be older than this node's own last commit of it ({how}); read it again"
                    );
                    return self.op_done(id, OpResult::Refused(FsError::Io(why)));
                }
                // The kernel's copies keep their bases; a page without one (this node
                // dropped it since) is based on this node's copy or the owner's, as a
                // `Write`'s pages are.
                let missing: BTreeSet<u64> = written
                    .iter()
                    .map(|(page, _)| *page)
                    .filter(|page| {
                        let key = (dataset_id, *page);
                        !self.table.has_kernel_base(key)
                            && (!self.table.has_copy(key) || self.reads_through(&dataset, *page))
                    })
                    .collect();
                let stores = written
                    .into_iter()
                    .map(|(page, bytes)| (page, 0, bytes))
                    .collect();
                self.write_pages(id, dataset, stores, missing, msync);
            }
            Op::Commit { .. } => {
                self.client
                    .ops
                    .insert(id, ClientOp::new(dataset, self.now_ms));
                self.commit_staged(id);
            }
            Op::Latest { .. } => {
                let mut asking = ClientOp::new(dataset.clone(), self.now_ms);
                asking.step = Step::AskingLatest;
                self.client.ops.insert(id, asking);
                self.ask_latest(id, dataset);
            }
            Op::Open { .. } => {
                let mut opening = ClientOp::new(dataset.clone(), self.now_ms);
                opening.step = Step::Opening;
                self.client.ops.insert(id, opening);
                self.open_for_writing(id, &dataset);
            }
            Op::Close { .. } => self.close_for_writing(id, &dataset),
            Op::Pin { view, version, .. } => self.start_pin(id, dataset, view, version),
            Op::ReadAt { version, page, .. } => self.start_read_at(id, dataset, version, page),
            Op::Unpin { view, .. } => self.unpin_view(id, view),
        }
    }

    /// A `Write`'s or `WriteBack`'s stores: the `missing` pages are fetched from their
    /// owners first, then every store is staged and (`commits`) committed; a failed commit
    /// gives them up.
    fn write_pages(
        &mut self,
        id: OpId,
        dataset: Dataset,
        stores: Vec<(u64, u16, Vec<u8>)>,
        missing: BTreeSet<u64>,
        commits: bool,
    ) {
        let owners: Vec<(NodeId, u64)> = missing
            .iter()
            .map(|page| (self.owner_of(&dataset, *page), *page))
            .collect();
        let dataset_id = dataset.id;
        let empty = missing.is_empty();
        let mut write = ClientOp::new(dataset, self.now_ms);
        write.stores = stores;
        write.gives_up = true;
        write.commits = commits;
        write.step = Step::Fetching { missing };
        self.client.ops.insert(id, write);
        for (owner, page) in owners {
            self.fetch_page(id, owner, dataset_id, page);
        }
        if empty {
            self.stage_and_commit(id);
        }
    }

    pub(super) fn op_done(&mut self, op: OpId, result: OpResult) {
        let Some(done) = self.client.ops.remove(&op) else {
            return self.op_end(op, None, result);
        };
        if let Some(staged) = done.staged.clone() {
            let stale = staged.stale_kernel_pages(&done.dataset, ended(&result));
            if !stale.is_empty() {
                // The kernel's copies of the pages go first, and the commit settles once
                // they did, as the daemon's does: a dirty copy the kernel writes back as it
                // drops it (stores made after the commit took the page) is staged onto the
                // pages this commit sent, against the copy's own base. Settled before, its
                // stores would be diffed against a base older than what this commit
                // applied, and one that put back the base's bytes would be lost (found by
                // LMDB's reader table under `hotpot node --machine`).
                let mark = self.table.served_mark();
                self.out.push(Output::Invalidate {
                    dataset: done.dataset.id,
                    pages: stale.clone(),
                    mark,
                });
                self.client.settling.push(Settling {
                    op,
                    done,
                    result,
                    pages: stale,
                    mark,
                });
                return;
            }
            self.settle_staged(&done, &staged, &result);
        }
        self.op_end(op, Some(&done), result);
    }

    /// The kernel dropped `pages` of `dataset` (`mark`): a commit waiting for it settles
    /// and ends.
    pub(super) fn commit_settles(&mut self, dataset: DatasetId, pages: &[u64], mark: u64) {
        let Some(at) = self.client.settling.iter().position(|settling| {
            settling.done.dataset.id == dataset && settling.mark == mark && settling.pages == pages
        }) else {
            return;
        };
        let Settling {
            op, done, result, ..
        } = self.client.settling.remove(at);
        if let Some(staged) = &done.staged {
            self.settle_staged(&done, staged, &result);
        }
        self.op_end(op, Some(&done), result);
    }

    /// An operation is over: its program hears of it (unless it was the machine's own).
    fn op_end(&mut self, op: OpId, done: Option<&ClientOp>, result: OpResult) {
        if let Some(done) = done.filter(|done| done.version.is_some()) {
            // An MRSW writer's commit: the latest may name its version now.
            self.writer_commit_ended(done.dataset.id);
        }
        if self.internal_done(op, &result) {
            return;
        }
        self.out.push(Output::Done(OpDone { op, result }));
    }

    /// A read of a page staged here: this node's view of it, as the daemon serves its kernel
    /// (the staged bytes on the newest copy here), which becomes the kernel's copy and base.
    fn read_staged(&mut self, id: OpId, key: crate::pm::PageKey, failed_over: bool) {
        let mut bytes = vec![0u8; PAGE_BYTES];
        self.table.read_for_kernel(key, &mut bytes);
        let version = match self.table.state(key) {
            Some(PageState::Dirty { twin_version }) => twin_version,
            _ => 0,
        };
        let result = OpResult::Read {
            version,
            bytes,
            failed_over,
        };
        self.op_done(id, result);
    }

    /// A read's end: the kernel holds what it read (`PageTable::read_fetched`: this node's
    /// copy, the owner's, another node's, or the page staged here on one of them), based on
    /// exactly those bytes, until this node invalidates it.
    pub(super) fn read_done(&mut self, id: OpId, key: crate::pm::PageKey, result: OpResult) {
        let OpResult::Read {
            version,
            bytes,
            failed_over,
        } = result
        else {
            return self.op_done(id, result);
        };
        let result = match self.table.read_fetched(key, version, bytes) {
            Ok((version, bytes)) => OpResult::Read {
                version,
                bytes,
                failed_over,
            },
            Err(error) => {
                let error = FsError::Io(format!("keeping page {}'s base: {error}", key.1));
                OpResult::Refused(error)
            }
        };
        self.op_done(id, result);
    }

    /// A `Write`'s pages are all here: its stores staged, then committed (or not: `Staged`).
    fn stage_and_commit(&mut self, id: OpId) {
        let Some(op) = self.client.ops.get_mut(&id) else {
            return;
        };
        let stores = std::mem::take(&mut op.stores);
        let dataset = op.dataset.id;
        let commits = op.commits;
        for (page, offset, bytes) in &stores {
            if let Err(error) = self
                .table
                .stage((dataset, *page), usize::from(*offset), bytes)
            {
                self.table.drop_staged(dataset);
                let error = FsError::Io(format!("staging page {page}: {error}"));
                return self.op_done(id, OpResult::Refused(error));
            }
        }
        if !commits {
            return self.op_done(id, OpResult::Staged);
        }
        self.commit_staged(id);
    }

    /// Take the staged pages of op `id`'s dataset (rebased on the newest copies this node
    /// has), group them by owner, and commit them.
    fn commit_staged(&mut self, id: OpId) {
        let Some(dataset) = self.client.ops.get(&id).map(|op| op.dataset.clone()) else {
            return;
        };
        let snapshots = StagedCommit::snapshot(&mut self.table, dataset.id);
        let owner_of = |page| self.owner_of(&dataset, page);
        let Some(staged) = StagedCommit::group(snapshots, &dataset, owner_of) else {
            return self.op_done(id, OpResult::Committed { dataset_version: 0 });
        };
        if let Some(op) = self.client.ops.get_mut(&id) {
            op.owner = *staged.groups.keys().next().expect("a page staged");
            op.staged = Some(Arc::new(staged));
        }
        self.send_commit(id);
    }

    /// After a commit of staged pages (and, committed MRMW, once the kernel dropped its
    /// copies, which lack the other writers' bytes merged in: `op_done`): committed, they
    /// are clean (writes staged since stay staged, on top of the new bytes); failed, they
    /// stay staged unless the program gave them up, and what an unrefused one sent is kept
    /// for sending again (the owners may hold it).
    fn settle_staged(&mut self, op: &ClientOp, staged: &StagedCommit, result: &OpResult) {
        let ended = ended(result);
        staged.settle(&mut self.table, &op.dataset, ended);
        if ended != Ended::Committed && op.gives_up {
            // Its pages as if never written: staged writes go (also those another thread
            // staged meanwhile), and so do the kernel's copies holding them (the next
            // stores start from this node's copy).
            let dropped = self.table.dirty_pages(op.dataset.id);
            self.table.drop_staged(op.dataset.id);
            self.kernel_stale(op.dataset.id, dropped);
        }
    }

    /// The commit message for op `id`'s staged pages: one owner's, or the three phases
    /// across owners.
    pub(super) fn send_commit(&mut self, id: OpId) {
        let Some(op) = self.client.ops.get(&id).cloned() else {
            return;
        };
        // An MRSW commit carries its version, from this node as the dataset's writer.
        if op.dataset.params.mode == Mode::Mrsw && op.version.is_none() {
            return self.writer_version(id, &op.dataset);
        }
        let staged = op.staged.clone().expect("a commit's pages are staged");
        if staged.groups.len() > 1 {
            return self.start_across(id, staged.groups.clone());
        }
        let tx = self.new_tx();
        let me = self.config.id;
        let (request, own_copy) = match staged.groups.values().next() {
            Some(OwnerPages::Runs(runs)) => {
                let request = NodeRequest::CommitRuns {
                    tx,
                    followers: Vec::new(),
                    dataset: op.dataset.clone(),
                    ino: 0,
                    committer: me,
                    pages: runs.clone(),
                    release: true,
                };
                (request, false)
            }
            Some(OwnerPages::Writes(writes)) => {
                let own_copy = op.owner != me;
                if own_copy {
                    let copies: Vec<(u64, u64, &[u8])> = writes
                        .iter()
                        .map(|write| (write.page, write.base_version + 1, write.bytes.as_slice()))
                        .collect();
                    let prepared = self.table.prepare_copies(
                        tx,
                        op.dataset.id,
                        &copies,
                        true,
                        Default::default(),
                    );
                    if let Err(error) = prepared {
                        let error = FsError::Io(format!("own copy: {error}"));
                        return self.op_done(id, OpResult::Refused(error));
                    }
                }
                let request = NodeRequest::Commit {
                    tx,
                    followers: Vec::new(),
                    dataset: op.dataset.clone(),
                    ino: 0,
                    committer: me,
                    committer_prepared: own_copy,
                    pages: writes.clone(),
                    version: op.version,
                };
                (request, own_copy)
            }
            None => unreachable!("a commit has an owner"),
        };
        if let Some(op) = self.client.ops.get_mut(&id) {
            op.step = Step::Committing { tx, own_copy };
            op.attempts += 1;
        }
        self.send(op.owner, request, Purpose::Op(id));
    }

    /// An answer (or `None`: a timeout) to one of op `id`'s calls.
    pub(super) fn op_answered(&mut self, id: OpId, from: NodeId, reply: Option<NodeReply>) {
        let Some(op) = self.client.ops.get(&id).cloned() else {
            return;
        };
        match op.step {
            Step::Across(phase) => return self.across_answered(id, phase, from, reply),
            Step::FailingOver(gathering) => {
                return self.gathering_answered(id, op.dataset.id, gathering, from, reply)
            }
            Step::Viewing(step) => return self.view_answered(id, step, from, reply),
            _ => {}
        }
        match (op.step, reply) {
            (Step::Reading { page }, None) => self.fail_over(id, op.dataset.id, page, op.owner),
            (Step::Reading { page }, Some(NodeReply::Page(copy)))
                if op.attempts == 0
                    && self
                        .table
                        .prepared_newer_than((op.dataset.id, page), copy.version) =>
            {
                // The owner answered before it locked the page for a commit whose copy is
                // prepared here since: asked again, it answers once that commit is applied
                // or given up. So a read in flight when a Prepare comes never brings the
                // kernel bytes older than the commit this node acknowledges a part of (the
                // runtime does not wait for the kernel to drop such a page: docs/design.md,
                // "Moving the daemon onto the machine", step 1).
                if let Some(op) = self.client.ops.get_mut(&id) {
                    op.attempts = 1;
                }
                self.fetch_page(id, op.owner, op.dataset.id, page);
            }
            (Step::Reading { page }, Some(NodeReply::Page(copy))) => {
                let result = if self.reads_through(&op.dataset, page) {
                    // Not kept: what settles this node's copy comes by its own way.
                    OpResult::Read {
                        version: copy.version,
                        bytes: if copy.version == 0 {
                            vec![0u8; PAGE_BYTES]
                        } else {
                            copy.bytes
                        },
                        failed_over: false,
                    }
                } else {
                    match self.take_fetched(op.dataset.id, page, copy) {
                        Ok((version, bytes)) => OpResult::Read {
                            version,
                            bytes,
                            failed_over: false,
                        },
                        Err(error) => OpResult::Refused(error),
                    }
                };
                self.read_done(id, (op.dataset.id, page), result);
            }
            (Step::Fetching { mut missing }, Some(NodeReply::Page(copy))) => {
                let page = copy.page;
                let (version, bytes) = match self.take_fetched(op.dataset.id, page, copy) {
                    Ok(fetched) => fetched,
                    Err(error) => return self.op_done(id, OpResult::Refused(error)),
                };
                // The stores are staged on the owner's bytes, stored or not (a prepared copy
                // waiting here keeps them from being stored).
                if missing.remove(&page) {
                    if let Err(error) =
                        self.table
                            .serve_copy((op.dataset.id, page), version, &bytes)
                    {
                        let error = FsError::Io(format!("keeping page {page}'s base: {error}"));
                        return self.op_done(id, OpResult::Refused(error));
                    }
                }
                let empty = missing.is_empty();
                if let Some(op) = self.client.ops.get_mut(&id) {
                    op.step = Step::Fetching { missing };
                }
                if empty {
                    self.stage_and_commit(id);
                }
            }
            (
                Step::Committing { tx, own_copy },
                Some(NodeReply::Committed {
                    dataset_version, ..
                }),
            ) => {
                if own_copy {
                    self.table.decide_copies(tx);
                }
                self.op_done(id, OpResult::Committed { dataset_version });
            }
            (Step::AskingLatest, Some(NodeReply::Version(version))) => {
                self.op_done(id, OpResult::Latest { version });
            }
            (Step::Committing { tx, own_copy }, Some(NodeReply::Failed(FsError::Busy(why)))) => {
                if own_copy {
                    self.table.abort_copies(tx);
                }
                self.back_off(id, why);
            }
            (Step::Committing { tx, own_copy }, None) => {
                // The owner may have decided: the own copy waits to be settled with it.
                if own_copy {
                    self.note_decider(tx, from);
                }
                let why = format!("owner {from} did not answer");
                self.op_done(id, OpResult::InDoubt(why));
            }
            (Step::Committing { tx, own_copy }, Some(NodeReply::InDoubt { why, .. })) => {
                // The owner applied it: the own copy is current.
                if own_copy {
                    self.table.decide_copies(tx);
                }
                self.op_done(id, OpResult::InDoubt(why));
            }
            (Step::Committing { tx, own_copy }, Some(other)) => {
                if own_copy {
                    self.table.abort_copies(tx);
                }
                let error = match other {
                    NodeReply::Failed(error) => error,
                    other => FsError::Io(format!("owner {from} answered {other:?}")),
                };
                self.op_done(id, OpResult::Refused(error));
            }
            (_, reply) => {
                let why = match reply {
                    Some(NodeReply::Failed(error)) => error.to_string(),
                    Some(other) => format!("unexpected {other:?}"),
                    None => "no answer".into(),
                };
                let error = FsError::Io(format!("owner {from}: {why}"));
                self.op_done(id, OpResult::Refused(error));
            }
        }
    }

    /// Set op `id`'s step to gathering copies elsewhere.
    pub(super) fn set_step_gathering(&mut self, id: OpId, gathering: super::failover::Gathering) {
        if let Some(op) = self.client.ops.get_mut(&id) {
            op.step = Step::FailingOver(gathering);
        }
    }

    /// Set op `id`'s step (an op that finished meanwhile is left alone).
    pub(super) fn set_step_across(&mut self, id: OpId, phase: super::across::Phase) {
        if let Some(op) = self.client.ops.get_mut(&id) {
            op.step = Step::Across(phase);
        }
    }

    /// After a refusal: retry after a pause, or give up once retries ran too long.
    pub(super) fn back_off(&mut self, id: OpId, why: String) {
        let Some(op) = self.client.ops.get(&id).cloned() else {
            return;
        };
        if self.now_ms >= op.started_ms + self.config.timing.commit_retry_ms {
            let why = format!("commit kept conflicting ({} tries): {why}", op.attempts);
            return self.op_done(id, OpResult::Refused(FsError::Io(why)));
        }
        let until_ms = self.now_ms + self.backoff_ms(id, op.attempts);
        if let Some(op) = self.client.ops.get_mut(&id) {
            op.step = Step::Backoff { until_ms };
        }
    }

    /// Whether a read of `page` must come from its owner although this node may hold a
    /// copy: a newer copy prepared here may be decided already (the Decide not heard yet),
    /// and a copy kept over a restart may have missed commits until the owner answered this
    /// node's registration.
    fn reads_through(&self, dataset: &Dataset, page: u64) -> bool {
        self.table.in_prepared((dataset.id, page))
            || self.unconfirmed(dataset, page)
            || self.owns_unsettled(dataset, page)
    }

    /// Whether `page` is this node's own while its rejoin as an owner is not over: its copy
    /// may be older than another node's (a rebuild after a wipe, a take-over), so reads go
    /// through the owner's path, which answers once the rejoin is over (found by hotpot-sim,
    /// seed 14095132: a rebuilding owner served a program the old copy the first peer sent).
    fn owns_unsettled(&self, dataset: &Dataset, page: u64) -> bool {
        !self.is_ready() && self.owner_of(dataset, page) == self.config.id
    }

    /// Whether this node's copy of `page` waits for its owner to confirm it (a registration
    /// after a start, or after a prepared copy nobody decided): it may be behind.
    fn unconfirmed(&self, dataset: &Dataset, page: u64) -> bool {
        self.target
            .registering
            .waits(self.owner_of(dataset, page), dataset.id)
    }

    /// A fetched copy stored (this node becomes a holder; unless a prepared copy of the
    /// page waits here) and read back: its version and bytes. A page never written is
    /// stored too, as zeros at version 0, as the daemon's reader stores it: it is on the
    /// list of copies this node registers with an owner that restarted.
    fn take_fetched(
        &mut self,
        dataset: DatasetId,
        page: u64,
        mut copy: VersionedPage,
    ) -> Result<(u64, Vec<u8>), FsError> {
        if copy.version == 0 {
            copy.bytes = vec![0u8; PAGE_BYTES];
        }
        if let Err(error) = self
            .table
            .install_copy((dataset, page), copy.version, &copy.bytes)
        {
            return Err(FsError::Io(format!("install: {error}")));
        }
        if self.table.version_of((dataset, page)) >= copy.version {
            // A copy taken during a failover is now the owner's, and this node a holder
            // it knows.
            self.fetched_from_owner((dataset, page));
        }
        Ok((copy.version, copy.bytes))
    }

    /// A random-looking pause below a ceiling that doubles with each try (the same for the
    /// same node, op and try: the machine holds no random generator).
    fn backoff_ms(&self, id: OpId, attempts: u32) -> u64 {
        let ceiling = (1u64 << attempts.min(5)).min(BACKOFF_MAX_MS);
        let mut mix = (u64::from(self.config.id) << 48) ^ (id << 8) ^ u64::from(attempts);
        mix = (mix ^ (mix >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        mix = (mix ^ (mix >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        1 + (mix ^ (mix >> 31)) % ceiling
    }

    /// MRMW commits whose pause is over are sent again.
    pub(super) fn retry_ops(&mut self) {
        let now = self.now_ms;
        let due: Vec<OpId> = self
            .client
            .ops
            .iter()
            .filter(|(_, op)| matches!(op.step, Step::Backoff { until_ms } if until_ms <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.send_commit(id);
        }
    }
}
