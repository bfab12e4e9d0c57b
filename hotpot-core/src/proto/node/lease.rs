//! An MRSW dataset's write lease (docs/design.md, "Cluster protocol"): a program opens the
//! dataset for writing, and its node asks the dispatcher for the lease (`AcquireLease`), as
//! the daemon's `open` does; the dispatcher grants it when nobody holds it or its holder is
//! not live. The new writer then takes a block of versions from the dispatcher, which is
//! above every version an earlier writer gave (the daemon's `start_writing`). Closing gives
//! both back (`stop_writing`, `ReleaseLease`, naming the open the lease was taken for).
//! Only the lease holder commits: an MRSW commit on a node that does not write the dataset
//! is refused. Must survive: a dispatcher that does not answer (the open fails), a release
//! that arrives after this node took the lease again (found by hotpot-sim: the dispatcher
//! ignores a release of an earlier open), a block granted for a lease given back meanwhile
//! (dropped: the next writer's versions are above it, so a later open here takes a new one).

use super::{Machine, OpId, OpResult, Purpose};
use crate::proto::messages::{DispatcherReply, DispatcherRequest};
use crate::proto::types::{Dataset, DatasetId, FsError, Mode};

impl Machine {
    /// `Op::Open` for writing: MRSW takes the lease, then versions; MRMW needs neither.
    pub(super) fn open_for_writing(&mut self, id: OpId, dataset: &Dataset) {
        if self.may_write(dataset) {
            return self.op_done(id, OpResult::Opened);
        }
        // The open's number: the call's, which this node never uses twice (starts included).
        let open = self.next_call;
        let request = DispatcherRequest::AcquireLease {
            dataset: dataset.id,
            node: self.config.id,
            open,
        };
        self.ask_dispatcher(request, Purpose::Lease { op: id, open });
    }

    /// The dispatcher's answer to `AcquireLease` (`None`: none in time: the open fails, and
    /// a lease granted all the same is given back; the release names this open, so it can
    /// never give back a later one's).
    pub(super) fn lease_answered(&mut self, id: OpId, open: u64, reply: Option<DispatcherReply>) {
        let Some(dataset) = self.client.ops.get(&id).map(|op| op.dataset.clone()) else {
            return;
        };
        let error = match reply {
            Some(DispatcherReply::Done) => {
                self.versions.writing.insert(dataset.id, open);
                return self.start_writing(id, &dataset);
            }
            Some(DispatcherReply::Failed(error)) => error,
            Some(other) => FsError::Io(format!("dispatcher answered AcquireLease with {other:?}")),
            None => {
                self.release_lease(dataset.id, open);
                FsError::Io("the dispatcher did not answer AcquireLease".into())
            }
        };
        self.op_done(id, OpResult::Refused(error));
    }

    /// The versions of a dataset this node just took the lease of are there (`Ok`) or could
    /// not be had: the open ends, and a failed one gives the lease back.
    pub(super) fn writing_started(
        &mut self,
        id: OpId,
        dataset: DatasetId,
        given: Result<(), String>,
    ) {
        match given {
            Ok(()) => self.op_done(id, OpResult::Opened),
            Err(why) => {
                self.give_lease_back(dataset);
                let error = FsError::Io(format!("no versions for the writer: {why}"));
                self.op_done(id, OpResult::Refused(error));
            }
        }
    }

    /// `Op::Close` of a dataset opened for writing: an MRSW writer stops giving versions
    /// and gives the lease back.
    pub(super) fn close_for_writing(&mut self, id: OpId, dataset: &Dataset) {
        self.give_lease_back(dataset.id);
        self.op_done(id, OpResult::Closed);
    }

    /// Whether this node may commit `dataset` (MRSW: it holds the write lease).
    pub(super) fn may_write(&self, dataset: &Dataset) -> bool {
        dataset.params.mode != Mode::Mrsw || self.versions.writing.contains_key(&dataset.id)
    }

    /// Stop writing `dataset` and give its lease back (nothing to give back: an MRMW
    /// dataset, or an MRSW one this node does not write).
    fn give_lease_back(&mut self, dataset: DatasetId) {
        if let Some(open) = self.stop_writing(dataset) {
            self.release_lease(dataset, open);
        }
    }

    /// `ReleaseLease` naming the open the lease was taken for: a release that arrives late
    /// changes no later open's lease.
    fn release_lease(&mut self, dataset: DatasetId, open: u64) {
        let request = DispatcherRequest::ReleaseLease {
            dataset,
            node: self.config.id,
            open,
        };
        self.ask_dispatcher(request, Purpose::Notice);
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{done, node_one};
    use super::super::{Input, Machine, Op, OpResult, Output};
    use crate::proto::messages::{DispatcherReply, DispatcherRequest};
    use crate::proto::types::{FsError, Mode};

    /// Node 1 alone, owning an MRSW dataset of 4 pages; blocks of 4 versions.
    fn writer() -> Machine {
        node_one(Mode::Mrsw, vec![1], vec![1], 4).0
    }

    fn asked(outputs: &[Output]) -> Vec<(u64, DispatcherRequest)> {
        outputs
            .iter()
            .filter_map(|output| match output {
                Output::AskDispatcher { call, request } => Some((*call, request.clone())),
                _ => None,
            })
            .collect()
    }

    /// A program's write of page 0 and its msync: every output.
    fn write(machine: &mut Machine, now_ms: u64, op: u64) -> Vec<Output> {
        let stores = vec![(0, 0, vec![op as u8; 8])];
        let start = Input::Start(Op::Write {
            op,
            dataset: 1,
            stores,
            msync: true,
        });
        alone(machine, now_ms, start)
    }

    /// `input`, with this node's calls to itself delivered until none is left (it owns
    /// every page): every output.
    fn alone(machine: &mut Machine, now_ms: u64, input: Input) -> Vec<Output> {
        let mut all = Vec::new();
        let mut inputs = vec![input];
        while let Some(input) = inputs.pop() {
            for output in machine.handle(now_ms, input) {
                match &output {
                    Output::Send { call, request, .. } => inputs.push(Input::Request {
                        from: 1,
                        call: *call,
                        request: request.clone(),
                    }),
                    Output::Reply { call, reply, .. } => inputs.push(Input::Reply {
                        from: 1,
                        call: *call,
                        reply: reply.clone(),
                    }),
                    _ => {}
                }
                all.push(output);
            }
        }
        all
    }

    /// Open for writing: the lease, then a block; returns the open's number.
    fn open(machine: &mut Machine, now_ms: u64, op: u64, block: u64) -> u64 {
        let outputs = machine.handle(now_ms, Input::Start(Op::Open { op, dataset: 1 }));
        let [(call, DispatcherRequest::AcquireLease { open, .. })] = asked(&outputs)[..] else {
            panic!("one AcquireLease: {outputs:?}");
        };
        let reply = DispatcherReply::Done;
        let outputs = machine.handle(now_ms, Input::DispatcherReply { call, reply });
        let [(call, DispatcherRequest::VersionBlock { dataset: 1, .. })] = asked(&outputs)[..]
        else {
            panic!("a block for the new writer: {outputs:?}");
        };
        let reply = DispatcherReply::VersionBlock { start: block };
        let outputs = machine.handle(now_ms, Input::DispatcherReply { call, reply });
        assert_eq!(done(&outputs), Some(OpResult::Opened));
        open
    }

    #[test]
    fn only_the_lease_holder_commits_and_its_versions_go_with_the_lease() {
        let mut machine = writer();
        let refused = done(&write(&mut machine, 10, 1));
        assert!(
            matches!(refused, Some(OpResult::Refused(ref error)) if error.to_string().contains("write lease")),
            "{refused:?}"
        );
        let first = open(&mut machine, 20, 2, 5);
        assert_eq!(
            done(&write(&mut machine, 30, 3)),
            Some(OpResult::Committed { dataset_version: 5 })
        );
        // Closing gives the lease back, naming the open it was taken for.
        let outputs = machine.handle(40, Input::Start(Op::Close { op: 4, dataset: 1 }));
        assert_eq!(done(&outputs), Some(OpResult::Closed));
        assert!(matches!(
            asked(&outputs)[..],
            [(_, DispatcherRequest::ReleaseLease { open, .. })] if open == first
        ));
        assert!(matches!(
            done(&write(&mut machine, 50, 5)),
            Some(OpResult::Refused(_))
        ));
        // Opened again (after another writer's block 9): a new open, a new block.
        let second = open(&mut machine, 60, 6, 13);
        assert_ne!(second, first);
        assert_eq!(
            done(&write(&mut machine, 70, 7)),
            Some(OpResult::Committed {
                dataset_version: 13
            })
        );
    }

    #[test]
    fn a_write_without_msync_stays_staged_until_the_next_commit() {
        let mut machine = writer();
        open(&mut machine, 10, 1, 1);
        let stores = vec![(0, 0, vec![9u8; 8])];
        let write = Op::Write {
            op: 2,
            dataset: 1,
            stores,
            msync: false,
        };
        let outputs = alone(&mut machine, 20, Input::Start(write));
        assert_eq!(done(&outputs), Some(OpResult::Staged));
        assert!(machine.table().is_staged((1, 0)));
        assert_eq!(machine.table().version_of((1, 0)), 0, "nothing committed");
        let commit = Op::Commit { op: 3, dataset: 1 };
        let outputs = alone(&mut machine, 30, Input::Start(commit));
        assert_eq!(
            done(&outputs),
            Some(OpResult::Committed { dataset_version: 1 })
        );
        assert!(!machine.table().is_staged((1, 0)));
        let (_, bytes) = machine.table().read_persisted((1, 0)).expect("committed");
        assert_eq!(&bytes[..8], &[9u8; 8]);
    }

    #[test]
    fn a_refused_lease_opens_nothing() {
        let mut machine = writer();
        let outputs = machine.handle(10, Input::Start(Op::Open { op: 1, dataset: 1 }));
        let [(call, _)] = asked(&outputs)[..] else {
            panic!("one AcquireLease: {outputs:?}");
        };
        let busy = FsError::Busy("node 2 holds the write lease".into());
        let reply = DispatcherReply::Failed(busy.clone());
        let outputs = machine.handle(20, Input::DispatcherReply { call, reply });
        assert_eq!(done(&outputs), Some(OpResult::Refused(busy)));
        assert!(matches!(
            done(&write(&mut machine, 30, 2)),
            Some(OpResult::Refused(_))
        ));
    }
}
