//! What an owner knows of the other nodes' copies of its pages, one for the daemon and the
//! node machine (volatile: a restarted owner learns it again at its rejoin).
//!
//! Three sets per page. **Holders** may hold a copy: every commit of the page reaches them,
//! so no node keeps a stale copy; the set is a superset (a holder that lost its copy costs a
//! message, a missing holder would keep a stale one), and it only grows while the owner runs.
//! **Current** holders are known to hold the owner's version: re-replication counts only
//! these, since a fetch's answer may be lost and a target that missed a Decide holds only a
//! prepared copy. **Behind** holders were left out of a commit (not live) or hold an older
//! copy: re-replication sends them the page once they are live.
//!
//! Must survive: a registration older than a commit that reached the node since (it
//! forgets nothing about holders), an answer or Install that never arrived (counted only
//! once acknowledged), an owner that took a newer copy than the ones it counted (a rebuild).

use std::collections::{BTreeMap, BTreeSet};

use crate::pm::PageKey;
use crate::proto::types::{DatasetId, NodeId};

#[derive(Default, Debug)]
pub struct CopyBook {
    holders: BTreeMap<PageKey, BTreeSet<NodeId>>,
    current: BTreeMap<PageKey, BTreeSet<NodeId>>,
    behind: BTreeMap<PageKey, BTreeSet<NodeId>>,
}

/// Who a decided commit reached, as its owner saw it.
pub struct Reached<'a> {
    /// Nodes that got the new bytes (the targets, a prepared committer among them).
    pub counted: &'a [NodeId],
    /// Holders left out because they were not live.
    pub skipped: &'a BTreeSet<NodeId>,
    /// Nodes that hold the decided bytes: targets that acknowledged the Decide, and a
    /// committer that persisted its own copy.
    pub decided: &'a BTreeSet<NodeId>,
}

impl CopyBook {
    /// Every node that may hold a copy of one of `keys`.
    pub fn holders_of(&self, keys: &[PageKey]) -> BTreeSet<NodeId> {
        keys.iter()
            .flat_map(|key| self.holders.get(key).into_iter().flatten().copied())
            .collect()
    }

    /// The nodes known to hold this owner's version of `key`.
    pub fn current_of(&self, key: PageKey) -> BTreeSet<NodeId> {
        self.current.get(&key).cloned().unwrap_or_default()
    }

    /// The live holders of `key` whose copy is older than this owner's.
    pub fn behind_of(&self, key: PageKey, live: &BTreeSet<NodeId>) -> Vec<NodeId> {
        self.behind
            .get(&key)
            .map(|behind| behind.intersection(live).copied().collect())
            .unwrap_or_default()
    }

    /// `node` is about to get a copy of `key` (a fetch's answer, an Install sent): a holder,
    /// not counted until it says it stored the copy.
    pub fn sending(&mut self, key: PageKey, node: NodeId) {
        self.holders.entry(key).or_default().insert(node);
    }

    /// `node` holds this owner's version of `key` (it acknowledged an Install, or said so).
    pub fn has_current(&mut self, key: PageKey, node: NodeId) {
        self.sending(key, node);
        self.current.entry(key).or_default().insert(node);
        self.caught_up(key, node);
    }

    /// `node` holds an older copy of `key` than this owner (or missed sending it one).
    pub fn is_behind(&mut self, key: PageKey, node: NodeId) {
        self.sending(key, node);
        if let Some(current) = self.current.get_mut(&key) {
            current.remove(&node);
        }
        self.behind.entry(key).or_default().insert(node);
    }

    /// `node` says it holds `key` at `version` while this owner is at `mine`.
    pub fn learned(&mut self, key: PageKey, node: NodeId, version: u64, mine: u64) {
        match version.cmp(&mine) {
            std::cmp::Ordering::Equal => self.has_current(key, node),
            std::cmp::Ordering::Less => self.is_behind(key, node),
            // Newer than this owner's: it takes that copy (a rebuild) and learns again.
            std::cmp::Ordering::Greater => self.sending(key, node),
        }
    }

    /// `node` restarted and is about to list its copies of `dataset`: none counts as current
    /// until listed again (it may have lost some). It stays a holder of everything.
    pub fn rejoined(&mut self, dataset: DatasetId, node: NodeId) {
        for (key, current) in self.current.iter_mut() {
            if key.0 == dataset {
                current.remove(&node);
            }
        }
    }

    /// This owner took a newer copy of `key` than it had (a rebuild): every copy it counted
    /// is behind it now.
    pub fn outdated(&mut self, key: PageKey) {
        if let Some(current) = self.current.remove(&key) {
            self.behind.entry(key).or_default().extend(current);
        }
    }

    /// A commit of `keys` was decided here and reached these nodes.
    pub fn committed(&mut self, keys: &[PageKey], reached: Reached<'_>) {
        for key in keys {
            self.holders
                .entry(*key)
                .or_default()
                .extend(reached.counted.iter().copied());
            let current = self.current.entry(*key).or_default();
            current.clear();
            current.extend(reached.decided.iter().copied());
            let behind = self.behind.entry(*key).or_default();
            behind.extend(reached.skipped.iter().copied());
            behind.retain(|node| !reached.decided.contains(node));
            if behind.is_empty() {
                self.behind.remove(key);
            }
        }
    }

    fn caught_up(&mut self, key: PageKey, node: NodeId) {
        if let Some(behind) = self.behind.get_mut(&key) {
            behind.remove(&node);
            if behind.is_empty() {
                self.behind.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{CopyBook, Reached};

    const KEY: (u64, u64) = (7, 3);

    fn set(nodes: &[u32]) -> BTreeSet<u32> {
        nodes.iter().copied().collect()
    }

    #[test]
    fn a_fetch_makes_a_holder_that_counts_only_once_it_says_it_stored_the_copy() {
        let mut book = CopyBook::default();
        book.sending(KEY, 2);
        assert_eq!(book.holders_of(&[KEY]), set(&[2]));
        assert!(book.current_of(KEY).is_empty());
        book.learned(KEY, 2, 4, 4);
        assert_eq!(book.current_of(KEY), set(&[2]));
    }

    #[test]
    fn a_commit_counts_only_the_nodes_that_decided_and_leaves_the_skipped_behind() {
        let mut book = CopyBook::default();
        book.has_current(KEY, 4);
        // Targets 2 and 3; 3 missed the Decide; holder 5 was not live.
        book.sending(KEY, 5);
        book.committed(
            &[KEY],
            Reached {
                counted: &[2, 3],
                skipped: &set(&[5]),
                decided: &set(&[2]),
            },
        );
        assert_eq!(book.holders_of(&[KEY]), set(&[2, 3, 4, 5]));
        // 4 held the version this commit replaced: not current any more.
        assert_eq!(book.current_of(KEY), set(&[2]));
        assert_eq!(book.behind_of(KEY, &set(&[1, 2, 3, 4, 5])), vec![5]);
        // Only live holders are sent the page.
        assert!(book.behind_of(KEY, &set(&[1, 2])).is_empty());
        book.has_current(KEY, 5);
        assert!(book.behind_of(KEY, &set(&[5])).is_empty());
    }

    #[test]
    fn a_rejoin_forgets_what_was_current_but_never_a_holder() {
        let mut book = CopyBook::default();
        book.has_current(KEY, 2);
        book.has_current((8, 0), 2);
        book.rejoined(7, 2);
        assert!(book.current_of(KEY).is_empty());
        assert_eq!(book.current_of((8, 0)), set(&[2]));
        assert_eq!(book.holders_of(&[KEY]), set(&[2]));
        book.learned(KEY, 2, 3, 5);
        assert_eq!(book.behind_of(KEY, &set(&[2])), vec![2]);
    }

    #[test]
    fn an_owner_that_took_a_newer_copy_counts_its_old_copies_behind() {
        let mut book = CopyBook::default();
        book.has_current(KEY, 2);
        book.has_current(KEY, 3);
        book.outdated(KEY);
        assert!(book.current_of(KEY).is_empty());
        assert_eq!(book.behind_of(KEY, &set(&[2, 3])), vec![2, 3]);
        book.is_behind(KEY, 4);
        assert_eq!(book.behind_of(KEY, &set(&[2, 3, 4])), vec![2, 3, 4]);
    }
}
