//! Who settles each copy prepared on a node, and which commits across owners the node decided
//! a copy of: one for the daemon and the node machine (volatile; after a restart a prepared
//! copy's owner settles it, and a follower record names its leader).
//!
//! A copy prepared for a one-owner commit is settled by that owner (its Decide or Abort, or,
//! if neither comes, a `Register` with it). A copy of a commit across owners is settled by the
//! commit's leader (`Outcome`), whatever its own owner did since. A leader that lost its PM asks
//! the other nodes whether they decided a copy of its commit (`DecidedCommit`): the decided
//! commits are kept for that, the newest `DECIDED_KEPT`.
//!
//! Must survive: a Decide after the copy was settled otherwise (nothing to do), every copy of
//! one commit settled at once by one answer of its leader, a node deciding more commits than it
//! can remember (the oldest go first).

use std::collections::BTreeMap;

use crate::page::TxKey;
use crate::proto::recent::Recent;
use crate::proto::types::NodeId;

/// How many decided commits across owners a node remembers for leaders that lost their PM.
pub const DECIDED_KEPT: usize = 65_536;

/// Who settles one prepared copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decider {
    /// The owner that prepared the copy (or, for a committer's own copy, the owner it asked).
    pub owner: NodeId,
    /// For a commit across owners: the commit and its leader, whose outcome settles the copy.
    pub commit: Option<(TxKey, NodeId)>,
}

#[derive(Default, Debug)]
pub struct Deciders {
    waiting: BTreeMap<TxKey, Decider>,
    decided: Recent<DECIDED_KEPT>,
}

impl Deciders {
    /// Copy `tx` was prepared here; `decider` settles it.
    pub fn prepared(&mut self, tx: TxKey, decider: Decider) {
        self.waiting.insert(tx, decider);
    }

    pub fn get(&self, tx: TxKey) -> Option<Decider> {
        self.waiting.get(&tx).copied()
    }

    /// How many copies wait to be settled.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Copy `tx` was decided: it waits no more, and its commit across owners, if any, counts
    /// as decided here.
    pub fn decided(&mut self, tx: TxKey) -> Option<Decider> {
        let decider = self.waiting.remove(&tx);
        if let Some((commit, _)) = decider.and_then(|decider| decider.commit) {
            self.note_decided_commit(commit);
        }
        decider
    }

    /// Copy `tx` was aborted or settled by its owner's current copies.
    pub fn settled(&mut self, tx: TxKey) -> Option<Decider> {
        self.waiting.remove(&tx)
    }

    /// Whether a copy prepared here for commit `commit` (across owners) waits for its outcome.
    pub fn waits_for_commit(&self, commit: TxKey) -> bool {
        self.waiting
            .values()
            .any(|decider| decider.commit.is_some_and(|(of, _)| of == commit))
    }

    /// The outcome of commit `commit` across owners is known: every copy here waiting for it
    /// waits no more. Its copies and their leader; with `decided`, the commit counts as decided
    /// here if any copy of it was.
    pub fn commit_settled(&mut self, commit: TxKey, decided: bool) -> Vec<(TxKey, NodeId)> {
        let settled: Vec<(TxKey, NodeId)> = self
            .waiting
            .iter()
            .filter_map(|(tx, decider)| {
                decider
                    .commit
                    .filter(|(of, _)| *of == commit)
                    .map(|(_, leader)| (*tx, leader))
            })
            .collect();
        for (tx, _) in &settled {
            self.waiting.remove(tx);
        }
        if decided && !settled.is_empty() {
            self.note_decided_commit(commit);
        }
        settled
    }

    /// This node decided a copy of commit `commit` across owners (its own part as a
    /// follower included).
    pub fn note_decided_commit(&mut self, commit: TxKey) {
        self.decided.insert(commit);
    }

    /// Whether this node decided a copy of commit `commit` (among the newest `DECIDED_KEPT`).
    pub fn decided_commit(&self, commit: TxKey) -> bool {
        self.decided.contains(commit)
    }
}

#[cfg(test)]
mod tests {
    use super::{Decider, Deciders, DECIDED_KEPT};

    const LEADER: u32 = 3;

    fn across(commit: (u32, u64)) -> Decider {
        Decider {
            owner: 2,
            commit: Some((commit, LEADER)),
        }
    }

    #[test]
    fn a_decided_copy_of_a_commit_across_owners_makes_the_commit_decided_here() {
        let mut deciders = Deciders::default();
        deciders.prepared((2, 1), across((1, 7)));
        deciders.prepared(
            (2, 2),
            Decider {
                owner: 2,
                commit: None,
            },
        );
        assert!(deciders.waits_for_commit((1, 7)));
        assert_eq!(deciders.decided((2, 1)), Some(across((1, 7))));
        assert!(deciders.decided_commit((1, 7)));
        assert!(!deciders.waits_for_commit((1, 7)));
        // A one-owner copy names no commit.
        deciders.decided((2, 2));
        assert_eq!(deciders.len(), 0);
        // A late Decide of a settled copy changes nothing.
        assert_eq!(deciders.decided((2, 1)), None);
    }

    #[test]
    fn a_leaders_answer_settles_every_copy_of_its_commit_at_once() {
        let mut deciders = Deciders::default();
        deciders.prepared((2, 1), across((1, 7)));
        deciders.prepared((4, 1), across((1, 7)));
        deciders.prepared((4, 2), across((1, 8)));
        let mut settled = deciders.commit_settled((1, 7), false);
        settled.sort();
        assert_eq!(settled, vec![((2, 1), LEADER), ((4, 1), LEADER)]);
        // Aborted: not decided here.
        assert!(!deciders.decided_commit((1, 7)));
        assert_eq!(deciders.len(), 1);
        assert_eq!(deciders.commit_settled((1, 8), true).len(), 1);
        assert!(deciders.decided_commit((1, 8)));
        // Nothing of it waited here: nothing says it was decided here.
        assert!(deciders.commit_settled((1, 9), true).is_empty());
        assert!(!deciders.decided_commit((1, 9)));
    }

    #[test]
    fn the_oldest_decided_commits_are_forgotten_first() {
        let mut deciders = Deciders::default();
        for seq in 0..=DECIDED_KEPT as u64 {
            deciders.note_decided_commit((1, seq));
        }
        assert!(!deciders.decided_commit((1, 0)));
        assert!(deciders.decided_commit((1, 1)));
        assert!(deciders.decided_commit((1, DECIDED_KEPT as u64)));
        // Noted twice, counted once.
        deciders.note_decided_commit((1, DECIDED_KEPT as u64));
        assert!(deciders.decided_commit((1, 1)));
    }
}
