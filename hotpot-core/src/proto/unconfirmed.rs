//! A node's copies that their owners have not confirmed, shared by the daemon
//! (`tools/src/node/recovery.rs`) and the node machine (`proto/node/target.rs`). A copy may
//! be behind what its owner counts this node as holding: kept over this node's restart, over
//! its owner's (whose rejoin may not have heard from this node), or left when a copy
//! prepared here was dropped at its decision. Until the owner answers a registration of this
//! node's copies of its pages (`Register` without a commit, which sends back anything newer),
//! reads of those pages go through the owner. Kept per (owner, dataset): a registration
//! covers every page of a dataset its owner owns.

use std::collections::BTreeSet;

use super::types::{DatasetId, NodeId};

#[derive(Debug, Default)]
pub struct Unconfirmed {
    waiting: BTreeSet<(NodeId, DatasetId)>,
}

impl Unconfirmed {
    /// This node's copies of `owner`'s pages of `dataset` wait for it to confirm them.
    pub fn wait_for(&mut self, owner: NodeId, dataset: DatasetId) {
        self.waiting.insert((owner, dataset));
    }

    /// `owner` answered a registration of this node's copies of its pages of `dataset`.
    pub fn confirmed(&mut self, owner: NodeId, dataset: DatasetId) {
        self.waiting.remove(&(owner, dataset));
    }

    /// Whether copies of `owner`'s pages of `dataset` (`owner` as it is now) wait for it.
    pub fn waits(&self, owner: NodeId, dataset: DatasetId) -> bool {
        self.waiting.contains(&(owner, dataset))
    }

    /// Whether any copy of `dataset` waits (the read path's check before it looks up the
    /// page's owner).
    pub fn waits_in(&self, dataset: DatasetId) -> bool {
        self.waiting.iter().any(|(_, of)| *of == dataset)
    }

    /// The (owner, dataset) pairs waiting, in order.
    pub fn pairs(&self) -> Vec<(NodeId, DatasetId)> {
        self.waiting.iter().copied().collect()
    }

    /// The owners some copy here waits for.
    pub fn owners(&self) -> BTreeSet<NodeId> {
        self.waiting.iter().map(|(owner, _)| *owner).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The dispatcher's view changed: a lost owner's waits are its successor's now (`acting`:
    /// a node, or the node promoted in its place). Dropped instead, a copy that may have
    /// missed the lost owner's last commits was read from here before the successor sent
    /// anything newer (design.md, "What the simulator found", item 31). Waits for this node
    /// itself go: it took those pages over, and its take-over learns the newest copies.
    pub fn follow_promotions(&mut self, me: NodeId, acting: impl Fn(NodeId) -> NodeId) {
        self.waiting = std::mem::take(&mut self.waiting)
            .into_iter()
            .map(|(owner, dataset)| (acting(owner), dataset))
            .filter(|(owner, _)| *owner != me)
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_owners_waits_move_to_its_successor_unless_that_is_this_node() {
        let mut book = Unconfirmed::default();
        book.wait_for(2, 1);
        book.wait_for(3, 1);
        book.wait_for(4, 2);
        book.follow_promotions(1, |node| match node {
            2 => 5,
            4 => 1,
            other => other,
        });
        assert_eq!(book.pairs(), vec![(3, 1), (5, 1)]);
        assert!(book.waits(5, 1) && !book.waits(2, 1));
        assert!(book.waits_in(1) && !book.waits_in(2));
        book.confirmed(5, 1);
        book.confirmed(3, 1);
        assert!(book.is_empty());
    }
}
