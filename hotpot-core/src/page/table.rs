//! One node's page table: the persisted copies in the pool plus the Dirty overlay of staged
//! writes. Dirty bytes live in PM frames but their metadata is volatile on purpose: writes
//! not yet committed must vanish at a crash, so recovery only sees committed slots.
//! Invariants: a Dirty page always has a twin (the base it was written against); a frame a
//! slot names is never written in place.

use std::collections::{BTreeSet, HashMap};

use crate::pm::layout::TxTag;
use crate::pm::{
    CopyState, PageKey, PmError, Pool, RecoveryReport, Region, SlotChange, PAGE_BYTES,
};
use crate::proto::types::{DatasetId, PageCopy};

/// The base a Dirty page was written against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Twin {
    /// Frame holding the base bytes; `None` when the page did not exist (all zeros).
    pub(super) frame: Option<u32>,
    pub(super) version: u64,
}

/// The base of the kernel's copy of a page, stamped in the order bases were served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Served {
    pub(super) twin: Twin,
    pub(super) stamp: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct DirtyPage {
    pub(super) frame: u32,
    pub(super) twin: Twin,
    /// Bumped by every write: a commit that snapshotted an older generation leaves the page
    /// Dirty (rebased) instead of dropping writes that came after the snapshot.
    pub(super) generation: u64,
}

/// What a node holds of one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    Committed { version: u64 },
    Redundant { version: u64 },
    Dirty { twin_version: u64 },
}

/// Result of a local read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// Bytes copied from this node's staged writes.
    Dirty,
    /// Bytes copied from a persisted copy at this version.
    Persisted { version: u64 },
    /// This node has no copy.
    Absent,
}

pub struct PageTable {
    pub(super) pool: Pool,
    pub(super) dirty: HashMap<PageKey, DirtyPage>,
    pub(super) dirty_by_dataset: HashMap<DatasetId, BTreeSet<u64>>,
    pub(super) next_generation: u64,
    /// Per page, the base of the copy the kernel holds: what this node last served it.
    /// The kernel writes back whole pages, so a write is diffed against this base, never
    /// against a committed copy that moved on since (that diff would revert other writers).
    pub(super) served: HashMap<PageKey, Served>,
    /// The stamp the next base served gets (`served_mark`, `forget_served_before`).
    pub(super) next_served_stamp: u64,
    /// Per Dirty page rebased while the kernel held a copy of it: that copy's bytes (the
    /// Dirty page as it was before the rebase, with every write since). The kernel writes
    /// back whole pages, and the bytes it did not change are its copy's, older than the
    /// rebased ones (other writers' commits): a write changes only the bytes it changes in
    /// this image.
    pub(super) kernel_images: HashMap<PageKey, Vec<u8>>,
    /// Per Dirty page, the byte ranges (start, end) a failed commit sent. Its owner may hold
    /// them (a commit in doubt), so writing them back to the twin's bytes is a change a diff
    /// against the twin would miss: every later commit sends them again, with their current
    /// bytes, until one succeeds.
    pub(super) resend: HashMap<PageKey, Vec<(usize, usize)>>,
    /// Per Dirty page in a commit not settled yet, the byte ranges (start, end) its
    /// snapshot sent. The owner may hold them, and its decision may reach this node before
    /// the answer: a rebase on that copy replays them as this node holds them now, also
    /// where that equals the old twin's (a store put back to the old bytes since), or the
    /// commit's bytes would stand over the program's last ones.
    pub(super) sending: HashMap<PageKey, Vec<(usize, usize)>>,
    /// Copies pushed by owners, durable but not current until the owner decides.
    pub(super) prepared: HashMap<super::copies::TxKey, super::copies::PreparedCopies>,
    /// Published versions this node serves as an owner (versions.rs).
    pub(super) versions: super::versions::Versions,
    /// The node machine's planted bug `Bugs::keep_rebased_bytes` (`finish_commit`).
    pub(crate) planted_keep_rebased_bytes: bool,
    /// This node (whose own commits a follower owner's record may hold).
    pub(super) node: u32,
}

impl PageTable {
    pub fn open(
        region: Box<dyn Region>,
        node: u32,
        cluster_id: u64,
    ) -> Result<(PageTable, RecoveryReport), PmError> {
        let (mut pool, report) = Pool::open(region, node, cluster_id)?;
        let recovered = pool.take_recovered();
        let mut table = PageTable {
            pool,
            dirty: HashMap::new(),
            dirty_by_dataset: HashMap::new(),
            next_generation: 1,
            served: HashMap::new(),
            next_served_stamp: 0,
            kernel_images: HashMap::new(),
            resend: HashMap::new(),
            sending: HashMap::new(),
            prepared: HashMap::new(),
            versions: Default::default(),
            planted_keep_rebased_bytes: false,
            node,
        };
        for record in recovered {
            table.adopt_recovered(record);
        }
        Ok((table, report))
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn state(&self, page: PageKey) -> Option<PageState> {
        if let Some(dirty) = self.dirty.get(&page) {
            return Some(PageState::Dirty {
                twin_version: dirty.twin.version,
            });
        }
        self.pool.page(page).map(|found| match found.record.state {
            CopyState::Committed => PageState::Committed {
                version: found.record.version,
            },
            CopyState::Redundant => PageState::Redundant {
                version: found.record.version,
            },
        })
    }

    /// Whether a write to `page` has something to be based on here: staged writes, the
    /// kernel's copy, or a persisted copy. Without one, a write is based on zeros, which is
    /// right only for a page never written anywhere (a commit sends the bytes that differ
    /// from the base: zeros written over a zero base would not be sent).
    pub fn has_base(&self, page: PageKey) -> bool {
        self.has_kernel_base(page) || self.pool.page(page).is_some()
    }

    /// `has_base` without the persisted copy: staged writes, or the kernel's copy.
    pub fn has_kernel_base(&self, page: PageKey) -> bool {
        self.is_staged(page) || self.served.contains_key(&page)
    }

    /// Whether writes to `page` are staged here.
    pub fn is_staged(&self, page: PageKey) -> bool {
        self.dirty.contains_key(&page)
    }

    /// Whether `page` is staged here with no copy of it stored: nothing this node tells an
    /// owner that restarted names it (`FetchCopies` answers and registrations list copies),
    /// so its owner's later commits may not reach this node. Read at another node, such a
    /// page comes from its owner, the staged bytes rebased on what came (`read_fetched`;
    /// found by hotpot-sim, seed 34180655: a read served the staged bytes on zeros after
    /// the owner's restart, without a commit acknowledged there).
    pub fn staged_without_copy(&self, page: PageKey) -> bool {
        self.is_staged(page) && !self.has_copy(page)
    }

    /// What the kernel gets for a READ: this node's view of `page` (a Dirty page rebased on
    /// the current committed copy first), remembered as the base of the kernel's copy.
    pub fn read_for_kernel(&mut self, page: PageKey, out: &mut [u8]) -> ReadOutcome {
        if self.dirty.contains_key(&page) {
            self.rebase_dirty(page);
            // The kernel gets the Dirty page itself: set_served drops an older image.
            let twin = self.dirty[&page].twin;
            self.set_served(page, Some(twin));
        } else {
            self.serve_committed(page);
        }
        self.read(page, out)
    }

    /// What the kernel gets for a READ of `page` that another node answered (`bytes` at
    /// `version`; this node's own copy may be behind), as (version, bytes): this node's own
    /// copy instead if it is newer (a commit of this node decided here while the answer
    /// travelled; found by hotpot-sim, seed 6835); a page staged here rebased on it, the
    /// staged bytes on top (seed 3642: read on this node's own older copy, it missed an
    /// acknowledged commit); remembered as the kernel's base.
    pub fn read_fetched(
        &mut self,
        page: PageKey,
        version: u64,
        bytes: Vec<u8>,
    ) -> Result<(u64, Vec<u8>), PmError> {
        let (version, bytes) = if self.version_of(page) > version {
            self.read_persisted(page).expect("a copy at that version")
        } else {
            (version, bytes)
        };
        if !self.is_staged(page) {
            self.serve_copy(page, version, &bytes)?;
            return Ok((version, bytes));
        }
        self.rebase_dirty_on(page, version, &bytes)?;
        let mut staged = vec![0u8; PAGE_BYTES];
        self.read_for_kernel(page, &mut staged);
        Ok((self.dirty[&page].twin.version, staged))
    }

    /// The kernel now holds this node's committed copy of `page` (zeros if it has none).
    pub fn serve_committed(&mut self, page: PageKey) {
        let committed = self.pool.page(page).map_or(
            Twin {
                frame: None,
                version: 0,
            },
            |found| Twin {
                frame: Some(found.record.frame),
                version: found.record.version,
            },
        );
        self.set_served(page, Some(committed));
    }

    /// The kernel (or a write) now holds `bytes`, `page` at `version` as its owner sent it.
    /// Usually that is this node's committed copy, installed from those bytes; when the
    /// install was held back (a prepared copy of the page waits here), the base is a frame of
    /// its own: staged on the old copy, or on zeros without one, a diff would send bytes the
    /// program never changed and miss ones it wrote back (found by hotpot-sim).
    pub fn serve_copy(&mut self, page: PageKey, version: u64, bytes: &[u8]) -> Result<(), PmError> {
        assert_eq!(bytes.len(), PAGE_BYTES, "a copy is a whole page");
        let installed = self
            .pool
            .page(page)
            .is_some_and(|found| found.record.version == version);
        if installed {
            self.serve_committed(page);
            return Ok(());
        }
        if version == 0 {
            // Never written: zeros, whatever this node holds.
            let zeros = Twin {
                frame: None,
                version: 0,
            };
            self.set_served(page, Some(zeros));
            return Ok(());
        }
        let frame = self.pool.alloc_frame()?;
        self.pool.frame_mut(frame).copy_from_slice(bytes);
        self.set_served(
            page,
            Some(Twin {
                frame: Some(frame),
                version,
            }),
        );
        // set_served took its own reference.
        self.pool.unref_frame(frame);
        Ok(())
    }

    /// Whether the kernel may hold a copy of `page` (it was served one, not invalidated since).
    pub fn is_served(&self, page: PageKey) -> bool {
        self.served.contains_key(&page)
    }

    /// The kernel's copy of `page` is gone (invalidated): forget its base.
    pub fn forget_served(&mut self, page: PageKey) {
        self.set_served(page, None);
    }

    /// A mark to take before asking the kernel to drop pages (`forget_served_before`).
    pub fn served_mark(&self) -> u64 {
        self.next_served_stamp
    }

    /// The kernel dropped its copy of `page` after `mark` was taken: forget the base it was
    /// served before the mark. A base served since is kept: the kernel read the page again
    /// after dropping it (a program's fault racing the invalidation), so it holds those
    /// bytes, and forgetting their base would diff its next write-back against whatever
    /// copy is committed then, sending other writers' older bytes as changes.
    pub fn forget_served_before(&mut self, page: PageKey, mark: u64) {
        if self
            .served
            .get(&page)
            .is_some_and(|served| served.stamp < mark)
        {
            self.set_served(page, None);
        }
    }

    /// The kernel's copy of `page` changes (read anew, or dropped): an image of the old one
    /// goes with it.
    fn set_served(&mut self, page: PageKey, base: Option<Twin>) {
        self.kernel_images.remove(&page);
        if let Some(Some(frame)) = base.map(|twin| twin.frame) {
            self.pool.ref_frame(frame);
        }
        let old = match base {
            Some(twin) => {
                let stamp = self.next_served_stamp;
                self.next_served_stamp += 1;
                self.served.insert(page, Served { twin, stamp })
            }
            None => self.served.remove(&page),
        };
        if let Some(Some(frame)) = old.map(|served| served.twin.frame) {
            self.pool.unref_frame(frame);
        }
    }

    /// Copy this node's view of `page` into `out` (one page long).
    pub fn read(&self, page: PageKey, out: &mut [u8]) -> ReadOutcome {
        assert_eq!(out.len(), PAGE_BYTES);
        if let Some(dirty) = self.dirty.get(&page) {
            out.copy_from_slice(self.pool.frame(dirty.frame));
            return ReadOutcome::Dirty;
        }
        match self.pool.page(page) {
            Some(found) => {
                out.copy_from_slice(self.pool.frame(found.record.frame));
                ReadOutcome::Persisted {
                    version: found.record.version,
                }
            }
            None => ReadOutcome::Absent,
        }
    }

    /// Stage `data` at `offset` of `page`. The first write to a page copies its base (this
    /// node's persisted copy, or zeros if it has none) into a fresh frame: the twin stays
    /// untouched for diffing and for an abort.
    pub fn stage(&mut self, page: PageKey, offset: usize, data: &[u8]) -> Result<(), PmError> {
        assert!(offset + data.len() <= PAGE_BYTES, "write crosses a page");
        let generation = self.next_generation;
        self.next_generation += 1;
        let dirty = match self.dirty.get_mut(&page) {
            Some(dirty) => {
                dirty.generation = generation;
                *dirty
            }
            None => {
                let frame = self.pool.alloc_frame()?;
                // The base is what the kernel's copy came from, else the committed copy.
                let base = self
                    .served
                    .get(&page)
                    .map(|served| served.twin)
                    .or_else(|| {
                        self.pool.page(page).map(|found| Twin {
                            frame: Some(found.record.frame),
                            version: found.record.version,
                        })
                    });
                let twin = match base {
                    Some(Twin {
                        frame: Some(base_frame),
                        version,
                    }) => {
                        self.pool.ref_frame(base_frame);
                        let bytes = self.pool.frame(base_frame).to_vec();
                        self.pool.frame_mut(frame).copy_from_slice(&bytes);
                        Twin {
                            frame: Some(base_frame),
                            version,
                        }
                    }
                    _ => {
                        self.pool.frame_mut(frame).fill(0);
                        Twin {
                            frame: None,
                            version: 0,
                        }
                    }
                };
                let dirty = DirtyPage {
                    frame,
                    twin,
                    generation,
                };
                self.dirty.insert(page, dirty);
                self.dirty_by_dataset
                    .entry(page.0)
                    .or_default()
                    .insert(page.1);
                dirty
            }
        };
        let frame = self.pool.frame_mut(dirty.frame);
        match self.kernel_images.get_mut(&page) {
            // Only what the kernel changed in its copy: its other bytes are older than the
            // rebased page's.
            Some(image) => {
                let at = offset..offset + data.len();
                for ((kept, new), staged) in
                    image[at.clone()].iter_mut().zip(data).zip(&mut frame[at])
                {
                    if *kept != *new {
                        *kept = *new;
                        *staged = *new;
                    }
                }
            }
            None => frame[offset..offset + data.len()].copy_from_slice(data),
        }
        Ok(())
    }

    /// Pages of `dataset` with staged writes, in order.
    pub fn dirty_pages(&self, dataset: DatasetId) -> Vec<u64> {
        self.dirty_by_dataset
            .get(&dataset)
            .map(|pages| pages.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Drop a page's staged writes; `free_frame` also releases the dirty frame (it was not
    /// handed to a committed slot).
    pub(super) fn forget_dirty(&mut self, page: PageKey, free_frame: bool) {
        let Some(dirty) = self.dirty.remove(&page) else {
            return;
        };
        self.kernel_images.remove(&page);
        self.sending.remove(&page);
        if let Some(twin) = dirty.twin.frame {
            self.pool.unref_frame(twin);
        }
        if free_frame {
            self.pool.unref_frame(dirty.frame);
        }
        if let Some(pages) = self.dirty_by_dataset.get_mut(&page.0) {
            pages.remove(&page.1);
            if pages.is_empty() {
                self.dirty_by_dataset.remove(&page.0);
            }
        }
    }

    /// Drop every staged write of `dataset` (a program gave them up). What a commit in doubt
    /// sent stays kept for resending: the owner may hold it, and the next writes to those
    /// pages are based on this node's older copy.
    pub fn drop_staged(&mut self, dataset: DatasetId) {
        for page in self.dirty_pages(dataset) {
            self.forget_dirty((dataset, page), true);
        }
    }

    /// Cut `dataset` to `size` bytes: pages past the end are dropped, the tail of a
    /// partial last page becomes zeros (persisted copy and staged writes alike), atomically.
    pub fn truncate(&mut self, dataset: DatasetId, size: u64) -> Result<(), PmError> {
        let keep_pages = size.div_ceil(PAGE_BYTES as u64);
        let tail = (size % PAGE_BYTES as u64) as usize;
        let mut changes = Vec::new();
        for page in self.pool.pages_of(dataset) {
            if page.record.page >= keep_pages {
                changes.push(SlotChange::Drop {
                    page: (dataset, page.record.page),
                });
            } else if tail != 0 && page.record.page == keep_pages - 1 {
                let bytes = self.pool.frame(page.record.frame);
                if bytes[tail..].iter().any(|byte| *byte != 0) {
                    let mut copy = bytes.to_vec();
                    copy[tail..].fill(0);
                    let frame = self.pool.alloc_frame()?;
                    self.pool.frame_mut(frame).copy_from_slice(&copy);
                    changes.push(SlotChange::Put {
                        page: (dataset, page.record.page),
                        version: page.record.version + 1,
                        frame,
                        state: page.record.state,
                    });
                }
            }
        }
        for page in self.dirty_pages(dataset) {
            if page >= keep_pages {
                self.forget_dirty((dataset, page), true);
                self.resend.remove(&(dataset, page));
            } else if tail != 0 && page == keep_pages - 1 {
                let frame = self.dirty[&(dataset, page)].frame;
                self.pool.frame_mut(frame)[tail..].fill(0);
            }
        }
        if let Err(error) = self.pool.commit(&changes, TxTag::default()) {
            for change in &changes {
                if let SlotChange::Put { frame, .. } = change {
                    self.pool.unref_frame(*frame);
                }
            }
            return Err(error);
        }
        Ok(())
    }

    /// Forget every copy and staged write of `dataset` on this node.
    pub fn drop_dataset(&mut self, dataset: DatasetId) -> Result<(), PmError> {
        let mut served: Vec<PageKey> = self
            .served
            .keys()
            .filter(|key| key.0 == dataset)
            .copied()
            .collect();
        served.sort_unstable(); // frames freed in an order every run repeats
        for key in served {
            self.forget_served(key);
        }
        for page in self.dirty_pages(dataset) {
            self.forget_dirty((dataset, page), true);
        }
        self.resend.retain(|key, _| key.0 != dataset);
        let changes: Vec<SlotChange> = self
            .pool
            .pages_of(dataset)
            .iter()
            .map(|page| SlotChange::Drop {
                page: (dataset, page.record.page),
            })
            .collect();
        self.pool.commit(&changes, TxTag::default()).map(|_| ())
    }

    /// Pages of `dataset` with a persisted copy here, in order.
    pub fn copied_pages(&self, dataset: DatasetId) -> BTreeSet<u64> {
        self.pool
            .pages_of(dataset)
            .iter()
            .map(|p| p.record.page)
            .collect()
    }

    /// Every page of `dataset` this node has something of: a persisted copy, staged
    /// writes, or a copy the kernel was served (the node machine knows no dataset's size:
    /// what it tells an owner, or re-replicates, is among these).
    pub fn pages_here(&self, dataset: DatasetId) -> BTreeSet<u64> {
        let mut pages = self.copied_pages(dataset);
        pages.extend(self.dirty_pages(dataset));
        pages.extend(
            self.served
                .keys()
                .filter(|(of, _)| *of == dataset)
                .map(|(_, page)| *page),
        );
        pages
    }

    /// This node's copies of `dataset`'s pages, for `hotpot stat`.
    pub fn page_copies(&self, dataset: DatasetId) -> Vec<PageCopy> {
        let mut pages = self.copied_pages(dataset);
        pages.extend(self.dirty_pages(dataset));
        pages
            .into_iter()
            .filter_map(|page| {
                let (version, state) = match self.state((dataset, page))? {
                    PageState::Committed { version } => (version, "committed"),
                    PageState::Redundant { version } => (version, "redundant"),
                    PageState::Dirty { twin_version } => (twin_version, "dirty"),
                };
                Some(PageCopy {
                    page,
                    version,
                    state: state.to_string(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pm::SimRegion;

    fn table() -> PageTable {
        let region = SimRegion::from_image(vec![0u8; 2 << 20]);
        PageTable::open(Box::new(region), 1, 1).unwrap().0
    }

    fn read(table: &PageTable, page: PageKey) -> (Vec<u8>, ReadOutcome) {
        let mut out = vec![0u8; PAGE_BYTES];
        let outcome = table.read(page, &mut out);
        (out, outcome)
    }

    #[test]
    fn staged_writes_are_read_back_and_committed_with_a_new_version() {
        let mut table = table();
        table.stage((1, 0), 10, b"hello").unwrap();
        assert_eq!(
            table.state((1, 0)),
            Some(PageState::Dirty { twin_version: 0 })
        );
        let (bytes, outcome) = read(&table, (1, 0));
        assert_eq!(outcome, ReadOutcome::Dirty);
        assert_eq!(&bytes[10..15], b"hello");
        assert_eq!(table.commit_local(1), vec![1]);
        assert_eq!(
            table.state((1, 0)),
            Some(PageState::Committed { version: 1 })
        );
        table.stage((1, 0), 0, b"x").unwrap();
        let (bytes, _) = read(&table, (1, 0));
        assert_eq!(&bytes[0..1], b"x");
        assert_eq!(&bytes[10..15], b"hello", "the base was copied");
        assert_eq!(table.commit_local(1), vec![2]);
    }

    /// A read that another node answered: a copy older than this node's own gives way to
    /// it, and a page staged here is served rebased on a newer copy, its stores on top.
    #[test]
    fn a_fetched_copy_never_hides_a_newer_one_or_the_staged_stores() {
        let mut table = table();
        let mut old = vec![0u8; PAGE_BYTES];
        old[100] = 1;
        let mut newer = old.clone();
        newer[100] = 2;
        table.install_copy((1, 0), 2, &newer).unwrap();
        let (version, bytes) = table.read_fetched((1, 0), 1, old.clone()).unwrap();
        assert_eq!((version, bytes[100]), (2, 2), "this node's newer copy");
        // Staged on version 2; the owner's copy is at 3 (a decision not heard here yet).
        table.stage((1, 0), 0, &[7u8; 8]).unwrap();
        let mut owners = newer.clone();
        owners[200] = 3;
        let (version, bytes) = table.read_fetched((1, 0), 3, owners).unwrap();
        assert_eq!(version, 3);
        assert_eq!((bytes[100], bytes[200]), (2, 3), "the owner's copy");
        assert_eq!(&bytes[0..8], &[7u8; 8], "the staged stores on top");
        let snapshot = table.snapshot_dirty(1).remove(0);
        assert_eq!(
            snapshot.base_version, 3,
            "a commit is based on the owner's copy"
        );
        assert_eq!(snapshot.runs_sent(), vec![(0, vec![7u8; 8])]);
    }

    /// The daemon's invalidation after a decision: the kernel drops the page, the program
    /// faults it in again at once (served the new copy), and only then is the old base
    /// forgotten. The re-read base must stay: the write-back of that copy is diffed against
    /// it, and a diff against a copy committed later would send another writer's older bytes.
    #[test]
    fn a_base_served_while_the_kernel_drops_a_page_is_not_forgotten() {
        let mut table = table();
        let (v1, v2, v3) = (vec![1u8; PAGE_BYTES], vec![2u8; PAGE_BYTES], {
            let mut bytes = vec![2u8; PAGE_BYTES];
            bytes[100..200].fill(3); // another writer's part, committed after v2
            bytes
        });
        let mut out = vec![0u8; PAGE_BYTES];
        table.install_copy((9, 0), 1, &v1).unwrap();
        table.read_for_kernel((9, 0), &mut out);
        // Version 2 is decided here; the kernel is told to drop version 1.
        table.install_copy((9, 0), 2, &v2).unwrap();
        let mark = table.served_mark();
        table.read_for_kernel((9, 0), &mut out); // the program's fault, after the drop
        assert_eq!(out, v2);
        table.forget_served_before((9, 0), mark);
        assert!(table.is_served((9, 0)), "the kernel holds version 2");
        // Version 3 is decided; the kernel writes back its copy (version 2 and the
        // program's own bytes) as the next invalidation begins.
        table.install_copy((9, 0), 3, &v3).unwrap();
        let mut written = v2.clone();
        written[0..4].copy_from_slice(&[7, 7, 7, 7]);
        table.stage((9, 0), 0, &written).unwrap();
        table.rebase_dataset(9);
        let snapshot = table.snapshot_dirty(9).pop().expect("a dirty page");
        let sent = snapshot.runs_sent();
        assert_eq!(sent, [(0, vec![7, 7, 7, 7])], "only the program's bytes");
        assert_eq!(
            &snapshot.bytes[100..200],
            &[3u8; 100],
            "version 3's part kept"
        );
        // A base served before the mark goes.
        let mark = table.served_mark();
        table.forget_served_before((9, 0), mark);
        assert!(!table.is_served((9, 0)));
    }

    /// A staged page rebased on another writer's newer commit while the kernel holds its
    /// copy (a commit's snapshot rebases it): the kernel's whole-page write-back carries
    /// that writer's older bytes, which must not overwrite the rebased ones.
    #[test]
    fn a_write_back_of_the_kernels_older_copy_keeps_what_a_rebase_brought() {
        let mut table = table();
        let v1 = vec![1u8; PAGE_BYTES];
        let mut v2 = v1.clone();
        v2[100..200].fill(2); // another writer's part
        let mut out = vec![0u8; PAGE_BYTES];
        table.install_copy((9, 0), 1, &v1).unwrap();
        table.read_for_kernel((9, 0), &mut out);
        let mut kernel = out.clone();
        kernel[0..4].fill(7); // the program's store, written back
        table.stage((9, 0), 0, &kernel).unwrap();
        table.install_copy((9, 0), 2, &v2).unwrap();
        table.rebase_dataset(9);
        kernel[4..8].fill(8); // another store into the kernel's (older) copy
        table.stage((9, 0), 0, &kernel).unwrap();
        let snapshot = table.snapshot_dirty(9).pop().expect("a dirty page");
        assert_eq!(snapshot.base_version, 2);
        assert_eq!(&snapshot.bytes[0..8], &[7, 7, 7, 7, 8, 8, 8, 8]);
        assert_eq!(
            &snapshot.bytes[100..200],
            &[2u8; 100],
            "the rebase's bytes kept"
        );
        let sent = snapshot.runs_sent();
        assert_eq!(
            sent,
            [(0, vec![7, 7, 7, 7, 8, 8, 8, 8])],
            "only the program's bytes"
        );
        // Read again, the kernel holds the rebased page: its write-back is taken whole.
        table.read_for_kernel((9, 0), &mut out);
        assert_eq!(&out[100..200], &[2u8; 100]);
        out[100..104].fill(9);
        table.stage((9, 0), 0, &out).unwrap();
        let snapshot = table.snapshot_dirty(9).pop().expect("a dirty page");
        assert_eq!(&snapshot.bytes[100..104], &[9u8; 4]);
    }

    #[test]
    fn frames_are_not_leaked_by_commits_truncates_and_drops() {
        let mut table = table();
        let free = table.pool().frames_free();
        for round in 0..5u8 {
            for page in 0..8 {
                table.stage((3, page), 0, &[round; 100]).unwrap();
            }
            table.commit_local(3);
        }
        assert_eq!(table.pool().frames_free(), free - 8);
        table.stage((3, 7), 0, b"staged").unwrap();
        table.truncate(3, 4096 * 3 + 50).unwrap();
        assert_eq!(table.pool().frames_free(), free - 4);
        let (bytes, _) = read(&table, (3, 3));
        assert!(bytes[..50].iter().all(|b| *b == 4) && bytes[50..].iter().all(|b| *b == 0));
        table.drop_dataset(3).unwrap();
        assert_eq!(table.pool().frames_free(), free);
    }
}
