//! The replication rule, one for the daemon and the node machine: which nodes an owner
//! sends a commit's new copies to, and when it may acknowledge the commit.
//!
//! Targets: every holder of one of the pages (so no node keeps a stale copy), the committer,
//! then further live nodes in id order after the owner until `min(replicas, live)` nodes hold
//! the bytes, the owner included; re-replication tops a page up the same way. Acknowledged
//! only once that many hold the *decided* bytes:
//! a target that missed the Decide holds a prepared copy, which its restart discards and a
//! rebuild after the owner's loss cannot count; acknowledging then could lose the commit
//! (found by hotpot-sim).

use std::collections::BTreeSet;

use super::types::NodeId;

/// Where a commit's copies go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    /// Nodes that get the new bytes besides the owner (a prepared committer among them
    /// counts without a message).
    pub nodes: Vec<NodeId>,
    /// The nodes sent the Prepare (and then the Decide or Abort): `nodes` but a committer
    /// that persisted its own copy.
    pub asked: Vec<NodeId>,
    /// Holders left out because they are not live: behind once the commit is decided.
    pub skipped: BTreeSet<NodeId>,
    /// The copies the dataset needs, the owner's included: `min(replicas, live)`, at least 1.
    pub wanted: usize,
}

/// The targets of a commit at `owner` of pages with `holders`, from `committer`. `live`: the
/// nodes that count as up (the owner among them); holders not live are left out. The
/// committer never is, live or not (it is up: it sent the commit): the program that
/// committed must read its own bytes back, and its next writes are diffed against them
/// (a committer left with its old copy lost the bytes it wrote back to their old value:
/// found by hotpot-sim). A committer not live does not count towards `wanted`. Fewer than
/// `wanted - 1` live nodes means too few live nodes for the dataset. `committer_prepared`:
/// the committer persisted its own copy already (MRSW) and is sent no Prepare.
pub fn targets(
    owner: NodeId,
    replicas: u8,
    live: &BTreeSet<NodeId>,
    holders: &BTreeSet<NodeId>,
    (committer, committer_prepared): (NodeId, bool),
) -> Targets {
    let mut nodes: BTreeSet<NodeId> = holders
        .iter()
        .copied()
        .chain(std::iter::once(committer))
        .filter(|node| *node != owner && (live.contains(node) || *node == committer))
        .collect();
    nodes.extend(more_copies(owner, replicas, live, &nodes));
    let skipped = holders
        .iter()
        .copied()
        .filter(|node| *node != owner && !nodes.contains(node))
        .collect();
    let asked = nodes
        .iter()
        .copied()
        .filter(|node| !(committer_prepared && *node == committer))
        .collect();
    Targets {
        nodes: nodes.into_iter().collect(),
        asked,
        skipped,
        wanted: wanted(replicas, live),
    }
}

/// The copies a dataset with `replicas` needs while `live` nodes are up, the owner's
/// included: `min(replicas, live)`, at least 1.
pub fn wanted(replicas: u8, live: &BTreeSet<NodeId>) -> usize {
    usize::from(replicas.max(1)).min(live.len().max(1))
}

/// The nodes a page of `owner` must be copied to when the nodes in `have` hold it: live
/// nodes without it, in id order after the owner, until `wanted` live nodes hold it.
pub fn more_copies(
    owner: NodeId,
    replicas: u8,
    live: &BTreeSet<NodeId>,
    have: &BTreeSet<NodeId>,
) -> Vec<NodeId> {
    let held = 1 + have
        .iter()
        .filter(|node| **node != owner && live.contains(node))
        .count();
    let after = live.range(owner.saturating_add(1)..);
    let before = live.range(..owner);
    after
        .chain(before)
        .filter(|node| !have.contains(node))
        .take(wanted(replicas, live).saturating_sub(held))
        .copied()
        .collect()
}

/// `decided`: nodes holding the decided bytes, the owner included (itself, every target
/// that answered the Decide, a committer that persisted its own copy). `None` when the
/// commit may be acknowledged, else why it is in doubt.
pub fn short_of_copies(decided: usize, wanted: usize) -> Option<String> {
    (decided < wanted)
        .then(|| format!("applied, but only {decided} of {wanted} copies confirmed the decision"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{more_copies, short_of_copies, targets, Targets};

    fn live(nodes: &[u32]) -> BTreeSet<u32> {
        nodes.iter().copied().collect()
    }

    #[test]
    fn targets_are_holders_and_the_committer_then_the_next_nodes_after_the_owner() {
        // Nobody holds the page: the next node after the owner, wrapping around.
        assert_eq!(
            targets(3, 2, &live(&[1, 2, 3]), &live(&[]), (3, false)),
            Targets {
                nodes: vec![1],
                asked: vec![1],
                skipped: live(&[]),
                wanted: 2
            }
        );
        let none = live(&[]);
        assert_eq!(
            targets(1, 3, &live(&[1, 2, 3, 4]), &none, (1, false)).nodes,
            vec![2, 3]
        );
        // Holders and the committer always, even beyond the replicas.
        assert_eq!(
            targets(1, 2, &live(&[1, 2, 3, 4]), &live(&[3, 4]), (2, false)).nodes,
            vec![2, 3, 4]
        );
        // Down nodes are neither targets nor counted in the copies wanted: left out...
        assert_eq!(
            targets(1, 3, &live(&[1, 3]), &live(&[2]), (3, false)),
            Targets {
                nodes: vec![3],
                asked: vec![3],
                skipped: live(&[2]),
                wanted: 2
            }
        );
        // ...but a committer counted down gets its commit's bytes all the same.
        assert_eq!(
            targets(1, 3, &live(&[1, 3]), &live(&[2]), (2, false)),
            Targets {
                nodes: vec![2, 3],
                asked: vec![2, 3],
                skipped: live(&[]),
                wanted: 2
            }
        );
        assert_eq!(
            targets(1, 2, &live(&[1]), &none, (1, false)),
            Targets {
                nodes: vec![],
                asked: vec![],
                skipped: live(&[]),
                wanted: 1
            }
        );
        // A committer that persisted its own copy counts but is sent nothing.
        let prepared = targets(1, 2, &live(&[1, 2, 3]), &live(&[3]), (2, true));
        assert_eq!((prepared.nodes, prepared.asked), (vec![2, 3], vec![3]));
    }

    #[test]
    fn a_page_below_its_copies_goes_to_the_next_live_nodes_without_it() {
        let have = |nodes: &[u32]| nodes.iter().copied().collect();
        assert_eq!(
            more_copies(2, 3, &live(&[1, 2, 3, 4]), &have(&[])),
            vec![3, 4]
        );
        assert_eq!(
            more_copies(2, 3, &live(&[1, 2, 3, 4]), &have(&[3])),
            vec![4]
        );
        assert_eq!(
            more_copies(4, 3, &live(&[1, 2, 3, 4]), &have(&[1])),
            vec![2]
        );
        // A copy on a down node does not count; it is not chosen either.
        assert_eq!(more_copies(1, 2, &live(&[1, 3]), &have(&[2])), vec![3]);
        assert!(more_copies(1, 2, &live(&[1, 2, 3]), &have(&[3])).is_empty());
        assert!(more_copies(1, 1, &live(&[1, 2, 3]), &have(&[])).is_empty());
    }

    #[test]
    fn a_commit_is_acknowledged_only_with_every_wanted_copy_decided() {
        assert_eq!(short_of_copies(2, 2), None);
        assert_eq!(short_of_copies(3, 2), None);
        assert_eq!(short_of_copies(1, 1), None);
        assert_eq!(
            short_of_copies(1, 2).as_deref(),
            Some("applied, but only 1 of 2 copies confirmed the decision")
        );
    }
}
