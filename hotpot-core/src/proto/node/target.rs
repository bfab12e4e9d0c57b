//! The target's side (holders, replicas, the committer's own copy): prepared copies, their
//! decision or abort, installs; settling a copy nobody decided (`Register` with its owner);
//! rejoin after a start (learn who holds this owner's pages, rebuild them after a wipe, tell
//! every owner which copies this node has). Must survive: a decision that never comes, a
//! decision after the copy was settled, an owner that is itself restarting.

use std::collections::{BTreeMap, BTreeSet};

use super::{Machine, Purpose};
use crate::page::{Decided, TxKey};
use crate::pm::TxRole;
use crate::proto::deciders::{Decider, Deciders};
use crate::proto::messages::{NodeReply, NodeRequest, VersionedPage};
use crate::proto::rejoin::AskRule;
use crate::proto::types::{DatasetId, FsError, NodeId};
use crate::proto::unconfirmed::Unconfirmed;

#[derive(Default)]
pub(super) struct TargetState {
    /// Who decides each prepared copy (volatile: after a restart, the owner of its pages),
    /// and which commits across owners this node decided a copy of (`proto/deciders.rs`).
    pub(super) deciders: Deciders,
    /// When this machine first saw each prepared copy waiting.
    waiting_since: BTreeMap<TxKey, u64>,
    /// Prepared copies being settled with their owner now.
    resolving: BTreeSet<TxKey>,
    /// Rejoin: (peer, dataset) pairs whose copies of this owner's pages are not known yet.
    pub(super) rejoin: BTreeSet<(NodeId, DatasetId)>,
    /// Owners not yet told which copies this node has of their pages (`proto/unconfirmed.rs`,
    /// the daemon's book too): until they answer, those pages are read through them.
    pub(super) registering: Unconfirmed,
    /// Calls of the rejoin in flight, so a tick does not send them twice.
    asked: BTreeSet<(NodeId, DatasetId, bool)>,
}

impl Machine {
    pub(super) fn serve_prepare(
        &mut self,
        tx: TxKey,
        owner: NodeId,
        commit: Option<(TxKey, NodeId)>,
        dataset: DatasetId,
        committer: bool,
        pages: &[VersionedPage],
    ) -> NodeReply {
        let borrowed: Vec<(u64, u64, &[u8])> = pages
            .iter()
            .map(|copy| (copy.page, copy.version, copy.bytes.as_slice()))
            .collect();
        match self
            .table
            .prepare_copies(tx, dataset, &borrowed, committer, Default::default())
        {
            Ok(()) => {
                self.target.deciders.prepared(tx, Decider { owner, commit });
                // The kernel's copies go now, not at the Decide, which may be lost: read
                // again, a page with a prepared copy is read through its owner, whose answer
                // waits for the commit's apply.
                let pages = pages.iter().map(|copy| copy.page).collect();
                self.kernel_stale(dataset, pages);
                NodeReply::Done
            }
            Err(error) => NodeReply::Failed(FsError::Io(format!("prepare: {error}"))),
        }
    }

    /// The owner decided: the prepared copy becomes current. A copy one of whose pages is
    /// newer here already is dropped whole (never backwards); the owners of its pages then
    /// send what is current (through a registration).
    pub(super) fn serve_decide(&mut self, tx: TxKey) -> NodeReply {
        self.target.deciders.decided(tx);
        self.target.waiting_since.remove(&tx);
        match self.table.decide_copies(tx) {
            Decided::Current { dataset, pages } => self.kernel_stale(dataset, pages),
            Decided::Dropped { dataset, pages } => self.register_pages(dataset, &pages),
            Decided::Unknown => {}
        }
        NodeReply::Done
    }

    /// This node's copies of `pages` may not be what their owners count it as holding:
    /// it registers them with each owner (reads go to the owners until then).
    fn register_pages(&mut self, dataset: DatasetId, pages: &[u64]) {
        let Some(dataset) = self.dataset(dataset).cloned() else {
            return;
        };
        for page in pages {
            let owner = self.owner_of(&dataset, *page);
            if owner != self.config.id {
                self.target.registering.wait_for(owner, dataset.id);
            }
        }
    }

    pub(super) fn serve_abort(&mut self, tx: TxKey) -> NodeReply {
        self.target.deciders.settled(tx);
        self.target.waiting_since.remove(&tx);
        self.table.abort_copies(tx);
        NodeReply::Done
    }

    /// Done only when every copy is here at its version or newer (a page with a prepared
    /// copy waiting keeps its old one: the sender must not count it).
    pub(super) fn serve_install(
        &mut self,
        dataset: DatasetId,
        pages: &[VersionedPage],
    ) -> NodeReply {
        let copies: Vec<(u64, u64, &[u8])> = pages
            .iter()
            .map(|copy| (copy.page, copy.version, copy.bytes.as_slice()))
            .collect();
        match self.table.install_copies(dataset, &copies) {
            Ok(installed) => self.kernel_stale(dataset, installed),
            Err(error) => return NodeReply::Failed(FsError::Io(format!("install: {error}"))),
        }
        match pages
            .iter()
            .find(|copy| self.table.version_of((dataset, copy.page)) < copy.version)
        {
            None => NodeReply::Done,
            Some(copy) => NodeReply::Failed(FsError::Busy(format!(
                "page {} has a prepared copy waiting for its decision",
                copy.page
            ))),
        }
    }

    /// A committer's own copy whose commit got no answer: `owner` settles it.
    pub(super) fn note_decider(&mut self, tx: TxKey, owner: NodeId) {
        self.target.deciders.prepared(
            tx,
            Decider {
                owner,
                commit: None,
            },
        );
    }

    /// The committer's own copy `own` of commit `commit` across owners, whose leader did not
    /// answer: it settles with the leader's outcome.
    pub(super) fn note_decider_across(&mut self, own: TxKey, commit: TxKey, leader: NodeId) {
        self.target.deciders.prepared(
            own,
            Decider {
                owner: leader,
                commit: Some((commit, leader)),
            },
        );
    }

    /// Whether a copy prepared here for commit `tx` (across owners) waits for its outcome.
    pub(super) fn target_waits_for(&self, tx: TxKey) -> bool {
        self.target.deciders.waits_for_commit(tx)
    }

    pub(super) fn target_resolved(&mut self, waiting: TxKey) {
        self.target.resolving.remove(&waiting);
    }

    pub(super) fn retry_resolution(&mut self, waiting: TxKey) {
        self.target.waiting_since.insert(waiting, self.now_ms);
    }

    /// A copy decided by the leader's answer, late: its owner may not count this node as a
    /// holder any more (it restarted, or committed the pages again since), so the node
    /// registers, which makes it a holder and brings anything newer.
    pub(super) fn decide_target_copy(&mut self, copy: TxKey) {
        let record = self
            .table
            .pending()
            .into_iter()
            .find(|copies| copies.tx == copy);
        self.serve_decide(copy);
        if let Some(copies) = record {
            self.register_pages(copies.dataset, &copies.pages);
        }
    }

    /// This node's persisted copies of `pages` (`None`: of every page of the dataset it has
    /// something of; served while rejoining too). Refused while a copy of one of them
    /// prepared for a commit across owners waits for the leader: a rebuilding owner must not
    /// settle on an older copy than that commit may make current.
    pub(super) fn serve_fetch_copies(
        &mut self,
        dataset: DatasetId,
        pages: Option<Vec<u64>>,
    ) -> NodeReply {
        // `None` asks about every page, also one whose only copy here is a prepared one.
        let asked: Option<BTreeSet<u64>> = pages.map(|pages| pages.into_iter().collect());
        let waiting = self.table.pending().into_iter().find(|copies| {
            copies.dataset == dataset
                && copies
                    .pages
                    .iter()
                    .any(|page| asked.as_ref().is_none_or(|asked| asked.contains(page)))
                && self
                    .target
                    .deciders
                    .get(copies.tx)
                    .is_some_and(|decider| decider.commit.is_some())
        });
        if let Some(copies) = waiting {
            return NodeReply::Failed(FsError::Busy(format!(
                "a copy of pages {:?} waits for the outcome of its commit",
                copies.pages
            )));
        }
        let pages: Vec<u64> = match asked {
            Some(asked) => asked.into_iter().collect(),
            None => self.table.pages_here(dataset).into_iter().collect(),
        };
        // The owner restarted and forgot its holders. A page the kernel here was served
        // without a copy behind it (never written, when it was read) is on no list this node
        // registers: no commit would invalidate it. The kernel drops it now, before the
        // owner serves again.
        let unlisted = self.served_without_copy(dataset, &pages);
        self.kernel_stale(dataset, unlisted);
        let copies = pages
            .iter()
            .filter_map(|page| {
                self.table
                    .read_persisted((dataset, *page))
                    .map(|(version, bytes)| VersionedPage {
                        page: *page,
                        version,
                        bytes,
                    })
            })
            .collect();
        NodeReply::Pages(copies)
    }

    /// Prepared copies undecided for `resolve_after_ms` ask their owner what is current.
    pub(super) fn resolve_pending(&mut self) {
        let mut pending = self.table.pending();
        pending.sort_by_key(|copies| copies.tx);
        let now = self.now_ms;
        let live: BTreeSet<TxKey> = pending.iter().map(|copies| copies.tx).collect();
        self.target.waiting_since.retain(|tx, _| live.contains(tx));
        for copies in pending {
            let since = *self.target.waiting_since.entry(copies.tx).or_insert(now);
            if now < since + self.config.timing.resolve_after_ms
                || self.target.resolving.contains(&copies.tx)
            {
                continue;
            }
            let Some(dataset) = self.dataset(copies.dataset).cloned() else {
                // A dataset deleted before this start: nobody settles its copies, and a
                // follower record's pages are unlocked with it.
                self.follower_abort(copies.tx);
                self.table.abort_copies(copies.tx);
                continue;
            };
            let Some(first) = copies.pages.first().copied() else {
                self.table.abort_copies(copies.tx);
                continue;
            };
            // A follower record, or a copy of a commit across owners: the leader decides.
            let decider = self.target.deciders.get(copies.tx);
            let across = match (copies.tag.role, decider.and_then(|decider| decider.commit)) {
                (TxRole::Follower, _) => Some((copies.tx, copies.tag.leader, None)),
                (_, Some((commit, leader))) => Some((commit, leader, Some(copies.tx))),
                _ => None,
            };
            if let Some((commit, leader, target)) = across {
                self.target.resolving.insert(copies.tx);
                // A lost leader's commits are settled by the node promoted in its place.
                let request = NodeRequest::Outcome { tx: commit, leader };
                let to = self.acting(leader);
                self.send(to, request, Purpose::Outcome { tx: commit, target });
                continue;
            }
            if self.records.is_deleted(dataset.id) {
                // A one-owner copy of a deleted dataset: its owner may no longer know it.
                self.table.abort_copies(copies.tx);
                continue;
            }
            let owner = decider
                .map(|decider| self.acting(decider.owner))
                .unwrap_or_else(|| self.owner_of(&dataset, first));
            if owner == self.config.id {
                // An owner never prepares its own pages: nobody will decide this copy.
                self.table.abort_copies(copies.tx);
                continue;
            }
            let pages = copies
                .pages
                .iter()
                .map(|page| (*page, self.table.version_of((dataset.id, *page))))
                .collect();
            let request = NodeRequest::Register {
                dataset: dataset.id,
                from: self.config.id,
                pages,
                tx: Some(copies.tx),
            };
            self.target.resolving.insert(copies.tx);
            self.send(owner, request, Purpose::Resolve { tx: copies.tx });
        }
    }

    /// The owner's current copies settle prepared copy `tx`: whatever it decided is in them.
    pub(super) fn resolve_answered(&mut self, tx: TxKey, reply: Option<NodeReply>) {
        self.target.resolving.remove(&tx);
        let Some(NodeReply::Pages(current)) = reply else {
            // Ask again after another wait.
            self.target.waiting_since.insert(tx, self.now_ms);
            return;
        };
        let Some((dataset, _)) = self
            .table
            .pending()
            .into_iter()
            .find_map(|copies| (copies.tx == tx).then_some((copies.dataset, copies.pages)))
        else {
            return; // decided or aborted meanwhile
        };
        self.table.abort_copies(tx);
        self.target.deciders.settled(tx);
        if !self.install_all(dataset, &current) {
            // Another waiting copy of these pages kept them back: ask the owner again.
            if let Some(owner) = self.owner_of_copies(dataset, &current) {
                self.target.registering.wait_for(owner, dataset);
            }
        }
    }

    /// Store `copies` (each only if newer than this node's); whether every one is now here
    /// (a page with a prepared copy waiting keeps its old one).
    fn install_all(&mut self, dataset: DatasetId, copies: &[VersionedPage]) -> bool {
        self.serve_install(dataset, copies) == NodeReply::Done
    }

    fn owner_of_copies(&self, dataset: DatasetId, copies: &[VersionedPage]) -> Option<NodeId> {
        let record = self.dataset(dataset)?;
        copies.first().map(|copy| self.owner_of(record, copy.page))
    }

    /// After a start: every peer is asked for its copies of the pages this node owns, and
    /// every owner is told this node's copies of its pages (peers owning none of a
    /// dataset's pages are left out as the calls go).
    pub(super) fn start_rejoin(&mut self) {
        let peers = self.peers();
        for dataset in self.datasets() {
            for peer in &peers {
                self.target.rejoin.insert((*peer, dataset.id));
                // A first start has no copies to tell about.
                if self.config.incarnation > 1 {
                    self.target.registering.wait_for(*peer, dataset.id);
                }
            }
        }
        self.continue_rejoin();
    }

    /// Promoted in place of a lost node: this node owns its chunks now. A rejoin as an
    /// owner: it serves as no owner until every peer but the lost ones told its copies of
    /// every page this node owns, and it takes the newest of each. Its own prepared copies
    /// of those pages that the lost owner would have decided are dropped first (a decided
    /// copy of such a commit is on another node, or the commit was never acknowledged).
    pub(super) fn take_over(&mut self) {
        let me = self.config.id;
        for copies in self.table.pending() {
            let Some(dataset) = self.dataset(copies.dataset).cloned() else {
                continue;
            };
            let single_owner = match self.target.deciders.get(copies.tx) {
                Some(decider) => decider.commit.is_none(),
                None => copies.tag.role != TxRole::Follower,
            };
            let owned = copies
                .pages
                .iter()
                .any(|page| self.owner_of(&dataset, *page) == me);
            if single_owner && owned {
                self.target.deciders.settled(copies.tx);
                self.table.abort_copies(copies.tx);
            }
        }
        for dataset in self.datasets() {
            for peer in self.peers() {
                self.target.rejoin.insert((peer, dataset.id));
            }
        }
        self.continue_rejoin();
    }

    /// An owner that restarted since the last view (`Incarnations::restarted`) learns this
    /// node's copies of its pages again: its rejoin may not have heard from this node (cut
    /// off, or counted down, and not restarting, so not registering either: found by
    /// hotpot-sim with the rejoin rule below). Until it confirms them, they are read through
    /// it.
    pub(super) fn note_restarts(&mut self, incarnations: BTreeMap<NodeId, u64>) {
        let restarted = self.incarnations.restarted(self.config.id, incarnations);
        if restarted.is_empty() || self.config.bugs.ignore_owner_restarts {
            return;
        }
        for owner in restarted {
            for dataset in self.datasets() {
                let here = self.table.pages_here(dataset.id);
                let owned = self.pages_of(&dataset, here, owner);
                // A page the kernel was served without a copy behind it is on no
                // registration: it goes, as `serve_fetch_copies` drops it (found by
                // hotpot-sim, seed 23089597: a never-written page read before the owner's
                // restart stayed zeros in the kernel after a commit wrote it).
                let unlisted = self.served_without_copy(dataset.id, &owned);
                self.kernel_stale(dataset.id, unlisted);
                let held = owned
                    .iter()
                    .any(|page| self.table.has_copy((dataset.id, *page)));
                if held {
                    self.target.registering.wait_for(owner, dataset.id);
                }
            }
        }
        self.continue_rejoin();
    }

    /// Of `pages`, those the kernel here was served with no copy stored behind them (never
    /// written when read): on no list of copies this node tells an owner.
    fn served_without_copy(&self, dataset: DatasetId, pages: &[u64]) -> Vec<u64> {
        pages
            .iter()
            .copied()
            .filter(|page| {
                let key = (dataset, *page);
                self.table.is_served(key) && !self.table.has_copy(key)
            })
            .collect()
    }

    /// Copies waiting for a lost owner's confirmation wait for its successor's now
    /// (`Unconfirmed::follow_promotions`, item 31).
    pub(super) fn registrations_follow_promotions(&mut self) {
        let successors = &self.successors;
        self.target
            .registering
            .follow_promotions(self.config.id, |node| {
                successors.get(&node).copied().unwrap_or(node)
            });
    }

    /// `dataset` was deleted: no peer is asked about it, and no owner told, any more.
    pub(super) fn forget_background_work(&mut self, dataset: DatasetId) {
        self.target.rejoin.retain(|(_, of)| *of != dataset);
        for (owner, of) in self.target.registering.pairs() {
            if of == dataset {
                self.target.registering.confirmed(owner, of);
            }
        }
    }

    /// Send the rejoin calls not answered and not in flight.
    pub(super) fn continue_rejoin(&mut self) {
        let me = self.config.id;
        // Whom a starting owner asks, and until when (`proto/rejoin.rs`, the daemon's rule
        // too); a peer not asked registers when it sees this start (`note_restarts`).
        let rule = AskRule::new(
            self.config.rebuilding,
            self.successors.values().any(|by| *by == me),
        );
        let wanted: Vec<(NodeId, DatasetId, bool)> = self
            .target
            .rejoin
            .iter()
            .map(|(peer, dataset)| (*peer, *dataset, true))
            .chain(
                self.target
                    .registering
                    .pairs()
                    .into_iter()
                    .map(|(owner, dataset)| (owner, dataset, false)),
            )
            .filter(|call| !self.target.asked.contains(call))
            .collect();
        for (peer, dataset_id, learn) in wanted {
            let Some(dataset) = self.dataset(dataset_id).cloned() else {
                continue;
            };
            if self.records.is_deleted(dataset_id) {
                self.forget_background_work(dataset_id);
                continue;
            }
            let owner = if learn { me } else { peer };
            let asked = rule.asks(self.live.contains(&peer), self.is_lost(peer));
            if !self.owns_any(&dataset, owner) || (learn && !asked) {
                // Nothing to learn or tell.
                if learn {
                    self.target.rejoin.remove(&(peer, dataset_id));
                } else {
                    self.target.registering.confirmed(peer, dataset_id);
                }
                continue;
            }
            let request = if learn {
                // Every copy the peer has (this node knows no dataset's size): the ones of
                // pages it owns are kept (`rejoin_answered`).
                NodeRequest::FetchCopies {
                    dataset: dataset_id,
                    pages: None,
                }
            } else {
                // Its copies, and pages staged here without one (their next commits must
                // reach this node, or a read of the staged page misses them).
                let here = self.table.pages_here(dataset_id);
                let theirs = self
                    .pages_of(&dataset, here, peer)
                    .into_iter()
                    .filter(|page| {
                        let key = (dataset_id, *page);
                        self.table.has_copy(key) || self.table.is_staged(key)
                    })
                    .map(|page| (page, self.table.version_of((dataset_id, page))))
                    .collect();
                NodeRequest::Register {
                    dataset: dataset_id,
                    from: me,
                    pages: theirs,
                    tx: None,
                }
            };
            self.target.asked.insert((peer, dataset_id, learn));
            self.send(
                peer,
                request,
                Purpose::Rejoin {
                    dataset: dataset_id,
                    learn,
                },
            );
        }
    }

    pub(super) fn rejoin_answered(
        &mut self,
        from: NodeId,
        dataset: DatasetId,
        learn: bool,
        reply: Option<NodeReply>,
    ) {
        self.target.asked.remove(&(from, dataset, learn));
        let Some(NodeReply::Pages(mut copies)) = reply else {
            return; // asked again at the next input
        };
        if learn {
            let me = self.config.id;
            if let Some(record) = self.dataset(dataset).cloned() {
                copies.retain(|copy| self.owner_of(&record, copy.page) == me);
            }
            if self.learn_copies(from, dataset, &copies) {
                self.target.rejoin.remove(&(from, dataset));
            }
        } else if self.install_all(dataset, &copies) {
            self.target.registering.confirmed(from, dataset);
        }
    }

    /// Rejoin as an owner: `from` holds `copies` of this node's pages; any newer one is
    /// taken as this owner's own. Only a node rebuilding after a wipe or taking over a lost
    /// node's chunks finds newer ones — also at any start after it, as a crash in the
    /// middle leaves no mark of it (found by hotpot-sim: a successor that restarted during
    /// its take-over kept an older copy than an acknowledged commit's). Whether it is done
    /// with them (a newer copy not taken — a prepared copy of that page waits here — is
    /// asked for again).
    fn learn_copies(&mut self, from: NodeId, dataset: DatasetId, copies: &[VersionedPage]) -> bool {
        for copy in copies {
            let key = (dataset, copy.page);
            if copy.version > self.table.version_of(key) {
                // Nodes counted at the version this copy replaces are behind it now.
                self.owner.copies.outdated(key);
            }
        }
        if !self.install_all(dataset, copies) {
            return false;
        }
        for copy in copies {
            let key = (dataset, copy.page);
            let mine = self.table.version_of(key);
            self.owner.copies.learned(key, from, copy.version, mine);
        }
        true
    }
}
