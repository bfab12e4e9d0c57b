//! Multi-owner commits at the owners (docs/design.md, "Recovery"): the lowest-id owner
//! leads, and its local apply decides the whole commit; the other owners (followers)
//! prepare first and decide after it. A follower left waiting asks the leader, whose answer
//! is final: a kept outcome record says committed, anything else is aborted for good.
//! Must survive: a committer lost between any two steps (followers resolve with the
//! leader), a leader or follower restarted with its PM (its records say where it was), a
//! follower's question racing the leader's decision (one lock orders them).

use std::collections::BTreeMap;

use hotpot_core::page::TxKey;
use hotpot_core::pm::{PageKey, TxRole};
use hotpot_core::proto::messages::{NodeReply, NodeRequest, OwnerPages};
use hotpot_core::proto::outcome::{to_ask, Query, Verdict};
use hotpot_core::proto::types::{Dataset, FsError, Ino, Mode, NodeId};

use super::fault;
use super::protocol::{pm_error, Protocol, Replicated, RPC_TIMEOUT};

/// A follower's prepared part of a multi-owner commit, while its process lives.
pub struct FollowerTx {
    dataset: Dataset,
    ino: Ino,
    committer: NodeId,
    leader: NodeId,
    pages: Vec<u64>,
    replicated: Replicated,
}

impl Protocol {
    /// Phase 1 at a follower owner. `committer`: the committing node and whether it
    /// persisted its own copy already.
    pub fn serve_owner_prepare(
        &self,
        tx: TxKey,
        dataset: &Dataset,
        ino: Ino,
        committer: (NodeId, bool),
        leader: NodeId,
        pages: OwnerPages,
    ) -> NodeReply {
        match self.owner_prepare(tx, dataset, ino, committer, leader, pages) {
            Ok(()) => NodeReply::Done,
            Err(error) => NodeReply::Failed(error),
        }
    }

    fn owner_prepare(
        &self,
        tx: TxKey,
        dataset: &Dataset,
        ino: Ino,
        (committer, committer_prepared): (NodeId, bool),
        leader: NodeId,
        pages: OwnerPages,
    ) -> Result<(), FsError> {
        self.wait_ready()?;
        let page_ids: Vec<u64> = match &pages {
            OwnerPages::Writes(writes) => writes.iter().map(|write| write.page).collect(),
            OwnerPages::Runs(runs) => runs.iter().map(|(page, _)| *page).collect(),
        };
        self.check_owner(dataset, page_ids.iter().copied())?;
        let keys: Vec<PageKey> = page_ids.iter().map(|page| (dataset.id, *page)).collect();
        let mut held = self.lock_pages(tx, &keys, dataset.params.mode == Mode::Mrsw)?;
        let writes = match pages {
            OwnerPages::Writes(writes) => writes,
            OwnerPages::Runs(runs) => self.merge_runs(dataset, &runs)?,
        };
        let replicated = self.replicate(
            dataset,
            committer,
            committer_prepared,
            &writes,
            Some((tx, leader)),
        )?;
        let prepared = self
            .table()
            .prepare_follower(tx, dataset.id, &writes, leader);
        if let Err(error) = prepared {
            let abort = NodeRequest::Abort {
                tx: replicated.target_tx,
            };
            self.send_to(&replicated.targets, &abort);
            return Err(pm_error(error));
        }
        held.armed = false; // held until the decision
        self.followers.lock().expect("followers lock").insert(
            tx,
            FollowerTx {
                dataset: dataset.clone(),
                ino,
                committer,
                leader,
                pages: page_ids,
                replicated,
            },
        );
        fault::point("follower.prepared");
        Ok(())
    }

    /// Phase 3 at a follower (`commit`, the commit's dataset `version` when the decision
    /// carried it), or the abort of phase 1; also the end of a resolution (the version is
    /// not known there: views cannot be served those pages' older versions). Idempotent: a
    /// second call finds nothing to do. Returns why a decided commit is in doubt here: fewer
    /// than the wanted copies confirmed it, or this follower cannot tell (proto/replication.rs).
    pub fn finish_follower(&self, tx: TxKey, commit: bool, version: Option<u64>) -> Option<String> {
        if commit {
            self.note_decided_commit(tx);
        }
        let live = self.followers.lock().expect("followers lock").remove(&tx);
        let pending = {
            let mut table = self.table();
            let pending = table
                .pending()
                .into_iter()
                .find(|pending| pending.tx == tx && pending.tag.role == TxRole::Follower);
            if commit {
                table.decide_copies_at(tx, version);
            } else {
                table.abort_copies(tx);
            }
            pending
        };
        match (live, &pending) {
            (Some(follower), _) => {
                let mut settled = false;
                let mut in_doubt = None;
                if commit {
                    fault::point("follower.decided");
                    let delivered = self.announce(
                        follower.dataset.id,
                        follower.ino,
                        follower.committer,
                        &follower.pages,
                        &follower.replicated,
                    );
                    settled = delivered == follower.replicated.targets.len();
                    in_doubt = follower.replicated.short_of_copies(delivered);
                } else {
                    let abort = NodeRequest::Abort {
                        tx: follower.replicated.target_tx,
                    };
                    self.send_to(&follower.replicated.targets, &abort);
                }
                let keys: Vec<PageKey> = follower
                    .pages
                    .iter()
                    .map(|page| (follower.dataset.id, *page))
                    .collect();
                self.unlock_pages(tx, &keys);
                // Confirmed only once its targets decided too (else the leader keeps the
                // outcome for them to ask, and frees it when nobody waits any more).
                if settled {
                    let _ = self.confirmations.send((follower.leader, tx));
                }
                in_doubt
            }
            // A record recovered after a restart: its targets are unknown, so the decided
            // pages go to the current holders as copies (they drop their cached pages).
            (None, Some(recovered)) => {
                let keys: Vec<PageKey> = recovered
                    .pages
                    .iter()
                    .map(|page| (recovered.dataset, *page))
                    .collect();
                if commit && self.push_to_holders(recovered.dataset, &keys) {
                    let _ = self.confirmations.send((recovered.tag.leader, tx));
                }
                self.unlock_pages(tx, &keys);
                commit.then(|| {
                    format!(
                        "follower {} restarted during commit {tx:?}: its copies are not counted",
                        self.id
                    )
                })
            }
            (None, None) => commit.then(|| {
                format!(
                    "commit {tx:?} was not waiting at follower {} any more",
                    self.id
                )
            }),
        }
    }

    /// At the leader: the final answer for `tx` (`proto/outcome.rs`). Without an outcome kept
    /// here (never decided, or lost with this node's PM at this start or an earlier one, or
    /// this node is promoted in place of a lost leader), it asks every node but the lost ones
    /// whether it decided a copy of `tx` (the leader's replicas did, if it had decided). Found
    /// by hotpot-sim: a leader rebuilt at an earlier start answered "aborted" for a commit its
    /// replicas had decided.
    pub fn serve_outcome(&self, tx: TxKey) -> NodeReply {
        let mut aborted = self.aborted.lock().expect("aborted lock");
        if self.table().outcome_decided(tx) || self.decided_commit(tx) {
            return NodeReply::Decision(true);
        }
        if aborted.contains(tx) {
            return NodeReply::Decision(false);
        }
        let asked = self.outcome_askees();
        let mut answers = Query::new(&asked);
        let mut verdict = answers.verdict();
        for node in asked {
            if verdict.is_some() {
                break;
            }
            let answer = match self.peers.client(node) {
                Some(client) => client
                    .call::<_, NodeReply>(&NodeRequest::DecidedCommit { tx }, RPC_TIMEOUT)
                    .map_err(|error| error.to_string()),
                None => Err("not known (not joined yet?)".into()),
            };
            let decided = match answer {
                Ok(NodeReply::Decision(decided)) => Some(decided),
                Ok(other) => {
                    tracing::warn!(node, ?other, "unexpected answer to DecidedCommit");
                    None
                }
                Err(error) => {
                    tracing::info!(node, %error, ?tx, "leader without the outcome cannot ask this node yet; the asker asks again");
                    None
                }
            };
            verdict = answers.answered(node, decided);
        }
        match verdict.unwrap_or(Verdict::Unknown) {
            Verdict::Decided => {
                self.note_decided_commit(tx);
                NodeReply::Decision(true)
            }
            Verdict::Aborted => {
                aborted.insert(tx);
                NodeReply::Decision(false)
            }
            // Cannot be sure: ask again later rather than abort a decided commit.
            Verdict::Unknown => NodeReply::Failed(FsError::Io(format!(
                "commit {tx:?}: not every node said whether it decided a copy"
            ))),
        }
    }

    /// Who a leader asks about a commit whose outcome it does not keep (`proto/outcome.rs`).
    pub(super) fn outcome_askees(&self) -> Vec<NodeId> {
        let peers = self
            .peers
            .known()
            .into_iter()
            .filter(|node| *node != self.id);
        to_ask(peers, |node| self.peers.is_lost(node))
    }

    pub fn serve_confirm(&self, txs: &[TxKey], node: NodeId) -> NodeReply {
        let mut table = self.table();
        for tx in txs {
            table.confirm_outcome(*tx, node);
        }
        NodeReply::Done
    }

    /// Whether anything here still waits for the outcome of commit `tx`: a follower's
    /// record, or a holder's copy of it.
    pub fn serve_pending(&self, tx: TxKey) -> NodeReply {
        let copy_waits = self.deciders(|deciders| deciders.waits_for_commit(tx));
        NodeReply::Decision(copy_waits || self.table().is_pending(tx))
    }

    /// Send followers' confirmations to their leaders, batched (runs on its own thread).
    pub fn run_confirmations(&self) {
        let queue = self.confirm_queue().clone();
        while let Ok(first) = queue.recv() {
            let mut by_leader: BTreeMap<NodeId, Vec<TxKey>> = BTreeMap::new();
            for (leader, tx) in std::iter::once(first).chain(queue.try_iter()) {
                by_leader.entry(leader).or_default().push(tx);
            }
            for (leader, txs) in by_leader {
                let request = NodeRequest::Confirm { txs, node: self.id };
                let outcome = if leader == self.id {
                    Ok(super::service::handle(self, request))
                } else {
                    match self.peers.client(leader) {
                        Some(client) => client.call::<_, NodeReply>(&request, RPC_TIMEOUT),
                        None => continue,
                    }
                };
                if let Err(error) = outcome {
                    // The leader asks again later (recovery.rs); nothing is lost.
                    tracing::debug!(leader, %error, "confirmation not delivered");
                }
            }
        }
    }

    /// Ask `leader` how `tx` ended: `None` if it cannot answer now.
    /// The question goes to the leader, or to the node promoted in its place.
    pub(super) fn ask_outcome(&self, leader: NodeId, tx: TxKey) -> Option<bool> {
        let asked = self.peers.resolve(leader);
        if asked == self.id {
            return match self.serve_outcome(tx) {
                NodeReply::Decision(decided) => Some(decided),
                _ => None,
            };
        }
        match self
            .peers
            .client(asked)?
            .call::<_, NodeReply>(&NodeRequest::Outcome { tx, leader }, RPC_TIMEOUT)
        {
            Ok(NodeReply::Decision(decided)) => Some(decided),
            Ok(other) => {
                tracing::warn!(leader, ?other, "unexpected answer to an outcome question");
                None
            }
            Err(error) => {
                tracing::debug!(leader, %error, "leader cannot say yet");
                None
            }
        }
    }
}
