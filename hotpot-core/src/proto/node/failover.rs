//! Reads whose owner does not answer (docs/design.md, "Cluster protocol"): the reader asks
//! every other live node for its persisted copy (`FetchCopy`) and takes the newest. The owner
//! never heard of this reader, so its commits would not reach it: the page is fetched again
//! from its owner once the owner is live, which records this node as a holder and brings
//! anything newer. Until then reads of that page say they failed over (the copy is the
//! newest only among the nodes that answered). Must survive: nobody answering, the owner
//! coming back while the copies are gathered, the owner replaced meanwhile.

use std::collections::{BTreeMap, BTreeSet};

use super::client::{OpId, OpResult};
use super::{Machine, Purpose};
use crate::pm::PageKey;
use crate::proto::messages::{NodeReply, NodeRequest, VersionedPage};
use crate::proto::types::{DatasetId, FsError, NodeId};

#[derive(Default)]
pub(super) struct FailoverState {
    /// Pages taken from another node while their owner was silent, and that owner.
    taken: BTreeMap<PageKey, NodeId>,
    /// When each of them was last asked of its owner again.
    asked_ms: BTreeMap<PageKey, u64>,
}

/// A read failing over: who has not answered yet, and the newest copy so far.
#[derive(Clone, Debug)]
pub(super) struct Gathering {
    page: u64,
    owner: NodeId,
    awaiting: BTreeSet<NodeId>,
    best: Option<VersionedPage>,
}

impl Machine {
    /// Op `id`'s owner did not answer its `Fetch` of `page`: every other live node is asked
    /// for its copy (this node's own counts too).
    pub(super) fn fail_over(&mut self, id: OpId, dataset: DatasetId, page: u64, owner: NodeId) {
        let me = self.config.id;
        let awaiting: BTreeSet<NodeId> = self
            .live()
            .into_iter()
            .filter(|node| *node != me && *node != owner)
            .collect();
        let best = self.persisted_copy(dataset, page);
        let gathering = Gathering {
            page,
            owner,
            awaiting: awaiting.clone(),
            best,
        };
        if awaiting.is_empty() {
            return self.failed_over(id, dataset, gathering);
        }
        self.set_step_gathering(id, gathering);
        for node in awaiting {
            let request = NodeRequest::FetchCopy { dataset, page };
            self.send(node, request, Purpose::Op(id));
        }
    }

    /// One node's answer to a failing-over read (`None`: none in time).
    pub(super) fn gathering_answered(
        &mut self,
        id: OpId,
        dataset: DatasetId,
        mut gathering: Gathering,
        from: NodeId,
        reply: Option<NodeReply>,
    ) {
        gathering.awaiting.remove(&from);
        if let Some(NodeReply::Copy(Some(copy))) = reply {
            if gathering
                .best
                .as_ref()
                .is_none_or(|best| copy.version > best.version)
            {
                gathering.best = Some(copy);
            }
        }
        if gathering.awaiting.is_empty() {
            self.failed_over(id, dataset, gathering);
        } else {
            self.set_step_gathering(id, gathering);
        }
    }

    /// Every node answered (or did not in time): the newest copy is kept and read, or the
    /// read fails (never zeros: "never written" cannot be told from "lost").
    fn failed_over(&mut self, id: OpId, dataset: DatasetId, gathering: Gathering) {
        let Some(copy) = gathering.best else {
            let why = format!(
                "owner {} of page {} of dataset {dataset} is unreachable and no live node has a copy",
                gathering.owner, gathering.page
            );
            return self.op_done(id, OpResult::Refused(FsError::Io(why)));
        };
        let key = (dataset, gathering.page);
        if let Err(error) = self.table.install_copy(key, copy.version, &copy.bytes) {
            let why = format!("install: {error}");
            return self.op_done(id, OpResult::Refused(FsError::Io(why)));
        }
        self.failover.taken.insert(key, gathering.owner);
        let result = OpResult::Read {
            version: copy.version,
            bytes: copy.bytes,
            failed_over: true,
        };
        self.read_done(id, key, result);
    }

    /// `FetchCopy`: this node's persisted copy, if any.
    pub(super) fn serve_fetch_copy(&self, dataset: DatasetId, page: u64) -> NodeReply {
        NodeReply::Copy(self.persisted_copy(dataset, page))
    }

    fn persisted_copy(&self, dataset: DatasetId, page: u64) -> Option<VersionedPage> {
        self.table
            .read_persisted((dataset, page))
            .map(|(version, bytes)| VersionedPage {
                page,
                version,
                bytes,
            })
    }

    /// Whether this node's copy of `key` was taken while its owner was silent and the owner
    /// has not been asked again yet.
    pub(super) fn is_failed_over(&self, key: PageKey) -> bool {
        self.failover.taken.contains_key(&key)
    }

    /// Pages taken elsewhere and not fetched again from their owner yet.
    pub fn failed_over_pages(&self) -> usize {
        self.failover.taken.len()
    }

    /// The owner answered a `Fetch` of `key`: this node is a holder it knows.
    pub(super) fn fetched_from_owner(&mut self, key: PageKey) {
        self.failover.taken.remove(&key);
        self.failover.asked_ms.remove(&key);
    }

    /// Pages taken elsewhere are fetched again from their owner (or the node promoted in its
    /// place) once it is live, every re-replication period at most.
    pub(super) fn refetch_taken(&mut self) {
        let (me, now) = (self.config.id, self.now_ms);
        let every = self.config.timing.rereplicate_every_ms;
        let taken: Vec<(PageKey, NodeId)> = self
            .failover
            .taken
            .iter()
            .map(|(key, owner)| (*key, self.acting(*owner)))
            .collect();
        for (key, owner) in taken {
            // Promoted in the owner's place, the take-over learnt every copy; a deleted
            // dataset is no owner's any more.
            if owner == me || self.records.is_deleted(key.0) {
                self.fetched_from_owner(key);
                continue;
            }
            let due = self
                .failover
                .asked_ms
                .get(&key)
                .is_none_or(|at| now >= at + every);
            if !due || !self.live.contains(&owner) {
                continue;
            }
            self.failover.asked_ms.insert(key, now);
            let request = NodeRequest::Fetch {
                dataset: key.0,
                page: key.1,
                from: me,
            };
            self.send(owner, request, Purpose::Refetch { key });
        }
    }

    /// The owner's answer to a page fetched again: a newer copy replaces the one taken.
    pub(super) fn refetch_answered(&mut self, key: PageKey, reply: Option<NodeReply>) {
        let Some(NodeReply::Page(copy)) = reply else {
            return; // asked again after another period
        };
        // Only if newer. Not stored (PM full), or kept back by a prepared copy of the page
        // waiting here (which, if aborted, would leave the copy taken: found by hotpot-sim):
        // asked again after another period.
        if copy.version > 0 {
            match self.table.install_copy(key, copy.version, &copy.bytes) {
                Ok(true) => self.kernel_stale(key.0, vec![key.1]),
                Ok(false) => {}
                Err(_) => return,
            }
            if self.table.version_of(key) < copy.version {
                return;
            }
        }
        self.fetched_from_owner(key);
    }
}
