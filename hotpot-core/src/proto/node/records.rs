//! Dataset records (fixed at creation), learned as the daemon learns them: the dispatcher's
//! list at this node's start (`Config.datasets`), then each record a request carries (a
//! commit and its parts, `Version`, `Latest`, `Pin`), and for a request or operation naming
//! a dataset this node does not know (made since its start), the dispatcher's list again
//! (`LiveDatasets`), with what named it waiting meanwhile. A dataset the dispatcher does not
//! list (deleted, or never made) is refused as not found.
//!
//! A known dataset a list leaves out was deleted: this node keeps its record and its pages
//! (a program here may still have it open) until its next start drops them, but does no
//! background work for it any more (re-replication, registrations, rejoin calls). A peer
//! answering `NotFound` about a dataset (it started since the deletion) makes this node ask
//! the list.
//! Must survive: the dispatcher down or its answer lost (asked again while anything waits,
//! each waiting input refused after `dispatcher_wait_ms`); a list asked before an input
//! arrived, which may not hold a dataset made since (only the inputs that waited when it was
//! asked are refused on it).

use std::collections::{BTreeMap, BTreeSet};

use super::{Machine, Op, OpResult, Purpose};
use crate::proto::messages::{DispatcherReply, DispatcherRequest, NodeReply, NodeRequest};
use crate::proto::types::{Dataset, DatasetId, FsError, NodeId};

#[derive(Default)]
pub(super) struct RecordState {
    known: BTreeMap<DatasetId, Dataset>,
    /// Known datasets the dispatcher's list left out.
    deleted: BTreeSet<DatasetId>,
    waiting: Vec<Waiting>,
    /// A `LiveDatasets` call is in flight.
    asking: bool,
    /// A peer did not know a dataset: the list is asked even with no input waiting.
    refresh: bool,
}

/// An input naming a dataset whose record is not here yet.
struct Waiting {
    dataset: DatasetId,
    input: Named,
    deadline_ms: u64,
    /// The dispatcher's list in flight was asked after this input came: its answer decides it.
    asked: bool,
}

enum Named {
    Request {
        from: NodeId,
        call: u64,
        request: NodeRequest,
    },
    Op(Op),
}

impl RecordState {
    pub(super) fn new(datasets: &[Dataset]) -> RecordState {
        RecordState {
            known: datasets
                .iter()
                .map(|dataset| (dataset.id, dataset.clone()))
                .collect(),
            ..Default::default()
        }
    }

    pub(super) fn get(&self, id: DatasetId) -> Option<&Dataset> {
        self.known.get(&id)
    }

    /// The known datasets not deleted.
    pub(super) fn live(&self) -> Vec<Dataset> {
        self.known
            .values()
            .filter(|dataset| !self.deleted.contains(&dataset.id))
            .cloned()
            .collect()
    }

    pub(super) fn is_deleted(&self, id: DatasetId) -> bool {
        self.deleted.contains(&id)
    }
}

/// The record a request carries, if any.
fn carried(request: &NodeRequest) -> Option<&Dataset> {
    match request {
        NodeRequest::Commit { dataset, .. }
        | NodeRequest::CommitRuns { dataset, .. }
        | NodeRequest::OwnerPrepare { dataset, .. }
        | NodeRequest::Version { dataset, .. }
        | NodeRequest::Latest { dataset }
        | NodeRequest::Pin { dataset, .. } => Some(dataset),
        _ => None,
    }
}

/// The dataset a request this machine serves names by id only, if any.
fn named(request: &NodeRequest) -> Option<DatasetId> {
    match request {
        NodeRequest::Fetch { dataset, .. }
        | NodeRequest::Locate { dataset, .. }
        | NodeRequest::FetchCopy { dataset, .. }
        | NodeRequest::FetchCopies { dataset, .. }
        | NodeRequest::Prepare { dataset, .. }
        | NodeRequest::Lock { dataset, .. }
        | NodeRequest::Unlock { dataset, .. }
        | NodeRequest::Register { dataset, .. }
        | NodeRequest::Install { dataset, .. }
        | NodeRequest::ReadAt { dataset, .. } => Some(*dataset),
        _ => None,
    }
}

impl Machine {
    /// `id`'s record, if this node knows it.
    pub(super) fn dataset(&self, id: DatasetId) -> Option<&Dataset> {
        self.records.get(id)
    }

    /// Every dataset this node knows and does not know deleted: the ones it does background
    /// work for.
    pub(super) fn datasets(&self) -> Vec<Dataset> {
        self.records.live()
    }

    /// A peer answered one of this node's calls with `reply`: `NotFound` (a peer that
    /// started after a dataset was deleted knows it no more) makes this node ask the
    /// dispatcher's list, which says whether the dataset is deleted.
    pub(super) fn peer_may_not_know(&mut self, reply: &NodeReply) {
        if matches!(reply, NodeReply::Failed(FsError::NotFound)) && !self.records.refresh {
            self.records.refresh = true;
            self.ask_records();
        }
    }

    /// A request from a peer: the record it carries is noted; one naming a dataset this
    /// node does not know waits for the dispatcher's list (`None`: it waits).
    pub(super) fn request_waits_for_record(
        &mut self,
        from: NodeId,
        call: u64,
        request: NodeRequest,
    ) -> Option<NodeRequest> {
        if let Some(record) = carried(&request).cloned() {
            self.note_record(record);
            return Some(request);
        }
        match named(&request) {
            Some(dataset) if self.dataset(dataset).is_none() => {
                let input = Named::Request {
                    from,
                    call,
                    request,
                };
                self.wait_for_record(dataset, input);
                None
            }
            _ => Some(request),
        }
    }

    /// A program's operation on a dataset this node does not know waits for the
    /// dispatcher's list (`None`: it waits).
    pub(super) fn op_waits_for_record(&mut self, dataset: DatasetId, op: Op) -> Option<Op> {
        if self.dataset(dataset).is_some() {
            return Some(op);
        }
        self.wait_for_record(dataset, Named::Op(op));
        None
    }

    fn wait_for_record(&mut self, dataset: DatasetId, input: Named) {
        let deadline_ms = self.now_ms + self.config.timing.dispatcher_wait_ms;
        self.records.waiting.push(Waiting {
            dataset,
            input,
            deadline_ms,
            asked: false,
        });
        self.ask_records();
    }

    /// A record learned: kept, and a home's first versions asked for ahead (`take_home_blocks`).
    pub(super) fn note_record(&mut self, record: Dataset) {
        if self.records.known.contains_key(&record.id) {
            return;
        }
        let id = record.id;
        self.records.known.insert(id, record);
        self.take_home_block(id);
    }

    /// The dispatcher's list, asked while inputs wait (or a refresh is due) and none is in
    /// flight.
    pub(super) fn ask_records(&mut self) {
        let wanted = self.records.refresh || !self.records.waiting.is_empty();
        if self.records.asking || !wanted {
            return;
        }
        self.records.asking = true;
        self.records.refresh = false;
        for waiting in &mut self.records.waiting {
            waiting.asked = true;
        }
        self.ask_dispatcher(DispatcherRequest::LiveDatasets, Purpose::Records);
    }

    /// The dispatcher's list (`None`: the call failed; asked again at once). An input
    /// waiting when it was asked runs with its record, or is refused as not found; one that
    /// came since waits for the next list. A known dataset the list leaves out is deleted.
    pub(super) fn records_answered(&mut self, reply: Option<DispatcherReply>) {
        self.records.asking = false;
        let listed = match reply {
            Some(DispatcherReply::Datasets(listed)) => listed,
            _ => {
                for waiting in &mut self.records.waiting {
                    waiting.asked = false;
                }
                // A refresh that failed is due again.
                self.records.refresh = true;
                return self.ask_records();
            }
        };
        let ids: BTreeSet<DatasetId> = listed.iter().map(|record| record.id).collect();
        for record in listed {
            self.note_record(record);
        }
        let gone: Vec<DatasetId> = self
            .records
            .known
            .keys()
            .filter(|id| !ids.contains(id))
            .copied()
            .collect();
        for id in gone {
            if self.records.deleted.insert(id) {
                self.forget_background_work(id);
            }
        }
        let (decided, still): (Vec<Waiting>, Vec<Waiting>) =
            std::mem::take(&mut self.records.waiting)
                .into_iter()
                .partition(|waiting| waiting.asked);
        self.records.waiting = still;
        for waiting in decided {
            let known = self.dataset(waiting.dataset).is_some();
            match (waiting.input, known) {
                (
                    Named::Request {
                        from,
                        call,
                        request,
                    },
                    true,
                ) => self.on_request(from, call, request),
                (Named::Op(op), true) => self.start_op(op),
                (Named::Request { from, call, .. }, false) => {
                    self.reply(from, call, NodeReply::Failed(FsError::NotFound))
                }
                (Named::Op(op), false) => {
                    self.op_done(op.id(), OpResult::Refused(FsError::NotFound))
                }
            }
        }
        self.ask_records();
    }

    /// Inputs that waited `dispatcher_wait_ms` for a record are refused (the dispatcher is
    /// away): a request as busy (its sender asks again), an operation as failed.
    pub(super) fn expire_record_waits(&mut self) {
        let now = self.now_ms;
        let (expired, still): (Vec<Waiting>, Vec<Waiting>) =
            std::mem::take(&mut self.records.waiting)
                .into_iter()
                .partition(|waiting| waiting.deadline_ms <= now);
        self.records.waiting = still;
        for waiting in expired {
            let why = format!(
                "dataset {}: the dispatcher did not answer for {} ms",
                waiting.dataset, self.config.timing.dispatcher_wait_ms
            );
            match waiting.input {
                Named::Request { from, call, .. } => {
                    self.reply(from, call, NodeReply::Failed(FsError::Busy(why)))
                }
                Named::Op(op) => self.op_done(op.id(), OpResult::Refused(FsError::Io(why))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::tests::{done, node_one};
    use super::super::{Config, Input, Machine, Op, OpResult, Output};
    use crate::page::PageTable;
    use crate::pm::{SimRegion, PAGE_BYTES};
    use crate::proto::messages::{DispatcherReply, DispatcherRequest, NodeReply, NodeRequest};
    use crate::proto::types::{Dataset, DatasetParams, FsError, Mode};

    /// Node 1 of a one-node cluster that knows dataset 1 only.
    fn node() -> (Machine, Dataset) {
        node_one(Mode::Mrmw, vec![1], vec![1], 4)
    }

    /// A dataset made after the machine started: `id`, owned by node 1.
    fn made(known: &Dataset, id: u64) -> Dataset {
        Dataset {
            id,
            ..known.clone()
        }
    }

    fn read(op: u64, dataset: u64) -> Input {
        Input::Start(Op::Read {
            op,
            dataset,
            page: 0,
        })
    }

    /// The call id of the `LiveDatasets` asked, if one was.
    fn list_asked(outputs: &[Output]) -> Option<u64> {
        outputs.iter().find_map(|output| match output {
            Output::AskDispatcher {
                call,
                request: DispatcherRequest::LiveDatasets,
            } => Some(*call),
            _ => None,
        })
    }

    /// Whether a read of page 0 of `dataset` went on: it asks the owner for the page.
    fn fetches(outputs: &[Output], dataset: u64) -> bool {
        outputs.iter().any(|output| {
            matches!(output, Output::Send { request: NodeRequest::Fetch { dataset: d, page: 0, .. }, .. } if *d == dataset)
        })
    }

    fn listed(machine: &mut Machine, now_ms: u64, call: u64, datasets: &[&Dataset]) -> Vec<Output> {
        let reply = DispatcherReply::Datasets(datasets.iter().map(|d| (*d).clone()).collect());
        machine.handle(now_ms, Input::DispatcherReply { call, reply })
    }

    #[test]
    fn an_operation_on_a_dataset_made_since_the_start_runs_once_the_dispatcher_lists_it() {
        let (mut machine, known) = node();
        let outputs = machine.handle(1, read(1, 2));
        assert_eq!(done(&outputs), None, "it waits for the record");
        let call = list_asked(&outputs).expect("the dispatcher is asked for its datasets");
        assert!(!fetches(&outputs, 2));
        let outputs = listed(&mut machine, 2, call, &[&known, &made(&known, 2)]);
        assert!(fetches(&outputs, 2), "the read goes on: {outputs:?}");
    }

    #[test]
    fn a_dataset_the_dispatcher_does_not_list_is_not_found() {
        let (mut machine, known) = node();
        let call = list_asked(&machine.handle(1, read(1, 9))).expect("asked");
        let outputs = listed(&mut machine, 2, call, &[&known]);
        assert_eq!(done(&outputs), Some(OpResult::Refused(FsError::NotFound)));
        assert_eq!(list_asked(&outputs), None, "nothing waits: not asked again");
    }

    #[test]
    fn a_list_asked_before_an_input_came_does_not_refuse_it() {
        let (mut machine, known) = node();
        let first = list_asked(&machine.handle(1, read(1, 2))).expect("asked");
        let outputs = machine.handle(2, read(2, 3));
        assert_eq!(list_asked(&outputs), None, "one list in flight at a time");
        // Dataset 3 was made after the dispatcher answered the first list.
        let outputs = listed(&mut machine, 3, first, &[&known, &made(&known, 2)]);
        assert!(fetches(&outputs, 2));
        assert_eq!(
            done(&outputs),
            None,
            "the read of dataset 3 is not refused on a list asked before it came"
        );
        let second = list_asked(&outputs).expect("asked again for the read that still waits");
        let both = [&known, &made(&known, 2), &made(&known, 3)];
        let outputs = listed(&mut machine, 4, second, &both);
        assert!(fetches(&outputs, 3));
    }

    #[test]
    fn a_peers_request_naming_an_unknown_dataset_waits_for_the_record() {
        let (mut machine, known) = node();
        let fetch = NodeRequest::Fetch {
            dataset: 2,
            page: 0,
            from: 2,
        };
        let outputs = machine.handle(
            1,
            Input::Request {
                from: 2,
                call: 7,
                request: fetch,
            },
        );
        assert!(!outputs
            .iter()
            .any(|output| matches!(output, Output::Reply { .. })));
        let call = list_asked(&outputs).expect("asked");
        let outputs = listed(&mut machine, 2, call, &[&known, &made(&known, 2)]);
        let answer = outputs.iter().find_map(|output| match output {
            Output::Reply { call: 7, reply, .. } => Some(reply.clone()),
            _ => None,
        });
        assert!(
            matches!(answer, Some(NodeReply::Page(_))),
            "served with the record: {answer:?}"
        );
    }

    /// Node 1 of nodes 1 and 2, owning every page of the datasets `listed` (two copies
    /// each), on `table`.
    fn owner_of_two_copies(table: PageTable, listed: &[u64]) -> Machine {
        let dataset = |id| Dataset {
            id,
            params: DatasetParams {
                mode: Mode::Mrmw,
                replicas: 2,
                chunk_pages: 4,
            },
            owners: vec![1],
            first_home: None,
        };
        let config = Config {
            id: 1,
            incarnation: 2,
            nodes: vec![1, 2],
            datasets: listed.iter().map(|id| dataset(*id)).collect(),
            rebuilding: false,
            successors: BTreeMap::new(),
            timing: Default::default(),
            version_block: 4,
            one_sided: false,
            bugs: Default::default(),
        };
        Machine::start(config, table, 0).unwrap()
    }

    /// A table holding page 0 of datasets 1 and 2 at version 1.
    fn table_with_two_datasets() -> PageTable {
        let region = SimRegion::from_image(vec![0u8; 4 << 20]);
        let mut table = PageTable::open(Box::new(region), 1, 1).unwrap().0;
        for dataset in [1, 2] {
            let bytes = vec![dataset as u8; PAGE_BYTES];
            table.install_copy((dataset, 0), 1, &bytes).unwrap();
        }
        table
    }

    fn installs(outputs: &[Output]) -> Vec<(u64, u64)> {
        outputs
            .iter()
            .filter_map(|output| match output {
                Output::Send {
                    request: NodeRequest::Install { dataset, pages },
                    ..
                } => Some((*dataset, pages[0].page)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_start_drops_the_pages_of_datasets_the_dispatcher_does_not_list() {
        let machine = owner_of_two_copies(table_with_two_datasets(), &[1]);
        assert!(machine.table().has_copy((1, 0)));
        assert!(!machine.table().has_copy((2, 0)), "dataset 2 was deleted");
    }

    #[test]
    fn a_dataset_the_list_leaves_out_is_replicated_no_more_but_kept() {
        let mut machine = owner_of_two_copies(table_with_two_datasets(), &[1, 2]);
        // Node 2's rejoin answer: it holds nothing.
        let mut now = 0;
        let mut outputs = Vec::new();
        for _ in 0..3 {
            now += machine.config.timing.rereplicate_every_ms;
            outputs = machine.handle(now, Input::Tick);
            for output in outputs.clone() {
                if let Output::Send {
                    to: 2,
                    call,
                    request,
                } = output
                {
                    let reply = match request {
                        NodeRequest::FetchCopies { .. } => NodeReply::Pages(Vec::new()),
                        _ => continue,
                    };
                    machine.handle(
                        now,
                        Input::Reply {
                            from: 2,
                            call,
                            reply,
                        },
                    );
                }
            }
        }
        assert_eq!(
            installs(&outputs),
            vec![(1, 0), (2, 0)],
            "both go to node 2"
        );
        // Node 2 started since dataset 2 was deleted: it does not know it.
        let call = outputs
            .iter()
            .find_map(|output| match output {
                Output::Send {
                    call,
                    request: NodeRequest::Install { dataset: 2, .. },
                    ..
                } => Some(*call),
                _ => None,
            })
            .unwrap();
        let reply = NodeReply::Failed(FsError::NotFound);
        let outputs = machine.handle(
            now,
            Input::Reply {
                from: 2,
                call,
                reply,
            },
        );
        let asked = list_asked(&outputs).expect("the dispatcher is asked which datasets exist");
        let one = machine.dataset(1).unwrap().clone();
        listed(&mut machine, now, asked, &[&one]);
        now += machine.config.timing.rereplicate_every_ms;
        let outputs = machine.handle(now, Input::Tick);
        assert_eq!(installs(&outputs), vec![(1, 0)], "dataset 2 is deleted");
        assert!(
            machine.table().has_copy((2, 0)),
            "kept until the next start"
        );
    }

    #[test]
    fn with_the_dispatcher_away_an_operation_fails_after_the_wait_and_the_list_is_asked_again() {
        let (mut machine, _) = node();
        let wait = machine.config.timing.dispatcher_wait_ms;
        let call_timeout = machine.config.timing.call_timeout_ms;
        assert!(list_asked(&machine.handle(0, read(1, 2))).is_some());
        let outputs = machine.handle(call_timeout, Input::Tick);
        assert!(
            list_asked(&outputs).is_some(),
            "a list not answered is asked again"
        );
        assert_eq!(done(&outputs), None);
        let outputs = machine.handle(wait, Input::Tick);
        assert!(
            matches!(done(&outputs), Some(OpResult::Refused(FsError::Io(_)))),
            "{outputs:?}"
        );
    }
}
