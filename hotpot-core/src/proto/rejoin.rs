//! Who learns of whom at a start, shared by the daemon (`tools/src/node/recovery.rs`) and the
//! node machine (`proto/node/target.rs`). An owner's list of who holds its pages is volatile:
//! at every start it asks its peers again (`FetchCopies`/`PageCopies`), and a peer it did not
//! hear from must tell it itself. Found by hotpot-sim (design.md, "What the simulator found",
//! item 30): a holder that was alive but cut off from a restarting owner does not restart,
//! so it never told it, and the owner's commits left it out for good.

use std::collections::BTreeMap;

use super::types::NodeId;

/// Whom a starting owner asks for their copies of its pages, and for how long.
#[derive(Clone, Copy, Debug)]
pub struct AskRule {
    /// A peer may hold a newer copy than this owner's: after a wipe (a rebuild) or a
    /// take-over of a lost node's chunks (or a start that finishes one).
    patient: bool,
}

impl AskRule {
    /// `rebuilding`: this node's PM was lost and its rebuild is not over; `takes_over`: it
    /// owns a lost node's chunks.
    pub fn new(rebuilding: bool, takes_over: bool) -> AskRule {
        AskRule {
            patient: rebuilding || takes_over,
        }
    }

    /// Whether `peer` is asked (or asked again after it did not answer). A lost node (down
    /// and replaced) has nothing to tell: its copies are on others. When a peer may hold a
    /// newer copy, every other peer is asked until it answers, since a silent one may hold
    /// the only other copy of an acknowledged commit. Otherwise this owner's copies are the
    /// newest: the peers the dispatcher counts live are waited for until they answer or are
    /// counted down, and the others tell this owner their copies when they see its
    /// incarnation rise (`Incarnations`).
    pub fn asks(&self, live: bool, lost: bool) -> bool {
        !lost && (self.patient || live)
    }
}

/// The other nodes' incarnations (how many times each joined the dispatcher) as this node
/// last saw them in the dispatcher's view.
#[derive(Debug, Default)]
pub struct Incarnations {
    seen: BTreeMap<NodeId, u64>,
    /// Whether this node has had a view since its start (its own rejoin registers its
    /// copies with every owner, so nothing in the first view is news).
    baseline: bool,
}

impl Incarnations {
    /// `node`'s incarnation in the last view (`None`: not in a view yet).
    pub fn of(&self, node: NodeId) -> Option<u64> {
        self.seen.get(&node).copied()
    }

    /// Take the dispatcher's latest view; the nodes other than `me` that restarted since
    /// the last one (their rejoin may not have heard from this node, which then registers
    /// its copies of their pages again). After the first view, that is a node whose
    /// incarnation rose, or one seen for the first time past its first start: this node may
    /// have been cut off from the dispatcher since before that node first joined (found by
    /// hotpot-sim, seed 22163933: a holder whose heartbeats were cut from its first second on
    /// first saw an owner at its second incarnation, and never registered with it).
    pub fn restarted(
        &mut self,
        me: NodeId,
        latest: impl IntoIterator<Item = (NodeId, u64)>,
    ) -> Vec<NodeId> {
        let mut restarted = Vec::new();
        for (node, incarnation) in latest {
            let before = self.seen.insert(node, incarnation);
            let rose = match before {
                Some(before) => before < incarnation,
                None => incarnation > 1,
            };
            if self.baseline && node != me && rose {
                restarted.push(node);
            }
        }
        self.baseline = true;
        restarted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ordinary_start_asks_the_live_peers_and_a_rebuild_every_peer_not_lost() {
        let ordinary = AskRule::new(false, false);
        assert!(ordinary.asks(true, false));
        assert!(!ordinary.asks(false, false));
        for patient in [AskRule::new(true, false), AskRule::new(false, true)] {
            assert!(patient.asks(true, false));
            assert!(patient.asks(false, false));
            assert!(!patient.asks(false, true));
        }
    }

    #[test]
    fn only_a_rise_seen_after_a_first_view_is_a_restart() {
        let mut seen = Incarnations::default();
        assert_eq!(seen.restarted(1, [(1, 1), (2, 3)]), Vec::<NodeId>::new());
        assert_eq!(seen.restarted(1, [(1, 1), (2, 3)]), Vec::<NodeId>::new());
        // Its own rise is not news to a node, and a node at its first start owns nothing
        // anybody holds.
        assert_eq!(seen.restarted(1, [(1, 2), (2, 4), (3, 1)]), vec![2]);
        assert_eq!(seen.restarted(1, [(2, 4), (3, 2)]), vec![3]);
        // First seen after its first start: it may have restarted unseen.
        assert_eq!(seen.restarted(1, [(2, 4), (3, 2), (4, 2)]), vec![4]);
    }
}
