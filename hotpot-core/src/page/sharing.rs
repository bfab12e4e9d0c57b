//! Identical-page merging inside one node's PM (docs/design.md, "Identical-page merging"):
//! a scanner hashes committed frames and points the slot of a page whose bytes equal an
//! earlier page's at that page's frame, by one redo commit. Must survive: a crash at any
//! point (the commit is all or nothing; recovery counts one reference per slot), a candidate
//! that changed or went away since it was hashed (the bytes are compared against the frame
//! its slot names now), and writes to a shared page (staged into a new frame, as always).

use std::collections::HashMap;

use crate::page::PageTable;
use crate::pm::{PageKey, PmError, SlotChange};

/// Frames named by more than one slot on this node, and the frames that saves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sharing {
    pub frames_shared: u64,
    pub frames_saved: u64,
}

/// The merger's position and index. Pages are visited in rounds over a sorted snapshot of
/// the keys; the index maps a content hash to the first page seen with it.
#[derive(Default)]
pub struct Merger {
    round: Vec<PageKey>,
    cursor: usize,
    index: HashMap<u64, PageKey>,
    pub pages_scanned: u64,
    pub pages_merged: u64,
}

impl Merger {
    /// Whether the last step ended a round over every page.
    pub fn round_done(&self) -> bool {
        self.cursor >= self.round.len()
    }

    /// Visit at most `pages_max` pages; returns how many were visited.
    pub fn step(&mut self, table: &mut PageTable, pages_max: usize) -> Result<usize, PmError> {
        if self.cursor >= self.round.len() {
            self.round = table.pool.page_keys();
            self.round.sort_unstable();
            self.cursor = 0;
            self.index.clear();
        }
        let end = (self.cursor + pages_max).min(self.round.len());
        let visited = end - self.cursor;
        for at in self.cursor..end {
            let key = self.round[at];
            let Some(found) = table.pool.page(key) else {
                continue;
            };
            let hash = xxhash_rust::xxh3::xxh3_64(table.pool.frame(found.record.frame));
            match self.index.get(&hash) {
                Some(first) if *first != key => {
                    if table.merge_identical(key, *first)? {
                        self.pages_merged += 1;
                    }
                }
                Some(_) => {}
                None => {
                    self.index.insert(hash, key);
                }
            }
        }
        self.cursor = end;
        self.pages_scanned += visited as u64;
        Ok(visited)
    }
}

impl PageTable {
    /// If `page`'s committed bytes equal `other`'s, make `page`'s slot name `other`'s frame
    /// (same page version and state): its own frame loses a reference. Returns whether it
    /// did. Never writes a frame.
    pub fn merge_identical(&mut self, page: PageKey, other: PageKey) -> Result<bool, PmError> {
        let (Some(mine), Some(theirs)) = (self.pool.page(page), self.pool.page(other)) else {
            return Ok(false);
        };
        let (mine, theirs) = (mine.record, theirs.record);
        if mine.frame == theirs.frame
            || self.pool.frame(mine.frame) != self.pool.frame(theirs.frame)
        {
            return Ok(false);
        }
        self.pool.ref_frame(theirs.frame);
        let change = SlotChange::Put {
            page,
            version: mine.version,
            frame: theirs.frame,
            state: mine.state,
        };
        if let Err(error) = self.pool.commit(&[change], Default::default()) {
            self.pool.unref_frame(theirs.frame);
            return Err(error);
        }
        assert_eq!(
            self.pool.page(page).map(|found| found.record.frame),
            Some(theirs.frame)
        );
        // The base of the kernel's copy and a Dirty page's twin hold the old frame too: the
        // same bytes, so they move to the shared frame and the old one can go.
        let mut bases = Vec::new();
        if let Some(served) = self.served.get_mut(&page) {
            bases.push(&mut served.twin.frame);
        }
        if let Some(dirty) = self.dirty.get_mut(&page) {
            bases.push(&mut dirty.twin.frame);
        }
        let moved = bases
            .into_iter()
            .filter(|frame| **frame == Some(mine.frame))
            .map(|frame| *frame = Some(theirs.frame))
            .count();
        for _ in 0..moved {
            self.pool.ref_frame(theirs.frame);
            self.pool.unref_frame(mine.frame);
        }
        Ok(true)
    }

    pub fn sharing(&self) -> Sharing {
        let mut slots_per_frame: HashMap<u32, u64> = HashMap::new();
        for key in self.pool.page_keys() {
            if let Some(found) = self.pool.page(key) {
                *slots_per_frame.entry(found.record.frame).or_default() += 1;
            }
        }
        let shared = slots_per_frame.values().filter(|slots| **slots > 1);
        Sharing {
            frames_shared: shared.clone().count() as u64,
            frames_saved: shared.map(|slots| slots - 1).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::OwnedPage;
    use crate::pm::crash_tests::RegionRef;
    use crate::pm::layout::TxTag;
    use crate::pm::{SimRegion, PAGE_BYTES};

    fn commit(table: &mut PageTable, dataset: u64, page: u64, fill: u8) {
        let base = table.version_of((dataset, page));
        let bytes = vec![fill; PAGE_BYTES];
        table
            .apply_owned(
                dataset,
                &[OwnedPage {
                    page,
                    base_version: base,
                    bytes: &bytes,
                }],
                TxTag::default(),
            )
            .unwrap();
    }

    fn read(table: &PageTable, key: PageKey) -> Vec<u8> {
        table.read_persisted(key).unwrap().1
    }

    #[test]
    fn identical_pages_share_a_frame_survive_a_crash_and_split_on_write() {
        let region: &'static SimRegion =
            Box::leak(Box::new(SimRegion::from_image(vec![0u8; 2 << 20])));
        let mut table = PageTable::open(Box::new(RegionRef(region)), 1, 7)
            .unwrap()
            .0;
        for dataset in 1..=4 {
            commit(&mut table, dataset, 0, 0xAB);
            commit(&mut table, dataset, 1, dataset as u8);
        }
        // The kernel holds dataset 4's page 0: its base must not keep the old frame alive.
        table.serve_committed((4, 0));
        let used = table.pool().usage().frames_used;
        let mut merger = Merger::default();
        while merger.pages_scanned < 8 {
            merger.step(&mut table, 3).unwrap();
        }
        assert_eq!(merger.pages_merged, 3);
        assert_eq!(table.pool().usage().frames_used, used - 3);
        assert_eq!(
            table.sharing(),
            Sharing {
                frames_shared: 1,
                frames_saved: 3
            }
        );
        // A crash now: every slot is recovered, the shared frame counted once per slot.
        let image = region.crash_image();
        let mut table = PageTable::open(Box::new(SimRegion::from_image(image)), 1, 7)
            .unwrap()
            .0;
        assert_eq!(table.pool().usage().frames_used, used - 3);
        for dataset in 1..=4 {
            assert_eq!(read(&table, (dataset, 0)), vec![0xAB; PAGE_BYTES]);
            assert_eq!(read(&table, (dataset, 1)), vec![dataset as u8; PAGE_BYTES]);
        }
        // Writing one of the shared pages changes only that dataset.
        commit(&mut table, 2, 0, 0xCD);
        assert_eq!(read(&table, (2, 0)), vec![0xCD; PAGE_BYTES]);
        for dataset in [1, 3, 4] {
            assert_eq!(read(&table, (dataset, 0)), vec![0xAB; PAGE_BYTES]);
        }
        assert_eq!(table.sharing().frames_saved, 2);
    }
}
