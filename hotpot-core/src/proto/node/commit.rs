//! A commit at one of its owners (steps 1–6 of docs/design.md, "Cluster protocol"): locks,
//! targets, Prepare, the apply that decides (a leader's keeps the outcome; a follower's pages
//! wait prepared for it, multi.rs), Decide, the answer. Must survive: a target that never
//! answers (Abort, nothing applied), a duplicate request (one commit per tx, one answer).

use std::collections::BTreeSet;

use super::{Machine, PageRuns, Purpose};
use crate::page::{apply_runs, OwnedPage, TxKey};
use crate::pm::{PageKey, TxRole, TxTag, PAGE_BYTES};
use crate::proto::copies::Reached;
use crate::proto::messages::{NodeReply, NodeRequest, OwnerPages, PageWrite, VersionedPage};
use crate::proto::replication::{self, short_of_copies, Targets};
use crate::proto::types::{Dataset, DatasetId, FsError, NodeId};

/// What a commit asks of its owner.
#[derive(Clone, Debug)]
pub(super) enum Work {
    /// MRSW: whole pages written against `base_version`, and the dataset version the writer
    /// gave the commit (`None` at a follower, and from a committer that sent none).
    Writes(Vec<PageWrite>, Option<u64>),
    /// MRMW: byte runs merged onto the owner's current copies.
    Runs(Vec<PageRuns>),
}

/// This owner's part in a commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    /// The commit's only owner.
    Single,
    /// The lowest-id owner of a commit across owners: its apply decides the whole commit
    /// and keeps the outcome (`participants`: bitmap of the owners).
    Leader { participants: u64 },
    /// Another owner of such a commit: its pages wait, prepared, for the leader's outcome.
    Follower { leader: NodeId },
}

#[derive(Clone, Debug)]
pub(super) enum Step {
    /// Prepare sent; waiting for these targets.
    Preparing,
    /// A follower's pages are prepared here and at its targets: waiting for the outcome.
    Prepared,
    /// MRMW, every target prepared: waiting for the dataset version from the home
    /// (versions.rs).
    Versioning,
    /// Applied here (or, with the planted bug, answered); Decide sent, waiting for these.
    Deciding,
}

#[derive(Clone, Debug)]
pub(super) struct OwnerCommit {
    pub(super) role: Role,
    pub(super) committer: NodeId,
    /// Who waits for this owner's answer (a follower's decision may come from resolution).
    pub(super) reply_to: Option<(NodeId, u64)>,
    pub(super) dataset: DatasetId,
    pub(super) writes: Vec<PageWrite>,
    /// Nodes that got Prepare (and get Decide or Abort), under `target_tx`.
    pub(super) asked: Vec<NodeId>,
    /// Nodes that hold the new version once decided.
    pub(super) counted: Vec<NodeId>,
    /// Holders left out because they are not live: behind once this commit is applied.
    pub(super) skipped: BTreeSet<NodeId>,
    pub(super) target_tx: TxKey,
    pub(super) awaiting: BTreeSet<NodeId>,
    /// Targets that acked the decision.
    pub(super) confirmed: BTreeSet<NodeId>,
    /// The committer decides its own prepared copy when it gets the answer.
    pub(super) committer_prepared: bool,
    /// Copies that must be decided before the commit is acknowledged.
    pub(super) copies_wanted: usize,
    pub(super) step: Step,
    /// Set once this owner's apply is persisted.
    pub(super) versions: Option<Vec<u64>>,
    /// The commit's dataset version: the home's (MRMW, once prepared) or the writer's (MRSW,
    /// in the request); 0 at a follower.
    pub(super) dataset_version: u64,
}

impl Machine {
    /// Every answer to a commit is remembered: a duplicate of the request arriving later
    /// (when the refusal's reason is gone) gets the same answer, never a second chance.
    pub(super) fn refuse_commit(&mut self, tx: TxKey, from: NodeId, call: u64, reply: NodeReply) {
        self.owner.remember_answer(tx, reply.clone());
        self.reply(from, call, reply);
    }

    /// The nodes that must hold a commit's new bytes (proto/replication.rs).
    pub(super) fn targets(
        &self,
        dataset: &Dataset,
        keys: &[PageKey],
        committer: (NodeId, bool),
    ) -> Targets {
        let holders: BTreeSet<NodeId> = if self.config.bugs.skip_holder_invalidation {
            BTreeSet::new()
        } else {
            self.owner.copies.holders_of(keys)
        };
        replication::targets(
            self.config.id,
            dataset.params.replicas,
            &self.live(),
            &holders,
            committer,
        )
    }

    /// `Commit` / `CommitRuns` at the owner (one owner, no followers).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn serve_commit(
        &mut self,
        from: NodeId,
        call: u64,
        tx: TxKey,
        dataset: Dataset,
        committer: NodeId,
        committer_prepared: bool,
        work: Work,
        role: Role,
    ) {
        if let Some(reply) = self.owner.answered.get(&tx).cloned() {
            return self.reply(from, call, reply);
        }
        let parked = self.owner.parked.iter().any(|parked| {
            matches!(&parked.request, NodeRequest::Commit { tx: other, .. }
                | NodeRequest::OwnerPrepare { tx: other, .. } if *other == tx)
        });
        if let Some(commit) = self.owner.commits.get(&tx) {
            // A duplicate: a follower already prepared answers again; otherwise the first
            // call gets the answer.
            if matches!(commit.step, Step::Prepared) {
                self.reply(from, call, NodeReply::Done);
            }
            return;
        }
        if parked {
            return;
        }
        // Refusals that leave a leader's phase-1 locks to the committer's Unlock (or their
        // expiry) come before `may_commit` takes them over: a refusal after it must unlock
        // (a leader taking over a lost node's chunks once refused as rejoining after it, and
        // the Unlock was lost: its locks stayed for good, found by hotpot-sim, seed 3086714;
        // a commit now waits for the rejoin before it gets here, `waits_until_ready`).
        let pages: Vec<u64> = match &work {
            Work::Writes(writes, _) => writes.iter().map(|write| write.page).collect(),
            Work::Runs(runs) => runs.iter().map(|(page, _)| *page).collect(),
        };
        let keys: Vec<PageKey> = pages.iter().map(|page| (dataset.id, *page)).collect();
        if let Some(page) = pages
            .iter()
            .find(|page| self.owner_of(&dataset, **page) != self.config.id)
        {
            let why = format!("page {page} of dataset {} has another owner", dataset.id);
            return self.refuse_commit(tx, from, call, NodeReply::Failed(FsError::Invalid(why)));
        }
        if let Err(error) = self.may_commit(tx, role, matches!(work, Work::Runs(_))) {
            return self.refuse_commit(tx, from, call, NodeReply::Failed(error));
        }
        if !self.config.bugs.skip_commit_lock {
            if let Some((key, holder)) = self.owner.locks.held_by_other(tx, &keys) {
                if matches!(work, Work::Runs(_)) {
                    let why = format!(
                        "page {} of dataset {} is in commit {holder:?}",
                        key.1, key.0
                    );
                    return self.refuse_commit(
                        tx,
                        from,
                        call,
                        NodeReply::Failed(FsError::Busy(why)),
                    );
                }
                // MRSW: wait for the lock, asked again as it came.
                let Work::Writes(pages, version) = work else {
                    unreachable!("refused above")
                };
                let request = match role {
                    Role::Follower { leader } => NodeRequest::OwnerPrepare {
                        tx,
                        dataset,
                        ino: 0,
                        committer,
                        committer_prepared,
                        leader,
                        pages: OwnerPages::Writes(pages),
                    },
                    Role::Single | Role::Leader { .. } => {
                        let me = self.config.id;
                        let followers = match role {
                            Role::Leader { participants } => TxTag::ids(participants)
                                .into_iter()
                                .filter(|node| *node != me)
                                .collect(),
                            _ => Vec::new(),
                        };
                        NodeRequest::Commit {
                            tx,
                            followers,
                            dataset,
                            ino: 0,
                            committer,
                            committer_prepared,
                            pages,
                            version,
                        }
                    }
                };
                return self.park(from, call, request, keys);
            }
            self.owner.locks.take(tx, &keys);
        }
        let dataset_version = match &work {
            Work::Writes(_, version) => version.unwrap_or(0),
            Work::Runs(_) => 0,
        };
        let writes = match self.build_writes(&dataset, work) {
            Ok(writes) => writes,
            Err(error) => return self.finish_commit_early(tx, &keys, Some((from, call)), error),
        };
        let targets = self.targets(&dataset, &keys, (committer, committer_prepared));
        let asked = targets.asked;
        let target_tx = self.new_tx();
        let commit = OwnerCommit {
            role,
            committer,
            reply_to: Some((from, call)),
            dataset: dataset.id,
            writes,
            asked: asked.clone(),
            counted: targets.nodes,
            skipped: targets.skipped,
            target_tx,
            awaiting: asked.iter().copied().collect(),
            confirmed: BTreeSet::new(),
            committer_prepared,
            copies_wanted: targets.wanted,
            step: Step::Preparing,
            versions: None,
            dataset_version,
        };
        let copies: Vec<VersionedPage> = commit.writes.iter().map(PageWrite::next_copy).collect();
        self.owner.commits.insert(tx, commit);
        for node in asked.iter().copied() {
            let request = NodeRequest::Prepare {
                tx: target_tx,
                owner: self.config.id,
                commit: match role {
                    Role::Single => None,
                    Role::Leader { .. } => Some((tx, self.config.id)),
                    Role::Follower { leader } => Some((tx, leader)),
                },
                dataset: dataset.id,
                committer: node == committer,
                pages: copies.clone(),
            };
            self.send(node, request, Purpose::Target { tx });
        }
        if asked.is_empty() {
            self.all_prepared(tx);
        }
    }

    /// MRSW: the pages as written, each checked against this owner's version. MRMW: the
    /// runs merged onto this owner's current copies.
    pub(super) fn build_writes(
        &self,
        dataset: &Dataset,
        work: Work,
    ) -> Result<Vec<PageWrite>, FsError> {
        match work {
            Work::Writes(writes, _) => {
                for write in &writes {
                    let current = self.table.version_of((dataset.id, write.page));
                    if write.base_version != current {
                        return Err(FsError::Io(format!(
                            "page {} of dataset {} was written against version {} but is at {current}",
                            write.page, dataset.id, write.base_version
                        )));
                    }
                }
                Ok(writes)
            }
            Work::Runs(pages) => pages
                .into_iter()
                .map(|(page, runs)| {
                    let (version, mut bytes) = self
                        .table
                        .read_persisted((dataset.id, page))
                        .unwrap_or((0, vec![0u8; PAGE_BYTES]));
                    apply_runs(&mut bytes, &runs)
                        .map_err(|reason| FsError::Invalid(format!("page {page}: {reason}")))?;
                    Ok(PageWrite {
                        page,
                        base_version: version,
                        bytes,
                    })
                })
                .collect(),
        }
    }

    pub(super) fn finish_commit_early(
        &mut self,
        tx: TxKey,
        keys: &[PageKey],
        reply_to: Option<(NodeId, u64)>,
        error: FsError,
    ) {
        self.unlock(tx, keys);
        let reply = NodeReply::Failed(error);
        self.owner.remember_answer(tx, reply.clone());
        if let Some((to, call)) = reply_to {
            self.reply(to, call, reply);
        }
    }

    /// A target answered Prepare or Decide (`None`: it did not answer in time).
    pub(super) fn target_answered(&mut self, tx: TxKey, from: NodeId, reply: Option<NodeReply>) {
        let Some(commit) = self.owner.commits.get_mut(&tx) else {
            return;
        };
        let ok = matches!(reply, Some(NodeReply::Done));
        match commit.step {
            Step::Preparing if !ok => {
                let why = match reply {
                    Some(NodeReply::Failed(error)) => format!("node {from}: {error}"),
                    Some(other) => format!("node {from}: unexpected {other:?}"),
                    None => format!("node {from} did not answer"),
                };
                self.abort_commit(tx, why);
            }
            Step::Preparing => {
                commit.awaiting.remove(&from);
                if commit.awaiting.is_empty() {
                    self.all_prepared(tx);
                }
            }
            // A duplicate answer to a Prepare: the follower waits for the outcome, the
            // owner for its version.
            Step::Prepared | Step::Versioning => {}
            // A target that missed the decision settles its copy with this owner later.
            Step::Deciding => {
                commit.awaiting.remove(&from);
                if ok {
                    commit.confirmed.insert(from);
                }
                if commit.awaiting.is_empty() {
                    self.all_decided(tx);
                }
            }
        }
    }

    pub(super) fn abort_commit(&mut self, tx: TxKey, why: String) {
        let Some(commit) = self.owner.commits.remove(&tx) else {
            return;
        };
        for node in &commit.asked {
            let abort = NodeRequest::Abort {
                tx: commit.target_tx,
            };
            self.send(*node, abort, Purpose::Notice);
        }
        let keys: Vec<PageKey> = commit
            .writes
            .iter()
            .map(|write| (commit.dataset, write.page))
            .collect();
        if matches!(commit.role, Role::Follower { .. }) {
            self.table.abort_copies(tx);
        }
        let error = FsError::Io(format!("commit not replicated, nothing applied: {why}"));
        self.finish_commit_early(tx, &keys, commit.reply_to, error);
    }

    /// Every target prepared: a follower waits for the outcome; a single owner or leader
    /// takes the dataset version (versions.rs), then applies.
    pub(super) fn all_prepared(&mut self, tx: TxKey) {
        if let Some(Role::Follower { leader }) = self.owner.commits.get(&tx).map(|c| c.role) {
            return self.follower_prepared(tx, leader);
        }
        self.ask_version(tx);
    }

    /// The commit point, with the dataset version given: this owner's apply, then Decide.
    pub(super) fn apply_and_decide(&mut self, tx: TxKey) {
        if self.config.bugs.ack_before_persist {
            // Planted bug: decide and answer now, apply when the targets have acked.
            return self.send_decisions(tx, None);
        }
        match self.apply(tx) {
            Ok(versions) => self.send_decisions(tx, Some(versions)),
            Err(error) => self.abort_commit(tx, error.to_string()),
        }
    }

    pub(super) fn apply(&mut self, tx: TxKey) -> Result<Vec<u64>, FsError> {
        let commit = self.owner.commits.get(&tx).expect("commit in flight");
        let tag = match commit.role {
            Role::Leader { participants } => TxTag {
                role: TxRole::Leader,
                tx,
                leader: self.config.id,
                participants,
            },
            _ => TxTag::default(),
        };
        let owned: Vec<OwnedPage<'_>> = commit
            .writes
            .iter()
            .map(|write| OwnedPage {
                page: write.page,
                base_version: write.base_version,
                bytes: &write.bytes,
            })
            .collect();
        // Old frames a view pins are kept before the apply replaces them (the daemon's
        // `owner_commit` does the same), and the pages are at the commit's dataset version.
        let pages: Vec<u64> = owned.iter().map(|page| page.page).collect();
        let kept = self
            .table
            .keep_for_views(commit.dataset, &pages, commit.dataset_version);
        let applied = self.table.apply_owned(commit.dataset, &owned, tag);
        self.table.settle_for_views(kept, applied.is_ok());
        let versions =
            applied.map_err(|error| FsError::Io(format!("apply at the owner: {error}")))?;
        if commit.committer != self.config.id {
            let (dataset, pages) = (commit.dataset, owned.iter().map(|p| p.page).collect());
            self.kernel_stale(dataset, pages);
        }
        Ok(versions)
    }

    pub(super) fn send_decisions(&mut self, tx: TxKey, versions: Option<Vec<u64>>) {
        let commit = self.owner.commits.get_mut(&tx).expect("commit in flight");
        commit.step = Step::Deciding;
        commit.awaiting = commit.asked.iter().copied().collect();
        let applied = versions.is_some();
        commit.versions = versions;
        let keys: Vec<PageKey> = commit
            .writes
            .iter()
            .map(|write| (commit.dataset, write.page))
            .collect();
        let asked = commit.asked.clone();
        let target_tx = commit.target_tx;
        if applied {
            self.owner.locks.applied(&keys);
            self.unpark();
        } else {
            self.answer_committer(tx);
        }
        for node in asked {
            self.send(
                node,
                NodeRequest::Decide {
                    tx: target_tx,
                    ino: None,
                },
                Purpose::Target { tx },
            );
        }
        let done = self
            .owner
            .commits
            .get(&tx)
            .is_some_and(|commit| commit.awaiting.is_empty());
        if done {
            self.all_decided(tx);
        }
    }

    /// Step 6: holders recorded, pages unlocked, the committer answered.
    pub(super) fn all_decided(&mut self, tx: TxKey) {
        let Some(commit) = self.owner.commits.remove(&tx) else {
            return;
        };
        let keys: Vec<PageKey> = commit
            .writes
            .iter()
            .map(|write| (commit.dataset, write.page))
            .collect();
        let versions = match commit.versions.clone() {
            Some(versions) => Some(versions),
            // The planted bug's late apply.
            None => {
                self.owner.commits.insert(tx, commit.clone());
                let applied = self.apply(tx).ok();
                self.owner.commits.remove(&tx);
                applied
            }
        };
        let mut decided = commit.confirmed.clone();
        if commit.committer_prepared {
            decided.insert(commit.committer);
        }
        self.owner.copies.committed(
            &keys,
            Reached {
                counted: &commit.counted,
                skipped: &commit.skipped,
                decided: &decided,
            },
        );
        // Acknowledged only once enough nodes hold the decided bytes (proto/replication.rs).
        let short = short_of_copies(1 + decided.len(), commit.copies_wanted);
        let reply = match (versions, short) {
            (Some(_), None) if matches!(commit.role, Role::Follower { .. }) => NodeReply::Done,
            (Some(versions), None) => NodeReply::Committed {
                versions,
                dataset_version: commit.dataset_version,
            },
            (Some(_), Some(why)) => NodeReply::InDoubt {
                why,
                dataset_version: commit.dataset_version,
            },
            (None, _) => NodeReply::Failed(FsError::Io("apply at the owner failed".into())),
        };
        let all_targets = commit.confirmed.len() == commit.asked.len();
        match commit.role {
            // The leader's own part is settled once its targets have the decision.
            Role::Leader { .. } if all_targets => self.table.confirm_outcome(tx, self.config.id),
            // The leader may forget the outcome once this follower and its targets decided.
            Role::Follower { leader } if all_targets => {
                let confirm = NodeRequest::Confirm {
                    txs: vec![tx],
                    node: self.config.id,
                };
                self.send(leader, confirm, Purpose::Notice);
            }
            _ => {}
        }
        if !self.config.bugs.ack_before_persist {
            if !matches!(commit.role, Role::Follower { .. }) {
                self.owner.remember_answer(tx, reply.clone());
            }
            if let Some((to, call)) = commit.reply_to {
                self.reply(to, call, reply);
            }
        }
        self.unlock(tx, &keys);
    }

    pub(super) fn answer_committer(&mut self, tx: TxKey) {
        let commit = self.owner.commits.get(&tx).expect("commit in flight");
        let versions = commit
            .writes
            .iter()
            .map(|write| write.base_version + 1)
            .collect();
        let reply = NodeReply::Committed {
            versions,
            dataset_version: commit.dataset_version,
        };
        let reply_to = commit.reply_to;
        self.owner.remember_answer(tx, reply.clone());
        if let Some((to, call)) = reply_to {
            self.reply(to, call, reply);
        }
    }
}
