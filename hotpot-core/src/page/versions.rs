//! Published versions at an owner (docs/design.md, "Published versions"): the dataset
//! version of each current page, old page versions kept copy-on-write while a view pins
//! them, and the pins. Volatile by design: after a restart nothing is pinned and every kept
//! frame is free again (recovery counts only slots). Must survive: a commit that fails after
//! its old frames were kept (they are let go), copies changed by paths that know no dataset
//! version (their version becomes unknown, and a view then gets Stale, never wrong bytes).

use std::collections::{BTreeMap, HashMap};

use crate::page::PageTable;
use crate::pm::PageKey;
use crate::proto::types::{DatasetId, NodeId};

/// A view as its owners know it: the viewing node and its own number for the view.
pub type ViewKey = (NodeId, u64);

/// An old version of a page, kept for views at `from <= v < to`. `frame: None`: the page
/// did not exist then (zeros).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Kept {
    from: u64,
    to: u64,
    frame: Option<u32>,
}

#[derive(Default)]
pub struct Versions {
    /// Dataset version of the current copy of each page this node applied as owner, with
    /// the page version it had then: a copy whose page version moved since is unknown.
    current: HashMap<PageKey, (u64, u64)>,
    kept: HashMap<PageKey, Vec<Kept>>,
    pins: HashMap<ViewKey, (DatasetId, u64)>,
    /// Per dataset: views below this version can no longer be served here.
    available_from: HashMap<DatasetId, u64>,
}

/// Old frames taken for views by `keep_for_views`, until the commit's apply succeeds or fails.
#[must_use]
pub struct KeptForCommit {
    dataset: DatasetId,
    version: u64,
    pages: Vec<u64>,
    kept: Vec<(PageKey, Kept)>,
}

/// What a node's owners report about pinned versions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PinUsage {
    pub views: u64,
    pub frames_kept: u64,
}

impl PageTable {
    /// The dataset version of this node's current copy of `key`: `Some(0)` if it has none
    /// (never written), `None` if unknown.
    pub fn dataset_version_of(&self, key: PageKey) -> Option<u64> {
        let Some(found) = self.pool.page(key) else {
            return Some(0);
        };
        self.versions
            .current
            .get(&key)
            .filter(|(page_version, _)| *page_version == found.record.version)
            .map(|(_, version)| *version)
    }

    fn pinned_in(&self, dataset: DatasetId, from: u64, to: u64) -> bool {
        self.versions
            .pins
            .values()
            .any(|(pinned, v)| *pinned == dataset && from <= *v && *v < to)
    }

    fn raise_available_from(&mut self, dataset: DatasetId, version: u64) {
        let floor = self.versions.available_from.entry(dataset).or_insert(0);
        *floor = (*floor).max(version);
    }

    /// Before an owner applies `pages` of `dataset` at dataset version `version`: the
    /// current frames some view still needs get one more reference each.
    pub fn keep_for_views(
        &mut self,
        dataset: DatasetId,
        pages: &[u64],
        version: u64,
    ) -> KeptForCommit {
        let mut kept = Vec::new();
        for page in pages {
            let key = (dataset, *page);
            let frame = self.pool.page(key).map(|found| found.record.frame);
            match self.dataset_version_of(key) {
                Some(old) if old < version && self.pinned_in(dataset, old, version) => {
                    if let Some(frame) = frame {
                        self.pool.ref_frame(frame);
                    }
                    let from = old;
                    kept.push((
                        key,
                        Kept {
                            from,
                            to: version,
                            frame,
                        },
                    ));
                }
                _ => self.raise_available_from(dataset, version),
            }
        }
        KeptForCommit {
            dataset,
            version,
            pages: pages.to_vec(),
            kept,
        }
    }

    /// After the apply: on success the kept frames serve views and the pages are at
    /// `version`; on failure the extra references go.
    pub fn settle_for_views(&mut self, kept: KeptForCommit, applied: bool) {
        if !applied {
            for (_, old) in kept.kept {
                if let Some(frame) = old.frame {
                    self.pool.unref_frame(frame);
                }
            }
            return;
        }
        for (key, old) in kept.kept {
            self.versions.kept.entry(key).or_default().push(old);
        }
        for page in kept.pages {
            let key = (kept.dataset, page);
            if let Some(found) = self.pool.page(key) {
                let page_version = found.record.version;
                self.versions
                    .current
                    .insert(key, (page_version, kept.version));
            }
        }
    }

    /// A follower owner's phase 3: `decide_copies`, the pages becoming dataset version
    /// `version` (old frames kept for views as at an owner's apply). Without a version (a
    /// resolution after a restart) the pages' versions become unknown.
    pub fn decide_copies_at(
        &mut self,
        tx: crate::page::TxKey,
        version: Option<u64>,
    ) -> crate::page::Decided {
        let (Some(version), Some((dataset, pages))) = (version, self.prepared_pages(tx)) else {
            return self.decide_copies(tx);
        };
        let kept = self.keep_for_views(dataset, &pages, version);
        let decided = self.decide_copies(tx);
        let current = matches!(decided, crate::page::Decided::Current { .. });
        self.settle_for_views(kept, current);
        decided
    }

    /// Pages of `dataset` whose dataset version is unknown here, with their page versions.
    pub fn unknown_versions(&self, dataset: DatasetId) -> Vec<(u64, u64)> {
        self.pool
            .pages_of(dataset)
            .iter()
            .filter(|found| {
                self.dataset_version_of((dataset, found.record.page))
                    .is_none()
            })
            .map(|found| (found.record.page, found.record.version))
            .collect()
    }

    /// Give the pages `unknown_versions` listed the dataset version `latest` (asked after
    /// they last changed): an over-estimate, so views below it are refused here.
    pub fn assume_versions(&mut self, dataset: DatasetId, pages: &[(u64, u64)], latest: u64) {
        for (page, page_version) in pages {
            let key = (dataset, *page);
            let unchanged = self
                .pool
                .page(key)
                .is_some_and(|found| found.record.version == *page_version);
            if unchanged && self.dataset_version_of(key).is_none() {
                self.versions.current.insert(key, (*page_version, latest));
            }
        }
        self.raise_available_from(dataset, latest);
    }

    /// Pin `dataset` at `version` for `view`; refused if this owner no longer has it.
    pub fn pin_version(
        &mut self,
        view: ViewKey,
        dataset: DatasetId,
        version: u64,
    ) -> Result<(), u64> {
        if self.versions.pins.get(&view) == Some(&(dataset, version)) {
            return Ok(());
        }
        let floor = self
            .versions
            .available_from
            .get(&dataset)
            .copied()
            .unwrap_or(0);
        // Below the floor, only a version another view pinned throughout is still whole.
        let pinned_already = self
            .versions
            .pins
            .values()
            .any(|pinned| *pinned == (dataset, version));
        if version < floor && !pinned_already {
            return Err(floor);
        }
        if let Some((old_dataset, _)) = self.versions.pins.insert(view, (dataset, version)) {
            self.release_kept(old_dataset);
        }
        Ok(())
    }

    /// Drop `view`'s pin and every kept frame no other pin needs.
    pub fn unpin_version(&mut self, view: ViewKey) {
        if let Some((dataset, _)) = self.versions.pins.remove(&view) {
            self.release_kept(dataset);
        }
    }

    fn release_kept(&mut self, dataset: DatasetId) {
        let pins: Vec<u64> = self
            .versions
            .pins
            .values()
            .filter(|(pinned, _)| *pinned == dataset)
            .map(|(_, v)| *v)
            .collect();
        let mut freed = Vec::new();
        self.versions.kept.retain(|key, olds| {
            if key.0 != dataset {
                return true;
            }
            olds.retain(|old| {
                let needed = pins.iter().any(|v| old.from <= *v && *v < old.to);
                if !needed {
                    freed.extend(old.frame);
                }
                needed
            });
            !olds.is_empty()
        });
        // In frame order, not the map's: the frames freed go back in an order every run
        // (and a replayed simulation) repeats, so the next frames taken are the same.
        freed.sort_unstable();
        for frame in freed {
            self.pool.unref_frame(frame);
        }
    }

    /// Versions pinned here, by dataset.
    pub fn pinned_versions(&self) -> BTreeMap<DatasetId, Vec<u64>> {
        let mut pinned: BTreeMap<DatasetId, Vec<u64>> = BTreeMap::new();
        for (dataset, v) in self.versions.pins.values() {
            pinned.entry(*dataset).or_default().push(*v);
        }
        for versions in pinned.values_mut() {
            versions.sort_unstable();
            versions.dedup();
        }
        pinned
    }

    pub fn pin_usage(&self) -> PinUsage {
        PinUsage {
            views: self.versions.pins.len() as u64,
            frames_kept: self
                .versions
                .kept
                .values()
                .flatten()
                .filter(|old| old.frame.is_some())
                .count() as u64,
        }
    }

    /// The bytes of page `page` of `dataset` at dataset version `version` (`None`: zeros),
    /// from the current copy or a kept one.
    pub fn read_at_version(
        &self,
        dataset: DatasetId,
        page: u64,
        version: u64,
    ) -> Result<Option<Vec<u8>>, String> {
        let key = (dataset, page);
        let bytes_of = |frame: Option<u32>| frame.map(|frame| self.pool.frame(frame).to_vec());
        match self.dataset_version_of(key) {
            Some(current) if current <= version => Ok(bytes_of(
                self.pool.page(key).map(|found| found.record.frame),
            )),
            Some(current) => self
                .versions
                .kept
                .get(&key)
                .and_then(|olds| {
                    olds.iter()
                        .find(|old| old.from <= version && version < old.to)
                })
                .map(|old| bytes_of(old.frame))
                .ok_or_else(|| {
                    format!(
                        "page {page} of dataset {dataset} is at version {current} here and its \
                         version {version} is not kept"
                    )
                }),
            None => Err(format!(
                "page {page} of dataset {dataset} changed here without a dataset version \
                 (a recovery or an install); it cannot be served at version {version}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::OwnedPage;
    use crate::pm::layout::TxTag;
    use crate::pm::{SimRegion, PAGE_BYTES};

    fn table() -> PageTable {
        let region = SimRegion::from_image(vec![0u8; 2 << 20]);
        PageTable::open(Box::new(region), 1, 7).unwrap().0
    }

    fn commit(table: &mut PageTable, page: u64, fill: u8, version: u64) {
        let base = table.version_of((5, page));
        let bytes = vec![fill; PAGE_BYTES];
        let kept = table.keep_for_views(5, &[page], version);
        let applied = table.apply_owned(
            5,
            &[OwnedPage {
                page,
                base_version: base,
                bytes: &bytes,
            }],
            TxTag::default(),
        );
        table.settle_for_views(kept, applied.is_ok());
        applied.unwrap();
    }

    fn at(table: &PageTable, page: u64, version: u64) -> Result<u8, String> {
        table
            .read_at_version(5, page, version)
            .map(|bytes| bytes.map_or(0, |bytes| bytes[0]))
    }

    #[test]
    fn a_pinned_version_is_kept_while_pinned_and_freed_after() {
        let mut table = table();
        commit(&mut table, 0, 1, 1);
        commit(&mut table, 1, 1, 1);
        let used = table.pool().usage().frames_used;
        table.pin_version((2, 1), 5, 1).unwrap();
        commit(&mut table, 0, 2, 2);
        commit(&mut table, 0, 3, 3);
        // Version 1 of page 0 kept; version 2 was pinned by nobody and is gone.
        assert_eq!(table.pool().usage().frames_used, used + 1);
        assert_eq!(at(&table, 0, 1), Ok(1));
        assert_eq!(at(&table, 1, 1), Ok(1));
        assert_eq!(at(&table, 0, 3), Ok(3));
        assert!(at(&table, 0, 2).is_err(), "version 2 was not kept");
        assert_eq!(table.pin_version((2, 2), 5, 2), Err(3));
        // Version 1 is pinned already: a second view of it is whole.
        assert_eq!(table.pin_version((3, 1), 5, 1), Ok(()));
        table.unpin_version((3, 1));
        table.unpin_version((2, 1));
        assert_eq!(table.pool().usage().frames_used, used);
        assert!(at(&table, 0, 1).is_err());
    }

    #[test]
    fn a_page_written_after_the_pin_reads_as_zeros_at_the_pinned_version() {
        let mut table = table();
        commit(&mut table, 0, 1, 1);
        table.pin_version((2, 1), 5, 1).unwrap();
        commit(&mut table, 7, 9, 2);
        assert_eq!(at(&table, 7, 1), Ok(0));
        assert_eq!(at(&table, 7, 2), Ok(9));
    }

    #[test]
    fn a_failed_apply_gives_back_the_kept_frames() {
        let mut table = table();
        commit(&mut table, 0, 1, 1);
        table.pin_version((2, 1), 5, 1).unwrap();
        let used = table.pool().usage().frames_used;
        let kept = table.keep_for_views(5, &[0], 2);
        assert_eq!(table.pool().usage().frames_used, used);
        table.settle_for_views(kept, false);
        table.unpin_version((2, 1));
        assert_eq!(table.pool().usage().frames_used, used);
        assert_eq!(at(&table, 0, 1), Ok(1));
    }

    #[test]
    fn a_copy_changed_without_a_dataset_version_is_unknown_until_assumed() {
        let mut table = table();
        commit(&mut table, 0, 1, 4);
        table
            .install_copies(5, &[(0, 9, &[6u8; PAGE_BYTES][..])])
            .unwrap();
        assert!(at(&table, 0, 4).is_err());
        let unknown = table.unknown_versions(5);
        assert_eq!(unknown, vec![(0, 9)]);
        table.assume_versions(5, &unknown, 10);
        assert_eq!(at(&table, 0, 10), Ok(6));
        assert!(at(&table, 0, 9).is_err());
        assert_eq!(table.pin_version((2, 1), 5, 9), Err(10));
    }
}
