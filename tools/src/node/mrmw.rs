//! MRMW at the owner: locks that refuse instead of waiting (phase 1), merging a committer's
//! byte runs into the current pages and replicating them (phase 2), unlocking (phase 3).
//! Must survive: two committers racing for the same pages (one is refused and retries), a
//! committer that locks some owners and then gives up (it unlocks them), malformed runs
//! (refused, nothing applied).

use hotpot_core::page::{apply_runs, Run, TxKey};
use hotpot_core::pm::{PageKey, PAGE_BYTES};
use hotpot_core::proto::messages::{NodeReply, PageWrite};
use hotpot_core::proto::types::{Dataset, DatasetId, FsError, Ino, NodeId};

use super::protocol::{Applied, Protocol};

impl Protocol {
    pub fn serve_lock(&self, tx: TxKey, dataset: DatasetId, pages: &[u64]) -> NodeReply {
        if let Err(error) = self.wait_ready() {
            return NodeReply::Failed(error);
        }
        let keys: Vec<PageKey> = pages.iter().map(|page| (dataset, *page)).collect();
        if self.aborted.lock().expect("aborted lock").contains(tx) {
            return NodeReply::Failed(FsError::Io(format!("commit {tx:?} was given up")));
        }
        match self.lock_pages(tx, &keys, false) {
            Ok(mut held) => {
                held.armed = false; // held until Unlock or CommitRuns{release}
                self.phase1_locks
                    .lock()
                    .expect("phase 1 locks")
                    .insert(tx, (keys, std::time::Instant::now()));
                NodeReply::Done
            }
            Err(error) => NodeReply::Failed(error),
        }
    }

    pub fn serve_unlock(&self, tx: TxKey, dataset: DatasetId, pages: &[u64]) -> NodeReply {
        self.phase1_locks.lock().expect("phase 1 locks").remove(&tx);
        let keys: Vec<PageKey> = pages.iter().map(|page| (dataset, *page)).collect();
        self.unlock_pages(tx, &keys);
        NodeReply::Done
    }

    /// Phase 2 at the owner (the leader, with `followers`).
    #[allow(clippy::too_many_arguments)]
    pub fn commit_runs(
        &self,
        tx: TxKey,
        followers: &[NodeId],
        dataset: &Dataset,
        ino: Ino,
        committer: NodeId,
        pages: &[(u64, Vec<Run>)],
        release: bool,
    ) -> Result<Applied, FsError> {
        self.wait_ready()?;
        self.check_owner(dataset, pages.iter().map(|(page, _)| *page))?;
        self.phase1_locks.lock().expect("phase 1 locks").remove(&tx);
        let keys: Vec<PageKey> = pages.iter().map(|(page, _)| (dataset.id, *page)).collect();
        let mut held = self.lock_pages(tx, &keys, false)?;
        held.armed = release;
        let writes = self.merge_runs(dataset, pages)?;
        self.commit_locked(
            tx,
            followers,
            dataset,
            ino,
            (committer, false),
            &writes,
            None,
        )
    }

    /// The committer's runs on this owner's current pages (which the caller has locked, so
    /// nobody changes them between this merge and the apply).
    pub(super) fn merge_runs(
        &self,
        dataset: &Dataset,
        pages: &[(u64, Vec<Run>)],
    ) -> Result<Vec<PageWrite>, FsError> {
        let mut writes = Vec::with_capacity(pages.len());
        for (page, runs) in pages {
            let (version, mut bytes) = self
                .owned_copy(dataset.id, *page)?
                .unwrap_or((0, vec![0u8; PAGE_BYTES]));
            apply_runs(&mut bytes, runs)
                .map_err(|reason| FsError::Invalid(format!("page {page}: {reason}")))?;
            writes.push(PageWrite {
                page: *page,
                base_version: version,
                bytes,
            });
        }
        Ok(writes)
    }
}

impl Protocol {
    /// Phase-1 locks whose committer went silent (no phase 2 or unlock for `after`) are
    /// released, and the commit is given up for good: a late phase 2 is refused.
    pub(super) fn expire_phase1_locks(&self, after: std::time::Duration) {
        let expired: Vec<(TxKey, Vec<PageKey>)> = {
            let mut locks = self.phase1_locks.lock().expect("phase 1 locks");
            let old: Vec<TxKey> = locks
                .iter()
                .filter(|(_, (_, since))| since.elapsed() >= after)
                .map(|(tx, _)| *tx)
                .collect();
            old.into_iter()
                .filter_map(|tx| locks.remove(&tx).map(|(keys, _)| (tx, keys)))
                .collect()
        };
        for (tx, keys) in expired {
            self.aborted.lock().expect("aborted lock").insert(tx);
            self.unlock_pages(tx, &keys);
            tracing::warn!(
                ?tx,
                "phase-1 locks of a silent committer released; commit given up"
            );
        }
    }
}
