//! Page-table operations of the cluster protocol: snapshots of staged pages for a commit,
//! the owner applying a commit, copies an owner pushes to holders and replicas (prepared,
//! then decided or aborted), and copies fetched from an owner.
//! Must survive: writes that arrive while their page is being committed (kept, rebased), a
//! fetched copy racing a newer pushed one (the older never replaces the newer), a crash
//! between prepare and decide (a replica's Prepared record is discarded at recovery, a follower
//! owner's is kept and resolved with its leader), a decision arriving after a newer version
//! (never applied backwards).

use crate::page::merge::{apply_runs, diff_runs, diff_runs_including, Run};
use crate::page::table::Twin;
use crate::page::PageTable;
use crate::pm::layout::{TxRole, TxTag};
use crate::pm::{CopyState, PageKey, PmError, Prepared, SlotChange, PAGE_BYTES};
use crate::proto::messages::PageWrite;
use crate::proto::types::{DatasetId, NodeId, PageLocation};

/// A commit, named across the cluster: the owner that runs it and its sequence number there.
pub type TxKey = (NodeId, u64);

/// What deciding a prepared copy did (`PageTable::decide_copies`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decided {
    /// Its pages are current here now (the kernel's copies of them are out of date).
    Current { dataset: DatasetId, pages: Vec<u64> },
    /// A page of it was newer here already: it was dropped whole (never backwards). This
    /// node's copies of its other pages may be older than the decided ones, which their owner
    /// may count it as holding: it registers them with their owners (the daemon marks them
    /// unconfirmed), and reads them from the owners until then.
    Dropped { dataset: DatasetId, pages: Vec<u64> },
    /// No such copy waits here (settled before: a retry).
    Unknown,
}

impl Decided {
    /// The dataset and pages that became current, if they did.
    pub fn current(self) -> Option<(DatasetId, Vec<u64>)> {
        match self {
            Decided::Current { dataset, pages } => Some((dataset, pages)),
            Decided::Dropped { .. } | Decided::Unknown => None,
        }
    }
}

/// The bytes of a staged page at the moment a commit takes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtySnapshot {
    pub page: u64,
    /// Version the writes were made against (the twin's).
    pub base_version: u64,
    pub bytes: Vec<u8>,
    /// The bytes this node changed against the twin (MRMW sends these).
    pub runs: Vec<Run>,
    pub generation: u64,
}

#[cfg(test)]
impl DirtySnapshot {
    /// The runs a commit of this snapshot sends, as (offset, bytes).
    pub(crate) fn runs_sent(&self) -> Vec<(u16, Vec<u8>)> {
        self.runs
            .iter()
            .map(|run| (run.offset, run.bytes.clone()))
            .collect()
    }
}

/// A page of a commit as the owner sees it.
pub struct OwnedPage<'a> {
    pub page: u64,
    pub base_version: u64,
    pub bytes: &'a [u8],
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("page {page} was written against version {base} but is at version {current}: another writer committed it")]
    Stale { page: u64, base: u64, current: u64 },
    #[error("runs for page {page} are malformed: {reason}")]
    BadRuns { page: u64, reason: String },
    #[error(transparent)]
    Pm(#[from] PmError),
}

pub struct PreparedCopies {
    dataset: DatasetId,
    pages: Vec<u64>,
    frames: Vec<u32>,
    record: Prepared,
    since: std::time::Instant,
    /// This node's own commit may have written it: the committer's own copy, or a follower
    /// owner's record of a commit this node made.
    own: bool,
}

/// A prepared commit waiting for its decision, as the protocol sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingCopies {
    pub tx: TxKey,
    pub tag: TxTag,
    pub dataset: DatasetId,
    pub pages: Vec<u64>,
    pub age: std::time::Duration,
}

impl PageTable {
    /// The version of this node's persisted copy (0: none).
    pub fn version_of(&self, page: PageKey) -> u64 {
        self.pool
            .page(page)
            .map(|found| found.record.version)
            .unwrap_or(0)
    }

    /// Whether this node has a persisted copy of `page` (`read_persisted` without copying
    /// the bytes).
    pub fn has_copy(&self, page: PageKey) -> bool {
        self.pool.page(page).is_some()
    }

    /// This node's persisted copy of `page` (never its staged writes): its version and bytes.
    pub fn read_persisted(&self, page: PageKey) -> Option<(u64, Vec<u8>)> {
        let found = self.pool.page(page)?;
        Some((
            found.record.version,
            self.pool.frame(found.record.frame).to_vec(),
        ))
    }

    /// Where this node's persisted copy of `page` lies in its PM (see `PageLocation`).
    pub fn locate_persisted(&self, page: PageKey) -> Option<PageLocation> {
        let (found, slot, slot_offset, frame_offset) = self.pool.locate(page)?;
        Some(PageLocation {
            version: found.record.version,
            frame_offset: frame_offset as u64,
            slot_offset: slot_offset as u64,
            slot: slot.to_vec(),
            data_crc: found.record.data_crc,
        })
    }

    /// Copy out every staged page of `dataset` for a commit.
    pub fn snapshot_dirty(&self, dataset: DatasetId) -> Vec<DirtySnapshot> {
        self.dirty_pages(dataset)
            .into_iter()
            .map(|page| {
                let dirty = self.dirty[&(dataset, page)];
                let bytes = self.pool.frame(dirty.frame).to_vec();
                let runs = self.runs_of((dataset, page));
                DirtySnapshot {
                    page,
                    base_version: dirty.twin.version,
                    bytes,
                    runs,
                    generation: dirty.generation,
                }
            })
            .collect()
    }

    /// The bytes this node changed in its Dirty page `key`: where it differs from its twin,
    /// plus whatever a failed commit sent (`resend`) or a running one sends (`sending`).
    /// Empty without a Dirty page.
    fn runs_of(&self, key: PageKey) -> Vec<Run> {
        let Some(dirty) = self.dirty.get(&key) else {
            return Vec::new();
        };
        let mine = self.pool.frame(dirty.frame);
        let mut also = self.resend.get(&key).cloned().unwrap_or_default();
        also.extend(self.sending.get(&key).into_iter().flatten());
        merge_ranges(&mut also);
        match dirty.twin.frame {
            Some(twin) => diff_runs_including(self.pool.frame(twin), mine, &also),
            None => diff_runs_including(&[0u8; PAGE_BYTES], mine, &also),
        }
    }

    /// A commit of `taken` starts: the ranges each sends are in flight until `stop_sending`.
    pub fn start_sending(&mut self, dataset: DatasetId, taken: &[DirtySnapshot]) {
        for snapshot in taken {
            let ranges = self.sending.entry((dataset, snapshot.page)).or_default();
            ranges.extend(snapshot.runs.iter().map(run_range));
            merge_ranges(ranges);
        }
    }

    /// The commit of `taken` settled (acknowledged, failed or refused).
    pub fn stop_sending(&mut self, dataset: DatasetId, taken: &[&DirtySnapshot]) {
        for snapshot in taken {
            self.sending.remove(&(dataset, snapshot.page));
        }
    }

    /// A commit of `failed` did not succeed: the owners may have applied it all the same (in
    /// doubt), so the bytes it sent are sent again by every later commit of those pages,
    /// with what this node then holds there, whatever the program writes meanwhile.
    pub fn keep_for_resend(&mut self, dataset: DatasetId, failed: &[&DirtySnapshot]) {
        for snapshot in failed {
            let key = (dataset, snapshot.page);
            let ranges = self.resend.entry(key).or_default();
            ranges.extend(snapshot.runs.iter().map(run_range));
            // A snapshot's runs include the ranges kept before: merge them.
            merge_ranges(ranges);
        }
    }

    /// Write `bytes` into fresh frames (one reference each, the caller's).
    fn frames_from(&mut self, pages: &[(u64, &[u8])]) -> Result<Vec<u32>, PmError> {
        let mut frames = Vec::with_capacity(pages.len());
        for (_, bytes) in pages {
            assert_eq!(bytes.len(), PAGE_BYTES, "a page copy is one page");
            match self.pool.alloc_frame() {
                Ok(frame) => {
                    self.pool.frame_mut(frame).copy_from_slice(bytes);
                    frames.push(frame);
                }
                Err(error) => {
                    for frame in frames {
                        self.pool.unref_frame(frame);
                    }
                    return Err(error);
                }
            }
        }
        Ok(frames)
    }

    /// The owner's own step of a commit: every page becomes current at `base + 1`, all
    /// atomically, or nothing changes. Returns the new versions in order.
    /// `tag`: a leader of a multi-owner commit keeps its outcome (see `TxRole::Leader`).
    pub fn apply_owned(
        &mut self,
        dataset: DatasetId,
        pages: &[OwnedPage<'_>],
        tag: TxTag,
    ) -> Result<Vec<u64>, CommitError> {
        for page in pages {
            let current = self.version_of((dataset, page.page));
            if current != page.base_version {
                return Err(CommitError::Stale {
                    page: page.page,
                    base: page.base_version,
                    current,
                });
            }
        }
        let bytes: Vec<(u64, &[u8])> = pages.iter().map(|page| (page.page, page.bytes)).collect();
        let frames = self.frames_from(&bytes)?;
        let changes: Vec<SlotChange> = pages
            .iter()
            .zip(&frames)
            .map(|(page, frame)| SlotChange::Put {
                page: (dataset, page.page),
                version: page.base_version + 1,
                frame: *frame,
                state: CopyState::Committed,
            })
            .collect();
        if let Err(error) = self.pool.commit(&changes, tag) {
            for frame in frames {
                self.pool.unref_frame(frame);
            }
            return Err(error.into());
        }
        Ok(pages.iter().map(|page| page.base_version + 1).collect())
    }

    /// After a commit of snapshots succeeded (and the kernel's copies of those pages were
    /// invalidated): a page not written since its snapshot is clean now; a page written since
    /// keeps only the writes made after the snapshot, on top of the new committed copy.
    /// Those are where the Dirty page differs from its twin with the commit's runs on top,
    /// not from the snapshot's bytes: a read may have rebased the page while the commit ran,
    /// and the bytes the rebase brought (another writer's, as of that copy) are no write of
    /// this node's; replayed on a newer copy they would revert its writers' commits.
    pub fn finish_commit(&mut self, dataset: DatasetId, done: &[&DirtySnapshot]) {
        for snapshot in done {
            let key = (dataset, snapshot.page);
            let Some(dirty) = self.dirty.get(&key).copied() else {
                continue;
            };
            // The commit carried every byte kept for resending.
            self.resend.remove(&key);
            if dirty.generation == snapshot.generation {
                self.forget_dirty(key, true);
                continue;
            }
            let mut committed = match dirty.twin.frame {
                Some(twin) => self.pool.frame(twin).to_vec(),
                None => vec![0u8; PAGE_BYTES],
            };
            apply_runs(&mut committed, &snapshot.runs).expect("runs of a local diff fit the page");
            if self.planted_keep_rebased_bytes {
                committed.copy_from_slice(&snapshot.bytes);
            }
            let later = diff_runs(&committed, self.pool.frame(dirty.frame));
            self.replay_on_committed(key, &later);
        }
    }

    /// A Dirty page whose committed copy moved ahead (another writer's commit, or this
    /// node's own, merged): its changes against the old twin are re-applied on top of the
    /// new committed bytes, which become the twin. Local writes survive; so do theirs.
    /// Never backwards: a twin newer than the committed copy (the owner's copy, served while
    /// a newer copy prepared here waits for its decision) stays; rebased on the older copy,
    /// the diff would miss every byte written back to its older value (found by hotpot-sim,
    /// seed 10081251, and `tests/tests/lost_decide.rs`).
    pub fn rebase_dirty(&mut self, key: PageKey) {
        let Some(dirty) = self.dirty.get(&key).copied() else {
            return;
        };
        let Some(current) = self.pool.page(key).map(|found| found.record) else {
            return;
        };
        if dirty.twin.frame == Some(current.frame) || current.version <= dirty.twin.version {
            return;
        }
        let runs = self.runs_of(key);
        self.replay_on_committed(key, &runs);
    }

    /// Rebase every Dirty page of `dataset` whose committed copy moved (a commit of this
    /// node's whose outcome it learned later, another writer's): a snapshot taken next is
    /// based on the current versions.
    pub fn rebase_dataset(&mut self, dataset: DatasetId) {
        for page in self.dirty_pages(dataset) {
            self.rebase_dirty((dataset, page));
        }
    }

    /// The Dirty page of `key` rebased on its owner's copy, `bytes` at `version`, which this
    /// node has not installed (its own copy may be behind: a decision not heard yet, a copy
    /// its owner has not confirmed): a read of a staged page then shows the commits the
    /// owner has, with this node's staged writes on top. Never backwards (as `rebase_dirty`).
    pub fn rebase_dirty_on(
        &mut self,
        key: PageKey,
        version: u64,
        bytes: &[u8],
    ) -> Result<(), PmError> {
        assert_eq!(bytes.len(), PAGE_BYTES, "a copy is a whole page");
        let Some(dirty) = self.dirty.get(&key).copied() else {
            return Ok(());
        };
        if version <= dirty.twin.version {
            return Ok(());
        }
        let frame = self.pool.alloc_frame()?;
        self.pool.frame_mut(frame).copy_from_slice(bytes);
        let runs = self.runs_of(key);
        let base = Twin {
            frame: Some(frame),
            version,
        };
        self.replay_on(key, base, &runs);
        // replay_on took its own reference.
        self.pool.unref_frame(frame);
        Ok(())
    }

    /// Make the Dirty page of `key` the committed copy with `runs` on top, and the committed
    /// copy its twin. No-op without a Dirty page or a committed copy.
    fn replay_on_committed(&mut self, key: PageKey, runs: &[Run]) {
        let Some(current) = self.pool.page(key).map(|found| found.record) else {
            return;
        };
        let base = Twin {
            frame: Some(current.frame),
            version: current.version,
        };
        self.replay_on(key, base, runs);
    }

    /// Make the Dirty page of `key` `base` with `runs` on top, and `base` its twin. No-op
    /// without a Dirty page.
    fn replay_on(&mut self, key: PageKey, base: Twin, runs: &[Run]) {
        let Some(dirty) = self.dirty.get(&key).copied() else {
            return;
        };
        let mut rebased = match base.frame {
            Some(frame) => self.pool.frame(frame).to_vec(),
            None => vec![0u8; PAGE_BYTES],
        };
        apply_runs(&mut rebased, runs).expect("runs of a local diff fit the page");
        // The kernel's copy, if it holds one, stays as it was: its later writes change only
        // what they change in it (`stage`).
        if self.served.contains_key(&key) && !self.kernel_images.contains_key(&key) {
            let image = self.pool.frame(dirty.frame).to_vec();
            self.kernel_images.insert(key, image);
        }
        self.pool.frame_mut(dirty.frame).copy_from_slice(&rebased);
        if let Some(frame) = base.frame {
            self.pool.ref_frame(frame);
        }
        if let Some(old) = dirty.twin.frame {
            self.pool.unref_frame(old);
        }
        self.dirty.get_mut(&key).expect("dirty page present").twin = base;
    }

    /// The owner's step of an MRMW commit: each page's runs applied onto the owner's
    /// current copy (zeros if none), all at version + 1, atomically. Returns the merged
    /// pages (what holders and replicas must store) with their versions.
    pub fn apply_merged(
        &mut self,
        dataset: DatasetId,
        pages: &[(u64, &[Run])],
    ) -> Result<Vec<(u64, Vec<u8>)>, CommitError> {
        let mut merged = Vec::with_capacity(pages.len());
        let mut bases = Vec::with_capacity(pages.len());
        for (page, runs) in pages {
            let (version, mut bytes) = self
                .read_persisted((dataset, *page))
                .unwrap_or((0, vec![0u8; PAGE_BYTES]));
            apply_runs(&mut bytes, runs).map_err(|reason| CommitError::BadRuns {
                page: *page,
                reason,
            })?;
            bases.push(version);
            merged.push((version + 1, bytes));
        }
        // The merged pages commit like any owner's pages, on the versions just read.
        let owned: Vec<OwnedPage<'_>> = pages
            .iter()
            .zip(&bases)
            .zip(&merged)
            .map(|(((page, _), base), (_, bytes))| OwnedPage {
                page: *page,
                base_version: *base,
                bytes,
            })
            .collect();
        self.apply_owned(dataset, &owned, TxTag::default())?;
        Ok(merged)
    }

    /// A follower owner's record of its part of commit `tx` across owners, led by `leader`:
    /// each write at its base version + 1, durable and readable here, until the outcome.
    pub fn prepare_follower(
        &mut self,
        tx: TxKey,
        dataset: DatasetId,
        writes: &[PageWrite],
        leader: NodeId,
    ) -> Result<(), PmError> {
        let copies: Vec<(u64, u64, &[u8])> = writes
            .iter()
            .map(|write| (write.page, write.base_version + 1, write.bytes.as_slice()))
            .collect();
        let tag = TxTag {
            role: TxRole::Follower,
            tx,
            leader,
            participants: 0,
        };
        self.prepare_copies(tx, dataset, &copies, true, tag)
    }

    /// A holder's or replica's first step (or a follower owner's): the new bytes durable
    /// in a Prepared record. `readable`: the copy is read on this node (the committer's, an
    /// owner's): Committed. `tag`: the record's part in a multi-owner commit.
    pub fn prepare_copies(
        &mut self,
        tx: TxKey,
        dataset: DatasetId,
        pages: &[(u64, u64, &[u8])],
        readable: bool,
        tag: TxTag,
    ) -> Result<(), PmError> {
        if self.prepared.contains_key(&tx) {
            return Ok(()); // a retried Prepare
        }
        let bytes: Vec<(u64, &[u8])> = pages
            .iter()
            .map(|(page, _, bytes)| (*page, *bytes))
            .collect();
        let frames = self.frames_from(&bytes)?;
        let changes: Vec<SlotChange> = pages
            .iter()
            .zip(&frames)
            .map(|((page, version, _), frame)| {
                let held_for_reading = self
                    .pool
                    .page((dataset, *page))
                    .is_some_and(|found| found.record.state == CopyState::Committed);
                SlotChange::Put {
                    page: (dataset, *page),
                    version: *version,
                    frame: *frame,
                    state: if readable || held_for_reading {
                        CopyState::Committed
                    } else {
                        CopyState::Redundant
                    },
                }
            })
            .collect();
        match self.pool.prepare(&changes, tag) {
            Ok(record) => {
                self.prepared.insert(
                    tx,
                    PreparedCopies {
                        dataset,
                        pages: pages.iter().map(|(page, _, _)| *page).collect(),
                        frames,
                        own: match tag.role {
                            TxRole::Follower => tag.tx.0 == self.node,
                            _ => readable,
                        },
                        record,
                        since: std::time::Instant::now(),
                    },
                );
                Ok(())
            }
            Err(error) => {
                for frame in frames {
                    self.pool.unref_frame(frame);
                }
                Err(error)
            }
        }
    }

    /// The owner decided: the prepared copies become current. Never backwards: if a newer
    /// version of one of its pages is current already (a later commit's copy decided first),
    /// the record is dropped instead (`Decided::Dropped`).
    pub fn decide_copies(&mut self, tx: TxKey) -> Decided {
        let Some(prepared) = self.prepared.get(&tx) else {
            return Decided::Unknown;
        };
        let superseded = prepared.record.puts().iter().any(|(key, version, _)| {
            self.pool
                .page(*key)
                .is_some_and(|found| found.record.version >= *version)
        });
        let (dataset, pages) = (prepared.dataset, prepared.pages.clone());
        if superseded {
            self.abort_copies(tx);
            return Decided::Dropped { dataset, pages };
        }
        let prepared = self.prepared.remove(&tx).expect("found above");
        self.pool.decide(prepared.record);
        Decided::Current { dataset, pages }
    }

    /// The dataset and pages of prepared commit `tx`, if it is here.
    pub(super) fn prepared_pages(&self, tx: TxKey) -> Option<(DatasetId, Vec<u64>)> {
        self.prepared
            .get(&tx)
            .map(|prepared| (prepared.dataset, prepared.pages.clone()))
    }

    /// A follower record found at recovery waits again for its decision.
    pub(super) fn adopt_recovered(&mut self, record: Prepared) {
        let puts = record.puts();
        let Some(((dataset, _), _, _)) = puts.first().copied() else {
            self.pool.abort(record);
            return;
        };
        self.prepared.insert(
            record.tag().tx,
            PreparedCopies {
                dataset,
                pages: puts.iter().map(|((_, page), _, _)| *page).collect(),
                frames: puts.iter().map(|(_, _, frame)| *frame).collect(),
                own: record.tag().tx.0 == self.node,
                record,
                since: std::time::Instant::now(),
            },
        );
    }

    /// Prepared commits still waiting for a decision, in transaction order (every caller,
    /// and a replayed simulation, sees the same order).
    pub fn pending(&self) -> Vec<PendingCopies> {
        let mut pending: Vec<PendingCopies> = self
            .prepared
            .iter()
            .map(|(tx, prepared)| PendingCopies {
                tx: *tx,
                tag: *prepared.record.tag(),
                dataset: prepared.dataset,
                pages: prepared.pages.clone(),
                age: prepared.since.elapsed(),
            })
            .collect();
        pending.sort_unstable_by_key(|copies| copies.tx);
        pending
    }

    /// As a leader: whether this node decided multi-owner commit `tx` (outcome kept).
    pub fn outcome_decided(&self, tx: TxKey) -> bool {
        self.pool.outcome_decided(tx)
    }

    /// As a leader: follower `node` has decided `tx`.
    pub fn confirm_outcome(&mut self, tx: TxKey, node: NodeId) {
        self.pool.confirm_outcome(tx, node);
    }

    /// As a leader: kept outcomes and the followers (bitmap) that have not confirmed.
    pub fn outcomes_waiting(&self) -> Vec<(TxKey, u64)> {
        self.pool.outcomes_waiting()
    }

    /// Whether a prepared commit waiting here holds a newer copy of `key` (this node's
    /// decided copy may already be older than the owner's).
    pub fn in_prepared(&self, key: PageKey) -> bool {
        self.prepared
            .values()
            .any(|prepared| prepared.dataset == key.0 && prepared.pages.contains(&key.1))
    }

    /// The version the kernel's copy of `key` was served at, if a copy of it newer than that
    /// is prepared here and waiting that this node's own undecided commit may have written
    /// (with that copy's version). (Another node's commit prepared here is no such hazard:
    /// the kernel's copy, written back against its base, carries only this node's program's
    /// changes.)
    pub fn kernel_base_behind_own_prepared(&self, key: PageKey) -> Option<(u64, u64)> {
        let base = self.served.get(&key)?.twin.version;
        self.prepared
            .values()
            .filter(|prepared| prepared.own)
            .flat_map(|prepared| prepared.record.puts())
            .filter(|(put, version, _)| *put == key && *version > base)
            .map(|(_, version, _)| (base, version))
            .max()
    }

    /// Whether a copy of `key` newer than `version` is prepared here and waiting.
    pub fn prepared_newer_than(&self, key: PageKey, version: u64) -> bool {
        self.prepared.values().any(|prepared| {
            prepared
                .record
                .puts()
                .iter()
                .any(|(put, newer, _)| *put == key && *newer > version)
        })
    }

    /// Whether `tx` is prepared here and waiting.
    pub fn is_pending(&self, tx: TxKey) -> bool {
        self.prepared.contains_key(&tx)
    }

    /// The owner gave up: nothing of the prepared copies remains.
    pub fn abort_copies(&mut self, tx: TxKey) {
        if let Some(prepared) = self.prepared.remove(&tx) {
            self.pool.abort(prepared.record);
            for frame in prepared.frames {
                self.pool.unref_frame(frame);
            }
        }
    }

    /// Store a copy fetched from an owner, unless this node already has that version or a
    /// newer one, or a newer one is prepared. Returns whether it was stored.
    pub fn install_copy(
        &mut self,
        page: PageKey,
        version: u64,
        bytes: &[u8],
    ) -> Result<bool, PmError> {
        let installed = self.install_copies(page.0, &[(page.1, version, bytes)])?;
        Ok(!installed.is_empty())
    }

    /// `install_copy` for many pages of `dataset` in one atomic local commit (rebuilds and
    /// re-replication move thousands). Returns the pages stored.
    pub fn install_copies(
        &mut self,
        dataset: DatasetId,
        copies: &[(u64, u64, &[u8])],
    ) -> Result<Vec<u64>, PmError> {
        let pending: std::collections::HashSet<u64> = self
            .prepared
            .values()
            .filter(|prepared| prepared.dataset == dataset)
            .flat_map(|prepared| prepared.pages.iter().copied())
            .collect();
        let mut seen = std::collections::HashSet::new();
        let wanted: Vec<(u64, u64, &[u8])> = copies
            .iter()
            .filter(|(page, version, _)| {
                let key = (dataset, *page);
                let have_as_new = self.pool.page(key).is_some() && self.version_of(key) >= *version;
                !pending.contains(page) && !have_as_new && seen.insert(*page)
            })
            .copied()
            .collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let bytes: Vec<(u64, &[u8])> = wanted.iter().map(|(page, _, b)| (*page, *b)).collect();
        let frames = self.frames_from(&bytes)?;
        let changes: Vec<SlotChange> = wanted
            .iter()
            .zip(&frames)
            .map(|((page, version, _), frame)| SlotChange::Put {
                page: (dataset, *page),
                version: *version,
                frame: *frame,
                state: CopyState::Committed,
            })
            .collect();
        if let Err(error) = self.pool.commit(&changes, TxTag::default()) {
            for frame in frames {
                self.pool.unref_frame(frame);
            }
            return Err(error);
        }
        Ok(wanted.iter().map(|(page, _, _)| *page).collect())
    }
}

/// The byte range (start, end) a run covers.
fn run_range(run: &Run) -> (usize, usize) {
    let start = usize::from(run.offset);
    (start, start + run.bytes.len())
}

/// Sort `ranges` and join those that overlap or touch.
fn merge_ranges(ranges: &mut Vec<(usize, usize)>) {
    ranges.sort_unstable();
    ranges.dedup_by(|later, earlier| {
        let joins = later.0 <= earlier.1;
        if joins {
            earlier.1 = earlier.1.max(later.1);
        }
        joins
    });
}

#[cfg(test)]
impl PageTable {
    /// A holder's copy of page 0 of dataset 1 at `version`, prepared and decided by `tx`.
    pub(crate) fn decide_page_zero(&mut self, tx: TxKey, version: u64, bytes: &[u8]) {
        self.prepare_copies(tx, 1, &[(0, version, bytes)], false, TxTag::default())
            .unwrap();
        self.decide_copies(tx);
    }

    /// What a node that owns every page does for a commit of its own staged pages.
    pub(crate) fn commit_local(&mut self, dataset: DatasetId) -> Vec<u64> {
        let snapshots = self.snapshot_dirty(dataset);
        let owned: Vec<OwnedPage<'_>> = snapshots
            .iter()
            .map(|s| OwnedPage {
                page: s.page,
                base_version: s.base_version,
                bytes: &s.bytes,
            })
            .collect();
        let versions = self
            .apply_owned(dataset, &owned, TxTag::default())
            .expect("local commit");
        let done: Vec<&DirtySnapshot> = snapshots.iter().collect();
        self.finish_commit(dataset, &done);
        versions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::{PageState, ReadOutcome};
    use crate::pm::SimRegion;

    fn table() -> PageTable {
        let region = SimRegion::from_image(vec![0u8; 2 << 20]);
        PageTable::open(Box::new(region), 1, 1).unwrap().0
    }

    #[test]
    fn a_write_during_a_commit_stays_staged_on_top_of_the_committed_version() {
        let mut table = table();
        let free = table.pool().frames_free();
        table.stage((1, 0), 0, b"first").unwrap();
        let snapshots = table.snapshot_dirty(1);
        table.stage((1, 0), 100, b"later").unwrap();
        let owned = [OwnedPage {
            page: 0,
            base_version: 0,
            bytes: &snapshots[0].bytes,
        }];
        assert_eq!(
            table.apply_owned(1, &owned, TxTag::default()).unwrap(),
            vec![1]
        );
        table.finish_commit(1, &[&snapshots[0]]);
        assert_eq!(
            table.state((1, 0)),
            Some(PageState::Dirty { twin_version: 1 })
        );
        let mut out = vec![0u8; PAGE_BYTES];
        assert_eq!(table.read((1, 0), &mut out), ReadOutcome::Dirty);
        assert_eq!(&out[0..5], b"first");
        assert_eq!(&out[100..105], b"later");
        assert_eq!(table.commit_local(1), vec![2]);
        assert_eq!(
            table.state((1, 0)),
            Some(PageState::Committed { version: 2 })
        );
        assert_eq!(table.pool().frames_free(), free - 1, "no frame leaked");
    }

    #[test]
    fn two_writers_of_one_page_merge_and_a_holder_keeps_its_own_writes() {
        // Node A owns page 0 and writes its first half; node B (a holder) writes the second.
        let mut owner = table();
        let mut holder = table();
        owner.stage((1, 0), 0, &[1u8; 2048]).unwrap();
        holder.stage((1, 0), 2048, &[2u8; 2048]).unwrap();
        let from_holder = holder.snapshot_dirty(1);
        let mine = owner.snapshot_dirty(1);
        let merged = owner.apply_merged(1, &[(0, &mine[0].runs)]).unwrap();
        owner.finish_commit(1, &[&mine[0]]);
        assert_eq!(merged[0].0, 1);
        // The owner's commit reaches the holder, whose Dirty page is rebased on it.
        holder
            .prepare_copies((9, 1), 1, &[(0, 1, &merged[0].1)], false, TxTag::default())
            .unwrap();
        holder.decide_copies((9, 1));
        holder.forget_served((1, 0)); // the holder's kernel copy was invalidated
        let mut view = vec![0u8; PAGE_BYTES];
        holder.read_for_kernel((1, 0), &mut view);
        assert!(view[..2048].iter().all(|b| *b == 1) && view[2048..].iter().all(|b| *b == 2));
        // The holder commits its runs (made against version 0): both halves survive.
        let merged = owner.apply_merged(1, &[(0, &from_holder[0].runs)]).unwrap();
        assert_eq!(merged[0].0, 2);
        assert!(
            merged[0].1[..2048].iter().all(|b| *b == 1)
                && merged[0].1[2048..].iter().all(|b| *b == 2)
        );
    }

    #[test]
    fn a_whole_page_writeback_based_on_an_older_version_does_not_revert_other_writers() {
        let mut owner = table();
        let mut holder = table();
        // The holder's kernel reads the page (never written: zeros) and keeps it.
        let mut kernel_page = vec![0u8; PAGE_BYTES];
        holder.read_for_kernel((1, 0), &mut kernel_page);
        // Another writer commits bytes 8..16 at the owner; the holder receives version 1
        // before its kernel copy is invalidated.
        let mut other = vec![0u8; PAGE_BYTES];
        other[8..16].fill(0xaa);
        let merged = owner
            .apply_merged(1, &[(0, &diff_runs(&[0u8; PAGE_BYTES], &other))])
            .unwrap();
        holder
            .prepare_copies((3, 1), 1, &[(0, 1, &merged[0].1)], false, TxTag::default())
            .unwrap();
        holder.decide_copies((3, 1));
        // The holder's program wrote bytes 0..8 in its (old) kernel copy, which the kernel
        // writes back whole, while being invalidated.
        kernel_page[0..8].fill(0xbb);
        holder.stage((1, 0), 0, &kernel_page).unwrap();
        holder.forget_served((1, 0));
        let snapshot = holder.snapshot_dirty(1);
        assert_eq!(
            snapshot[0].runs.len(),
            1,
            "only the holder's own bytes: {:?}",
            snapshot[0].runs
        );
        let merged = owner.apply_merged(1, &[(0, &snapshot[0].runs)]).unwrap();
        assert!(
            merged[0].1[0..8].iter().all(|b| *b == 0xbb),
            "the holder's bytes"
        );
        assert!(
            merged[0].1[8..16].iter().all(|b| *b == 0xaa),
            "the other writer's bytes survive"
        );
    }

    /// Found by `tests/tests/mrmw.rs`: a committer's kernel read its staged page while the
    /// commit ran (the page rebased on another writer's copy), the program stored again,
    /// and a third writer's commit was decided before this one settled. What stays staged
    /// must be the stores made since the snapshot, not the bytes the rebase brought: those
    /// are the older copy's, and sent again they revert the third writer's commit.
    #[test]
    fn a_page_rebased_while_its_commit_runs_keeps_only_later_stores_staged() {
        let mut owner = table();
        let mut holder = table();
        let other_writer = |owner: &mut PageTable, value: u8| {
            let mut page = owner
                .read_persisted((1, 0))
                .map_or(vec![0u8; PAGE_BYTES], |c| c.1);
            let before = page.clone();
            page[100..108].fill(value);
            owner
                .apply_merged(1, &[(0, &diff_runs(&before, &page))])
                .unwrap()
                .remove(0)
        };
        holder.stage((1, 0), 0, &[1u8; 8]).unwrap();
        let snapshot = holder.snapshot_dirty(1).remove(0);
        // Another writer's commit reaches the holder; its kernel reads the staged page.
        let (version, bytes) = other_writer(&mut owner, 0xaa);
        holder.decide_page_zero((7, 1), version, &bytes);
        holder.read_for_kernel((1, 0), &mut vec![0u8; PAGE_BYTES]);
        // The holder's commit is merged and decided; the program stores again.
        let (version, bytes) = owner
            .apply_merged(1, &[(0, &snapshot.runs)])
            .unwrap()
            .remove(0);
        holder.decide_page_zero((1, 1), version, &bytes);
        holder.stage((1, 0), 200, &[2u8; 8]).unwrap();
        // A third writer's commit is decided before the holder's commit settles.
        let (version, bytes) = other_writer(&mut owner, 0xbb);
        holder.decide_page_zero((8, 1), version, &bytes);
        holder.finish_commit(1, &[&snapshot]);
        let next = holder.snapshot_dirty(1).remove(0);
        let merged = owner
            .apply_merged(1, &[(0, &next.runs)])
            .unwrap()
            .remove(0)
            .1;
        assert!(
            merged[0..8].iter().all(|b| *b == 1),
            "the first commit's bytes"
        );
        assert!(merged[200..208].iter().all(|b| *b == 2), "the later stores");
        assert!(
            merged[100..108].iter().all(|b| *b == 0xbb),
            "the third writer's bytes survive: {:?}, sent {:?}",
            &merged[100..108],
            next.runs_sent()
        );
    }

    #[test]
    fn bytes_written_back_after_a_commit_in_doubt_are_sent_again() {
        for learns_the_outcome in [false, true] {
            // The owner applies the holder's commit of 0xaa but the holder hears nothing.
            let mut owner = table();
            let mut holder = table();
            holder.stage((1, 0), 0, &[0xaa; 8]).unwrap();
            let in_doubt = holder.snapshot_dirty(1);
            let merged = owner.apply_merged(1, &[(0, &in_doubt[0].runs)]).unwrap();
            holder.keep_for_resend(1, &[&in_doubt[0]]);
            if learns_the_outcome {
                // The decided copy reaches the holder: its staged page is rebased on it.
                holder
                    .prepare_copies((2, 1), 1, &[(0, 1, &merged[0].1)], false, TxTag::default())
                    .unwrap();
                holder.decide_copies((2, 1));
                holder.rebase_dataset(1);
            }
            // The program writes the old bytes back, then commits again.
            holder.stage((1, 0), 0, &[0u8; 8]).unwrap();
            let next = holder.snapshot_dirty(1);
            let merged = owner.apply_merged(1, &[(0, &next[0].runs)]).unwrap();
            assert!(
                merged[0].1[..8].iter().all(|b| *b == 0),
                "learns the outcome: {learns_the_outcome}: the program's last bytes are lost: {:?}",
                &merged[0].1[..8]
            );
            holder.finish_commit(1, &[&next[0]]);
            assert!(
                holder.resend.is_empty(),
                "nothing kept after a commit succeeds"
            );
        }
    }

    #[test]
    fn a_write_on_a_fetched_copy_a_prepared_one_kept_back_is_diffed_against_it() {
        // The owner's page: another writer's 0x11 in bytes 0..8, this node's 0x22 in 8..16.
        let mut owner = table();
        let mut first = vec![0u8; PAGE_BYTES];
        first[..8].fill(0x11);
        first[8..16].fill(0x22);
        owner
            .apply_merged(1, &[(0, &diff_runs(&[0u8; PAGE_BYTES], &first))])
            .unwrap();
        // This node, without a copy, is a target of a commit of the page still undecided,
        // and fetches it: the install is held back.
        let mut node = table();
        let free = node.pool().frames_free();
        node.prepare_copies((3, 1), 1, &[(0, 2, &first)], false, TxTag::default())
            .unwrap();
        assert!(!node.install_copy((1, 0), 1, &first).unwrap());
        node.serve_copy((1, 0), 1, &first).unwrap();
        // The program writes its bytes 8..16, one of them zero (staged on zeros, that byte
        // would be no change and keep the owner's 0x22).
        let mut mine = [0x33u8; 8];
        mine[2] = 0;
        node.stage((1, 0), 8, &mine).unwrap();
        let staged = node.snapshot_dirty(1);
        let merged = owner.apply_merged(1, &[(0, &staged[0].runs)]).unwrap();
        assert_eq!(
            &merged[0].1[..8],
            &[0x11; 8],
            "the other writer's bytes survive"
        );
        assert_eq!(&merged[0].1[8..16], &mine, "this node's bytes are whole");
        node.finish_commit(1, &[&staged[0]]);
        node.forget_served((1, 0));
        node.abort_copies((3, 1));
        assert_eq!(node.pool().frames_free(), free, "the base's frame is freed");
    }

    #[test]
    fn a_stale_base_is_refused_and_changes_nothing() {
        let mut table = table();
        table.stage((1, 3), 0, b"x").unwrap();
        table.commit_local(1);
        let page = vec![7u8; PAGE_BYTES];
        let error = table.apply_owned(
            1,
            &[OwnedPage {
                page: 3,
                base_version: 0,
                bytes: &page,
            }],
            TxTag::default(),
        );
        assert!(matches!(error, Err(CommitError::Stale { current: 1, .. })));
        assert_eq!(table.version_of((1, 3)), 1);
    }

    #[test]
    fn prepared_copies_become_current_only_when_decided_and_old_fetches_lose() {
        let mut table = table();
        let free = table.pool().frames_free();
        let v5 = vec![5u8; PAGE_BYTES];
        let v6 = vec![6u8; PAGE_BYTES];
        table
            .prepare_copies((2, 1), 9, &[(0, 6, &v6)], false, TxTag::default())
            .unwrap();
        assert_eq!(table.version_of((9, 0)), 0);
        assert!(
            !table.install_copy((9, 0), 5, &v5).unwrap(),
            "a prepared newer copy wins"
        );
        assert_eq!(table.decide_copies((2, 1)).current(), Some((9, vec![0])));
        assert_eq!(
            table.state((9, 0)),
            Some(PageState::Redundant { version: 6 })
        );
        assert!(
            !table.install_copy((9, 0), 5, &v5).unwrap(),
            "older than what is held"
        );
        table
            .prepare_copies(
                (2, 2),
                9,
                &[(0, 7, &v5), (1, 1, &v5)],
                false,
                TxTag::default(),
            )
            .unwrap();
        table.abort_copies((2, 2));
        assert_eq!(table.version_of((9, 0)), 6);
        assert_eq!(table.version_of((9, 1)), 0);
        assert_eq!(
            table.pool().frames_free(),
            free - 1,
            "aborted frames are free again"
        );
    }

    #[test]
    fn staged_writes_on_the_owners_newer_copy_are_not_rebased_on_an_older_one() {
        let mut table = table();
        let (v1, v2) = (vec![1u8; PAGE_BYTES], vec![2u8; PAGE_BYTES]);
        table.install_copy((9, 0), 1, &v1).unwrap();
        // Version 2 is prepared here, its decision lost; the owner's copy of it is served.
        table
            .prepare_copies((2, 1), 9, &[(0, 2, &v2)], false, TxTag::default())
            .unwrap();
        table.serve_copy((9, 0), 2, &v2).unwrap();
        assert_eq!(
            table.version_of((9, 0)),
            1,
            "the older copy is still the stored one"
        );
        // The program writes some bytes back to their older value.
        table.stage((9, 0), 0, &[1, 3, 1, 3]).unwrap();
        table.rebase_dataset(9);
        let snapshot = table.snapshot_dirty(9).pop().expect("a dirty page");
        assert_eq!(snapshot.base_version, 2, "based on the served copy");
        let sent = snapshot.runs_sent();
        assert_eq!(
            sent,
            [(0, vec![1, 3, 1, 3])],
            "every byte that differs from version 2"
        );
    }

    #[test]
    fn a_late_decision_never_moves_a_page_back() {
        let mut table = table();
        let free = table.pool().frames_free();
        let (v6, v7) = (vec![6u8; PAGE_BYTES], vec![7u8; PAGE_BYTES]);
        table
            .prepare_copies((1, 1), 9, &[(0, 6, &v6)], false, TxTag::default())
            .unwrap();
        table
            .prepare_copies((3, 1), 9, &[(0, 7, &v7)], false, TxTag::default())
            .unwrap();
        assert_eq!(table.decide_copies((3, 1)).current(), Some((9, vec![0])));
        assert_eq!(
            table.decide_copies((1, 1)),
            Decided::Dropped {
                dataset: 9,
                pages: vec![0]
            },
            "superseded: dropped"
        );
        assert_eq!(
            table.decide_copies((1, 1)),
            Decided::Unknown,
            "settled before"
        );
        let (version, bytes) = table.read_persisted((9, 0)).unwrap();
        assert!(version == 7 && bytes == v7, "version {version} kept");
        assert_eq!(
            table.pool().frames_free(),
            free - 1,
            "the dropped copy's frame is free"
        );
    }
}
