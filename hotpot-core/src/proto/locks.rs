//! An owner's page locks (volatile): which commit holds each page it owns, and which of
//! those commits it has applied. The daemon (`tools/src/node/protocol.rs`) and the node
//! machine (`proto/node`) both keep their locks here.
//!
//! A commit takes its pages' locks at the owner before it prepares (an MRMW commit across
//! owners at its phase 1) and releases them once it is decided or given up; a follower record
//! found waiting at a restart takes them again. Another commit of a locked page is refused as
//! busy or waits; a fetch or a registration of it waits until the commit is applied here, so
//! it reads the decided copy, and no longer (a reader whose kernel blocks the commit's cache
//! invalidation on that very fetch would otherwise stall the commit).

use std::collections::{BTreeMap, BTreeSet};

use crate::page::TxKey;
use crate::pm::PageKey;
use crate::proto::types::DatasetId;

#[derive(Debug, Default)]
pub struct PageLocks {
    held: BTreeMap<PageKey, TxKey>,
    /// Locked pages whose commit is applied here.
    applied: BTreeSet<PageKey>,
}

impl PageLocks {
    /// The first of `keys` held by a commit other than `tx`, and that commit.
    pub fn held_by_other(&self, tx: TxKey, keys: &[PageKey]) -> Option<(PageKey, TxKey)> {
        keys.iter().find_map(|key| {
            self.held
                .get(key)
                .filter(|holder| **holder != tx)
                .map(|holder| (*key, *holder))
        })
    }

    /// `keys` are `tx`'s from now on (the caller checked `held_by_other`).
    pub fn take(&mut self, tx: TxKey, keys: &[PageKey]) {
        for key in keys {
            self.held.insert(*key, tx);
        }
    }

    /// Release the keys `tx` holds (a key another commit holds stays that commit's).
    pub fn release(&mut self, tx: TxKey, keys: &[PageKey]) {
        for key in keys {
            if self.held.get(key) == Some(&tx) {
                self.held.remove(key);
                self.applied.remove(key);
            }
        }
    }

    /// The commits holding `keys` are applied here: fetches read through their locks until
    /// they are released. Keys not locked are left out (a mark left behind would let fetches
    /// read through a later commit's lock).
    pub fn applied(&mut self, keys: &[PageKey]) {
        for key in keys {
            if self.held.contains_key(key) {
                self.applied.insert(*key);
            }
        }
    }

    /// The first of `keys` held by a commit not applied here: what a fetch or registration
    /// of it would read may change.
    pub fn unsettled(&self, keys: &[PageKey]) -> Option<PageKey> {
        keys.iter()
            .copied()
            .find(|key| self.held.contains_key(key) && !self.applied.contains(key))
    }

    /// Whether any commit holds any of `keys`.
    pub fn holds_any(&self, keys: &[PageKey]) -> bool {
        keys.iter().any(|key| self.held.contains_key(key))
    }

    /// The locked pages of `dataset`.
    pub fn of_dataset(&self, dataset: DatasetId) -> Vec<PageKey> {
        self.held
            .range((dataset, 0)..=(dataset, u64::MAX))
            .map(|(key, _)| *key)
            .collect()
    }

    /// How many pages are locked.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(seq: u64) -> TxKey {
        (1, seq)
    }

    #[test]
    fn a_page_held_by_one_commit_is_refused_to_another_and_kept_by_its_own() {
        let mut locks = PageLocks::default();
        locks.take(tx(1), &[(1, 0), (1, 1)]);
        assert_eq!(locks.held_by_other(tx(1), &[(1, 1)]), None);
        assert_eq!(
            locks.held_by_other(tx(2), &[(1, 2), (1, 1)]),
            Some(((1, 1), tx(1)))
        );
        // Another commit's release leaves the lock alone.
        locks.release(tx(2), &[(1, 0)]);
        assert!(locks.holds_any(&[(1, 0)]));
        locks.release(tx(1), &[(1, 0), (1, 1)]);
        assert!(locks.is_empty());
    }

    #[test]
    fn an_applied_mark_lasts_until_the_release_and_never_outlives_the_lock() {
        let mut locks = PageLocks::default();
        locks.take(tx(1), &[(1, 0)]);
        assert_eq!(locks.unsettled(&[(1, 0)]), Some((1, 0)));
        // Page 1 is not locked: no mark is left for a later commit's lock.
        locks.applied(&[(1, 0), (1, 1)]);
        assert_eq!(locks.unsettled(&[(1, 0)]), None);
        locks.release(tx(1), &[(1, 0)]);
        locks.take(tx(2), &[(1, 0), (1, 1)]);
        assert_eq!(locks.unsettled(&[(1, 0)]), Some((1, 0)));
        assert_eq!(locks.unsettled(&[(1, 1)]), Some((1, 1)));
    }

    #[test]
    fn the_locked_pages_of_one_dataset() {
        let mut locks = PageLocks::default();
        locks.take(tx(1), &[(1, 3), (2, 0), (2, u64::MAX), (3, 0)]);
        assert_eq!(locks.of_dataset(2), vec![(2, 0), (2, u64::MAX)]);
        assert_eq!(locks.len(), 4);
    }
}
