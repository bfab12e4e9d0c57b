//! One node's kernel page cache, as the simulated programs see it: a page a read brought is
//! served again without the machine until the machine invalidates it or the node goes down;
//! a page the program writes leaves it. An invalidation that meets a read of the page still
//! in flight drops what that read brings too (the kernel holds the page locked while it
//! reads, and the invalidation waits for it).

use std::collections::BTreeMap;

use hotpot_core::proto::node::OpId;
use hotpot_core::proto::types::DatasetId;

type PageAt = (DatasetId, u64);

/// A cached page: version, bytes, and whether it was taken while its owner was silent.
pub(crate) type Cached = (u64, Vec<u8>, bool);

#[derive(Default)]
pub(crate) struct KernelCache {
    pages: BTreeMap<PageAt, Cached>,
    /// Reads the machine is serving: their page, and whether it was invalidated meanwhile.
    reading: BTreeMap<OpId, (PageAt, bool)>,
}

impl KernelCache {
    pub(crate) fn cached(&self, page: PageAt) -> Option<&Cached> {
        self.pages.get(&page)
    }

    pub(crate) fn start_read(&mut self, op: OpId, page: PageAt) {
        self.reading.insert(op, (page, false));
    }

    /// A read's answer: cached unless its page was invalidated while it was in flight.
    pub(crate) fn read_done(&mut self, op: OpId, page: PageAt, cached: Cached) {
        let invalidated = self.reading.remove(&op).is_some_and(|(_, dropped)| dropped);
        if !invalidated {
            self.pages.insert(page, cached);
        }
    }

    pub(crate) fn written(&mut self, page: PageAt) {
        self.pages.remove(&page);
    }

    pub(crate) fn invalidate(&mut self, dataset: DatasetId, pages: &[u64]) {
        for page in pages {
            self.pages.remove(&(dataset, *page));
        }
        for (at, dropped) in self.reading.values_mut() {
            if at.0 == dataset && pages.contains(&at.1) {
                *dropped = true;
            }
        }
    }

    /// The node went down: its kernel's cache with it.
    pub(crate) fn clear(&mut self) {
        self.pages.clear();
        self.reading.clear();
    }
}
