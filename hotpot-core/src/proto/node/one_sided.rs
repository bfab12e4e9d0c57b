//! One-sided fetches, the daemon's reader over verbs (`tools/src/node/protocol/reader.rs`):
//! where a peer's PM can be read without its CPU, a page comes from its owner as `Locate`
//! (which makes this node a holder, as `Fetch` does), a remote read of the frame it names,
//! and a remote read of its slot after that. An unchanged slot and the located checksum mean
//! the frame held that version throughout (a frame is never written in place); otherwise a
//! commit moved the page meanwhile, and it is fetched two-sided. The result goes to the
//! operation as the owner's `Page` answer would. Must survive: a frame freed and reused by
//! another page between `Locate` and the read; a link that breaks (a restart, a partition)
//! between any two steps; an owner that does not answer `Locate` (the operation's failover).

use super::client::OpId;
use super::{Machine, Output, Purpose};
use crate::pm::PAGE_BYTES;
use crate::proto::messages::{NodeReply, NodeRequest, VersionedPage};
use crate::proto::types::{DatasetId, NodeId, PageLocation};

/// One page fetched one-sided for operation `op`, and how far it got.
#[derive(Clone, Debug)]
pub(super) struct Fetching {
    op: OpId,
    dataset: DatasetId,
    page: u64,
    stage: Stage,
}

#[derive(Clone, Debug)]
enum Stage {
    /// Waiting for the owner's answer to `Locate`.
    Locating,
    /// Reading the located frame.
    Frame(PageLocation),
    /// Reading the slot again, with the frame's bytes read.
    Slot(PageLocation, Vec<u8>),
}

impl Machine {
    /// Bring `page` from its owner `to` for operation `op`: one-sided where this node reads
    /// peers' PM, else `Fetch`. Either way the owner's copy reaches `op_answered` as a
    /// `Page` answer (or `None`: the owner did not answer).
    pub(super) fn fetch_page(&mut self, op: OpId, to: NodeId, dataset: DatasetId, page: u64) {
        let from = self.config.id;
        if !self.config.one_sided || to == from {
            let request = NodeRequest::Fetch {
                dataset,
                page,
                from,
            };
            return self.send(to, request, Purpose::Op(op));
        }
        let fetching = Fetching {
            op,
            dataset,
            page,
            stage: Stage::Locating,
        };
        let request = NodeRequest::Locate {
            dataset,
            page,
            from,
        };
        self.send(to, request, Purpose::OneSided(Box::new(fetching)));
    }

    /// The owner's answer to `Locate` (`None`: it did not answer in time, or a remote read
    /// timed out).
    pub(super) fn one_sided_answered(
        &mut self,
        fetching: Fetching,
        from: NodeId,
        reply: Option<NodeReply>,
    ) {
        match (&fetching.stage, reply) {
            (Stage::Locating, Some(NodeReply::Located(Some(location)))) => {
                let (offset, len) = (location.frame_offset, PAGE_BYTES);
                self.read_remote(from, offset, len, fetching.next(Stage::Frame(location)));
            }
            // The owner is unreachable: asking it two-sided would only wait as long again.
            (Stage::Locating, None) => self.op_answered(fetching.op, from, None),
            // No persisted copy here (never written), a refusal, a read that failed: the
            // owner sends the page itself.
            _ => self.fetch_two_sided(&fetching, from),
        }
    }

    /// The bytes of one of this machine's remote reads (`None`: the read failed).
    pub(super) fn on_remote_read(&mut self, from: NodeId, call: u64, bytes: Option<Vec<u8>>) {
        let Some(pending) = self.calls.remove(&call) else {
            return; // timed out, and fetched two-sided since
        };
        let fetching = match pending.purpose {
            Purpose::OneSided(fetching) if pending.to == from => fetching,
            // Not this call's answer: the call waits for its own, or times out.
            purpose => {
                self.calls.insert(call, super::Call { purpose, ..pending });
                return;
            }
        };
        let Some(bytes) = bytes else {
            return self.fetch_two_sided(&fetching, from);
        };
        match fetching.stage.clone() {
            Stage::Frame(location) => {
                let (offset, len) = (location.slot_offset, location.slot.len());
                let next = fetching.next(Stage::Slot(location, bytes));
                self.read_remote(from, offset, len, next);
            }
            Stage::Slot(location, frame) => {
                let holds =
                    self.config.bugs.trust_one_sided_frame || location.holds(&frame, &bytes);
                if !holds {
                    return self.fetch_two_sided(&fetching, from);
                }
                let copy = VersionedPage {
                    page: fetching.page,
                    version: location.version,
                    bytes: frame,
                };
                self.op_answered(fetching.op, from, Some(NodeReply::Page(copy)));
            }
            Stage::Locating => self.fetch_two_sided(&fetching, from),
        }
    }

    fn read_remote(&mut self, to: NodeId, offset: u64, len: usize, fetching: Fetching) {
        let call = self.new_call(to, Purpose::OneSided(Box::new(fetching)));
        self.out.push(Output::ReadRemote {
            to,
            call,
            offset,
            len,
        });
    }

    fn fetch_two_sided(&mut self, fetching: &Fetching, owner: NodeId) {
        let request = NodeRequest::Fetch {
            dataset: fetching.dataset,
            page: fetching.page,
            from: self.config.id,
        };
        self.send(owner, request, Purpose::Op(fetching.op));
    }
}

impl Fetching {
    fn next(&self, stage: Stage) -> Fetching {
        Fetching {
            stage,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, VecDeque};
    use std::sync::Arc;

    use super::super::{Config, Input, Machine, Op, OpDone, OpResult, Output};
    use crate::page::PageTable;
    use crate::pm::{SimRegion, PAGE_BYTES};
    use crate::proto::messages::{DispatcherReply, DispatcherRequest};
    use crate::proto::types::{Dataset, DatasetParams, Mode, NodeId};

    /// Node 1 reads one-sided; node 2 owns the one MRMW dataset's 4 pages and is its home.
    /// Every message arrives at once and in order; remote reads see node 2's live PM.
    struct Pair {
        nodes: BTreeMap<NodeId, (Machine, Arc<SimRegion>)>,
        queue: VecDeque<(NodeId, Output)>,
        dataset: Dataset,
        /// Requests sent, by name, in order.
        sent: Vec<String>,
        done: Vec<OpResult>,
        next_block: u64,
        /// Hold back the next remote read of a slot (not of a frame) instead of doing it.
        hold_slot_read: bool,
        held: Vec<(NodeId, Output)>,
    }

    impl Pair {
        fn new(bugs: super::super::Bugs) -> Pair {
            let dataset = Dataset {
                id: 1,
                params: DatasetParams {
                    mode: Mode::Mrmw,
                    replicas: 1,
                    chunk_pages: 4,
                },
                owners: vec![2],
                first_home: None,
            };
            let mut pair = Pair {
                nodes: BTreeMap::new(),
                queue: VecDeque::new(),
                dataset: dataset.clone(),
                sent: Vec::new(),
                done: Vec::new(),
                next_block: 1,
                hold_slot_read: false,
                held: Vec::new(),
            };
            for id in [1, 2] {
                let region = Arc::new(SimRegion::from_image(vec![0u8; 4 << 20]));
                let table = PageTable::open(Box::new(Arc::clone(&region)), id, 1)
                    .unwrap()
                    .0;
                let config = Config {
                    id,
                    incarnation: 1,
                    nodes: vec![1, 2],
                    datasets: vec![dataset.clone()],
                    rebuilding: false,
                    successors: BTreeMap::new(),
                    timing: Default::default(),
                    version_block: 8,
                    one_sided: id == 1,
                    bugs,
                };
                let machine = Machine::start(config, table, 0).unwrap();
                pair.nodes.insert(id, (machine, region));
            }
            pair.handle(1, Input::Tick);
            pair.handle(2, Input::Tick);
            pair.pump();
            assert!(pair.nodes[&2].0.is_ready(), "the owner's rejoin is over");
            pair
        }

        fn handle(&mut self, node: NodeId, input: Input) {
            let outputs = self.nodes.get_mut(&node).unwrap().0.handle(0, input);
            self.queue
                .extend(outputs.into_iter().map(|output| (node, output)));
        }

        fn pump(&mut self) {
            while let Some((node, output)) = self.queue.pop_front() {
                match output {
                    Output::Send { to, call, request } => {
                        let name = format!("{request:?}");
                        self.sent
                            .push(name.split([' ', '{']).next().unwrap().into());
                        let from = node;
                        self.handle(
                            to,
                            Input::Request {
                                from,
                                call,
                                request,
                            },
                        );
                    }
                    Output::Reply { to, call, reply } => self.handle(
                        to,
                        Input::Reply {
                            from: node,
                            call,
                            reply,
                        },
                    ),
                    Output::AskDispatcher {
                        call,
                        request: DispatcherRequest::VersionBlock { .. },
                    } => {
                        let reply = DispatcherReply::VersionBlock {
                            start: self.next_block,
                        };
                        self.next_block += 8;
                        self.handle(node, Input::DispatcherReply { call, reply });
                    }
                    Output::ReadRemote { len, .. } if self.hold_slot_read && len != PAGE_BYTES => {
                        self.hold_slot_read = false;
                        self.held.push((node, output));
                    }
                    Output::ReadRemote {
                        to,
                        call,
                        offset,
                        len,
                    } => {
                        let bytes = self.nodes[&to].1.read_live(offset as usize, len);
                        self.handle(
                            node,
                            Input::RemoteRead {
                                from: to,
                                call,
                                bytes,
                            },
                        );
                    }
                    Output::Done(OpDone { result, .. }) => self.done.push(result),
                    // The kernel holds nothing here: dropped at once.
                    Output::Invalidate {
                        dataset,
                        pages,
                        mark,
                    } => self.handle(
                        node,
                        Input::Invalidated {
                            dataset,
                            pages,
                            mark,
                        },
                    ),
                    Output::AskDispatcher { .. } => {}
                }
            }
        }

        /// Node 1 commits `byte` to the start of page 0 (MRMW, at the owner).
        fn commit(&mut self, op: u64, byte: u8) {
            let stores = vec![(0, 0, vec![byte; 8])];
            let write = Op::Write {
                op,
                dataset: self.dataset.id,
                stores,
                msync: true,
            };
            self.handle(1, Input::Start(write));
            self.pump();
        }

        /// A program on node 1 reads page 0 (its own copy dropped first, so the read goes
        /// to the owner).
        fn read(&mut self, op: u64) {
            let machine = &mut self.nodes.get_mut(&1).unwrap().0;
            machine.table_mut().drop_dataset(1).unwrap();
            let read = Op::Read {
                op,
                dataset: 1,
                page: 0,
            };
            self.handle(1, Input::Start(read));
            self.pump();
        }

        /// The slot read held back goes ahead, and everything it leads to.
        fn release_held(&mut self) {
            let held = std::mem::take(&mut self.held);
            self.queue.extend(held);
            self.pump();
        }
    }

    /// `result` is a read of page 0 at `version`, its first 8 bytes `byte`, the rest zeros.
    fn assert_read(result: &OpResult, version: u64, byte: u8) {
        let mut page = vec![0u8; PAGE_BYTES];
        page[..8].fill(byte);
        match result {
            OpResult::Read {
                version: read,
                bytes,
                ..
            } => assert_eq!((*read, bytes), (version, &page)),
            other => panic!("read: {other:?}"),
        }
    }

    #[test]
    fn a_page_read_one_sided_is_the_owners_committed_copy() {
        let mut pair = Pair::new(Default::default());
        pair.commit(1, 7);
        assert!(matches!(pair.done[0], OpResult::Committed { .. }));
        pair.sent.clear();
        pair.read(2);
        assert_eq!(pair.sent, ["Locate"], "no Fetch: the bytes came one-sided");
        assert_read(&pair.done[1], 1, 7);
    }

    #[test]
    fn a_page_moved_under_a_one_sided_read_is_fetched_two_sided() {
        let mut pair = Pair::new(Default::default());
        pair.commit(1, 7);
        pair.hold_slot_read = true;
        pair.read(2);
        assert_eq!(pair.held.len(), 1, "the frame is read; its slot is not yet");
        // A commit moves page 0 to a new frame between the frame's read and the slot's.
        pair.commit(3, 9);
        assert!(matches!(pair.done[1], OpResult::Committed { .. }));
        pair.sent.clear();
        pair.release_held();
        assert_eq!(pair.sent, ["Fetch"], "the slot changed: fetched two-sided");
        assert_read(&pair.done[2], 2, 9);
    }

    #[test]
    fn a_page_never_written_is_fetched_two_sided() {
        let mut pair = Pair::new(Default::default());
        pair.sent.clear();
        pair.read(1);
        assert_eq!(pair.sent, ["Locate", "Fetch"]);
        assert_read(&pair.done[0], 0, 0);
    }

    #[test]
    fn planted_trusting_the_frame_reads_a_moved_page_at_its_old_version() {
        let bugs = super::super::Bugs {
            trust_one_sided_frame: true,
            ..Default::default()
        };
        let mut pair = Pair::new(bugs);
        pair.commit(1, 7);
        pair.hold_slot_read = true;
        pair.read(2);
        pair.commit(3, 9);
        // Node 1's copy of its own commit goes too: the read would take it (it is newer
        // than what the read brings, `PageTable::read_fetched`), and hide the bug.
        let machine = &mut pair.nodes.get_mut(&1).unwrap().0;
        machine.table_mut().drop_dataset(1).unwrap();
        pair.release_held();
        assert!(
            matches!(&pair.done[2], OpResult::Read { version: 1, .. }),
            "{:?}",
            pair.done[2]
        );
    }
}
