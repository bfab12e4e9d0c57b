//! The owner's side: page locks, holders, one-owner commits (steps 1–6 of docs/design.md,
//! "Cluster protocol"), fetches and registrations that wait for a lock, re-replication.
//! Must survive: a target that never answers (Abort, nothing applied), a duplicate request
//! (one commit per tx), a lock that would be held forever (bounded waits).

use std::collections::{BTreeMap, BTreeSet};

use super::{Machine, PageRuns, Purpose};
use crate::page::{apply_runs, OwnedPage, TxKey};
use crate::pm::{PageKey, TxRole, TxTag, PAGE_BYTES};
use crate::proto::messages::{NodeReply, NodeRequest, PageWrite, VersionedPage};
use crate::proto::types::{Dataset, DatasetId, FsError, NodeId};

/// What a commit asks of its owner.
#[derive(Clone, Debug)]
pub(super) enum Work {
    /// MRSW: whole pages written against `base_version`.
    Writes(Vec<PageWrite>),
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
    /// Applied here (or, with the planted bug, answered); Decide sent, waiting for these.
    Deciding,
}

#[derive(Clone, Debug)]
pub(super) struct OwnerCommit {
    pub(super) role: Role,
    committer: NodeId,
    /// Who waits for this owner's answer (a follower's decision may come from resolution).
    pub(super) reply_to: Option<(NodeId, u64)>,
    pub(super) dataset: DatasetId,
    pub(super) writes: Vec<PageWrite>,
    /// Nodes that got Prepare (and get Decide or Abort), under `target_tx`.
    asked: Vec<NodeId>,
    /// Nodes that hold the new version once decided.
    counted: Vec<NodeId>,
    target_tx: TxKey,
    awaiting: BTreeSet<NodeId>,
    /// Targets that acked the decision.
    confirmed: BTreeSet<NodeId>,
    /// The committer decides its own prepared copy when it gets the answer.
    committer_prepared: bool,
    /// Copies that must be decided before the commit is acknowledged.
    copies_wanted: usize,
    pub(super) step: Step,
    /// Set once this owner's apply is persisted.
    versions: Option<Vec<u64>>,
}

/// A request waiting for page locks to clear.
#[derive(Clone, Debug)]
struct Parked {
    from: NodeId,
    call: u64,
    request: NodeRequest,
    keys: Vec<PageKey>,
    /// A commit waits for the keys to be unlocked; a read only for their commit's apply.
    until_unlocked: bool,
    deadline_ms: u64,
}

#[derive(Default)]
pub(super) struct OwnerState {
    pub(super) locked: BTreeMap<PageKey, TxKey>,
    /// Locked pages whose commit is applied here: fetches read the new version.
    applied: BTreeSet<PageKey>,
    /// Nodes that may hold a copy of each page (a superset: every commit reaches them).
    holders: BTreeMap<PageKey, BTreeSet<NodeId>>,
    /// Nodes known to hold the current version of each page (re-replication counts these).
    current: BTreeMap<PageKey, BTreeSet<NodeId>>,
    pub(super) commits: BTreeMap<TxKey, OwnerCommit>,
    /// Commit requests answered, by tx: a duplicate gets the same answer.
    answered: BTreeMap<TxKey, NodeReply>,
    parked: Vec<Parked>,
    last_rereplicate_ms: u64,
}

/// How many answered commits an owner remembers for duplicates.
const ANSWERED_KEPT: usize = 4_096;

impl OwnerState {
    pub(super) fn locked_pages(&self) -> usize {
        self.locked.len()
    }

    pub(super) fn holders_of(&self, key: PageKey) -> BTreeSet<NodeId> {
        self.holders.get(&key).cloned().unwrap_or_default()
    }

    pub(super) fn current_of(&self, key: PageKey) -> BTreeSet<NodeId> {
        self.current.get(&key).cloned().unwrap_or_default()
    }

    /// Whether a commit this owner has not applied holds any of `keys`.
    fn unsettled(&self, keys: &[PageKey]) -> bool {
        keys.iter()
            .any(|key| self.locked.contains_key(key) && !self.applied.contains(key))
    }

    pub(super) fn held_by_other(&self, tx: TxKey, keys: &[PageKey]) -> Option<(PageKey, TxKey)> {
        keys.iter().find_map(|key| {
            self.locked
                .get(key)
                .filter(|holder| **holder != tx)
                .map(|holder| (*key, *holder))
        })
    }

    fn remember_answer(&mut self, tx: TxKey, reply: NodeReply) {
        if self.answered.len() >= ANSWERED_KEPT {
            if let Some(oldest) = self.answered.keys().next().copied() {
                self.answered.remove(&oldest);
            }
        }
        self.answered.insert(tx, reply);
    }
}

impl Machine {
    pub(super) fn owner_of(&self, dataset: &Dataset, page: u64) -> NodeId {
        dataset.owner_of_page(page)
    }

    fn not_ready(&self) -> Option<NodeReply> {
        (!self.is_ready()).then(|| {
            NodeReply::Failed(FsError::Io(format!(
                "node {} is rejoining after a restart",
                self.config.id
            )))
        })
    }

    fn park(&mut self, from: NodeId, call: u64, request: NodeRequest, keys: Vec<PageKey>) {
        let deadline_ms = self.now_ms + self.config.timing.lock_wait_ms;
        // A commit, and a rejoin (which replaces what the commits in flight would record
        // about its node), wait for the unlock; a read only for the apply.
        let until_unlocked = matches!(
            request,
            NodeRequest::Commit { .. } | NodeRequest::Register { tx: None, .. }
        );
        self.owner.parked.push(Parked {
            from,
            call,
            request,
            keys,
            until_unlocked,
            deadline_ms,
        });
    }

    /// Requests parked on locks that cleared run again, in arrival order (the others keep
    /// their place and their deadline).
    fn unpark(&mut self) {
        let parked = std::mem::take(&mut self.owner.parked);
        let owner = &self.owner;
        let (ready, waiting): (Vec<Parked>, Vec<Parked>) = parked.into_iter().partition(|parked| {
            if parked.until_unlocked {
                !parked.keys.iter().any(|key| owner.locked.contains_key(key))
            } else {
                !owner.unsettled(&parked.keys)
            }
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
            let reply = NodeReply::Failed(FsError::Io(format!(
                "pages stayed locked for {} ms",
                self.config.timing.lock_wait_ms
            )));
            match parked.request {
                NodeRequest::Commit { tx, .. } => {
                    self.refuse_commit(tx, parked.from, parked.call, reply)
                }
                _ => self.reply(parked.from, parked.call, reply),
            }
        }
    }

    /// Every answer to a commit is remembered: a duplicate of the request arriving later
    /// (when the refusal's reason is gone) gets the same answer, never a second chance.
    fn refuse_commit(&mut self, tx: TxKey, from: NodeId, call: u64, reply: NodeReply) {
        self.owner.remember_answer(tx, reply.clone());
        self.reply(from, call, reply);
    }

    /// `Fetch` at the owner: waits while a commit it has not applied holds the page, then
    /// answers its copy (version 0, no bytes: never written) and records the reader.
    pub(super) fn serve_fetch(&mut self, from: NodeId, call: u64, dataset: DatasetId, page: u64) {
        if let Some(reply) = self.not_ready() {
            return self.reply(from, call, reply);
        }
        let key = (dataset, page);
        if self.owner.unsettled(&[key]) {
            let request = NodeRequest::Fetch {
                dataset,
                page,
                from,
            };
            return self.park(from, call, request, vec![key]);
        }
        self.owner.holders.entry(key).or_default().insert(from);
        let (version, bytes) = self.table.read_persisted(key).unwrap_or((0, Vec::new()));
        // Not counted as a copy yet: the answer may be lost (it is, once the reader says so
        // at a Register or rejoin).
        let reply = NodeReply::Page(VersionedPage {
            page,
            version,
            bytes,
        });
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
        if let Some(reply) = self.not_ready() {
            return self.reply(from, call, reply);
        }
        let keys: Vec<PageKey> = if tx.is_none() {
            self.owner
                .locked
                .keys()
                .filter(|key| key.0 == dataset)
                .copied()
                .collect()
        } else {
            pages.iter().map(|(page, _)| (dataset, *page)).collect()
        };
        let waits = if tx.is_none() {
            !keys.is_empty()
        } else {
            self.owner.unsettled(&keys)
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
        if tx.is_none() {
            // A rejoin: the node's list replaces what this owner counted as its current
            // copies (it may have lost some). It stays a holder of everything it held: the
            // list may be older than a commit that reached it since (a superset of holders
            // costs messages, a missing holder would keep a stale copy).
            for (key, current) in self.owner.current.iter_mut() {
                if key.0 == dataset {
                    current.remove(&node);
                }
            }
        }
        let mut newer = Vec::new();
        for (page, version) in &pages {
            let key = (dataset, *page);
            self.owner.holders.entry(key).or_default().insert(node);
            match self.table.read_persisted(key) {
                Some((mine, bytes)) if mine > *version => newer.push(VersionedPage {
                    page: *page,
                    version: mine,
                    bytes,
                }),
                Some((mine, _)) if mine == *version => {
                    self.owner.current.entry(key).or_default().insert(node);
                }
                _ => {}
            }
        }
        self.reply(from, call, NodeReply::Pages(newer));
    }

    /// The nodes that must hold a commit's new bytes: every holder, the committer, and
    /// more nodes (in id order after this one) until `min(replicas, nodes)` copies exist.
    fn targets(&self, dataset: &Dataset, keys: &[PageKey], committer: NodeId) -> Vec<NodeId> {
        let nodes = &self.config.nodes;
        let copies = usize::from(dataset.params.replicas.max(1)).min(nodes.len());
        let me = self.config.id;
        let holders: BTreeSet<NodeId> = if self.config.bugs.skip_holder_invalidation {
            BTreeSet::new()
        } else {
            keys.iter()
                .flat_map(|key| self.owner.holders_of(*key))
                .collect()
        };
        let mut targets: BTreeSet<NodeId> = holders
            .into_iter()
            .chain(std::iter::once(committer))
            .filter(|node| *node != me)
            .collect();
        let after = nodes.iter().filter(|node| **node > me);
        let before = nodes.iter().filter(|node| **node < me);
        for node in after.chain(before) {
            if targets.len() + 1 >= copies {
                break;
            }
            targets.insert(*node);
        }
        targets.into_iter().collect()
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
        let parked = self.owner.parked.iter().any(
            |parked| matches!(&parked.request, NodeRequest::Commit { tx: other, .. } if *other == tx),
        );
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
        if let Err(error) = self.may_commit(tx, role) {
            return self.refuse_commit(tx, from, call, NodeReply::Failed(error));
        }
        if let Some(reply) = self.not_ready() {
            return self.refuse_commit(tx, from, call, reply);
        }
        let pages: Vec<u64> = match &work {
            Work::Writes(writes) => writes.iter().map(|write| write.page).collect(),
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
        if !self.config.bugs.skip_commit_lock {
            if let Some((key, holder)) = self.owner.held_by_other(tx, &keys) {
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
                let request = match work {
                    Work::Writes(pages) => NodeRequest::Commit {
                        tx,
                        followers: Vec::new(),
                        dataset,
                        ino: 0,
                        committer,
                        committer_prepared,
                        pages,
                        version: None,
                    },
                    Work::Runs(_) => unreachable!("refused above"),
                };
                return self.park(from, call, request, keys);
            }
            for key in &keys {
                self.owner.locked.insert(*key, tx);
            }
        }
        let writes = match self.build_writes(&dataset, work) {
            Ok(writes) => writes,
            Err(error) => return self.finish_commit_early(tx, &keys, Some((from, call)), error),
        };
        let targets = self.targets(&dataset, &keys, committer);
        let asked: Vec<NodeId> = targets
            .iter()
            .copied()
            .filter(|node| !(committer_prepared && *node == committer))
            .collect();
        let target_tx = self.new_tx();
        let commit = OwnerCommit {
            role,
            committer,
            reply_to: Some((from, call)),
            dataset: dataset.id,
            writes,
            asked: asked.clone(),
            counted: targets,
            target_tx,
            awaiting: asked.iter().copied().collect(),
            confirmed: BTreeSet::new(),
            committer_prepared,
            copies_wanted: usize::from(dataset.params.replicas.max(1)).min(self.config.nodes.len()),
            step: Step::Preparing,
            versions: None,
        };
        let copies: Vec<VersionedPage> = commit
            .writes
            .iter()
            .map(|write| VersionedPage {
                page: write.page,
                version: write.base_version + 1,
                bytes: write.bytes.clone(),
            })
            .collect();
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
    fn build_writes(&self, dataset: &Dataset, work: Work) -> Result<Vec<PageWrite>, FsError> {
        match work {
            Work::Writes(writes) => {
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

    fn finish_commit_early(
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

    pub(super) fn unlock(&mut self, tx: TxKey, keys: &[PageKey]) {
        for key in keys {
            if self.owner.locked.get(key) == Some(&tx) {
                self.owner.locked.remove(key);
                self.owner.applied.remove(key);
            }
        }
        self.unpark();
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
            // A duplicate answer to a Prepare: the follower waits for the outcome.
            Step::Prepared => {}
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

    /// Step 4, the commit point: this owner's apply, persisted; then Decide to the targets.
    fn all_prepared(&mut self, tx: TxKey) {
        if let Some(Role::Follower { leader }) = self.owner.commits.get(&tx).map(|c| c.role) {
            return self.follower_prepared(tx, leader);
        }
        if self.config.bugs.ack_before_persist {
            // Planted bug: decide and answer now, apply when the targets have acked.
            return self.send_decisions(tx, None);
        }
        match self.apply(tx) {
            Ok(versions) => self.send_decisions(tx, Some(versions)),
            Err(error) => self.abort_commit(tx, error.to_string()),
        }
    }

    fn apply(&mut self, tx: TxKey) -> Result<Vec<u64>, FsError> {
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
        self.table
            .apply_owned(commit.dataset, &owned, tag)
            .map_err(|error| FsError::Io(format!("apply at the owner: {error}")))
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
            self.owner.applied.extend(keys);
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
    fn all_decided(&mut self, tx: TxKey) {
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
        for key in &keys {
            let holders = self.owner.holders.entry(*key).or_default();
            holders.extend(commit.counted.iter().copied());
            let current = self.owner.current.entry(*key).or_default();
            current.clear();
            current.extend(decided.iter().copied());
        }
        // Acknowledged only once enough nodes hold the decided bytes: a target that missed
        // the decision holds a prepared copy, which a rebuild after this owner's loss
        // cannot count.
        let enough = 1 + decided.len() >= commit.copies_wanted;
        let reply = match versions {
            Some(_) if enough && matches!(commit.role, Role::Follower { .. }) => NodeReply::Done,
            Some(versions) if enough => NodeReply::Committed {
                versions,
                dataset_version: 0,
            },
            Some(_) => NodeReply::InDoubt(format!(
                "applied, but only {} of {} copies confirmed the decision",
                1 + decided.len(),
                commit.copies_wanted
            )),
            None => NodeReply::Failed(FsError::Io("apply at the owner failed".into())),
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

    fn answer_committer(&mut self, tx: TxKey) {
        let commit = self.owner.commits.get(&tx).expect("commit in flight");
        let versions = commit
            .writes
            .iter()
            .map(|write| write.base_version + 1)
            .collect();
        let reply = NodeReply::Committed {
            versions,
            dataset_version: 0,
        };
        let reply_to = commit.reply_to;
        self.owner.remember_answer(tx, reply.clone());
        if let Some((to, call)) = reply_to {
            self.reply(to, call, reply);
        }
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
        let nodes = self.config.nodes.clone();
        let datasets = self.config.datasets.clone();
        for (dataset, pages) in &datasets {
            let want = usize::from(dataset.params.replicas.max(1)).min(nodes.len());
            for page in (0..*pages).filter(|page| dataset.owner_of_page(*page) == me) {
                let key = (dataset.id, page);
                if self.owner.locked.contains_key(&key) {
                    continue;
                }
                let Some((version, bytes)) = self.table.read_persisted(key) else {
                    continue;
                };
                let current = self.owner.current.get(&key).cloned().unwrap_or_default();
                let mut have = 1 + current.iter().filter(|node| **node != me).count();
                let after = nodes.iter().filter(|node| **node > me);
                let before = nodes.iter().filter(|node| **node < me);
                let extra: Vec<NodeId> = after.chain(before).copied().collect();
                for node in extra {
                    if have >= want {
                        break;
                    }
                    if current.contains(&node) {
                        continue;
                    }
                    have += 1;
                    // A holder before it has the bytes: every later commit reaches it.
                    self.owner.holders.entry(key).or_default().insert(node);
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

    /// Whether every written page this node owns has the copies its dataset wants.
    pub fn fully_replicated(&self) -> bool {
        let me = self.config.id;
        let nodes = self.config.nodes.len();
        self.config.datasets.iter().all(|(dataset, pages)| {
            let want = usize::from(dataset.params.replicas.max(1)).min(nodes);
            (0..*pages)
                .filter(|page| dataset.owner_of_page(*page) == me)
                .all(|page| {
                    let key = (dataset.id, page);
                    self.table.read_persisted(key).is_none()
                        || 1 + self.owner.current.get(&key).map_or(0, |current| {
                            current.iter().filter(|node| **node != me).count()
                        }) >= want
                })
        })
    }

    /// Rejoin: `node` holds a copy of `key` (`current`: at this owner's version).
    pub(super) fn owner_learns_holder(&mut self, key: PageKey, node: NodeId, current: bool) {
        self.owner.holders.entry(key).or_default().insert(node);
        if current {
            self.owner.current.entry(key).or_default().insert(node);
        }
    }

    pub(super) fn install_answered(
        &mut self,
        key: PageKey,
        version: u64,
        from: NodeId,
        reply: Option<NodeReply>,
    ) {
        if matches!(reply, Some(NodeReply::Done)) && self.table.version_of(key) == version {
            self.owner.current.entry(key).or_default().insert(from);
        }
    }
}
