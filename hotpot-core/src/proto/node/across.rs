//! The committer's side of a commit across owners (the three phases of docs/design.md,
//! "MRMW", and "Recovery": commits across owners). MRMW: `Lock` at the leader (the lowest-id
//! owner), `OwnerPrepare` of byte runs at each follower in node-id order, `CommitRuns` at the
//! leader (its apply decides), `OwnerDecide` to the followers; a refusal in phase 1 undoes
//! what was prepared and starts over after a pause. MRSW (the dataset's single writer, so
//! no phase-1 lock): this node's own copy of the other owners' pages prepared first, then
//! `OwnerPrepare` of whole pages at every follower at once, `Commit` at the leader,
//! `OwnerDecide`. Must survive: any owner not answering (before phase 2 nothing is decided:
//! refused; at phase 2 or 3 the owners settle it: in doubt, and the own copy settles with
//! the leader), this node dying at any point.

use std::collections::{BTreeMap, BTreeSet};

use super::client::OpResult;
use super::{Machine, OpId, Purpose};
use crate::page::TxKey;
use crate::proto::messages::{NodeReply, NodeRequest, OwnerPages};
use crate::proto::types::{FsError, NodeId};

#[derive(Clone, Debug)]
pub(super) struct Phase {
    tx: TxKey,
    groups: BTreeMap<NodeId, OwnerPages>,
    /// MRSW: this node's own copy of the other owners' pages, prepared under its own name
    /// (this node may be a follower of this very commit under `tx`).
    own_copy: Option<TxKey>,
    step: AcrossStep,
}

#[derive(Clone, Debug)]
enum AcrossStep {
    /// Phase 1 at the leader.
    Locking,
    /// Phase 1 at follower number `next` (node-id order).
    Preparing { next: usize },
    /// MRSW phase 1: every follower at once; these have not answered.
    PreparingAll { awaiting: BTreeSet<NodeId> },
    /// Phase 2: the leader decides.
    Leading,
    /// Phase 3: followers not answered yet; whether the ack is in doubt; the dataset
    /// version the leader applied with.
    Releasing {
        awaiting: BTreeSet<NodeId>,
        in_doubt: Option<String>,
        version: u64,
    },
}

impl Phase {
    fn leader(&self) -> NodeId {
        *self.groups.keys().next().expect("a commit has owners")
    }

    fn followers(&self) -> Vec<NodeId> {
        self.groups.keys().skip(1).copied().collect()
    }

    fn pages_of(&self, owner: NodeId) -> Vec<u64> {
        match &self.groups[&owner] {
            OwnerPages::Writes(writes) => writes.iter().map(|write| write.page).collect(),
            OwnerPages::Runs(runs) => runs.iter().map(|(page, _)| *page).collect(),
        }
    }

    fn runs(&self) -> bool {
        matches!(self.groups.values().next(), Some(OwnerPages::Runs(_)))
    }
}

impl Machine {
    pub(super) fn start_across(&mut self, id: OpId, groups: BTreeMap<NodeId, OwnerPages>) {
        let tx = self.new_tx();
        let phase = Phase {
            tx,
            groups,
            own_copy: None,
            step: AcrossStep::Locking,
        };
        let Some(op) = self.client.ops.get_mut(&id) else {
            return;
        };
        op.attempts += 1;
        let dataset = op.dataset.id;
        let leader = phase.leader();
        if !phase.runs() {
            return self.prepare_all(id, dataset, phase);
        }
        let request = NodeRequest::Lock {
            tx,
            dataset,
            pages: phase.pages_of(leader),
        };
        self.set_step_across(id, phase);
        self.send(leader, request, Purpose::Op(id));
    }

    /// MRSW phase 1: this node's own copy of the other owners' pages first (every owner
    /// counts it and sends it nothing), then every follower at once.
    fn prepare_all(&mut self, id: OpId, dataset: u64, mut phase: Phase) {
        let me = self.config.id;
        let copies: Vec<(u64, u64, Vec<u8>)> = phase
            .groups
            .iter()
            .filter(|(owner, _)| **owner != me)
            .flat_map(|(_, pages)| match pages {
                OwnerPages::Writes(writes) => writes
                    .iter()
                    .map(|write| (write.page, write.base_version + 1, write.bytes.clone()))
                    .collect(),
                OwnerPages::Runs(_) => Vec::new(),
            })
            .collect();
        if !copies.is_empty() {
            let own = self.new_tx();
            let borrowed: Vec<(u64, u64, &[u8])> = copies
                .iter()
                .map(|(page, version, bytes)| (*page, *version, bytes.as_slice()))
                .collect();
            let prepared =
                self.table
                    .prepare_copies(own, dataset, &borrowed, true, Default::default());
            if let Err(error) = prepared {
                let error = FsError::Io(format!("own copy: {error}"));
                return self.op_done(id, OpResult::Refused(error));
            }
            phase.own_copy = Some(own);
        }
        let followers = phase.followers();
        phase.step = AcrossStep::PreparingAll {
            awaiting: followers.iter().copied().collect(),
        };
        let requests: Vec<(NodeId, NodeRequest)> = followers
            .iter()
            .map(|follower| (*follower, self.owner_prepare(id, &phase, *follower)))
            .collect();
        self.set_step_across(id, phase);
        for (follower, request) in requests {
            self.send(follower, request, Purpose::Op(id));
        }
    }

    /// Phase 1's request to `follower`.
    fn owner_prepare(&self, id: OpId, phase: &Phase, follower: NodeId) -> NodeRequest {
        let dataset = self.client.ops[&id].dataset.clone();
        NodeRequest::OwnerPrepare {
            tx: phase.tx,
            dataset,
            ino: 0,
            committer: self.config.id,
            committer_prepared: phase.own_copy.is_some(),
            leader: phase.leader(),
            pages: phase.groups[&follower].clone(),
        }
    }

    pub(super) fn across_answered(
        &mut self,
        id: OpId,
        mut phase: Phase,
        from: NodeId,
        reply: Option<NodeReply>,
    ) {
        let followers = phase.followers();
        match (phase.step.clone(), reply) {
            (AcrossStep::Locking, Some(NodeReply::Done)) => self.prepare_next(id, phase, 0),
            (AcrossStep::Preparing { next }, Some(NodeReply::Done)) => {
                self.prepare_next(id, phase, next + 1)
            }
            (AcrossStep::PreparingAll { mut awaiting }, Some(NodeReply::Done)) => {
                awaiting.remove(&from);
                if awaiting.is_empty() {
                    // Every follower prepared: phase 2.
                    self.prepare_next(id, phase, followers.len());
                } else {
                    phase.step = AcrossStep::PreparingAll { awaiting };
                    self.set_step_across(id, phase);
                }
            }
            (
                AcrossStep::Locking
                | AcrossStep::Preparing { .. }
                | AcrossStep::PreparingAll { .. },
                reply,
            ) => {
                let asked = match phase.step {
                    AcrossStep::Preparing { next } => &followers[..=next],
                    AcrossStep::PreparingAll { .. } => &followers[..],
                    _ => &[][..],
                };
                self.undo_phase1(id, &phase, asked);
                match reply {
                    Some(NodeReply::Failed(FsError::Busy(why))) => self.back_off(id, why),
                    other => {
                        let why = match other {
                            Some(NodeReply::Failed(error)) => error.to_string(),
                            Some(other) => format!("unexpected {other:?}"),
                            None => format!("owner {from} did not answer"),
                        };
                        let error =
                            FsError::Io(format!("commit not prepared, nothing applied: {why}"));
                        self.op_done(id, OpResult::Refused(error));
                    }
                }
            }
            (AcrossStep::Leading, Some(NodeReply::Failed(error))) => {
                self.undo_phase1(id, &phase, &followers);
                self.op_done(id, OpResult::Refused(error));
            }
            (AcrossStep::Leading, reply) => {
                // Decided (or not) at the leader: the followers ask it if they miss phase 3.
                let (in_doubt, version) = match reply {
                    Some(NodeReply::Committed {
                        dataset_version, ..
                    }) => (None, dataset_version),
                    Some(NodeReply::InDoubt {
                        why,
                        dataset_version,
                    }) => (Some(why), dataset_version),
                    Some(other) => (Some(format!("leader {from} answered {other:?}")), 0),
                    None => {
                        // The own copy settles with the leader's outcome.
                        if let Some(own) = phase.own_copy {
                            self.note_decider_across(own, phase.tx, from);
                        }
                        let why = format!("leader {from} did not answer");
                        return self.op_done(id, OpResult::InDoubt(why));
                    }
                };
                // The leader applied it: the own copy is current.
                if let Some(own) = phase.own_copy {
                    self.table.decide_copies(own);
                }
                phase.step = AcrossStep::Releasing {
                    awaiting: followers.iter().copied().collect(),
                    in_doubt,
                    version,
                };
                let tx = phase.tx;
                self.set_step_across(id, phase);
                for follower in followers {
                    let decide = NodeRequest::OwnerDecide { tx, version };
                    self.send(follower, decide, Purpose::Op(id));
                }
            }
            (
                AcrossStep::Releasing {
                    mut awaiting,
                    mut in_doubt,
                    version,
                },
                reply,
            ) => {
                awaiting.remove(&from);
                if !matches!(reply, Some(NodeReply::Done)) && in_doubt.is_none() {
                    in_doubt = Some(format!("follower {from} answered the decision {reply:?}"));
                }
                if !awaiting.is_empty() {
                    phase.step = AcrossStep::Releasing {
                        awaiting,
                        in_doubt,
                        version,
                    };
                    return self.set_step_across(id, phase);
                }
                let result = match in_doubt {
                    None => OpResult::Committed {
                        dataset_version: version,
                    },
                    Some(why) => OpResult::InDoubt(why),
                };
                self.op_done(id, result);
            }
        }
    }

    /// Phase 1 at follower number `next`, or phase 2 once every follower is prepared.
    fn prepare_next(&mut self, id: OpId, mut phase: Phase, next: usize) {
        let Some(op) = self.client.ops.get(&id) else {
            return;
        };
        let dataset = op.dataset.clone();
        let followers = phase.followers();
        let leader = phase.leader();
        let tx = phase.tx;
        let me = self.config.id;
        let (to, request) = match followers.get(next) {
            Some(follower) => {
                phase.step = AcrossStep::Preparing { next };
                (*follower, self.owner_prepare(id, &phase, *follower))
            }
            None => {
                phase.step = AcrossStep::Leading;
                let request = match phase.groups[&leader].clone() {
                    OwnerPages::Runs(pages) => NodeRequest::CommitRuns {
                        tx,
                        followers,
                        dataset,
                        ino: 0,
                        committer: me,
                        pages,
                        release: true,
                    },
                    OwnerPages::Writes(pages) => NodeRequest::Commit {
                        tx,
                        followers,
                        dataset,
                        ino: 0,
                        committer: me,
                        committer_prepared: phase.own_copy.is_some(),
                        pages,
                        version: op.version,
                    },
                };
                (leader, request)
            }
        };
        self.set_step_across(id, phase);
        self.send(to, request, Purpose::Op(id));
    }

    /// Nothing was decided: the followers asked drop what they prepared, the leader its
    /// locks (a lost notice is settled by the followers asking the leader).
    fn undo_phase1(&mut self, id: OpId, phase: &Phase, asked: &[NodeId]) {
        let Some(op) = self.client.ops.get(&id) else {
            return;
        };
        let dataset = op.dataset.id;
        let tx = phase.tx;
        for follower in asked {
            self.send(*follower, NodeRequest::OwnerAbort { tx }, Purpose::Notice);
        }
        if let Some(own) = phase.own_copy {
            self.table.abort_copies(own);
        }
        if !phase.runs() {
            return; // MRSW: no phase-1 lock at the leader
        }
        let leader = phase.leader();
        let unlock = NodeRequest::Unlock {
            tx,
            dataset,
            pages: phase.pages_of(leader),
        };
        self.send(leader, unlock, Purpose::Notice);
    }
}
