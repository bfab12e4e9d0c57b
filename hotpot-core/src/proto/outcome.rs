//! A leader's final answer for a commit across owners (`Outcome`, from a follower or a copy
//! waiting for it), one rule for the daemon and the node machine. A kept outcome record says
//! decided. Without one (never decided; decided and forgotten once every node confirmed; lost
//! with the leader's PM, at this start or an earlier one; or this node acts for a lost leader),
//! the leader asks the other nodes whether they decided a copy of the commit
//! (`DecidedCommit`): one that did makes it decided; if every node asked says no, the commit
//! is given up for good (no late phase 2 of it is taken), so the answer never changes; a node
//! that cannot answer leaves it unknown, and the asker asks again later.
//!
//! Who is asked: every peer except a lost one (replaced by a promotion and counted down; what
//! it decided is on other nodes, and it decides nothing while lost). A peer that is only down
//! is asked too, and the answer waits for it: its copy may be the one decided copy (the node
//! machine's rule; the daemon asked only the live peers until session 14, and could answer
//! "aborted" for a commit whose one decided copy was on a node that was restarting).
//!
//! A kept outcome is forgotten once the same nodes all said nothing of theirs waits for it
//! (`Pending`): a follower record or a copy prepared for the commit. A node that is only down
//! keeps it (its record will ask when it is back). Until session 14 the machine also waited
//! for lost nodes, which never answer (the outcome stayed for good), and the daemon asked only
//! live nodes, after waiting for the commit's participants that were down.
//!
//! Must survive: a peer that never answers (unknown, never aborted), a commit asked about
//! twice (one answer), a leader that gives up more commits than it can remember (the oldest
//! go first).

use std::collections::BTreeSet;

use crate::proto::recent::Recent;
use crate::proto::types::NodeId;

/// How many given-up commits a leader remembers (a late phase 2 of one is refused).
pub const GIVEN_UP_KEPT: usize = 65_536;

/// The leader's answer, once it has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Decided,
    /// Given up for good.
    Aborted,
    /// A node asked could not answer: ask again later.
    Unknown,
}

/// The nodes a leader without the outcome asks.
pub fn to_ask(
    peers: impl IntoIterator<Item = NodeId>,
    lost: impl Fn(NodeId) -> bool,
) -> Vec<NodeId> {
    peers.into_iter().filter(|peer| !lost(*peer)).collect()
}

/// The answers to one round of `DecidedCommit`.
#[derive(Debug)]
pub struct Query {
    awaiting: BTreeSet<NodeId>,
}

impl Query {
    pub fn new(asked: &[NodeId]) -> Query {
        Query {
            awaiting: asked.iter().copied().collect(),
        }
    }

    /// The verdict with nobody left to answer: with no node to ask, nobody decided a copy.
    pub fn verdict(&self) -> Option<Verdict> {
        self.awaiting.is_empty().then_some(Verdict::Aborted)
    }

    /// Node `from` answered whether it decided a copy (`None`: no answer, or not one of
    /// these). The verdict once there is one.
    pub fn answered(&mut self, from: NodeId, decided: Option<bool>) -> Option<Verdict> {
        match decided {
            Some(true) => Some(Verdict::Decided),
            Some(false) => {
                self.awaiting.remove(&from);
                self.verdict()
            }
            None => Some(Verdict::Unknown),
        }
    }
}

/// Commits a leader gave up for good, the newest `GIVEN_UP_KEPT`.
pub type GivenUp = Recent<GIVEN_UP_KEPT>;

#[cfg(test)]
mod tests {
    use super::{to_ask, GivenUp, Query, Verdict, GIVEN_UP_KEPT};

    #[test]
    fn every_peer_but_the_lost_ones_is_asked_down_or_not() {
        // Node 3 is replaced and counted down; node 4 is only down.
        let asked = to_ask([2, 3, 4], |peer| peer == 3);
        assert_eq!(asked, vec![2, 4]);
    }

    #[test]
    fn one_decided_copy_decides_and_every_no_aborts() {
        let mut query = Query::new(&[2, 4]);
        assert_eq!(query.verdict(), None);
        assert_eq!(query.answered(2, Some(false)), None);
        assert_eq!(query.answered(4, Some(true)), Some(Verdict::Decided));

        let mut query = Query::new(&[2, 4]);
        assert_eq!(query.answered(4, Some(false)), None);
        // The same node twice counts once.
        assert_eq!(query.answered(4, Some(false)), None);
        assert_eq!(query.answered(2, Some(false)), Some(Verdict::Aborted));
    }

    #[test]
    fn a_node_without_an_answer_leaves_it_unknown_never_aborted() {
        let mut query = Query::new(&[2, 4]);
        assert_eq!(query.answered(2, Some(false)), None);
        assert_eq!(query.answered(4, None), Some(Verdict::Unknown));
        // Nobody to ask: nobody decided a copy.
        assert_eq!(Query::new(&[]).verdict(), Some(Verdict::Aborted));
    }

    #[test]
    fn the_oldest_given_up_commits_are_forgotten_first() {
        let mut given_up = GivenUp::default();
        given_up.insert((9, 0));
        for seq in 1..=GIVEN_UP_KEPT as u64 {
            given_up.insert((1, seq));
        }
        // (9, 0) sorts last but was given up first.
        assert!(!given_up.contains((9, 0)));
        assert!(given_up.contains((1, 1)));
    }
}
