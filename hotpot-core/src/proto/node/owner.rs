//! The owner's state and its serving besides commits (commit.rs): page locks and requests
//! parked on them, holders and counted copies, fetches and registrations, re-replication.
//! Must survive: a lock that would be held forever (bounded waits), a holder list older than
//! a commit (holders only grow), a copy that never arrives (counted only once stored).

use std::collections::{BTreeMap, BTreeSet};

use super::{Machine, Purpose};
use crate::page::TxKey;
use crate::pm::PageKey;
use crate::proto::copies::CopyBook;
use crate::proto::locks::PageLocks;
use crate::proto::messages::{NodeReply, NodeRequest, VersionedPage};
use crate::proto::replication;
use crate::proto::types::{Dataset, DatasetId, FsError, NodeId};

/// A request waiting for page locks to clear, or for this node's rejoin to be over.
#[derive(Clone, Debug)]
pub(super) struct Parked {
    pub(super) from: NodeId,
    pub(super) call: u64,
    pub(super) request: NodeRequest,
    pub(super) keys: Vec<PageKey>,
    pub(super) until: Until,
    pub(super) deadline_ms: u64,
}

/// What a parked request waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Until {
    /// A commit: the keys unlocked.
    Unlocked,
    /// A read: the keys' commit applied.
    Applied,
    /// This node serving as an owner (its rejoin over), as the daemon's `wait_ready` waits.
    Ready,
}

#[derive(Default)]
pub(super) struct OwnerState {
    /// Which commit holds each page, and whether it is applied here (proto/locks.rs).
    pub(super) locks: PageLocks,
    /// Holders, current and behind copies of each page (proto/copies.rs).
    pub(super) copies: CopyBook,
    pub(super) commits: BTreeMap<TxKey, super::commit::OwnerCommit>,
    /// Commit requests answered, by tx: a duplicate gets the same answer.
    pub(super) answered: BTreeMap<TxKey, NodeReply>,
    pub(super) parked: Vec<Parked>,
    pub(super) last_rereplicate_ms: u64,
    /// The newest registration served per (sender, dataset), by call id (call ids only grow,
    /// across the sender's starts too): an older one, parked across the sender's restart,
    /// must not undo what a newer one said.
    pub(super) newest_register: BTreeMap<(NodeId, DatasetId), u64>,
}

/// How many answered commits an owner remembers for duplicates.
const ANSWERED_KEPT: usize = 4_096;

impl OwnerState {
    /// Whether a request waits for this node's rejoin to end.
    pub(super) fn waits_for_ready(&self) -> bool {
        self.parked
            .iter()
            .any(|parked| parked.until == Until::Ready)
    }

    pub(super) fn remember_answer(&mut self, tx: TxKey, reply: NodeReply) {
        if self.answered.len() >= ANSWERED_KEPT {
            if let Some(oldest) = self.answered.keys().next().copied() {
                self.answered.remove(&oldest);
            }
        }
        self.answered.insert(tx, reply);
    }
}

impl Machine {
    /// The owner of `page` now: its chunk's owner, or the node promoted in its place.
    pub(super) fn owner_of(&self, dataset: &Dataset, page: u64) -> NodeId {
        self.acting(dataset.owner_of_page(page))
    }

    /// `node`, or the node promoted in its place when it was lost.
    pub(super) fn acting(&self, node: NodeId) -> NodeId {
        self.successors.get(&node).copied().unwrap_or(node)
    }

    /// Of `pages` of `dataset`, those `node` owns now.
    pub(super) fn pages_of(
        &self,
        dataset: &Dataset,
        pages: impl IntoIterator<Item = u64>,
        node: NodeId,
    ) -> Vec<u64> {
        pages
            .into_iter()
            .filter(|page| self.owner_of(dataset, *page) == node)
            .collect()
    }

    /// Whether `node` owns any chunk of `dataset` now.
    pub(super) fn owns_any(&self, dataset: &Dataset, node: NodeId) -> bool {
        dataset
            .owners
            .iter()
            .any(|owner| self.acting(*owner) == node)
    }

    /// A request for pages this node does not own by its own view: refused (the asker's
    /// view is newer, or older; it asks again, as it would a busy owner). A node promoted
    /// in place of a lost one must not serve its pages before it knows and took them over.
    pub(super) fn not_owner(&self, dataset: DatasetId, pages: &[u64]) -> Option<NodeReply> {
        let record = self.dataset(dataset)?;
        let me = self.config.id;
        let page = pages
            .iter()
            .find(|page| self.owner_of(record, **page) != me)?;
        Some(NodeReply::Failed(FsError::Busy(format!(
            "node {me} does not own page {page} of dataset {dataset} (its view of the owners may be older or newer than the asker's)"
        ))))
    }

    pub(super) fn park(
        &mut self,
        from: NodeId,
        call: u64,
        request: NodeRequest,
        keys: Vec<PageKey>,
    ) {
        let deadline_ms = self.now_ms + self.config.timing.lock_wait_ms;
        // A commit, and a rejoin (which replaces what the commits in flight would record
        // about its node), wait for the unlock; a read only for the apply.
        let until = match request {
            NodeRequest::Commit { .. } | NodeRequest::Register { tx: None, .. } => Until::Unlocked,
            _ => Until::Applied,
        };
        self.owner.parked.push(Parked {
            from,
            call,
            request,
            keys,
            until,
            deadline_ms,
        });
    }

    /// While this node rejoins, an owner's request that the daemon's `wait_ready` holds
    /// (`waits_until_ready`) waits here for the rejoin to end, up to `ready_wait_ms`, instead
    /// of being refused.
    pub(super) fn park_until_ready(&mut self, from: NodeId, call: u64, request: NodeRequest) {
        let deadline_ms = self.now_ms + self.config.timing.ready_wait_ms;
        self.owner.parked.push(Parked {
            from,
            call,
            request,
            keys: Vec::new(),
            until: Until::Ready,
            deadline_ms,
        });
    }

    /// Whether a request waits while this node rejoins: reads, commits and their parts,
    /// pins and reads at a version, as the daemon's do. The others are refused at once (a
    /// registration: its sender may be a resolver this node's own commits wait for).
    pub(super) fn waits_until_ready(&self, request: &NodeRequest) -> bool {
        !self.is_ready()
            && matches!(
                request,
                NodeRequest::Fetch { .. }
                    | NodeRequest::Locate { .. }
                    | NodeRequest::Commit { .. }
                    | NodeRequest::CommitRuns { .. }
                    | NodeRequest::OwnerPrepare { .. }
                    | NodeRequest::Lock { .. }
                    | NodeRequest::Pin { .. }
                    | NodeRequest::ReadAt { .. }
            )
    }

    /// Requests parked on locks that cleared, or on a rejoin that is over, run again, in
    /// arrival order (the others keep their place and their deadline).
    pub(super) fn unpark(&mut self) {
        let parked = std::mem::take(&mut self.owner.parked);
        let owner = &self.owner;
        let serving = self.is_ready();
        let (ready, waiting): (Vec<Parked>, Vec<Parked>) =
            parked.into_iter().partition(|parked| match parked.until {
                Until::Unlocked => !owner.locks.holds_any(&parked.keys),
                Until::Applied => owner.locks.unsettled(&parked.keys).is_none(),
                Until::Ready => serving,
            });
        self.owner.parked = waiting;
        for parked in ready {
            self.on_request(parked.from, parked.call, parked.request);
        }
    }

    pub(super) fn expire_parked(&mut self) {
        let now = self.now_ms;
        let (expired, waiting): (Vec<Parked>, Vec<Parked>) = std::mem::take(&mut self.owner.parked)
            .into_iter()
            .partition(|parked| parked.deadline_ms <= now);
        self.owner.parked = waiting;
        for parked in expired {
            let why = match parked.until {
                Until::Ready => format!("node {} is still rejoining the cluster", self.config.id),
                _ => format!(
                    "pages stayed locked for {} ms",
                    self.config.timing.lock_wait_ms
                ),
            };
            let reply = NodeReply::Failed(FsError::Io(why));
            match parked.request {
                NodeRequest::Commit { tx, .. } => {
                    self.refuse_commit(tx, parked.from, parked.call, reply)
                }
                _ => self.reply(parked.from, parked.call, reply),
            }
        }
    }

    /// `Fetch` at the owner: waits while a commit it has not applied holds the page, then
    /// answers its copy (version 0, no bytes: never written) and records the reader.
    /// `Locate` likewise, answering where its persisted copy lies in its PM (none: never
    /// written) for the reader to read one-sided.
    pub(super) fn serve_fetch(&mut self, from: NodeId, call: u64, request: NodeRequest) {
        let (dataset, page, one_sided) = match request {
            NodeRequest::Fetch { dataset, page, .. } => (dataset, page, false),
            NodeRequest::Locate { dataset, page, .. } => (dataset, page, true),
            _ => unreachable!("only Fetch and Locate come here"),
        };
        if let Some(reply) = self.not_owner(dataset, &[page]) {
            return self.reply(from, call, reply);
        }
        let key = (dataset, page);
        self.mark_live(from);
        if self.owner.locks.unsettled(&[key]).is_some() {
            return self.park(from, call, request, vec![key]);
        }
        self.owner.copies.sending(key, from);
        // Not counted as a copy yet: the answer may be lost (it is, once the reader says so
        // at a Register or rejoin).
        let reply = if one_sided {
            NodeReply::Located(self.table.locate_persisted(key))
        } else {
            let (version, bytes) = self.table.read_persisted(key).unwrap_or((0, Vec::new()));
            NodeReply::Page(VersionedPage {
                page,
                version,
                bytes,
            })
        };
        self.reply(from, call, reply);
    }

    /// `Register` at the owner: `node` holds exactly `pages` of `dataset` (at those
    /// versions) among this owner's; the answer is every newer copy this owner has. With
    /// `tx`, the node settles its prepared copy `tx` by the answer.
    pub(super) fn serve_register(
        &mut self,
        from: NodeId,
        call: u64,
        dataset: DatasetId,
        node: NodeId,
        pages: Vec<(u64, u64)>,
        tx: Option<TxKey>,
    ) {
        let listed: Vec<u64> = pages.iter().map(|(page, _)| *page).collect();
        // Never waits for this node's rejoin (`waits_until_ready`): busy, as the daemon's.
        let rejoining = (!self.is_ready()).then(|| {
            let why = format!("node {} is rejoining", self.config.id);
            NodeReply::Failed(FsError::Busy(why))
        });
        if let Some(reply) = rejoining.or_else(|| self.not_owner(dataset, &listed)) {
            return self.reply(from, call, reply);
        }
        self.mark_live(node);
        let keys: Vec<PageKey> = if tx.is_none() {
            self.owner.locks.of_dataset(dataset)
        } else {
            pages.iter().map(|(page, _)| (dataset, *page)).collect()
        };
        let waits = if tx.is_none() {
            !keys.is_empty()
        } else {
            self.owner.locks.unsettled(&keys).is_some()
        };
        if waits {
            let request = NodeRequest::Register {
                dataset,
                from: node,
                pages,
                tx,
            };
            return self.park(from, call, request, keys);
        }
        let newest = self
            .owner
            .newest_register
            .entry((from, dataset))
            .or_default();
        if call < *newest {
            let why = "a newer registration from this node was served".to_string();
            return self.reply(from, call, NodeReply::Failed(FsError::Busy(why)));
        }
        *newest = call;
        if tx.is_none() {
            // A rejoin: the node's list replaces what this owner counted as its current
            // copies (it may have lost some). It stays a holder of everything it held: the
            // list may be older than a commit that reached it since (a superset of holders
            // costs messages, a missing holder would keep a stale copy).
            self.owner.copies.rejoined(dataset, node);
        }
        let mut newer = Vec::new();
        for (page, version) in &pages {
            let key = (dataset, *page);
            match self.table.read_persisted(key) {
                Some((mine, bytes)) if mine > *version => {
                    // Sent in the answer, which may be lost: not counted yet.
                    self.owner.copies.sending(key, node);
                    newer.push(VersionedPage {
                        page: *page,
                        version: mine,
                        bytes,
                    });
                }
                Some((mine, _)) if mine == *version => self.owner.copies.has_current(key, node),
                _ => self.owner.copies.sending(key, node),
            }
        }
        self.reply(from, call, NodeReply::Pages(newer));
    }

    pub(super) fn unlock(&mut self, tx: TxKey, keys: &[PageKey]) {
        self.owner.locks.release(tx, keys);
        self.unpark();
    }

    /// An owner whose page has fewer known current copies than its dataset wants sends
    /// the copy to more nodes (after a node was lost with its PM, or a target missed a
    /// decision). Pages in a commit wait for the next round.
    pub(super) fn rereplicate(&mut self) {
        if !self.is_ready()
            || self.now_ms
                < self.owner.last_rereplicate_ms + self.config.timing.rereplicate_every_ms
        {
            return;
        }
        self.owner.last_rereplicate_ms = self.now_ms;
        let me = self.config.id;
        let live = self.live();
        for dataset in self.datasets() {
            let copied = self.table.copied_pages(dataset.id);
            for page in self.pages_of(&dataset, copied, me) {
                let key = (dataset.id, page);
                if self.owner.locks.holds_any(&[key]) {
                    continue;
                }
                let Some((version, bytes)) = self.table.read_persisted(key) else {
                    continue;
                };
                let current = self.owner.copies.current_of(key);
                let replicas = dataset.params.replicas;
                let mut to: BTreeSet<NodeId> =
                    replication::more_copies(me, replicas, &live, &current)
                        .into_iter()
                        .collect();
                to.extend(self.owner.copies.behind_of(key, &live));
                for node in to {
                    // A holder before it has the bytes: every later commit reaches it.
                    self.owner.copies.sending(key, node);
                    let copy = VersionedPage {
                        page,
                        version,
                        bytes: bytes.clone(),
                    };
                    let request = NodeRequest::Install {
                        dataset: dataset.id,
                        pages: vec![copy],
                    };
                    self.send(node, request, Purpose::Install { key, version });
                }
            }
        }
    }

    /// Whether every written page this node owns has the copies its dataset wants, and no
    /// live holder is behind.
    pub fn fully_replicated(&self) -> bool {
        let me = self.config.id;
        let live = self.live();
        self.datasets().iter().all(|dataset| {
            let want = replication::wanted(dataset.params.replicas, &live);
            let copied = self.table.copied_pages(dataset.id);
            self.pages_of(dataset, copied, me).into_iter().all(|page| {
                let key = (dataset.id, page);
                1 + self
                    .owner
                    .copies
                    .current_of(key)
                    .iter()
                    .filter(|node| **node != me)
                    .count()
                    >= want
                    && self.owner.copies.behind_of(key, &live).is_empty()
            })
        })
    }

    pub(super) fn install_answered(
        &mut self,
        key: PageKey,
        version: u64,
        from: NodeId,
        reply: Option<NodeReply>,
    ) {
        if matches!(reply, Some(NodeReply::Done)) && self.table.version_of(key) == version {
            self.owner.copies.has_current(key, from);
        }
    }
}
