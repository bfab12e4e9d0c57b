//! Commits across owners (docs/design.md, "Commits across owners"), the owners' side. The
//! leader: phase-1 locks (`Lock`/`Unlock`), the deciding apply with a kept outcome, answers
//! to `Outcome` (an undecided commit asked about is given up for good), and the sweep that
//! forgets an outcome nobody needs. A follower: pages prepared in its own PM (a follower
//! record) and at its targets, then decided or aborted by `OwnerDecide`/`OwnerAbort` or by
//! the leader's answer. Must survive: the committer dying between phases, any owner
//! restarting (a follower record waits, its pages locked, until the leader answers).

use std::collections::{BTreeMap, BTreeSet};

use super::commit::{Role, Step};
use super::{Machine, Purpose};
use crate::page::TxKey;
use crate::pm::{PageKey, TxRole, TxTag};
use crate::proto::messages::{NodeReply, NodeRequest};
use crate::proto::outcome::{to_ask, GivenUp, Query, Verdict};
use crate::proto::types::{DatasetId, FsError, NodeId};

#[derive(Default)]
pub(super) struct MultiState {
    /// As a leader: pages locked in phase 1, by commit, and since when.
    phase1: BTreeMap<TxKey, (Vec<PageKey>, u64)>,
    /// Commits given up here: a late phase 2 (leader) or prepare (follower) is refused.
    aborted: GivenUp,
    /// As a leader: when each kept outcome was first seen waiting for confirmations.
    outcome_seen: BTreeMap<TxKey, u64>,
    /// As a leader: outcomes whose nodes are being asked `Pending`, and who has not answered.
    sweeps: BTreeMap<TxKey, BTreeSet<NodeId>>,
    /// As a leader without the outcome: `Outcome` questions waiting for every node's
    /// `DecidedCommit` answer (who asked, who has not answered).
    queries: BTreeMap<TxKey, OutcomeQuery>,
}

struct OutcomeQuery {
    askers: Vec<(NodeId, u64)>,
    answers: Query,
}

impl Machine {
    /// Whether this owner may take part `role` in commit `tx` (`locked`: an MRMW commit,
    /// whose leader took its phase-1 locks; an MRSW one has none, its writer is alone).
    pub(super) fn may_commit(
        &mut self,
        tx: TxKey,
        role: Role,
        locked: bool,
    ) -> Result<(), FsError> {
        // Given up, or being asked about (the answer may be that it is given up).
        let settling = self.multi.aborted.contains(tx) || self.multi.queries.contains_key(&tx);
        if role != Role::Single && settling {
            return Err(FsError::Io(format!(
                "commit {tx:?} was given up here (it took too long)"
            )));
        }
        if let (Role::Leader { .. }, true) = (role, locked) {
            let held = self.multi.phase1.remove(&tx).is_some();
            if !held && !self.config.bugs.skip_commit_lock {
                return Err(FsError::Io(format!(
                    "commit {tx:?} holds no phase-1 locks here (this owner restarted or released them)"
                )));
            }
        }
        Ok(())
    }

    /// Phase 1 at the leader.
    pub(super) fn serve_lock(&mut self, tx: TxKey, dataset: DatasetId, pages: &[u64]) -> NodeReply {
        if let Some(reply) = self.not_owner(dataset, pages) {
            return reply;
        }
        if self.multi.aborted.contains(tx) {
            return NodeReply::Failed(FsError::Io(format!("commit {tx:?} was given up")));
        }
        let keys: Vec<PageKey> = pages.iter().map(|page| (dataset, *page)).collect();
        if !self.config.bugs.skip_commit_lock {
            if let Some((key, holder)) = self.owner.locks.held_by_other(tx, &keys) {
                return NodeReply::Failed(FsError::Busy(format!(
                    "page {} of dataset {} is in commit {holder:?}",
                    key.1, key.0
                )));
            }
            self.owner.locks.take(tx, &keys);
        }
        self.multi.phase1.insert(tx, (keys, self.now_ms));
        NodeReply::Done
    }

    /// The committer gave up before phase 2: the leader's locks go, and so does the commit.
    pub(super) fn serve_unlock(
        &mut self,
        tx: TxKey,
        dataset: DatasetId,
        pages: &[u64],
    ) -> NodeReply {
        let keys: Vec<PageKey> = pages.iter().map(|page| (dataset, *page)).collect();
        self.multi.phase1.remove(&tx);
        self.multi.aborted.insert(tx);
        self.unlock(tx, &keys);
        NodeReply::Done
    }

    /// Phase-1 locks whose committer went silent are released and the commit given up.
    pub(super) fn expire_phase1(&mut self) {
        let limit = 2 * self.config.timing.resolve_after_ms;
        let now = self.now_ms;
        let expired: Vec<TxKey> = self
            .multi
            .phase1
            .iter()
            .filter(|(_, (_, since))| now >= since + limit)
            .map(|(tx, _)| *tx)
            .collect();
        for tx in expired {
            if let Some((keys, _)) = self.multi.phase1.remove(&tx) {
                self.multi.aborted.insert(tx);
                self.unlock(tx, &keys);
            }
        }
    }

    /// A follower's pages are prepared at its targets: now in its own PM, then the answer.
    pub(super) fn follower_prepared(&mut self, tx: TxKey, leader: NodeId) {
        let commit = self.owner.commits.get(&tx).expect("commit in flight");
        let prepared = self
            .table
            .prepare_follower(tx, commit.dataset, &commit.writes, leader);
        if let Err(error) = prepared {
            return self.abort_commit(tx, format!("follower record: {error}"));
        }
        let commit = self.owner.commits.get_mut(&tx).expect("commit in flight");
        commit.step = Step::Prepared;
        if let Some((to, call)) = commit.reply_to.take() {
            self.reply(to, call, NodeReply::Done);
        }
    }

    /// Phase 3 (or the leader's answer): the follower's record becomes current, then its
    /// targets are told. `reply_to`: the committer's call, when it asked.
    pub(super) fn follower_decide(
        &mut self,
        tx: TxKey,
        version: Option<u64>,
        reply_to: Option<(NodeId, u64)>,
    ) {
        let prepared = self
            .owner
            .commits
            .get(&tx)
            .is_some_and(|commit| matches!(commit.step, Step::Prepared));
        if prepared {
            self.note_decided_commit(tx);
            // At the commit's dataset version (old frames kept for views); a decision
            // learned without it (the leader's `Outcome`) leaves the version unknown here.
            if let Some((dataset, pages)) = self.table.decide_copies_at(tx, version).current() {
                self.kernel_stale(dataset, pages);
            }
            let commit = self.owner.commits.get_mut(&tx).expect("commit in flight");
            commit.reply_to = reply_to;
            let versions = commit.writes.iter().map(|w| w.base_version + 1).collect();
            return self.send_decisions(tx, Some(versions));
        }
        if self.owner.commits.contains_key(&tx) {
            // Still preparing: a phase 3 cannot come before the prepare's answer.
            if let Some((to, call)) = reply_to {
                let why = format!("commit {tx:?} is not prepared here yet");
                self.reply(
                    to,
                    call,
                    NodeReply::InDoubt {
                        why,
                        dataset_version: 0,
                    },
                );
            }
            return;
        }
        // This owner restarted since it prepared: the record waits alone (its targets
        // settle with the leader themselves).
        if let Some(pages) = self.pending_record(tx) {
            self.note_decided_commit(tx);
            if let Some((dataset, pages)) = self.table.decide_copies_at(tx, version).current() {
                self.kernel_stale(dataset, pages);
            }
            self.unlock(tx, &pages);
            self.send_confirm(tx);
        }
        if let Some((to, call)) = reply_to {
            let why = format!("follower {} restarted during commit {tx:?}", self.config.id);
            self.reply(
                to,
                call,
                NodeReply::InDoubt {
                    why,
                    dataset_version: 0,
                },
            );
        }
    }

    /// The commit is given up: the follower's record and its targets' copies go.
    pub(super) fn follower_abort(&mut self, tx: TxKey) {
        self.multi.aborted.insert(tx);
        if self.owner.commits.contains_key(&tx) {
            return self.abort_commit(tx, "the commit was given up".into());
        }
        if let Some(pages) = self.pending_record(tx) {
            self.table.abort_copies(tx);
            self.unlock(tx, &pages);
        }
    }

    /// The pages of follower record `tx` waiting in this node's PM, if there is one.
    fn pending_record(&self, tx: TxKey) -> Option<Vec<PageKey>> {
        self.table.pending().into_iter().find_map(|copies| {
            (copies.tx == tx && copies.tag.role == TxRole::Follower).then(|| {
                copies
                    .pages
                    .iter()
                    .map(|page| (copies.dataset, *page))
                    .collect()
            })
        })
    }

    fn send_confirm(&mut self, tx: TxKey) {
        let leader = self
            .table
            .pending()
            .iter()
            .find(|copies| copies.tx == tx)
            .map(|copies| copies.tag.leader);
        if let Some(leader) = leader {
            let confirm = NodeRequest::Confirm {
                txs: vec![tx],
                node: self.config.id,
            };
            self.send(leader, confirm, Purpose::Notice);
        }
    }

    /// At start: pages of a follower record still waiting stay locked until it is settled.
    pub(super) fn lock_waiting_records(&mut self) {
        for copies in self.table.pending() {
            if copies.tag.role == TxRole::Follower {
                let keys: Vec<PageKey> = copies
                    .pages
                    .iter()
                    .map(|page| (copies.dataset, *page))
                    .collect();
                self.owner.locks.take(copies.tx, &keys);
            }
        }
    }

    /// `Outcome` at the leader: committed if it keeps the outcome or any node decided a copy
    /// of `tx` (`DecidedCommit`, asked of every node); otherwise the commit is given up here
    /// for good (a commit still preparing is aborted), so the answer is final.
    pub(super) fn serve_outcome(&mut self, from: NodeId, call: u64, tx: TxKey) {
        if self.table.outcome_decided(tx) || self.target.deciders.decided_commit(tx) {
            return self.reply(from, call, NodeReply::Decision(true));
        }
        // Only a commit this node leads: acting for a lost leader, its own part of the
        // commit may be a follower's, which the answer decides (found by hotpot-sim: the
        // successor aborted its follower part, then answered that the commit was decided).
        let leading = self
            .owner
            .commits
            .get(&tx)
            .filter(|commit| matches!(commit.role, Role::Leader { .. }));
        if let Some(commit) = leading {
            if matches!(commit.step, Step::Deciding) {
                return self.reply(from, call, NodeReply::Decision(true));
            }
            self.abort_commit(tx, "its followers asked for the outcome first".into());
        }
        // No outcome here: never decided, or decided and forgotten (every node confirmed),
        // or lost with this node's PM (at this start or an earlier one). Every node is asked
        // whether it decided a copy of `tx` before the answer is given for good.
        if !self.multi.aborted.contains(tx) {
            if let Some(query) = self.multi.queries.get_mut(&tx) {
                query.askers.push((from, call));
                return;
            }
            let peers = self.outcome_askees();
            let query = OutcomeQuery {
                askers: vec![(from, call)],
                answers: Query::new(&peers),
            };
            let verdict = query.answers.verdict();
            self.multi.queries.insert(tx, query);
            for peer in peers {
                let request = NodeRequest::DecidedCommit { tx };
                self.send(peer, request, Purpose::DecidedCommit { tx });
            }
            if let Some(verdict) = verdict {
                self.answer_outcome_query(tx, verdict);
            }
            return;
        }
        self.give_up_commit(tx);
        self.reply(from, call, NodeReply::Decision(false));
    }

    /// Who a leader asks about a commit whose outcome it does not keep (`proto/outcome.rs`).
    fn outcome_askees(&self) -> Vec<NodeId> {
        to_ask(self.peers(), |peer| self.is_lost(peer))
    }

    fn give_up_commit(&mut self, tx: TxKey) {
        self.multi.aborted.insert(tx);
        if let Some((keys, _)) = self.multi.phase1.remove(&tx) {
            self.unlock(tx, &keys);
        }
    }

    /// A node's answer to `DecidedCommit` (`None`: no answer in time).
    pub(super) fn decided_commit_answered(
        &mut self,
        tx: TxKey,
        from: NodeId,
        reply: Option<NodeReply>,
    ) {
        let Some(query) = self.multi.queries.get_mut(&tx) else {
            return;
        };
        let decided = match reply {
            Some(NodeReply::Decision(decided)) => Some(decided),
            // Unknown: the asker asks again later.
            _ => None,
        };
        if let Some(verdict) = query.answers.answered(from, decided) {
            self.answer_outcome_query(tx, verdict);
        }
    }

    fn answer_outcome_query(&mut self, tx: TxKey, verdict: Verdict) {
        let Some(query) = self.multi.queries.remove(&tx) else {
            return;
        };
        let reply = match verdict {
            Verdict::Decided => {
                self.note_decided_commit(tx);
                NodeReply::Decision(true)
            }
            Verdict::Aborted => {
                self.give_up_commit(tx);
                NodeReply::Decision(false)
            }
            Verdict::Unknown => NodeReply::Failed(FsError::Io(format!(
                "commit {tx:?}: not every node said whether it decided a copy"
            ))),
        };
        for (to, call) in query.askers {
            self.reply(to, call, reply.clone());
        }
    }

    /// This node decided a copy of commit `tx` (across owners).
    pub(super) fn note_decided_commit(&mut self, tx: TxKey) {
        self.target.deciders.note_decided_commit(tx);
    }

    pub(super) fn serve_decided_commit(&self, tx: TxKey) -> NodeReply {
        NodeReply::Decision(self.target.deciders.decided_commit(tx))
    }

    pub(super) fn serve_confirm(&mut self, txs: &[TxKey], node: NodeId) -> NodeReply {
        for tx in txs {
            self.table.confirm_outcome(*tx, node);
        }
        NodeReply::Done
    }

    /// Whether anything of commit `tx` waits on this node for its outcome.
    pub(super) fn waits_for(&self, tx: TxKey) -> bool {
        self.owner.commits.contains_key(&tx)
            || self
                .table
                .pending()
                .iter()
                .any(|copies| copies.tag.tx == tx && copies.tag.role == TxRole::Follower)
            || self.target_waits_for(tx)
    }

    /// A leader's kept outcomes not confirmed for `resolve_after_ms`: every other node but the
    /// lost ones is asked whether it still waits for one (`proto/outcome.rs`); when none does,
    /// it is forgotten.
    pub(super) fn sweep_outcomes(&mut self) {
        let now = self.now_ms;
        let waiting = self.table.outcomes_waiting();
        let kept: BTreeSet<TxKey> = waiting.iter().map(|(tx, _)| *tx).collect();
        self.multi.outcome_seen.retain(|tx, _| kept.contains(tx));
        self.multi.sweeps.retain(|tx, _| kept.contains(tx));
        let peers: BTreeSet<NodeId> = self.outcome_askees().into_iter().collect();
        for (tx, _) in waiting {
            let seen = *self.multi.outcome_seen.entry(tx).or_insert(now);
            if now < seen + self.config.timing.resolve_after_ms
                || self.multi.sweeps.contains_key(&tx)
                || self.waits_for(tx)
            {
                continue;
            }
            self.multi.sweeps.insert(tx, peers.clone());
            for peer in &peers {
                self.send(*peer, NodeRequest::Pending { tx }, Purpose::Pending { tx });
            }
            if peers.is_empty() {
                self.forget_outcome(tx);
            }
        }
    }

    pub(super) fn pending_answered(&mut self, tx: TxKey, from: NodeId, reply: Option<NodeReply>) {
        if !matches!(reply, Some(NodeReply::Decision(false))) {
            // Someone still waits (or did not say): ask again after another wait.
            self.multi.sweeps.remove(&tx);
            self.multi.outcome_seen.insert(tx, self.now_ms);
            return;
        }
        let Some(awaiting) = self.multi.sweeps.get_mut(&tx) else {
            return;
        };
        awaiting.remove(&from);
        if awaiting.is_empty() {
            self.multi.sweeps.remove(&tx);
            if !self.waits_for(tx) {
                self.forget_outcome(tx);
            }
        }
    }

    fn forget_outcome(&mut self, tx: TxKey) {
        let bits = self
            .table
            .outcomes_waiting()
            .into_iter()
            .find(|(kept, _)| *kept == tx)
            .map_or(0, |(_, bits)| bits);
        for node in TxTag::ids(bits) {
            self.table.confirm_outcome(tx, node);
        }
    }

    /// The leader's answer about commit `tx` settles what waits here: a follower record
    /// (`target` None) or a target's copy `target` prepared for it.
    pub(super) fn outcome_answered(
        &mut self,
        tx: TxKey,
        target: Option<TxKey>,
        reply: Option<NodeReply>,
    ) {
        let waiting = target.unwrap_or(tx);
        self.target_resolved(waiting);
        match (reply, target) {
            (Some(NodeReply::Decision(true)), None) => self.follower_decide(tx, None, None),
            (Some(NodeReply::Decision(false)), None) => self.follower_abort(tx),
            (Some(NodeReply::Decision(true)), Some(copy)) => self.decide_target_copy(copy),
            (Some(NodeReply::Decision(false)), Some(copy)) => {
                self.serve_abort(copy);
            }
            _ => self.retry_resolution(waiting),
        }
    }
}
