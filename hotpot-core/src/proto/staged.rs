//! A node's commit of what it staged for a dataset (a program's msync or fsync), one for the
//! daemon and the node machine: the staged pages rebased and taken at one moment, grouped by
//! the owner each goes to (MRMW: the changed byte runs; MRSW: whole pages with the version
//! they were written against), and, once the owners answered, settled in the page table.
//! Must survive: writes staged while the commit runs (they stay staged, on top of the new
//! bytes), a commit in doubt (what it sent goes again with the next one: an owner may hold
//! it), a refusal (nothing of it is anywhere).

use std::collections::BTreeMap;

use crate::page::{DirtySnapshot, PageTable};
use crate::proto::messages::{OwnerPages, PageWrite};
use crate::proto::types::{Dataset, DatasetId, Mode, NodeId};

/// The staged pages of a dataset as one commit took them, and what goes to each owner.
#[derive(Debug)]
pub struct StagedCommit {
    pub snapshots: Vec<DirtySnapshot>,
    pub groups: BTreeMap<NodeId, OwnerPages>,
}

/// How a commit of staged pages ended, as its committer knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    Committed,
    /// Nothing of it was applied anywhere (an owner refused it, or it was never sent).
    Refused,
    /// It may have been applied (in doubt, or an owner did not answer).
    Failed,
}

impl StagedCommit {
    /// Rebase `dataset`'s staged pages on the copies decided since they were staged and
    /// take them; what they send is in flight until `settle`.
    pub fn snapshot(table: &mut PageTable, dataset: DatasetId) -> Vec<DirtySnapshot> {
        table.rebase_dataset(dataset);
        let snapshots = table.snapshot_dirty(dataset);
        table.start_sending(dataset, &snapshots);
        snapshots
    }

    /// The commit of `snapshots`, grouped by `owner_of` each page. `None`: nothing staged.
    pub fn group(
        snapshots: Vec<DirtySnapshot>,
        dataset: &Dataset,
        owner_of: impl Fn(u64) -> NodeId,
    ) -> Option<StagedCommit> {
        if snapshots.is_empty() {
            return None;
        }
        let mut groups: BTreeMap<NodeId, OwnerPages> = BTreeMap::new();
        for snapshot in &snapshots {
            let group = groups.entry(owner_of(snapshot.page)).or_insert_with(|| {
                match dataset.params.mode {
                    Mode::Mrmw => OwnerPages::Runs(Vec::new()),
                    Mode::Mrsw => OwnerPages::Writes(Vec::new()),
                }
            });
            match group {
                OwnerPages::Runs(runs) => runs.push((snapshot.page, snapshot.runs.clone())),
                OwnerPages::Writes(writes) => writes.push(PageWrite {
                    page: snapshot.page,
                    base_version: snapshot.base_version,
                    bytes: snapshot.bytes.clone(),
                }),
            }
        }
        Some(StagedCommit { snapshots, groups })
    }

    /// The pages taken, in page order.
    pub fn pages(&self) -> Vec<u64> {
        self.snapshots
            .iter()
            .map(|snapshot| snapshot.page)
            .collect()
    }

    /// The pages whose kernel copies must go once the commit ended as `ended`; the caller
    /// drops them (and forgets their bases) before `settle`. Acknowledged MRMW pages: the
    /// merge may hold other writers' bytes the kernel has not seen. Acknowledged MRSW pages
    /// stay (one writer: the kernel holds the committed bytes). A failed commit leaves the
    /// kernel's copies as they are.
    pub fn stale_kernel_pages(&self, dataset: &Dataset, ended: Ended) -> Vec<u64> {
        match (ended, dataset.params.mode) {
            (Ended::Committed, Mode::Mrmw) => self.pages(),
            _ => Vec::new(),
        }
    }

    /// After the kernel's stale copies went: acknowledged, the pages are clean (or stay
    /// staged with what was written since the snapshot), and the MRSW kernel copies, kept,
    /// are based on the new copies; failed, they stay staged and the bytes the commit sent
    /// are kept to be sent again, unless it was refused.
    pub fn settle(&self, table: &mut PageTable, dataset: &Dataset, ended: Ended) {
        let taken: Vec<&DirtySnapshot> = self.snapshots.iter().collect();
        match ended {
            Ended::Committed => {
                if dataset.params.mode == Mode::Mrsw {
                    for page in self.pages() {
                        table.serve_committed((dataset.id, page));
                    }
                }
                table.finish_commit(dataset.id, &taken);
            }
            Ended::Failed => table.keep_for_resend(dataset.id, &taken),
            Ended::Refused => {}
        }
        table.stop_sending(dataset.id, &taken);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::diff_runs;
    use crate::pm::{SimRegion, PAGE_BYTES};
    use crate::proto::types::DatasetParams;

    fn table() -> PageTable {
        let region = SimRegion::from_image(vec![0u8; 2 << 20]);
        PageTable::open(Box::new(region), 1, 1).unwrap().0
    }

    fn dataset(mode: Mode) -> Dataset {
        Dataset {
            id: 1,
            params: DatasetParams {
                mode,
                replicas: 1,
                chunk_pages: 2,
            },
            owners: vec![2, 3],
            first_home: None,
        }
    }

    /// Pages 0..2 go to node 2, pages 2..4 to node 3 (chunks of two pages).
    fn owner_of(page: u64) -> NodeId {
        2 + (page / 2) as NodeId
    }

    fn stage_pages(table: &mut PageTable, pages: &[u64]) {
        for page in pages {
            table.stage((1, *page), 8, &[*page as u8 + 1; 4]).unwrap();
        }
    }

    #[test]
    fn nothing_staged_is_no_commit() {
        let mut table = table();
        let snapshots = StagedCommit::snapshot(&mut table, 1);
        assert!(StagedCommit::group(snapshots, &dataset(Mode::Mrmw), owner_of).is_none());
    }

    #[test]
    fn pages_are_grouped_by_owner_as_runs_or_whole_pages() {
        for mode in [Mode::Mrmw, Mode::Mrsw] {
            let mut table = table();
            stage_pages(&mut table, &[3, 0, 1]);
            let snapshots = StagedCommit::snapshot(&mut table, 1);
            let staged = StagedCommit::group(snapshots, &dataset(mode), owner_of).unwrap();
            assert_eq!(staged.pages(), vec![0, 1, 3]);
            let sent: Vec<(NodeId, Vec<u64>)> = staged
                .groups
                .iter()
                .map(|(owner, group)| {
                    let pages = match (mode, group) {
                        (Mode::Mrmw, OwnerPages::Runs(runs)) => {
                            for (page, runs) in runs {
                                assert_eq!(runs.len(), 1, "page {page}: one changed run");
                                assert_eq!(runs[0].offset, 8);
                                assert_eq!(runs[0].bytes, vec![*page as u8 + 1; 4]);
                            }
                            runs.iter().map(|(page, _)| *page).collect()
                        }
                        (Mode::Mrsw, OwnerPages::Writes(writes)) => {
                            for write in writes {
                                assert_eq!(write.bytes.len(), PAGE_BYTES, "whole pages");
                                assert_eq!(write.base_version, 0);
                            }
                            writes.iter().map(|write| write.page).collect()
                        }
                        (mode, group) => panic!("{mode:?} sends {group:?}"),
                    };
                    (*owner, pages)
                })
                .collect();
            assert_eq!(sent, vec![(2, vec![0, 1]), (3, vec![3])], "{mode:?}");
        }
    }

    #[test]
    fn each_end_settles_the_staged_pages_its_own_way() {
        for ended in [Ended::Committed, Ended::Refused, Ended::Failed] {
            let dataset = dataset(Mode::Mrmw);
            let mut table = table();
            stage_pages(&mut table, &[0]);
            let snapshots = StagedCommit::snapshot(&mut table, 1);
            let staged = StagedCommit::group(snapshots, &dataset, owner_of).unwrap();
            let stale = staged.stale_kernel_pages(&dataset, ended);
            staged.settle(&mut table, &dataset, ended);
            let left = table.snapshot_dirty(1);
            if ended == Ended::Committed {
                assert_eq!(stale, vec![0], "MRMW: the kernel's copy goes");
                assert!(left.is_empty(), "committed pages are clean: {left:?}");
                continue;
            }
            assert!(stale.is_empty(), "{ended:?}: the kernel keeps its copy");
            assert_eq!(left.len(), 1, "{ended:?}: the page stays staged");
            // The program writes the bytes back to zero, its twin's value, and commits again:
            // in doubt, the owner may hold the first bytes, so the zeros go too.
            table.stage((1, 0), 8, &[0; 4]).unwrap();
            let next = table.snapshot_dirty(1);
            let runs: Vec<(u16, Vec<u8>)> = next[0]
                .runs
                .iter()
                .map(|run| (run.offset, run.bytes.clone()))
                .collect();
            match ended {
                Ended::Failed => assert_eq!(runs, vec![(8, vec![0; 4])]),
                _ => assert!(runs.is_empty(), "{ended:?} sends {runs:?}"),
            }
        }
    }

    /// Found by hotpot-sim (seed 889 with storing threads): a committer's own commit was
    /// decided here before its answer came, and the kernel read the staged page in
    /// between; stores made since the snapshot that put bytes back to the old copy's values
    /// were no change against it, and the rebase on the decided copy put the commit's bytes
    /// back over them (a torn stamp, and a program's last store lost).
    #[test]
    fn a_store_back_to_the_old_bytes_survives_a_rebase_on_its_own_commit() {
        let mut owner = table();
        let mut holder = table();
        holder.stage((1, 0), 0, &[0xaa; 8]).unwrap();
        let staged = StagedCommit::snapshot(&mut holder, 1).remove(0);
        let mut other = vec![0u8; PAGE_BYTES];
        other[100..108].fill(0xbb);
        let (version, bytes) = owner
            .apply_merged(1, &[(0, &diff_runs(&[0u8; PAGE_BYTES], &other))])
            .unwrap()
            .remove(0);
        holder.decide_page_zero((7, 1), version, &bytes);
        holder.read_for_kernel((1, 0), &mut vec![0u8; PAGE_BYTES]);
        // The program puts its bytes back to zeros, the old copy's, while its commit runs.
        holder.stage((1, 0), 0, &[0u8; 8]).unwrap();
        let (version, bytes) = owner
            .apply_merged(1, &[(0, &staged.runs)])
            .unwrap()
            .remove(0);
        holder.decide_page_zero((1, 1), version, &bytes);
        let mut view = vec![0u8; PAGE_BYTES];
        holder.read_for_kernel((1, 0), &mut view);
        assert_eq!(
            &view[0..8],
            &[0u8; 8],
            "the kernel reads the program's last store"
        );
        let commit = StagedCommit {
            snapshots: vec![staged],
            groups: Default::default(),
        };
        commit.settle(&mut holder, &dataset(Mode::Mrmw), Ended::Committed);
        let next = holder.snapshot_dirty(1).remove(0);
        let merged = owner
            .apply_merged(1, &[(0, &next.runs)])
            .unwrap()
            .remove(0)
            .1;
        assert_eq!(&merged[0..8], &[0u8; 8], "the last store is committed");
        assert!(
            merged[100..108].iter().all(|b| *b == 0xbb),
            "the other writer's bytes"
        );
    }
}
