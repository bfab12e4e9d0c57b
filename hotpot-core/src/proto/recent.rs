//! The newest `KEPT` commits of some kind a node remembers (volatile), oldest forgotten first:
//! the commits across owners it decided a copy of (`proto/deciders.rs`), the commits a leader
//! gave up for good (`proto/outcome.rs`). Inserting one already kept changes nothing.

use std::collections::{BTreeSet, VecDeque};

use crate::page::TxKey;

#[derive(Default, Debug)]
pub struct Recent<const KEPT: usize> {
    set: BTreeSet<TxKey>,
    order: VecDeque<TxKey>,
}

impl<const KEPT: usize> Recent<KEPT> {
    pub fn insert(&mut self, tx: TxKey) {
        if self.set.insert(tx) {
            self.order.push_back(tx);
            if self.order.len() > KEPT {
                if let Some(oldest) = self.order.pop_front() {
                    self.set.remove(&oldest);
                }
            }
        }
    }

    pub fn contains(&self, tx: TxKey) -> bool {
        self.set.contains(&tx)
    }
}
