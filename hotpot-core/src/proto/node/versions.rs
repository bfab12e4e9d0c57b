//! Dataset versions (docs/design.md, "Dataset versions"): an MRMW commit takes the next
//! version of its dataset from the dataset's home (the owner of chunk 0 now) once all its
//! pages are locked and prepared, and applies with it; an MRSW commit brings its writer's
//! (the committing node, the dataset's one writer). A home or writer gives them out of
//! blocks the dispatcher grants (`proto/versions.rs`, the daemon's own sequencer), with a
//! spare taken ahead once a block is half given out. Must survive: a home that does not
//! answer (the commit aborts, nothing applied), a dispatcher that does not answer (every
//! asker refused, asked again by the next commit), a home or writer that restarts or is
//! replaced (a new block: versions skip, they never repeat or go back), a commit given up
//! while it waits for its version (the version is skipped).

use std::collections::BTreeMap;

use super::commit::Step;
use super::{Machine, OpId, OpResult, Purpose};
use crate::page::TxKey;
use crate::proto::messages::{DispatcherReply, DispatcherRequest, NodeReply, NodeRequest};
use crate::proto::types::{Dataset, DatasetId, FsError, Mode, NodeId};
use crate::proto::versions::{Give, Sequencer};

/// Who waits for a version.
#[derive(Clone, Copy, Debug)]
enum Asker {
    /// A peer's `Version` call.
    Peer { from: NodeId, call: u64, take: bool },
    /// A commit this node owns, waiting to apply.
    Commit { tx: TxKey },
    /// A program's `Latest` on this node.
    Op { id: OpId },
    /// A program's MRSW commit on this node, its writer.
    Writer { id: OpId },
    /// A program's `Open` of an MRSW dataset whose lease this node just took (lease.rs):
    /// waits for a block, takes no version.
    Opener { id: OpId, dataset: DatasetId },
}

#[derive(Debug)]
pub(super) struct VersionState {
    /// As a home or writer: the versions this start may give out (volatile: a restart takes
    /// new blocks).
    sequencer: Sequencer,
    /// As a home or writer: askers waiting for a block from the dispatcher, per dataset, in
    /// order.
    waiting: BTreeMap<DatasetId, Vec<Asker>>,
    /// The MRSW datasets this node holds the write lease of, with the open it was taken for
    /// (lease.rs; volatile: a restart ends the programs that opened them).
    pub(super) writing: BTreeMap<DatasetId, u64>,
}

impl VersionState {
    pub(super) fn new(block: u64) -> VersionState {
        VersionState {
            sequencer: Sequencer::new(block),
            waiting: BTreeMap::new(),
            writing: BTreeMap::new(),
        }
    }
}

impl Machine {
    /// This start of this node, as the sequencer knows it (with the planted bug, every start
    /// takes itself for the first home's first).
    fn version_giver(&self, dataset: &Dataset) -> (NodeId, u64) {
        match dataset.first_home {
            Some(first) if self.config.bugs.reuse_first_block => first,
            _ => (self.config.id, self.config.incarnation),
        }
    }

    /// The node that gives `dataset`'s versions: the owner of its chunk 0 now.
    fn home_of(&self, dataset: &Dataset) -> NodeId {
        self.owner_of(dataset, 0)
    }

    /// Step 4a of an MRMW commit this node leads or owns alone, every target prepared: its
    /// dataset version, from the home. An MRSW commit brought its writer's, and applies at
    /// once.
    pub(super) fn ask_version(&mut self, tx: TxKey) {
        let Some(id) = self.owner.commits.get(&tx).map(|commit| commit.dataset) else {
            return;
        };
        let Some(dataset) = self.dataset(id).cloned() else {
            return self.abort_commit(tx, format!("dataset {id} is not known here"));
        };
        if dataset.params.mode != Mode::Mrmw {
            return self.apply_and_decide(tx);
        }
        if let Some(commit) = self.owner.commits.get_mut(&tx) {
            commit.step = Step::Versioning;
        }
        let home = self.home_of(&dataset);
        if home == self.config.id {
            return self.give_version(&dataset, Asker::Commit { tx }, true);
        }
        let request = NodeRequest::Version {
            dataset,
            take: true,
        };
        self.send(home, request, Purpose::Version { tx });
    }

    /// An MRSW commit's version (client.rs), given by this node as the dataset's one writer
    /// (with no message, as the daemon's lease holder does: `writer_version`); then the
    /// commit goes on. Its first commit, or one after a restart, takes a block first.
    pub(super) fn writer_version(&mut self, id: OpId, dataset: &Dataset) {
        self.give_version(dataset, Asker::Writer { id }, true);
    }

    /// An MRSW commit this node numbered ended: the latest may name its version now
    /// (`Sequencer::committing`).
    pub(super) fn writer_commit_ended(&mut self, dataset: DatasetId) {
        self.versions.sequencer.commit_ended(dataset);
    }

    /// This node took an MRSW dataset's lease: a block of its own, above every version an
    /// earlier writer gave (the daemon's `start_writing`), unless it kept one.
    pub(super) fn start_writing(&mut self, id: OpId, dataset: &Dataset) {
        if self.versions.sequencer.has(dataset.id) {
            return self.writing_started(id, dataset.id, Ok(()));
        }
        let opener = Asker::Opener {
            id,
            dataset: dataset.id,
        };
        self.versions
            .waiting
            .entry(dataset.id)
            .or_default()
            .push(opener);
        self.ask_block(dataset.id);
    }

    /// This node gives an MRSW dataset's lease back: its versions go, since the next
    /// writer's come next (the daemon's `stop_writing`). Returns the open the lease was
    /// taken for (`None`: it held none).
    pub(super) fn stop_writing(&mut self, dataset: DatasetId) -> Option<u64> {
        let open = self.versions.writing.remove(&dataset)?;
        if !self.config.bugs.keep_versions_after_close {
            self.versions.sequencer.drop_dataset(dataset);
        }
        // Whoever waits for this open's block gets none: it is not kept (`block_answered`).
        let why = "the write lease was given back".to_string();
        for asker in self.versions.waiting.remove(&dataset).unwrap_or_default() {
            self.answer_asker(asker, Err(why.clone()));
        }
        Some(open)
    }

    /// A program's `Latest` (client.rs): the home's newest version, asked of it, or of this
    /// node's own sequencer.
    /// MRSW (the daemon's `latest_version`): this node's own sequencer if it writes the
    /// dataset; otherwise the dispatcher names the writer (its live lease holder) and the
    /// next block it would grant, and the writer is asked.
    pub(super) fn ask_latest(&mut self, id: OpId, dataset: Dataset) {
        if dataset.params.mode == Mode::Mrsw {
            if self.may_write(&dataset) {
                return self.give_version(&dataset, Asker::Op { id }, false);
            }
            let request = DispatcherRequest::VersionState {
                dataset: dataset.id,
            };
            return self.ask_dispatcher(request, Purpose::LatestState { op: id });
        }
        let home = self.home_of(&dataset);
        if home == self.config.id {
            return self.give_version(&dataset, Asker::Op { id }, false);
        }
        let request = NodeRequest::Version {
            dataset,
            take: false,
        };
        self.send(home, request, Purpose::Op(id));
    }

    /// The dispatcher's answer for an MRSW `Latest` (`None`: none in time): a live writer
    /// other than this node is asked, and its answer is the only one (a writer that does not
    /// answer may still give versions from its block, below the next block the dispatcher
    /// would grant: found by hotpot-sim, the daemon answered that block's start minus one);
    /// with none, every version given out is below the next block, and every later one at
    /// or above it.
    pub(super) fn latest_state_answered(&mut self, id: OpId, reply: Option<DispatcherReply>) {
        let Some(dataset) = self.client.ops.get(&id).map(|op| op.dataset.clone()) else {
            return;
        };
        match reply {
            Some(DispatcherReply::VersionState {
                writer: Some(writer),
                ..
            }) if writer != self.config.id => {
                let request = NodeRequest::Version {
                    dataset,
                    take: false,
                };
                self.send(writer, request, Purpose::Op(id));
            }
            Some(DispatcherReply::VersionState { next_block, .. }) => {
                let version = next_block.saturating_sub(1);
                self.op_done(id, OpResult::Latest { version });
            }
            other => {
                let why = match other {
                    Some(DispatcherReply::Failed(error)) => format!("dispatcher: {error}"),
                    Some(other) => format!("dispatcher answered VersionState with {other:?}"),
                    None => "the dispatcher did not answer VersionState".to_string(),
                };
                self.op_done(id, OpResult::Refused(FsError::Io(why)));
            }
        }
    }

    /// The version for commit `tx` came (or, `Err`, did not): apply, or abort.
    pub(super) fn version_given(&mut self, tx: TxKey, version: Result<u64, String>) {
        let Some(commit) = self.owner.commits.get_mut(&tx) else {
            return; // given up meanwhile: the version is skipped
        };
        if !matches!(commit.step, Step::Versioning) {
            return;
        }
        match version {
            Ok(version) => {
                commit.dataset_version = version;
                self.apply_and_decide(tx);
            }
            Err(why) => self.abort_commit(tx, format!("no dataset version: {why}")),
        }
    }

    /// The home's answer to a commit's `Version` call (`None`: none in time).
    pub(super) fn version_answered(&mut self, tx: TxKey, from: NodeId, reply: Option<NodeReply>) {
        let version = match reply {
            Some(NodeReply::Version(version)) => Ok(version),
            Some(NodeReply::Failed(error)) => Err(format!("home {from}: {error}")),
            Some(other) => Err(format!("home {from} answered {other:?}")),
            None => Err(format!("home {from} did not answer")),
        };
        self.version_given(tx, version);
    }

    /// `Version` at the home (MRSW: at the writer, asked for the latest): the next version
    /// (`take`) or the newest given out.
    pub(super) fn serve_version(&mut self, from: NodeId, call: u64, dataset: Dataset, take: bool) {
        let refusal = if dataset.params.mode == Mode::Mrsw {
            (!self.may_write(&dataset)).then(|| {
                format!(
                    "node {} is not writing dataset {}",
                    self.config.id, dataset.id
                )
            })
        } else if self.home_of(&dataset) != self.config.id {
            Some(format!(
                "node {} is not the home of dataset {} (node {} is)",
                self.config.id,
                dataset.id,
                self.home_of(&dataset)
            ))
        } else {
            None
        };
        if let Some(why) = refusal {
            return self.reply(from, call, NodeReply::Failed(FsError::Io(why)));
        }
        self.give_version(&dataset, Asker::Peer { from, call, take }, take);
    }

    /// A version for `asker` now, or once the dispatcher granted a block.
    fn give_version(&mut self, dataset: &Dataset, asker: Asker, take: bool) {
        let me = self.version_giver(dataset);
        match self.versions.sequencer.give(dataset, me, take) {
            Give::Version(version) => self.answer_asker(asker, Ok(version)),
            Give::NeedBlock => {
                self.versions
                    .waiting
                    .entry(dataset.id)
                    .or_default()
                    .push(asker);
                self.ask_block(dataset.id);
            }
        }
    }

    /// At start: a block for every MRMW dataset this node is the home of and has no
    /// versions for (`Sequencer::needs_block`), so its first commits need no dispatcher, as
    /// the daemon's `take_home_blocks` does.
    pub(super) fn take_home_blocks(&mut self) {
        for dataset in self.datasets() {
            self.take_home_block(dataset.id);
        }
    }

    /// `take_home_blocks` for one dataset (also one learned since the start, records.rs).
    pub(super) fn take_home_block(&mut self, id: DatasetId) {
        let Some(dataset) = self.dataset(id) else {
            return;
        };
        let me = self.version_giver(dataset);
        if dataset.params.mode == Mode::Mrmw
            && self.home_of(dataset) == self.config.id
            && self.versions.sequencer.needs_block(dataset, me)
        {
            self.ask_block(id);
        }
    }

    /// As a home or writer: a spare block for every block more than half given out, taken
    /// ahead so a commit rarely waits for the dispatcher (the daemon's heartbeat does the
    /// same).
    pub(super) fn refill_versions(&mut self) {
        for dataset in self.versions.sequencer.running_low() {
            self.ask_block(dataset);
        }
    }

    /// One block request per dataset (and MRSW open) in flight: one asked under an earlier
    /// open is no block for this one.
    fn ask_block(&mut self, dataset: DatasetId) {
        let open = self.versions.writing.get(&dataset).copied();
        let asking = self.calls.values().any(|call| {
            matches!(call.purpose, Purpose::VersionBlock { dataset: d, open: o } if d == dataset && o == open)
        });
        if asking {
            return;
        }
        let request = DispatcherRequest::VersionBlock {
            dataset,
            node: self.config.id,
        };
        self.ask_dispatcher(request, Purpose::VersionBlock { dataset, open });
    }

    /// The dispatcher's answer to a block request (`None`: none in time): the waiting askers
    /// get their versions, or are refused. A block asked under an MRSW open that has ended
    /// is not kept, and answers nobody (`stop_writing` refused that open's askers; a later
    /// open's wait for its own block): it was granted before that later open's lease, so a
    /// `Latest` answered in between may name a version above it (found by hotpot-sim, seed
    /// 22022290: the block asked for a spare before a close came after the next open's lease,
    /// and that open's first commit took a version below the latest a reader had been given).
    pub(super) fn block_answered(
        &mut self,
        dataset: DatasetId,
        open: Option<u64>,
        reply: Option<DispatcherReply>,
    ) {
        if open != self.versions.writing.get(&dataset).copied() {
            return;
        }
        let waiting = self.versions.waiting.remove(&dataset).unwrap_or_default();
        let start = match reply {
            Some(DispatcherReply::VersionBlock { start }) => start,
            other => {
                let why = match other {
                    Some(DispatcherReply::Failed(error)) => format!("dispatcher: {error}"),
                    Some(other) => format!("dispatcher answered {other:?}"),
                    None => "the dispatcher did not answer a block request".to_string(),
                };
                for asker in waiting {
                    self.answer_asker(asker, Err(why.clone()));
                }
                return;
            }
        };
        let Some(record) = self.dataset(dataset).cloned() else {
            return;
        };
        self.versions.sequencer.add_block(dataset, start);
        for asker in waiting {
            let take = match asker {
                Asker::Peer { take, .. } => take,
                Asker::Commit { .. } | Asker::Writer { .. } => true,
                Asker::Op { .. } | Asker::Opener { .. } => false,
            };
            // A small block may be used up again: the rest wait for the next one.
            self.give_version(&record, asker, take);
        }
    }

    fn answer_asker(&mut self, asker: Asker, version: Result<u64, String>) {
        match asker {
            Asker::Peer { from, call, .. } => {
                let reply = match version {
                    Ok(version) => NodeReply::Version(version),
                    Err(why) => NodeReply::Failed(FsError::Io(why)),
                };
                self.reply(from, call, reply);
            }
            Asker::Commit { tx } => self.version_given(tx, version),
            Asker::Op { id } => {
                let result = match version {
                    Ok(version) => OpResult::Latest { version },
                    Err(why) => OpResult::Refused(FsError::Io(why)),
                };
                self.op_done(id, result);
            }
            Asker::Opener { id, dataset } => self.writing_started(id, dataset, version.map(drop)),
            Asker::Writer { id } => match version {
                Ok(version) => {
                    if let Some(op) = self.client.ops.get_mut(&id) {
                        op.version = Some(version);
                        let dataset = op.dataset.id;
                        self.versions.sequencer.committing(dataset, version);
                        self.send_commit(id);
                    }
                }
                Err(why) => {
                    let error = FsError::Io(format!("no dataset version: {why}"));
                    self.op_done(id, OpResult::Refused(error));
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{
        answer, block_call, commit, committed_at, done, grant_block, home, node_one,
    };
    use super::super::{Input, Machine, Op, OpResult, Output};
    use crate::proto::messages::{DispatcherReply, DispatcherRequest, NodeReply, NodeRequest};
    use crate::proto::types::Mode;

    #[test]
    fn commits_take_versions_from_blocks_and_a_spare_is_taken_ahead() {
        let (mut machine, dataset) = home();
        // The first commit waits for the first block: nothing is applied before it.
        let outputs = commit(&mut machine, &dataset, 10, 1);
        let call = block_call(&outputs).expect("a block asked for");
        assert_eq!(answer(&outputs), None);
        assert_eq!(machine.table().version_of((1, 0)), 0);
        let outputs = grant_block(&mut machine, 20, call, 5);
        assert_eq!(committed_at(answer(&outputs)), 5);
        // Half the block given out: a spare is asked for at once.
        let spare = block_call(&outputs).expect("a spare asked for");
        grant_block(&mut machine, 25, spare, 13);
        let outputs = commit(&mut machine, &dataset, 30, 2);
        assert_eq!(committed_at(answer(&outputs)), 6);
        assert_eq!(block_call(&outputs), None, "a spare is there");
        // The block is used up: the spare follows, with no wait.
        let outputs = commit(&mut machine, &dataset, 40, 3);
        assert_eq!(committed_at(answer(&outputs)), 13);
        assert!(block_call(&outputs).is_some(), "the next spare asked for");
    }

    #[test]
    fn a_lost_block_request_refuses_the_commit_and_the_next_asks_again() {
        let (mut machine, dataset) = home();
        let outputs = commit(&mut machine, &dataset, 10, 1);
        assert!(block_call(&outputs).is_some());
        let timeout = machine.config.timing.call_timeout_ms;
        let outputs = machine.handle(10 + timeout, Input::Tick);
        assert!(
            matches!(answer(&outputs), Some(NodeReply::Failed(_))),
            "refused: {outputs:?}"
        );
        assert_eq!(machine.table().version_of((1, 0)), 0, "nothing applied");
        let outputs = commit(&mut machine, &dataset, 20 + timeout, 2);
        let call = block_call(&outputs).expect("a block asked for again");
        let outputs = grant_block(&mut machine, 30 + timeout, call, 9);
        assert_eq!(committed_at(answer(&outputs)), 9);
    }

    /// An MRSW `Latest` on node 1 (which does not write): the dispatcher's answer, then
    /// the outputs after it.
    fn mrsw_latest(state: DispatcherReply) -> (Machine, Vec<Output>) {
        let (mut machine, _) = node_one(Mode::Mrsw, vec![1, 2], vec![1], 4);
        let outputs = machine.handle(10, Input::Start(Op::Latest { op: 1, dataset: 1 }));
        let call = outputs
            .iter()
            .find_map(|output| match output {
                Output::AskDispatcher {
                    call,
                    request: DispatcherRequest::VersionState { dataset: 1 },
                } => Some(*call),
                _ => None,
            })
            .expect("the dispatcher asked for the writer");
        let outputs = machine.handle(20, Input::DispatcherReply { call, reply: state });
        (machine, outputs)
    }

    #[test]
    fn an_mrsw_latest_comes_from_the_writer_or_fails() {
        let state = DispatcherReply::VersionState {
            writer: Some(2),
            next_block: 9,
        };
        let (mut machine, outputs) = mrsw_latest(state);
        assert!(
            outputs.iter().any(|output| matches!(
                output,
                Output::Send {
                    to: 2,
                    request: NodeRequest::Version { take: false, .. },
                    ..
                }
            )),
            "the writer is asked: {outputs:?}"
        );
        // The writer does not answer: no version is made up (it may still give some below
        // the next block).
        let timeout = machine.config.timing.call_timeout_ms;
        let outputs = machine.handle(20 + timeout, Input::Tick);
        assert!(
            matches!(done(&outputs), Some(OpResult::Refused(_))),
            "{outputs:?}"
        );
        // No live writer: everything given out is below the next block.
        let state = DispatcherReply::VersionState {
            writer: None,
            next_block: 9,
        };
        let (_, outputs) = mrsw_latest(state);
        assert_eq!(done(&outputs), Some(OpResult::Latest { version: 8 }));
    }

    #[test]
    fn a_used_up_block_still_answers_the_latest_version() {
        let (mut machine, dataset) = home();
        let outputs = commit(&mut machine, &dataset, 10, 1);
        let call = block_call(&outputs).expect("a block asked for");
        grant_block(&mut machine, 20, call, 5);
        commit(&mut machine, &dataset, 30, 2);
        let latest = NodeRequest::Version {
            dataset: dataset.clone(),
            take: false,
        };
        let outputs = machine.handle(
            40,
            Input::Request {
                from: 1,
                call: 900,
                request: latest,
            },
        );
        assert_eq!(answer(&outputs), Some(NodeReply::Version(6)));
        assert_eq!(block_call(&outputs), None);
    }
}
