//! One node's kernel page cache, as the simulated programs see it: a page a read brought is
//! served again without the machine until the machine invalidates it or the node goes down;
//! a program's stores into pages it holds are written back whole (`Op::WriteBack`, as through
//! a mapping), and a page the program writes leaves it. An invalidation that meets a read of
//! the page still in flight drops what that read brings too (the kernel holds the page locked
//! while it reads, and the invalidation waits for it). A `Write`'s pages are locked until it
//! ends: its stores may wait for pages fetched first (the kernel reads a page before a
//! partial write, holding it locked), and another thread's read would wait for them. (Until
//! the stores are staged would do; the world does not see when that is, so: until it ends.)

use std::collections::BTreeMap;

use hotpot_core::proto::node::{Op, OpId};
use hotpot_core::proto::types::DatasetId;

type PageAt = (DatasetId, u64);

/// A cached page: version, bytes, and whether it was taken while its owner was silent.
pub(crate) type Cached = (u64, Vec<u8>, bool);

/// A read the machine is serving: its page, whether the page was invalidated or written
/// meanwhile (what it brings is not kept), and the reads of the same page waiting for it
/// (another thread's fault of a page being read waits for that read).
pub(crate) struct Reading {
    pub(crate) page: PageAt,
    pub(crate) dropped: bool,
    pub(crate) waiting: Vec<OpId>,
}

#[derive(Default)]
pub(crate) struct KernelCache {
    pages: BTreeMap<PageAt, Cached>,
    /// Reads the machine is serving.
    reading: BTreeMap<OpId, Reading>,
    /// The `Write`s running (a program's committing thread's, and its storing thread's
    /// write(2)), and their pages.
    writing: BTreeMap<OpId, (DatasetId, Vec<u64>)>,
}

impl KernelCache {
    pub(crate) fn cached(&self, page: PageAt) -> Option<&Cached> {
        self.pages.get(&page)
    }

    pub(crate) fn start_read(&mut self, op: OpId, page: PageAt) {
        let reading = Reading {
            page,
            dropped: false,
            waiting: Vec::new(),
        };
        self.reading.insert(op, reading);
    }

    /// The read of `page` the machine is serving, if any.
    pub(crate) fn read_in_flight(&self, page: PageAt) -> Option<OpId> {
        self.reading
            .iter()
            .find(|(_, reading)| reading.page == page)
            .map(|(op, _)| *op)
    }

    /// Read `op` waits for read `reader` of the same page.
    pub(crate) fn wait_for(&mut self, reader: OpId, op: OpId) {
        if let Some(reading) = self.reading.get_mut(&reader) {
            reading.waiting.push(op);
        }
    }

    /// Op `op` ended: if it was a read the machine served, that read, its page forgotten.
    pub(crate) fn take_read(&mut self, op: OpId) -> Option<Reading> {
        self.reading.remove(&op)
    }

    /// A read's answer, kept unless its page was invalidated or written while in flight.
    pub(crate) fn keep(&mut self, reading: &Reading, cached: Cached) {
        if !reading.dropped {
            self.pages.insert(reading.page, cached);
        }
    }

    /// A `Write` whose every page is cached becomes the kernel's write-back of those
    /// pages with the stores in them (a program's stores into its mapping); any other op
    /// is as it was.
    pub(crate) fn through_mapping(&self, op: Op) -> Op {
        let Op::Write {
            op,
            dataset,
            stores,
            msync: true,
        } = op
        else {
            return op;
        };
        let mut pages: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for (page, _, _) in &stores {
            match self.pages.get(&(dataset, *page)) {
                Some((_, bytes, _)) => {
                    pages.entry(*page).or_insert_with(|| bytes.clone());
                }
                None => {
                    return Op::Write {
                        op,
                        dataset,
                        stores,
                        msync: true,
                    }
                }
            }
        }
        for (page, offset, bytes) in &stores {
            let at = usize::from(*offset);
            let copy = pages.get_mut(page).expect("every page is cached");
            copy[at..at + bytes.len()].copy_from_slice(bytes);
        }
        Op::WriteBack {
            op,
            dataset,
            pages: pages.into_iter().collect(),
            msync: true,
        }
    }

    /// A program wrote `page`: the kernel's copy is the one written (and leaves the cache
    /// here), so a read of it still in flight brings nothing to keep (two threads' faults
    /// of one page are one read in the kernel, which a write waits for).
    pub(crate) fn written(&mut self, page: PageAt) {
        self.pages.remove(&page);
        for reading in self.reading.values_mut() {
            if reading.page == page {
                reading.dropped = true;
            }
        }
    }

    /// A program's write starts: a `Write`'s pages leave the cache and stay locked until it
    /// ends; a write-back's pages are the ones written. Any other op changes nothing.
    pub(crate) fn write_starts(&mut self, op: &Op) {
        match op {
            Op::Write {
                op,
                dataset,
                stores,
                ..
            } => {
                let pages: Vec<u64> = stores.iter().map(|(page, _, _)| *page).collect();
                for page in &pages {
                    self.written((*dataset, *page));
                }
                self.writing.insert(*op, (*dataset, pages));
            }
            Op::WriteBack { dataset, pages, .. } => {
                for (page, _) in pages {
                    self.written((*dataset, *page));
                }
            }
            _ => {}
        }
    }

    /// Op `op` ended: if it was a `Write` running, its pages are free, and what a read
    /// of them brought meanwhile goes (a kernel's read waits for the page a write holds
    /// locked: the other thread's read of it cannot keep bytes without the write's stores).
    pub(crate) fn op_ended(&mut self, op: OpId) {
        if let Some((dataset, pages)) = self.writing.remove(&op) {
            for page in pages {
                self.written((dataset, page));
            }
        }
    }

    /// Whether a `Write` running holds `page` locked.
    pub(crate) fn locked(&self, page: PageAt) -> bool {
        self.writing
            .values()
            .any(|(dataset, pages)| *dataset == page.0 && pages.contains(&page.1))
    }

    pub(crate) fn invalidate(&mut self, dataset: DatasetId, pages: &[u64]) {
        for page in pages {
            self.pages.remove(&(dataset, *page));
        }
        for reading in self.reading.values_mut() {
            if reading.page.0 == dataset && pages.contains(&reading.page.1) {
                reading.dropped = true;
            }
        }
    }

    /// The node went down: its kernel's cache with it.
    pub(crate) fn clear(&mut self) {
        self.pages.clear();
        self.reading.clear();
        self.writing.clear();
    }
}
