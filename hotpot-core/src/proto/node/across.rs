//! The committer's side of an MRMW commit across owners (the three phases of docs/design.md,
//! "MRMW"): `Lock` at the leader (the lowest-id owner), `OwnerPrepare` at each follower in
//! node-id order, `CommitRuns` at the leader (its apply decides), `OwnerDecide` to the
//! followers. A refusal in phase 1 undoes what was prepared and starts over after a pause.
//! Must survive: any owner not answering (before phase 2 nothing is decided: refused; at
//! phase 2 or 3 the owners settle it: in doubt), this node dying at any point.

use std::collections::{BTreeMap, BTreeSet};

use super::client::OpResult;
use super::{Machine, OpId, PageRuns, Purpose};
use crate::page::TxKey;
use crate::proto::messages::{NodeReply, NodeRequest, OwnerPages};
use crate::proto::types::{FsError, NodeId};

#[derive(Clone, Debug)]
pub(super) struct Phase {
    tx: TxKey,
    groups: BTreeMap<NodeId, Vec<PageRuns>>,
    step: AcrossStep,
}

#[derive(Clone, Debug)]
enum AcrossStep {
    /// Phase 1 at the leader.
    Locking,
    /// Phase 1 at follower number `next` (node-id order).
    Preparing { next: usize },
    /// Phase 2: the leader decides.
    Leading,
    /// Phase 3: followers not answered yet; whether the ack is in doubt.
    Releasing {
        awaiting: BTreeSet<NodeId>,
        in_doubt: Option<String>,
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
        self.groups[&owner].iter().map(|(page, _)| *page).collect()
    }
}

impl Machine {
    pub(super) fn start_across(&mut self, id: OpId, groups: BTreeMap<NodeId, Vec<PageRuns>>) {
        let tx = self.new_tx();
        let phase = Phase {
            tx,
            groups,
            step: AcrossStep::Locking,
        };
        let Some(op) = self.client.ops.get_mut(&id) else {
            return;
        };
        op.attempts += 1;
        let dataset = op.dataset.id;
        let leader = phase.leader();
        let request = NodeRequest::Lock {
            tx,
            dataset,
            pages: phase.pages_of(leader),
        };
        self.set_step_across(id, phase);
        self.send(leader, request, Purpose::Op(id));
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
            (AcrossStep::Locking | AcrossStep::Preparing { .. }, reply) => {
                let asked = match phase.step {
                    AcrossStep::Preparing { next } => &followers[..=next],
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
                let in_doubt = match reply {
                    Some(NodeReply::Committed { .. }) => None,
                    Some(NodeReply::InDoubt { why, .. }) => Some(why),
                    Some(other) => Some(format!("leader {from} answered {other:?}")),
                    None => {
                        let why = format!("leader {from} did not answer");
                        return self.op_done(id, OpResult::InDoubt(why));
                    }
                };
                phase.step = AcrossStep::Releasing {
                    awaiting: followers.iter().copied().collect(),
                    in_doubt,
                };
                let tx = phase.tx;
                self.set_step_across(id, phase);
                for follower in followers {
                    let decide = NodeRequest::OwnerDecide { tx, version: 0 };
                    self.send(follower, decide, Purpose::Op(id));
                }
            }
            (
                AcrossStep::Releasing {
                    mut awaiting,
                    mut in_doubt,
                },
                reply,
            ) => {
                awaiting.remove(&from);
                if !matches!(reply, Some(NodeReply::Done)) && in_doubt.is_none() {
                    in_doubt = Some(format!("follower {from} answered the decision {reply:?}"));
                }
                if !awaiting.is_empty() {
                    phase.step = AcrossStep::Releasing { awaiting, in_doubt };
                    return self.set_step_across(id, phase);
                }
                let result = match in_doubt {
                    None => OpResult::Committed,
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
                let request = NodeRequest::OwnerPrepare {
                    tx,
                    dataset,
                    ino: 0,
                    committer: me,
                    committer_prepared: false,
                    leader,
                    pages: OwnerPages::Runs(phase.groups[follower].clone()),
                };
                (*follower, request)
            }
            None => {
                phase.step = AcrossStep::Leading;
                let request = NodeRequest::CommitRuns {
                    tx,
                    followers,
                    dataset,
                    ino: 0,
                    committer: me,
                    pages: phase.groups[&leader].clone(),
                    release: true,
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
        let leader = phase.leader();
        let unlock = NodeRequest::Unlock {
            tx,
            dataset,
            pages: phase.pages_of(leader),
        };
        self.send(leader, unlock, Purpose::Notice);
    }
}
