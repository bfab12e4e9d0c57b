//! Views of a published version (docs/design.md, "Published versions"). As an owner: pins,
//! which are leases (proto/pins.rs), and reads at a version (`ReadAt`), which wait for the
//! apply of a commit holding the pages, as fetches do. As the viewing node: a view pinned at
//! every owner of its dataset (all or none), renewed while it lasts, read page by page from
//! the pages' owners, unpinned at its end. The daemon's versions.rs and engine/views.rs do
//! the same with threads. Must survive: an owner that restarts (its pins and kept versions
//! are gone: a read there is refused as stale, never answered with other bytes); a viewing
//! node that dies (its pins expire); an owner whose copy changed without a dataset version
//! (after a rejoin or a take-over: it assumes the latest version for it, so views below
//! that are refused there).

use std::collections::{BTreeMap, BTreeSet};

use super::client::{ClientOp, Step};
use super::{Machine, OpId, OpResult, Purpose};
use crate::page::ViewKey;
use crate::pm::{PageKey, PAGE_BYTES};
use crate::proto::messages::{NodeReply, NodeRequest};
use crate::proto::pins::{not_kept, PinLeases, PIN_RENEW_EVERY_MS};
use crate::proto::types::{Dataset, DatasetId, FsError, NodeId};

/// Operation numbers this machine gives its own `Latest` questions (a pin's, when versions
/// are unknown here, and a peer's or tool's `Latest` request), apart from programs'
/// operations.
const INTERNAL_OPS: OpId = 1 << 63;

#[derive(Default)]
pub(super) struct ViewState {
    /// As an owner: when each pin was last renewed.
    leases: PinLeases,
    /// Pins waiting for the dataset's latest version (as an owner), and `Latest` requests,
    /// by the internal `Latest` asking it.
    waiting: BTreeMap<OpId, Waiting>,
    next_internal: OpId,
    /// As the viewing node: its views, by its number for each, with the dataset and the
    /// owners that pinned it.
    mine: BTreeMap<u64, (DatasetId, BTreeSet<NodeId>)>,
    last_renewal_ms: u64,
}

/// What waits for an internal `Latest`.
enum Waiting {
    Pin(WaitingPin),
    /// A `Latest` request (`hotpot stat`'s), answered with the version.
    Request {
        from: NodeId,
        call: u64,
    },
}

/// A `Pin` at this owner, waiting for the latest version to stand for its pages of unknown
/// version.
struct WaitingPin {
    from: NodeId,
    call: u64,
    view: ViewKey,
    dataset: DatasetId,
    version: u64,
    /// The owned pages whose dataset version is unknown, with their page versions then.
    unknown: Vec<(u64, u64)>,
}

/// A viewing operation's step.
#[derive(Clone, Debug)]
pub(super) enum Viewing {
    /// `Pin`: the owners asked that have not answered, those that pinned it, and the first
    /// refusal.
    Pinning {
        view: u64,
        waiting: BTreeSet<NodeId>,
        pinned: BTreeSet<NodeId>,
        refused: Option<FsError>,
    },
    /// `ReadAt`: one page, from its owner.
    Reading { page: u64 },
}

impl Machine {
    /// The owners of `dataset` now (through the promotions).
    fn owners_now(&self, dataset: &Dataset) -> BTreeSet<NodeId> {
        dataset
            .owners
            .iter()
            .map(|node| self.acting(*node))
            .collect()
    }

    /// `Op::Pin`: view `view` of `dataset` at `version`, pinned at every owner.
    pub(super) fn start_pin(&mut self, id: OpId, dataset: Dataset, view: u64, version: u64) {
        let owners = self.owners_now(&dataset);
        let mut pinning = ClientOp::new(dataset.clone(), self.now_ms);
        pinning.step = Step::Viewing(Viewing::Pinning {
            view,
            waiting: owners.clone(),
            pinned: BTreeSet::new(),
            refused: None,
        });
        self.client.ops.insert(id, pinning);
        for owner in owners {
            let request = NodeRequest::Pin {
                view: (self.config.id, view),
                dataset: dataset.clone(),
                version,
            };
            self.send(owner, request, Purpose::Op(id));
        }
    }

    /// `Op::ReadAt`: one page at `version`, from its owner now.
    pub(super) fn start_read_at(&mut self, id: OpId, dataset: Dataset, version: u64, page: u64) {
        let owner = self.owner_of(&dataset, page);
        let request = NodeRequest::ReadAt {
            dataset: dataset.id,
            version,
            pages: vec![page],
        };
        let mut reading = ClientOp::new(dataset, self.now_ms);
        reading.owner = owner;
        reading.step = Step::Viewing(Viewing::Reading { page });
        self.client.ops.insert(id, reading);
        self.send(owner, request, Purpose::Op(id));
    }

    /// `Op::Unpin`: the view ends here at once; its owners are told (a pin the message does
    /// not reach expires).
    pub(super) fn unpin_view(&mut self, id: OpId, view: u64) {
        if let Some((_, owners)) = self.views.mine.remove(&view) {
            self.unpin_at(view, owners);
        }
        self.op_done(id, OpResult::Unpinned);
    }

    fn unpin_at(&mut self, view: u64, owners: BTreeSet<NodeId>) {
        for owner in owners {
            let request = NodeRequest::Unpin {
                view: (self.config.id, view),
            };
            self.send(owner, request, Purpose::Notice);
        }
    }

    /// An owner's answer to a viewing operation (`None`: none in time).
    pub(super) fn view_answered(
        &mut self,
        id: OpId,
        step: Viewing,
        from: NodeId,
        reply: Option<NodeReply>,
    ) {
        match step {
            Viewing::Pinning {
                view,
                mut waiting,
                mut pinned,
                mut refused,
            } => {
                if !waiting.remove(&from) {
                    return;
                }
                match reply {
                    Some(NodeReply::Done) => {
                        pinned.insert(from);
                    }
                    other => {
                        let error = match other {
                            Some(NodeReply::Failed(error)) => error,
                            Some(other) => {
                                FsError::Io(format!("owner {from} answered a pin with {other:?}"))
                            }
                            None => FsError::Io(format!("owner {from} did not answer a pin")),
                        };
                        refused.get_or_insert(error);
                    }
                }
                if !waiting.is_empty() {
                    if let Some(op) = self.client.ops.get_mut(&id) {
                        op.step = Step::Viewing(Viewing::Pinning {
                            view,
                            waiting,
                            pinned,
                            refused,
                        });
                    }
                    return;
                }
                let dataset = self.client.ops.get(&id).map(|op| op.dataset.id);
                match (refused, dataset) {
                    (None, Some(dataset)) => {
                        self.views.mine.insert(view, (dataset, pinned));
                        self.op_done(id, OpResult::Pinned);
                    }
                    (refused, _) => {
                        // All or none: every owner asked lets it go (one that did not
                        // answer may have pinned it).
                        let asked = self
                            .client
                            .ops
                            .get(&id)
                            .map(|op| self.owners_now(&op.dataset))
                            .unwrap_or_default();
                        self.unpin_at(view, asked.union(&pinned).copied().collect());
                        let error = refused.unwrap_or(FsError::NotFound);
                        self.op_done(id, OpResult::Refused(error));
                    }
                }
            }
            Viewing::Reading { page } => {
                let result = match reply {
                    Some(NodeReply::Pages(mut pages))
                        if pages.len() == 1 && pages[0].page == page =>
                    {
                        let bytes = pages.pop().expect("one page").bytes;
                        match bytes.len() {
                            0 => OpResult::ReadAt {
                                bytes: vec![0u8; PAGE_BYTES],
                            },
                            PAGE_BYTES => OpResult::ReadAt { bytes },
                            other => OpResult::Refused(FsError::Io(format!(
                                "owner {from} sent {other} bytes for page {page}"
                            ))),
                        }
                    }
                    Some(NodeReply::Failed(error)) => OpResult::Refused(error),
                    Some(other) => OpResult::Refused(FsError::Io(format!(
                        "owner {from} answered a read at a version with {other:?}"
                    ))),
                    None => OpResult::Refused(FsError::Io(format!(
                        "owner {from} did not answer a read at a version"
                    ))),
                };
                self.op_done(id, result);
            }
        }
    }

    /// As the viewing node: its pins renewed at their owners, every `PIN_RENEW_EVERY_MS`.
    pub(super) fn renew_pins(&mut self) {
        if self.now_ms < self.views.last_renewal_ms + PIN_RENEW_EVERY_MS {
            return;
        }
        self.views.last_renewal_ms = self.now_ms;
        let mut by_owner: BTreeMap<NodeId, Vec<ViewKey>> = BTreeMap::new();
        for (view, (_, owners)) in &self.views.mine {
            for owner in owners {
                by_owner
                    .entry(*owner)
                    .or_default()
                    .push((self.config.id, *view));
            }
        }
        for (owner, views) in by_owner {
            self.send(owner, NodeRequest::RenewPins { views }, Purpose::Notice);
        }
    }

    /// `Pin` at an owner: keep what `view` needs of `dataset` at `version`. Owned pages
    /// whose dataset version is unknown here take the latest as an over-estimate first (the
    /// daemon's `serve_pin`), asked as a program's `Latest` is.
    pub(super) fn serve_pin(
        &mut self,
        from: NodeId,
        call: u64,
        view: ViewKey,
        dataset: Dataset,
        version: u64,
    ) {
        let me = self.config.id;
        let unknown: Vec<(u64, u64)> = self
            .table
            .unknown_versions(dataset.id)
            .into_iter()
            .filter(|(page, _)| self.owner_of(&dataset, *page) == me)
            .collect();
        let waiting = WaitingPin {
            from,
            call,
            view,
            dataset: dataset.id,
            version,
            unknown,
        };
        if waiting.unknown.is_empty() {
            return self.pin_now(waiting);
        }
        self.ask_latest_for(dataset, Waiting::Pin(waiting));
    }

    /// `Latest` from a peer or a tool (`hotpot stat`): asked as a program's `Latest` is, by
    /// an operation of this machine's own, and answered with its version.
    pub(super) fn serve_latest(&mut self, from: NodeId, call: u64, dataset: Dataset) {
        self.ask_latest_for(dataset, Waiting::Request { from, call });
    }

    fn ask_latest_for(&mut self, dataset: Dataset, waiting: Waiting) {
        let id = INTERNAL_OPS | self.views.next_internal;
        self.views.next_internal += 1;
        self.views.waiting.insert(id, waiting);
        let mut asking = ClientOp::new(dataset.clone(), self.now_ms);
        asking.step = Step::AskingLatest;
        self.client.ops.insert(id, asking);
        self.ask_latest(id, dataset);
    }

    /// An operation ended: if it was an internal `Latest`, the pin or request waiting for
    /// it goes on (true), and no program hears of it.
    pub(super) fn internal_done(&mut self, id: OpId, result: &OpResult) -> bool {
        let Some(waiting) = self.views.waiting.remove(&id) else {
            return false;
        };
        let (from, call) = match &waiting {
            Waiting::Pin(pin) => (pin.from, pin.call),
            Waiting::Request { from, call } => (*from, *call),
        };
        match (result, waiting) {
            (OpResult::Latest { version: latest }, Waiting::Pin(pin)) => {
                self.table
                    .assume_versions(pin.dataset, &pin.unknown, *latest);
                self.pin_now(pin);
            }
            (OpResult::Latest { version }, Waiting::Request { .. }) => {
                self.reply(from, call, NodeReply::Version(*version))
            }
            (OpResult::Refused(error), _) => {
                self.reply(from, call, NodeReply::Failed(error.clone()))
            }
            (other, _) => {
                let why = format!("the latest version could not be had: {other:?}");
                self.reply(from, call, NodeReply::Failed(FsError::Io(why)))
            }
        }
        true
    }

    /// The versions views pin on this node as an owner (`hotpot stat`'s).
    pub(super) fn serve_pinned_versions(&self, dataset: DatasetId) -> NodeReply {
        let pinned = self.table.pinned_versions().remove(&dataset);
        NodeReply::Versions(pinned.unwrap_or_default())
    }

    fn pin_now(&mut self, pin: WaitingPin) {
        let reply = match self.table.pin_version(pin.view, pin.dataset, pin.version) {
            Ok(()) => {
                self.views.leases.pinned(pin.view, self.now_ms);
                NodeReply::Done
            }
            Err(oldest) => {
                NodeReply::Failed(not_kept(pin.version, pin.dataset, self.config.id, oldest))
            }
        };
        self.reply(pin.from, pin.call, reply);
    }

    pub(super) fn serve_unpin(&mut self, view: ViewKey) -> NodeReply {
        self.views.leases.unpinned(view);
        self.table.unpin_version(view);
        NodeReply::Done
    }

    pub(super) fn serve_renew(&mut self, views: &[ViewKey]) -> NodeReply {
        self.views.leases.renew(views, self.now_ms);
        NodeReply::Done
    }

    /// As an owner: pins whose viewing node stopped renewing them go.
    pub(super) fn expire_pins(&mut self) {
        for view in self.views.leases.expired(self.now_ms) {
            self.table.unpin_version(view);
        }
    }

    /// `ReadAt` at an owner: its pages of `dataset` as they were at `version`, once no
    /// commit of them waits for its apply here (one may be at or below `version`). Pages
    /// this node does not own by its own view are refused: a node that owns them no more
    /// may have no copy, which would read as zeros.
    pub(super) fn serve_read_at(
        &mut self,
        from: NodeId,
        call: u64,
        dataset: DatasetId,
        version: u64,
        pages: Vec<u64>,
    ) {
        if let Some(reply) = self.not_owner(dataset, &pages) {
            return self.reply(from, call, reply);
        }
        let keys: Vec<PageKey> = pages.iter().map(|page| (dataset, *page)).collect();
        if self.owner.locks.unsettled(&keys).is_some() {
            let request = NodeRequest::ReadAt {
                dataset,
                version,
                pages,
            };
            return self.park(from, call, request, keys);
        }
        let mut out = Vec::with_capacity(pages.len());
        for page in pages {
            let bytes = if self.config.bugs.read_views_current {
                // Planted bug: the current copy, whatever version the view is at.
                Ok(self
                    .table
                    .read_persisted((dataset, page))
                    .map(|(_, bytes)| bytes))
            } else {
                self.table.read_at_version(dataset, page, version)
            };
            match bytes {
                Ok(bytes) => out.push(crate::proto::messages::VersionedPage {
                    page,
                    version,
                    bytes: bytes.unwrap_or_default(),
                }),
                Err(why) => return self.reply(from, call, NodeReply::Failed(FsError::Stale(why))),
            }
        }
        self.reply(from, call, NodeReply::Pages(out));
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{answer, block_call, commit, committed_at, done, grant_block, home};
    use super::super::{Input, Machine};
    use crate::proto::messages::{NodeReply, NodeRequest};
    use crate::proto::types::{Dataset, FsError};

    /// A request from node 2 to node 1, and node 1's answer to it.
    fn ask(machine: &mut Machine, now_ms: u64, request: NodeRequest) -> Option<NodeReply> {
        let outputs = machine.handle(
            now_ms,
            Input::Request {
                from: 2,
                call: 900 + now_ms,
                request,
            },
        );
        assert_eq!(done(&outputs), None, "no program asked anything");
        answer(&outputs)
    }

    fn read_at(machine: &mut Machine, now_ms: u64, version: u64) -> Option<NodeReply> {
        let request = NodeRequest::ReadAt {
            dataset: 1,
            version,
            pages: vec![0],
        };
        ask(machine, now_ms, request)
    }

    fn first_bytes(reply: Option<NodeReply>) -> Vec<u8> {
        match reply {
            Some(NodeReply::Pages(pages)) => pages[0].bytes[..8].to_vec(),
            other => panic!("no page: {other:?}"),
        }
    }

    fn pin(dataset: &Dataset, view: u64, version: u64) -> NodeRequest {
        NodeRequest::Pin {
            view: (2, view),
            dataset: dataset.clone(),
            version,
        }
    }

    #[test]
    fn a_pinned_version_reads_the_same_after_a_later_commit_until_its_lease_ends() {
        let (mut machine, dataset) = home();
        let outputs = commit(&mut machine, &dataset, 10, 1);
        let call = block_call(&outputs).expect("a block asked for");
        let outputs = grant_block(&mut machine, 20, call, 1);
        assert_eq!(committed_at(answer(&outputs)), 1);
        assert_eq!(
            ask(&mut machine, 30, pin(&dataset, 7, 1)),
            Some(NodeReply::Done)
        );
        assert_eq!(
            committed_at(answer(&commit(&mut machine, &dataset, 40, 2))),
            2
        );
        assert_eq!(first_bytes(read_at(&mut machine, 50, 1)), vec![1; 8]);
        assert_eq!(first_bytes(read_at(&mut machine, 60, 2)), vec![2; 8]);
        // Renewed, the pin outlives its first lease; not renewed, it goes.
        let lease = crate::proto::pins::PIN_LEASE_MS;
        let renew = NodeRequest::RenewPins {
            views: vec![(2, 7)],
        };
        assert_eq!(ask(&mut machine, lease, renew), Some(NodeReply::Done));
        assert_eq!(
            first_bytes(read_at(&mut machine, lease + 100, 1)),
            vec![1; 8]
        );
        machine.handle(2 * lease + 100, Input::Tick);
        assert!(matches!(
            read_at(&mut machine, 2 * lease + 200, 1),
            Some(NodeReply::Failed(FsError::Stale(_)))
        ));
    }

    #[test]
    fn a_tool_gets_the_latest_version_and_the_versions_pinned() {
        let (mut machine, dataset) = home();
        let outputs = commit(&mut machine, &dataset, 10, 1);
        let call = block_call(&outputs).expect("a block asked for");
        grant_block(&mut machine, 20, call, 1);
        assert_eq!(
            committed_at(answer(&commit(&mut machine, &dataset, 30, 2))),
            2
        );
        let latest = NodeRequest::Latest {
            dataset: dataset.clone(),
        };
        assert_eq!(ask(&mut machine, 40, latest), Some(NodeReply::Version(2)));
        let pinned = || NodeRequest::PinnedVersions { dataset: 1 };
        assert_eq!(
            ask(&mut machine, 50, pinned()),
            Some(NodeReply::Versions(Vec::new()))
        );
        assert_eq!(
            ask(&mut machine, 60, pin(&dataset, 7, 2)),
            Some(NodeReply::Done)
        );
        assert_eq!(
            ask(&mut machine, 70, pinned()),
            Some(NodeReply::Versions(vec![2]))
        );
        let copies = ask(&mut machine, 80, NodeRequest::PageCopies { dataset: 1 });
        let Some(NodeReply::PageCopies(copies)) = copies else {
            panic!("no copies: {copies:?}");
        };
        assert_eq!(
            copies
                .iter()
                .map(|copy| (copy.page, copy.version))
                .collect::<Vec<_>>(),
            vec![(0, 2)]
        );
    }

    #[test]
    fn a_pin_over_pages_of_unknown_version_takes_the_latest_first() {
        let (mut machine, dataset) = home();
        // A copy that came by no commit of this owner: its dataset version is unknown.
        let bytes = vec![3u8; crate::pm::PAGE_BYTES];
        machine.table_mut().install_copy((1, 0), 1, &bytes).unwrap();
        let outputs = machine.handle(
            10,
            Input::Request {
                from: 2,
                call: 901,
                request: pin(&dataset, 7, 3),
            },
        );
        assert_eq!(answer(&outputs), None, "the latest first");
        let call = block_call(&outputs).expect("the home asks for its block");
        let outputs = grant_block(&mut machine, 20, call, 5);
        assert_eq!(done(&outputs), None, "the pin's question is no program's");
        assert!(
            matches!(answer(&outputs), Some(NodeReply::Failed(FsError::Stale(_)))),
            "the page may hold anything up to the latest (4): version 3 is refused, {outputs:?}"
        );
        assert_eq!(
            ask(&mut machine, 30, pin(&dataset, 8, 4)),
            Some(NodeReply::Done)
        );
        assert_eq!(first_bytes(read_at(&mut machine, 40, 4)), vec![3; 8]);
    }
}
